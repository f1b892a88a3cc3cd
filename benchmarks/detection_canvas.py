"""Fashion-MNIST detection canvases: real Fashion-MNIST items pasted onto textured canvases, with COCO annotations.

``generate(out_dir, split, num_images, seed)`` writes ``out_dir/<split>/<id:06d>.png`` (RGB, ``canvas`` x ``canvas``),
``out_dir/annotations/instances_<split>.json`` (COCO detection format: ``images``, ``annotations`` with ``id``,
``image_id``, ``category_id`` 1..10, ``bbox`` [x, y, w, h], ``area``, ``iscrowd`` 0, and the 10 ``categories`` named
as Fashion-MNIST's classes; an image's ``file_name`` is relative to ``out_dir/<split>``) and
``out_dir/manifest_<split>.json`` (parameters + hashes). The ``train`` split pastes items of Fashion-MNIST's train set,
``test`` items of its test set. CLI::

    python -m florence.benchmarks.detection_canvas --out DIR --train 5000 --test 500

How a canvas is made (all draws from ``numpy.random.default_rng([seed, split, image index])``, so image ``i`` does
not depend on how many images are generated):

- background: one of smooth value noise (a random 2..8 grid of colours, bilinearly upsampled), a linear gradient
  between two colours, or sinusoidal stripes between two colours; colour values in [0, 0.55], plus pixel noise
  (std 0.02);
- 1..``max_items`` items: each a random item of the split (of the ``classes`` subset if given), resized (bilinear)
  from 28x28 to s x s, s uniform in ``scale`` (the pasted square; the item itself is usually narrower), at a uniform
  position inside the canvas. The item's grey intensity is its alpha (values below ``ALPHA_THRESHOLD`` set to 0) and
  it is blended over what is already there in a flat bright colour (value 0.75..1): ``out = a * colour + (1 - a) *
  out``. Later items are drawn on top of earlier ones;
- limited overlap: a placement is redrawn (up to ``PLACEMENT_TRIES`` times, then the item is dropped) if its box
  covers more than ``MAX_COVER`` of an earlier item's box or leaves an earlier item with fewer than ``MIN_VISIBLE``
  of its pixels visible;
- boxes: the tight box of each item's *visible* pixels, i.e. those where the item contributes at least
  ``ALPHA_THRESHOLD`` of the final colour (its weight ``a_i * prod_{j later} (1 - a_j)``); pixel-edge convention,
  so a box covering columns 3..7 has x = 3, w = 5. ``area`` = w * h (there are no masks).

Idempotent: a split whose manifest records the same parameters, the same Fashion-MNIST source files (SHA-256) and
whose annotation file and PNGs still hash to the recorded values is left as is.
"""
from __future__ import annotations

import argparse
import colorsys
import hashlib
import io
import json
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from florence.bundle import sha256_file
from florence.data.errors import DataNotFound
from florence.data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, FashionMNISTSource
from florence.errors import FlorenceError

GENERATOR_VERSION = 1
ALPHA_THRESHOLD = 0.1  # an item pixel counts (for alpha and for its box) from this intensity / weight on
MAX_COVER = 0.4  # most of an earlier item's box a new box may cover
MIN_VISIBLE = 0.7  # least fraction of an earlier item's pixels that must stay visible
PLACEMENT_TRIES = 20
SPLITS = {"train": 0, "test": 1}  # canvas split -> Fashion-MNIST split, and the split's key in the seed
CATEGORIES = [{"id": i + 1, "name": name, "supercategory": "fashion"} for i, name in enumerate(FASHION_MNIST_CLASSES)]


class CanvasError(FlorenceError, ValueError):
    """Invalid canvas generation parameters; the message names the parameter."""


@dataclass
class CanvasSplit:
    """What ``generate`` produced (or found already there).

    Attributes:
        images_dir: the folder of PNGs (``file_name`` in the annotations is relative to it).
        annotations: the COCO instances JSON.
        num_images, num_annotations: counts.
        skipped: True if an identical split was already there and nothing was written.
    """

    images_dir: Path
    annotations: Path
    num_images: int
    num_annotations: int
    skipped: bool


def resolve_classes(classes: Sequence[str | int] | None) -> list[int]:
    """Category ids (1..10) of ``classes`` given as Fashion-MNIST class names or category ids; None: all ten."""
    if classes is None:
        return [c["id"] for c in CATEGORIES]
    by_name = {c["name"].lower(): c["id"] for c in CATEGORIES}
    ids = []
    for c in classes:
        if isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 1 <= c <= len(CATEGORIES):
            ids.append(int(c))
        elif isinstance(c, str) and c.strip().lower() in by_name:
            ids.append(by_name[c.strip().lower()])
        elif isinstance(c, str) and c.strip().isdigit() and 1 <= int(c) <= len(CATEGORIES):
            ids.append(int(c))
        else:
            raise CanvasError(f"classes: {c!r} is neither a category id 1..{len(CATEGORIES)} nor one of "
                              f"{', '.join(FASHION_MNIST_CLASSES)}")
    if not ids:
        raise CanvasError("classes: empty selection")
    return sorted(set(ids))


@lru_cache(maxsize=32)
def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) bilinear interpolation weights (half-pixel centres, edges clamped)."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] += 1 - frac
    m[np.arange(n_out), hi] += frac
    return m


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured background (size, size, 3) float in [0, 1]: smooth noise, a gradient or stripes."""
    kind = rng.integers(3)
    if kind == 0:  # smooth value noise
        g = int(rng.integers(2, 9))
        grid = rng.uniform(0.0, 0.55, (g, g, 3))
        m = _interp_matrix(g, size)
        bg = np.einsum("yi,ijc,xj->yxc", m, grid, m, optimize=True)  # size, size, 3
    else:
        c0, c1 = rng.uniform(0.0, 0.55, (2, 3))
        theta = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[:size, :size]
        proj = xx * np.cos(theta) + yy * np.sin(theta)
        if kind == 1:  # linear gradient
            t = (proj - proj.min()) / max(np.ptp(proj), 1e-6)
        else:  # stripes
            period = rng.uniform(6, 32)
            t = 0.5 + 0.5 * np.sin(2 * np.pi * proj / period + rng.uniform(0, 2 * np.pi))
        bg = c0 + t[..., None] * (c1 - c0)  # size, size, 3
    bg = bg + rng.normal(0, 0.02, bg.shape)
    return np.clip(bg, 0, 1).astype(np.float32)


def item_alpha(item: np.ndarray, side: int) -> np.ndarray:
    """A 28x28 uint8 item resized (bilinear) to (side, side), as alpha in [0, 1] with values < ALPHA_THRESHOLD zeroed."""
    a = np.asarray(Image.fromarray(item).resize((side, side), Image.BILINEAR), dtype=np.float32) / 255.0
    a[a < ALPHA_THRESHOLD] = 0.0
    return a


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x, y, w, h) of the True pixels of a (H, W) mask, pixel-edge convention; None if there are none."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def _cover(inner: tuple[int, int, int, int], outer: tuple[int, int, int, int]) -> float:
    """Fraction of box ``inner`` (x, y, w, h) covered by box ``outer``."""
    ix = max(0, min(inner[0] + inner[2], outer[0] + outer[2]) - max(inner[0], outer[0]))
    iy = max(0, min(inner[1] + inner[3], outer[1] + outer[3]) - max(inner[1], outer[1]))
    return ix * iy / (inner[2] * inner[3])


def item_colour(rng: np.random.Generator) -> np.ndarray:
    """A flat bright item colour (3,) float32: hue uniform, saturation up to 0.6, value 0.75..1."""
    hue, sat, val = rng.uniform(0, 1), rng.uniform(0, 0.6), rng.uniform(0.75, 1.0)
    return np.asarray(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32)


def paste(out: np.ndarray, weights: list[np.ndarray], a: np.ndarray, x: int, y: int, colour: np.ndarray) -> None:
    """Blend one item on top of ``out`` (H, W, 3) in place and update the items' weights.

    ``a`` is the item's (s, s) alpha, (x, y) its top-left corner (inside the canvas), ``colour`` (3,) RGB. ``weights``
    holds one (H, W) map per earlier item, its share of each pixel's final colour, ``a_i * prod_{j > i} (1 - a_j)``;
    they are multiplied by ``1 - a`` and the new item's map (``a`` at its place) is appended.
    """
    s = a.shape[0]
    region = (slice(y, y + s), slice(x, x + s))
    out[region] = a[..., None] * colour + (1 - a[..., None]) * out[region]
    for w in weights:
        w[region] *= 1 - a
    w = np.zeros(out.shape[:2], dtype=np.float32)
    w[region] = a
    weights.append(w)


def composite(bg: np.ndarray, alphas: Sequence[np.ndarray], positions: Sequence[tuple[int, int]],
              colours: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Blend items over ``bg`` (H, W, 3) in order, later on top; returns the image and the items' (H, W) weights
    (see :func:`paste`)."""
    out, weights = bg.copy(), []
    for a, (x, y), colour in zip(alphas, positions, colours):
        paste(out, weights, a, x, y, colour)
    return out, weights


def render(rng: np.random.Generator, images: np.ndarray, pool: np.ndarray, labels: np.ndarray, canvas: int,
           scale: tuple[int, int], max_items: int) -> tuple[np.ndarray, list[tuple[int, int, int, int]], list[int]]:
    """One canvas: (canvas, canvas, 3) uint8, the visible boxes (x, y, w, h) and the labels (0..9) of its items.

    ``images`` (N, 28, 28) uint8 and ``labels`` (N,) are the Fashion-MNIST split, ``pool`` the indices to draw from.
    """
    out = background(rng, canvas)
    weights: list[np.ndarray] = []
    items, boxes = [], []
    for _ in range(int(rng.integers(1, max_items + 1))):
        index = int(pool[rng.integers(len(pool))])
        side = int(rng.integers(scale[0], scale[1] + 1))
        a = item_alpha(images[index], side)
        own = tight_box(a > 0)
        if own is None:
            continue
        for _ in range(PLACEMENT_TRIES):
            x, y = (int(v) for v in rng.integers(0, canvas - side + 1, 2))
            box = (x + own[0], y + own[1], own[2], own[3])
            if _fits(box, a, x, y, boxes, weights):
                break
        else:
            continue
        paste(out, weights, a, x, y, item_colour(rng))
        items.append(index)
        boxes.append(box)
    visible = [tight_box(w >= ALPHA_THRESHOLD) for w in weights]
    keep = [i for i, b in enumerate(visible) if b is not None]
    pixels = np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)
    return pixels, [visible[i] for i in keep], [int(labels[items[i]]) for i in keep]


def _fits(box: tuple[int, int, int, int], a: np.ndarray, x: int, y: int, boxes: list, weights: list) -> bool:
    """Whether a new item (alpha ``a`` at (x, y), tight box ``box``) keeps the overlap limits with earlier items."""
    s = a.shape[0]
    for i, earlier in enumerate(boxes):
        cover = _cover(earlier, box)
        if cover == 0:
            continue
        if cover > MAX_COVER:
            return False
        w = weights[i]
        before = int((w >= ALPHA_THRESHOLD).sum())
        region = w[y:y + s, x:x + s]
        lost = int(((region >= ALPHA_THRESHOLD) & (region * (1 - a) < ALPHA_THRESHOLD)).sum())
        if before - lost < MIN_VISIBLE * before:
            return False
    return True


def _params(split: str, num_images: int, seed: int, canvas: int, scale: tuple[int, int], max_items: int,
            classes: list[int], root: Path) -> dict:
    files = source_files(root, split)
    for f in files:
        if not f.is_file():
            raise DataNotFound(f"Fashion-MNIST file not found: {f} (install the Debian package "
                               "'dataset-fashion-mnist' or pass root=/--root a folder with the four idx .gz files)")
    return {"generator_version": GENERATOR_VERSION, "split": split, "num_images": num_images, "seed": seed,
            "canvas": canvas, "scale": list(scale), "max_items": max_items, "classes": classes,
            "alpha_threshold": ALPHA_THRESHOLD, "max_cover": MAX_COVER, "min_visible": MIN_VISIBLE,
            "source_sha256": {Path(f).name: sha256_file(Path(f)) for f in files}}


def source_files(root: Path, split: str) -> tuple[Path, Path]:
    """The Fashion-MNIST idx files (images, labels) of ``split`` under ``root``."""
    prefix = "train" if split == "train" else "t10k"
    return root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"


def images_hash(folder: Path, names: Sequence[str]) -> str | None:
    """SHA-256 over the files' SHA-256s in order; None if one is missing."""
    h = hashlib.sha256()
    for name in names:
        path = folder / name
        if not path.is_file():
            return None
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def _up_to_date(manifest: Path, params: dict, annotations: Path, images_dir: Path) -> dict | None:
    """The manifest if the split on disk matches ``params`` and its recorded hashes, else None."""
    if not manifest.is_file() or not annotations.is_file():
        return None
    try:
        recorded = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return None
    if recorded.get("params") != params or recorded.get("annotations_sha256") != sha256_file(annotations):
        return None
    names = [f"{i:06d}.png" for i in range(1, params["num_images"] + 1)]
    return recorded if recorded.get("images_sha256") == images_hash(images_dir, names) else None


def write_json(path: Path, data: dict) -> None:
    """Compact JSON, written to a temporary file then renamed (a killed run never leaves half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    os.replace(tmp, path)


def generate(out_dir: str | Path, split: str, num_images: int, seed: int, canvas: int = 128,
             scale: tuple[int, int] = (16, 64), max_items: int = 6, classes: Sequence[str | int] | None = None,
             root: str | Path | None = None) -> CanvasSplit:
    """Write (or find up to date) one split of detection canvases; see the module docstring.

    Args:
        out_dir: output root (``<split>/``, ``annotations/instances_<split>.json``, ``manifest_<split>.json``).
        split: ``train`` (Fashion-MNIST train items) or ``test`` (its test items).
        num_images: canvases to write (image ids 1..num_images).
        seed: base seed.
        canvas: canvas side in pixels.
        scale: (min, max) side of a pasted 28x28 item in pixels, inclusive.
        max_items: at most this many items per canvas (at least one).
        classes: paste only these categories (names or ids 1..10); the JSON still lists all ten.
        root: Fashion-MNIST folder (default the Debian package's).
    """
    if split not in SPLITS:
        raise CanvasError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if num_images < 1 or max_items < 1:
        raise CanvasError(f"num_images and max_items must be at least 1, got {num_images} and {max_items}")
    scale = (int(scale[0]), int(scale[1]))
    if not 1 <= scale[0] <= scale[1] <= canvas:
        raise CanvasError(f"scale must satisfy 1 <= min <= max <= canvas ({canvas}), got {scale}")
    cat_ids = resolve_classes(classes)
    out_dir, root = Path(out_dir), Path(root if root is not None else FASHION_MNIST_DIR)
    images_dir, manifest = out_dir / split, out_dir / f"manifest_{split}.json"
    annotations = out_dir / "annotations" / f"instances_{split}.json"
    params = _params(split, num_images, seed, canvas, scale, max_items, cat_ids, root)
    recorded = _up_to_date(manifest, params, annotations, images_dir)
    if recorded is not None:
        return CanvasSplit(images_dir, annotations, num_images, recorded["num_annotations"], skipped=True)

    source = FashionMNISTSource(root, split=split)
    pool = np.flatnonzero(np.isin(source.labels, np.asarray(cat_ids) - 1))
    manifest.unlink(missing_ok=True)
    images_dir.mkdir(parents=True, exist_ok=True)
    annotations.parent.mkdir(parents=True, exist_ok=True)
    coco = {"info": {"description": "Fashion-MNIST detection canvases (florence.benchmarks.detection_canvas)",
                     "params": {k: v for k, v in params.items() if k != "source_sha256"}},
            "images": [], "annotations": [], "categories": CATEGORIES}
    digest = hashlib.sha256()
    for image_id in range(1, num_images + 1):
        rng = np.random.default_rng([seed, SPLITS[split], image_id])
        pixels, boxes, labels = render(rng, source.images, pool, source.labels, canvas, scale, max_items)
        name = f"{image_id:06d}.png"
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
        data = buffer.getvalue()
        (images_dir / name).write_bytes(data)
        digest.update(hashlib.sha256(data).digest())
        coco["images"].append({"id": image_id, "file_name": name, "width": canvas, "height": canvas})
        for box, label in zip(boxes, labels):
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id,
                                        "category_id": label + 1, "bbox": list(box), "area": box[2] * box[3],
                                        "iscrowd": 0})
    _remove_stale(images_dir, num_images)
    write_json(annotations, coco)
    write_json(manifest, {"params": params, "annotations_sha256": sha256_file(annotations),
                           "images_sha256": digest.hexdigest(), "num_annotations": len(coco["annotations"])})
    return CanvasSplit(images_dir, annotations, num_images, len(coco["annotations"]), skipped=False)


def _remove_stale(images_dir: Path, num_images: int) -> None:
    """Delete canvases ``<id:06d>.png`` left by an earlier, larger run (ids above ``num_images``)."""
    for path in images_dir.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png"):
        if int(path.stem) > num_images:
            path.unlink()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m florence.benchmarks.detection_canvas",
                                description="Write Fashion-MNIST detection canvases with COCO annotations.")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--train", type=int, default=5000, help="train canvases (0: none)")
    p.add_argument("--test", type=int, default=500, help="test canvases (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--canvas", type=int, default=128, help="canvas side in pixels")
    p.add_argument("--scale", type=int, nargs=2, default=(16, 64), metavar=("MIN", "MAX"),
                   help="side of a pasted 28x28 item in pixels")
    p.add_argument("--max-items", type=int, default=6)
    p.add_argument("--train-classes", default=None,
                   help="comma-separated class names or ids 1..10 pasted in train canvases (default all)")
    p.add_argument("--test-classes", default=None, help="the same for test canvases")
    p.add_argument("--root", type=Path, default=Path(FASHION_MNIST_DIR), help="Fashion-MNIST idx folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for split, count, classes in (("train", args.train, args.train_classes),
                                      ("test", args.test, args.test_classes)):
            if count <= 0:
                continue
            chosen = None if classes is None else [c for c in classes.split(",") if c.strip()]
            done = generate(args.out, split, count, args.seed, canvas=args.canvas, scale=tuple(args.scale),
                            max_items=args.max_items, classes=chosen, root=args.root)
            state = "up to date" if done.skipped else "written"
            print(f"{split}: {done.num_images} images, {done.num_annotations} boxes {state} "
                  f"({done.images_dir}, {done.annotations})")
    except FlorenceError as err:
        print(f"detection_canvas: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
