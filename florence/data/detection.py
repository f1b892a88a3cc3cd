"""COCO-format detection data: the dataset, the endless resumable training stream and the evaluation loader.

**Dataset.** :class:`CocoDetection` reads an instances JSON (COCO, Objects365 and LVIS exports: ``images`` with ``id``,
``file_name`` (LVIS: ``coco_url``, whose path after the host is used, as mmdet's ``LVISV1Dataset``), ``height``,
``width``; ``categories`` with ``id``, ``name``; ``annotations`` with ``image_id``, ``category_id``, ``bbox``
[x, y, w, h] and optional ``iscrowd`` / ``ignore``; an image-info file without ``annotations``, such as test-dev, has
no boxes).
Categories sorted by id become the contiguous labels ``0..K-1`` (``cat_ids[k]`` is label k's COCO id, SPEC §10.2
item 15); images are ordered by id. Boxes become xyxy in original pixels. Annotation problems never stop the run; each
is counted by reason (:meth:`CocoDetection.summary`, with the first few files and annotation ids):

==============================================  ================================================================
``annotation marked ignore``                    ``ignore: true`` (mmdet skips these too): dropped
``annotation for an unknown image id``          dropped
``unknown category id``                         dropped
``degenerate box``                              w or h <= 0, or a non-finite value: dropped
``box outside the image``                       no overlap with the image: dropped
``box clipped to the image``                    partly outside: clipped to ``[0, width] x [0, height]``, kept
``box of a class outside class_subset``         dropped (zero-shot splits: train on some classes only)
``crowd box set apart``                         ``iscrowd``: kept apart in ``crowd_boxes``, never a training target
                                                (COCO evaluation reads crowd regions from the JSON itself)
``image without boxes``                         ``filter_empty=True`` (mmdet ``filter_empty_gt``): image dropped
``missing image file``                          ``validate_images=True``: image dropped at construction
==============================================  ================================================================

An image that cannot be read at load time (missing, corrupt, or of another size than the JSON says) is a
:class:`~florence.data.images.BadSample` handled by the bad-sample policy (:mod:`florence.data.bad_samples`): training
replaces it by the next image (counted and logged to ``<run_dir>/bad_samples.jsonl``), evaluation leaves it out
(the evaluation loader's ``report()``). A JSON that cannot be read, or an entry without a required key, is a one-line
:class:`~florence.data.errors.DataFileError` naming the file, the entry and the key.

**Training stream** (``build_detection_train_loader``; the ``data:`` section of a detection run)::

    annotations: instances_train2017.json   # required
    images: train2017/                      # required: file_name is relative to it
    batch_size: 2                           # per rank (required here; the engine sets it)
    seed: 0
    num_workers: 2
    scale: [1333, 800]                      # [long, short] keep-ratio resize (mmdet Resize(scale=..., keep_ratio))
    scales: [[1333, 640], [1333, 800]]      # or: one chosen uniformly per image (mmdet RandomChoiceResize)
    short_range: [480, 1200]                # or: short side uniform in lo..hi, long side <= scale[0] (RandomResize)
    flip: 0.5                               # horizontal flip probability
    size_divisor: 128                       # pad each batch to a multiple of this
    filter_empty: true                      # drop images without (non-crowd) boxes
    class_subset: null                      # [names or COCO ids]: train on these classes only
    class_agnostic: false                   # every label 0 (one class "object")
    on_bad_sample: skip                     # skip | raise
    max_images: null                        # the first N images (by id) only
    max_bad_retries: 16                     # consecutive unreadable images tolerated before an error
    pin_memory: false
    prefetch_factor: null
    run_dir: null

The stream is the florence training stream (:mod:`florence.data.mixing` with one source): endless, a seeded
permutation of the images per epoch, global batch ``k`` split over ranks, each image's random draws (scale, flip)
seeded by its stream position, and ``state_dict`` / ``load_state_dict`` continuing with exactly the next batch.

**Batches** (dict of tensors, batch first; SPEC detector API)::

    images        (B, 3, Hp, Wp) float32  normalised, zero-padded bottom/right to a multiple of size_divisor
    image_sizes   (B, 2) int64            (h, w) of each resized image before padding
    boxes         (B, M, 4) float32       xyxy in resized pixels; rows past an image's boxes are 0 (M >= 1)
    labels        (B, M) int64            contiguous class index, -1 on padding rows
    # evaluation batches (detection_eval_loader) also carry:
    image_ids     (B,) int64              COCO image ids
    scale_factors (B, 2) float32          (sy, sx) = resized / original: original box = box / (sx, sy, sx, sy)
    orig_sizes    (B, 2) int64            (H, W) of the original images
    flipped       (B,) bool               the view is flipped (x_orig = w - x in the resized frame)
"""
from __future__ import annotations

import functools
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from florence.data.bad_samples import BadSampleLog
from florence.data.detection_transforms import DetectionTransform, pad_images
from florence.data.errors import DataConfigError, DataFileError, DataNotFound
from florence.data.eval_loader import BatchEvalLoader
from florence.data.images import BadSample, decode_image
from florence.data.json_columns import Strings, column, duplicate_id, int_column, lookup, object_list
from florence.data.loader import RetryingDataset, TrainLoader, stream_bad_log
from florence.data.schema import STREAM_SCHEMA, Check, _bool, _check_keys, _int, _is_int, _number, _optional, _path

logger = logging.getLogger("florence.data")

DEFAULT_SCALE = (1333, 800)
MAX_EXAMPLES = 20  # listed examples per reason (all are counted)
AGNOSTIC_NAME, AGNOSTIC_ID = "object", 1  # the single class of class_agnostic=True


# --- the dataset --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectionRecord:
    """One image's annotations: boxes xyxy in original pixels (clipped to the image), contiguous labels."""

    index: int
    image_id: int
    file: Path
    height: int
    width: int
    boxes: np.ndarray  # n, 4 float32
    labels: np.ndarray  # n int64
    crowd_boxes: np.ndarray  # c, 4 float32
    crowd_labels: np.ndarray  # c int64


@dataclass
class DetectionSummary:
    """What :class:`CocoDetection` kept and skipped. ``counts``: per reason (see the module docstring); ``examples``:
    ``{"file", "reason"}`` of the first ``MAX_EXAMPLES`` per reason."""

    file: str
    images_in_file: int
    images: int
    boxes: int
    crowd_boxes: int
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)

    def format(self) -> str:
        """One line: ``instances.json: 4 of 5 images, 9 boxes, 1 crowd boxes [degenerate box: 1, ...]``."""
        notes = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items(), key=lambda kv: -kv[1]))
        return (f"{self.file}: {self.images} of {self.images_in_file} images, {self.boxes} boxes, "
                f"{self.crowd_boxes} crowd boxes" + (f" [{notes}]" if notes else ""))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataNotFound(f"{path}: annotation file not found") from None
    except IsADirectoryError:
        raise DataFileError(f"{path}: is a folder, expected an instances JSON file") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataFileError(f"{path}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise DataFileError(f"{path}: not UTF-8 JSON text") from None
    if not isinstance(data, dict):
        raise DataFileError(f"{path}: expected a JSON object with images, annotations and categories, "
                            f"got a {type(data).__name__}")
    return data


def _boxes_column(entries: list[dict], file: Path) -> np.ndarray:
    """``bbox`` of every annotation -> (n, 4) float64 [x, y, w, h]; NaN / inf pass (they are degenerate boxes)."""
    values = column(entries, "bbox", file, "annotations")
    try:
        boxes = np.asarray(values, dtype=np.float64)
        if boxes.shape != (len(values), 4) and not (len(values) == 0 and boxes.size == 0):
            raise ValueError
    except (ValueError, TypeError):
        for i, v in enumerate(values):
            ok = isinstance(v, (list, tuple)) and len(v) == 4 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
            if not ok:
                raise DataFileError(f"{file}: annotations[{i}].bbox: expected [x, y, width, height], "
                                    f"got {v!r}") from None
        raise
    return boxes.reshape(-1, 4)


def _image_names(entries: list[dict], file: Path) -> list[str]:
    """``file_name`` of each image, else the path of its ``coco_url`` after the host (LVIS)."""
    names = []
    for i, e in enumerate(entries):
        name = e.get("file_name")
        if name is None and isinstance(e.get("coco_url"), str):
            name = urlparse(e["coco_url"]).path.lstrip("/")
        if name is None:
            raise DataFileError(f"{file}: images[{i}]: missing key 'file_name'")
        if not isinstance(name, str) or not name:
            raise DataFileError(f"{file}: images[{i}].file_name: expected a file name, got {name!r}")
        names.append(name)
    return names


class CocoDetection:
    """A COCO-format instances JSON plus its image folder (see the module docstring for the rules).

    Args:
        annotations: the instances JSON file.
        images: the folder that ``file_name`` is relative to.
        class_subset: names or COCO category ids to keep (labels then index this subset, sorted by id); boxes of
            other classes are dropped (counted).
        class_agnostic: one class: every label 0, ``class_names == ["object"]``, ``cat_ids == [1]``.
        filter_empty: drop images left without a (non-crowd) box (training; evaluation keeps them).
        max_images: keep the first ``max_images`` images by id (after filtering).
        validate_images: check at construction that every image file exists (one ``stat`` each).
        name: the dataset's name in bad-sample logs (default: the annotation file's stem).

    Attributes:
        class_names, cat_ids: per contiguous label, its name and COCO category id; ``num_classes`` = their count.
        image_ids: ``(N,)`` int64, sorted; ``sizes``: ``(N, 2)`` int64 (height, width) from the JSON.
    """

    def __init__(self, annotations: str | Path, images: str | Path, *, class_subset: Sequence[str | int] | None = None,
                 class_agnostic: bool = False, filter_empty: bool = False, max_images: int | None = None,
                 validate_images: bool = False, name: str | None = None):
        self.annotations_file = Path(annotations)
        self.images_dir = Path(images)
        self.name = name or self.annotations_file.stem
        self.class_agnostic = bool(class_agnostic)
        data = _read_json(self.annotations_file)
        if not self.images_dir.is_dir():
            raise DataNotFound(f"{self.images_dir}: image folder not found (images of {self.annotations_file})")
        self._counts: Counter[str] = Counter()
        self._examples: list[dict[str, str]] = []
        self._parse_categories(data, class_subset)
        image_ids, names, sizes = self._parse_images(data)
        boxes, labels, crowd, img_of = self._parse_annotations(data, image_ids, names, sizes)
        keep = self._select_images(image_ids, names, img_of[~crowd], filter_empty, max_images, validate_images)
        new_index = np.full(len(image_ids), -1, dtype=np.int64)
        new_index[keep] = np.arange(len(keep))
        self.image_ids = image_ids[keep]  # N
        self.sizes = sizes[keep]  # N, 2
        self._files = Strings([names[i] for i in keep])
        self._boxes, self._labels, self._ptr = _group(boxes[~crowd], labels[~crowd], new_index[img_of[~crowd]],
                                                      len(keep))
        self._crowd_boxes, self._crowd_labels, self._crowd_ptr = _group(boxes[crowd], labels[crowd],
                                                                        new_index[img_of[crowd]], len(keep))
        self._images_in_file = len(image_ids)
        if any(k not in ("box clipped to the image", "crowd box set apart") for k in self._counts):
            logger.warning("%s", self.summary().format())

    # -- parsing ------------------------------------------------------------------------------------------------

    def _parse_categories(self, data: dict, class_subset: Sequence[str | int] | None) -> None:
        file = self.annotations_file
        cats = object_list(data, "categories", file)
        ids = int_column(cats, "id", file, "categories")
        names = column(cats, "name", file, "categories")
        order = np.argsort(ids, kind="stable")
        ids, names = ids[order], [str(names[i]) for i in order]
        dup = duplicate_id(ids)
        if dup is not None:
            raise DataFileError(f"{file}: categories: id {dup} appears twice")
        self._all_cat_ids = ids  # every category of the file, sorted
        if class_subset is not None:
            wanted = set()
            for value in class_subset:
                if _is_int(value):
                    if value not in set(ids.tolist()):
                        raise DataConfigError(f"class_subset: category id {value} is not in {file}")
                    wanted.add(int(value))
                else:
                    hits = [int(i) for i, n in zip(ids, names) if n == value]
                    if not hits:
                        raise DataConfigError(f"class_subset: class name {value!r} is not among the {len(names)} "
                                              f"categories of {file}")
                    wanted.update(hits)
            chosen = np.array([i in wanted for i in ids.tolist()], dtype=bool)
            ids, names = ids[chosen], [n for n, c in zip(names, chosen) if c]
        self._cat_ids = ids  # K sorted: the kept categories
        self.categories = [{"id": int(i), "name": n} for i, n in zip(ids, names)]
        self.cat_ids = [AGNOSTIC_ID] if self.class_agnostic else [int(i) for i in ids]
        self.class_names = [AGNOSTIC_NAME] if self.class_agnostic else list(names)

    def _parse_images(self, data: dict) -> tuple[np.ndarray, list[str], np.ndarray]:
        file = self.annotations_file
        entries = object_list(data, "images", file)
        ids = int_column(entries, "id", file, "images")
        names = _image_names(entries, file)
        sizes = np.stack([int_column(entries, "height", file, "images", 1),
                          int_column(entries, "width", file, "images", 1)], axis=1).reshape(-1, 2)  # n, 2
        order = np.argsort(ids, kind="stable")
        ids, sizes, names = ids[order], sizes[order], [names[i] for i in order]
        dup = duplicate_id(ids)
        if dup is not None:
            raise DataFileError(f"{file}: images: id {dup} appears twice")
        return ids, names, sizes

    def _parse_annotations(self, data: dict, image_ids: np.ndarray, names: list[str],
                           sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Clean boxes: ``(boxes (m, 4) float32 xyxy, labels (m,), crowd (m,) bool, image position (m,))``."""
        file = self.annotations_file
        anns = object_list(data, "annotations", file, required=False)
        img, img_found = lookup(image_ids, int_column(anns, "image_id", file, "annotations"))  # n
        cat_ids = int_column(anns, "category_id", file, "annotations")  # n
        cat, cat_found = lookup(self._all_cat_ids, cat_ids)
        xywh = _boxes_column(anns, file)  # n, 4
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)  # n
        ignored = np.array([bool(a.get("ignore", False)) for a in anns], dtype=bool)  # n
        alive = np.ones(len(anns), dtype=bool)

        def note(mask: np.ndarray, reason: str, drop: bool = True) -> None:
            mask = mask & alive
            for i in np.nonzero(mask)[0][:MAX_EXAMPLES]:
                where = str(self.images_dir / names[img[i]]) if img_found[i] else str(file)
                ann_id = anns[i].get("id", "?")
                self._examples.append({"file": where, "reason": f"{reason} (annotations[{i}], id {ann_id}, "
                                                                  f"bbox {anns[i]['bbox']})"})
            if mask.any():
                self._counts[reason] += int(mask.sum())
            if drop:
                alive[mask] = False

        note(ignored, "annotation marked ignore")
        note(~img_found, "annotation for an unknown image id")
        note(~cat_found, "unknown category id")
        with np.errstate(invalid="ignore"):
            finite = np.isfinite(xywh).all(axis=1)
            note(~(finite & (xywh[:, 2] > 0) & (xywh[:, 3] > 0)), "degenerate box")
            xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)  # n, 4
            padded = np.concatenate([sizes, np.zeros((1, 2), dtype=sizes.dtype)])  # unknown image: size 0
            height, width = padded[np.where(img_found, img, len(sizes))].T  # n each
            clipped = np.stack([xyxy[:, 0].clip(0, width), xyxy[:, 1].clip(0, height),
                                xyxy[:, 2].clip(0, width), xyxy[:, 3].clip(0, height)], axis=1)  # n, 4
            note((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1]), "box outside the image")
            note((clipped != xyxy).any(axis=1), "box clipped to the image", drop=False)
        label, in_subset = lookup(self._cat_ids, cat_ids)
        note(~in_subset, "box of a class outside class_subset")
        note(crowd, "crowd box set apart", drop=False)
        if self.class_agnostic:
            label = np.zeros_like(label)
        return (clipped[alive].astype(np.float32), label[alive].astype(np.int64), crowd[alive], img[alive])

    def _select_images(self, image_ids: np.ndarray, names: list[str], img_of_box: np.ndarray, filter_empty: bool,
                       max_images: int | None, validate_images: bool) -> np.ndarray:
        """Positions of the kept images (sorted by id)."""
        keep = np.ones(len(image_ids), dtype=bool)
        if filter_empty:
            empty = np.bincount(img_of_box, minlength=len(image_ids)) == 0
            self._note_images(np.nonzero(empty)[0], names, "image without boxes")
            keep &= ~empty
        if validate_images:
            missing = np.array([k and not (self.images_dir / n).is_file() for k, n in zip(keep, names)], dtype=bool)
            self._note_images(np.nonzero(missing)[0], names, "missing image file")
            keep &= ~missing
        positions = np.nonzero(keep)[0]
        return positions[:max_images] if max_images is not None else positions

    def _note_images(self, positions: np.ndarray, names: list[str], reason: str) -> None:
        if len(positions):
            self._counts[reason] += len(positions)
        for i in positions[:MAX_EXAMPLES]:
            self._examples.append({"file": str(self.images_dir / names[i]), "reason": reason})

    # -- access -------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def record(self, index: int) -> DetectionRecord:
        """Image ``index`` (0..N-1, in id order) and its boxes."""
        box = slice(int(self._ptr[index]), int(self._ptr[index + 1]))
        crowd = slice(int(self._crowd_ptr[index]), int(self._crowd_ptr[index + 1]))
        return DetectionRecord(index=index, image_id=int(self.image_ids[index]),
                               file=self.images_dir / self._files[index], height=int(self.sizes[index, 0]),
                               width=int(self.sizes[index, 1]), boxes=self._boxes[box], labels=self._labels[box],
                               crowd_boxes=self._crowd_boxes[crowd], crowd_labels=self._crowd_labels[crowd])

    def index_of(self, image_id: int) -> int:
        pos = int(np.searchsorted(self.image_ids, image_id))
        if pos >= len(self.image_ids) or int(self.image_ids[pos]) != int(image_id):
            raise KeyError(f"image id {image_id} is not in {self.annotations_file} (or was filtered out)")
        return pos

    def image_path(self, image_id: int) -> Path:
        return self.record(self.index_of(image_id)).file

    def annotations(self, image_id: int) -> dict[str, torch.Tensor]:
        """``dict(boxes (n, 4) float32 xyxy original pixels, labels (n,) int64, crowd_boxes (c, 4), crowd_labels)``."""
        rec = self.record(self.index_of(image_id))
        return {"boxes": torch.from_numpy(rec.boxes), "labels": torch.from_numpy(rec.labels),
                "crowd_boxes": torch.from_numpy(rec.crowd_boxes), "crowd_labels": torch.from_numpy(rec.crowd_labels)}

    def load(self, index: int) -> tuple[Image.Image, DetectionRecord]:
        """The decoded RGB image and its record; :class:`BadSample` (file and reason) when the image is missing,
        corrupt, or not of the size the JSON gives (its boxes would not fit it)."""
        rec = self.record(index)
        image = decode_image(rec.file)
        if image.size != (rec.width, rec.height):
            raise BadSample(str(rec.file), f"image size differs from the annotation (annotated {rec.height}x"
                                           f"{rec.width}, file {image.height}x{image.width})")
        return image, rec

    def summary(self) -> DetectionSummary:
        return DetectionSummary(file=str(self.annotations_file), images_in_file=self._images_in_file,
                                images=len(self), boxes=len(self._boxes), crowd_boxes=len(self._crowd_boxes),
                                counts=dict(self._counts), examples=list(self._examples))

    def coco_json(self) -> dict[str, Any]:
        """The ground truth for COCO evaluation, re-read from the file: the kept images, the kept categories and
        all their annotations as written (crowd regions included; ``iscrowd`` defaults to 0 and ``area`` to
        ``w * h`` where an export leaves them out)."""
        data = _read_json(self.annotations_file)
        kept_images, kept_cats = set(self.image_ids.tolist()), set(self._cat_ids.tolist())
        images = [e for e in data["images"] if e["id"] in kept_images]
        anns = [{"iscrowd": 0, "area": float(a["bbox"][2]) * float(a["bbox"][3]), **a}
                for a in data.get("annotations", []) if a["image_id"] in kept_images and a["category_id"] in kept_cats]
        cats = [c for c in data["categories"] if c["id"] in kept_cats]
        return {"images": images, "annotations": anns, "categories": cats}

    def __repr__(self) -> str:
        return (f"CocoDetection({self.annotations_file}, {len(self)} images, {self.num_classes} classes, "
                f"{len(self._boxes)} boxes)")


def _group(boxes: np.ndarray, labels: np.ndarray, image: np.ndarray,
           num_images: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes of kept images (``image >= 0``) sorted by image, and the ``(num_images + 1,)`` offsets of each image's
    run: image i's boxes are ``boxes[ptr[i]:ptr[i + 1]]``."""
    kept = image >= 0
    boxes, labels, image = boxes[kept], labels[kept], image[kept]
    order = np.argsort(image, kind="stable")
    counts = np.bincount(image, minlength=num_images)  # num_images
    return boxes[order], labels[order], np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


# --- samples and batches ------------------------------------------------------------------------------------------


def load_sample(coco: CocoDetection, index: int, transform: DetectionTransform,
                rng: np.random.Generator) -> dict[str, Any]:
    """Image ``index`` decoded and transformed: ``dict(image (3, h, w), boxes (n, 4), labels (n,), image_id,
    orig_size (H, W), scale_factor (sy, sx), flipped)``; raises :class:`BadSample`."""
    image, rec = coco.load(index)
    x, boxes, factors, flipped = transform(image, torch.from_numpy(rec.boxes), rng)
    return {"image": x, "boxes": boxes, "labels": torch.from_numpy(rec.labels), "image_id": rec.image_id,
            "orig_size": (rec.height, rec.width), "scale_factor": factors, "flipped": flipped}


def collate_detection(samples: Sequence[dict[str, Any]], *, size_divisor: int = 128,
                      eval: bool = False) -> dict[str, torch.Tensor]:
    """``[sample] * B`` (from :func:`load_sample`) -> the batch of the module docstring; ``eval`` adds
    ``image_ids``, ``scale_factors``, ``orig_sizes`` and ``flipped``."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    images = [s["image"] for s in samples]
    most = max(1, max(len(s["boxes"]) for s in samples))
    boxes = torch.zeros(len(samples), most, 4, dtype=torch.float32)  # B, M, 4
    labels = torch.full((len(samples), most), -1, dtype=torch.int64)  # B, M
    for i, s in enumerate(samples):
        boxes[i, : len(s["boxes"])] = s["boxes"]
        labels[i, : len(s["labels"])] = s["labels"]
    batch = {"images": pad_images(images, size_divisor),  # B, 3, Hp, Wp
             "image_sizes": torch.tensor([list(im.shape[-2:]) for im in images], dtype=torch.int64),  # B, 2
             "boxes": boxes, "labels": labels}
    if eval:
        batch.update(image_ids=torch.tensor([s["image_id"] for s in samples], dtype=torch.int64),  # B
                     scale_factors=torch.tensor([s["scale_factor"] for s in samples], dtype=torch.float32),  # B, 2
                     orig_sizes=torch.tensor([s["orig_size"] for s in samples], dtype=torch.int64),  # B, 2
                     flipped=torch.tensor([s["flipped"] for s in samples], dtype=torch.bool))  # B
    return batch


def detection_inputs(images: Sequence[Image.Image | torch.Tensor], preprocess: dict[str, Any], *,
                     scale: Sequence[int] = DEFAULT_SCALE, size_divisor: int = 128,
                     flip: bool = False) -> dict[str, torch.Tensor]:
    """Model inputs for images without annotations (``florence detect``): ``dict(images (B, 3, Hp, Wp),
    image_sizes (B, 2), scale_factors (B, 2) (sy, sx), orig_sizes (B, 2))``."""
    transform = DetectionTransform(preprocess, scale=scale)
    out, factors, orig = [], [], []
    for image in images:
        x, _, f = transform.apply(image, torch.zeros(0, 4), transform.scale, flip)
        out.append(x)
        factors.append(f)
        orig.append((image.height, image.width) if isinstance(image, Image.Image) else tuple(image.shape[-2:]))
    return {"images": pad_images(out, size_divisor),  # B, 3, Hp, Wp
            "image_sizes": torch.tensor([list(x.shape[-2:]) for x in out], dtype=torch.int64),  # B, 2
            "scale_factors": torch.tensor(factors, dtype=torch.float32),  # B, 2
            "orig_sizes": torch.tensor(orig, dtype=torch.int64)}  # B, 2


# --- training stream ----------------------------------------------------------------------------------------------


class DetectionTrainDataset(RetryingDataset):
    """The training stream's images (one source, ``coco``); an unreadable image is replaced by the next one
    (:class:`~florence.data.loader.RetryingDataset`)."""

    def __init__(self, coco: CocoDetection, transform: DetectionTransform, bad: BadSampleLog, *,
                 max_bad_retries: int = 16):
        super().__init__([coco], bad, max_bad_retries=max_bad_retries)
        self.transform = transform

    @property
    def coco(self) -> CocoDetection:
        return self.sources[0]

    def load(self, source_id: int, index: int, seed: int, attempt: int) -> dict[str, Any]:
        # the draws depend on the seed only, so a replacement looks the same in every run
        return load_sample(self.coco, index, self.transform, np.random.default_rng(seed))


class DetectionTrainLoader(TrainLoader):
    """:class:`~florence.data.loader.TrainLoader` over a :class:`DetectionTrainDataset`: endless, resumable
    (``state_dict`` / ``load_state_dict``), ``bad_sample_summary()`` for unreadable images and
    ``annotation_summary()`` for what the dataset skipped while reading the JSON."""

    @property
    def coco(self) -> CocoDetection:
        return self.dataset.coco

    def annotation_summary(self) -> DetectionSummary:
        return self.dataset.coco.summary()


def _scale_pair(v: Any) -> str | None:
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v):
        return None
    return "expected [long, short], two positive integers"


def _scale_list(v: Any) -> str | None:
    if isinstance(v, (list, tuple)) and v and all(_scale_pair(s) is None for s in v):
        return None
    return "expected a non-empty list of [long, short] pairs"


def _short_range(v: Any) -> str | None:
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(x) for x in v) and 0 < v[0] <= v[1]:
        return None
    return "expected [lo, hi], integers with 0 < lo <= hi"


def _class_subset(v: Any) -> str | None:
    if v is None or (isinstance(v, (list, tuple)) and v and all(
            (_is_int(c) or (isinstance(c, str) and c.strip())) for c in v)):
        return None
    return "expected a non-empty list of class names or COCO category ids"


DETECTION_SCHEMA: dict[str, Check] = {
    **STREAM_SCHEMA,
    "annotations": _path,
    "images": _path,
    "scale": _scale_pair,
    "scales": _scale_list,
    "short_range": _short_range,
    "flip": _number(0.0, 1.0),
    "size_divisor": _int(1),
    "filter_empty": _bool,
    "class_subset": _class_subset,
    "class_agnostic": _bool,
    "max_images": _optional(_int(1)),
}


def validate_detection_data(data: Any, key: str = "data") -> None:
    """Check a detection ``data:`` section (module docstring) without reading any data; raises
    :class:`~florence.data.errors.DataConfigError` whose message starts with the dotted key
    (``data.short_range: expected [lo, hi], ...``). ``batch_size`` is optional here (the engine sets it)."""
    if not isinstance(data, dict):
        raise DataConfigError(f"{key}: expected a mapping, got {data!r}")
    _check_keys(data, DETECTION_SCHEMA, key)
    for required in ("annotations", "images"):
        if required not in data:
            raise DataConfigError(f"{key}.{required}: required (the instances JSON and its image folder)")
    if data.get("scales") is not None and data.get("short_range") is not None:
        raise DataConfigError(f"{key}.short_range: give scales or short_range, not both")


def build_detection_train_loader(config: dict[str, Any], *, preprocess: dict[str, Any], rank: int = 0,
                                 world_size: int = 1, run_dir: str | Path | None = None) -> DetectionTrainLoader:
    """The training stream of rank ``rank`` of ``world_size`` from a detection ``data:`` section (module
    docstring); validates it first. Empty after filtering -> :class:`DataFileError`."""
    validate_detection_data(config)
    if "batch_size" not in config:
        raise DataConfigError("data.batch_size: required (per rank)")
    coco = CocoDetection(config["annotations"], config["images"], class_subset=config.get("class_subset"),
                         class_agnostic=config.get("class_agnostic", False),
                         filter_empty=config.get("filter_empty", True), max_images=config.get("max_images"))
    if len(coco) == 0:
        raise DataFileError(f"{coco.annotations_file}: no training images left ({coco.summary().format()})")
    transform = DetectionTransform(preprocess, scale=config.get("scale", DEFAULT_SCALE), scales=config.get("scales"),
                                   short_range=config.get("short_range"), flip=config.get("flip", 0.5))
    dataset = DetectionTrainDataset(coco, transform, stream_bad_log(config, rank=rank, run_dir=run_dir),
                                    max_bad_retries=config.get("max_bad_retries", 16))
    collate = functools.partial(collate_detection, size_divisor=int(config.get("size_divisor", 128)))
    return DetectionTrainLoader.for_dataset(dataset, [1.0], config, collate_fn=collate, rank=rank,
                                            world_size=world_size)


# --- evaluation loader --------------------------------------------------------------------------------------------


class _EvalImages(Dataset):
    """``dataset[i]`` -> a sample of image ``i`` (no random draws); raises :class:`BadSample` for an unusable one."""

    def __init__(self, coco: CocoDetection, transform: DetectionTransform):
        self.coco = coco
        self.transform = transform

    def __len__(self) -> int:
        return len(self.coco)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return load_sample(self.coco, index, self.transform, np.random.default_rng(0))  # BadSample: skipped


def detection_eval_loader(dataset: CocoDetection, preprocess: dict[str, Any], scale: Sequence[int] = DEFAULT_SCALE,
                          size_divisor: int = 128, batch_size: int = 1, flip: bool = False, *, num_workers: int = 0,
                          on_bad_sample: str = "skip") -> BatchEvalLoader:
    """Deterministic evaluation batches (module docstring) of ``dataset`` in image order at one test ``scale`` (every
    image flipped with ``flip``); unreadable images are left out, counted and listed by ``report()``
    (:class:`~florence.data.eval_loader.BatchEvalLoader`)."""
    transform = DetectionTransform(preprocess, scale=scale, flip=1.0 if flip else 0.0)
    collate = functools.partial(collate_detection, size_divisor=int(size_divisor), eval=True)
    return BatchEvalLoader(_EvalImages(dataset, transform), collate, batch_size=batch_size, num_workers=num_workers,
                           on_bad_sample=on_bad_sample, name=dataset.name)
