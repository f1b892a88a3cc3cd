"""A PNG of VQA examples (PIL only): each image with its question, the model's answer (and score) and the ground
truth (the most common answer). The answer is green when its official VQA accuracy is above 0, red otherwise."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

RIGHT, WRONG, TEXT, MUTED = (0, 140, 0), (200, 0, 0), (0, 0, 0), (90, 90, 90)
PAD = 6


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> list[str]:
    """``text`` broken at spaces into lines at most ``width`` pixels wide (a longer word gets a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def _verdict(sample: Mapping[str, Any]) -> tuple[int, int, int]:
    """The answer's colour: by ``accuracy`` (official, percent) if given, else by equality with ``ground_truth``."""
    accuracy = sample.get("accuracy")
    if accuracy is not None:
        return RIGHT if float(accuracy) > 0 else WRONG
    truth = sample.get("ground_truth")
    if truth is None:
        return TEXT
    return RIGHT if str(sample["prediction"]).strip().lower() == str(truth).strip().lower() else WRONG


def _tile(sample: Mapping[str, Any], size: int, font: Any) -> Image.Image:
    """One example: the image scaled so its longer side is ``size``, the text lines below it."""
    source = sample["image"]
    image = source.convert("RGB") if isinstance(source, Image.Image) else Image.open(source).convert("RGB")
    factor = size / max(image.size)
    image = image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))),
                         Image.NEAREST if factor >= 1 else Image.BILINEAR)
    score = sample.get("score")
    answer = f"answer: {sample['prediction']}" + (f" ({float(score):.2f})" if score is not None else "")
    if sample.get("accuracy") is not None:
        answer += f", acc {float(sample['accuracy']):.0f}"
    texts = [(f"Q: {sample['question']}", TEXT), (answer, _verdict(sample))]
    if sample.get("ground_truth") is not None:
        texts.append((f"truth: {sample['ground_truth']}", MUTED))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = [(line, colour) for text, colour in texts for line in _wrap(measure, text, font, size)]
    line_height = measure.textbbox((0, 0), "Ag", font=font)[3] + 3
    tile = Image.new("RGB", (size, image.height + PAD + line_height * len(lines)), (255, 255, 255))
    tile.paste(image, ((size - image.width) // 2, 0))
    draw = ImageDraw.Draw(tile)
    for i, (line, colour) in enumerate(lines):
        draw.text((0, image.height + PAD + i * line_height), line, fill=colour, font=font)
    return tile


def draw_vqa(samples: Sequence[Mapping[str, Any]], path: str | Path, *, columns: int = 3, size: int = 288,
             font_size: int = 14) -> Path:
    """Write a grid of VQA examples to ``path`` (PNG), ``columns`` per row, each image scaled to ``size`` pixels.

    Each sample: ``image`` (a PIL image or a file path), ``question``, ``prediction``; optional ``score`` (the
    model's, shown after the answer), ``ground_truth`` (the most common answer), ``accuracy`` (the answer's official
    VQA accuracy in percent: green when > 0, red when 0; without it the answer is green when it equals
    ``ground_truth``, ignoring case). Other keys (e.g. the 10 ``answers``) are ignored.
    """
    if not samples:
        raise ValueError("draw_vqa: no samples to draw")
    font = ImageFont.load_default(size=font_size)
    tiles = [_tile(s, size, font) for s in samples]
    columns = max(1, min(columns, len(tiles)))
    rows = [tiles[i:i + columns] for i in range(0, len(tiles), columns)]
    heights = [max(t.height for t in row) for row in rows]
    grid = Image.new("RGB", (columns * (size + 2 * PAD), sum(heights) + 2 * PAD * len(rows)), (255, 255, 255))
    y = PAD
    for row, height in zip(rows, heights):
        for j, tile in enumerate(row):
            grid.paste(tile, (PAD + j * (size + 2 * PAD), y))
        y += height + 2 * PAD
    path = Path(path)
    grid.save(path)
    return path
