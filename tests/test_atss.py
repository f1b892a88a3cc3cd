"""ATSS head (florence.heads.atss + anchors, box coder, assigner) against hand-worked numbers and torchvision.

The expected values are derived by hand (comments show the arithmetic) or from torchvision's own box ops and focal
loss, never from the code under test.
"""
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, generalized_box_iou, sigmoid_focal_loss

from florence.heads.anchors import grid_anchors, level_anchors, padded_shape, valid_flags
from florence.heads.atss import ATSSHead, aligned_giou, centerness_target
from florence.heads.atss_assigner import atss_assign
from florence.heads.box_coder import DeltaXYWHBBoxCoder

pytestmark = pytest.mark.usefixtures("one_thread_module")


def logit(p: float) -> float:
    return math.log(p / (1 - p))


# -- anchors ---------------------------------------------------------------------------------------------------------

def test_anchors_hand_worked():
    # stride 8, side 8 * 8 = 64, centre of cell (i, j) at (8j + 4, 8i + 4) -> x1 = 8j + 4 - 32 = 8j - 28
    anchors = level_anchors((2, 3), stride=8, octave_base_scale=8, center_offset=0.5)
    expected = torch.tensor([[-28, -28, 36, 36], [-20, -28, 44, 36], [-12, -28, 52, 36],  # row 0: j = 0, 1, 2
                             [-28, -20, 36, 44], [-20, -20, 44, 44], [-12, -20, 52, 44]], dtype=torch.float)
    assert torch.equal(anchors, expected)
    second = grid_anchors([(1, 1), (1, 2)], strides=[16, 32])[1]  # side 256, centre (32j + 16, 16)
    assert torch.equal(second, torch.tensor([[-112.0, -112, 144, 144], [-80, -112, 176, 144]]))


def test_valid_flags_and_padded_shape():
    # pad shape (16, 24): stride 8 -> rows < 2, cols < 3 of a 4x4 map; stride 16 -> rows < 1, cols < 2 of 2x2
    flags = valid_flags([(4, 4), (2, 2)], strides=[8, 16], pad_shape=(16, 24))
    expected = [1, 1, 1, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0] + [1, 1, 0, 0]
    assert flags.tolist() == [bool(v) for v in expected]
    assert padded_shape((100, 130), 128) == (128, 256)
    assert padded_shape((128, 1), 32) == (128, 32)


# -- box coder -------------------------------------------------------------------------------------------------------

def test_box_coder_hand_delta_and_round_trip():
    coder = DeltaXYWHBBoxCoder(stds=(0.1, 0.1, 0.2, 0.2))
    anchor = torch.tensor([[0.0, 0, 10, 20]])  # centre (5, 10), size 10 x 20
    gt = torch.tensor([[-2.0, 11, 18, 21]])  # centre (8, 16), size 20 x 10
    # dx = (8 - 5) / 10 / 0.1 = 3, dy = (16 - 10) / 20 / 0.1 = 3, dw = log 2 / 0.2, dh = log 0.5 / 0.2
    expected = torch.tensor([[3.0, 3.0, math.log(2) / 0.2, math.log(0.5) / 0.2]])
    deltas = coder.encode(anchor, gt)
    torch.testing.assert_close(deltas, expected)
    torch.testing.assert_close(coder.decode(anchor, deltas), gt)
    boxes = torch.rand(2, 7, 2) * 50
    boxes = torch.cat([boxes, boxes + 1 + torch.rand(2, 7, 2) * 30], dim=-1)  # B, n, 4
    anchors = torch.tensor([[4.0, 4, 36, 36]]).expand(2, 7, 4)
    torch.testing.assert_close(coder.decode(anchors, coder.encode(anchors, boxes)), boxes, rtol=1e-5, atol=1e-4)


def test_box_coder_clipping():
    coder = DeltaXYWHBBoxCoder()
    anchor = torch.tensor([[0.0, 0, 10, 20]])
    deltas = torch.tensor([[3.0, 3.0, math.log(2) / 0.2, math.log(0.5) / 0.2]])  # -> [-2, 11, 18, 21]
    # clipped to an image of (h, w) = (15, 12): x to [0, 12], y to [0, 15]
    torch.testing.assert_close(coder.decode(anchor, deltas, max_shape=(15, 12)), torch.tensor([[0.0, 11, 12, 15]]))
    # per-image shapes, batched: (B, 1, 2)
    shapes = torch.tensor([[[15, 12]], [[30, 30]]])
    both = coder.decode(anchor.expand(2, 1, 4), deltas.expand(2, 1, 4), max_shape=shapes)
    torch.testing.assert_close(both, torch.tensor([[[0.0, 11, 12, 15]], [[0.0, 11, 18, 21]]]))
    # size deltas clamp at |log(16 / 1000)|: dw = 100 * 0.2 -> 4.135, w = 10 * 62.5; dh -> h = 20 / 62.5 = 0.32
    huge = coder.decode(anchor, torch.tensor([[0.0, 0.0, 100.0, -100.0]]))
    torch.testing.assert_close(huge, torch.tensor([[5 - 312.5, 10 - 0.16, 5 + 312.5, 10 + 0.16]]))


# -- assigner --------------------------------------------------------------------------------------------------------

# level 0: three 4x4 anchors; level 1: two 8x8 anchors (topk = 2, so level 1 contributes both)
ANCHORS = torch.tensor([[0, 0, 4, 4], [2, 0, 6, 4], [20, 0, 24, 4],  # A0 c(2,2), A1 c(4,2), A2 c(22,2)
                        [-2, -2, 6, 6], [12, -2, 20, 6]], dtype=torch.float)  # A3 c(2,2), A4 c(16,2)
LEVELS = [3, 2]


def test_assigner_hand_worked():
    gt = torch.tensor([[0, 0, 4, 6],  # g0, centre (2, 3)
                       [0, 0, 5, 4],  # g1, centre (2.5, 2)
                       [22, -1, 30, 5]], dtype=torch.float)  # g2, centre (26, 2)
    # g1: nearest on level 0 A0 (0.5), A1 (1.5); level 1 A3 (0.5), A4 (13.5)
    #     IoUs A0 16/20 = 0.8, A1 12/24 = 0.5, A3 20/64 = 0.3125, A4 0 -> mean 0.4031 + std 0.3355 = 0.7386
    #     -> A0 only (A1 would pass a mean-only threshold)
    thr1 = statistics.mean([0.8, 0.5, 0.3125, 0]) + statistics.stdev([0.8, 0.5, 0.3125, 0])
    assert 0.5 < thr1 < 0.8
    # g0: nearest A0 (1), A1 (2.24); A3 (1), A4 (14.0); IoUs 16/24, 8/32, 24/64, 0 -> threshold 0.6001
    #     -> A0 (2/3, centre inside g0): A0 is positive for g0 AND g1, and g1 overlaps it more (0.8 > 2/3)
    thr0 = statistics.mean([2 / 3, 0.25, 0.375, 0]) + statistics.stdev([2 / 3, 0.25, 0.375, 0])
    assert 0.375 < thr0 < 2 / 3
    # g2: nearest A2 (4), A1 (22); A4 (10), A3 (24); IoUs 8/56, 0, 0, 0 -> threshold 3/4 * 8/56 < 8/56, but A2's
    #     centre (22, 2) lies on g2's left side (distance 0, not > 0.01) -> g2 gets no positive
    gt_index, iou = atss_assign(ANCHORS, LEVELS, gt, topk=2)
    assert gt_index.tolist() == [1, -1, -1, -1, -1]
    torch.testing.assert_close(iou, torch.tensor([0.8, 0, 0, 0, 0]))


def test_assigner_center_inside_margin():
    # g2 moved 0.02 to the left: A2's centre is now 0.02 > 0.01 inside; candidates [x, 0, 0, 0] -> threshold 3x/4
    gt_index, _ = atss_assign(ANCHORS, LEVELS, torch.tensor([[21.98, -1, 29.98, 5]]), topk=2)
    assert gt_index.tolist() == [-1, -1, 0, -1, -1]
    gt_index, _ = atss_assign(ANCHORS, LEVELS, torch.tensor([[21.995, -1, 29.995, 5]]), topk=2)  # 0.005 inside
    assert gt_index.tolist() == [-1, -1, -1, -1, -1]


def test_assigner_exact_tie_and_edge_cases():
    same = torch.tensor([[0, 0, 5, 4], [0, 0, 5, 4]], dtype=torch.float)  # identical boxes: the first index wins
    assert atss_assign(ANCHORS, LEVELS, same, topk=2)[0].tolist() == [0, -1, -1, -1, -1]
    empty_index, empty_iou = atss_assign(ANCHORS, LEVELS, torch.zeros(0, 4), topk=2)
    assert empty_index.tolist() == [-1] * 5 and empty_iou.tolist() == [0.0] * 5
    # topk larger than a level: every anchor of the level is a candidate (no error)
    assert atss_assign(ANCHORS, LEVELS, same[:1], topk=9)[0].shape == (5,)


# -- loss pieces -----------------------------------------------------------------------------------------------------

def test_centerness_target_hand_worked():
    anchors = torch.tensor([[0.0, 0, 4, 4], [0, -2, 8, 6]])  # centres (2, 2) and (4, 2)
    boxes = torch.tensor([[0.0, 0, 5, 4], [0, 0, 10, 8]])
    # (2, 2) in [0, 0, 5, 4]: l 2, r 3, t 2, b 2 -> sqrt(2/3 * 1); (4, 2) in [0, 0, 10, 8]: sqrt(4/6 * 2/6)
    torch.testing.assert_close(centerness_target(anchors, boxes), torch.tensor([math.sqrt(2 / 3), math.sqrt(2 / 9)]))


def test_aligned_giou_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(20, 2, generator=g) * 50
    a = torch.cat([xy, xy + 1 + torch.rand(20, 2, generator=g) * 40], dim=1)
    xy = torch.rand(20, 2, generator=g) * 50
    b = torch.cat([xy, xy + 1 + torch.rand(20, 2, generator=g) * 40], dim=1)
    torch.testing.assert_close(aligned_giou(a, b), generalized_box_iou(a, b).diag())


def _batch():
    """Two images in a 64x96 batch, K = 3, levels at strides 8 and 16 (maps 8x12 and 4x6)."""
    image_sizes = torch.tensor([[64, 96], [40, 50]])
    boxes = torch.tensor([[[8.0, 4, 60, 56], [50, 10, 94, 62]], [[2.0, 3, 45, 38], [0, 0, 0, 0]]])
    labels = torch.tensor([[2, 0], [1, -1]])
    return image_sizes, boxes, labels


def _tiny_head(num_classes=3, channels=8, seed=0):
    torch.manual_seed(seed)
    return ATSSHead(num_classes, in_channels=channels, num_levels=2, strides=(8, 16))


def _features(channels=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, channels, 8, 12, generator=g), torch.randn(2, channels, 4, 6, generator=g)]


def test_loss_matches_reference_written_with_torchvision():
    head = _tiny_head()
    with torch.no_grad():  # larger predictions than the init gives, so every term is far from trivial
        head.atss_reg.weight.normal_(0, 0.3)
        head.atss_cls.weight.normal_(0, 0.5)
        head.atss_centerness.weight.normal_(0, 0.5)
    cls, reg, ctr = head(_features())
    image_sizes, boxes, labels = _batch()
    losses = head.loss(cls, reg, ctr, image_sizes, boxes, labels, pad_divisor=32)

    sizes = [(8, 12), (4, 6)]
    flat_cls = torch.cat([c.flatten(2).transpose(1, 2) for c in cls], 1)  # B, N, K
    flat_reg = torch.cat([r.flatten(2).transpose(1, 2) for r in reg], 1)
    flat_ctr = torch.cat([c.flatten(1) for c in ctr], 1)
    anchors = head.anchors(sizes)
    target_labels, valid, target_boxes = head.get_targets(anchors, sizes, image_sizes, boxes, labels, 32)
    pos = target_labels < 3
    assert pos[0].sum() > 1 and pos[1].sum() > 0
    # image 1 (40 x 50) pads to 64 x 64: stride 8 -> 8 x 8 of 8 x 12 cells, stride 16 -> 4 x 4 of 4 x 6
    assert valid[0].all() and valid[1].sum() == 64 + 16
    factor = pos.sum(1).clamp(min=1).sum()
    onehot = torch.zeros_like(flat_cls)
    onehot[pos] = F.one_hot(target_labels[pos], 3).float()
    ref_cls = sigmoid_focal_loss(flat_cls[valid], onehot[valid], alpha=0.25, gamma=2, reduction="sum") / factor
    pa = anchors.expand(2, -1, -1)[pos]
    pt = target_boxes[pos]
    cx, cy = pa[:, 0::2].mean(1), pa[:, 1::2].mean(1)
    lr = torch.stack([cx - pt[:, 0], pt[:, 2] - cx], 1)
    tb = torch.stack([cy - pt[:, 1], pt[:, 3] - cy], 1)
    ctr_t = ((lr.amin(1) * tb.amin(1)) / (lr.amax(1) * tb.amax(1))).sqrt()
    decoded = DeltaXYWHBBoxCoder().decode(pa, flat_reg[pos])
    giou = generalized_box_iou(decoded, pt).diag()
    ref_bbox = 2 * (ctr_t * (1 - giou)).sum() / ctr_t.sum().clamp(min=1)
    ref_ctr = F.binary_cross_entropy_with_logits(flat_ctr[pos], ctr_t, reduction="sum") / factor
    torch.testing.assert_close(losses["loss_cls"], ref_cls, rtol=1e-5, atol=0)
    torch.testing.assert_close(losses["loss_bbox"], ref_bbox, rtol=1e-5, atol=0)
    torch.testing.assert_close(losses["loss_centerness"], ref_ctr, rtol=1e-5, atol=0)
    assert losses["num_pos"].item() == pos.sum().item()
    # the targets are the assigner's, image by image, on each image's valid anchors
    keep = valid[1]
    gt_index, _ = atss_assign(anchors[keep], [64, 16], boxes[1, :1], topk=9)
    assert torch.equal(target_labels[1][keep], torch.where(gt_index >= 0, 1, 3))


def test_padding_region_is_ignored_only_beyond_the_images_pad_shape():
    head = _tiny_head()
    cls, reg, ctr = head(_features())
    image_sizes = torch.tensor([[64, 96], [20, 40]])  # image 1 pads (divisor 16) to 32 x 48
    _, boxes, labels = _batch()
    boxes[1, 0] = torch.tensor([2.0, 3, 18, 38])
    base = head.loss(cls, reg, ctr, image_sizes, boxes, labels, pad_divisor=16)["loss_cls"]
    far = [c.detach().clone() for c in cls]
    far[0][1, :, 5:, :] = 5.0  # stride-8 rows >= 4 (y >= 32): outside image 1's pad shape
    far[1][1, :, :, 4:] = 5.0  # stride-16 cols >= 3 (x >= 48)
    assert head.loss(far, reg, ctr, image_sizes, boxes, labels, pad_divisor=16)["loss_cls"] == base
    near = [c.detach().clone() for c in cls]
    near[0][1, :, 3, 0] = 5.0  # row 3 (centre y 28): below the 20-px image, inside its 32-px pad shape: a negative
    assert head.loss(near, reg, ctr, image_sizes, boxes, labels, pad_divisor=16)["loss_cls"] > base


def test_zero_gt_images():
    head = _tiny_head()
    cls, reg, ctr = head(_features())
    image_sizes, boxes, labels = _batch()
    none = torch.full_like(labels, -1)
    losses = head.loss(cls, reg, ctr, image_sizes, boxes, none)
    assert losses["num_pos"] == 0 and losses["loss_bbox"] == 0 and losses["loss_centerness"] == 0
    # all anchors are negatives; the normaliser is 1 per image
    flat = torch.cat([c.flatten(2).transpose(1, 2) for c in cls], 1)
    ref = sigmoid_focal_loss(flat, torch.zeros_like(flat), reduction="sum") / 2  # all valid at pad_divisor 128
    torch.testing.assert_close(losses["loss_cls"], ref, rtol=1e-5, atol=0)
    sum(losses[k] for k in ("loss_cls", "loss_bbox", "loss_centerness")).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())
    mixed = labels.clone()
    mixed[1] = -1  # one image without boxes next to one with
    assert torch.isfinite(torch.stack(list(head.loss(cls, reg, ctr, image_sizes, boxes, mixed).values()))).all()


def test_loss_decreases_on_a_tiny_overfit():
    head = _tiny_head(num_classes=2)
    feats = _features()
    image_sizes, boxes, labels = _batch()
    labels = labels.clamp(max=1)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    history = []
    for _ in range(30):
        losses = head.loss(*head(feats), image_sizes, boxes, labels)
        total = losses["loss_cls"] + losses["loss_bbox"] + losses["loss_centerness"]
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(total.item())
    assert losses["num_pos"] > 0
    assert history[-1] < 0.7 * history[0], history


# -- head ------------------------------------------------------------------------------------------------------------

def test_head_names_init_and_shapes():
    head = ATSSHead(1, in_channels=16, num_levels=3, strides=(8, 16, 32))
    keys = set(head.state_dict())
    assert keys == {f"{n}.{p}" for n in ("atss_cls", "atss_reg", "atss_centerness") for p in ("weight", "bias")} | {
        f"scales.{i}.scale" for i in range(3)}
    assert head.scales[0].scale.shape == () and head.scales[2].scale.item() == 1.0
    assert head.atss_cls.weight.shape == (1, 16, 1, 1)
    torch.testing.assert_close(head.atss_cls.bias, torch.full((1,), -math.log(99)))
    assert head.atss_reg.bias.abs().sum() == 0 and 0.005 < head.atss_reg.weight.std() < 0.02
    cls, reg, ctr = head([torch.randn(2, 16, 8, 8), torch.randn(2, 16, 4, 4), torch.randn(2, 16, 2, 2)])
    assert [c.shape for c in cls] == [(2, 1, 8, 8), (2, 1, 4, 4), (2, 1, 2, 2)]
    assert reg[1].shape == (2, 4, 4, 4) and reg[1].dtype == torch.float32 and ctr[2].shape == (2, 1, 2, 2)
    with torch.no_grad():
        head.scales[1].scale.fill_(2.0)
    assert torch.allclose(head([torch.ones(1, 16, 1, 1)] * 3)[1][1], 2 * head([torch.ones(1, 16, 1, 1)] * 3)[1][0])
    assert ATSSHead(3, in_channels=4, num_levels=1, strides=(8,), pred_kernel_size=3).atss_reg.weight.shape == (
        4, 4, 3, 3)


# -- post-processing -------------------------------------------------------------------------------------------------

def _constructed_outputs():
    """Two levels (stride 8: 4x4, stride 16: 2x2) with 8x8 / 16x16 anchors (octave scale 1), K = 2, image 32x32.
    Zero deltas decode to the grid cells; centerness logits +20 (factor ~1) unless set."""
    head = ATSSHead(2, in_channels=4, num_levels=2, strides=(8, 16), octave_base_scale=1)
    cls = [torch.full((1, 2, 4, 4), -20.0), torch.full((1, 2, 2, 2), -20.0)]
    reg = [torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 2, 2)]
    ctr = [torch.full((1, 1, 4, 4), 20.0), torch.full((1, 1, 2, 2), 20.0)]
    cls[0][0, 0, 0, 0] = logit(0.9)  # cell (0, 0) class 0, box [0, 0, 8, 8]
    cls[0][0, 0, 0, 1] = logit(0.8)  # cell (0, 1) class 0, shifted by dx = -10 * 0.1 * 8 onto [0, 0, 8, 8]: NMS'd
    cls[0][0, 1, 0, 1] = logit(0.7)  # same box, class 1: kept (class-aware NMS)
    reg[0][0, 0, 0, 1] = -10.0
    cls[0][0, 0, 1, 1] = logit(0.049)  # below the score threshold: dropped
    cls[0][0, 1, 1, 2] = logit(0.08)  # above it; centerness 0.5 brings the score to 0.04 < 0.05: still kept
    ctr[0][0, 0, 1, 2] = 0.0
    cls[0][0, 0, 3, 3] = logit(0.95)  # shifted right by 8 onto [32, 24, 40, 32], clipped to zero width: dropped
    reg[0][0, 0, 3, 3] = 10.0
    cls[1][0, 0, 0, 0] = logit(0.5)  # stride 16 cell (0, 0), class 0, box [0, 0, 16, 16]: IoU 0.25 with the first
    return head, cls, reg, ctr


def test_predict_threshold_score_factor_nms_and_limits():
    head, cls, reg, ctr = _constructed_outputs()
    sizes = torch.tensor([[32, 32]])
    (out,) = head.predict(cls, reg, ctr, sizes, score_thr=0.05, nms_pre=1000, iou_threshold=0.6, max_per_img=100)
    f = 1 / (1 + math.exp(-20))
    torch.testing.assert_close(out["scores"], torch.tensor([0.9 * f, 0.7 * f, 0.5 * f, 0.08 * 0.5]))
    assert out["labels"].tolist() == [0, 1, 0, 1]
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.0, 0, 8, 8], [0, 0, 8, 8], [0, 0, 16, 16],
                                                           [16, 8, 24, 16]]))
    (top2,) = head.predict(cls, reg, ctr, sizes, max_per_img=2)
    assert top2["labels"].tolist() == [0, 1] and len(top2["scores"]) == 2
    # nms_pre = 2 keeps, on level 0, the 0.95 (later dropped for zero width) and 0.9 pairs; level 1 keeps its 0.5
    (pre,) = head.predict(cls, reg, ctr, sizes, nms_pre=2)
    torch.testing.assert_close(pre["scores"], torch.tensor([0.9 * f, 0.5 * f]))
    # class-agnostic proposals (K = 1) and an image without detections
    head1 = ATSSHead(1, in_channels=4, num_levels=2, strides=(8, 16), octave_base_scale=1)
    (empty,) = head1.predict([c[:, :1] * 0 - 20 for c in cls], reg, ctr, sizes)
    assert empty["boxes"].shape == (0, 4) and empty["labels"].dtype == torch.int64


def test_predict_boxes_clipped_to_each_image():
    head = _tiny_head()
    cls, reg, ctr = head(_features())
    sizes = torch.tensor([[64, 96], [40, 50]])
    outs = head.predict(cls, reg, ctr, sizes, score_thr=0.0)
    for out, (h, w) in zip(outs, sizes.tolist()):
        assert 0 < len(out["boxes"]) <= 100
        assert (out["boxes"] >= 0).all() and (out["boxes"][:, 0::2] <= w).all() and (out["boxes"][:, 1::2] <= h).all()
        assert (out["scores"][:-1] >= out["scores"][1:]).all()
        ious = box_iou(out["boxes"], out["boxes"]).fill_diagonal_(0)
        same = out["labels"][:, None] == out["labels"][None, :]
        assert (ious[same] <= 0.6 + 1e-6).all()
