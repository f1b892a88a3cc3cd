"""``florence demo video``: Moving Fashion-MNIST action recognition end to end on a CPU, from nothing to pictures.

1. generate the clips (``florence.benchmarks.moving_fmnist``: 4,000 train / 800 test MP4s of real Fashion-MNIST
   items moving in 8 ways, 16 frames at 64x64, with a Kinetics-style ``path label`` list and captions);
2. pre-train the demo's UniCL dual encoder first if ``--backbone`` (default ``runs/demo/pretrain/final``) is absent
   (what ``florence demo`` does);
3. inflate its image tower into a Video CoSwin and fine-tune it (``configs/video/moving_fashion_mnist.yaml``); with
   ``--baseline`` also the 2D tower applied per frame at the same budget (it cannot tell the direction of motion);
4. evaluate with 4x3 views and 1x1 view (``florence eval action``, confusion-matrix PNGs), predict the first test
   clips with a frame strip (``florence predict-video``), and run zero-shot text->video retrieval of the dual encoder
   on the test clips (``florence eval video-retrieval``).

Finished steps in the work directory are reused (a killed fine-tuning run resumes from its last checkpoint).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from florence.benchmarks import moving_fmnist, video_cli, video_retrieval_cli
from florence.benchmarks.demo_steps import Steps, ensure_unicl_bundle, finetune, packaged_config


def data_overrides(data: Path) -> list[str]:
    """The recipe's data and evaluation paths pointed at the generated clips in ``data``."""
    source = f"{{annotations: {data / 'train.txt'}, videos: {data / 'train'}, classes: {data / 'classes.txt'}}}"
    return [f"data.sources=[{source}]", f"eval.source.annotations={data / 'test.txt'}",
            f"eval.source.videos={data / 'test'}", f"eval.source.classes={data / 'classes.txt'}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="florence demo video", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/video_demo", help="data, runs, results and pictures")
    parser.add_argument("--backbone", default="runs/demo/pretrain/final",
                        help="the UniCL bundle to inflate (trained first by `florence demo` when absent)")
    parser.add_argument("--config", default=None, help="fine-tuning YAML (default: the packaged recipe)")
    parser.add_argument("--train-videos", type=int, default=4000)
    parser.add_argument("--test-videos", type=int, default=800)
    parser.add_argument("--baseline", action="store_true", help="also fine-tune the per-frame 2D baseline")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the fine-tuning config")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir)
    data, results = workdir / "data", workdir / "results"
    step = Steps()

    step(f"data: {args.train_videos} train / {args.test_videos} test clips in {data}")
    if code := moving_fmnist.main(["--out", str(data), "--train", str(args.train_videos),
                                   "--test", str(args.test_videos)]):
        return code
    backbone = Path(args.backbone)
    if code := ensure_unicl_bundle(backbone, step):
        return code
    config = args.config or str(packaged_config("video", "moving_fashion_mnist.yaml"))
    runs = {"video_coswin": ([], "Video CoSwin (inflated)")}
    if args.baseline:
        # the 2D tower keeps its own windows: the recipe's video-tower overrides do not apply to it
        runs["frames_2d"] = (["task.frames=true", "model.overrides={}"], "2D tower per frame (baseline)")
    figures = {}
    for name, (extra, title) in runs.items():
        run_dir = workdir / f"finetune_{name}"
        bundle = run_dir / "final"
        if code := finetune(config, run_dir, [f"model.backbone={backbone}", *data_overrides(data), "eval.at_end=false",
                                              *args.overrides, *extra], title, step):
            return code
        for clips, crops in ((4, 3), (1, 1)):
            step(f"{title}: {clips}x{crops}-view test")
            result_name = f"moving_fmnist_{name}_{clips}x{crops}"
            if code := video_cli.eval_main(["--model", str(bundle), "--annotations", str(data / "test.txt"),
                                            "--videos", str(data / "test"), "--classes", str(data / "classes.txt"),
                                            "--clips", str(clips), "--crops", str(crops), "--output", str(results),
                                            "--name", result_name]):
                return code
            figures[f"{title}, {clips}x{crops} views"] = json.loads(
                (results / f"action_{result_name}.json").read_text())["metrics"]

    step("the first test clips predicted (`florence predict-video`), with frame strips")
    first = sorted((data / "test").glob("*.mp4"))[:3]
    if code := video_cli.predict_main(["--model", str(workdir / "finetune_video_coswin" / "final"),
                                       *map(str, first), "--strip", str(results / "strips")]):
        return code

    step("zero-shot text->video retrieval with the UniCL bundle (`florence eval video-retrieval`)")
    if code := video_retrieval_cli.main(["--model", str(backbone), "--captions", str(data / "captions_test.csv"),
                                         "--videos", str(data / "test"), "--output", str(results),
                                         "--name", "moving_fmnist_test"]):
        return code

    print(f"\n== video demo finished in {step.elapsed():.0f}s")
    for title, metrics in figures.items():
        print(f"  {title}: top-1 {100 * metrics['top1']:.2f}%, mean per class {100 * metrics['mean_per_class']:.2f}%")
    print(f"  results and pictures: {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
