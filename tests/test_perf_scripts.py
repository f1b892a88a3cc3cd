"""The ``benchmarks/perf`` scripts run end to end on the CPU with tiny settings and report what they promise: achieved
FLOP/s, the fraction of the measured matmul peak (fp32 and bf16) and the ratio to the peer, in the table and the JSON;
and the shared helpers count FLOPs and reject a device this machine does not have."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from florence.benchmarks.perf import backbone, common, train

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _script(module: str, args: list[str], tmp_path: Path) -> tuple[str, dict]:
    """Run ``python -m florence.benchmarks.perf.<module> ARGS --json F`` on the CPU; its stdout and the JSON."""
    out = tmp_path / f"{module}.json"
    cmd = [sys.executable, "-m", f"florence.benchmarks.perf.{module}", "--device", "cpu", "--threads", "1",
           "--peak-size", "128", *args, "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_backbone_script_reports_flops_and_peak_fraction_beside_timm(tmp_path):
    stdout, result = _script("backbone", ["--test-size", "--batch", "1", "--size", "32", "--large-size", "64",
                                          "--warmup", "0", "--rounds", "1"], tmp_path)
    assert "| case | model | dtype | ms (median) | ms (min) | GFLOP | FLOP/s (median) | % of matmul peak |" in stdout
    assert "| ours/timm fwd+bwd bf16 |" in stdout and "matmul peak (128^3): fp32" in stdout
    assert result["device"].startswith("CPU, 1 threads")
    peaks = result["peak_gflops"]
    assert set(peaks) == {"fp32", "bf16"} and all(v > 0 for v in peaks.values())
    rows = result["rows"]
    assert len(rows) == 12 and {r["model"] for r in rows} >= {"timm swin_test", "ours swin_test (sdpa)"}
    assert {r["dtype"] for r in rows} == {"fp32", "bf16"}
    for r in rows:
        assert r["gflop"] > 0, r
        assert r["gflops_per_s"] == pytest.approx(r["gflop"] / (r["ms"] / 1e3), rel=1e-6), r
        assert r["peak_fraction"] == pytest.approx(r["gflops_per_s"] / peaks[r["dtype"]], rel=1e-6), r
    fwd = {(r["model"], r["dtype"]): r for r in rows if r["case"] == "fwd"}
    # same architecture and weights: timm and ours do the same arithmetic, and backward is about twice a forward
    assert fwd[("ours swin_test (sdpa)", "fp32")]["gflop"] == pytest.approx(fwd[("timm swin_test", "fp32")]["gflop"],
                                                                             rel=0.02)
    fwd_bwd = {r["model"]: r for r in rows if r["case"] == "fwd+bwd" and r["dtype"] == "fp32"}
    assert fwd_bwd["ours swin_test (sdpa)"]["gflop"] > 2.5 * fwd[("ours swin_test (sdpa)", "fp32")]["gflop"]
    ms = {(r["case"], r["model"], r["dtype"]): r["ms"] for r in rows}
    assert result["ratios"]["ours/timm fwd fp32"] == pytest.approx(
        ms[("fwd", "ours swin_test (sdpa)", "fp32")] / ms[("fwd", "timm swin_test", "fp32")])


def test_train_script_reports_flops_and_peak_fraction_beside_open_clip(tmp_path):
    stdout, result = _script("train", ["--models", "tiny", "--dtypes", "fp32", "--steps", "1", "--batch-tiny", "4",
                                       "--cache-batches", "--in-process"], tmp_path)
    assert ("| run | params (M) | batch | images/s | peak memory (MiB) | GFLOP/step | FLOP/s | % of matmul peak | "
            "florence / open_clip images/s | florence / open_clip FLOP/s |") in stdout
    peaks = result["peak_gflops"]
    assert set(peaks) == {"fp32"} and peaks["fp32"] > 0  # bf16 rows (and their peak): the backbone test
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"florence tiny fp32", "open_clip tiny fp32"}  # grad-cache rows: see the FLOP-count test
    for r in rows.values():
        assert r["gflop_per_step"] > 0, r
        step_s = r["batch"] / r["images_per_s"]
        assert r["flops_per_s"] == pytest.approx(r["gflop_per_step"] * 1e9 / step_s, rel=1e-6), r
        assert r["peak_fraction"] == pytest.approx(r["flops_per_s"] / (peaks[r["dtype"]] * 1e9), rel=1e-6), r
    ours, theirs = rows["florence tiny fp32"], rows["open_clip tiny fp32"]
    assert result["ratios"] == {"florence tiny fp32": {
        "images_per_s": pytest.approx(ours["images_per_s"] / theirs["images_per_s"]),
        "flops_per_s": pytest.approx(ours["flops_per_s"] / theirs["flops_per_s"])}}


def test_count_flops_counts_matmuls_forward_and_backward():
    a, b = torch.randn(8, 16, requires_grad=True), torch.randn(16, 4, requires_grad=True)
    assert common.count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
    assert common.count_flops(lambda: (a @ b).sum().backward()) == 3 * 2 * 8 * 16 * 4  # + grad of a and of b


def test_count_flops_allows_autograd_grad_on_leaves():
    """The gradient cache calls ``torch.autograd.grad`` on leaf tensors, which FlopCounterMode's per-module backward
    hooks reject; the counter must not install them."""
    layer = torch.nn.Linear(4, 4)
    leaf = torch.randn(2, 4, requires_grad=True)

    def grad_of_leaf():
        (grad,) = torch.autograd.grad(layer(leaf).sum(), [leaf])
        return grad

    assert common.count_flops(grad_of_leaf) == 2 * 2 * 4 * 4 * 2  # forward + grad of the input


def test_matmul_peak_and_timing_on_cpu():
    assert common.matmul_peak(torch.device("cpu"), "fp32", 64, rounds=2) > 0
    assert common.timed(lambda: None, torch.device("cpu")) >= 0
    assert common.si(412e12) == "412 T" and common.si(3.5e9) == "3.5 G" and common.num(1234.4) == "1234"
    table = common.markdown_table(["name", "value"], [["a", 1]], numeric_from=1)
    assert table.splitlines() == ["| name | value |", "| --- | ---: |", "| a | 1 |"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a machine without CUDA")
@pytest.mark.parametrize("script", [backbone, train])
@pytest.mark.parametrize("device, message", [("cuda", "CUDA is not available"), ("tpu", "expected cpu, cuda")])
def test_device_flag_rejects_a_missing_device(script, device, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--device", device])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
