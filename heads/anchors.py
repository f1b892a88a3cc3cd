"""Anchors of the ATSS head, as mmdetection's ``AnchorGenerator`` makes them for the DyHead / ATSS configs.

Semantics (mmdet 3.x ``task_modules/prior_generators/anchor_generator.py`` with ``ratios=[1.0]``,
``octave_base_scale=8``, ``scales_per_octave=1``, ``center_offset=0.5``, base sizes = strides):

- one square anchor per feature-map location, side ``octave_base_scale * stride``;
- the anchor at grid cell (i, j) of a level with stride s is centred on ((j + offset) * s, (i + offset) * s);
- boxes are xyxy, a level's anchors are flattened row-major (index = i * W + j), levels are concatenated P3 first.

Valid flags (mmdet ``AnchorGenerator.valid_flags``): the cells whose index is below ceil(pad / stride) along each
axis, where ``pad`` is the image's own padded shape (its size rounded up to the pad divisor), not the batch's.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def level_anchors(featmap_size: tuple[int, int], stride: int, octave_base_scale: float = 8,
                  center_offset: float = 0.5, device: torch.device | str | None = None) -> torch.Tensor:
    """Anchors of one level: (H * W, 4) xyxy, row-major over the (H, W) grid."""
    h, w = featmap_size
    side = float(stride * octave_base_scale)  # base size (= stride) x the single scale, ratio 1
    center = center_offset * stride
    base = torch.tensor([center - 0.5 * side, center - 0.5 * side, center + 0.5 * side, center + 0.5 * side],
                        device=device)
    shift_x = torch.arange(w, device=device, dtype=torch.float32) * stride
    shift_y = torch.arange(h, device=device, dtype=torch.float32) * stride
    yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")  # H, W
    shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 4)  # H*W, 4
    return shifts + base


def grid_anchors(featmap_sizes: Sequence[tuple[int, int]], strides: Sequence[int], octave_base_scale: float = 8,
                 center_offset: float = 0.5, device: torch.device | str | None = None) -> list[torch.Tensor]:
    """Anchors of every level: a list of (H_l * W_l, 4) xyxy tensors."""
    if len(featmap_sizes) != len(strides):
        raise ValueError(f"{len(featmap_sizes)} feature maps for {len(strides)} strides")
    return [level_anchors(tuple(size), stride, octave_base_scale, center_offset, device)
            for size, stride in zip(featmap_sizes, strides)]


def valid_flags(featmap_sizes: Sequence[tuple[int, int]], strides: Sequence[int], pad_shape: tuple[int, int],
                device: torch.device | str | None = None) -> torch.Tensor:
    """(sum_l H_l * W_l,) bool: the anchors whose cell lies inside ``pad_shape`` (h, w), levels concatenated."""
    flags = []
    for (feat_h, feat_w), stride in zip(featmap_sizes, strides):
        valid_h = min(math.ceil(pad_shape[0] / stride), feat_h)
        valid_w = min(math.ceil(pad_shape[1] / stride), feat_w)
        valid_y = torch.arange(feat_h, device=device) < valid_h
        valid_x = torch.arange(feat_w, device=device) < valid_w
        flags.append((valid_y[:, None] & valid_x[None, :]).reshape(-1))  # H*W
    return torch.cat(flags)


def padded_shape(image_size: tuple[int, int], divisor: int) -> tuple[int, int]:
    """An image's own padded shape (mmdet ``DetDataPreprocessor`` ``pad_shape``): each side rounded up."""
    return (math.ceil(image_size[0] / divisor) * divisor, math.ceil(image_size[1] / divisor) * divisor)
