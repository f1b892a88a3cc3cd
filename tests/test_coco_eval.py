"""COCO box evaluation wrapper: the two backends agree, hand-worked AP values, validation, and the conversion of
detector predictions to COCO results."""
import copy
import json

import numpy as np
import pytest
import torch

from florence.adapters.coco_eval import (STAT_NAMES, DetectionsError, evaluate_detections, load_detections,
                                           to_coco_detections)

BACKENDS = ("faster", "pycocotools")


def _coco(boxes_per_image, categories=((1, "cat"),), size=100, crowd=()):
    """A COCO dict: boxes_per_image = {image_id: [(category_id, [x, y, w, h]), ...]}; crowd = annotation indices."""
    images = [{"id": i, "file_name": f"{i}.png", "width": size, "height": size} for i in sorted(boxes_per_image)]
    anns = []
    for image_id in sorted(boxes_per_image):
        for cat, box in boxes_per_image[image_id]:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": list(box),
                         "area": box[2] * box[3], "iscrowd": int(len(anns) in crowd)})
    return {"images": images, "annotations": anns,
            "categories": [{"id": i, "name": n} for i, n in categories]}


def _det(image_id, cat, box, score):
    return {"image_id": image_id, "category_id": cat, "bbox": list(box), "score": score}


@pytest.fixture
def mixed():
    """4 images, 3 categories with COCO-style non-contiguous ids, small / medium / large boxes, a crowd region,
    and detections with misses, duplicates, wrong classes, false positives and a hit on the crowd region."""
    cats = ((1, "shirt"), (3, "bag"), (7, "boot"))
    gt = _coco({
        1: [(1, [10, 10, 20, 20]), (3, [50, 40, 60, 50]), (7, [200, 200, 110, 100])],
        2: [(1, [0, 0, 40, 30]), (1, [100, 100, 25, 25]), (3, [150, 20, 100, 120])],
        3: [(7, [30, 30, 200, 200]), (1, [260, 260, 12, 12])],  # the big one is a crowd region (index 6)
        4: [(3, [5, 5, 8, 9]), (7, [120, 40, 70, 45]), (1, [300, 10, 35, 35])],
    }, categories=cats, size=400, crowd=(6,))
    dets = [
        _det(1, 1, [11, 9, 20, 21], 0.9), _det(1, 1, [12, 12, 18, 18], 0.6),  # hit + duplicate
        _det(1, 3, [55, 45, 55, 40], 0.8), _det(1, 7, [205, 195, 100, 110], 0.7),
        _det(1, 3, [300, 300, 30, 30], 0.95),  # false positive
        _det(2, 1, [2, 1, 36, 30], 0.5), _det(2, 3, [100, 100, 25, 25], 0.85),  # wrong class on a shirt
        _det(2, 3, [160, 30, 80, 100], 0.65),
        _det(3, 7, [50, 50, 40, 40], 0.9), _det(3, 7, [60, 120, 30, 30], 0.4),  # inside the crowd region: ignored
        _det(3, 1, [258, 262, 14, 11], 0.3),
        _det(4, 7, [118, 44, 70, 40], 0.75), _det(4, 1, [305, 12, 30, 30], 0.55), _det(4, 1, [0, 300, 40, 40], 0.6),
    ]  # missed: image 4's bag
    return gt, dets


def test_backends_agree_on_mixed_fixture(mixed):
    gt, dets = mixed
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    fast = evaluate_detections(gt, dets, backend="faster")
    ref = evaluate_detections(gt, dets, backend="pycocotools")
    assert gt == gt_before and dets == dets_before  # inputs untouched
    assert list(fast)[:12] == list(STAT_NAMES)
    for key in (*STAT_NAMES, "AR50", "AR75"):
        assert fast[key] == pytest.approx(ref[key], abs=1e-12), key
    assert fast["per_class_AP"] == pytest.approx(ref["per_class_AP"], abs=1e-12)
    assert set(fast["per_class_AP"]) == {"shirt", "bag", "boot"}
    assert 0 < fast["AP"] < fast["AP50"] < 1  # an informative fixture: neither perfect nor empty
    assert all(fast[k] > -1 for k in ("APs", "APm", "APl"))  # every area range has ground truth


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_detections(mixed, backend):
    gt, _ = mixed
    dets = [_det(a["image_id"], a["category_id"], a["bbox"], 1.0) for a in gt["annotations"] if not a["iscrowd"]]
    r = evaluate_detections(gt, dets, backend=backend)
    for key in (*STAT_NAMES[:6], "AR10", "AR100", "ARs", "ARm", "ARl", "AR50", "AR75"):
        assert r[key] == pytest.approx(1.0), key
    assert all(v == pytest.approx(1.0) for v in r["per_class_AP"].values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_shifted_box_known_iou(backend):
    # GT [0, 0, 10, 10], detection shifted 2 px right: intersection 8x10 = 80, union 120, IoU 2/3. It matches at the
    # thresholds .50, .55, .60, .65 (4 of 10): AP = 0.4, AP50 = 1, AP75 = 0; area 100 < 32^2: small only.
    gt = _coco({1: [(1, [0, 0, 10, 10])]})
    r = evaluate_detections(gt, [_det(1, 1, [2, 0, 10, 10], 0.9)], backend=backend)
    assert r["AP"] == pytest.approx(0.4)
    assert (r["AP50"], r["AP75"]) == (pytest.approx(1.0), pytest.approx(0.0))
    assert r["APs"] == pytest.approx(0.4) and r["APm"] == -1 and r["APl"] == -1
    assert r["AR1"] == pytest.approx(0.4) and r["AR50"] == pytest.approx(1.0) and r["AR75"] == pytest.approx(0.0)
    assert r["per_class_AP"] == {"cat": pytest.approx(0.4)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_101_point_interpolated_precision(backend):
    # 2 GT; ranked detections: hit (0.9), false positive (0.8), hit (0.7). Precision 1 at recall 1/2, 2/3 at recall 1.
    # COCO samples the (right-max) envelope at 101 recall points: 0.00..0.50 (51 points) -> 1, 0.51..1.00 (50) -> 2/3.
    gt = _coco({1: [(1, [0, 0, 10, 10]), (1, [50, 50, 10, 10])]})
    dets = [_det(1, 1, [0, 0, 10, 10], 0.9), _det(1, 1, [80, 80, 10, 10], 0.8), _det(1, 1, [50, 50, 10, 10], 0.7)]
    r = evaluate_detections(gt, dets, backend=backend)
    expected = (51 * 1.0 + 50 * 2 / 3) / 101
    assert r["AP"] == pytest.approx(expected) and r["AP50"] == pytest.approx(expected)
    assert r["AR100"] == pytest.approx(1.0) and r["AR1"] == pytest.approx(0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_recall_at_iou_50_and_75(backend):
    # Image 1: IoU 100 / 193 = 0.518 (a hit at .50 only); image 2: IoU 100 / 130 = 0.769 (a hit up to .75).
    # AR50 = 2/2, AR75 = 1/2. AP75: the first-ranked detection (image 1) misses, so precision is 1/2 up to recall
    # 1/2 and recall 1 is never reached: 51 of 101 recall points at 0.5 -> 25.5 / 101.
    gt = _coco({1: [(1, [0, 0, 10, 10])], 2: [(1, [0, 0, 10, 10])]})
    dets = [_det(1, 1, [0, 0, 10, 19.3], 0.9), _det(2, 1, [0, 0, 10, 13], 0.8)]
    r = evaluate_detections(gt, dets, backend=backend)
    assert r["AR50"] == pytest.approx(1.0) and r["AR75"] == pytest.approx(0.5)
    assert r["AP50"] == pytest.approx(1.0) and r["AP75"] == pytest.approx(25.5 / 101)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_detections_are_zero(mixed, backend):
    gt, _ = mixed
    r = evaluate_detections(gt, [], backend=backend)
    assert all(r[k] == 0.0 for k in (*STAT_NAMES, "AR50", "AR75"))
    assert all(v == 0.0 for v in r["per_class_AP"].values())


def test_class_without_ground_truth_is_undefined():
    gt = _coco({1: [(1, [0, 0, 50, 50])]}, categories=((1, "a"), (2, "b")))
    r = evaluate_detections(gt, [_det(1, 1, [0, 0, 50, 50], 0.9), _det(1, 2, [60, 60, 20, 20], 0.8)])
    assert r["per_class_AP"] == {"a": pytest.approx(1.0), "b": -1.0}
    assert r["AP"] == pytest.approx(1.0) and r["AR50"] == pytest.approx(1.0)  # undefined: not in the means


def test_paths_are_read(tmp_path, mixed):
    gt, dets = mixed
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    assert evaluate_detections(tmp_path / "gt.json", str(tmp_path / "dets.json")) == evaluate_detections(gt, dets)


@pytest.mark.parametrize("entry, why", [
    (_det(9, 1, [0, 0, 5, 5], 0.5), "unknown image_id 9"),
    (_det(1, 2, [0, 0, 5, 5], 0.5), "unknown category_id 2"),
    (_det(1, 1, [0, 0, 5], 0.5), "bbox"),
    (_det(1, 1, [0, 0, -1, 5], 0.5), "bbox"),
    (_det(1, 1, [0, 0, float("nan"), 5], 0.5), "bbox"),
    ({"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]}, "missing 'score'"),
    (_det(1, 1, [0, 0, 5, 5], "high"), "score"),
    ([1, 2, 3], "not an object"),
])
def test_bad_detection_entries(tmp_path, entry, why):
    gt = _coco({1: [(1, [0, 0, 10, 10])]})
    path = tmp_path / "dets.json"
    path.write_text(json.dumps([_det(1, 1, [0, 0, 10, 10], 0.9), entry]))
    with pytest.raises(DetectionsError) as err:
        evaluate_detections(gt, path)
    message = str(err.value)
    assert str(path) in message and "detection 1" in message and why in message and "\n" not in message


def test_bad_files(tmp_path):
    with pytest.raises(DetectionsError, match="annotations file not found"):
        evaluate_detections(tmp_path / "none.json", [])
    (tmp_path / "gt.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DetectionsError, match="gt.json: expected a COCO object"):
        evaluate_detections(tmp_path / "gt.json", [])
    (tmp_path / "dets.json").write_text("{not json")
    with pytest.raises(DetectionsError, match="dets.json: not valid JSON"):
        load_detections(tmp_path / "dets.json", _coco({1: []}))
    with pytest.raises(DetectionsError, match="backend"):
        evaluate_detections(_coco({1: []}), [], backend="detectron2")


def test_to_coco_detections_maps_labels_boxes_and_scale():
    # Image 42 was resized by (sy, sx) = (0.5, 2.0): original x = resized x / 2, original y = resized y / 0.5.
    preds = [
        {"boxes": torch.tensor([[20.0, 10.0, 60.0, 30.0], [0.0, 0.0, 4.0, 2.0]]), "scores": torch.tensor([0.9, 0.3]),
         "labels": torch.tensor([0, 2])},
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)},
        {"boxes": np.array([[1.0, 2.0, 3.0, 5.0]]), "scores": np.array([0.5]), "labels": np.array([1])},
    ]
    out = to_coco_detections(preds, torch.tensor([42, 43, 44]), cat_ids=[1, 3, 7],
                             scale_factors=torch.tensor([[0.5, 2.0], [1.0, 1.0], [1.0, 1.0]]))
    assert out == [
        {"image_id": 42, "category_id": 1, "bbox": [10.0, 20.0, 20.0, 40.0], "score": pytest.approx(0.9)},
        {"image_id": 42, "category_id": 7, "bbox": [0.0, 0.0, 2.0, 4.0], "score": pytest.approx(0.3)},
        {"image_id": 44, "category_id": 3, "bbox": [1.0, 2.0, 2.0, 3.0], "score": pytest.approx(0.5)},
    ]
    assert all(type(d["image_id"]) is int and type(d["category_id"]) is int for d in out)
    json.dumps(out)  # plain Python types
    with pytest.raises(ValueError, match="label 3 outside 0..2"):
        to_coco_detections([{"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([3])}],
                           [1], [1, 3, 7], None)
    with pytest.raises(ValueError, match="one each per image"):
        to_coco_detections(preds, [1, 2], [1, 3, 7], None)


def test_converted_ground_truth_scores_perfect(mixed):
    # Resized GT (xyxy, contiguous labels) converted back must reproduce the original annotations exactly.
    gt, _ = mixed
    cat_ids = [1, 3, 7]
    sy, sx = 0.75, 1.5
    preds, ids = [], []
    for img in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == img["id"] and not a["iscrowd"]]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64)
        xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1) * torch.tensor([sx, sy, sx, sy])
        preds.append({"boxes": xyxy, "scores": torch.ones(len(anns)),
                      "labels": torch.tensor([cat_ids.index(a["category_id"]) for a in anns])})
        ids.append(img["id"])
    dets = to_coco_detections(preds, ids, cat_ids, [[sy, sx]] * len(ids))
    assert evaluate_detections(gt, dets)["AP"] == pytest.approx(1.0)
