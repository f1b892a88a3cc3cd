"""``florence eval video-retrieval``: zero-shot text<->video retrieval of a dual-encoder bundle (SPEC §8.9).

    florence eval video-retrieval --model BUNDLE --captions FILE --videos DIR [--frames 8] [--pooling mean]
        [--output DIR] [--name NAME] [--batch-size N] [--max-videos N] [--decode-threads N] [--workers N]
        [--on-bad-sample skip|raise] [--precision fp32|bf16] [--device DEV] [--quiet]

``--captions``: MSR-VTT 1K-A style, a CSV ``video_id,sentence`` (``MSRVTT_JSFUSION_test.csv``), a CSV
``video,caption`` (``florence.benchmarks.moving_fmnist``'s ``captions_<split>.csv``) or a JSON list of
``{"video" | "video_id", "caption" | "sentence"}``; videos are ``<videos>/<video_id>.mp4`` (or the given relative
path). Each video is ``--frames`` segment-centre frames through the image tower, mean-pooled
(:mod:`florence.adapters.video_retrieval`).

Writes ``<output>/video_retrieval_<name>.json``: ``metrics`` (``text_to_video_R@1/5/10``, ``video_to_text_R@1/5/10``
as fractions, ``text_to_video_median_rank`` / ``video_to_text_median_rank`` as ranks; the same with a
``_same_caption`` suffix, where a video or caption with an identical caption text also counts as correct: the strict
metrics are bounded by chance where many videos share a caption, and are the ones to compare with Table 9),
``trivial_metrics``, ``sampling`` (frames, rule, pooling), ``timing`` (decode vs model seconds), ``bad_samples``
(videos skipped as unreadable, by reason, and ``captions_dropped`` with them) and the provenance the other evaluations
carry (``protocol``, ``paper_metric``, ``model`` path + bundle SHA-256, ``data`` caption file + SHA-256, video
folder and counts, ``precision``, ``versions``, ``args``, ``created``). ``<name>`` defaults to the caption file's stem
(``captions_<split>`` -> ``<folder>_<split>``). Errors a user can fix end with one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from florence.adapters.video_retrieval import POOLINGS, SAME_CAPTION, evaluate_video_retrieval, load_video_captions
from florence.bundle import bundle_sha256, from_pretrained, sha256_file
from florence.data.eval_loader import format_bad_report
from florence.engine.metrics import library_versions
from florence.engine.precision import build_precision
from florence.errors import FlorenceError

PROTOCOL_ID = "video-retrieval-segment-frames-pooled-v1"  # segment-centre frames, image embeddings pooled, R@K + MedR
PAPER_METRIC = "MSR-VTT 1K-A zero-shot text->video R@K (Table 9)"


class VideoRetrievalError(FlorenceError, ValueError):
    """A ``florence eval video-retrieval`` option that cannot work."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="florence eval video-retrieval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="dual-encoder (UniCL) bundle")
    p.add_argument("--captions", required=True, help="CSV (video_id,sentence or video,caption) or JSON caption file")
    p.add_argument("--videos", required=True, help="video folder")
    p.add_argument("--frames", type=int, default=8, help="frames per video (centres of equal segments)")
    p.add_argument("--pooling", choices=POOLINGS, default="mean",
                   help="mean of the normalised frame embeddings (default) or of the unnormalised projections")
    p.add_argument("--output", default="eval_results")
    p.add_argument("--name", help="result name (default: from the caption file's name)")
    p.add_argument("--batch-size", type=int, default=8, help="videos per image forward")
    p.add_argument("--max-videos", type=int, help="evaluate the first N videos (and their captions) only")
    p.add_argument("--decode-threads", type=int, default=0, help="PyAV decoding threads per video (0: FFmpeg's)")
    p.add_argument("--workers", type=int, default=0, help="decoding worker processes")
    p.add_argument("--on-bad-sample", choices=("skip", "raise"), default="skip")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quiet", action="store_true")
    return p


def default_name(captions: str | Path) -> str:
    """``MSRVTT_JSFUSION_test.csv`` -> ``MSRVTT_JSFUSION_test``; ``mfmnist/captions_test.csv`` -> ``mfmnist_test``."""
    path = Path(captions)
    folder = path.resolve().parent.name
    if path.stem.startswith("captions_") and folder:
        return f"{folder}_{path.stem.removeprefix('captions_')}"
    return path.stem


def _check(args: argparse.Namespace) -> None:
    checks = (("--frames", args.frames), ("--batch-size", args.batch_size), ("--max-videos", args.max_videos))
    for flag, value in checks:
        if value is not None and value < 1:
            raise VideoRetrievalError(f"{flag} must be at least 1, got {value}")
    if not Path(args.videos).is_dir():
        raise VideoRetrievalError(f"--videos {args.videos}: not a folder")


def evaluate(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """Run the evaluation; returns the path of ``video_retrieval_<name>.json`` and the result."""
    start = time.perf_counter()
    _check(args)
    pairs = load_video_captions(args.captions, args.videos)
    listed = {"num_videos": len(pairs.image_paths), "num_captions": len(pairs.captions)}
    if args.max_videos is not None and args.max_videos < len(pairs.image_paths):
        pairs = pairs.keep_images(np.arange(args.max_videos))
    model = from_pretrained(args.model, map_location=args.device)
    device = torch.device(args.device)
    name = args.name or default_name(args.captions)
    out = evaluate_video_retrieval(
        model, pairs.image_paths, pairs.captions, pairs.text_to_image, num_frames=args.frames,
        batch_size=args.batch_size, device=device, pooling=args.pooling, same_caption_positive=True,
        on_bad_sample=args.on_bad_sample, num_workers=args.workers, decode_threads=args.decode_threads,
        autocast=build_precision(args.precision, device).autocast, progress=not args.quiet, name=name)
    data = {"captions": str(args.captions), "captions_sha256": sha256_file(Path(args.captions)),
            "videos": str(args.videos), **listed, "max_videos": args.max_videos,
            "evaluated_videos": len(out["videos"]), "evaluated_captions": len(out["captions"]),
            "distinct_captions": len(set(out["captions"]))}
    result: dict[str, Any] = {
        "task": "video-retrieval", "dataset": name, "protocol": PROTOCOL_ID, "paper_metric": PAPER_METRIC,
        "metrics": out["metrics"], "metrics_unit": "fraction (R@K), rank (median_rank)",
        "trivial_metrics": out["trivial_metrics"],
        "sampling": {"frames": args.frames, "rule": "centre frame of each of `frames` equal segments",
                     "pooling": args.pooling},
        "timing": {k: round(v, 2) for k, v in out["timing"].items()},
        "model": {"path": str(args.model), "sha256": bundle_sha256(args.model)}, "data": data,
        "bad_samples": out["bad_samples"], "precision": args.precision, "versions": library_versions(),
        "args": vars(args).copy(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    result["wall_time_s"] = round(time.perf_counter() - start, 2)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"video_retrieval_{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    return path, result


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The console table: R@1/5/10 (percent) and median rank per direction, strict and same-caption."""
    m, data, trivial = result["metrics"], result["data"], set(result.get("trivial_metrics", []))
    lines = [f"video-retrieval {result['dataset']}: {data['evaluated_videos']} videos, {data['evaluated_captions']} "
             f"captions ({data['distinct_captions']} distinct), {result['sampling']['frames']} frames, "
             f"{result['sampling']['pooling']} pooling",
             f"{'(R@K in %, MdR: median rank)':28}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'MdR':>8}"]
    for suffix, label in (("", ""), (SAME_CAPTION, " (same caption)")):
        for direction, arrow in (("text_to_video", "text->video"), ("video_to_text", "video->text")):
            if f"{direction}_median_rank{suffix}" not in m:
                continue
            cells = "".join(f"{100 * m[f'{direction}_R@{k}{suffix}']:7.2f}"
                            + ("*" if f"{direction}_R@{k}{suffix}" in trivial else " ") for k in (1, 5, 10))
            lines.append(f"{arrow + label:28}{cells}{m[f'{direction}_median_rank{suffix}']:8g}")
    if trivial:
        lines.append("* trivial: K >= the number of candidates (1.0 whatever the model)")
    timing = result["timing"]
    lines.append(f"decode {timing['decode_s']:.1f} s, image tower {timing['model_s']:.1f} s, "
                 f"text {timing['text_s']:.1f} s")
    line = format_bad_report(result["bad_samples"])
    if line:
        lines.append(f"{line}; captions dropped with them: {result['bad_samples']['captions_dropped']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path, result = evaluate(args)
    except FlorenceError as err:  # a user-fixable problem: one line; anything else is a bug and keeps its traceback
        print(f"florence eval video-retrieval: {err}", file=sys.stderr)
        return 2
    for line in summary_lines(result):
        print(line)
    print(f"result: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
