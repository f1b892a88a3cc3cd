"""Detection transforms with mmdetection's semantics: keep-ratio resize, multi-scale choice, horizontal flip,
normalisation and bottom/right zero padding. Images go PIL (or uint8 tensor) -> uint8 tensor ``(3, H, W)`` -> float.

- **Resize** (mmdet ``Resize(scale=(long, short), keep_ratio=True)``, i.e. mmcv ``rescale_size``): the factor is
  ``f = min(long / max(h, w), short / min(h, w))`` and the new size ``(int(h * f + 0.5), int(w * f + 0.5))``; the image
  is resampled bilinearly (half-pixel centres, no antialiasing, as OpenCV's ``INTER_LINEAR`` that mmdet uses) and
  rounded to 8 bits as mmdet's uint8 output is. Boxes are multiplied by the *realised* factors ``sx = new_w / w``,
  ``sy = new_h / h`` (not ``f``) and clipped to ``[0, new_w] x [0, new_h]`` (mmdet's ``clip_object_border``).
- **Multi-scale** (training): ``scales=[[long, short], ...]`` picks one uniformly (mmdet ``RandomChoiceResize``);
  ``short_range=[lo, hi]`` draws the short side uniformly among the integers ``lo..hi`` with the long side capped at
  ``scale[0]`` (mmdet ``RandomResize(scale=[(long, lo), (long, hi)], keep_ratio=True)``).
- **Flip** (mmdet ``RandomFlip(prob=p)``, horizontal): ``x1' = w - x2``, ``x2' = w - x1`` in the resized frame.
- **Normalise**: pixels in [0, 1] (``/ 255``), then ``(x - mean) / std`` with the model's ``preprocess`` mean / std,
  as every florence transform (:mod:`florence.data.transforms`); RGB channel order.
- **Pad** (at collate): zeros (after normalisation, as mmdet's ``Pad`` / data preprocessor) at the bottom and right, up
  to the batch's largest height and width rounded up to a multiple of ``size_divisor``.

All random draws come from a ``numpy.random.Generator`` the caller seeds per sample (the loaders seed it with the
sample's stream seed), so a sample looks the same in every run, rank and worker.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from florence.data.images import to_rgb

Scale = tuple[int, int]  # (long side, short side) bounds


def keep_ratio_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
    """The ``(new_h, new_w)`` of mmcv's ``rescale_size``: as large as possible within ``scale`` (long, short; the
    order does not matter: the larger value bounds the long side), aspect ratio kept, rounded half up."""
    long_side, short_side = max(scale), min(scale)
    factor = min(long_side / max(height, width), short_side / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_boxes(boxes: torch.Tensor, sy: float, sx: float, size: tuple[int, int]) -> torch.Tensor:
    """``boxes (n, 4)`` xyxy scaled by ``(sx, sy, sx, sy)`` and clipped to the image ``size = (h, w)``."""
    h, w = size
    out = boxes * torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype)  # n, 4
    out[:, 0::2] = out[:, 0::2].clamp(0, w)
    out[:, 1::2] = out[:, 1::2].clamp(0, h)
    return out


def flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Horizontal flip of ``boxes (n, 4)`` xyxy in an image ``width`` wide: ``x1' = w - x2``, ``x2' = w - x1``."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)  # n, 4


def to_uint8_tensor(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """A PIL image (any mode, made RGB with :func:`~florence.data.images.to_rgb`) or a uint8 ``(3, H, W)`` /
    ``(H, W)`` tensor -> uint8 ``(3, H, W)``."""
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.array(to_rgb(image), dtype=np.uint8)).permute(2, 0, 1).contiguous()  # 3, H, W
    if image.dtype != torch.uint8:
        raise TypeError(f"tensor images must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = image.unsqueeze(0)  # 1, H, W
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"tensor images must be (H, W) or (C, H, W) with C = 1 or 3, got {tuple(image.shape)}")
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image  # 3, H, W


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``(3, H, W)`` -> float ``(3, h, w)`` with values in 0..255 rounded to integers (bilinear, half-pixel
    centres, no antialiasing: OpenCV ``INTER_LINEAR``)."""
    x = image.float()  # 3, H, W
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=False)[0]  # 3, h, w
    return x.round_().clamp_(0.0, 255.0)


def pad_images(images: Sequence[torch.Tensor], size_divisor: int) -> torch.Tensor:
    """``[(3, h_i, w_i)] * B`` -> ``(B, 3, Hp, Wp)``: each image at the top left, zeros elsewhere; ``Hp`` / ``Wp`` are
    the largest ``h_i`` / ``w_i`` rounded up to a multiple of ``size_divisor``."""
    if not images:
        raise ValueError("cannot pad an empty list of images")
    height = math.ceil(max(im.shape[-2] for im in images) / size_divisor) * size_divisor
    width = math.ceil(max(im.shape[-1] for im in images) / size_divisor) * size_divisor
    out = images[0].new_zeros(len(images), images[0].shape[0], height, width)  # B, 3, Hp, Wp
    for i, im in enumerate(images):
        out[i, :, : im.shape[-2], : im.shape[-1]] = im
    return out


def _pair(value: Sequence[int], what: str) -> Scale:
    if len(value) != 2 or any(int(v) != v or v <= 0 for v in value):
        raise ValueError(f"{what} must be two positive integers [long, short], got {list(value)}")
    return int(max(value)), int(min(value))


class DetectionTransform:
    """Resize (+ multi-scale choice) + flip + normalise one image and its boxes (see the module docstring).

    Args:
        preprocess: the model's preprocess dict; ``mean`` and ``std`` (3 values, for pixels in [0, 1]) are used.
        scale: ``(long, short)`` of the keep-ratio resize (mmdet's ``scale=(1333, 800)``).
        scales: a list of ``(long, short)`` to choose from uniformly per sample (replaces ``scale``).
        short_range: ``(lo, hi)``: the short side drawn uniformly from the integers ``lo..hi``, the long side
            bounded by ``scale``'s long side.
        flip: probability of a horizontal flip (1.0: always, for flipped test views).
    """

    def __init__(self, preprocess: dict[str, Any], *, scale: Sequence[int] = (1333, 800),
                 scales: Sequence[Sequence[int]] | None = None, short_range: Sequence[int] | None = None,
                 flip: float = 0.0):
        for key in ("mean", "std"):
            if key not in preprocess or len(preprocess[key]) != 3:
                raise ValueError(f"preprocess {key} needs 3 values (RGB) for detection, got {preprocess.get(key)}")
        if scales is not None and short_range is not None:
            raise ValueError("give scales or short_range, not both")
        if not 0.0 <= flip <= 1.0:
            raise ValueError(f"flip must be a probability in [0, 1], got {flip}")
        self.mean = torch.tensor(preprocess["mean"], dtype=torch.float32).view(3, 1, 1)  # 3, 1, 1
        self.std = torch.tensor(preprocess["std"], dtype=torch.float32).view(3, 1, 1)  # 3, 1, 1
        self.scale = _pair(scale, "scale")
        self.scales = [_pair(s, "scales[i]") for s in scales] if scales is not None else None
        if scales is not None and not self.scales:
            raise ValueError("scales must list at least one [long, short]")
        self.short_range = None
        if short_range is not None:
            if len(short_range) != 2 or not 0 < short_range[0] <= short_range[1]:
                raise ValueError(f"short_range must be [lo, hi] with 0 < lo <= hi, got {list(short_range)}")
            self.short_range = (int(short_range[0]), int(short_range[1]))
        self.flip = float(flip)

    def draw(self, rng: np.random.Generator) -> tuple[Scale, bool]:
        """This sample's ``(long, short)`` scale and whether it is flipped; the scale is drawn first, then the flip."""
        if self.scales is not None:
            scale = self.scales[int(rng.integers(len(self.scales)))]
        elif self.short_range is not None:
            scale = (self.scale[0], int(rng.integers(self.short_range[0], self.short_range[1] + 1)))
        else:
            scale = self.scale
        return scale, bool(rng.random() < self.flip)

    def apply(self, image: Image.Image | torch.Tensor, boxes: torch.Tensor, scale: Sequence[int],
              flip: bool) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float]]:
        """Deterministic part: ``image`` (PIL or uint8 tensor, ``H x W``) and ``boxes (n, 4)`` xyxy in its pixels ->
        ``(image (3, h, w) float32 normalised, boxes (n, 4) float32 in resized pixels, (sy, sx) = (h / H, w / W))``."""
        x = to_uint8_tensor(image)  # 3, H, W
        height, width = x.shape[-2:]
        size = keep_ratio_size(height, width, scale)
        x = resize_image(x, size)  # 3, h, w in 0..255
        sy, sx = size[0] / height, size[1] / width
        boxes = resize_boxes(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4), sy, sx, size)  # n, 4
        if flip:
            x = x.flip(-1)
            boxes = flip_boxes(boxes, size[1])
        x = (x / 255.0 - self.mean) / self.std  # 3, h, w
        return x, boxes, (sy, sx)

    def __call__(self, image: Image.Image | torch.Tensor, boxes: torch.Tensor,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float], bool]:
        """:meth:`draw` then :meth:`apply`; returns ``(image, boxes, (sy, sx), flipped)``."""
        scale, flip = self.draw(rng)
        x, boxes, factors = self.apply(image, boxes, scale, flip)
        return x, boxes, factors, flip

    def __repr__(self) -> str:
        choice = f"scales={self.scales}" if self.scales else (
            f"short_range={self.short_range}" if self.short_range else "")
        return f"DetectionTransform(scale={self.scale}{', ' + choice if choice else ''}, flip={self.flip})"
