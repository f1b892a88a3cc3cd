"""The dual encoder behind a collection: its identity (bundle SHA-256), its preprocessing and its embeddings.

Images go through the bundle's evaluation transform (:func:`florence.data.transforms.build_transform`, exactly as
zero-shot evaluation) and ``model.encode_image``; texts through ``model.tokenize`` and ``model.encode_text``; a video
becomes ``frames`` segment-centre frames, each embedded as an image and mean-pooled into one unit vector
(:mod:`florence.adapters.video_retrieval`, the path of zero-shot text->video retrieval). Every embedding is returned
L2-normalised float32, so COSINE and IP rank alike.

``precision="bf16"`` runs the towers under bf16 autocast and ``compile=True`` through ``torch.compile``; both change
speed, not the collection (``benchmarks/perf/search.py`` measures images/s and top-10 agreement against eager fp32).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from florence.adapters.video_retrieval import pool_frame_embeddings
from florence.adapters.zeroshot import require_dual_encoder
from florence.bundle import bundle_sha256, from_pretrained
from florence.data.transforms import build_transform

__all__ = ["Embedder", "PRECISIONS", "module_sha256"]

PRECISIONS = ("fp32", "bf16")


def module_sha256(model: nn.Module) -> str:
    """A model's identity when it has no bundle: SHA-256 over its parameter names, shapes and bytes, and its
    preprocessing."""
    h = hashlib.sha256(json.dumps(getattr(model, "preprocess", None), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Embedder:
    """Embeds images, video frames and texts with one dual encoder (module docstring).

    Args:
        model: a bundle directory (``florence.from_pretrained``; or ``open_clip:ARCH:WEIGHTS`` / ``hf:DIR``, whose
            identity is the hash of its weights files and configuration) or a loaded dual encoder.
        device: where the towers run.
        precision: ``"fp32"`` or ``"bf16"`` (autocast).
        compile: wrap the image tower's forward in ``torch.compile``.
    """

    def __init__(self, model: str | Path | nn.Module, device: str | torch.device = "cpu", precision: str = "fp32",
                 compile: bool = False):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if isinstance(model, (str, Path)):
            spec = model
            self.sha256 = bundle_sha256(spec)
            model = from_pretrained(spec)
            # a bundle's absolute path, or the spelling of foreign weights (open_clip:..., hf:...) with absolute paths
            self.source = getattr(model, "source_spec", "") or str(Path(spec).absolute())
            self.name = f"{getattr(model, 'florence_config', {}).get('name', type(model).__name__)} ({self.source})"
        else:
            self.source = ""
            self.sha256 = module_sha256(model)
            self.name = getattr(model, "florence_config", {}).get("name", type(model).__name__)
        require_dual_encoder(model, "search")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.precision = precision
        self.preprocess: dict[str, Any] = dict(model.preprocess)
        self.transform = build_transform(self.preprocess, train=False)
        self._encode_image = torch.compile(model.encode_image, dynamic=True) if compile else model.encode_image
        with torch.no_grad():
            self.dim = int(self.embed_text(["a"]).shape[1])

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def embed_batch(self, images: torch.Tensor) -> np.ndarray:
        """``(B, C, H, W)`` transformed images -> ``(B, D)`` unit-norm float32."""
        with self._autocast():
            out = self._encode_image(images.to(self.device), normalize=False)  # B, D
        return F.normalize(out.float(), dim=-1).cpu().numpy()

    @torch.no_grad()
    def embed_video_batch(self, frames: torch.Tensor) -> np.ndarray:
        """``(B, F, C, H, W)`` transformed frames -> ``(B, D)`` unit-norm mean-pooled video embeddings."""
        B, num_frames = frames.shape[:2]
        with self._autocast():
            out = self._encode_image(frames.flatten(0, 1).to(self.device), normalize=False)  # B*F, D
        return pool_frame_embeddings(out.float().view(B, num_frames, -1), "mean").cpu().numpy()

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images (RGB) -> ``(N, D)`` unit-norm float32."""
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self.embed_batch(torch.stack([self.transform(im) for im in images]))

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Texts -> ``(N, D)`` unit-norm float32."""
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.model.tokenize(list(texts[start:start + batch_size]))
            with self._autocast():
                emb = self.model.encode_text(tokens["input_ids"].to(self.device),
                                             tokens["attention_mask"].to(self.device), normalize=False)
            out.append(F.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, getattr(self, "dim", 0)), np.float32)
