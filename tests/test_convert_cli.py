"""``florence convert``: foreign layouts -> verified bundles whose outputs equal the source model's."""
from __future__ import annotations

import argparse
import json
import re

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models._hub import save_for_hf

from florence.adapters.video_classifier import build_video_classifier
from florence.benchmarks.convert_cli import main
from florence.bundle import from_pretrained

TINY_SWIN = dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), img_size=56, num_classes=5)
PREPROCESS = {"input_size": [3, 56, 56], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
              "interpolation": "bicubic", "crop_pct": 1.0}


@pytest.fixture(scope="module")
def timm_swin():
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", **TINY_SWIN).eval()


def _logits(model, seed=1):
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x)


def _to_microsoft(state):
    """timm Swin keys -> the official repository's: patch merging at the end of the previous stage, ``head``."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", key)
        out[re.sub(r"^head\.fc\.", "head.", key)] = value
    return out


def test_timm_hub_directory_records_architecture_and_preprocessing(timm_swin, tmp_path, capsys):
    hub = tmp_path / "hub"
    save_for_hf(timm_swin, str(hub), model_args={k: v for k, v in TINY_SWIN.items() if k != "num_classes"},
                safe_serialization=True)
    assert main(["--from", "timm", str(hub), str(tmp_path / "bundle")]) == 0
    assert "loaded" in capsys.readouterr().out
    converted = from_pretrained(tmp_path / "bundle")
    torch.testing.assert_close(_logits(converted), _logits(timm_swin), atol=1e-5, rtol=0)
    recorded = json.loads((hub / "config.json").read_text())["pretrained_cfg"]
    assert converted.preprocess["mean"] == recorded["mean"] and converted.preprocess["crop_pct"] == recorded["crop_pct"]
    assert converted.florence_config["name"] == "swin_tiny"


def test_microsoft_file_needs_preprocessing_then_matches(timm_swin, tmp_path, capsys):
    src = tmp_path / "swin_ms.safetensors"
    save_file(_to_microsoft(timm_swin.state_dict()), str(src))
    common = ["--from", "microsoft", str(src), str(tmp_path / "bundle"), "--model", "swin_tiny", "--set",
              *(f"{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in TINY_SWIN.items())]
    assert main(common) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--preprocess" in err and str(src) in err
    assert not (tmp_path / "bundle").exists()

    preprocess_file = tmp_path / "preprocess.json"
    preprocess_file.write_text(json.dumps(PREPROCESS))
    assert main([*common, "--preprocess", str(preprocess_file)]) == 0
    converted = from_pretrained(tmp_path / "bundle")
    torch.testing.assert_close(_logits(converted), _logits(timm_swin), atol=1e-5, rtol=0)
    assert converted.preprocess == PREPROCESS


def test_strict_conversion_names_a_stray_key(timm_swin, tmp_path, capsys):
    state = _to_microsoft(timm_swin.state_dict())
    state["layers.0.blocks.0.extra_gate"] = torch.zeros(3)
    src = tmp_path / "stray.safetensors"
    save_file(state, str(src))
    argv = ["--from", "microsoft", str(src), str(tmp_path / "bundle"), "--model", "swin_tiny",
            "--preprocess", json.dumps(PREPROCESS), "--set",
            *(f"{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in TINY_SWIN.items())]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "extra_gate" in err
    assert main([*argv, "--no-strict"]) == 0
    assert "unexpected 1" in capsys.readouterr().out


@pytest.mark.parametrize("preprocess, message", [('{"mean": [0.5]}', "lacks"), ("not json", "JSON")])
def test_bad_preprocess_is_one_line(tmp_path, capsys, preprocess, message):
    assert main(["--from", "microsoft", str(tmp_path / "x.pt"), str(tmp_path / "out"), "--model", "swin_tiny",
                 "--preprocess", preprocess]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err


def test_user_mistakes_are_one_line_errors(timm_swin, tmp_path, capsys):
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.json").write_text("{not json")
    (hub / "model.safetensors").write_bytes(b"")
    src = tmp_path / "swin.safetensors"
    save_file(_to_microsoft(timm_swin.state_dict()), str(src))
    pickled = tmp_path / "release.pth"
    torch.save({"model": timm_swin.state_dict(), "config": argparse.Namespace(lr=1e-3)}, pickled)
    cases = [
        (["--from", "timm", str(hub)], "config.json"),
        (["--from", "microsoft", str(src), "--model", "swin_tiny", "--set", "window_size=abc"], "window_size"),
        (["--from", "microsoft", str(pickled), "--model", "swin_tiny"], "pickled argparse.Namespace"),
        (["--from", "hf", str(hub), "--model", "swin_tiny"], "does not take --model"),
        (["--from", "timm", str(src), "--text-heads", "8"], "does not take --text-heads"),
    ]
    for argv, message in cases:
        argv = [*argv[:3], str(tmp_path / "out"), *argv[3:], "--preprocess", json.dumps(PREPROCESS)]
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, (argv, err)
    assert not (tmp_path / "out").exists()


def test_mmaction2_recognizer_becomes_a_video_swin_bundle(tmp_path, capsys):
    torch.manual_seed(0)
    shape = dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=(2, 3, 3))
    source = build_video_classifier("video_swin_tiny", 6, tower_overrides=shape).eval()
    mm = {}  # our keys -> mmaction2's Recognizer3D: downsampling at the end of the previous stage, cls_head.fc_cls
    for key, value in source.state_dict().items():
        key = key.replace("fc.", "cls_head.fc_cls.") if key.startswith("fc.") else key
        mm[key.replace("layers.1.downsample.", "layers.0.downsample.")] = value
    save_file(mm, str(tmp_path / "recognizer.safetensors"))
    preprocess = {**PREPROCESS, "input_size": [3, 4, 24, 24], "clip_len": 4, "frame_interval": 2}
    assert main(["--from", "mmaction2", str(tmp_path / "recognizer.safetensors"), str(tmp_path / "bundle"),
                 "--model", "video_swin_tiny", "--preprocess", json.dumps(preprocess), "--set", "num_classes=6",
                 *(f"{k}={json.dumps(list(v))}" if isinstance(v, tuple) else f"{k}={v}" for k, v in shape.items())]) == 0
    assert "missing 0, unexpected 0" in capsys.readouterr().out
    converted = from_pretrained(tmp_path / "bundle")
    clip = torch.randn(2, 3, 4, 24, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(converted(clip), source(clip), atol=1e-5, rtol=0)
    assert converted.preprocess == preprocess
