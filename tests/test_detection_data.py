"""COCO-format detection data (florence.data.detection): parsing and its counted skips, mmdet-style transforms
(numbers worked by hand), batches, the resumable sharded training stream and the evaluation loader."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from florence.data.bad_samples import BadSampleError
from florence.data.detection import (
    CocoDetection,
    build_detection_train_loader,
    collate_detection,
    detection_eval_loader,
    detection_inputs,
    validate_detection_data,
)
from florence.data.detection_transforms import DetectionTransform, keep_ratio_size, pad_images
from florence.data.errors import DataConfigError, DataFileError, DataNotFound
from florence.errors import FlorenceError

PREPROCESS = dict(input_size=[3, 32, 32], mean=[0.5, 0.25, 0.0], std=[0.5, 0.25, 1.0])
CATEGORIES = [{"id": 7, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "cat"}]  # sorted: 1, 3, 7


def write_png(path, height, width, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def ann(ann_id, image_id, category_id, bbox, **extra):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


@pytest.fixture
def messy(tmp_path):
    """Every kind of bad input next to good images."""
    root = tmp_path / "img"
    root.mkdir()
    write_png(root / "a.png", 40, 60, 1)
    write_png(root / "b.png", 30, 30, 2)
    (root / "d.png").write_bytes(b"not an image" * 20)  # corrupt
    write_png(root / "e.png", 20, 50, 3)
    write_png(root / "f.png", 20, 20, 4)  # the JSON says 30x30
    images = [{"id": 7, "file_name": "f.png", "height": 30, "width": 30},
              {"id": 1, "file_name": "a.png", "height": 40, "width": 60},
              {"id": 2, "file_name": "b.png", "height": 30, "width": 30},
              {"id": 3, "file_name": "c.png", "height": 30, "width": 30},  # missing file
              {"id": 4, "file_name": "d.png", "height": 30, "width": 30},
              {"id": 5, "file_name": "e.png", "height": 20, "width": 50}]  # no annotations
    anns = [ann(10, 1, 3, [10, 5, 20, 10]),  # cat -> label 1; xyxy [10, 5, 30, 15]
            ann(11, 1, 1, [0, 0, 60, 40], iscrowd=1),  # crowd: set apart
            ann(12, 1, 7, [50, 30, 20, 20]),  # partly outside: clipped to [50, 30, 60, 40]
            ann(13, 2, 1, [5, 5, 0, 10]),  # degenerate (w = 0)
            ann(14, 2, 1, [40, 40, 5, 5]),  # entirely outside the 30x30 image
            ann(15, 2, 99, [1, 1, 5, 5]),  # unknown category
            ann(16, 42, 1, [1, 1, 5, 5]),  # unknown image
            ann(17, 2, 1, [1, 1, 5, float("nan")]),  # degenerate (NaN)
            ann(18, 3, 1, [1, 1, 5, 5]), ann(19, 4, 1, [1, 1, 5, 5]), ann(20, 7, 3, [2, 2, 6, 6]),
            ann(21, 1, 1, [3, 3, 4, 4], ignore=True)]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    return path, root


@pytest.fixture
def clean(tmp_path):
    """8 readable images of different sizes with 1-3 boxes each, for the stream tests."""
    root = tmp_path / "clean"
    root.mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(8):
        h, w = int(rng.integers(20, 50)), int(rng.integers(20, 50))
        write_png(root / f"{i}.png", h, w, 100 + i)
        images.append({"id": 100 + i, "file_name": f"{i}.png", "height": h, "width": w})
        for j in range(1 + i % 3):
            x, y = float(rng.integers(0, w - 8)), float(rng.integers(0, h - 8))
            anns.append(ann(len(anns) + 1, 100 + i, [1, 3, 7][(i + j) % 3], [x, y, 6.5, 7.0]))
    path = tmp_path / "clean.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    return path, root


# --- parsing --------------------------------------------------------------------------------------------------


def test_categories_boxes_and_crowd(messy):
    path, root = messy
    ds = CocoDetection(path, root)
    assert ds.cat_ids == [1, 3, 7] and ds.class_names == ["person", "cat", "dog"] and ds.num_classes == 3
    assert ds.image_ids.tolist() == [1, 2, 3, 4, 5, 7]  # sorted by id; empty images kept (filter_empty=False)
    rec = ds.record(ds.index_of(1))
    assert rec.file == root / "a.png" and (rec.height, rec.width) == (40, 60)
    np.testing.assert_array_equal(rec.boxes, [[10, 5, 30, 15], [50, 30, 60, 40]])
    assert rec.labels.tolist() == [1, 2]  # cat -> 1, dog -> 2
    np.testing.assert_array_equal(rec.crowd_boxes, [[0, 0, 60, 40]])
    assert rec.crowd_labels.tolist() == [0]
    assert ds.record(ds.index_of(2)).boxes.shape == (0, 4)  # every box of image 2 was bad
    gt = ds.annotations(7)
    assert gt["boxes"].tolist() == [[2, 2, 8, 8]] and gt["labels"].tolist() == [1]
    assert ds.image_path(5) == root / "e.png"


def test_every_bad_annotation_is_counted_with_its_reason(messy):
    path, root = messy
    summary = CocoDetection(path, root, filter_empty=True).summary()
    assert summary.counts == {
        "annotation marked ignore": 1, "annotation for an unknown image id": 1, "unknown category id": 1,
        "degenerate box": 2, "box outside the image": 1, "box clipped to the image": 1,  # the dog box
        "crowd box set apart": 1, "image without boxes": 2}  # images 2 and 5
    assert (summary.images_in_file, summary.images, summary.boxes, summary.crowd_boxes) == (6, 4, 5, 1)
    degenerate = [e for e in summary.examples if e["reason"].startswith("degenerate box")]
    assert [e["file"] for e in degenerate] == [str(root / "b.png")] * 2
    assert "id 13, bbox [5, 5, 0, 10]" in degenerate[0]["reason"] and "id 17" in degenerate[1]["reason"]
    by_reason = {e["reason"].split(" (")[0]: e for e in summary.examples}
    assert by_reason["annotation for an unknown image id"]["file"] == str(path)
    assert by_reason["image without boxes"]["file"] in (str(root / "b.png"), str(root / "e.png"))
    assert "degenerate box: 2" in summary.format()


def test_bad_images_are_skipped_counted_and_the_run_continues(messy, tmp_path):
    path, root = messy
    cfg = {"annotations": str(path), "images": str(root), "batch_size": 2, "scale": [64, 32], "size_divisor": 32}
    loader = build_detection_train_loader(cfg, preprocess=PREPROCESS, run_dir=tmp_path / "run")
    assert len(loader.coco) == 4  # images 1, 3, 4, 7 have boxes
    stream = iter(loader)
    batches = [next(stream) for _ in range(4)]  # 2 epochs: every image is met twice
    assert all(b["images"].shape[0] == 2 for b in batches)  # bad images were replaced, batches keep their size
    summary = loader.bad_sample_summary()
    assert summary.by_reason.get("missing file", 0) >= 1 and summary.by_reason.get("not a recognised image format",
                                                                                    0) >= 1
    assert summary.by_reason.get("image size differs from the annotation", 0) >= 1
    log = [json.loads(line) for line in (tmp_path / "run" / "bad_samples.jsonl").read_text().splitlines()]
    assert {r["file"] for r in log} == {str(root / n) for n in ("c.png", "d.png", "f.png")}
    with pytest.raises(BadSampleError, match="c.png|d.png|f.png"):
        _take(build_detection_train_loader({**cfg, "on_bad_sample": "raise"}, preprocess=PREPROCESS), 4)


def test_class_subset_and_class_agnostic(messy):
    path, root = messy
    ds = CocoDetection(path, root, class_subset=["cat", 7])
    assert ds.cat_ids == [3, 7] and ds.class_names == ["cat", "dog"]
    assert ds.annotations(1)["labels"].tolist() == [0, 1]
    assert ds.annotations(1)["crowd_boxes"].shape == (0, 4)  # the crowd box was a person
    assert ds.summary().counts["box of a class outside class_subset"] == 3  # 2 person boxes + the person crowd box
    agnostic = CocoDetection(path, root, class_agnostic=True)
    assert agnostic.class_names == ["object"] and agnostic.cat_ids == [1]
    assert agnostic.annotations(1)["labels"].tolist() == [0, 0]
    with pytest.raises(DataConfigError, match="class_subset: class name 'horse'"):
        CocoDetection(path, root, class_subset=["horse"])
    with pytest.raises(DataConfigError, match="class_subset: category id 5 "):
        CocoDetection(path, root, class_subset=[5])


def test_lvis_coco_url_and_image_info_files(tmp_path):
    (tmp_path / "val2017").mkdir()
    write_png(tmp_path / "val2017" / "000000000139.jpg", 10, 12, 0)
    images = [{"id": 139, "coco_url": "http://images.cocodataset.org/val2017/000000000139.jpg",
               "height": 10, "width": 12}]
    path = tmp_path / "lvis.json"
    path.write_text(json.dumps({"images": images, "categories": CATEGORIES}))  # no annotations: test-dev style
    ds = CocoDetection(path, tmp_path)
    assert ds.image_path(139) == tmp_path / "val2017" / "000000000139.jpg" and len(ds) == 1
    image, rec = ds.load(0)
    assert image.size == (12, 10) and rec.boxes.shape == (0, 4)


@pytest.mark.parametrize("content, message", [
    ("{not json", r"instances.json: not valid JSON \(line 1 column 2"),
    ({"annotations": [], "categories": []}, "instances.json: missing key 'images'"),
    ({"images": [], "annotations": []}, "instances.json: missing key 'categories'"),
    ({"images": [{"id": 1, "file_name": "a.png", "height": 4, "width": 4}, {"id": 2, "height": 4, "width": 4}],
      "categories": []}, r"instances.json: images\[1\]: missing key 'file_name'"),
    ({"images": [{"id": 1, "file_name": "a.png", "width": 4}], "categories": []},
     r"images\[0\]: missing key 'height'"),
    ({"images": [{"id": 1, "file_name": "a.png", "height": 4, "width": 4}], "categories": [{"id": 1, "name": "x"}],
      "annotations": [{"image_id": 1, "category_id": 1}]}, r"annotations\[0\]: missing key 'bbox'"),
    ({"images": [{"id": 1, "file_name": "a.png", "height": 4, "width": 4}], "categories": [{"id": 1, "name": "x"}],
      "annotations": [ann(1, 1, 1, [1, 2, 3, 4]), ann(2, 1, 1, [1, 2, 3])]},
     r"annotations\[1\].bbox: expected \[x, y, width, height\]"),
    ({"images": [{"id": 1, "file_name": "a.png", "height": 4, "width": 4}] * 2, "categories": []},
     "images: id 1 appears twice"),
    ({"images": [{"id": "x1", "file_name": "a.png", "height": 4, "width": 4}], "categories": []},
     r"images\[0\].id: expected an integer"),
    ([1, 2], "expected a JSON object"),
])
def test_malformed_json_is_a_one_line_error_naming_file_and_key(tmp_path, content, message):
    path = tmp_path / "instances.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DataFileError, match=message) as info:
        CocoDetection(path, tmp_path)
    assert isinstance(info.value, FlorenceError) and "\n" not in str(info.value)


def test_missing_files_and_folders(tmp_path, clean):
    path, root = clean
    with pytest.raises(DataNotFound, match="nope.json: annotation file not found"):
        CocoDetection(tmp_path / "nope.json", root)
    with pytest.raises(DataNotFound, match="image folder not found"):
        CocoDetection(path, tmp_path / "nowhere")
    (root / "3.png").unlink()
    ds = CocoDetection(path, root, validate_images=True)
    assert len(ds) == 7 and ds.summary().counts == {"missing image file": 1}


def test_coco_json_is_the_ground_truth_of_the_kept_images(messy):
    path, root = messy
    gt = CocoDetection(path, root, max_images=2).coco_json()  # images 1 and 2
    assert [im["id"] for im in gt["images"]] == [1, 2]
    ids = {a["id"] for a in gt["annotations"]}
    assert ids == {10, 11, 12, 13, 14, 17, 21}  # as written, crowd and bad boxes included; not unknown category 99
    crowd = next(a for a in gt["annotations"] if a["id"] == 11)
    assert crowd["iscrowd"] == 1 and crowd["area"] == 60 * 40
    assert [c["id"] for c in gt["categories"]] == [7, 1, 3]


# --- transforms -----------------------------------------------------------------------------------------------


def test_keep_ratio_size_by_hand():
    # 480x640 into (1333, 800): factors 1333/640 = 2.083 and 800/480 = 1.667 -> 1.667; 640 * 5/3 = 1066.67 -> 1067
    assert keep_ratio_size(480, 640, (1333, 800)) == (800, 1067)
    # a long thin image is bounded by the long side: 100x1000, min(1333/1000, 800/100) = 1.333 -> 133.3 -> 133
    assert keep_ratio_size(100, 1000, (1333, 800)) == (133, 1333)
    assert keep_ratio_size(100, 1000, (800, 1333)) == (133, 1333)  # (long, short) in either order, as mmcv
    # rounding half up: 3x5 to short side 1 -> factor 1/3, 5/3 = 1.667 -> 2; 30x50 to short 15 -> 25.0 -> 25
    assert keep_ratio_size(3, 5, (100, 1)) == (1, 2) and keep_ratio_size(30, 50, (100, 15)) == (15, 25)
    assert keep_ratio_size(2, 5, (100, 1)) == (1, 3)  # 5 * 0.5 = 2.5 -> 3 (int(x + 0.5), not banker's round -> 2)
    # upscaling: 20x10 into (64, 32): min(64/20, 32/10) = 3.2 -> 64x32
    assert keep_ratio_size(20, 10, (64, 32)) == (64, 32)


def test_resize_is_bilinear_without_antialias_and_rounds_to_8_bits():
    # a 2x downscale with half-pixel centres samples between pixels 2i and 2i+1: the mean of each 2x2 block
    block = torch.tensor([[0, 10, 100, 101], [20, 31, 200, 200]], dtype=torch.uint8)  # 2 x 4
    image = block.expand(3, 2, 4).contiguous()
    transform = DetectionTransform(dict(mean=[0, 0, 0], std=[1, 1, 1]), scale=(2, 1))
    x, boxes, factors = transform.apply(image, torch.tensor([[0.0, 0.0, 4.0, 2.0]]), (2, 1), flip=False)
    assert x.shape == (3, 1, 2) and factors == (0.5, 0.5)
    # (0 + 10 + 20 + 31) / 4 = 15.25 -> 15; (100 + 101 + 200 + 200) / 4 = 150.25 -> 150
    torch.testing.assert_close(x[0] * 255, torch.tensor([[15.0, 150.0]]))
    assert boxes.tolist() == [[0.0, 0.0, 2.0, 1.0]]


def test_boxes_scale_by_the_realised_factors_and_normalisation():
    image = torch.full((3, 30, 50), 255, dtype=torch.uint8)
    image[1] = 0
    transform = DetectionTransform(PREPROCESS, scale=(100, 15))
    x, boxes, (sy, sx) = transform.apply(image, torch.tensor([[10.0, 3.0, 50.0, 30.0]]), (100, 15), flip=False)
    assert x.shape == (3, 15, 25) and (sy, sx) == (15 / 30, 25 / 50)
    torch.testing.assert_close(boxes, torch.tensor([[5.0, 1.5, 25.0, 15.0]]))
    # (1 - 0.5) / 0.5 = 1, (0 - 0.25) / 0.25 = -1, (1 - 0) / 1 = 1
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([1.0, -1.0, 1.0]))
    # an odd size: 7x9 to short side 5 -> factor 5/7, width 9 * 5/7 = 6.43 -> 6; sx = 6/9, not 5/7
    _, boxes, (sy, sx) = transform.apply(torch.zeros(3, 7, 9, dtype=torch.uint8), torch.tensor([[0.0, 0, 9, 7]]),
                                         (100, 5), flip=False)
    assert (sy, sx) == (5 / 7, 6 / 9)
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.0, 6.0, 5.0]]))


def test_flip_mirrors_pixels_and_boxes():
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, (3, 10, 16), dtype=np.uint8))
    box = torch.tensor([[2.0, 1.0, 5.0, 4.0]])
    transform = DetectionTransform(PREPROCESS, scale=(32, 20))
    plain, plain_boxes, _ = transform.apply(image, box, (32, 20), flip=False)  # 20 x 32: factor 2
    flipped, flipped_boxes, _ = transform.apply(image, box, (32, 20), flip=True)
    torch.testing.assert_close(flipped, plain.flip(-1))
    assert plain_boxes.tolist() == [[4.0, 2.0, 10.0, 8.0]]
    assert flipped_boxes.tolist() == [[32 - 10.0, 2.0, 32 - 4.0, 8.0]]  # x1' = w - x2, x2' = w - x1


def test_multi_scale_draws():
    scales = DetectionTransform(PREPROCESS, scales=[[100, 20], [100, 30]], flip=0.5)
    short = DetectionTransform(PREPROCESS, scale=(100, 40), short_range=[10, 12])
    draws = [scales.draw(np.random.default_rng(s)) for s in range(200)]
    assert {d[0] for d in draws} == {(100, 20), (100, 30)} and 60 < sum(d[1] for d in draws) < 140
    assert {short.draw(np.random.default_rng(s))[0] for s in range(200)} == {(100, 10), (100, 11), (100, 12)}
    assert scales.draw(np.random.default_rng(7)) == scales.draw(np.random.default_rng(7))


def test_pad_and_collate_shapes():
    a = {"image": torch.ones(3, 50, 70), "boxes": torch.tensor([[1.0, 2, 3, 4]]), "labels": torch.tensor([2]),
         "image_id": 5, "orig_size": (25, 35), "scale_factor": (2.0, 2.0), "flipped": False}
    b = {"image": torch.ones(3, 90, 40), "boxes": torch.tensor([[1.0, 1, 2, 2], [3, 3, 4, 4], [0, 0, 9, 9]]),
         "labels": torch.tensor([0, 1, 0]), "image_id": 9, "orig_size": (45, 20), "scale_factor": (2.0, 2.0),
         "flipped": True}
    batch = collate_detection([a, b], size_divisor=32, eval=True)
    assert batch["images"].shape == (2, 3, 96, 96)  # max(50, 90) -> 96, max(70, 40) -> 96
    assert batch["images"][0, :, :50, :70].eq(1).all() and batch["images"][0, :, 50:].eq(0).all()
    assert batch["images"][0, :, :, 70:].eq(0).all() and batch["images"][1, :, :, 40:].eq(0).all()
    assert batch["image_sizes"].tolist() == [[50, 70], [90, 40]]
    assert batch["boxes"].shape == (2, 3, 4) and batch["boxes"][0, 1:].eq(0).all()
    assert batch["labels"].tolist() == [[2, -1, -1], [0, 1, 0]]
    assert batch["image_ids"].tolist() == [5, 9] and batch["orig_sizes"].tolist() == [[25, 35], [45, 20]]
    assert batch["scale_factors"].shape == (2, 2) and batch["flipped"].tolist() == [False, True]
    empty = dict(a, boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64))
    train = collate_detection([empty], size_divisor=128)
    assert set(train) == {"images", "image_sizes", "boxes", "labels"}
    assert train["images"].shape == (1, 3, 128, 128) and train["labels"].tolist() == [[-1]]  # M >= 1
    assert pad_images([torch.ones(3, 128, 129)], 128).shape == (1, 3, 128, 256)


# --- the training stream --------------------------------------------------------------------------------------


def _cfg(clean, **kw):
    path, root = clean
    return {"annotations": str(path), "images": str(root), "batch_size": 2, "seed": 3, "short_range": [20, 40],
            "scale": [64, 40], "flip": 0.5, "size_divisor": 16, **kw}


def _take(loader, n):
    stream = iter(loader)
    return [next(stream) for _ in range(n)]


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_resume_gives_exactly_the_next_batch(clean):
    uninterrupted = _take(build_detection_train_loader(_cfg(clean), preprocess=PREPROCESS), 7)  # crosses an epoch
    first = build_detection_train_loader(_cfg(clean), preprocess=PREPROCESS)
    _take(first, 5)
    state = first.state_dict()
    resumed = build_detection_train_loader(_cfg(clean, num_workers=1), preprocess=PREPROCESS)
    resumed.load_state_dict(state)
    after = _take(resumed, 2)
    _assert_same(after[0], uninterrupted[5])
    _assert_same(after[1], uninterrupted[6])
    assert len({tuple(b["image_sizes"][:, 0].tolist()) for b in uninterrupted}) > 1  # the scale really varies
    other_seed = _take(build_detection_train_loader(_cfg(clean, seed=4), preprocess=PREPROCESS), 1)[0]
    assert not torch.equal(other_seed["boxes"], uninterrupted[0]["boxes"]) or not torch.equal(
        other_seed["image_sizes"], uninterrupted[0]["image_sizes"])


def test_ranks_get_disjoint_images_that_make_up_the_global_batch(clean):
    single = build_detection_train_loader(_cfg(clean, batch_size=4), preprocess=PREPROCESS)
    ranks = [build_detection_train_loader(_cfg(clean), preprocess=PREPROCESS, rank=r, world_size=2) for r in (0, 1)]
    seen = []
    for r, loader in enumerate(ranks):
        keys = iter(loader.sampler)
        seen.append({next(keys)[1] for _ in range(4)})  # one epoch = 8 images = 2 global batches of 4
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(8))
    whole = _take(single, 2)
    for r, loader in enumerate(ranks):
        for k, batch in enumerate(_take(loader, 2)):
            for i in range(2):
                j = 2 * r + i  # rank r holds the r-th half of global batch k
                h, w = batch["image_sizes"][i].tolist()
                assert whole[k]["image_sizes"][j].tolist() == [h, w]
                torch.testing.assert_close(batch["images"][i, :, :h, :w], whole[k]["images"][j, :, :h, :w])
                n = int((batch["labels"][i] >= 0).sum())
                torch.testing.assert_close(batch["boxes"][i, :n], whole[k]["boxes"][j, :n])


def test_training_targets_have_no_crowd_boxes_and_match_the_records(messy):
    path, root = messy
    cfg = {"annotations": str(path), "images": str(root), "batch_size": 1, "scale": [120, 80], "flip": 0.0,
           "size_divisor": 8, "max_images": 1}  # image 1 only: factor min(120/60, 80/40) = 2
    batch = _take(build_detection_train_loader(cfg, preprocess=PREPROCESS), 1)[0]
    assert batch["image_sizes"].tolist() == [[80, 120]] and batch["images"].shape == (1, 3, 80, 120)
    assert batch["boxes"][0].tolist() == [[20, 10, 60, 30], [100, 60, 120, 80]]  # no crowd box [0, 0, 120, 80]
    assert batch["labels"][0].tolist() == [1, 2]


def test_validate_detection_data_names_the_dotted_key(clean):
    ok = _cfg(clean)
    validate_detection_data(ok)
    cases = [({**ok, "scael": [1, 2]}, "data.scael: unknown key"),
             ({**ok, "scale": [800]}, r"data.scale: expected \[long, short\]"),
             ({**ok, "scales": [[1, 2], [3]]}, "data.scales: expected a non-empty list"),
             ({**ok, "short_range": [40, 20]}, r"data.short_range: expected \[lo, hi\]"),
             ({**ok, "scales": [[64, 32]]}, "data.short_range: give scales or short_range, not both"),
             ({**ok, "flip": 2}, r"data.flip: expected a number in \[0.0, 1.0\]"),
             ({**ok, "class_subset": []}, "data.class_subset: expected a non-empty list"),
             ({**ok, "on_bad_sample": "ignore"}, "data.on_bad_sample: expected one of skip, raise"),
             ({k: v for k, v in ok.items() if k != "images"}, "data.images: required"),
             ("x", "data: expected a mapping")]
    for cfg, message in cases:
        with pytest.raises(DataConfigError, match=message):
            validate_detection_data(cfg)
    with pytest.raises(DataConfigError, match="det.flip"):
        validate_detection_data({**ok, "flip": -1}, key="det")
    with pytest.raises(DataConfigError, match="data.batch_size: required"):
        build_detection_train_loader({k: v for k, v in ok.items() if k != "batch_size"}, preprocess=PREPROCESS)


def test_a_training_set_without_boxes_is_an_error(tmp_path):
    write_png(tmp_path / "a.png", 8, 8, 0)
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "height": 8, "width": 8}],
                                "annotations": [], "categories": CATEGORIES}))
    with pytest.raises(DataFileError, match="no training images left"):
        build_detection_train_loader({"annotations": str(path), "images": str(tmp_path), "batch_size": 1},
                                     preprocess=PREPROCESS)
    assert len(CocoDetection(path, tmp_path)) == 1  # evaluation keeps images without boxes


# --- evaluation -----------------------------------------------------------------------------------------------


def test_eval_loader_order_scale_factors_and_skips(messy):
    path, root = messy
    ds = CocoDetection(path, root)
    loader = detection_eval_loader(ds, PREPROCESS, scale=(120, 80), size_divisor=32, batch_size=2)
    batches = list(loader)
    ids = [i for b in batches for i in b["image_ids"].tolist()]
    assert ids == [1, 2, 5]  # in id order, without the missing (3), corrupt (4) and mis-sized (7) images
    report = loader.report()
    assert report["skipped"] == 3 and report["evaluated"] == 3
    assert {s["file"] for s in report["samples"]} == {str(root / n) for n in ("c.png", "d.png", "f.png")}
    assert report["by_reason"] == {"missing file": 1, "not a recognised image format": 1,
                                   "image size differs from the annotation": 1}
    first = batches[0]
    assert first["orig_sizes"].tolist() == [[40, 60], [30, 30]]
    assert first["image_sizes"].tolist() == [[80, 120], [80, 80]] and first["images"].shape == (2, 3, 96, 128)
    sy, sx = first["scale_factors"][0].tolist()
    original = first["boxes"][0, :2] / torch.tensor([sx, sy, sx, sy])
    torch.testing.assert_close(original, torch.from_numpy(ds.record(0).boxes))
    flipped = next(iter(detection_eval_loader(ds, PREPROCESS, scale=(120, 80), size_divisor=32, batch_size=2,
                                              flip=True)))
    assert flipped["flipped"].all()
    torch.testing.assert_close(flipped["images"][0, :, :80, :120], first["images"][0, :, :80, :120].flip(-1))
    with pytest.raises(BadSampleError, match="c.png"):
        list(detection_eval_loader(ds, PREPROCESS, scale=(120, 80), on_bad_sample="raise"))


def test_detection_inputs_for_plain_images():
    image = Image.fromarray(np.zeros((30, 50, 3), dtype=np.uint8))
    batch = detection_inputs([image, image.resize((20, 40))], PREPROCESS, scale=(100, 15), size_divisor=8)
    assert batch["images"].shape == (2, 3, 32, 32)  # 15x25 and 30x15 (40x20 * min(100/40, 15/20)) padded
    assert batch["image_sizes"].tolist() == [[15, 25], [30, 15]]
    assert batch["orig_sizes"].tolist() == [[30, 50], [40, 20]]
    torch.testing.assert_close(batch["scale_factors"][0], torch.tensor([0.5, 0.5]))
