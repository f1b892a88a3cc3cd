"""Modulated deformable convolution (DCNv2): torchvision's kernel, or a plain-PyTorch path that is faster on CPU.

``ModulatedDeformConv2d(in, out, 3, stride, padding)(x, offset, mask)``: ``offset`` is ``(B, 2*k*k, H_out, W_out)``
(torchvision's (dy, dx) pairs per kernel tap, taps in row-major order), ``mask`` is ``(B, k*k, H_out, W_out)``.

Two implementations of the same function (``impl``):

- ``"torchvision"``: ``torchvision.ops.deform_conv2d``. Its CPU kernel is a serial im2col loop.
- ``"torch"``: :func:`deform_conv2d_torch`: every (output location, tap) sample is a bag of its 4 bilinear corners
  in ``F.embedding_bag`` (corner weights times the mask as ``per_sample_weights``) over the input's pixels as table
  rows, giving the im2col matrix, then one matmul with the weight; autograd gives the gradients of input, offset,
  mask, weight and bias. Equal to torchvision's kernel to float rounding, borders and integer coordinates included
  (``tests/test_deform_conv.py``). Costs: it keeps the (B*H_out*W_out, k*k*C) column matrix for the backward
  (torchvision recomputes it); under CPU autocast the matmul runs in bf16 (torchvision's CPU kernel has no bf16).
- ``"auto"`` (default): ``"torch"`` for CPU tensors, ``"torchvision"`` elsewhere (its CUDA kernel stays the GPU path).

CPU, 2 threads, median of 7 rounds, torchvision / ours time, forward and forward+backward (3x3, padding 1, mask):
(2, 64, 32, 32) 4.4-4.9x and 9.8-10.7x (torchvision is 14-16x / 45x a plain 3x3 conv there, ours 3.3x / 4.5x);
(2, 256, 32, 32) 4.5x / 11x; (2, 256, 64, 64) stride 1 or 2 3.8x / 9.8x; (1, 256, 112, 176) (P3 at 800x1333)
3.5x / 9.6x; (16, 64, 16, 16) 5.9x / 11x; (2, 256, 8, 8) 1.8x / 7x. Only tiny maps (B*H*W*C ~ 1e4) run the forward
slower (0.6x: ~40 small ops, ~0.6 ms, against torchvision's 0.4 ms), forward+backward still 2x faster. Tried and
dropped: ``grid_sample`` on a (B, C, 9*H_out, W_out) grid (its normalised coordinates round, so at integer
positions floor() and the offset gradient can differ from torchvision's), ``torch.gather`` / ``index_select`` + a
corner sum (2-4x slower), a custom backward (transposed ``embedding_bag``; no gain), projecting with the weight
before sampling (no gain once the pixel table is row-major).

The choice is a plain attribute, not a buffer or parameter: the state dict (``weight``, ``bias``) is the same for
every ``impl``. :func:`set_deform_impl` sets it on every layer of a model.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import deform_conv2d

DEFORM_IMPLS = ("auto", "torch", "torchvision")


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"deform_conv2d: {name} must be an int or a pair of ints, got {value!r}")
    return pair


def _sampling_grid(offset: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                   padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """Sampling coordinates ``(B, Ho, Wo, kk, 2)`` as (y, x): tap (i, j) of output (oy, ox) at
    ``(oy*stride - padding + i*dilation, ...)`` (integers, like torchvision) plus the tap's (dy, dx) offset."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    (ho, wo), dev = offset.shape[-2:], offset.device

    def grid(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1)  # len(rows), len(cols), 2

    out = grid(torch.arange(-ph, ho * sh - ph, sh, device=dev), torch.arange(-pw, wo * sw - pw, sw, device=dev))
    tap = grid(torch.arange(0, kh * dh, dh, device=dev), torch.arange(0, kw * dw, dw, device=dev))
    base = out.view(ho, wo, 1, 2) + tap.view(kh * kw, 2)  # Ho, Wo, kk, 2
    return base.to(offset.dtype) + offset.unflatten(1, (kh * kw, 2)).permute(0, 3, 4, 1, 2)  # B, Ho, Wo, kk, 2


def deform_conv2d_torch(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None = None, stride: int | tuple[int, int] = 1,
                        padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """``torchvision.ops.deform_conv2d`` (same signature and semantics; groups and offset groups 1) in PyTorch ops.

    Tap ``(i, j)`` of output ``(oy, ox)`` samples the input at ``y = oy*stride - padding + i*dilation + dy`` (and
    likewise ``x``), bilinearly with zeros outside the image, and is multiplied by the mask. This is torchvision's
    CPU kernel (``bilinear_interpolate``, ``deformable_col2im*``) exactly, borders included: a sample at ``y <= -1``
    or ``y >= H`` is 0, corners outside the image count as 0, the offset gradient at an integer coordinate is the
    one-sided difference towards ``floor(y) + 1``; ``y`` is the integer base plus the offset in the offset's dtype.

    Args:
        input: (B, C, H, W).
        offset: (B, 2*kh*kw, H_out, W_out), (dy, dx) per tap.
        weight: (O, C, kh, kw); bias: (O,) or None.
        mask: (B, kh*kw, H_out, W_out) or None (DCNv1: every mask value 1).

    Returns:
        (B, O, H_out, W_out), contiguous.
    """
    b, c, h, w = input.shape
    out_ch, in_ch, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    kk = kh * kw
    if in_ch != c:
        raise ValueError(f"deform_conv2d_torch: weight has {in_ch} input channels, input {c} (groups must be 1)")
    if tuple(offset.shape) != (b, 2 * kk, ho, wo):
        raise ValueError(f"deform_conv2d_torch: offset must be {(b, 2 * kk, ho, wo)} (one offset group), "
                         f"got {tuple(offset.shape)}")
    if mask is not None and tuple(mask.shape) != (b, kk, ho, wo):
        raise ValueError(f"deform_conv2d_torch: mask must be {(b, kk, ho, wo)}, got {tuple(mask.shape)}")

    # sampling coordinates, one row per (output location, tap); the 4 bilinear corners of each (row-major over the
    # (y, x) corners) with their weights, times the mask: f = c - floor(c) is the gradient's only path to the offsets
    coords = _sampling_grid(offset, (kh, kw), (sh, sw), (ph, pw), (dh, dw))  # B, Ho, Wo, kk, 2 (y, x)
    low = coords.detach().floor()
    frac = coords - low
    pixels = torch.stack([low, low + 1], -1)  # B, Ho, Wo, kk, 2 (y, x), 2 (floor, floor + 1)
    inside = (pixels >= 0) & (pixels < pixels.new_tensor([[h], [w]]))  # NaN / inf coordinates: outside
    axis_weights = torch.stack([1 - frac, frac], -1) * inside  # a corner outside the image weighs 0
    weight_y, weight_x = axis_weights.unbind(-2)  # B, Ho, Wo, kk, 2 each
    if mask is not None:
        weight_y = weight_y * mask.permute(0, 2, 3, 1)[..., None]
    corner_weights = (weight_y[..., :, None] * weight_x[..., None, :]).reshape(-1, 4)  # B*Ho*Wo*kk, 4
    rows, cols = pixels.long().unbind(-2)
    in_y, in_x = inside.unbind(-2)
    pixel = rows[..., :, None] * w + cols[..., None, :]  # B, Ho, Wo, kk, 2, 2: pixel index in its image
    pixel = torch.where(in_y[..., :, None] & in_x[..., None, :], pixel, 0)  # (outside: index 0, weight 0)
    pixel = (pixel + torch.arange(b, device=input.device).view(b, 1, 1, 1, 1, 1) * (h * w)).reshape(-1, 4)

    table = input.permute(0, 2, 3, 1).reshape(b * h * w, c).contiguous()  # B*H*W, C: one row per pixel (row-major)
    sampled = F.embedding_bag(pixel, table, per_sample_weights=corner_weights.to(table.dtype), mode="sum")
    columns = sampled.view(b * ho * wo, kk * c)  # im2col rows, (tap, channel) order
    out = F.linear(columns, weight.permute(0, 2, 3, 1).reshape(out_ch, kk * c), bias)  # B*Ho*Wo, O
    return out.view(b, ho, wo, out_ch).permute(0, 3, 1, 2).contiguous()


def resolve_deform_impl(impl: str, device: torch.device) -> str:
    """``"torch"`` or ``"torchvision"`` for ``impl`` on ``device`` (``"auto"``: torch on CPU, torchvision elsewhere)."""
    if impl not in DEFORM_IMPLS:
        raise ValueError(f"deformable conv impl must be one of {DEFORM_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "torch" if device.type == "cpu" else "torchvision"
    return impl


class ModulatedDeformConv2d(nn.Module):
    """DCNv2 layer; weight ``(out, in, k, k)`` and bias ``(out,)`` like ``nn.Conv2d``; ``impl`` picks the kernel
    (module docstring) and can be changed at any time (``set_deform_impl``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, bias: bool = True, impl: str = "auto") -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        resolve_deform_impl(impl, torch.device("cpu"))  # validates
        self.impl = impl
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official DCN reset (DynamicHead ``deform.py``): uniform ±1/sqrt(in*k*k), bias 0."""
        bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size ** 2)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        fn = deform_conv2d_torch if resolve_deform_impl(self.impl, x.device) == "torch" else deform_conv2d
        return fn(x, offset, self.weight, self.bias, stride=self.stride, padding=self.padding, mask=mask)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, bias={self.bias is not None}, impl={self.impl!r}")


def set_deform_impl(model: nn.Module, impl: str) -> int:
    """Set ``impl`` ("auto" | "torch" | "torchvision") on every ``ModulatedDeformConv2d`` in ``model``; returns how
    many layers were set. The state dict does not change."""
    resolve_deform_impl(impl, torch.device("cpu"))  # validates
    layers = [m for m in model.modules() if isinstance(m, ModulatedDeformConv2d)]
    for layer in layers:
        layer.impl = impl
    return len(layers)


@contextlib.contextmanager
def deform_impl(model: nn.Module, impl: str) -> Iterator[None]:
    """``set_deform_impl(model, impl)`` for the block; every layer gets its own previous ``impl`` back afterwards
    (export traces the pure-torch kernel whatever the model uses)."""
    layers = [m for m in model.modules() if isinstance(m, ModulatedDeformConv2d)]
    before = [m.impl for m in layers]
    set_deform_impl(model, impl)
    try:
        yield
    finally:
        for layer, previous in zip(layers, before):
            layer.impl = previous
