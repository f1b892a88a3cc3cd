"""Detection fine-tuning (``task: detection``; SPEC §5): the DyHead / ATSS detector on COCO-format data.

- model: a named detector config (``model.name: dyhead_atss_coswin_tiny``) on a pre-trained tower
  (``model.backbone``: a dual-encoder bundle, whose image encoder is taken, or an image-tower bundle) or a fresh one;
  or a detector bundle to continue (``model.pretrained``). ``model.overrides`` change the named config (``neck:
  {num_blocks: 0}``, ``input: {scale: [...]}``, ``test: {...}``). The class names and COCO category ids come from the
  training annotations and travel in the bundle;
- data: ``florence.data.detection`` (instances JSON + image folder; keep-ratio multi-scale resize, flip, padding);
- loss: ATSS (sigmoid focal, GIoU weighted by centerness targets, centerness BCE), summed;
- evaluation: the 12 COCO stats on ``eval.source: {type: coco, annotations: ..., images: ...}`` at the model's test
  scale (``florence eval detection`` computes the same), e.g. ``eval.best_metric: AP``.

Per-module LR multipliers (``optim.lr_mult: {backbone: 0.1}``), freezing (``optim.freeze: [backbone]``), EMA, bf16,
DDP / FSDP, exact resume and the best checkpoint are engine features that apply here as to every task.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from florence.adapters.detection_eval import evaluate_detector
from florence.bundle import from_pretrained
from florence.data.detection import CocoDetection, build_detection_train_loader, validate_detection_data
from florence.engine.config import ConfigError
from florence.engine.distributed import DistEnv
from florence.engine.task import Task
from florence.factory import create_model
from florence.registry import register_task

EVAL_SOURCE_KEYS = {"type", "annotations", "images"}


@dataclass
class DetectionOptions:
    deform_impl: str = "auto"  # DyHead deformable conv: auto (ours on CPU, torchvision on GPU) | torch | torchvision


def _check_eval_source(source: dict) -> None:
    if not isinstance(source, dict) or source.get("type") != "coco":
        raise ConfigError("eval.source: the detection task evaluates on {type: coco, annotations: FILE, images: DIR}")
    unknown = sorted(set(source) - EVAL_SOURCE_KEYS)
    if unknown:
        raise ConfigError(f"eval.source.{unknown[0]}: unknown key (known: {sorted(EVAL_SOURCE_KEYS)})")
    for key in ("annotations", "images"):
        if not isinstance(source.get(key), str):
            raise ConfigError(f"eval.source.{key}: required (a path)")


@register_task("detection")
class DetectionTask(Task):
    """Fine-tune (or train) a DyHead / ATSS detector."""

    Options = DetectionOptions
    supports_grad_cache = True  # outputs are per image; the loss normalises over the whole batch either way

    def __init__(self, cfg, options: DetectionOptions) -> None:
        super().__init__(cfg, options)
        self.model: nn.Module | None = None  # the plain detector (its loss needs no parameters: safe under DDP)
        self.sync_normalizers = False  # several ranks: positive counts averaged over them, as mmdet

    def validate(self) -> None:
        m = self.cfg.model
        if m.config is not None or m.tokenizer or m.train_tokenizer_vocab or m.context_length:
            raise ConfigError("model: the detection task takes model.name (+ model.backbone) or model.pretrained")
        if m.pretrained is None and m.name is None:
            raise ConfigError("model.name: give a detector config (florence models dyhead) or model.pretrained")
        if self.options.deform_impl not in ("auto", "torch", "torchvision"):
            raise ConfigError("task.deform_impl: auto | torch | torchvision")
        self.validate_data()

    def validate_data(self) -> None:
        validate_detection_data(self.cfg.data, key="data")
        if self.cfg.eval.source is not None:
            _check_eval_source(self.cfg.eval.source)

    # -- model --------------------------------------------------------------------------------------------------

    def build_model(self, env: DistEnv, run_dir: Path) -> nn.Module:
        m, data = self.cfg.model, self.cfg.data
        train = CocoDetection(data["annotations"], data["images"], class_subset=data.get("class_subset"),
                              class_agnostic=data.get("class_agnostic", False), validate_images=False)
        names, cat_ids = train.class_names, train.cat_ids
        if m.pretrained is not None:
            model = from_pretrained(m.pretrained)
            if model.num_classes != len(names):
                raise ConfigError(f"model.pretrained={m.pretrained}: {model.num_classes} classes, the training "
                                  f"annotations {len(names)}")
        else:
            overrides = {**m.overrides, "num_classes": len(names), "class_names": names, "cat_ids": cat_ids}
            if m.backbone is not None:
                overrides["backbone"] = m.backbone
            model = create_model(m.name, **overrides)
        model.set_deform_impl(self.options.deform_impl)
        self.model, self.sync_normalizers = model, env.world_size > 1
        return model.train()

    def build_loader(self, model: nn.Module, env: DistEnv, run_dir: Path, micro_batch: int):
        data_cfg = {"seed": self.cfg.seed, "size_divisor": model.input_cfg["size_divisor"], **self.cfg.data,
                    "batch_size": micro_batch}
        return build_detection_train_loader(data_cfg, preprocess=model.preprocess, rank=env.rank,
                                            world_size=env.world_size, run_dir=run_dir)

    # -- loss ---------------------------------------------------------------------------------------------------

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return model(batch["images"])  # cls (B, N, K), reg (B, N, 4), ctr (B, N), level_sizes (B, L, 2)

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]):
        losses = self.model.loss(outputs, batch["image_sizes"], batch["boxes"], batch["labels"],
                                 sync_normalizers=self.sync_normalizers)
        total = losses["loss_cls"] + losses["loss_bbox"] + losses["loss_centerness"]
        scalars = {k: v.detach() for k, v in losses.items()}
        return total, scalars

    # -- evaluation ---------------------------------------------------------------------------------------------

    def evaluate(self, model: nn.Module, env: DistEnv, run_dir: Path, step: int) -> dict[str, float]:
        """The 12 COCO stats (AP, AP50, ...) on ``eval.source`` (first ``eval.max_images``) at the test scale."""
        ev = self.cfg.eval
        if ev.source is None:
            return {}
        result = evaluate_detector(model, ev.source["annotations"], ev.source["images"], device=env.device,
                                   batch_size=ev.batch_size, max_images=ev.max_images)
        return {k: v for k, v in result["metrics"].items() if isinstance(v, float)}

    def describe(self) -> str:
        return f"task detection (deformable conv: {self.options.deform_impl})"
