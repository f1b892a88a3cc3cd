"""Data for training and evaluation: sources, mixing, transforms, the bad-sample policy and the batch collate.

Evaluation reads datasets of ``(image tensor, target)`` through ``EvalLoader`` (``florence.data.eval_loader``): the
same bad-sample policy as training, but a bad sample is left out (counted, with file and reason) rather than
replaced; ``map_batches(fn, loader)`` runs a model over the good batches.

Engine entry point::

    loader = build_train_loader(cfg["data"], preprocess=model.preprocess, tokenize=model.tokenize,
                                rank=rank, world_size=world_size, run_dir=run_dir)
    for batch in loader:          # endless: the engine decides when to stop
        batch["images"]           # (B, 3, H, W) float32, normalised with preprocess mean/std
        batch["input_ids"]        # (B, L) int64 } from tokenize(list of B texts)
        batch["attention_mask"]   # (B, L) int64 }
        batch["labels"]           # (B,) int64: class id (offset per source) or caption label (bit 62 set)
    state = loader.state_dict()   # data position = batches handed out so far; save it with the checkpoint
    loader.load_state_dict(state) # in the resumed run, before iterating: continues with the next batch exactly
    print(loader.bad_sample_summary().format())  # at the end: skipped samples by reason

``B`` is the per-rank batch; the global batch ``k`` is the same whatever the split over ranks (rank ``r``
holds its ``r``-th slice), so a 2-rank run sees the same samples as a 1-rank run with twice the batch.
``tokenize`` runs in the DataLoader workers; with a non-fork start method it must be picklable.

Data config (``cfg["data"]``; ``validate_data_config(cfg["data"])`` checks every key and value type below, nested
ones included, without reading data, and raises ``DataConfigError`` naming the dotted key)::

    sources:                       # mixed with sampling weights; label spaces kept disjoint
      - type: fashion_mnist        # path: folder of the 4 idx .gz files (default: Debian package); split: train|test
        weight: 1.0
        templates: unicl           # unicl ("{}." + 80 CLIP) | openai (80) | none | [list] | path to a template file
      - type: image_folder         # path: root/<class>/<image>; class_names: optional list / .txt / .json
      - type: label_table          # path: .csv/.tsv (image, label); class_names; root for relative paths
      - type: caption_table        # path: .csv/.tsv/.jsonl (image, caption); label = caption hash
      - type: webdataset           # path: shard pattern/list ("shards/{000..009}.tar"); resampled: false
                                   # (resumes exactly; true: seeded, resumes approximately); shuffle_buffer: 1000;
                                   # class_names + templates for .cls shards (webdataset sources cannot be
                                   # mixed with the map-style ones above)
    batch_size: 64                 # per rank
    num_workers: 2
    seed: 0
    on_bad_sample: skip            # skip | raise
    samples_per_epoch: null        # default: sum of source sizes
    max_bad_retries: 16            # consecutive bad samples tolerated before an error
    augment: {randaugment: null, scale: [0.08, 1.0], ratio: [0.75, 1.333], hflip: 0.5}
    run_dir: null                  # or the build_train_loader(run_dir=...) argument; bad_samples.jsonl goes here
"""
from florence.data.bad_samples import BadSampleError, BadSampleLog, BadSampleSummary, summarize_bad_samples
from florence.data.errors import DataConfigError, DataFileError, DataNotFound
from florence.data.eval_loader import EvalLoader, format_bad_report, map_batches
from florence.data.images import BadSample, clean_caption, decode_image, normalize_caption, to_rgb
from florence.data.loader import (
    TrainDataset,
    TrainLoader,
    build_source,
    build_train_loader,
    collate,
    validate_data_config,
    validate_source_spec,
)
from florence.data.mixing import MixturePlan, MixtureSampler, label_offsets, sample_seed
from florence.data.sources import (
    FASHION_MNIST_CLASSES,
    CaptionSource,
    FashionMNISTSource,
    ImageLabelSource,
    RawSample,
    caption_label,
    caption_table,
    image_folder,
    label_table,
    read_idx,
)
from florence.data.templates import (
    OPENAI_IMAGENET_TEMPLATES,
    UNICL_TEMPLATES,
    clean_class_name,
    load_templates,
    make_prompt,
    resolve_templates,
)
from florence.data.transforms import ImageTransform, build_transform, seeded_rngs

__all__ = [
    "BadSample", "BadSampleError", "BadSampleLog", "BadSampleSummary", "CaptionSource", "DataConfigError",
    "DataFileError", "DataNotFound", "EvalLoader", "FASHION_MNIST_CLASSES", "FashionMNISTSource",
    "ImageLabelSource", "ImageTransform", "MixturePlan", "MixtureSampler", "OPENAI_IMAGENET_TEMPLATES", "RawSample",
    "TrainDataset", "TrainLoader", "UNICL_TEMPLATES", "build_source", "build_train_loader", "build_transform",
    "caption_label", "caption_table", "clean_caption", "clean_class_name", "collate", "decode_image",
    "format_bad_report", "image_folder", "label_offsets", "label_table", "load_templates", "make_prompt",
    "map_batches", "normalize_caption", "read_idx", "resolve_templates", "sample_seed", "seeded_rngs",
    "summarize_bad_samples", "to_rgb", "validate_data_config", "validate_source_spec",
]
