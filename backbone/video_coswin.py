"""Video CoSwin: the CoSwin image tower made 3D for clips (Florence §2.6, SPEC §7), and the plain Video Swin.

``VideoCoSwin(embed="conv")`` is Florence's video encoder (SPEC §7.1, our choices for what the paper leaves open marked
UNVERIFIED): a 3D convolutional stem ``Conv3d(3, C, (2, 7, 7), (2, 4, 4), (0, 2, 2)) + LN`` (one token per 2-frame,
4x4-pixel tube), 3D convolutional (overlapping) merging ``Conv3d(C_i, 2C_i, (3, 3, 3), (1, 2, 2), (1, 1, 1)) + LN``
between stages (time is not downsampled), and 3D shifted-window attention with a 3D relative-position bias. Each
stage has its own window ("dynamic window size"; the default of ``video_coswin_*`` is (8, 7, 7) in the first two
stages and (8, 14, 14), (8, 7, 7) in the last two, i.e. global in space at 224 px). Temporal padding of the conv
embeddings replicates the edge frames (``temporal_pad="replicate"``, default; ``"zeros"`` is I3D's zero padding):
with it, an inflated model maps a clip of identical frames to the 2D model's features of that frame
(``backbone/video_inflate.py``).

``VideoCoSwin(embed="patch")`` is Video Swin as mmaction2's ``SwinTransformer3D`` (SPEC §7.2): ``Conv3d(3, C, (2, 4,
4), stride (2, 4, 4)) + LN`` patch embedding (inputs zero-padded to a patch multiple) and 2x2 spatial patch merging
(``LN(4C) -> Linear(4C, 2C)``, frame by frame), window (8, 7, 7) everywhere (``video_swin_*``).

Layout: input clips ``(B, 3, T, H, W)`` (mmaction2's NCTHW); token maps are channels-last ``(B, D, H, W, C)``.
Parameter names are the 2D CoSwin's (timm's layout: ``patch_embed.proj``, ``layers.i.downsample``,
``layers.i.blocks.j.attn.relative_position_bias_table``, ``norm``, ``head.fc``), so inflating a 2D checkpoint is a
shape change per key; ``backbone/video_inflate.py`` converts mmaction2's names (downsampling at the end of a stage,
``cls_head.fc_cls``).

Windows follow Video Swin (``get_window_size``): per axis, a feature no larger than the window clamps the window to the
feature and does not shift on that axis; otherwise shifted blocks roll by window // 2. Maps are zero-padded to a
window multiple after ``norm1`` (bottom / right / last frames), rolled on the padded map, and masked with Video Swin's
27-region ``compute_mask``; padded tokens take part in attention unmasked, as in Video Swin. A clamped window reads
the bias of the same relative offsets (the centre of the table, as our 2D tower does); mmaction2 reads the table's
top-left ``[:N, :N]`` block instead, which differs only when a window is clamped (not at 16 x 224^2 with (8, 7, 7)).

As in the 2D tower, the roll and the window partition (and their inverses) are one precomputed token gather each way,
the bias and mask are added once per block, and ``fused_attn`` runs SDPA. ``benchmarks/perf/video.py`` measures it
against mmaction2's formulation (roll + partition + masked softmax).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from florence.backbone.coswin import (
    IMAGENET_MEAN, IMAGENET_STD, SHIFT_MASK_VALUE, CoSwin, PatchMerging, SwinBlock, SwinTowerMixin, TokenOrder,
    partition_keeps_order,
)
from florence.backbone.video_inflate import load_video_tower_weights
from florence.bundle import BundleMixin
from florence.registry import register_architecture, register_model

Triple = tuple[int, int, int]

__all__ = [
    "VideoCoSwin", "window_partition_3d", "window_reverse_3d", "relative_position_index_3d", "shift_attention_mask_3d",
    "get_window_size", "window_geometry_3d",
]


def _triple(value: int | Sequence[int]) -> Triple:
    return (value,) * 3 if isinstance(value, int) else tuple(int(v) for v in value)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------------
# 3D window helpers (Video Swin's definitions)


def window_partition_3d(x: torch.Tensor, window: Triple) -> torch.Tensor:
    """``(B, D, H, W, C)`` -> windows ``(B * nW, wd * wh * ww, C)``, windows in (d, h, w) row-major order.

    D, H and W must be multiples of the window."""
    B, D, H, W, C = x.shape
    wd, wh, ww = window
    x = x.view(B, D // wd, wd, H // wh, wh, W // ww, ww, C)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, wd * wh * ww, C)  # B*nW, N, C


def window_reverse_3d(windows: torch.Tensor, window: Triple, D: int, H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`window_partition_3d`: ``(B * nW, N, C)`` -> ``(B, D, H, W, C)``."""
    wd, wh, ww = window
    C = windows.shape[-1]
    x = windows.view(-1, D // wd, H // wh, W // ww, wd, wh, ww, C)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(-1, D, H, W, C)


def relative_position_index_3d(window: Triple, table_window: Triple | None = None,
                               device: torch.device | None = None) -> torch.Tensor:
    """Index ``(N, N)`` of each (query, key) pair of a 3D window into a ``(2Wd-1)(2Wh-1)(2Ww-1)``-row bias table.

    Video Swin's construction (offsets made non-negative, then mixed radix (2Wh-1)(2Ww-1), (2Ww-1), 1);
    ``table_window`` (default ``window``) is the table's window: a smaller window reads the same offsets' rows."""
    td, th, tw = table_window or window
    if any(w > t for w, t in zip(window, (td, th, tw))):
        raise ValueError(f"window {window} is larger than the bias table's window {table_window}")
    axes = [torch.arange(w, device=device) for w in window]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij")).flatten(1)  # 3, N
    rel = coords[:, :, None] - coords[:, None, :]  # 3, N, N
    return (rel[0] + td - 1) * (2 * th - 1) * (2 * tw - 1) + (rel[1] + th - 1) * (2 * tw - 1) + (rel[2] + tw - 1)


def get_window_size(size: Triple, window: Triple, shift: Triple) -> tuple[Triple, Triple]:
    """Video Swin's ``get_window_size``: per axis, a feature no larger than the window clamps it; no shift there."""
    use_window = tuple(min(s, w) for s, w in zip(size, window))
    use_shift = tuple(0 if s <= w else sh for s, w, sh in zip(size, window, shift))
    return use_window, use_shift  # type: ignore[return-value]


def shift_attention_mask_3d(padded: Triple, window: Triple, shift: Triple,
                            device: torch.device | None = None) -> torch.Tensor:
    """The shifted-window mask ``(nW, N, N)``: 0 inside a region of the rolled map, -100 across (``compute_mask``).

    Regions per axis are ``[0, -w)``, ``[-w, -s)``, ``[-s, end)``; an axis with shift 0 is one region."""
    region = torch.zeros(1, *padded, 1, device=device)

    def slices(w: int, s: int) -> list[slice]:
        return [slice(None)] if s == 0 else [slice(0, -w), slice(-w, -s), slice(-s, None)]

    label = 0
    for ds in slices(window[0], shift[0]):
        for hs in slices(window[1], shift[1]):
            for ws in slices(window[2], shift[2]):
                region[:, ds, hs, ws, :] = label
                label += 1
    region = window_partition_3d(region, window).squeeze(-1)  # nW, N
    diff = region[:, None, :] - region[:, :, None]  # nW, N, N
    return torch.zeros_like(diff).masked_fill_(diff != 0, SHIFT_MASK_VALUE)


def _token_order_3d(padded: Triple, window: Triple, shift: Triple, device) -> TokenOrder:
    """Roll by ``-shift`` on the padded map + :func:`window_partition_3d` as one gather (None when the identity,
    told from the sizes: ``partition_keeps_order``)."""
    if not any(shift) and partition_keeps_order(padded, window):
        return TokenOrder(None, None)
    Dp, Hp, Wp = padded
    d, h, w = ((torch.arange(n, device=device) + s) % n for n, s in zip(padded, shift))  # source index per axis
    source = (d[:, None, None] * Hp + h[None, :, None]) * Wp + w[None, None, :]  # Dp, Hp, Wp
    order = window_partition_3d(source[None, ..., None], window).flatten()  # nW*N
    return TokenOrder(order, torch.argsort(order))


@dataclass(frozen=True)
class WindowGeometry3D:
    """How a stage partitions a ``(D, H, W)`` map; built once per size and device, shared by its blocks."""

    window: Triple
    shift: Triple  # for the shifted blocks; zero on clamped axes
    padded: Triple  # multiples of window
    rel_index: torch.Tensor  # (N*N,) into the stage's bias table
    shift_mask: torch.Tensor | None  # (nW, N, N), None without shift
    regular: TokenOrder
    shifted: TokenOrder | None


def window_geometry_3d(size: Triple, window_size: Triple, device: torch.device | None = None) -> WindowGeometry3D:
    window, shift = get_window_size(size, window_size, tuple(w // 2 for w in window_size))
    padded = tuple(-(-s // w) * w for s, w in zip(size, window))
    rel_index = relative_position_index_3d(window, window_size, device).flatten()
    if any(shift):
        mask = shift_attention_mask_3d(padded, window, shift, device)
        shifted = _token_order_3d(padded, window, shift, device)
    else:
        mask = shifted = None
    regular = _token_order_3d(padded, window, (0, 0, 0), device)
    return WindowGeometry3D(window, shift, padded, rel_index, mask, regular, shifted)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------------
# layers


class ConvEmbed3D(nn.Module):
    """3D convolutional embedding + LayerNorm: ``(B, C, T, H, W)`` (stem) or channels-last ``(B, D, H, W, C)``
    (between stages) -> ``(B, D', H', W', out)``. The temporal padding ``kernel_t``'s ``padding[0]`` is applied
    before the convolution by replicating the edge frames (``temporal_pad="replicate"``) or with zeros."""

    def __init__(self, in_chans: int, dim: int, kernel: Triple, stride: Triple, padding: Triple,
                 channels_last_input: bool, temporal_pad: str = "replicate") -> None:
        super().__init__()
        self.channels_last_input = channels_last_input
        self.temporal_padding = padding[0]
        self.temporal_pad = temporal_pad
        self.proj = nn.Conv3d(in_chans, dim, kernel, stride, (0, padding[1], padding[2]))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last_input:
            x = x.permute(0, 4, 1, 2, 3)  # B, C, D, H, W
        p = self.temporal_padding
        if p:
            if self.temporal_pad == "replicate":
                x = torch.cat([x[:, :, :1].expand(-1, -1, p, -1, -1), x, x[:, :, -1:].expand(-1, -1, p, -1, -1)], 2)
            else:
                x = F.pad(x, (0, 0, 0, 0, p, p))
        return self.norm(self.proj(x).permute(0, 2, 3, 4, 1))  # B, D', H', W', out


class PatchEmbed3D(nn.Module):
    """Video Swin stem: ``Conv3d(in, C, patch, stride=patch)`` + LayerNorm; inputs zero-padded to a patch multiple
    (last frames, bottom, right). ``(B, 3, T, H, W)`` -> ``(B, ceil(T/pt), ceil(H/ph), ceil(W/pw), C)``."""

    def __init__(self, in_chans: int, dim: int, patch_size: Triple = (2, 4, 4)) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_chans, dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.patch_size
        T, H, W = x.shape[-3:]
        if T % pt or H % ph or W % pw:
            x = F.pad(x, (0, -W % pw, 0, -H % ph, 0, -T % pt))
        return self.norm(self.proj(x).permute(0, 2, 3, 4, 1))


class PatchMerging3D(PatchMerging):
    """Video Swin's spatial-only patch merging: the 2D merge frame by frame, ``(B, D, H, W, C)`` ->
    ``(B, D, ceil(H/2), ceil(W/2), 2C)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, D, H, W, C = x.shape
        x = super().forward(x.reshape(B * D, H, W, C))  # B*D, H/2, W/2, 2C
        return x.view(B, D, *x.shape[1:])


class VideoSwinStage(nn.Module):
    """Optional downsampling, then blocks alternating regular and shifted 3D windows (geometry cached per size)."""

    _CACHE_SIZE = 16

    def __init__(self, downsample: nn.Module, blocks: list[SwinBlock], window_size: Triple) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.ModuleList(blocks)
        self.window_size = window_size
        self.grad_checkpointing = False
        self._geometry_cache: dict[tuple, WindowGeometry3D] = {}

    def geometry(self, size: Triple, device: torch.device) -> WindowGeometry3D:
        if torch.compiler.is_compiling():
            return window_geometry_3d(size, self.window_size, device)
        key = (*size, device)
        geo = self._geometry_cache.get(key)
        if geo is None:
            if len(self._geometry_cache) >= self._CACHE_SIZE:
                self._geometry_cache.clear()
            geo = self._geometry_cache[key] = window_geometry_3d(size, self.window_size, device)
        return geo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, D, H, W, C_in)`` -> ``(B, D, H', W', C)``."""
        x = self.downsample(x)
        geo = self.geometry(tuple(x.shape[1:4]), x.device)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, geo, use_reentrant=False)
            else:
                x = block(x, geo)
        return x


class VideoHead(nn.Module):
    """I3D-style head: mean over (D, H, W), dropout, ``Linear`` (``fc``; ``nn.Identity`` without classes)."""

    def __init__(self, num_features: int, num_classes: int, drop_rate: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(1, 2, 3))  # B, C
        return x if pre_logits else self.fc(self.drop(x))


# ----------------------------------------------------------------------------------------------------------------
# model


@register_architecture("video_tower")
class VideoCoSwin(BundleMixin, SwinTowerMixin, nn.Module):
    """Video CoSwin / Video Swin (module docstring); ``forward`` gives the pooled ``(B, 8C)`` or logits.

    Args:
        img_size, num_frames: nominal clip size (``default_preprocess`` only; any size runs).
        frame_interval: nominal sampling stride of the clip's frames (``default_preprocess``).
        embed_dim, depths, num_heads, mlp_ratio, qkv_bias: as the 2D tower.
        window_size: one (Wt, Wh, Ww) for every stage or one per stage; the bias tables are sized for it.
        embed: "conv" (CoSwin 3D conv embeddings) or "patch" (Video Swin patch embed + patch merging).
        stem_temporal, merge_temporal: (kernel, stride, padding) along time of the conv stem and of the conv merges.
        patch_size: the Video Swin patch (embed="patch").
        temporal_pad: "replicate" or "zeros": temporal padding of the conv embeddings.
        num_classes, drop_rate: the I3D head (0 classes: no classifier, ``forward`` returns features).
        proj_drop_rate, attn_drop_rate, drop_path_rate, fused_attn: as the 2D tower.
    """

    def __init__(self, *, img_size: int = 224, num_frames: int = 16, frame_interval: int = 2, in_chans: int = 3,
                 num_classes: int = 0, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: Sequence[int] | Sequence[Sequence[int]] = (8, 7, 7), mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, embed: Literal["conv", "patch"] = "conv",
                 stem_temporal: Sequence[int] = (2, 2, 0), merge_temporal: Sequence[int] = (3, 1, 1),
                 patch_size: Sequence[int] = (2, 4, 4), temporal_pad: Literal["replicate", "zeros"] = "replicate",
                 fused_attn: bool = True) -> None:
        super().__init__()
        if embed not in ("conv", "patch"):
            raise ValueError(f"embed must be 'conv' or 'patch', got {embed!r}")
        if temporal_pad not in ("replicate", "zeros"):
            raise ValueError(f"temporal_pad must be 'replicate' or 'zeros', got {temporal_pad!r}")
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} differ in length")
        S = len(depths)
        windows = [_triple(w) for w in window_size] if isinstance(window_size[0], Sequence) else \
            [_triple(window_size)] * S  # type: ignore[arg-type]
        if len(windows) != S:
            raise ValueError(f"window_size: {len(windows)} windows for {S} stages")
        self.window_sizes = windows
        self.embed = embed
        self.num_stages = S
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        dims = [embed_dim * 2**i for i in range(S)]
        self.embed_dim = embed_dim
        self.num_features = dims[-1]
        kt, st, pt = stem_temporal
        mkt, mst, mpt = merge_temporal
        if embed == "conv":
            self.patch_embed: nn.Module = ConvEmbed3D(in_chans, embed_dim, (kt, 7, 7), (st, 4, 4), (pt, 2, 2),
                                                      channels_last_input=False, temporal_pad=temporal_pad)
        else:
            self.patch_embed = PatchEmbed3D(in_chans, embed_dim, _triple(patch_size))
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages = []
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            if i == 0:
                downsample: nn.Module = nn.Identity()
            elif embed == "conv":
                downsample = ConvEmbed3D(dims[i - 1], dims[i], (mkt, 3, 3), (mst, 2, 2), (mpt, 1, 1),
                                         channels_last_input=True, temporal_pad=temporal_pad)
            else:
                downsample = PatchMerging3D(dims[i - 1], dims[i])
            first = sum(depths[:i])
            blocks = [SwinBlock(dims[i], heads, windows[i], shifted=j % 2 == 1, mlp_ratio=mlp_ratio,
                                     qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                                     drop_path=rates[first + j], fused_attn=fused_attn) for j in range(depth)]
            stages.append(VideoSwinStage(downsample, blocks, windows[i]))
        self.layers = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(self.num_features)
        self.feature_info = [dict(num_chs=dims[i], reduction=4 * 2**i, module=f"layers.{i}") for i in range(S)]
        self.default_preprocess = dict(
            input_size=[in_chans, num_frames, img_size, img_size], mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD),
            interpolation="bilinear", crop_pct=1.0, clip_len=num_frames, frame_interval=frame_interval,
        )
        self._fused_attn = fused_attn
        self.apply(CoSwin._init_weights)
        self.head = VideoHead(self.num_features, num_classes, drop_rate)
        self.head.apply(CoSwin._init_weights)

    # -- weights -----------------------------------------------------------------------------------------------

    default_weight_format = "mmaction2"

    def load_foreign_weights(self, src, *, format: str, strict: bool = True):
        """A 2D tower to inflate (``format="inflate"``: a bundle, an image-tower module or a Swin / CoSwin
        checkpoint in timm layout; "inflate-microsoft" for the Microsoft layout) or an mmaction2 / Video Swin
        checkpoint ("mmaction2"). Returns a LoadReport (``backbone/video_inflate.py``)."""
        return load_video_tower_weights(self, src, format=format, strict=strict)

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh ``Linear(num_features, num_classes)`` head (0: none), recorded in the bundle config."""
        self.num_classes = num_classes
        head = VideoHead(self.num_features, num_classes, self.drop_rate)
        head.apply(CoSwin._init_weights)
        param = next(self.parameters(), None)
        if param is not None:
            head.to(device=param.device, dtype=param.dtype)
        self.head = head.train(self.training)
        spec = getattr(self, "florence_config", None)
        if spec is not None:
            self.florence_config = {**spec, "overrides": {**spec.get("overrides", {}), "num_classes": num_classes}}

    # -- forwards ----------------------------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, T, H, W)`` -> the final LayerNorm'd map ``(B, D', H', W', num_features)``."""
        if x.ndim != 5:
            raise ValueError(f"expected clips (B, C, T, H, W), got shape {tuple(x.shape)}")
        return self.norm(self.layers(self.patch_embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Map -> pooled ``(B, num_features)`` -> dropout -> ``head.fc`` (skipped by ``pre_logits``)."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, Triple]:
        """The final normed map as tokens ``(B, D'*H'*W', num_features)`` (d, h, w row-major) and ``(D', H', W')``."""
        x = self.forward_features(x)
        B, D, H, W, C = x.shape
        return x.reshape(B, D * H * W, C), (D, H, W)


# ----------------------------------------------------------------------------------------------------------------
# named models; windows and temporal settings are choices (SPEC §7.1 leaves them open: UNVERIFIED)

_DYNAMIC = ((8, 7, 7), (8, 7, 7), (8, 14, 14), (8, 7, 7))  # larger windows later: global in space at 224 px
_TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_SMALL = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_BASE = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_LARGE = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))
_HUGE = dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88))
_VIDEO_SWIN = dict(embed="patch", window_size=(8, 7, 7), num_frames=32, frame_interval=2)


def _create(defaults: dict, overrides: dict) -> VideoCoSwin:
    return VideoCoSwin(**{**defaults, **overrides})


@register_model
def video_coswin_test(**overrides) -> VideoCoSwin:
    """Tiny Video CoSwin for tests and CPU runs (the 2D ``coswin_test`` inflated): C=32, depths 1-1-2-1, heads
    1-2-4-8, window (4, 7, 7), 8 frames at 56 px."""
    return _create(dict(img_size=56, num_frames=8, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8),
                        window_size=(4, 7, 7)), overrides)


@register_model
def video_coswin_tiny(**overrides) -> VideoCoSwin:
    """Video CoSwin-T (from coswin_tiny): C=96, 2-2-6-2, dynamic windows."""
    return _create({**_TINY, "window_size": _DYNAMIC}, overrides)


@register_model
def video_coswin_small(**overrides) -> VideoCoSwin:
    """Video CoSwin-S (from coswin_small)."""
    return _create({**_SMALL, "window_size": _DYNAMIC}, overrides)


@register_model
def video_coswin_base(**overrides) -> VideoCoSwin:
    """Video CoSwin-B (from coswin_base)."""
    return _create({**_BASE, "window_size": _DYNAMIC}, overrides)


@register_model
def video_coswin_large(**overrides) -> VideoCoSwin:
    """Video CoSwin-L (from coswin_large)."""
    return _create({**_LARGE, "window_size": _DYNAMIC}, overrides)


@register_model
def video_coswin_huge(**overrides) -> VideoCoSwin:
    """Video CoSwin-H (the CoSwin-H proposal of SPEC §1.2, inflated)."""
    return _create({**_HUGE, "window_size": _DYNAMIC}, overrides)


@register_model
def video_swin_tiny(**overrides) -> VideoCoSwin:
    """Video Swin-T (mmaction2 ``swin-tiny-p244-w877``): patch (2, 4, 4), window (8, 7, 7), 32 x 224^2 clips."""
    return _create({**_TINY, **_VIDEO_SWIN}, overrides)


@register_model
def video_swin_small(**overrides) -> VideoCoSwin:
    """Video Swin-S (mmaction2 ``swin-small-p244-w877``)."""
    return _create({**_SMALL, **_VIDEO_SWIN}, overrides)


@register_model
def video_swin_base(**overrides) -> VideoCoSwin:
    """Video Swin-B (mmaction2 ``swin-base-p244-w877``)."""
    return _create({**_BASE, **_VIDEO_SWIN}, overrides)


@register_model
def video_swin_large(**overrides) -> VideoCoSwin:
    """Video Swin-L (mmaction2 ``swin-large-p244-w877``)."""
    return _create({**_LARGE, **_VIDEO_SWIN}, overrides)
