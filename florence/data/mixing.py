"""Deterministic, resumable mixing of map-style sources across ranks.

**The stream.** All ranks see one global stream of samples, a function of ``seed`` only. Epoch ``e`` has
``L = samples_per_epoch`` samples (default: the sum of the source sizes); source ``s`` contributes
``n_s ≈ L * w_s / sum(w)`` of them (largest-remainder rounding). Each source is read through its own endless
sequence of seeded permutations of its indices (without replacement until exhausted, then a new permutation), so
an over- or under-sampled source still cycles through all its samples. The ``n_s`` slots of each source are
shuffled together with a per-epoch seeded permutation. Position ``p`` of the stream also fixes the sample's
random seed (template choice, crop, flip), so a sample looks the same whichever rank or worker loads it.

**Ranks.** Global batch ``k`` is stream positions ``[k*G, (k+1)*G)`` with ``G = batch_size * world_size``;
rank ``r`` takes the ``r``-th slice of ``batch_size``. Ranks therefore get disjoint samples that together cover
each epoch, and the gathered global batch (concatenated in rank order) is the same as a 1-process run with
batch ``G``.

**Labels.** :func:`label_offsets` gives each image-label source a disjoint id range (the sources' class counts
stacked in config order), identical on every rank; caption labels carry bit 62 and never meet class ids.

**Resume API** (used by the engine): ``MixtureSampler.state_dict()`` -> ``{"seed", "batch_size",
"world_size", "batch"}`` where ``batch`` is the next per-rank batch index to produce, and
``load_state_dict(state)``; the sampler then continues with exactly the samples an uninterrupted run would
have seen. ``TrainLoader`` in :mod:`florence.data.loader` wraps this and counts batches actually delivered.
"""
from __future__ import annotations

import random
from functools import lru_cache
from typing import Iterator, Sequence

import numpy as np
import torch

from florence.data.sources import CAPTION_LABEL_BIT

_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64 finaliser: a cheap, well-spread 64-bit hash of an int."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def sample_seed(seed: int, position: int) -> int:
    """The random seed of stream position ``position`` (63 bits)."""
    return _mix64(_mix64(seed & _M64) ^ position) >> 1


def text_rng(seed: int) -> random.Random:
    """The RNG for a sample's template / synonym choice: seeded from ``seed`` but independent of the stream that
    ``random.seed(seed)`` gives the image transform (same-seeded Mersenne Twisters would correlate the two)."""
    return random.Random(_mix64(seed ^ 0x5F3759DF5EED) >> 1)


def label_offsets(kinds: Sequence[str], num_classes: Sequence[int | None]) -> list[int]:
    """Per source, the offset added to its local class id (0 for caption sources, whose labels are global)."""
    offsets, next_free = [], 0
    for kind, n in zip(kinds, num_classes):
        if kind == "label":
            offsets.append(next_free)
            next_free += int(n)
        elif kind == "text":
            offsets.append(0)
        else:
            raise ValueError(f"unknown source kind {kind!r} (expected 'label' or 'text')")
    if next_free >= CAPTION_LABEL_BIT:
        raise ValueError(f"{next_free} classes in all: more than the 2**62 class-id range")
    return offsets


def split_counts(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainder; ties to the earlier source)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"sampling weights must be finite, >= 0 and not all 0, got {list(weights)}")
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    remainder = total - int(counts.sum())
    order = sorted(range(len(w)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:remainder]:
        counts[i] += 1
    return counts.tolist()


class MixturePlan:
    """The global stream: position -> (source id, local index). Pure function of the arguments."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], *, seed: int,
                 samples_per_epoch: int | None = None):
        if len(sizes) != len(weights):
            raise ValueError(f"{len(sizes)} sources but {len(weights)} weights")
        self.sizes = [int(n) for n in sizes]
        for i, (n, w) in enumerate(zip(self.sizes, weights)):
            if n <= 0 and w > 0:
                raise ValueError(f"source {i} is empty but has sampling weight {w}")
        self.seed = int(seed)
        self.epoch_length = int(samples_per_epoch if samples_per_epoch is not None else sum(self.sizes))
        if self.epoch_length <= 0:
            raise ValueError(f"samples_per_epoch must be > 0, got {self.epoch_length}")
        self.counts = split_counts(self.epoch_length, weights)
        self._epoch = lru_cache(maxsize=2)(self._build_epoch)
        self._perm = lru_cache(maxsize=8)(self._permutation)

    def _permutation(self, source: int, cycle: int) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, 1, source, cycle])))
        return rng.permutation(self.sizes[source])

    def _build_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, 0, epoch])))
        source_of = rng.permutation(np.repeat(np.arange(len(self.counts)), self.counts))  # L
        index_of = np.empty(self.epoch_length, dtype=np.int64)  # L
        for s, n_s in enumerate(self.counts):
            if n_s == 0:
                continue
            q = epoch * n_s + np.arange(n_s, dtype=np.int64)  # positions in source s's endless stream
            cycles, offsets = np.divmod(q, self.sizes[s])
            local = np.empty(n_s, dtype=np.int64)
            for c in np.unique(cycles):
                sel = cycles == c
                local[sel] = self._perm(s, int(c))[offsets[sel]]
            index_of[source_of == s] = local
        return source_of, index_of

    def __getitem__(self, position: int) -> tuple[int, int]:
        epoch, j = divmod(int(position), self.epoch_length)
        source_of, index_of = self._epoch(epoch)
        return int(source_of[j]), int(index_of[j])


class MixtureSampler(torch.utils.data.Sampler):
    """Endless sampler for rank ``rank`` of ``world_size``: yields ``(source id, local index, sample seed)``,
    ``batch_size`` per per-rank batch, starting at per-rank batch ``start_batch`` (see the module docstring)."""

    def __init__(self, plan: MixturePlan, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 start_batch: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.plan = plan
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.batch = int(start_batch)

    def positions(self, batch: int) -> range:
        """Stream positions of this rank's per-rank batch ``batch``."""
        start = batch * self.batch_size * self.world_size + self.rank * self.batch_size
        return range(start, start + self.batch_size)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        batch = self.batch
        while True:
            for p in self.positions(batch):
                source, index = self.plan[p]
                yield source, index, sample_seed(self.plan.seed, p)
            batch += 1

    def epoch_of(self, batch: int) -> int:
        return self.positions(batch).start // self.plan.epoch_length

    def state_dict(self) -> dict:
        return {"seed": self.plan.seed, "batch_size": self.batch_size, "world_size": self.world_size,
                "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position. The seed and the global batch (``batch_size * world_size``) must match;
        the split of the global batch over ranks may differ (elastic resume)."""
        if int(state["seed"]) != self.plan.seed:
            raise ValueError(f"cannot resume data position: saved seed {state['seed']} != current {self.plan.seed}")
        saved_global = int(state["batch_size"]) * int(state["world_size"])
        if saved_global != self.batch_size * self.world_size:
            raise ValueError(f"cannot resume data position: saved global batch {saved_global} != current "
                             f"{self.batch_size * self.world_size} ({self.batch_size} x {self.world_size} ranks)")
        self.batch = int(state["batch"])
