"""Action recognition on a video tower: backbone + I3D-style head (mmaction2 ``Recognizer3D`` + ``I3DHead``).

``VideoClassifier(backbone, num_classes)``: ``model(videos (B, 3, T, H, W)) -> logits (B, K)``. The backbone is

- a :class:`~florence.backbone.video_coswin.VideoCoSwin` (Video CoSwin or Video Swin): features pooled over (T', H',
  W') by the tower (``forward_head(pre_logits=True)``), or
- a 2D image tower (CoSwin / Swin): the **per-frame baseline** — every frame through the tower, the pooled features
  averaged over frames (it cannot see the order of frames).

Head: dropout (I3D: 0.5) then ``Linear(num_features, K)`` (``fc``; mmaction2's ``cls_head.fc_cls``), trunc-normal
(std 0.02) init as timm's classifiers (mmaction2's I3DHead uses std 0.01). ``model.preprocess`` is the clip
preprocessing ``{input_size: [3, T, S, S], mean, std, interpolation, crop_pct, clip_len, frame_interval}`` that the
data loaders read.

``build_video_classifier`` makes one the way the ``action`` task and the demo do: a named video tower inflated from a
2D bundle or checkpoint (``inflate=``), or a 2D bundle's tower for the per-frame baseline (``frames=True``). Bundles
save the tower's name and overrides, the head and the class names; ``florence.from_pretrained`` rebuilds them.
``load_foreign_weights(src, format="mmaction2")`` loads an mmaction2 recognizer checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from florence.backbone.video_coswin import VideoCoSwin
from florence.bundle import BundleMixin
from florence.factory import create_model, image_tower
from florence.registry import register_architecture
from florence.weights import LoadReport, WeightsError, read_state_dict

__all__ = ["VideoClassifier", "build_video_classifier", "video_preprocess"]


def video_preprocess(image_preprocess: dict[str, Any], *, clip_len: int, frame_interval: int,
                     size: int | None = None) -> dict[str, Any]:
    """Clip preprocessing from an image preprocessing (mean / std / interpolation kept; size = ``size`` or the image
    input size)."""
    side = int(size or image_preprocess["input_size"][-1])
    return {"input_size": [3, int(clip_len), side, side], "mean": list(image_preprocess["mean"]),
            "std": list(image_preprocess["std"]), "interpolation": image_preprocess.get("interpolation", "bilinear"),
            "crop_pct": 1.0, "clip_len": int(clip_len), "frame_interval": int(frame_interval)}


@register_architecture("video_classifier")
class VideoClassifier(BundleMixin, nn.Module):
    """Video tower (or a 2D tower applied per frame) + dropout + linear head (module docstring)."""

    def __init__(self, backbone: nn.Module, num_classes: int, *, class_names: Sequence[str] | None = None,
                 drop_rate: float = 0.5, preprocess: dict[str, Any] | None = None) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for num_classes={num_classes}")
        if getattr(backbone, "florence_config", None) is None:
            raise TypeError(f"{type(backbone).__name__} was not built by florence.create_model; it cannot be saved")
        if getattr(backbone, "num_classes", 0):
            backbone.reset_classifier(0)
        self.backbone = backbone
        self.frames_mode = not isinstance(backbone, VideoCoSwin)
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.drop_rate = drop_rate
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(backbone.num_features, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)
        if preprocess is None:
            base = getattr(backbone, "preprocess", None) or backbone.default_preprocess
            preprocess = base if "clip_len" in base else video_preprocess(base, clip_len=16, frame_interval=2)
        self.preprocess = dict(preprocess)

    # -- bundles -----------------------------------------------------------------------------------------------

    default_weight_format = "florence"

    def bundle_config(self) -> dict[str, Any]:
        spec = self.backbone.florence_config
        return {"backbone": {"name": spec["name"], "overrides": dict(spec.get("overrides", {}))},
                "num_classes": self.num_classes, "class_names": self.class_names, "drop_rate": self.drop_rate}

    @classmethod
    def from_bundle_config(cls, config: dict[str, Any], preprocess: dict[str, Any] | None,
                           directory: Path | None) -> "VideoClassifier":
        config = dict(config)
        spec = config.pop("backbone")
        backbone = create_model(spec["name"], **spec.get("overrides", {}))
        return cls(backbone, preprocess=preprocess, **config)

    def load_foreign_weights(self, src, *, format: str, strict: bool = True) -> LoadReport:
        """An mmaction2 recognizer checkpoint (``format="mmaction2"``: ``backbone.*`` of Video Swin, ``cls_head.fc_cls``
        -> ``fc``), strict by default."""
        if format != "mmaction2" or self.frames_mode:
            raise ValueError(f"VideoClassifier loads mmaction2 recognizer checkpoints into a video tower, not "
                             f"{format!r}")
        raw = read_state_dict(src) if not isinstance(src, dict) else src
        head = {k.removeprefix("cls_head.fc_cls."): v for k, v in raw.items() if k.startswith("cls_head.fc_cls.")}
        tower = {k: v for k, v in raw.items() if not k.startswith("cls_head.")}
        report = self.backbone.load_foreign_weights(tower, format="mmaction2", strict=strict)
        if head and head.get("weight", torch.empty(0)).shape == self.fc.weight.shape:
            self.fc.load_state_dict(head)
            report.loaded = sorted(report.loaded + ["fc.weight", "fc.bias"])
        elif strict:
            raise WeightsError(f"{src if not isinstance(src, dict) else 'state dict'}: cls_head.fc_cls does not fit "
                               f"fc {tuple(self.fc.weight.shape)}")
        return report

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def fsdp_wrap_modules(self) -> list[nn.Module]:
        return self.backbone.fsdp_wrap_modules()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    # -- forwards ----------------------------------------------------------------------------------------------

    def features(self, videos: torch.Tensor) -> torch.Tensor:
        """``(B, 3, T, H, W)`` -> pooled ``(B, num_features)``."""
        if videos.ndim != 5:
            raise ValueError(f"expected clips (B, C, T, H, W), got shape {tuple(videos.shape)}")
        if not self.frames_mode:
            return self.backbone.forward_head(self.backbone.forward_features(videos), pre_logits=True)
        B, C, T, H, W = videos.shape
        frames = videos.transpose(1, 2).reshape(B * T, C, H, W)  # B*T, C, H, W
        pooled = self.backbone.forward_head(self.backbone.forward_features(frames), pre_logits=True)  # B*T, F
        return pooled.view(B, T, -1).mean(1)  # B, F

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        """``(B, 3, T, H, W)`` -> logits ``(B, num_classes)``."""
        return self.fc(self.dropout(self.features(videos)))


def build_video_classifier(tower: str | nn.Module, num_classes: int, *, inflate: str | Path | nn.Module | None = None,
                           inflate_format: str = "inflate", frames: bool = False,
                           class_names: Sequence[str] | None = None, drop_rate: float = 0.5,
                           tower_overrides: dict[str, Any] | None = None, clip_len: int | None = None,
                           frame_interval: int | None = None, size: int | None = None) -> VideoClassifier:
    """A new classifier (fresh head).

    - ``frames=False``: ``tower`` is a video tower name (``video_coswin_tiny``) built with ``tower_overrides``, its
      weights inflated from ``inflate`` (a 2D bundle, module or checkpoint; ``inflate_format`` "inflate" or
      "inflate-microsoft") when given; preprocessing: the 2D bundle's mean / std when there is one.
    - ``frames=True``: ``tower`` is a 2D tower (bundle directory, name or module; ``tower_overrides`` are its training
      settings) applied per frame.

    ``clip_len`` / ``frame_interval`` / ``size`` set the clip preprocessing (default: the tower's).
    """
    overrides = dict(tower_overrides or {})
    if frames:
        if inflate is not None:
            raise ValueError("frames=True applies a 2D tower per frame; there is nothing to inflate")
        backbone = image_tower(tower, **overrides)
        base = getattr(backbone, "preprocess", None) or backbone.default_preprocess
    else:
        backbone = tower if isinstance(tower, nn.Module) else create_model(str(tower), **overrides)
        if not isinstance(backbone, VideoCoSwin):
            raise ValueError(f"{tower!r} is not a video tower (florence models video_); use frames=True for a 2D one")
        base = backbone.default_preprocess
        if inflate is not None:
            source = image_tower(inflate) if not isinstance(inflate, nn.Module) and Path(inflate).is_dir() else inflate
            backbone.inflate_report = backbone.load_foreign_weights(source, format=inflate_format)
            image_pre = getattr(source, "preprocess", None)
            if image_pre:  # the 2D bundle's normalisation
                base = {**base, "mean": image_pre["mean"], "std": image_pre["std"]}
    clip_len = clip_len or int(base.get("clip_len", 16))
    frame_interval = frame_interval or int(base.get("frame_interval", 2))
    preprocess = video_preprocess(base, clip_len=clip_len, frame_interval=frame_interval, size=size)
    return VideoClassifier(backbone, num_classes, class_names=class_names, drop_rate=drop_rate, preprocess=preprocess)

