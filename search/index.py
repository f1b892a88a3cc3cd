"""``Index``: the Python face of search, mirroring the commands (``florence index | search | tag | dedup``).

    from florence.search import Index

    with Index("runs/search.db", "fmnist", model="runs/demo/pretrain/final") as index:
        index.add("photos/")                                   # incremental; returns an IndexSummary
        hits = index.search(text="a photo of a bag", top_k=10, filter='kind == "image"')
        hits = index.search(image="query.png")                 # or both, weighted by text_weight
        index.tag(["bag", "sandal"])                           # zero-shot, and kNN among trusted tags
        groups = index.duplicates(threshold=0.95)

A query with both a text and an image embeds each, mixes them as ``text_weight * t + (1 - text_weight) * i`` and
renormalises (the two embeddings live in one joint space; ``text_weight=0.5`` weighs them equally). ``like=ID`` uses
a stored row's vector (the web page's "more like this"). Scores are cosine similarities.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from torch import nn

from florence.data.images import BadSample, decode_image
from florence.search.dedup import DuplicateGroup, find_duplicates
from florence.search.embedder import Embedder
from florence.search.files import SourceFiles, walk_source
from florence.search.indexer import IndexSummary, index_files
from florence.search.store import Hit, SearchError, Store
from florence.search.tagging import TagSummary, tag_collection

__all__ = ["Index"]

ImageQuery = str | Path | bytes | Image.Image


class Index:
    """A Milvus collection of Florence embeddings and the model that fills and queries it.

    Args:
        db: a Milvus Lite path (``*.db``) or a server URI (``http://HOST:19530``).
        collection: the collection's name.
        model: a bundle directory or a loaded dual encoder; needed to add files and to search by text or image
            (not for ``like=``, ``duplicates`` or ``count``).
        token: a Milvus server token (``user:password``), if the server asks for one.
        device / precision / compile: how the model runs (:class:`florence.search.embedder.Embedder`).
    """

    def __init__(self, db: str | Path, collection: str, model: str | Path | nn.Module | None = None, *,
                 token: str | None = None, device: str = "cpu", precision: str = "fp32", compile: bool = False,
                 embedder: Embedder | None = None):
        self._embedder = embedder or (Embedder(model, device, precision, compile) if model is not None else None)
        self.store = Store(db, collection, token)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            raise SearchError(f"{self.store.where}: this needs the model (--model BUNDLE)")
        return self._embedder

    def checked_embedder(self) -> Embedder:
        """The embedder, after checking that it built the collection."""
        embedder = self.embedder
        self.store.check_model(embedder.sha256, embedder.name)
        return embedder

    def count(self) -> int:
        return self.store.count()

    # --- writing --------------------------------------------------------------------------------------------------

    def add(self, source: str | Path | SourceFiles, *, prune: bool = False, batch_size: int = 64, workers: int = 2,
            progress: bool = True, index_type: str = "FLAT", index_params: dict[str, Any] | None = None,
            metric: str = "COSINE", frames: int = 8, threads: int | None = None) -> IndexSummary:
        """Index a folder, CSV table or webdataset shards (:mod:`florence.search.files`), incrementally
        (:mod:`florence.search.indexer`). ``index_type`` / ``index_params`` / ``metric`` / ``frames`` apply when the
        collection is created; ``threads``: torch threads while embedding (default: the cores minus ``workers``)."""
        files = source if isinstance(source, SourceFiles) else walk_source(source)
        return index_files(self.store, self.embedder, files, batch_size=batch_size, workers=workers, prune=prune,
                           progress=progress, index_type=index_type, index_params=index_params, metric=metric,
                           frames=frames, threads=threads)

    # --- reading --------------------------------------------------------------------------------------------------

    def image_vector(self, image: ImageQuery) -> np.ndarray:
        """``(D,)`` unit embedding of a query image (a path, encoded bytes or a PIL image)."""
        if isinstance(image, Image.Image):
            pil = image.convert("RGB")
        else:
            name = "uploaded image" if isinstance(image, bytes) else str(image)
            try:
                pil = decode_image(image if isinstance(image, bytes) else Path(image), name=name)
            except BadSample as err:
                raise SearchError(f"query image {err}") from None
        return self.checked_embedder().embed_images([pil])[0]

    def query_vector(self, text: str | None = None, image: ImageQuery | None = None, like: str | None = None,
                     text_weight: float = 0.5) -> np.ndarray:
        """``(D,)`` unit query vector from a text, an image, both (mixed by ``text_weight``), or a stored row."""
        if like is not None:
            rows = self.store.get([like], ("id", "vector"))
            if not rows:
                raise SearchError(f"{self.store.where}: no row with id {like!r}")
            return np.asarray(rows[0]["vector"], np.float32)
        if text is None and image is None:
            raise SearchError("a search needs a text, an image or both (or like=ID)")
        if not 0.0 <= text_weight <= 1.0:
            raise SearchError(f"text_weight must be in [0, 1], got {text_weight}")
        parts = []
        if text is not None:
            parts.append((text_weight if image is not None else 1.0, self.checked_embedder().embed_text([text])[0]))
        if image is not None:
            parts.append((1.0 - text_weight if text is not None else 1.0, self.image_vector(image)))
        vector = sum(w * v for w, v in parts)
        return (vector / max(float(np.linalg.norm(vector)), 1e-12)).astype(np.float32)

    def search(self, text: str | None = None, image: ImageQuery | None = None, *, like: str | None = None,
               text_weight: float = 0.5, top_k: int = 10, filter: str = "",
               output_fields: Sequence[str] = ("*",)) -> list[Hit]:
        """The ``top_k`` rows closest to the query (best first), among those matching the Milvus boolean ``filter``
        (``'tag == "bag" and mtime > 1700000000'``)."""
        vector = self.query_vector(text, image, like, text_weight)
        return self.store.search(vector[None], top_k, filter, output_fields)[0]

    def search_texts(self, texts: Sequence[str], top_k: int = 10, filter: str = "") -> list[list[Hit]]:
        """Many text queries at once (one embedding batch, one database call)."""
        return self.store.search(self.checked_embedder().embed_text(list(texts)), top_k, filter)

    # --- tags and duplicates --------------------------------------------------------------------------------------

    def tag(self, labels: Sequence[str], **options: Any) -> TagSummary:
        """Write tags (:func:`florence.search.tagging.tag_collection`); its :class:`TagSummary`."""
        return tag_collection(self, labels, **options)

    def duplicates(self, threshold: float = 0.95, **options: Any) -> list[DuplicateGroup]:
        """Groups of near-duplicate and exact-duplicate rows (:func:`florence.search.dedup.find_duplicates`)."""
        return find_duplicates(self.store, threshold, **options)
