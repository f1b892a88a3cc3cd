"""``florence eval vqa``, ``florence vqa``, the shared prediction loop (``florence.adapters.vqa_eval``) and the VQA
section of ``florence report``.

Scoring a results file is checked against accuracies worked out by hand from the official definition (GT-Vision-Lab
vqaEval.py at its latest revision a013f00: per question the mean over the 10 annotators of min(1, matches among the
other 9 / 3); only when the annotators disagree are the answers and the prediction normalised: lower-cased, periods
and articles removed, number words as digits). Model paths run a tiny METER model on a few generated images."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import florence
from florence.adapters.vqa_eval import flat_vqa_metrics, predict_vqa
from florence.benchmarks import eval_cli, paper, report, vqa_cli, vqa_predict
from florence.data.vqa import VQADataset
from florence.tokenizer import train_bpe_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread_module")

# (question_id, image_id, question, question_type, answer_type, the 10 annotators' answers, our prediction,
#  its accuracy worked out by hand)
CASES = [
    (11, 1, "is there a bag?", "is there a", "yes/no", ["yes"] * 10, "yes", 1.0),  # 9 matches for each annotator
    (12, 1, "is there a coat?", "is there a", "yes/no", ["no"] * 10, "yes", 0.0),
    (13, 1, "is there a shirt?", "is there a", "yes/no", ["yes"] * 10, "Yes", 0.0),  # unanimous: not lower-cased
    # "two" -> "2": each "2" annotator sees 1 other match (1/3), each "3" annotator 2 (2/3): (2/3 + 8 * 2/3) / 10
    (21, 2, "how many bags are there?", "how many", "number", ["2"] * 2 + ["3"] * 8, "two", 0.6),
    # "a sandal." -> "sandal": >= 6 matches among the other 9 for every annotator
    (22, 2, "what is in the top left corner?", "what is in the", "other", ["sandal"] * 7 + ["bag"] * 3, "a sandal.",
     1.0),
    # one annotator agrees: 0 for that one, 1/3 for each of the 9 others: 9 * 1/3 / 10
    (31, 3, "what is the largest item?", "what is the", "other", ["ankle boot"] + ["sneaker"] * 9, "ankle boot", 0.3),
]
# overall (1 + 0 + 0 + .6 + 1 + .3) / 6 = .48333; yes/no 1 / 3; number .6; other (1 + .3) / 2
EXPECTED = {"overall": 48.33, "perAnswerType": {"yes/no": 33.33, "number": 60.0, "other": 65.0},
            "perQuestionType": {"is there a": 33.33, "how many": 60.0, "what is in the": 100.0, "what is the": 30.0}}


def _write_vqa(root: Path, subtype: str = "toy_val") -> tuple[Path, Path, Path]:
    """VQAv2-format questions, annotations and (hand-made) results files for CASES."""
    root.mkdir(parents=True, exist_ok=True)
    questions = {"info": {}, "task_type": "Open-Ended", "data_type": "toy", "data_subtype": subtype, "license": {},
                 "questions": [{"image_id": img, "question": q, "question_id": qid}
                               for qid, img, q, *_ in CASES]}
    annotations = {"annotations": [
        {"question_id": qid, "image_id": img, "question_type": qtype, "answer_type": atype,
         "multiple_choice_answer": max(set(answers), key=answers.count),
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}
        for qid, img, _, qtype, atype, answers, *_ in CASES]}
    results = [{"question_id": qid, "answer": pred} for qid, *_, pred, _ in CASES]
    paths = root / f"v2_OpenEnded_{subtype}_questions.json", root / f"v2_{subtype}_annotations.json", root / "res.json"
    for path, data in zip(paths, (questions, annotations, results)):
        path.write_text(json.dumps(data))
    return paths


@pytest.fixture()
def toy(tmp_path) -> tuple[Path, Path, Path]:
    return _write_vqa(tmp_path / "data")


def _score(args: list[str], capsys) -> tuple[int, str, str]:
    code = vqa_cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- scoring a results file -----------------------------------------------------------------------------------------

def test_scoring_a_results_file_matches_the_hand_worked_accuracies(toy, tmp_path, capsys):
    questions, annotations, results = toy
    out = tmp_path / "out"
    code, stdout, _ = _score(["--predictions", str(results), "--questions", str(questions), "--annotations",
                              str(annotations), "--output", str(out)], capsys)
    assert code == 0
    result = json.loads((out / "vqa_toy_val.json").read_text())  # name: the questions file without its affixes
    metrics = result["metrics"]
    assert metrics["overall"] == pytest.approx(EXPECTED["overall"], abs=1e-9)
    for key in ("perAnswerType", "perQuestionType"):
        assert metrics[key] == pytest.approx(EXPECTED[key], abs=1e-9), key
    assert metrics["num_questions"] == 6 and "per_question" not in metrics
    # provenance, as the other evaluations carry it
    assert result["task"] == "vqa" and result["dataset"] == "toy_val"
    assert result["protocol"] == vqa_cli.PROTOCOL_ID and result["metrics_unit"] == "percent"
    assert result["model"]["predictions"] == str(results) and len(result["model"]["sha256"]) == 64
    assert result["data"]["annotations"] == str(annotations) and len(result["data"]["annotations_sha256"]) == 64
    assert len(result["data"]["questions_sha256"]) == 64
    assert {"torch", "python"} <= set(result["versions"]) and result["created"].endswith("Z")
    assert "overall 48.33% (yes/no 33.33, number 60.00, other 65.00) on 6 questions" in stdout


def test_eval_cli_dispatches_vqa(toy, tmp_path, capsys):
    questions, annotations, results = toy
    assert eval_cli.main(["vqa", "--predictions", str(results), "--annotations", str(annotations), "--output",
                          str(tmp_path), "--name", "dispatched"]) == 0
    assert json.loads((tmp_path / "vqa_dispatched.json").read_text())["metrics"]["overall"] == pytest.approx(48.33)
    assert "overall 48.33%" in capsys.readouterr().out


def _one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("florence eval vqa: "), err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize("mutate, needles", [
    (lambda r: r[:-1], ["no answer for 1 of the 6 annotated questions", "first question ids: 31"]),
    (lambda r: r + [{"question_id": 99, "answer": "yes"}], ["1 answers for question ids that are not in", "99"]),
    (lambda r: [{"question_id": 11, "answer": 3}] + r[1:], ["results[0]: expected"]),
    (lambda r: {"results": r}, ["not an array"]),
])
def test_bad_results_files_are_one_line_errors(toy, tmp_path, capsys, mutate, needles):
    _, annotations, results = toy
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(mutate(json.loads(results.read_text()))))
    code, _, err = _score(["--predictions", str(bad), "--annotations", str(annotations), "--output",
                           str(tmp_path)], capsys)
    _one_line_error(code, err, "bad.json", *needles)


def test_bad_options_and_missing_files_are_one_line_errors(toy, tmp_path, capsys):
    questions, annotations, results = toy
    out = ["--output", str(tmp_path)]
    _one_line_error(*_score(["--predictions", str(tmp_path / "nope.json"), "--annotations", str(annotations), *out],
                            capsys)[::2], "nope.json", "not found")
    _one_line_error(*_score(["--predictions", str(results), "--annotations", str(tmp_path / "ann.json"), *out],
                            capsys)[::2], "ann.json", "not found")
    (tmp_path / "broken.json").write_text("{not json")
    _one_line_error(*_score(["--predictions", str(results), "--annotations", str(tmp_path / "broken.json"), *out],
                            capsys)[::2], "broken.json", "not valid JSON")
    other = _write_vqa(tmp_path / "other", "toy_test")[0]
    json.dump({"questions": []}, other.open("w"))
    _one_line_error(*_score(["--predictions", str(results), "--annotations", str(annotations), "--questions",
                             str(other), *out], capsys)[::2], "6 annotated questions are not in this questions file")
    _one_line_error(*_score(["--predictions", str(results), "--questions", str(questions), *out], capsys)[::2],
                    "--predictions needs --annotations")
    _one_line_error(*_score(["--predictions", str(results), "--model", "m", "--annotations", str(annotations), *out],
                            capsys)[::2], "not both")
    _one_line_error(*_score(["--questions", str(questions), "--annotations", str(annotations), *out], capsys)[::2],
                    "--model")
    _one_line_error(*_score(["--model", "m", "--annotations", str(annotations), *out], capsys)[::2], "--questions")


def test_default_names():
    assert vqa_cli.default_name("data/v2_OpenEnded_mscoco_val2014_questions.json") == "mscoco_val2014"
    assert vqa_cli.default_name("v2_mscoco_val2014_annotations.json") == "mscoco_val2014"
    assert vqa_cli.default_name("my_questions.json") == "my"


# -- the report -----------------------------------------------------------------------------------------------------

def test_paper_table_8_has_the_spec_values():
    assert paper.VQA["Florence"] == (80.16, 80.36) and paper.VQA["SimVLM"] == (80.03, 80.34)
    assert paper.VQA["METER (CLIP-ViT-B/16 + RoBERTa)"] == (77.68, 77.64) and paper.VQA["UNITER"] == (73.82, 74.02)
    assert len(paper.VQA) == 11
    assert paper.reference_rows("vqa", "mscoco_minival", "overall")[0] == ("Florence", 80.16)
    assert paper.reference_rows("vqa", "fashion_mnist_meter", "overall") == []  # not VQAv2: no paper number
    assert paper.reference_rows("vqa", "mscoco_val2014", "yes/no") == []


def test_report_shows_vqa_beside_table_8(toy, tmp_path, capsys):
    questions, annotations, results = toy
    results_dir = tmp_path / "results"
    for name in ("fashion_mnist_meter", "mscoco_minival"):
        assert vqa_cli.main(["--predictions", str(results), "--annotations", str(annotations), "--output",
                             str(results_dir), "--name", name]) == 0
    zeroshot = {"task": "zeroshot", "dataset": "cifar10", "protocol": "p", "metrics": {"top1": 0.9},
                "model": {"path": "runs/m", "sha256": "ab" * 32}}
    (results_dir / "zeroshot_cifar10.json").write_text(json.dumps(zeroshot))
    capsys.readouterr()
    assert report.main([str(results_dir)]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert any(line.startswith("| zeroshot | cifar10 | top1 | 90.00 | 94.60 |") for line in rows)
    assert not any(line.startswith("| vqa |") for line in rows)  # not in the general table (already percent)
    fmnist = next(line for line in rows if line.startswith("| fashion_mnist_meter |"))
    assert fmnist.startswith("| fashion_mnist_meter | 6 | 48.33 | 33.33 | 60.00 | 65.00 | – | – |")
    minival = next(line for line in rows if line.startswith("| mscoco_minival |"))
    assert "| 48.33 | 33.33 | 60.00 | 65.00 | 80.16 | -31.83 |" in minival
    assert "Florence 80.16 / 80.36" in text and "METER (CLIP-ViT-B/16 + RoBERTa) 77.68 / 77.64" in text
    assert "res.json" in text  # the scored file stands for the model
    # VQA results alone: just their table
    only = tmp_path / "only"
    only.mkdir()
    (only / "a.json").write_text((results_dir / "vqa_mscoco_minival.json").read_text())
    assert report.main([str(only)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("VQA, official VQA accuracy (%):") and "| task |" not in text


# -- a tiny METER model end to end ----------------------------------------------------------------------------------

ANSWERS = ["yes", "no", "2", "3", "sandal", "bag", "ankle boot", "sneaker"]


@pytest.fixture(scope="module")
def meter_bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("meter")
    texts = [q for _, _, q, *_ in CASES] + ["what is left of the sandal?", "a photo of a bag."]
    train_bpe_tokenizer(texts * 3, root / "tok", vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    dual = florence.create_model("unicl_test", tokenizer=str(root / "tok")).save_pretrained(root / "dual")
    fusion = {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64}
    preprocess = {"input_size": [3, 64, 64], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic",
                  "crop_pct": 1.0}
    model = florence.create_model("meter_coswin_test", backbone=dual, answers=ANSWERS,
                                  heads=["vqa"], fusion=fusion, preprocess=preprocess, max_text_len=12)
    return model.save_pretrained(root / "model")


@pytest.fixture(scope="module")
def toy_images(tmp_path_factory) -> tuple[Path, Path, Path]:
    """CASES with three 40x40 PNG images (COCO-style names) in ``images/``."""
    root = tmp_path_factory.mktemp("toy")
    questions, annotations, _ = _write_vqa(root)
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for image_id in (1, 2, 3):
        pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"COCO_toy_val_{image_id:012d}.png")
    return questions, annotations, root / "images"


def test_eval_with_a_model_writes_results_metrics_and_pictures(meter_bundle, toy_images, tmp_path, capsys):
    questions, annotations, images = toy_images
    out = tmp_path / "out"
    assert vqa_cli.main(["--model", str(meter_bundle), "--questions", str(questions), "--annotations",
                         str(annotations), "--images", str(images), "--output", str(out), "--batch-size", "2",
                         "--pictures", "3", "--quiet"]) == 0
    stdout = capsys.readouterr().out
    result = json.loads((out / "vqa_toy_val.json").read_text())
    results = json.loads((out / "vqa_toy_val_results.json").read_text())
    assert [r["question_id"] for r in results] == [c[0] for c in CASES]
    assert all(set(r) == {"question_id", "answer"} and r["answer"] in ANSWERS for r in results)
    assert result["metrics"]["num_questions"] == 6 and 0.0 <= result["metrics"]["overall"] <= 100.0
    assert set(result["metrics"]["perAnswerType"]) == {"yes/no", "number", "other"}
    assert result["model"]["path"] == str(meter_bundle) and len(result["model"]["sha256"]) == 64
    assert result["model"]["num_answers"] == len(ANSWERS) and result["data"]["num_questions"] == 6
    assert result["bad_samples"]["skipped"] == 0 and result["results"] == str(out / "vqa_toy_val_results.json")
    assert Path(result["pictures"][0]).is_file() and "vqa toy_val: overall" in stdout
    # the written results file scores the same without the model
    assert vqa_cli.main(["--predictions", str(out / "vqa_toy_val_results.json"), "--annotations", str(annotations),
                         "--output", str(out), "--name", "rescored"]) == 0
    assert json.loads((out / "vqa_rescored.json").read_text())["metrics"] == result["metrics"]


def test_eval_without_annotations_writes_only_the_results_file(meter_bundle, toy_images, tmp_path, capsys):
    questions, _, images = toy_images
    out = tmp_path / "out"
    assert vqa_cli.main(["--model", str(meter_bundle), "--questions", str(questions), "--images", str(images),
                         "--output", str(out), "--max-questions", "3", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["vqa_toy_val_results.json"]
    assert len(json.loads((out / "vqa_toy_val_results.json").read_text())) == 3
    assert "EvalAI" in capsys.readouterr().out


def test_unreadable_and_missing_images_are_left_out_and_reported(meter_bundle, toy_images, tmp_path, capsys):
    questions, annotations, images = toy_images
    broken = tmp_path / "images"
    broken.mkdir()
    (broken / "COCO_toy_val_000000000002.png").write_bytes((images / "COCO_toy_val_000000000002.png").read_bytes())
    (broken / "COCO_toy_val_000000000003.png").write_bytes(b"not a png")  # image 1 is missing
    out = tmp_path / "out"
    assert vqa_cli.main(["--model", str(meter_bundle), "--questions", str(questions), "--annotations",
                         str(annotations), "--images", str(broken), "--output", str(out), "--quiet"]) == 0
    result = json.loads((out / "vqa_toy_val.json").read_text())
    assert result["bad_samples"]["skipped"] == 1 and result["metrics"]["num_questions"] == 2  # 31 unreadable
    assert result["bad_samples"]["dataset"]["counts"] == {"missing image file": 3}  # 11, 12, 13
    assert [r["question_id"] for r in json.loads((out / "vqa_toy_val_results.json").read_text())] == [21, 22]
    stdout = capsys.readouterr().out
    assert "COCO_toy_val_000000000003.png" in stdout and "missing image file: 3" in stdout


def test_predict_vqa_top_k_and_florence_vqa_agree(meter_bundle, toy_images, capsys):
    questions, annotations, images = toy_images
    model = florence.from_pretrained(meter_bundle)
    top = predict_vqa(model, VQADataset(questions, annotations, images), batch_size=4, k=3)
    assert [p["question_id"] for p in top] == [c[0] for c in CASES]
    for p in top:
        assert len(p["answers"]) == 3 and p["answers"][0] == p["answer"] and p["scores"][0] == p["score"]
        assert p["scores"] == sorted(p["scores"], reverse=True) and all(0.0 <= s <= 1.0 for s in p["scores"])
    # the same image and question through `florence vqa`: the same answers and scores
    image = images / "COCO_toy_val_000000000002.png"
    assert vqa_predict.main(["--model", str(meter_bundle), str(image), CASES[3][2], CASES[4][2], "--top-k", "3",
                             "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    for case, answered in zip((top[3], top[4]), printed["predictions"]):
        assert [a["answer"] for a in answered["answers"]] == case["answers"]
        assert [a["score"] for a in answered["answers"]] == pytest.approx(case["scores"], abs=1e-4)
    assert vqa_predict.main(["--model", str(meter_bundle), str(image), "is there a bag?"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 + 5  # the question, then the default top 5
    assert vqa_predict.main(["--model", str(meter_bundle), str(image.with_name("missing.png")), "why?"]) == 2
    assert "missing.png" in capsys.readouterr().err


def test_flat_metrics_for_metrics_jsonl():
    metrics = {"overall": 48, "perAnswerType": {"other": 65.0, "yes/no": 33.33}, "perQuestionType": {"how many": 1.0},
               "num_questions": 6}
    flat = flat_vqa_metrics(metrics)
    assert flat == {"overall": 48.0, "yes/no": 33.33, "other": 65.0}  # no number questions: no number key
    assert all(isinstance(v, float) for v in flat.values())


def test_florence_vqa_rejects_a_bundle_without_a_vqa_head(tmp_path, capsys):
    torch.manual_seed(0)
    bundle = florence.create_model("coswin_test").save_pretrained(tmp_path / "tower")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    assert vqa_predict.main(["--model", str(bundle), str(tmp_path / "x.png"), "what?"]) == 2
    assert "not a VQA model" in capsys.readouterr().err
