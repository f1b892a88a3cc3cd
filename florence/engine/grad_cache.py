"""Gradient cache (Gao et al. 2021; SPEC §3.4): the UniCL loss over a batch larger than memory allows.

The contrastive loss couples every pair in the batch, so it cannot be split into independent sub-batch losses.
The gradient cache factors the backward pass instead:

1. forward every chunk under ``no_grad`` and keep only the embeddings (the RNG state before each chunk is saved so
   dropout / drop-path draw the same masks again in step 3);
2. compute the loss on the full embedding matrices, and its gradient with respect to the embeddings and the logit
   scale multiplier (cheap: N x D tensors); the task says which outputs and which loss (``Task.forward`` and
   ``Task.loss``);
3. forward each chunk again with grad and backpropagate the cached embedding gradient through it
   (``sum(embeds * grad)`` has exactly that gradient); the logit-scale gradient goes through the last chunk's
   (identical) multiplier.

Peak activation memory is that of one chunk, whatever the batch size; the parameter gradients equal the full-batch
ones up to float rounding.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from florence.engine.precision import Precision


def split_batch(batch: dict[str, torch.Tensor], chunk_size: int) -> list[dict[str, torch.Tensor]]:
    """Split every tensor of ``batch`` along dim 0 into chunks of at most ``chunk_size`` rows."""
    n = next(iter(batch.values())).shape[0]
    return [{k: v[start : start + chunk_size] for k, v in batch.items()} for start in range(0, n, chunk_size)]


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Half-precision autocast outputs in fp32 for the loss; fp32 / fp64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def task_forward(task, model: nn.Module, batch: dict[str, torch.Tensor], precision: Precision) -> dict[str, torch.Tensor]:
    """``task.forward`` under the run's autocast; half-precision outputs widened to fp32 for the loss."""
    with precision.autocast():
        return {k: _wide(v) for k, v in task.forward(model, batch).items()}


def grad_cache_backward(
    task,
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    chunk_size: int,
    precision: Precision,
    loss_multiplier: float = 1.0,
    sync_context: Callable[[bool], contextlib.AbstractContextManager] | None = None,
    sync_last: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Accumulate into ``.grad`` the gradient of ``loss_multiplier * loss(batch)``; return the detached loss and the
    task's scalars.

    Args:
        task: a ``florence.engine.task.Task``: ``forward(model, chunk) -> {name: tensor}`` (tensors with a batch
            dimension, or 0-dim tensors shared by the batch such as UniCL's logit-scale multiplier) and
            ``loss(outputs, batch) -> (loss, scalars)``.
        model: the model (plain, DDP- or FSDP-wrapped), passed to ``task.forward``.
        batch: the micro-batch (every tensor has the batch dimension first).
        chunk_size: rows per forward; memory scales with it, not with B.
        precision: autocast for the forwards; its ``scaler`` (fp16) scales the loss.
        loss_multiplier: e.g. ``1 / accum_steps`` for gradient accumulation.
        sync_context: ``sync_context(enabled)`` turns gradient synchronisation across ranks on or off (DDP
            ``no_sync``); only the last backward of the step synchronises.
        sync_last: whether the last chunk's backward should synchronise (False inside an accumulation window).
    """
    device = next(iter(batch.values())).device
    chunks = split_batch(batch, chunk_size)
    states, outputs = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(_rng_state(device))
            outputs.append(task_forward(task, model, chunk, precision))
    rng_after = _rng_state(device)

    # full-batch leaves: rows concatenated over chunks; 0-dim outputs are shared, taken from the last chunk
    leaves = {k: (torch.cat([o[k] for o in outputs]) if v.ndim else v).detach().requires_grad_(True)
              for k, v in outputs[-1].items()}
    loss, scalars = task.loss(leaves, batch)
    scaled = loss * loss_multiplier
    if precision.scaler is not None:
        scaled = precision.scaler.scale(scaled)
    names = list(leaves)
    grads = dict(zip(names, torch.autograd.grad(scaled, [leaves[k] for k in names], allow_unused=True)))

    offset = 0
    last = len(chunks) - 1
    for i, chunk in enumerate(chunks):
        n = next(iter(chunk.values())).shape[0]
        _set_rng_state(states[i], device)
        sync = sync_last and i == last
        ctx = sync_context(sync) if sync_context is not None else contextlib.nullcontext()
        with ctx:
            out = task_forward(task, model, chunk, precision)
            surrogate = 0.0
            for k, value in out.items():
                grad = grads[k]
                if grad is None:
                    grad = torch.zeros_like(value)
                if value.ndim:  # this chunk's rows of the cached gradient
                    surrogate = surrogate + (value * grad[offset : offset + n]).sum()
                else:  # every parameter takes part in every backward (DDP needs that); only the last chunk carries d/ds
                    surrogate = surrogate + (value * (grad if i == last else torch.zeros_like(grad))).sum()
            surrogate.backward()
        offset += n
    _set_rng_state(rng_after, device)
    return loss.detach(), {k: v.detach() for k, v in scalars.items()}
