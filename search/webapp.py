"""``florence serve``: a small web app over one collection: a search page and the JSON API behind it (FastAPI).

    from florence.search import Index
    from florence.search.webapp import create_app, serve

    index = Index("runs/search.db", "fmnist", model="runs/demo/pretrain/final")
    serve(index, port=8000)                      # http://127.0.0.1:8000/ ; or create_app(index) for your own server

**API** (every error is ``{"error": "one line"}`` with its status; a :class:`SearchError` is a 400):

======================== ===============================================================================================
``GET /``                the page (``static/index.html`` + ``app.js`` + ``app.css``; plain HTML and JS, no CDN)
``GET /api/info``        ``{collection, db, count, model, model_sha256, dim, index_type, metric, roots, allow_index,
                         max_upload_bytes, max_top_k}``
``POST /api/search``     JSON ``{text?, like?, text_weight=0.5, top_k=10, filter=""}`` -> ``{"hits": [HIT...], "ms"}``;
                         HIT = ``{id, score, path, kind, tag, tag_confidence, url, ...}`` plus the row's other scalar
                         fields (content_hash, size, mtime, CSV metadata, tag_method); ``like`` is a row id
``POST /api/search/image`` multipart: ``image`` (file, at most ``max_upload_bytes``, else 413) and optional form fields
                         ``text``, ``text_weight``, ``top_k``, ``filter`` -> as ``/api/search``
``GET /api/image/{id}``  the row's file bytes (its content type); ``?thumb=N`` (16..1024): a JPEG at most N pixels a
                         side (a video: its first frame). 404 for an unknown id, 403 for a path outside the roots
``POST /api/index``      JSON ``{"source": PATH}`` -> ``index.add(PATH)``'s summary ``{indexed, unchanged, updated,
                         pruned, skipped: [[file, reason]...], seconds, embedded_per_s, count}``; 403 when indexing is
                         off or the source lies outside the collection's roots
======================== ===============================================================================================

**Safety.** The app listens on 127.0.0.1 unless told otherwise and has no authentication. Nothing from a request is
executed: a filter goes to Milvus as a boolean expression (Milvus parses it; a bad one is a 400), ids are checked
against the id alphabet, and image bytes are served for a row looked up by id, never for a path from the request;
that path must lie, symlinks resolved, inside the collection's indexed roots (``store.info().roots``), else 403. A
``SHARD.tar#MEMBER`` row is read from its shard. Request bodies over ``max_upload_bytes`` (plus a little room for the
form) are refused with 413 before they are read in full. ``POST /api/index`` accepts a source only inside the roots,
and skips (as counted bad files) members of it that resolve outside them (a symlink, a CSV row with an absolute path).

**One process, one lock.** A Milvus Lite path belongs to one process, so the app runs in a single process (one uvicorn
worker); endpoints are plain ``def`` functions (FastAPI runs them on its thread pool) and every call into the Index
(model and Milvus client) holds one ``threading.Lock``: requests are served one model call at a time. Adding files
through ``/api/index`` holds the lock for the whole run (searches wait); a collection with concurrent writers belongs
on a Milvus server.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import mimetypes
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import uvicorn
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from florence.data.images import BadSample, decode_image
from florence.errors import FlorenceError
from florence.search.contact_sheet import preview_image
from florence.search.files import MEMBER_SEP, SourceFiles, read_member, walk_source
from florence.search.index import Index
from florence.search.store import SearchError

__all__ = ["create_app", "serve", "background_server", "MAX_TOP_K"]

STATIC = Path(__file__).with_name("static")
MAX_TOP_K = 100
MAX_TEXT = 1000  # characters of a text query
MAX_FILTER = 4000  # characters of a filter expression
FORM_ROOM = 64 << 10  # bytes a multipart body may carry beyond the image (boundaries, form fields)
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")  # row ids are SHA-256 hex (store.row_id)
IMAGE_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'; sandbox",
                 "Cache-Control": "private, max-age=86400"}  # an id names one content at one path: safe to cache
PAGE_CSP = "default-src 'self'; img-src 'self' blob:; media-src 'self'; object-src 'none'; frame-ancestors 'none'"


class SearchBody(BaseModel):
    """``POST /api/search``: a text, a stored row (``like``), or both (mixed by ``text_weight``)."""

    text: str | None = None
    like: str | None = None
    text_weight: float = 0.5
    top_k: int = 10
    filter: str = ""


class IndexBody(BaseModel):
    """``POST /api/index``: a folder, CSV table, webdataset shard or image file inside the indexed roots."""

    source: str


class _TooLarge(Exception):
    pass


class _BodyLimit:
    """ASGI middleware: a request whose body exceeds ``limit`` bytes gets 413, by its Content-Length before anything
    is read, or (a chunked body) as soon as the bytes received pass the limit; the app's own answer is then dropped."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def _refuse(self, send) -> None:
        body = JSONResponse({"error": f"request body over the upload limit of {self.limit - FORM_ROOM} bytes"},
                            status_code=413)
        await body({"type": "http"}, None, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send)
        received, over = 0, False

        async def limited_receive():
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    over = True
                    raise _TooLarge()
            return message

        async def guarded_send(message):
            if not over:
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over:
            await self._refuse(send)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


def _real(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def _inside(path: str, roots: list[str]) -> bool:
    """Whether ``path`` (already resolved) lies in one of the resolved ``roots``."""
    return any(path == root or os.path.commonpath([root, path]) == root for root in roots)


def _hit_dict(hit) -> dict[str, Any]:
    return {"tag": None, "tag_confidence": None, **hit.to_dict(), "url": f"/api/image/{hit.id}"}


def _thumbnail(path: str, data: bytes | None, size: int) -> bytes:
    """A JPEG of at most ``size`` pixels a side: the image, or a video's first frame."""
    image = preview_image(path, data)
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=85)
    return out.getvalue()


def create_app(index: Index, *, max_upload_bytes: int = 8 << 20, allow_index: bool = True,
               index_workers: int = 0) -> FastAPI:
    """The web app over ``index`` (an :class:`Index` with its model). Checks up front that the collection exists and
    was built with the index's model (a :class:`SearchError` otherwise).

    Args:
        max_upload_bytes: the largest query image accepted (413 above it).
        allow_index: whether ``POST /api/index`` may add files (inside the collection's roots).
        index_workers: decode processes for ``/api/index`` runs (0: decode in the request's thread, no fork of the
            serving process).
    """
    index.checked_embedder()  # the collection exists and the model built it
    lock = threading.Lock()
    app = FastAPI(title=f"florence search: {index.store.collection}", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(_BodyLimit, limit=max_upload_bytes + FORM_ROOM)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(FlorenceError)
    def _florence_error(request: Request, err: FlorenceError):
        return _error(400, str(err))

    @app.exception_handler(HTTPException)
    def _http_error(request: Request, err: HTTPException):
        return _error(err.status_code, err.detail)

    @app.exception_handler(RequestValidationError)
    def _bad_request(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, f"{where or 'request'}: {first.get('msg', 'invalid request')}")

    def roots() -> list[str]:
        with lock:
            return [_real(r) for r in index.store.info().roots]

    def check_id(row_id: str, what: str = "id") -> str:
        if not ID_PATTERN.fullmatch(row_id):
            raise SearchError(f"{what} {row_id[:80]!r} is not a row id")
        return row_id

    def run_search(text: str | None, image: Image.Image | None, like: str | None, text_weight: float, top_k: int,
                   filter: str) -> dict[str, Any]:
        if not 1 <= top_k <= MAX_TOP_K:
            raise SearchError(f"top_k must be in 1..{MAX_TOP_K}, got {top_k}")
        if text is not None and len(text) > MAX_TEXT:
            raise SearchError(f"text is longer than {MAX_TEXT} characters")
        if len(filter) > MAX_FILTER:
            raise SearchError(f"filter is longer than {MAX_FILTER} characters")
        text = text.strip() if text and text.strip() else None
        like = check_id(like, "like") if like else None
        start = time.perf_counter()
        with lock:
            hits = index.search(text, image, like=like, text_weight=text_weight, top_k=top_k, filter=filter.strip())
        return {"hits": [_hit_dict(h) for h in hits], "ms": round((time.perf_counter() - start) * 1000, 2)}

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_CSP})

    @app.get("/api/info")
    def api_info():
        with lock:
            info, count = index.store.info(), index.count()
        return {"collection": index.store.collection, "db": index.store.db, "count": count,
                "model": info.model_name, "model_sha256": info.model_sha256, "dim": info.dim,
                "index_type": info.index_type, "metric": info.metric, "roots": list(info.roots),
                "allow_index": allow_index, "max_upload_bytes": max_upload_bytes, "max_top_k": MAX_TOP_K}

    @app.post("/api/search")
    def api_search(body: SearchBody):
        if not body.like and not (body.text and body.text.strip()):
            raise SearchError("a search needs a text or like=ID (or an image: POST /api/search/image)")
        return run_search(body.text, None, body.like, body.text_weight, body.top_k, body.filter)

    @app.post("/api/search/image")
    def api_search_image(image: UploadFile = File(...), text: str | None = Form(None),
                         text_weight: float = Form(0.5), top_k: int = Form(10), filter: str = Form("")):
        data = image.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"uploaded image is over the limit of {max_upload_bytes} bytes")
        try:
            pil = decode_image(data, name=f"uploaded image {image.filename or ''}".strip())
        except BadSample as err:
            raise SearchError(f"query image: {err}") from None
        return run_search(text, pil, None, text_weight, top_k, filter)

    @app.get("/api/image/{row_id}")
    def api_image(row_id: str, thumb: int | None = None):
        check_id(row_id)
        if thumb is not None and not 16 <= thumb <= 1024:
            raise SearchError(f"thumb must be in 16..1024, got {thumb}")
        with lock:
            rows = index.store.get([row_id], ("id", "path"))
        if not rows:
            raise HTTPException(404, f"no row with id {row_id}")
        path = str(rows[0]["path"])
        member = None
        if MEMBER_SEP in path and not os.path.exists(path):
            path, member = path.split(MEMBER_SEP, 1)
        real = _real(path)
        if not _inside(real, roots()):
            raise HTTPException(403, f"row {row_id}: its file lies outside the collection's indexed roots")
        name = member or real
        media = mimetypes.guess_type(name)[0] or "application/octet-stream"
        try:
            data = read_member(real, member) if member is not None else None
            if thumb is not None:
                data = _thumbnail(real if member is None else f"{real}{MEMBER_SEP}{member}", data, thumb)
                return Response(data, media_type="image/jpeg", headers=IMAGE_HEADERS)
        except (OSError, KeyError) as err:
            raise HTTPException(404, f"row {row_id}: its file cannot be read ({type(err).__name__})") from None
        except BadSample as err:
            raise HTTPException(404, f"row {row_id}: {err}") from None
        if data is not None:
            return Response(data, media_type=media, headers=IMAGE_HEADERS)
        if not os.path.isfile(real):
            raise HTTPException(404, f"row {row_id}: its file is gone")
        return FileResponse(real, media_type=media, headers=IMAGE_HEADERS)

    @app.post("/api/index")
    def api_index(body: IndexBody):
        if not allow_index:
            raise HTTPException(403, "adding files is switched off in this app")
        allowed = roots()
        source = body.source.strip()
        if not source or any(ch in source for ch in "*?[") or not _inside(_real(source), allowed):
            raise HTTPException(403, f"source {source[:200]!r} is not inside the collection's indexed roots "
                                     f"({', '.join(allowed)})")
        files = walk_source(source)
        keep, skipped = [], list(files.skipped)
        for item in files.items:
            on_disk = item.path.split(MEMBER_SEP, 1)[0] if MEMBER_SEP in item.path and not os.path.exists(
                item.path) else item.path
            if _inside(_real(on_disk), allowed):
                keep.append(item)
            else:
                skipped.append((item.path, "outside the collection's indexed roots"))
        with lock:
            files = SourceFiles(keep, list(index.store.info().roots), skipped)  # the roots stay as they are
            summary = index.add(files, progress=False, workers=index_workers)
            count = index.count()
        out = dataclasses.asdict(summary)
        out.update(embedded_per_s=summary.embedded_per_s, count=count)
        return out

    return app


@contextlib.contextmanager
def background_server(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> Iterator[str]:
    """Serve ``app`` with uvicorn on a thread (``port=0``: a free port) for the ``with`` block; yields its base URL
    (``http://127.0.0.1:PORT``). For tests, the page's screenshot and local load tests."""

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="florence-serve")
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the web server did not start")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def serve(index: Index, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
          **options: Any) -> None:
    """Run the app (:func:`create_app` with ``options``) with uvicorn, one process and one worker, until Ctrl-C."""

    app = create_app(index, **options)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host}: the app has no authentication; anyone who reaches the port can search "
              f"and read the indexed images" + (" and add files" if options.get("allow_index", True) else ""))
    print(f"florence serve: {index.store.where} on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, workers=1, log_level=log_level)
