"""``florence detect --model BUNDLE IMAGE... [--labels "a,b,c" --text-model UNICL_BUNDLE] [--output DIR] [--json]``:
detect objects in your own images.

- A detector bundle detects its own classes (the names in the bundle).
- With ``--labels`` (and ``--text-model``, a dual-encoder bundle) a class-agnostic detector's proposals are classified
  zero-shot among the labels you give (``florence.adapters.zeroshot_detection``: crop and encode, prompt-ensembled
  class names), so categories the detector never saw are detected.

Each image is resized as the bundle's test scale says (keep ratio, padded), detected, and its boxes mapped back to
the image's pixels. Output: ``<output>/<image stem>.detections.png`` with the boxes, class names and scores drawn
(boxes with score ≥ ``--score-thr``), ``<output>/detections.json``, and a table on stdout or, with ``--json``, that
JSON object ``{"model", "predictions": [{"file", "picture", "detections": [{"label", "score", "box": [x1, y1, x2,
y2]}]}], "skipped": [...]}``.
A missing or unreadable image stops with a one-line error naming it; ``--on-bad-sample skip`` skips and lists it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from florence.adapters.detection_eval import to_original
from florence.adapters.zeroshot_detection import ProposalClassifier
from florence.benchmarks.draw_boxes import draw_detections
from florence.benchmarks.predict import parse_labels
from florence.bundle import from_pretrained
from florence.data.detection import detection_inputs
from florence.data.images import BadSample, decode_image
from florence.errors import FlorenceError


class DetectError(FlorenceError, ValueError):
    """A bad ``florence detect`` option."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="florence detect", description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--model", required=True, help="detector bundle directory")
    p.add_argument("--labels", help="zero-shot: comma-separated class names (needs --text-model)")
    p.add_argument("--labels-file", help="zero-shot: a file with one class name a line")
    p.add_argument("--text-model", help="zero-shot: the dual-encoder bundle that classifies the proposals")
    p.add_argument("--output", default="detections", help="directory for the pictures")
    p.add_argument("--score-thr", type=float, default=0.3, help="boxes drawn and listed from this score")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--on-bad-sample", choices=("raise", "skip"), default="raise")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def detect(args: argparse.Namespace) -> dict:
    labels = parse_labels(args.labels, args.labels_file)
    model = from_pretrained(args.model, map_location=args.device).eval()
    if not hasattr(model, "predict") or not hasattr(model, "input_cfg"):
        raise DetectError(f"{args.model} is not a detector bundle")
    classifier = None
    if labels is not None:
        if not args.text_model:
            raise DetectError("--labels needs --text-model (the dual encoder that names the proposals)")
        if model.num_classes != 1:
            print(f"florence detect: note: {args.model} has {model.num_classes} classes; its boxes are re-labelled "
                  "zero-shot", file=sys.stderr)
        classifier = ProposalClassifier(from_pretrained(args.text_model), labels, device=args.device)
        names = labels
    else:
        names = model.class_names or [str(c) for c in model.cat_ids]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    predictions, skipped = [], []
    for file in args.images:
        try:
            image = decode_image(file)
        except BadSample as err:
            if args.on_bad_sample == "raise":
                raise DetectError(str(err)) from None
            skipped.append({"file": str(file), "reason": err.reason})
            continue
        batch = detection_inputs([image], model.preprocess, scale=model.input_cfg["scale"],
                                 size_divisor=model.input_cfg["size_divisor"])
        det = model.predict(batch["images"].to(args.device), batch["image_sizes"].to(args.device))[0]
        det = to_original(det, batch, 0)
        if classifier is not None:
            det = classifier(image, det)
        keep = det["scores"] >= args.score_thr
        boxes, scores, classes = det["boxes"][keep], det["scores"][keep], det["labels"][keep]
        png = out / f"{Path(file).stem}.detections.png"
        draw_detections(image, boxes.tolist(), classes.tolist(), names, scores.tolist()).save(png)
        predictions.append({"file": str(file), "picture": str(png), "detections": [
            {"label": names[int(c)], "score": round(float(s), 4), "box": [round(float(v), 1) for v in b]}
            for b, s, c in zip(boxes, scores, classes)]})
    result = {"model": str(args.model), "predictions": predictions, "skipped": skipped}
    (out / "detections.json").write_text(json.dumps(result, indent=2))
    return result


def format_table(result: dict) -> str:
    lines = []
    for p in result["predictions"]:
        lines.append(f"{p['file']}: {len(p['detections'])} objects ({p['picture']})")
        for d in p["detections"]:
            x1, y1, x2, y2 = d["box"]
            lines.append(f"  {d['label']:<20} {d['score']:.3f}  [{x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}]")
    for s in result["skipped"]:
        lines.append(f"skipped {s['file']}: {s['reason']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with torch.no_grad():
            result = detect(args)
    except FlorenceError as err:
        print(f"florence detect: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
