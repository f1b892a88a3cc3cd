"""Image-classification fine-tuning (``task: classify``; the paper's Table 3 protocol): an image tower with a linear
head, trained with cross-entropy on image-label data.

- model: a pre-trained tower plus a new ``num_classes``-way head (``model.backbone``: a dual-encoder bundle, whose
  image encoder is taken, or an image-tower bundle; ``model.overrides`` set tower training settings such as
  ``drop_path_rate``), a classifier bundle to continue (``model.pretrained``), or a tower from scratch (``model.name``);
  the class names travel in the bundle (``model.class_names``) for ``florence predict``;
- data: the image-label sources of ``florence.data.build_train_loader`` (ImageFolder, CSV label tables,
  Fashion-MNIST, ...) with timm's train transforms (``data.augment``: random resized crop, flip, RandAugment);
- loss: cross-entropy with label smoothing, or soft-target cross-entropy under timm's mixup / cutmix;
- evaluation: top-1 / top-5 / mean-per-class on ``eval.source`` (``florence eval classify`` computes the same).

Layer-wise LR decay (``optim.layer_decay``), per-module LR multipliers (``optim.lr_mult: {head: 10}``), freezing
(``optim.freeze``) and EMA (``optim.ema_decay``) are engine features that apply here as to every task.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.data import Mixup
from torch import nn

from florence.adapters.zeroshot import classification_metrics
from florence.bundle import from_pretrained
from florence.data.eval_loader import EvalLoader, map_batches
from florence.data.loader import build_source, build_train_loader
from florence.data.source_dataset import SourceImages
from florence.data.transforms import build_transform
from florence.engine.config import ConfigError
from florence.engine.distributed import DistEnv
from florence.engine.task import Task
from florence.factory import create_model, image_tower
from florence.registry import register_task


@dataclass
class ClassifyOptions:
    num_classes: int | None = None  # classes of the head (default: the training sources' class count)
    label_smoothing: float = 0.0  # cross-entropy label smoothing (timm / torch semantics)
    mixup: float = 0.0  # mixup alpha (timm Mixup); 0 disables
    cutmix: float = 0.0  # cutmix alpha (timm Mixup); 0 disables
    mixup_prob: float = 1.0  # probability of applying mixup or cutmix to a batch
    mixup_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on


def _class_names(cfg) -> list[str] | None:
    """The class names of the single image-label training source (None for several or for caption sources)."""
    sources = cfg.data.get("sources", [])
    if len(sources) != 1:
        return None
    source = build_source(dict(sources[0]), key="data.sources[0]")
    names = getattr(source, "class_names", None)
    return [n if isinstance(n, str) else n[0] for n in names] if names is not None else None


@register_task("classify")
class ClassifyTask(Task):
    """Fine-tune (or train) an image tower with a linear classifier."""

    Options = ClassifyOptions
    supports_grad_cache = True  # logits are per sample: chunks concatenate exactly

    def __init__(self, cfg, options: ClassifyOptions) -> None:
        super().__init__(cfg, options)
        self.mixup: Mixup | None = None  # built with the model, once the class count is known

    def validate(self) -> None:
        m, o = self.cfg.model, self.options
        if m.config is not None or m.tokenizer or m.train_tokenizer_vocab or m.context_length:
            raise ConfigError("model: the classify task takes model.backbone, model.pretrained or model.name (no "
                              "dual-encoder config or tokenizer keys)")
        if not 0 <= o.label_smoothing < 1:
            raise ConfigError("task.label_smoothing: must be in [0, 1)")
        if o.num_classes is not None and o.num_classes < 1:
            raise ConfigError("task.num_classes: must be >= 1")
        self.validate_data()

    # -- model --------------------------------------------------------------------------------------------------

    def build_model(self, env: DistEnv, run_dir: Path) -> nn.Module:
        m = self.cfg.model
        names = _class_names(self.cfg)
        num_classes = self.options.num_classes or (len(names) if names is not None else None)
        if num_classes is None:
            raise ConfigError("task.num_classes: give it (the data sources do not name their classes)")
        if names is not None and len(names) != num_classes:
            names = None
        overrides = dict(m.overrides)
        preprocess = overrides.pop("preprocess", None)
        if m.pretrained is not None:
            model = from_pretrained(m.pretrained)
            if getattr(model, "num_classes", 0) != num_classes:
                raise ConfigError(f"model.pretrained={m.pretrained}: its head has {getattr(model, 'num_classes', 0)} "
                                  f"classes, the task {num_classes}; use model.backbone for a new head")
        elif m.backbone is not None:
            model = create_model("image_classifier", backbone=image_tower(m.backbone, **overrides),
                                 num_classes=num_classes, class_names=names)
        else:
            model = create_model(m.name, num_classes=num_classes, **overrides)
            model.class_names = names
        if preprocess is not None:
            model.preprocess = dict(preprocess)
        elif getattr(model, "preprocess", None) is None:
            model.preprocess = dict(model.default_preprocess)
        o = self.options
        if o.mixup > 0 or o.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=o.mixup, cutmix_alpha=o.cutmix, prob=o.mixup_prob,
                               switch_prob=o.mixup_switch_prob, label_smoothing=o.label_smoothing,
                               num_classes=num_classes)
        return model

    def build_loader(self, model: nn.Module, env: DistEnv, run_dir: Path, micro_batch: int):
        data_cfg = {"seed": self.cfg.seed, **self.cfg.data, "batch_size": micro_batch}
        return build_train_loader(data_cfg, preprocess=model.preprocess, tokenize=None, rank=env.rank,
                                  world_size=env.world_size, run_dir=run_dir)

    # -- loss ---------------------------------------------------------------------------------------------------

    def prepare_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Mixup / cutmix (timm ``Mixup``, numpy RNG: restored on resume) once per micro-batch, before any forward."""
        if self.mixup is None:
            return batch
        if len(batch["images"]) % 2:
            raise ConfigError("task.mixup / task.cutmix: the per-rank micro-batch must be even (timm Mixup pairs "
                              "samples)")
        images, targets = self.mixup(batch["images"].clone(), batch["labels"])  # B, 3, H, W; B, K soft targets
        return {**batch, "images": images, "soft_targets": targets}

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"logits": model(batch["images"])}  # B, K

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]):
        logits = outputs["logits"]
        if "soft_targets" in batch:  # mixup / cutmix (label smoothing already folded into the targets)
            loss = torch.sum(-batch["soft_targets"] * F.log_softmax(logits, dim=-1), dim=-1).mean()
        else:
            loss = F.cross_entropy(logits, batch["labels"], label_smoothing=self.options.label_smoothing)
        accuracy = (logits.detach().argmax(-1) == batch["labels"]).float().mean()
        return loss, {"train_top1": accuracy}

    # -- evaluation ---------------------------------------------------------------------------------------------

    def evaluate(self, model: nn.Module, env: DistEnv, run_dir: Path, step: int) -> dict[str, float]:
        """Top-1 / top-5 / mean-per-class of the head on ``eval.source`` (first ``eval.max_images``)."""
        ev = self.cfg.eval
        if ev.source is None:
            return {}
        source = build_source(dict(ev.source), key="eval.source")
        dataset = SourceImages(source, build_transform(model.preprocess, train=False), ev.max_images)
        loader = EvalLoader(dataset, batch_size=ev.batch_size, name="eval.source")
        logits, labels = map_batches(model, loader, device=env.device)  # N, K
        return classification_metrics(logits, labels)
