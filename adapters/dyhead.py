"""Dynamic Head (Dai et al. 2021) with the official code's semantics (microsoft/DynamicHead ``dyhead/dyhead.py``,
``dyhead/dyrelu.py``; SPEC §5.2). mmdetection's ``mmdet/models/necks/dyhead.py`` is the same computation except
for the offsets of the coarser neighbour's conv (``high_offsets`` below).

One block maps L levels (B, C, H_l, W_l), high-res first, to the same shapes. For each level l::

    offset_mask = offset(x_l)                               (B, 27, H_l, W_l): 18 offsets + 9 mask logits
    offset, mask = offset_mask[:, :18], sigmoid(offset_mask[:, 18:])          (shared by the three spatial convs)
    F_mid  = GN(DCN_mid(x_l))                               stride 1 on level l
    F_low  = GN(DCN_low(x_{l-1}))                           stride 2 on the finer neighbour       (l > 0)
    F_high = up(GN(DCN_high(x_{l+1})), size of level l)    stride 1 on the coarser neighbour      (l < L-1)
    mean   = mean_i  F_i * hsig(relu(conv1x1(avgpool(F_i))))                   scale-aware attention
    y_l    = DyReLU(mean)                                                      task-aware attention

``DCN`` is a modulated deformable 3x3 conv (DCNv2, with bias as the official ``ModulatedDeformConv``), ``GN`` a
GroupNorm of 16 groups, ``up`` bilinear with ``align_corners=True`` (the official ``F.upsample_bilinear``),
``hsig(x) = relu6(x + 3) / 6`` (the code's hard-sigmoid; the paper's formula differs, SPEC §10.2 item 4). DyReLU is
DyReLU-A with K=2 and biases: coefficients ``hsig(fc2(relu(fc1(avgpool(x)))))`` (fc1: C -> C/4), split into a1, b1,
a2, b2; ``a1 = 2(a1 - 0.5) + 1``, ``a2 = 2(a2 - 0.5)``, ``b = b - 0.5`` (lambda 1, init_a [1, 0], init_b [0, 0]);
output ``max(a1 x + b1, a2 x + b2)`` per channel. Every block reads the previous block's outputs only.

``high_offsets`` (SPEC §10.2 item 3): the official code hands ``DCN_high`` the offsets / masks computed at level l's
(larger) size. Its CUDA op does not check shapes: per image it reads the first ``18 h w`` (offsets) and ``9 h w``
(masks) elements of that image's buffer as if they had the output size ``(h, w)`` of level l+1 (kernel
``modulated_deformable_im2col_gpu_kernel`` indexes the per-image pointer ``offset[b].data_ptr()`` with
``height_col, width_col``; microsoft/DynamicHead#25, microsoft/GLIP#52). Modes:

- ``"official"`` (default): reproduce that read -- per image, the flat prefix of the (C, H_l, W_l) offset / mask
  buffer reshaped to (C, h, w). What the official DynamicHead checkpoints were trained with.
- ``"slice"``: mmdetection's version, ``offset_mask[:, :, :h, :w]`` (the top-left window of the level-l offsets;
  mmdet's comment calls it "weird, but faster than natural order"). What mmdetection checkpoints were trained with.
- ``"resize"``: the fix proposed in DynamicHead#25: bilinearly upsample x_{l+1} to level l's size first
  (``align_corners=True``), then apply ``DCN_high`` with level l's offsets; no upsampling afterwards.

Initialisation (``init``):

- ``"official"`` (DyHead ``DyConv.init_weights``): scale-attention conv N(0, 0.01), bias 0; the DCN weights keep the
  DCN's own reset (uniform +-1/sqrt(C*9), bias 0: the official op is not an ``nn.Conv2d``, so the normal init skips
  it); the 27-channel offset conv and the DyReLU ``nn.Linear`` layers keep PyTorch's default init.
- ``"mmdet"`` (``DyHeadBlock._init_weights``): every conv of the block -- offset conv, scale-attention conv and the
  DyReLU 1x1 convs (our fc1 / fc2) -- N(0, 0.01), bias 0; the DCN keeps its own reset. mmdetection's DCNs have no
  bias (GroupNorm follows); ours keep a zero-initialised bias.
- ``zero_init_offset``: zero the offset conv (weight and bias), so training starts from a plain conv with mask 0.5.
  mmdetection's module default is True, its Swin-L config sets False "to follow official"; our default is False.

Keys per block j: ``blocks.{j}.offset.{weight,bias}`` (27, C, 3, 3); ``blocks.{j}.spatial_{high,mid,low}.conv.
{weight,bias}`` and ``.norm.{weight,bias}``; ``blocks.{j}.scale_attn.conv.{weight,bias}`` (1, C, 1, 1);
``blocks.{j}.task_attn.fc1.{weight,bias}`` (C/4, C), ``blocks.{j}.task_attn.fc2.{weight,bias}`` (4C, C/4).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from florence.adapters.deform_conv import ModulatedDeformConv2d

HIGH_OFFSETS = ("official", "slice", "resize")
INITS = ("official", "mmdet")
GN_GROUPS = 16
KK = 9  # 3x3 kernel taps: 18 offset channels (dy, dx per tap) + 9 mask channels


def hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """The official code's hard-sigmoid ``relu6(x + 3) / 6`` (``dyrelu.py`` ``h_sigmoid``, mmcv ``HSigmoid(3, 6)``)."""
    return F.relu6(x + 3.0) / 6.0


def official_prefix(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """What the official CUDA op reads from a (B, C, H, W) offset / mask tensor for an output of ``size`` (h, w):
    per image, the first C*h*w elements of the (C, H, W) buffer, read as (C, h, w)."""
    B, C = t.shape[:2]
    h, w = size
    return t.reshape(B, -1)[:, : C * h * w].reshape(B, C, h, w)  # B, C, h, w


class SpatialConv(nn.Module):
    """Spatial-aware attention: DCNv2 3x3 (C -> C, ``stride``) followed by GroupNorm(16) (official ``Conv3x3Norm``)."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.conv = ModulatedDeformConv2d(channels, channels, 3, stride=stride, padding=1)
        self.norm = nn.GroupNorm(GN_GROUPS, channels)

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x, offset, mask))


class ScaleAttention(nn.Module):
    """Scale-aware attention weight: ``hsig(relu(conv1x1(avgpool(x))))``, one scalar per image (B, 1, 1, 1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hard_sigmoid(F.relu(self.conv(F.adaptive_avg_pool2d(x, 1))))  # B, 1, 1, 1


class DyReLU(nn.Module):
    """Task-aware attention: DyReLU-A, K=2 with biases (official ``DYReLU(C, C)``; module docstring)."""

    def __init__(self, channels: int, reduction: int = 4, lambda_a: float = 1.0,
                 init_a: tuple[float, float] = (1.0, 0.0), init_b: tuple[float, float] = (0.0, 0.0)) -> None:
        super().__init__()
        self.channels = channels
        self.lambda_a, self.init_a, self.init_b = lambda_a, tuple(init_a), tuple(init_b)
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, 4 * channels)

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> a1, b1, a2, b2, each (B, C, 1, 1)."""
        y = hard_sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))  # B, 4C
        a1, b1, a2, b2 = y[:, :, None, None].split(self.channels, dim=1)
        a1 = (a1 - 0.5) * 2 * self.lambda_a + self.init_a[0]
        a2 = (a2 - 0.5) * 2 * self.lambda_a + self.init_a[1]
        return a1, b1 - 0.5 + self.init_b[0], a2, b2 - 0.5 + self.init_b[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a1, b1, a2, b2 = self.coefficients(x)
        return torch.maximum(x * a1 + b1, x * a2 + b2)


class DyHeadBlock(nn.Module):
    """One DyHead block (module docstring): levels (B, C, H_l, W_l), high-res first -> same shapes."""

    def __init__(self, channels: int, high_offsets: str = "official") -> None:
        super().__init__()
        if high_offsets not in HIGH_OFFSETS:
            raise ValueError(f"high_offsets must be one of {HIGH_OFFSETS}, got {high_offsets!r}")
        self.high_offsets = high_offsets
        self.offset = nn.Conv2d(channels, 3 * KK, 3, padding=1)
        self.spatial_high = SpatialConv(channels, stride=1)
        self.spatial_mid = SpatialConv(channels, stride=1)
        self.spatial_low = SpatialConv(channels, stride=2)
        self.scale_attn = ScaleAttention(channels)
        self.task_attn = DyReLU(channels)

    def reset_parameters(self, init: str = "official", zero_init_offset: bool = False) -> None:
        """``init`` "official" or "mmdet" (module docstring); ``zero_init_offset`` zeroes the offset conv."""
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        for spatial in (self.spatial_high, self.spatial_mid, self.spatial_low):
            spatial.conv.reset_parameters()
            spatial.norm.reset_parameters()
        small = [self.scale_attn.conv]
        if init == "official":
            for m in (self.offset, self.task_attn.fc1, self.task_attn.fc2):
                m.reset_parameters()  # PyTorch defaults
        else:
            small += [self.offset, self.task_attn.fc1, self.task_attn.fc2]
        for m in small:
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
        if zero_init_offset:
            nn.init.zeros_(self.offset.weight)
            nn.init.zeros_(self.offset.bias)

    def _high(self, x_high: torch.Tensor, offset_mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The coarser neighbour's spatial feature at level l's ``size``, per ``high_offsets``."""
        if self.high_offsets == "resize":
            x_up = F.interpolate(x_high, size=size, mode="bilinear", align_corners=True)  # B, C, H, W
            return self.spatial_high(x_up, offset_mask[:, : 2 * KK], offset_mask[:, 2 * KK:].sigmoid())
        h, w = x_high.shape[-2:]
        if self.high_offsets == "slice":
            offset, mask = offset_mask[:, : 2 * KK, :h, :w], offset_mask[:, 2 * KK:, :h, :w].sigmoid()
        else:
            offset = official_prefix(offset_mask[:, : 2 * KK], (h, w))  # B, 18, h, w
            mask = official_prefix(offset_mask[:, 2 * KK:].sigmoid(), (h, w))  # B, 9, h, w
        y = self.spatial_high(x_high, offset, mask)  # B, C, h, w
        return F.interpolate(y, size=size, mode="bilinear", align_corners=True)  # B, C, H, W

    def forward(self, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        outs = []
        for l, x in enumerate(levels):
            offset_mask = self.offset(x)  # B, 27, H, W
            offset, mask = offset_mask[:, : 2 * KK], offset_mask[:, 2 * KK:].sigmoid()
            feats = [self.spatial_mid(x, offset, mask)]
            if l > 0:
                feats.append(self.spatial_low(levels[l - 1], offset, mask))  # stride 2: H_{l-1} -> H_l
            if l < len(levels) - 1:
                feats.append(self._high(levels[l + 1], offset_mask, tuple(x.shape[-2:])))
            feats = torch.stack(feats)  # n, B, C, H, W
            weights = torch.stack([self.scale_attn(f) for f in feats])  # n, B, 1, 1, 1
            outs.append(self.task_attn((feats * weights).mean(dim=0)))
        return outs


class DyHead(nn.Module):
    """``num_blocks`` DyHead blocks on C-channel pyramid levels (module docstring); 0 blocks is the identity.

    Args:
        channels: C of every level (a multiple of 16 for GroupNorm(16)).
        num_blocks: blocks stacked (official and mmdetection configs: 6).
        init: "official" or "mmdet" initialisation.
        zero_init_offset: zero the offset / mask convs at init.
        high_offsets: "official", "slice" or "resize" (how the coarser neighbour's DCN gets its offsets).
    """

    def __init__(self, channels: int = 256, num_blocks: int = 6, init: str = "official", zero_init_offset: bool = False,
                 high_offsets: str = "official") -> None:
        super().__init__()
        if channels % GN_GROUPS or channels < GN_GROUPS:
            raise ValueError(f"DyHead channels must be a positive multiple of {GN_GROUPS} (GroupNorm), got {channels}")
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.channels, self.init, self.zero_init_offset = channels, init, zero_init_offset
        self.high_offsets = high_offsets
        self.blocks = nn.ModuleList(DyHeadBlock(channels, high_offsets) for _ in range(num_blocks))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        for block in self.blocks:
            block.reset_parameters(self.init, self.zero_init_offset)

    def forward(self, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """L maps (B, C, H_l, W_l), high-res first, each level the stride-2 size of the previous
        (H_l = ceil(H_{l-1} / 2), as FPN levels are) -> L maps of the same shapes."""
        levels = list(levels)
        for l in range(1, len(levels)):
            prev, cur = levels[l - 1].shape[-2:], levels[l].shape[-2:]
            if tuple(cur) != ((prev[0] + 1) // 2, (prev[1] + 1) // 2):
                raise ValueError(f"DyHead level {l} is {tuple(cur)}, expected the stride-2 size of level {l - 1} "
                                 f"{tuple(prev)}: {((prev[0] + 1) // 2, (prev[1] + 1) // 2)}")
        for block in self.blocks:
            levels = block(levels)
        return levels
