"""What the adapter demos (``florence demo detection | vqa | video``) share: the packaged recipes, timed step
headings, the demo's UniCL bundle (pre-trained first when absent) and fine-tuning runs reused once finished."""
from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from florence.engine import train

UNICL_RECIPE = ("pretrain", "fashion_mnist.yaml")


def packaged_config(*parts: str) -> Path:
    """A recipe shipped in ``florence.configs`` (``packaged_config("vqa", "fashion_mnist_meter.yaml")``)."""
    return Path(str(resources.files("florence.configs").joinpath(*parts)))


class Steps:
    """Prints ``== [elapsed] title`` headings, timed from construction."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, title: str) -> None:
        print(f"\n== [{self.elapsed():7.1f}s] {title}", flush=True)


def ensure_unicl_bundle(backbone: Path, step: Steps) -> int:
    """Pre-train the demo's UniCL bundle into ``backbone`` (as ``florence demo``) unless it is there; an exit code."""
    if (backbone / "manifest.json").is_file():
        return 0
    step(f"no UniCL bundle at {backbone}: pre-training it first (as `florence demo`)")
    return train.main([str(packaged_config(*UNICL_RECIPE)), f"output.dir={backbone.parent}", "eval.at_end=false"])


def finetune(config: str | Path, run_dir: Path, overrides: list[str], title: str, step: Steps) -> int:
    """Run ``florence train config output.dir=run_dir *overrides`` unless ``run_dir/final`` is a finished bundle (a
    killed run resumes from its last checkpoint); an exit code."""
    if (run_dir / "final" / "manifest.json").is_file():
        step(f"{title}: reusing the finished run in {run_dir}")
        return 0
    step(f"{title}: fine-tuning")
    return train.main([str(config), f"output.dir={run_dir}", *overrides])
