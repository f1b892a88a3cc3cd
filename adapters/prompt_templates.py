"""Prompt template sets for zero-shot classification, with ``{}`` as the class-name placeholder.

- ``imagenet``: the 80 CLIP ImageNet templates (``florence.data.templates``), also used for Fashion-MNIST and any
  ImageFolder unless a template file is given.
- one set per benchmark dataset: CLIP's per-dataset sets as kept in CLIP_benchmark
  ``clip_benchmark/datasets/en_zeroshot_classification_templates.json`` @ 48de38c (their ``{c}`` written as ``{}``);
  counts cifar10 18, cifar100 18, food101 1, sun397 2, cars 8, fgvc_aircraft 2, voc2007 1, dtd 8, pets 1,
  caltech101 34, flowers102 1.
- a user file: ``florence.data.templates.load_templates(path)`` (the one template-file reader, shared with training)
  reads a JSON list of strings or a text file with one template a line; ``{}`` or ``{c}`` marks the class name.
"""
from __future__ import annotations

# CIFAR-10 and CIFAR-100 share one CLIP template set (18 templates)
_CIFAR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)

DATASET_TEMPLATES: dict[str, tuple[str, ...]] = {
    "cifar10": _CIFAR_TEMPLATES,
    "cifar100": _CIFAR_TEMPLATES,
    "food101": (
        "a photo of {}, a type of food.",
    ),
    "sun397": (
        "a photo of a {}.",
        "a photo of the {}.",
    ),
    "cars": (
        "a photo of a {}.",
        "a photo of the {}.",
        "a photo of my {}.",
        "i love my {}!",
        "a photo of my dirty {}.",
        "a photo of my clean {}.",
        "a photo of my new {}.",
        "a photo of my old {}.",
    ),
    "fgvc_aircraft": (
        "a photo of a {}, a type of aircraft.",
        "a photo of the {}, a type of aircraft.",
    ),
    "voc2007": (
        "a photo of a {}.",
    ),
    "dtd": (
        "a photo of a {} texture.",
        "a photo of a {} pattern.",
        "a photo of a {} thing.",
        "a photo of a {} object.",
        "a photo of the {} texture.",
        "a photo of the {} pattern.",
        "a photo of the {} thing.",
        "a photo of the {} object.",
    ),
    "pets": (
        "a photo of a {}, a type of pet.",
    ),
    "caltech101": (
        "a photo of a {}.",
        "a painting of a {}.",
        "a plastic {}.",
        "a sculpture of a {}.",
        "a sketch of a {}.",
        "a tattoo of a {}.",
        "a toy {}.",
        "a rendition of a {}.",
        "a embroidered {}.",
        "a cartoon {}.",
        "a {} in a video game.",
        "a plushie {}.",
        "a origami {}.",
        "art of a {}.",
        "graffiti of a {}.",
        "a drawing of a {}.",
        "a doodle of a {}.",
        "a photo of the {}.",
        "a painting of the {}.",
        "the plastic {}.",
        "a sculpture of the {}.",
        "a sketch of the {}.",
        "a tattoo of the {}.",
        "the toy {}.",
        "a rendition of the {}.",
        "the embroidered {}.",
        "the cartoon {}.",
        "the {} in a video game.",
        "the plushie {}.",
        "the origami {}.",
        "art of the {}.",
        "graffiti of the {}.",
        "a drawing of the {}.",
        "a doodle of the {}.",
    ),
    "flowers102": (
        "a photo of a {}, a type of flower.",
    ),
}


def imagenet_templates() -> tuple[str, ...]:
    """The 80 CLIP ImageNet templates from ``florence.data.templates``."""
    from florence.data import templates

    return tuple(templates.OPENAI_IMAGENET_TEMPLATES)


def get_template_set(name: str) -> tuple[str, ...]:
    """Templates by set name: ``"imagenet"`` or a key of ``DATASET_TEMPLATES``."""
    if name == "imagenet":
        return imagenet_templates()
    if name not in DATASET_TEMPLATES:
        raise KeyError(f"unknown template set {name!r}; known: imagenet, {', '.join(sorted(DATASET_TEMPLATES))}")
    return DATASET_TEMPLATES[name]
