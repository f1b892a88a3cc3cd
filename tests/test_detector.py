"""The detector as a whole: named configs, pre-trained towers, bundles, losses and predictions, and the detection task,
``florence eval detection``, ``florence detect`` and zero-shot detection end to end on tiny canvases."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import florence
from florence.adapters.detector import Detector
from florence.adapters.zeroshot_detection import ProposalClassifier, square_crops
from florence.benchmarks import detect, detection_canvas, detection_cli, detection_demo
from florence.benchmarks.paper import reference_rows
from florence.engine import train
from florence.tokenizer import train_bpe_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread_module")

TINY = {"neck": {"channels": 32, "num_blocks": 1}, "input": {"scale": [64, 64], "size_divisor": 32}}


def _tiny(num_classes=3, **kwargs):
    return florence.create_model("dyhead_atss_coswin_test", num_classes=num_classes, **{**TINY, **kwargs})


def test_named_config_levels_and_output_shapes():
    torch.manual_seed(0)
    model = _tiny()
    out = model(torch.randn(2, 3, 64, 96))
    assert out["level_sizes"][0].tolist() == [[8, 12], [4, 6], [2, 3], [1, 2], [1, 1]]  # strides 8 .. 128
    n = 96 + 24 + 6 + 2 + 1
    assert out["cls"].shape == (2, n, 3) and out["reg"].shape == (2, n, 4) and out["ctr"].shape == (2, n)
    assert model.strides == [8, 16, 32, 64, 128]
    assert set(florence.list_models("dyhead_atss_*")) >= {"dyhead_atss_coswin_test", "dyhead_atss_coswin_tiny",
                                                          "dyhead_atss_coswin_base", "dyhead_atss_swin_large"}


def test_pretrained_tower_keeps_its_weights_and_gains_output_norms(tmp_path):
    torch.manual_seed(0)
    tower = florence.create_model("coswin_test")
    tower.save_pretrained(tmp_path / "tower")
    model = _tiny(backbone=str(tmp_path / "tower"))
    ours = model.backbone.state_dict()
    for key, value in tower.state_dict().items():
        if key.startswith("layers."):
            assert torch.equal(ours[key], value), key
    assert {k.split(".")[0] for k in ours if k.startswith("norm")} == {"norm1", "norm2", "norm3"}  # levels 1-3 only
    assert not any(k.startswith(("head.", "norm.")) for k in ours)  # classifier and final norm pruned
    assert model.preprocess == tower.default_preprocess


def test_dual_encoder_bundle_as_backbone(tmp_path):
    torch.manual_seed(0)
    dual = florence.create_model("unicl_test")
    dual.save_pretrained(tmp_path / "dual")
    model = _tiny(backbone=str(tmp_path / "dual"))
    key = "layers.0.blocks.0.attn.qkv.weight"
    assert torch.equal(model.backbone.state_dict()[key], dual.image_encoder.state_dict()[key])


def test_bundle_round_trip(tmp_path):
    torch.manual_seed(0)
    model = _tiny(class_names=["a", "b", "c"], cat_ids=[3, 7, 9]).eval()
    model.save_pretrained(tmp_path / "det")
    back = florence.from_pretrained(tmp_path / "det").eval()
    assert isinstance(back, Detector)
    assert back.class_names == ["a", "b", "c"] and back.cat_ids == [3, 7, 9] and back.input_cfg == model.input_cfg
    x = torch.randn(1, 3, 64, 64)
    for key, value in model(x).items():
        assert torch.equal(back(x)[key], value), key


def test_loss_backward_and_predictions():
    torch.manual_seed(0)
    model = _tiny()
    x = torch.randn(2, 3, 64, 64)
    boxes = torch.tensor([[[4.0, 6.0, 30.0, 40.0], [32.0, 20.0, 60.0, 50.0]], [[10.0, 10.0, 20.0, 20.0], [0, 0, 0, 0]]])
    labels = torch.tensor([[0, 2], [1, -1]])
    sizes = torch.tensor([[64, 64], [60, 50]])
    losses = model.loss(model(x), sizes, boxes, labels)
    assert float(losses["num_pos"]) > 0
    total = losses["loss_cls"] + losses["loss_bbox"] + losses["loss_centerness"]
    assert torch.isfinite(total)
    total.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, no_grad
    with torch.no_grad():  # every location confident: predictions up to max_per_img, inside each image
        model.head.atss_cls.bias.fill_(5.0)
        model.head.atss_centerness.bias.fill_(5.0)
    model.test_cfg["max_per_img"] = 7
    preds = model.eval().predict(x, sizes)
    for pred, (h, w) in zip(preds, sizes.tolist()):
        assert 0 < len(pred["boxes"]) <= 7
        assert (pred["boxes"][:, 2] <= w).all() and (pred["boxes"][:, 3] <= h).all() and (pred["boxes"] >= 0).all()
        assert (pred["labels"] < 3).all() and (pred["scores"][:-1] >= pred["scores"][1:]).all()


def test_square_crops_keep_the_item_centred():
    image = Image.new("RGB", (100, 80))
    crop = square_crops(image, torch.tensor([[10.0, 20.0, 30.0, 60.0]]), context=1.0)[0]
    assert crop.size == (40, 40)  # the longer side, square, centred on the box


# -- the task and the command lines on tiny canvases --------------------------------------------------------------


@pytest.fixture(scope="module")
def canvases(tmp_path_factory, fake_fmnist) -> Path:
    root = tmp_path_factory.mktemp("canvases")
    detection_canvas.generate(root, "train", 12, seed=0, canvas=64, scale=(16, 32), max_items=3, root=fake_fmnist)
    detection_canvas.generate(root, "test", 6, seed=1, canvas=64, scale=(16, 32), max_items=3, root=fake_fmnist)
    return root


def _run_config(tmp_path: Path, canvases: Path, **data) -> Path:
    config = {
        "task": "detection",
        "model": {"name": "dyhead_atss_coswin_test", "overrides": TINY},
        "data": {"annotations": str(canvases / "annotations" / "instances_train.json"),
                 "images": str(canvases / "train"), "scale": [64, 64], "flip": 0.5, **data},
        "optim": {"lr": 1e-3, "batch_size": 4},
        "schedule": {"steps": 3},
        "output": {"dir": str(tmp_path / "run"), "log_every": 1},
        "eval": {"source": {"type": "coco", "annotations": str(canvases / "annotations" / "instances_test.json"),
                            "images": str(canvases / "test")}, "best_metric": "AP"},
        "num_threads": 1,
    }
    path = tmp_path / "detection.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, canvases) -> Path:
    tmp = tmp_path_factory.mktemp("det_run")
    assert train.main([str(_run_config(tmp, canvases))]) == 0
    return tmp / "run"


@pytest.mark.slow
def test_training_writes_a_detector_bundle_and_coco_metrics(trained):
    evaluation = json.loads((trained / "eval.json").read_text())
    assert evaluation["task"] == "detection" and {"AP", "AP50", "AP75", "AR100"} <= set(evaluation["metrics"])
    model = florence.from_pretrained(trained / "final")
    assert isinstance(model, Detector) and model.num_classes == 10 and model.cat_ids == list(range(1, 11))
    assert (trained / "best" / "manifest.json").is_file()
    lines = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert all(k in lines[0] for k in ("loss_cls", "loss_bbox", "loss_centerness", "num_pos"))
    assert "eval/AP" in lines[-1]


@pytest.mark.slow
def test_eval_detection_cli_and_scoring_a_results_file(trained, canvases, tmp_path, capsys):
    ann = str(canvases / "annotations" / "instances_test.json")
    out = tmp_path / "results"
    assert detection_cli.main(["--model", str(trained / "final"), "--annotations", ann, "--images",
                               str(canvases / "test"), "--output", str(out), "--name", "canvases", "--quiet"]) == 0
    result = json.loads((out / "detection_canvases.json").read_text())
    assert set(result["metrics"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs",
                                      "ARm", "ARl", "AR50", "AR75"}
    assert len(result["per_class_AP"]) == 10
    assert result["protocol"] == "coco-detection-v1" and len(result["model"]["sha256"]) == 64
    assert result["data"]["num_images"] == 6 and (out / "detection_canvases.png").is_file()
    dets = json.loads((out / "detections_canvases.json").read_text())
    assert all(len(d["bbox"]) == 4 and 1 <= d["category_id"] <= 10 for d in dets)
    # the written detections, scored without a model and with pycocotools, give the same numbers
    assert detection_cli.main(["--predictions", str(out / "detections_canvases.json"), "--annotations", ann,
                               "--output", str(out), "--name", "rescored", "--backend", "pycocotools"]) == 0
    rescored = json.loads((out / "detection_rescored.json").read_text())
    for key, value in result["metrics"].items():
        assert rescored["metrics"][key] == pytest.approx(value, abs=1e-12), key
    assert "AP" in capsys.readouterr().out
    # user errors: one line, exit 2
    assert detection_cli.main(["--model", str(trained / "final"), "--annotations", ann]) == 2
    assert "--images" in capsys.readouterr().err


@pytest.mark.slow
def test_detect_cli_draws_and_lists(trained, canvases, tmp_path, capsys):
    images = sorted((canvases / "test").glob("*.png"))[:2]
    code = detect.main(["--model", str(trained / "final"), *map(str, images), "--output", str(tmp_path / "pics"),
                        "--score-thr", "0.0", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert [p["file"] for p in result["predictions"]] == [str(f) for f in images]
    assert all(Path(p["picture"]).is_file() for p in result["predictions"])
    assert json.loads((tmp_path / "pics" / "detections.json").read_text()) == result
    names = florence.from_pretrained(trained / "final").class_names
    assert all(d["label"] in names for p in result["predictions"] for d in p["detections"])
    assert detect.main(["--model", str(trained / "final"), str(tmp_path / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().err


@pytest.fixture(scope="module")
def dual_bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dual")
    names = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
    train_bpe_tokenizer([f"a photo of a {n}." for n in names] * 3, root / "tok", vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    return florence.create_model("unicl_test", tokenizer=str(root / "tok")).save_pretrained(root / "model")


@pytest.mark.slow
def test_zero_shot_detection(tmp_path, canvases, dual_bundle, capsys):
    assert train.main([str(_run_config(tmp_path, canvases, class_agnostic=True)), "eval.best_metric=null"]) == 0
    capsys.readouterr()
    proposer = florence.from_pretrained(tmp_path / "run" / "final")
    assert proposer.num_classes == 1
    classifier = ProposalClassifier(florence.from_pretrained(dual_bundle), ["bag", "coat", "sandal"],
                                    templates=["a photo of a {}."])
    image = Image.open(sorted((canvases / "test").glob("*.png"))[0]).convert("RGB")
    proposals = {"boxes": torch.tensor([[2.0, 2.0, 30.0, 30.0], [20.0, 10.0, 60.0, 40.0]]),
                 "scores": torch.tensor([0.9, 0.5])}
    named = classifier(image, proposals)
    assert named["labels"].tolist() and all(0 <= v < 3 for v in named["labels"].tolist())
    assert (named["scores"] <= torch.tensor([0.9, 0.5]).max()).all()
    with torch.no_grad():  # a confident proposer: every location proposes, so the naming is exercised
        proposer.head.atss_cls.bias.fill_(5.0)
        proposer.head.atss_centerness.bias.fill_(5.0)
    proposer.save_pretrained(tmp_path / "confident")
    code = detect.main(["--model", str(tmp_path / "confident"), str(sorted((canvases / "test").glob("*.png"))[0]),
                        "--labels", "bag,coat", "--text-model", str(dual_bundle), "--output", str(tmp_path / "z"),
                        "--score-thr", "0", "--json"])
    assert code == 0
    labels = [d["label"] for p in json.loads(capsys.readouterr().out)["predictions"] for d in p["detections"]]
    assert labels and set(labels) <= {"bag", "coat"}
    ann = str(canvases / "annotations" / "instances_test.json")
    assert detection_cli.main(["--model", str(tmp_path / "run" / "final"), "--annotations", ann, "--images",
                               str(canvases / "test"), "--text-model", str(dual_bundle), "--output",
                               str(tmp_path / "zr"), "--quiet", "--pictures", "0"]) == 0
    result = json.loads((tmp_path / "zr" / "detection_instances_test.json").read_text())
    assert result["protocol"] == "zeroshot-detection-crop-v1" and "AP50" in result["metrics"]


@pytest.mark.slow
def test_test_time_augmentation_runs_and_merges(trained, canvases, tmp_path):
    ann = str(canvases / "annotations" / "instances_test.json")
    assert detection_cli.main(["--model", str(trained / "final"), "--annotations", ann, "--images",
                               str(canvases / "test"), "--output", str(tmp_path), "--name", "tta", "--quiet",
                               "--scales", "64x64,96x96", "--flip", "--pictures", "0"]) == 0
    result = json.loads((tmp_path / "detection_tta.json").read_text())
    assert result["test"]["scales"] == [[64, 64], [96, 96]] and result["test"]["flip"] is True
    per_image: dict[int, int] = {}
    for det in json.loads((tmp_path / "detections_tta.json").read_text()):
        per_image[det["image_id"]] = per_image.get(det["image_id"], 0) + 1
    assert all(n <= 100 for n in per_image.values())


def test_report_puts_detection_beside_table_6():
    rows = dict(reference_rows("detection", "coco", "AP"))
    assert rows["Florence-CoSwin-H + DyHead"] == 62.0 and rows["DyHead-Swin-L (multi-scale)"] == 58.4
    assert reference_rows("detection", "coco", "AP50") == []
    assert dict(reference_rows("detection", "visual_genome", "AP50"))["Florence-CoSwin-H + DyHead"] == 16.2


@pytest.mark.slow
@pytest.mark.skipif(not Path(detection_canvas.FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="needs the Debian package dataset-fashion-mnist")
def test_detection_demo_end_to_end_tiny(tmp_path, dual_bundle, capsys):
    code = detection_demo.main(["--workdir", str(tmp_path / "demo"), "--backbone", str(dual_bundle),
                                "--train-canvases", "8", "--test-canvases", "4", "schedule.steps=2",
                                "optim.batch_size=4", "checkpoint.every_steps=1000",
                                "model.overrides={neck: {channels: 32, num_blocks: 1}, input: {scale: [128, 128], "
                                "size_divisor: 32}}"])
    assert code == 0
    results = tmp_path / "demo" / "results"
    metrics = json.loads((results / "detection_fashion_mnist_canvases.json").read_text())["metrics"]
    assert 0.0 <= metrics["AP"] <= 1.0
    assert len(list((results / "pictures").glob("*.png"))) == 4
    assert "detection demo finished" in capsys.readouterr().out
