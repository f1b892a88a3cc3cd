"""Foreign detector checkpoints -> our detector's keys (``backbone.``, ``neck.fpn.``, ``neck.dyhead.``, ``head.``).

``convert_detector_state_dict(state, format)`` renames (and where needed reshapes / reorders) a flat state dict; the
detector's ``load_foreign_weights`` then loads it strictly and reports. Keys that no rule recognises keep their name,
so a strict load lists them as unexpected; buffers that we rebuild (Swin ``relative_position_index`` / ``attn_mask``,
detectron2 ``pixel_mean`` / ``pixel_std``) are dropped. A leading ``module.`` (DDP) is stripped.

``format="mmdet"`` -- mmdetection's ``atss_swin-l-p4-w12_fpn_dyhead_ms-2x_coco`` (``ATSS`` detector):

- ``backbone.*``: mmdet ``SwinTransformer``, mapped back to the official Swin layout (the inverse of mmdet's
  ``swin_converter``: ``patch_embed.projection`` -> ``proj``, ``stages`` -> ``layers``, ``attn.w_msa`` -> ``attn``,
  ``ffn.layers.0.0`` / ``ffn.layers.1`` -> ``mlp.fc1`` / ``mlp.fc2``, and the patch-merging ``reduction`` / ``norm``
  channels from ``nn.Unfold`` order back to Swin's x0..x3 concatenation order), then to ours
  (``florence.backbone.convert.microsoft_to_timm``: patch merging moves to the start of the next stage).
  ``norm{i}`` (the per-output norms) keep their names.
- ``neck.0.*``: mmdet ``FPN`` (``lateral_convs.{i}.conv``, ``fpn_convs.{i}.conv``) -> ``neck.fpn.*`` (plain convs).
- ``neck.1.dyhead_blocks.{j}.*``: mmdet ``DyHeadBlock`` -> ``neck.dyhead.blocks.{j}.*``: ``spatial_conv_{high,mid,
  low}`` -> ``spatial_{high,mid,low}``, ``spatial_conv_offset`` -> ``offset``, ``scale_attn_module.1`` ->
  ``scale_attn.conv``, ``task_attn_module.conv{1,2}.conv`` (1x1 convs) -> ``task_attn.fc{1,2}`` (linear, the 1x1
  kernels squeezed). mmdet's DCNs have no bias (a GroupNorm follows); ours get a zero bias, which computes the same.
- ``bbox_head.*``: mmdet ``ATSSHead`` -> ``head.*`` (same names: ``atss_cls``, ``atss_reg``, ``atss_centerness``,
  ``scales.{l}.scale``).

``format="dynamichead"`` -- the official microsoft/DynamicHead detectron2 checkpoints (``ATSS`` meta-architecture,
backbone ``build_retinanet_swint_fpn_dyhead_backbone``: ``DyHead(FPN(SwinTransformer))``):

- ``backbone.backbone.bottom_up.*``: the official Swin layout (``extra/swint.py``; per-output ``norm{i}``) -> ours
  via ``microsoft_to_timm``. Swin backbones only (ResNet ``res*`` keys stay unmapped).
- ``backbone.backbone.fpn_lateral{s}`` / ``fpn_output{s}`` (s = log2 stride: 3, 4, 5) -> ``neck.fpn.lateral_convs.
  {i}`` / ``fpn_convs.{i}`` (i = rank of s); ``backbone.backbone.top_block.p6`` / ``p7`` -> the next two
  ``fpn_convs``. The official FPN computes P7 = conv(relu(P6)): build our FPN with ``relu_before_extra_convs=True``
  for the same outputs.
- ``backbone.dyhead_tower.{j}.*`` -> ``neck.dyhead.blocks.{j}.*``: ``DyConv.0`` (stride 1, applied to the coarser
  level) -> ``spatial_high``, ``DyConv.1`` -> ``spatial_mid``, ``DyConv.2`` (stride 2) -> ``spatial_low``, each
  ``.conv`` / ``.bn`` -> ``.conv`` / ``.norm``; ``AttnConv.1`` -> ``scale_attn.conv``; ``offset`` -> ``offset``;
  ``relu.fc.0`` / ``relu.fc.2`` (DyReLU linears) -> ``task_attn.fc1`` / ``fc2``.
- ``head.*``: the official ``ATSSHead`` (``extra/atss.py``) ``cls_logits`` / ``bbox_pred`` / ``centerness`` ->
  ``head.atss_cls`` / ``atss_reg`` / ``atss_centerness``; ``scales.{l}.scale`` of shape (1,) -> shape ().
"""
from __future__ import annotations

import re
from typing import Callable, Mapping

import torch

from florence.backbone.convert import microsoft_to_timm

__all__ = ["FORMATS", "convert_detector_state_dict", "dynamichead_to_florence", "mmdet_swin_to_microsoft",
           "mmdet_to_florence", "unfold_to_swin_merge_order"]

FORMATS = ("mmdet", "dynamichead")
DROPPED_SUFFIXES = ("relative_position_index", "attn_mask")  # buffers our Swin rebuilds
DROPPED_KEYS = ("pixel_mean", "pixel_std")  # detectron2 preprocessing buffers
_MERGE_ORDER = [0, 2, 1, 3]  # Swin's x0..x3 (offsets (0,0),(1,0),(0,1),(1,1)) <-> nn.Unfold's (0,0),(0,1),(1,0),(1,1)

Rule = tuple[re.Pattern, str, Callable[[torch.Tensor], torch.Tensor] | None]


def _squeeze_1x1(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], v.shape[1]) if v.dim() == 4 else v  # (O, I, 1, 1) -> (O, I)


def _scalar(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(()) if v.numel() == 1 else v


def unfold_to_swin_merge_order(v: torch.Tensor) -> torch.Tensor:
    """Patch-merging ``reduction.weight`` (O, 4C) or ``norm`` (4C,) from mmdet's ``nn.Unfold`` channel order (index
    c*4 + k) to Swin's concatenation order (index j*C + c): the inverse of mmdet's ``correct_unfold_*_order``."""
    lead = v.shape[:-1]
    c = v.shape[-1] // 4
    v = v.reshape(*lead, c, 4)[..., _MERGE_ORDER]  # ..., C, 4 (Unfold tap k -> Swin block j, a self-inverse swap)
    return v.transpose(-1, -2).reshape(*lead, 4 * c)  # ..., 4C in Swin order


def _rename(state: Mapping[str, torch.Tensor], rules: list[Rule]) -> dict[str, torch.Tensor]:
    """Apply the first matching rule to each key; unmatched keys keep their names."""
    out = {}
    for key, value in state.items():
        for pattern, repl, transform in rules:
            match = pattern.fullmatch(key)
            if match:
                key = match.expand(repl)
                value = transform(value) if transform else value
                break
        out[key] = value
    return out


def _drop_buffers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.endswith(DROPPED_SUFFIXES) and k not in DROPPED_KEYS}


def _strip_module(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _swin_subtree(state: Mapping[str, torch.Tensor], prefix: str) -> tuple[dict, dict]:
    """(keys under ``prefix`` with it removed, the other keys)."""
    inside = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return inside, {k: v for k, v in state.items() if not k.startswith(prefix)}


_MMDET_SWIN_RULES: list[Rule] = [
    (re.compile(r"patch_embed\.projection\.(\w+)"), r"patch_embed.proj.\1", None),
    (re.compile(r"stages\.(\d+)\.downsample\.(reduction|norm)\.(\w+)"), r"layers.\1.downsample.\2.\3",
     unfold_to_swin_merge_order),
    (re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.(.+)"), r"layers.\1.blocks.\2.attn.\3", None),
    (re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.0\.0\.(\w+)"), r"layers.\1.blocks.\2.mlp.fc1.\3", None),
    (re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.1\.(\w+)"), r"layers.\1.blocks.\2.mlp.fc2.\3", None),
    (re.compile(r"stages\.(\d+)\.(.+)"), r"layers.\1.\2", None),  # norm1 / norm2 of the blocks
]


def mmdet_swin_to_microsoft(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmdet ``SwinTransformer`` keys (without ``backbone.``) -> the official Swin layout (module docstring)."""
    return _rename(state, _MMDET_SWIN_RULES)


_DYHEAD_MMDET = r"neck\.1\.dyhead_blocks\.(\d+)\."
_DYHEAD_OURS = r"neck.dyhead.blocks.\1."
_MMDET_RULES: list[Rule] = [
    (re.compile(r"neck\.0\.(lateral_convs|fpn_convs)\.(\d+)\.conv\.(\w+)"), r"neck.fpn.\1.\2.\3", None),
    (re.compile(_DYHEAD_MMDET + r"spatial_conv_(high|mid|low)\.(conv|norm)\.(\w+)"), _DYHEAD_OURS + r"spatial_\2.\3.\4",
     None),
    (re.compile(_DYHEAD_MMDET + r"spatial_conv_offset\.(\w+)"), _DYHEAD_OURS + r"offset.\2", None),
    (re.compile(_DYHEAD_MMDET + r"scale_attn_module\.1\.(\w+)"), _DYHEAD_OURS + r"scale_attn.conv.\2", None),
    (re.compile(_DYHEAD_MMDET + r"task_attn_module\.conv([12])\.conv\.(\w+)"), _DYHEAD_OURS + r"task_attn.fc\2.\3",
     _squeeze_1x1),
    (re.compile(r"bbox_head\.(atss_cls|atss_reg|atss_centerness)\.(\w+)"), r"head.\1.\2", None),
    (re.compile(r"bbox_head\.scales\.(\d+)\.scale"), r"head.scales.\1.scale", _scalar),
]


def mmdet_to_florence(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmdetection ATSS + FPN + DyHead + Swin state dict -> ours (module docstring)."""
    state = _drop_buffers(_strip_module(state))
    swin, rest = _swin_subtree(state, "backbone.")
    out = {"backbone." + k: v for k, v in microsoft_to_timm(mmdet_swin_to_microsoft(swin)).items()}
    out.update(_rename(rest, _MMDET_RULES))
    for key, weight in list(out.items()):  # mmdet's DCNs have no bias: ours is zero
        if re.fullmatch(r"neck\.dyhead\.blocks\.\d+\.spatial_(high|mid|low)\.conv\.weight", key):
            out.setdefault(key[: -len("weight")] + "bias", weight.new_zeros(weight.shape[0]))
    return out


_DYCONV = {"0": "high", "1": "mid", "2": "low"}
_TOWER = r"backbone\.dyhead_tower\.(\d+)\."
_TOWER_OURS = r"neck.dyhead.blocks.\1."
_DYNAMICHEAD_RULES: list[Rule] = [
    (re.compile(_TOWER + r"AttnConv\.1\.(\w+)"), _TOWER_OURS + r"scale_attn.conv.\2", None),
    (re.compile(_TOWER + r"offset\.(\w+)"), _TOWER_OURS + r"offset.\2", None),
    (re.compile(_TOWER + r"relu\.fc\.0\.(\w+)"), _TOWER_OURS + r"task_attn.fc1.\2", None),
    (re.compile(_TOWER + r"relu\.fc\.2\.(\w+)"), _TOWER_OURS + r"task_attn.fc2.\2", None),
    (re.compile(r"head\.cls_logits\.(\w+)"), r"head.atss_cls.\1", None),
    (re.compile(r"head\.bbox_pred\.(\w+)"), r"head.atss_reg.\1", None),
    (re.compile(r"head\.centerness\.(\w+)"), r"head.atss_centerness.\1", None),
    (re.compile(r"head\.scales\.(\d+)\.scale"), r"head.scales.\1.scale", _scalar),
]


def _dynamichead_dyconv(key: str) -> str:
    """``backbone.dyhead_tower.{j}.DyConv.{k}.{conv|bn}.*`` -> ours (DyConv 0/1/2 = high/mid/low)."""
    m = re.fullmatch(r"backbone\.dyhead_tower\.(\d+)\.DyConv\.([012])\.(conv|bn)\.(\w+)", key)
    if m is None:
        return key
    j, k, part, leaf = m.groups()
    return f"neck.dyhead.blocks.{j}.spatial_{_DYCONV[k]}.{'norm' if part == 'bn' else 'conv'}.{leaf}"


def _dynamichead_fpn(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Old -> new names of detectron2's FPN (``fpn_lateral{s}``, ``fpn_output{s}``, ``top_block.p6/p7``)."""
    prefix = "backbone.backbone."
    stages = sorted({int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"fpn_lateral(\d+)\.", k))})
    names = {}
    for k in state:
        m = re.fullmatch(re.escape(prefix) + r"(fpn_lateral|fpn_output|top_block\.p)(\d+)\.(\w+)", k)
        if m is None:
            continue
        kind, number, leaf = m.group(1), int(m.group(2)), m.group(3)
        if kind == "top_block.p":  # P6, P7 follow the outputs of the backbone levels
            names[k] = f"neck.fpn.fpn_convs.{len(stages) + number - 6}.{leaf}"
        elif number in stages:
            module = "lateral_convs" if kind == "fpn_lateral" else "fpn_convs"
            names[k] = f"neck.fpn.{module}.{stages.index(number)}.{leaf}"
    return names


def dynamichead_to_florence(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official DynamicHead (detectron2) ATSS + FPN + DyHead + Swin state dict -> ours (module docstring)."""
    state = _drop_buffers(_strip_module(state))
    swin, rest = _swin_subtree(state, "backbone.backbone.bottom_up.")
    out = {"backbone." + k: v for k, v in microsoft_to_timm(swin).items()}
    fpn = _dynamichead_fpn(rest)
    rest = {fpn.get(k, _dynamichead_dyconv(k)): v for k, v in rest.items()}
    out.update(_rename(rest, _DYNAMICHEAD_RULES))
    return out


def convert_detector_state_dict(state: Mapping[str, torch.Tensor], format: str) -> dict[str, torch.Tensor]:
    """A foreign detector state dict in our detector's keys; ``format`` is "mmdet" or "dynamichead"."""
    if format == "mmdet":
        return mmdet_to_florence(state)
    if format == "dynamichead":
        return dynamichead_to_florence(state)
    raise ValueError(f"detector weight format must be one of {FORMATS} (or 'florence'), got {format!r}")
