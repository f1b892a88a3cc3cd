"""Pictures of evaluation results (matplotlib, Agg backend, PNG files).

- ``confusion_matrix_png``: row-normalised confusion matrix (true class rows, predicted columns), counts written in
  the cells for up to 20 classes;
- ``retrieval_png``: one row per text query with its caption and its top-5 images, the correct image framed in green
  and the others in grey.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """``(C, C)`` int64 counts: rows true class, columns predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1)
    return matrix


def confusion_matrix_png(
    labels: np.ndarray, predictions: np.ndarray, classnames: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """Write the confusion matrix of ``predictions`` against ``labels`` to ``path``; returns the path."""
    plt = _pyplot()
    n = len(classnames)
    counts = confusion_matrix(labels, predictions, n)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.45 * n, 30)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 60:
        ax.set_xticks(range(n), [str(c) for c in classnames], rotation=45, ha="right", fontsize=8 if n <= 20 else 5)
        ax.set_yticks(range(n), [str(c) for c in classnames], fontsize=8 if n <= 20 else 5)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _thumbnail(path: Path, size: int = 128) -> np.ndarray:
    from PIL import Image

    from florence.data.images import decode_image

    image = decode_image(path)
    image.thumbnail((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image)


def retrieval_png(
    similarity: np.ndarray, pairs, path: str | Path, k: int = 5, max_queries: int = 8, title: str = ""
) -> Path:
    """Text->image results: for the first ``max_queries`` captions, the caption and its top-``k`` images.

    Args:
        similarity: ``(N_img, N_txt)`` scores.
        pairs: a ``florence.adapters.retrieval.CaptionSet`` (image paths, captions, text_to_image).
    """
    plt = _pyplot()
    similarity = np.asarray(similarity)
    k = min(k, similarity.shape[0])
    queries = list(range(min(max_queries, similarity.shape[1])))
    ranked = np.argsort(-similarity.T[queries], axis=1, kind="stable")[:, :k]  # Q, k image indices
    fig, axes = plt.subplots(len(queries), k + 1, figsize=(2.0 * (k + 1) + 1.5, 2.0 * len(queries)), squeeze=False)
    cache: dict[int, np.ndarray] = {}
    for row, q in enumerate(queries):
        text_ax = axes[row, 0]
        text_ax.axis("off")
        caption = pairs.captions[q]
        text_ax.text(0.0, 0.5, textwrap.fill(caption, 26), fontsize=8, va="center", ha="left")
        for col, image_index in enumerate(ranked[row], start=1):
            ax = axes[row, col]
            if image_index not in cache:
                cache[image_index] = _thumbnail(pairs.image_paths[image_index])
            ax.imshow(cache[image_index])
            hit = image_index == pairs.text_to_image[q]
            for spine in ax.spines.values():
                spine.set_edgecolor("green" if hit else "lightgrey")
                spine.set_linewidth(4 if hit else 1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"#{col} {similarity[image_index, q]:.2f}", fontsize=7)
    fig.suptitle(title or "text -> image, top results (green: the caption's image)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
