"""Detector checkpoint conversion (mmdetection and official DynamicHead layouts) on synthetic state dicts whose key
names and shapes are written out from those projects' module definitions (tiny widths): every key maps, shapes agree,
the strict load of our detector passes, and chosen tensors land where they should."""
import pytest
import torch
import torch.nn.functional as F

from florence.adapters.detection_convert import convert_detector_state_dict, unfold_to_swin_merge_order
from florence.adapters.detector import Detector
from florence.factory import create_model
from florence.weights import LoadReport, WeightsError

E, DEPTHS, HEADS, WINDOW = 16, (1, 1, 2, 1), (1, 1, 1, 1), 7  # tiny Swin
C, K, BLOCKS, LEVELS = 16, 3, 2, 5  # FPN / DyHead channels, classes, DyHead blocks, pyramid levels
OUT = (1, 2, 3)  # backbone stages feeding the FPN (strides 8, 16, 32)


def _detector():
    torch.manual_seed(0)
    tower = create_model("swin_tiny", embed_dim=E, depths=DEPTHS, num_heads=HEADS, window_size=WINDOW, out_norms=True)
    return Detector(tower, num_classes=K, neck={"channels": C, "num_blocks": BLOCKS})


class _Tensors:
    """Distinct random tensors, so that a value identifies its source key."""

    def __init__(self):
        self.g = torch.Generator().manual_seed(1)

    def __call__(self, *shape):
        return torch.randn(*shape, generator=self.g)


def _official_swin(t):
    """The official Swin layout (microsoft/Swin-Transformer; DynamicHead ``extra/swint.py`` with per-output norms)."""
    sd = {"patch_embed.proj.weight": t(E, 3, 4, 4), "patch_embed.proj.bias": t(E),
          "patch_embed.norm.weight": t(E), "patch_embed.norm.bias": t(E)}
    for i, (depth, heads) in enumerate(zip(DEPTHS, HEADS)):
        d = E * 2 ** i
        for k in range(depth):
            b = f"layers.{i}.blocks.{k}."
            sd.update({
                b + "norm1.weight": t(d), b + "norm1.bias": t(d),
                b + "attn.relative_position_bias_table": t((2 * WINDOW - 1) ** 2, heads),
                b + "attn.relative_position_index": torch.zeros(WINDOW ** 2, WINDOW ** 2, dtype=torch.long),
                b + "attn.qkv.weight": t(3 * d, d), b + "attn.qkv.bias": t(3 * d),
                b + "attn.proj.weight": t(d, d), b + "attn.proj.bias": t(d),
                b + "norm2.weight": t(d), b + "norm2.bias": t(d),
                b + "mlp.fc1.weight": t(4 * d, d), b + "mlp.fc1.bias": t(4 * d),
                b + "mlp.fc2.weight": t(d, 4 * d), b + "mlp.fc2.bias": t(d),
            })
        if i < len(DEPTHS) - 1:  # patch merging at the end of the stage
            sd.update({f"layers.{i}.downsample.reduction.weight": t(2 * d, 4 * d),
                       f"layers.{i}.downsample.norm.weight": t(4 * d), f"layers.{i}.downsample.norm.bias": t(4 * d)})
    for i in OUT:
        sd.update({f"norm{i}.weight": t(E * 2 ** i), f"norm{i}.bias": t(E * 2 ** i)})
    return sd


def _unfold_positions(channels):
    """p[j] = position in mmdet's ``nn.Unfold(2, stride=2)`` feature of the j-th entry of Swin's cat([x0, x1, x2, x3])
    (x0 = x[0::2, 0::2], x1 = x[1::2, 0::2], x2 = x[0::2, 1::2], x3 = x[1::2, 1::2]), found from tagged values."""
    x = torch.arange(channels * 4.0).view(1, channels, 2, 2)  # B, C, H, W
    nhwc = x.permute(0, 2, 3, 1)
    swin = torch.cat([nhwc[:, 0::2, 0::2], nhwc[:, 1::2, 0::2], nhwc[:, 0::2, 1::2], nhwc[:, 1::2, 1::2]], -1).flatten()
    unfold = F.unfold(x, kernel_size=2, stride=2)[0, :, 0]  # c * 4 + (kh * 2 + kw)
    return torch.tensor([int((unfold == v).nonzero()) for v in swin])


def _to_unfold_order(v):
    """A Swin-order merge weight (O, 4C) / norm (4C,) as mmdet's Unfold-based PatchMerging needs it: same outputs."""
    p = _unfold_positions(v.shape[-1] // 4)
    out = torch.empty_like(v)
    out[..., p] = v
    return out


def _mmdet_swin(official):
    """mmdet ``SwinTransformer`` names (``backbone.``-less) for the same weights (mmdet/models/backbones/swin.py)."""
    sd = {}
    for k, v in official.items():
        k = k.replace("patch_embed.proj.", "patch_embed.projection.").replace("layers.", "stages.")
        k = k.replace(".attn.", ".attn.w_msa.").replace(".mlp.fc1.", ".ffn.layers.0.0.").replace(".mlp.fc2.",
                                                                                               ".ffn.layers.1.")
        sd[k] = _to_unfold_order(v) if ".downsample." in k else v
    return sd


def _mmdet_state(t):
    official = _official_swin(t)
    sd = {"backbone." + k: v for k, v in _mmdet_swin(official).items()}
    for i, ch in enumerate(E * 2 ** s for s in OUT):  # FPN: ConvModule(conv) without norm / act
        sd.update({f"neck.0.lateral_convs.{i}.conv.weight": t(C, ch, 1, 1),
                   f"neck.0.lateral_convs.{i}.conv.bias": t(C)})
    for i in range(LEVELS):
        sd.update({f"neck.0.fpn_convs.{i}.conv.weight": t(C, C, 3, 3), f"neck.0.fpn_convs.{i}.conv.bias": t(C)})
    for j in range(BLOCKS):  # DyHeadBlock: DyDCNv2 (no conv bias: GN follows), offset conv, scale attn, DyReLU
        b = f"neck.1.dyhead_blocks.{j}."
        for part in ("high", "mid", "low"):
            sd.update({b + f"spatial_conv_{part}.conv.weight": t(C, C, 3, 3),
                       b + f"spatial_conv_{part}.norm.weight": t(C), b + f"spatial_conv_{part}.norm.bias": t(C)})
        sd.update({b + "spatial_conv_offset.weight": t(27, C, 3, 3), b + "spatial_conv_offset.bias": t(27),
                   b + "scale_attn_module.1.weight": t(1, C, 1, 1), b + "scale_attn_module.1.bias": t(1),
                   b + "task_attn_module.conv1.conv.weight": t(C // 4, C, 1, 1),
                   b + "task_attn_module.conv1.conv.bias": t(C // 4),
                   b + "task_attn_module.conv2.conv.weight": t(4 * C, C // 4, 1, 1),
                   b + "task_attn_module.conv2.conv.bias": t(4 * C)})
    sd.update({"bbox_head.atss_cls.weight": t(K, C, 1, 1), "bbox_head.atss_cls.bias": t(K),
               "bbox_head.atss_reg.weight": t(4, C, 1, 1), "bbox_head.atss_reg.bias": t(4),
               "bbox_head.atss_centerness.weight": t(1, C, 1, 1), "bbox_head.atss_centerness.bias": t(1)})
    sd.update({f"bbox_head.scales.{i}.scale": t(()) for i in range(LEVELS)})
    return official, sd


def _dynamichead_state(t):
    official = _official_swin(t)
    sd = {"backbone.backbone.bottom_up." + k: v for k, v in official.items()}
    fpn = "backbone.backbone."
    for stage, ch in zip((3, 4, 5), (E * 2 ** s for s in OUT)):  # detectron2 FPN: stage = log2(stride)
        sd.update({f"{fpn}fpn_lateral{stage}.weight": t(C, ch, 1, 1), f"{fpn}fpn_lateral{stage}.bias": t(C),
                   f"{fpn}fpn_output{stage}.weight": t(C, C, 3, 3), f"{fpn}fpn_output{stage}.bias": t(C)})
    for p in ("p6", "p7"):  # LastLevelP6P7(256, 256, "p5")
        sd.update({f"{fpn}top_block.{p}.weight": t(C, C, 3, 3), f"{fpn}top_block.{p}.bias": t(C)})
    for j in range(BLOCKS):  # DyConv: DyConv.{0,1,2} = Conv3x3Norm(conv = ModulatedDeformConv with bias, bn = GN)
        b = f"backbone.dyhead_tower.{j}."
        for k in range(3):
            sd.update({b + f"DyConv.{k}.conv.weight": t(C, C, 3, 3), b + f"DyConv.{k}.conv.bias": t(C),
                       b + f"DyConv.{k}.bn.weight": t(C), b + f"DyConv.{k}.bn.bias": t(C)})
        sd.update({b + "AttnConv.1.weight": t(1, C, 1, 1), b + "AttnConv.1.bias": t(1),
                   b + "relu.fc.0.weight": t(C // 4, C), b + "relu.fc.0.bias": t(C // 4),  # DYReLU: nn.Linear
                   b + "relu.fc.2.weight": t(4 * C, C // 4), b + "relu.fc.2.bias": t(4 * C),
                   b + "offset.weight": t(27, C, 3, 3), b + "offset.bias": t(27)})
    sd.update({"head.cls_logits.weight": t(K, C, 1, 1), "head.cls_logits.bias": t(K),  # extra/atss.py ATSSHead
               "head.bbox_pred.weight": t(4, C, 1, 1), "head.bbox_pred.bias": t(4),
               "head.centerness.weight": t(1, C, 1, 1), "head.centerness.bias": t(1)})
    sd.update({f"head.scales.{i}.scale": t(1) for i in range(LEVELS)})  # Scale: FloatTensor([1.0])
    return official, sd


def _check_complete(converted, detector):
    own = detector.state_dict()
    assert sorted(converted) == sorted(own)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in own.items()}


def test_merge_order_round_trip_and_function():
    torch.manual_seed(0)
    swin_w, swin_n = torch.randn(6, 12), torch.randn(12)
    torch.testing.assert_close(unfold_to_swin_merge_order(_to_unfold_order(swin_w)), swin_w)
    torch.testing.assert_close(unfold_to_swin_merge_order(_to_unfold_order(swin_n)), swin_n)
    # the merged features of an image, both ways, give the same projection with the respective weights
    x = torch.randn(2, 3, 4, 6)  # B, C, H, W
    nhwc = x.permute(0, 2, 3, 1)
    swin = torch.cat([nhwc[:, 0::2, 0::2], nhwc[:, 1::2, 0::2], nhwc[:, 0::2, 1::2], nhwc[:, 1::2, 1::2]], -1)
    unfold = F.unfold(x, 2, stride=2).transpose(1, 2)  # B, H/2*W/2, 4C
    mmdet_w = _to_unfold_order(swin_w)
    torch.testing.assert_close(unfold @ mmdet_w.T, swin.reshape(2, -1, 12) @ swin_w.T)
    torch.testing.assert_close(swin.reshape(2, -1, 12) @ unfold_to_swin_merge_order(mmdet_w).T,
                               swin.reshape(2, -1, 12) @ swin_w.T)


def test_mmdet_conversion_maps_every_key():
    official, state = _mmdet_state(_Tensors())
    detector = _detector()
    converted = convert_detector_state_dict(state, format="mmdet")
    _check_complete(converted, detector)
    report = detector.load_foreign_weights(state, format="mmdet")
    assert isinstance(report, LoadReport) and not report.missing and not report.unexpected
    own = detector.state_dict()
    eq = torch.testing.assert_close
    eq(own["backbone.layers.2.downsample.reduction.weight"], official["layers.1.downsample.reduction.weight"])
    eq(own["backbone.layers.3.downsample.norm.weight"], official["layers.2.downsample.norm.weight"])
    eq(own["backbone.layers.2.blocks.1.attn.qkv.weight"], official["layers.2.blocks.1.attn.qkv.weight"])
    eq(own["backbone.layers.0.blocks.0.mlp.fc2.bias"], official["layers.0.blocks.0.mlp.fc2.bias"])
    eq(own["backbone.norm3.weight"], official["norm3.weight"])
    eq(own["neck.fpn.lateral_convs.1.weight"], state["neck.0.lateral_convs.1.conv.weight"])
    eq(own["neck.fpn.fpn_convs.4.bias"], state["neck.0.fpn_convs.4.conv.bias"])
    eq(own["neck.dyhead.blocks.1.spatial_high.conv.weight"],
       state["neck.1.dyhead_blocks.1.spatial_conv_high.conv.weight"])
    eq(own["neck.dyhead.blocks.0.spatial_low.norm.bias"], state["neck.1.dyhead_blocks.0.spatial_conv_low.norm.bias"])
    assert torch.count_nonzero(own["neck.dyhead.blocks.0.spatial_mid.conv.bias"]) == 0  # mmdet's DCN has none
    eq(own["neck.dyhead.blocks.1.offset.weight"], state["neck.1.dyhead_blocks.1.spatial_conv_offset.weight"])
    eq(own["neck.dyhead.blocks.0.scale_attn.conv.weight"], state["neck.1.dyhead_blocks.0.scale_attn_module.1.weight"])
    eq(own["neck.dyhead.blocks.1.task_attn.fc1.weight"],
       state["neck.1.dyhead_blocks.1.task_attn_module.conv1.conv.weight"][:, :, 0, 0])
    eq(own["neck.dyhead.blocks.0.task_attn.fc2.bias"], state["neck.1.dyhead_blocks.0.task_attn_module.conv2.conv.bias"])
    eq(own["head.atss_cls.weight"], state["bbox_head.atss_cls.weight"])
    eq(own["head.scales.3.scale"], state["bbox_head.scales.3.scale"])


def test_dynamichead_conversion_maps_every_key():
    official, state = _dynamichead_state(_Tensors())
    detector = _detector()
    converted = convert_detector_state_dict({"module." + k: v for k, v in state.items()}, format="dynamichead")
    _check_complete(converted, detector)
    report = detector.load_foreign_weights(state, format="dynamichead")
    assert not report.missing and not report.unexpected
    own = detector.state_dict()
    eq = torch.testing.assert_close
    eq(own["backbone.patch_embed.proj.weight"], official["patch_embed.proj.weight"])
    eq(own["backbone.layers.1.downsample.reduction.weight"], official["layers.0.downsample.reduction.weight"])
    eq(own["backbone.norm1.bias"], official["norm1.bias"])
    eq(own["neck.fpn.lateral_convs.0.weight"], state["backbone.backbone.fpn_lateral3.weight"])
    eq(own["neck.fpn.lateral_convs.2.bias"], state["backbone.backbone.fpn_lateral5.bias"])
    eq(own["neck.fpn.fpn_convs.1.weight"], state["backbone.backbone.fpn_output4.weight"])
    eq(own["neck.fpn.fpn_convs.3.weight"], state["backbone.backbone.top_block.p6.weight"])
    eq(own["neck.fpn.fpn_convs.4.bias"], state["backbone.backbone.top_block.p7.bias"])
    eq(own["neck.dyhead.blocks.1.spatial_high.conv.weight"], state["backbone.dyhead_tower.1.DyConv.0.conv.weight"])
    eq(own["neck.dyhead.blocks.1.spatial_mid.conv.bias"], state["backbone.dyhead_tower.1.DyConv.1.conv.bias"])
    eq(own["neck.dyhead.blocks.0.spatial_low.norm.weight"], state["backbone.dyhead_tower.0.DyConv.2.bn.weight"])
    eq(own["neck.dyhead.blocks.0.scale_attn.conv.bias"], state["backbone.dyhead_tower.0.AttnConv.1.bias"])
    eq(own["neck.dyhead.blocks.1.task_attn.fc2.weight"], state["backbone.dyhead_tower.1.relu.fc.2.weight"])
    eq(own["neck.dyhead.blocks.0.offset.bias"], state["backbone.dyhead_tower.0.offset.bias"])
    eq(own["head.atss_reg.weight"], state["head.bbox_pred.weight"])
    eq(own["head.atss_centerness.bias"], state["head.centerness.bias"])
    eq(own["head.scales.2.scale"], state["head.scales.2.scale"].reshape(()))


def test_buffers_dropped_unknown_keys_kept_and_reported():
    _, state = _dynamichead_state(_Tensors())
    state["pixel_mean"] = torch.zeros(3, 1, 1)
    state["backbone.backbone.bottom_up.absolute_pos_embed"] = torch.zeros(1, E, 4, 4)
    converted = convert_detector_state_dict(state, format="dynamichead")
    assert not any(k.endswith("relative_position_index") or k == "pixel_mean" for k in converted)
    assert "backbone.absolute_pos_embed" in converted  # no rule, no place: a strict load names it
    with pytest.raises(WeightsError, match="absolute_pos_embed"):
        _detector().load_foreign_weights(state, format="dynamichead")
    _, mm = _mmdet_state(_Tensors())
    mm["bbox_head.cls_convs.0.conv.weight"] = torch.zeros(C, C, 3, 3)  # an ATSS tower we do not have
    assert "bbox_head.cls_convs.0.conv.weight" in convert_detector_state_dict(mm, format="mmdet")
    with pytest.raises(ValueError, match="format"):
        convert_detector_state_dict(mm, format="detectron2")
