"""Adaptive Training Sample Selection (Zhang et al. 2020), as mmdetection's ``ATSSAssigner`` (mmdet 3.x
``task_modules/assigners/atss_assigner.py``, ``alpha=None``, no ignored boxes).

For each ground-truth box g:

1. candidates: on every level, the ``topk`` anchors whose centres are nearest (Euclidean) to g's centre
   (``min(topk, anchors on the level)``);
2. threshold: mean + standard deviation (unbiased, as ``torch.std``) of the candidates' IoUs with g;
3. positives: candidates with IoU >= threshold whose centre lies inside g by more than 0.01 on all four sides.

An anchor positive for several boxes goes to the one it overlaps most (exact IoU ties: the lowest box index, as
``torch.max``). Everything is vectorised over anchors and boxes; only the per-level top-k loops over levels.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torchvision.ops import box_iou

_INSIDE_EPS = 0.01  # mmdet: a candidate's centre must be this far inside the box


def _centers(boxes: torch.Tensor) -> torch.Tensor:
    return torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2.0, (boxes[:, 1] + boxes[:, 3]) / 2.0], dim=1)  # n, 2


def atss_assign(anchors: torch.Tensor, num_level_anchors: Sequence[int], gt_boxes: torch.Tensor,
                topk: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign anchors to boxes.

    Args:
        anchors: (N, 4) xyxy, levels concatenated in the order of ``num_level_anchors``.
        num_level_anchors: anchors per level (sums to N).
        gt_boxes: (G, 4) xyxy ground-truth boxes (G may be 0).
        topk: candidates per level and box.

    Returns:
        ``gt_index`` (N,) int64, the assigned box per anchor or -1 (background), and ``iou`` (N,), the IoU with the
        assigned box (0 for background).
    """
    num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
    if sum(num_level_anchors) != num_anchors:
        raise ValueError(f"num_level_anchors sums to {sum(num_level_anchors)}, but there are {num_anchors} anchors")
    gt_index = torch.full((num_anchors,), -1, dtype=torch.long, device=anchors.device)
    if num_gt == 0 or num_anchors == 0:
        return gt_index, anchors.new_zeros(num_anchors)
    overlaps = box_iou(anchors, gt_boxes)  # N, G
    anchor_ctr = _centers(anchors)  # N, 2
    distances = (anchor_ctr[:, None, :] - _centers(gt_boxes)[None, :, :]).pow(2).sum(-1).sqrt()  # N, G

    candidates = []
    start = 0
    for count in num_level_anchors:
        k = min(topk, count)
        if k > 0:
            _, idx = distances[start:start + count].topk(k, dim=0, largest=False)  # k, G
            candidates.append(idx + start)
        start += count
    candidates = torch.cat(candidates, dim=0)  # C, G (C = sum of per-level k)

    cand_iou = overlaps.gather(0, candidates)  # C, G
    threshold = cand_iou.mean(0) + cand_iou.std(0)  # G
    is_pos = cand_iou >= threshold[None, :]

    cand_ctr = anchor_ctr[candidates]  # C, G, 2
    sides = torch.stack([cand_ctr[..., 0] - gt_boxes[:, 0], cand_ctr[..., 1] - gt_boxes[:, 1],
                         gt_boxes[:, 2] - cand_ctr[..., 0], gt_boxes[:, 3] - cand_ctr[..., 1]], dim=-1)  # C, G, 4
    is_pos &= sides.min(dim=-1).values > _INSIDE_EPS

    # each anchor keeps the positive box it overlaps most; -inf marks "not positive for this box"
    pos_iou = torch.full_like(overlaps, float("-inf"))  # N, G
    gt_cols = torch.arange(num_gt, device=anchors.device).expand_as(candidates)  # C, G
    pos_iou[candidates[is_pos], gt_cols[is_pos]] = overlaps[candidates[is_pos], gt_cols[is_pos]]
    best_iou, best_gt = pos_iou.max(dim=1)  # N
    assigned = best_iou > float("-inf")
    gt_index[assigned] = best_gt[assigned]
    return gt_index, torch.where(assigned, best_iou, torch.zeros_like(best_iou))
