"""webdataset tar shards (pinned ``webdataset==1.0.2``) as an endless, rank- and worker-sharded stream.

A shard holds samples ``<key>.<image ext>`` plus ``<key>.txt`` (caption: label = caption hash) or
``<key>.cls`` (class id as ASCII digits: text = a prompt from ``class_names`` + ``templates``). Source spec keys
(a ``sources`` entry of the data config): ``type: webdataset``, ``path`` (brace pattern, ``::``-joined patterns
or a list of shard paths/URLs), ``weight``, ``resampled`` (bool), ``shuffle_buffer`` (samples; default 1000,
0 = shard order only),
``class_names``, ``templates``, ``name``.

Sharding. Without resampling every epoch shuffles the shard list with ``(seed, epoch)`` (the same order on all
ranks), rank ``r`` takes shards ``r::world_size`` and DataLoader worker ``w`` of that rank every
``num_workers``-th of those, so ranks and workers read disjoint shards that together cover the epoch; there must
be at least ``world_size * max(1, num_workers)`` shards. With ``resampled: true`` each (rank, worker) draws
shards with replacement from its own seeded stream (open_clip's default for large data).

Several webdataset sources are mixed per sample with their weights; class ids of ``.cls`` sources are offset
into disjoint ranges as for map-style sources. Bad samples (undecodable image, bad caption, missing ``txt``/``cls``,
unreadable shard) follow the ``on_bad_sample`` policy and are dropped from the stream.

Resume. ``state_dict()`` records the batches delivered; ``load_state_dict`` restarts every worker's stream with
a seed derived from that count. The continuation is a fresh draw from the same distribution, *not* the exact
samples an uninterrupted run would have seen (skipping the consumed samples exactly would re-read them all);
exact resume is provided for the map-style sources.
"""
from __future__ import annotations

import functools
import random
from typing import Any, Callable, Iterator, Sequence

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from florence.data.bad_samples import BadSampleError, BadSampleLog, BadSampleSummary
from florence.data.errors import DataConfigError
from florence.data.images import BadSample, clean_caption, decode_image
from florence.data.mixing import label_offsets, sample_seed, split_counts, text_rng
from florence.data.schema import validate_source_spec
from florence.data.sources import caption_label, load_class_names
from florence.data.templates import make_prompt, resolve_templates
from florence.data.transforms import ImageTransform, seeded_rngs

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff", "gif")


class WebDatasetSource:
    """One shard set; ``kind`` is ``"label"`` when ``class_names`` are given (samples need ``.cls``), else
    ``"text"`` (samples need ``.txt``)."""

    def __init__(self, urls: str | Sequence[str], *, class_names: Sequence | str | None = None,
                 templates: str | Sequence[str] | None = None, resampled: bool = False, shuffle_buffer: int = 1000,
                 name: str = "webdataset"):
        self.urls = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise DataConfigError(f"webdataset source {name!r}: no shards in {urls!r}")
        self.class_names = load_class_names(class_names) if class_names is not None else None
        self.kind = "label" if self.class_names is not None else "text"
        self.templates = resolve_templates(templates)
        self.resampled = bool(resampled)
        self.shuffle_buffer = int(shuffle_buffer)
        self.name = name

    @property
    def num_classes(self) -> int | None:
        return len(self.class_names) if self.class_names is not None else None

    def to_sample(self, raw: dict[str, Any], rng: random.Random) -> tuple[Any, str, int]:
        """A webdataset sample dict -> (RGB image, text, source-local label); raises BadSample."""
        where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
        image_key = next((k for k in IMAGE_KEYS if k in raw), None)
        if image_key is None:
            raise BadSample(where, f"no image in sample (has {sorted(k for k in raw if not k.startswith('__'))})")
        if self.kind == "text":
            if "txt" not in raw:
                raise BadSample(where, "no .txt caption in sample")
            text = clean_caption(raw["txt"], name=where)
            label = caption_label(text)
        else:
            if "cls" not in raw:
                raise BadSample(where, "no .cls class id in sample")
            try:
                label = int(raw["cls"].decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                raise BadSample(where, f"invalid .cls content ({raw['cls'][:20]!r})") from None
            if not 0 <= label < len(self.class_names):
                raise BadSample(where, f"class id {label} outside 0..{len(self.class_names) - 1}")
            text = make_prompt(self.class_names[label], self.templates, rng)
        return decode_image(raw[image_key], name=where), text, label


class _ShardHandler:
    """webdataset exception handler: an unreadable shard/member is a bad sample (logged or raised)."""

    def __init__(self, bad: BadSampleLog, source: str):
        self.bad, self.source = bad, source

    def __call__(self, exn: Exception) -> bool:
        where = next((str(a) for a in reversed(exn.args) if isinstance(a, str) and ("/" in a or ".tar" in a)), "?")
        detail = exn.args[0] if exn.args else exn
        self.bad.handle(BadSample(where, f"unreadable shard data ({type(exn).__name__}: {detail})"), source=self.source)
        return True


def _const(value: int) -> int:
    return value


def _shard_cycle(urls: list[str], *, seed: int, rank: int, world_size: int, worker: int, num_workers: int
                 ) -> Iterator[dict[str, str]]:
    """Endless dict(url=...) stream of this (rank, worker)'s shards, reshuffled each epoch."""
    epoch = 0
    while True:
        order = list(urls)
        random.Random(sample_seed(seed, epoch)).shuffle(order)
        mine = order[rank::world_size][worker::num_workers]
        for url in mine:
            yield {"url": url}
        epoch += 1


class WebDatasetStream(IterableDataset):
    """Endless stream of ``(image (3,H,W), text, global label)`` for one rank, mixing webdataset sources."""

    def __init__(self, sources: Sequence[WebDatasetSource], weights: Sequence[float], transform: ImageTransform,
                 bad: BadSampleLog, *, seed: int, rank: int, world_size: int, restart: int = 0,
                 max_bad_retries: int = 16):
        self.sources, self.weights = list(sources), list(weights)
        self.max_bad_retries = int(max_bad_retries)
        split_counts(1, self.weights)  # validates the weights
        self.offsets = label_offsets([s.kind for s in self.sources], [s.num_classes for s in self.sources])
        self.transform, self.bad = transform, bad
        self.seed, self.rank, self.world_size, self.restart = seed, rank, world_size, restart

    def _raw_samples(self, i: int, worker: int, num_workers: int, stream_seed: int) -> Iterator[dict]:
        source = self.sources[i]
        handler = _ShardHandler(self.bad, source.name)
        if source.resampled:
            shards = wds.ResampledShards(source.urls, seed=stream_seed, deterministic=True,
                                         worker_seed=functools.partial(_const, 0))
        else:
            if len(source.urls) < self.world_size * num_workers:
                raise DataConfigError(f"webdataset source {source.name!r}: {len(source.urls)} shards cannot feed "
                                      f"{self.world_size} ranks x {num_workers} workers; use more shards or "
                                      "resampled: true")
            shards = functools.partial(_shard_cycle, source.urls, seed=self.seed + i, rank=self.rank,
                                       world_size=self.world_size, worker=worker, num_workers=num_workers)
        stages = [shards, wds.tarfile_to_samples(handler=handler)]
        if source.shuffle_buffer > 1:  # 0 or 1: shard order only
            stages.append(wds.shuffle(source.shuffle_buffer, initial=min(100, source.shuffle_buffer),
                                      rng=random.Random(stream_seed)))
        return iter(wds.DataPipeline(*stages))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str, int]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream_seed = sample_seed(self.seed, (self.rank * 4096 + worker) * 1_000_003 + self.restart)
        streams = [self._raw_samples(i, worker, num_workers, sample_seed(stream_seed, i))
                   for i in range(len(self.sources))]
        pick = random.Random(stream_seed)
        count, failures = 0, 0
        while True:
            i = pick.choices(range(len(self.sources)), weights=self.weights)[0] if len(self.sources) > 1 else 0
            raw = next(streams[i])
            seed = sample_seed(stream_seed, count)
            count += 1
            try:
                image, text, label = self.sources[i].to_sample(raw, text_rng(seed))
                with seeded_rngs(seed, numpy=self.transform.pil_only):
                    tensor = self.transform(image)
            except BadSample as err:
                self.bad.handle(err, source=self.sources[i].name)
                failures += 1
                if failures > self.max_bad_retries:
                    raise BadSampleError(f"webdataset source {self.sources[i].name!r}: {failures} bad samples in a "
                                         f"row (data.max_bad_retries = {self.max_bad_retries}); last: {err}")
                continue
            failures = 0
            yield tensor, text, label + self.offsets[i]


class WebDatasetLoader:
    """Endless iterable of collated batches over webdataset sources; same interface as ``TrainLoader``."""

    def __init__(self, stream: WebDatasetStream, *, batch_size: int, collate_fn: Callable, num_workers: int = 0):
        self.stream, self.batch_size, self.collate_fn = stream, int(batch_size), collate_fn
        self.num_workers = int(num_workers)
        self.batch = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.stream.restart = self.batch
        loader = DataLoader(self.stream, batch_size=self.batch_size, num_workers=self.num_workers,
                            collate_fn=self.collate_fn, generator=torch.Generator().manual_seed(self.stream.seed))
        for batch in loader:
            self.batch += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"webdataset": {"seed": self.stream.seed, "batch": self.batch}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch = int(state["webdataset"]["batch"])

    def bad_sample_summary(self) -> BadSampleSummary:
        return self.stream.bad.summary()


def build_webdataset_loader(specs: Sequence[dict[str, Any]], *, transform: ImageTransform, bad: BadSampleLog,
                            collate_fn: Callable, batch_size: int, rank: int, world_size: int, seed: int,
                            num_workers: int, max_bad_retries: int = 16) -> WebDatasetLoader:
    """A :class:`WebDatasetLoader` from ``type: webdataset`` source specs (all sources must be webdataset)."""

    sources = []
    for i, spec in enumerate(specs):
        validate_source_spec(spec, f"data.sources[{i}]")
        if spec["type"] != "webdataset":
            raise DataConfigError(f"data.sources[{i}].type: webdataset sources cannot be mixed with map-style "
                                  f"sources (got {spec['type']!r})")
        sources.append(WebDatasetSource(spec["path"], class_names=spec.get("class_names"),
                                        templates=spec.get("templates"),
                                        resampled=spec.get("resampled", False),
                                        shuffle_buffer=spec.get("shuffle_buffer", 1000),
                                        name=spec.get("name") or f"webdataset{len(sources)}"))
    stream = WebDatasetStream(sources, [float(s.get("weight", 1.0)) for s in specs], transform, bad, seed=seed,
                              rank=rank, world_size=world_size, max_bad_retries=max_bad_retries)
    return WebDatasetLoader(stream, batch_size=batch_size, collate_fn=collate_fn, num_workers=num_workers)
