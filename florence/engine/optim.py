"""AdamW parameter groups for pre-training and fine-tuning, and the per-step warmup + cosine / linear schedule.

``param_groups(model, ...)`` gives every trainable parameter a weight decay and an LR scale:

- no weight decay for ``ndim <= 1`` parameters (norm weights, biases, the logit scale), for every name in
  ``model.no_weight_decay()`` (relative-position bias tables), and, with ``decay_embeddings=False``, for
  ``nn.Embedding`` tables;
- ``freeze``: parameters under these module names get ``requires_grad=False`` and no group;
- ``lr_mult``: ``{module name prefix: multiplier}``; the longest matching prefix wins (``{"": 1, "head": 50}``); a key
  with ``*`` is a glob over parameter names (``{"*.relative_position_bias_table": 50}``);
- ``layer_decay``: timm's layer-wise decay (``param_groups_layer_decay`` semantics): ``model.group_matcher(False)``
  numbers the layers (stem 0, blocks 1.., final norm last), layer ``i`` of ``L`` gets ``layer_decay ** (L - 1 - i)``,
  parameters the matcher does not name (new heads) get the last layer's scale, 1. Multiplied by ``lr_mult``.

Each group holds ``lr = base_lr * lr_scale`` and its ``lr_scale``; the schedule multiplies every group alike.
"""
from __future__ import annotations

import fnmatch
import math

import torch
from timm.models import group_parameters
from torch import nn

from florence.errors import FlorenceError


class OptimConfigError(FlorenceError, ValueError):
    """A fine-tuning control names no module of the model, or the model cannot honour it."""


def _matches(name: str, prefix: str) -> bool:
    """A parameter under a module name, or, for a key with ``*``, a parameter name matching it as a glob."""
    if "*" in prefix:
        return fnmatch.fnmatchcase(name, prefix)
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def freeze_modules(model: nn.Module, prefixes: list[str]) -> int:
    """Set ``requires_grad=False`` on every parameter under the given module names; returns how many tensors."""
    frozen = 0
    for prefix in prefixes:
        hits = [p for name, p in model.named_parameters() if _matches(name, prefix)]
        if not hits:
            raise OptimConfigError(f"optim.freeze: {prefix!r} names no module with parameters")
        for param in hits:
            param.requires_grad_(False)
        frozen += len(hits)
    return frozen


def layer_scales(model: nn.Module, layer_decay: float) -> dict[str, float]:
    """``{parameter name: layer_decay ** (L - 1 - layer)}`` from ``model.group_matcher(coarse=False)`` (timm)."""
    if not hasattr(model, "group_matcher"):
        raise OptimConfigError(f"optim.layer_decay: {type(model).__name__} has no group_matcher() to number its layers")
    layer_map = group_parameters(model, model.group_matcher(coarse=False), reverse=True)  # name -> layer id
    last = max(layer_map.values())
    return {name: layer_decay ** (last - layer_map.get(name, last)) for name, _ in model.named_parameters()}


def param_groups(model: nn.Module, weight_decay: float, *, lr: float = 1.0, lr_mult: dict[str, float] | None = None,
                 layer_decay: float | None = None, decay_embeddings: bool = True) -> list[dict]:
    """AdamW groups, one per (weight decay, LR scale); ``model`` is the unwrapped model (no DDP)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if not decay_embeddings:
        skip |= {f"{m}.{p}".lstrip(".") for m, mod in model.named_modules() if isinstance(mod, nn.Embedding)
                 for p, _ in mod.named_parameters(recurse=False)}
    lr_mult = dict(lr_mult or {})
    names = [name for name, _ in model.named_parameters()]
    for prefix in lr_mult:
        if not any(_matches(n, prefix) for n in names):
            raise OptimConfigError(f"optim.lr_mult: {prefix!r} names no module of {type(model).__name__}")
    depth_scale = layer_scales(model, layer_decay) if layer_decay is not None else {}
    groups: dict[tuple[float, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name in skip or any(name.endswith("." + s) for s in skip)
        prefix = max((p for p in lr_mult if _matches(name, p)), key=len, default=None)
        scale = (lr_mult[prefix] if prefix is not None else 1.0) * depth_scale.get(name, 1.0)
        key = (0.0 if no_decay else weight_decay, scale)
        group = groups.setdefault(key, {"params": [], "weight_decay": key[0], "lr_scale": scale, "lr": lr * scale})
        group["params"].append(param)
    # decayed groups first (the order of the pre-training engine's two groups)
    return sorted(groups.values(), key=lambda g: (g["weight_decay"] == 0.0, -g["lr_scale"]))


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
                    lr_mult: dict[str, float] | None = None, layer_decay: float | None = None,
                    decay_embeddings: bool = True) -> torch.optim.AdamW:
    """AdamW over ``param_groups(model, ...)``."""
    groups = param_groups(model, weight_decay, lr=lr, lr_mult=lr_mult, layer_decay=layer_decay,
                          decay_embeddings=decay_embeddings)
    if not groups:
        raise OptimConfigError(f"{type(model).__name__}: no trainable parameters (is everything frozen?)")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def warmup_decay(step: int, *, total_steps: int, warmup_steps: int, min_lr_ratio: float,
                 decay: str = "cosine") -> float:
    """LR multiplier at optimizer step ``step`` (0-based): linear ramp to 1 over ``warmup_steps``, then cosine or
    linear decay to ``min_lr_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


class WarmupDecay(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` with ``warmup_decay``; its ``state_dict`` holds plain numbers only."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int, min_lr_ratio: float,
                 decay: str = "cosine"):
        self.total_steps, self.warmup_steps, self.min_lr_ratio, self.decay = total_steps, warmup_steps, min_lr_ratio, decay
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        return warmup_decay(step, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                            min_lr_ratio=self.min_lr_ratio, decay=self.decay)

    def state_dict(self) -> dict:
        """Progress only (plain numbers): the schedule's shape comes from the config, so a resumed run may extend
        ``total_steps``."""
        skip = ("optimizer", "lr_lambdas", "_get_lr_called_within_step", "total_steps", "warmup_steps", "min_lr_ratio",
                "decay")
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def load_state_dict(self, state_dict: dict) -> None:
        self.__dict__.update(state_dict)
