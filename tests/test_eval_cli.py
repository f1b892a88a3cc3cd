"""``florence eval``: the result JSON schema, caching, pictures, clear errors (and bugs that keep their traceback),
bad images, per-task help, trivial metrics, the classifier-head protocol and zero-shot accuracy with signal, on a
small real ImageFolder (scikit-learn's 8x8 digits written as PNG files) with tiny bundles."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from florence.adapters import linear_probe as lp
from florence.benchmarks import datasets as dsets
from florence.benchmarks import eval_cli

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]




@pytest.fixture(scope="module")
def bundle(tmp_path_factory, one_thread_module):
    import florence
    from florence.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("bundle")
    prompts = [f"a photo of the number {n}." for n in DIGIT_NAMES] * 3
    train_bpe_tokenizer(prompts, root / "tok", vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    model = florence.create_model("unicl_test", tokenizer=str(root / "tok"))
    return model.save_pretrained(root / "model")


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """<root>/{train,test}/<digit name>/*.png: 12 train and 4 test images per class."""
    from PIL import Image
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    root = tmp_path_factory.mktemp("digits")
    counts = {}
    for image, label in zip(x, y):
        n = counts.get(label, 0)
        if n >= 16:
            continue
        counts[label] = n + 1
        split = "train" if n < 12 else "test"
        folder = root / split / DIGIT_NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image.reshape(8, 8) * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels).resize((32, 32), Image.Resampling.NEAREST).save(folder / f"{n}.png")
    return root


def _run(task, bundle, root, out, *extra):
    probe = ["--probe-threads", "1"] if task in ("linear-probe", "few-shot") else []
    return eval_cli.main([task, "--model", str(bundle), "--dataset", "imagefolder", "--data-root", str(root),
                          "--output", str(out), "--batch-size", "32", "--quiet", *probe, *extra])


def _check_common_schema(result, task, bundle):
    from florence.bundle import bundle_sha256

    for key in ("task", "dataset", "protocol", "paper_metric", "metrics", "trivial_metrics", "bad_samples", "model",
                "data", "seeds", "precision", "versions", "args", "created", "wall_time_s"):
        assert key in result, key
    assert result["task"] == task and result["dataset"] == "imagefolder"
    assert result["model"]["sha256"] == bundle_sha256(bundle) and len(result["model"]["sha256"]) == 64
    assert result["precision"] == "fp32"
    assert result["seeds"] == ({"split": 0} if task == "linear-probe" else {})  # only the seeds the task uses
    assert {"torch", "scikit-learn", "python", "platform"} <= set(result["versions"])  # engine's list + sklearn
    for value in result["metrics"].values():
        assert 0.0 <= value <= 1.0
    manifest = result["data"]["test"]
    assert manifest["file_count"] == 40 and len(manifest["sha256"]) == 64
    assert result["trivial_metrics"] == []  # 10 classes: top-5 can miss
    assert result["bad_samples"]["test"]["skipped"] == 0 and result["bad_samples"]["test"]["evaluated"] == 40


def test_projected_pooled_features_equal_encode_image(bundle):
    import florence
    from florence.adapters.features import extract, project

    model = florence.from_pretrained(bundle)
    images = torch.rand(6, 3, 56, 56)
    pooled, targets = extract(model, [(images, torch.arange(6))])
    with torch.no_grad():
        expected = model.encode_image(images).numpy()
    np.testing.assert_allclose(project(model, pooled), expected, rtol=1e-5, atol=1e-6)
    assert pooled.shape == (6, model.image_encoder.num_features) and targets.tolist() == list(range(6))


def test_zeroshot_result_json(bundle, digits_folder, tmp_path):
    out = tmp_path / "out"
    assert _run("zeroshot", bundle, digits_folder, out) == 0
    result = json.loads((out / "zeroshot_imagefolder.json").read_text())
    _check_common_schema(result, "zeroshot", bundle)
    assert set(result["metrics"]) == {"top1", "top5", "mean_per_class"}
    assert result["protocol"] == eval_cli.ZEROSHOT_PROTOCOL_ID
    assert result["templates"]["set"] == "imagenet" and result["templates"]["count"] == 80
    assert len(result["templates"]["sha256"]) == 64
    assert result["classnames"] == sorted(DIGIT_NAMES)  # ImageFolder order: sorted folder names
    assert result["class_embeddings_from_cache"] is False
    png = out / "zeroshot_imagefolder.confusion.png"
    assert png.is_file() and str(png) in result["pictures"]
    # a second run reads the class embeddings from the cache and gives the same numbers
    assert _run("zeroshot", bundle, digits_folder, out) == 0
    again = json.loads((out / "zeroshot_imagefolder.json").read_text())
    assert again["class_embeddings_from_cache"] is True and again["metrics"] == result["metrics"]
    # a user template file changes the template hash
    (tmp_path / "t.txt").write_text("a handwritten {}.\n")
    assert _run("zeroshot", bundle, digits_folder, tmp_path / "o2", "--templates", str(tmp_path / "t.txt")) == 0
    other = json.loads((tmp_path / "o2" / "zeroshot_imagefolder.json").read_text())
    assert other["templates"]["count"] == 1 and other["templates"]["sha256"] != result["templates"]["sha256"]


def test_linear_probe_result_json_matches_the_probe_on_the_cached_features(bundle, digits_folder, tmp_path):
    out = tmp_path / "out"
    assert _run("linear-probe", bundle, digits_folder, out, "--max-iter", "200") == 0
    result = json.loads((out / "linear_probe_imagefolder.json").read_text())
    _check_common_schema(result, "linear-probe", bundle)
    assert result["protocol"] == lp.PROTOCOL_ID == "openai-clip-lbfgs-v1"
    probe = result["probe"]
    assert probe["num_train"] + probe["num_val"] == 120 and probe["num_test"] == 40
    assert probe["val_source"].startswith("carved") and probe["refit"] == "train+val"
    assert probe["feature_dim"] == 256  # the pooled 8C features of coswin_test, before the projection
    assert 7 <= len(probe["sweep"]) <= 15
    assert (out / "linear_probe_imagefolder.confusion.png").is_file()
    # recompute from the cached pooled features with the library function directly
    cache = sorted((out / "cache").glob("pooled-*.npz"))
    assert len(cache) == 2  # train and test
    arrays = {("train" if "-train-" in p.name else "test"): np.load(p) for p in cache}
    train_x, train_y = arrays["train"]["features"], arrays["train"]["targets"]
    fit_idx, val_idx = dsets.carve_validation(train_y, 0.2, seed=0)
    direct = lp.linear_probe((train_x[fit_idx], train_y[fit_idx]), (train_x[val_idx], train_y[val_idx]),
                             (arrays["test"]["features"], arrays["test"]["targets"]), "top1", 10, max_iter=200)
    assert direct.C == pytest.approx(probe["C"])
    assert direct.metrics == pytest.approx(result["metrics"])


def test_few_shot_result_json(bundle, digits_folder, tmp_path):
    out = tmp_path / "out"
    assert _run("few-shot", bundle, digits_folder, out, "--shots", "1", "2", "--seeds", "0", "1",
                "--max-iter", "100", "--no-plots") == 0
    result = json.loads((out / "few_shot_imagefolder.json").read_text())
    assert result["protocol"] == lp.FEW_SHOT_PROTOCOL_ID and result["seeds"] == {"split": 0, "few_shot": [0, 1]}
    assert {"1shot_top1", "2shot_top1", "2shot_mean_per_class"} <= set(result["metrics"])
    assert set(result["metrics_std"]) == set(result["metrics"])
    runs = result["probe"]["per_shot"]["2"]
    assert [r["seed"] for r in runs] == [0, 1]
    assert result["metrics"]["2shot_top1"] == pytest.approx(np.mean([r["metrics"]["top1"] for r in runs]))


def test_missing_dataset_path_is_a_clear_error(bundle, tmp_path, capsys):
    missing = tmp_path / "no_cifar_here"
    code = eval_cli.main(["zeroshot", "--model", str(bundle), "--dataset", "cifar10", "--data-root", str(missing),
                          "--output", str(tmp_path / "out"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(missing / "cifar-10-batches-py" / "batches.meta") in err and "downloads nothing" in err
    assert not (tmp_path / "out" / "zeroshot_cifar10.json").exists()


def _copy_images(src, dst, per_class: int, splits=("test",)):
    """``dst/<split>/<class>/`` with the first ``per_class`` images of each class of ``src/<split>``."""
    for split in splits:
        for folder in sorted((src / split).iterdir()):
            (dst / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:per_class]:
                shutil.copy(image, dst / split / folder.name / image.name)
    return dst


def test_feature_cache_is_keyed_by_the_data(bundle, digits_folder, tmp_path):
    """Another --data-root with the same dataset name and output reads its own images, not the cached ones."""
    out = tmp_path / "out"
    smaller = _copy_images(digits_folder, tmp_path / "smaller", per_class=2, splits=("train", "test"))
    few = ("--shots", "1", "--seeds", "0", "--max-iter", "50", "--no-plots")
    assert _run("few-shot", bundle, digits_folder, out, *few) == 0
    assert _run("few-shot", bundle, smaller, out, *few) == 0
    result = json.loads((out / "few_shot_imagefolder.json").read_text())
    assert result["probe"]["num_test"] == 20 and result["data"]["test"]["file_count"] == 20
    assert len(list((out / "cache").glob("pooled-*.npz"))) == 4  # train and test of each data root
    fresh = tmp_path / "fresh"
    assert _run("few-shot", bundle, smaller, fresh, *few, "--no-cache") == 0
    assert json.loads((fresh / "few_shot_imagefolder.json").read_text())["metrics"] == result["metrics"]


def test_retrieval_cache_is_keyed_by_the_caption_file(bundle, digits_folder, tmp_path):
    import csv

    def captions(path, names):
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "caption"])
            writer.writerows([[f"test/{n}/12.png", f"a photo of the number {n}."] for n in names])
        return path

    first, second = captions(tmp_path / "a.csv", DIGIT_NAMES[:5]), captions(tmp_path / "b.csv", DIGIT_NAMES[5:8])

    def retrieval(caption_file, out, *extra):
        return eval_cli.main(["retrieval", "--model", str(bundle), "--dataset", "digits", "--data-root",
                              str(digits_folder), "--captions", str(caption_file), "--output", str(out), "--quiet",
                              "--no-plots", *extra])

    out = tmp_path / "out"
    assert retrieval(first, out) == 0 and retrieval(second, out) == 0
    result = json.loads((out / "retrieval_digits.json").read_text())
    assert result["data"]["num_images"] == 3 and len(list((out / "cache").glob("pooled-*.npz"))) == 2
    assert retrieval(second, tmp_path / "fresh", "--no-cache") == 0
    assert json.loads((tmp_path / "fresh" / "retrieval_digits.json").read_text())["metrics"] == result["metrics"]


def test_image_tower_bundle_can_be_probed_but_not_used_zero_shot(digits_folder, tmp_path, capsys, one_thread_module):
    import florence

    torch.manual_seed(0)
    tower = florence.create_model("coswin_test").save_pretrained(tmp_path / "tower")
    out = tmp_path / "out"
    assert _run("linear-probe", tower, digits_folder, out, "--max-iter", "50", "--no-plots") == 0
    result = json.loads((out / "linear_probe_imagefolder.json").read_text())
    assert result["probe"]["feature_dim"] == 256 and 0.0 <= result["metrics"]["top1"] <= 1.0
    capsys.readouterr()
    assert _run("zeroshot", tower, digits_folder, out) == 2
    err = capsys.readouterr().err
    assert "needs a dual encoder" in err and "Traceback" not in err
    assert not (out / "zeroshot_imagefolder.json").exists()


def test_runtime_errors_are_clear_messages(bundle, tmp_path, capsys, monkeypatch):
    """ImageNet without open_clip (and no --classnames): a message and exit status 2, not a traceback."""
    import sys

    for i in range(1000):
        folder = tmp_path / "imagenet" / "val" / f"n{i:08d}"
        folder.mkdir(parents=True)
        (folder / "x.JPEG").touch()
    monkeypatch.setitem(sys.modules, "open_clip.zero_shot_metadata", None)  # its import now fails
    code = eval_cli.main(["zeroshot", "--model", str(bundle), "--dataset", "imagenet", "--data-root",
                          str(tmp_path / "imagenet"), "--output", str(tmp_path / "out"), "--quiet"])
    assert code == 2
    assert "install open_clip" in capsys.readouterr().err


def test_every_paper_dataset_names_its_missing_path(tmp_path):
    specs = dsets.build_specs()
    paper = {s.name for s in specs.values() if s.paper_name}
    assert paper == {"imagenet", "food101", "cifar10", "cifar100", "sun397", "cars", "fgvc_aircraft", "voc2007",
                     "dtd", "pets", "caltech101", "flowers102"}
    for spec in specs.values():
        with pytest.raises(dsets.DatasetNotFound, match=str(tmp_path / spec.required[0])):
            spec.load(tmp_path, "test", transform=lambda x: x)


def test_carve_validation_and_stratified_subset_are_stratified_and_seeded():
    labels = np.repeat(np.arange(5), [10, 20, 30, 40, 50])
    train, val = dsets.carve_validation(labels, 0.2, seed=0)
    assert not set(train) & set(val) and len(train) + len(val) == 150
    assert np.bincount(labels[val]).tolist() == [2, 4, 6, 8, 10]
    assert np.array_equal(val, dsets.carve_validation(labels, 0.2, seed=0)[1])
    sub = dsets.stratified_subset(labels, 30, seed=0)
    assert np.bincount(labels[sub]).tolist() == [2, 4, 6, 8, 10]


# --- zero-shot with signal -------------------------------------------------------------------------------------------


def _load_split(folder, model):
    """``(images (N, 3, H, W), labels (N,), class names)`` of an ImageFolder split through the model's eval transform,
    read with torchvision's own loader (independent of florence's datasets)."""
    from torchvision.datasets import ImageFolder

    from florence.data.transforms import build_transform

    ds = ImageFolder(str(folder), transform=build_transform(model.preprocess, train=False))
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    return images, torch.tensor(ds.targets), [c.replace("_", " ") for c in ds.classes]


def _ridge(x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """``(out, in)`` weight of the ridge regression of ``y (N, out)`` on ``x (N, in)`` (no intercept)."""
    return torch.linalg.solve(x.T @ x + lam * torch.eye(x.shape[1]), x.T @ y).T


@pytest.fixture(scope="module")
def fitted_bundle(bundle, digits_folder, tmp_path_factory):
    """The tiny dual encoder with both projections fitted by ridge regression (its random towers stay): the text
    projection sends every prompt of a digit towards its own direction (10 orthonormal directions), and the image
    projection sends each training digit to its class's text embedding, computed here with ``encode_text`` directly
    (the 80 CLIP templates averaged; not the library's classifier). Zero-shot top-1 on the test digits is then 0.95
    with clear margins between classes, and 0.0 with the class order reversed anywhere on the evaluation path."""
    import florence
    import torch.nn.functional as F

    from florence.data.templates import OPENAI_IMAGENET_TEMPLATES as TEMPLATES

    model = florence.from_pretrained(bundle).eval()
    images, labels, classes = _load_split(digits_folder / "train", model)
    with torch.no_grad():
        directions = torch.linalg.qr(torch.randn(model.embed_dim, len(classes),
                                                 generator=torch.Generator().manual_seed(0)))[0].T  # C, D
        tokens = model.tokenize([t.format(name) for name in classes for t in TEMPLATES])  # class-major
        prompt_class = torch.arange(len(classes)).repeat_interleave(len(TEMPLATES))
        hidden = model.text_encoder.forward_features(tokens["input_ids"], tokens["attention_mask"])[:, 0]  # P, H
        model.text_encoder.projection.weight.copy_(_ridge(hidden, directions[prompt_class], 1e-3))  # D, H
        text = model.encode_text(tokens["input_ids"], tokens["attention_mask"])  # P, D unit norm
        text = F.normalize(text.reshape(len(classes), len(TEMPLATES), -1).mean(1), dim=-1)  # C, D
        pooled = model.image_encoder(images)  # N, 8C
        model.image_projection.weight.copy_(_ridge(pooled, text[labels], 1.0))  # D, 8C
    return model.save_pretrained(tmp_path_factory.mktemp("fitted") / "model")


class _OpenClipShim:
    """open_clip's ``build_zero_shot_classifier`` calls ``tokenizer(texts).to(device)`` and
    ``model.encode_text(tokens, normalize=True)``: this adapts our dual encoder to that interface."""

    def __init__(self, model):
        self.model = model

    def tokenizer(self, texts):
        tokens = self.model.tokenize(texts)
        return torch.stack([tokens["input_ids"], tokens["attention_mask"]])  # 2, N, L

    def encode_text(self, tokens, normalize=True):
        return self.model.encode_text(tokens[0], tokens[1], normalize=normalize)


def test_zeroshot_has_signal_and_matches_open_clip(fitted_bundle, digits_folder, tmp_path, monkeypatch):
    """End to end: `florence eval zeroshot` on a model fitted to the task scores far above chance (a reversed or
    shuffled class order fails), equals open_clip's zero-shot classifier applied to the same images, and runs
    through ``evaluate_zeroshot`` (the one evaluator) with its default templates, the 80 CLIP ImageNet templates."""
    import florence
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    from florence.adapters import zeroshot as zs
    from florence.data.templates import OPENAI_IMAGENET_TEMPLATES

    calls = []
    real = zs.evaluate_zeroshot
    monkeypatch.setattr(zs, "evaluate_zeroshot", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    out = tmp_path / "out"
    assert _run("zeroshot", fitted_bundle, digits_folder, out, "--no-plots") == 0
    result = json.loads((out / "zeroshot_imagefolder.json").read_text())
    assert result["metrics"]["top1"] >= 0.9  # chance: 0.1
    assert len(calls) == 1 and tuple(calls[0][0][3]) == zs.DEFAULT_TEMPLATES == OPENAI_IMAGENET_TEMPLATES
    assert result["templates"]["count"] == 80

    model = florence.from_pretrained(fitted_bundle).eval()
    images, labels, classes = _load_split(digits_folder / "test", model)
    shim = _OpenClipShim(model)
    weights = build_zero_shot_classifier(shim, shim.tokenizer, classes, OPENAI_IMAGENET_TEMPLATES,
                                         num_classes_per_batch=3)  # D, C
    with torch.no_grad():
        scores = (model.encode_image(images) @ weights).numpy()  # N, C
    order = np.argsort(-scores, axis=1, kind="stable")
    top1 = float((order[:, 0] == labels.numpy()).mean())
    top5 = float((order[:, :5] == labels.numpy()[:, None]).any(axis=1).mean())
    assert result["metrics"]["top1"] == pytest.approx(top1, abs=1e-9)
    assert result["metrics"]["top5"] == pytest.approx(top5, abs=1e-9)


# --- errors: user errors are one line, bugs keep their traceback -----------------------------------------------------


def test_a_bug_is_not_turned_into_a_one_line_error(bundle, digits_folder, tmp_path, monkeypatch):
    """Only the library's user-facing errors (FlorenceError) become `exit 2`; a KeyError from a bug propagates."""

    def broken(*args, **kwargs):
        raise KeyError("a bug inside the evaluator")

    monkeypatch.setattr(eval_cli.zs, "evaluate_zeroshot", broken)
    with pytest.raises(KeyError, match="a bug inside the evaluator"):
        _run("zeroshot", bundle, digits_folder, tmp_path / "out")


def test_unknown_dataset_and_template_set_are_one_line_errors(bundle, digits_folder, tmp_path, capsys):
    assert eval_cli.main(["zeroshot", "--model", str(bundle), "--dataset", "cifar11", "--data-root", str(tmp_path),
                          "--quiet"]) == 2
    assert "unknown dataset 'cifar11'" in capsys.readouterr().err
    assert _run("zeroshot", bundle, digits_folder, tmp_path / "out", "--templates", "imagenett") == 2
    err = capsys.readouterr().err
    assert "--templates 'imagenett'" in err and "Traceback" not in err


# --- bad images ------------------------------------------------------------------------------------------------------


@pytest.fixture
def digits_with_bad_images(digits_folder, tmp_path):
    """A copy of the digits folder with a zero-byte and a corrupt PNG in test/ and one corrupt PNG in train/."""
    root = tmp_path / "digits_bad"
    shutil.copytree(digits_folder, root)
    (root / "test" / "five" / "empty.png").write_bytes(b"")
    good = (root / "test" / "six" / "12.png").read_bytes()
    (root / "test" / "six" / "cut.png").write_bytes(good[: len(good) // 2])
    (root / "train" / "one" / "junk.png").write_bytes(b"\x89PNG not really")
    return root


def test_bad_images_are_skipped_counted_and_reported(bundle, digits_with_bad_images, tmp_path, capsys):
    root, out = digits_with_bad_images, tmp_path / "out"
    assert _run("zeroshot", bundle, root, out, "--no-plots") == 0
    stdout = capsys.readouterr().out
    result = json.loads((out / "zeroshot_imagefolder.json").read_text())
    report = result["bad_samples"]["test"]
    assert report["policy"] == "skip" and report["skipped"] == 2 and report["evaluated"] == 40
    assert result["data"]["num_test"] == 40  # metrics on the 40 good images
    assert {s["file"] for s in report["samples"]} == {str(root / "test" / "five" / "empty.png"),
                                                      str(root / "test" / "six" / "cut.png")}
    assert report["by_reason"] == {"empty file": 1, "corrupt or truncated image": 1}
    assert "bad samples skipped: 2" in stdout and "empty.png" in stdout and "cut.png" in stdout
    # the probes: train and test features, and the same report when the features come from the cache
    few = ("--shots", "1", "--seeds", "0", "--max-iter", "50", "--no-plots")
    for _ in range(2):
        assert _run("few-shot", bundle, root, out, *few) == 0
        bad = json.loads((out / "few_shot_imagefolder.json").read_text())["bad_samples"]
        assert (bad["train"]["skipped"], bad["test"]["skipped"]) == (1, 2)
        assert bad["train"]["samples"][0]["file"] == str(root / "train" / "one" / "junk.png")
    capsys.readouterr()
    assert _run("few-shot", bundle, root, out, *few, "--on-bad-sample", "raise") == 2  # features from the cache
    assert "junk.png" in capsys.readouterr().err


def test_on_bad_sample_raise_names_the_file(bundle, digits_with_bad_images, tmp_path, capsys):
    root = digits_with_bad_images
    assert _run("zeroshot", bundle, root, tmp_path / "out", "--on-bad-sample", "raise") == 2
    err = capsys.readouterr().err
    assert str(root / "test" / "five" / "empty.png") in err and "empty file" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "zeroshot_imagefolder.json").exists()


# --- command line ----------------------------------------------------------------------------------------------------


def _help(*argv) -> None:
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main([*argv, "--help"])
    assert exit_info.value.code == 0


@pytest.mark.parametrize("task, own, foreign", [
    ("zeroshot", ["--templates", "--on-bad-sample", "--dataset"], ["--probe-threads", "--captions", "--shots",
                                                                   "--ft-lr", "--refit"]),
    ("linear-probe", ["--probe-threads", "--refit", "--train-limit"], ["--templates", "--captions", "--shots"]),
    ("few-shot", ["--shots", "--seeds", "--probe-threads"], ["--templates", "--refit", "--captions"]),
    ("retrieval", ["--captions", "--split"], ["--templates", "--probe-threads", "--ft-lr", "--classnames"]),
    ("retrieval-finetune", ["--captions", "--ft-lr", "--train-captions"], ["--templates", "--probe-threads"]),
    ("classify", ["--classnames", "--on-bad-sample"], ["--templates", "--probe-threads", "--captions"]),
])
def test_each_task_has_its_own_help(task, own, foreign, capsys):
    _help(task)
    text = capsys.readouterr().out
    assert all(flag in text for flag in own), text
    assert not any(flag in text for flag in foreign), text


def test_a_flag_of_another_task_is_still_accepted_with_a_note(bundle, digits_folder, tmp_path, capsys):
    """Command lines written before the sub-commands had their own flags keep working (the flag is ignored)."""
    code = eval_cli.main(["zeroshot", "--model", str(bundle), "--dataset", "imagefolder", "--data-root",
                          str(digits_folder), "--output", str(tmp_path), "--quiet", "--no-plots",
                          "--probe-threads", "1"])
    assert code == 0
    assert "--probe-threads applies to linear-probe, few-shot only; ignored" in capsys.readouterr().err


def test_trivial_metrics_and_unconverged_probe_are_said_on_the_console(bundle, digits_folder, tmp_path, capsys):
    """With 4 classes top-5 cannot miss: marked in the JSON and on the console; a probe stopped by --max-iter says
    `converged: false` on the console too."""
    root = tmp_path / "four"
    for split in ("train", "test"):
        for name in ("one", "two", "three", "four"):
            shutil.copytree(digits_folder / split / name, root / split / name)
    out = tmp_path / "out"
    assert _run("linear-probe", bundle, root, out, "--max-iter", "1", "--no-plots") == 0
    stdout = capsys.readouterr().out
    result = json.loads((out / "linear_probe_imagefolder.json").read_text())
    assert result["trivial_metrics"] == ["top5"] and result["probe"]["converged"] is False
    assert "top5 100.00% (trivial)" in stdout and "trivial metrics" in stdout
    assert "converged: false" in stdout


# --- classify: an image tower with a linear head ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier_bundle(bundle, digits_folder, tmp_path_factory):
    """The dual encoder's image tower with a 10-way head fitted by scikit-learn's logistic regression on the pooled
    training features; returns (bundle, the fitted sklearn classifier)."""
    import florence
    from sklearn.linear_model import LogisticRegression

    model = florence.create_model("image_classifier", backbone=str(bundle), num_classes=10,
                                  class_names=sorted(DIGIT_NAMES)).eval()
    images, labels, classes = _load_split(digits_folder / "train", model)
    assert classes == sorted(DIGIT_NAMES)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(images), pre_logits=True).numpy()  # N, 8C
    clf = LogisticRegression(C=1.0, max_iter=2000).fit(pooled, labels.numpy())
    with torch.no_grad():
        model.head.fc.weight.copy_(torch.from_numpy(clf.coef_).float())
        model.head.fc.bias.copy_(torch.from_numpy(clf.intercept_).float())
    return model.save_pretrained(tmp_path_factory.mktemp("classifier") / "model"), clf


def test_classify_reports_the_heads_accuracy(classifier_bundle, digits_folder, tmp_path, capsys):
    """`florence eval classify` equals scikit-learn's own predictions with the same weights on the same features."""
    import florence
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    path, clf = classifier_bundle
    out = tmp_path / "out"
    assert _run("classify", path, digits_folder, out) == 0
    result = json.loads((out / "classify_imagefolder.json").read_text())
    _check_common_schema(result, "classify", path)
    assert result["protocol"] == eval_cli.CLASSIFY_PROTOCOL_ID == "classifier-head-v1"
    assert result["head_class_names"] == sorted(DIGIT_NAMES) and result["class_names_match"] is True
    assert (out / "classify_imagefolder.confusion.png").is_file()
    model = florence.from_pretrained(path).eval()
    images, labels, _ = _load_split(digits_folder / "test", model)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(images), pre_logits=True).numpy()
    predicted = clf.predict(pooled)
    assert result["metrics"]["top1"] == pytest.approx(accuracy_score(labels.numpy(), predicted))
    assert result["metrics"]["mean_per_class"] == pytest.approx(balanced_accuracy_score(labels.numpy(), predicted))
    assert result["metrics"]["top1"] >= 0.5  # the head was fitted: far above chance (0.1)


def test_classify_refuses_models_without_a_head(bundle, digits_folder, tmp_path, capsys):
    assert _run("classify", bundle, digits_folder, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "dual encoder without a classifier head" in err and "Traceback" not in err


def test_retrieval_skips_a_bad_image_with_its_captions_and_marks_trivial_recalls(bundle, digits_folder, tmp_path,
                                                                                    capsys):
    import csv

    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rows = [[f"test/{n}/12.png", f"a photo of the number {n}."] for n in DIGIT_NAMES[:6]]
    rows.insert(2, [str(tmp_path / "bad.png"), "a broken picture"])
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "caption"], *rows])
    code = eval_cli.main(["retrieval", "--model", str(bundle), "--dataset", "digits", "--data-root",
                          str(digits_folder), "--captions", str(tmp_path / "captions.csv"), "--output",
                          str(tmp_path / "out"), "--quiet", "--no-plots"])
    assert code == 0
    result = json.loads((tmp_path / "out" / "retrieval_digits.json").read_text())
    assert result["data"]["num_images"] == 6 and result["data"]["num_captions"] == 6  # the bad one left, its caption too
    assert result["bad_samples"]["test"]["skipped"] == 1
    assert result["bad_samples"]["test"]["samples"][0]["file"] == str(tmp_path / "bad.png")
    assert result["trivial_metrics"] == ["image_to_text_R@10", "text_to_image_R@10"]  # 6 candidates each way
    stdout = capsys.readouterr().out
    assert "image_to_text_R@10 100.00% (trivial)" in stdout and "bad.png" in stdout
