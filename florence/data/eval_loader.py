"""Evaluation batches under the bad-sample policy (``on_bad_sample``: ``"skip"`` | ``"raise"``, as in training).

Training replaces a bad sample by the next one so that every batch keeps its size; evaluation leaves it out instead:
the metrics are computed on the good samples only, and the result says how many were skipped, which files and why.

- ``skip`` (default): a sample whose image cannot be decoded (:class:`~florence.data.images.BadSample` from
  :func:`~florence.data.images.decode_image`, or Pillow's ``OSError`` / ``SyntaxError`` inside a torchvision dataset)
  is dropped from its batch, counted by reason, and logged as a warning; :meth:`EvalLoader.report` gives the counts and
  the skipped files for the result JSON. A split in which every sample is bad is a
  :class:`~florence.data.bad_samples.BadSampleError`.
- ``raise``: the first bad sample stops the evaluation with a :class:`~florence.data.bad_samples.BadSampleError`
  naming the file and the reason.

The check runs in the DataLoader workers (a bad sample travels to the main process as its ``BadSample``), and the
policy is applied in the main process, so counts are exact with any number of workers.
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections import Counter
from typing import Any, Callable, ContextManager, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.dataloader import default_collate

from florence.data.bad_samples import BadSampleError, BadSampleLog, reason_kind
from florence.data.errors import DataFileError
from florence.data.images import BadSample

MAX_LISTED = 1000  # skipped files listed in the report (all are counted)


def sample_name(dataset: Dataset, index: int) -> str:
    """What names sample ``index`` of ``dataset`` in messages: its file where the dataset lists files (ImageFolder's
    ``samples``, ``ImageList.paths``, torchvision's ``_image_files``), else ``<DatasetClass>[index]``."""
    while isinstance(dataset, Subset):
        dataset, index = dataset.dataset, dataset.indices[index]
    for attr in ("samples", "imgs"):
        items = getattr(dataset, attr, None)
        if isinstance(items, Sequence) and index < len(items) and isinstance(items[index], tuple):
            return str(items[index][0])
    for attr in ("paths", "_image_files", "files"):
        items = getattr(dataset, attr, None)
        if isinstance(items, Sequence) and index < len(items):
            return str(items[index])
    return f"{type(dataset).__name__}[{index}]"


class _Guarded(Dataset):
    """``dataset[i]`` -> the sample, or the :class:`BadSample` that describes why sample ``i`` is unusable (raised by
    the dataset, or a Pillow error inside it)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except BadSample as err:
            return err
        except (OSError, SyntaxError, Image.DecompressionBombError) as err:  # Pillow inside a torchvision dataset
            return BadSample(sample_name(self.dataset, index), f"unreadable image ({type(err).__name__}: {err})")


def split_bad(items: list, collate: Callable[[list], Any]) -> tuple[Any, list[BadSample]]:
    """``[sample | BadSample] * B`` -> ``(collate(good samples) or None, bad samples)``."""
    good = [item for item in items if not isinstance(item, BadSample)]
    bad = [item for item in items if isinstance(item, BadSample)]
    return (collate(good) if good else None), bad


class BatchEvalLoader:
    """Iterable of collated batches of ``dataset`` in order, without its bad samples (see the module docstring).
    Iterating again starts the counts afresh.

    Args:
        dataset: ``dataset[i] -> sample``; a sample that raises (or returns) a :class:`BadSample`, or a Pillow error,
            is a bad sample.
        collate: a list of good samples -> a batch.
        batch_size: samples per DataLoader batch (a batch shrinks by its bad samples).
        num_workers: DataLoader worker processes.
        on_bad_sample: ``"skip"`` or ``"raise"``.
        name: the split's name in messages (``"imagefolder test"``).
    """

    def __init__(self, dataset: Dataset, collate: Callable[[list], Any], *, batch_size: int = 128,
                 num_workers: int = 0, on_bad_sample: str = "skip", name: str = "eval"):
        self.dataset = dataset
        self.collate = collate
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.policy = BadSampleLog(on_bad_sample)  # raises under "raise"; ValueError for an unknown policy
        self.name = name
        self.skipped: list[dict[str, str]] = []
        self.num_good = 0

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    @staticmethod
    def batch_length(batch: Any) -> int:
        """Samples in a collated batch (its ``images`` entry)."""
        return len(batch["images"])

    def __iter__(self) -> Iterator[Any]:
        self.skipped, self.num_good = [], 0
        loader = DataLoader(_Guarded(self.dataset), batch_size=self.batch_size, shuffle=False,
                            num_workers=self.num_workers,
                            collate_fn=functools.partial(split_bad, collate=self.collate))
        for batch, bad in loader:
            for err in bad:
                self.policy.handle(err, source=self.name)
                self.skipped.append({"file": err.file, "reason": err.reason})
            if batch is not None:
                self.num_good += self.batch_length(batch)
                yield batch
        if self.num_good == 0 and self.skipped:
            first = self.skipped[0]
            raise BadSampleError(f"{self.name}: all {len(self.skipped)} samples are bad (first: {first['file']}: "
                                 f"{first['reason']})")

    def report(self) -> dict[str, Any]:
        """JSON-ready account of the last pass: ``policy``, ``skipped`` (count), ``evaluated`` (good samples),
        ``by_reason`` (count per reason kind) and ``samples`` (file and reason of the first ``MAX_LISTED``)."""
        return {
            "policy": self.policy.policy,
            "skipped": len(self.skipped),
            "evaluated": self.num_good,
            "by_reason": dict(Counter(reason_kind(s["reason"]) for s in self.skipped)),
            "samples": self.skipped[:MAX_LISTED],
        }


class EvalLoader(BatchEvalLoader):
    """Iterable of ``(images (B, C, H, W), targets (B,) or (B, C))`` over ``dataset`` in order, without its bad
    samples (see the module docstring). Iterating again starts the counts afresh.

    Args:
        dataset: ``dataset[i] -> (image tensor, target)``; Pillow errors inside it become bad samples.
        batch_size, num_workers, on_bad_sample, name: as :class:`BatchEvalLoader`.
    """

    def __init__(self, dataset: Dataset, *, batch_size: int = 128, num_workers: int = 0,
                 on_bad_sample: str = "skip", name: str = "eval"):
        super().__init__(dataset, default_collate, batch_size=batch_size, num_workers=num_workers,
                         on_bad_sample=on_bad_sample, name=name)

    @staticmethod
    def batch_length(batch: Any) -> int:
        return len(batch[0])


def format_bad_report(report: dict[str, Any], limit: int = 5) -> str:
    """One console line for an :meth:`EvalLoader.report` (empty when nothing was skipped), with the first files."""
    if not report.get("skipped"):
        return ""
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(report["by_reason"].items(), key=lambda kv: -kv[1]))
    files = "; ".join(f"{s['file']} ({s['reason']})" for s in report["samples"][:limit])
    more = f"; ... {report['skipped'] - limit} more" if report["skipped"] > limit else ""
    return (f"bad samples skipped: {report['skipped']} [{reasons}], metrics on the {report['evaluated']} good ones: "
            f"{files}{more}")


@torch.no_grad()
def map_batches(fn: Callable[[torch.Tensor], torch.Tensor], loader: EvalLoader, *, device: torch.device | str = "cpu",
                autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``fn`` over every good batch of ``loader`` (images moved to ``device``, run under ``autocast()``).

    Returns ``(outputs (N, ...) float32, targets (N,) or (N, C))`` as numpy arrays over the good samples, in order.
    ``progress`` is called with the number of good samples of each batch. An empty dataset is a
    :class:`~florence.data.errors.DataFileError`.
    """
    outputs, targets = [], []
    for images, target in loader:
        with autocast():
            out = fn(images.to(device))
        outputs.append(out.float().cpu().numpy())
        targets.append(torch.as_tensor(target).cpu().numpy())
        if progress is not None:
            progress(len(images))
    if not outputs:
        raise DataFileError(f"{loader.name}: no samples to evaluate")
    return np.concatenate(outputs), np.concatenate(targets)
