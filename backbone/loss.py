"""UniCL bidirectional supervised-contrastive loss (SPEC §3.2) with cross-rank gathering (SPEC §3.4).

With logits ``Z = s · U Vᵀ`` (N×N) over the global batch and targets ``T_ij = 1[y_i == y_j]``:

- image→text: soft-target cross-entropy of each row of Z against the row-normalised row of T,
  averaged over rows (``P(i) = {k : y_k = y_i}``);
- text→image: soft-target cross-entropy of each column of Z against the column-normalised column of T,
  averaged over columns (``Q(j) = {k : y_k = y_j}``).

The loss is their sum. With all labels distinct T = I and the loss is exactly twice the symmetric CLIP loss.

Multi-process: when ``torch.distributed`` is initialised with world size W > 1, image features, text features and
labels are all-gathered with ``torch.distributed.nn.functional.all_gather`` (autograd-aware), and every rank
computes the same global loss. Its backward sums, into each local shard, the gradients that all W ranks computed
for that shard, i.e. W × dL/d(shard). DDP then averages parameter gradients over the W ranks, which divides
the factor W out again: the parameter gradient equals the single-process gradient of the loss on the
concatenated batch, with no extra scaling. (Code that does not average over ranks, e.g. a hand-written
all-reduce SUM, must divide by W itself.) Local batches may have different sizes: they are padded to the
largest one for the collective and the padding is removed before the loss.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def unicl_targets(labels: torch.Tensor) -> torch.Tensor:
    """Target matrix ``T_ij = 1[y_i == y_j]`` as float32, shape (N, N)."""
    return (labels[:, None] == labels[None, :]).float()


def unicl_loss(logits_per_image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """UniCL loss from precomputed logits; the pure function the gradient-cache engine differentiates.

    Args:
        logits_per_image: (N, N) scaled similarities ``s · u_i · v_j`` (row i = image i, column j = text j).
        labels: (N,) integer labels; equal labels mark positive pairs.

    Returns:
        Scalar (float32; float64 for float64 logits): mean over rows of the image→text soft CE + mean over
        columns of the text→image soft CE.
    """
    if logits_per_image.ndim != 2 or logits_per_image.shape[0] != logits_per_image.shape[1]:
        raise ValueError(f"logits_per_image must be square (N, N), got shape {tuple(logits_per_image.shape)}")
    if labels.ndim != 1 or labels.shape[0] != logits_per_image.shape[0]:
        raise ValueError(
            f"labels must have shape ({logits_per_image.shape[0]},) to match the logits, got {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    # fp16/bf16 logits (autocast) are upcast to fp32; fp64 stays fp64 (gradcheck)
    logits = logits_per_image.to(torch.promote_types(logits_per_image.dtype, torch.float32))
    targets = unicl_targets(labels.to(logits.device)).to(logits.dtype)
    row_targets = targets / targets.sum(dim=1, keepdim=True)  # each row sums to 1 (|P(i)| >= 1: the diagonal)
    col_targets = targets / targets.sum(dim=0, keepdim=True)  # each column sums to 1
    loss_i2t = -(row_targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_t2i = -(col_targets * F.log_softmax(logits, dim=0)).sum(dim=0).mean()
    return loss_i2t + loss_t2i


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    size = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _all_gather_rows(x: torch.Tensor, sizes: list[int], with_grad: bool) -> torch.Tensor:
    """Concatenate every rank's (n_r, ...) tensor in rank order -> (sum n_r, ...); gradients reach the local rows."""
    max_n = max(sizes)
    pad = max_n - x.shape[0]
    if pad:
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])  # max_n, ...
    if with_grad:
        from torch.distributed.nn.functional import all_gather

        parts = list(all_gather(x))
    else:
        parts = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(parts, x.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])  # sum(sizes), ...


def gather_features(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All-gather (image_embeds, text_embeds, labels) over the default process group, in rank order.

    Embeddings are gathered with autograd (gradients from every rank flow back into the local shard);
    labels without. Returns the inputs unchanged when not running distributed.
    """
    if not _distributed():
        return image_embeds, text_embeds, labels
    sizes = _gather_sizes(image_embeds.shape[0], image_embeds.device)
    return (
        _all_gather_rows(image_embeds, sizes, with_grad=True),
        _all_gather_rows(text_embeds, sizes, with_grad=True),
        _all_gather_rows(labels, sizes, with_grad=False),
    )


class UniCLLoss(nn.Module):
    """UniCL loss over the (global) batch; see the module docstring for the distributed gradient scale."""

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        labels: torch.Tensor,
        logit_scale: torch.Tensor | float,
    ) -> torch.Tensor:
        """Scalar loss.

        Args:
            image_embeds: (N, D) L2-normalised image embeddings of this rank's batch.
            text_embeds: (N, D) L2-normalised text embeddings, row i paired with image i.
            labels: (N,) int64 labels (globally consistent across ranks).
            logit_scale: () the multiplier s itself (already exponentiated and clamped), as in open_clip.
        """
        if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
            raise ValueError(
                f"image_embeds and text_embeds must both be (N, D); got {tuple(image_embeds.shape)} "
                f"and {tuple(text_embeds.shape)}")
        if labels.shape != (image_embeds.shape[0],):
            raise ValueError(f"labels must have shape ({image_embeds.shape[0]},), got {tuple(labels.shape)}")
        image_all, text_all, labels_all = gather_features(image_embeds, text_embeds, labels)
        logits_per_image = logit_scale * image_all @ text_all.t()  # N_global, N_global
        return unicl_loss(logits_per_image, labels_all)
