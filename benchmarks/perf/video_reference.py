"""mmaction2's Video Swin, re-expressed in plain torch: the reference for parity tests and ``benchmarks/perf/video.py``.

Follows ``mmaction/models/backbones/swin.py`` of open-mmlab/mmaction2 (1.x): ``SwinTransformer3D`` (``PatchEmbed3D``,
``BasicLayer`` with its ``PatchMerging`` at the end of the stage, ``SwinTransformerBlock3D``, ``WindowAttention3D``,
``compute_mask``, ``get_window_size``) and the ``Recognizer3D``'s ``I3DHead`` (average pool over (T, H, W), dropout,
``fc_cls``). Written independently of ``backbone/video_coswin.py`` (no import from it): ``torch.roll`` and a
view/permute window partition per block, the mask built from the 27 regions of the padded map, an explicit masked
softmax, the relative-position index built as Video Swin builds it (meshgrid, pairwise differences, offsets, mixed
radix), and read as mmaction2 reads it (the top-left ``[:N, :N]`` block when a window is clamped).

The module tree reproduces mmaction2's state-dict keys and shapes, so ``MMAction2VideoSwin(...).state_dict()`` is an
mmaction2 checkpoint: ``backbone.patch_embed.proj.weight (C, 3, 2, 4, 4)``, ``backbone.patch_embed.norm``,
``backbone.layers.i.blocks.j.{norm1, attn.{relative_position_bias_table, relative_position_index, qkv, proj}, norm2,
mlp.{fc1, fc2}}``, ``backbone.layers.i.downsample.{reduction (no bias), norm}`` for every stage but the last,
``backbone.norm{S-1}`` (mmaction2 1.x names the output norm after its stage index, ``norm3`` for 4 stages) and
``cls_head.fc_cls``. Stochastic depth and dropout are left out (evaluation arithmetic; training steps in the
benchmark run without them on both sides).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MMAction2VideoSwin", "reference_window_partition", "reference_window_reverse", "reference_get_window_size",
           "reference_compute_mask", "reference_relative_position_index"]


def reference_window_partition(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """mmaction2 ``window_partition``: ``(B, D, H, W, C)`` -> ``(B * nW, wd * wh * ww, C)``."""
    B, D, H, W, C = x.shape
    x = x.view(B, D // window[0], window[0], H // window[1], window[1], W // window[2], window[2], C)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).contiguous().view(-1, math.prod(window), C)


def reference_window_reverse(windows: torch.Tensor, window: Sequence[int], B: int, D: int, H: int,
                             W: int) -> torch.Tensor:
    """mmaction2 ``window_reverse``: ``(B * nW, wd, wh, ww, C)`` -> ``(B, D, H, W, C)``."""
    x = windows.view(B, D // window[0], H // window[1], W // window[2], window[0], window[1], window[2], -1)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).contiguous().view(B, D, H, W, -1)


def reference_get_window_size(size: Sequence[int], window: Sequence[int],
                              shift: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """mmaction2 ``get_window_size``: an axis with ``size <= window`` takes window = size and shift 0."""
    use_window, use_shift = list(window), list(shift)
    for i in range(len(size)):
        if size[i] <= window[i]:
            use_window[i] = size[i]
            use_shift[i] = 0
    return tuple(use_window), tuple(use_shift)


def reference_compute_mask(D: int, H: int, W: int, window: Sequence[int], shift: Sequence[int],
                           device: torch.device | str = "cpu") -> torch.Tensor:
    """mmaction2 ``compute_mask`` on the padded ``(D, H, W)`` map: label the regions ``slice(-w)``, ``slice(-w, -s)``,
    ``slice(-s, None)`` of every axis (all three, even where ``s == 0``, as mmaction2 does), partition, and mark
    pairs of different labels with -100. Returns ``(nW, N, N)``."""
    img_mask = torch.zeros((1, D, H, W, 1), device=device)
    cnt = 0
    for d in (slice(-window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
        for h in (slice(-window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
            for w in (slice(-window[2]), slice(-window[2], -shift[2]), slice(-shift[2], None)):
                img_mask[:, d, h, w, :] = cnt
                cnt += 1
    mask_windows = reference_window_partition(img_mask, window).squeeze(-1)  # nW, N
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)  # nW, N, N
    return attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)


_cached_mask = lru_cache()(reference_compute_mask)  # mmaction2 caches compute_mask per stage size the same way


def reference_relative_position_index(window: Sequence[int]) -> torch.Tensor:
    """``WindowAttention3D.__init__``'s ``relative_position_index`` ``(N, N)``."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(w) for w in window), indexing="ij"))  # 3, Wd, Wh, Ww
    flat = torch.flatten(coords, 1)  # 3, N
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()  # N, N, 3
    rel[:, :, 0] += window[0] - 1
    rel[:, :, 1] += window[1] - 1
    rel[:, :, 2] += window[2] - 1
    rel[:, :, 0] *= (2 * window[1] - 1) * (2 * window[2] - 1)
    rel[:, :, 1] *= 2 * window[2] - 1
    return rel.sum(-1)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _WindowAttention3D(nn.Module):
    def __init__(self, dim: int, window: tuple[int, int, int], num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros(math.prod(2 * w - 1 for w in window), num_heads))
        self.register_buffer("relative_position_index", reference_relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``(B_, N, C)`` windows, mask ``(nW, N, N)`` or None."""
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # B_, nH, N, d
        attn = (q * self.scale) @ k.transpose(-2, -1)  # B_, nH, N, N
        bias = self.relative_position_bias_table[self.relative_position_index[:N, :N].reshape(-1)].reshape(N, N, -1)
        attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B_ // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B_, N, C))


class _Block3D(nn.Module):
    """``SwinTransformerBlock3D``: LN, pad to a window multiple, roll by -shift, partition, attention, reverse, roll
    back, crop; residual; then the MLP residual."""

    def __init__(self, dim: int, num_heads: int, window: tuple[int, int, int], shift: tuple[int, int, int],
                 mlp_ratio: float) -> None:
        super().__init__()
        self.window_size, self.shift_size = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _WindowAttention3D(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward_part1(self, x: torch.Tensor, mask_matrix: torch.Tensor) -> torch.Tensor:
        B, D, H, W, C = x.shape
        window, shift = reference_get_window_size((D, H, W), self.window_size, self.shift_size)
        x = self.norm1(x)
        pad_d1 = (window[0] - D % window[0]) % window[0]
        pad_b = (window[1] - H % window[1]) % window[1]
        pad_r = (window[2] - W % window[2]) % window[2]
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b, 0, pad_d1))
        _, Dp, Hp, Wp, _ = x.shape
        if any(s > 0 for s in shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1], -shift[2]), dims=(1, 2, 3))
            attn_mask = mask_matrix
        else:
            attn_mask = None
        windows = self.attn(reference_window_partition(x, window), attn_mask)  # B*nW, N, C
        x = reference_window_reverse(windows.view(-1, *window, C), window, B, Dp, Hp, Wp)  # B, Dp, Hp, Wp, C
        if any(s > 0 for s in shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2, 3))
        if pad_d1 > 0 or pad_r > 0 or pad_b > 0:
            x = x[:, :D, :H, :W, :].contiguous()
        return x

    def forward(self, x: torch.Tensor, mask_matrix: torch.Tensor) -> torch.Tensor:
        x = x + self.forward_part1(x, mask_matrix)
        return x + self.mlp(self.norm2(x))


class _PatchMerging(nn.Module):
    """mmaction2 ``PatchMerging``: pad odd H / W, concatenate x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2],
    x[1::2, 1::2] (per frame), LN(4C), ``Linear(4C, 2C, bias=False)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, D, H, W, C = x.shape
        if H % 2 == 1 or W % 2 == 1:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class _BasicLayer(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, window: tuple[int, int, int], mlp_ratio: float,
                 downsample: bool) -> None:
        super().__init__()
        self.window_size = window
        self.shift_size = tuple(w // 2 for w in window)
        self.blocks = nn.ModuleList(
            _Block3D(dim, num_heads, window, (0, 0, 0) if i % 2 == 0 else self.shift_size, mlp_ratio)
            for i in range(depth))
        self.downsample = _PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W)`` -> ``(B, D, H, W, C)`` (before the downsampling, which the backbone applies)."""
        B, C, D, H, W = x.shape
        window, shift = reference_get_window_size((D, H, W), self.window_size, self.shift_size)
        x = x.permute(0, 2, 3, 4, 1)  # b d h w c
        Dp, Hp, Wp = (int(math.ceil(s / w)) * w for s, w in zip((D, H, W), window))
        mask = _cached_mask(Dp, Hp, Wp, window, shift, x.device)
        for blk in self.blocks:
            x = blk(x, mask)
        return x


class _PatchEmbed3D(nn.Module):
    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_channels, dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, T, H, W)`` -> ``(B, C, T', H', W')``."""
        _, _, D, H, W = x.shape
        p = self.patch_size
        if W % p[2]:
            x = F.pad(x, (0, p[2] - W % p[2]))
        if H % p[1]:
            x = F.pad(x, (0, 0, 0, p[1] - H % p[1]))
        if D % p[0]:
            x = F.pad(x, (0, 0, 0, 0, 0, p[0] - D % p[0]))
        x = self.proj(x)
        _, C, Dp, Hp, Wp = x.shape
        x = self.norm(x.flatten(2).transpose(1, 2))
        return x.transpose(1, 2).view(-1, C, Dp, Hp, Wp)


class _SwinTransformer3D(nn.Module):
    def __init__(self, embed_dim: int, depths: Sequence[int], num_heads: Sequence[int], window: tuple[int, int, int],
                 patch_size: tuple[int, int, int], mlp_ratio: float, in_channels: int) -> None:
        super().__init__()
        self.patch_embed = _PatchEmbed3D(patch_size, in_channels, embed_dim)
        S = len(depths)
        self.layers = nn.ModuleList(
            _BasicLayer(embed_dim * 2**i, d, h, window, mlp_ratio, downsample=i < S - 1)
            for i, (d, h) in enumerate(zip(depths, num_heads)))
        self.num_features = embed_dim * 2 ** (S - 1)
        self.out_index = S - 1
        self.add_module(f"norm{S - 1}", nn.LayerNorm(self.num_features))  # out_indices=(S-1,): mmaction2's norm3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, T, H, W)`` -> the last stage's normed map ``(B, C, T', H', W')``."""
        x = self.patch_embed(x)
        for i, layer in enumerate(self.layers):
            x = layer(x.contiguous())  # b d h w c
            if i == self.out_index:
                x = getattr(self, f"norm{i}")(x).permute(0, 4, 1, 2, 3).contiguous()  # b c d h w
            else:
                x = layer.downsample(x).permute(0, 4, 1, 2, 3)  # b c d h w
        return x


class _I3DHead(nn.Module):
    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc_cls = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, T', H', W')`` -> average pool ``(B, C)`` -> ``fc_cls``."""
        return self.fc_cls(F.adaptive_avg_pool3d(x, (1, 1, 1)).flatten(1))


class MMAction2VideoSwin(nn.Module):
    """``Recognizer3D(SwinTransformer3D, I3DHead)`` in mmaction2's formulation; ``forward (B, 3, T, H, W) -> logits``.

    Weights: mmaction2's init (``trunc_normal_(std=0.02)`` linears and bias tables, zero biases, unit LayerNorms,
    PyTorch's default for the Conv3d); ``randomize(seed)`` draws every parameter from a normal (tests)."""

    def __init__(self, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: Sequence[int] = (8, 7, 7),
                 patch_size: Sequence[int] = (2, 4, 4), num_classes: int = 400, mlp_ratio: float = 4.0,
                 in_channels: int = 3) -> None:
        super().__init__()
        self.backbone = _SwinTransformer3D(embed_dim, depths, num_heads, tuple(window_size), tuple(patch_size),
                                           mlp_ratio, in_channels)
        self.cls_head = _I3DHead(self.backbone.num_features, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, _WindowAttention3D):
                nn.init.trunc_normal_(module.relative_position_bias_table, std=0.02)

    @torch.no_grad()
    def randomize(self, seed: int = 0, std: float = 0.3) -> MMAction2VideoSwin:
        """Every parameter ``N(init, std)`` (LayerNorm weights around 1): so a wrong key or a swapped axis shows."""
        g = torch.Generator().manual_seed(seed)
        for p in self.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls_head(self.backbone(x))
