"""Video files: PyAV decoding, the frame count, a reader with a cache of decoded videos, and bad videos as counted
skips (the video data of :mod:`florence.data.video` and of text->video retrieval decode through here).

**Decoding** (:func:`decode_frames`, PyAV): frame ``i`` is the ``i``-th frame the decoder outputs from the start of
the first video stream (presentation order), as RGB uint8 ``(H, W, 3)``. Codec threads: ``stream.thread_type =
"AUTO"`` (frame + slice threads), ``threads`` per decoder (0: FFmpeg's choice). Only wanted frames are converted to
RGB, and decoding stops after the last wanted frame. For a long video whose wanted frames are a small part of it,
the decoder **seeks**: to the keyframe at or before the first wanted frame (by its pts), then decodes forward; a
run of wanted frames further than :data:`SEEK_MIN_GAP` frames from the previous one gets its own seek. Seeking is
used only where it provably gives the sequential frames: the stream's frame count matches its duration at its frame
rate (no gaps), every frame decoded after the seek lies on the ``start + i / fps`` pts grid with consecutive
indices, and decoding starts at a keyframe at or before the wanted frame (else it seeks further back, and in the
end decodes from the start). The number of frames is the stream's ``frames`` (the container's count), or, where the
container does not store it (Matroska / WebM), the number of non-empty packets.

**Bad videos** raise :class:`~florence.data.images.BadSample` (file, reason) and follow the bad-sample policy like
images: ``missing file``, ``empty file``, ``not a readable video`` (corrupt bytes, a truncated MP4 without its
index, a text file), ``no video stream`` (an audio-only file), ``unsupported video codec``, ``corrupt video`` (a
decoding error), ``truncated video`` (a wanted frame beyond the decodable ones).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator, Sequence

import av
import numpy as np

from florence.data.images import BadSample

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp", ".ogv",
                  ".ts")
SEEK_MIN_GAP = 48  # frames: seek rather than decode through at least this many unwanted frames
CACHE_MAX_BYTES = 256 << 20  # a video larger than this when decoded is never cached whole
_GRID_TOLERANCE = 0.25  # frames: how far off the 1/fps grid a pts may be (rounded time bases)
_FFMPEG_ERRORS = (av.error.FFmpegError, OSError, UnicodeDecodeError)


def _describe(err: Exception) -> str:
    """``"InvalidDataError: Invalid data found when processing input"`` (FFmpeg's text, without the file name)."""
    return f"{type(err).__name__}: {getattr(err, 'strerror', None) or err}"


# --- decoding (PyAV) ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoInfo:
    """The first video stream of a file: its frame count (module docstring), frame rate and frame size."""

    path: str
    num_frames: int
    fps: float
    width: int
    height: int


@contextmanager
def _open_video(path: str | Path, threads: int = 0) -> Iterator[tuple[Any, Any]]:
    """``(container, first video stream)`` of a readable file with a video stream, set up for threaded decoding;
    :class:`BadSample` otherwise."""
    name = str(path)
    try:
        size = os.stat(name).st_size
    except FileNotFoundError:
        raise BadSample(name, "missing file") from None
    except OSError as e:
        raise BadSample(name, f"unreadable file ({e.strerror or e})") from None
    if size == 0:
        raise BadSample(name, "empty file")
    try:
        container = av.open(name, metadata_errors="ignore")
    except _FFMPEG_ERRORS as e:
        raise BadSample(name, f"not a readable video ({_describe(e)})") from None
    try:
        if not container.streams.video:
            kinds = ", ".join(s.type for s in container.streams) or "none"
            raise BadSample(name, f"no video stream (streams: {kinds})")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise BadSample(name, "unsupported video codec (FFmpeg has no decoder for it)")
        stream.thread_type = "AUTO"
        stream.thread_count = int(threads)
        yield container, stream
    finally:
        container.close()


def _count_packets(container: Any, stream: Any, name: str) -> int:
    try:
        return sum(1 for packet in container.demux(stream) if packet.size)
    except _FFMPEG_ERRORS as e:
        raise BadSample(name, f"corrupt video ({_describe(e)})") from None


def video_info(path: str | Path) -> VideoInfo:
    """The :class:`VideoInfo` of a file's first video stream; :class:`BadSample` for a file that is missing, empty,
    unreadable, without a video stream or without frames."""
    with _open_video(path) as (container, stream):
        frames = int(stream.frames) or _count_packets(container, stream, str(path))
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        ctx = stream.codec_context
        if frames <= 0:
            raise BadSample(str(path), "no frames in the video stream")
        return VideoInfo(str(path), frames, float(rate) if rate else 0.0, int(ctx.width), int(ctx.height))


def _frame_grid(stream: Any) -> tuple[int, Fraction] | None:
    """``(start pts, pts per frame)`` of a constant-rate stream whose frame count matches its duration (no gaps:
    frame ``i`` is at ``start + i * step``), else None (seeking could not know a frame's index)."""
    rate, base, frames, duration = stream.average_rate, stream.time_base, stream.frames, stream.duration
    if not (rate and base and frames and duration) or stream.start_time is None:
        return None
    step = 1 / (Fraction(rate) * Fraction(base))
    return (int(stream.start_time), step) if round(Fraction(duration) / step) == frames else None


def _grid_index(frame: Any, grid: tuple[int, Fraction]) -> int | None:
    """The frame's index on the pts grid, or None when its pts is missing or off the grid."""
    if frame.pts is None:
        return None
    position = (frame.pts - grid[0]) / grid[1]
    index = round(position)
    return index if abs(position - index) <= _GRID_TOLERANCE else None


def _seek_runs(wanted: np.ndarray) -> list[np.ndarray]:
    """Sorted unique indices split where :data:`SEEK_MIN_GAP` or more unwanted frames lie between two wanted."""
    cuts = np.nonzero(np.diff(wanted) > SEEK_MIN_GAP)[0] + 1
    return np.split(wanted, cuts)


def _decode_run(frames: Iterator[Any], run: np.ndarray, grid: tuple[int, Fraction], out: dict[int, np.ndarray],
                expected: int | None) -> tuple[str, int | None]:
    """Decode forward through ``frames`` until the last frame of ``run``, storing the wanted ones in ``out``.
    ``expected``: the index of the next frame, or None right after a seek (decoding then starts at the first
    keyframe). Returns ``(status, index of the last frame decoded)``; status ``"ok"``, ``"overshoot"`` (the first
    keyframe is past ``run[0]``: seek further back) or ``"unsafe"`` (off-grid pts, a gap, or the end of the stream:
    decode sequentially instead)."""
    wanted, last = set(run.tolist()), int(run[-1])
    for frame in frames:
        index = _grid_index(frame, grid)
        if index is None:
            return "unsafe", None
        if expected is None:
            if not frame.key_frame:
                continue  # frames output before the keyframe (open GOP) may reference data before the seek point
            if index > run[0]:
                return "overshoot", None
            expected = index
        if index != expected:
            return "unsafe", None
        if index in wanted:
            out[index] = frame.to_ndarray(format="rgb24")
        if index >= last:
            return "ok", index
        expected += 1
    return "unsafe", None


def _keyframe_between(stream: Any, grid: tuple[int, Fraction], after: int, upto: int) -> bool:
    """Whether the demuxer's index has a keyframe after frame ``after`` and at or before frame ``upto`` (True when
    the container has no index to tell: a seek may help). Index timestamps may be decoding times (MP4 with
    B-frames), shifted from the pts by the first entry's offset."""
    entries = stream.index_entries
    if len(entries) <= 1:
        return True
    shift = max(0, grid[0] - entries[0].timestamp)  # pts - dts of the first frame
    low, high = grid[0] + after * grid[1], grid[0] + upto * grid[1]
    return any(low < entry.timestamp + shift <= high for entry in entries if entry.is_keyframe)


def _decode_seeking(container: Any, stream: Any, wanted: np.ndarray, grid: tuple[int, Fraction]
                    ) -> dict[int, np.ndarray] | None:
    """The wanted frames by seeking to each run (module docstring), or None where seeking is not safe. A run with
    no keyframe between the last decoded frame and its start is reached by decoding on instead."""
    out: dict[int, np.ndarray] = {}
    frames, position = None, None
    for run in _seek_runs(wanted):
        if position is not None and not _keyframe_between(stream, grid, position, int(run[0])):
            status, position = _decode_run(frames, run, grid, out, position + 1)
            if status != "ok":
                return None
            continue
        target, back = int(run[0]), 16
        while True:
            container.seek(int(grid[0] + target * grid[1]), stream=stream, backward=True, any_frame=False)
            frames = container.decode(stream)
            status, position = _decode_run(frames, run, grid, out, None)
            if status == "ok":
                break
            if status == "unsafe" or target == 0:
                return None
            target, back = max(0, target - back), back * 2
    return out


def _decode_sequential(container: Any, stream: Any, wanted: np.ndarray) -> tuple[dict[int, np.ndarray], int]:
    """``({index: frame}, frames decoded)``, decoding from the start until the last wanted frame."""
    out: dict[int, np.ndarray] = {}
    keep, last, count = set(wanted.tolist()), int(wanted[-1]), 0
    try:
        for frame in container.decode(stream):
            if count in keep:
                out[count] = frame.to_ndarray(format="rgb24")
            count += 1
            if count > last:
                break
    except _FFMPEG_ERRORS as e:
        raise BadSample(container.name, f"corrupt or truncated video (decoding failed after {count} frames: "
                                        f"{_describe(e)})") from None
    return out, count


def _stack(frames: Sequence[np.ndarray], name: str) -> np.ndarray:
    if len({f.shape for f in frames}) > 1:
        raise BadSample(name, f"frame size changes within the video ({frames[0].shape[:2]} to "
                              f"{next(f.shape[:2] for f in frames if f.shape != frames[0].shape)})")
    return np.stack(frames)  # N, H, W, 3


def decode_frames(path: str | Path, indices: Sequence[int], *, threads: int = 0, seek: bool | None = None
                  ) -> np.ndarray:
    """Frames ``indices`` of a video (module docstring) as ``(len(indices), H, W, 3)`` uint8 RGB, in the order of
    ``indices`` (repeats allowed).

    Args:
        threads: PyAV codec threads (0: FFmpeg's choice).
        seek: True: seek where the stream allows it; False: decode from the start; None: seek when it skips at
            least :data:`SEEK_MIN_GAP` frames.

    Raises :class:`BadSample` for an unreadable video or an index beyond its decodable frames.
    """
    name = str(path)
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if (indices < 0).any():
        raise ValueError(f"{name}: negative frame index in {indices.tolist()}")
    wanted = np.unique(indices)  # sorted
    with _open_video(path, threads) as (container, stream):
        if not len(wanted):
            ctx = stream.codec_context
            return np.zeros((0, int(ctx.height), int(ctx.width), 3), dtype=np.uint8)
        grid = _frame_grid(stream)
        skips = bool(wanted[0] >= SEEK_MIN_GAP or (np.diff(wanted) > SEEK_MIN_GAP).any())
        try:
            if grid is not None and (skips if seek is None else seek):
                frames, count = _decode_seeking(container, stream, wanted, grid), None  # None: not safe
            else:
                frames, count = _decode_sequential(container, stream, wanted)
        except _FFMPEG_ERRORS as e:
            raise BadSample(name, f"corrupt or truncated video ({_describe(e)})") from None
    if frames is None:  # seeking was not safe: decode again from the start
        return decode_frames(path, indices, threads=threads, seek=False)
    missing = [int(i) for i in wanted if int(i) not in frames]
    if missing:
        raise BadSample(name, f"truncated video (frame {missing[0]} wanted, {count} decodable)")
    return _stack([frames[int(i)] for i in indices], name)


def decode_all(path: str | Path, *, threads: int = 0) -> np.ndarray:
    """Every decodable frame of a video (those before a decoding error), ``(N, H, W, 3)`` uint8;
    :class:`BadSample` for an unreadable video or one without a decodable frame."""
    name = str(path)
    frames, error = [], None
    with _open_video(path, threads) as (container, stream):
        try:
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
        except _FFMPEG_ERRORS as e:  # keep the frames before the damage, as decode_frames would read them
            error = e
    if not frames:
        raise BadSample(name, f"corrupt or truncated video ({_describe(error)})" if error else "no decodable frames")
    return _stack(frames, name)


class VideoReader:
    """Decoding for a dataset: remembers each file's :class:`VideoInfo` and, with ``cache_videos > 0``, keeps the
    last ``cache_videos`` whole decoded videos (each at most :data:`CACHE_MAX_BYTES`) in an LRU cache. One per
    process: DataLoader workers each fill their own copy."""

    def __init__(self, *, threads: int = 0, cache_videos: int = 0):
        self.threads = int(threads)
        self.cache_videos = int(cache_videos)
        self._infos: dict[str, VideoInfo] = {}
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def info(self, path: str | Path) -> VideoInfo:
        key = str(path)
        if key not in self._infos:
            self._infos[key] = video_info(path)
        return self._infos[key]

    def frames(self, path: str | Path, indices: Sequence[int]) -> np.ndarray:
        """``(len(indices), H, W, 3)`` uint8 (as :func:`decode_frames`)."""
        key = str(path)
        if self.cache_videos <= 0:
            return decode_frames(path, indices, threads=self.threads)
        if key not in self._cache:
            info = self.info(path)
            if info.num_frames * info.width * info.height * 3 > CACHE_MAX_BYTES:
                return decode_frames(path, indices, threads=self.threads)
            self._cache[key] = decode_all(path, threads=self.threads)
            while len(self._cache) > self.cache_videos:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        whole = self._cache[key]
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and indices.max() >= len(whole):
            raise BadSample(key, f"truncated video (frame {int(indices.max())} wanted, {len(whole)} decodable)")
        return whole[indices]


__all__ = ["VIDEO_SUFFIXES", "VideoInfo", "video_info", "decode_frames", "decode_all", "VideoReader"]
