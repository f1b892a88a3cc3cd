"""``benchmarks/perf/detection.py`` runs end to end on the CPU with tiny settings and reports what it promises: the
DyHead with both deformable-conv kernels and their time ratio, detector images/s for training and inference, and a
per-stage split that adds up to the step (no wall-clock thresholds)."""
from __future__ import annotations

import json

import pytest
import torch

from florence.benchmarks.perf import detection

pytestmark = pytest.mark.usefixtures("one_thread_module")

SMOKE = ["--device", "cpu", "--threads", "1", "--test-size", "--small-batch", "2", "--large-size", "64", "96",
         "--warmup", "0", "--rounds", "1", "--large-warmup", "0", "--large-rounds", "1"]


def test_pyramid_and_padding_sizes():
    assert detection.padded((800, 1333), 128) == (896, 1408)
    assert detection.pyramid_sizes((128, 128)) == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert detection.pyramid_sizes((896, 1408)) == [(112, 176), (56, 88), (28, 44), (14, 22), (7, 11)]
    assert detection.pyramid_sizes((100, 60)) == [(13, 8), (7, 4), (4, 2), (2, 1), (1, 1)]


def test_backward_marks_fire_from_the_last_stage_back():
    clock = detection._Clock(torch.device("cpu"))
    x, weight = torch.randn(4, 3, requires_grad=True), torch.randn(3, 3)
    first = detection._marked([x @ weight], clock, "first")[0]
    second = detection._marked([first.tanh()], clock, "second")[0]
    second.sum().backward()
    assert clock.marks["second"] <= clock.marks["first"]
    (plain,) = torch.autograd.grad((x @ weight).tanh().sum(), x)
    torch.testing.assert_close(x.grad, plain, rtol=0, atol=0)  # the marks pass the gradient through unchanged


def test_detection_script_reports_both_kernels_images_per_s_and_split(tmp_path, capsys):
    out = tmp_path / "detection.json"
    result = detection.main([*SMOKE, "--json", str(out)])
    stdout = capsys.readouterr().out
    assert "| case | step | impl | batch | channels | blocks | levels | ms (median) | ms (min) |" in stdout
    assert "| model | input | batch | impl | train images/s | inference images/s | train ms | inference ms |" in stdout
    assert "| torchvision / ours (time) | ratio |" in stdout and "| dyhead demo train |" in stdout
    assert json.loads(out.read_text())["ratios"] == pytest.approx(result["ratios"])

    dyhead = {(r["case"], r["step"], r["impl"]): r for r in result["dyhead"]}
    assert set(dyhead) == {(c, s, i) for c in ("demo", "coco") for s in ("train", "inference")
                           for i in ("torch", "torchvision")}
    assert dyhead[("demo", "train", "torch")]["levels"] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    for case in ("demo", "coco"):
        for step in ("train", "inference"):
            ours, theirs = dyhead[(case, step, "torch")], dyhead[(case, step, "torchvision")]
            assert result["ratios"][f"dyhead {case} {step}"] == pytest.approx(theirs["ms"] / ours["ms"])

    rows = {(r["input"], r["impl"]): r for r in result["detector"]}
    assert set(rows) == {("128x128", "torch"), ("128x128", "torchvision"), ("64x96", "auto")}
    for r in rows.values():
        assert r["train_images_per_s"] == pytest.approx(r["batch"] / (r["train_ms"] / 1e3))
        assert r["inference_images_per_s"] == pytest.approx(r["batch"] / (r["inference_ms"] / 1e3))
        assert set(r["train_split_ms"]) == set(detection.TRAIN_STAGES)
        assert set(r["inference_split_ms"]) == set(detection.INFER_STAGES)
        assert all(v > 0 for v in (*r["train_split_ms"].values(), *r["inference_split_ms"].values())), r
        # one round: the split is of that very step, so it adds up to it
        assert sum(r["train_split_ms"].values()) == pytest.approx(r["train_ms"], rel=1e-6)
        assert sum(r["inference_split_ms"].values()) == pytest.approx(r["inference_ms"], rel=1e-6)
    ours, theirs = rows[("128x128", "torch")], rows[("128x128", "torchvision")]
    assert result["ratios"]["detector dyhead_atss_coswin_test 128x128 train"] == pytest.approx(
        theirs["train_ms"] / ours["train_ms"])
    assert "| dyhead_atss_coswin_test | 128x128 | torch | dyhead |" in stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a machine without CUDA")
def test_device_flag_rejects_a_missing_device(capsys):
    with pytest.raises(SystemExit) as exit_info:
        detection.main(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err
