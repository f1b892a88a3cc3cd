"""Clip transforms for action recognition: decoded frames ``(T, H, W, 3)`` uint8 RGB -> a normalised clip tensor
``(3, T, S, S)`` float32 (mmaction2's NCTHW per sample).

Every random draw is made **once per clip** and applied to all its frames (a clip whose frames were cropped or
flipped differently would show motion that is not in the video), from the ``np.random.Generator`` the caller passes.

**Train** (:class:`VideoTrainTransform`, mmaction2's Video Swin pipeline ``Resize(-1, 256)``,
``RandomResizedCrop``, ``Resize(224, 224)``, ``Flip(0.5)``, optionally timm RandAugment):

- random resized crop: a box of ``scale`` (area fraction) and ``ratio`` (w / h, log-uniform) drawn as torchvision's
  ``RandomResizedCrop.get_params`` (10 tries, then the centre crop clamped to ``ratio``), resized to ``S x S``. The
  short-side resize mmaction2 runs first only changes the resolution the box is cut from (the box is drawn as a
  fraction of the frame), so we draw the box on the decoded frames and resample once instead of twice;
- horizontal flip with probability ``hflip``;
- RandAugment (``rand_augment: "rand-m7-n4-mstd0.5"``, timm's :func:`~timm.data.auto_augment.rand_augment_transform`
  with timm's ``translate_const`` / ``img_mean`` / interpolation hparams): timm draws the ops from NumPy's global RNG
  and the magnitudes / probabilities from Python's ``random``; both are seeded with the **same** seed (drawn once
  per clip from the generator) before each frame, so every frame gets the same ops and magnitudes. The global RNG
  states are restored afterwards. RandAugment works on PIL images, so only this step converts frames to PIL.

**Test** (:class:`VideoTestTransform`, mmaction2 ``Resize(-1, S)`` + ``CenterCrop(S)`` / ``ThreeCrop(S)``): the short
side is resized to ``S`` (mmcv's rounding: ``int(side * S / short + 0.5)``), then ``num_crops`` crops of ``S x S``:
1 = the centre crop, 3 = mmaction2's ThreeCrop, i.e. three crops along the long side at offsets ``0``, ``2 * step``
and ``step`` with ``step = (long - S) // 2`` (in that order: start, end, centre). Output ``(num_crops, 3, T, S, S)``.

Both normalise ``x / 255`` with the model's ``mean`` / ``std`` (the ``preprocess`` dict, values in [0, 1]).
Resampling is torch's antialiased ``interpolate`` (``preprocess["interpolation"]``: bilinear by default, or bicubic,
clamped to [0, 255]) on the whole clip at once.
"""
from __future__ import annotations

import math
import random
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from timm.data.transforms import str_to_pil_interp

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
DEFAULT_AUGMENT: dict[str, Any] = {"scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3), "hflip": 0.5, "rand_augment": None}


def clip_size(preprocess: dict[str, Any]) -> tuple[int, int, int]:
    """``(T, H, W)`` of a video ``preprocess`` dict's ``input_size`` ``[3, T, H, W]``."""
    for key in ("input_size", "mean", "std"):
        if key not in preprocess:
            raise KeyError(f"video preprocess dict lacks {key!r} (has {sorted(preprocess)})")
    size = [int(v) for v in preprocess["input_size"]]
    if len(size) != 4 or size[0] != 3:
        raise ValueError(f"video preprocess input_size must be [3, T, H, W], got {preprocess['input_size']}")
    return size[1], size[2], size[3]


def _interpolation(preprocess: dict[str, Any]) -> str:
    mode = preprocess.get("interpolation", "bilinear")
    if mode not in INTERPOLATIONS:
        raise ValueError(f"video preprocess interpolation must be one of {', '.join(INTERPOLATIONS)}, got {mode!r}")
    return mode


def to_clip_tensor(frames: np.ndarray) -> torch.Tensor:
    """``(T, H, W, 3)`` uint8 -> ``(T, 3, H, W)`` float32 in [0, 255]."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames of shape (T, H, W, 3), got {frames.shape}")
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # T, 3, H, W


def resize_clip(clip: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """``(T, 3, H, W)`` float in [0, 255] -> ``(T, 3, *size)``, antialiased (no-op at the same size)."""
    if tuple(clip.shape[-2:]) == tuple(size):
        return clip
    kwargs = {} if mode == "nearest" else {"align_corners": False, "antialias": True}
    return F.interpolate(clip, size=tuple(size), mode=mode, **kwargs).clamp_(0, 255)


def short_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    """The ``(h, w)`` of a frame whose short side is resized to ``short`` (mmcv ``rescale_size`` rounding)."""
    factor = short / min(height, width)
    return int(height * factor + 0.5), int(width * factor + 0.5)


def random_resized_box(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                       rng: np.random.Generator) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop of area fraction in ``scale`` and aspect ratio ``w / h`` in ``ratio``
    (log-uniform), drawn as torchvision's ``RandomResizedCrop.get_params``: 10 tries, then the whole frame's centre
    crop clamped to the ratio range."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def centre_box(height: int, width: int, crop_h: int, crop_w: int) -> tuple[int, int]:
    """``(top, left)`` of mmaction2's ``CenterCrop``."""
    return (height - crop_h) // 2, (width - crop_w) // 2


def three_crop_boxes(height: int, width: int, crop_h: int, crop_w: int) -> list[tuple[int, int]]:
    """``(top, left)`` of mmaction2's ``ThreeCrop``: along the long side (the crop spans the short side), at
    ``0``, ``2 * step``, ``step`` with ``step = (long - crop) // 2``."""
    if crop_h == height:
        step = (width - crop_w) // 2
        return [(0, 0), (0, 2 * step), (0, step)]
    if crop_w == width:
        step = (height - crop_h) // 2
        return [(0, 0), (2 * step, 0), (step, 0)]
    raise ValueError(f"ThreeCrop needs the crop {crop_h}x{crop_w} to span a side of the {height}x{width} frames")


class _Normalize:
    """``(T, 3, H, W)`` float in [0, 255] -> ``(3, T, H, W)`` float32 normalised with mean / std (values in [0, 1])."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor([float(m) * 255 for m in mean], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor([float(s) * 255 for s in std], dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, clip: torch.Tensor) -> torch.Tensor:
        return ((clip - self.mean) / self.std).permute(1, 0, 2, 3).contiguous()  # 3, T, H, W


class ClipRandAugment:
    """timm RandAugment with the same ops and magnitudes on every frame of a clip (see the module docstring)."""

    def __init__(self, spec: str, size: int, mean: Sequence[float], interpolation: str = "bilinear"):
        hparams = {"translate_const": int(size * 0.45), "img_mean": tuple(min(255, round(255 * m)) for m in mean),
                   "interpolation": str_to_pil_interp(interpolation)}  # as timm's transforms_imagenet_train
        self.spec = spec
        self.op = rand_augment_transform(spec, hparams)

    def __call__(self, frames: np.ndarray, seed: int) -> np.ndarray:
        """``(T, H, W, 3)`` uint8 -> the same shape, every frame augmented under the same ``seed``."""
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            out = []
            for frame in frames:
                random.seed(seed)
                np.random.seed(seed)
                out.append(np.asarray(self.op(Image.fromarray(frame)), dtype=np.uint8))
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return np.stack(out)  # T, H, W, 3


class VideoTrainTransform:
    """``(frames (T, H, W, 3) uint8, rng) -> (3, T, S, S)`` float32: random resized crop, flip, optional
    RandAugment, one draw per clip (module docstring). Picklable."""

    def __init__(self, preprocess: dict[str, Any], *, scale: Sequence[float] = DEFAULT_AUGMENT["scale"],
                 ratio: Sequence[float] = DEFAULT_AUGMENT["ratio"], hflip: float = DEFAULT_AUGMENT["hflip"],
                 rand_augment: str | None = None):
        _, height, width = clip_size(preprocess)
        self.size = (height, width)
        self.mode = _interpolation(preprocess)
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), float(hflip)
        self.normalize = _Normalize(preprocess["mean"], preprocess["std"])
        self.rand_augment = (ClipRandAugment(rand_augment, min(height, width), preprocess["mean"], self.mode)
                             if rand_augment else None)

    def __call__(self, frames: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        top, left, h, w = random_resized_box(frames.shape[1], frames.shape[2], self.scale, self.ratio, rng)
        clip = resize_clip(to_clip_tensor(frames[:, top:top + h, left:left + w]), self.size, self.mode)  # T,3,S,S
        if rng.random() < self.hflip:
            clip = clip.flip(-1)
        if self.rand_augment is not None:
            seed = int(rng.integers(0, 2**32))
            pixels = clip.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # T, S, S, 3
            clip = to_clip_tensor(self.rand_augment(pixels, seed))
        return self.normalize(clip)  # 3, T, S, S


class VideoTestTransform:
    """``frames (T, H, W, 3) uint8 -> (num_crops, 3, T, S, S)`` float32: short side to ``S``, then the centre crop
    (``num_crops=1``) or mmaction2's ThreeCrop (3), normalised (module docstring). Deterministic; picklable."""

    def __init__(self, preprocess: dict[str, Any], num_crops: int = 1):
        if num_crops not in (1, 3):
            raise ValueError(f"num_crops must be 1 (centre crop) or 3 (ThreeCrop), got {num_crops}")
        _, height, width = clip_size(preprocess)
        self.size = (height, width)
        self.num_crops = int(num_crops)
        self.mode = _interpolation(preprocess)
        self.normalize = _Normalize(preprocess["mean"], preprocess["std"])

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        crop_h, crop_w = self.size
        new_size = short_side_size(frames.shape[1], frames.shape[2], min(crop_h, crop_w))
        clip = resize_clip(to_clip_tensor(frames), new_size, self.mode)  # T, 3, h, w
        h, w = new_size
        boxes = [centre_box(h, w, crop_h, crop_w)] if self.num_crops == 1 else three_crop_boxes(h, w, crop_h, crop_w)
        crops = [self.normalize(clip[:, :, t:t + crop_h, l:l + crop_w]) for t, l in boxes]
        return torch.stack(crops)  # num_crops, 3, T, S, S


def video_train_transform(preprocess: dict[str, Any], *, augment: dict[str, Any] | None = None) -> VideoTrainTransform:
    """The train clip transform of a video ``preprocess`` dict; ``augment`` keys ``scale``, ``ratio``, ``hflip``,
    ``rand_augment`` (defaults :data:`DEFAULT_AUGMENT`)."""
    options = {**DEFAULT_AUGMENT, **(augment or {})}
    unknown = sorted(set(options) - set(DEFAULT_AUGMENT))
    if unknown:
        raise ValueError(f"unknown video augment keys {unknown} (known: {', '.join(DEFAULT_AUGMENT)})")
    return VideoTrainTransform(preprocess, **options)


def video_test_transform(preprocess: dict[str, Any], num_crops: int) -> VideoTestTransform:
    """The test clip transform: ``num_crops`` (1 or 3) spatial views of ``S x S``."""
    return VideoTestTransform(preprocess, num_crops)
