"""A PNG strip of a clip's frames (PIL only), with an optional caption above it (e.g. the top-5 prediction)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TEXT, MUTED = (0, 0, 0), (90, 90, 90)
PAD, GAP = 6, 2  # border around the strip; space between frames


def _wrap(draw: ImageDraw.ImageDraw, line: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """``line`` broken at spaces into lines at most ``width`` pixels wide (a longer word gets a line of its own)."""
    lines: list[str] = []
    for word in line.split(" "):
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def frame_strip_png(frames: np.ndarray, path: str | Path, *, title: str | None = None, every: int = 1,
                    scale: int = 2, font_size: int = 12) -> Path:
    """Write every ``every``-th frame of ``frames`` (T, H, W, 3) uint8 RGB side by side to ``path`` (PNG), each
    enlarged ``scale`` times (nearest neighbour) with its frame index below it, and ``title`` above the strip
    (newlines kept, long lines wrapped). Returns the path."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frame_strip_png: frames must be (T, H, W, 3) uint8 with T >= 1, got {frames.shape} "
                         f"{frames.dtype}")
    if every < 1 or scale < 1:
        raise ValueError(f"frame_strip_png: every and scale must be at least 1, got {every} and {scale}")
    font = ImageFont.load_default(size=font_size)
    indices = range(0, len(frames), every)
    h, w = frames.shape[1] * scale, frames.shape[2] * scale
    width = len(indices) * (w + GAP) - GAP
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = measure.textbbox((0, 0), "Ag", font=font)[3] + 3
    lines = [part for line in (title or "").splitlines() for part in _wrap(measure, line, font, width)]
    top = PAD + line_height * len(lines) + (PAD if lines else 0)
    strip = Image.new("RGB", (width + 2 * PAD, top + h + line_height + PAD), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        draw.text((PAD, PAD + i * line_height), line, fill=TEXT, font=font)
    for k, t in enumerate(indices):
        x = PAD + k * (w + GAP)
        strip.paste(Image.fromarray(frames[t]).resize((w, h), Image.NEAREST), (x, top))
        label = str(t)
        draw.text((x + (w - draw.textlength(label, font=font)) / 2, top + h + 2), label, fill=MUTED, font=font)
    path = Path(path)
    strip.save(path)
    return path
