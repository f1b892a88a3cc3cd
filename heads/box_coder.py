"""Box deltas of the ATSS head: mmdetection's ``DeltaXYWHBBoxCoder`` (``bbox2delta`` / ``delta2bbox``, mmdet 3.x).

For an anchor (centre px, py, size pw, ph) and a box (gx, gy, gw, gh)::

    delta = ((gx - px) / pw, (gy - py) / ph, log(gw / pw), log(gh / ph)), then (delta - means) / stds

Decoding inverts it; the size deltas are clamped to |log(wh_ratio_clip)| (16 / 1000 -> a box at most ~62.5x or at
least 1/62.5 of its anchor) and, given ``max_shape`` (h, w), the corners are clipped to [0, w] x [0, h]
(mmdet's ``clip_border=True``). Works on any leading shape (..., 4).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


class DeltaXYWHBBoxCoder:
    """Encode boxes as (dx, dy, dw, dh) deltas from anchors and decode them back (module docstring)."""

    def __init__(self, means: Sequence[float] = (0.0, 0.0, 0.0, 0.0), stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
                 wh_ratio_clip: float = 16 / 1000) -> None:
        self.means = tuple(float(m) for m in means)
        self.stds = tuple(float(s) for s in stds)
        self.max_ratio = abs(math.log(wh_ratio_clip))

    def encode(self, anchors: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """(..., 4) xyxy anchors and boxes -> (..., 4) normalised deltas."""
        anchors, boxes = anchors.float(), boxes.float()
        pxy = (anchors[..., :2] + anchors[..., 2:]) * 0.5
        pwh = anchors[..., 2:] - anchors[..., :2]
        gxy = (boxes[..., :2] + boxes[..., 2:]) * 0.5
        gwh = boxes[..., 2:] - boxes[..., :2]
        deltas = torch.cat([(gxy - pxy) / pwh, torch.log(gwh / pwh)], dim=-1)
        return (deltas - deltas.new_tensor(self.means)) / deltas.new_tensor(self.stds)

    def decode(self, anchors: torch.Tensor, deltas: torch.Tensor,
               max_shape: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """(..., 4) anchors and deltas -> (..., 4) xyxy boxes; ``max_shape`` (h, w), or a tensor (..., 2) of them
        broadcasting against the leading dims (one per image), clips the corners to the image."""
        deltas = deltas * deltas.new_tensor(self.stds) + deltas.new_tensor(self.means)
        pxy = (anchors[..., :2] + anchors[..., 2:]) * 0.5
        pwh = anchors[..., 2:] - anchors[..., :2]
        dwh = deltas[..., 2:].clamp(min=-self.max_ratio, max=self.max_ratio)
        gxy = pxy + pwh * deltas[..., :2]
        gwh = pwh * dwh.exp()
        boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
        if max_shape is not None:
            hw = torch.as_tensor(max_shape, dtype=boxes.dtype, device=boxes.device)
            wh = hw.flip(-1)  # (..., 2) w, h
            boxes = torch.minimum(boxes.clamp(min=0), torch.cat([wh, wh], dim=-1))
        return boxes
