"""``benchmarks/perf/video.py`` runs end to end on the CPU at a tiny size and reports what it promises: decoding
(ours and a plain PyAV loop, the same frames), the model (ours and mmaction2's formulation with the same weights:
equal logits, times, FLOPs, the ratios) and the decode / model split of a multi-view test (no wall-clock thresholds)."""
from __future__ import annotations

import json

import pytest

from florence.benchmarks.perf import video

pytestmark = pytest.mark.usefixtures("one_thread_module")

SMOKE = ["--device", "cpu", "--threads", "1", "--embed-dim", "16", "--depths", "1", "1", "--num-heads", "1", "2",
         "--frames", "4", "--size", "56", "--warmup", "0", "--rounds", "1", "--num-clips", "2"]


def test_video_script_reports_decoding_model_ratios_and_view_split(tmp_path, capsys):
    out = tmp_path / "video.json"
    result = video.main([*SMOKE, "--json", str(out)])
    stdout = capsys.readouterr().out
    assert "1. decoding" in stdout and "2. video_swin_tiny" in stdout and "3. 2x3-view test" in stdout
    assert json.loads(out.read_text())["ratios"] == pytest.approx(result["ratios"])
    assert result["decode"] and all(r["same_frames"] for r in result["decode"])
    assert {r["impl"] for r in result["model"]} == {"ours", "mmaction2"}
    # same weights, same function: at 4 x 56^2 no stage's spatial window is clamped (14 and 7 tokens, window 7)
    assert result["clamped_stages"] == [] and result["max_difference"] < 1e-5
    for r in result["model"]:
        assert r["ms"] > 0 and r["gflop"] > 0
    rows = {(r["impl"], r["step"]): r for r in result["model"]}
    for key, ratio in result["ratios"].items():
        step = "forward" if "forward" in key else "train"
        assert ratio == pytest.approx(rows[("ours", step)]["ms"] / rows[("mmaction2", step)]["ms"])
    (split,) = result["views"].values()
    assert split["decode"] > 0 and split["model"] > 0
