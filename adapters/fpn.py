"""Feature Pyramid Network with mmdetection's semantics (``mmdet/models/necks/fpn.py``, ``FPN``).

::

    inputs C_i (B, in_channels[i], H_i, W_i), high-res first
      -> laterals L_i = conv1x1(C_i)                        (levels start_level .. last input)
      -> top-down  L_{i-1} += nearest_upsample(L_i, size of L_{i-1})
      -> outputs   P_i = conv3x3(L_i)
      -> extra levels up to ``num_outs``: a 3x3 stride-2 conv on the last output ("on_output"), the last lateral
         ("on_lateral") or the last input ("on_input"); each further extra conv reads the previous extra level
         (after a ReLU when ``relu_before_extra_convs``); without extra convs, 1x1 max-pool with stride 2.

All convolutions are plain ``nn.Conv2d`` with bias (mmdet's ``ConvModule`` without norm / activation), initialised
as mmdet's FPN ``init_cfg``: Xavier-uniform (gain 1), bias 0. Keys: ``lateral_convs.{i}.weight/bias``,
``fpn_convs.{i}.weight/bias`` (the extra convs continue the ``fpn_convs`` numbering, as in mmdet).

The official DynamicHead (detectron2) FPN of the Swin-T config is this FPN with ``add_extra_convs="on_output"`` and
``relu_before_extra_convs=True``: detectron2's ``LastLevelP6P7(..., "p5")`` computes P6 = conv(P5) and
P7 = conv(relu(P6)); its top-down path upsamples by a fixed factor 2, which equals the size-based upsampling here
whenever each level is exactly half its neighbour (inputs padded to a multiple of the coarsest stride).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

EXTRA_SOURCES = ("on_input", "on_lateral", "on_output")


class FPN(nn.Module):
    """mmdet FPN (module docstring).

    Args:
        in_channels: channels of each input level (high-res first).
        out_channels: channels of every output level.
        num_outs: number of output levels (>= the number of used inputs).
        start_level: first input level used (earlier inputs are ignored).
        add_extra_convs: source of the extra levels' convs: "on_input", "on_lateral", "on_output"; ``True`` means
            "on_input" (mmdet); ``False`` adds extra levels by stride-2 max-pooling instead.
        relu_before_extra_convs: ReLU before every extra conv after the first.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, num_outs: int = 5, start_level: int = 0,
                 add_extra_convs: str | bool = "on_output", relu_before_extra_convs: bool = False) -> None:
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        if add_extra_convs is True:
            add_extra_convs = "on_input"
        if add_extra_convs is not False and add_extra_convs not in EXTRA_SOURCES:
            raise ValueError(f"add_extra_convs must be one of {EXTRA_SOURCES} or a bool, got {add_extra_convs!r}")
        if not 0 <= start_level < len(in_channels):
            raise ValueError(f"start_level {start_level} out of range for {len(in_channels)} inputs")
        used = len(in_channels) - start_level
        if num_outs < used:
            raise ValueError(f"num_outs={num_outs} is smaller than the {used} input levels used")
        self.in_channels, self.out_channels, self.num_outs = in_channels, out_channels, num_outs
        self.start_level = start_level
        self.add_extra_convs = add_extra_convs
        self.relu_before_extra_convs = relu_before_extra_convs
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels[start_level:])
        self.fpn_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in range(used))
        if add_extra_convs:
            for i in range(num_outs - used):
                source = in_channels[-1] if i == 0 and add_extra_convs == "on_input" else out_channels
                self.fpn_convs.append(nn.Conv2d(source, out_channels, 3, stride=2, padding=1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmdet FPN init: Xavier-uniform weights (gain 1), zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``len(in_channels)`` maps (B, in_channels[i], H_i, W_i) -> ``num_outs`` maps (B, out_channels, h_l, w_l)."""
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"FPN expects {len(self.in_channels)} input levels, got {len(inputs)}")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs[self.start_level:])]
        for i in range(len(laterals) - 1, 0, -1):  # top-down: coarse into fine, at the finer lateral's size
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                                              mode="nearest")
        outs = [self.fpn_convs[i](lat) for i, lat in enumerate(laterals)]
        used = len(laterals)
        if not self.add_extra_convs:
            while len(outs) < self.num_outs:
                outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            return outs
        if self.num_outs > used:
            source = {"on_input": inputs[-1], "on_lateral": laterals[-1], "on_output": outs[-1]}[self.add_extra_convs]
            outs.append(self.fpn_convs[used](source))
            for i in range(used + 1, self.num_outs):
                x = F.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
                outs.append(self.fpn_convs[i](x))
        return outs
