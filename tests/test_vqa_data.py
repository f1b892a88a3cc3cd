"""VQAv2 data (florence.data.vqa): reading with counted skips, test-dev and CSV questions, METER's vocabulary and
soft targets (numbers worked by hand), the hold-out, the whole-image transform, the resumable training stream and
the evaluation loader."""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from florence.adapters.vqa_metric import vqa_accuracy
from florence.data.bad_samples import BadSampleError
from florence.data.errors import DataConfigError, DataFileError, DataNotFound
from florence.data.vqa import (
    VQADataset,
    answer_score,
    build_answer_vocab,
    build_vqa_train_loader,
    soft_targets,
    validate_vqa_data,
    vqa_eval_loader,
    vqa_transform,
)
from florence.tokenizer import tokenize, train_bpe_tokenizer

PREPROCESS = dict(input_size=[3, 16, 16], mean=[0.5, 0.25, 0.0], std=[0.5, 0.25, 1.0], interpolation="bicubic")
QUESTIONS = ["what color is the dog?", "is there a cat?", "how many dogs are there?", "what is it?",
             "what is left of the bag?", "is this a test?"]


@pytest.fixture(scope="module")
def tokenizer_fn(tmp_path_factory):
    tok = train_bpe_tokenizer(QUESTIONS * 3, tmp_path_factory.mktemp("bpe"), vocab_size=300, min_frequency=1)
    return functools.partial(tokenize, tok, context_length=12)


def write_image(path, seed, size=(20, 12)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def gt(*groups):
    """10 VQAv2 answer dicts from (answer, count) groups."""
    flat = [a for a, n in groups for _ in range(n)]
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(flat)]


def annotation(qid, image_id, answers, mca, answer_type="other", question_type="what is"):
    return {"question_id": qid, "image_id": image_id, "question_type": question_type, "answer_type": answer_type,
            "multiple_choice_answer": mca, "answers": answers}


def write_split(root, questions, annotations, subtype="train2014"):
    q = root / f"v2_OpenEnded_mscoco_{subtype}_questions.json"
    a = root / f"v2_mscoco_{subtype}_annotations.json"
    q.write_text(json.dumps({"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": subtype,
                             "license": {}, "questions": questions}))
    if annotations is not None:
        a.write_text(json.dumps({"annotations": annotations}))
    return q, a


@pytest.fixture
def messy(tmp_path):
    """Every kind of skip next to good questions. Images 1 (.jpg), 2, 3, 5 (.png, 5 corrupt); 4 missing."""
    images = tmp_path / "train2014"
    images.mkdir()
    write_image(images / "COCO_train2014_000000000001.jpg", 1)
    write_image(images / "COCO_train2014_000000000002.png", 2)  # the .jpg is absent: the .png is used
    write_image(images / "COCO_train2014_000000000003.png", 3)
    (images / "COCO_train2014_000000000005.png").write_bytes(b"not an image" * 10)
    questions = [{"image_id": 1, "question": "what color is the dog?", "question_id": 10},
                 {"image_id": 1, "question": "is there a cat?", "question_id": 11},
                 {"image_id": 2, "question": "how many dogs are there?", "question_id": 20},
                 {"image_id": 2, "question": "what is it?", "question_id": 21},  # no annotation
                 {"image_id": 3, "question": "what is it?", "question_id": 30},  # bad answers list
                 {"image_id": 3, "question": "what is it?", "question_id": 31},  # annotation says image 99
                 {"image_id": 4, "question": "what is it?", "question_id": 40},  # missing image file
                 {"image_id": 5, "question": "is this a test?", "question_id": 50}]  # corrupt image
    anns = [annotation(10, 1, gt(("brown", 4), ("Brown", 3), ("tan", 3)), "brown"),
            annotation(11, 1, gt(("no", 9), ("yes", 1)), "no", "yes/no", "is there a"),
            annotation(20, 2, gt(("2", 6), ("two", 4)), "2", "number", "how many"),
            annotation(30, 3, "dog", "dog"),
            annotation(31, 99, gt(("dog", 10)), "dog"),
            annotation(40, 4, gt(("dog", 10)), "dog"),
            annotation(50, 5, gt(("yes", 10)), "yes", "yes/no", "is this a"),
            annotation(999, 9, gt(("dog", 10)), "dog")]  # unknown question
    q, a = write_split(tmp_path, questions, anns)
    return q, a, images


# --- reading ------------------------------------------------------------------------------------------------------


def test_every_skip_is_counted_with_its_reason(messy):
    q, a, images = messy
    ds = VQADataset(q, a, images)
    assert ds.question_ids.tolist() == [10, 11, 20, 50]  # file order
    s = ds.summary()
    assert s.counts == {"question without annotation": 1, "bad answers list": 1,
                        "annotation image id differs from the question's": 1, "missing image file": 1,
                        "annotation for an unknown question": 1}
    assert (s.questions_in_file, s.questions, s.images) == (8, 4, 3)
    missing = next(e for e in s.examples if e["reason"].startswith("missing image file"))
    assert missing["file"].endswith("COCO_train2014_000000000004.jpg") and "question 40" in missing["reason"]
    assert "8 questions" in s.format() and "missing image file: 1" in s.format()
    first = ds[0]
    assert (first.question_id, first.image_id, first.question) == (10, 1, "what color is the dog?")
    assert first.answers == ["brown"] * 4 + ["Brown"] * 3 + ["tan"] * 3  # raw, in annotator order
    assert (first.answer_type, first.question_type, first.multiple_choice_answer) == ("other", "what is", "brown")
    assert first.image.name == "COCO_train2014_000000000001.jpg"
    assert ds[2].image.name == "COCO_train2014_000000000002.png"  # the .png of the same stem
    assert ds[-1].question_id == 50 and ds.has_annotations


def test_annotations_dict_is_the_files_entries_of_the_kept_questions(messy):
    q, a, images = messy
    ds = VQADataset(q, a, images)
    entries = json.loads(a.read_text())["annotations"]
    assert ds.annotations_dict()["annotations"] == [entries[i] for i in (0, 1, 2, 6)]
    assert [e["question_id"] for e in ds.annotations_dict({20, 10, 12345})["annotations"]] == [10, 20]


def test_test_dev_questions_without_annotations(messy, tmp_path):
    q, _, images = messy
    ds = VQADataset(q, None, images)  # test-dev style: every question with an image is kept
    assert ds.question_ids.tolist() == [10, 11, 20, 21, 30, 31, 50]
    assert ds[0].answers == [] and ds[0].answer_type is None and ds[0].multiple_choice_answer is None
    assert not ds.has_annotations and list(ds.multiple_choice_answers()) == [None] * 7
    with pytest.raises(DataFileError, match="no annotations"):
        ds.annotations_dict()


def test_csv_questions(tmp_path):
    (tmp_path / "img").mkdir()
    write_image(tmp_path / "img" / "b.png", 1)
    write_image(tmp_path / "img" / "a.png", 2)
    table = tmp_path / "questions.csv"
    table.write_text("question_id,image,question,answers\n"
                     "7,b.png,is it red?,yes|yes|no\n"
                     "8,a.png,\"what is it, then?\", dog | cat|cat\n"
                     "9,b.png,how many?,\n"
                     "10,gone.png,what?,x\n")
    ds = VQADataset(table, images=tmp_path / "img")
    assert ds.question_ids.tolist() == [7, 8, 9] and ds.summary().counts == {"missing image file": 1}
    assert ds.image_ids.tolist() == [0, 1, 0]  # ids in order of first appearance
    assert ds[1].question == "what is it, then?" and ds[1].answers == ["dog", "cat", "cat"]  # stripped
    assert ds[1].multiple_choice_answer == "cat" and ds[0].multiple_choice_answer == "yes"
    assert ds[2].answers == [] and ds.has_annotations
    anns = ds.annotations_dict()["annotations"]
    assert [a["question_id"] for a in anns] == [7, 8]  # questions with answers
    assert anns[0]["answer_type"] == "other" and anns[0]["question_type"] == "none of the above"
    results = [{"question_id": 7, "answer": "yes"}, {"question_id": 8, "answer": "cat"}]
    out = vqa_accuracy(results, ds.annotations_dict())
    # 3 answers each: question 7's "yes" given by 2 -> each "yes" sees 1 (1/3), the "no" sees 2 (2/3):
    # (2 * 1/3 + 2/3) / 3 = 4/9; question 8's "cat" likewise 4/9 -> 44.44
    assert out["overall"] == 44.44
    (tmp_path / "bad.csv").write_text("id,image,question\n1,b.png,q\n")
    with pytest.raises(DataFileError, match="line 1: expected the header"):
        VQADataset(tmp_path / "bad.csv", images=tmp_path / "img")
    (tmp_path / "bad2.csv").write_text("question_id,image,question\nx,b.png,q\n")
    with pytest.raises(DataFileError, match="line 2: question_id: expected an integer"):
        VQADataset(tmp_path / "bad2.csv", images=tmp_path / "img")


@pytest.mark.parametrize("questions, message", [
    ('{"questions": [{"image_id": 1, "question_id": 1}]}', r"questions\[0\]: missing key 'question'"),
    ('{"questions": [{"image_id": 1, "question": "q", "question_id": "a"}]}',
     r"questions\[0\]\.question_id: expected an integer"),
    ('{"data_subtype": "x", "questions": [{"image_id": 1, "question": "q", "question_id": 1}, '
     '{"image_id": 1, "question": "q", "question_id": 1}]}', "question id 1 appears twice"),
    ('{"questions": [{"image_id": 1, "question": "q", "question_id": 1}]}', "missing key 'data_subtype'"),
    ("[1, 2]", "expected a JSON object"),
    ("{", "not valid JSON"),
])
def test_malformed_files_are_one_line_errors_naming_file_and_key(tmp_path, questions, message):
    (tmp_path / "q.json").write_text(questions)
    with pytest.raises(DataFileError, match=message) as err:
        VQADataset(tmp_path / "q.json", None, tmp_path)
    assert "\n" not in str(err.value) and "q.json" in str(err.value)


def test_missing_files_and_bad_annotation_entries(messy, tmp_path):
    q, a, images = messy
    with pytest.raises(DataNotFound, match="nope.json: questions file not found"):
        VQADataset(tmp_path / "nope.json", a, images)
    with pytest.raises(DataNotFound, match="image folder not found"):
        VQADataset(q, a, tmp_path / "no_images")
    (tmp_path / "a2.json").write_text(json.dumps({"annotations": [{"question_id": 10}]}))
    with pytest.raises(DataFileError, match=r"annotations\[0\]: missing key 'answers'"):
        VQADataset(q, tmp_path / "a2.json", images)
    with pytest.raises(DataConfigError, match="image_pattern"):
        VQADataset(q, a, images, image_pattern="{image}.jpg")


# --- answers ------------------------------------------------------------------------------------------------------


def test_meter_scores_and_soft_targets_count_raw_strings():
    assert [answer_score(n) for n in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    index = {"yes": 0, "no": 1, "maybe": 2, "2": 3}
    # "yes" x4 -> 1.0; "Yes" x3 is another raw string, not in the vocabulary (METER does not normalise here);
    # "no" x2 -> 0.6; "maybe" x1 -> 0.3; labels in order of first occurrence
    labels, scores = soft_targets(["no", "yes", "Yes", "yes", "maybe", "Yes", "yes", "no", "Yes", "yes"], index)
    assert labels == [1, 0, 2] and scores == [0.6, 1.0, 0.3]
    assert soft_targets(["two"] * 3 + ["2"] * 3 + ["x"] * 4, index) == ([3], [0.9])
    assert soft_targets(["Yes"] * 10, index) == ([], [])


def test_answer_vocabulary_normalises_counts_and_orders(tmp_path):
    (tmp_path / "img").mkdir()
    mcas = ["Yes"] * 3 + ["yes"] * 2 + ["two"] * 2 + ["2."] + ["red"] * 3 + ["blue"]
    questions = [{"image_id": 1, "question": "q", "question_id": i} for i in range(len(mcas))]
    anns = [annotation(i, 1, gt((m, 10)), m) for i, m in enumerate(mcas)]
    q, a = write_split(tmp_path, questions, anns)
    write_image(tmp_path / "img" / "COCO_train2014_000000000001.png", 0)
    ds = VQADataset(q, a, tmp_path / "img")
    # normalised: yes 5, 2 3, red 3, blue 1; >= 3 -> count desc, ties alphabetically ("2" < "red")
    assert build_answer_vocab([ds], min_count=3) == ["yes", "2", "red"]
    assert build_answer_vocab([ds, ds], min_count=6) == ["yes", "2", "red"]  # counted over all datasets
    assert build_answer_vocab([ds], min_count=1) == ["yes", "2", "red", "blue"]


# --- hold-out -----------------------------------------------------------------------------------------------------


def test_holdout_is_the_last_images_of_a_seeded_shuffle(tmp_path):
    (tmp_path / "img").mkdir()
    questions, anns = [], []
    for image_id in range(1, 7):
        write_image(tmp_path / "img" / f"COCO_val2014_{image_id:012d}.png", image_id, size=(4, 4))
        for k in range(2):
            qid = image_id * 10 + k
            questions.append({"image_id": image_id, "question": "q", "question_id": qid})
            anns.append(annotation(qid, image_id, gt(("yes", 10)), "yes"))
    q, a = write_split(tmp_path, questions, anns, "val2014")
    common = dict(holdout_images=2, holdout_seed=5)
    held = VQADataset(q, a, tmp_path / "img", part="holdout", **common)
    train = VQADataset(q, a, tmp_path / "img", part="train", **common)
    everything = VQADataset(q, a, tmp_path / "img", part="all", **common)
    # the definition: image ids sorted, permuted by default_rng(seed), the last 2 held out
    expected = set(np.arange(1, 7)[np.random.default_rng(5).permutation(6)][-2:].tolist())
    assert set(held.image_ids.tolist()) == expected and len(held) == 4
    assert not set(train.image_ids.tolist()) & expected and len(train) == 8
    assert sorted(held.question_ids.tolist() + train.question_ids.tolist()) == sorted(everything.question_ids.tolist())
    other = VQADataset(q, a, tmp_path / "img", part="holdout", holdout_images=2, holdout_seed=6)
    assert set(other.image_ids.tolist()) != expected  # another seed, other images (for these seeds)
    assert VQADataset(q, a, tmp_path / "img", part="train", max_questions=3, **common).question_ids.tolist() == \
        train.question_ids.tolist()[:3]  # max_questions after the split: the hold-out never moves
    with pytest.raises(DataConfigError, match="leaves none for training"):
        VQADataset(q, a, tmp_path / "img", holdout_images=6)
    with pytest.raises(DataConfigError, match="holdout_images > 0"):
        VQADataset(q, a, tmp_path / "img", part="holdout")


# --- images -------------------------------------------------------------------------------------------------------


def test_transform_resizes_the_whole_image_without_crop_or_flip():
    img = np.zeros((8, 32, 3), dtype=np.uint8)  # wide: left half white, right half black
    img[:, :16] = 255
    x = vqa_transform(PREPROCESS)(Image.fromarray(img))
    assert x.shape == (3, 16, 16)
    # normalised white = (1 - mean) / std = (1, 3, 1); black = -mean / std = (-1, -1, 0)
    torch.testing.assert_close(x[:, :, 0], torch.tensor([1.0, 3.0, 1.0])[:, None].expand(3, 16))
    torch.testing.assert_close(x[:, :, -1], torch.tensor([-1.0, -1.0, 0.0])[:, None].expand(3, 16))
    grey = vqa_transform(dict(PREPROCESS, input_size=[1, 4, 4], mean=[0.0], std=[1.0]))(Image.fromarray(img))
    assert grey.shape == (1, 4, 4) and float(grey[0, 0, 0]) == pytest.approx(1.0)


# --- training stream ----------------------------------------------------------------------------------------------


def _cfg(messy, **kw):
    q, a, images = messy
    return {"sources": [{"questions": str(q), "annotations": str(a), "images": str(images)}], "batch_size": 2,
            "seed": 3, **kw}


def _take(loader, n):
    stream = iter(loader)
    return [next(stream) for _ in range(n)]


def test_batches_targets_and_dropped_questions(messy, tokenizer_fn):
    answers = ["no", "brown", "2", "tan", "yes"]  # question 20's raw "2" x6 -> 1.0 ("two" is not counted)
    loader = build_vqa_train_loader(_cfg(messy), preprocess=PREPROCESS, tokenize=tokenizer_fn, answers=answers)
    assert loader.dropped == {"v2_OpenEnded_mscoco_train2014_questions": 0}
    batches = _take(loader, 4)  # 2 epochs of the 4 questions (the corrupt image is replaced by the next question)
    b = batches[0]
    assert b["images"].shape == (2, 3, 16, 16) and b["input_ids"].shape == (2, 12)
    assert b["attention_mask"].shape == (2, 12) and b["targets"].shape == (2, 5)
    expected = {10: [0, 1.0, 0, 0.9, 0],  # brown x4 -> 1.0, "Brown" raw not counted, tan x3 -> 0.9
                11: [1.0, 0, 0, 0, 0.3],  # no x9, yes x1
                20: [0, 0, 1.0, 0, 0]}
    seen = set()
    for batch in batches:
        for qid, target in zip(batch["question_ids"].tolist(), batch["targets"].tolist()):
            assert target == pytest.approx(expected[qid])  # question 50's image is corrupt: never delivered
            seen.add(qid)
    assert seen == {10, 11, 20}
    assert loader.bad_sample_summary().by_reason  # the corrupt image was counted
    only_brown = build_vqa_train_loader(_cfg(messy), preprocess=PREPROCESS, tokenize=tokenizer_fn, answers=["brown"])
    assert only_brown.dropped == {"v2_OpenEnded_mscoco_train2014_questions": 3}  # 11, 20, 50: no in-vocab answer
    assert len(only_brown.sources[0]) == 1
    with pytest.raises(DataFileError, match="no trainable question left"):
        build_vqa_train_loader(_cfg(messy), preprocess=PREPROCESS, tokenize=tokenizer_fn, answers=["zebra"])


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_resume_gives_exactly_the_next_batch(messy, tokenizer_fn):
    kw = dict(preprocess=PREPROCESS, tokenize=tokenizer_fn, answers=["no", "brown", "2", "yes"])
    uninterrupted = _take(build_vqa_train_loader(_cfg(messy), **kw), 7)  # crosses epochs
    first = build_vqa_train_loader(_cfg(messy), **kw)
    _take(first, 5)
    state = first.state_dict()
    resumed = build_vqa_train_loader(_cfg(messy, num_workers=1), **kw)
    resumed.load_state_dict(state)
    after = _take(resumed, 2)
    _assert_same(after[0], uninterrupted[5])
    _assert_same(after[1], uninterrupted[6])
    other_seed = _take(build_vqa_train_loader(_cfg(messy, seed=4), **kw), 3)
    assert [b["question_ids"].tolist() for b in other_seed] != [b["question_ids"].tolist() for b in uninterrupted[:3]]


def test_sources_are_concatenated_and_ranks_split_the_global_batch(messy, tmp_path, tokenizer_fn):
    q, a, images = messy
    cfg = _cfg(messy, batch_size=4)
    cfg["sources"].append({"questions": str(q), "annotations": str(a), "images": str(images), "name": "again",
                           "holdout_images": 1, "holdout_seed": 0})
    kw = dict(preprocess=PREPROCESS, tokenize=tokenizer_fn, answers=["no", "brown", "2", "yes"])
    single = build_vqa_train_loader(cfg, **kw)
    second = single.sources[1].dataset
    assert second.part == "train" and len(single.sources[0]) == 4  # the hold-out part stays out of training
    assert single.samples_per_epoch == 4 + len(single.sources[1])  # each question once per epoch
    ranks = [build_vqa_train_loader(dict(cfg, batch_size=2), rank=r, world_size=2, **kw) for r in (0, 1)]
    whole = _take(single, 2)
    halves = [_take(loader, 2) for loader in ranks]
    for k in range(2):
        joined = torch.cat([halves[0][k]["question_ids"], halves[1][k]["question_ids"]])
        assert joined.tolist() == whole[k]["question_ids"].tolist()


def test_validate_vqa_data_names_the_dotted_key(messy):
    cfg = _cfg(messy)
    validate_vqa_data(cfg)
    with pytest.raises(DataConfigError, match=r"data\.sources\[0\]\.holdout_images: expected an integer >= 0"):
        validate_vqa_data(dict(cfg, sources=[dict(cfg["sources"][0], holdout_images=-1)]))
    with pytest.raises(DataConfigError, match=r"data\.sources\[0\]\.annotations: required"):
        validate_vqa_data(dict(cfg, sources=[{"questions": "q.json", "images": "i"}]))
    validate_vqa_data(dict(cfg, sources=[{"questions": "q.csv", "images": "i"}]))  # a table carries its answers
    with pytest.raises(DataConfigError, match=r"data\.sources\[0\]\.qestions: unknown key"):
        validate_vqa_data(dict(cfg, sources=[dict(cfg["sources"][0], qestions="x")]))
    with pytest.raises(DataConfigError, match=r"data\.sources\[0\]\.image_pattern: expected a file-name pattern"):
        validate_vqa_data(dict(cfg, sources=[dict(cfg["sources"][0], image_pattern="{id}.jpg")]))
    with pytest.raises(DataConfigError, match=r"data\.sources\[0\]\.part: 'holdout' needs"):
        validate_vqa_data(dict(cfg, sources=[dict(cfg["sources"][0], part="holdout")]))
    with pytest.raises(DataConfigError, match=r"data\.augment: unknown key"):
        validate_vqa_data(dict(cfg, augment={}))
    with pytest.raises(DataConfigError, match=r"data\.sources: expected a non-empty list"):
        validate_vqa_data(dict(cfg, sources=[]))


# --- evaluation loader --------------------------------------------------------------------------------------------


def test_eval_loader_order_and_skipped_images(messy, tokenizer_fn):
    q, a, images = messy
    ds = VQADataset(q, None, images)  # 7 questions, question 50's image corrupt
    loader = vqa_eval_loader(ds, preprocess=PREPROCESS, tokenize=tokenizer_fn, batch_size=3)
    batches = list(loader)
    assert [b["question_ids"].tolist() for b in batches] == [[10, 11, 20], [21, 30, 31]]  # 50 left out
    assert set(batches[0]) == {"images", "input_ids", "attention_mask", "question_ids"}
    report = loader.report()
    assert (report["skipped"], report["evaluated"]) == (1, 6)
    assert report["samples"][0]["file"].endswith("COCO_train2014_000000000005.png")
    expected_ids = tokenizer_fn(["what color is the dog?"])["input_ids"][0]
    assert torch.equal(batches[0]["input_ids"][0], expected_ids)
    strict = vqa_eval_loader(ds, preprocess=PREPROCESS, tokenize=tokenizer_fn, on_bad_sample="raise")
    with pytest.raises(BadSampleError, match="000000000005.png"):
        list(strict)
