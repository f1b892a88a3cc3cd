"""Columns of JSON annotation files (COCO instances, VQAv2 questions and annotations) read with one-line errors that
name the file, the entry and the key, and compact storage for many strings."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from florence.data.errors import DataFileError
from florence.data.schema import _is_int


class Strings:
    """Many strings in one byte buffer (no per-string Python objects: forked DataLoader workers share the pages)."""

    def __init__(self, strings: Sequence[str]):
        encoded = [s.encode("utf-8") for s in strings]
        self.ends = np.cumsum([len(b) for b in encoded], dtype=np.int64)  # N
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> str:
        start = int(self.ends[i - 1]) if i > 0 else 0
        return self.blob[start:int(self.ends[i])].tobytes().decode("utf-8")


def object_list(data: dict, key: str, file: Path, required: bool = True) -> list[dict]:
    """``data[key]``, a list of objects (one-line DataFileError naming the file and the entry otherwise)."""
    if key not in data:
        if required:
            raise DataFileError(f"{file}: missing key {key!r}")
        return []
    entries = data[key]
    if not isinstance(entries, list):
        raise DataFileError(f"{file}: {key}: expected a list, got {type(entries).__name__}")
    bad = next((i for i, e in enumerate(entries) if not isinstance(e, dict)), None)
    if bad is not None:
        raise DataFileError(f"{file}: {key}[{bad}]: expected an object, got {entries[bad]!r}")
    return entries


def column(entries: list[dict], key: str, file: Path, where: str) -> list:
    """``[e[key] for e in entries]``; a missing key names the entry (``where[i]``)."""
    try:
        return [e[key] for e in entries]
    except KeyError:
        i = next(i for i, e in enumerate(entries) if key not in e)
        raise DataFileError(f"{file}: {where}[{i}]: missing key {key!r}") from None


def int_column(entries: list[dict], key: str, file: Path, where: str, minimum: int | None = None) -> np.ndarray:
    """An integer column (integral floats accepted: some exports write ``480.0``)."""
    values = column(entries, key, file, where)
    for i, v in enumerate(values):
        if not (_is_int(v) or (isinstance(v, float) and v.is_integer())) or (minimum is not None and v < minimum):
            need = "an integer" + (f" >= {minimum}" if minimum is not None else "")
            raise DataFileError(f"{file}: {where}[{i}].{key}: expected {need}, got {v!r}")
    return np.asarray(values, dtype=np.int64).reshape(-1)


def duplicate_id(sorted_ids: np.ndarray) -> int | None:
    """The first id that occurs twice in sorted ``sorted_ids``, or None."""
    same = np.nonzero(sorted_ids[1:] == sorted_ids[:-1])[0]
    return int(sorted_ids[same[0]]) if len(same) else None


def lookup(sorted_ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position of each value in ``sorted_ids`` and whether it is there."""
    pos = np.searchsorted(sorted_ids, values)  # n
    safe = np.minimum(pos, max(len(sorted_ids) - 1, 0))
    found = (pos < len(sorted_ids)) & (sorted_ids[safe] == values) if len(sorted_ids) else np.zeros(len(values), bool)
    return safe, found
