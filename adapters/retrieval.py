"""Image-text retrieval (SPEC §8.5, §9.3): caption files, R@K in both directions, and fine-tuned retrieval.

- ``load_karpathy_json`` / ``load_caption_csv`` read a test split into ``CaptionSet`` (images, captions and the image
  of every caption);
- ``recall_at_k(similarity, text_to_image)`` is a pure function: text->image counts a hit when the caption's image is
  in the top K images; image->text when ANY of the image's captions is in the top K captions (CLIP_benchmark);
  ``trivial_recall_metrics`` names the R@K that cannot miss (K >= the number of candidates);
- fine-tuned retrieval (continued UniCL training on the target pairs) needs the training engine, so it lives in
  ``florence.benchmarks.finetune_retrieval`` (adapters do not import training code).
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from florence.data.errors import DataFileError, DataNotFound
from florence.data.sources import check_row_width

KS = (1, 5, 10)


@dataclass
class CaptionSet:
    """A retrieval split.

    Attributes:
        image_paths: ``N_img`` image files.
        captions: ``N_txt`` caption strings.
        text_to_image: ``(N_txt,)`` int64, the index into ``image_paths`` of each caption's image.
        source: the annotation file it was read from.
    """

    image_paths: list[Path]
    captions: list[str]
    text_to_image: np.ndarray
    source: Path

    def captions_of(self, image_index: int) -> list[int]:
        """Indices of the captions of one image."""
        return np.flatnonzero(self.text_to_image == image_index).tolist()

    def keep_images(self, keep: Sequence[int] | np.ndarray) -> CaptionSet:
        """The split restricted to the images ``keep`` (indices, in that order) and their captions; used when bad
        images were skipped. Captions keep their relative order; ``text_to_image`` is renumbered."""
        keep = np.asarray(keep, dtype=np.int64)
        new_index = np.full(len(self.image_paths), -1, dtype=np.int64)
        new_index[keep] = np.arange(len(keep))
        kept = new_index[self.text_to_image] >= 0  # N_txt
        return CaptionSet([self.image_paths[i] for i in keep], [c for c, k in zip(self.captions, kept) if k],
                          new_index[self.text_to_image[kept]], self.source)


def load_karpathy_json(path: str | Path, image_root: str | Path, split: str = "test") -> CaptionSet:
    """Read a Karpathy-style caption file (``dataset_flickr30k.json``, ``dataset_coco.json``).

    The file is ``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw": ...}, ...]}, ...]}``; an image
    is ``image_root/filepath/filename`` (``image_root/filename`` without ``filepath``). Only images whose ``split``
    equals ``split`` are kept (Karpathy's ``test``: Flickr30K 1,000 images, COCO 5,000).
    """
    path, image_root = Path(path), Path(image_root)
    if not path.is_file():
        raise DataNotFound(f"{path}: caption file not found (expected a Karpathy-style JSON)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataFileError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataFileError(f"{path}: expected a JSON object with an 'images' list (Karpathy format)")
    images, captions, owners = [], [], []
    for i, entry in enumerate(data["images"]):
        try:
            if entry["split"] != split:
                continue
            name = entry["filename"]
            sentences = [s["raw"].strip() for s in entry["sentences"]]
        except (KeyError, TypeError) as e:
            raise DataFileError(f"{path}: images[{i}] lacks {e} (needs filename, split, sentences[].raw)") from None
        if not sentences:
            raise DataFileError(f"{path}: images[{i}] ({name}) has no sentences")
        folder = image_root / entry["filepath"] if entry.get("filepath") else image_root
        owners += [len(images)] * len(sentences)
        captions += sentences
        images.append(folder / name)
    if not images:
        raise DataFileError(f"{path}: no images with split {split!r}")
    return CaptionSet(images, captions, np.asarray(owners, dtype=np.int64), path)


def load_caption_csv(
    path: str | Path, image_root: str | Path, image_column: str = "image", caption_column: str = "caption"
) -> CaptionSet:
    """Read a CSV with one (image, caption) pair a row; rows of the same image are grouped (first-seen order).

    Image paths are relative to ``image_root`` (absolute paths are kept). A row with more fields than the header
    (a caption with an unquoted comma) is a :class:`~florence.data.errors.DataFileError` naming the file and line,
    never a caption cut at the comma.
    """
    path, image_root = Path(path), Path(image_root)
    if not path.is_file():
        raise DataNotFound(f"{path}: caption file not found")
    index: dict[str, int] = {}
    images, captions, owners = [], [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {image_column, caption_column} - set(reader.fieldnames or [])
        if missing:
            raise DataFileError(f"{path}: missing column(s) {sorted(missing)}; has {reader.fieldnames}")
        for row in reader:
            check_row_width(row, reader, path)
            image, caption = (row[image_column] or "").strip(), (row[caption_column] or "").strip()
            if not image or not caption:
                raise DataFileError(f"{path}:{reader.line_num}: empty {image_column!r} or {caption_column!r}")
            if image not in index:
                index[image] = len(images)
                images.append(image_root / image)
            owners.append(index[image])
            captions.append(caption)
    if not images:
        raise DataFileError(f"{path}: no rows")
    return CaptionSet(images, captions, np.asarray(owners, dtype=np.int64), path)


def rank_top_k(similarity: np.ndarray | torch.Tensor, k: int) -> np.ndarray:
    """``(Q, min(k, N))`` indices of the ``k`` highest scores per row, best first (ties: lower index first)."""
    similarity = np.asarray(similarity, dtype=np.float64)
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]


def recall_at_k(
    similarity: np.ndarray | torch.Tensor, text_to_image: np.ndarray | Sequence[int], ks: Sequence[int] = KS
) -> dict[str, float]:
    """Image->text and text->image recall at K (fractions in [0, 1]).

    Args:
        similarity: ``(N_img, N_txt)`` image-caption scores.
        text_to_image: ``(N_txt,)`` the image index of each caption.
        ks: the K values.

    Returns:
        ``{"image_to_text_R@K": ..., "text_to_image_R@K": ...}`` for each K.
    """
    similarity = np.asarray(similarity, dtype=np.float64)
    text_to_image = np.asarray(text_to_image, dtype=np.int64)
    n_img, n_txt = similarity.shape
    if text_to_image.shape != (n_txt,) or text_to_image.min() < 0 or text_to_image.max() >= n_img:
        raise ValueError(f"text_to_image must be ({n_txt},) image indices in [0, {n_img}); got {text_to_image.shape}")
    kmax = max(ks)
    i2t = rank_top_k(similarity, kmax)  # N_img, K: caption indices
    t2i = rank_top_k(similarity.T, kmax)  # N_txt, K: image indices
    i2t_owner = text_to_image[i2t] == np.arange(n_img)[:, None]  # N_img, K: hit matrix
    t2i_hit = t2i == text_to_image[:, None]  # N_txt, K
    metrics = {}
    for k in ks:
        metrics[f"image_to_text_R@{k}"] = float(i2t_owner[:, :k].any(axis=1).mean())
    for k in ks:
        metrics[f"text_to_image_R@{k}"] = float(t2i_hit[:, :k].any(axis=1).mean())
    return metrics


def trivial_recall_metrics(num_images: int, num_captions: int, ks: Sequence[int] = KS) -> list[str]:
    """Names of the R@K metrics that are 1.0 whatever the model: K at least the number of candidates ranked (captions
    for image->text, images for text->image). Results list them so a reader does not take them for a signal."""
    trivial = [f"image_to_text_R@{k}" for k in ks if k >= num_captions]
    return trivial + [f"text_to_image_R@{k}" for k in ks if k >= num_images]


@torch.no_grad()
def encode_captions(model, captions: Sequence[str], batch_size: int = 256, device: str | torch.device = "cpu",
                    progress=None) -> torch.Tensor:
    """``(N_txt, D)`` unit-norm text embeddings of ``captions`` (``model.tokenize`` + ``model.encode_text``)."""
    from florence.adapters.zeroshot import encode_in_batches, model_text_encoder

    encoder = model_text_encoder(model, device, task="image-text retrieval")
    return encode_in_batches(encoder, captions, batch_size, progress).cpu()
