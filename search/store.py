"""The Milvus side of search: one connection, one collection of Florence embeddings, its schema and its provenance.

**Where the data lives.** ``db`` is a Milvus Lite path (a local ``*.db`` directory, embedded in this process through
``pymilvus[milvus-lite]``; nothing to start) or a server URI (``http(s)://host:19530``, with ``token`` for
authentication: Milvus standalone or a cluster). The same collections and commands work on both.

**One process per Lite path** (measured: a second process fails with ``DataDirLockedError``). We record who holds a
path in a sibling file ``<db>.owner.json`` (pid, command, start time) while it is open, so the error a second process
gets names the holder and the ways out (stop it; add images through the running ``florence serve`` app; or move to a
Milvus server for concurrent writers).

**Schema** (one row per indexed file):

========== ================= ===========================================================================
field      type              meaning
========== ================= ===========================================================================
id         VARCHAR(64), pk   SHA-256 of ``content_hash + "\\0" + path`` (:func:`row_id`): derives from the content
vector     FLOAT_VECTOR(D)   unit-norm embedding from the collection's model (images; videos: mean-pooled frames)
path       VARCHAR(4096)     absolute path, or ``SHARD.tar#KEY`` for a webdataset member
kind       VARCHAR(8)        ``image`` or ``video``
content_hash VARCHAR(64)     SHA-256 of the file's bytes (exact duplicates share it)
size       INT64             bytes
mtime      DOUBLE            modification time (seconds since the epoch)
(dynamic)  JSON values       user metadata columns from a CSV source; ``tag``, ``tag_confidence``, ``tag_method``
========== ================= ===========================================================================

**Provenance.** The collection property ``florence`` holds JSON: the model bundle's SHA-256, its name, the embedding
size, the preprocessing dict, the indexed roots, the index type and the metric. Searching with another model is a
:class:`ModelMismatch`, not silent garbage.

**Indexes.** ``FLAT`` (exact; the default) or ``HNSW`` / ``HNSW_SQ`` / ``IVF_FLAT`` / ``IVF_SQ8`` (approximate, for
large collections), metric ``COSINE`` (or ``IP``: the same ranking on our unit-norm vectors). Milvus Lite refuses
IVF_PQ, SCANN, DISKANN and GPU indexes at load (measured), so we refuse them up front.

A reopened Lite collection comes back released (measured): :meth:`Store.ensure_loaded` loads it before any query.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # DataLoader workers fork beside Milvus Lite's in-process gRPC server
from milvus_lite.server_manager import server_manager_instance  # noqa: E402
from pymilvus import DataType, MilvusClient  # noqa: E402
from pymilvus.exceptions import MilvusException  # noqa: E402

from florence.errors import FlorenceError  # noqa: E402

__all__ = ["SearchError", "DatabaseLocked", "ModelMismatch", "CollectionInfo", "Hit", "Store", "row_id",
           "INDEX_TYPES", "METRICS", "BASE_FIELDS"]

INDEX_TYPES = ("FLAT", "HNSW", "HNSW_SQ", "IVF_FLAT", "IVF_SQ8")
METRICS = ("COSINE", "IP")
DEFAULT_INDEX_PARAMS = {"FLAT": {}, "HNSW": {"M": 16, "efConstruction": 200},
                        "HNSW_SQ": {"M": 16, "efConstruction": 200, "sq_type": "SQ8"},
                        "IVF_FLAT": {"nlist": 1024}, "IVF_SQ8": {"nlist": 1024}}
DEFAULT_SEARCH_PARAMS = {"FLAT": {}, "HNSW": {"ef": 128}, "HNSW_SQ": {"ef": 128}, "IVF_FLAT": {"nprobe": 32},
                         "IVF_SQ8": {"nprobe": 32}}
BASE_FIELDS = ("id", "path", "kind", "content_hash", "size", "mtime")
PROPERTY = "florence"
MAX_PATH = 4096
_QUERY_PAGE = 10_000  # Milvus caps offset + limit of one query at 16384

logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # its RPC errors become our one-line errors below
# Milvus Lite's in-process gRPC server logs a traceback for AllocTimestamp, which it does not implement and which the
# query iterator falls back from; nothing else logs there.
logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
logging.getLogger("milvus_lite").setLevel(logging.CRITICAL)  # a held path: its traceback becomes DatabaseLocked

_LITE_OPEN: dict[Path, int] = {}  # Lite path -> Stores open on it in this process (its server stops at zero)


class SearchError(FlorenceError, ValueError):
    """A search request or collection that cannot work; the message names the database, collection or field."""


class DatabaseLocked(SearchError):
    """A Milvus Lite path another process holds."""


class ModelMismatch(SearchError):
    """A collection searched or extended with a model other than the one that embedded it."""


def row_id(content_hash: str, path: str) -> str:
    """The primary key of a file: SHA-256 of its content hash and its path. Changed content gives a new id (the old
    row is replaced); the same bytes at two paths are two rows (exact duplicates share ``content_hash``)."""
    return hashlib.sha256(f"{content_hash}\0{path}".encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class CollectionInfo:
    """What a collection was built with (stored as the collection property ``florence``)."""

    model_sha256: str
    dim: int
    preprocess: dict[str, Any]
    model_name: str = ""
    model_path: str = ""  # the bundle it was indexed with (``florence search`` uses it when --model is absent)
    roots: list[str] = field(default_factory=list)
    index_type: str = "FLAT"
    index_params: dict[str, Any] = field(default_factory=dict)
    metric: str = "COSINE"
    frames: int = 8  # frames sampled and mean-pooled per video

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> CollectionInfo:
        try:
            data = json.loads(text)
            return cls(**data)
        except (ValueError, TypeError) as err:
            raise SearchError(f"{where}: the collection's florence property is not valid ({err})") from None


@dataclass
class Hit:
    """One search result: ``score`` is the cosine similarity (higher is closer); ``fields`` holds ``path``, ``kind``,
    ``content_hash``, ``size``, ``mtime`` and any metadata / tag fields of the row."""

    id: str
    score: float
    fields: dict[str, Any]

    @property
    def path(self) -> str:
        return str(self.fields.get("path", ""))

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "score": self.score, **self.fields}


def is_server_uri(db: str) -> bool:
    return str(db).startswith(("http://", "https://", "tcp://", "unix:"))


def _owner_file(db: Path) -> Path:
    return db.with_name(db.name + ".owner.json")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _held_by_us(db: Path) -> bool:
    """This process has Stores open on ``db`` (then a failure to open is not another process's lock)."""
    return _LITE_OPEN.get(db, 0) > 0


def _lock_message(db: Path) -> str:
    owner = _owner_file(db)
    holder = "another process"
    try:
        data = json.loads(owner.read_text(encoding="utf-8"))
        if _pid_alive(int(data["pid"])):
            holder = f"process {data['pid']} (`{data.get('command', '?')}`, since {data.get('started', '?')})"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return (f"Milvus Lite database {db} is held by {holder}: a Lite path serves one process at a time. Stop that "
            f"process, or add files through the running `florence serve` app (its Index box, POST /api/index), or "
            f"move to a Milvus server for concurrent writers (--db http://HOST:19530; README 'Search at scale')")


def open_client(db: str | Path, token: str | None = None) -> MilvusClient:
    """A ``MilvusClient`` for a Lite path (``*.db``, created if absent) or a server URI; one-line errors."""
    db = str(db)
    if is_server_uri(db):
        try:
            return MilvusClient(uri=db, token=token or "")
        except MilvusException as err:
            raise SearchError(f"cannot connect to the Milvus server {db}: {err.message}") from None
    path = Path(db).expanduser().absolute()
    if path.suffix != ".db":
        raise SearchError(f"--db {db}: a Milvus Lite path must end in .db (or give a server URI http://HOST:19530)")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        client = MilvusClient(str(path))
    except Exception as err:  # milvus-lite raises several types for a held data dir; all end here
        if path.exists() and not _held_by_us(path):
            raise DatabaseLocked(_lock_message(path)) from None
        raise SearchError(f"cannot open the Milvus Lite database {path}: {err}") from None
    _LITE_OPEN[path] = _LITE_OPEN.get(path, 0) + 1
    _owner_file(path).write_text(json.dumps({"pid": os.getpid(), "command": " ".join(["florence", *sys.argv[1:]])
                                             if Path(sys.argv[0]).name in ("florence", "__main__.py") else
                                             " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S")}),
                                 encoding="utf-8")
    return client


def close_lite(path: Path) -> None:
    """One Store less on the Lite ``path``; at zero, stop its in-process server and remove the owner file."""
    left = _LITE_OPEN.get(path, 0) - 1
    if left > 0:
        _LITE_OPEN[path] = left
        return
    _LITE_OPEN.pop(path, None)
    server_manager_instance.release_server(str(path))
    _owner_file(path).unlink(missing_ok=True)


class Store:
    """One collection of a Milvus database (module docstring): create, describe, write, read, search."""

    def __init__(self, db: str | Path, collection: str, token: str | None = None):
        self.db = str(db)
        self.collection = collection
        self.client = open_client(db, token)
        self._closed = False
        self._closed = False
        self._loaded = False
        self._info: CollectionInfo | None = None

    @property
    def where(self) -> str:
        return f"{self.db} collection {self.collection!r}"

    def close(self) -> None:
        """Close the connection; the last Store of a Lite path in this process also stops its embedded server, so
        that another process can open the path."""
        if self._closed:
            return
        self._closed = True
        self.client.close()
        if not is_server_uri(self.db):
            close_lite(Path(self.db).expanduser().absolute())

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the collection -------------------------------------------------------------------------------------------

    def exists(self) -> bool:
        return self.client.has_collection(self.collection)

    def create(self, info: CollectionInfo) -> None:
        """Create the collection with our schema and ``info``'s vector index."""
        if info.index_type not in INDEX_TYPES:
            raise SearchError(f"index type {info.index_type!r} is not one of {', '.join(INDEX_TYPES)} (what Milvus "
                              f"Lite loads; IVF_PQ, SCANN, DISKANN and GPU indexes are refused at load)")
        if info.metric not in METRICS:
            raise SearchError(f"metric {info.metric!r} is not one of {', '.join(METRICS)}")
        info.index_params = {**DEFAULT_INDEX_PARAMS[info.index_type], **info.index_params}
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=True)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(info.dim))
        schema.add_field("path", DataType.VARCHAR, max_length=MAX_PATH)
        schema.add_field("kind", DataType.VARCHAR, max_length=8)
        schema.add_field("content_hash", DataType.VARCHAR, max_length=64)
        schema.add_field("size", DataType.INT64)
        schema.add_field("mtime", DataType.DOUBLE)
        index = self.client.prepare_index_params()
        index.add_index("vector", index_type=info.index_type, metric_type=info.metric, params=info.index_params)
        self.client.create_collection(self.collection, schema=schema, index_params=index,
                                      properties={PROPERTY: info.to_json()})
        self._info = info
        self._loaded = False

    def info(self) -> CollectionInfo:
        """The collection's :class:`CollectionInfo`; a :class:`SearchError` if it does not exist or is not ours."""
        if self._info is None:
            if not self.exists():
                have = ", ".join(self.client.list_collections()) or "none"
                raise SearchError(f"{self.db}: no collection {self.collection!r} (collections: {have}); create it "
                                  f"with `florence index`")
            props = self.client.describe_collection(self.collection).get("properties", {})
            if PROPERTY not in props:
                raise SearchError(f"{self.where} was not written by florence (no {PROPERTY!r} property)")
            self._info = CollectionInfo.from_json(props[PROPERTY], self.where)
        return self._info

    def set_info(self, info: CollectionInfo) -> None:
        self.client.alter_collection_properties(self.collection, {PROPERTY: info.to_json()})
        self._info = info

    def check_model(self, model_sha256: str, model_name: str = "") -> None:
        info = self.info()
        if info.model_sha256 != model_sha256:
            raise ModelMismatch(f"{self.where} was embedded with model {info.model_name or '?'} (sha256 "
                                f"{info.model_sha256[:12]}), not with {model_name or 'this model'} (sha256 "
                                f"{model_sha256[:12]}): search it with the model that built it, or index into a new "
                                f"collection")

    def ensure_loaded(self) -> None:
        if not self._loaded:
            self.client.load_collection(self.collection)
            self._loaded = True

    def flush(self) -> None:
        """Seal the rows written so far into segments and reload the collection. Milvus Lite keeps fresh rows in an
        in-memory buffer that every search scans by brute force (70k rows: 1.2 s against 0.17 s per query once
        flushed) and builds HNSW / IVF indexes only for flushed segments, at load (measured)."""
        self.client.flush(self.collection)
        self.client.release_collection(self.collection)
        self.client.load_collection(self.collection)
        self._loaded = True

    def drop(self) -> None:
        self.client.drop_collection(self.collection)
        self._info = None
        self._loaded = False

    # --- rows -----------------------------------------------------------------------------------------------------

    def upsert(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert or replace whole rows (each with every schema field)."""
        if rows:
            self.client.upsert(self.collection, list(rows))

    def update(self, rows: Sequence[dict[str, Any]]) -> None:
        """Set some fields of existing rows (each row: ``id`` + the fields to set; Milvus partial upsert)."""
        if rows:
            self.client.upsert(self.collection, list(rows), partial_update=True)

    def delete(self, ids: Sequence[str]) -> None:
        if ids:
            self.client.delete(self.collection, ids=list(ids))

    def count(self) -> int:
        self.ensure_loaded()
        return int(self.client.query(self.collection, filter="", output_fields=["count(*)"])[0]["count(*)"])

    def get(self, ids: Sequence[str], fields: Sequence[str] = ("*",)) -> list[dict[str, Any]]:
        self.ensure_loaded()
        return list(self.client.get(self.collection, ids=list(ids), output_fields=list(fields))) if ids else []

    def rows(self, fields: Sequence[str] = BASE_FIELDS, filter: str = "", batch_size: int = _QUERY_PAGE
             ) -> Iterator[dict[str, Any]]:
        """Every row matching ``filter`` (all rows by default), ``fields`` of each, in pages (a query iterator); a bad
        filter or field is a :class:`SearchError` naming it."""
        self.ensure_loaded()
        try:
            iterator = self.client.query_iterator(self.collection, batch_size=batch_size, filter=filter,
                                                  output_fields=list(fields))
            try:
                while page := iterator.next():
                    yield from page
            finally:
                iterator.close()
        except MilvusException as err:
            raise SearchError(f"{self.where}: cannot read fields {list(fields)}: {err.message}"
                              + (f" (filter {filter!r})" if filter else "")) from None

    def vectors(self, filter: str = "") -> tuple[list[str], np.ndarray]:
        """``(ids, (N, D) float32 vectors)`` of every row matching ``filter``."""
        ids, vecs = [], []
        for row in self.rows(("id", "vector"), filter):
            ids.append(row["id"])
            vecs.append(row["vector"])
        dim = self.info().dim
        return ids, np.asarray(vecs, dtype=np.float32).reshape(len(ids), dim)

    def search(self, vectors: np.ndarray, top_k: int = 10, filter: str = "", output_fields: Sequence[str] = ("*",),
               search_params: dict[str, Any] | None = None) -> list[list[Hit]]:
        """``Q`` query vectors ``(Q, D)`` -> per query the ``top_k`` best rows, best first."""
        info = self.info()
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, info.dim)  # Q, D
        self.ensure_loaded()
        params = {"metric_type": info.metric, "params": search_params or DEFAULT_SEARCH_PARAMS[info.index_type]}
        try:
            result = self.client.search(self.collection, data=vectors.tolist(), limit=int(top_k), filter=filter,
                                        output_fields=[f for f in output_fields if f != "vector"],
                                        search_params=params, anns_field="vector")
        except MilvusException as err:
            raise SearchError(f"{self.where}: search failed: {err.message}"
                              + (f" (filter {filter!r})" if filter else "")) from None
        return [[Hit(str(h["id"]), float(h["distance"]),
                     {k: v for k, v in h.get("entity", {}).items() if k != "vector"}) for h in hits] for hits in result]
