"""Image transforms built on timm's ``create_transform`` from a model's ``preprocess`` dict.

``preprocess`` is the dict a model carries and saves in its bundle (docs/ARCHITECTURE.md):
``dict(input_size=[3, H, W], mean=[...], std=[...], interpolation="bicubic", crop_pct=0.875)``.

- train: random resized crop (``scale``, ``ratio``) + horizontal flip (``hflip``) (+ RandAugment when
  ``randaugment`` is a timm spec such as ``"rand-m9-mstd0.5"``), to tensor, normalise. No colour jitter.
- eval: resize the short side to ``size / crop_pct`` + center crop to ``size``, to tensor, normalise.

The output has the model's channel count ``input_size[0]`` (3, or 1 for a grey model) whatever the input: a PIL image
of any mode (grey ``L``, palette ``P``, ``RGBA`` / ``LA`` with transparency, 16-bit, CMYK, ...) first becomes 8-bit RGB
with :func:`florence.data.images.to_rgb` (transparency composited on white), then grey (``L``) for a 1-channel model.

:class:`ImageTransform` takes a PIL image *or* a uint8 tensor ``(H, W)`` / ``(C, H, W)`` (C = 1 or 3). Tensors
skip the PIL round trip: timm's geometric ops (which accept tensors) run on the float image in [0, 1], the
result is clamped to [0, 1] (as 8-bit PIL output would be), grey is repeated to 3 channels (a 3-channel tensor
for a grey model is reduced with Pillow's luma weights) and normalised.
The random draws (crop box, flip) are the same as on the PIL path; only the resampling kernel differs
slightly (torch's antialiased bicubic vs Pillow's). RandAugment is PIL-only, so with it tensors are
converted to PIL first.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.transforms import MaybeToTensor
from torchvision import transforms as T

from florence.data.images import to_rgb

# Pillow's RGB -> L weights (ITU-R 601-2 luma), for 3-channel tensors given to a grey model
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)


@contextmanager
def seeded_rngs(seed: int, *, numpy: bool = False) -> Iterator[None]:
    """Seed the global RNGs timm's transforms draw from (Python ``random``, torch CPU, and NumPy when ``numpy``:
    RandAugment uses it) for one sample, so per-sample randomness depends only on ``seed`` (exact resume). In the
    main process the previous states are restored afterwards, leaving the caller's RNG streams untouched; inside
    DataLoader workers (whose RNGs serve nothing else) restoring is skipped, as NumPy's state copy is slow."""
    restore = torch.utils.data.get_worker_info() is None
    if restore:
        py_state, torch_state = random.getstate(), torch.random.default_generator.get_state()
        np_state = np.random.get_state() if numpy else None
    random.seed(seed)
    torch.random.default_generator.manual_seed(seed)
    if numpy:
        np.random.seed(seed & 0xFFFFFFFF)
    try:
        yield
    finally:
        if restore:
            random.setstate(py_state)
            torch.random.default_generator.set_state(torch_state)
            if np_state is not None:
                np.random.set_state(np_state)


class ImageTransform:
    """Callable: PIL image (any mode) or uint8 tensor -> FloatTensor ``(channels, H, W)`` normalised with the model's
    mean/std; ``channels`` is 3 (RGB) or 1 (grey)."""

    def __init__(self, pipeline: T.Compose, pil_only: bool, channels: int = 3):
        self.pipeline = pipeline  # timm's Compose, used as is on PIL images
        steps = list(pipeline.transforms)
        cut = next(i for i, t in enumerate(steps) if isinstance(t, MaybeToTensor))
        self.geometric = steps[:cut]  # crop / resize / flip ops that also accept tensors
        after = steps[cut + 1:]
        if len(after) != 1 or not isinstance(after[0], T.Normalize):
            raise ValueError(f"expected timm's pipeline to end with ToTensor + Normalize, got {after}")
        self.mean = torch.as_tensor(after[0].mean, dtype=torch.float32).view(-1, 1, 1)  # channels, 1, 1
        self.std = torch.as_tensor(after[0].std, dtype=torch.float32).view(-1, 1, 1)  # channels, 1, 1
        self.pil_only = pil_only
        self.channels = int(channels)

    def to_mode(self, img: Image.Image) -> Image.Image:
        """Any PIL mode -> ``RGB`` (3 channels) or ``L`` (1 channel), without touching an image already in it."""
        if self.channels == 1:
            return img if img.mode == "L" else to_rgb(img).convert("L")
        return to_rgb(img)

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(img, Image.Image):
            return self.pipeline(self.to_mode(img))
        if img.dtype != torch.uint8:
            raise TypeError(f"tensor images must be uint8, got {img.dtype}")
        if img.ndim == 2:
            img = img.unsqueeze(0)  # 1, H, W
        if img.ndim != 3 or img.shape[0] not in (1, 3):
            raise ValueError(f"tensor images must be (H, W) or (C, H, W) with C = 1 or 3, got {tuple(img.shape)}")
        if self.pil_only:
            arr = img.permute(1, 2, 0).numpy()  # H, W, C
            return self.pipeline(self.to_mode(Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)))
        x = img.float().div_(255.0)  # 1 or 3, H, W
        if self.channels == 1 and x.shape[0] == 3:
            x = (x * _LUMA).sum(dim=0, keepdim=True)  # 1, H, W
        for op in self.geometric:
            x = op(x)
        x = x.clamp_(0.0, 1.0)
        if x.shape[0] != self.channels:
            x = x.expand(self.channels, -1, -1)  # grey repeated: 3, H, W
        return (x - self.mean) / self.std  # channels, H, W

    def __repr__(self) -> str:
        return f"ImageTransform({self.pipeline})"


def build_transform(
    preprocess: dict[str, Any],
    train: bool,
    *,
    randaugment: str | None = None,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    hflip: float = 0.5,
) -> ImageTransform:
    """The train or eval transform for a model's ``preprocess`` dict (see the module docstring).

    Args:
        preprocess: ``input_size`` ([3, H, W], or [1, H, W] for a grey model), ``mean``, ``std`` (one value per
            channel), ``interpolation``, ``crop_pct`` (eval only).
        train: random resized crop + flip (+ RandAugment) if True, resize + center crop otherwise.
        randaugment: a timm RandAugment spec (``"rand-m9-mstd0.5"``) or None.
        scale: area fraction range of the random resized crop.
        ratio: aspect-ratio range of the random resized crop.
        hflip: probability of a horizontal flip.
    """
    for key in ("input_size", "mean", "std"):
        if key not in preprocess:
            raise KeyError(f"preprocess dict lacks {key!r} (has {sorted(preprocess)})")
    input_size = tuple(int(v) for v in preprocess["input_size"])
    if len(input_size) != 3 or input_size[0] not in (1, 3):
        raise ValueError(f"preprocess input_size must be [3, H, W] (or [1, H, W] for grey), got {list(input_size)}")
    for key in ("mean", "std"):
        if len(preprocess[key]) != input_size[0]:
            raise ValueError(f"preprocess {key} needs {input_size[0]} values (one per channel), got {preprocess[key]}")
    if randaugment is not None and not str(randaugment).startswith("rand"):
        raise ValueError(f"randaugment must be a timm RandAugment spec like 'rand-m9-mstd0.5', got {randaugment!r}")
    common = dict(
        input_size=input_size,
        interpolation=preprocess.get("interpolation", "bicubic"),
        mean=tuple(preprocess["mean"]),
        std=tuple(preprocess["std"]),
    )
    if train:
        pipeline = create_transform(
            is_training=True, scale=tuple(scale), ratio=tuple(ratio), hflip=hflip, color_jitter=None,
            auto_augment=randaugment, **common,
        )
        return ImageTransform(pipeline, pil_only=randaugment is not None, channels=input_size[0])
    pipeline = create_transform(is_training=False, crop_pct=preprocess.get("crop_pct", 0.875), **common)
    return ImageTransform(pipeline, pil_only=False, channels=input_size[0])
