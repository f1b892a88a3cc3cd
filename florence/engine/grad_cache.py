"""Gradient cache (Gao et al. 2021; SPEC §3.4): the UniCL loss over a batch larger than memory allows.

The contrastive loss couples every pair in the batch, so it cannot be split into independent sub-batch losses.
The gradient cache factors the backward pass instead:

1. forward every chunk under ``no_grad`` and keep only the embeddings (the RNG state before each chunk is saved so
   dropout / drop-path draw the same masks again in step 3);
2. compute the loss on the full embedding matrices, and its gradient with respect to the embeddings and the logit
   scale multiplier (cheap: N x D tensors);
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
    n = batch["images"].shape[0]
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


def _forward(model: nn.Module, chunk: dict[str, torch.Tensor], precision: Precision):
    with precision.autocast():
        return model(images=chunk["images"], input_ids=chunk["input_ids"], attention_mask=chunk["attention_mask"])


def grad_cache_backward(
    model: nn.Module,
    loss_fn: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    chunk_size: int,
    precision: Precision,
    loss_multiplier: float = 1.0,
    sync_context: Callable[[bool], contextlib.AbstractContextManager] | None = None,
    sync_last: bool = True,
) -> torch.Tensor:
    """Accumulate into ``.grad`` the gradient of ``loss_multiplier * loss(batch)``; return the (detached) loss.

    Args:
        model: the dual encoder (plain, DDP- or FSDP-wrapped); ``model(images, input_ids, attention_mask)`` returns
            ``UniCLOutput(image_embeds (B, D), text_embeds (B, D), logit_scale ())``.
        loss_fn: ``UniCLLoss`` (gathers across ranks when torch.distributed is initialised).
        batch: ``images (B, 3, H, W)``, ``input_ids (B, L)``, ``attention_mask (B, L)``, ``labels (B,)``.
        chunk_size: rows per forward; memory scales with it, not with B.
        precision: autocast for the forwards and the loss; its ``scaler`` (fp16) scales the loss.
        loss_multiplier: e.g. ``1 / accum_steps`` for gradient accumulation.
        sync_context: ``sync_context(enabled)`` turns gradient synchronisation across ranks on or off (DDP
            ``no_sync``); only the last backward of the step synchronises.
        sync_last: whether the last chunk's backward should synchronise (False inside an accumulation window).
    """
    device = batch["images"].device
    chunks = split_batch(batch, chunk_size)
    states, image_embeds, text_embeds = [], [], []
    scale = None
    with torch.no_grad():
        for chunk in chunks:
            states.append(_rng_state(device))
            out = _forward(model, chunk, precision)
            image_embeds.append(_wide(out.image_embeds))
            text_embeds.append(_wide(out.text_embeds))
            scale = _wide(out.logit_scale)
    rng_after = _rng_state(device)

    all_image = torch.cat(image_embeds).requires_grad_(True)  # B, D
    all_text = torch.cat(text_embeds).requires_grad_(True)  # B, D
    scale_leaf = scale.detach().requires_grad_(True)
    loss = loss_fn(all_image, all_text, batch["labels"], scale_leaf)
    scaled = loss * loss_multiplier
    if precision.scaler is not None:
        scaled = precision.scaler.scale(scaled)
    image_grads, text_grads, scale_grad = torch.autograd.grad(scaled, [all_image, all_text, scale_leaf])

    offset = 0
    last = len(chunks) - 1
    for i, chunk in enumerate(chunks):
        n = chunk["images"].shape[0]
        _set_rng_state(states[i], device)
        sync = sync_last and i == last
        ctx = sync_context(sync) if sync_context is not None else contextlib.nullcontext()
        with ctx:
            out = _forward(model, chunk, precision)
            surrogate = (_wide(out.image_embeds) * image_grads[offset : offset + n]).sum()
            surrogate = surrogate + (_wide(out.text_embeds) * text_grads[offset : offset + n]).sum()
            # every parameter takes part in every backward (DDP needs that); only the last chunk carries d/ds
            surrogate = surrogate + _wide(out.logit_scale) * (scale_grad if i == last else 0.0)
            surrogate.backward()
        offset += n
    _set_rng_state(rng_after, device)
    return loss.detach()
