"""One optimizer step: the task's loss + backward over the micro-batches, then clip, step, schedule, ``after_step``.

A step whose loss is not finite (on any rank) is skipped: no optimizer or scheduler step, gradients zeroed. The
caller counts skips and aborts after too many in a row.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from florence.engine.distributed import any_rank, gradient_sync, mean_across_ranks, sync_replicated_grads, unwrap
from florence.engine.grad_cache import grad_cache_backward, task_forward
from florence.engine.precision import Precision


@dataclass
class StepResult:
    """loss: mean of the micro-batch losses over accumulation steps and ranks (the global-batch loss when
    accum_steps is 1 and the loss is a per-sample mean or gathers across ranks); scalars: the task's named
    scalars, averaged over micro-batches; finite: False if the step was skipped; grad_norm: total gradient norm before
    clipping (None when clipping is off); lr: the base learning rate used (groups may scale it)."""

    loss: float
    finite: bool
    grad_norm: float | None
    lr: float
    scalars: dict[str, float] = field(default_factory=dict)


@dataclass
class StepContext:
    """What a step needs. ``model`` may be DDP/FSDP-wrapped; ``task`` computes the loss (``florence.engine.task``);
    ``clip_grad_norm`` None disables clipping; ``grad_cache_chunk`` None runs one plain forward/backward per
    micro-batch; ``ema`` (timm ``ModelEmaV3`` or None) is updated after every step taken."""

    model: nn.Module
    task: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    precision: Precision
    device: torch.device
    clip_grad_norm: float | None = None
    grad_cache_chunk: int | None = None
    ema: nn.Module | None = None
    steps_taken: int = 0


def micro_batch_backward(ctx: StepContext, batch: dict[str, torch.Tensor], *, multiplier: float,
                         sync: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Accumulate the gradient of ``multiplier * loss(batch)`` into ``.grad``; return the detached loss and scalars."""
    if ctx.grad_cache_chunk is not None:
        return grad_cache_backward(
            ctx.task, ctx.model, batch, chunk_size=ctx.grad_cache_chunk, precision=ctx.precision,
            loss_multiplier=multiplier, sync_context=lambda enabled: gradient_sync(ctx.model, enabled), sync_last=sync,
        )
    with gradient_sync(ctx.model, sync):
        outputs = task_forward(ctx.task, ctx.model, batch, ctx.precision)
        loss, scalars = ctx.task.loss(outputs, batch)
        scaled = loss * multiplier
        if ctx.precision.scaler is not None:
            scaled = ctx.precision.scaler.scale(scaled)
        scaled.backward()
    return loss.detach().float(), {k: v.detach().float() for k, v in scalars.items()}


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors moved to ``device``; other entries (lists of strings, ...) kept as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _base_lr(optimizer: torch.optim.Optimizer) -> float:
    group = optimizer.param_groups[0]
    return group["lr"] / group.get("lr_scale", 1.0) if group.get("lr_scale", 1.0) else group["lr"]


def train_step(ctx: StepContext, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
    """Gradient accumulation over ``micro_batches`` (each this rank's share), then one optimizer step."""
    lr = _base_lr(ctx.optimizer)
    losses, scalars = [], {}
    for i, batch in enumerate(micro_batches):
        batch = ctx.task.prepare_batch(to_device(batch, ctx.device))
        last = i == len(micro_batches) - 1
        loss, named = micro_batch_backward(ctx, batch, multiplier=1.0 / len(micro_batches), sync=last)
        losses.append(loss)
        for k, v in named.items():
            scalars.setdefault(k, []).append(v)
    sync_replicated_grads(ctx.model)
    # logged values are global-batch means: per-rank losses (e.g. classification) averaged over ranks
    names = list(scalars)
    stacked = mean_across_ranks(torch.stack([torch.stack(losses).mean()] + [torch.stack(scalars[k]).mean()
                                                                            for k in names]))
    loss, means = stacked[0], {k: float(v) for k, v in zip(names, stacked[1:])}
    nonfinite = any_rank(not bool(torch.isfinite(loss)), ctx.device)
    if nonfinite:
        ctx.optimizer.zero_grad(set_to_none=True)
        if ctx.precision.scaler is not None:
            ctx.precision.scaler.update(ctx.precision.scaler.get_scale() / 2)  # fewer overflows next time
        return StepResult(loss=float(loss), finite=False, grad_norm=None, lr=lr, scalars=means)
    scaler = ctx.precision.scaler
    if scaler is not None:
        scaler.unscale_(ctx.optimizer)
    grad_norm = None
    if ctx.clip_grad_norm is not None:
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, ctx.clip_grad_norm)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if scaler is not None:
        scaler.step(ctx.optimizer)
        scaler.update()
    else:
        ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.scheduler.step()
    ctx.task.after_step(unwrap(ctx.model))
    ctx.steps_taken += 1
    if ctx.ema is not None:
        ctx.ema.update(unwrap(ctx.model), step=ctx.steps_taken)
    return StepResult(loss=float(loss), finite=True, grad_norm=grad_norm, lr=lr, scalars=means)
