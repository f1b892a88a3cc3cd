"""``florence eval detection``: COCO evaluation of a detector bundle, or of any detector's results file.

    florence eval detection --model BUNDLE --annotations ANN.json --images DIR [--output DIR] [--name NAME]
        [--scales 1333x800,1600x1000] [--flip] [--max-images N] [--backend faster|pycocotools]
        [--text-model UNICL_BUNDLE [--classes a,b,c]]   # zero-shot: a class-agnostic BUNDLE's proposals named by a
                                                        # dual encoder among the (given) categories
    florence eval detection --predictions DETS.json --annotations ANN.json [--name NAME]

Writes ``<output>/detection_<name>.json``: ``metrics`` (the 12 COCO stats AP, AP50, AP75, APs, APm, APl, AR1, AR10,
AR100, ARs, ARm, ARl, plus AR50 / AR75, fractions in [0, 1]), ``per_class_AP``, and the provenance the other
evaluations carry (``protocol``, ``model`` path + bundle SHA-256, ``data`` manifest of the annotation file and
images, ``versions``, ``args``, bad-sample report); with a model also ``<output>/detections_<name>.json`` (COCO
results: xywh in original pixels, the annotation file's category ids) and ``detection_<name>.png`` (predictions beside
the ground truth for a few images). ``<name>`` defaults to the annotation file's stem. Scores come from
faster-coco-eval (bit-compatible with pycocotools, which ``--backend pycocotools`` uses instead).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from florence.adapters.coco_eval import STAT_NAMES, evaluate_detections
from florence.adapters.detection_eval import detect_dataset, split_scores, to_coco_results
from florence.adapters.zeroshot_detection import ProposalClassifier
from florence.benchmarks.draw_boxes import detection_grid_png
from florence.bundle import bundle_sha256, from_pretrained
from florence.data.detection import CocoDetection
from florence.data.images import decode_image
from florence.engine.metrics import library_versions
from florence.errors import FlorenceError

PROTOCOL_ID = "coco-detection-v1"  # 12 COCO stats (maxDets 1/10/100, 101 recall points), pycocotools semantics
ZEROSHOT_PROTOCOL_ID = "zeroshot-detection-crop-v1"  # class-agnostic proposals x crop-and-encode text classifier


class DetectionEvalError(FlorenceError, ValueError):
    """A bad ``florence eval detection`` option."""


def parse_scales(text: str | None) -> list[list[int]] | None:
    """``"1333x800,1600x1000"`` -> ``[[1333, 800], [1600, 1000]]`` (long x short)."""
    if not text:
        return None
    scales = []
    for part in text.split(","):
        try:
            long, short = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise DetectionEvalError(f"--scales {text!r}: expected LONGxSHORT[,LONGxSHORT...]") from None
        scales.append([long, short])
    return scales


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="florence eval detection", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="detector bundle directory (omit with --predictions)")
    p.add_argument("--annotations", required=True, help="COCO instances JSON (ground truth)")
    p.add_argument("--images", help="image folder of the annotation file's file_name entries")
    p.add_argument("--predictions", help="score this COCO results JSON instead of running a model")
    p.add_argument("--text-model", help="zero-shot: a dual-encoder bundle classifying the (class-agnostic) model's "
                   "proposals among the annotation file's categories (crop and encode)")
    p.add_argument("--classes", help="comma-separated category names or ids to evaluate (the zero-shot label set; "
                   "default: every category of the annotation file)")
    p.add_argument("--output", default="eval_results")
    p.add_argument("--name", help="result name (default: the annotation file's stem)")
    p.add_argument("--scales", help="test scales LONGxSHORT[,...] (default: the bundle's input scale)")
    p.add_argument("--flip", action="store_true", help="also detect on flipped images (merged by NMS)")
    p.add_argument("--max-images", type=int, help="evaluate the first N images (by id) only")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", choices=("faster", "pycocotools"), default="faster")
    p.add_argument("--pictures", type=int, default=6, help="images in the prediction / ground-truth PNG (0: none)")
    p.add_argument("--quiet", action="store_true")
    return p


def _class_list(text: str | None) -> list[str | int] | None:
    """``"Coat,Shirt"`` or ``"5,7"`` -> category names / ids (None: all)."""
    if not text:
        return None
    return [int(v) if v.strip().isdigit() else v.strip() for v in text.split(",") if v.strip()]


def data_manifest(annotations: Path, images: Path | None, dataset: CocoDetection | None) -> dict[str, Any]:
    """SHA-256 of the annotation file, and the image folder and count."""
    digest = hashlib.sha256(annotations.read_bytes()).hexdigest()
    manifest = {"annotations": str(annotations), "annotations_sha256": digest}
    if images is not None:
        manifest["images"] = str(images)
    if dataset is not None:
        manifest["num_images"] = len(dataset)
    return manifest


def _zero_shot(model, text_model: str, dataset: CocoDetection, predictions: dict, device: str,
               progress: bool) -> tuple[dict, list[int]]:
    """Proposals of a class-agnostic detector classified among the dataset's categories by a dual encoder."""
    if model.num_classes != 1:
        raise DetectionEvalError(f"--text-model needs a class-agnostic detector (1 class); {model.num_classes} found")
    classifier = ProposalClassifier(from_pretrained(text_model), dataset.class_names, device=device)
    out = {}
    for image_id, det in tqdm(predictions.items(), desc="classifying proposals", disable=not progress):
        out[image_id] = classifier(decode_image(dataset.image_path(image_id)), det)
    return out, list(dataset.cat_ids)


def evaluate(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    start = time.perf_counter()
    annotations = Path(args.annotations)
    name = args.name or annotations.stem
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"task": "detection", "dataset": name, "protocol": PROTOCOL_ID,
                              "paper_metric": "COCO AP@[.5:.95] (Table 6)", "versions": library_versions(),
                              "args": {k: v for k, v in vars(args).items()},
                              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.predictions:
        if args.model:
            raise DetectionEvalError("give --model or --predictions, not both")
        scored = evaluate_detections(annotations, args.predictions, backend=args.backend)
        result.update(model={"predictions": str(args.predictions)}, data=data_manifest(annotations, None, None))
        dataset = None
    else:
        if not args.model or not args.images:
            raise DetectionEvalError("--model and --images are required (or score a file with --predictions)")
        model = from_pretrained(args.model, map_location=args.device).eval()
        dataset = CocoDetection(annotations, args.images, max_images=args.max_images,
                                class_subset=_class_list(args.classes))
        with tqdm(total=len(dataset), desc="detecting", unit="img", disable=args.quiet) as bar:
            predictions, report = detect_dataset(model, dataset, device=args.device, batch_size=args.batch_size,
                                                 scales=parse_scales(args.scales), flip=args.flip,
                                                 progress=bar.update)
        cat_ids = model.cat_ids
        if args.text_model:
            predictions, cat_ids = _zero_shot(model, args.text_model, dataset, predictions, args.device,
                                              not args.quiet)
            result.update(protocol=ZEROSHOT_PROTOCOL_ID,
                          text_model={"path": str(args.text_model), "sha256": bundle_sha256(args.text_model)})
        elif sorted(cat_ids) != sorted(dataset.cat_ids):
            raise DetectionEvalError(f"the detector's categories {cat_ids} differ from {annotations}'s "
                                     f"{list(dataset.cat_ids)}")
        detections = to_coco_results(predictions, cat_ids)
        scored = evaluate_detections(dataset.coco_json(), detections, backend=args.backend)
        dets_path = out / f"detections_{name}.json"
        dets_path.write_text(json.dumps(detections))
        result.update(model={"path": str(args.model), "sha256": bundle_sha256(args.model)},
                      data=data_manifest(annotations, Path(args.images), dataset), bad_samples=report,
                      detections=str(dets_path),
                      test={"scales": parse_scales(args.scales) or [model.input_cfg["scale"]], "flip": args.flip,
                            **model.test_cfg})
        if args.pictures:
            png = out / f"detection_{name}.png"
            detection_grid_png(dataset, predictions, cat_ids, png, count=args.pictures)
            result["pictures"] = [str(png)]
    metrics, per_class = split_scores(scored)
    result.update(metrics=metrics, per_class_AP=per_class, wall_time_s=round(time.perf_counter() - start, 2))
    path = out / f"detection_{name}.json"
    path.write_text(json.dumps(result, indent=2))
    return path, result


def summary_lines(result: dict[str, Any]) -> list[str]:
    m = result["metrics"]
    lines = [f"detection {result['dataset']}: " + ", ".join(f"{k} {m[k]:.3f}" for k in STAT_NAMES + ("AR50", "AR75")
                                                            if k in m)]
    report = result.get("bad_samples") or {}
    if report.get("skipped"):
        lines.append(f"skipped {report['skipped']} unreadable images: {report.get('by_reason')}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path, result = evaluate(args)
    except FlorenceError as err:
        print(f"florence eval detection: {err}", file=sys.stderr)
        return 2
    for line in summary_lines(result):
        print(line)
    print(f"result: {path}")
    for picture in result.get("pictures", []):
        print(f"picture: {picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
