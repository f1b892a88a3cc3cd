"""Moving Fashion-MNIST actions: short MP4 clips of a real Fashion-MNIST item that moves, rotates or changes size.

``generate(out_dir, split, num_videos, seed)`` writes, in the layout mmaction2 reads (``VideoDataset``):

- ``out_dir/<split>/<id:06d>.mp4``: ``frames`` frames of ``size`` x ``size`` RGB, encoded with PyAV (libx264,
  yuv420p, CRF ``crf``, one encoder thread; mpeg4 at 1 Mbit/s where FFmpeg lacks libx264; the codec used is in the
  manifest), ``fps`` frames per second; video ids 1..N;
- ``out_dir/<split>.txt``: one ``<id:06d>.mp4 <label>`` line per video (paths relative to ``out_dir/<split>``);
- ``out_dir/classes.txt``: the 8 action names in label order (:data:`ACTIONS`);
- ``out_dir/captions_<split>.csv``: ``video,caption`` for text-to-video retrieval, the caption naming the clip's items
  ("a video of a Sandal", "a video of a Sandal and a Bag"; the moving item first). The names are Fashion-MNIST's
  class names as :data:`florence.data.sources.FASHION_MNIST_CLASSES` spells them, which is how the demo's UniCL
  tower saw them in its prompts ("a photo of a Sandal."), so its from-scratch tokenizer knows them;
- ``out_dir/layout_<split>.json``: per video its action, items (Fashion-MNIST index and class, colour, role) and the
  moving item's motion as played (first/last centre, angle in degrees, side of its 28x28 square in pixels);
- ``out_dir/manifest_<split>.json``: parameters, Fashion-MNIST source hashes, file hashes, label counts, codec.

The ``train`` split uses items of Fashion-MNIST's train set, ``test`` items of its test set. CLI::

    python -m florence.benchmarks.moving_fmnist --out DIR --train 4000 --test 800

A clip (all draws from ``numpy.random.default_rng([seed, split, video id])``, so clip ``i`` does not depend on how
many are generated; the label of video ``i`` is ``(i - 1) % 8``, so every class has the same count up to one):

- a static textured background (:func:`florence.benchmarks.detection_canvas.background`) and, per frame, pixel noise
  (std ``noise``);
- the *actor*: one random item of the split, blended in a flat bright colour as in the detection canvases (its grey
  intensity is its alpha), rendered per frame by an affine map (rotation about and scaling around the centre of its
  28x28 square) with bilinear sampling and 2x2 supersampling, so sub-pixel motion is smooth. Motions (pixel amounts
  at 64 px, scaled with ``size``), linear in time (size: geometric):

  - move: side 20..28, a straight horizontal / vertical path of 12..24 px, the square inside the frame throughout;
  - rotate: side 20..28, 60..120 degrees about the square's centre, starting tilted by -half the turn +-15 degrees
    (so the item is upright on average), the square's corners inside the frame at every angle;
  - resize: side 14..18 growing by a factor 1.6..2.2, the final square inside the frame;

- with ``items`` = (1, 2), half the clips (a draw) get a second, *static* item of another class (side 16..22, upright),
  placed (20 tries) where it overlaps the actor's swept area least (stopping at <= 10% of its pixels) and drawn
  beneath the actor. All motion in a clip is the actor's, so the label is unambiguous.

No single frame tells a class from its pair: each pair (left/right, up/down, clockwise/anticlockwise, grow/shrink)
draws the same quantities in the same order from the clip's generator, renders the first class of the pair (even
label: ``move_left``, ``move_up``, ``rotate_clockwise``, ``grow``), and the second class plays those frames backwards.
The multiset of frames of a clip (and so the distribution of any per-frame statistic) is therefore the same for both
classes of a pair; only the order differs. (Which frame comes *first* does depend on the class, e.g. a ``move_left``
clip starts further right; a model without the frame order, such as the per-frame 2D tower with averaged features,
cannot use that.) Clockwise is as seen on screen (image y axis pointing down).

Idempotent: a split whose manifest records the same parameters and Fashion-MNIST source files (SHA-256) and whose
files still hash to the recorded values is left as is. With the same FFmpeg build the MP4 bytes are deterministic
(one encoder thread), so ``videos_sha256`` hashes the files' bytes.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import av
import numpy as np

from florence.benchmarks.detection_canvas import (ALPHA_THRESHOLD, SPLITS, CanvasError, background, composite,
                                                  images_hash, item_alpha, item_colour, source_files, write_json)
from florence.bundle import sha256_file
from florence.data.errors import DataNotFound
from florence.data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, FashionMNISTSource
from florence.errors import FlorenceError

GENERATOR_VERSION = 1
# Label order. Even labels are rendered, the odd label after each plays the same frames backwards.
ACTIONS: tuple[str, ...] = ("move_left", "move_right", "move_up", "move_down", "rotate_clockwise",
                            "rotate_anticlockwise", "grow", "shrink")
CAPTION_NAMES = FASHION_MNIST_CLASSES  # the item names in captions, index = Fashion-MNIST label
ITEM = 28  # Fashion-MNIST item side
SUPERSAMPLE = 2  # sub-pixel samples per axis when rendering the actor
# Motion amounts in pixels at REFERENCE px, scaled with the frame size.
REFERENCE = 64
MOVE_SIDE, MOVE_DISTANCE = (20.0, 28.0), (12.0, 24.0)
ROTATE_SIDE, ROTATE_DEGREES, ROTATE_JITTER = (20.0, 28.0), (60.0, 120.0), 15.0
GROW_SIDE, GROW_FACTOR = (14.0, 18.0), (1.6, 2.2)
STATIC_SIDE = (16.0, 22.0)
STATIC_TRIES, STATIC_OVERLAP = 20, 0.1  # placement tries of the static item; good enough overlap (its pixel share)
MPEG4_BIT_RATE = 1_000_000


@dataclass(frozen=True)
class Motion:
    """The actor's path, forward (as the even label of a pair renders it): centre (x, y) in pixels (pixel-edge
    coordinates, the frame spans 0..size), angle in degrees (positive = clockwise on screen), side of the item's
    28x28 square in pixels; centre and angle are linear in time, the side geometric."""

    centre0: tuple[float, float]
    centre1: tuple[float, float]
    angle0: float
    angle1: float
    side0: float
    side1: float

    def at(self, frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-frame centres (T, 2), angles (T,) in degrees and sides (T,)."""
        p = np.linspace(0.0, 1.0, frames)
        centres = (1 - p)[:, None] * np.asarray(self.centre0) + p[:, None] * np.asarray(self.centre1)
        angles = (1 - p) * self.angle0 + p * self.angle1
        sides = self.side0 * (self.side1 / self.side0) ** p
        return centres, angles, sides


@dataclass(frozen=True)
class Clip:
    """One rendered clip: ``frames`` (T, size, size, 3) uint8 as played, its label, caption and layout entry."""

    frames: np.ndarray
    label: int
    caption: str
    layout: dict


# ------------------------------------------------------------------------------------------------------- rendering
def draw_motion(rng: np.random.Generator, pair: int, size: int) -> Motion:
    """The forward motion of the pair ``pair`` (0 move left/right, 1 move up/down, 2 rotate, 3 grow/shrink)."""
    k = size / REFERENCE
    if pair in (0, 1):
        side, dist = rng.uniform(*MOVE_SIDE) * k, rng.uniform(*MOVE_DISTANCE) * k
        along = rng.uniform(side / 2 + dist, size - side / 2)  # start; moving towards 0 by dist keeps it inside
        across = rng.uniform(side / 2, size - side / 2)
        if pair == 0:  # move left
            return Motion((along, across), (along - dist, across), 0.0, 0.0, side, side)
        return Motion((across, along), (across, along - dist), 0.0, 0.0, side, side)  # move up
    if pair == 2:
        side, turn = rng.uniform(*ROTATE_SIDE) * k, rng.uniform(*ROTATE_DEGREES)
        reach = side / 2 * np.sqrt(2)  # the square's corners stay inside at every angle
        centre = tuple(rng.uniform(reach, size - reach, 2))
        angle0 = -turn / 2 + rng.uniform(-ROTATE_JITTER, ROTATE_JITTER)
        return Motion(centre, centre, angle0, angle0 + turn, side, side)
    side0, factor = rng.uniform(*GROW_SIDE) * k, rng.uniform(*GROW_FACTOR)
    side1 = side0 * factor
    centre = tuple(rng.uniform(side1 / 2, size - side1 / 2, 2))
    return Motion(centre, centre, 0.0, 0.0, side0, side1)


def render_alpha(item: np.ndarray, centres: np.ndarray, angles: np.ndarray, sides: np.ndarray, size: int,
                 supersample: int = SUPERSAMPLE) -> np.ndarray:
    """The alpha (T, size, size) float32 of a 28x28 uint8 item posed per frame (centre (T, 2) (x, y), angle (T,) in
    degrees clockwise on screen, side (T,) of its square), by inverse affine mapping of each sub-pixel centre into the
    item and bilinear interpolation (zero outside), averaged over ``supersample`` x ``supersample`` sub-pixels; values
    below ``ALPHA_THRESHOLD`` are zeroed as in :func:`item_alpha`. Only the window the item can reach in any frame
    (its square's circumscribed circle) is computed."""
    padded = np.pad(item.astype(np.float32) / 255.0, 1)  # 30, 30: a zero border for samples outside the item
    reach = sides[:, None] / 2 * np.sqrt(2)  # T, 1
    lo = np.clip(np.floor((centres - reach).min(axis=0)), 0, size).astype(int)  # x, y
    hi = np.clip(np.ceil((centres + reach).max(axis=0)), 0, size).astype(int)
    out = np.zeros((len(angles), size, size), dtype=np.float32)
    if (hi <= lo).any():
        return out
    gx = ((np.arange(lo[0] * supersample, hi[0] * supersample) + 0.5) / supersample).astype(np.float32)  # Sx
    gy = ((np.arange(lo[1] * supersample, hi[1] * supersample) + 0.5) / supersample).astype(np.float32)  # Sy
    dx = gx[None, None, :] - centres[:, 0, None, None].astype(np.float32)  # T, 1, Sx
    dy = gy[None, :, None] - centres[:, 1, None, None].astype(np.float32)  # T, Sy, 1
    theta = np.deg2rad(angles).astype(np.float32)[:, None, None]
    scale = (sides / ITEM).astype(np.float32)[:, None, None]
    # canvas offset = scale * R(theta) @ item offset, so item offset = R(-theta) @ canvas offset / scale
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / scale + (ITEM / 2 - 0.5 + 1)  # T, Sy, Sx column in `padded`
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / scale + (ITEM / 2 - 0.5 + 1)  # T, Sy, Sx row in `padded`
    u, v = np.clip(u, 0, ITEM + 1), np.clip(v, 0, ITEM + 1)
    u0, v0 = np.minimum(u.astype(np.intp), ITEM), np.minimum(v.astype(np.intp), ITEM)
    fu, fv = u - u0, v - v0
    a = ((1 - fv) * ((1 - fu) * padded[v0, u0] + fu * padded[v0, u0 + 1])
         + fv * ((1 - fu) * padded[v0 + 1, u0] + fu * padded[v0 + 1, u0 + 1]))  # T, Sy, Sx
    h, w = hi[1] - lo[1], hi[0] - lo[0]
    a = a.reshape(len(angles), h, supersample, w, supersample).mean(axis=(2, 4))  # T, h, w
    a[a < ALPHA_THRESHOLD] = 0.0
    out[:, lo[1]:hi[1], lo[0]:hi[0]] = a
    return out  # T, size, size


def _draw_item(rng: np.random.Generator, images: np.ndarray, pool: np.ndarray) -> int:
    """A random item of ``pool`` with at least one pixel at or above the alpha threshold."""
    for _ in range(20):
        index = int(pool[rng.integers(len(pool))])
        if images[index].max() >= ALPHA_THRESHOLD * 255:
            return index
    raise CanvasError("20 random Fashion-MNIST items had no pixel above the alpha threshold")


def _place_static(rng: np.random.Generator, alpha: np.ndarray, swept: np.ndarray) -> tuple[int, int]:
    """Top-left corner of a static item (alpha (s, s)) overlapping the actor's swept mask (H, W) least."""
    s, size = alpha.shape[0], swept.shape[0]
    own = alpha > 0
    best, best_overlap = (0, 0), 2.0
    for _ in range(STATIC_TRIES):
        x, y = (int(v) for v in rng.integers(0, size - s + 1, 2))
        overlap = float((own & swept[y:y + s, x:x + s]).sum()) / max(int(own.sum()), 1)
        if overlap < best_overlap:
            best, best_overlap = (x, y), overlap
        if overlap <= STATIC_OVERLAP:
            break
    return best


def render_clip(rng: np.random.Generator, label: int, images: np.ndarray, labels: np.ndarray, *, frames: int = 16,
                size: int = 64, items: tuple[int, int] = (1, 2), noise: float = 0.01) -> Clip:
    """One clip of action ``label`` (see the module docstring). ``images`` (N, 28, 28) uint8 and ``labels`` (N,) are
    the Fashion-MNIST split. Every draw depends on ``label // 2`` only, so the two labels of a pair give the same
    frames in opposite orders for the same generator state."""
    pair = label // 2
    actor = _draw_item(rng, images, np.arange(len(images)))
    actor_colour = item_colour(rng)
    motion = draw_motion(rng, pair, size)
    centres, angles, sides = motion.at(frames)
    alphas = render_alpha(images[actor], centres, angles, sides, size)  # T, size, size
    roles = [{"role": "actor", "source_index": actor, "class": int(labels[actor]),
              "name": CAPTION_NAMES[int(labels[actor])], "colour": [round(float(c), 4) for c in actor_colour]}]
    base = background(rng, size)
    if int(rng.integers(items[0], items[1] + 1)) == 2:
        static = _draw_item(rng, images, np.flatnonzero(labels != labels[actor]))
        colour = item_colour(rng)
        a = item_alpha(images[static], int(round(rng.uniform(*STATIC_SIDE) * size / REFERENCE)))
        x, y = _place_static(rng, a, (alphas > 0).any(axis=0))
        base, _ = composite(base, [a], [(x, y)], [colour])
        roles.append({"role": "static", "source_index": static, "class": int(labels[static]),
                      "name": CAPTION_NAMES[int(labels[static])], "colour": [round(float(c), 4) for c in colour],
                      "x": x, "y": y, "side": a.shape[0]})
    out = alphas[..., None] * actor_colour + (1 - alphas[..., None]) * base  # T, size, size, 3
    out = out + rng.normal(0.0, noise, out.shape) if noise > 0 else out
    pixels = np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)
    first, last = 0, frames - 1
    if label % 2:  # the second class of the pair: the same frames backwards
        pixels, first, last = pixels[::-1], last, first
    layout = {"label": label, "action": ACTIONS[label], "items": roles,
              "motion": {"centre": [[round(float(c), 2) for c in centres[i]] for i in (first, last)],
                         "angle": [round(float(angles[i]), 2) for i in (first, last)],
                         "side": [round(float(sides[i]), 2) for i in (first, last)]}}
    return Clip(np.ascontiguousarray(pixels), label, caption([r["class"] for r in roles]), layout)


def caption(classes: Sequence[int]) -> str:
    """The retrieval caption of a clip whose items have these Fashion-MNIST labels (the actor first)."""
    return "a video of " + " and ".join(f"a {CAPTION_NAMES[c]}" for c in classes)


# -------------------------------------------------------------------------------------------------------- encoding
def default_codec() -> str:
    """``libx264`` if this FFmpeg build has it, else ``mpeg4``."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def encode_video(frames: np.ndarray, *, fps: int = 8, codec: str | None = None, crf: int = 18) -> bytes:
    """MP4 bytes of ``frames`` (T, H, W, 3) uint8 RGB (H, W even): yuv420p, ``fps`` frames per second, one encoder
    thread (deterministic bytes); libx264 at constant rate factor ``crf``, or mpeg4 at ``MPEG4_BIT_RATE``."""
    codec = codec or default_codec()
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.thread_count = 1
        if codec == "libx264":
            stream.options = {"crf": str(crf)}
        else:
            stream.bit_rate = MPEG4_BIT_RATE
        for t, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = t
            container.mux(stream.encode(frame))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------------ the splits
def split_paths(out_dir: str | Path, split: str) -> dict[str, Path]:
    """The files of one split: ``videos`` folder, ``annotations``, ``classes``, ``captions``, ``layout``,
    ``manifest``."""
    out_dir = Path(out_dir)
    return {"videos": out_dir / split, "annotations": out_dir / f"{split}.txt", "classes": out_dir / "classes.txt",
            "captions": out_dir / f"captions_{split}.csv", "layout": out_dir / f"layout_{split}.json",
            "manifest": out_dir / f"manifest_{split}.json"}


def video_name(video_id: int) -> str:
    return f"{video_id:06d}.mp4"


def _check(split: str, num_videos: int, frames: int, size: int, items: tuple[int, int], fps: int, noise: float,
           codec: str, crf: int) -> None:
    """Raise CanvasError naming the first invalid parameter."""
    if split not in SPLITS:
        raise CanvasError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if num_videos < 1:
        raise CanvasError(f"num_videos must be at least 1, got {num_videos}")
    if frames < 2:
        raise CanvasError(f"frames must be at least 2, got {frames}")
    if size < 16 or size % 2:
        raise CanvasError(f"size must be even and at least 16 (yuv420p), got {size}")
    if not 1 <= items[0] <= items[1] <= 2:
        raise CanvasError(f"items must satisfy 1 <= min <= max <= 2, got {items}")
    if fps < 1:
        raise CanvasError(f"fps must be at least 1, got {fps}")
    if not 0 <= noise <= 0.5:
        raise CanvasError(f"noise must be in [0, 0.5], got {noise}")
    if codec not in ("libx264", "mpeg4") or codec not in av.codecs_available:
        raise CanvasError(f"codec must be libx264 or mpeg4 and available in PyAV's FFmpeg, got {codec!r}")
    if not 0 <= crf <= 51:
        raise CanvasError(f"crf must be in 0..51, got {crf}")


def _params(split: str, num_videos: int, seed: int, frames: int, size: int, items: tuple[int, int], fps: int,
            noise: float, codec: str, crf: int, root: Path) -> dict:
    files = source_files(root, split)
    for f in files:
        if not f.is_file():
            raise DataNotFound(f"Fashion-MNIST file not found: {f} (install the Debian package "
                               "'dataset-fashion-mnist' or pass root=/--root a folder with the four idx .gz files)")
    return {"generator_version": GENERATOR_VERSION, "split": split, "num_videos": num_videos, "seed": seed,
            "frames": frames, "size": size, "items": list(items), "fps": fps, "noise": noise, "codec": codec,
            "crf": crf if codec == "libx264" else None, "pix_fmt": "yuv420p", "actions": list(ACTIONS),
            "source_sha256": {f.name: sha256_file(f) for f in files}}


_FILES = ("annotations", "classes", "captions", "layout")


def _up_to_date(paths: dict[str, Path], params: dict) -> dict | None:
    """The manifest if the split on disk matches ``params`` and its recorded hashes, else None."""
    if not paths["manifest"].is_file() or not all(paths[k].is_file() for k in _FILES):
        return None
    try:
        recorded = json.loads(paths["manifest"].read_text())
    except json.JSONDecodeError:
        return None
    if recorded.get("params") != params or any(recorded.get(f"{k}_sha256") != sha256_file(paths[k]) for k in _FILES):
        return None
    names = [video_name(i) for i in range(1, params["num_videos"] + 1)]
    return recorded if recorded.get("videos_sha256") == images_hash(paths["videos"], names) else None


def generate(out_dir: str | Path, split: str, num_videos: int, seed: int, *, frames: int = 16, size: int = 64,
             items: tuple[int, int] = (1, 2), fps: int = 8, noise: float = 0.01, codec: str | None = None,
             crf: int = 18, root: str | Path | None = None) -> dict:
    """Write (or find up to date) one split of Moving Fashion-MNIST; see the module docstring.

    Args:
        out_dir: output root (see :func:`split_paths`).
        split: ``train`` (Fashion-MNIST train items) or ``test`` (its test items).
        num_videos: clips to write (video ids 1..num_videos).
        seed: base seed.
        frames: frames per clip; size: frame side in pixels (even).
        items: (min, max) items per clip, each 1 or 2 (the second one static).
        fps: frames per second written in the MP4.
        noise: std of the per-frame pixel noise (0..1 scale).
        codec: ``libx264`` or ``mpeg4``; None: libx264 if available.
        crf: libx264's constant rate factor (lower = better quality).
        root: Fashion-MNIST folder (default the Debian package's).

    Returns:
        the manifest (``params``, file hashes, ``label_counts``, ``codec``, ``library_versions``) plus ``skipped``:
        True if an identical split was already there and nothing was written.
    """
    codec = codec or default_codec()
    items = (int(items[0]), int(items[1]))
    _check(split, num_videos, frames, size, items, fps, noise, codec, crf)
    root = Path(root if root is not None else FASHION_MNIST_DIR)
    paths = split_paths(out_dir, split)
    params = _params(split, num_videos, seed, frames, size, items, fps, float(noise), codec, crf, root)
    recorded = _up_to_date(paths, params)
    if recorded is not None:
        return {**recorded, "skipped": True}

    source = FashionMNISTSource(root, split=split)
    paths["manifest"].unlink(missing_ok=True)
    paths["videos"].mkdir(parents=True, exist_ok=True)
    lines, captions, layout = [], [], []
    digest = hashlib.sha256()
    for video_id in range(1, num_videos + 1):
        rng = np.random.default_rng([seed, SPLITS[split], video_id])
        clip = render_clip(rng, (video_id - 1) % len(ACTIONS), source.images, source.labels, frames=frames,
                           size=size, items=items, noise=noise)
        name = video_name(video_id)
        data = encode_video(clip.frames, fps=fps, codec=codec, crf=crf)
        (paths["videos"] / name).write_bytes(data)
        digest.update(hashlib.sha256(data).digest())
        lines.append(f"{name} {clip.label}\n")
        captions.append((name, clip.caption))
        layout.append({"video": name, **clip.layout})
    _remove_stale(paths["videos"], num_videos)
    _write_text(paths["annotations"], "".join(lines))
    _write_text(paths["classes"], "".join(f"{a}\n" for a in ACTIONS))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["video", "caption"])
    writer.writerows(captions)
    _write_text(paths["captions"], text.getvalue())
    write_json(paths["layout"], {"params": {k: v for k, v in params.items() if k != "source_sha256"},
                                 "videos": layout})
    counts = np.bincount([(i - 1) % len(ACTIONS) for i in range(1, num_videos + 1)], minlength=len(ACTIONS))
    manifest = {"params": params, **{f"{k}_sha256": sha256_file(paths[k]) for k in _FILES},
                "videos_sha256": digest.hexdigest(), "videos_hash": "sha256 over the MP4 files' sha256 in id order",
                "label_counts": dict(zip(ACTIONS, counts.tolist())), "codec": codec,
                "library_versions": {"av": av.__version__,
                                     **{k: ".".join(map(str, v)) for k, v in av.library_versions.items()}}}
    write_json(paths["manifest"], manifest)
    return {**manifest, "skipped": False}


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _remove_stale(videos_dir: Path, num_videos: int) -> None:
    """Delete clips ``<id:06d>.mp4`` left by an earlier, larger run (ids above ``num_videos``)."""
    for path in videos_dir.glob("[0-9][0-9][0-9][0-9][0-9][0-9].mp4"):
        if int(path.stem) > num_videos:
            path.unlink()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m florence.benchmarks.moving_fmnist",
                                description="Write Moving Fashion-MNIST action clips (MP4) with annotations.")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--train", type=int, default=4000, help="train clips (0: none)")
    p.add_argument("--test", type=int, default=800, help="test clips (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=16, help="frames per clip")
    p.add_argument("--size", type=int, default=64, help="frame side in pixels (even)")
    p.add_argument("--items", type=int, nargs=2, default=(1, 2), metavar=("MIN", "MAX"),
                   help="items per clip (1 or 2; the second is static)")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--noise", type=float, default=0.01, help="per-frame pixel noise std")
    p.add_argument("--codec", choices=("libx264", "mpeg4"), default=None, help="default: libx264 if available")
    p.add_argument("--crf", type=int, default=18, help="libx264 constant rate factor")
    p.add_argument("--root", type=Path, default=Path(FASHION_MNIST_DIR), help="Fashion-MNIST idx folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for split, count in (("train", args.train), ("test", args.test)):
            if count <= 0:
                continue
            done = generate(args.out, split, count, args.seed, frames=args.frames, size=args.size,
                            items=tuple(args.items), fps=args.fps, noise=args.noise, codec=args.codec, crf=args.crf,
                            root=args.root)
            state = "up to date" if done["skipped"] else "written"
            print(f"{split}: {count} clips {state} ({args.out / split}, {done['codec']}; "
                  f"annotations {args.out / f'{split}.txt'})")
    except FlorenceError as err:
        print(f"moving_fmnist: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
