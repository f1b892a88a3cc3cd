"""The Florence detector (SPEC §5): a tower's pyramid -> FPN -> Dynamic Head -> ATSS (architecture ``detector``).

::

    images (B, 3, H, W) -> backbone.forward_intermediates (stages ``in_indices``; strides 8, 16, 32 for 1-2-3)
        -> FPN (P3..P7: ``num_outs`` levels of ``channels``, strides 8..128) -> DyHead (``num_blocks`` blocks)
        -> ATSS head: per level l, cls (B, K, H_l, W_l), reg (B, 4, H_l, W_l), ctr (B, 1, H_l, W_l)

Build one from a named config (``configs/models/dyhead_atss_coswin_*.json``) and any pre-trained image tower::

    create_model("dyhead_atss_coswin_test", backbone="runs/demo/pretrain/final", num_classes=10,
                 class_names=[...], neck={"num_blocks": 2})

The tower gets Swin-Det's per-level output norms (``out_norms``; fresh LayerNorms when the tower was pre-trained
without them) and loses what detection does not use (the stages after the last level, the final norm, the
classifier). ``save_pretrained`` / ``florence.from_pretrained`` round-trip the whole detector; the bundle config
carries the tower's name and overrides, so loading needs no other bundle. ``load_weights(model, ckpt,
format="mmdet" | "dynamichead")`` reads mmdetection's ``atss_swin-l-p4-w12_fpn_dyhead`` and the official DynamicHead
(detectron2) layouts (``florence.adapters.detection_convert``).

Inputs follow mmdetection's detection preprocessing (``input``): keep-ratio resize to ``scale`` = (long, short),
normalisation with the tower's mean / std (``preprocess``), zero padding to a multiple of ``size_divisor``.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from florence.adapters.deform_conv import set_deform_impl
from florence.adapters.detection_convert import convert_detector_state_dict
from florence.adapters.dyhead import DyHead
from florence.adapters.fpn import FPN
from florence.bundle import BundleMixin
from florence.factory import create_model, load_weights
from florence.heads.atss import ATSSHead
from florence.registry import register_architecture
from florence.weights import LoadReport, WeightsError, read_state_dict

NECK_DEFAULTS = dict(channels=256, num_outs=5, relu_before_extra_convs=False, num_blocks=6, init="official",
                     zero_init_offset=False, high_offsets="official")
HEAD_DEFAULTS = dict(octave_base_scale=8, pred_kernel_size=1, prior_prob=0.01)
TEST_DEFAULTS = dict(score_thr=0.05, nms_pre=1000, iou_threshold=0.6, max_per_img=100)
INPUT_DEFAULTS = dict(scale=[1333, 800], size_divisor=128)


def _section(name: str, given: dict[str, Any] | None, defaults: dict[str, Any]) -> dict[str, Any]:
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"detector {name}: unknown keys {unknown} (known: {sorted(defaults)})")
    return {**defaults, **given}


def detection_tower(tower: nn.Module, in_indices: Sequence[int]) -> nn.Module:
    """``tower`` made ready for the pyramid: Swin-Det output norms on the levels ``in_indices`` (added as fresh
    LayerNorms when the tower has none: the tower is rebuilt with ``out_norms=True`` and its weights loaded), the
    stages after the last level, the final norm, the classifier and the unused level norms removed."""
    spec = getattr(tower, "florence_config", None)
    if not hasattr(tower, "forward_intermediates") or not hasattr(tower, "out_norms") or spec is None:
        raise TypeError(f"{type(tower).__name__} is not a florence image tower (forward_intermediates, out_norms)")
    if not tower.out_norms:
        preprocess = getattr(tower, "preprocess", None)
        rebuilt = create_model(spec["name"], **{**spec.get("overrides", {}), "out_norms": True})
        missing, unexpected = rebuilt.load_state_dict(tower.state_dict(), strict=False)
        new = {k for k in missing if k.split(".")[0].startswith("norm") and k.split(".")[0] != "norm"}
        if set(missing) - new or unexpected:
            raise WeightsError(f"adding output norms to {spec['name']}: missing {sorted(set(missing) - new)}, "
                               f"unexpected {sorted(unexpected)}")
        if preprocess is not None:
            rebuilt.preprocess = dict(preprocess)
        tower = rebuilt.train(tower.training)
    kept = tower.prune_intermediate_layers(list(in_indices), prune_norm=True, prune_head=True)
    for i in range(tower.num_stages):
        if i not in kept and hasattr(tower, f"norm{i}"):
            delattr(tower, f"norm{i}")
    return tower


@register_architecture("detector")
class Detector(BundleMixin, nn.Module):
    """Backbone + FPN + Dynamic Head + ATSS head (module docstring).

    Args:
        backbone: a florence image tower (CoSwin / Swin of any size) built by ``create_model``.
        num_classes: K, the detector's classes (1 for a class-agnostic proposal network).
        class_names: K names (in the bundle, for ``florence detect`` and the COCO category list).
        cat_ids: K dataset category ids (COCO ids, contiguous index -> id; default 1..K).
        in_indices: backbone stages feeding the FPN (1, 2, 3 = strides 8, 16, 32).
        neck: FPN / DyHead settings (``NECK_DEFAULTS``): ``channels``, ``num_outs``, ``relu_before_extra_convs``
            (False: mmdet's config; True: the official DynamicHead FPN, P7 = conv(relu(P6))), ``num_blocks``
            (0 = ATSS on the FPN alone, the paper's ablation), ``init`` ("official" | "mmdet"), ``zero_init_offset``,
            ``high_offsets`` ("official" | "slice" | "resize", SPEC §10.2 item 3).
        head: ATSS settings (``HEAD_DEFAULTS``).
        test: post-processing (``TEST_DEFAULTS``: score ≥ 0.05, top 1000 per level, NMS 0.6, ≤ 100 per image).
        input: detection preprocessing (``INPUT_DEFAULTS``: keep-ratio resize scale (long, short), pad multiple).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, class_names: Sequence[str] | None = None,
                 cat_ids: Sequence[int] | None = None, in_indices: Sequence[int] = (1, 2, 3),
                 neck: dict[str, Any] | None = None, head: dict[str, Any] | None = None,
                 test: dict[str, Any] | None = None, input: dict[str, Any] | None = None) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for num_classes={num_classes}")
        if cat_ids is not None and len(cat_ids) != num_classes:
            raise ValueError(f"{len(cat_ids)} category ids for num_classes={num_classes}")
        self.neck_cfg = _section("neck", neck, NECK_DEFAULTS)
        self.head_cfg = _section("head", head, HEAD_DEFAULTS)
        self.test_cfg = _section("test", test, TEST_DEFAULTS)
        self.input_cfg = _section("input", input, INPUT_DEFAULTS)
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.cat_ids = list(cat_ids) if cat_ids is not None else list(range(1, num_classes + 1))
        self.in_indices = tuple(int(i) for i in in_indices)
        preprocess = getattr(backbone, "preprocess", None) or backbone.default_preprocess
        self.backbone = detection_tower(backbone, self.in_indices)
        self.preprocess = dict(preprocess)
        n = self.neck_cfg
        in_channels = [self.backbone.feature_info[i]["num_chs"] for i in self.in_indices]
        strides = [self.backbone.feature_info[i]["reduction"] for i in self.in_indices]
        self.strides = [strides[0] * 2 ** level for level in range(n["num_outs"])]  # 8, 16, ..., 128
        self.neck = nn.ModuleDict({
            "fpn": FPN(in_channels, n["channels"], num_outs=n["num_outs"],
                       relu_before_extra_convs=n["relu_before_extra_convs"]),
            "dyhead": DyHead(n["channels"], num_blocks=n["num_blocks"], init=n["init"],
                             zero_init_offset=n["zero_init_offset"], high_offsets=n["high_offsets"]),
        })
        self.head = ATSSHead(num_classes, in_channels=n["channels"], num_levels=n["num_outs"], strides=self.strides,
                             **self.head_cfg)

    # -- bundles and named configs (florence.registry) ---------------------------------------------------------

    default_weight_format = "florence"

    def bundle_config(self) -> dict[str, Any]:
        spec = self.backbone.florence_config
        return {"backbone": {"name": spec["name"], "overrides": dict(spec.get("overrides", {}))},
                "num_classes": self.num_classes, "class_names": self.class_names, "cat_ids": self.cat_ids,
                "in_indices": list(self.in_indices), "neck": dict(self.neck_cfg), "head": dict(self.head_cfg),
                "test": dict(self.test_cfg), "input": copy.deepcopy(self.input_cfg)}

    @classmethod
    def from_config(cls, config: dict[str, Any], backbone: nn.Module | None = None) -> "Detector":
        """A named JSON config (``configs/models/dyhead_atss_*.json``); ``backbone`` (a pre-trained tower, as
        ``create_model(..., backbone=bundle)`` resolves it) replaces the config's fresh tower."""
        config = {k: v for k, v in config.items() if not k.startswith("_") and k != "name"}
        spec = config.pop("backbone")
        if backbone is None:
            backbone = create_model(spec["name"], **spec.get("overrides", {}))
        return cls(backbone, **config)

    @classmethod
    def from_bundle_config(cls, config: dict[str, Any], preprocess: dict[str, Any] | None,
                           directory: Path | None) -> "Detector":
        config = dict(config)
        spec = config.pop("backbone")
        backbone = create_model(spec["name"], **spec.get("overrides", {}))
        if preprocess is not None:
            backbone.preprocess = dict(preprocess)
        return cls(backbone, **config)

    def load_foreign_weights(self, src, *, format: str, strict: bool = True) -> LoadReport:
        """mmdetection ("mmdet") or official DynamicHead ("dynamichead") detector checkpoints, converted to our keys
        and loaded as ``florence.load_weights`` loads our own (strict by default, a ``LoadReport``)."""
        return load_weights(self, convert_detector_state_dict(read_state_dict(src), format=format), strict=strict)

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{k}" for k in getattr(self.backbone, "no_weight_decay", lambda: set())()}

    def set_deform_impl(self, impl: str) -> None:
        """The DyHead's deformable-conv kernel: "auto" (ours on CPU, torchvision on GPU), "torch", "torchvision"."""
        set_deform_impl(self, impl)

    def fsdp_wrap_modules(self) -> list[nn.Module]:
        units = list(self.backbone.fsdp_wrap_modules()) if hasattr(self.backbone, "fsdp_wrap_modules") else []
        return units + list(self.neck["dyhead"].blocks)

    # -- forward -----------------------------------------------------------------------------------------------

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> ``num_outs`` maps (B, channels, H_l, W_l), strides 8 .. 128."""
        levels = self.backbone.forward_intermediates(images, indices=list(self.in_indices), output_fmt="NCHW",
                                                     intermediates_only=True)  # strides 8, 16, 32
        return self.neck["dyhead"](self.neck["fpn"](levels))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw head outputs, levels flattened and concatenated (row-major per level, P3 first; N = sum H_l W_l):
        ``cls`` (B, N, K) logits, ``reg`` (B, N, 4) deltas, ``ctr`` (B, N) centerness logits, and the level
        sizes ``level_sizes`` (B, L, 2) (repeated per image, so the dict splits along the batch)."""
        cls, reg, ctr = self.head(self.features(images))
        sizes = torch.tensor([list(c.shape[-2:]) for c in cls], dtype=torch.int64, device=images.device)
        return {
            "cls": torch.cat([c.flatten(2).transpose(1, 2) for c in cls], dim=1),  # B, N, K
            "reg": torch.cat([r.flatten(2).transpose(1, 2) for r in reg], dim=1),  # B, N, 4
            "ctr": torch.cat([c.flatten(1) for c in ctr], dim=1),  # B, N
            "level_sizes": sizes.expand(images.shape[0], -1, -1),  # B, L, 2
        }

    def loss(self, outputs: dict[str, torch.Tensor], image_sizes: torch.Tensor, boxes: torch.Tensor,
             labels: torch.Tensor, sync_normalizers: bool = False) -> dict[str, torch.Tensor]:
        """ATSS losses of ``forward``'s outputs against padded targets (boxes (B, M, 4) xyxy, labels (B, M), -1 pad).
        ``sync_normalizers``: average the positive counts over the ranks (mmdet under DDP)."""
        sizes = [tuple(int(v) for v in s) for s in outputs["level_sizes"][0].tolist()]
        return self.head.loss_flat(outputs["cls"], outputs["reg"], outputs["ctr"], sizes, image_sizes, boxes, labels,
                                   pad_divisor=self.input_cfg["size_divisor"], sync_normalizers=sync_normalizers)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, image_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Detections per image: ``boxes`` (n, 4) xyxy in the input tensor's pixels (clipped to ``image_sizes``),
        ``scores`` (n,), ``labels`` (n,) contiguous class indices."""
        cls, reg, ctr = self.head(self.features(images))
        return self.head.predict(cls, reg, ctr, image_sizes, **self.test_cfg)
