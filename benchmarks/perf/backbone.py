"""Image-tower speed: our Swin-T vs timm's, fused vs eager attention, 224 vs 448, bf16 vs fp32, on CPU or CUDA.

Run: ``python -m florence.benchmarks.perf.backbone [--device cuda] [--threads 2]`` (defaults: cuda when available,
batch 8, 224 px, 1 warm-up round, 5 timed rounds). Every case runs once per round, rounds interleave the cases (so
background load hits all of them alike) and the table reports the median. Our ``swin_tiny`` carries timm's random
weights (loaded with ``load_image_tower_weights``), all cases see the same input. FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and attention; a multiply-add is 2 FLOPs), and
achieved FLOP/s is compared with a large matmul of the same dtype timed on the same device in the same run
(``common.py``). ``--test-size`` and small ``--batch/--size/--rounds/--warmup/--peak-size`` values make a
seconds-long smoke run.
"""
from __future__ import annotations

import argparse
import statistics
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from florence.benchmarks.perf.common import (
    add_device_arguments, autocast, count_flops, default_peak_size, describe, markdown_table, measure_peaks,
    num, peak_line, resolve_device, si, timed, write_json,
)


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


# --test-size: coswin_test's widths and depths for all three models (a seconds-long smoke run, not a benchmark)
TEST_ARCH = dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8))


def build_cases(batch: int, size: int, large_size: int, device: torch.device, test_size: bool = False) -> list[Case]:
    """The cases, models named ``*_tiny`` (Swin-T) or, with ``test_size``, ``*_test`` (``TEST_ARCH``)."""
    import timm

    from florence.backbone.convert import load_image_tower_weights
    from florence.backbone.coswin import coswin_tiny, swin_tiny

    torch.manual_seed(0)
    arch, tag = (TEST_ARCH, "test") if test_size else ({}, "tiny")
    reference = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, drop_path_rate=0.0, img_size=size,
                                  **arch)
    ours = swin_tiny(drop_path_rate=0.0, img_size=size, **arch)
    load_image_tower_weights(ours, reference.state_dict(), format="timm")
    coswin = coswin_tiny(drop_path_rate=0.0, **arch)
    for module in (reference, ours, coswin):
        module.to(device)
    x = torch.randn(batch, 3, size, size).to(device)
    x_large = torch.randn(batch, 3, large_size, large_size).to(device)

    def timm_pooled(inp: torch.Tensor) -> torch.Tensor:
        return reference.forward_head(reference.forward_features(inp), pre_logits=True)

    def forward(model_fn: Callable[[torch.Tensor], torch.Tensor], inp: torch.Tensor, bf16: bool, setup=None):
        def run() -> None:
            if setup:
                setup()
            with torch.no_grad(), autocast(device, "bf16" if bf16 else "fp32"):
                model_fn(inp)

        return run

    def forward_backward(module: torch.nn.Module, model_fn, inp: torch.Tensor, bf16: bool, setup=None):
        def run() -> None:
            if setup:
                setup()
            module.zero_grad(set_to_none=True)
            with autocast(device, "bf16" if bf16 else "fp32"):
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
    # FLOPs of the SDPA cases are counted on their eager twin (the same math): FlopCounterMode does not count every
    # fused CPU kernel, and this way the count does not depend on which SDPA kernel the device picks
    timm_name, ours_sdpa, ours_eager = f"timm swin_{tag}", f"ours swin_{tag} (sdpa)", f"ours swin_{tag} (eager)"
    cos_name = f"ours coswin_{tag} (sdpa)"
    cases = [
        Case("fwd", timm_name, "fp32", forward(timm_pooled, x, False)),
        Case("fwd", ours_sdpa, "fp32", forward(ours, x, False, fused), fwd_eager),
        Case("fwd", ours_eager, "fp32", fwd_eager),
        Case("fwd+bwd", timm_name, "fp32", forward_backward(reference, timm_pooled, x, False)),
        Case("fwd+bwd", ours_sdpa, "fp32", forward_backward(ours, ours, x, False, fused), fwd_bwd_eager),
        Case("fwd+bwd", ours_eager, "fp32", fwd_bwd_eager),
        Case("fwd", timm_name, "bf16", forward(timm_pooled, x, True)),
        Case("fwd", ours_sdpa, "bf16", forward(ours, x, True, fused), fwd_eager),
        Case("fwd+bwd", timm_name, "bf16", forward_backward(reference, timm_pooled, x, True)),
        Case("fwd+bwd", ours_sdpa, "bf16", forward_backward(ours, ours, x, True, fused), fwd_bwd_eager),
        Case(f"fwd {size}px", cos_name, "fp32", forward(coswin, x, False, coswin_fused),
             forward(coswin, x, False, coswin_eager)),
        Case(f"fwd {large_size}px", cos_name, "fp32", forward(coswin, x_large, False, coswin_fused),
             forward(coswin, x_large, False, coswin_eager)),
    ]
    return cases


def run(cases: list[Case], warmup: int, rounds: int, device: torch.device) -> None:
    for case in cases:
        case.gflop = count_flops(case.count_fn or case.fn) / 1e9
        case.times = []
    for _ in range(warmup):
        for case in cases:
            case.fn()
    for _ in range(rounds):
        for case in cases:
            case.times.append(timed(case.fn, device))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_device_arguments(parser, threads=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--large-size", type=int, default=448, help="second coswin_tiny size (4x the tokens at 448)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds over all cases (after the FLOP count)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; the median is reported")
    parser.add_argument("--peak-size", type=int, default=None,
                        help="matmul size for the peak measurement (default 2048 on CPU, 8192 on CUDA)")
    parser.add_argument("--test-size", action="store_true",
                        help="coswin_test widths and depths for all models (a smoke run, not a benchmark)")
    parser.add_argument("--json", type=str, default=None, help="also write the rows and ratios to this file")
    args = parser.parse_args(argv)
    device = resolve_device(parser, args)
    peak_size = args.peak_size or default_peak_size(device)

    cases = build_cases(args.batch, args.size, args.large_size, device, args.test_size)
    peak = measure_peaks(device, ["fp32", "bf16"], peak_size)
    run(cases, args.warmup, args.rounds, device)
    peak = measure_peaks(device, ["fp32", "bf16"], peak_size, previous=peak)  # before and after: the better

    rows = []
    for case in cases:
        seconds = statistics.median(case.times)
        rate = case.gflop / seconds  # GFLOP/s
        rows.append(Row(case.name, case.model, case.dtype, seconds * 1e3, min(case.times) * 1e3, case.gflop, rate,
                        rate * 1e9 / peak[case.dtype]))
    ms = {(r.case, r.model, r.dtype): r.ms for r in rows}
    ms_min = {(r.case, r.model, r.dtype): r.ms_min for r in rows}
    tag = "test" if args.test_size else "tiny"
    ours_fwd, timm_fwd = ("fwd", f"ours swin_{tag} (sdpa)", "fp32"), ("fwd", f"timm swin_{tag}", "fp32")
    ours_fb, timm_fb = ("fwd+bwd", f"ours swin_{tag} (sdpa)", "fp32"), ("fwd+bwd", f"timm swin_{tag}", "fp32")
    ratio_keys = {
        "ours/timm fwd fp32": (ours_fwd, timm_fwd),
        "ours/timm fwd+bwd fp32": (ours_fb, timm_fb),
        "ours/timm fwd bf16": (ours_fwd[:2] + ("bf16",), timm_fwd[:2] + ("bf16",)),
        "ours/timm fwd+bwd bf16": (ours_fb[:2] + ("bf16",), timm_fb[:2] + ("bf16",)),
        "eager/sdpa fwd fp32": (("fwd", f"ours swin_{tag} (eager)", "fp32"), ours_fwd),
        "eager/sdpa fwd+bwd fp32": (("fwd+bwd", f"ours swin_{tag} (eager)", "fp32"), ours_fb),
        "fp32/bf16 fwd ours": (ours_fwd, ours_fwd[:2] + ("bf16",)),
        f"coswin_{tag} {args.large_size}/{args.size} time ({(args.large_size / args.size) ** 2:.3g}x tokens)": (
            (f"fwd {args.large_size}px", f"ours coswin_{tag} (sdpa)", "fp32"),
            (f"fwd {args.size}px", f"ours coswin_{tag} (sdpa)", "fp32"),
        ),
    }
    ratios = {name: ms[a] / ms[b] for name, (a, b) in ratio_keys.items()}
    ratios_min = {name: ms_min[a] / ms_min[b] for name, (a, b) in ratio_keys.items()}

    print(f"\n{describe(device, args.threads)}; batch {args.batch}, {args.size}px, "
          f"median of {args.rounds} rounds after {args.warmup} warm-up rounds")
    print(peak_line(peak, peak_size) + "\n")
    header = ["case", "model", "dtype", "ms (median)", "ms (min)", "GFLOP", "FLOP/s (median)", "% of matmul peak"]
    print(markdown_table(header, [
        [r.case, r.model, r.dtype, num(r.ms), num(r.ms_min), num(r.gflop), si(r.gflops_per_s * 1e9),
         f"{100 * r.peak_fraction:.1f}%"] for r in rows], numeric_from=3))
    print()
    print(markdown_table(["ratio", "median", "min"],
                         [[name, f"{ratios[name]:.2f}", f"{ratios_min[name]:.2f}"] for name in ratio_keys],
                         numeric_from=1))
    result = {"rows": [asdict(r) for r in rows], "ratios": ratios, "ratios_min": ratios_min,
              "peak_gflops": {k: v / 1e9 for k, v in peak.items()}, "device": describe(device, args.threads),
              "args": vars(args)}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
