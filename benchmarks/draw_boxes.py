"""Boxes on pictures (PIL): ``draw_detections`` labels each box with its class name and score;
``detection_grid_png`` puts a few images' predictions beside their ground truth."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def draw_detections(image: Image.Image, boxes: Sequence[Sequence[float]], labels: Sequence[int],
                    names: Sequence[str], scores: Sequence[float] | None = None, upscale: int = 1) -> Image.Image:
    """A copy of ``image`` (enlarged ``upscale`` times, for small canvases) with xyxy ``boxes`` drawn, each captioned
    ``name score``; the colour follows the class."""
    out = image.convert("RGB")
    if upscale > 1:
        out = out.resize((out.width * upscale, out.height * upscale), Image.NEAREST)
    draw = ImageDraw.Draw(out)
    for i, (box, label) in enumerate(zip(boxes, labels)):
        colour = PALETTE[int(label) % len(PALETTE)]
        x1, y1, x2, y2 = (float(v) * upscale for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        caption = names[int(label)] + (f" {float(scores[i]):.2f}" if scores is not None else "")
        left, top, right, bottom = draw.textbbox((x1, y1), caption)
        y = max(0.0, y1 - (bottom - top) - 2)
        draw.rectangle([x1, y, x1 + right - left + 2, y + bottom - top + 2], fill=colour)
        draw.text((x1 + 1, y), caption, fill=(0, 0, 0))
    return out


def detection_grid_png(dataset, predictions: dict[int, dict[str, torch.Tensor]], cat_ids: Sequence[int],
                       path: str | Path, *, count: int = 6, score_thr: float = 0.3, upscale: int = 3) -> Path:
    """``count`` images of a ``CocoDetection`` dataset in rows: predictions (score ≥ ``score_thr``) left, ground
    truth right. ``predictions`` holds boxes in original pixels with labels indexing ``cat_ids``."""
    names = dataset.class_names
    index = {c: i for i, c in enumerate(dataset.cat_ids)}
    rows = []
    for image_id in sorted(predictions)[:count]:
        image = Image.open(dataset.image_path(image_id))
        det = predictions[image_id]
        keep = det["scores"] >= score_thr
        labels = [index[cat_ids[int(label)]] for label in det["labels"][keep]]
        left = draw_detections(image, det["boxes"][keep].tolist(), labels, names, det["scores"][keep].tolist(),
                               upscale=upscale)
        gt = dataset.annotations(image_id)
        right = draw_detections(image, gt["boxes"].tolist(), gt["labels"].tolist(), names, upscale=upscale)
        rows.append((left, right))
    if not rows:
        raise ValueError("no images to draw")
    width = max(a.width + b.width for a, b in rows) + 4
    height = sum(max(a.height, b.height) for a, b in rows) + 2 * len(rows)
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    y = 0
    for left, right in rows:
        grid.paste(left, (0, y))
        grid.paste(right, (left.width + 4, y))
        y += max(left.height, right.height) + 2
    path = Path(path)
    grid.save(path)
    return path
