"""florence: the Florence-1 vision foundation model in PyTorch.

Public entry points (kept stable; later features build on them):

- ``create_model(name, pretrained=None, **overrides)`` / ``list_models()``
- ``load_weights(model, path_or_state_dict, format="timm" | "microsoft" | "florence")`` -> ``LoadReport``
- ``from_pretrained(dir)`` and ``model.save_pretrained(dir)`` (checkpoint bundles)
- ``UniCLLoss()(image_embeds, text_embeds, labels, logit_scale)``

Names resolve lazily so ``import florence`` stays cheap and submodules can import each other freely.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "create_model": "florence.factory",
    "list_models": "florence.factory",
    "load_weights": "florence.factory",
    "from_pretrained": "florence.bundle",
    "save_pretrained": "florence.bundle",
    "BundleError": "florence.bundle",
    "UniCLLoss": "florence.backbone.loss",
    "UniCLModel": "florence.backbone.unicl",
    "UniCLOutput": "florence.backbone.unicl",
    "CoSwin": "florence.backbone.coswin",
    "LoadReport": "florence.weights",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'florence' has no attribute {name!r}")
