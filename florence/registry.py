"""Name -> model entry point, filled by ``@register_model`` at each definition site (timm style).

A plain dict: ``create_model("coswin_tiny")`` looks the function up and calls it with the overrides.
"""
from __future__ import annotations

from typing import Callable

_ENTRYPOINTS: dict[str, Callable] = {}


def register_model(fn: Callable) -> Callable:
    """Register ``fn`` under its own ``__name__``; the function builds the model from keyword overrides."""
    name = fn.__name__
    if name in _ENTRYPOINTS and _ENTRYPOINTS[name] is not fn:
        raise ValueError(f"model name {name!r} registered twice")
    _ENTRYPOINTS[name] = fn
    return fn


def get_entrypoint(name: str) -> Callable:
    try:
        return _ENTRYPOINTS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; florence.list_models() gives the known names") from None


def registered_names() -> list[str]:
    return sorted(_ENTRYPOINTS)
