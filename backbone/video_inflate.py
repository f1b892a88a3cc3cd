"""Weights for the video tower: inflating a 2D CoSwin / Swin (SPEC §7.1-7.2, §10.2 item 9) and mmaction2 checkpoints.

``load_video_tower_weights(model, src, format)`` fills a :class:`~florence.backbone.video_coswin.VideoCoSwin` and
returns a :class:`~florence.weights.LoadReport`. Formats:

- ``"inflate"``: a 2D tower, given as a module, a bundle directory (a dual encoder's image tower or an image-tower
  bundle) or a timm-layout Swin / CoSwin checkpoint file; ``"inflate-microsoft"``: a checkpoint in the official Swin
  layout (UniCL's). Per key of the video model (``inflated`` lists what changed shape):

  - a convolution ``(out, in, k, k)`` -> ``(out, in, kt, k, k)``: the 2D kernel repeated ``kt`` times along time and
    divided by ``kt`` (Video Swin ``inflate_weights``; a static clip then gives the 2D response);
  - a relative-position table ``((2h-1)(2w-1), nH)`` -> ``((2Wt-1)(2Wh-1)(2Ww-1), nH)``: resized bicubically to the
    stage's spatial window when it differs (listed in ``resized``), then the same table for every temporal offset;
  - everything else (attention, MLP, norms, patch-merging linear, classifier of the same shape) copied;
  - Swin's 4x4 patch embedding / patch merging into a conv-embedding model cannot be inflated: those model keys keep
    their fresh initialisation (``newly_initialized``) and the checkpoint's are ``skipped``, as in the 2D loader.

- ``"mmaction2"``: an mmaction2 ``Recognizer3D`` / Video Swin checkpoint (``backbone.*`` keys of
  ``SwinTransformer3D``; ``cls_head.fc_cls.*``). Its downsampling sits at the end of a stage (``layers.0.downsample``),
  ours at the start of the next; the classifier ``cls_head.fc_cls`` becomes ``head.fc`` (loaded when the class count
  matches); ``relative_position_index`` buffers are dropped.

Our own layout loads through ``florence.load_weights`` (format ``"florence"``), as for every model.

Strict (default): anything missing (other than deliberately fresh keys), unexpected or of the wrong shape raises a
:class:`~florence.weights.WeightsError` naming the keys.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from florence.backbone.convert import _BUFFERS, _EMBED_KEY, _strip_prefixes, microsoft_to_timm, \
    resize_relative_position_table
from florence.bundle import from_pretrained
from florence.weights import LoadReport, WeightsError, read_state_dict

__all__ = ["load_video_tower_weights", "inflate_state_dict", "mmaction2_to_florence", "inflate_bias_table",
           "inflate_conv"]

FORMATS = ("inflate", "inflate-microsoft", "mmaction2")


def inflate_conv(weight: torch.Tensor, frames: int) -> torch.Tensor:
    """``(out, in, kh, kw)`` -> ``(out, in, frames, kh, kw)``: repeated along time and divided by ``frames``."""
    return weight.unsqueeze(2).repeat(1, 1, frames, 1, 1) / frames


def inflate_bias_table(table: torch.Tensor, window: tuple[int, int, int]) -> torch.Tensor:
    """A 2D table ``((2h-1)(2w-1), nH)`` -> the 3D table of ``window = (Wt, Wh, Ww)``: resized to ``(Wh, Ww)`` if
    needed, then tiled over the ``2Wt-1`` temporal offsets (the temporal offset is the slowest index)."""
    table = resize_relative_position_table(table, window[1:])  # (2Wh-1)(2Ww-1), nH
    return table.repeat(2 * window[0] - 1, 1)  # (2Wt-1)(2Wh-1)(2Ww-1), nH


def mmaction2_to_florence(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmaction2 Video Swin keys -> ours: the recognizer's ``cls_head.fc_cls`` joins the backbone as ``head.fc``,
    the ``backbone.`` subtree is taken, downsampling moves to the next stage, buffers are dropped."""
    renamed = {re.sub(r"^cls_head\.fc_cls\.", "backbone.head.", k): v for k, v in state.items()}
    if not any(k.startswith("backbone.") for k in renamed):
        renamed = {re.sub(r"^backbone\.head\.", "head.", k): v for k, v in renamed.items()}
    tower, _ = _strip_prefixes(renamed)
    tower = {re.sub(r"^norm\d+\.", "norm.", k): v for k, v in tower.items()}  # mmaction2 1.x: norm3 (out_indices)
    return {k: v for k, v in microsoft_to_timm(tower).items() if not k.endswith(_BUFFERS)}


def _read_2d(src, format: str) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """The 2D tower's state dict (timm layout), the keys left out, and a name for messages."""
    if isinstance(src, nn.Module):
        return dict(src.state_dict()), [], type(src).__name__
    if isinstance(src, Mapping):
        state, left_out = _strip_prefixes(dict(src))
        origin = "state dict"
    elif Path(src).is_dir():
        model = from_pretrained(src)
        tower = model.image_tower() if hasattr(model, "image_tower") else model
        return dict(tower.state_dict()), [], str(src)
    else:
        state, left_out = _strip_prefixes(read_state_dict(src))
        origin = str(src)
    if format == "inflate-microsoft":
        state = microsoft_to_timm(state)
    return state, left_out, origin


def inflate_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[dict, LoadReport]:
    """Map a 2D timm-layout state dict onto ``model``'s keys (module docstring); returns ``(loadable, report)`` where
    ``report.unexpected`` also lists shape mismatches."""
    own = model.state_dict()
    report = LoadReport()
    report.skipped = sorted(k for k in state if k.endswith(_BUFFERS))
    state = {k: v for k, v in state.items() if not k.endswith(_BUFFERS)}
    head_fits = all(k in own and own[k].shape == v.shape for k, v in state.items() if k.startswith("head."))
    stem = state.get("patch_embed.proj.weight")
    # a Swin source (4x4 patch embedding, patch merging) into conv embeddings: the whole embedding starts fresh
    swin_into_conv = model.embed == "conv" and stem is not None and \
        stem.shape[-1] != own["patch_embed.proj.weight"].shape[-1]
    loadable: dict[str, torch.Tensor] = {}
    inflated = []
    for k, v in state.items():
        if (k.startswith("head.") and not head_fits) or (swin_into_conv and _EMBED_KEY.match(k)):
            report.skipped.append(k)
            continue
        if k not in own:
            report.unexpected.append(k)
            continue
        target = own[k]
        if k.endswith("relative_position_bias_table") and v.shape != target.shape:
            window = model.get_submodule(k.rsplit(".", 1)[0]).window_size
            if v.shape[0] != (2 * window[1] - 1) * (2 * window[2] - 1):
                report.resized.append(k)
            v = inflate_bias_table(v, window)
            inflated.append(k)
        elif v.ndim == 4 and target.ndim == 5 and v.shape[-2:] == target.shape[-2:]:
            v = inflate_conv(v, target.shape[2])
            inflated.append(k)
        if v.shape != target.shape:
            report.unexpected.append(f"{k} {tuple(v.shape)} vs {tuple(target.shape)}")
            continue
        loadable[k] = v.to(target.dtype)
    fresh = [k for k in own
             if k not in loadable and (k.startswith("head.") or (swin_into_conv and _EMBED_KEY.match(k)))]
    report.newly_initialized = sorted(fresh)
    report.missing = sorted(k for k in own if k not in loadable and k not in fresh)
    report.loaded = sorted(loadable)
    report.inflated = sorted(inflated)
    report.skipped = sorted(report.skipped)
    report.resized = sorted(report.resized)
    return loadable, report


def load_video_tower_weights(model: nn.Module, src, *, format: str = "inflate", strict: bool = True) -> LoadReport:
    """Fill ``model`` from ``src`` in ``format`` (module docstring) and report it."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format.startswith("inflate"):
        state, left_out, origin = _read_2d(src, format)
        loadable, report = inflate_state_dict(model, state)
        report.skipped = sorted(report.skipped + left_out)
    else:
        origin = src if not isinstance(src, Mapping) else "state dict"
        state = mmaction2_to_florence(read_state_dict(src) if not isinstance(src, Mapping) else dict(src))
        own = model.state_dict()
        loadable, report = {}, LoadReport()
        for k, v in state.items():
            if k.startswith("head.") and (k not in own or own[k].shape != v.shape):
                report.skipped.append(k)
            elif k not in own or own[k].shape != v.shape:
                report.unexpected.append(k if k not in own else f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}")
            else:
                loadable[k] = v
        report.newly_initialized = sorted(k for k in own if k.startswith("head.") and k not in loadable)
        report.missing = sorted(k for k in own if k not in loadable and not k.startswith("head."))
        report.loaded = sorted(loadable)
    if strict and (report.missing or report.unexpected):
        raise WeightsError(f"{origin} ({format}) does not fit {type(model).__name__}(embed={model.embed!r}): "
                           f"missing {report.missing[:10]} ({len(report.missing)} in all), unexpected / wrong shape "
                           f"{report.unexpected[:10]} ({len(report.unexpected)})")
    model.load_state_dict(loadable, strict=False)
    report.unexpected = sorted(u.split(" ")[0] for u in report.unexpected)
    return report
