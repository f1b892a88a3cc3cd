"""Run outputs on rank 0: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard scalars, library versions."""
from __future__ import annotations

import json
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

_LIBRARIES = ("florence-vision", "torch", "torchvision", "timm", "transformers", "tokenizers", "safetensors", "numpy", "scikit-learn")


def library_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_versions(run_dir: str | Path) -> None:
    (Path(run_dir) / "versions.json").write_text(json.dumps(library_versions(), indent=2))


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of ``<run_dir>/metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
    """Appends records to ``metrics.jsonl`` and scalars to TensorBoard; does nothing when ``enabled`` is False
    (ranks other than 0).

    ``resume_step``: on resume, records after that step (written by the interrupted run after its last checkpoint)
    are dropped so the file holds each step once.
    """

    def __init__(self, run_dir: str | Path, *, enabled: bool, tensorboard: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step] if resume_step else []
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, record: dict[str, Any]) -> None:
        """``record`` must hold ``step``; other numeric fields become TensorBoard scalars ``train/<key>``."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
