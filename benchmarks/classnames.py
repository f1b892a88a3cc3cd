"""Class names that the standard distributions of the benchmark datasets do not carry (or carry in a form CLIP
replaced by curated names). Each is indexed like the dataset's own labels. Every other dataset reads its class names
from its files on disk (see ``florence.benchmarks.datasets``); ImageNet-1K's 1000 curated names come from open_clip's
``zero_shot_metadata`` or a user file.

Sources: CLIP's curated lists as kept in CLIP_benchmark ``clip_benchmark/datasets/en_classnames.json`` @ 48de38c
(flowers, caltech101); the PASCAL VOC 2007 devkit category list (voc2007).
"""
from __future__ import annotations


# VOC devkit identifiers, in devkit order (ImageSets/Main/<name>_test.txt).
VOC2007_CATEGORIES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

# Prompt names for the VOC identifiers above (the two-word identifiers split into words).
VOC2007_CLASSNAMES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dining table", "dog",
    "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor",
)

# Oxford Flowers-102, label 0..101 (the distribution has labels only, no names).
FLOWERS102_CLASSNAMES: tuple[str, ...] = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold", "tiger lily",
    "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon", "colt's foot", "king protea",
    "spear thistle", "yellow iris", "globe flower", "purple coneflower", "peruvian lily", "balloon flower",
    "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger", "grape hyacinth",
    "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke", "sweet william", "carnation",
    "garden phlox", "love in the mist", "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower",
    "great masterwort", "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion", "petunia",
    "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura", "geranium", "orange dahlia",
    "pink and yellow dahlia", "cautleya spicata", "japanese anemone", "black-eyed susan", "silverbush",
    "californian poppy", "osteospermum", "spring crocus", "bearded iris", "windflower", "tree poppy", "gazania",
    "azalea", "water lily", "rose", "thorn apple", "morning glory", "passion flower", "lotus", "toad lily",
    "anthurium", "frangipani", "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia",
    "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "air plant", "foxglove", "bougainvillea",
    "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower", "trumpet creeper", "blackberry lily",
)

# Caltech-101 in the sorted order of 101_ObjectCategories/ folder names (BACKGROUND_Google first).
CALTECH101_CLASSNAMES: tuple[str, ...] = (
    "background", "off-center face", "centered face", "leopard", "motorbike", "accordion", "airplane", "anchor",
    "ant", "barrel", "bass", "beaver", "binocular", "bonsai", "brain", "brontosaurus", "buddha", "butterfly",
    "camera", "cannon", "side of a car", "ceiling fan", "cellphone", "chair", "chandelier", "body of a cougar cat",
    "face of a cougar cat", "crab", "crayfish", "crocodile", "head of a  crocodile", "cup", "dalmatian",
    "dollar bill", "dolphin", "dragonfly", "electric guitar", "elephant", "emu", "euphonium", "ewer", "ferry",
    "flamingo", "head of a flamingo", "garfield", "gerenuk", "gramophone", "grand piano", "hawksbill", "headphone",
    "hedgehog", "helicopter", "ibis", "inline skate", "joshua tree", "kangaroo", "ketch", "lamp", "laptop", "llama",
    "lobster", "lotus", "mandolin", "mayfly", "menorah", "metronome", "minaret", "nautilus", "octopus", "okapi",
    "pagoda", "panda", "pigeon", "pizza", "platypus", "pyramid", "revolver", "rhino", "rooster", "saxophone",
    "schooner", "scissors", "scorpion", "sea horse", "snoopy (cartoon beagle)", "soccer ball", "stapler",
    "starfish", "stegosaurus", "stop sign", "strawberry", "sunflower", "tick", "trilobite", "umbrella", "watch",
    "water lilly", "wheelchair", "wild cat", "windsor chair", "wrench", "yin and yang symbol",
)
