"""Frozen image features for the evaluation protocols, with an on-disk cache.

``extract`` runs the frozen image tower over a data loader and returns the pooled ``8C`` features before the
projection (the image tower's ``forward_head(forward_features(x), pre_logits=True)``: a dual encoder's
``image_encoder`` or an image-tower bundle itself; the linear-probe input, SPEC §8.2). ``project`` turns them into the L2-normalised joint-space embeddings
(``model.encode_image`` = normalise(image_projection(pooled)); zero-shot, retrieval; dual encoders only, see
``require_dual_encoder``), so one pass over the images serves every protocol. ``cached_features`` keeps the arrays in
``<cache_dir>/pooled-<model hash>-<transform hash>-<split>-<precision>.npz``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from florence.adapters.zeroshot import require_dual_encoder
from florence.engine.precision import build_precision


def transform_key(preprocess: dict, extra: str = "") -> str:
    """A short hash naming the evaluation transform (the preprocessing dict, plus anything else that changes it)."""
    payload = json.dumps({"preprocess": preprocess, "extra": extra}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@torch.no_grad()
def extract(
    model: torch.nn.Module,
    loader: Iterable,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features of every batch of ``loader`` (batches of ``(images (B,3,H,W), targets)``).

    ``model`` is a dual encoder (its ``image_encoder`` runs) or an image tower; ``precision`` is fp32 | bf16 (autocast
    through ``florence.engine.precision``).

    Returns:
        ``(features (N, 8C) float32, targets (N,) or (N, C))`` as numpy arrays, in loader order.
    """
    model.eval()
    tower = getattr(model, "image_encoder", model)  # a dual encoder's image tower, or an image-tower bundle itself
    autocast = build_precision(precision, torch.device(device)).autocast
    features, targets = [], []
    for images, target in loader:
        images = images.to(device)
        with autocast():
            out = tower.forward_head(tower.forward_features(images), pre_logits=True)  # B, 8C pooled
        features.append(out.float().cpu().numpy())
        targets.append(torch.as_tensor(target).cpu().numpy())
        if progress is not None:
            progress(len(images))
    if not features:
        raise ValueError("the data loader produced no batches")
    return np.concatenate(features), np.concatenate(targets)


@torch.no_grad()
def project(model: torch.nn.Module, pooled: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """``(N, 8C)`` pooled features -> ``(N, D)`` unit-norm image embeddings, exactly as ``model.encode_image``."""
    require_dual_encoder(model, "projecting image features into the joint space (zero-shot, retrieval)")
    weight_dtype = model.image_projection.weight.dtype
    device = model.image_projection.weight.device
    chunks = []
    for start in range(0, len(pooled), batch_size):
        x = torch.from_numpy(pooled[start:start + batch_size]).to(device=device, dtype=weight_dtype)
        chunks.append(torch.nn.functional.normalize(model.image_projection(x), dim=-1).float().cpu().numpy())
    return np.concatenate(chunks)


def cache_path(cache_dir: str | Path, model_hash: str, transform: str, split: str, precision: str) -> Path:
    """Cache file for one (model, transform, split, precision)."""
    return Path(cache_dir) / f"pooled-{model_hash[:16]}-{transform}-{split}-{precision}.npz"


def cached_features(
    cache_dir: str | Path | None,
    model_hash: str,
    transform: str,
    split: str,
    precision: str,
    compute: Callable[[], tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, bool]:
    """``compute()`` once and store it, or read it back. Returns ``(features, targets, from_cache)``."""
    if cache_dir is None:
        return (*compute(), False)
    path = cache_path(cache_dir, model_hash, transform, split, precision)
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            return data["features"], data["targets"], True
    features, targets = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, features=features, targets=targets)
    tmp.replace(path)
    return features, targets, False
