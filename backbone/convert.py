"""Foreign weights for the image tower: timm and Microsoft Swin layouts, relative-position table resizing.

``load_image_tower_weights(model, src, format)`` reads a state dict (``.safetensors``, or ``.pth/.pt/.bin`` with
``torch.load(weights_only=True)``; nothing is unpickled), maps it onto :class:`~florence.backbone.coswin.CoSwin`
and returns a :class:`LoadReport`.

Formats:

- ``"timm"``: ``timm.models.swin_transformer.SwinTransformer`` keys. Our parameter names are timm's (classifier
  included: ``head.fc``), so only the non-persistent buffers are dropped.
- ``"microsoft"``: the official Swin repository layout (UniCL and DynamicHead checkpoints use it). It puts patch
  merging at the *end* of a stage (``layers.0.downsample`` exists), timm and we at the *start* of the next one, so
  ``layers.N.downsample.*`` becomes ``layers.N+1.downsample.*`` and the classifier ``head.*`` becomes ``head.fc.*``;
  ``relative_position_index`` and ``attn_mask`` buffers are dropped (timm's ``checkpoint_filter_fn`` does the same).
- ``"florence"``: our own layout (what ``state_dict()`` gives), loaded as is.

Classifier: the checkpoint's ``head.fc.*`` loads into the model's classifier when the model has one of the same
shape (same class count); otherwise (no classifier, or another class count) the checkpoint's head is listed in
``skipped`` and the model's classifier, if any, keeps its fresh initialisation (``newly_initialized``).

Loading a Swin checkpoint (timm / microsoft) into a CoSwin with convolutional embeddings (``embed="conv"``): the
transformer blocks and the final norm load; Swin's patch embedding and patch-merging keys cannot (different
operators) and are listed in ``skipped``; our ``patch_embed.*`` and ``layers.*.downsample.*`` parameters keep their
fresh initialisation and are listed in ``newly_initialized``. That is the only "missing" a strict load accepts.

Relative-position bias tables whose window differs from the model's are resized bicubically per head, as Swin's
``load_pretrained`` does for 224 -> 384 (window 7 -> 12); their names are listed in ``resized``. One exception:
a stage whose feature map at the model's ``img_size`` is smaller than the window was built by timm and the official
code with a clamped window ``v`` and a ``(2v-1)^2`` table; our tower keeps the configured table and reads its central
part there, so such a table is placed at the centre of ours (zeros at the offsets a ``v x v`` window never reads):
exact at that size, listed in ``resized`` too.

Wrappers: ``{"model": ...}``, ``{"state_dict": ...}`` and ``{"module": ...}`` are unwrapped; ``module.`` /
``model.`` prefixes are stripped; when keys carry an ``image_encoder.`` (UniCL) or ``backbone.`` /
``backbone.bottom_up.`` (detection) prefix, only that subtree is taken and the rest is listed in ``skipped``.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Mapping

import torch
import torch.nn.functional as F

from florence.weights import LoadReport, WeightsError, read_state_dict

if TYPE_CHECKING:  # coswin.py imports this module for CoSwin.load_foreign_weights
    from florence.backbone.coswin import CoSwin

__all__ = [
    "LoadReport", "load_image_tower_weights", "read_state_dict", "microsoft_to_timm", "resize_relative_position_table",
    "center_relative_position_table",
]

_BUFFERS = ("relative_position_index", "attn_mask")
_EMBED_KEY = re.compile(r"^(patch_embed\.|layers\.\d+\.downsample\.)")
_STRIP_PREFIXES = ("module.", "model.")
_SUBTREE_PREFIXES = ("image_encoder.", "backbone.bottom_up.", "backbone.")


def _strip_prefixes(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Remove wrapper prefixes; select the image-tower subtree. Returns (state, keys left out)."""
    left_out: list[str] = []
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
        for prefix in _SUBTREE_PREFIXES:
            if any(k.startswith(prefix) for k in state):
                left_out += [k for k in state if not k.startswith(prefix)]
                state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                changed = True
                break
    return state, left_out


def microsoft_to_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official Swin keys -> timm keys: ``layers.N.downsample`` -> ``layers.N+1.downsample``, ``head`` ->
    ``head.fc`` (other names agree)."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", k)
        out[re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)] = v
    return out


def resize_relative_position_table(table: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Bicubically resize a ``((2h-1)(2w-1), nH)`` table from a square source window to ``window`` (Swin's recipe)."""
    length, heads = table.shape
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"relative-position table of {length} rows is not square; cannot infer its window")
    size = (2 * window[0] - 1, 2 * window[1] - 1)
    if (side, side) == size:
        return table
    grid = table.float().t().reshape(1, heads, side, side)  # 1, nH, 2w-1, 2w-1
    grid = F.interpolate(grid, size=size, mode="bicubic", align_corners=False)  # 1, nH, 2W-1, 2W-1
    return grid.reshape(heads, -1).t().to(table.dtype)  # (2W-1)^2, nH


def center_relative_position_table(table: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """A ``((2v-1)^2, nH)`` table of a clamped square window ``v`` placed at the centre of a ``((2h-1)(2w-1), nH)``
    zero table for the configured ``window`` (a clamped window reads only the central offsets)."""
    small = math.isqrt(table.shape[0])
    rows, cols = 2 * window[0] - 1, 2 * window[1] - 1
    grid = table.new_zeros(rows, cols, table.shape[1])
    top, left = (rows - small) // 2, (cols - small) // 2
    grid[top:top + small, left:left + small] = table.reshape(small, small, -1)
    return grid.reshape(rows * cols, -1)  # (2h-1)(2w-1), nH


def _clamped_side(model: "CoSwin", key: str) -> int | None:
    """``2v - 1`` for the clamped window ``v`` of the stage owning ``key`` at the model's ``img_size``, or None when
    that stage's feature map is no smaller than its window (feature size: ceil(img / (4 * 2^i)), timm's padding)."""
    stage = int(re.match(r"^layers\.(\d+)\.", key).group(1))
    feature = [-(-size // (4 * 2**stage)) for size in model.img_size]
    clamped = [min(f, w) for f, w in zip(feature, model.window_size)]
    if clamped == list(model.window_size) or clamped[0] != clamped[1]:
        return None
    return 2 * clamped[0] - 1


def load_image_tower_weights(
    model: "CoSwin",
    src: str | Path | Mapping[str, torch.Tensor],
    format: Literal["timm", "microsoft", "florence"] = "timm",
    strict: bool = True,
) -> LoadReport:
    """Load a Swin / CoSwin state dict into ``model`` and report what happened (see the module docstring).

    Strict (default): raises ``KeyError`` naming the keys when anything is missing (other than the deliberately
    newly initialised conv embeddings), unexpected, or of the wrong shape. Non-strict: loads what fits.
    """
    if format not in ("timm", "microsoft", "florence"):
        raise ValueError(f"format must be 'timm', 'microsoft' or 'florence', got {format!r}")
    origin = src if not isinstance(src, Mapping) else "state dict"
    state, skipped = _strip_prefixes(read_state_dict(src))
    if format == "microsoft":
        state = microsoft_to_timm(state)

    own = model.state_dict()
    head_fits = all(k in own and own[k].shape == v.shape for k, v in state.items() if k.startswith("head."))
    dropped = {k for k in state if k.endswith(_BUFFERS) or (k.startswith("head.") and not head_fits)}
    skipped += dropped
    state = {k: v for k, v in state.items() if k not in dropped}
    # a classifier the checkpoint does not fill (headless checkpoint, or another class count) starts fresh
    newly_initialized = [k for k in own if k.startswith("head.") and k not in state]
    swin_source_into_conv = format != "florence" and model.embed == "conv"
    if swin_source_into_conv:
        skipped += [k for k in state if _EMBED_KEY.match(k)]
        state = {k: v for k, v in state.items() if not _EMBED_KEY.match(k)}
        newly_initialized += [k for k in own if _EMBED_KEY.match(k)]

    resized, mismatched, loadable = [], [], {}
    for k, v in state.items():
        if k not in own:
            continue
        if k.endswith("relative_position_bias_table") and v.shape != own[k].shape and v.shape[1] == own[k].shape[1]:
            window = model.get_submodule(k.rsplit(".", 1)[0]).window_size
            if _clamped_side(model, k) == math.isqrt(v.shape[0]) and v.shape[0] < own[k].shape[0]:
                v = center_relative_position_table(v, window)
            else:
                v = resize_relative_position_table(v, window)
            resized.append(k)
        if v.shape != own[k].shape:
            mismatched.append(f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}")
            continue
        loadable[k] = v
    missing = sorted(k for k in own if k not in state and k not in newly_initialized)
    unexpected = sorted(k for k in state if k not in own)
    if strict and (missing or unexpected or mismatched):
        raise WeightsError(
            f"{origin} ({format} layout) does not fit {type(model).__name__}(embed={model.embed!r}): "
            f"missing {missing[:10]} ({len(missing)} in all), unexpected {unexpected[:10]} ({len(unexpected)}), "
            f"shape mismatch {mismatched[:10]} ({len(mismatched)})"
        )
    model.load_state_dict(loadable, strict=False)
    return LoadReport(
        loaded=sorted(loadable),
        missing=missing,
        unexpected=sorted(unexpected + [m.split(" ")[0] for m in mismatched]),
        newly_initialized=sorted(newly_initialized),
        resized=sorted(resized),
        skipped=sorted(skipped),
    )
