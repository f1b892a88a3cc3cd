"""Action-recognition fine-tuning (``task: action``; Florence §2.6 / Video Swin's recipe, SPEC §7).

- model: a video tower (``model.name: video_coswin_tiny``, ``model.overrides``: its settings, e.g. ``window_size``,
  ``drop_path_rate``) inflated from a pre-trained 2D tower (``model.backbone``: a UniCL or image-tower bundle, or a
  Swin / CoSwin checkpoint file, ``task.inflate_format``), with a new I3D head (dropout ``task.drop_rate``, linear);
  or a 2D tower applied per frame (``task.frames: true``, ``model.backbone`` the 2D bundle: the baseline that cannot
  see motion); or a video-classifier bundle to continue (``model.pretrained``). Clip preprocessing: ``task.clip_len``
  frames every ``task.frame_interval`` at ``task.size`` px (defaults: the tower's);
- data: ``florence.data.video`` (Kinetics-style annotations, ``path label`` lists or class folders, decoded with
  PyAV), clips sampled as mmaction2's ``SampleFrames`` and augmented consistently over the frames;
- loss: cross-entropy with label smoothing (``task.label_smoothing``);
- evaluation: ``task.eval_clips`` x ``task.eval_crops`` views per video (4 x 3), probabilities averaged, top-1 /
  top-5 / mean-per-class on ``eval.source: {type: video, annotations, videos[, classes]}`` (``florence eval action``
  computes the same).

The backbone LR multiplier (Video Swin: 0.1) is ``optim.lr_mult: {backbone: 0.1}``; drop path ``model.overrides:
{drop_path_rate: ...}``; bf16, DDP / FSDP, exact resume and periodic evaluation are the engine's, as for every task.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from florence.adapters.action_eval import evaluate_action
from florence.adapters.video_classifier import VideoClassifier, build_video_classifier
from florence.bundle import from_pretrained
from florence.data.video import build_video_train_loader, read_video_annotations, training_lists, \
    validate_video_data, video_eval_loader
from florence.engine.config import ConfigError
from florence.engine.distributed import DistEnv
from florence.engine.task import Task
from florence.registry import register_task

EVAL_SOURCE_KEYS = {"type", "annotations", "videos", "classes"}


@dataclass
class ActionOptions:
    num_classes: int | None = None  # classes of the head (default: the training source's class count)
    label_smoothing: float = 0.1  # cross-entropy label smoothing
    drop_rate: float = 0.5  # dropout before the linear head (I3D)
    frames: bool = False  # true: model.backbone is a 2D tower applied per frame, features averaged (baseline)
    inflate_format: str = "inflate"  # inflate (timm layout, bundles) | inflate-microsoft (official Swin layout)
    clip_len: int | None = None  # frames per clip (default: the tower's)
    frame_interval: int | None = None  # sampling stride between a clip's frames (default: the tower's)
    size: int | None = None  # crop size in pixels (default: the tower's / the 2D bundle's)
    eval_clips: int = 4  # temporal clips per test video
    eval_crops: int = 3  # spatial crops per clip (1 = centre, 3 = ThreeCrop)


def check_video_eval_source(source: dict) -> None:
    """``eval.source`` of an action run: ``{type: video, annotations, videos[, classes]}``."""
    if not isinstance(source, dict) or source.get("type") != "video":
        raise ConfigError("eval.source: the action task evaluates on {type: video, annotations: FILE, videos: DIR}")
    unknown = sorted(set(source) - EVAL_SOURCE_KEYS)
    if unknown:
        raise ConfigError(f"eval.source.{unknown[0]}: unknown key (known: {sorted(EVAL_SOURCE_KEYS)})")
    if not isinstance(source.get("videos"), str):
        raise ConfigError("eval.source.videos: required (a directory)")


@register_task("action")
class ActionTask(Task):
    """Fine-tune a video classifier (inflated Video CoSwin or the per-frame 2D baseline) with cross-entropy."""

    Options = ActionOptions
    supports_grad_cache = True  # logits are per clip

    def __init__(self, cfg, options: ActionOptions) -> None:
        super().__init__(cfg, options)
        self.lists = None  # the training annotations, read once: for the class names, then for the loader
        self.eval_videos = None  # the evaluation annotations, read at the first evaluation

    def validate(self) -> None:
        m, o = self.cfg.model, self.options
        if m.config is not None or m.tokenizer or m.train_tokenizer_vocab or m.context_length:
            raise ConfigError("model: the action task takes model.name (a video tower) + model.backbone (2D weights), "
                              "or model.pretrained")
        if m.pretrained is None:
            if o.frames and m.backbone is None:
                raise ConfigError("model.backbone: task.frames applies a 2D tower per frame; give its bundle")
            if not o.frames and m.name is None:
                raise ConfigError("model.name: give a video tower (florence models video_) or model.pretrained")
        if not 0 <= o.label_smoothing < 1:
            raise ConfigError("task.label_smoothing: must be in [0, 1)")
        if o.eval_crops not in (1, 3):
            raise ConfigError("task.eval_crops: 1 (centre) or 3 (ThreeCrop)")
        if o.eval_clips < 1:
            raise ConfigError("task.eval_clips: must be >= 1")
        self.validate_data()

    def validate_data(self) -> None:
        validate_video_data(self.cfg.data, key="data")
        if self.cfg.eval.source is not None:
            check_video_eval_source(self.cfg.eval.source)

    # -- model --------------------------------------------------------------------------------------------------

    def class_names(self) -> list[str] | None:
        """The class names of the single training source (None for several)."""
        self.lists = training_lists(self.cfg.data)
        return self.lists[0].class_names if len(self.lists) == 1 else None

    def build_model(self, env: DistEnv, run_dir: Path) -> nn.Module:
        m, o = self.cfg.model, self.options
        if m.pretrained is not None:
            model = from_pretrained(m.pretrained)
            if not isinstance(model, VideoClassifier):
                raise ConfigError(f"model.pretrained={m.pretrained}: a {type(model).__name__}, not a video classifier")
            return model.train()
        names = self.class_names()
        num_classes = o.num_classes or (len(names) if names else None)
        if num_classes is None:
            raise ConfigError("task.num_classes: give it (the training data does not name its classes)")
        if names is not None and len(names) != num_classes:
            names = None
        tower = m.backbone if o.frames else m.name
        model = build_video_classifier(tower, num_classes, inflate=None if o.frames else m.backbone,
                                       inflate_format=o.inflate_format, frames=o.frames, class_names=names,
                                       drop_rate=o.drop_rate, tower_overrides=m.overrides, clip_len=o.clip_len,
                                       frame_interval=o.frame_interval, size=o.size)
        return model.train()

    def build_loader(self, model: nn.Module, env: DistEnv, run_dir: Path, micro_batch: int):
        data_cfg = {"seed": self.cfg.seed, **self.cfg.data, "batch_size": micro_batch}
        return build_video_train_loader(data_cfg, preprocess=model.preprocess, rank=env.rank,
                                        world_size=env.world_size, run_dir=run_dir, lists=self.lists)

    # -- loss ---------------------------------------------------------------------------------------------------

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"logits": model(batch["videos"])}  # B, K

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]):
        logits = outputs["logits"]
        loss = F.cross_entropy(logits, batch["labels"], label_smoothing=self.options.label_smoothing)
        return loss, {"train_top1": (logits.detach().argmax(-1) == batch["labels"]).float().mean()}

    # -- evaluation ---------------------------------------------------------------------------------------------

    def evaluate(self, model: nn.Module, env: DistEnv, run_dir: Path, step: int) -> dict[str, float]:
        """Top-1 / top-5 / mean-per-class over ``eval_clips`` x ``eval_crops`` views on ``eval.source`` (first
        ``eval.max_images`` videos)."""
        ev, o = self.cfg.eval, self.options
        if ev.source is None:
            return {}
        s = ev.source
        if self.eval_videos is None:
            self.eval_videos = read_video_annotations(s.get("annotations"), s["videos"], classes=s.get("classes"))
        loader = video_eval_loader(self.eval_videos, preprocess=model.preprocess, num_clips=o.eval_clips,
                                   num_crops=o.eval_crops, batch_size=max(1, ev.batch_size // (o.eval_clips *
                                                                                              o.eval_crops)),
                                   max_videos=ev.max_images)
        return evaluate_action(model, loader, device=env.device)["metrics"]

    def describe(self) -> str:
        return "task action (video classifier, cross-entropy)"
