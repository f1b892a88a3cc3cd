"""Map-style data sources: image-label (folder, table, Fashion-MNIST) and image-text (caption tables).

Every source has ``kind`` (``"label"`` or ``"text"``), ``name``, ``len()`` and ``get(index, rng)`` ->
:class:`RawSample`, raising :class:`~florence.data.images.BadSample` for an unusable sample. Images stay
undecoded until ``get``; building a source only reads the index (directory listing, table, idx files).

- Image-label sources also have ``class_names`` (a name, or a list of synonyms, per class id) and
  ``templates``; ``get`` draws one template (and synonym) from ``rng`` and returns the source-local class id.
- Image-text sources return the cleaned caption and ``caption_label(caption)``: a stable 62-bit hash of the
  normalised caption with bit 62 set, so identical captions share a label in every process and run, and caption
  labels never meet class ids (which stay below 2**62, see :mod:`florence.data.mixing`).

Tables: CSV (``.csv``), TSV (``.tsv``/``.tab``) with a header row, or JSON lines (``.jsonl``, captions only). A CSV/TSV
row with more fields than the header (typically a caption with an unquoted comma) is a :class:`DataFileError` naming
the file and line: quote such fields (``"a dog, running"``); nothing is cut silently.
The image column is ``image`` (or ``path``/``filepath``/``file``), the label column ``label`` (class id or class
name), the caption column ``caption`` (or ``text``). Relative image paths are taken from ``root`` (default: the
table's folder).
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image

from florence.data.errors import DataConfigError, DataFileError, DataNotFound
from florence.data.images import BadSample, clean_caption, decode_image, normalize_caption
from florence.data.templates import ClassName, make_prompt, resolve_templates

CAPTION_LABEL_BIT = 1 << 62
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_IMAGE_COLUMNS = ("image", "path", "filepath", "file")
_CAPTION_COLUMNS = ("caption", "text")


@dataclass
class RawSample:
    """One decoded sample before the image transform.

    Attributes:
        image: 8-bit RGB PIL image, or a uint8 tensor ``(H, W)`` (grey) / ``(3, H, W)`` for array-backed sources.
        text: the prompt (image-label) or the cleaned caption (image-text).
        label: source-local class id, or the caption label (bit 62 set).
        file: what names the sample in logs (path, or ``source[index]``).
    """

    image: Image.Image | torch.Tensor
    text: str
    label: int
    file: str


def caption_label(caption: str) -> int:
    """Stable label of a caption: blake2b-64 of :func:`normalize_caption`, kept to 62 bits, with bit 62 set."""
    digest = hashlib.blake2b(normalize_caption(caption).encode("utf-8"), digest_size=8).digest()
    return CAPTION_LABEL_BIT | (int.from_bytes(digest, "little") & (CAPTION_LABEL_BIT - 1))


def load_class_names(spec: str | Path | Sequence[ClassName]) -> list[ClassName]:
    """Class names from a list, a ``.json`` file (a list of names or of synonym lists) or a text file (one class
    per line)."""
    if isinstance(spec, (list, tuple)):
        return list(spec)
    path = Path(spec)
    if not path.is_file():
        raise DataNotFound(f"class-names file not found: {path}")
    if path.suffix == ".json":
        try:
            names = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataFileError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(names, list) or not names:
            raise DataFileError(f"{path}: expected a non-empty JSON list of class names (or of synonym lists)")
        return names
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise DataFileError(f"{path}: no class names")
    return names


class ImageLabelSource:
    """Image files with class ids; text = a prompt template filled with the class name."""

    kind: Literal["label"] = "label"

    def __init__(self, items: Sequence[tuple[str, int]], class_names: Sequence[ClassName], *,
                 templates: str | Sequence[str] | None = None, name: str = "image_label"):
        self.items = list(items)
        self.class_names = list(class_names)
        self.templates = resolve_templates(templates)
        self.name = name
        for path, label in self.items:
            if not 0 <= label < len(self.class_names):
                raise DataFileError(f"{name}: label {label} of {path} outside 0..{len(self.class_names) - 1}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.items)

    def get(self, index: int, rng: random.Random) -> RawSample:
        path, label = self.items[index]
        image = decode_image(path)
        return RawSample(image, make_prompt(self.class_names[label], self.templates, rng), label, path)


class CaptionSource:
    """Image files with captions; label = :func:`caption_label` of the caption."""

    kind: Literal["text"] = "text"

    def __init__(self, items: Sequence[tuple[str | None, str | bytes | None, str]], *, name: str = "captions"):
        """``items``: (image path, raw caption, where) triples; ``where`` names the row (``table.csv:12``).
        A row that could not be parsed has image path None and its reason as caption."""
        self.items = list(items)
        self.name = name

    def __len__(self) -> int:
        return len(self.items)

    def get(self, index: int, rng: random.Random) -> RawSample:
        path, caption, where = self.items[index]
        if path is None:
            raise BadSample(where, str(caption))
        text = clean_caption(caption if caption is not None else "", name=f"{path} ({where})")
        image = decode_image(path)
        return RawSample(image, text, caption_label(text), path)


class FashionMNISTSource:
    """Fashion-MNIST from its four idx files (Debian ``dataset-fashion-mnist`` or a user folder), decoded once
    into ``images`` uint8 ``(N, 28, 28)`` and ``labels`` int64 ``(N,)``; images are served as uint8 tensors."""

    kind: Literal["label"] = "label"

    def __init__(self, root: str | Path | None = None, *, split: Literal["train", "test"] = "train",
                 templates: str | Sequence[str] | None = None, name: str = "fashion_mnist"):
        if split not in ("train", "test"):
            raise DataConfigError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
        root = Path(root if root is not None else FASHION_MNIST_DIR)
        prefix = "train" if split == "train" else "t10k"
        self.files = (root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz")
        self.images = read_idx(self.files[0])  # N, 28, 28
        self.labels = read_idx(self.files[1]).astype(np.int64)  # N
        if len(self.images) != len(self.labels) or self.images.ndim != 3:
            raise DataFileError(f"{root}: {prefix} images {self.images.shape} and labels {self.labels.shape} disagree")
        self.class_names = list(FASHION_MNIST_CLASSES)
        self.templates = resolve_templates(templates)
        self.name = name

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, index: int, rng: random.Random) -> RawSample:
        label = int(self.labels[index])
        image = torch.from_numpy(self.images[index])  # 28, 28 uint8, shares memory
        return RawSample(image, make_prompt(self.class_names[label], self.templates, rng), label,
                         f"{self.name}[{index}]")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (optionally gzipped) into a numpy array. Raises FileNotFoundError naming a missing file
    (with the Debian package to install) and ValueError for a malformed one."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFound(
            f"Fashion-MNIST file not found: {path} (install the Debian package 'dataset-fashion-mnist' or set the "
            f"source's path to a folder with the four idx .gz files)")
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataFileError(f"{path}: not an idx file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataFileError(f"{path}: header says {dims} but holds {data.size} bytes")
    return data.reshape(dims).copy()  # writable, owns its memory


def image_folder(root: str | Path, *, class_names: str | Path | Sequence[ClassName] | None = None,
                 templates: str | Sequence[str] | None = None, name: str | None = None) -> ImageLabelSource:
    """ImageFolder layout: ``root/<class folder>/<image>``; class ids follow the sorted folder names. Class
    names default to the folder names (``_`` read as a space); ``class_names`` overrides them in that order."""
    root = Path(root)
    if not root.is_dir():
        raise DataNotFound(f"image folder not found: {root}")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise DataFileError(f"{root}: no class sub-folders")
    items = [(str(f), label) for label, folder in enumerate(folders) for f in sorted(folder.rglob("*"))
             if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()]
    if not items:
        raise DataFileError(f"{root}: no image files (extensions {', '.join(IMAGE_EXTENSIONS)})")
    names = load_class_names(class_names) if class_names is not None else [f.name.replace("_", " ") for f in folders]
    if len(names) != len(folders):
        raise DataFileError(f"{root}: {len(folders)} class folders but {len(names)} class names")
    return ImageLabelSource(items, names, templates=templates, name=name or root.name)


def _read_table(path: Path) -> list[tuple[dict, str]]:
    """Rows of a CSV/TSV (header row) or JSONL file as (dict, where). Undecodable text is kept as bytes so that
    a bad row is a bad sample, not a failed run; an unparsable JSON line becomes {"__error__": reason}. A CSV/TSV
    row with more fields than the header is a :class:`DataFileError` (file and line): the extra fields cannot be
    assigned to a column, and dropping them would cut a caption silently."""
    if not path.is_file():
        raise DataNotFound(f"table not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line.decode("utf-8"))
                rows.append((row if isinstance(row, dict) else {"__error__": "JSON line is not an object"}, where))
            except UnicodeDecodeError as e:
                rows.append(({"__error__": f"line is not valid UTF-8 (byte offset {e.start})"}, where))
            except json.JSONDecodeError as e:
                rows.append(({"__error__": f"invalid JSON ({e.msg})"}, where))
        return rows
    if suffix not in (".csv", ".tsv", ".tab"):
        raise DataFileError(f"{path}: unsupported table format {suffix!r} (use .csv, .tsv or .jsonl)")
    delimiter = "," if suffix == ".csv" else "\t"
    with path.open(encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        rows = []
        for row in reader:
            check_row_width(row, reader, path)
            fixed = {k: (v.encode("utf-8", "surrogateescape") if isinstance(v, str) and _has_surrogates(v) else v)
                     for k, v in row.items()}
            rows.append((fixed, f"{path}:{reader.line_num}"))
    return rows


def check_row_width(row: dict, reader: csv.DictReader, path: Path) -> None:
    """:class:`DataFileError` naming ``path`` and the line if a ``csv.DictReader`` row has more fields than the
    header (the reader files the extras under the key None)."""
    if None in row:
        extra = row[None]
        header = reader.fieldnames or []
        raise DataFileError(
            f"{path}:{reader.line_num}: {len(header) + len(extra)} fields but the header has {len(header)} "
            f"({', '.join(header)}); quote fields that contain the delimiter, e.g. \"a dog, running\"")


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _column(fieldnames: Sequence[str], options: Sequence[str], path: Path) -> str:
    for option in options:
        if option in fieldnames:
            return option
    raise DataFileError(f"{path}: needs one of the columns {list(options)}, has {list(fieldnames)}")


def _resolve(root: Path, value: str | bytes | None) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    p = Path(value.strip())
    return str(p if p.is_absolute() else root / p)


def label_table(path: str | Path, *, class_names: str | Path | Sequence[ClassName] | None = None,
                root: str | Path | None = None, templates: str | Sequence[str] | None = None,
                name: str | None = None) -> ImageLabelSource:
    """CSV/TSV of (image, label). Labels are class ids (``class_names`` required) or class names (ids then
    follow ``class_names`` if given, else the sorted distinct names)."""
    path = Path(path)
    rows = _read_table(path)
    if not rows:
        raise DataFileError(f"{path}: no rows")
    keys = list(rows[0][0])
    image_col, label_col = _column(keys, _IMAGE_COLUMNS, path), _column(keys, ("label",), path)
    base = Path(root) if root is not None else path.parent
    raw_labels = [row.get(label_col) for row, _ in rows]
    for (row, where), lab in zip(rows, raw_labels):
        if not isinstance(lab, str) or not lab.strip():
            raise DataFileError(f"{where}: missing or undecodable label")
    names = load_class_names(class_names) if class_names is not None else None
    if all(lab.strip().lstrip("-").isdigit() for lab in raw_labels):
        if names is None:
            raise DataFileError(f"{path}: integer labels need class_names")
        ids = [int(lab) for lab in raw_labels]
    else:
        if names is None:
            names = sorted({lab.strip() for lab in raw_labels})
        lookup = {(n if isinstance(n, str) else n[0]): i for i, n in enumerate(names)}
        ids = []
        for (row, where), lab in zip(rows, raw_labels):
            if lab.strip() not in lookup:
                raise DataFileError(f"{where}: label {lab.strip()!r} is not a class name")
            ids.append(lookup[lab.strip()])
    items = [(_resolve(base, row.get(image_col)) or where, i) for (row, where), i in zip(rows, ids)]
    return ImageLabelSource(items, names, templates=templates, name=name or path.stem)


def caption_table(path: str | Path, *, root: str | Path | None = None, name: str | None = None) -> CaptionSource:
    """CSV/TSV/JSONL of (image, caption)."""
    path = Path(path)
    rows = _read_table(path)
    if not rows:
        raise DataFileError(f"{path}: no rows")
    good_keys = next((list(r) for r, _ in rows if "__error__" not in r), None)
    if good_keys is None:
        raise DataFileError(f"{path}: no readable rows (first problem: {rows[0][1]}: {rows[0][0]['__error__']})")
    image_col, caption_col = _column(good_keys, _IMAGE_COLUMNS, path), _column(good_keys, _CAPTION_COLUMNS, path)
    base = Path(root) if root is not None else path.parent
    items = []
    for row, where in rows:
        if "__error__" in row:
            items.append((None, row["__error__"], where))
            continue
        image = _resolve(base, row.get(image_col))
        if image is None:
            items.append((None, f"no image path in column {image_col!r}", where))
            continue
        items.append((image, row.get(caption_col), where))
    return CaptionSource(items, name=name or path.stem)
