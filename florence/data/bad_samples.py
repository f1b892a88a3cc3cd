"""The bad-sample policy: ``on_bad_sample: "skip" | "raise"`` (default ``"skip"``).

- ``skip``: the sample is replaced (see :mod:`florence.data.loader`), counted, and logged as one JSON line
  ``{"file", "reason", "source", "rank", "worker", "time"}`` appended to ``<run_dir>/bad_samples.jsonl`` (rank 0)
  or ``<run_dir>/bad_samples.rank<r>.jsonl`` (rank r > 0; one file per rank, as appends from several machines
  to one file on a network file system may interleave). Every line is written with a single ``O_APPEND`` write,
  so a rank's main process and all its DataLoader workers share the file; :func:`summarize_bad_samples` reads
  all the files back and counts by reason (the reason's text before any parenthesised detail) and by source.
  Without a run directory only the current process counts.
- ``raise``: :class:`BadSampleError` naming the file and reason stops the run (DataLoader workers re-raise it
  in the main process).
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from florence.data.images import BadSample
from florence.errors import FlorenceError

LOG_NAME = "bad_samples.jsonl"
Policy = Literal["skip", "raise"]
logger = logging.getLogger("florence.data")


class BadSampleError(FlorenceError, RuntimeError):
    """Raised under ``on_bad_sample="raise"``; the message names the file and the reason."""


def reason_kind(reason: str) -> str:
    """The count key of a reason: its text before a parenthesised detail."""
    return reason.split(" (", 1)[0].strip()


@dataclass
class BadSampleSummary:
    """Counts of skipped samples. ``by_reason`` / ``by_source``: count per reason kind / source name."""

    total: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    by_source: dict[str, int] = field(default_factory=dict)
    log_file: str | None = None

    def format(self) -> str:
        if not self.total:
            return "bad samples: none"
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.by_reason.items(), key=lambda kv: -kv[1]))
        where = f" (details in {self.log_file})" if self.log_file else ""
        return f"bad samples skipped: {self.total} [{reasons}]{where}"


class BadSampleLog:
    """Applies the policy to one :class:`BadSample`; picklable, so it travels into DataLoader workers."""

    def __init__(self, policy: Policy = "skip", *, run_dir: str | Path | None = None, rank: int = 0):
        if policy not in ("skip", "raise"):
            raise ValueError(f"on_bad_sample must be 'skip' or 'raise', got {policy!r}")
        self.policy = policy
        name = LOG_NAME if rank == 0 else LOG_NAME.replace(".jsonl", f".rank{rank}.jsonl")
        self.path = Path(run_dir) / name if run_dir is not None else None
        self.rank = rank
        self.counts: Counter[str] = Counter()  # this process only
        self.sources: Counter[str] = Counter()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def handle(self, err: BadSample, *, source: str) -> None:
        """Raise :class:`BadSampleError` (policy ``raise``) or count and log the skip."""
        if self.policy == "raise":
            raise BadSampleError(f"bad sample in source {source!r}: {err.file}: {err.reason}")
        self.counts[reason_kind(err.reason)] += 1
        self.sources[source] += 1
        info = torch.utils.data.get_worker_info()
        record = {"file": err.file, "reason": err.reason, "source": source, "rank": self.rank,
                  "worker": info.id if info is not None else None, "time": round(time.time(), 3)}
        logger.warning("skipping bad sample %s: %s", err.file, err.reason)
        if self.path is not None:
            line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

    def summary(self) -> BadSampleSummary:
        """All skips logged in the run directory (every rank and worker), else this process's counts."""
        if self.path is not None:
            return summarize_bad_samples(self.path.parent)
        return BadSampleSummary(sum(self.counts.values()), dict(self.counts), dict(self.sources))


def summarize_bad_samples(run_dir: str | Path) -> BadSampleSummary:
    """Count the records of ``<run_dir>/bad_samples*.jsonl`` (all ranks) by reason kind and by source."""
    path = Path(run_dir) / LOG_NAME
    reasons: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    for log in sorted(Path(run_dir).glob("bad_samples*.jsonl")):
        for line in log.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                reasons[reason_kind(record["reason"])] += 1
                sources[record["source"]] += 1
    return BadSampleSummary(sum(reasons.values()), dict(reasons), dict(sources), str(path))
