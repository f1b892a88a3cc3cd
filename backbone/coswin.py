"""CoSwin image tower: Swin Transformer blocks with CvT convolutional embeddings (Florence, SPEC §1).

``CoSwin(embed="conv")`` is the Florence image encoder: stem ``Conv(3, C, 7, s4, p2) + LN`` and, between stages,
``Conv(C_i, 2C_i, 3, s2, p1) + LN`` instead of Swin's patch merging. ``CoSwin(embed="patch")`` is the plain Swin
Transformer (``Conv(3, C, 4, s4) + LN`` stem, 2x2 patch merging), so published Swin checkpoints load unchanged.

Parameter names follow timm's ``SwinTransformer`` (``patch_embed.proj``, ``layers.N.downsample``,
``layers.N.blocks.M.attn.qkv``, ``...attn.relative_position_bias_table``, ``norm1``, ``mlp.fc1``, ``norm``,
``head.fc``), so a timm state dict loads with no mapping (``backbone/convert.py`` handles the Microsoft layout).

Contract (timm's, for ``swin_*`` equal to timm's values within 1e-5):

- ``forward_features(x)``: ``(B, 3, H, W)`` -> the final LayerNorm'd map, NHWC ``(B, H/32, W/32, 8C)``.
- ``forward_head(x, pre_logits=False)``: global pool (mean over H, W) -> ``(B, 8C)``, head dropout, then the
  classifier ``head.fc`` when ``num_classes > 0``; ``pre_logits=True`` stops before the classifier.
- ``forward(x) = forward_head(forward_features(x))``: the pooled ``(B, 8C)`` feature for ``num_classes=0`` (the
  default; UniCL's image tower) or ``(B, num_classes)`` logits. ``reset_classifier(n, global_pool=None)``,
  ``get_classifier()``.
- ``forward_intermediates(x, indices=None, norm=False, stop_early=False, output_fmt="NCHW",
  intermediates_only=False)``: the stage outputs selected by ``indices`` (None: all; an int n: the last n; a list:
  those stages, negative from the end) as NCHW (or NHWC) maps, and the final normed map unless
  ``intermediates_only``; ``prune_intermediate_layers(indices=1, prune_norm=False, prune_head=True)`` drops what
  those indices do not need. ``norm=True`` applies the final norm to the last stage's map only (timm).
- ``out_norms=True`` (off by default) adds Swin-Det's per-level output norms ``norm0 .. norm{S-1}`` (LayerNorm over
  the stage's channels); ``forward_intermediates`` then returns every level through its own norm (in place of
  ``norm=True``), which is what a detection neck loaded from Swin-Det weights expects.
- ``forward_tokens(x)``: ``(tokens (B, N, 8C), (H, W))``, the final normed map as a token sequence (METER).
- ``group_matcher(coarse=False)``: timm's Swin grouping (stem = ``patch_embed``; blocks by stage and block, a
  stage's downsampling with its first block; final norm last), so ``timm.optim.param_groups_layer_decay`` works.
- ``feature_info``, ``num_features``, ``set_grad_checkpointing``, ``no_weight_decay``, ``default_preprocess``,
  ``fused_attn``.

Geometry. The model accepts any input size. Each stage has a configured window (the bias table is sized for it).
At run time, per feature size (H, W) and per dimension: if the feature is no larger than the window, the window is
clamped to the feature and the shift is 0; otherwise the shifted blocks shift by window // 2 (Swin's rule; timm's
``_calc_window_shift`` with ``always_partition=False`` for a model built at that size). A clamped window reads the
central part of the bias table, i.e. the same relative-offset biases. Maps that are not a window multiple are
zero-padded at the bottom/right after ``norm1`` and cropped after attention; ``window_pad`` says where:

- ``"before_shift"`` (default; Swin-Det, the detection code Florence's adapters follow): pad, then the cyclic shift
  wraps around the padded map; the shift mask is built on the padded map.
- ``"after_shift"`` (timm): the cyclic shift wraps around the unpadded map, then pad; the shift mask is built on the
  padded map with the same regions (timm's ``SwinTransformerBlock._attn`` / ``get_attn_mask``).

The two agree whenever the map is a window multiple (e.g. 224 x 224) and differ otherwise (e.g. 224 x 320: stage 4
is 7 x 10). timm fixes each block's window and shift when the model is built (``img_size``); ours follow the input,
which equals timm built (or ``set_input_size``) at that input size. Relative-position indices, shift masks and
window orders are built once per (feature size, device, window_pad) and cached in the stage (rebuilt, not cached,
while ``torch.compile`` traces, so ``fullgraph=True`` holds).

Speed. The cyclic shift and the window partition (and their inverses) are one precomputed token gather each way
instead of ``roll`` + ``permute`` copies (for both ``window_pad`` orders); the bias and shift mask are combined once
per block; ``fused_attn`` runs ``F.scaled_dot_product_attention`` with a 4-D float mask so PyTorch's fused CPU/GPU
kernels apply. ``benchmarks/perf/backbone.py`` measures it against timm.

Training settings are not part of a size: the named sizes build with ``drop_path_rate=0``; set it when creating the
model (``create_model("coswin_tiny", drop_path_rate=0.2)``). Dropout names are timm's: ``drop_rate`` (head, before
the classifier), ``proj_drop_rate`` (MLP and attention projection), ``attn_drop_rate``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead, DropPath, Mlp
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from florence.backbone.convert import load_image_tower_weights
from florence.bundle import BundleMixin
from florence.registry import register_architecture, register_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SHIFT_MASK_VALUE = -100.0  # Swin masks cross-region pairs with -100, not -inf
WINDOW_PADS = ("before_shift", "after_shift")

__all__ = [
    "CoSwin", "SwinBlock", "SwinTowerMixin", "WindowAttention", "PatchMerging", "TokenOrder", "permute_tokens",
    "window_partition", "window_reverse", "window_order", "relative_position_index", "shift_attention_mask", "swin_name",
    "partition_keeps_order",
]


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


# ----------------------------------------------------------------------------------------------------------------
# window helpers


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Split ``(B, H, W, C)`` into non-overlapping windows ``(B * nW, wh * ww, C)``, row-major over windows.

    H and W must be multiples of the window.
    """
    B, H, W, C = x.shape
    wh, ww = window
    x = x.view(B, H // wh, wh, W // ww, ww, C)  # B, nH, wh, nW, ww, C
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, C)  # B*nWin, wh*ww, C


def window_reverse(windows: torch.Tensor, window: tuple[int, int], H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW, wh * ww, C)`` -> ``(B, H, W, C)``."""
    wh, ww = window
    C = windows.shape[-1]
    x = windows.view(-1, H // wh, W // ww, wh, ww, C)  # B, nH, nW, wh, ww, C
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)  # B, H, W, C


def relative_position_index(
    window: tuple[int, int], table_window: tuple[int, int] | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Index of each (query, key) pair of a window into a relative-position bias table.

    Swin's construction: pairwise coordinate differences shifted to be non-negative, the row offset multiplied by
    ``2 * Ww - 1``. ``table_window`` (default: ``window``) is the window the table was built for; a smaller
    ``window`` reads the entries of the same relative offsets. Returns a LongTensor ``(wh*ww, wh*ww)``.
    """
    wh, ww = window
    th, tw = table_window or window
    if wh > th or ww > tw:
        raise ValueError(f"window {window} is larger than the bias table's window {table_window}")
    rows, cols = torch.arange(wh, device=device), torch.arange(ww, device=device)
    coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))  # 2, wh, ww
    coords = coords.flatten(1)  # 2, wh*ww
    rel = coords[:, :, None] - coords[:, None, :]  # 2, N, N
    return (rel[0] + th - 1) * (2 * tw - 1) + (rel[1] + tw - 1)  # N, N


def shift_attention_mask(
    padded_size: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], device: torch.device | None = None
) -> torch.Tensor:
    """Swin's shifted-window mask ``(nW, N, N)``: 0 within a region, -100 across regions of the rolled map.

    ``padded_size`` is (Hp, Wp), multiples of ``window``; regions are the slices ``[0, -w)``, ``[-w, -s)``,
    ``[-s, end)`` per dimension (both ``window_pad`` orders label the padded map this way).
    """
    Hp, Wp = padded_size
    region = torch.zeros(1, Hp, Wp, 1, device=device)
    label = 0
    for hs in (slice(0, -window[0]), slice(-window[0], -shift[0] or None), slice(-shift[0] or Hp, None)):
        for ws in (slice(0, -window[1]), slice(-window[1], -shift[1] or None), slice(-shift[1] or Wp, None)):
            region[:, hs, ws, :] = label
            label += 1
    region = window_partition(region, window).squeeze(-1)  # nW, N
    diff = region[:, None, :] - region[:, :, None]  # nW, N, N
    return torch.zeros_like(diff).masked_fill_(diff != 0, SHIFT_MASK_VALUE)


def window_order(
    padded_size: tuple[int, int],
    window: tuple[int, int],
    shift: tuple[int, int],
    device: torch.device | None = None,
    roll_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Token permutation doing Swin's cyclic shift by ``-shift`` and :func:`window_partition` in one gather.

    For tokens ``t (B, Hp*Wp, C)`` (row-major, the map already zero-padded to ``padded_size``), ``t[:, order]``
    equals ``window_partition(roll(t.view(B, Hp, Wp, C)), window)`` flattened to ``(B, nW*N, C)``, where the roll
    by ``(-sh, -sw)`` wraps around ``roll_size``: the padded map (None, ``window_pad="before_shift"``) or the
    unpadded ``(H, W)`` top-left part, the padding staying in place (``"after_shift"``: roll, then pad). Rows and
    columns move independently, so it is a permutation; ``t[:, argsort(order)]`` undoes it (window_reverse + roll
    back). Returns ``(Hp*Wp,)`` long.
    """
    Hp, Wp = padded_size
    Rh, Rw = roll_size or padded_size
    rows, cols = torch.arange(Hp, device=device), torch.arange(Wp, device=device)
    rows = torch.where(rows < Rh, (rows + shift[0]) % Rh, rows)  # Hp: the source row each rolled row reads
    cols = torch.where(cols < Rw, (cols + shift[1]) % Rw, cols)  # Wp
    source = rows[:, None] * Wp + cols[None, :]  # Hp, Wp: the token each rolled position reads
    return window_partition(source[None, :, :, None], window).flatten()  # nW*N


@dataclass(frozen=True)
class TokenOrder:
    """A window partition (with or without shift) as a gather index and its inverse; None for the identity."""

    order: torch.Tensor | None  # (Hp*Wp,)
    inverse: torch.Tensor | None  # (Hp*Wp,)


@dataclass(frozen=True)
class WindowGeometry:
    """How a stage partitions an (H, W) feature map; built once per size and device, shared by its blocks."""

    window: tuple[int, int]
    shift: tuple[int, int]  # used by the odd (shifted) blocks; (0, 0) when the map fits a window
    padded: tuple[int, int]  # (Hp, Wp), multiples of window
    rel_index: torch.Tensor  # (N*N,) long index into the bias table
    shift_mask: torch.Tensor | None  # (nW, N, N) of 0 / -100, None when shift == (0, 0)
    regular: TokenOrder  # partition for the regular blocks
    shifted: TokenOrder | None  # roll + partition for the shifted blocks, None when shift == (0, 0)


def partition_keeps_order(padded: tuple[int, ...], window: tuple[int, ...]) -> bool:
    """Whether partitioning a ``padded`` map (any number of axes) into ``window`` blocks keeps row-major token order:
    each block is contiguous, i.e. for some axis j the window is 1 on every axis before j and spans the map on every
    axis after it (2D: windows one row high, or spanning whole rows). Decided from the sizes, so it traces."""
    return any(all(w == 1 for w in window[:j]) and all(w == p for w, p in zip(window[j + 1:], padded[j + 1:]))
               for j in range(len(window)))


def _token_order(
    padded: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], device, roll_size=None
) -> TokenOrder:
    """The gather for one partition; the identity (nothing to move) is told from the sizes, not the data."""
    if not any(shift) and partition_keeps_order(padded, window):
        return TokenOrder(None, None)
    order = window_order(padded, window, shift, device, roll_size)
    return TokenOrder(order, torch.argsort(order))


def window_geometry(
    size: tuple[int, int],
    window_size: tuple[int, int],
    window_pad: str = "before_shift",
    device: torch.device | None = None,
) -> WindowGeometry:
    """Window, shift, padding, bias index, shift mask and token orders for an ``(H, W)`` map (see module doc)."""
    H, W = size
    window = (min(window_size[0], H), min(window_size[1], W))
    shift = tuple(0 if s <= w else w // 2 for s, w in zip((H, W), window))
    padded = (-(-H // window[0]) * window[0], -(-W // window[1]) * window[1])
    roll_size = (H, W) if window_pad == "after_shift" else None
    rel_index = relative_position_index(window, window_size, device).flatten()
    mask = shift_attention_mask(padded, window, shift, device) if any(shift) else None
    shifted = _token_order(padded, window, shift, device, roll_size) if any(shift) else None
    regular = _token_order(padded, window, (0, 0), device)
    return WindowGeometry(window, shift, padded, rel_index, mask, regular, shifted)


class _PermuteTokens(torch.autograd.Function):
    """``x[:, order]`` along dim 1 for a permutation; its backward is the inverse gather (no scatter-add)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(1, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


def permute_tokens(x: torch.Tensor, order: torch.Tensor | None, inverse: torch.Tensor | None) -> torch.Tensor:
    return x if order is None else _PermuteTokens.apply(x, order, inverse)


# ----------------------------------------------------------------------------------------------------------------
# layers


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative-position bias.

    ``fused_attn=True`` runs ``F.scaled_dot_product_attention`` with the bias (+ shift mask) as a float mask;
    ``False`` runs the eager reference (explicit softmax). Both compute softmax(q k^T / sqrt(d) + bias + mask) v.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: tuple[int, int],
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused_attn: bool = True,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.window_size = window_size
        self.fused_attn = fused_attn
        # one row per relative offset: (2Wh-1)(2Ww-1) for 2D windows, (2Wt-1)(2Wh-1)(2Ww-1) for 3D (Video Swin)
        table_rows = math.prod(2 * w - 1 for w in window_size)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table_rows, num_heads))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def relative_bias(self, rel_index: torch.Tensor) -> torch.Tensor:
        """Gather the bias ``(nH, N, N)`` for a flattened ``(N*N,)`` index."""
        N = math.isqrt(rel_index.numel())
        table = self.relative_position_bias_table.t().contiguous()  # nH, (2Wh-1)(2Ww-1)
        return table.index_select(1, rel_index).view(self.num_heads, N, N)  # nH, N, N

    def forward(self, x: torch.Tensor, rel_index: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B*nW, N, C)``, ``rel_index (N*N,)``, ``mask (nW, N, N)`` or None -> ``(B*nW, N, C)``.

        Windows are ordered batch-major (as :func:`window_partition` returns them), so a mask row ``w`` applies
        to windows ``b * nW + w``.

        On CPU, PyTorch has no fused SDPA kernel that returns a gradient for a float mask (it would run its
        unfused math fallback); when the bias needs a gradient there, the eager formulation (the same math,
        without the fallback's extra passes) runs even with ``fused_attn=True``.
        """
        BnW, N, C = x.shape
        nH, d = self.num_heads, self.head_dim
        qkv = self.qkv(x).view(BnW, N, 3, nH, d).permute(2, 0, 3, 1, 4)  # 3, B*nW, nH, N, d
        q, k, v = qkv.unbind(0)
        bias = self.relative_bias(rel_index).unsqueeze(0)  # 1, nH, N, N
        if mask is not None:
            bias = bias + mask.unsqueeze(1)  # nW, nH, N, N: bias and shift mask combined once per forward
        if self.fused_attn and not (bias.requires_grad and x.device.type == "cpu"):
            if mask is not None:  # SDPA kernels take a 4-D mask: one (nH, N, N) slice per window of each image
                bias = bias.expand(BnW // bias.shape[0], -1, -1, -1, -1).reshape(BnW, nH, N, N)
            drop = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=drop)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # B*nW, nH, N, N
            attn = (attn.view(-1, bias.shape[0], nH, N, N) + bias).view(BnW, nH, N, N)
            out = self.attn_drop(attn.softmax(dim=-1)) @ v  # B*nW, nH, N, d
        out = out.transpose(1, 2).reshape(BnW, N, C)  # B*nW, N, C
        return self.proj_drop(self.proj(out))


class SwinBlock(nn.Module):
    """Pre-norm Swin block: ``x + DropPath(W-MSA(LN(x)))``, then ``x + DropPath(MLP(LN(x)))``.

    ``shifted=True`` makes it an SW-MSA block (cyclic shift by the stage geometry's shift). ``DropPath`` and ``Mlp``
    are timm's (``drop_path1`` / ``drop_path2`` are ``nn.Identity`` at rate 0, as timm's block).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: tuple[int, int],
        shifted: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        fused_attn: bool = True,
    ) -> None:
        super().__init__()
        self.shifted = shifted
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias, attn_drop, proj_drop, fused_attn)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def _attention(self, x: torch.Tensor, geo: WindowGeometry) -> torch.Tensor:
        B, *size, C = x.shape  # (B, H, W, C), or (B, D, H, W, C) in the video tower (its 3D geometry)
        size, padded = tuple(size), tuple(geo.padded)
        if padded != size:  # zeros at the end of each axis, after norm1 (Swin-Det, timm, Video Swin)
            x = F.pad(x, [0, 0] + [n for s, p in zip(reversed(size), reversed(padded)) for n in (0, p - s)])
        shifted = self.shifted and geo.shifted is not None
        perm = geo.shifted if shifted else geo.regular
        L, N = math.prod(padded), math.prod(geo.window)
        windows = permute_tokens(x.reshape(B, L, C), perm.order, perm.inverse)  # B, nW*N, C (roll+partition)
        windows = self.attn(windows.view(-1, N, C), geo.rel_index, geo.shift_mask if shifted else None)
        x = permute_tokens(windows.view(B, L, C), perm.inverse, perm.order).view(B, *padded, C)
        if padded != size:
            x = x[(slice(None), *(slice(0, s) for s in size))]
        return x

    def forward(self, x: torch.Tensor, geo: WindowGeometry) -> torch.Tensor:
        """``x (B, H, W, C)`` -> ``(B, H, W, C)`` (``(B, D, H, W, C)`` with a 3D window and geometry)."""
        x = x + self.drop_path1(self._attention(self.norm1(x), geo))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class ConvEmbed(nn.Module):
    """CvT convolutional embedding: ``Conv2d(in, out, k, s, p)`` then LayerNorm over the output channels.

    Input ``(B, C, H, W)`` (stem) or ``(B, H, W, C)`` with ``channels_last_input=True`` (between stages);
    output ``(B, H', W', out)`` with ``H' = floor((H + 2p - k) / s) + 1``.
    """

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int, padding: int, channels_last_input: bool):
        super().__init__()
        self.channels_last_input = channels_last_input
        self.proj = nn.Conv2d(in_chans, dim, kernel, stride, padding)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last_input:
            x = x.permute(0, 3, 1, 2)  # B, C, H, W (a channels_last view; conv keeps that memory format)
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # B, H', W', out


class PatchEmbed(nn.Module):
    """Swin stem: ``Conv2d(in, C, 4, stride 4)`` + LayerNorm; ``(B, 3, H, W)`` -> ``(B, ceil(H/4), ceil(W/4), C)``.

    Inputs not divisible by the patch size are zero-padded at the bottom/right.
    """

    def __init__(self, in_chans: int, dim: int, patch_size: int = 4) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        H, W = x.shape[-2:]
        if H % p or W % p:
            x = F.pad(x, (0, -W % p, 0, -H % p))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # B, H/4, W/4, C


class PatchMerging(nn.Module):
    """Swin downsampling: concatenate 2x2 neighbours (4C), LayerNorm, ``Linear(4C, 2C, bias=False)``.

    ``(B, H, W, C)`` -> ``(B, ceil(H/2), ceil(W/2), 2C)``; odd sizes are zero-padded.
    """

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        # channel order x[0::2,0::2], x[1::2,0::2], x[0::2,1::2], x[1::2,1::2] as in Swin
        x = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, H // 2, W // 2, 4 * C)
        return self.reduction(self.norm(x))  # B, H/2, W/2, 2C


class SwinStage(nn.Module):
    """Optional downsampling, then ``depth`` blocks alternating regular and shifted windows.

    Holds the per-(H, W, device, window_pad) window geometry cache shared by its blocks.
    """

    _CACHE_SIZE = 16

    def __init__(
        self,
        downsample: nn.Module,
        blocks: list[SwinBlock],
        window_size: tuple[int, int],
        window_pad: str = "before_shift",
    ) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.ModuleList(blocks)
        self.window_size = window_size
        self.window_pad = window_pad
        self.grad_checkpointing = False
        self._geometry_cache: dict[tuple, WindowGeometry] = {}

    def geometry(self, H: int, W: int, device: torch.device) -> WindowGeometry:
        """Window, shift, padding, bias index and shift mask for an (H, W) map (cached; rebuilt while compiling)."""
        if torch.compiler.is_compiling():  # traced into the graph as constants; no side effect on the module
            return window_geometry((H, W), self.window_size, self.window_pad, device)
        key = (H, W, device, self.window_pad)
        geo = self._geometry_cache.get(key)
        if geo is None:
            geo = window_geometry((H, W), self.window_size, self.window_pad, device)
            if len(self._geometry_cache) >= self._CACHE_SIZE:
                self._geometry_cache.clear()
            self._geometry_cache[key] = geo
        return geo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C_in)`` -> ``(B, H', W', C)`` (H' = H / 2 after a downsampling layer)."""
        x = self.downsample(x)
        geo = self.geometry(x.shape[1], x.shape[2], x.device)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, geo, use_reentrant=False)
            else:
                x = block(x, geo)
        return x


# ----------------------------------------------------------------------------------------------------------------
# model


class SwinTowerMixin:
    """What the 2D and the video Swin towers share: the attention switch, activation checkpointing, the parameters
    without weight decay, timm's layer grouping and the FSDP units (``self.layers``: stages with ``blocks``)."""

    _fused_attn: bool
    layers: nn.Sequential

    @property
    def fused_attn(self) -> bool:
        """True: attention through ``F.scaled_dot_product_attention``; False: eager reference. Settable."""
        return self._fused_attn

    @fused_attn.setter
    def fused_attn(self, value: bool) -> None:
        self.set_fused_attn(value)

    def set_fused_attn(self, enable: bool = True) -> None:
        self._fused_attn = bool(enable)
        for module in self.modules():
            if isinstance(module, WindowAttention):
                module.fused_attn = bool(enable)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (saves memory, costs one more forward)."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Names of the relative-position bias tables (trained without weight decay, as Swin)."""
        return {name for name, _ in self.named_parameters() if name.endswith("relative_position_bias_table")}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise decay, timm's Swin definition.

        ``stem`` = ``patch_embed`` (Swin's patch embedding or CoSwin's conv stem); blocks by (stage, block), a
        stage's downsampling (patch merging or conv embedding) grouped with its first block, the final norm (and
        ``norm{i}`` output norms) last; ``coarse=True`` groups by stage. The classifier is left unmatched, i.e. last.
        """
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)" if coarse else [
                (r"^layers\.(\d+).downsample", (0,)),
                (r"^layers\.(\d+)\.\w+\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    def fsdp_wrap_modules(self) -> list[nn.Module]:
        """FSDP2 units: the Swin blocks (each stage's embedding stays with the root unit)."""
        return [block for stage in self.layers for block in stage.blocks]


@register_architecture("image_tower")
class CoSwin(BundleMixin, SwinTowerMixin, nn.Module):
    """CoSwin / Swin image tower with timm's backbone contract (module docstring); ``forward`` gives ``(B, 8C)``.

    Args:
        img_size: nominal input size; only sets ``default_preprocess`` (any input size runs).
        in_chans: input channels.
        num_classes: classifier outputs (``head.fc``); 0 (default) = no classifier, ``forward`` returns the pooled
            ``(B, num_features)`` feature.
        global_pool: pooling of ``forward_head`` (timm's ``ClassifierHead``): "avg" (mean over H, W) or "" (none).
        embed_dim: C, channels of stage 1; stage i has ``C * 2**i``.
        depths: blocks per stage.
        num_heads: heads per stage.
        window_size: attention window (7 at 224, 12 at 384); the bias tables are sized for it.
        mlp_ratio: MLP hidden width / channels.
        qkv_bias: bias on the qkv projection.
        drop_rate: head dropout, on the pooled feature before the classifier (timm).
        proj_drop_rate: dropout in the MLP and after the attention projection (timm).
        attn_drop_rate: dropout on the attention probabilities.
        drop_path_rate: stochastic depth, linearly increasing from 0 to this over all blocks (a training setting).
        embed: "conv" (CvT convolutional embeddings, CoSwin) or "patch" (Swin patch embed + patch merging).
        fused_attn: SDPA (True) or the eager reference attention (False); switchable later via ``fused_attn``.
        window_pad: where maps that are not a window multiple are padded: "before_shift" (Swin-Det, default) or
            "after_shift" (timm); see the module docstring.
        out_norms: add Swin-Det's per-level output norms ``norm0 .. norm{S-1}``, applied by
            ``forward_intermediates`` to every returned level (for detection; off by default).
    """

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 0,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int | tuple[int, int] = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        embed: Literal["conv", "patch"] = "conv",
        fused_attn: bool = True,
        window_pad: Literal["before_shift", "after_shift"] = "before_shift",
        out_norms: bool = False,
    ) -> None:
        super().__init__()
        if embed not in ("conv", "patch"):
            raise ValueError(f"embed must be 'conv' or 'patch', got {embed!r}")
        if window_pad not in WINDOW_PADS:
            raise ValueError(f"window_pad must be 'before_shift' or 'after_shift', got {window_pad!r}")
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} differ in length")
        self.img_size = _pair(img_size)
        self.embed = embed
        self.window_size = _pair(window_size)
        self.window_pad = window_pad
        self.num_stages = len(depths)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        dims = [embed_dim * 2**i for i in range(self.num_stages)]
        self.num_features = dims[-1]

        if embed == "conv":
            self.patch_embed: nn.Module = ConvEmbed(in_chans, embed_dim, 7, 4, 2, channels_last_input=False)
        else:
            self.patch_embed = PatchEmbed(in_chans, embed_dim, 4)

        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear 0 -> drop_path_rate
        stages = []
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            if i == 0:
                downsample: nn.Module = nn.Identity()
            elif embed == "conv":
                downsample = ConvEmbed(dims[i - 1], dims[i], 3, 2, 1, channels_last_input=True)
            else:
                downsample = PatchMerging(dims[i - 1], dims[i])
            first = sum(depths[:i])
            blocks = [
                SwinBlock(
                    dims[i], heads, self.window_size, shifted=j % 2 == 1, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=rates[first + j],
                    fused_attn=fused_attn,
                )
                for j in range(depth)
            ]
            stages.append(SwinStage(downsample, blocks, self.window_size, window_pad))
        self.layers = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(self.num_features)
        self.out_norms = out_norms
        if out_norms:  # after every default module, so the default configuration's init is unchanged
            for i in range(self.num_stages):
                self.add_module(f"norm{i}", nn.LayerNorm(dims[i]))
        self.feature_info = [
            dict(num_chs=dims[i], reduction=4 * 2**i, module=f"layers.{i}") for i in range(self.num_stages)
        ]
        self.default_preprocess = dict(
            input_size=[in_chans, *self.img_size],
            mean=list(IMAGENET_MEAN),
            std=list(IMAGENET_STD),
            interpolation="bicubic",
            crop_pct=0.875 if max(self.img_size) < 384 else 1.0,  # timm / Swin: centre crop at 224, none at 384
        )
        self._fused_attn = fused_attn
        self.apply(self._init_weights)
        # timm's head: pool -> dropout -> fc; built after the backbone's init, so a classifier leaves every backbone
        # draw unchanged (without classes, fc is nn.Identity: no parameter, no random draw)
        self.head = ClassifierHead(self.num_features, num_classes, global_pool, drop_rate, input_fmt="NHWC")
        self.head.apply(self._init_weights)  # timm's init of a new model's classifier: trunc_normal(0.02), bias 0
        self.head_hidden_size = self.head.num_features

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # torch's trunc_normal_, not timm's: torch 2.14 samples it differently, and every existing init (the demo's
        # figures, bundle hashes) was drawn with torch's
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, WindowAttention):
            nn.init.trunc_normal_(module.relative_position_bias_table, std=0.02)

    # -- weights -----------------------------------------------------------------------------------------------

    default_weight_format = "timm"  # a weights file given to create_model(pretrained=...) without a format

    def load_foreign_weights(self, src, *, format: str, strict: bool = True):
        """A Swin / CoSwin state dict in the "timm" or "microsoft" layout (``backbone/convert.py``); a LoadReport."""

        return load_image_tower_weights(self, src, format=format, strict=strict)

    # -- classifier --------------------------------------------------------------------------------------------

    def get_classifier(self) -> nn.Module:
        """The classifier ``head.fc`` (``nn.Identity`` when ``num_classes == 0``)."""
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier by a fresh ``Linear(num_features, num_classes)`` (0: none), as timm.

        ``global_pool`` ("avg" or "" for none) changes the pooling when given. A model made by
        ``florence.create_model`` records the new head in its bundle config, so ``save_pretrained`` rebuilds it.
        """
        if global_pool is not None:
            self.global_pool = global_pool
        self.num_classes = num_classes
        head = ClassifierHead(self.num_features, num_classes, self.global_pool, self.drop_rate, input_fmt="NHWC")
        param = next(self.parameters(), None)
        if param is not None:
            head.to(device=param.device, dtype=param.dtype)
        self.head = head.train(self.training)
        self.head_hidden_size = self.head.num_features
        spec = getattr(self, "florence_config", None)
        if spec is not None:
            overrides = {**spec.get("overrides", {}), "num_classes": num_classes, "global_pool": self.global_pool}
            self.florence_config = {**spec, "overrides": overrides}

    # -- forwards ----------------------------------------------------------------------------------------------

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        return self.patch_embed(x)  # B, H/4, W/4, C

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> the final LayerNorm'd map, NHWC ``(B, H/32, W/32, num_features)`` (timm)."""
        x = self.layers(self._embed(x))  # B, H/32, W/32, 8C
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """NHWC map -> pooled ``(B, num_features)``, head dropout, then ``head.fc`` (skipped by ``pre_logits``)."""
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``forward_head(forward_features(x))``: pooled ``(B, num_features)``, or logits with a classifier."""
        return self.forward_head(self.forward_features(x))

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The last stage after the final norm as tokens: ``(B, H'*W', num_features)`` row-major, and ``(H', W')``."""
        x = self.forward_features(x)  # B, H', W', 8C
        B, H, W, C = x.shape
        return x.reshape(B, H * W, C), (H, W)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs as maps, timm's semantics.

        Args:
            indices: stages to return: None = all, an int n = the last n, a list = those (negative from the end).
            norm: apply the final norm to the last stage's map (the others have no norm of their own in Swin).
                With ``out_norms`` every returned level goes through its ``norm{i}`` instead.
            stop_early: do not run the stages after the last one asked for (the final features are then the last
                stage run, without the final norm).
            output_fmt: "NCHW" ``(B, C_i, H_i, W_i)`` or "NHWC" ``(B, H_i, W_i, C_i)``.
            intermediates_only: return only the list.

        Returns ``(final, intermediates)``: ``final`` is :meth:`forward_features`'s NHWC map when every stage ran;
        or only ``intermediates``. Stage i has ``C * 2**i`` channels at stride ``4 * 2**i``; sizes follow the
        embedding arithmetic (e.g. 224 -> 56/28/14/7; 200x300 -> 50x75, 25x38, 13x19, 7x10).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        last = len(self.layers) - 1
        stages = self.layers[: max_index + 1] if stop_early else self.layers
        x = self._embed(x)  # B, H/4, W/4, C
        intermediates = []
        i = 0
        for i, stage in enumerate(stages):
            x = stage(x)  # B, H_i, W_i, C_i
            if i in take_indices:
                if self.out_norms:
                    level = getattr(self, f"norm{i}")(x)
                elif norm and i == last:
                    level = self.norm(x)
                else:
                    level = x
                intermediates.append(level.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else level)
        if intermediates_only:
            return intermediates
        if i == last:
            x = self.norm(x)  # the final norm is sized for the last stage only
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] | tuple[int, ...] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last of ``indices`` (and the final norm / classifier), as timm.

        The final norm goes with ``prune_norm`` or when stages are dropped; the classifier (and pooling:
        ``forward_head`` then passes the map through) with ``prune_head`` or when stages are dropped;
        ``num_features`` becomes the last kept stage's width. Returns the kept indices (absolute).
        """
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        prune_end = max_index < len(self.layers) - 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        self.layers = self.layers[: max_index + 1]
        if self.out_norms:
            for i in range(max_index + 1, self.num_stages):
                if hasattr(self, f"norm{i}"):
                    delattr(self, f"norm{i}")
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices


# ----------------------------------------------------------------------------------------------------------------
# named models (SPEC §1.2); every shape argument can be overridden; drop_path_rate is set by the user (training)


def _create(defaults: dict, overrides: dict) -> CoSwin:
    return CoSwin(**{**defaults, **overrides})


_TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_SMALL = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_BASE = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_LARGE = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))
_HUGE = dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88))
_SWIN_SIZES = {"swin_tiny": _TINY, "swin_small": _SMALL, "swin_base": _BASE, "swin_large": _LARGE}


def swin_name(embed_dim: int, depths, num_heads) -> str | None:
    """The registered Swin name of a shape (``swin_tiny`` ... ``swin_large``), or None for another shape."""
    shape = dict(embed_dim=int(embed_dim), depths=tuple(depths), num_heads=tuple(num_heads))
    return next((name for name, size in _SWIN_SIZES.items() if size == shape), None)


@register_model
def coswin_test(**overrides) -> CoSwin:
    """Tiny CoSwin for tests and CPU runs: C=32, depths 1-1-2-1, heads 1-2-4-8, window 7, nominal 56 px."""
    return _create(dict(img_size=56, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)), overrides)


@register_model
def coswin_tiny(**overrides) -> CoSwin:
    """CoSwin-T: C=96, 2-2-6-2, heads 3-6-12-24 (~29.5M)."""
    return _create(_TINY, overrides)


@register_model
def coswin_small(**overrides) -> CoSwin:
    """CoSwin-S: C=96, 2-2-18-2, heads 3-6-12-24."""
    return _create(_SMALL, overrides)


@register_model
def coswin_base(**overrides) -> CoSwin:
    """CoSwin-B: C=128, 2-2-18-2, heads 4-8-16-32 (~90M)."""
    return _create(_BASE, overrides)


@register_model
def coswin_large(**overrides) -> CoSwin:
    """CoSwin-L: C=192, 2-2-18-2, heads 6-12-24-48 (~203M)."""
    return _create(_LARGE, overrides)


@register_model
def coswin_huge(**overrides) -> CoSwin:
    """CoSwin-H proposal (the paper does not give its shape; SPEC §1.2): C=352, 2-2-18-2, heads 11-22-44-88."""
    return _create(_HUGE, overrides)


@register_model
def swin_tiny(**overrides) -> CoSwin:
    """Swin-T (patch embed + patch merging), loads timm / Microsoft swin_tiny checkpoints."""
    return _create({**_TINY, "embed": "patch"}, overrides)


@register_model
def swin_small(**overrides) -> CoSwin:
    """Swin-S (patch embed + patch merging)."""
    return _create({**_SMALL, "embed": "patch"}, overrides)


@register_model
def swin_base(**overrides) -> CoSwin:
    """Swin-B (patch embed + patch merging)."""
    return _create({**_BASE, "embed": "patch"}, overrides)


@register_model
def swin_large(**overrides) -> CoSwin:
    """Swin-L (patch embed + patch merging)."""
    return _create({**_LARGE, "embed": "patch"}, overrides)
