"""Multi-view action-recognition testing (mmaction2 ``Recognizer3D`` test mode with ``average_clips="prob"``).

Each video is cut into ``num_clips`` temporal clips x ``num_crops`` spatial crops (4 x 3 = 12 views by default, the
Video Swin / Florence protocol, SPEC §7.2); every view goes through the classifier, the softmax probabilities are
averaged over the views, and top-1 / top-5 / mean-per-class accuracy are computed on the averaged scores. Views are
batched ``(B, V, 3, T, S, S)`` by :func:`florence.data.video.video_eval_loader` and run through the model ``V * B`` at
a time in chunks of ``view_batch``. The split of wall time between decoding (the loader) and the model is measured.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from florence.adapters.zeroshot import classification_metrics
from florence.data.eval_loader import BatchEvalLoader

__all__ = ["predict_views", "evaluate_action"]


@torch.no_grad()
def predict_views(model: nn.Module, loader: BatchEvalLoader, *, device: torch.device | str = "cpu",
                  view_batch: int = 16) -> dict[str, Any]:
    """View-averaged probabilities of every good video of ``loader``: ``{"probs": (N, K), "labels": (N,), "index":
    (N,) positions in the video list, "decode_s", "model_s"}``."""
    was_training = model.training
    model.eval()
    probs, labels, index = [], [], []
    decode_s = model_s = 0.0
    start = time.perf_counter()
    for batch in loader:
        decode_s += time.perf_counter() - start
        start = time.perf_counter()
        videos = batch["videos"]  # B, V, 3, T, S, S
        B, V = videos.shape[:2]
        flat = videos.flatten(0, 1)  # B*V, 3, T, S, S
        logits = torch.cat([model(flat[i:i + view_batch].to(device)).float().cpu()
                            for i in range(0, len(flat), view_batch)])  # B*V, K
        probs.append(logits.softmax(-1).view(B, V, -1).mean(1))  # B, K: probabilities averaged over views
        labels.append(batch["labels"])
        index.append(batch["index"])
        model_s += time.perf_counter() - start
        start = time.perf_counter()
    model.train(was_training)
    if not probs:
        return {"probs": np.zeros((0, 0)), "labels": np.zeros(0, np.int64), "index": np.zeros(0, np.int64),
                "decode_s": decode_s, "model_s": model_s}
    return {"probs": torch.cat(probs).numpy(), "labels": torch.cat(labels).numpy(),
            "index": torch.cat(index).numpy(), "decode_s": decode_s, "model_s": model_s}


def evaluate_action(model: nn.Module, loader: BatchEvalLoader, *, device: torch.device | str = "cpu",
                    view_batch: int = 16) -> dict[str, Any]:
    """``predict_views`` plus ``metrics`` (top1, top5, mean_per_class; fractions) and ``predictions`` (N,)."""
    out = predict_views(model, loader, device=device, view_batch=view_batch)
    if len(out["labels"]) == 0:
        raise ValueError(f"{loader.name}: no video to evaluate")
    out["metrics"] = classification_metrics(out["probs"], out["labels"])
    out["predictions"] = out["probs"].argmax(1)
    return out
