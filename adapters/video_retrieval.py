"""Zero-shot text<->video retrieval with a dual encoder (SPEC §8.9: MSR-VTT 1K-A, Florence Table 9).

A video becomes one embedding in the dual encoder's joint space from its frames, with no video training:

- **frames**: ``num_frames`` frames, the centre of each of ``num_frames`` equal segments of the video: frame
  ``floor((i + 1/2) * N / num_frames)`` for ``i = 0 .. num_frames - 1`` of a video of ``N`` frames (TSN / mmaction2
  0.x ``SampleFrames`` test mode with ``clip_len=1``; Frozen-in-Time's ``uniform`` sampling takes the same centres
  with integer segment bounds, at most one frame away). A video shorter than ``num_frames`` repeats frames. Frame
  ``i`` is the ``i``-th decoded frame (:func:`florence.data.video_decode.decode_frames`, PyAV);
- **per frame**: the image tower's evaluation transform (``florence.data.transforms.build_transform(model.preprocess,
  train=False)`` on the frame as a PIL image, exactly as a still image) and ``model.encode_image``;
- **pooling** (how Florence pools frames is not stated, SPEC §8.9: UNVERIFIED; ours): ``"mean"`` (default) averages
  the L2-normalised frame embeddings and L2-normalises the mean (CLIP4Clip's ``meanP`` on normalised frame
  features); ``"mean_unnormalized"`` averages the projections before any normalisation, then L2-normalises.

Scores are cosine similarities ``(N_vid, N_txt)``. Metrics (fractions; ranks 1-based):

- ``text_to_video_R@K``: the caption's own video is among the K best videos; ``video_to_text_R@K``: ANY of the
  video's captions is among the K best captions (:func:`florence.adapters.retrieval.recall_at_k`, CLIP_benchmark);
- ``*_median_rank``: the median over queries of the rank of the first correct item (Frozen-in-Time / CLIP4Clip
  ``MedR``);
- equal scores rank the lower index first everywhere (as :func:`florence.adapters.retrieval.rank_top_k`).

**Duplicate captions.** Where many videos share a caption text (the Moving Fashion-MNIST test clips: "a video of a
Sandal"), the strict one-to-one criterion is bounded by chance among the duplicates. With ``same_caption_positive``
the metrics are also computed with a relaxed criterion, under the same names plus ``_same_caption``: a retrieved
video (caption) is correct when it has (is) a caption whose text is identical to the query's pair. MSR-VTT numbers
(Table 9) are the strict ones.

Bad videos (unreadable, truncated, missing) follow the bad-sample policy (:mod:`florence.data.eval_loader`): skipped,
counted by reason and listed; their captions leave with them (``captions_dropped`` in the report).
"""
from __future__ import annotations

import contextlib
import csv
import json
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from florence.adapters.retrieval import KS, CaptionSet, encode_captions, load_caption_csv, recall_at_k, \
    trivial_recall_metrics
from florence.adapters.zeroshot import require_dual_encoder
from florence.data.errors import DataFileError, DataNotFound
from florence.data.eval_loader import BatchEvalLoader
from florence.data.transforms import build_transform
from florence.data.video_decode import VIDEO_SUFFIXES, decode_frames, video_info

__all__ = ["POOLINGS", "segment_centre_indices", "pool_frame_embeddings", "first_hit_ranks", "median_rank",
           "video_text_metrics", "trivial_video_metrics", "load_video_captions", "evaluate_video_retrieval"]

POOLINGS = ("mean", "mean_unnormalized")
SAME_CAPTION = "_same_caption"  # suffix of the relaxed metrics


# --- frames -> one video embedding --------------------------------------------------------------------------------


def segment_centre_indices(num_frames: int, count: int) -> np.ndarray:
    """``(count,)`` int64: the centre frame of each of ``count`` equal segments of ``num_frames`` frames,
    ``floor((i + 1/2) * num_frames / count)`` (module docstring)."""
    if num_frames <= 0 or count <= 0:
        raise ValueError(f"need positive num_frames and count, got {num_frames} and {count}")
    i = np.arange(count, dtype=np.int64)
    return (2 * i + 1) * num_frames // (2 * count)  # integer arithmetic: no float rounding at segment bounds


def pool_frame_embeddings(frames: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """``(B, F, D)`` unnormalised frame projections -> ``(B, D)`` unit-norm video embeddings (module docstring)."""
    if pooling == "mean":
        return F.normalize(F.normalize(frames, dim=-1).mean(dim=1), dim=-1)
    if pooling == "mean_unnormalized":
        return F.normalize(frames.mean(dim=1), dim=-1)
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")


class VideoFrames(Dataset):
    """``dataset[i]`` -> ``{"images": (num_frames, C, S, S) float, "index": i}``: the segment-centre frames of video
    ``i``, each through the image ``transform``; raises a ``BadSample`` for an unusable video (the loader skips it)."""

    def __init__(self, paths: Sequence[str | Path], num_frames: int, transform: Callable, decode_threads: int = 0):
        self.paths = [str(p) for p in paths]  # names samples in messages
        self.num_frames = int(num_frames)
        self.transform = transform
        self.decode_threads = int(decode_threads)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.paths[i]
        indices = segment_centre_indices(video_info(path).num_frames, self.num_frames)  # BadSample: skipped
        frames = decode_frames(path, indices, threads=self.decode_threads)  # F, H, W, 3 uint8
        images = torch.stack([self.transform(Image.fromarray(frame)) for frame in frames])  # F, C, S, S
        return {"images": images, "index": i}


def _collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {"images": torch.stack([s["images"] for s in samples]),  # B, F, C, S, S
            "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64)}


@torch.no_grad()
def _encode_videos(model, loader: BatchEvalLoader, device: torch.device, pooling: str,
                   autocast: Callable[[], ContextManager], progress: Callable[[int], None] | None
                   ) -> tuple[np.ndarray, np.ndarray, float, float]:
    """``(embeddings (N_good, D), their indices (N_good,), decode seconds, model seconds)``."""
    embeds, index = [], []
    decode_s = model_s = 0.0
    start = time.perf_counter()
    for batch in loader:
        decode_s += time.perf_counter() - start
        start = time.perf_counter()
        images = batch["images"]  # B, F, C, S, S
        B, num_frames = images.shape[:2]
        with autocast():
            frames = model.encode_image(images.flatten(0, 1).to(device), normalize=False)  # B*F, D
        embeds.append(pool_frame_embeddings(frames.float().view(B, num_frames, -1), pooling).cpu())  # B, D
        index.append(batch["index"])
        model_s += time.perf_counter() - start
        if progress is not None:
            progress(B)
        start = time.perf_counter()
    return torch.cat(embeds).numpy(), torch.cat(index).numpy(), decode_s, model_s


# --- metrics ------------------------------------------------------------------------------------------------------


def first_hit_ranks(similarity: np.ndarray | torch.Tensor, positives: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """``(Q,)`` int64 1-based rank of the first correct item of each query.

    Args:
        similarity: ``(Q, N)`` scores of N candidates per query (higher first; equal scores: lower index first).
        positives: ``(Q, N)`` bool, which candidates are correct; every query needs at least one.
    """
    similarity = np.asarray(similarity, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    if positives.shape != similarity.shape:
        raise ValueError(f"positives {positives.shape} must match similarity {similarity.shape}")
    if not positives.any(axis=1).all():
        raise ValueError(f"query {int(np.flatnonzero(~positives.any(axis=1))[0])} has no correct candidate")
    ranks = []
    columns = np.arange(similarity.shape[1])[None, :]  # 1, N
    for start in range(0, len(similarity), chunk):
        s, pos = similarity[start:start + chunk], positives[start:start + chunk]  # q, N
        best = np.where(pos, s, -np.inf).max(axis=1, keepdims=True)  # q, 1: score of the best correct item
        first = np.argmax(pos & (s == best), axis=1)[:, None]  # q, 1: its index (the lowest among equal scores)
        ahead = (s > best).sum(axis=1) + ((s == best) & (columns < first)).sum(axis=1)  # q: items ranked before it
        ranks.append(1 + ahead)
    return np.concatenate(ranks).astype(np.int64)


def median_rank(ranks: np.ndarray | Sequence[int]) -> float:
    """The median of 1-based first-hit ranks (``MedR``; the mean of the middle two for an even count)."""
    return float(np.median(np.asarray(ranks, dtype=np.float64)))


def _video_name(key: str) -> str:
    """A recall_at_k name -> its video name (``image_to_text_R@1`` -> ``video_to_text_R@1``)."""
    return key.replace("image_to_text", "video_to_text").replace("text_to_image", "text_to_video")


def _same_text_matrix(captions: Sequence[str], video_of_caption: np.ndarray, num_videos: int) -> np.ndarray:
    """``(N_vid, N_txt)`` bool: video v has a caption whose text equals caption c's."""
    _, text_id = np.unique(np.asarray(captions, dtype=str), return_inverse=True)  # N_txt
    has_text = np.zeros((num_videos, int(text_id.max()) + 1), dtype=bool)  # N_vid, distinct texts
    has_text[video_of_caption, text_id] = True
    return has_text[:, text_id]


def video_text_metrics(similarity: np.ndarray, video_of_caption: np.ndarray | Sequence[int], *,
                       captions: Sequence[str] | None = None, ks: Sequence[int] = KS) -> dict[str, float]:
    """R@K and median rank both ways (module docstring).

    Args:
        similarity: ``(N_vid, N_txt)`` video-caption scores.
        video_of_caption: ``(N_txt,)`` the video index of each caption; every video needs a caption.
        captions: the ``N_txt`` caption texts: also the ``_same_caption`` metrics (identical text counts as correct).
        ks: the K values.
    """
    similarity = np.asarray(similarity, dtype=np.float64)
    video_of_caption = np.asarray(video_of_caption, dtype=np.int64)
    strict = recall_at_k(similarity, video_of_caption, ks)  # validates video_of_caption
    metrics = {_video_name(k): v for k, v in strict.items()}
    n_vid = similarity.shape[0]
    if len(np.unique(video_of_caption)) < n_vid:
        missing = sorted(set(range(n_vid)) - set(video_of_caption.tolist()))
        raise ValueError(f"video {missing[0]} has no caption ({len(missing)} videos without one)")
    own = video_of_caption[None, :] == np.arange(n_vid)[:, None]  # N_vid, N_txt: caption c describes video v
    metrics["text_to_video_median_rank"] = median_rank(first_hit_ranks(similarity.T, own.T))
    metrics["video_to_text_median_rank"] = median_rank(first_hit_ranks(similarity, own))
    if captions is not None:
        if len(captions) != len(video_of_caption):
            raise ValueError(f"{len(captions)} captions for {len(video_of_caption)} caption indices")
        same = _same_text_matrix(captions, video_of_caption, n_vid)  # N_vid, N_txt
        ranks = {"text_to_video": first_hit_ranks(similarity.T, same.T),
                 "video_to_text": first_hit_ranks(similarity, same)}
        for direction in ("video_to_text", "text_to_video"):  # recall_at_k's key order
            for k in ks:
                metrics[f"{direction}_R@{k}{SAME_CAPTION}"] = float((ranks[direction] <= k).mean())
        for direction in ("text_to_video", "video_to_text"):
            metrics[f"{direction}_median_rank{SAME_CAPTION}"] = median_rank(ranks[direction])
    return metrics


def trivial_video_metrics(num_videos: int, num_captions: int, ks: Sequence[int] = KS,
                          same_caption: bool = False) -> list[str]:
    """Names of the R@K that are 1.0 whatever the model (K at least the number of candidates), with their
    ``_same_caption`` twins when ``same_caption``."""
    names = [_video_name(k) for k in trivial_recall_metrics(num_videos, num_captions, ks)]
    return names + [n + SAME_CAPTION for n in names] if same_caption else names


# --- caption files ------------------------------------------------------------------------------------------------


def _video_file(videos: Path, name: str) -> Path:
    """``videos/name``, with ``.mp4`` added when ``name`` has no video suffix (MSR-VTT ids: ``video7010``)."""
    return videos / (name if Path(name).suffix.lower() in VIDEO_SUFFIXES else f"{name}.mp4")


def _pick(keys, choices: tuple[str, str], path: Path, where: str) -> str:
    found = [c for c in choices if c in keys]
    if not found:
        raise DataFileError(f"{path}: {where} needs a {choices[0]!r} (or {choices[1]!r}) field; has {sorted(keys)}")
    return found[0]


def _load_csv(path: Path, videos: Path) -> CaptionSet:
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    video_key = _pick(header, ("video", "video_id"), path, "the header")
    caption_key = _pick(header, ("caption", "sentence"), path, "the header")
    pairs = load_caption_csv(path, ".", image_column=video_key, caption_column=caption_key)  # rows grouped by video
    return CaptionSet([_video_file(videos, str(p)) for p in pairs.image_paths], pairs.captions, pairs.text_to_image,
                      path)


def _load_json(path: Path, videos: Path) -> CaptionSet:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataFileError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(entries, list):
        raise DataFileError(f"{path}: expected a JSON list of {{\"video\", \"caption\"}} objects")
    index: dict[str, int] = {}
    paths, captions, owners = [], [], []
    for i, entry in enumerate(entries):
        where = f"entry [{i}]"
        if not isinstance(entry, dict):
            raise DataFileError(f"{path}: {where} is a {type(entry).__name__}, not an object")
        name = str(entry[_pick(entry, ("video", "video_id"), path, where)]).strip()
        texts = entry[_pick(entry, ("caption", "sentence"), path, where)]
        texts = [texts] if isinstance(texts, str) else texts
        if not name or not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip()
                                                                            for t in texts):
            raise DataFileError(f"{path}: {where}: empty video or caption (a caption is a non-empty string or list)")
        if name not in index:
            index[name] = len(paths)
            paths.append(_video_file(videos, name))
        owners += [index[name]] * len(texts)
        captions += [t.strip() for t in texts]
    if not paths:
        raise DataFileError(f"{path}: no entries")
    return CaptionSet(paths, captions, np.asarray(owners, dtype=np.int64), path)


def load_video_captions(path: str | Path, videos: str | Path) -> CaptionSet:
    """Read a text-video test split (MSR-VTT 1K-A style) into a :class:`CaptionSet` (``image_paths`` are the videos).

    - CSV with a header: ``video_id,sentence`` (Frozen-in-Time / CLIP4Clip ``MSRVTT_JSFUSION_test.csv``:
      ``key,vid_key,video_id,sentence``) or ``video,caption`` (``florence.benchmarks.moving_fmnist``'s
      ``captions_<split>.csv``); other columns are ignored;
    - JSON: a list of ``{"video" | "video_id": ..., "caption" | "sentence": text or [texts]}``.

    A video is ``videos/<name>``, ``.mp4`` added when the name has no video suffix; rows of one video are grouped
    (first-seen order). A malformed file is a :class:`DataFileError` naming the file and the row.
    """
    path, videos = Path(path), Path(videos)
    if not path.is_file():
        raise DataNotFound(f"{path}: caption file not found")
    return _load_json(path, videos) if path.suffix.lower() == ".json" else _load_csv(path, videos)


# --- the evaluation -----------------------------------------------------------------------------------------------


def evaluate_video_retrieval(
    model: torch.nn.Module,
    videos: Sequence[str | Path],
    captions: Sequence[str],
    video_of_caption: np.ndarray | Sequence[int],
    *,
    num_frames: int = 8,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    pooling: str = "mean",
    same_caption_positive: bool = False,
    on_bad_sample: str = "skip",
    num_workers: int = 0,
    decode_threads: int = 0,
    text_batch_size: int = 256,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    progress: bool = False,
    name: str = "videos",
) -> dict[str, Any]:
    """Zero-shot retrieval between ``videos`` and ``captions`` (module docstring).

    Args:
        model: a dual encoder (``encode_image``, ``encode_text``, ``tokenize``) on ``device``; its mode is restored.
        videos: ``N_vid`` video files.
        captions: ``N_txt`` caption texts.
        video_of_caption: ``(N_txt,)`` the index into ``videos`` of each caption's video; every video needs one.
        num_frames: frames per video (segment centres).
        batch_size: videos per image forward (``batch_size * num_frames`` frames).
        device: where frames and tokens go (default: the model's parameters' device).
        pooling: ``"mean"`` or ``"mean_unnormalized"``.
        same_caption_positive: also the ``_same_caption`` metrics (identical caption text counts as correct).
        on_bad_sample: ``"skip"`` (count and leave out unreadable videos and their captions) or ``"raise"``.
        num_workers: DataLoader workers decoding videos.
        decode_threads: PyAV codec threads per video (0: FFmpeg's choice).
        text_batch_size: captions per text forward (distinct texts are encoded once).
        autocast: a context-manager factory around the image and text forwards (e.g. bf16).
        progress: tqdm bars.
        name: the split's name in bad-sample messages.

    Returns:
        ``{"metrics", "trivial_metrics", "bad_samples" (the loader's report plus ``captions_dropped``),
        "similarity" (N_vid', N_txt') over the good videos and their captions, "video_embeds", "text_embeds",
        "videos", "captions", "video_of_caption" (the kept ones, renumbered), "kept" (indices into ``videos``),
        "timing" {"decode_s", "model_s", "text_s"}}``.
    """
    require_dual_encoder(model, "zero-shot text-video retrieval")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if not videos:
        raise ValueError("no videos to evaluate")
    pairs = CaptionSet([Path(v) for v in videos], list(captions), np.asarray(video_of_caption, dtype=np.int64),
                       Path(name))
    if pairs.text_to_image.shape != (len(pairs.captions),) or not len(pairs.captions) or \
            pairs.text_to_image.min() < 0 or pairs.text_to_image.max() >= len(videos):
        raise ValueError(f"video_of_caption must be ({len(pairs.captions)},) indices in [0, {len(videos)})")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dataset = VideoFrames(pairs.image_paths, num_frames, build_transform(dict(model.preprocess), train=False),
                          decode_threads)
    loader = BatchEvalLoader(dataset, _collate, batch_size=batch_size, num_workers=num_workers,
                             on_bad_sample=on_bad_sample, name=name)
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(dataset), desc="videos", unit="video", disable=not progress) as bar:
            video_embeds, kept, decode_s, model_s = _encode_videos(model, loader, device, pooling, autocast,
                                                                   bar.update)  # N_good, D
        if len(kept) < len(pairs.image_paths):
            pairs = pairs.keep_images(kept)  # the good videos and their captions
        start = time.perf_counter()
        texts, text_id = np.unique(np.asarray(pairs.captions, dtype=str), return_inverse=True)
        with tqdm(total=len(texts), desc="captions", unit="txt", disable=not progress) as bar, autocast():
            text_embeds = encode_captions(model, texts.tolist(), text_batch_size, device, bar.update).float().numpy()
        text_embeds = text_embeds[text_id]  # N_txt, D
        text_s = time.perf_counter() - start
    finally:
        model.train(was_training)
    similarity = video_embeds @ text_embeds.T  # N_vid, N_txt
    report = loader.report()
    report["captions_dropped"] = len(captions) - len(pairs.captions)
    return {
        "metrics": video_text_metrics(similarity, pairs.text_to_image,
                                      captions=pairs.captions if same_caption_positive else None),
        "trivial_metrics": trivial_video_metrics(len(pairs.image_paths), len(pairs.captions),
                                                 same_caption=same_caption_positive),
        "bad_samples": report,
        "similarity": similarity, "video_embeds": video_embeds, "text_embeds": text_embeds,
        "videos": pairs.image_paths, "captions": pairs.captions, "video_of_caption": pairs.text_to_image,
        "kept": kept, "timing": {"decode_s": decode_s, "model_s": model_s, "text_s": text_s},
    }
