"""Multimodal search over Milvus with a Florence dual encoder: index image and video collections, search by text or
image, auto-tag, find near-duplicates (``florence index | search | tag | dedup | serve``)."""
from florence.search.embedder import Embedder
from florence.search.files import FileItem, SourceFiles, walk_source
from florence.search.index import Index
from florence.search.indexer import IndexSummary
from florence.search.store import CollectionInfo, DatabaseLocked, Hit, ModelMismatch, SearchError, Store

__all__ = ["Index", "Embedder", "Store", "Hit", "CollectionInfo", "IndexSummary", "FileItem", "SourceFiles",
           "walk_source", "SearchError", "DatabaseLocked", "ModelMismatch"]
