"""Fashion-MNIST detection canvases (COCO layout, visible-pixel boxes, determinism, idempotence, class subsets, CLI)
and a tiny run of the FCOS baseline on them."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from florence.benchmarks import detection_canvas as dc
from florence.benchmarks import fcos_baseline
from florence.data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR


def test_coco_layout_and_valid_boxes(tmp_path, fake_fmnist):
    done = dc.generate(tmp_path, "train", 12, seed=0, root=fake_fmnist)
    assert not done.skipped and done.images_dir == tmp_path / "train"
    data = json.loads((tmp_path / "annotations" / "instances_train.json").read_text())
    assert data["categories"] == [{"id": i + 1, "name": n, "supercategory": "fashion"}
                                  for i, n in enumerate(FASHION_MNIST_CLASSES)]
    assert [img["id"] for img in data["images"]] == list(range(1, 13))
    assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
    for img in data["images"]:
        with Image.open(tmp_path / "train" / img["file_name"]) as im:
            assert im.mode == "RGB" and im.size == (128, 128) == (img["width"], img["height"])
        anns = [a for a in data["annotations"] if a["image_id"] == img["id"]]
        assert 1 <= len(anns) <= 6
        for a in anns:
            x, y, w, h = a["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 128 and y + h <= 128
            assert max(w, h) <= 64 and a["area"] == w * h and a["iscrowd"] == 0 and 1 <= a["category_id"] <= 10
    gt = COCO()
    gt.dataset = data
    gt.createIndex()
    assert len(gt.getAnnIds()) == done.num_annotations == len(data["annotations"])


def test_visible_boxes_hand_worked():
    # A: 6x6 opaque at (2, 2). B (on top): 4 wide x 8 high at (5, 0) covers A's columns 5..7. Opaque B hides them;
    # B at alpha 0.5 leaves A a weight 0.5 there (visible); at alpha 0.95, weight 0.05 < 0.1 (hidden).
    bg = np.zeros((16, 16, 3), dtype=np.float32)
    a, red, blue = np.ones((6, 6), np.float32), np.array([1.0, 0, 0]), np.array([0, 0, 1.0])
    for b_alpha, a_box in ((1.0, (2, 2, 3, 6)), (0.95, (2, 2, 3, 6)), (0.5, (2, 2, 6, 6))):
        b = np.zeros((8, 8), np.float32)
        b[:, :4] = b_alpha  # the 8x8 square's left 4 columns
        image, weights = dc.composite(bg, [a, b], [(2, 2), (5, 0)], [red, blue])
        assert dc.tight_box(weights[0] >= dc.ALPHA_THRESHOLD) == a_box
        assert dc.tight_box(weights[1] >= dc.ALPHA_THRESHOLD) == (5, 0, 4, 8)
        assert image[3, 6] == pytest.approx([1 - b_alpha, 0, b_alpha])  # under both: B blended over A
        assert image[3, 3] == pytest.approx([1, 0, 0]) and image[9, 9] == pytest.approx([0, 0, 0])
    assert dc.tight_box(np.zeros((4, 4), bool)) is None


def test_item_alpha_threshold():
    item = np.zeros((28, 28), np.uint8)
    item[4:10, 6:20] = 255
    item[20, 20] = 20  # below 0.1 * 255: not part of the item
    alpha = dc.item_alpha(item, 28)
    assert dc.tight_box(alpha > 0) == (6, 4, 14, 6) and alpha.max() == 1.0


def test_deterministic_per_image_and_seeded(tmp_path, fake_fmnist):
    dc.generate(tmp_path / "a", "test", 6, seed=3, root=fake_fmnist)
    dc.generate(tmp_path / "b", "test", 6, seed=3, root=fake_fmnist)
    dc.generate(tmp_path / "c", "test", 3, seed=3, root=fake_fmnist)
    dc.generate(tmp_path / "d", "test", 6, seed=4, root=fake_fmnist)
    ann = {k: json.loads((tmp_path / k / "annotations" / "instances_test.json").read_text())["annotations"]
           for k in "abcd"}
    png = {k: [(tmp_path / k / "test" / f"{i:06d}.png").read_bytes() for i in range(1, 4)] for k in "abcd"}
    assert ann["a"] == ann["b"] and png["a"] == png["b"] and len(set(png["a"])) == 3
    assert png["c"] == png["a"] and ann["c"] == [a for a in ann["a"] if a["image_id"] <= 3]  # image i: own seed
    assert png["d"] != png["a"]
    train = dc.generate(tmp_path / "e", "train", 3, seed=3, root=fake_fmnist)
    assert [(train.images_dir / f"{i:06d}.png").read_bytes() for i in range(1, 4)] != png["a"]


def test_idempotent_with_manifest(tmp_path, fake_fmnist):
    first = dc.generate(tmp_path, "test", 5, seed=0, root=fake_fmnist)
    png = tmp_path / "test" / "000002.png"
    stamp, data = png.stat().st_mtime_ns, png.read_bytes()
    again = dc.generate(tmp_path, "test", 5, seed=0, root=fake_fmnist)
    assert again.skipped and png.stat().st_mtime_ns == stamp and again.num_annotations == first.num_annotations
    manifest = json.loads((tmp_path / "manifest_test.json").read_text())
    assert manifest["params"]["num_images"] == 5 and set(manifest["params"]["source_sha256"]) == {
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"}
    png.write_bytes(b"damaged")
    repaired = dc.generate(tmp_path, "test", 5, seed=0, root=fake_fmnist)
    assert not repaired.skipped and png.read_bytes() == data
    fewer = dc.generate(tmp_path, "test", 3, seed=0, root=fake_fmnist)  # other parameters: regenerated, stale removed
    assert not fewer.skipped and sorted(p.name for p in (tmp_path / "test").iterdir()) == [
        "000001.png", "000002.png", "000003.png"]


def test_class_subset(tmp_path, fake_fmnist):
    dc.generate(tmp_path, "train", 10, seed=1, classes=["Trouser", 5, "ankle boot"], root=fake_fmnist)
    data = json.loads((tmp_path / "annotations" / "instances_train.json").read_text())
    assert {a["category_id"] for a in data["annotations"]} <= {2, 5, 10}
    assert len(data["categories"]) == 10
    with pytest.raises(dc.CanvasError, match="'Hat' is neither"):
        dc.generate(tmp_path, "train", 2, seed=1, classes=["Hat"], root=fake_fmnist)
    with pytest.raises(dc.CanvasError, match="split"):
        dc.generate(tmp_path, "val", 2, seed=1, root=fake_fmnist)
    with pytest.raises(dc.CanvasError, match="scale"):
        dc.generate(tmp_path, "train", 2, seed=1, canvas=32, scale=(16, 64), root=fake_fmnist)


def test_scale_and_items_options(tmp_path, fake_fmnist):
    dc.generate(tmp_path, "train", 8, seed=2, canvas=64, scale=(20, 24), max_items=2, root=fake_fmnist)
    data = json.loads((tmp_path / "annotations" / "instances_train.json").read_text())
    counts = np.bincount([a["image_id"] for a in data["annotations"]], minlength=9)[1:]
    assert counts.min() >= 1 and counts.max() <= 2
    assert all(a["bbox"][2] <= 24 and a["bbox"][3] <= 24 and a["bbox"][0] + a["bbox"][2] <= 64
               for a in data["annotations"])
    assert all(img["width"] == 64 for img in data["images"])


def test_missing_source_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        dc.generate(tmp_path, "train", 2, seed=0, root=tmp_path / "nowhere")


def test_cli(tmp_path, fake_fmnist, capsys):
    out = tmp_path / "canvases"
    args = ["--out", str(out), "--train", "3", "--test", "2", "--root", str(fake_fmnist)]
    assert dc.main(args + ["--test-classes", "Bag,Sandal"]) == 0
    assert "train: 3 images" in capsys.readouterr().out
    assert (out / "annotations" / "instances_train.json").is_file() and (out / "test" / "000002.png").is_file()
    assert dc.main(args + ["--test-classes", "Bag,Sandal"]) == 0 and "up to date" in capsys.readouterr().out
    assert dc.main(args + ["--train-classes", "Hat"]) == 2
    assert "detection_canvas: classes: 'Hat'" in capsys.readouterr().err


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").is_file(),
                    reason=f"Fashion-MNIST not installed at {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_test_split(tmp_path):
    done = dc.generate(tmp_path, "test", 20, seed=0)
    data = json.loads(done.annotations.read_text())
    assert done.num_annotations >= 20 and len(data["images"]) == 20
    assert len({a["category_id"] for a in data["annotations"]}) >= 5


def test_fcos_baseline_tiny_run(tmp_path, fake_fmnist, one_thread, capsys):
    data = tmp_path / "canvases"
    dc.generate(data, "train", 4, seed=0, canvas=64, scale=(16, 32), max_items=2, root=fake_fmnist)
    dc.generate(data, "test", 2, seed=0, canvas=64, scale=(16, 32), max_items=2, root=fake_fmnist)
    out = tmp_path / "fcos.json"
    args = ["--data", str(data), "--out", str(out), "--minutes", "1", "--max-iters", "2", "--batch-size", "2",
            "--width", "8", "--fpn-channels", "32", "--log-every", "1", "--threads", "0"]
    assert fcos_baseline.main(args) == 0
    record = json.loads(out.read_text())
    assert record["iterations"] == 2 and record["images_seen"] == 4 and record["canvas"] == 64
    assert 0 <= record["mAP"] <= 1 and record["mAP"] == record["metrics"]["AP"]
    assert record["AP50"] == record["metrics"]["AP50"] and "per_class_AP" in record["metrics"]
    assert record["settings"]["max_iters"] == 2 and record["num_params"] > 0
    assert "FCOS baseline: mAP" in capsys.readouterr().out
    assert fcos_baseline.main(["--data", str(tmp_path / "none"), "--out", str(out)]) == 2
