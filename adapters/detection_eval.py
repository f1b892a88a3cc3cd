"""Detector inference over a COCO-format dataset, optional test-time augmentation, and COCO scoring.

``detect_dataset(model, dataset, ...)`` runs the detector at its test scale (``model.input_cfg``; or several
``scales``, each also flipped with ``flip=True``: the detections of all views are mapped back to the original image,
merged with class-aware NMS at the model's NMS threshold and cut to ``max_per_img``, as mmdetection's TTA) and returns
COCO results (xywh in original pixels, the dataset's category ids; SPEC §9.2, §10.2 item 15).
``evaluate_detector`` scores them with ``florence.adapters.coco_eval`` (faster-coco-eval).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torchvision.ops import batched_nms

from florence.adapters.coco_eval import evaluate_detections
from florence.data.detection import CocoDetection, detection_eval_loader
from florence.data.detection_transforms import flip_boxes

Predictions = dict[int, dict[str, torch.Tensor]]  # image id -> boxes (n, 4) xyxy original pixels, scores, labels


@torch.no_grad()
def predict_view(model: nn.Module, dataset: CocoDetection, *, scale: Sequence[int], flip: bool, device,
                 batch_size: int, progress: Callable[[int], None] | None = None) -> tuple[Predictions, dict]:
    """One view (resize ``scale``, optionally flipped) of every readable image: detections in original pixels,
    and the loader's bad-sample report."""
    loader = detection_eval_loader(dataset, model.preprocess, scale=scale, size_divisor=model.input_cfg["size_divisor"],
                                   batch_size=batch_size, flip=flip)
    out: Predictions = {}
    for batch in loader:
        images = batch["images"].to(device)
        sizes = batch["image_sizes"].to(device)
        for i, det in enumerate(model.predict(images, sizes)):
            out[int(batch["image_ids"][i])] = to_original(det, batch, i, flipped=flip)
        if progress is not None:
            progress(len(images))
    return out, loader.report()


def to_original(det: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], i: int,
                flipped: bool = False) -> dict[str, torch.Tensor]:
    """Image ``i``'s detections (boxes xyxy in the resized, possibly flipped input) on the CPU in original pixels:
    un-flipped within ``image_sizes[i]`` and divided by ``scale_factors[i]`` (sy, sx)."""
    boxes = det["boxes"].float().cpu()  # n, 4
    if flipped:
        boxes = flip_boxes(boxes, float(batch["image_sizes"][i, 1]))
    sy, sx = (float(v) for v in batch["scale_factors"][i])
    return {"boxes": boxes / torch.tensor([sx, sy, sx, sy]), "scores": det["scores"].float().cpu(),
            "labels": det["labels"].cpu()}


def merge_views(views: list[Predictions], iou_threshold: float, max_per_img: int) -> Predictions:
    """Detections of several views of the same images merged: class-aware NMS, then the top ``max_per_img``."""
    if len(views) == 1:
        return views[0]
    merged: Predictions = {}
    for image_id in views[0]:
        parts = [v[image_id] for v in views if image_id in v]
        boxes = torch.cat([p["boxes"] for p in parts])
        scores = torch.cat([p["scores"] for p in parts])
        labels = torch.cat([p["labels"] for p in parts])
        keep = batched_nms(boxes, scores, labels, iou_threshold)[:max_per_img]  # sorted by score
        merged[image_id] = {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
    return merged


def to_coco_results(predictions: Predictions, cat_ids: Sequence[int]) -> list[dict[str, Any]]:
    """COCO results: ``{image_id, category_id, bbox [x, y, w, h], score}`` (contiguous labels -> ``cat_ids``)."""
    results = []
    for image_id, det in predictions.items():
        xywh = det["boxes"].clone()
        xywh[:, 2:] -= xywh[:, :2]
        for box, score, label in zip(xywh.tolist(), det["scores"].tolist(), det["labels"].tolist()):
            results.append({"image_id": image_id, "category_id": int(cat_ids[label]),
                            "bbox": [round(v, 3) for v in box], "score": round(float(score), 5)})
    return results


def detect_dataset(model: nn.Module, dataset: CocoDetection, *, device="cpu", batch_size: int = 8,
                   scales: Sequence[Sequence[int]] | None = None, flip: bool = False,
                   progress: Callable[[int], None] | None = None) -> tuple[Predictions, dict]:
    """Detections of every readable image of ``dataset`` (module docstring); and the bad-sample report."""
    model.eval()
    views, report = [], {}
    for scale in scales or [model.input_cfg["scale"]]:
        for flipped in ((False, True) if flip else (False,)):
            view, report = predict_view(model, dataset, scale=scale, flip=flipped, device=device,
                                        batch_size=batch_size, progress=progress)
            views.append(view)
    return merge_views(views, model.test_cfg["iou_threshold"], model.test_cfg["max_per_img"]), report


def evaluate_detector(model: nn.Module, annotations: str | Path, images: str | Path, *, device="cpu",
                      batch_size: int = 8, max_images: int | None = None, scales=None, flip: bool = False,
                      backend: str = "faster", progress=None) -> dict[str, Any]:
    """COCO metrics of ``model`` on a dataset: ``{metrics, per_class_AP, detections, bad_samples, predictions}``.
    With ``max_images`` only the first images (by id) are detected and scored."""
    dataset = CocoDetection(annotations, images, max_images=max_images)
    predictions, report = detect_dataset(model, dataset, device=device, batch_size=batch_size, scales=scales,
                                         flip=flip, progress=progress)
    if len(model.cat_ids) != len(dataset.cat_ids) and model.num_classes != 1:
        raise ValueError(f"the detector has {model.num_classes} classes, {annotations} {len(dataset.cat_ids)}")
    results = to_coco_results(predictions, model.cat_ids)
    metrics, per_class = split_scores(evaluate_detections(dataset.coco_json(), results, backend=backend))
    return {"metrics": metrics, "per_class_AP": per_class, "detections": results, "bad_samples": report,
            "predictions": predictions, "dataset": dataset}


def split_scores(scored: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """``evaluate_detections``'s dict -> (the 12 COCO stats + AR50 / AR75, per-class AP by category name)."""
    return {k: v for k, v in scored.items() if k != "per_class_AP"}, scored["per_class_AP"]
