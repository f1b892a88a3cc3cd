"""One optimizer step: forward + UniCL loss + backward over the micro-batches, then clip, step, schedule.

A step whose loss is not finite (on any rank) is skipped: no optimizer or scheduler step, gradients zeroed. The
caller counts skips and aborts after too many in a row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from florence.engine.distributed import any_rank, gradient_sync, sync_replicated_grads, unwrap
from florence.engine.grad_cache import grad_cache_backward
from florence.engine.precision import Precision


@dataclass
class StepResult:
    """loss: mean of the micro-batch UniCL losses (the global-batch loss when accum_steps is 1); finite: False if the
    step was skipped; grad_norm: total gradient norm before clipping (None when not computed); lr: learning rate
    used."""

    loss: float
    finite: bool
    grad_norm: float | None
    lr: float


@dataclass
class StepContext:
    """What a step needs. ``model`` may be DDP/FSDP-wrapped; ``clip_grad_norm`` None disables clipping;
    ``grad_cache_chunk`` None runs one plain forward/backward per micro-batch."""

    model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    precision: Precision
    device: torch.device
    clip_grad_norm: float | None = None
    grad_cache_chunk: int | None = None


def micro_batch_backward(ctx: StepContext, batch: dict[str, torch.Tensor], *, multiplier: float, sync: bool) -> torch.Tensor:
    """Accumulate the gradient of ``multiplier * loss(batch)`` into ``.grad``; return the detached loss."""
    if ctx.grad_cache_chunk is not None:
        return grad_cache_backward(
            ctx.model, ctx.loss_fn, batch, chunk_size=ctx.grad_cache_chunk, precision=ctx.precision,
            loss_multiplier=multiplier, sync_context=lambda enabled: gradient_sync(ctx.model, enabled), sync_last=sync,
        )
    with gradient_sync(ctx.model, sync):
        with ctx.precision.autocast():
            out = ctx.model(images=batch["images"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = ctx.loss_fn(out.image_embeds.float(), out.text_embeds.float(), batch["labels"], out.logit_scale.float())
        scaled = loss * multiplier
        if ctx.precision.scaler is not None:
            scaled = ctx.precision.scaler.scale(scaled)
        scaled.backward()
    return loss.detach()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def train_step(ctx: StepContext, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
    """Gradient accumulation over ``micro_batches`` (each this rank's share), then one optimizer step."""
    lr = ctx.optimizer.param_groups[0]["lr"]
    losses = []
    for i, batch in enumerate(micro_batches):
        batch = to_device(batch, ctx.device)
        last = i == len(micro_batches) - 1
        losses.append(micro_batch_backward(ctx, batch, multiplier=1.0 / len(micro_batches), sync=last))
    sync_replicated_grads(ctx.model)
    loss = torch.stack(losses).mean()
    nonfinite = any_rank(not bool(torch.isfinite(loss)), ctx.device)
    if nonfinite:
        ctx.optimizer.zero_grad(set_to_none=True)
        if ctx.precision.scaler is not None:
            ctx.precision.scaler.update(ctx.precision.scaler.get_scale() / 2)  # fewer overflows next time
        return StepResult(loss=float(loss), finite=False, grad_norm=None, lr=lr)
    scaler = ctx.precision.scaler
    if scaler is not None:
        scaler.unscale_(ctx.optimizer)
    grad_norm = None
    if ctx.clip_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(ctx.model.parameters(), ctx.clip_grad_norm)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if scaler is not None:
        scaler.step(ctx.optimizer)
        scaler.update()
    else:
        ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    ctx.scheduler.step()
    unwrap(ctx.model).clamp_logit_scale_()  # FSDP2 leaves the 0-dim logit_scale unsharded: a plain clamp
    return StepResult(loss=float(loss), finite=True, grad_norm=grad_norm, lr=lr)
