"""AdamW with decoupled weight decay on weight matrices only, and a per-step cosine schedule with linear warmup."""
from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights, and the rest (no decay). ``model`` is the unwrapped model (no DDP).

    No decay for parameters with ``ndim <= 1`` (norm weights, biases, the scalar logit scale) and for every name in
    ``model.no_weight_decay()`` (relative-position bias tables, logit scale), matched by full name or suffix.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        in_skip = name in skip or any(name.endswith("." + s) for s in skip)
        (no_decay if param.ndim <= 1 or in_skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float], eps: float
) -> torch.optim.AdamW:
    """AdamW over ``param_groups(model, weight_decay)``."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)


def cosine_with_warmup(step: int, *, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): linear ramp to 1 over ``warmup_steps``, then cosine to
    ``min_lr_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` with ``cosine_with_warmup``; its ``state_dict`` holds plain numbers only."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int, min_lr_ratio: float):
        self.total_steps, self.warmup_steps, self.min_lr_ratio = total_steps, warmup_steps, min_lr_ratio
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        return cosine_with_warmup(
            step, total_steps=self.total_steps, warmup_steps=self.warmup_steps, min_lr_ratio=self.min_lr_ratio
        )

    def state_dict(self) -> dict:
        """Progress only (plain numbers): the schedule's shape comes from the config, so a resumed run may extend
        ``total_steps``."""
        skip = ("optimizer", "lr_lambdas", "_get_lr_called_within_step", "total_steps", "warmup_steps", "min_lr_ratio")
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def load_state_dict(self, state_dict: dict) -> None:
        self.__dict__.update(state_dict)
