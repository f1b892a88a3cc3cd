"""Dataset specifications on miniature copies of the standard on-disk layouts (real digit images from scikit-learn
written into the DTD, VOC2007 and Caltech-101 folder structures)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from florence.benchmarks import classnames as names
from florence.benchmarks import datasets as dsets


def _digit_images(n: int) -> list[np.ndarray]:
    from sklearn.datasets import load_digits

    x = load_digits().images[:n]
    return [np.repeat((img * 255 / 16).astype(np.uint8)[:, :, None], 3, axis=2).repeat(4, 0).repeat(4, 1) for img in x]


def _save(array: np.ndarray, path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _to_tensor(image):
    return torch.as_tensor(np.array(image.convert("RGB")), dtype=torch.float32).permute(2, 0, 1) / 255.0


def test_dtd_layout_official_val_and_class_names(tmp_path):
    images = _digit_images(12)
    base = tmp_path / "dtd" / "dtd"
    rows = {"train1": [], "val1": [], "test1": []}
    for i, image in enumerate(images):
        cls = ["banded", "zig_zagged"][i % 2]
        _save(image, base / "images" / cls / f"{cls}_{i:04d}.jpg")
        rows[["train1", "val1", "test1"][i % 3]].append(f"{cls}/{cls}_{i:04d}.jpg")
    (base / "labels").mkdir()
    for name, lines in rows.items():
        (base / "labels" / f"{name}.txt").write_text("\n".join(lines) + "\n")
    spec = dsets.get_spec("dtd")
    assert spec.has_val(tmp_path)
    val = spec.load(tmp_path, "val", _to_tensor)
    assert val.classnames == ["banded", "zig zagged"] and len(val.dataset) == 4
    image, label = val.dataset[0]
    assert image.shape == (3, 32, 32) and label == val.targets[0]
    manifest = dsets.data_manifest(val.files)
    assert manifest["file_count"] == 15 and manifest["method"] == "path+content-sha256"  # 12 images + 3 lists


def test_voc2007_multilabel_targets_with_difficult(tmp_path):
    images = _digit_images(3)
    base = tmp_path / "VOCdevkit" / "VOC2007"
    ids = ["000001", "000002", "000003"]
    for image_id, image in zip(ids, images):
        _save(image, base / "JPEGImages" / f"{image_id}.jpg")
    main = base / "ImageSets" / "Main"
    main.mkdir(parents=True)
    table = {"cat": ["1", "-1", "0"], "dog": ["-1", "1", "1"]}
    for category in names.VOC2007_CATEGORIES:
        flags = table.get(category, ["-1", "-1", "-1"])
        (main / f"{category}_test.txt").write_text("".join(f"{i} {f}\n" for i, f in zip(ids, flags)))
    split = dsets.get_spec("voc2007").load(tmp_path, "test", _to_tensor)
    cat, dog = names.VOC2007_CATEGORIES.index("cat"), names.VOC2007_CATEGORIES.index("dog")
    assert split.targets.shape == (3, 20)
    assert split.targets[:, cat].tolist() == [1, 0, -1] and split.targets[:, dog].tolist() == [0, 1, 1]
    assert split.classnames[names.VOC2007_CATEGORIES.index("pottedplant")] == "potted plant"
    image, target = split.dataset[2]
    assert image.shape == (3, 32, 32) and target.tolist() == split.targets[2].tolist()
    (main / "dog_test.txt").write_text("000001 1\n")
    with pytest.raises(ValueError, match="dog_test.txt"):
        dsets.get_spec("voc2007").load(tmp_path, "test", _to_tensor)


def test_caltech101_seeded_split_and_curated_names(tmp_path):
    images = _digit_images(40)
    folders = ["BACKGROUND_Google", "Faces", "Faces_easy", "Leopards", "Motorbikes"] + [f"c{i:03d}" for i in range(97)]
    root = tmp_path / "caltech101" / "101_ObjectCategories"
    for k, folder in enumerate(folders):
        for j in range(32 if k < 2 else 1):  # two classes with 32 images, the rest with one
            _save(images[(k + j) % 40], root / folder / f"image_{j:04d}.jpg")
    spec = dsets.get_spec("caltech101")
    train = spec.load(tmp_path, "train", _to_tensor)
    test = spec.load(tmp_path, "test", _to_tensor)
    assert train.classnames[:3] == ["background", "off-center face", "centered face"]
    assert np.bincount(train.targets)[:3].tolist() == [30, 30, 1] and np.bincount(test.targets)[:2].tolist() == [2, 2]
    assert np.array_equal(train.targets, spec.load(tmp_path, "train", _to_tensor).targets)
    assert not spec.has_val(tmp_path)
    with pytest.raises(ValueError, match="carve"):
        spec.load(tmp_path, "val", _to_tensor)


def test_imagenet_class_names_from_open_clip_or_a_user_file(tmp_path):
    pytest.importorskip("open_clip")
    found = dsets.imagenet_classnames()
    assert len(found) == 1000 and found[0] == "tench" and found[-1] == "toilet paper"
    (tmp_path / "names.txt").write_text("\n".join(f"class {i}" for i in range(999)))
    with pytest.raises(ValueError, match="1000 class names, got 999"):
        dsets.imagenet_classnames(tmp_path / "names.txt")
    with pytest.raises(dsets.DatasetNotFound, match="val"):
        dsets.get_spec("imagenet").load(tmp_path, "test", _to_tensor)
