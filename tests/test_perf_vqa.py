"""``benchmarks/perf/vqa.py`` runs end to end on the CPU with tiny sizes and reports what it promises: ours and the
transformers ``BertLayer`` fusion with the same weights (equal outputs), forward and training times, FLOPs, activation
memory and the ours / reference ratios, in the table and the JSON (no wall-clock thresholds)."""
from __future__ import annotations

import json

import pytest
import torch

from florence.benchmarks.perf import vqa

pytestmark = pytest.mark.usefixtures("one_thread_module")

SMOKE = ["--device", "cpu", "--threads", "1", "--test-size", "--warmup", "0", "--rounds", "1"]


def test_vqa_script_reports_both_fusions_times_memory_and_ratios(tmp_path, capsys):
    out = tmp_path / "vqa.json"
    result = vqa.main([*SMOKE, "--batch", "3", "--json", str(out)])
    stdout = capsys.readouterr().out
    assert ("| impl | step | dtype | batch | ms (median) | ms (min) | GFLOP | activations (MiB) | peak (MiB) |"
            in stdout)
    assert "| ours / reference | ratio |" in stdout and "| ours / transformers-sdpa train time |" in stdout
    assert "max |ours - reference| (fp32, eval): transformers-sdpa" in stdout
    assert json.loads(out.read_text())["ratios"] == pytest.approx(result["ratios"])

    assert result["sizes"] == vqa.TEST and result["batch"] == 3
    assert result["text_lengths"] == [8, 6, 5]  # padded rows: 8 down to --min-text-len 5
    assert all(d < 1e-5 for d in result["max_difference"].values())  # same weights, same function
    rows = {(r["impl"], r["step"]): r for r in result["rows"]}
    assert set(rows) == {(i, s) for i in ("ours", *vqa.REFERENCES) for s in ("forward", "train")}
    for r in rows.values():
        assert r["ms"] > 0 and r["ms_min"] <= r["ms"] and r["gflop"] > 0 and r["peak_mb"] is None
        assert (r["activation_mb"] is None) == (r["step"] == "forward")
    # the same arithmetic: FLOPs of ours and of transformers' SDPA layers agree; a training step is ~3 forwards
    assert rows[("ours", "forward")]["gflop"] == pytest.approx(rows[("transformers-sdpa", "forward")]["gflop"])
    assert rows[("ours", "train")]["gflop"] > 2.5 * rows[("ours", "forward")]["gflop"]
    for ref in vqa.REFERENCES:
        for step in ("forward", "train"):
            assert result["ratios"][f"ours / {ref} {step} time"] == pytest.approx(
                rows[("ours", step)]["ms"] / rows[(ref, step)]["ms"])
        assert result["ratios"][f"ours / {ref} train activation memory"] == pytest.approx(
            rows[("ours", "train")]["activation_mb"] / rows[(ref, "train")]["activation_mb"])


def test_sizes_flags_and_one_reference(capsys):
    result = vqa.main([*SMOKE, "--references", "transformers-sdpa", "--layers", "1", "--image-tokens", "9",
                       "--batch", "1", "--dtype", "bf16"])
    assert result["sizes"]["layers"] == 1 and result["sizes"]["image_tokens"] == 9
    assert {r["impl"] for r in result["rows"]} == {"ours", "transformers-sdpa"}
    assert {r["dtype"] for r in result["rows"]} == {"bf16"} and result["text_lengths"] == [8]
    with pytest.raises(SystemExit):
        vqa.main([*SMOKE, "--min-text-len", "20"])
    assert "--min-text-len" in capsys.readouterr().err


def test_bert_fusion_is_meters_wiring():
    """The reference module equals the fusion it was copied from (the layer-level parity is in test_meter.py)."""
    fusions = vqa.build_fusions(vqa.TEST, 0.1, vqa.REFERENCES, torch.device("cpu"))
    data = vqa.synthetic_inputs(2, vqa.TEST, torch.device("cpu"))
    assert all(d < 1e-5 for d in vqa.max_difference(fusions, data).values())
    assert len(fusions["transformers-eager"].text_layers) == vqa.TEST["layers"]
