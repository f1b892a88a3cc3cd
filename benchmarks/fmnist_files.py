"""Fashion-MNIST as image files: what ``florence index --source`` walks in the search benchmarks and the demo.

Layout (under ``out_dir``)::

    train/<class_slug>/train_00000.png ... train_59999.png   28 x 28 grayscale PNGs, index = position in the idx file
    test/<class_slug>/test_00000.png ... test_09999.png
    fashion_mnist.csv                                        path,label,split,index (path relative to out_dir)

``class_slug`` is the class name (``florence.data.sources.FASHION_MNIST_CLASSES``) in lower case with every run of
other characters turned into ``_`` (``"T-shirt/top"`` -> ``t_shirt_top``); ``label`` in the table is the class name
itself (``"Bag"``), so a CSV source gives every row a ``label`` metadata field.

Idempotent and kill-safe: a PNG that exists is skipped (not rewritten: its mtime stays, so a re-index sees it
unchanged); each PNG and the table are written to a temporary name and renamed into place, so a killed run leaves no
half-written file and a re-run completes the rest. ~70k PNGs take well under a minute on one core.

Run: ``python -m florence.benchmarks.fmnist_files OUT [--limit N] [--splits train test] [--root IDX_DIR]``.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import re
import sys
from pathlib import Path
from typing import Sequence

from PIL import Image

from florence.data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, read_idx
from florence.errors import FlorenceError

__all__ = ["write_fashion_mnist_files", "class_slug", "CSV_NAME", "SPLITS"]

CSV_NAME = "fashion_mnist.csv"
SPLITS = {"train": "train", "test": "t10k"}  # split -> idx file prefix


class FilesError(FlorenceError, ValueError):
    """A bad split, limit or output folder."""


def class_slug(name: str) -> str:
    """``"T-shirt/top"`` -> ``"t_shirt_top"``, ``"Ankle boot"`` -> ``"ankle_boot"``: a folder name."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_fashion_mnist_files(out_dir: str | Path, splits: Sequence[str] = ("train", "test"), limit: int | None = None,
                              root: str | Path | None = None) -> Path:
    """Write the images of ``splits`` (the first ``limit`` of each when given) as PNGs under ``out_dir`` and the table
    of all of them; the table's path (module docstring). ``root``: the folder of the four idx ``.gz`` files (default
    the Debian package's)."""
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise FilesError(f"splits must be some of {', '.join(SPLITS)}, got {list(splits)}")
    if limit is not None and limit < 1:
        raise FilesError(f"--limit must be at least 1, got {limit}")
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise FilesError(f"{out}: exists and is not a folder")
    root = Path(root if root is not None else FASHION_MNIST_DIR)
    slugs = [class_slug(name) for name in FASHION_MNIST_CLASSES]
    table: list[tuple[str, str, str, int]] = []
    for split in dict.fromkeys(splits):
        images = read_idx(root / f"{SPLITS[split]}-images-idx3-ubyte.gz")  # N, 28, 28 uint8
        labels = read_idx(root / f"{SPLITS[split]}-labels-idx1-ubyte.gz")  # N
        if images.ndim != 3 or len(images) != len(labels) or int(labels.max(initial=0)) >= len(slugs):
            raise FilesError(f"{root}: {split} images {images.shape} and labels {labels.shape} disagree")
        count = len(images) if limit is None else min(limit, len(images))
        for slug in set(slugs[int(y)] for y in labels[:count]):
            (out / split / slug).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            label = int(labels[index])
            rel = f"{split}/{slugs[label]}/{split}_{index:05d}.png"
            path = out / rel
            if not path.exists():
                buffer = io.BytesIO()
                Image.fromarray(images[index], mode="L").save(buffer, format="PNG")
                _write_atomic(path, buffer.getvalue())
            table.append((rel, FASHION_MNIST_CLASSES[label], split, index))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "label", "split", "index"])
    writer.writerows(table)
    csv_path = out / CSV_NAME
    data = text.getvalue().encode("utf-8")
    if not csv_path.is_file() or csv_path.read_bytes() != data:  # unchanged table: keep its mtime
        _write_atomic(csv_path, data)
    return csv_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images of each split")
    parser.add_argument("--splits", nargs="+", default=["train", "test"], choices=list(SPLITS))
    parser.add_argument("--root", type=Path, default=None, help=f"idx files folder (default {FASHION_MNIST_DIR})")
    args = parser.parse_args(argv)
    try:
        csv_path = write_fashion_mnist_files(args.out, args.splits, args.limit, args.root)
    except FlorenceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with open(csv_path, encoding="utf-8") as f:
        rows = sum(1 for _ in f) - 1
    print(f"{rows} images under {csv_path.parent}; table {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
