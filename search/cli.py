"""``florence index | search | tag | dedup | serve``: the search commands (:mod:`florence.search`).

    florence index --model BUNDLE --source DIR|CSV|SHARDS --db PATH.db|URI --collection NAME [--prune]
    florence search --db ... --collection ... "a red motorcycle" [--image PATH] [--top-k 10] [--filter EXPR]
                    [--json] [--html OUT]
    florence tag --db ... --collection ... --labels-file labels.txt [--trusted-field F] [--threshold 0.5]
    florence dedup --db ... --collection ... [--threshold 0.95] [--out groups.json]
    florence serve --db ... --collection ... [--model BUNDLE] [--port 8000]

``--model`` may be left out of search / tag / serve: the bundle the collection was indexed with is used when it is
still where it was (its SHA-256 is checked either way). Exit status 0, or 2 for a problem you can fix (one line on
stderr naming the file, database, collection or field).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from florence.data.sources import load_class_names
from florence.engine.distributed import init_distributed, shutdown_distributed
from florence.errors import FlorenceError
from florence.registry import find_source
from florence.search.contact_sheet import write_contact_sheet
from florence.search.dedup import write_duplicates_json
from florence.search.embedder import PRECISIONS, Embedder
from florence.search.files import walk_source
from florence.search.index import Index
from florence.search.indexer import index_files, share_failure
from florence.search.store import INDEX_TYPES, METRICS, SearchError, Store
from florence.search.webapp import serve

__all__ = ["index_main", "search_main", "tag_main", "dedup_main", "serve_main"]


def _database_args(p: argparse.ArgumentParser, model_required: bool = False) -> None:
    p.add_argument("--db", required=True, help="Milvus Lite path (*.db, created if absent) or server URI "
                   "(http://HOST:19530)")
    p.add_argument("--collection", required=True, help="collection name")
    p.add_argument("--token", default=None, help="Milvus server token (user:password), if the server asks")
    p.add_argument("--model", required=model_required, default=None,
                   help="dual-encoder bundle directory" + ("" if model_required else
                                                          " (default: the bundle the collection was indexed with)"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp32, or bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the image tower")


def _recorded_model(args: argparse.Namespace) -> str:
    """``--model``, or the model the collection records (``CollectionInfo.model_path``: a bundle or a spelling such as
    ``open_clip:ARCH:WEIGHTS``)."""
    if args.model:
        return args.model
    with Store(args.db, args.collection, args.token) as store:
        path = store.info().model_path
    if not path or not (Path(path).is_dir() or find_source(path) is not None):  # a bundle, or open_clip: / hf:
        raise SearchError(f"{args.db} collection {args.collection!r}: give --model (the bundle it was indexed with, "
                          f"{path or 'not recorded'}, is not there)")
    return path


def _open_index(args: argparse.Namespace, needs_model: bool = True) -> Index:
    model = _recorded_model(args) if needs_model else None
    embedder = Embedder(model, args.device, args.precision, args.compile) if model else None
    return Index(args.db, args.collection, token=args.token, embedder=embedder)


def _run(name: str, body: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
         argv: list[str] | None) -> int:
    args = parser.parse_args(argv)
    try:
        return body(args)
    except FlorenceError as err:  # a user-fixable problem: one line; anything else is a bug and keeps its traceback
        print(f"florence {name}: {err}", file=sys.stderr)
        return 2


# --- florence index ---------------------------------------------------------------------------------------------------


def index_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="florence index", description="Embed images and videos into a Milvus "
                                "collection, incrementally (unchanged files are skipped, changed ones replaced). Under "
                                "`torchrun --nproc-per-node N -m florence index ...` the files are sharded across "
                                "ranks and rank 0 writes.")
    _database_args(p, model_required=True)
    p.add_argument("--source", required=True, help="a folder, a CSV/TSV table (path column + metadata columns), or "
                   "webdataset .tar shards (a file, a folder of them, or a glob)")
    p.add_argument("--prune", action="store_true", help="delete rows whose files are gone")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="decoding processes (0: decode in the main process)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for embedding (default: the cores minus --workers, at least 1)")
    p.add_argument("--index-type", choices=INDEX_TYPES, default="FLAT",
                   help="vector index of a new collection: FLAT (exact; default) or HNSW/IVF for large ones")
    p.add_argument("--index-params", type=json.loads, default=None,
                   help='JSON index parameters, e.g. \'{"M": 16, "efConstruction": 200}\'')
    p.add_argument("--metric", choices=METRICS, default="COSINE")
    p.add_argument("--frames", type=int, default=8, help="frames sampled and mean-pooled per video (new collection)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true")
    return p


def _index(args: argparse.Namespace) -> int:
    env = init_distributed()
    try:
        files = walk_source(args.source)
        embedder = Embedder(args.model, env.device if env.distributed else args.device, args.precision, args.compile)
        options: dict[str, Any] = dict(batch_size=args.batch_size, workers=args.workers, prune=args.prune,
                                       progress=not args.no_progress, index_type=args.index_type,
                                       index_params=args.index_params, metric=args.metric, frames=args.frames,
                                       threads=args.threads)
        store, failure = None, None
        if env.is_main:
            try:
                store = Store(args.db, args.collection, args.token)
            except FlorenceError as err:  # e.g. a held Lite path: every rank stops with it
                failure = err
        share_failure(failure)
        try:
            summary = index_files(store, embedder, files, **options)
        finally:
            if store is not None:
                store.close()
    finally:
        shutdown_distributed()
    if env.is_main:
        print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.text())
    return 0


def index_main(argv: list[str] | None = None) -> int:
    return _run("index", _index, index_parser(), argv)


# --- florence search --------------------------------------------------------------------------------------------------


def search_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="florence search", description="Search a collection by text, by image, or both "
                                "(mixed by --text-weight), or for rows like a stored one (--like ID).")
    p.add_argument("text", nargs="?", default=None, help="text query, e.g. \"a red motorcycle\"")
    _database_args(p)
    p.add_argument("--image", default=None, help="query image file")
    p.add_argument("--like", default=None, help="the id of a stored row: find rows like it")
    p.add_argument("--text-weight", type=float, default=0.5, help="weight of the text when both are given")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--filter", default="", help="Milvus boolean expression on scalar fields, e.g. "
                   "'tag == \"bag\" and mtime > 1700000000'")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--html", default=None, metavar="OUT", help="also write a contact sheet of the results")
    return p


def format_hits(hits, fields=("tag",)) -> str:
    lines = [f"{'rank':>4}  {'score':>6}  {'tag':<14}  path"]
    for rank, hit in enumerate(hits, 1):
        meta = {k: v for k, v in hit.fields.items() if k not in ("path", "kind", "content_hash", "size", "mtime",
                                                                 "tag", "tag_confidence", "tag_method")}
        extra = "  " + json.dumps(meta, ensure_ascii=False) if meta else ""
        lines.append(f"{rank:>4}  {hit.score:6.3f}  {str(hit.fields.get('tag') or '-'):<14}  {hit.path}{extra}")
    return "\n".join(lines)


def _search(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise SearchError("--top-k must be at least 1")
    if args.text is None and args.image is None and args.like is None:
        raise SearchError("give a text query, --image PATH, both, or --like ID")
    with _open_index(args, needs_model=args.like is None) as index:
        hits = index.search(args.text, args.image, like=args.like, text_weight=args.text_weight, top_k=args.top_k,
                            filter=args.filter)
    if args.html:
        title = " + ".join(x for x in (args.text and repr(args.text), args.image, args.like) if x)
        print(f"contact sheet: {write_contact_sheet(hits, args.html, f'florence search: {title}')}", file=sys.stderr)
    print(json.dumps([h.to_dict() for h in hits], indent=2, ensure_ascii=False) if args.json else format_hits(hits))
    return 0


def search_main(argv: list[str] | None = None) -> int:
    return _run("search", _search, search_parser(), argv)


# --- florence tag -----------------------------------------------------------------------------------------------------


def tag_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="florence tag", description="Write tags into a collection: zero-shot against "
                                "the label prompts (80-template ensemble), and a k-nearest-neighbour vote among rows "
                                "that carry trusted tags (--trusted-field); each with a confidence, none below "
                                "--threshold.")
    _database_args(p)
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", default=None, help='comma-separated labels, e.g. "bag,sandal,coat"')
    labels.add_argument("--labels-file", default=None, help="a text file with one label a line")
    p.add_argument("--trusted-field", default=None, help="metadata field holding trusted tags (e.g. a CSV column)")
    p.add_argument("--method", choices=("auto", "zeroshot", "knn"), default="auto")
    p.add_argument("-k", "--k", type=int, default=10, help="neighbours in the kNN vote")
    p.add_argument("--threshold", type=float, default=0.5, help="no tag is written below this confidence")
    p.add_argument("--filter", default="", help="tag only the rows matching this Milvus expression")
    p.add_argument("--overwrite", action="store_true", help="replace existing tags")
    p.add_argument("--json", action="store_true")
    return p


def _labels(args: argparse.Namespace) -> list[str]:
    """``--labels-file`` (one a line, or a JSON list; ``florence.data.sources.load_class_names``) or ``--labels``."""
    if args.labels_file is not None:
        return [name if isinstance(name, str) else name[0] for name in load_class_names(args.labels_file)]
    labels = [x.strip() for x in args.labels.split(",") if x.strip()]
    if not labels:
        raise SearchError("--labels: no labels")
    return labels


def _tag(args: argparse.Namespace) -> int:
    labels = _labels(args)
    with _open_index(args) as index:
        summary = index.tag(labels, trusted_field=args.trusted_field, method=args.method, k=args.k,
                            threshold=args.threshold, filter=args.filter, overwrite=args.overwrite, progress=True)
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.text())
    return 0


def tag_main(argv: list[str] | None = None) -> int:
    return _run("tag", _tag, tag_parser(), argv)


# --- florence dedup ---------------------------------------------------------------------------------------------------


def dedup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="florence dedup", description="Group exact duplicates (same content hash) and "
                                "near-duplicates (cosine >= --threshold, connected components).")
    _database_args(p)
    p.add_argument("--threshold", type=float, default=0.95)
    p.add_argument("--filter", default="", help="only rows matching this Milvus expression")
    p.add_argument("--out", default=None, help="write the groups as JSON here")
    p.add_argument("--json", action="store_true", help="print JSON instead of the groups")
    return p


def _dedup(args: argparse.Namespace) -> int:
    with _open_index(args, needs_model=False) as index:
        groups = index.duplicates(args.threshold, filter=args.filter)
    if args.out:
        write_duplicates_json(groups, args.out, threshold=args.threshold)
    if args.json:
        print(json.dumps([g.to_dict() for g in groups], indent=2, ensure_ascii=False))
    else:
        print("\n".join(g.text() for g in groups) if groups else "no duplicates")
        print(f"{len(groups)} groups ({sum(g.kind == 'exact' for g in groups)} exact, "
              f"{sum(g.kind == 'near' for g in groups)} near)", file=sys.stderr)
    return 0


def dedup_main(argv: list[str] | None = None) -> int:
    return _run("dedup", _dedup, dedup_parser(), argv)


# --- florence serve ---------------------------------------------------------------------------------------------------


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="florence serve", description="A local web page over a collection: text and "
                                "image search, filters, tags, more-like-this; also adds files (the page's index box) "
                                "while it holds a Milvus Lite path.")
    _database_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=8.0)
    return p


def _serve(args: argparse.Namespace) -> int:
    with _open_index(args) as index:
        serve(index, host=args.host, port=args.port, max_upload_bytes=int(args.max_upload_mb * (1 << 20)))
    return 0


def serve_main(argv: list[str] | None = None) -> int:
    return _run("serve", _serve, serve_parser(), argv)
