"""Fashion-MNIST VQA generator (VQAv2 files, answers recomputed from the layout, annotators, question mix,
determinism, idempotence, CLI) and the VQA picture."""
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from florence.adapters.vqa_metric import vqa_accuracy
from florence.benchmarks import draw_vqa as dv
from florence.benchmarks import vqa_canvas as vc
from florence.data.errors import DataNotFound
from florence.data.sources import FASHION_MNIST_DIR, FashionMNISTSource
from florence.data.vqa import VQADataset
from florence.data.vqa_answers import normalize_answer

ANSWERS = ["t shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


@pytest.fixture(scope="module")
def small(tmp_path_factory, fake_fmnist):
    """16 train images of the fake Fashion-MNIST with the default settings."""
    out = tmp_path_factory.mktemp("vqa")
    return vc.generate(out, "train", 16, seed=0, root=fake_fmnist)


def _load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def test_vqav2_files(small):
    out = small.questions.parent
    assert small.questions == out / "v2_OpenEnded_fmnist_train_questions.json"
    assert small.annotations == out / "v2_fmnist_train_annotations.json" and small.images_dir == out / "train"
    questions, annotations = _load(small.questions), _load(small.annotations)
    assert {"info", "task_type", "data_type", "data_subtype", "license", "questions"} <= set(questions)
    assert (questions["task_type"], questions["data_type"], questions["data_subtype"]) == (
        "Open-Ended", "fmnist", "fmnist_train")
    assert annotations["data_subtype"] == "fmnist_train" and small.num_questions == 16 * 5
    assert [set(q) for q in questions["questions"]] == [{"image_id", "question", "question_id"}] * 80
    assert [q["question_id"] for q in questions["questions"]] == [a["question_id"] for a in annotations["annotations"]]
    assert [q["question_id"] for q in questions["questions"]] == [i * 1000 + k for i in range(1, 17) for k in range(5)]
    for a in annotations["annotations"]:
        assert set(a) == {"question_id", "image_id", "question_type", "answer_type", "multiple_choice_answer",
                          "answers"}
        assert a["answer_type"] in ("yes/no", "number", "other") and a["question_type"] in vc.QUESTION_TYPES
        assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
        assert all(set(x) == {"answer", "answer_confidence", "answer_id"} for x in a["answers"])
        assert {x["answer_confidence"] for x in a["answers"]} <= {"yes", "maybe", "no"}
    for image_id in range(1, 17):
        with Image.open(out / "train" / f"COCO_fmnist_train_{image_id:012d}.png") as im:
            assert im.mode == "RGB" and im.size == (96, 96)
    dataset = VQADataset(small.questions, small.annotations, small.images_dir)  # the library reads it as VQAv2
    assert len(dataset) == 80 and dataset[0].image.is_file() and len(dataset[0].answers) == 10


def _expected(question: str, items: list[dict]) -> str:
    """The answer recomputed from the layout, written independently of the generator."""
    singular = {"t-shirt": 0, "pair of trousers": 1, "ankle boot": 9, **{a: i for i, a in enumerate(ANSWERS)}}
    plural = {"t-shirts": 0, "pairs of trousers": 1, "dresses": 3, **{a + "s": i for i, a in enumerate(ANSWERS)}}
    ref = {"t-shirt": 0, **{a: i for i, a in enumerate(ANSWERS)}}
    labels = [it["label"] for it in items]
    cells = {(it["row"], it["col"]): it["label"] for it in items}
    if m := re.fullmatch(r"is there an? (.+)\?", question):
        return "yes" if singular[m[1]] in labels else "no"
    if m := re.fullmatch(r"how many (.+) are there\?", question):
        return str(labels.count(plural[m[1]]))
    if m := re.fullmatch(r"what is in the (top|bottom) (left|right) corner\?", question):
        return ANSWERS[cells[(0 if m[1] == "top" else 2, 0 if m[2] == "left" else 2)]]
    if question == "what is in the middle?":
        return ANSWERS[cells[(1, 1)]]
    if question == "what is the largest item?":
        sizes = sorted((it["size"], it["label"]) for it in items)
        assert sizes[-1][0] >= 1.3 * sizes[-2][0]
        return ANSWERS[sizes[-1][1]]
    m = re.fullmatch(r"what is (left of|right of|above|below) the (.+)\?", question)
    (anchor,) = [it for it in items if it["label"] == ref[m[2]]]  # the referenced class is unique
    row, col = anchor["row"], anchor["col"]
    line = {"left of": [(row, c) for c in range(col - 1, -1, -1)], "right of": [(row, c) for c in range(col + 1, 3)],
            "above": [(r, col) for r in range(row - 1, -1, -1)], "below": [(r, col) for r in range(row + 1, 3)]}
    return ANSWERS[next(cells[cell] for cell in line[m[1]] if cell in cells)]


def test_answers_follow_the_layout(small):
    questions, annotations = _load(small.questions)["questions"], _load(small.annotations)["annotations"]
    layout = {im["image_id"]: im for im in _load(small.layout)["images"]}
    kinds = Counter()
    for q, a in zip(questions, annotations):
        image = layout[q["image_id"]]
        assert a["multiple_choice_answer"] == _expected(q["question"], image["items"]), q
        kinds[next(x["kind"] for x in image["questions"] if x["question_id"] == q["question_id"])] += 1
    assert len({q["question"] for q in questions if q["image_id"] == 1}) == 5  # no question twice in an image
    for image in layout.values():
        items = image["items"]
        assert 2 <= len(items) <= 5 and len({(it["row"], it["col"]) for it in items}) == len(items)
        assert len({it["label"] for it in items}) <= 3
        for it in items:  # the pasted square stays inside its 32-pixel cell
            assert 16 <= it["side"] <= 32 and 1 <= it["size"] <= it["side"] and it["answer"] == ANSWERS[it["label"]]
            assert it["col"] * 32 <= it["x"] <= it["x"] + it["side"] <= (it["col"] + 1) * 32
            assert it["row"] * 32 <= it["y"] <= it["y"] + it["side"] <= (it["row"] + 1) * 32
    assert {"exists", "count", "position"} <= set(kinds)


def _item(label, row, col, size):
    return vc.Item(label, row, col, col * 32, row * 32, 32, size, 0)


def test_candidate_questions_hand_worked():
    # sneaker . bag / . coat . / sneaker . .  (grid 3): the bag and the coat are unique, the sneakers are not
    items = [_item(7, 0, 0, 30), _item(8, 0, 2, 20), _item(7, 2, 0, 18), _item(4, 1, 1, 22)]
    got = {q.question: (q.answer, q.answer_type, q.question_type, q.kind)
           for q in vc.candidate_questions(items, 3, range(10))}
    assert got["is there a sneaker?"] == ("yes", "yes/no", "is there a", "exists")
    assert got["is there an ankle boot?"][0] == "no" and got["is there a pair of trousers?"][0] == "no"
    assert got["how many sneakers are there?"] == ("2", "number", "how many", "count")
    assert got["how many pairs of trousers are there?"][0] == "0" and got["how many bags are there?"][0] == "1"
    assert got["what is in the top left corner?"] == ("sneaker", "other", "what is in the", "position")
    assert got["what is in the top right corner?"][0] == "bag" and got["what is in the middle?"][0] == "coat"
    assert got["what is in the bottom left corner?"][0] == "sneaker"
    assert "what is in the bottom right corner?" not in got
    assert got["what is the largest item?"] == ("sneaker", "other", "what is the", "largest")  # 30 >= 1.3 * 22
    relations = {k: v for k, v in got.items() if v[3] == "relation"}
    assert relations == {"what is left of the bag?": ("sneaker", "other", "what is left of the", "relation")}
    assert len(got) == 10 + 10 + 4 + 1 + 1
    smaller = [_item(7, 0, 0, 28)] + items[1:]  # 28 < 1.3 * 22: no clear largest item
    assert "what is the largest item?" not in {q.question for q in vc.candidate_questions(smaller, 3, range(10))}
    only = {q.question for q in vc.candidate_questions(items, 3, [7, 9])}  # asked classes restricted
    assert "is there a bag?" not in only and "is there an ankle boot?" in only and "what is left of the bag?" in only
    # bag coat dress / sneaker . . / sandal . .: the nearest occupied cell answers
    row = [_item(8, 0, 0, 20), _item(4, 0, 1, 20), _item(3, 0, 2, 20), _item(7, 1, 0, 20), _item(5, 2, 0, 20)]
    got = {q.question: q.answer for q in vc.candidate_questions(row, 3, range(10)) if q.kind == "relation"}
    assert got == {"what is right of the bag?": "coat", "what is below the bag?": "sneaker",
                   "what is left of the coat?": "bag", "what is right of the coat?": "dress",
                   "what is left of the dress?": "coat", "what is above the sneaker?": "bag",
                   "what is below the sneaker?": "sandal", "what is above the sandal?": "sneaker"}


def _kind(raw: str, canonical: str, synonyms: set) -> str:
    if raw in (canonical, canonical + "."):
        return "exact"
    if normalize_answer(raw) == canonical:
        return "variant"
    return "synonym" if normalize_answer(raw) in synonyms else "wrong"


def test_annotators_vary_and_agree():
    rng = np.random.default_rng(0)
    cases = [(vc.Question("what is in the middle?", "ankle boot", "other", "what is in the", "position"),
              {"boot", "boots", "shoe"}),
             (vc.Question("how many sneakers are there?", "2", "number", "how many", "count", 7),
              {"2 sneakers"}),
             (vc.Question("is there a bag?", "no", "yes/no", "is there a", "exists", 8), {"nope", "nah"})]
    seen = Counter()
    raws = set()
    for question, synonyms in cases:
        for _ in range(150):
            answers = vc.annotate(rng, question, [7, 9], vc.DEFAULT_ANNOTATORS)
            assert [a["answer_id"] for a in answers] == list(range(1, 11))
            text = [a["answer"] for a in answers]
            kinds = Counter(_kind(t, question.answer, synonyms) for t in text)
            assert kinds["exact"] >= 4  # a perfect model scores 100
            normalised = Counter(normalize_answer(t) for t in text).most_common()
            assert normalised[0][0] == question.answer and (len(normalised) == 1 or normalised[1][1] < normalised[0][1])
            seen.update(kinds)
            raws.update(text)
    shares = {k: n / sum(seen.values()) for k, n in seen.items()}
    assert shares["exact"] == pytest.approx(0.6, abs=0.05) and shares["variant"] == pytest.approx(0.15, abs=0.04)
    assert shares["synonym"] == pytest.approx(0.12, abs=0.04) and shares["wrong"] == pytest.approx(0.13, abs=0.04)
    assert {"ankle boot.", "two", "no"} <= raws and raws & {"Ankle boot", "an ankle boot", "ankle-boot", "Two"}
    assert raws & {"boot", "Boot"} and raws & {"1", "3"} and "yes" in raws
    with pytest.raises(vc.CanvasError, match="annotators"):  # exact answers too rare to reach 4 of 10
        vc.annotate(rng, cases[0][0], [7], {"exact": 0.01, "variant": 0, "synonym": 0.5, "wrong": 0.5})


def test_perfect_model_scores_100(small):
    annotations = _load(small.annotations)
    perfect = [{"question_id": a["question_id"], "answer": a["multiple_choice_answer"]}
               for a in annotations["annotations"]]
    assert vqa_accuracy(perfect, annotations)["overall"] == 100.0
    always_yes = [dict(r, answer="yes") for r in perfect]
    assert vqa_accuracy(always_yes, annotations)["overall"] < 50


def _questions(fake_fmnist, images: int, mix=None) -> list:
    source = FashionMNISTSource(fake_fmnist, split="train")
    pools = [np.flatnonzero(source.labels == c) for c in range(10)]
    out = []
    for i in range(images):
        rng = np.random.default_rng([0, 0, i])
        _, items = vc.render(rng, source.images, pools, list(range(10)), 96, 3, (16, 32), (2, 5))
        out += vc.ask(rng, vc.candidate_questions(items, 3, range(10)), 5, mix or vc.DEFAULT_MIX)
    return out


def test_question_mix_and_balance(fake_fmnist):
    asked = _questions(fake_fmnist, 300)
    assert len(asked) == 1500
    types = Counter(q.answer_type for q in asked)
    assert types["yes/no"] / 1500 == pytest.approx(0.35, abs=0.04)
    assert types["number"] / 1500 == pytest.approx(0.25, abs=0.04)
    assert types["other"] / 1500 == pytest.approx(0.40, abs=0.04)
    yes = sum(q.answer == "yes" for q in asked)
    assert yes / types["yes/no"] == pytest.approx(0.5, abs=0.04)
    numbers = Counter(q.answer for q in asked if q.answer_type == "number")
    assert set(numbers) == {"0", "1", "2", "3", "4"} and max(numbers.values()) < 0.4 * types["number"]
    kinds = Counter(q.kind for q in asked if q.answer_type == "other")
    assert set(kinds) == {"position", "largest", "relation"}
    only_numbers = _questions(fake_fmnist, 10, mix={"number": 1.0})
    assert {q.answer_type for q in only_numbers} == {"number"} and len(only_numbers) == 50


def test_deterministic_and_seeded(tmp_path, fake_fmnist):
    for name, count, seed in (("a", 5, 3), ("b", 5, 3), ("c", 3, 3), ("d", 5, 4)):
        vc.generate(tmp_path / name, "test", count, seed=seed, root=fake_fmnist)
    png = {k: [(tmp_path / k / "test" / vc.image_name("test", i)).read_bytes() for i in range(1, 4)] for k in "abcd"}
    ann = {k: _load(vc.split_paths(tmp_path / k, "test")["annotations"])["annotations"] for k in "abcd"}
    assert png["a"] == png["b"] and ann["a"] == ann["b"] and len(set(png["a"])) == 3
    assert png["c"] == png["a"] and ann["c"] == [a for a in ann["a"] if a["image_id"] <= 3]  # image i: own seed
    assert png["d"] != png["a"]
    train = vc.generate(tmp_path / "e", "train", 3, seed=3, root=fake_fmnist)
    assert [(train.images_dir / vc.image_name("train", i)).read_bytes() for i in range(1, 4)] != png["a"]


def test_idempotent_with_manifest(tmp_path, fake_fmnist):
    first = vc.generate(tmp_path, "test", 4, seed=0, root=fake_fmnist)
    png = tmp_path / "test" / vc.image_name("test", 2)
    stamp, data = png.stat().st_mtime_ns, png.read_bytes()
    again = vc.generate(tmp_path, "test", 4, seed=0, root=fake_fmnist)
    assert again.skipped and png.stat().st_mtime_ns == stamp and again.num_questions == first.num_questions
    manifest = _load(tmp_path / "manifest_fmnist_test.json")
    assert manifest["params"]["num_images"] == 4 and set(manifest["params"]["source_sha256"]) == {
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"}
    png.write_bytes(b"damaged")
    assert not vc.generate(tmp_path, "test", 4, seed=0, root=fake_fmnist).skipped and png.read_bytes() == data
    first.annotations.write_text("{}")
    assert not vc.generate(tmp_path, "test", 4, seed=0, root=fake_fmnist).skipped
    fewer = vc.generate(tmp_path, "test", 2, seed=0, root=fake_fmnist)  # other parameters: rewritten, stale removed
    assert not fewer.skipped and sorted(p.name for p in (tmp_path / "test").iterdir()) == [
        vc.image_name("test", 1), vc.image_name("test", 2)]
    other = vc.generate(tmp_path, "test", 2, seed=0, questions_per_image=2, root=fake_fmnist)
    assert not other.skipped and other.num_questions == 4


@pytest.mark.parametrize("kwargs, match", [
    ({"split": "val"}, "split"), ({"scale": (16, 40)}, "scale"), ({"max_items": 10}, "items"),
    ({"mix": {"colour": 1.0}}, "mix"), ({"annotators": {"exact": 0.0}}, "annotators"),
    ({"classes": ["Hat"]}, "'Hat' is neither"), ({"backdrop": "stars"}, "backdrop")])
def test_bad_parameters(tmp_path, fake_fmnist, kwargs, match):
    args = {"split": "train", **kwargs}
    with pytest.raises(vc.CanvasError, match=match):
        vc.generate(tmp_path, args.pop("split"), 2, seed=0, root=fake_fmnist, **args)


def test_plain_background_is_dark_and_recorded(tmp_path, fake_fmnist):
    plain = vc.generate(tmp_path / "plain", "test", 3, seed=0, root=fake_fmnist, backdrop="plain")
    layout = json.loads(plain.layout.read_text())
    manifest = json.loads((tmp_path / "plain" / "manifest_fmnist_test.json").read_text())
    assert manifest["params"]["background"] == "plain"
    for entry in layout["images"]:
        pixels = np.asarray(Image.open(plain.images_dir / entry["file_name"]), dtype=np.float32) / 255
        empty = np.ones(pixels.shape[:2], dtype=bool)  # pixels outside every pasted square
        for item in entry["items"]:
            empty[item["y"]:item["y"] + item["side"], item["x"]:item["x"] + item["side"]] = False
        assert pixels[empty].max() < 0.15 + 5 * 0.02 + 1 / 255  # one dark colour + noise


def test_missing_source_is_one_line(tmp_path):
    with pytest.raises(DataNotFound, match="dataset-fashion-mnist"):
        vc.generate(tmp_path, "train", 2, seed=0, root=tmp_path / "nowhere")


def test_cli(tmp_path, fake_fmnist, capsys):
    args = ["--out", str(tmp_path), "--train-images", "2", "--test-images", "1", "--root", str(fake_fmnist)]
    assert vc.main(args) == 0
    printed = capsys.readouterr().out
    assert "train: 2 images, 10 questions written (yes/no" in printed and "test: 1 images, 5 questions" in printed
    assert (tmp_path / "v2_fmnist_test_annotations.json").is_file()
    assert (tmp_path / "layout_fmnist_train.json").is_file()
    assert vc.main(args) == 0 and "up to date" in capsys.readouterr().out
    assert vc.main(args + ["--classes", "Hat"]) == 2 and "vqa_canvas: classes: 'Hat'" in capsys.readouterr().err
    summary = vc.summarize(tmp_path / "v2_fmnist_train_annotations.json")
    assert summary["questions"] == 10 and sum(summary["answer_types"].values()) == 10


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").is_file(),
                    reason=f"Fashion-MNIST not at {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_test_split(tmp_path):
    done = vc.generate(tmp_path, "test", 20, seed=0)
    summary = vc.summarize(done.annotations)
    assert summary["questions"] == 100 and set(summary["answer_types"]) == {"yes/no", "number", "other"}
    layout = _load(done.layout)
    assert len({it["label"] for im in layout["images"] for it in im["items"]}) >= 8
    assert all(it["size"] >= 0.7 * it["side"] for im in layout["images"] for it in im["items"])  # items fill the square


def test_draw_vqa(tmp_path):
    grey = Image.new("RGB", (96, 96), (128, 128, 128))
    path = tmp_path / "grey.png"
    grey.save(path)
    samples = [{"image": grey, "question": "is there a bag?", "prediction": "yes", "score": 0.91,
                "ground_truth": "yes", "accuracy": 100.0, "answers": ["yes"] * 10},
               {"image": path, "question": "what is the largest item in this rather long question text?",
                "prediction": "coat", "score": 0.4, "ground_truth": "shirt", "accuracy": 0.0},
               {"image": grey, "question": "how many bags are there?", "prediction": "Two", "ground_truth": "2"}]
    out = dv.draw_vqa(samples, tmp_path / "grid.png", columns=2, size=192)
    with Image.open(out) as grid:
        pixels = np.asarray(grid.convert("RGB")).astype(int)
    assert pixels.shape[1] == 2 * (192 + 2 * dv.PAD) and pixels.shape[0] > 2 * 192
    text = pixels[dv.PAD + 192:]  # below the first row's images: text and the second row's grey image
    greenish = (text[..., 1] > 100) & (text[..., 0] < 80) & (text[..., 2] < 80)
    reddish = (text[..., 0] > 150) & (text[..., 1] < 80) & (text[..., 2] < 80)
    assert greenish.any() and reddish.any()
    assert dv._verdict(samples[0]) == dv.RIGHT and dv._verdict(samples[1]) == dv.WRONG
    assert dv._verdict(samples[2]) == dv.WRONG  # no accuracy: compared with the ground truth as written
    assert dv._verdict({"prediction": "x"}) == dv.TEXT
    with pytest.raises(ValueError, match="no samples"):
        dv.draw_vqa([], tmp_path / "none.png")
