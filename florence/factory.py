"""Public model entry points: ``create_model``, ``list_models``, ``load_weights``.

Two kinds of names:

- image towers (``coswin_tiny``, ``swin_base``, ...) are functions registered with ``@register_model`` in
  ``florence.backbone.coswin``; overrides are passed to the function;
- dual encoders (``unicl_test``, ``unicl_coswin_tiny``, ...) are JSON configs in ``florence/configs/models``; overrides
  replace top-level keys, and a dict override (``image={"drop_path_rate": 0.1}``) updates that section.

``pretrained`` is a checkpoint bundle directory (``save_pretrained`` output) or a weights file; for a file the format
is ``pretrained_format`` ("timm", "microsoft" or "florence"; default "timm" for image towers, "florence" otherwise).
"""
from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from florence.registry import get_entrypoint, registered_names

_FORMATS = ("timm", "microsoft", "florence")


def _import_model_modules() -> None:
    import florence.backbone.coswin  # noqa: F401  (registers the image towers)


def _config_dir():
    return resources.files("florence.configs") / "models"


def _dual_config_names() -> list[str]:
    return sorted(p.name[: -len(".json")] for p in _config_dir().iterdir() if p.name.endswith(".json"))


def list_models(pattern: str | None = None) -> list[str]:
    """All model names ``create_model`` accepts (image towers and dual encoders), optionally filtered by fnmatch."""
    import fnmatch

    _import_model_modules()
    names = sorted(set(registered_names()) | set(_dual_config_names()))
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def load_dual_config(name: str) -> dict[str, Any]:
    path = _config_dir() / f"{name}.json"
    if not path.is_file():
        raise KeyError(f"unknown model {name!r}; florence.list_models() gives the known names")
    return json.loads(path.read_text())


def merge_overrides(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Top-level keys are replaced; a dict override updates the dict section it names (one level, no chains)."""
    merged = copy.deepcopy(dict(config))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def create_model(name: str, pretrained: str | Path | None = None, **overrides: Any) -> nn.Module:
    """Build a named model, optionally loading weights.

    Image towers: ``create_model("coswin_tiny", window_size=12, img_size=384)``.
    Dual encoders: ``create_model("unicl_test", tokenizer="path/to/tokenizer_dir")`` (``tokenizer`` may also be a
    transformers tokenizer object; without one, ``model.tokenize`` raises until one is attached).
    """
    _import_model_modules()
    pretrained_format = overrides.pop("pretrained_format", None)
    if name in registered_names():
        model = get_entrypoint(name)(**overrides)
        model.florence_config = {"name": name, "overrides": _jsonable(overrides, name)}
        default_format = "timm"
    else:
        from florence.backbone.unicl import build_unicl

        tokenizer = overrides.pop("tokenizer", None)
        config = merge_overrides(load_dual_config(name), overrides)
        config["name"] = name
        model = build_unicl(config, tokenizer=tokenizer)
        default_format = "florence"
    if pretrained is not None:
        path = Path(pretrained)
        if path.is_dir():
            from florence.bundle import read_bundle_state_dict

            load_weights(model, read_bundle_state_dict(path), format="florence")
        else:
            load_weights(model, path, format=pretrained_format or default_format)
    return model


def _jsonable(overrides: Mapping[str, Any], name: str) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(dict(overrides)))
    except TypeError as e:
        raise TypeError(f"overrides of {name!r} must be JSON values (they are saved in bundles): {e}") from None


def load_weights(model: nn.Module, src: str | Path | Mapping[str, torch.Tensor], format: str = "florence", strict: bool = True):
    """Load weights explicitly and return a ``LoadReport`` (loaded / missing / unexpected / newly initialised / resized).

    - ``format="florence"``: our own key layout for the whole model (what ``save_pretrained`` writes).
    - ``format="timm"`` / ``"microsoft"``: a Swin state dict in timm's or the official Microsoft layout (UniCL and
      DynamicHead checkpoints); for a dual encoder it goes into ``model.image_encoder``.
    """
    from florence.backbone.convert import LoadReport, load_image_tower_weights, read_state_dict
    from florence.backbone.coswin import CoSwin

    if format not in _FORMATS:
        raise ValueError(f"format must be one of {_FORMATS}, got {format!r}")
    if format != "florence":
        tower = model if isinstance(model, CoSwin) else getattr(model, "image_encoder", None)
        if not isinstance(tower, CoSwin):
            raise TypeError(f"format={format!r} loads a Swin/CoSwin image tower; {type(model).__name__} has none")
        return load_image_tower_weights(tower, src, format=format, strict=strict)
    state = read_state_dict(src)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    mismatched = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    if strict and (missing or unexpected or mismatched):
        raise KeyError(
            f"{type(model).__name__}: strict load failed: missing {missing[:10]} ({len(missing)}), "
            f"unexpected {unexpected[:10]} ({len(unexpected)}), shape mismatch {mismatched[:10]}"
        )
    loadable = {k: v for k, v in state.items() if k in own and k not in mismatched}
    model.load_state_dict(loadable, strict=False)
    return LoadReport(
        loaded=sorted(loadable), missing=missing, unexpected=sorted(unexpected + mismatched), newly_initialized=missing, resized=[]
    )
