"""Numeric precision of a run: fp32, bf16 autocast (CPU and GPU), fp16 autocast with a GradScaler (GPU only)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    """``autocast()`` context for forwards and the loss; ``scaler`` only for fp16 (None otherwise)."""

    name: str
    device_type: str
    scaler: torch.amp.GradScaler | None

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = _DTYPES[self.name]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=dtype)


def build_precision(name: str, device: torch.device) -> Precision:
    """``name`` is fp32 | bf16 | fp16; fp16 needs a CUDA device (its loss scaling is pointless on CPU)."""
    if name not in _DTYPES:
        raise ValueError(f"precision.dtype: expected one of {sorted(_DTYPES)}, got {name!r}")
    if name == "fp16" and device.type != "cuda":
        raise ValueError(
            "precision.dtype=fp16 needs a CUDA GPU (fp16 autocast + GradScaler); on CPU use precision.dtype=bf16 or fp32"
        )
    scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
    return Precision(name=name, device_type=device.type, scaler=scaler)
