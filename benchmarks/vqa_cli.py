"""``florence eval vqa``: the official VQA accuracy of a METER bundle, or of any model's results file.

    florence eval vqa --model BUNDLE --questions Q.json [--annotations A.json] --images DIR [--output DIR]
        [--name NAME] [--batch-size N] [--max-questions N] [--pictures N] [--image-pattern PATTERN]
    florence eval vqa --predictions RESULTS.json --annotations A.json [--questions Q.json] [--name NAME]

Files are the official VQAv2 ones (questions ``{"questions": [{"question_id", "image_id", "question"}]}``,
annotations ``{"annotations": [{"question_id", "answer_type", "question_type", "answers": [10 x {"answer"}]}]}``,
images ``COCO_<data_subtype>_<image_id:012d>.jpg`` or ``.png`` unless ``--image-pattern`` says otherwise).

Writes ``<output>/vqa_<name>.json``: ``metrics`` (``overall``, ``perAnswerType`` yes/no / number / other,
``perQuestionType``, ``num_questions``; percent, rounded to 2 decimals as the official evaluator prints them, SPEC
§9.1), the provenance the other evaluations carry (``protocol``, ``model`` path + bundle SHA-256 or the scored
results file + its SHA-256, ``data``: question / annotation files with their SHA-256 and the image folder,
``versions``, ``args``, ``created``) and ``bad_samples`` (questions whose image could not be read: left out of the
results and of the scores); with a model also ``<output>/vqa_<name>_results.json``, the EvalAI results file
``[{"question_id": int, "answer": str}]``, and with ``--pictures N`` ``<output>/vqa_<name>.png`` (N questions with
their image, the prediction and the ground truth). Without ``--annotations`` (VQAv2 test-dev / test-std, scored on
EvalAI only) just the results file is written. ``<name>`` defaults to the questions file's stem without
``v2_OpenEnded_`` / ``_questions`` (``mscoco_val2014``).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from florence.adapters.vqa_eval import ANSWER_TYPES, evaluate_vqa
from florence.adapters.vqa_metric import vqa_accuracy
from florence.benchmarks.draw_vqa import draw_vqa
from florence.bundle import bundle_sha256, from_pretrained, sha256_file
from florence.data.eval_loader import format_bad_report
from florence.engine.metrics import library_versions
from florence.errors import FlorenceError

PROTOCOL_ID = "vqav2-official-accuracy-v1"  # GT-Vision-Lab/VQA vqaEval.py: 10-choose-9 average, min(1, matches / 3)
PAPER_METRIC = "VQA accuracy (Table 8: VQAv2 test-dev / test-std)"
_NAME_AFFIXES = re.compile(r"^(v2_)?(OpenEnded_)?|(_questions|_annotations)$")


class VQAEvalError(FlorenceError, ValueError):
    """A ``florence eval vqa`` option that cannot work (results-file problems are the metric's VQAResultsError)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="florence eval vqa", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="METER bundle with a VQA head (omit with --predictions)")
    p.add_argument("--questions", help="VQAv2 questions JSON")
    p.add_argument("--annotations", help="VQAv2 annotations JSON (omit for test-dev / test-std: results file only)")
    p.add_argument("--images", help="image folder of the questions' images")
    p.add_argument("--image-pattern", help="image file name per question, e.g. '{image_id}.png' (default: "
                   "COCO_{data_subtype}_{image_id:012d}.jpg, or .png)")
    p.add_argument("--predictions", help="score this results JSON [{question_id, answer}] instead of running a model")
    p.add_argument("--output", default="eval_results")
    p.add_argument("--name", help="result name (default: from the questions file's name)")
    p.add_argument("--max-questions", type=int, help="answer and score the first N questions only")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--pictures", type=int, default=0, help="questions drawn in a PNG (0: none)")
    p.add_argument("--quiet", action="store_true")
    return p


def default_name(path: str | Path) -> str:
    """``v2_OpenEnded_mscoco_val2014_questions.json`` -> ``mscoco_val2014``."""
    return _NAME_AFFIXES.sub("", Path(path).stem) or Path(path).stem


def data_manifest(args: argparse.Namespace, dataset=None) -> dict[str, Any]:
    """Paths and SHA-256 of the question and annotation files, the image folder and the question count."""
    manifest: dict[str, Any] = {}
    for key in ("questions", "annotations"):
        path = getattr(args, key)
        if path:
            manifest.update({key: str(path), f"{key}_sha256": sha256_file(Path(path))})
    if args.images:
        manifest["images"] = str(args.images)
    if dataset is not None:
        manifest["num_questions"] = len(dataset)
    return manifest


def public_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The official metrics without the per-question accuracies."""
    return {k: v for k, v in metrics.items() if k != "per_question"}


def _score_file(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if args.model:
        raise VQAEvalError("give --model or --predictions, not both")
    if not args.annotations:
        raise VQAEvalError("--predictions needs --annotations (the ground truth to score against)")
    # the official evaluator's checks (vqa_metric): the results answer exactly the annotated questions, and these
    # are questions of the questions file
    metrics = vqa_accuracy(args.predictions, args.annotations, args.questions)
    result.update(model={"predictions": str(args.predictions), "sha256": sha256_file(Path(args.predictions))},
                  data=data_manifest(args), metrics=public_metrics(metrics))


def _pictures(out: dict[str, Any], count: int, path: Path) -> Path:
    """``count`` questions spread over the evaluated ones, drawn with their prediction and ground truth."""
    dataset, predictions = out["dataset"], out["predictions"]
    position = {int(qid): i for i, qid in enumerate(dataset.question_ids.tolist())}
    per_question = (out["metrics"] or {}).get("per_question", {})
    count = min(count, len(predictions))
    chosen = sorted({round(i * (len(predictions) - 1) / max(1, count - 1)) for i in range(count)})  # evenly spread
    samples = []
    for p in (predictions[i] for i in chosen):
        q = dataset[position[p["question_id"]]]
        samples.append({"image": q.image, "question": q.question, "prediction": p["answer"], "score": p["score"],
                        "answers": q.answers, "ground_truth": q.multiple_choice_answer,
                        "accuracy": per_question.get(p["question_id"])})
    draw_vqa(samples, path)
    return path


def _run_model(args: argparse.Namespace, result: dict[str, Any], out_dir: Path, name: str) -> None:
    if not args.questions or not args.images:
        raise VQAEvalError("--model needs --questions and --images (or score a results file with --predictions)")
    model = from_pretrained(args.model, map_location=args.device)
    if "vqa" not in getattr(model, "heads", ()) or not getattr(model, "answers", None):
        raise VQAEvalError(f"{args.model}: not a VQA model (a METER bundle with a vqa head)")
    with tqdm(desc="answering", unit="q", disable=args.quiet) as bar:
        out = evaluate_vqa(model, args.questions, args.annotations, args.images, batch_size=args.batch_size,
                           device=args.device, max_questions=args.max_questions, image_pattern=args.image_pattern,
                           progress=bar.update)
    results_path = out_dir / f"vqa_{name}_results.json"
    results_path.write_text(json.dumps(out["results"]))
    result.update(model={"path": str(args.model), "sha256": bundle_sha256(args.model),
                         "num_answers": len(model.answers)},
                  data=data_manifest(args, out["dataset"]), bad_samples=out["report"], results=str(results_path))
    if out["metrics"] is not None:
        result["metrics"] = public_metrics(out["metrics"])
    if args.pictures > 0 and out["predictions"]:
        result["pictures"] = [str(_pictures(out, args.pictures, out_dir / f"vqa_{name}.png"))]


def evaluate(args: argparse.Namespace) -> tuple[Path | None, dict[str, Any]]:
    """Score a results file or run a model; returns the path of ``vqa_<name>.json`` (None without annotations)
    and the result."""
    start = time.perf_counter()
    source = args.questions or args.annotations
    if not source:
        raise VQAEvalError("--questions (and --annotations to score) are required")
    name = args.name or default_name(source)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"task": "vqa", "dataset": name, "protocol": PROTOCOL_ID, "paper_metric": PAPER_METRIC,
                              "metrics": None, "metrics_unit": "percent", "versions": library_versions(),
                              "args": vars(args).copy(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.predictions:
        _score_file(args, result)
    else:
        if not args.model:
            raise VQAEvalError("give --model BUNDLE (or score a results file with --predictions)")
        _run_model(args, result, out_dir, name)
    result["wall_time_s"] = round(time.perf_counter() - start, 2)
    if result["metrics"] is None:
        return None, result
    path = out_dir / f"vqa_{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    return path, result


def summary_lines(result: dict[str, Any]) -> list[str]:
    """What the console shows: overall and per answer type, skipped images, or where the results file went."""
    lines = []
    metrics = result.get("metrics")
    if metrics is not None:
        types = metrics.get("perAnswerType", {})
        shown = ", ".join(f"{t} {types[t]:.2f}" for t in ANSWER_TYPES if t in types)
        lines.append(f"vqa {result['dataset']}: overall {metrics['overall']:.2f}% ({shown}) on "
                     f"{metrics.get('num_questions', '?')} questions")
    else:
        lines.append(f"vqa {result['dataset']}: no --annotations, nothing scored (VQAv2 test-dev / test-std are "
                     f"scored on EvalAI: upload {result['results']})")
    report = result.get("bad_samples") or {}
    kept = report.get("dataset") or {}
    if kept.get("counts"):
        notes = ", ".join(f"{k}: {v}" for k, v in kept["counts"].items())
        lines.append(f"questions left out of {kept['file']}: {sum(kept['counts'].values())} [{notes}]")
    line = format_bad_report(report)
    if line:
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path, result = evaluate(args)
    except FlorenceError as err:
        print(f"florence eval vqa: {err}", file=sys.stderr)
        return 2
    for line in summary_lines(result):
        print(line)
    if path is not None:
        print(f"result: {path}")
    if "results" in result:
        print(f"results file (EvalAI): {result['results']}")
    for picture in result.get("pictures", []):
        print(f"picture: {picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
