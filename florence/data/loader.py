"""From a data config to an endless, resumable stream of UniCL batches for one rank.

``build_train_loader(config, preprocess=..., tokenize=..., rank=r, world_size=w, run_dir=...)`` returns a
:class:`TrainLoader`; iterating it yields ``dict(images (B,3,H,W) float32, input_ids (B,L) int64,
attention_mask (B,L) int64, labels (B,) int64)`` forever (``B`` = per-rank ``batch_size``). See
``florence/data/__init__.py`` for the config keys.

A bad sample under ``on_bad_sample="skip"`` is replaced by the next index of the same source (tried up to
``max_bad_retries`` times), so every batch keeps its size (the cross-rank gather of the loss needs equal sizes)
and the replacement is the same in every run; the skip is logged (:mod:`florence.data.bad_samples`).

:func:`validate_data_config` checks a whole ``data:`` section (keys and value types of every source and of
``augment``) without reading any data; ``build_train_loader`` runs it first, and the training engine runs it while
validating the config, before anything is written.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from florence.data.bad_samples import BadSampleError, BadSampleLog, BadSampleSummary
from florence.data.errors import DataConfigError
from florence.data.images import BadSample
from florence.data.mixing import MixturePlan, MixtureSampler, label_offsets, text_rng
from florence.data.sources import (
    CaptionSource,
    FashionMNISTSource,
    ImageLabelSource,
    caption_table,
    image_folder,
    label_table,
)
from florence.data.schema import validate_data_config, validate_source_spec
from florence.data.transforms import ImageTransform, build_transform, seeded_rngs

Tokenize = Callable[[list[str]], dict[str, torch.Tensor]]
Sample = tuple[torch.Tensor, str, int]

class RetryingDataset(Dataset):
    """Map-style dataset over ``sources`` (each with ``len()`` and a ``name``), indexed by the training stream's
    ``(source id, local index, sample seed)`` keys (:class:`~florence.data.mixing.MixtureSampler`).

    A sample whose ``load`` raises :class:`BadSample` is replaced by the next one of its source, up to
    ``max_bad_retries`` times (each counted and logged by ``bad``), so every batch keeps its size; then
    :class:`BadSampleError`. Subclasses give ``load(source_id, index, seed, attempt)``; its random draws depend only on
    ``seed`` (and ``attempt``), so a resumed run and a replacement sample look the same in every run."""

    def __init__(self, sources: Sequence, bad: BadSampleLog, *, max_bad_retries: int = 16):
        self.sources = list(sources)
        self.bad = bad
        self.max_bad_retries = int(max_bad_retries)

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def __getitem__(self, key: tuple[int, int, int]) -> Any:
        source_id, index, seed = key
        source = self.sources[source_id]
        for attempt in range(self.max_bad_retries + 1):
            try:
                return self.load(source_id, (index + attempt) % len(source), seed, attempt)
            except BadSample as err:
                self.bad.handle(err, source=source.name)
        raise BadSampleError(f"source {source.name!r}: {self.max_bad_retries + 1} bad samples in a row from index "
                             f"{index} (see the bad-sample log)")

    def load(self, source_id: int, index: int, seed: int, attempt: int) -> Any:
        raise NotImplementedError


class TrainDataset(RetryingDataset):
    """Image-label and image-text sources; returns ``(image (3,H,W), text, global label)``."""

    def __init__(self, sources: Sequence, transform: ImageTransform, bad: BadSampleLog, *, max_bad_retries: int = 16):
        super().__init__(sources, bad, max_bad_retries=max_bad_retries)
        self.transform = transform
        self.offsets = label_offsets([s.kind for s in self.sources],
                                     [getattr(s, "num_classes", None) for s in self.sources])

    def load(self, source_id: int, index: int, seed: int, attempt: int = 0) -> Sample:
        """One sample; template/synonym choice and the transform's random draws depend only on ``seed``."""
        raw = self.sources[source_id].get(index, text_rng(seed))
        with seeded_rngs(seed, numpy=self.transform.pil_only):
            image = self.transform(raw.image)
        return image, raw.text, raw.label + self.offsets[source_id]


def collate(batch: Sequence[Sample], tokenize: Tokenize | None) -> dict[str, torch.Tensor]:
    """``[(image (3,H,W), text, label)] * B`` -> ``dict(images (B,3,H,W), input_ids (B,L), attention_mask (B,L),
    labels (B,) int64)``; ``tokenize`` maps a list of B texts to ``dict(input_ids, attention_mask)``. Without a
    ``tokenize`` (image-only tasks such as classification) the texts are dropped: ``dict(images, labels)``."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    if tokenize is None:
        return {"images": torch.stack([image for image, _, _ in batch]),  # B, 3, H, W
                "labels": torch.tensor([label for _, _, label in batch], dtype=torch.int64)}  # B
    tokens = tokenize([text for _, text, _ in batch])
    return {
        "images": torch.stack([image for image, _, _ in batch]),  # B, 3, H, W
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
        "labels": torch.tensor([label for _, _, label in batch], dtype=torch.int64),  # B
    }


class TrainLoader:
    """Endless iterable of collated batches for one rank, with the data position as state.

    ``state_dict()`` reflects the batches actually handed to the caller (not the DataLoader's prefetch), so saving
    it after step k and calling ``load_state_dict`` in a new process continues with batch k + 1 exactly.
    ``bad_sample_summary()`` counts the skipped samples (all workers and ranks when a run directory is set).
    """

    def __init__(self, dataset: TrainDataset, sampler: MixtureSampler, *, collate_fn: Callable,
                 num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int | None = None):
        self.dataset = dataset
        self.sampler = sampler
        self.collate_fn = collate_fn
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor if self.num_workers > 0 else None

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    def __len__(self) -> int:
        """Per-rank batches per epoch: the whole global batches in one epoch (at least 1). Iteration itself is
        endless and runs across epoch boundaries."""
        return max(1, self.sampler.plan.epoch_length // (self.sampler.batch_size * self.sampler.world_size))

    @property
    def samples_per_epoch(self) -> int:
        """Global samples per epoch (all ranks together)."""
        return self.sampler.plan.epoch_length

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self.sampler.epoch_of(self.sampler.batch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        start = self.sampler.batch
        sampler = MixtureSampler(self.sampler.plan, batch_size=self.sampler.batch_size, rank=self.sampler.rank,
                                 world_size=self.sampler.world_size, start_batch=start)
        loader = DataLoader(self.dataset, batch_size=sampler.batch_size, sampler=sampler,
                            num_workers=self.num_workers, collate_fn=self.collate_fn, pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor, drop_last=False,
                            generator=torch.Generator().manual_seed(self.sampler.plan.seed))  # not the global RNG
        for batch in loader:
            self.sampler.batch += 1
            yield batch

    @classmethod
    def for_dataset(cls, dataset: RetryingDataset, weights: Sequence[float], config: dict[str, Any], *,
                    collate_fn: Callable, rank: int = 0, world_size: int = 1) -> "TrainLoader":
        """The stream over ``dataset``'s sources mixed by ``weights`` (their sizes: plain concatenation), with the
        ``data:`` keys ``seed``, ``samples_per_epoch``, ``batch_size`` (per rank), ``num_workers``, ``pin_memory``
        and ``prefetch_factor``."""
        plan = MixturePlan([len(s) for s in dataset.sources], weights, seed=int(config.get("seed", 0)),
                           samples_per_epoch=config.get("samples_per_epoch"))
        sampler = MixtureSampler(plan, batch_size=int(config["batch_size"]), rank=rank, world_size=world_size)
        return cls(dataset, sampler, collate_fn=collate_fn, num_workers=int(config.get("num_workers", 0)),
                   pin_memory=bool(config.get("pin_memory", False)), prefetch_factor=config.get("prefetch_factor"))

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])

    def bad_sample_summary(self) -> BadSampleSummary:
        return self.dataset.bad.summary()


def stream_bad_log(config: dict[str, Any], *, rank: int = 0, run_dir: str | Path | None = None) -> BadSampleLog:
    """A training stream's bad-sample log: the ``on_bad_sample`` policy, written to ``run_dir`` (else the config's)."""
    return BadSampleLog(config.get("on_bad_sample", "skip"), run_dir=run_dir if run_dir is not None else
                        config.get("run_dir"), rank=rank)


def build_source(spec: dict[str, Any], key: str = "source") -> FashionMNISTSource | ImageLabelSource | CaptionSource:
    """One map-style source from its config dict (``type``: fashion_mnist | image_folder | label_table |
    caption_table), checked first with :func:`validate_source_spec` (``key`` names it in errors)."""
    validate_source_spec(spec, key)
    kind = spec["type"]
    if kind == "webdataset":
        raise DataConfigError(f"{key}.type: a webdataset source is a stream, not a map-style source")
    path = spec.get("path")
    name = spec.get("name")
    if kind == "fashion_mnist":
        return FashionMNISTSource(path, split=spec.get("split", "train"), templates=spec.get("templates"),
                                  name=name or "fashion_mnist")
    if kind == "image_folder":
        return image_folder(path, class_names=spec.get("class_names"), templates=spec.get("templates"), name=name)
    if kind == "label_table":
        return label_table(path, class_names=spec.get("class_names"), root=spec.get("root"),
                           templates=spec.get("templates"), name=name)
    if kind == "caption_table":
        return caption_table(path, root=spec.get("root"), name=name)
    raise AssertionError(f"validate_source_spec accepted an unhandled source type {kind!r}")


def build_train_loader(config: dict[str, Any], *, preprocess: dict[str, Any], tokenize: Tokenize | None, rank: int = 0,
                       world_size: int = 1, run_dir: str | Path | None = None):
    """The training stream of rank ``rank`` of ``world_size`` (see ``florence/data/__init__.py`` for the keys).

    Returns a :class:`TrainLoader` (map-style sources) or, when the sources are webdataset shards, a
    :class:`~florence.data.webdataset_source.WebDatasetLoader` with the same interface.
    """
    validate_data_config(config)
    if "batch_size" not in config:
        raise DataConfigError("data.batch_size: required (per rank)")
    specs = config["sources"]
    augment = dict(config.get("augment") or {})
    transform = build_transform(preprocess, train=True, **augment)
    bad = stream_bad_log(config, rank=rank, run_dir=run_dir)
    tokenize_collate = functools.partial(collate, tokenize=tokenize)
    common = dict(batch_size=int(config["batch_size"]), rank=rank, world_size=world_size,
                  seed=int(config.get("seed", 0)), num_workers=int(config.get("num_workers", 0)))
    if any(s.get("type") == "webdataset" for s in specs):
        from florence.data.webdataset_source import build_webdataset_loader

        return build_webdataset_loader(specs, transform=transform, bad=bad, collate_fn=tokenize_collate,
                                       max_bad_retries=config.get("max_bad_retries", 16), **common)
    sources = [build_source(spec, f"data.sources[{i}]") for i, spec in enumerate(specs)]
    weights = [float(spec.get("weight", 1.0)) for spec in specs]
    dataset = TrainDataset(sources, transform, bad, max_bad_retries=config.get("max_bad_retries", 16))
    return TrainLoader.for_dataset(dataset, weights, config, collate_fn=tokenize_collate, rank=rank,
                                   world_size=world_size)
