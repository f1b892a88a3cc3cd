"""Evaluation datasets: a training-style data source (``florence.data.build_source``), or a list of image files."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from florence.data.images import decode_image
from florence.data.transforms import ImageTransform


class SourceImages(Dataset):
    """``dataset[i] -> (image (3, H, W), label)`` for the first ``limit`` samples of an image-label ``source``,
    through an evaluation ``transform``. The source's text draw is ignored; undecodable images raise ``BadSample``
    (``florence.data.eval_loader.EvalLoader`` applies the bad-sample policy)."""

    def __init__(self, source, transform: ImageTransform, limit: int | None = None):
        self.source, self.transform = source, transform
        self.size = len(source) if limit is None else min(limit, len(source))
        self.files = [f"{getattr(source, 'name', 'source')}[{i}]" for i in range(self.size)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        raw = self.source.get(index, random.Random(index))
        return self.transform(raw.image), raw.label


class ImageList(Dataset):
    """Images from a list of paths with targets; decoded with ``florence.data.images.decode_image`` (an unusable file
    raises ``BadSample`` naming it: the evaluation's bad-sample policy applies)."""

    def __init__(self, paths: list[Path], targets: np.ndarray, transform: Callable):
        self.paths, self.targets, self.transform = paths, targets, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(decode_image(self.paths[i])), torch.as_tensor(self.targets[i])
