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

The stream of one (rank, worker) is a pure function of ``(seed, rank, worker, num_workers, world_size)`` and the
shards' contents: each source is read shard by shard (tar members grouped into samples by webdataset) through a
shuffle buffer of ``shuffle_buffer`` samples (it starts emitting once it holds ``min(100, shuffle_buffer)``,
and grows to full size by reading two samples per emitted one); the buffer's ``d``-th pick is
``hash(seed, d) % len(buffer)``. Several webdataset sources are mixed per sample: draw ``t`` of the worker picks
source ``i`` with probability ``weight_i / sum(weight)`` from ``hash(seed, t)``, and ``t`` also seeds the
sample's template choice and augmentation. Class ids of ``.cls`` sources are offset into disjoint ranges as for
map-style sources. Bad samples (undecodable image, bad caption, missing ``txt``/``cls``, unreadable shard) follow
the ``on_bad_sample`` policy and are dropped from the stream (the next draw replaces them). Each worker collates
whole batches, so a batch comes from one worker; the DataLoader hands them out round-robin over the workers.

Exact resume (``resampled: false``, all sources). Every batch leaves its worker with that worker's *position*
after the batch, and :class:`WebDatasetLoader` keeps the position of the last batch it handed to the caller per
worker (not the workers' read-ahead), so ``state_dict()`` after step k describes exactly batches 0..k-1.
``state_dict()["webdataset"]``:

- ``version`` (2), ``batch`` (batches handed out), ``seed``, ``restart`` (0 unless the run itself continued an
  approximate resume), ``batch_size``, ``world_size``, ``num_workers`` and per source ``{"name", "shards",
  "shards_sha256" (of the shard list), "shuffle_buffer", "resampled"}``: what the position is valid for;
- ``workers``: per logical worker ``w`` (``None`` before its first batch) ``{"draws": t, "sources": [per source
  {"epoch", "shard", "offset", "picks", "buffer"}]}``: ``t`` draws taken by the mixer (bad ones included), and
  per source the shard being read (``shard``-th of the worker's list for ``epoch``; for a resampled source its
  ``shard``-th draw) with ``offset`` samples read from it, the shuffle buffer's ``picks`` so far, and its
  content as ``[shard url index, sample index in that shard]`` pairs in buffer order.

``load_state_dict`` restores each worker's position: it re-reads the (few) shards that hold the buffered samples
to refill the buffer in the same order, opens the current shard and skips ``offset`` samples without decoding
them, and continues; the next batch goes to logical worker ``batch % num_workers`` (physical worker ``p`` plays
logical worker ``(p + batch) % num_workers``). The resumed run therefore sees exactly the samples, augmentation
and order the killed run would have seen next. Seed, batch size, ranks, workers and the sources' shard counts
and buffer sizes must match the checkpoint (:class:`DataConfigError` otherwise).

Approximate resume (any ``resampled: true`` source, or a checkpoint written before positions were recorded):
``load_state_dict`` keeps only the batch count and restarts every worker's stream with a seed derived from it
(``restart``), and says so in a warning: the continuation is a fresh draw from the same distribution, not the
samples an uninterrupted run would have seen; ``num_workers`` may change.
"""
from __future__ import annotations

import bisect
import contextlib
import hashlib
import logging
import random
from collections import defaultdict
from typing import Any, Callable, Iterator, Sequence

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from florence.data.bad_samples import BadSampleError, BadSampleLog, BadSampleSummary
from florence.data.errors import DataConfigError, DataFileError
from florence.data.images import BadSample, clean_caption, decode_image
from florence.data.mixing import label_offsets, sample_seed, split_counts, text_rng
from florence.data.schema import validate_source_spec
from florence.data.sources import caption_label, load_class_names
from florence.data.templates import make_prompt, resolve_templates
from florence.data.transforms import ImageTransform, seeded_rngs

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff", "gif")
STATE_VERSION = 2
logger = logging.getLogger("florence.data")


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

    def describe(self) -> dict[str, Any]:
        """What a recorded stream position depends on (checked at resume)."""
        return {"name": self.name, "shards": len(self.urls),
                "shards_sha256": hashlib.sha256("\n".join(self.urls).encode()).hexdigest(),
                "shuffle_buffer": self.shuffle_buffer, "resampled": self.resampled}


class _ShardHandler:
    """webdataset exception handler: an unreadable shard/member is a bad sample (logged or raised). While
    ``quiet`` (re-reading data the run has already passed, at resume) it skips without logging, as the run did."""

    def __init__(self, bad: BadSampleLog, source: str):
        self.bad, self.source = bad, source
        self.quiet = False

    def __call__(self, exn: Exception) -> bool:
        if self.quiet:
            return True
        where = next((str(a) for a in reversed(exn.args) if isinstance(a, str) and ("/" in a or ".tar" in a)), "?")
        detail = exn.args[0] if exn.args else exn
        self.bad.handle(BadSample(where, f"unreadable shard data ({type(exn).__name__}: {detail})"), source=self.source)
        return True

    @contextlib.contextmanager
    def quietly(self) -> Iterator[None]:
        """``quiet`` for the block, then as before."""
        quiet, self.quiet = self.quiet, True
        try:
            yield
        finally:
            self.quiet = quiet


_SUBSTREAM_TAG = 0x9E3779B97F4A7C15  # sub-stream seeds start from seed ^ tag: not any sample's sample_seed(seed, t)


def _derive(seed: int, *path: int) -> int:
    """A seed for a sub-stream (``path`` names it), independent of the samples' ``sample_seed(seed, t)``."""
    seed ^= _SUBSTREAM_TAG
    for p in path:
        seed = sample_seed(seed, p)
    return seed


def _unit(seed: int, position: int) -> float:
    """A uniform number in [0, 1) from ``(seed, position)``."""
    return sample_seed(seed, position) / float(1 << 63)


class _SourceReader:
    """One source's raw samples for one (rank, worker), with its position (see the module docstring).

    Shards are read whole, in the worker's order for each epoch (``resampled``: an endless seeded draw), and mixed
    by a shuffle buffer. ``next()`` returns a raw webdataset sample dict (nothing decoded); ``state()`` /
    ``restore(state)`` save and reinstate the position."""

    def __init__(self, source: WebDatasetSource, handler: _ShardHandler, *, seed: int, stream_seed: int, rank: int,
                 world_size: int, worker: int, num_workers: int):
        self.source, self.handler = source, handler
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.worker, self.num_workers = worker, num_workers
        self.shuffle_seed, self.resample_seed = _derive(stream_seed, 0), _derive(stream_seed, 1)
        self.size = source.shuffle_buffer if source.shuffle_buffer > 1 else 0  # 0 or 1: shard order only
        self.initial = min(100, self.size)
        self.epoch = self.shard = self.offset = self.picks = 0
        self.buffer: list[tuple[tuple[int, int], dict]] = []  # ((url index, sample index), raw sample)
        self._samples: Iterator[dict] | None = None  # the open shard
        self._epoch_shards: tuple[int, list[int]] | None = None
        self._empty_in_a_row = 0

    def _shards(self, epoch: int) -> list[int]:
        """Url indices of this worker's shards in ``epoch`` (non-resampled)."""
        if self._epoch_shards is None or self._epoch_shards[0] != epoch:
            order = list(range(len(self.source.urls)))
            random.Random(sample_seed(self.seed, epoch)).shuffle(order)
            self._epoch_shards = (epoch, order[self.rank::self.world_size][self.worker::self.num_workers])
        return self._epoch_shards[1]

    def _url_index(self) -> int:
        if self.source.resampled:
            return sample_seed(self.resample_seed, self.shard) % len(self.source.urls)
        return self._shards(self.epoch)[self.shard]

    def _open(self, url_index: int, skip: int = 0) -> Iterator[dict]:
        """The samples of one shard from sample ``skip`` on (the skipped ones read, not decoded, not logged)."""
        samples = iter(wds.tariterators.tarfile_samples(iter([{"url": self.source.urls[url_index]}]),
                                                        handler=self.handler))
        with self.handler.quietly():
            for _ in range(skip):
                if next(samples, None) is None:
                    raise DataFileError(f"{self.source.urls[url_index]}: fewer than {skip} samples, but the "
                                        "checkpoint had read that many (did the shard change since?)")
        return samples

    def _read(self) -> tuple[tuple[int, int], dict]:
        """The next sample in shard order, with its ``(url index, sample index)``."""
        while True:
            url_index = self._url_index()
            if self._samples is None:
                self._samples = self._open(url_index, self.offset)
            raw = next(self._samples, None)
            if raw is not None:
                self.offset += 1
                self._empty_in_a_row = 0
                return (url_index, self.offset - 1), raw
            self._samples = None
            self._empty_in_a_row = 0 if self.offset else self._empty_in_a_row + 1
            self.shard, self.offset = self.shard + 1, 0
            if not self.source.resampled:
                if self._empty_in_a_row >= len(self._shards(self.epoch)):
                    raise BadSampleError(f"webdataset source {self.source.name!r}: no readable sample in "
                                         f"{self._empty_in_a_row} shards in a row (see the bad-sample log)")
                if self.shard == len(self._shards(self.epoch)):
                    self.epoch, self.shard = self.epoch + 1, 0

    def next(self) -> dict:
        if not self.size:
            return self._read()[1]
        self.buffer.append(self._read())
        if len(self.buffer) < self.size:  # fill twice as fast as it drains until full
            self.buffer.append(self._read())
        while len(self.buffer) < self.initial:
            self.buffer.append(self._read())
        j = sample_seed(self.shuffle_seed, self.picks) % len(self.buffer)
        self.picks += 1
        self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
        return self.buffer.pop()[1]

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "shard": self.shard, "offset": self.offset, "picks": self.picks,
                "buffer": [list(ident) for ident, _ in self.buffer]}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: refill the buffer by re-reading the shards it came from (in buffer order);
        the current shard is reopened and fast-forwarded on the next read."""
        self.epoch, self.shard, self.offset = int(state["epoch"]), int(state["shard"]), int(state["offset"])
        self.picks = int(state["picks"])
        idents = [(int(u), int(m)) for u, m in state["buffer"]]
        wanted: dict[int, set[int]] = defaultdict(set)
        for u, m in idents:
            wanted[u].add(m)
        found: dict[tuple[int, int], dict] = {}
        for u, members in sorted(wanted.items()):
            last = max(members)
            with self.handler.quietly():
                for m, raw in enumerate(self._open(u)):
                    if m in members:
                        found[(u, m)] = raw
                    if m >= last:
                        break
            missing = sorted(members - {m for uu, m in found if uu == u})
            if missing:
                raise DataFileError(f"{self.source.urls[u]}: no sample #{missing[0]}, but the checkpoint's shuffle "
                                    "buffer holds it (did the shard change since?)")
        self.buffer = [(ident, found[ident]) for ident in idents]
        self._samples = None


def _unbatched(item: Any) -> Any:
    """DataLoader collate for items that are already batches."""
    return item


class WebDatasetStream(IterableDataset):
    """Endless stream of collated batches for one rank, mixing webdataset sources; each item is ``(batch,
    {"worker": logical worker, "state": its position after the batch})`` (see the module docstring).

    ``worker_states`` (per logical worker, ``None`` = from the start) and ``worker_offset`` (physical worker ``p``
    plays logical worker ``(p + worker_offset) % num_workers``) are set by :class:`WebDatasetLoader`."""

    def __init__(self, sources: Sequence[WebDatasetSource], weights: Sequence[float], transform: ImageTransform,
                 bad: BadSampleLog, *, seed: int, rank: int, world_size: int, batch_size: int, collate_fn: Callable,
                 restart: int = 0, max_bad_retries: int = 16):
        self.sources, self.weights = list(sources), list(weights)
        self.max_bad_retries = int(max_bad_retries)
        split_counts(1, self.weights)  # validates the weights
        self.cumulative = [sum(self.weights[: i + 1]) for i in range(len(self.weights))]
        self.offsets = label_offsets([s.kind for s in self.sources], [s.num_classes for s in self.sources])
        self.transform, self.bad = transform, bad
        self.seed, self.rank, self.world_size, self.restart = seed, rank, world_size, restart
        self.batch_size, self.collate_fn = int(batch_size), collate_fn
        self.worker_states: list[dict | None] = []
        self.worker_offset = 0

    def check_shards(self, num_workers: int) -> None:
        for source in self.sources:
            if not source.resampled and len(source.urls) < self.world_size * num_workers:
                raise DataConfigError(f"webdataset source {source.name!r}: {len(source.urls)} shards cannot feed "
                                      f"{self.world_size} ranks x {num_workers} workers; use more shards or "
                                      "resampled: true")

    def _pick(self, pick_seed: int, t: int) -> int:
        if len(self.sources) == 1:
            return 0
        x = _unit(pick_seed, t) * self.cumulative[-1]
        return min(bisect.bisect_right(self.cumulative, x), len(self.sources) - 1)

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        info = torch.utils.data.get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self.check_shards(num_workers)
        worker = (physical + self.worker_offset) % num_workers
        stream_seed = sample_seed(self.seed, (self.rank * 4096 + worker) * 1_000_003 + self.restart)
        readers = [_SourceReader(source, _ShardHandler(self.bad, source.name), seed=self.seed + i,
                                 stream_seed=_derive(stream_seed, 1, i), rank=self.rank, world_size=self.world_size,
                                 worker=worker, num_workers=num_workers) for i, source in enumerate(self.sources)]
        pick_seed = _derive(stream_seed, 2)
        t = 0
        state = self.worker_states[worker] if worker < len(self.worker_states) else None
        if state is not None:
            t = int(state["draws"])
            for reader, source_state in zip(readers, state["sources"]):
                reader.restore(source_state)
        failures = 0  # bad samples in a row, across batch boundaries
        while True:
            samples = []
            while len(samples) < self.batch_size:
                i = self._pick(pick_seed, t)
                seed = sample_seed(stream_seed, t)
                t += 1
                raw = readers[i].next()
                try:
                    image, text, label = self.sources[i].to_sample(raw, text_rng(seed))
                    with seeded_rngs(seed, numpy=self.transform.pil_only):
                        tensor = self.transform(image)
                except BadSample as err:
                    self.bad.handle(err, source=self.sources[i].name)
                    failures += 1
                    if failures > self.max_bad_retries:
                        raise BadSampleError(f"webdataset source {self.sources[i].name!r}: {failures} bad samples in "
                                             f"a row (data.max_bad_retries = {self.max_bad_retries}); last: {err}")
                    continue
                failures = 0
                samples.append((tensor, text, label + self.offsets[i]))
            position = {"draws": t, "sources": [reader.state() for reader in readers]}
            yield self.collate_fn(samples), {"worker": worker, "state": position}


class WebDatasetLoader:
    """Endless iterable of collated batches over webdataset sources; same interface as ``TrainLoader``.
    ``state_dict()`` reflects the batches actually handed to the caller (see the module docstring)."""

    def __init__(self, stream: WebDatasetStream, *, num_workers: int = 0):
        self.stream = stream
        self.num_workers = int(num_workers)
        self.batch = 0
        self.workers: list[dict | None] = [None] * max(1, self.num_workers)

    @property
    def batch_size(self) -> int:
        return self.stream.batch_size

    @property
    def exact(self) -> bool:
        """Whether a checkpoint of this stream resumes exactly (no resampled source)."""
        return not any(s.resampled for s in self.stream.sources)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        slots = len(self.workers)
        self.stream.check_shards(slots)
        self.stream.worker_offset = self.batch % slots
        self.stream.worker_states = list(self.workers)
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, collate_fn=_unbatched,
                            generator=torch.Generator().manual_seed(self.stream.seed))
        for batch, position in loader:
            if position["worker"] != self.batch % slots:  # the DataLoader serves its workers round-robin
                raise RuntimeError(f"webdataset batch {self.batch} came from worker {position['worker']}, expected "
                                   f"{self.batch % slots}: the stream position would be wrong")
            self.workers[position["worker"]] = position["state"]
            self.batch += 1
            yield batch

    def _describe(self) -> dict[str, Any]:
        s = self.stream
        return {"seed": s.seed, "batch_size": s.batch_size, "world_size": s.world_size,
                "num_workers": self.num_workers, "sources": [source.describe() for source in s.sources]}

    def state_dict(self) -> dict[str, Any]:
        return {"webdataset": {"version": STATE_VERSION, "batch": self.batch, "restart": self.stream.restart,
                               **self._describe(), "workers": list(self.workers)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["webdataset"]
        self.batch = int(saved["batch"])
        self.workers = [None] * len(self.workers)
        if not self.exact or "workers" not in saved:
            why = (f"resampled source(s) {[s.name for s in self.stream.sources if s.resampled]}" if not self.exact
                   else "the checkpoint records no stream position")
            logger.warning("webdataset: approximate resume after %d batches (%s): the stream restarts with a fresh "
                           "seeded draw, not the samples an uninterrupted run would have seen next", self.batch, why)
            self.stream.restart = self.batch
            return
        current = {"version": STATE_VERSION, **self._describe()}
        for key, value in current.items():
            if saved.get(key) != value:
                raise DataConfigError(f"data: cannot resume the webdataset stream exactly: the checkpoint has {key} = "
                                      f"{saved.get(key)!r}, this run {value!r} (resume with the same data.seed, "
                                      "batch size, ranks, data.num_workers and shards)")
        self.stream.restart = int(saved["restart"])
        self.workers = list(saved["workers"])

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
                              rank=rank, world_size=world_size, batch_size=batch_size, collate_fn=collate_fn,
                              max_bad_retries=max_bad_retries)
    return WebDatasetLoader(stream, num_workers=num_workers)
