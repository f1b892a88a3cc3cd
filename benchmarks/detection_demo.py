"""``florence demo detection``: Fashion-MNIST detection end to end on a CPU, from nothing to pictures.

1. generate the canvases (``florence.benchmarks.detection_canvas``: 5,000 train / 500 test 128x128 canvases with 1-6
   real Fashion-MNIST items each, COCO format);
2. pre-train the demo's UniCL dual encoder first if ``--backbone`` (default ``runs/demo/pretrain/final``) is absent
   (what ``florence demo`` does);
3. fine-tune the DyHead / ATSS detector on it (``configs/detection/fashion_mnist_dyhead.yaml``);
4. evaluate on the 500 test canvases (``florence eval detection``: the 12 COCO stats, per-class AP, a PNG of
   predictions beside the ground truth) and draw the detections of a few canvases (``florence detect``).

Finished steps in the work directory are reused (a killed fine-tuning run resumes from its last checkpoint).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from florence.benchmarks import detect, detection_canvas, detection_cli
from florence.benchmarks.demo_steps import Steps, ensure_unicl_bundle, finetune, packaged_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="florence demo detection", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/detection_demo", help="canvases, run, results and pictures")
    parser.add_argument("--backbone", default="runs/demo/pretrain/final",
                        help="the UniCL bundle to start from (trained first by `florence demo` when absent)")
    parser.add_argument("--config", default=None, help="fine-tuning YAML (default: the packaged recipe)")
    parser.add_argument("--train-canvases", type=int, default=5000)
    parser.add_argument("--test-canvases", type=int, default=500)
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the fine-tuning config")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir)
    canvases, run_dir, results = workdir / "canvases", workdir / "finetune", workdir / "results"
    step = Steps()

    step(f"canvases: {args.train_canvases} train / {args.test_canvases} test in {canvases}")
    detection_canvas.main(["--out", str(canvases), "--train", str(args.train_canvases),
                           "--test", str(args.test_canvases)])
    backbone = Path(args.backbone)
    if code := ensure_unicl_bundle(backbone, step):
        return code
    bundle = run_dir / "final"
    annotations = canvases / "annotations"
    config = args.config or str(packaged_config("detection", "fashion_mnist_dyhead.yaml"))
    if code := finetune(config, run_dir, [f"model.backbone={backbone}",
                                          f"data.annotations={annotations / 'instances_train.json'}",
                                          f"data.images={canvases / 'train'}",
                                          f"eval.source.annotations={annotations / 'instances_test.json'}",
                                          f"eval.source.images={canvases / 'test'}", "eval.at_end=false",
                                          *args.overrides], "the DyHead / ATSS detector on the training canvases",
                        step):
        return code
    trained_at = step.elapsed()
    step("COCO evaluation on the test canvases")
    if code := detection_cli.main(["--model", str(bundle), "--annotations",
                                   str(canvases / "annotations" / "instances_test.json"),
                                   "--images", str(canvases / "test"), "--output", str(results),
                                   "--name", "fashion_mnist_canvases", "--quiet"]):
        return code
    step("detections drawn on a few test canvases")
    samples = sorted((canvases / "test").glob("*.png"))[:4]
    if code := detect.main(["--model", str(bundle), *map(str, samples), "--output", str(results / "pictures")]):
        return code
    metrics = json.loads((results / "detection_fashion_mnist_canvases.json").read_text())["metrics"]
    print(f"\n== detection demo finished in {step.elapsed():.0f}s (through fine-tuning "
          f"{trained_at:.0f}s)")
    print(f"  test canvases: AP {metrics['AP']:.3f}, AP50 {metrics['AP50']:.3f}, AP75 {metrics['AP75']:.3f}")
    print(f"  detector bundle: {bundle}")
    print(f"  results: {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
