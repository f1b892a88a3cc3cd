"""Video data for action recognition: mmaction2 frame sampling, annotation lists, the endless
resumable training stream and the multi-view evaluation loader.

Decoding and bad videos: :mod:`florence.data.video_decode`.

**Sampling** (:func:`sample_clip_indices`): mmaction2 ``SampleFrames`` (``mmaction/datasets/transforms/loading.py``,
``keep_tail_frames=False``, ``twice_sample=False``, no temporal jitter). A clip spans ``clip_len`` frames
``frame_interval`` apart. Training draws one random offset per segment; testing spaces ``num_clips`` offsets evenly
over the video, deterministically. Frames past the end are looped (``loop``: index mod ``num_frames``, mmaction2's
default) or replaced by the clip's last valid frame (``repeat_last``). Loaders count the clips that needed it
(``looped``: :attr:`VideoTrainLoader.looped`, ``report()["looped"]`` of the evaluation loader) and log each such file
once at debug level.

**Annotations** (:func:`read_video_annotations` -> :class:`VideoList`), paths relative to ``videos``:

- no annotation file: folder-per-class ``videos/<class>/**/<file>`` (classes sorted by folder name, as torchvision's
  ``ImageFolder``; files with a video suffix, :data:`VIDEO_SUFFIXES`);
- ``path label`` lines (mmaction2's ``VideoDataset`` list; split at a tab if there is one, else at the last
  whitespace, so paths may contain spaces; blank lines and ``#`` comments skipped);
- CSV / TSV with a header, either ``path,label`` (``video`` accepted for ``path``) or Kinetics'
  ``label,youtube_id,time_start,time_end[,split,...]``: file ``{youtube_id}_{time_start:06d}_{time_end:06d}`` with a
  video suffix (``.mp4`` first), looked up in ``videos/<label>/``, ``videos/<label with _ for spaces>/``, then
  ``videos/``;
- a label is a class index or a class name. ``classes`` (a file with one name per line, in index order, or a list)
  fixes the names; without it, class names found in the labels are sorted (mmaction2's Kinetics lists), and pure
  integer labels have no names. A name not in ``classes`` (or an index outside it) is a one-line
  :class:`~florence.data.errors.DataFileError` naming the file and line.

Entries whose video file is missing are dropped and counted by reason with the first examples
(:meth:`VideoList.format`), never silently.

**Training stream** (:func:`build_video_train_loader`; the ``data:`` section of an ``action`` run)::

    sources:                       # concatenated (each clip once per epoch); one label space for all
      - annotations: train.txt     # path label lines, a .csv / .tsv, or null for videos/<class>/<file>
        videos: videos/train/
        classes: classes.txt       # optional: class names in index order (file or list)
        name: kinetics_train       # in logs (default: the annotation file's stem)
    batch_size: 8                  # per rank (the engine sets it)
    seed: 0
    num_workers: 2
    samples_per_epoch: null        # default: all clips
    clip_len: null                 # default: preprocess["clip_len"] (= input_size[1])
    frame_interval: null           # default: preprocess["frame_interval"] (1)
    out_of_bound: loop             # loop | repeat_last
    augment: {scale: [0.08, 1.0], ratio: [0.75, 1.333], hflip: 0.5, rand_augment: null}
    decode_threads: 0              # PyAV codec threads per decoder (0: FFmpeg's choice; 1 with many workers)
    cache_videos: 0                # > 0: LRU of that many whole decoded short videos per worker process
    on_bad_sample: skip            # skip | raise
    max_bad_retries: 16
    pin_memory: false
    prefetch_factor: null
    run_dir: null

It is the florence training stream (:mod:`florence.data.mixing`): endless, seeded, split over ranks; every random
draw of a clip (offset, crop, flip, RandAugment) comes from ``np.random.default_rng([sample seed, attempt])`` of
its stream position, so ``state_dict`` / ``load_state_dict`` continue with exactly the next batch. A bad video is
replaced by the next one of its source (as images are).

**Batches**: training ``{"videos": (B, 3, T, S, S) float32, "labels": (B,) int64}``; evaluation
(:func:`video_eval_loader`) ``{"videos": (B, V, 3, T, S, S), "labels": (B,), "index": (B,) int64}`` with
``V = num_clips * num_crops`` views in clip-major order and ``index`` the video's position in its :class:`VideoList`.
"""
from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from florence.data.bad_samples import BadSampleLog
from florence.data.errors import DataConfigError, DataFileError, DataNotFound
from florence.data.eval_loader import BatchEvalLoader
from florence.data.loader import RetryingDataset, TrainLoader, stream_bad_log
from florence.data.schema import STREAM_SCHEMA, Check, _augment, _check_keys, _choice, _int, _number, _optional, \
    _path, _range_pair, _randaugment, _text
from florence.data.video_decode import VIDEO_SUFFIXES, VideoReader
from florence.data.video_transforms import VideoTestTransform, clip_size, video_test_transform, video_train_transform

logger = logging.getLogger("florence.data")

TABLE_SUFFIXES = (".csv", ".tsv")
OUT_OF_BOUND = ("loop", "repeat_last")
MAX_EXAMPLES = 20  # listed examples per skip reason (all are counted)


# --- sampling (mmaction2 SampleFrames) -----------------------------------------------------------------------------


def _clip_offsets(num_frames: int, clip_len: int, frame_interval: int, num_clips: int, test_mode: bool,
                  rng: np.random.Generator | None) -> np.ndarray:
    """mmaction2 ``SampleFrames._get_test_clips`` / ``_get_train_clips`` (``keep_tail_frames=False``)."""
    if test_mode:
        span = (clip_len - 1) * frame_interval + 1
        max_offset = max(num_frames - span, 0)
        if num_clips == 1:
            return np.array([max_offset // 2])
        return np.round(np.arange(num_clips) * (max_offset / (num_clips - 1))).astype(np.int64)
    if rng is None:
        raise ValueError("training clip sampling needs an rng")
    span = clip_len * frame_interval
    avg_interval = (num_frames - span + 1) // num_clips
    if avg_interval > 0:
        return np.arange(num_clips) * avg_interval + rng.integers(avg_interval, size=num_clips)
    if num_frames > max(num_clips, span):
        return np.sort(rng.integers(num_frames - span + 1, size=num_clips))
    if avg_interval == 0:
        return np.around(np.arange(num_clips) * ((num_frames - span + 1.0) / num_clips)).astype(np.int64)
    return np.zeros(num_clips, dtype=np.int64)


def raw_clip_indices(num_frames: int, clip_len: int, frame_interval: int, num_clips: int, *, test_mode: bool,
                     rng: np.random.Generator | None = None) -> np.ndarray:
    """``(num_clips, clip_len)`` frame indices before the out-of-bound rule (they may reach past the end)."""
    if num_frames <= 0 or clip_len <= 0 or frame_interval <= 0 or num_clips <= 0:
        raise ValueError(f"sampling needs positive sizes, got num_frames={num_frames}, clip_len={clip_len}, "
                         f"frame_interval={frame_interval}, num_clips={num_clips}")
    offsets = _clip_offsets(num_frames, clip_len, frame_interval, num_clips, test_mode, rng)
    return offsets.astype(np.int64)[:, None] + np.arange(clip_len, dtype=np.int64)[None, :] * frame_interval


def bound_indices(indices: np.ndarray, num_frames: int, out_of_bound: str = "loop") -> np.ndarray:
    """mmaction2's out-of-bound rule on ``(num_clips, clip_len)`` indices: ``loop`` (mod ``num_frames``) or
    ``repeat_last`` (each clip's largest valid index; 0 when none is)."""
    if out_of_bound == "loop":
        return np.mod(indices, num_frames)
    if out_of_bound == "repeat_last":
        safe = indices < num_frames
        last = np.max(np.where(safe, indices, 0), axis=1, keepdims=True)  # num_clips, 1
        return np.where(safe, indices, last)
    raise ValueError(f"out_of_bound must be one of {', '.join(OUT_OF_BOUND)}, got {out_of_bound!r}")


def sample_clip_indices(num_frames: int, clip_len: int, frame_interval: int, num_clips: int, *, test_mode: bool,
                        rng: np.random.Generator | None = None, out_of_bound: str = "loop") -> np.ndarray:
    """``(num_clips, clip_len)`` int64 frame indices in ``[0, num_frames)``, mmaction2 ``SampleFrames``
    (module docstring); ``rng`` draws the training offsets (unused in test mode)."""
    raw = raw_clip_indices(num_frames, clip_len, frame_interval, num_clips, test_mode=test_mode, rng=rng)
    return bound_indices(raw, num_frames, out_of_bound)


# --- annotations --------------------------------------------------------------------------------------------------


@dataclass
class VideoList:
    """The videos of one split. ``paths[i]`` has label ``labels[i]``; ``class_names`` (index order) or None;
    ``skipped``: count per reason of the dropped entries, ``examples``: ``{"file", "reason"}`` of the first
    :data:`MAX_EXAMPLES` per reason; ``entries``: entries read (kept and dropped); ``source``: the annotation file
    or videos folder."""

    paths: list[Path]
    labels: np.ndarray
    class_names: list[str] | None
    name: str
    source: str
    entries: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        """Classes of the label space: the class names, else the largest label + 1."""
        if self.class_names is not None:
            return len(self.class_names)
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def format(self) -> str:
        """One line: ``train.txt: 98 of 100 videos, 8 classes [missing video file: 2]``."""
        notes = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items(), key=lambda kv: -kv[1]))
        return (f"{self.source}: {len(self)} of {self.entries} videos, {self.num_classes} classes"
                + (f" [{notes}]" if notes else ""))


def read_class_names(classes: str | Path | Sequence[str]) -> list[str]:
    """Class names in index order: a list, or a text file with one name per line (blank lines skipped)."""
    if isinstance(classes, (str, os.PathLike)):
        path = Path(classes)
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except FileNotFoundError:
            raise DataNotFound(f"{path}: class-name file not found") from None
        except (UnicodeDecodeError, IsADirectoryError):
            raise DataFileError(f"{path}: not a UTF-8 text file of class names") from None
        names, where = [n for n in names if n], str(path)
    else:
        names, where = [str(n).strip() for n in classes], "classes"
    if not names or not all(names):
        raise DataFileError(f"{where}: expected a non-empty list of class names")
    dup = next((n for n, c in Counter(names).items() if c > 1), None)
    if dup is not None:
        raise DataFileError(f"{where}: class name {dup!r} appears twice")
    return names


class _Skips:
    """Counts of dropped entries by reason, with the first examples."""

    def __init__(self):
        self.counts: Counter[str] = Counter()
        self.examples: list[dict[str, str]] = []

    def note(self, reason: str, file: str) -> None:
        self.counts[reason] += 1
        if self.counts[reason] <= MAX_EXAMPLES:
            self.examples.append({"file": file, "reason": reason})


class _Folders:
    """Names in folders, listed once each (fast lookups of many candidate files)."""

    def __init__(self):
        self._listing: dict[Path, set[str]] = {}

    def has(self, path: Path) -> bool:
        folder = path.parent
        if folder not in self._listing:
            self._listing[folder] = set(os.listdir(folder)) if folder.is_dir() else set()
        return path.name in self._listing[folder]


@dataclass
class _Entry:
    path: Path
    label: str
    line: int


def _is_int(text: str) -> bool:
    return text.strip().lstrip("-").isdigit()


def _read_lines(file: Path) -> list[_Entry]:
    entries = []
    for number, line in enumerate(_read_text(file).splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit("\t", 1) if "\t" in line else line.rsplit(None, 1)
        if len(parts) != 2 or not parts[0].strip():
            raise DataFileError(f"{file}: line {number}: expected 'path label', got {line!r}")
        entries.append(_Entry(Path(parts[0].strip()), parts[1].strip(), number))
    return entries


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataNotFound(f"{file}: annotation file not found") from None
    except IsADirectoryError:
        raise DataFileError(f"{file}: is a folder, expected an annotation file") from None
    except UnicodeDecodeError:
        raise DataFileError(f"{file}: not UTF-8 text") from None


KINETICS_HEADER = ["label", "youtube_id", "time_start", "time_end"]


def _read_table(file: Path, videos: Path, folders: _Folders) -> list[_Entry]:
    text = _read_text(file)
    rows = list(csv.reader(text.splitlines(), delimiter="\t" if file.suffix.lower() == ".tsv" else ","))
    header = [h.strip().lower() for h in rows[0]] if rows else []
    kinetics = header[:4] == KINETICS_HEADER
    if not kinetics and (len(header) < 2 or header[0] not in ("path", "video") or header[1] != "label"):
        raise DataFileError(f"{file}: line 1: expected the header path,label or "
                            f"label,youtube_id,time_start,time_end[,split], got {','.join(header)!r}")
    entries = []
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < (4 if kinetics else 2) or len(row) > len(header):
            raise DataFileError(f"{file}: line {number}: {len(row)} fields, the header has {len(header)}")
        if not kinetics:
            entries.append(_Entry(Path(row[0].strip()), row[1].strip(), number))
            continue
        label, youtube_id = row[0].strip(), row[1].strip()
        try:
            start, end = int(float(row[2])), int(float(row[3]))
        except ValueError:
            raise DataFileError(f"{file}: line {number}: time_start / time_end: expected integers, got "
                                f"{row[2]!r}, {row[3]!r}") from None
        entries.append(_Entry(_kinetics_file(videos, label, f"{youtube_id}_{start:06d}_{end:06d}", folders),
                              label, number))
    return entries


def _kinetics_file(videos: Path, label: str, stem: str, folders: _Folders) -> Path:
    """The first existing candidate (relative to ``videos``), else the first candidate."""
    candidates = [Path(d) / (stem + s) for d in (label, label.replace(" ", "_"), ".") for s in VIDEO_SUFFIXES]
    return next((c for c in candidates if folders.has(videos / c)), candidates[0])


def _read_folders(videos: Path, class_names: list[str] | None, skips: _Skips) -> tuple[list[_Entry], list[str]]:
    """``videos/<class>/**/<video>`` entries (label = folder name) and the class names."""
    folders = sorted(p for p in videos.iterdir() if p.is_dir())
    for item in sorted(p for p in videos.iterdir() if not p.is_dir()):
        skips.note("file outside a class folder", str(item))
    names = class_names if class_names is not None else [f.name for f in folders]
    known = set(names)
    entries = []
    for folder in folders:
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        if folder.name not in known:
            for file in files:
                skips.note("class folder not in the class list", str(file))
            continue
        for file in files:
            if file.suffix.lower() in VIDEO_SUFFIXES:
                entries.append(_Entry(file.relative_to(videos), folder.name, 0))
            else:
                skips.note("not a video file name", str(file))
    return entries, names


def _resolve_labels(entries: list[_Entry], class_names: list[str] | None, file: str
                    ) -> tuple[np.ndarray, list[str] | None]:
    """Label tokens -> ``(labels (N,) int64, class names)`` (module docstring)."""
    tokens = [e.label for e in entries]
    if class_names is None:
        if all(_is_int(t) for t in tokens):
            labels = np.array([int(t) for t in tokens], dtype=np.int64)
            bad = next((e for e, v in zip(entries, labels) if v < 0), None)
            if bad is not None:
                raise DataFileError(f"{file}: line {bad.line}: negative label {bad.label!r}")
            return labels, None
        class_names = sorted(set(tokens))
    index = {n: i for i, n in enumerate(class_names)}
    labels = np.empty(len(entries), dtype=np.int64)
    for i, entry in enumerate(entries):
        if entry.label in index:
            labels[i] = index[entry.label]
        elif _is_int(entry.label) and 0 <= int(entry.label) < len(class_names):
            labels[i] = int(entry.label)
        else:
            where = f"line {entry.line}" if entry.line else str(entry.path)
            raise DataFileError(f"{file}: {where}: unknown class {entry.label!r} (not one of the "
                                f"{len(class_names)} class names)")
    return labels, class_names


def read_video_annotations(annotations: str | Path | None, videos: str | Path, *,
                           classes: str | Path | Sequence[str] | None = None, name: str | None = None) -> VideoList:
    """The videos of a split (module docstring): an annotation file (``path label`` lines, or a ``.csv`` / ``.tsv``
    table), or ``None`` for the folder-per-class layout of ``videos``; ``classes``: class names (file or list).
    Entries whose video is missing are counted and dropped; none left is a :class:`DataFileError`."""
    videos = Path(videos)
    if not videos.is_dir():
        raise DataNotFound(f"{videos}: videos folder not found")
    class_names = read_class_names(classes) if classes is not None else None
    skips, folders = _Skips(), _Folders()
    if annotations is None:
        source = str(videos)
        entries, class_names = _read_folders(videos, class_names, skips)
    else:
        file = Path(annotations)
        source = str(file)
        entries = (_read_table(file, videos, folders) if file.suffix.lower() in TABLE_SUFFIXES
                   else _read_lines(file))
    if not entries:
        first = f" ({skips.examples[0]['reason']}: {skips.examples[0]['file']})" if skips.examples else ""
        raise DataFileError(f"{source}: no videos listed{first}")
    labels, class_names = _resolve_labels(entries, class_names, source)
    dropped = sum(skips.counts.values())  # before reading the entries (folder layout)
    keep = []
    for i, entry in enumerate(entries):
        path = videos / entry.path
        if folders.has(path) or path.is_file():
            keep.append(i)
        else:
            skips.note("missing video file", str(path))
    result = VideoList(paths=[videos / entries[i].path for i in keep], labels=labels[keep], class_names=class_names,
                       name=name or (Path(annotations).stem if annotations is not None else videos.name),
                       source=source, entries=len(entries) + dropped, skipped=dict(skips.counts),
                       examples=skips.examples)
    if not len(result):
        raise DataFileError(f"{source}: none of the {result.entries} listed videos exists (first missing: "
                            f"{skips.examples[0]['file']})")
    if result.skipped:
        logger.warning("%s", result.format())
    return result


# --- datasets and loaders -----------------------------------------------------------------------------------------


def clip_settings(preprocess: dict[str, Any], clip_len: int | None = None, frame_interval: int | None = None
                  ) -> tuple[int, int]:
    """``(clip_len, frame_interval)``: the given values, else the preprocess dict's (``clip_len`` defaulting to
    ``input_size[1]``, ``frame_interval`` to 1)."""
    frames, _, _ = clip_size(preprocess)
    clip_len = int(clip_len if clip_len is not None else preprocess.get("clip_len", frames))
    frame_interval = int(frame_interval if frame_interval is not None else preprocess.get("frame_interval", 1))
    return clip_len, frame_interval


class _ClipSampler:
    """Reads the sampled frames of one video: ``(frames (num_clips * clip_len, H, W, 3), looped)``."""

    def __init__(self, reader: VideoReader, clip_len: int, frame_interval: int, num_clips: int, test_mode: bool,
                 out_of_bound: str = "loop"):
        if out_of_bound not in OUT_OF_BOUND:
            raise ValueError(f"out_of_bound must be one of {', '.join(OUT_OF_BOUND)}, got {out_of_bound!r}")
        self.reader = reader
        self.clip_len, self.frame_interval, self.num_clips = int(clip_len), int(frame_interval), int(num_clips)
        self.test_mode = test_mode
        self.out_of_bound = out_of_bound
        self._logged: set[str] = set()

    def __call__(self, path: Path, rng: np.random.Generator | None = None) -> tuple[np.ndarray, bool]:
        num_frames = self.reader.info(path).num_frames
        raw = raw_clip_indices(num_frames, self.clip_len, self.frame_interval, self.num_clips,
                               test_mode=self.test_mode, rng=rng)  # num_clips, clip_len
        looped = bool((raw >= num_frames).any())
        if looped and str(path) not in self._logged:
            self._logged.add(str(path))
            logger.debug("%s: %d frames, shorter than a clip of %d frames %d apart: %s", path, num_frames,
                         self.clip_len, self.frame_interval, self.out_of_bound)
        indices = bound_indices(raw, num_frames, self.out_of_bound)
        return self.reader.frames(path, indices.reshape(-1)), looped


def collate_clips(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """``[{"video", "label", "looped"[, "index"]}] * B`` -> ``{"videos" (B, ...), "labels" (B,) int64, "looped"
    (B,) bool[, "index" (B,) int64]}``."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    batch = {"videos": torch.stack([s["video"] for s in samples]),
             "labels": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
             "looped": torch.tensor([s["looped"] for s in samples], dtype=torch.bool)}
    if "index" in samples[0]:
        batch["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.int64)
    return batch


class VideoTrainDataset(RetryingDataset):
    """The training stream's clips; all of a clip's random draws come from ``np.random.default_rng([seed,
    attempt])``; a bad video is replaced by the next one of its source (:class:`~florence.data.loader.RetryingDataset`).
    """

    def __init__(self, sources: Sequence[VideoList], sampler: _ClipSampler, transform, bad: BadSampleLog, *,
                 max_bad_retries: int = 16):
        super().__init__(sources, bad, max_bad_retries=max_bad_retries)
        self.sampler = sampler
        self.transform = transform

    def load(self, source_id: int, index: int, seed: int, attempt: int) -> dict[str, Any]:
        source, rng = self.sources[source_id], np.random.default_rng([seed, attempt])
        frames, looped = self.sampler(source.paths[index], rng)
        return {"video": self.transform(frames, rng), "label": int(source.labels[index]), "looped": looped}


class VideoTrainLoader(TrainLoader):
    """:class:`~florence.data.loader.TrainLoader` of clips: endless, resumable (``state_dict`` /
    ``load_state_dict``), ``bad_sample_summary()``; ``looped``: clips delivered that were shorter than the sample
    (looped or padded, this process); ``class_names``, ``num_classes``, ``annotation_summary()``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.looped = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in super().__iter__():
            self.looped += int(batch.pop("looped").sum())
            yield batch

    @property
    def sources(self) -> list[VideoList]:
        return self.dataset.sources

    @property
    def class_names(self) -> list[str] | None:
        return next((s.class_names for s in self.sources if s.class_names is not None), None)

    @property
    def num_classes(self) -> int:
        return max(s.num_classes for s in self.sources)

    def annotation_summary(self) -> list[str]:
        return [s.format() for s in self.sources]


def _check_label_space(lists: Sequence[VideoList]) -> None:
    named = [v for v in lists if v.class_names is not None]
    for other in named[1:]:
        if other.class_names != named[0].class_names:
            raise DataConfigError(f"data.sources: {other.source} and {named[0].source} have different class names "
                                  "(give the same classes file to every source)")
    if named:
        too_big = next((v for v in lists if v.class_names is None and v.num_classes > len(named[0].class_names)),
                       None)
        if too_big is not None:
            raise DataConfigError(f"data.sources: {too_big.source} has label {too_big.num_classes - 1}, beyond the "
                                  f"{len(named[0].class_names)} classes of {named[0].source}")


def training_lists(config: dict[str, Any]) -> list[VideoList]:
    """The annotations of a ``data:`` section's ``sources``, read once (the task's class names, then the loader)."""
    return [read_video_annotations(s.get("annotations"), s["videos"], classes=s.get("classes"), name=s.get("name"))
            for s in config["sources"]]


def build_video_train_loader(config: dict[str, Any], *, preprocess: dict[str, Any], rank: int = 0,
                             world_size: int = 1, run_dir: str | Path | None = None,
                             lists: Sequence[VideoList] | None = None) -> VideoTrainLoader:
    """The training stream of rank ``rank`` of ``world_size`` from a video ``data:`` section (module docstring),
    validated first; ``preprocess``: the model's video preprocess dict (size, mean / std, clip length); ``lists``:
    ``training_lists(config)`` when the caller has read them already."""
    validate_video_data(config)
    if "batch_size" not in config:
        raise DataConfigError("data.batch_size: required (per rank)")
    lists = list(lists) if lists is not None else training_lists(config)
    _check_label_space(lists)
    clip_len, frame_interval = clip_settings(preprocess, config.get("clip_len"), config.get("frame_interval"))
    reader = VideoReader(threads=config.get("decode_threads", 0), cache_videos=config.get("cache_videos", 0))
    sampler = _ClipSampler(reader, clip_len, frame_interval, 1, False, config.get("out_of_bound", "loop"))
    dataset = VideoTrainDataset(lists, sampler, video_train_transform(preprocess, augment=config.get("augment")),
                                stream_bad_log(config, rank=rank, run_dir=run_dir),
                                max_bad_retries=config.get("max_bad_retries", 16))
    return VideoTrainLoader.for_dataset(dataset, [len(v) for v in lists], config, collate_fn=collate_clips, rank=rank,
                                        world_size=world_size)  # weights = sizes: plain concatenation


class _EvalVideos(Dataset):
    """``dataset[i]`` -> ``{"video" (V, 3, T, S, S), "label", "index", "looped"}``; raises :class:`BadSample`."""

    def __init__(self, videos: VideoList, sampler: _ClipSampler, transform: VideoTestTransform):
        self.videos = videos
        self.paths = videos.paths  # names samples in messages
        self.sampler = sampler
        self.transform = transform

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> dict[str, Any]:
        frames, looped = self.sampler(self.videos.paths[i])  # num_clips * T, H, W, 3; BadSample: skipped
        clips = frames.reshape(self.sampler.num_clips, self.sampler.clip_len, *frames.shape[1:])
        views = torch.cat([self.transform(clip) for clip in clips])  # num_clips * num_crops, 3, T, S, S (clip-major)
        return {"video": views, "label": int(self.videos.labels[i]), "index": i, "looped": looped}


class VideoEvalLoader(BatchEvalLoader):
    """:class:`~florence.data.eval_loader.BatchEvalLoader` of multi-view clips; ``report()`` adds ``looped`` (videos
    shorter than a clip, looped or padded) and ``annotations`` (entries the :class:`VideoList` dropped)."""

    def __init__(self, dataset: _EvalVideos, **kwargs):
        super().__init__(dataset, collate_clips, **kwargs)
        self.looped = 0

    @staticmethod
    def batch_length(batch: Any) -> int:
        return len(batch["videos"])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.looped = 0
        for batch in super().__iter__():
            self.looped += int(batch.pop("looped").sum())
            yield batch

    def report(self) -> dict[str, Any]:
        videos = self.dataset.dataset.videos if isinstance(self.dataset, Subset) else self.dataset.videos
        return {**super().report(), "looped": self.looped,
                "annotations": {"skipped": dict(videos.skipped), "examples": list(videos.examples)}}


def video_eval_loader(videos: VideoList, *, preprocess: dict[str, Any], num_clips: int = 4, num_crops: int = 3,
                      batch_size: int = 4, num_workers: int = 0, on_bad_sample: str = "skip", decode_threads: int = 0,
                      max_videos: int | None = None) -> VideoEvalLoader:
    """Deterministic multi-view batches (module docstring) of the first ``max_videos`` (all) of ``videos``:
    ``num_clips`` evenly spaced clips (mmaction2 test sampling, ``preprocess`` clip length and interval) times
    ``num_crops`` spatial crops (1 centre, 3 ThreeCrop); bad videos are left out and listed by ``report()``."""
    clip_len, frame_interval = clip_settings(preprocess)
    sampler = _ClipSampler(VideoReader(threads=decode_threads), clip_len, frame_interval, num_clips, True)
    dataset: Dataset = _EvalVideos(videos, sampler, video_test_transform(preprocess, num_crops))
    if max_videos is not None:
        dataset = Subset(dataset, range(min(int(max_videos), len(videos))))
    return VideoEvalLoader(dataset, batch_size=batch_size, num_workers=num_workers, on_bad_sample=on_bad_sample,
                           name=videos.name)


# --- config schema ------------------------------------------------------------------------------------------------


def _sources(v: Any) -> str | None:
    return None if isinstance(v, (list, tuple)) and v and all(isinstance(s, dict) for s in v) else \
        "expected a non-empty list of sources (mappings with annotations, videos, classes)"


def _classes(v: Any) -> str | None:
    if _path(v) is None or (isinstance(v, (list, tuple)) and v and all(_text(n) is None for n in v)):
        return None
    return "expected a class-name file or a non-empty list of class names"


VIDEO_SOURCE_SCHEMA: dict[str, Check] = {
    "annotations": _optional(_path),
    "videos": _path,
    "classes": _classes,
    "name": _text,
}
VIDEO_AUGMENT_SCHEMA: dict[str, Check] = {
    "scale": _range_pair(0.0, 1.0),
    "ratio": _range_pair(0.0, None),
    "hflip": _number(0.0, 1.0),
    "rand_augment": _randaugment,
}
VIDEO_DATA_SCHEMA: dict[str, Check] = {
    **STREAM_SCHEMA,
    "sources": _sources,
    "samples_per_epoch": _optional(_int(1)),
    "clip_len": _optional(_int(1)),
    "frame_interval": _optional(_int(1)),
    "out_of_bound": _choice(*OUT_OF_BOUND),
    "augment": _augment,
    "decode_threads": _int(0),
    "cache_videos": _int(0),
}


def validate_video_data(data: Any, key: str = "data") -> None:
    """Check a video ``data:`` section (module docstring) without reading any data; raises
    :class:`~florence.data.errors.DataConfigError` whose message starts with the dotted key
    (``data.sources[0].videos: required``). ``batch_size`` is optional here."""
    if not isinstance(data, dict):
        raise DataConfigError(f"{key}: expected a mapping, got {data!r}")
    _check_keys(data, VIDEO_DATA_SCHEMA, key)
    if "sources" not in data:
        raise DataConfigError(f"{key}.sources: required (a list of video annotation / folder sources)")
    for i, source in enumerate(data["sources"]):
        where = f"{key}.sources[{i}]"
        _check_keys(source, VIDEO_SOURCE_SCHEMA, where)
        if "videos" not in source:
            raise DataConfigError(f"{where}.videos: required (the folder the video paths are relative to)")
    _check_keys(data.get("augment") or {}, VIDEO_AUGMENT_SCHEMA, f"{key}.augment")


__all__ = ["sample_clip_indices", "raw_clip_indices", "bound_indices", "VideoList", "read_class_names",
           "read_video_annotations", "training_lists", "VideoTrainDataset", "VideoTrainLoader",
           "build_video_train_loader", "VideoEvalLoader", "video_eval_loader", "validate_video_data", "collate_clips",
           "clip_settings"]
