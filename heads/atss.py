"""The ATSS detection head of the DyHead detector: mmdetection 3.x ``ATSSHead`` as configured in
``configs/dyhead/atss_swin-l-p4-w12_fpn_dyhead_ms-2x_coco.py`` (SPEC §5.3).

Structure: no conv tower (``stacked_convs=0``, DyHead replaces it); per level, 1x1 convs ``atss_cls`` (K logits),
``atss_reg`` (4 box deltas, times the level's learnable scalar ``scales.{l}.scale``) and ``atss_centerness``
(1 logit), shared across levels. One square anchor per location (``florence.heads.anchors``), deltas with stds
(0.1, 0.1, 0.2, 0.2) (``florence.heads.box_coder``), targets by ATSS with top-9 (``florence.heads.atss_assigner``).

Training (``loss`` / ``loss_flat``), per batch:

- valid anchors: those inside each image's own padded shape (its size rounded up to ``pad_divisor``; mmdet's
  per-image ``pad_shape`` and ``allowed_border=-1``); the others (batch padding) are neither candidates nor
  negatives and get no loss. Anchors in an image's own padding up to the divisor are ordinary negatives, as in mmdet;
- ``loss_cls``: sigmoid focal loss (gamma 2, alpha 0.25) over valid anchors x classes, summed and divided by
  ``sum over images of max(positives, 1)`` (mmdet's ``PseudoSampler`` ``avg_factor``);
- ``loss_bbox``: 2 x GIoU loss between the decoded predictions (not clipped) and the assigned boxes of the
  positives, weighted by the centerness targets and divided by their sum (clamped to >= 1);
- ``loss_centerness``: BCE between the centerness logits of the positives and the centerness targets
  sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) of the anchor centres, divided by the ``loss_cls`` factor.

mmdet averages both normalisers over GPUs (``reduce_mean``); ``sync_normalizers=True`` does the same under
``torch.distributed``. Inference (``predict``) follows ``BaseDenseHead.predict_by_feat``: per level, class scores
sigmoid(cls) above ``score_thr`` (before the centerness factor), the top ``nms_pre`` (anchor, class) pairs;
boxes decoded and clipped to the image; score = sigmoid(cls) * sigmoid(centerness); boxes of width or height
<= ``min_bbox_size`` dropped; class-aware NMS at ``iou_threshold``; the best ``max_per_img``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, sigmoid_focal_loss

from florence.heads.anchors import grid_anchors, padded_shape, valid_flags
from florence.heads.atss_assigner import atss_assign
from florence.heads.box_coder import DeltaXYWHBBoxCoder

_EPS = torch.finfo(torch.float32).eps  # mmdet weight_reduce_loss: sum / (avg_factor + eps)


class Scale(nn.Module):
    """A learnable scalar multiplier (mmcv ``Scale``; the parameter is 0-d, key ``scale``)."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def aligned_giou(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Generalized IoU of matching rows, (..., 4) xyxy -> (...); union and enclosing area clamped to >= ``eps``
    (mmdet ``bbox_overlaps(mode="giou", is_aligned=True)``)."""
    lt = torch.max(pred[..., :2], target[..., :2])
    rb = torch.min(pred[..., 2:], target[..., 2:])
    overlap = (rb - lt).clamp(min=0).prod(-1)
    area_p = (pred[..., 2:] - pred[..., :2]).prod(-1)
    area_t = (target[..., 2:] - target[..., :2]).prod(-1)
    union = (area_p + area_t - overlap).clamp(min=eps)
    enclose_wh = (torch.max(pred[..., 2:], target[..., 2:]) - torch.min(pred[..., :2], target[..., :2])).clamp(min=0)
    enclose = enclose_wh.prod(-1).clamp(min=eps)
    return overlap / union - (enclose - union) / enclose


def centerness_target(anchors: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """FCOS centerness of the anchor centres in their assigned boxes: (n, 4), (n, 4) -> (n,). Only meaningful for
    positives (centres inside the box)."""
    cx = (anchors[:, 0] + anchors[:, 2]) / 2
    cy = (anchors[:, 1] + anchors[:, 3]) / 2
    left_right = torch.stack([cx - boxes[:, 0], boxes[:, 2] - cx], dim=1)  # n, 2
    top_bottom = torch.stack([cy - boxes[:, 1], boxes[:, 3] - cy], dim=1)  # n, 2
    return torch.sqrt(left_right.min(dim=1).values / left_right.max(dim=1).values
                      * top_bottom.min(dim=1).values / top_bottom.max(dim=1).values)


def _reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over the processes of ``torch.distributed`` (mmdet ``reduce_mean``)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    value = value.clone()
    torch.distributed.all_reduce(value.div_(torch.distributed.get_world_size()))
    return value


class ATSSHead(nn.Module):
    """ATSS head on top of DyHead (module docstring).

    Args:
        num_classes: K (1 for a class-agnostic proposal network).
        in_channels: channels of every input level.
        num_levels: pyramid levels (one ``Scale`` each).
        strides: anchor stride of each level (P3..P7: 8..128).
        octave_base_scale: anchor side in strides.
        pred_kernel_size: kernel of the three prediction convs (1 in the DyHead configs).
        prior_prob: initial foreground probability of the classifier (its bias is -log((1 - p) / p)).
        topk: ATSS candidates per level and box.
    """

    def __init__(self, num_classes: int, in_channels: int = 256, num_levels: int = 5,
                 strides: Sequence[int] = (8, 16, 32, 64, 128), octave_base_scale: float = 8,
                 pred_kernel_size: int = 1, prior_prob: float = 0.01, topk: int = 9) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if len(strides) != num_levels:
            raise ValueError(f"{len(strides)} strides for num_levels={num_levels}")
        self.num_classes = num_classes
        self.strides = tuple(int(s) for s in strides)
        self.octave_base_scale = octave_base_scale
        self.topk = topk
        self.prior_prob = prior_prob
        self.center_offset = 0.5
        self.bbox_coder = DeltaXYWHBBoxCoder(means=(0.0, 0.0, 0.0, 0.0), stds=(0.1, 0.1, 0.2, 0.2))
        self.loss_weights = dict(cls=1.0, bbox=2.0, centerness=1.0)
        self.focal_gamma, self.focal_alpha = 2.0, 0.25
        pad = pred_kernel_size // 2
        self.atss_cls = nn.Conv2d(in_channels, num_classes, pred_kernel_size, padding=pad)
        self.atss_reg = nn.Conv2d(in_channels, 4, pred_kernel_size, padding=pad)
        self.atss_centerness = nn.Conv2d(in_channels, 1, pred_kernel_size, padding=pad)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))
        self.init_weights()

    def init_weights(self) -> None:
        """mmdet's init_cfg: every conv N(0, 0.01) with zero bias; the classifier's bias from ``prior_prob``."""
        for conv in (self.atss_cls, self.atss_reg, self.atss_centerness):
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.atss_cls.bias, -math.log((1 - self.prior_prob) / self.prior_prob))

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                                             list[torch.Tensor]]:
        """Levels (B, C, H_l, W_l), high-res first -> per level ``cls`` (B, K, H_l, W_l) logits, ``reg``
        (B, 4, H_l, W_l) deltas (float32, as mmdet), ``ctr`` (B, 1, H_l, W_l) logits."""
        if len(feats) != len(self.scales):
            raise ValueError(f"ATSSHead has {len(self.scales)} levels, got {len(feats)} feature maps")
        cls = [self.atss_cls(x) for x in feats]
        reg = [scale(self.atss_reg(x)).float() for x, scale in zip(feats, self.scales)]
        ctr = [self.atss_centerness(x) for x in feats]
        return cls, reg, ctr

    # -- targets ---------------------------------------------------------------------------------------------------

    def anchors(self, level_sizes: Sequence[tuple[int, int]], device: torch.device | str | None = None
                ) -> torch.Tensor:
        """All anchors (N, 4) xyxy for the level sizes (H_l, W_l), row-major per level, P3 first."""
        return torch.cat(grid_anchors(level_sizes, self.strides, self.octave_base_scale, self.center_offset, device))

    @torch.no_grad()
    def get_targets(self, anchors: torch.Tensor, level_sizes: Sequence[tuple[int, int]], image_sizes: torch.Tensor,
                    boxes: torch.Tensor, labels: torch.Tensor, pad_divisor: int = 128
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ATSS targets of a batch (a loop over images; the assignment itself is vectorised).

        Args:
            anchors: (N, 4) from ``anchors(level_sizes)``.
            image_sizes: (B, 2) (h, w) of each image before batch padding.
            boxes: (B, M, 4) xyxy; labels: (B, M) class indices, -1 for padding rows.
            pad_divisor: each image's valid region is its size rounded up to this multiple.

        Returns:
            ``target_labels`` (B, N) int64 in 0..K (K = background), ``valid`` (B, N) bool (anchors that get a
            classification loss), ``target_boxes`` (B, N, 4) the assigned boxes (zeros for the background).
        """
        num_images, num_anchors = boxes.shape[0], anchors.shape[0]
        level_counts = [h * w for h, w in level_sizes]
        target_labels = torch.full((num_images, num_anchors), self.num_classes, dtype=torch.long,
                                   device=anchors.device)
        valid = torch.zeros((num_images, num_anchors), dtype=torch.bool, device=anchors.device)
        target_boxes = anchors.new_zeros((num_images, num_anchors, 4))
        for b, (h, w) in enumerate(image_sizes.tolist()):
            flags = valid_flags(level_sizes, self.strides, padded_shape((h, w), pad_divisor), anchors.device)
            valid_counts = [int(f.sum()) for f in flags.split(level_counts)]
            keep = labels[b] >= 0
            gt_boxes, gt_labels = boxes[b][keep].float(), labels[b][keep]
            gt_index, _ = atss_assign(anchors[flags], valid_counts, gt_boxes, self.topk)  # N_valid
            valid_idx = flags.nonzero().squeeze(1)
            pos = gt_index >= 0
            target_labels[b, valid_idx[pos]] = gt_labels[gt_index[pos]]
            target_boxes[b, valid_idx[pos]] = gt_boxes[gt_index[pos]]
            valid[b] = flags
        return target_labels, valid, target_boxes

    # -- losses ----------------------------------------------------------------------------------------------------

    def loss(self, cls: Sequence[torch.Tensor], reg: Sequence[torch.Tensor], ctr: Sequence[torch.Tensor],
             image_sizes: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, *, pad_divisor: int = 128,
             sync_normalizers: bool = False) -> dict[str, torch.Tensor]:
        """ATSS losses of ``forward``'s per-level outputs against padded targets (``loss_flat``)."""
        level_sizes = [tuple(c.shape[-2:]) for c in cls]
        return self.loss_flat(torch.cat([c.flatten(2).transpose(1, 2) for c in cls], dim=1),  # B, N, K
                              torch.cat([r.flatten(2).transpose(1, 2) for r in reg], dim=1),  # B, N, 4
                              torch.cat([c.flatten(1) for c in ctr], dim=1),  # B, N
                              level_sizes, image_sizes, boxes, labels, pad_divisor=pad_divisor,
                              sync_normalizers=sync_normalizers)

    def loss_flat(self, cls: torch.Tensor, reg: torch.Tensor, ctr: torch.Tensor,
                  level_sizes: Sequence[tuple[int, int]], image_sizes: torch.Tensor, boxes: torch.Tensor,
                  labels: torch.Tensor, *, pad_divisor: int = 128, sync_normalizers: bool = False
                  ) -> dict[str, torch.Tensor]:
        """ATSS losses (module docstring) of flattened outputs.

        Args:
            cls: (B, N, K) logits; reg: (B, N, 4) deltas; ctr: (B, N) centerness logits; levels concatenated
                row-major, P3 first, with sizes ``level_sizes`` [(H_l, W_l)].
            image_sizes: (B, 2) (h, w) before batch padding; boxes: (B, M, 4) xyxy; labels: (B, M), -1 = padding.
            pad_divisor: the data's pad multiple (each image's valid anchors, see module docstring).
            sync_normalizers: average the normalisers over ``torch.distributed`` processes, as mmdet.

        Returns:
            ``loss_cls``, ``loss_bbox``, ``loss_centerness`` (weighted, scalars) and ``num_pos`` (positives, float).
        """
        cls, reg, ctr = cls.float(), reg.float(), ctr.float()
        anchors = self.anchors(level_sizes, cls.device)  # N, 4
        if anchors.shape[0] != cls.shape[1]:
            raise ValueError(f"level sizes {list(level_sizes)} give {anchors.shape[0]} anchors, outputs have "
                             f"{cls.shape[1]}")
        target_labels, valid, target_boxes = self.get_targets(anchors, level_sizes, image_sizes, boxes, labels,
                                                              pad_divisor)
        pos = target_labels < self.num_classes  # B, N
        num_pos = pos.sum()
        cls_factor = pos.sum(dim=1).clamp(min=1).sum().float()  # sum over images of max(positives, 1)
        if sync_normalizers:
            cls_factor = _reduce_mean(cls_factor)

        onehot = torch.zeros_like(cls)  # B, N, K; the background (label K) stays all-zero
        pos_b, pos_a = pos.nonzero(as_tuple=True)
        onehot[pos_b, pos_a, target_labels[pos_b, pos_a]] = 1.0
        focal = sigmoid_focal_loss(cls, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none")
        loss_cls = (focal * valid[..., None]).sum() / (cls_factor + _EPS)

        # positives of all images (P may be 0: the sums are then exact zeros that keep the graph connected)
        pos_anchors = anchors.expand(cls.shape[0], -1, -1)[pos]  # P, 4
        pos_targets = target_boxes[pos]  # P, 4
        ctr_targets = centerness_target(pos_anchors, pos_targets)  # P
        decoded = self.bbox_coder.decode(pos_anchors, reg[pos])  # P, 4 (not clipped, as mmdet's loss)
        bbox_factor = ctr_targets.sum()
        if sync_normalizers:
            bbox_factor = _reduce_mean(bbox_factor)
        giou_sum = ((1 - aligned_giou(decoded, pos_targets)) * ctr_targets).sum() / (1.0 + _EPS)  # avg_factor 1
        loss_bbox = giou_sum / bbox_factor.clamp(min=1)
        bce = F.binary_cross_entropy_with_logits(ctr[pos], ctr_targets, reduction="none")  # P
        loss_ctr = bce.sum() / (cls_factor + _EPS)
        return dict(loss_cls=self.loss_weights["cls"] * loss_cls, loss_bbox=self.loss_weights["bbox"] * loss_bbox,
                    loss_centerness=self.loss_weights["centerness"] * loss_ctr, num_pos=num_pos.float())

    # -- inference -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, cls: Sequence[torch.Tensor], reg: Sequence[torch.Tensor], ctr: Sequence[torch.Tensor],
                image_sizes: torch.Tensor, score_thr: float = 0.05, nms_pre: int = 1000, iou_threshold: float = 0.6,
                max_per_img: int = 100, min_bbox_size: float = 0) -> list[dict[str, torch.Tensor]]:
        """Detections per image from ``forward``'s per-level outputs (module docstring; mmdet ATSS test_cfg).

        Returns one dict per image: ``boxes`` (n, 4) xyxy in the input tensor's pixels, clipped to the image's
        (h, w) in ``image_sizes``; ``scores`` (n,) sigmoid(cls) * sigmoid(ctr), descending; ``labels`` (n,) int64.
        """
        level_sizes = [tuple(c.shape[-2:]) for c in cls]
        level_anchors = grid_anchors(level_sizes, self.strides, self.octave_base_scale, self.center_offset,
                                     cls[0].device)
        results = []
        for b, (h, w) in enumerate(image_sizes.tolist()):
            cand_anchors, cand_deltas, cand_scores, cand_labels, cand_factors = [], [], [], [], []
            for anchors, c, r, t in zip(level_anchors, cls, reg, ctr):
                scores = c[b].float().flatten(1).t().sigmoid().flatten()  # H*W*K, anchor-major
                above = (scores > score_thr).nonzero().squeeze(1)
                top_scores, order = scores[above].topk(min(nms_pre, above.numel()))
                pair = above[order]
                anchor_idx = pair // self.num_classes
                cand_anchors.append(anchors[anchor_idx])
                cand_deltas.append(r[b].float().flatten(1).t()[anchor_idx])  # n, 4
                cand_factors.append(t[b].float().flatten()[anchor_idx].sigmoid())
                cand_scores.append(top_scores)
                cand_labels.append(pair % self.num_classes)
            boxes = self.bbox_coder.decode(torch.cat(cand_anchors), torch.cat(cand_deltas), max_shape=(h, w))
            scores = torch.cat(cand_scores) * torch.cat(cand_factors)
            labels = torch.cat(cand_labels)
            if min_bbox_size >= 0:
                wh = boxes[:, 2:] - boxes[:, :2]
                big = (wh > min_bbox_size).all(dim=1)
                boxes, scores, labels = boxes[big], scores[big], labels[big]
            keep = batched_nms(boxes, scores, labels, iou_threshold)[:max_per_img]
            results.append(dict(boxes=boxes[keep], scores=scores[keep], labels=labels[keep]))
        return results
