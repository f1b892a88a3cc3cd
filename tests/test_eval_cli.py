"""``florence eval``: the result JSON schema, caching, pictures and clear errors, on a small real ImageFolder
(scikit-learn's 8x8 digits written as PNG files) with a tiny dual-encoder bundle."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from florence.adapters import linear_probe as lp
from florence.benchmarks import datasets as dsets
from florence.benchmarks import eval_cli

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def one_thread_module():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model runs faster with one thread on a shared 2-core machine
    yield
    torch.set_num_threads(before)


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
    return eval_cli.main([task, "--model", str(bundle), "--dataset", "imagefolder", "--data-root", str(root),
                          "--output", str(out), "--batch-size", "32", "--quiet", "--probe-threads", "1", *extra])


def _check_common_schema(result, task, bundle):
    from florence.bundle import bundle_sha256

    for key in ("task", "dataset", "protocol", "paper_metric", "metrics", "model", "data", "seeds", "precision",
                "versions", "args", "created", "wall_time_s"):
        assert key in result, key
    assert result["task"] == task and result["dataset"] == "imagefolder"
    assert result["model"]["sha256"] == bundle_sha256(bundle) and len(result["model"]["sha256"]) == 64
    assert result["precision"] == "fp32" and result["seeds"]["split"] == 0
    assert {"torch", "scikit-learn", "python", "platform"} <= set(result["versions"])  # engine's list + sklearn
    for value in result["metrics"].values():
        assert 0.0 <= value <= 1.0
    manifest = result["data"]["test"]
    assert manifest["file_count"] == 40 and len(manifest["sha256"]) == 64


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
    # a second run reads the class embeddings and image embeddings from the cache and gives the same numbers
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


def _copy_test_images(src, dst, per_class: int):
    """``dst/test/<class>/`` with the first ``per_class`` test images of each class of ``src``."""
    import shutil

    for folder in sorted((src / "test").iterdir()):
        (dst / "test" / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:per_class]:
            shutil.copy(image, dst / "test" / folder.name / image.name)
    return dst


def test_feature_cache_is_keyed_by_the_data(bundle, digits_folder, tmp_path):
    """Another --data-root with the same dataset name and output reads its own images, not the cached ones."""
    out, templates = tmp_path / "out", tmp_path / "t.txt"
    templates.write_text("a photo of the number {}.\n")
    smaller = _copy_test_images(digits_folder, tmp_path / "smaller", per_class=2)
    assert _run("zeroshot", bundle, digits_folder, out, "--templates", str(templates), "--no-plots") == 0
    assert _run("zeroshot", bundle, smaller, out, "--templates", str(templates), "--no-plots") == 0
    result = json.loads((out / "zeroshot_imagefolder.json").read_text())
    assert result["data"]["num_test"] == 20 and result["data"]["test"]["file_count"] == 20
    assert result["class_embeddings_from_cache"] is True  # same model, templates, classes and precision
    assert len(list((out / "cache").glob("pooled-*.npz"))) == 2
    fresh = tmp_path / "fresh"
    assert _run("zeroshot", bundle, smaller, fresh, "--templates", str(templates), "--no-plots", "--no-cache") == 0
    assert json.loads((fresh / "zeroshot_imagefolder.json").read_text())["metrics"] == result["metrics"]


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
