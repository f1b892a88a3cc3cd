"""A contact sheet of search results: one self-contained HTML file (thumbnails inlined as base64 PNG data URIs), so it
opens anywhere and can be mailed without the indexed files."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Sequence

from PIL import Image

from florence.data.images import BadSample, decode_image
from florence.data.video_decode import decode_frames
from florence.search.files import MEMBER_SEP, FileItem, kind_of
from florence.search.store import Hit

__all__ = ["preview_image", "thumbnail_png", "write_contact_sheet"]


def preview_image(path: str, data: bytes | None = None) -> Image.Image:
    """An indexed file as a picture: the image (``data`` when its bytes are read already; a ``SHARD.tar#MEMBER`` path
    from its shard), or a video's first frame. ``BadSample`` / ``OSError`` / ``KeyError`` when it cannot be read."""
    if kind_of(path.split(MEMBER_SEP, 1)[-1]) == "video":
        return Image.fromarray(decode_frames(path, [0])[0])
    return decode_image(data if data is not None else FileItem(path, "image", 0, 0.0).read_bytes(), name=path)


def thumbnail_png(path: str, size: int = 160) -> bytes | None:
    """A PNG thumbnail (longest side ``size``, nearest-neighbour up-scaling for tiny images) of an indexed image or
    of a video's first frame; None when the file is gone or unreadable."""
    try:
        image = preview_image(path)
    except (BadSample, OSError, KeyError):
        return None
    scale = size / max(image.size)
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BICUBIC
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def write_contact_sheet(hits: Sequence[Hit], out: str | Path, title: str, size: int = 160) -> Path:
    """Write ``hits`` (best first) as a grid of thumbnails with rank, score, tag and path; the file written."""
    cards = []
    for rank, hit in enumerate(hits, 1):
        png = thumbnail_png(hit.path, size)
        img = (f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="">' if png
               else '<div class="missing">file unavailable</div>')
        tag = hit.fields.get("tag")
        tag_text = f" · {html.escape(str(tag))}" if tag else ""
        cards.append(f'<figure>{img}<figcaption>#{rank} · {hit.score:.3f}{tag_text}<br>'
                     f'<span title="{html.escape(hit.path)}">{html.escape(Path(hit.path).name)}</span>'
                     f'</figcaption></figure>')
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:1em} .grid{display:flex;flex-wrap:wrap;gap:10px}"
            f"figure{{margin:0;width:{size}px;font-size:12px}} figure img{{width:{size}px;height:{size}px;"
            "object-fit:contain;background:#eee;image-rendering:pixelated}"
            f".missing{{width:{size}px;height:{size}px;background:#fdd}}</style></head><body>"
            f"<h2>{html.escape(title)}</h2><div class='grid'>{''.join(cards)}</div></body></html>")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
