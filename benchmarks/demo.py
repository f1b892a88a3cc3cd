"""``florence demo``: the end-to-end run on real data, from nothing to a report, on a CPU.

1. pre-train the small dual encoder of ``configs/pretrain/fashion_mnist.yaml`` on the 60,000 Fashion-MNIST training
   images (UniCL, image-label data through prompt templates);
2. evaluate the final bundle zero-shot (ten class prompts, template-ensembled) on the 10,000 test images;
3. evaluate it by linear probe (CLIP protocol: L-BFGS logistic regression, C chosen on a validation split carved from
   the training images) on the same test images;
4. write the JSON results, the confusion matrices and a Markdown report beside the paper's numbers.

A finished pre-training run in the work directory is reused (a killed one resumes from its last checkpoint).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path

from florence.benchmarks import detection_demo, search_demo, video_demo, vqa_demo


def default_config() -> Path:
    return Path(str(resources.files("florence.configs") / "pretrain" / "fashion_mnist.yaml"))


def main(argv: list[str] | None = None) -> int:
    from florence.benchmarks import eval_cli, report
    from florence.engine import train

    if argv and argv[0] == "detection":  # the detection demo
        return detection_demo.main(argv[1:])
    if argv and argv[0] == "vqa":  # the VQA demo
        return vqa_demo.main(argv[1:])
    if argv and argv[0] == "video":  # the video demo
        return video_demo.main(argv[1:])
    if argv and argv[0] == "search":  # the search demo
        return search_demo.main(argv[1:])
    parser = argparse.ArgumentParser(prog="florence demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/demo", help="where the run, results and report go")
    parser.add_argument("--config", default=None, help="pre-training YAML (default: the packaged fashion_mnist.yaml)")
    parser.add_argument("--train-limit", type=int, default=10000,
                        help="training images used by the linear probe (a validation fifth is carved from them)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the pre-training config")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir)
    run_dir, results = workdir / "pretrain", workdir / "results"
    bundle = run_dir / "final"
    start = time.perf_counter()

    def step(title: str) -> None:
        print(f"\n== [{time.perf_counter() - start:7.1f}s] {title}", flush=True)

    if (bundle / "manifest.json").is_file():
        step(f"pre-training: reusing the finished run in {run_dir}")
    else:
        step("pre-training the dual encoder on Fashion-MNIST")
        config = args.config or str(default_config())
        code = train.main([config, f"output.dir={run_dir}", "eval.at_end=false", *args.overrides])
        if code:
            return code
    trained_at = time.perf_counter() - start

    common = ["--model", str(bundle), "--dataset", "fashion_mnist", "--output", str(results)]
    step("zero-shot classification on the 10,000 test images")
    if code := eval_cli.main(["zeroshot", *common]):
        return code
    step("linear probe (CLIP protocol) on the 10,000 test images")
    if code := eval_cli.main(["linear-probe", *common, "--train-limit", str(args.train_limit), "--probe-threads", "1"]):
        return code
    step("report")
    report_path = results / "report.md"
    if code := report.main([str(results), "--output", str(report_path)]):
        return code

    total = time.perf_counter() - start
    print(f"\n== demo finished in {total:.0f}s (pre-training {trained_at:.0f}s)")
    for task in ("zeroshot", "linear_probe"):
        path = results / f"{task}_fashion_mnist.json"
        metrics = json.loads(path.read_text())["metrics"]
        shown = ", ".join(f"{k} {100 * v:.2f}%" for k, v in metrics.items() if isinstance(v, float))
        print(f"{task:>13}: {shown}  ({path})")
    print(f"  model bundle: {bundle}")
    print(f"   run metrics: {run_dir / 'metrics.jsonl'}")
    print(f"        report: {report_path}")
    for png in sorted(results.glob("*.png")):
        print(f"       picture: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
