"""Image-tower speed on CPU: our Swin-T vs timm's, fused vs eager attention, 224 vs 448, bf16 vs fp32.

Run: ``python -m florence.benchmarks.perf.backbone --threads 2`` (defaults: batch 8, 224 px, 1 warm-up round,
5 timed rounds). Every case runs once per round, rounds interleave the cases (so background load hits all of them
alike) and the table reports the median. Our ``swin_tiny`` carries timm's random weights (loaded with
``load_image_tower_weights``), all cases see the same input. FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and attention; a multiply-add is 2 FLOPs), and
achieved GFLOP/s is compared with a large matmul of the same dtype timed in the same run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class Case:
    name: str  # what is measured, e.g. "fwd" or "fwd+bwd"
    model: str
    dtype: str  # "fp32" or "bf16" (autocast)
    fn: Callable[[], None]
    count_fn: Callable[[], None] | None = None  # what FLOPs are counted on (default fn)
    gflop: float = 0.0
    times: list[float] | None = None


@dataclass
class Row:
    case: str
    model: str
    dtype: str
    ms: float
    ms_min: float
    gflop: float
    gflops_per_s: float
    peak_fraction: float


def count_gflop(fn: Callable[[], None]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def matmul_peak(dtype: torch.dtype, size: int, rounds: int) -> float:
    """GFLOP/s of a ``size x size @ size x size`` matmul (median of ``rounds`` after one warm-up)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def build_cases(batch: int, size: int, large_size: int) -> list[Case]:
    import timm

    from florence.backbone.convert import load_image_tower_weights
    from florence.backbone.coswin import coswin_tiny, swin_tiny

    torch.manual_seed(0)
    reference = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, drop_path_rate=0.0, img_size=size)
    ours = swin_tiny(drop_path_rate=0.0, img_size=size)
    load_image_tower_weights(ours, reference.state_dict(), format="timm")
    coswin = coswin_tiny(drop_path_rate=0.0)
    x = torch.randn(batch, 3, size, size)
    x_large = torch.randn(batch, 3, large_size, large_size)

    def timm_pooled(inp: torch.Tensor) -> torch.Tensor:
        return reference.forward_head(reference.forward_features(inp), pre_logits=True)

    def forward(model_fn: Callable[[torch.Tensor], torch.Tensor], inp: torch.Tensor, bf16: bool, setup=None):
        def run() -> None:
            if setup:
                setup()
            with torch.no_grad(), _autocast(bf16):
                model_fn(inp)

        return run

    def forward_backward(module: torch.nn.Module, model_fn, inp: torch.Tensor, bf16: bool, setup=None):
        def run() -> None:
            if setup:
                setup()
            module.zero_grad(set_to_none=True)
            with _autocast(bf16):
                out = model_fn(inp)
            out.float().square().mean().backward()

        return run

    fused = lambda: ours.set_fused_attn(True)  # noqa: E731
    eager = lambda: ours.set_fused_attn(False)  # noqa: E731
    for module in (reference, ours, coswin):
        module.train()  # no dropout / drop path configured: train == eval numerically; backward needs no change
    coswin_eager = lambda: coswin.set_fused_attn(False)  # noqa: E731
    coswin_fused = lambda: coswin.set_fused_attn(True)  # noqa: E731
    fwd_eager = forward(ours, x, False, eager)
    fwd_bwd_eager = forward_backward(ours, ours, x, False, eager)
    # FLOPs of the SDPA cases are counted on their eager twin: FlopCounterMode does not count every fused CPU kernel
    cases = [
        Case("fwd", "timm swin_tiny", "fp32", forward(timm_pooled, x, False)),
        Case("fwd", "ours swin_tiny (sdpa)", "fp32", forward(ours, x, False, fused), fwd_eager),
        Case("fwd", "ours swin_tiny (eager)", "fp32", fwd_eager),
        Case("fwd+bwd", "timm swin_tiny", "fp32", forward_backward(reference, timm_pooled, x, False)),
        Case("fwd+bwd", "ours swin_tiny (sdpa)", "fp32", forward_backward(ours, ours, x, False, fused), fwd_bwd_eager),
        Case("fwd+bwd", "ours swin_tiny (eager)", "fp32", fwd_bwd_eager),
        Case("fwd", "timm swin_tiny", "bf16", forward(timm_pooled, x, True)),
        Case("fwd", "ours swin_tiny (sdpa)", "bf16", forward(ours, x, True, fused), fwd_eager),
        Case("fwd+bwd", "timm swin_tiny", "bf16", forward_backward(reference, timm_pooled, x, True)),
        Case("fwd+bwd", "ours swin_tiny (sdpa)", "bf16", forward_backward(ours, ours, x, True, fused), fwd_bwd_eager),
        Case(f"fwd {size}px", "ours coswin_tiny (sdpa)", "fp32", forward(coswin, x, False, coswin_fused),
             forward(coswin, x, False, coswin_eager)),
        Case(f"fwd {large_size}px", "ours coswin_tiny (sdpa)", "fp32", forward(coswin, x_large, False, coswin_fused),
             forward(coswin, x_large, False, coswin_eager)),
    ]
    return cases


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()


def run(cases: list[Case], warmup: int, rounds: int) -> None:
    for case in cases:
        case.gflop = count_gflop(case.count_fn or case.fn)
        case.times = []
    for _ in range(warmup):
        for case in cases:
            case.fn()
    for _ in range(rounds):
        for case in cases:
            start = time.perf_counter()
            case.fn()
            case.times.append(time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--large-size", type=int, default=448, help="second coswin_tiny size (4x the tokens at 448)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds over all cases (after the FLOP count)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; the median is reported")
    parser.add_argument("--peak-size", type=int, default=2048, help="matmul size for the peak measurement")
    parser.add_argument("--json", type=str, default=None, help="also write the rows and ratios to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    cases = build_cases(args.batch, args.size, args.large_size)
    peak = {"fp32": matmul_peak(torch.float32, args.peak_size, 5),
            "bf16": matmul_peak(torch.bfloat16, args.peak_size, 5)}
    run(cases, args.warmup, args.rounds)
    peak = {k: max(v, matmul_peak(torch.float32 if k == "fp32" else torch.bfloat16, args.peak_size, 5))
            for k, v in peak.items()}  # measured before and after: the better of the two

    rows = []
    for case in cases:
        seconds = statistics.median(case.times)
        rate = case.gflop / seconds
        rows.append(Row(case.name, case.model, case.dtype, seconds * 1e3, min(case.times) * 1e3, case.gflop, rate,
                        rate / peak[case.dtype]))
    ms = {(r.case, r.model, r.dtype): r.ms for r in rows}
    ms_min = {(r.case, r.model, r.dtype): r.ms_min for r in rows}
    ours_fwd, timm_fwd = ("fwd", "ours swin_tiny (sdpa)", "fp32"), ("fwd", "timm swin_tiny", "fp32")
    ours_fb, timm_fb = ("fwd+bwd", "ours swin_tiny (sdpa)", "fp32"), ("fwd+bwd", "timm swin_tiny", "fp32")
    ratio_keys = {
        "ours/timm fwd fp32": (ours_fwd, timm_fwd),
        "ours/timm fwd+bwd fp32": (ours_fb, timm_fb),
        "ours/timm fwd bf16": (ours_fwd[:2] + ("bf16",), timm_fwd[:2] + ("bf16",)),
        "ours/timm fwd+bwd bf16": (ours_fb[:2] + ("bf16",), timm_fb[:2] + ("bf16",)),
        "eager/sdpa fwd fp32": (("fwd", "ours swin_tiny (eager)", "fp32"), ours_fwd),
        "eager/sdpa fwd+bwd fp32": (("fwd+bwd", "ours swin_tiny (eager)", "fp32"), ours_fb),
        "fp32/bf16 fwd ours": (ours_fwd, ours_fwd[:2] + ("bf16",)),
        f"coswin_tiny {args.large_size}/{args.size} time (4x tokens)": (
            (f"fwd {args.large_size}px", "ours coswin_tiny (sdpa)", "fp32"),
            (f"fwd {args.size}px", "ours coswin_tiny (sdpa)", "fp32"),
        ),
    }
    ratios = {name: ms[num] / ms[den] for name, (num, den) in ratio_keys.items()}
    ratios_min = {name: ms_min[num] / ms_min[den] for name, (num, den) in ratio_keys.items()}

    print(f"\nbatch {args.batch}, {args.size}px, {args.threads} threads, torch {torch.__version__}, "
          f"median of {args.rounds} rounds after {args.warmup} warm-up rounds")
    print(f"matmul peak ({args.peak_size}^3): fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s\n")
    print("| case | model | dtype | ms (median) | ms (min) | GFLOP | GFLOP/s (median) | % of matmul peak |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r.case} | {r.model} | {r.dtype} | {r.ms:.0f} | {r.ms_min:.0f} | {r.gflop:.1f} | "
              f"{r.gflops_per_s:.0f} | {100 * r.peak_fraction:.0f}% |")
    print("\n| ratio | median | min |\n|---|---:|---:|")
    for name, (num, den) in ratio_keys.items():
        print(f"| {name} | {ms[num] / ms[den]:.2f} | {ms_min[num] / ms_min[den]:.2f} |")
    result = {"rows": [asdict(r) for r in rows], "ratios": ratios, "ratios_min": ratios_min, "peak_gflops": peak,
              "args": vars(args)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
