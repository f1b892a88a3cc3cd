"""``florence demo vqa``: Fashion-MNIST VQA end to end on a CPU, from nothing to pictures.

1. generate the data (``florence.benchmarks.vqa_canvas``: 4,000 train / 400 test 96x96 canvases of real Fashion-MNIST
   items, five questions each with ten annotators' answers, VQAv2 format);
2. pre-train the demo's UniCL dual encoder first if ``--backbone`` (default ``runs/demo/pretrain/final``) is absent
   (what ``florence demo`` does);
3. fine-tune the METER model on it (``configs/vqa/fashion_mnist_meter.yaml``); with ``--baseline`` also the same
   recipe without co-attention (``fusion.num_layers=0``: pooled image and text features straight into the head);
4. evaluate on the 2,000 test questions with the official VQA metric (``florence eval vqa``: overall, per answer type
   and question type, the EvalAI results file, a PNG of a few questions) and answer one question
   (``florence vqa``).

Finished steps in the work directory are reused (a killed fine-tuning run resumes from its last checkpoint).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from florence.benchmarks import vqa_canvas, vqa_cli, vqa_predict
from florence.benchmarks.demo_steps import Steps, ensure_unicl_bundle, finetune, packaged_config
from florence.data.vqa import VQADataset


def data_overrides(data: Path) -> list[str]:
    """The recipe's data and evaluation paths pointed at the generated files in ``data``."""
    train = (f"{{questions: {data / 'v2_OpenEnded_fmnist_train_questions.json'}, "
             f"annotations: {data / 'v2_fmnist_train_annotations.json'}, images: {data / 'train'}}}")
    return [f"data.sources=[{train}]",
            f"eval.source.questions={data / 'v2_OpenEnded_fmnist_test_questions.json'}",
            f"eval.source.annotations={data / 'v2_fmnist_test_annotations.json'}",
            f"eval.source.images={data / 'test'}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="florence demo vqa", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/vqa_demo", help="data, runs, results and pictures")
    parser.add_argument("--backbone", default="runs/demo/pretrain/final",
                        help="the UniCL bundle to start from (trained first by `florence demo` when absent)")
    parser.add_argument("--config", default=None, help="fine-tuning YAML (default: the packaged recipe)")
    parser.add_argument("--train-images", type=int, default=4000, help="training canvases (5 questions each)")
    parser.add_argument("--test-images", type=int, default=400, help="test canvases (5 questions each)")
    parser.add_argument("--baseline", action="store_true",
                        help="also fine-tune and evaluate the same recipe without co-attention")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the fine-tuning config")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir)
    data, results = workdir / "data", workdir / "results"
    step = Steps()

    step(f"data: {args.train_images} train / {args.test_images} test canvases in {data}")
    if code := vqa_canvas.main(["--out", str(data), "--train-images", str(args.train_images),
                                "--test-images", str(args.test_images)]):
        return code
    backbone = Path(args.backbone)
    if code := ensure_unicl_bundle(backbone, step):
        return code
    config = args.config or str(packaged_config("vqa", "fashion_mnist_meter.yaml"))
    runs = {"meter": ([], "co-attention (METER)")}
    if args.baseline:
        runs["concat"] = (["model.overrides.fusion.num_layers=0"], "baseline without co-attention")
    figures = {}
    for name, (extra, title) in runs.items():
        run_dir = workdir / f"finetune_{name}"
        bundle = run_dir / "final"
        if code := finetune(config, run_dir, [f"model.backbone={backbone}", *data_overrides(data), "eval.at_end=false",
                                              *args.overrides, *extra], title, step):
            return code
        step(f"{title}: official VQA accuracy on the test questions")
        if code := vqa_cli.main(["--model", str(bundle),
                                 "--questions", str(data / "v2_OpenEnded_fmnist_test_questions.json"),
                                 "--annotations", str(data / "v2_fmnist_test_annotations.json"),
                                 "--images", str(data / "test"), "--output", str(results),
                                 "--name", f"fashion_mnist_{name}", "--pictures", "8"]):
            return code
        figures[title] = json.loads((results / f"vqa_fashion_mnist_{name}.json").read_text())["metrics"]

    step("the first test question answered (`florence vqa`)")
    first = VQADataset(data / "v2_OpenEnded_fmnist_test_questions.json", None, data / "test", max_questions=1)
    if code := vqa_predict.main(["--model", str(workdir / "finetune_meter" / "final"), str(first.image_path(0)),
                                 first.question(0)]):
        return code

    print(f"\n== VQA demo finished in {step.elapsed():.0f}s")
    for title, metrics in figures.items():
        types = metrics["perAnswerType"]
        print(f"  {title}: overall {metrics['overall']:.2f}, yes/no {types.get('yes/no', float('nan')):.2f}, "
              f"number {types.get('number', float('nan')):.2f}, other {types.get('other', float('nan')):.2f}")
    print(f"  results and pictures: {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
