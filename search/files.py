"""What ``florence index --source`` walks: a folder, a CSV table, or webdataset shards -> :class:`FileItem` s.

- **Folder**: every image (``florence.data.sources.IMAGE_EXTENSIONS``) and video
  (``florence.data.video_decode.VIDEO_SUFFIXES``) below it, recursively, in sorted order; hidden entries skipped.
- **CSV** (``.csv`` / ``.tsv``): a ``path`` column (or ``file`` / ``filepath`` / ``image`` / ``video``), relative to
  the table's folder or absolute; every other column is user metadata written into the row (numbers as numbers, an
  empty cell left out). A row naming a missing file is a counted skip; a table without a path column is an error.
- **webdataset**: a ``.tar`` shard, a folder of them (``*.tar``) or a glob; every image member is one file, named
  ``SHARD.tar#MEMBER``, with the keys of a same-stem ``.json`` member as metadata. Videos inside shards are not read.

A file's ``size`` and ``mtime`` come from ``stat`` (a shard member: its tar header), so a re-run can recognise an
unchanged file without reading it.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from florence.data.sources import IMAGE_EXTENSIONS
from florence.data.video_decode import VIDEO_SUFFIXES
from florence.search.store import BASE_FIELDS, SearchError

__all__ = ["FileItem", "SourceFiles", "walk_source", "kind_of", "read_member"]

PATH_COLUMNS = ("path", "file", "filepath", "image", "video")
MEMBER_SEP = "#"
RESERVED = (*BASE_FIELDS, "vector")  # schema fields: not metadata names


def kind_of(name: str) -> str | None:
    suffix = os.path.splitext(name)[1].lower()
    return "image" if suffix in IMAGE_EXTENSIONS else "video" if suffix in VIDEO_SUFFIXES else None


@dataclass
class FileItem:
    """One file to index: ``path`` (absolute, or ``SHARD.tar#MEMBER``), ``kind`` (``image`` / ``video``), ``size``
    (bytes), ``mtime`` (seconds) and user ``metadata``."""

    path: str
    kind: str
    size: int
    mtime: float
    metadata: dict[str, Any] = field(default_factory=dict)

    def read_bytes(self) -> bytes:
        if MEMBER_SEP in self.path and not os.path.exists(self.path):
            shard, member = self.path.split(MEMBER_SEP, 1)
            return read_member(shard, member)
        with open(self.path, "rb") as f:
            return f.read()


def read_member(shard: str, member: str) -> bytes:
    """The bytes of ``member`` in the tar ``shard`` (``OSError`` / ``KeyError`` when absent)."""
    with tarfile.open(shard) as tar:
        handle = tar.extractfile(member)
        if handle is None:
            raise KeyError(member)
        return handle.read()


@dataclass
class SourceFiles:
    """A walked source: its files, the roots they live under (what ``florence serve`` may read) and the entries that
    could not be used, as ``(name, reason)``."""

    items: list[FileItem]
    roots: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _stat_item(path: Path, metadata: dict[str, Any] | None = None) -> FileItem | None:
    kind = kind_of(path.name)
    if kind is None:
        return None
    st = path.stat()
    return FileItem(str(path), kind, int(st.st_size), float(st.st_mtime), dict(metadata or {}))


def _walk_folder(root: Path) -> SourceFiles:
    items = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and (item := _stat_item(Path(dirpath) / name)) is not None:
                items.append(item)
    return SourceFiles(items, [str(root)])


def _cell(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _walk_table(table: Path) -> SourceFiles:
    delimiter = "\t" if table.suffix.lower() == ".tsv" else ","
    with open(table, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        fields = reader.fieldnames or []
        column = next((c for c in fields if c.strip().lower() in PATH_COLUMNS), None)
        if column is None:
            raise SearchError(f"{table}: no path column (one of {', '.join(PATH_COLUMNS)}; columns: {fields})")
        bad_keys = [c for c in fields if c != column and (not c or not c.isidentifier() or c in RESERVED)]
        if bad_keys:
            raise SearchError(f"{table}: metadata column names must be identifiers (letters, digits, _) other than "
                              f"{', '.join(RESERVED)}: {bad_keys}")
        items, skipped, dirs = [], [], set()
        for line, row in enumerate(reader, start=2):
            value = (row.get(column) or "").strip()
            if not value:
                skipped.append((f"{table}:{line}", "empty path"))
                continue
            path = Path(value) if os.path.isabs(value) else table.parent / value
            path = path.absolute()
            meta = {k: _cell(v) for k, v in row.items() if k != column and k is not None and v not in (None, "")}
            if not path.is_file():
                skipped.append((f"{table}:{line} {path}", "missing file"))
                continue
            item = _stat_item(path, meta)
            if item is None:
                skipped.append((f"{table}:{line} {path}", "not an image or video file"))
                continue
            items.append(item)
            dirs.add(str(path.parent))
    roots = [os.path.commonpath(sorted(dirs))] if dirs else [str(table.parent.absolute())]
    return SourceFiles(items, roots, skipped)


def _walk_shards(shards: list[Path]) -> SourceFiles:
    items, skipped = [], []
    for shard in shards:
        try:
            with tarfile.open(shard) as tar:
                members = [m for m in tar.getmembers() if m.isfile()]
                meta_of = {}
                for m in members:
                    if m.name.endswith(".json"):
                        try:
                            meta_of[m.name[:-5]] = json.loads(tar.extractfile(m).read().decode("utf-8"))
                        except (ValueError, UnicodeDecodeError) as err:
                            skipped.append((f"{shard}{MEMBER_SEP}{m.name}", f"unreadable metadata ({err})"))
        except (tarfile.TarError, OSError) as err:
            skipped.append((str(shard), f"unreadable shard ({err})"))
            continue
        for m in members:
            if kind_of(m.name) == "image":
                stem = os.path.splitext(m.name)[0]
                meta = meta_of.get(stem, {})
                items.append(FileItem(f"{shard}{MEMBER_SEP}{m.name}", "image", int(m.size), float(m.mtime),
                                      {k: v for k, v in meta.items() if k not in RESERVED and str(k).isidentifier()}
                                      if isinstance(meta, dict) else {}))
    roots = sorted({str(s.parent) for s in shards})
    return SourceFiles(items, roots, skipped)


def walk_source(source: str | Path) -> SourceFiles:
    """The files of ``source`` (module docstring); a :class:`SearchError` naming it when it cannot be read."""
    text = str(source)
    path = Path(text).expanduser()
    if any(ch in text for ch in "*?["):
        shards = sorted(Path(p).absolute() for p in glob.glob(text) if p.endswith(".tar"))
        if not shards:
            raise SearchError(f"--source {text}: no .tar shards match")
        return _walk_shards(shards)
    if not path.exists():
        raise SearchError(f"--source {text}: no such file or folder")
    path = path.absolute()
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if shards and not any(kind_of(p.name) for p in path.iterdir()):
            return _walk_shards(shards)
        return _walk_folder(path)
    if path.suffix.lower() in (".csv", ".tsv"):
        return _walk_table(path)
    if path.suffix.lower() == ".tar":
        return _walk_shards([path])
    if kind_of(path.name):
        return SourceFiles([_stat_item(path)], [str(path.parent)])
    raise SearchError(f"--source {text}: not a folder, a .csv/.tsv table, a .tar shard or an image/video file")
