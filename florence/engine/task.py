"""The ``Task`` interface: what differs between training jobs; the engine (``florence.engine.train``) does the rest.

The engine owns the loop and everything that is the same for every job: process groups, DDP / FSDP2 wrapping,
precision, accumulation, the gradient cache, clipping, non-finite-step skipping, optimizer groups (per-module LR
multipliers, layer-wise decay, freezing), the schedule, EMA, checkpoints and exact resume, periodic evaluation and the
best checkpoint, the progress bar, TensorBoard and ``metrics.jsonl``. A task owns:

======================  =================================================================================================
``build_model``         the plain model (fresh, from a named config, from a bundle, or a pre-trained tower + new heads)
``build_loader``        this rank's endless, resumable batch stream (``state_dict`` / ``load_state_dict``)
``prepare_batch``       optional batch-level augmentation (mixup), once per micro-batch
``forward``             the model outputs a micro-batch's loss needs (run under the run's autocast)
``loss``                the loss from those outputs (in fp32, outside autocast) and named scalars to log; the engine
                        scales, backpropagates and syncs. The same two methods serve the gradient cache, which
                        concatenates the outputs of chunks (losses that couple the whole batch, e.g. contrastive)
``after_step``          what follows an optimizer step (UniCL clamps its logit scale)
``evaluate``            metrics of the current model (rank 0, plain module, eval mode) -> ``{name: float}``
``save_bundle``         the bundle the run leaves (default ``model.save_pretrained``)
======================  =================================================================================================

Tasks register with ``@florence.registry.register_task("name")`` and declare their own config section as a dataclass
(``Options``): ``task: {name: classify, label_smoothing: 0.1}`` in the run config (or just ``task: classify``).
The engine never imports a task module: the registry finds them (entry points), so adapters bring their own tasks.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from florence.data.schema import validate_data_config, validate_source_spec
from florence.engine.config import RunConfig
from florence.engine.distributed import DistEnv


class BatchStream(Protocol):
    """An endless iterable of batch dicts for one rank, whose position survives a restart."""

    def __iter__(self): ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class NoOptions:
    """A task without options of its own."""


class Task:
    """Base class of training tasks. Subclasses set ``Options`` and implement the methods marked abstract.

    Attributes:
        cfg: the whole run config.
        options: the task's own section, an instance of ``Options``.
        supports_grad_cache: False when ``forward``'s outputs cannot be split and concatenated along the batch.
    """

    name: ClassVar[str] = "task"
    Options: ClassVar[type] = NoOptions
    supports_grad_cache: ClassVar[bool] = True

    def __init__(self, cfg: RunConfig, options: Any) -> None:
        self.cfg = cfg
        self.options = options

    def validate(self) -> None:
        """Cross-checks of the task options against the run config, before anything is written (raise a
        ``FlorenceError`` such as ``ConfigError`` naming the key). Default: ``validate_data``."""
        self.validate_data()

    def validate_data(self) -> None:
        """``data:`` and ``eval.source`` against ``florence.data``'s schema, without reading any data."""
        validate_data_config(self.cfg.data)
        if self.cfg.eval.source is not None:
            validate_source_spec(self.cfg.eval.source, "eval.source")

    # -- abstract -----------------------------------------------------------------------------------------------

    def build_model(self, env: DistEnv, run_dir: Path) -> nn.Module:
        """The plain (unwrapped) model on the CPU, in train mode."""
        raise NotImplementedError

    def build_loader(self, model: nn.Module, env: DistEnv, run_dir: Path, micro_batch: int) -> BatchStream:
        """This rank's batch stream; ``micro_batch`` samples per batch (the global batch split over ranks and
        accumulation steps)."""
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The outputs the loss needs for a micro-batch (on the device, under the run's autocast). ``model`` may be
        DDP / FSDP-wrapped: call it, don't reach into it. For the gradient cache, tensors with a batch dimension
        (first) are concatenated over chunks; 0-dim tensors (e.g. a logit scale) are shared by the batch."""
        raise NotImplementedError

    def loss(self, outputs: dict[str, torch.Tensor],
             batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss (), {name: scalar tensor})`` from ``forward``'s outputs (half-precision outputs arrive as fp32)."""
        raise NotImplementedError

    # -- optional -----------------------------------------------------------------------------------------------

    def prepare_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Called once per micro-batch on the device before any forward (batch-level augmentation such as mixup;
        the gradient cache forwards each chunk twice, so random draws belong here, not in ``forward``)."""
        return batch

    def after_step(self, model: nn.Module) -> None:
        """Called with the unwrapped model after every optimizer step that was taken."""

    def has_evaluation(self) -> bool:
        """Whether the config gives this task evaluation data (default: ``eval.source``)."""
        return self.cfg.eval.source is not None

    def evaluate(self, model: nn.Module, env: DistEnv, run_dir: Path, step: int) -> dict[str, float]:
        """Metrics of ``model`` (plain module in eval mode, on ``env.device``; rank 0 only). Empty: nothing to do."""
        return {}

    def save_bundle(self, model: nn.Module, directory: Path) -> Path:
        """Write the model the run leaves behind (rank 0)."""
        return model.save_pretrained(directory)

    def describe(self) -> str:
        """One line for the console at the start of a run."""
        return f"task {self.name}"
