"""``florence eval action`` (multi-view action recognition) and ``florence predict-video`` (top-5 actions of videos).

    florence eval action --model BUNDLE --videos DIR [--annotations ANN] [--classes FILE] [--clips 4] [--crops 3]
        [--output DIR] [--name NAME] [--batch-size N] [--max-videos N] [--decode-threads N] [--workers N]
    florence predict-video --model BUNDLE VIDEO... [--clips 4] [--crops 3] [--top 5] [--strip DIR]

``eval action`` reads Kinetics-style annotations (``path label`` lines, a CSV ``path,label`` or Kinetics
``label,youtube_id,time_start,time_end``, or class folders without ``--annotations``; ``florence.data.video``), tests
``clips x crops`` views per video (4 x 3 by default, probabilities averaged) and writes ``<output>/action_<name>.json``:
``metrics`` (``top1``, ``top5``, ``mean_per_class``; fractions), ``trivial_metrics``, ``views``, ``timing`` (decode vs
model seconds: decoding must not be the bottleneck), ``bad_samples`` (videos skipped as unreadable, by reason), and
the provenance the other evaluations carry (``protocol``, ``paper_metric``, ``model`` path + bundle SHA-256, ``data``
annotation file + SHA-256 and video count, ``versions``, ``args``, ``created``), plus a confusion-matrix PNG
``<output>/action_<name>_confusion.png``. ``<name>`` defaults to the annotation file's (or video folder's) stem.

``predict-video`` prints the top-k actions per video; ``--strip DIR`` also writes ``DIR/<video stem>.png``, the
frames of the first clip with the prediction.
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

from florence.adapters.action_eval import evaluate_action, predict_views
from florence.adapters.video_classifier import VideoClassifier
from florence.adapters.zeroshot import trivial_classification_metrics
from florence.benchmarks.draw_video import frame_strip_png
from florence.benchmarks.plots import confusion_matrix_png
from florence.bundle import bundle_sha256, from_pretrained, sha256_file
from florence.data.eval_loader import format_bad_report
from florence.data.video import VideoList, read_video_annotations, sample_clip_indices, video_eval_loader
from florence.data.video_decode import decode_frames, video_info
from florence.engine.metrics import library_versions
from florence.errors import FlorenceError

PROTOCOL_ID = "action-multiview-prob-avg-v1"  # mmaction2 SampleFrames(test_mode) x ThreeCrop, softmax averaged
PAPER_METRIC = "top-1 / top-5 accuracy, 4x3 views (Table 10: Kinetics-400 / 600)"


class VideoCLIError(FlorenceError, ValueError):
    """A ``florence eval action`` / ``predict-video`` option that cannot work."""


def load_classifier(path: str, device: str) -> VideoClassifier:
    model = from_pretrained(path, map_location=device)
    if not isinstance(model, VideoClassifier):
        raise VideoCLIError(f"{path}: a {type(model).__name__}, not a video classifier bundle")
    return model.eval()


# -- florence eval action ------------------------------------------------------------------------------------------


def build_eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="florence eval action", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="video-classifier bundle")
    p.add_argument("--videos", required=True, help="video folder")
    p.add_argument("--annotations", help="annotation file (default: class folders under --videos)")
    p.add_argument("--classes", help="class-name file, one per line in label order")
    p.add_argument("--clips", type=int, default=4, help="temporal clips per video")
    p.add_argument("--crops", type=int, default=3, choices=(1, 3), help="spatial crops per clip (1 centre, 3 three)")
    p.add_argument("--output", default="eval_results")
    p.add_argument("--name", help="result name (default: the annotation file's stem)")
    p.add_argument("--batch-size", type=int, default=4, help="videos per batch")
    p.add_argument("--max-videos", type=int, help="evaluate the first N videos only")
    p.add_argument("--decode-threads", type=int, default=0, help="PyAV decoding threads per video (0: FFmpeg's)")
    p.add_argument("--workers", type=int, default=1, help="decoding worker processes")
    p.add_argument("--on-bad-sample", choices=("skip", "raise"), default="skip")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def evaluate(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    start = time.perf_counter()
    model = load_classifier(args.model, args.device)
    videos = read_video_annotations(args.annotations, args.videos, classes=args.classes)
    if videos.class_names is not None and model.class_names is not None and videos.class_names != model.class_names:
        raise VideoCLIError(f"{args.classes or args.annotations}: the class names differ from the model's "
                            f"({videos.class_names[:3]}... vs {model.class_names[:3]}...)")
    loader = video_eval_loader(videos, preprocess=model.preprocess, num_clips=args.clips, num_crops=args.crops,
                               batch_size=args.batch_size, num_workers=args.workers, on_bad_sample=args.on_bad_sample,
                               decode_threads=args.decode_threads, max_videos=args.max_videos)
    out = evaluate_action(model, loader, device=args.device)
    name = args.name or Path(args.annotations or args.videos).stem
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    classnames = model.class_names or [str(i) for i in range(model.num_classes)]
    confusion = confusion_matrix_png(out["labels"], out["predictions"], classnames,
                                     out_dir / f"action_{name}_confusion.png",
                                     title=f"{name}: top-1 {100 * out['metrics']['top1']:.1f}%")
    data = {"videos": str(args.videos), "num_videos": len(videos), "evaluated": int(len(out["labels"]))}
    if args.annotations:
        data.update(annotations=str(args.annotations), annotations_sha256=sha256_file(Path(args.annotations)))
    result = {
        "task": "action", "dataset": name, "protocol": PROTOCOL_ID, "paper_metric": PAPER_METRIC,
        "metrics": out["metrics"], "trivial_metrics": trivial_classification_metrics(model.num_classes),
        "views": {"clips": args.clips, "crops": args.crops, "clip_len": model.preprocess["clip_len"],
                  "frame_interval": model.preprocess["frame_interval"], "size": model.preprocess["input_size"][-1]},
        "timing": {"decode_s": round(out["decode_s"], 2), "model_s": round(out["model_s"], 2)},
        "model": {"path": str(args.model), "sha256": bundle_sha256(args.model)}, "data": data,
        "bad_samples": loader.report(), "skipped_annotations": videos.skipped, "pictures": [str(confusion)],
        "versions": library_versions(), "args": vars(args).copy(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    result["wall_time_s"] = round(time.perf_counter() - start, 2)
    path = out_dir / f"action_{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    return path, result


def eval_main(argv: list[str] | None = None) -> int:
    args = build_eval_parser().parse_args(argv)
    try:
        path, result = evaluate(args)
    except FlorenceError as err:
        print(f"florence eval action: {err}", file=sys.stderr)
        return 2
    m, t = result["metrics"], result["timing"]
    print(f"action {result['dataset']}: top-1 {100 * m['top1']:.2f}%, top-5 {100 * m['top5']:.2f}%, mean per class "
          f"{100 * m['mean_per_class']:.2f}% on {result['data']['evaluated']} videos "
          f"({args.clips}x{args.crops} views; decode {t['decode_s']:.1f} s, model {t['model_s']:.1f} s)")
    line = format_bad_report(result["bad_samples"])
    if line:
        print(line)
    print(f"wrote {path}")
    return 0


# -- florence predict-video ----------------------------------------------------------------------------------------


def build_predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="florence predict-video", description="Top-k actions of your own videos.")
    p.add_argument("videos", nargs="+", help="video files")
    p.add_argument("--model", required=True, help="video-classifier bundle")
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--crops", type=int, default=3, choices=(1, 3))
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--strip", help="write a PNG strip of each video's first clip with the prediction into DIR")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def predict(args: argparse.Namespace) -> list[dict[str, Any]]:
    model = load_classifier(args.model, args.device)
    names = model.class_names or [str(i) for i in range(model.num_classes)]
    listing = VideoList(paths=[Path(v) for v in args.videos], labels=np.zeros(len(args.videos), np.int64),
                        class_names=None, name="videos", source="command line", entries=len(args.videos))
    loader = video_eval_loader(listing, preprocess=model.preprocess, num_clips=args.clips, num_crops=args.crops,
                               batch_size=1)
    out = predict_views(model, loader, device=args.device)  # no labels: probabilities only
    rows = []
    for probs, i in zip(out["probs"], out["index"]):
        path = Path(args.videos[i])
        order = np.argsort(-probs, kind="stable")[: args.top]
        row = {"video": str(path), "top": [(names[c], float(probs[c])) for c in order]}
        if args.strip:
            row["strip"] = str(_strip(path, model.preprocess, Path(args.strip), row["top"][0]))
        rows.append(row)
    for s in loader.report()["samples"]:
        rows.append({"video": s["file"], "error": s["reason"]})
    return rows


def _strip(path: Path, preprocess: dict[str, Any], out_dir: Path, top: tuple[str, float]) -> Path:
    """The first test clip's frames of ``path`` with the top prediction, as a PNG."""
    info = video_info(path)
    indices = sample_clip_indices(info.num_frames, preprocess["clip_len"], preprocess["frame_interval"], 1,
                                  test_mode=True)[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    return frame_strip_png(decode_frames(path, indices), out_dir / f"{path.stem}.png",
                           title=f"{path.name}: {top[0]} ({100 * top[1]:.1f}%)")


def predict_main(argv: list[str] | None = None) -> int:
    args = build_predict_parser().parse_args(argv)
    try:
        rows = predict(args)
    except FlorenceError as err:
        print(f"florence predict-video: {err}", file=sys.stderr)
        return 2
    for row in rows:
        if "error" in row:
            print(f"{row['video']}: skipped ({row['error']})")
            continue
        shown = ", ".join(f"{name} {100 * p:.1f}%" for name, p in row["top"])
        print(f"{row['video']}: {shown}" + (f"  [{row['strip']}]" if "strip" in row else ""))
    return 0


main = predict_main  # florence predict-video
