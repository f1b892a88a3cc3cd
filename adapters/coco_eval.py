"""COCO box mAP of a detections list against COCO-format annotations (SPEC §9.2), with faster-coco-eval (default) or
pycocotools (the reference; both give the same 12 stats).

``evaluate_detections(annotations, detections)`` returns the 12 COCO summary stats under the names ``AP`` (IoU
.50:.95), ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl``, ``AR1``, ``AR10``, ``AR100``, ``ARs``, ``ARm``, ``ARl`` (in
``COCOeval.stats`` order; maxDets 100 unless named), ``AR50`` / ``AR75`` (recall at IoU .5 / .75, maxDets 100, all
areas, averaged over categories from ``eval["recall"]``) and ``per_class_AP`` (category name -> AP over IoU .50:.95,
maxDets 100, all areas, from ``eval["precision"]``, as detectron2's per-category table). As in ``COCOeval``, a value
is -1 where it is undefined (no ground truth in that area range or category); with no detections at all every
defined value is 0.

The detections (a list or a JSON file of a list) are COCO results: ``{"image_id", "category_id", "bbox": [x, y, w,
h] in original-image pixels, "score"}`` with the annotation file's image and category ids (SPEC §10.2 item 15:
contiguous class indices must be mapped back, see :func:`to_coco_detections`). A malformed entry is a
``DetectionsError`` naming the file and the entry.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from faster_coco_eval import COCO as FasterCOCO
from faster_coco_eval import COCOeval_faster
from pycocotools.coco import COCO as PyCOCO
from pycocotools.cocoeval import COCOeval as PyCOCOeval

from florence.errors import FlorenceError

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
BACKENDS = ("faster", "pycocotools")


class DetectionsError(FlorenceError, ValueError):
    """An annotation or detections file (or list) that cannot be evaluated; the message names it and the entry."""


def _read_json(source: str | Path, what: str) -> Any:
    path = Path(source)
    if not path.is_file():
        raise DetectionsError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DetectionsError(f"{path}: not valid JSON ({err})") from None


def load_annotations(annotations: str | Path | dict) -> tuple[dict, str]:
    """The COCO annotation dict (read from a path or given) and a name for messages, after checking its layout."""
    name = str(annotations) if not isinstance(annotations, dict) else "annotations"
    data = _read_json(annotations, "annotations") if not isinstance(annotations, dict) else annotations
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations",
                                                                                      "categories")):
        raise DetectionsError(f"{name}: expected a COCO object with lists 'images', 'annotations', 'categories'")
    for i, ann in enumerate(data["annotations"]):
        missing = [k for k in ("id", "image_id", "category_id", "bbox", "area") if k not in ann]
        if missing:
            raise DetectionsError(f"{name}: annotation {i} lacks {', '.join(missing)}")
    return data, name


def _bad_entry(name: str, i: int, entry: Any, why: str) -> DetectionsError:
    text = json.dumps(entry, default=str)
    return DetectionsError(f"{name}: detection {i} {text[:120]}{'...' if len(text) > 120 else ''}: {why}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def load_detections(detections: str | Path | Sequence[dict], annotations: dict,
                    name: str | None = None) -> list[dict]:
    """Validated copies ``{"image_id", "category_id", "bbox", "score"}`` (plain ints / floats) of COCO results.

    ``DetectionsError`` names the file (or ``name``) and the first bad entry: not an object, unknown ``image_id`` or
    ``category_id``, a ``bbox`` that is not 4 finite numbers with w, h >= 0, a missing or non-finite ``score``.
    """
    if isinstance(detections, (str, Path)):
        name = str(detections)
        detections = _read_json(detections, "detections")
    name = name or "detections"
    if not isinstance(detections, (list, tuple)):
        raise DetectionsError(f"{name}: expected a JSON list of detections, got {type(detections).__name__}")
    image_ids = {img["id"] for img in annotations["images"]}
    cat_ids = {cat["id"] for cat in annotations["categories"]}
    clean = []
    for i, det in enumerate(detections):
        if not isinstance(det, dict):
            raise _bad_entry(name, i, det, "not an object")
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in det:
                raise _bad_entry(name, i, det, f"missing {key!r}")
        if det["image_id"] not in image_ids:
            raise _bad_entry(name, i, det, f"unknown image_id {det['image_id']!r}")
        if det["category_id"] not in cat_ids:
            raise _bad_entry(name, i, det, f"unknown category_id {det['category_id']!r} (known: {sorted(cat_ids)})")
        box = det["bbox"]
        if (not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box)
                or box[2] < 0 or box[3] < 0):
            raise _bad_entry(name, i, det, "bbox must be [x, y, w, h]: 4 finite numbers with w, h >= 0")
        if not _is_number(det["score"]):
            raise _bad_entry(name, i, det, "score must be a finite number")
        clean.append({"image_id": int(det["image_id"]), "category_id": int(det["category_id"]),
                      "bbox": [float(v) for v in box], "score": float(det["score"])})
    return clean


def _run_pycocotools(annotations: dict, detections: list[dict], verbose: bool) -> PyCOCOeval:
    out = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with out:
        gt = PyCOCO()
        gt.dataset = annotations
        gt.createIndex()
        if detections:
            dt = gt.loadRes(detections)
        else:  # loadRes reads anns[0]; an empty result set is built directly
            dt = PyCOCO()
            dt.dataset = {"images": annotations["images"], "categories": annotations["categories"],
                          "annotations": []}
            dt.createIndex()
        ev = PyCOCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _run_faster(annotations: dict, detections: list[dict], verbose: bool) -> COCOeval_faster:
    say = print if verbose else (lambda *args, **kwargs: None)
    gt = FasterCOCO(annotations, print_function=say)
    dt = gt.loadRes(detections)
    ev = COCOeval_faster(gt, dt, iouType="bbox", print_function=say)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev


def _mean_defined(values: np.ndarray) -> float:
    """Mean of the entries > -1 (COCOeval's convention for 'undefined'), -1 if there are none."""
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else -1.0


def evaluate_detections(annotations: str | Path | dict, detections: str | Path | Sequence[dict],
                        backend: Literal["faster", "pycocotools"] = "faster", verbose: bool = False) -> dict:
    """COCO box metrics of ``detections`` against ``annotations`` (see the module docstring for the keys).

    Args:
        annotations: COCO instances JSON path or dict (not modified).
        detections: COCO results: a JSON path or a list of dicts (not modified).
        backend: ``faster`` (faster-coco-eval) or ``pycocotools``.
        verbose: let the backend print its progress and summary table.
    """
    if backend not in BACKENDS:
        raise DetectionsError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    data, name = load_annotations(annotations)
    dets = load_detections(detections, data)
    data = {**data, "annotations": [dict(a) for a in data["annotations"]]}  # the backends add keys to these
    ev = _run_faster(data, dets, verbose) if backend == "faster" else _run_pycocotools(data, dets, verbose)
    result = {key: float(v) for key, v in zip(STAT_NAMES, ev.stats[:12])}
    iou_thrs = np.asarray(ev.params.iouThrs)
    recall = np.asarray(ev.eval["recall"])  # T, K, A, M; area index 0 = all, maxDets index -1 = 100
    for label, thr in (("AR50", 0.5), ("AR75", 0.75)):
        t = int(np.flatnonzero(np.isclose(iou_thrs, thr))[0])
        result[label] = _mean_defined(recall[t, :, 0, -1])
    precision = np.asarray(ev.eval["precision"])  # T, R, K, A, M
    names = {cat["id"]: cat["name"] for cat in data["categories"]}
    result["per_class_AP"] = {names[cat_id]: _mean_defined(precision[:, :, k, 0, -1])
                              for k, cat_id in enumerate(ev.params.catIds)}
    return result


def _as_numpy(x: Any, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.float() if dtype is np.float64 else x
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def to_coco_detections(predictions: Sequence[dict], image_ids: Sequence[int] | torch.Tensor,
                       cat_ids: Sequence[int], scale_factors: Sequence | torch.Tensor | None = None) -> list[dict]:
    """COCO results from a detector's per-image predictions (SPEC §10.2 item 15).

    Args:
        predictions: per image dict(``boxes`` (n, 4) xyxy in resized-image pixels, ``scores`` (n,), ``labels`` (n,)
            contiguous class indices 0..K-1); tensors or arrays.
        image_ids: (B,) the images' COCO ids.
        cat_ids: COCO category id of each contiguous class index (length K).
        scale_factors: (B, 2) (sy, sx) = resized / original size of each image; None: boxes are already in original
            pixels.

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h] in original pixels, "score"}, ...]`` in input order.
    """
    image_ids = _as_numpy(image_ids, np.int64).reshape(-1)
    scales = (np.ones((len(predictions), 2)) if scale_factors is None
              else _as_numpy(scale_factors, np.float64).reshape(-1, 2))
    if not len(predictions) == len(image_ids) == len(scales):
        raise ValueError(f"{len(predictions)} predictions, {len(image_ids)} image ids and {len(scales)} scale "
                         "factors: expected one each per image")
    cat_ids = [int(c) for c in cat_ids]
    results = []
    for pred, image_id, (sy, sx) in zip(predictions, image_ids, scales):
        boxes = _as_numpy(pred["boxes"], np.float64).reshape(-1, 4) / np.array([sx, sy, sx, sy])  # n, 4 original
        scores = _as_numpy(pred["scores"], np.float64).reshape(-1)
        labels = _as_numpy(pred["labels"], np.int64).reshape(-1)
        if labels.size and (labels.min() < 0 or labels.max() >= len(cat_ids)):
            raise ValueError(f"label {labels.min() if labels.min() < 0 else labels.max()} outside 0.."
                             f"{len(cat_ids) - 1} (the contiguous classes of cat_ids)")
        for (x1, y1, x2, y2), score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            results.append({"image_id": int(image_id), "category_id": cat_ids[label],
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    return results
