"""Exact and near-duplicate groups in a collection (``florence dedup``).

- **Exact** duplicates: rows with the same ``content_hash`` (the same bytes at several paths). A group per hash with at
  least two rows.
- **Near** duplicates: connected components of the graph with an edge between two rows whose cosine similarity is at
  least ``threshold``. Linking is transitive (A~B and B~C put A and C in one group even when A and C are further
  apart): ``min_score`` shows how far apart a group's members can be.
- **Nesting**: both kinds are reported. An exact group's rows (cosine ~1) always fall inside one near component; a near
  group is reported only when it spans at least two different contents (a component made of one exact group is not
  repeated), and then lists all its rows, its exact duplicates included.

Computed from every row's vector, pulled once from the store, with square ``chunk x chunk`` blocks of torch matmuls over
the upper triangle of the similarity matrix (``N^2 / 2`` dot products, memory ``O(chunk^2)``) and a vectorised
union-find; no per-row database queries. A group's ``max_score`` / ``min_score`` are the largest / smallest cosine over
all pairs of its members (a second chunked pass over each group's own pairs).

Groups come exact first, then near; larger groups first; members sorted by path.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from florence.search.store import SearchError, Store

__all__ = ["DuplicateGroup", "find_duplicates", "near_duplicate_components", "format_groups", "duplicates_to_json",
           "write_duplicates_json"]


@dataclass
class DuplicateGroup:
    """One group: ``kind`` ``"exact"`` (same content hash) or ``"near"`` (cosine-linked), the members' ``ids`` and
    ``paths`` (sorted by path), and the largest / smallest cosine similarity between two members."""

    kind: str
    ids: list[str]
    paths: list[str]
    max_score: float
    min_score: float

    @property
    def size(self) -> int:
        return len(self.ids)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "size": self.size}

    def text(self) -> str:
        head = f"{self.kind:5s}  {self.size} rows  cosine {self.min_score:.3f}..{self.max_score:.3f}"
        return "\n".join([head, *(f"  {path}" for path in self.paths)])


def _compress(parent: np.ndarray) -> None:
    """Point every node at its root, in place (``parent[x] <= x`` throughout, so no cycles)."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return
        parent[:] = grand


def _union(parent: np.ndarray, i: np.ndarray, j: np.ndarray) -> None:
    """Merge the sets of each pair ``(i[n], j[n])``: hook the larger root under the smaller, repeat until every pair
    shares a root (each round removes at least one root, so it ends)."""
    while len(i):
        _compress(parent)
        ri, rj = parent[i], parent[j]
        differ = ri != rj
        i, j, ri, rj = i[differ], j[differ], ri[differ], rj[differ]
        if len(i):
            np.minimum.at(parent, np.maximum(ri, rj), np.minimum(ri, rj))


@torch.no_grad()
def near_duplicate_components(vectors: np.ndarray, threshold: float, chunk: int = 4096,
                              progress: bool = False) -> np.ndarray:
    """``(N, D)`` unit vectors -> ``(N,)`` int64 component label (the smallest row index of the component) of the
    graph with an edge wherever the cosine similarity is ``>= threshold``."""
    n = len(vectors)
    parent = np.arange(n, dtype=np.int64)
    X = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))  # N, D
    starts = range(0, n, chunk)
    with tqdm(total=len(starts) * (len(starts) + 1) // 2, desc="similarity blocks", unit="block",
              disable=not progress) as bar:
        for a in starts:
            for b in range(a, n, chunk):
                sims = X[a:a + chunk] @ X[b:b + chunk].T  # ca, cb
                if a == b:
                    sims.triu_(diagonal=1)  # each pair once, no self-pairs (0 < threshold)
                if float(sims.max()) >= threshold:  # most blocks have no pair: skip the costlier mask
                    pairs = (sims >= threshold).nonzero().numpy()  # E, 2
                    _union(parent, pairs[:, 0] + a, pairs[:, 1] + b)
                bar.update()
    _compress(parent)
    return parent


@torch.no_grad()
def _score_range(vectors: np.ndarray, chunk: int) -> tuple[float, float]:
    """Largest and smallest cosine over the pairs of ``(G, D)`` unit vectors, ``G >= 2`` (upper-triangle blocks)."""
    X = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))  # G, D
    high, low = -np.inf, np.inf
    for a in range(0, len(X), chunk):
        for b in range(a, len(X), chunk):
            sims = X[a:a + chunk] @ X[b:b + chunk].T  # ca, cb
            if a == b:
                sims = sims[tuple(torch.triu_indices(len(sims), len(sims), 1))]  # the pairs above the diagonal
            if sims.numel():
                lo, hi = torch.aminmax(sims)
                high, low = max(high, float(hi)), min(low, float(lo))
    return high, low


def _group(kind: str, members: Sequence[int], ids: list[str], paths: list[str], X: np.ndarray,
           chunk: int) -> DuplicateGroup:
    members = sorted(members, key=lambda m: (paths[m], ids[m]))
    high, low = _score_range(X[members], chunk)
    return DuplicateGroup(kind, [ids[m] for m in members], [paths[m] for m in members], round(high, 6), round(low, 6))


def find_duplicates(store: Store, threshold: float = 0.95, *, filter: str = "", chunk: int = 4096,
                    progress: bool = False) -> list[DuplicateGroup]:
    """Exact and near-duplicate groups among the rows matching ``filter`` (module docstring).

    Args:
        store: the collection.
        threshold: cosine similarity at or above which two rows are near duplicates, in (0, 1].
        filter: a Milvus boolean expression selecting the rows compared (all by default).
        chunk: rows per side of a similarity block (memory ``4 * chunk^2`` bytes).
        progress: a progress bar over the blocks.
    """
    if not 0.0 < threshold <= 1.0:
        raise SearchError(f"duplicate threshold must be in (0, 1], got {threshold}")
    if chunk < 1:
        raise SearchError(f"chunk must be at least 1, got {chunk}")
    ids, paths, hashes, vectors = [], [], [], []
    for row in store.rows(("id", "path", "content_hash", "vector"), filter):
        ids.append(row["id"])
        paths.append(row["path"])
        hashes.append(row["content_hash"])
        vectors.append(row["vector"])
    if not ids:
        return []
    X = np.asarray(vectors, np.float32).reshape(len(ids), -1)  # N, D
    by_hash: dict[str, list[int]] = defaultdict(list)
    for n, content in enumerate(hashes):
        by_hash[content].append(n)
    exact = [_group("exact", m, ids, paths, X, chunk) for m in by_hash.values() if len(m) > 1]
    components: dict[int, list[int]] = defaultdict(list)
    for n, root in enumerate(near_duplicate_components(X, threshold, chunk, progress)):
        components[int(root)].append(n)
    near = [_group("near", m, ids, paths, X, chunk) for m in components.values()
            if len(m) > 1 and len({hashes[i] for i in m}) > 1]
    order = {"exact": 0, "near": 1}
    return sorted(exact + near, key=lambda g: (order[g.kind], -g.size, g.paths[0]))


def format_groups(groups: Sequence[DuplicateGroup], threshold: float | None = None, limit: int | None = None) -> str:
    """A printable report: a count line, then each group (at most ``limit`` groups) with its paths."""
    counts = {kind: [g for g in groups if g.kind == kind] for kind in ("exact", "near")}
    head = ", ".join(f"{len(gs)} {kind} groups ({sum(g.size for g in gs)} rows)" for kind, gs in counts.items())
    if threshold is not None:
        head += f"; near = cosine >= {threshold:g}"
    shown = list(groups) if limit is None else list(groups)[:limit]
    lines = [head, *(g.text() for g in shown)]
    if len(shown) < len(groups):
        lines.append(f"... {len(groups) - len(shown)} more groups (see the JSON)")
    return "\n".join(lines)


def duplicates_to_json(groups: Sequence[DuplicateGroup], threshold: float | None = None) -> dict[str, Any]:
    """``{"threshold", "exact_groups", "near_groups", "groups": [{"kind", "ids", "paths", "max_score", "min_score",
    "size"}, ...]}``."""
    return {"threshold": threshold, "exact_groups": sum(g.kind == "exact" for g in groups),
            "near_groups": sum(g.kind == "near" for g in groups), "groups": [g.to_dict() for g in groups]}


def write_duplicates_json(groups: Sequence[DuplicateGroup], path: str | Path, threshold: float | None = None) -> Path:
    """Write :func:`duplicates_to_json` to ``path`` (parent folders created); the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{time.time_ns()}")
    tmp.write_text(json.dumps(duplicates_to_json(groups, threshold), indent=2), encoding="utf-8")
    tmp.replace(path)
    return path
