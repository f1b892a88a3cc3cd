"""``florence predict``: zero-shot with a dual encoder and with a classifier head, on scikit-image's photos (colour,
grey and palette files), checked against the probabilities computed here from the models' own encoders; clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as skdata

from florence.benchmarks import predict as pr
from florence.data.templates import OPENAI_IMAGENET_TEMPLATES

LABELS = ["cat", "rocket", "coffee", "camera"]




@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Four real photos: RGB JPEG, RGB PNG, a palette PNG and a greyscale PNG."""
    root = tmp_path_factory.mktemp("photos")
    Image.fromarray(skdata.chelsea()).resize((64, 48)).save(root / "chelsea.jpg")
    Image.fromarray(skdata.rocket()).resize((48, 64)).save(root / "rocket.png")
    Image.fromarray(skdata.coffee()).resize((64, 64)).convert("P").save(root / "coffee_palette.png")
    Image.fromarray(skdata.camera()).resize((64, 64)).save(root / "camera_grey.png")  # mode L
    return [root / "chelsea.jpg", root / "rocket.png", root / "coffee_palette.png", root / "camera_grey.png"]


@pytest.fixture(scope="module")
def dual_bundle(tmp_path_factory, one_thread_module):
    import florence
    from florence.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("dual")
    train_bpe_tokenizer([t.format(label) for label in LABELS for t in OPENAI_IMAGENET_TEMPLATES[:10]], root / "tok",
                        vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    return florence.create_model("unicl_test", tokenizer=str(root / "tok")).save_pretrained(root / "model")


@pytest.fixture(scope="module")
def classifier_bundle(dual_bundle, tmp_path_factory):
    import florence

    torch.manual_seed(1)
    model = florence.create_model("image_classifier", backbone=str(dual_bundle), num_classes=3,
                                  class_names=["animal", "vehicle", "drink"])
    return model.save_pretrained(tmp_path_factory.mktemp("classifier") / "model")


def _pixels(model, files) -> torch.Tensor:
    """The photos as the model's eval transform gives them, read with Pillow directly (RGB conversion here)."""
    from florence.data.transforms import build_transform

    transform = build_transform(model.preprocess, train=False)
    return torch.stack([transform(Image.open(f).convert("RGB")) for f in files])


def test_zero_shot_probabilities_match_the_encoders(dual_bundle, photos, capsys):
    """The printed JSON equals softmax(scale * cos) with class embeddings built here from encode_text over the 80
    CLIP templates (a wrong label order, template set or scale fails)."""
    import florence

    assert pr.main(["--model", str(dual_bundle), *map(str, photos), "--labels", ", ".join(LABELS), "--top-k", "4",
                    "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "zero-shot" and out["labels"] == LABELS and out["templates"]["count"] == 80
    assert [p["file"] for p in out["predictions"]] == [str(p) for p in photos] and out["skipped"] == []

    model = florence.from_pretrained(dual_bundle).eval()
    with torch.no_grad():
        classes = []
        for label in LABELS:
            tokens = model.tokenize([t.format(label) for t in OPENAI_IMAGENET_TEMPLATES])
            classes.append(F.normalize(model.encode_text(**tokens).mean(0), dim=0))
        cos = model.encode_image(_pixels(model, photos)) @ torch.stack(classes).T  # N, C
        expected = torch.softmax(model.logit_scale.exp() * cos, dim=1).numpy()
    for row, prediction in zip(expected, out["predictions"]):
        got = {item["label"]: item["probability"] for item in prediction["top_k"]}
        assert list(got) == [LABELS[i] for i in np.argsort(-row, kind="stable")]  # best first
        assert got == pytest.approx({label: float(p) for label, p in zip(LABELS, row)}, abs=1e-5)


def test_table_output_and_labels_file(dual_bundle, photos, tmp_path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("# my labels\ncat\n\nrocket\ncoffee\n")
    assert pr.main(["--model", str(dual_bundle), str(photos[0]), str(photos[3]), "--labels-file", str(labels),
                    "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["file", "top-1", "top-2"] and len(lines) == 3
    assert lines[1].startswith(str(photos[0])) and lines[2].startswith(str(photos[3]))
    for line in lines[1:]:
        cells = line.split()[1:]  # label p%, label p%
        assert {cells[0], cells[2]} <= {"cat", "rocket", "coffee"} and cells[1].endswith("%")


def test_classifier_head_with_its_class_names_or_renamed(classifier_bundle, photos, capsys):
    import florence

    assert pr.main(["--model", str(classifier_bundle), *map(str, photos), "--json", "--top-k", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "classifier" and out["labels"] == ["animal", "vehicle", "drink"]
    assert out["templates"] is None
    model = florence.from_pretrained(classifier_bundle).eval()
    with torch.no_grad():
        expected = torch.softmax(model(_pixels(model, photos)), dim=1).numpy()
    for row, prediction in zip(expected, out["predictions"]):
        got = {item["label"]: item["probability"] for item in prediction["top_k"]}
        assert got == pytest.approx(dict(zip(["animal", "vehicle", "drink"], row.tolist())), abs=1e-5)
    assert pr.main(["--model", str(classifier_bundle), str(photos[0]), "--labels", "a,b,c", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["labels"] == ["a", "b", "c"]
    assert pr.main(["--model", str(classifier_bundle), str(photos[0]), "--labels", "a,b"]) == 2
    assert "the head has 3 classes but 2 labels were given" in capsys.readouterr().err


def test_missing_and_unreadable_images(dual_bundle, photos, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    missing = tmp_path / "nothere.png"
    code = pr.main(["--model", str(dual_bundle), str(photos[0]), str(missing), "--labels", "cat,dog"])
    err = capsys.readouterr().err
    assert code == 2 and str(missing) in err and "missing file" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    code = pr.main(["--model", str(dual_bundle), str(photos[0]), str(broken), str(missing), "--labels", "cat,dog",
                    "--on-bad-sample", "skip", "--json"])
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert code == 0 and [p["file"] for p in out["predictions"]] == [str(photos[0])]
    assert [s["file"] for s in out["skipped"]] == [str(broken), str(missing)]
    assert f"skipped {broken}" in captured.err and f"skipped {missing}" in captured.err


def test_user_errors_are_one_line(dual_bundle, photos, tmp_path, capsys):
    assert pr.main(["--model", str(dual_bundle), str(photos[0])]) == 2
    assert "--labels" in capsys.readouterr().err
    assert pr.main(["--model", str(dual_bundle), str(photos[0]), "--labels", "cat,cat,dog"]) == 2
    assert "repeated label(s) cat" in capsys.readouterr().err
    assert pr.main(["--model", str(tmp_path / "no_bundle"), str(photos[0]), "--labels", "cat"]) == 2
    assert "no_bundle" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pr.main(["--model", str(dual_bundle), str(photos[0]), "--labels", "a", "--labels-file", "f.txt"])


def test_help_names_the_templates(capsys):
    with pytest.raises(SystemExit):
        pr.main(["--help"])
    assert "80 CLIP ImageNet templates" in " ".join(capsys.readouterr().out.split())


def test_florence_cli_dispatches_predict(dual_bundle, photos, capsys):
    from florence.cli import main

    assert main(["predict", "--model", str(dual_bundle), str(photos[1]), "--labels", "rocket,cat", "--top-k",
                 "1"]) == 0
    assert str(photos[1]) in capsys.readouterr().out
