"""Search speed: indexing stages alone vs end to end, query latency and HNSW recall on Milvus, the embedding path's
bf16 / compiled variants, and a load test of the web app -- in one run.

Run: ``python -m florence.benchmarks.perf.search --model BUNDLE --files DIR_OR_CSV [--out perf.json]`` (the
Fashion-MNIST files: ``python -m florence.benchmarks.fmnist_files OUT``). Every collection lives in one Milvus Lite
path under a temporary ``--work-dir``. Four parts:

1. **Indexing stages** (images/s, the same ``--batch-size`` and ``--workers`` everywhere): *decode* alone -- the
   indexer's :class:`florence.search.indexer.DecodeFiles` (read, SHA-256, decode, transform) through the same
   DataLoader, no model; *embed* alone -- eager fp32 ``Embedder.embed_batch`` on those decoded batches (a warm-up on
   the first and last batch untimed); *insert* alone -- ``Store.upsert`` of whole rows (the files' paths and metadata,
   random unit vectors of the model's dim), one call per batch, into a fresh collection; *end to end* --
   ``Index.add`` on a fresh collection (decode, embed and insert overlapping). The first ``--embed-images`` decoded
   images (default all) and their fp32 embeddings are kept for part 3. The files are split into
   ``--stage-rounds`` parts and each part runs the four in turn, so a background load that comes and goes touches
   them alike; the headline ratio is the median over the parts of end-to-end images/s over the slowest stage's
   (goal >= 0.85); the table's images/s are totals over the parts.
2. **Query latency** of single queries, p50 / p95, for ``--queries`` text queries (class names from the files'
   ``label`` column or folder names, in five prompt templates) and as many image queries (files' bytes, decoded and
   embedded as the app does): *total* = ``Index.query_vector`` + ``Store.search`` (what ``Index.search`` does),
   *db* = the ``Store.search`` part alone. Collections: for each ``--index-types`` a copy of the end-to-end rows
   (``Store.create`` + ``Store.upsert``; ``real``) and ``--synthetic`` random unit vectors of the same dim
   (``synthetic``; 0 skips). Until a flush, Milvus Lite keeps rows in its memtable and brute-forces them on every
   search whatever the index type -- that is how ``Index.add`` leaves a collection, measured as ``real (as
   indexed)`` on the FLAT copy; then every copy is flushed (``client.flush``), released and loaded, which is when Lite
   builds the segments' vector index (``build s``), and measured again. HNSW recall@10 against FLAT (exact) on the
   real copies, for every text prompt and ``--recall-queries`` stored image embeddings (goal >= 0.95); FLAT itself is
   checked against a numpy exact search (``FLAT vs numpy``).
3. **Embedding path** (``--variants``: ``fp32`` eager, ``fp32+compile``, ``bf16`` autocast, ``bf16+compile``;
   ``Embedder(precision=, compile=)``): each variant embeds the kept images once (after an untimed warm-up on the
   first and last batch shapes, where ``torch.compile`` compiles: ``warm-up s``); its top-10 agreement with eager
   fp32 uses those embeddings as the collection and, as queries, every text prompt and ``--recall-queries`` of the
   kept images (both embedded by the variant), top-10 by exact search (ties by row order); ``same top-10`` is the
   fraction of queries whose top-10 set equals fp32's. ``images/s`` is the median of ``--rate-rounds`` rounds that
   run every variant in turn on the first ``--rate-images`` kept images (so a passing background load touches them
   alike). Goal: >= 1.3x images/s with the same top-10 on >= 99% of queries.
4. **Load test** (``--load-clients`` > 0): ``florence.search.webapp.create_app(index)`` over the ``--load-index``
   real copy, served by uvicorn on 127.0.0.1 and a free port in a thread of this process
   (``webapp.background_server``); ``--load-clients`` concurrent clients (asyncio + httpx in a forked process, so
   client work does not compete for this process's interpreter) send alternating text (``POST /api/search``) and
   image (``POST /api/search/image``, multipart) queries for ``--load-seconds``. Reported: requests, errors (goal 0;
   any non-200 answer or transport error), latency p50 / p95 / p99 of the answered requests, requests/s.

On a shared 2-core machine any other busy process slows every part: measure on a quiet machine (the JSON records
the 1-minute load average before and after each part). There, two torch threads suffer most: while other processes
ran, eager fp32 embedding of the demo model measured 309 images/s with ``--threads 2`` and 2,800 with ``--threads 1``.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import httpx
import numpy as np
import torch
from torch.utils.data import DataLoader

from florence.benchmarks.perf.common import (
    add_device_arguments, describe, markdown_table, num, resolve_device, write_json,
)
from florence.errors import FlorenceError
from florence.search.embedder import Embedder
from florence.search.files import SourceFiles, walk_source
from florence.search.index import Index
from florence.search.indexer import DecodeFiles, collate_records, collection_info_for
from florence.search.store import INDEX_TYPES, Store
from florence.search.webapp import background_server, create_app

TEMPLATES = ("a photo of a {}.", "a {}.", "a picture of a {}.", "a close-up photo of a {}.",
             "a black and white photo of a {}.")
VARIANTS = {"fp32": ("fp32", False), "fp32+compile": ("fp32", True), "bf16": ("bf16", False),
            "bf16+compile": ("bf16", True)}
CHUNK = 5_000  # rows per upsert when copying / building collections


def percentiles(seconds: Sequence[float], qs: Sequence[int] = (50, 95)) -> dict[str, float]:
    """``{"p50": ms, "p95": ms}`` of ``seconds``."""
    if not len(seconds):
        return {f"p{q}": float("nan") for q in qs}
    return {f"p{q}": float(v) * 1e3 for q, v in zip(qs, np.percentile(np.asarray(seconds), qs))}


# -- 1. indexing stages --------------------------------------------------------------------------------------------


@dataclass
class StageRow:
    stage: str  # decode | embed | insert | end to end
    images: int
    seconds: float
    images_per_s: float


def decode_alone(items, embedder: Embedder, batch_size: int, workers: int) -> tuple[float, list[torch.Tensor]]:
    """Stage 1 alone: every item through ``DecodeFiles`` in the indexer's DataLoader; the seconds, and the decoded
    images as ``(B, C, H, W)`` batches (stacked in the workers, as the indexer does)."""
    dataset = DecodeFiles(items, embedder.transform, frames=8)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_records,
                        prefetch_factor=4 if workers > 0 else None)
    decoded = []
    start = time.perf_counter()
    for batch in loader:
        decoded.append(batch["image"])
    seconds = time.perf_counter() - start
    return seconds, [b for b in decoded if b is not None]


@dataclass
class VariantRow:
    variant: str
    images: int  # embedded once for the agreement (the kept images)
    warmup_s: float  # the untimed first batches (compilation for +compile)
    pass_seconds: float  # that one pass
    pass_images_per_s: float
    rate_images: int = 0  # images per timed round of the interleaved rounds
    images_per_s: float = 0.0  # median of the interleaved rounds
    speedup: float = 1.0  # images_per_s over eager fp32's
    same_top10: float = 1.0  # fraction of queries whose top-10 set equals eager fp32's
    overlap_at10: float = 1.0  # mean |top-10 & fp32 top-10| / 10


def embed_batches(embedder: Embedder, batches: list[torch.Tensor]) -> tuple[np.ndarray, float, float]:
    """``(N, D)`` embeddings of the batches, the warm-up seconds (the first and the last batch shapes, untimed: a
    compiled model compiles there) and the seconds of the timed pass over all batches."""
    start = time.perf_counter()
    for b in {tuple(b.shape): b for b in (batches[0], batches[-1])}.values():
        embedder.embed_batch(b)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    out = [embedder.embed_batch(b) for b in batches]
    return np.concatenate(out), warmup, time.perf_counter() - start


def interleaved_rates(embedders: dict[str, Embedder], batches: list[torch.Tensor], images: int, rounds: int
                      ) -> dict[str, tuple[int, float]]:
    """``{name: (images per round, median images/s)}``: each round embeds the first ``images`` kept images (0: all)
    with every embedder in turn, so a passing background load touches every variant alike."""
    subset, count = [], 0
    for b in batches:
        if images and count >= images:
            break
        subset.append(b)
        count += len(b)
    times: dict[str, list[float]] = {name: [] for name in embedders}
    for _ in range(rounds):
        for name, embedder in embedders.items():
            start = time.perf_counter()
            for b in subset:
                embedder.embed_batch(b)
            times[name].append(time.perf_counter() - start)
    return {name: (count, count / statistics.median(t)) for name, t in times.items()}


def base_rows(items, vectors: np.ndarray, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Whole rows as the indexer writes them (paths and metadata of ``items``, made-up hashes) with ``vectors``."""
    rows = []
    for item, vector in zip(items, vectors):
        digest = f"{rng.integers(1 << 62):016x}" * 4
        rows.append({**item.metadata, "id": digest, "vector": vector.tolist(), "path": item.path, "kind": item.kind,
                     "content_hash": digest, "size": item.size, "mtime": item.mtime})
    return rows


def random_unit(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)  # n, D
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def insert_alone(store: Store, embedder: Embedder, source: SourceFiles, batch_size: int, rng: np.random.Generator
                 ) -> float:
    """Stage 3 alone: whole rows of the model's dim upserted ``batch_size`` at a time into ``store``'s collection,
    created fresh and dropped after; the seconds."""
    rows = base_rows(source.items, random_unit(len(source.items), embedder.dim, rng), rng)
    store.create(collection_info_for(embedder, source.roots))
    start = time.perf_counter()
    for i in range(0, len(rows), batch_size):
        store.upsert(rows[i:i + batch_size])
    seconds = time.perf_counter() - start
    store.drop()
    return seconds


# -- 2. query latency and recall -----------------------------------------------------------------------------------


@dataclass
class LatencyRow:
    collection: str  # real (as indexed) | real | synthetic
    index_type: str
    rows: int
    insert_s: float  # upserting the rows
    build_s: float  # flush + release + load: where Lite builds the vector index (0: not flushed)
    text: dict[str, float] = field(default_factory=dict)  # total ms p50 / p95
    image: dict[str, float] = field(default_factory=dict)
    db: dict[str, float] = field(default_factory=dict)  # Store.search alone, text and image queries


def query_latency(index: Index, texts: Sequence[str], images: Sequence[bytes], top_k: int) -> dict[str, dict]:
    """Single queries one after another: total (query vector + search) and db-only seconds -> percentiles."""
    index.store.ensure_loaded()
    index.search(text=texts[0], top_k=top_k)  # warm-up: the model check, the first RPC
    total = {"text": [], "image": []}
    db = []
    for kind, queries in (("text", texts), ("image", images)):
        for q in queries:
            start = time.perf_counter()
            vector = index.query_vector(text=q) if kind == "text" else index.query_vector(image=q)
            mid = time.perf_counter()
            index.store.search(vector[None], top_k)
            end = time.perf_counter()
            total[kind].append(end - start)
            db.append(end - mid)
    return {"text": percentiles(total["text"]), "image": percentiles(total["image"]), "db": percentiles(db)}


def fill_collection(index: Index, info, chunks) -> tuple[int, float]:
    """Create ``index``'s collection with ``info`` and upsert ``chunks`` (lists of rows); ``(rows, seconds)``."""
    index.store.create(info)
    count, start = 0, time.perf_counter()
    for chunk in chunks:
        index.store.upsert(chunk)
        count += len(chunk)
    return count, time.perf_counter() - start


def flush_and_load(index: Index) -> float:
    """Flush, release and load ``index``'s collection (Milvus Lite builds the vector index of the flushed segments at
    load); the seconds."""
    start = time.perf_counter()
    index.store.flush()
    return time.perf_counter() - start


def search_ids(store: Store, vectors: np.ndarray, top_k: int) -> list[set[str]]:
    out = []
    for i in range(0, len(vectors), 256):
        out += [{h.id for h in hits} for hits in store.search(vectors[i:i + 256], top_k, output_fields=("id",))]
    return out


def exact_topk(base: np.ndarray, queries: np.ndarray, top_k: int) -> np.ndarray:
    """``(Q, top_k)`` row indices of the best cosine scores (unit vectors), ties broken by row order."""
    out = []
    for i in range(0, len(queries), 64):
        scores = queries[i:i + 64] @ base.T  # q, N
        out.append(np.argsort(-scores, axis=1, kind="stable")[:, :top_k])
    return np.concatenate(out) if out else np.zeros((0, top_k), np.int64)


def overlap(a: Sequence[set], b: Sequence[set], top_k: int) -> tuple[float, float]:
    """``(fraction of equal sets, mean |a & b| / top_k)``."""
    same = [x == y for x, y in zip(a, b)]
    shared = [len(x & y) / top_k for x, y in zip(a, b)]
    return float(np.mean(same)), float(np.mean(shared))


# -- 4. load test --------------------------------------------------------------------------------------------------


async def _clients(url: str, clients: int, seconds: float, texts: Sequence[str], images: Sequence[tuple[str, bytes]],
                   top_k: int) -> dict:

    latency: dict[str, list[float]] = {"text": [], "image": []}
    errors: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300.0, limits=limits) as client:
        deadline = time.perf_counter() + seconds

        async def one(n: int) -> None:
            while time.perf_counter() < deadline:
                kind = "text" if n % 2 == 0 else "image"
                start = time.perf_counter()
                try:
                    if kind == "text":
                        r = await client.post("/api/search", json={"text": texts[n // 2 % len(texts)],
                                                                   "top_k": top_k})
                    else:
                        name, data = images[n // 2 % len(images)]
                        r = await client.post("/api/search/image", files={"image": (name, data, "image/png")},
                                              data={"top_k": str(top_k)})
                    reason = None if r.status_code == 200 else f"{kind}: HTTP {r.status_code} {r.text[:200]}"
                except httpx.HTTPError as err:
                    reason = f"{kind}: {type(err).__name__} {err}"
                if reason is None:
                    latency[kind].append(time.perf_counter() - start)
                else:
                    errors.append(reason)
                n += 1

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(clients)))
        elapsed = time.perf_counter() - start
    done = latency["text"] + latency["image"]
    return {"clients": clients, "seconds": elapsed, "requests": len(done) + len(errors), "errors": len(errors),
            "error_samples": sorted(set(errors))[:5], "requests_per_s": (len(done) + len(errors)) / elapsed,
            "latency_ms": percentiles(done, (50, 95, 99)),
            "by_kind": {k: {"requests": len(v), **percentiles(v, (50, 95, 99))} for k, v in latency.items()}}


def _client_process(conn, *args) -> None:
    try:
        conn.send(asyncio.run(_clients(*args)))
    except BaseException as err:  # noqa: BLE001 - reported by the parent
        conn.send({"failed": f"{type(err).__name__}: {err}"})
    conn.close()


def run_load_test(app, texts: Sequence[str], images: Sequence[tuple[str, bytes]], clients: int, seconds: float,
                  top_k: int = 10) -> dict:
    """Serve ``app`` (ASGI) on 127.0.0.1 (``florence.search.webapp.background_server``: uvicorn on a thread, a free
    port); ``clients`` concurrent clients in a forked process send alternating text and image queries for ``seconds``;
    the figures (module docstring, part 4)."""
    with background_server(app) as url:
        ctx = multiprocessing.get_context("fork")  # the clients need none of this process's state (torch, Milvus)
        parent, child = ctx.Pipe(duplex=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork of a multi-threaded process: the child only
            process = ctx.Process(target=_client_process,  # runs asyncio + httpx
                                  args=(child, url, clients, seconds, list(texts), list(images), top_k))
            process.start()
        child.close()
        try:
            if not parent.poll(seconds + 600):
                raise RuntimeError("the load-test clients did not finish")
            result = parent.recv()
        finally:
            process.join(10)
            if process.is_alive():
                process.kill()
    if "failed" in result:
        raise RuntimeError(f"load-test clients failed: {result['failed']}")
    return {"url": url, **result}


# -- CLI -------------------------------------------------------------------------------------------------------------


def query_texts(source: SourceFiles) -> list[str]:
    """The text queries: class names (a ``label`` metadata column, else the files' folder names) x ``TEMPLATES``."""
    labels = sorted({str(item.metadata["label"]) if "label" in item.metadata else Path(item.path).parent.name
                     .replace("_", " ") for item in source.items})
    return [t.format(label) for label in labels for t in TEMPLATES]  # as written: BPE vocabularies are cased


def stage_table(stages: list[StageRow], ratio: float, slowest: str) -> str:
    rows = [[s.stage, s.images, num(s.seconds), num(s.images_per_s)] for s in stages]
    rows.append([f"end to end / slowest ({slowest}), median of the rounds; goal >= 0.85", "", "", f"{ratio:.2f}"])
    return markdown_table(["stage", "images", "seconds", "images/s"], rows, numeric_from=1)


def latency_table(rows: list[LatencyRow]) -> str:
    return markdown_table(
        ["collection", "index", "rows", "insert s", "build s", "text p50 ms", "text p95 ms", "image p50 ms",
         "image p95 ms", "db p50 ms", "db p95 ms"],
        [[r.collection, r.index_type, r.rows, num(r.insert_s), num(r.build_s), num(r.text["p50"]), num(r.text["p95"]),
          num(r.image["p50"]), num(r.image["p95"]), num(r.db["p50"]), num(r.db["p95"])] for r in rows],
        numeric_from=2)


def variant_table(rows: list[VariantRow]) -> str:
    return markdown_table(
        ["variant", "warm-up s", "images/s (one pass)", "images/s", "x fp32 (goal >= 1.3)", "same top-10 (goal >= "
         "0.99)", "overlap@10"],
        [[r.variant, num(r.warmup_s), num(r.pass_images_per_s), num(r.images_per_s), f"{r.speedup:.2f}",
          f"{r.same_top10:.3f}", f"{r.overlap_at10:.3f}"] for r in rows], numeric_from=1)


@dataclass
class Run:
    """What the parts share: the arguments, the files, the model, the database path, the queries and what earlier
    parts built."""

    args: argparse.Namespace
    source: SourceFiles
    embedder: Embedder
    db: str
    rng: np.random.Generator
    pick: random.Random
    texts: list[str] = field(default_factory=list)  # the text prompts
    query_files: list = field(default_factory=list)  # FileItems of the image queries
    query_bytes: list[bytes] = field(default_factory=list)
    rounds: list[np.ndarray] = field(default_factory=list)  # indices into source.items of each round of part 1
    insert_store: Store | None = None  # the insert-alone collection (created and dropped each round)
    indexed: list[Index] = field(default_factory=list)  # the end-to-end collections, one per round
    batches: list[torch.Tensor] = field(default_factory=list)  # the kept decoded images
    fp32: tuple[np.ndarray, float, float] | None = None  # their eager fp32 embeddings, warm-up s, seconds
    copies: dict[str, Index] = field(default_factory=dict)  # index type -> the real copy
    synthetic: dict[str, Index] = field(default_factory=dict)  # index type -> the synthetic collection
    load_average: dict[str, float] = field(default_factory=dict)

    def mark(self, when: str) -> None:
        self.load_average[when] = os.getloadavg()[0]

    def open_collections(self) -> None:
        """Open every Milvus client of the run up front. Measured: a new ``MilvusClient`` on a Lite path this process
        already serves can fail minutes into a run (after the in-process server's gRPC "too_many_pings" GOAWAY on an
        idle channel; ``Store`` reports it as ``DatabaseLocked``); clients opened before keep working."""
        n = len(self.source.items)
        self.rounds = np.array_split(np.arange(n), max(1, min(self.args.stage_rounds, n)))
        self.insert_store = Store(self.db, "insert_alone")
        self.indexed = [Index(self.db, f"end_to_end_{r}", embedder=self.embedder) for r in range(len(self.rounds))]
        self.copies = {t: Index(self.db, f"real_{t.lower()}", embedder=self.embedder) for t in self.args.index_types}
        if self.args.synthetic:
            self.synthetic = {t: Index(self.db, f"synthetic_{t.lower()}", embedder=self.embedder)
                              for t in self.args.index_types}

    def close(self) -> None:
        for index in (*self.copies.values(), *self.synthetic.values(), *self.indexed):
            index.close()
        if self.insert_store is not None:
            self.insert_store.close()


STAGES = ("decode", "embed", "insert", "end to end")


def part_stages(run: Run) -> dict:
    args, embedder, keep = run.args, run.embedder, run.args.embed_images or len(run.source.items)
    seconds: dict[str, list[float]] = {stage: [] for stage in STAGES}
    images, ratios, summaries, kept_vectors, warmup = [], [], [], [], 0.0
    for part, index in zip(run.rounds, run.indexed):
        chunk = SourceFiles([run.source.items[i] for i in part], run.source.roots)
        decode_s, batches = decode_alone(chunk.items, embedder, args.batch_size, args.workers)
        vectors, w, embed_s = embed_batches(embedder, batches)
        warmup += w
        insert_s = insert_alone(run.insert_store, embedder, chunk, args.batch_size, run.rng)
        start = time.perf_counter()
        summaries.append(index.add(chunk, batch_size=args.batch_size, workers=args.workers, progress=False).to_dict())
        e2e_s = time.perf_counter() - start
        for stage, t in zip(STAGES, (decode_s, embed_s, insert_s, e2e_s)):
            seconds[stage].append(t)
        images.append(len(chunk.items))
        ratios.append(max(decode_s, embed_s, insert_s) / e2e_s)  # e2e images/s over the slowest stage's, same images
        room = keep - sum(len(b) for b in run.batches)
        for b, v in zip(batches, np.split(vectors, np.cumsum([len(b) for b in batches])[:-1])):
            if room <= 0:
                break
            run.batches.append(b[:room])
            kept_vectors.append(v[:room])
            room -= len(b)
    vectors = np.concatenate(kept_vectors)
    run.fp32 = (vectors, warmup, sum(seconds["embed"]) * len(vectors) / sum(images))
    total = sum(images)
    stages = [StageRow(stage, total, sum(seconds[stage]), total / sum(seconds[stage])) for stage in STAGES]
    slowest = min(stages[:3], key=lambda row: row.images_per_s)
    ratio = statistics.median(ratios)
    print(f"\n1. indexing stages alone and end to end ({len(images)} rounds of ~{total // len(images)} files, each "
          f"stage in turn)\n")
    print(stage_table(stages, ratio, slowest.stage))
    return {"stages": [asdict(row) for row in stages], "slowest_stage": slowest.stage,
            "end_to_end_over_slowest": ratio, "end_to_end_over_slowest_overall": stages[3].images_per_s
            / slowest.images_per_s, "rounds": [{"images": n, **{stage: seconds[stage][i] for stage in STAGES},
                                                "ratio": ratios[i]} for i, n in enumerate(images)],
            "end_to_end_summaries": summaries}


def part_latency(run: Run) -> dict:
    args, embedder, k = run.args, run.embedder, run.args.top_k
    texts = [run.texts[i % len(run.texts)] for i in range(args.queries)]
    real_rows = [row for index in run.indexed for row in index.store.rows(("*",))]  # every field, the vector too
    for index in run.indexed:
        index.store.drop()
    rows = []
    for index_type, copy in run.copies.items():
        info = collection_info_for(embedder, run.source.roots, index_type)
        count, insert_s = fill_collection(copy, info, (real_rows[i:i + CHUNK] for i in range(0, len(real_rows), CHUNK)))
        if index_type == "FLAT":  # as Index.add leaves it: rows in Lite's memtable, brute-forced on every search
            rows.append(LatencyRow("real (as indexed)", index_type, count, insert_s, 0.0,
                                   **query_latency(copy, texts, run.query_bytes, k)))
        build_s = flush_and_load(copy)
        rows.append(LatencyRow("real", index_type, count, insert_s, build_s,
                               **query_latency(copy, texts, run.query_bytes, k)))
    ids = [row["id"] for row in real_rows]
    vectors = np.asarray([row["vector"] for row in real_rows], np.float32)  # N, D
    del real_rows
    image_queries = run.pick.sample(range(len(ids)), min(args.recall_queries, len(ids)))
    queries = np.concatenate([embedder.embed_text(run.texts), vectors[image_queries]])  # Q, D
    exact = [{ids[j] for j in row} for row in exact_topk(vectors, queries, k)]
    found = {index_type: search_ids(copy.store, queries, k) for index_type, copy in run.copies.items()}
    recall = {f"{t} vs numpy": overlap(f, exact, k)[1] for t, f in found.items()}
    if "FLAT" in found:
        recall.update({f"{t} vs FLAT": overlap(f, found["FLAT"], k)[1] for t, f in found.items() if t != "FLAT"})
    if args.synthetic:
        base = random_unit(args.synthetic, embedder.dim, run.rng)  # N, D
        for index_type, synth in run.synthetic.items():
            info = collection_info_for(embedder, ["/synthetic"], index_type)
            chunks = ([{"id": f"{j:x}", "vector": base[j].tolist(), "path": f"/synthetic/{j}.png", "kind": "image",
                        "content_hash": "", "size": 0, "mtime": 0.0} for j in range(i, min(i + CHUNK, len(base)))]
                      for i in range(0, len(base), CHUNK))
            count, insert_s = fill_collection(synth, info, chunks)
            build_s = flush_and_load(synth)
            rows.append(LatencyRow("synthetic", index_type, count, insert_s, build_s,
                                   **query_latency(synth, texts, run.query_bytes, k)))
            synth.store.drop()
    print(f"\n2. single-query latency ({len(texts)} text + {len(run.query_bytes)} image queries, top {k}; total = "
          f"query embedding + search, db = search alone; build = flush + reload)\n")
    print(latency_table(rows))
    print(f"\nrecall@{k} ({len(queries)} queries: {len(run.texts)} text prompts + {len(image_queries)} stored image "
          f"embeddings; goal HNSW vs FLAT >= 0.95): " + ", ".join(f"{t} {v:.4f}" for t, v in recall.items()))
    return {"latency": [asdict(r) for r in rows], "recall": recall, "recall_queries": len(queries)}


def part_embedding(run: Run) -> dict:
    args, k = run.args, run.args.top_k
    vectors, warmup, seconds = run.fp32
    image_queries = np.asarray(run.pick.sample(range(len(vectors)), min(args.recall_queries, len(vectors))), np.int64)
    queries = np.concatenate([run.embedder.embed_text(run.texts), vectors[image_queries]])  # Q, D
    reference = [set(r) for r in exact_topk(vectors, queries, k).tolist()]
    embedders = {"fp32": run.embedder}
    rows = [VariantRow("fp32", len(vectors), warmup, seconds, len(vectors) / seconds)]
    for name in args.variants:
        if name in embedders:
            continue
        precision, compiled = VARIANTS[name]
        other = embedders[name] = Embedder(args.model, run.embedder.device, precision=precision, compile=compiled)
        mine, w, s = embed_batches(other, run.batches)
        mine_queries = np.concatenate([other.embed_text(run.texts), mine[image_queries]])  # Q, D
        same, shared = overlap([set(r) for r in exact_topk(mine, mine_queries, k).tolist()], reference, k)
        rows.append(VariantRow(name, len(mine), w, s, len(mine) / s, same_top10=same, overlap_at10=shared))
    rates = interleaved_rates(embedders, run.batches, args.rate_images, args.rate_rounds)
    for row in rows:
        row.rate_images, row.images_per_s = rates[row.variant]
        row.speedup = row.images_per_s / rates["fp32"][1]
    print(f"\n3. embedding path vs eager fp32 (images/s: median of {args.rate_rounds} interleaved rounds of "
          f"{rows[0].rate_images} images, batch {args.batch_size}; top-{k} of {len(queries)} queries on each "
          f"variant's own embeddings of {len(vectors)} images)\n")
    print(variant_table(rows))
    return {"embedding": [asdict(r) for r in rows], "embedding_queries": len(queries)}


def part_load(run: Run) -> dict:
    args = run.args
    print(f"\n4. load test ({args.load_clients} clients x {args.load_seconds:g} s, alternating text and image)\n")
    served = run.copies[args.load_index]
    images = [(Path(item.path).name, data) for item, data in zip(run.query_files, run.query_bytes)]
    load = run_load_test(create_app(served), run.texts, images, args.load_clients, args.load_seconds, args.top_k)
    load["index"] = f"real {args.load_index}, {served.count()} rows"
    print(markdown_table(["requests", "errors (goal 0)", "requests/s", "p50 ms", "p95 ms", "p99 ms"],
                         [[load["requests"], load["errors"], num(load["requests_per_s"]),
                           *(num(load["latency_ms"][p]) for p in ("p50", "p95", "p99"))]], numeric_from=0))
    for sample in load["error_samples"]:
        print(f"  error: {sample}")
    return {"load": load}


def run_parts(run: Run) -> dict:
    """The four parts in order (module docstring); their figures."""
    out: dict[str, Any] = {}
    run.mark("start")
    run.texts = query_texts(run.source)
    run.query_files = run.pick.sample(run.source.items, min(run.args.queries, len(run.source.items)))
    run.query_bytes = [item.read_bytes() for item in run.query_files]
    try:
        run.open_collections()
        for name, part in (("stages", part_stages), ("latency", part_latency), ("embedding", part_embedding),
                           ("load test", part_load)):
            if name != "load test" or run.args.load_clients > 0:
                out.update(part(run))
                run.mark(f"after {name}")
    finally:
        run.close()
    out["load_average"] = run.load_average
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_device_arguments(parser, threads=2)
    parser.add_argument("--model", required=True, help="a dual-encoder bundle directory")
    parser.add_argument("--files", required=True, help="a folder of images or a CSV table (florence index --source)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N files (0: all)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch, every stage")
    parser.add_argument("--workers", type=int, default=2, help="decoding DataLoader workers, every stage")
    parser.add_argument("--stage-rounds", type=int, default=5,
                        help="the files are split into this many parts; each part runs every stage in turn")
    parser.add_argument("--embed-images", type=int, default=0,
                        help="decoded images kept for the embed stage and the variants (0: all)")
    parser.add_argument("--rate-images", type=int, default=4096,
                        help="images per timed round of the variants' interleaved rounds (0: all kept)")
    parser.add_argument("--rate-rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--queries", type=int, default=50, help="single text queries and image queries, each")
    parser.add_argument("--recall-queries", type=int, default=500, help="image queries for recall / agreement")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--index-types", nargs="+", default=["FLAT", "HNSW"], choices=INDEX_TYPES)
    parser.add_argument("--synthetic", type=int, default=250_000, help="random unit vectors (0: skip)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--load-clients", type=int, default=32, help="concurrent clients (0: no load test)")
    parser.add_argument("--load-seconds", type=float, default=30.0)
    parser.add_argument("--load-index", default="FLAT", choices=INDEX_TYPES, help="the real copy the app serves")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the Milvus Lite path goes (default: a "
                        "temporary folder, removed at the end)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    device = resolve_device(parser, args)
    if args.load_index not in args.index_types and args.load_clients > 0:
        parser.error(f"--load-index {args.load_index} is not among --index-types {args.index_types}")
    if "fp32" not in args.variants:
        args.variants = ["fp32", *args.variants]
    rng = np.random.default_rng(args.seed)
    try:
        source = walk_source(args.files)
        embedder = Embedder(args.model, device)
    except FlorenceError as err:
        parser.error(str(err))
    if args.limit:
        source = SourceFiles(source.items[:args.limit], source.roots, source.skipped)
    images_only = [item for item in source.items if item.kind == "image"]
    if not images_only:
        parser.error(f"--files {args.files}: no image files")
    source = SourceFiles(images_only, source.roots, source.skipped)
    result: dict[str, Any] = {"device": describe(device, args.threads), "model": embedder.name, "dim": embedder.dim,
                              "files": len(source.items), "args": {k: str(v) if isinstance(v, Path) else v
                                                                   for k, v in vars(args).items()}}
    print(f"\n{result['device']}; {embedder.name}, dim {embedder.dim}; {len(source.items)} files from {args.files}; "
          f"batch {args.batch_size}, {args.workers} workers")
    work = tempfile.TemporaryDirectory(prefix="perf_search_", dir=args.work_dir)
    db = str(Path(work.name) / "perf.db")
    try:
        result.update(run_parts(Run(args, source, embedder, db, rng, random.Random(args.seed))))
    finally:
        work.cleanup()
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
