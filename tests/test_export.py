"""Export of each part (``florence.adapters.export``) to ``torch.export`` and ONNX, and ``florence export``.

Each part of a tiny model is traced once (``trace_part``, a module-scoped fixture: tracing is the costly step) at
batch 2 and written in both formats (``export_traced``); the written file is run (``torch.export.load(...).module()``
or an onnxruntime session) on a batch of 3 (and, with a dynamic size, on a taller image) and compared with the eager
model's own public forward (``encode_image``, ``encode_text``, ``model(...)``, the detector's ``forward`` decoded by
its box coder), not the export wrappers: max abs diff <= 1e-4 in float32.

The models are as small as the code paths allow (the trace costs about 10 ms per graph node on one core, whatever the
widths): one 2D Swin tower of 2 stages (depths 2-1, so a shifted window with its mask; window 2, 32 px) serves the
dual encoder, the classifier, METER and the detector; a 1-layer text tower; a 2-level, 1-block, 16-channel DyHead; a
2-frame video clip. ONNX is written with ``optimize=False`` (half the translation time) except for the text part,
which covers the default optimizer pass.
"""
from __future__ import annotations

import json

import numpy as np
import onnxruntime
import pytest
import torch

import florence
from florence.adapters.export import ExportError, available_parts, export_part, export_traced, trace_part
from florence.adapters.video_classifier import build_video_classifier
from florence.benchmarks import export_cli
from florence.bundle import bundle_sha256
from florence.tokenizer import train_bpe_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread_module")

TOL = 1e-4
TEXTS = ["a photo of a cat", "a red car", "two dogs on the grass", "a photo", "an airplane in the sky"]
ANSWERS = ["yes", "no", "two", "red"]
SUFFIX = {"torch-export": "pt2", "onnx": "onnx"}
FORMATS = ["torch-export", "onnx"]
# the 2D tower of every test: 2 stages (strides 4, 8), a shifted window in stage 0; unit 8 * 2 = 16 px
TOWER = dict(depths=[2, 1], num_heads=[1, 2], window_size=2, img_size=32)
SIZE = 32


@pytest.fixture(scope="module")
def dual_bundle(tmp_path_factory):
    """A saved ``unicl_test`` with the small tower and a 1-layer text tower (the CLI reads the bundle)."""
    root = tmp_path_factory.mktemp("export_dual")
    train_bpe_tokenizer(TEXTS * 3, root / "tok", vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    model = florence.create_model("unicl_test", tokenizer=str(root / "tok"), image={"model": "coswin_test", **TOWER},
                                  text={"num_hidden_layers": 1})
    return model.save_pretrained(root / "bundle")


@pytest.fixture(scope="module")
def dual(dual_bundle):
    return florence.from_pretrained(dual_bundle).eval()


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return florence.create_model("image_classifier", backbone=florence.create_model("coswin_test", **TOWER),
                                 num_classes=5).eval()


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    tower = florence.create_model("coswin_test", **TOWER, out_norms=True)
    return florence.create_model("dyhead_atss_coswin_test", backbone=tower, in_indices=[0, 1], num_classes=3,
                                 neck={"channels": 16, "num_blocks": 1, "num_outs": 2},
                                 input={"scale": [32, 32], "size_divisor": 16}).eval()


@pytest.fixture(scope="module")
def meter(dual):
    torch.manual_seed(1)
    return florence.create_model("meter_coswin_test", backbone=dual, answers=ANSWERS, max_text_len=16).eval()


@pytest.fixture(scope="module")
def video():
    torch.manual_seed(0)
    return build_video_classifier("video_coswin_test", 5, clip_len=2, size=SIZE,
                                  tower_overrides=dict(depths=[2, 1], num_heads=[1, 2], window_size=(1, 2, 2))).eval()


# one trace per part, written in both formats by the tests
@pytest.fixture(scope="module")
def traced_image(dual):
    return trace_part(dual, "image")


@pytest.fixture(scope="module")
def traced_text(dual):
    return trace_part(dual, "text")


@pytest.fixture(scope="module")
def traced_classifier(classifier):
    return trace_part(classifier, "classifier")


@pytest.fixture(scope="module")
def traced_detector(detector):
    return trace_part(detector, "detector", image_size=(32, 48))  # not square: H, W not swapped


@pytest.fixture(scope="module")
def traced_vqa(meter):
    return trace_part(meter, "vqa")


@pytest.fixture(scope="module")
def traced_video(video):
    return trace_part(video, "video")


def _run(path, fmt: str, names: list[str], inputs: list[torch.Tensor]) -> list[np.ndarray]:
    """The exported file run by its own runtime."""
    if fmt == "torch-export":
        out = torch.export.load(str(path)).module()(*inputs)
        return [y.detach().numpy() for y in (out if isinstance(out, (tuple, list)) else (out,))]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})


def _assert_close(got: list[np.ndarray], expected: list[torch.Tensor]) -> float:
    assert len(got) == len(expected)
    diff = 0.0
    for g, e in zip(got, expected):
        assert g.shape == tuple(e.shape)
        diff = max(diff, float(np.abs(g - e.detach().numpy()).max()))
    assert diff <= TOL, diff
    print(f"max abs diff {diff:.3g}")
    return diff


def _export(traced, fmt, tmp_path, optimize=False):
    part = traced.spec.part
    out = tmp_path / f"{part}.{SUFFIX[fmt]}"
    result = export_traced(traced, fmt, out, optimize=optimize, check=False)
    assert out.is_file() and result.sidecar == tmp_path / f"{part}.{SUFFIX[fmt]}.json"
    meta = json.loads(result.sidecar.read_text())
    assert meta["part"] == part and meta["export_format"] == fmt and meta["file"] == out.name
    assert meta["onnx_optimized"] == (optimize if fmt == "onnx" else None)
    assert all(t["shape"][0] == "batch" for t in meta["inputs"] + meta["outputs"])
    return out, meta


def _images(n, h, w, seed=0):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _texts(model, n):
    tokens = model.tokenize(TEXTS[:n])
    return tokens["input_ids"], tokens["attention_mask"]


# -- per part and format ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_image_embeddings(dual, traced_image, fmt, tmp_path):
    out, meta = _export(traced_image, fmt, tmp_path)
    assert meta["inputs"][0]["name"] == "images" and meta["preprocess"] == dual.preprocess
    assert meta["inputs"][0]["shape"] == ["batch", 3, SIZE, SIZE] and meta["outputs"][0]["shape"] == ["batch", 32]
    x = _images(3, SIZE, SIZE)
    with torch.no_grad():
        _assert_close(_run(out, fmt, ["images"], [x]), [dual.encode_image(x)])


@pytest.mark.parametrize("fmt", FORMATS)
def test_text_embeddings_with_padding(dual, traced_text, fmt, tmp_path):
    out, meta = _export(traced_text, fmt, tmp_path, optimize=True)  # the default ONNX optimizer pass
    assert [t["name"] for t in meta["inputs"]] == ["input_ids", "attention_mask"]
    assert meta["inputs"][0]["shape"] == ["batch", 77] and meta["tokenizer"]["context_length"] == 77
    ids, mask = _texts(dual, 3)
    assert (mask == 0).any() and (mask.sum(1) != mask.sum(1)[0]).any()  # padded rows of different lengths
    with torch.no_grad():
        _assert_close(_run(out, fmt, ["input_ids", "attention_mask"], [ids, mask]), [dual.encode_text(ids, mask)])


@pytest.mark.parametrize("fmt", FORMATS)
def test_classifier_logits(classifier, traced_classifier, fmt, tmp_path):
    assert available_parts(classifier) == ["image", "classifier"]
    out, meta = _export(traced_classifier, fmt, tmp_path)
    assert meta["outputs"][0] == {"name": "logits", "shape": ["batch", 5], "dtype": "float32"}
    x = _images(3, SIZE, SIZE)
    with torch.no_grad():
        _assert_close(_run(out, fmt, ["images"], [x]), [classifier(x)])


def _detector_reference(detector, x):
    """cls (B, N, K), ctr (B, N) from the detector's own forward; boxes decoded with its box coder, clipped to x."""
    with torch.no_grad():
        out = detector(x)
    sizes = [tuple(s) for s in out["level_sizes"][0].tolist()]
    anchors = detector.head.anchors(sizes)
    boxes = detector.head.bbox_coder.decode(anchors.expand(x.shape[0], -1, -1), out["reg"],
                                            max_shape=tuple(x.shape[-2:]))
    return [out["cls"], out["ctr"], boxes]


@pytest.mark.parametrize("fmt", FORMATS)
def test_detector_outputs_with_decoded_boxes(detector, traced_detector, fmt, tmp_path):
    out, meta = _export(traced_detector, fmt, tmp_path)
    assert [t["name"] for t in meta["outputs"]] == ["cls_logits", "centerness_logits", "boxes"]
    assert meta["inputs"][0]["shape"] == ["batch", 3, 32, 48] and meta["postprocess"]["strides"] == [4, 8]
    x = _images(3, 32, 48) * 3
    expected = _detector_reference(detector, x)
    boxes = expected[2]
    assert (boxes == 0).any() and (boxes[..., 2] == 48).any() and (boxes[..., 3] == 32).any()  # corners clipped
    _assert_close(_run(out, fmt, ["images"], [x]), expected)


@pytest.mark.parametrize("fmt", FORMATS)
def test_vqa_logits(meter, traced_vqa, fmt, tmp_path):
    out, meta = _export(traced_vqa, fmt, tmp_path)
    assert meta["answers"] == ANSWERS and meta["inputs"][1]["shape"] == ["batch", 16]
    x = _images(3, SIZE, SIZE)
    ids, mask = _texts(meter, 3)
    with torch.no_grad():
        expected = meter(x, ids, mask)["vqa_logits"]
    _assert_close(_run(out, fmt, ["images", "input_ids", "attention_mask"], [x, ids, mask]), [expected])


@pytest.mark.parametrize("fmt", FORMATS)
def test_video_logits(video, traced_video, fmt, tmp_path):
    out, meta = _export(traced_video, fmt, tmp_path)
    assert meta["inputs"][0]["shape"] == ["batch", 3, 2, SIZE, SIZE] and meta["preprocess"]["clip_len"] == 2
    clip = torch.randn(3, 3, 2, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _assert_close(_run(out, fmt, ["videos"], [clip]), [video(clip)])


# -- dynamic image size ---------------------------------------------------------------------------------------------


def test_tower_features_dynamic_size(tmp_path):
    """A tower's pooled features (its ``image`` part) with H, W dynamic in units of 4 * 2 = 8 px: exported at
    2 x 16 x 16, run at 3 x 24 x 16 and 1 x 16 x 32 (window 2: shifted windows with their mask at every size). One
    stage, because the symbolic window geometry costs about 10 s per stage to trace."""
    torch.manual_seed(0)
    tower = florence.create_model("coswin_test", depths=[2], num_heads=[1], window_size=2, img_size=16).eval()
    out = tmp_path / "image.pt2"
    meta = export_part(tower, "image", "torch-export", out, dynamic_size=True, check=False).metadata
    assert meta["inputs"][0]["shape"] == ["batch", 3, "8*h", "8*w"] and meta["dims"]["h"]["min"] == 2
    program = torch.export.load(str(out)).module()
    with torch.no_grad():
        for x in (_images(3, 24, 16), _images(1, 16, 32, seed=1)):
            pooled = tower.forward_features(x).mean((1, 2))  # the head's average pool
            _assert_close([program(x).numpy()], [pooled])


# -- refusals and the command line -------------------------------------------------------------------------------


def test_parts_offered_and_refused(dual, tmp_path):
    assert available_parts(dual) == ["image", "text"]
    with pytest.raises(ExportError, match=r"part 'detector' is not available for a unicl model; available: image, te"):
        export_part(dual, "detector", "onnx", tmp_path / "x.onnx")
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export_part(dual, "image", "tflite", tmp_path / "x")
    with pytest.raises(ExportError, match="dynamic image size is offered for image and classifier only"):
        export_part(dual, "text", "torch-export", tmp_path / "x.pt2", dynamic_size=True)
    with pytest.raises(ExportError, match="dynamic image size exports with --format torch-export only"):
        export_part(dual, "image", "onnx", tmp_path / "x.onnx", dynamic_size=True)
    with pytest.raises(ExportError, match=r"must be a multiple of \(16, 16\)"):
        export_part(dual, "image", "torch-export", tmp_path / "x.pt2", dynamic_size=True, image_size=(32, 40))
    assert not any(tmp_path.iterdir())


def test_cli_writes_the_program_and_its_sidecar(dual_bundle, tmp_path, capsys):
    out = tmp_path / "exports" / "text.pt2"
    assert export_cli.main(["--model", str(dual_bundle), "--part", "text", "--format", "torch-export", str(out)]) == 0
    meta = json.loads((tmp_path / "exports" / "text.pt2.json").read_text())
    assert out.is_file() and meta["bundle_sha256"] == bundle_sha256(dual_bundle) and meta["model"] == str(dual_bundle)
    assert meta["inputs"] == [{"name": "input_ids", "shape": ["batch", 77], "dtype": "int64"},
                              {"name": "attention_mask", "shape": ["batch", 77], "dtype": "int64"}]
    assert meta["preprocess"] == json.loads((dual_bundle / "preprocess.json").read_text())
    assert meta["check"]["inputs"]["input_ids"] == [3, 77] and meta["check"]["max_abs_diff"] <= TOL
    assert "wrote" in capsys.readouterr().out

    code = export_cli.main(["--model", str(dual_bundle), "--part", "vqa", "--format", "onnx", str(tmp_path / "v.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err == "florence export: part 'vqa' is not available for a unicl model; available: image, text\n"
    assert not (tmp_path / "v.onnx").exists()
