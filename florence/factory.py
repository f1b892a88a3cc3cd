"""Public model entry points: ``create_model``, ``list_models``, ``load_weights``, ``image_tower``.

Two kinds of names:

- functions registered with ``@register_model`` (image towers ``coswin_tiny``, ``swin_base``, ...; composite models
  later); overrides are passed to the function;
- JSON configs in ``florence/configs/models`` (``unicl_test``, ``unicl_coswin_tiny``, ...): the file names its
  ``architecture``; overrides replace top-level keys, a dict override (``image={"drop_path_rate": 0.1}``) updates that
  section, and the architecture's class builds the model (``cls.from_config(config, **extras)``).

``pretrained`` is a checkpoint bundle directory (``save_pretrained`` output) or a weights file; for a file the format
is ``pretrained_format`` ("florence" = our own layout, or a foreign layout the model knows, e.g. "timm" or "microsoft"
for Swin image towers; default: ``model.default_weight_format``).

``backbone=`` builds a composite model around a pre-trained image tower: a bundle directory (the tower of a dual
encoder or an image-tower bundle, with its preprocessing) or a tower name; ``image_tower(spec)`` resolves it, or the
architecture's own ``resolve_backbone(spec)`` when it takes more than the image tower (METER takes both towers).

This module knows no model class: registries (``florence.registry``) find them.
"""
from __future__ import annotations

import copy
import fnmatch
import json
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from florence.bundle import from_pretrained, read_bundle_state_dict
from florence.errors import FlorenceError
from florence.registry import UnknownNameError, find_source, get_architecture, get_entrypoint, registered_names
from florence.weights import LoadReport, WeightsError, read_state_dict

FLORENCE_FORMAT = "florence"


def _config_dir():
    return resources.files("florence.configs") / "models"


def _json_config_names() -> list[str]:
    return sorted(p.name[: -len(".json")] for p in _config_dir().iterdir() if p.name.endswith(".json"))


def list_models(pattern: str | None = None) -> list[str]:
    """All model names ``create_model`` accepts, optionally filtered by fnmatch."""
    names = sorted(set(registered_names()) | set(_json_config_names()))
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def load_model_config(name: str) -> dict[str, Any]:
    """The named JSON config (``configs/models/<name>.json``); it names its ``architecture``."""
    path = _config_dir() / f"{name}.json"
    if not path.is_file():
        raise UnknownNameError(f"unknown model {name!r}; florence.list_models() gives the known names")
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


def image_tower(spec: str | Path | nn.Module, **overrides: Any) -> nn.Module:
    """A pre-trained image tower: a bundle directory (a dual encoder's ``image_tower()`` or an image-tower bundle,
    keeping the bundle's preprocessing), a model source spelling such as ``open_clip:ARCH:WEIGHTS`` (the loaded model's
    ``image_tower()``: a CoSwin for an open_clip timm-Swin tower, keeping the source's preprocessing), a registered
    tower name (fresh weights) or a module (returned as is).

    ``overrides`` change training settings of the tower's constructor (``drop_path_rate=0.1``): the tower is rebuilt
    with them and the pre-trained weights loaded strictly into it.
    """
    if isinstance(spec, nn.Module):
        return spec
    if not Path(spec).is_dir() and find_source(str(spec)) is None:
        return create_model(str(spec), **overrides)
    model = from_pretrained(spec)
    tower = model.image_tower() if hasattr(model, "image_tower") else model
    if overrides:
        base = tower.florence_config
        rebuilt = create_model(base["name"], **{**base["overrides"], **overrides})
        rebuilt.load_state_dict(tower.state_dict())
        tower = rebuilt
    tower.preprocess = dict(model.preprocess)
    return tower.train()


def create_model(name: str, pretrained: str | Path | None = None, **overrides: Any) -> nn.Module:
    """Build a named model, optionally loading weights.

    Image towers: ``create_model("coswin_tiny", window_size=12, img_size=384, num_classes=10)``.
    Dual encoders: ``create_model("unicl_test", tokenizer="path/to/tokenizer_dir")`` (``tokenizer`` may also be a
    transformers tokenizer object; without one, ``model.tokenize`` raises until one is attached).
    Composite models: ``create_model("image_classifier", backbone="runs/demo/pretrain/final", num_classes=10)``.
    """
    pretrained_format = overrides.pop("pretrained_format", None)
    if name in registered_names():
        if "backbone" in overrides:
            overrides["backbone"] = image_tower(overrides["backbone"])
        model = get_entrypoint(name)(**overrides)
        if getattr(model, "florence_config", None) is None:  # composites set their own (the tower, not the path)
            model.florence_config = {"name": name, "overrides": _jsonable(overrides, name)}
    else:
        config = load_model_config(name)
        extras = {k: overrides.pop(k) for k in list(overrides) if k in ("tokenizer", "backbone")}
        config = merge_overrides(config, overrides)
        architecture = config.pop("architecture", None)
        if architecture is None:
            raise FlorenceError(f"configs/models/{name}.json: no 'architecture' key")
        config["name"] = name
        cls = get_architecture(architecture)
        if "backbone" in extras:  # the image tower, or what the architecture takes (METER: both towers)
            extras["backbone"] = getattr(cls, "resolve_backbone", image_tower)(extras["backbone"])
        model = cls.from_config(config, **extras)
    if pretrained is not None:
        path = Path(pretrained)
        if path.is_dir():
            load_weights(model, read_bundle_state_dict(path), format=FLORENCE_FORMAT)
        else:
            load_weights(model, path, format=pretrained_format or getattr(model, "default_weight_format",
                                                                          FLORENCE_FORMAT))
    return model


def _jsonable(overrides: Mapping[str, Any], name: str) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(dict(overrides)))
    except TypeError as e:
        raise TypeError(f"overrides of {name!r} must be JSON values (they are saved in bundles): {e}") from None


def load_weights(model: nn.Module, src: str | Path | Mapping[str, torch.Tensor], format: str = FLORENCE_FORMAT,
                 strict: bool = True) -> LoadReport:
    """Load weights explicitly and return a ``LoadReport`` (loaded / missing / unexpected / new / resized / skipped).

    - ``format="florence"``: our own key layout for the whole model (what ``save_pretrained`` writes).
    - any other format: the model's own converter, ``model.load_foreign_weights(src, format=..., strict=...)``
      (Swin image towers and the models holding one read "timm" and "microsoft" layouts).
    """
    if format != FLORENCE_FORMAT:
        if not hasattr(model, "load_foreign_weights"):
            raise TypeError(f"{type(model).__name__} reads only format={FLORENCE_FORMAT!r} weights, not {format!r}")
        return model.load_foreign_weights(src, format=format, strict=strict)
    state = read_state_dict(src)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    mismatched = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    if strict and (missing or unexpected or mismatched):
        raise WeightsError(
            f"{type(model).__name__}: strict load failed: missing {missing[:10]} ({len(missing)}), "
            f"unexpected {unexpected[:10]} ({len(unexpected)}), shape mismatch {mismatched[:10]}"
        )
    loadable = {k: v for k, v in state.items() if k in own and k not in mismatched}
    model.load_state_dict(loadable, strict=False)
    return LoadReport(
        loaded=sorted(loadable), missing=missing, unexpected=sorted(unexpected + mismatched), newly_initialized=missing,
        resized=[],
    )
