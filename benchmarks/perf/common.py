"""What every ``benchmarks/perf`` script shares: the device flags, synchronised timing, FLOP counting, the measured
matmul peak and the markdown table.

Achieved FLOP/s is the FLOPs that ``torch.utils.flop_counter.FlopCounterMode`` counts on one call (matmuls,
convolutions and attention; a multiply-add is 2 FLOPs) divided by the call's median wall time. The fraction of peak
divides that by the FLOP/s of a large square matmul in the same dtype, measured in the same run on the same device
(so it reads as "how close to the best this machine does on a matmul", not a datasheet figure). On a CPU without
native bf16 matmuls the bf16 peak is tiny and a bf16 row can pass 100% (autocast keeps part of the work in fp32).
On CUDA every timed interval is bracketed by ``torch.cuda.synchronize`` so it covers the kernels, not just their
launch; the fp32 peak and rows follow ``torch.get_float32_matmul_precision()`` (TF32 or not), which the header prints.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

# dtype names used on the command line and in the tables -> the matmul dtype of the peak they are compared with
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_device_arguments(parser: argparse.ArgumentParser, threads: int) -> None:
    """``--device`` (default cuda when available) and ``--threads`` (CPU intra-op threads, default ``threads``)."""
    default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default, help=f"cpu | cuda | cuda:N (default {default})")
    parser.add_argument("--threads", type=int, default=threads, help="torch.set_num_threads (CPU work)")


def resolve_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """Parse and check ``args.device`` (a parser error when CUDA or the index is missing); apply ``args.threads``."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r}: expected cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads)
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: str):
    """Autocast to ``dtype`` ("bf16" / "fp16") on ``device``; "fp32" runs without autocast."""
    return nullcontext() if dtype == "fp32" else torch.autocast(device.type, dtype=DTYPES[dtype])


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one ``fn()`` takes, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


class _GlobalOnly:
    """Stands in for ``FlopCounterMode``'s per-module tracker, whose backward hooks make ``torch.autograd.grad`` on
    leaf tensors fail (the gradient cache calls it): every FLOP is attributed to "Global", the total we report."""

    parents = {"Global"}

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of one ``fn()`` (forward, and backward if ``fn`` runs one), counted by ``FlopCounterMode``."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    with counter:
        fn()
    return float(counter.get_total_flops())


def matmul_peak(device: torch.device, dtype: str, size: int, rounds: int = 5) -> float:
    """FLOP/s of ``(size, size) @ (size, size)`` in ``dtype`` on ``device``: the median of ``rounds`` timed rounds
    after one warm-up. A CUDA round runs 10 matmuls between synchronisations (one is ~1 ms on a large GPU)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device, DTYPES[dtype])
    b = torch.randn(size, size, generator=g).to(device, DTYPES[dtype])
    repeat = 10 if device.type == "cuda" else 1

    def matmuls() -> None:
        for _ in range(repeat):
            torch.mm(a, b)

    matmuls()
    seconds = statistics.median(timed(matmuls, device) for _ in range(rounds))
    return 2 * size**3 * repeat / seconds


def measure_peaks(device: torch.device, dtypes: Sequence[str], size: int,
                  previous: dict[str, float] | None = None) -> dict[str, float]:
    """``{dtype: matmul peak FLOP/s}``; with ``previous`` (an earlier measurement in the same run) the better of the
    two, so a peak measured once before and once after the benchmark is not lowered by a momentary background load."""
    peaks = {name: matmul_peak(device, name, size) for name in dict.fromkeys(dtypes)}
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the peak's operands must not count in the scripts' memory figures
    return {k: max(v, (previous or {}).get(k, 0.0)) for k, v in peaks.items()}


def default_peak_size(device: torch.device) -> int:
    """Matmul size that keeps the device busy: 2048 on CPU, 8192 on CUDA."""
    return 8192 if device.type == "cuda" else 2048


def describe(device: torch.device, threads: int) -> str:
    """One line naming the device, the torch version and the fp32 matmul precision (TF32 or not)."""
    if device.type == "cuda":
        name = f"{torch.cuda.get_device_name(device)} ({device})"
    else:
        name = f"CPU, {threads} threads"
    return f"{name}, torch {torch.__version__}, fp32 matmul precision {torch.get_float32_matmul_precision()!r}"


def si(value: float) -> str:
    """``412e12`` -> ``"412 T"``: 3 significant digits with an SI prefix (for FLOP/s cells)."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.3g} "


def num(value: float) -> str:
    """3 significant digits without an exponent above 1000: ``0.0123``, ``12.3``, ``1234``."""
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def peak_line(peaks: dict[str, float], size: int) -> str:
    return f"matmul peak ({size}^3): " + ", ".join(f"{k} {si(v)}FLOP/s" for k, v in peaks.items())


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int) -> str:
    """A markdown table; columns from index ``numeric_from`` on are right-aligned."""
    rule = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines)


def write_json(path: str | Path | None, result: dict) -> None:
    """Write ``result`` to ``path`` (nothing when ``path`` is None)."""
    if path:
        Path(path).write_text(json.dumps(result, indent=2))
