"""Robust decoding of images and captions, with :class:`BadSample` naming the file and the reason.

Images are fully decoded (a truncated file fails here, not inside a transform), EXIF orientation is
applied, and every mode becomes 8-bit RGB:

- ``1`` / ``L`` / ``RGB`` / ``YCbCr`` / ``LAB`` / ``HSV`` / ``CMYK``: Pillow's conversion to RGB.
- Transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent colour): composited on a **white**
  background (product shots and logos on transparent backgrounds are drawn on white; dropping the alpha
  channel instead would expose whatever colour the transparent pixels happen to hold, often black).
- 16/32-bit grayscale (``I;16*``, ``I``): scaled from the 16-bit range to 8 bits (``v / 257``), not clipped;
  an ``I`` image whose values all fit in 0..255 is taken as already 8-bit. Float ``F``: values in [0, 1] are
  scaled by 255, others clipped to 0..255.

Captions are decoded as UTF-8 (strict), stripped, whitespace runs collapsed; an empty caption is bad.
"""
from __future__ import annotations

import io
import re
import unicodedata
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

_WHITE = (255, 255, 255)
_WS = re.compile(r"\s+")


class BadSample(Exception):
    """A sample that cannot be used. ``file`` names it (path, or shard + key), ``reason`` says why."""

    def __init__(self, file: str, reason: str):
        super().__init__(file, reason)
        self.file = str(file)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        arr = arr.astype(np.float64) / 257.0
    elif img.mode == "I":
        arr = arr.astype(np.float64)
        if arr.min() < 0 or arr.max() > 255:
            arr = np.clip(arr, 0, 65535) / 257.0
    else:  # "F"
        arr = arr.astype(np.float64)
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))  # mode L


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit ``RGB`` (see the module docstring for the rules)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return _to_8bit_gray(img).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    elif img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes | str | Path, *, name: str | None = None) -> Image.Image:
    """Open, verify and fully decode an image (a path or the encoded bytes) into an 8-bit RGB image with its
    EXIF orientation applied.

    Raises :class:`BadSample` (file = ``name`` or the path) for a missing file, an unidentifiable, truncated or
    corrupt image, or a decompression bomb.
    """
    name = str(name if name is not None else (data if not isinstance(data, bytes) else "<bytes>"))
    if not isinstance(data, bytes):
        try:
            data = Path(data).read_bytes()
        except FileNotFoundError:
            raise BadSample(name, "missing file") from None
        except OSError as e:
            raise BadSample(name, f"unreadable file ({e.strerror or e})") from None
    if not data:
        raise BadSample(name, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                probe.verify()  # structure / checksum check; the image must be reopened afterwards
            img = Image.open(io.BytesIO(data))
            img.load()  # full decode: truncated data fails here
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # noqa: BLE001 - unreadable EXIF: keep the stored orientation, the pixels are fine
                pass
            return to_rgb(img)
    except Image.UnidentifiedImageError:
        raise BadSample(name, "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSample(name, f"decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise BadSample(name, f"corrupt or truncated image ({type(e).__name__}: {e})") from None


def clean_caption(text: str | bytes, *, name: str) -> str:
    """A caption ready for the tokenizer: UTF-8 decoded (bytes), stripped, whitespace runs collapsed to one space.

    Raises :class:`BadSample` (file = ``name``) for bytes that are not valid UTF-8 and for an empty or
    whitespace-only caption.
    """
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            reason = f"caption is not valid UTF-8 (byte 0x{text[e.start]:02x} at offset {e.start})"
            raise BadSample(name, reason) from None
    if not isinstance(text, str):
        raise BadSample(name, f"caption is not text (got {type(text).__name__})")
    text = _WS.sub(" ", text.replace("\x00", " ")).strip()
    if not text:
        raise BadSample(name, "empty or whitespace-only caption")
    return text


def normalize_caption(text: str) -> str:
    """The form hashed into a caption label: Unicode NFKC, case-folded, whitespace collapsed and stripped. Two
    captions share a label iff their normalised forms are equal."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()
