"""The official VQA accuracy (florence.adapters.vqa_metric) and the evaluator's normalisation
(florence.data.vqa_answers): every expected number is worked by hand in the comments, following GT-Vision-Lab/VQA
vqaEval.py (latest revision): prediction and ground truth are normalised only when the annotators disagree; each
of the 10 answers is left out in turn, acc = min(1, matches among the other 9 / 3), averaged."""
from __future__ import annotations

import json

import pytest

from florence.adapters.vqa_metric import VQAResultsError, question_accuracy, round_half_away, vqa_accuracy
from florence.data.vqa_answers import normalize_answer, process_digit_article, process_punctuation
from florence.errors import FlorenceError


def answers(*groups: tuple[str, int], ids: bool = True) -> list[dict]:
    """10 annotator answers, e.g. answers(("red", 3), ("blue", 7)); VQAv2 gives each a distinct answer_id."""
    flat = [a for a, n in groups for _ in range(n)]
    assert len(flat) == 10
    if not ids:
        return [{"answer": a} for a in flat]
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(flat)]


def ann(qid: int, gt: list[dict], answer_type: str = "other", question_type: str = "what is") -> dict:
    return {"question_id": qid, "image_id": qid // 10, "question_type": question_type, "answer_type": answer_type,
            "multiple_choice_answer": gt[0]["answer"] if gt else "", "answers": gt}


def accuracy(prediction: str, gt: list[dict]) -> float:
    return vqa_accuracy([{"question_id": 1, "answer": prediction}], {"annotations": [ann(1, gt)]})["overall"]


# --- the normalisation steps --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("yes.", "yes"),  # a period not followed by a digit is deleted
    ("5.", "5"),  # ... even after a digit: the look-behind of the official regex is malformed
    ("2.5", "2.5"),  # followed by a digit: kept
    ("t-shirt", "t shirt"),  # not next to a space: replaced by a space
    ("red, white", "red white"),  # "," next to a space: every "," deleted
    ("red,white", "red white"),  # not next to a space, no digit-comma-digit: replaced by a space
    ("1,000", "1000"),  # a digit-comma-digit run: every punctuation mark deleted
    ("what?", "what "),  # "?" replaced by a space (the split in processDigitArticle drops it later)
    ("it's", "it's"),  # the apostrophe is not in the list (it was before the 2021 revision)
    ("10:30", "10:30"),  # nor the colon
    # each mark is judged on the input: "(" not next to a space -> " "; ")" in ") " -> deleted; "!" -> " "
    ("(left) side!", " left side "),
])
def test_process_punctuation_by_hand(text, expected):
    assert process_punctuation(text) == expected


def test_period_strip_deletes_at_most_32_periods():
    # the official call passes re.UNICODE (= 32) as re.sub's count: 40 periods -> 8 survive
    assert process_punctuation("." * 40 + "x") == "." * 8 + "x"


@pytest.mark.parametrize("text, expected", [
    ("Two Dogs", "2 dogs"),  # lower-case, number words -> digits
    ("None", "0"),
    ("ten", "10"),
    ("eleven", "eleven"),  # the map stops at ten
    ("the dog", "dog"),  # articles dropped
    ("an apple a day", "apple day"),
    ("dont know", "don't know"),  # contraction table
    ("youre  right", "you're right"),  # whitespace runs collapse
    ("Im", "im"),  # the table's capitalised keys ("Im" -> "I'm") never match after lower-casing
])
def test_process_digit_article_by_hand(text, expected):
    assert process_digit_article(text) == expected


def test_meter_normalize_answer_chains_both_steps():
    assert normalize_answer("Two.") == "2"
    assert normalize_answer("A T-Shirt") == "t shirt"
    assert normalize_answer("1,000") == "1000"


# --- one question -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("matching, expected", [
    # s of 10 annotators gave the prediction: each of those s leaves itself out (s - 1 matches among the other 9),
    # each of the other 10 - s sees all s; acc = mean of min(1, matches / 3).
    (0, 0.0),
    (1, 30.0),  # (1 * 0 + 9 * 1/3) / 10 = 0.3
    (2, 60.0),  # (2 * 1/3 + 8 * 2/3) / 10 = 18/30 = 0.6
    (3, 90.0),  # (3 * 2/3 + 7 * 1) / 10 = 0.9
    (4, 100.0),  # (4 * 1 + 6 * 1) / 10 = 1
])
def test_annotator_disagreement_is_the_10_choose_9_average(matching, expected):
    gt = answers(("red", matching), ("blue", 10 - matching)) if matching else answers(("blue", 10))
    assert accuracy("red", gt) == expected


def test_punctuation_and_case_when_annotators_disagree():
    gt = answers(("yes.", 5), ("yes", 5))  # disagree -> both normalised: all 10 become "yes"
    assert accuracy("Yes", gt) == 100.0  # the prediction is normalised too: "yes", 9 matches for every answer
    assert accuracy("yes!", gt) == 100.0  # "!" -> " " -> "yes"


def test_apostrophe_survives():
    gt = answers(("it's", 2), ("it is", 8))
    # "it's" stays "it's": (2 * 1/3 + 8 * 2/3) / 10 = 0.6; with the apostrophe deleted (the pre-2021 list) the
    # prediction "it's" would become "it s" and match nothing
    assert accuracy("it's", gt) == 60.0


def test_number_words():
    gt = answers(("2", 4), ("two", 3), ("Two", 3))  # disagree -> all "2"
    assert accuracy("two", gt) == 100.0
    assert accuracy("2", gt) == 100.0
    assert accuracy("three", gt) == 0.0


def test_articles():
    gt = answers(("a dog", 3), ("dog", 3), ("the dog", 2), ("cat", 2))  # -> 8 "dog", 2 "cat"
    assert accuracy("A dog", gt) == 100.0  # every answer sees >= 7 "dog" among the other 9
    # "cat": each "dog" answer sees 2 -> 2/3, each "cat" answer sees 1 -> 1/3: (8 * 2/3 + 2 * 1/3) / 10 = 0.6
    assert accuracy("cat", gt) == 60.0


def test_contractions():
    gt = answers(("don't know", 2), ("dont know", 1), ("no", 7))  # -> 3 "don't know", 7 "no"
    # "dont know" -> "don't know": the 3 see 2 each -> 2/3, the 7 see 3 -> 1: (3 * 2/3 + 7) / 10 = 0.9
    assert accuracy("dont know", gt) == 90.0


def test_unanimous_answers_are_not_normalised_and_neither_is_the_prediction():
    # all 10 equal -> no processing on either side (only "\n"/"\t" -> " " and strip)
    assert accuracy("yes", answers(("yes", 10))) == 100.0
    assert accuracy(" yes\n", answers(("yes", 10))) == 100.0
    assert accuracy("Yes", answers(("yes", 10))) == 0.0  # normalising everything would give 100
    assert accuracy("yes", answers(("Yes", 10))) == 0.0  # normalising everything would give 100
    assert accuracy("2", answers(("two", 10))) == 0.0
    assert accuracy("two", answers(("two", 10))) == 100.0
    # one disagreeing annotator switches normalisation on: "Yes" x 9 + "yes" -> all "yes", prediction "yes"
    assert accuracy("yes", answers(("Yes", 9), ("yes", 1))) == 100.0


def test_others_are_the_answer_dicts_not_equal_to_the_left_out_one():
    # without answer_id, the 3 "red" dicts are equal: leaving one out leaves all 3 out (the official
    # `item != gtAnsDatum`). Each "red" sees 0 reds among its "others", each "blue" sees 3 -> (3 * 0 + 7 * 1) / 10
    gt = answers(("red", 3), ("blue", 7), ids=False)
    assert accuracy("red", gt) == 70.0
    assert accuracy("red", answers(("red", 3), ("blue", 7))) == 90.0  # distinct ids: the usual 0.9
    assert question_accuracy("red", gt) == pytest.approx(0.7)
    assert gt[0] == {"answer": "red"}  # the input is not modified


# --- aggregation, rounding, files ---------------------------------------------------------------------------------


def test_per_answer_type_and_question_type_means_rounded_to_2_decimals():
    anns = [ann(10, answers(("yes", 10)), "yes/no", "is the"),  # "yes" -> 1
            ann(11, answers(("yes", 1), ("no", 9)), "yes/no", "is the"),  # "yes": 1 of 10 -> 0.3
            ann(20, answers(("2", 2), ("3", 8)), "number", "how many"),  # "2": 2 of 10 -> 0.6
            ann(30, answers(("red", 3), ("blue", 7)), "other", "what color is the"),  # "red": 3 of 10 -> 0.9
            ann(31, answers(("car", 10)), "other", "what is"),  # "bus" -> 0
            ann(32, answers(("car", 1), ("bus", 9)), "other", "what is"),  # "car" -> 0.3
            ann(33, answers(("car", 10)), "other", "what is")]  # "car" -> 1
    results = [{"question_id": 10, "answer": "yes"}, {"question_id": 11, "answer": "yes"},
               {"question_id": 20, "answer": "2"}, {"question_id": 30, "answer": "red"},
               {"question_id": 31, "answer": "bus"}, {"question_id": 32, "answer": "car"},
               {"question_id": 33, "answer": "car"}]
    out = vqa_accuracy(results, {"annotations": anns})
    # overall: (1 + .3 + .6 + .9 + 0 + .3 + 1) / 7 = 4.1 / 7 = 0.585714... -> 58.57
    assert out["overall"] == 58.57
    # yes/no (1 + .3) / 2 = 65; number 60; other (.9 + 0 + .3 + 1) / 4 = 2.2 / 4 = 55
    assert out["perAnswerType"] == {"yes/no": 65.0, "number": 60.0, "other": 55.0}
    # "what is": (0 + .3 + 1) / 3 = 0.43333... -> 43.33
    assert out["perQuestionType"] == {"is the": 65.0, "how many": 60.0, "what color is the": 90.0, "what is": 43.33}
    assert out["per_question"] == {10: 100.0, 11: 30.0, 20: 60.0, 30: 90.0, 31: 0.0, 32: 30.0, 33: 100.0}
    assert out["num_questions"] == 7


def test_rounding_is_python2_half_away_from_zero():
    # 97 of 800 questions right: 100 * 97 / 800 = 12.125 exactly in binary -> Python 2's round gives 12.13
    # (the evaluator is Python 2 code); Python 3's round-half-even would give 12.12
    anns = [ann(q, answers(("yes", 10)), "yes/no") for q in range(800)]
    results = [{"question_id": q, "answer": "yes" if q < 97 else "no"} for q in range(800)]
    assert vqa_accuracy(results, {"annotations": anns})["overall"] == 12.13
    assert round_half_away(12.125) == 12.13 and round(12.125, 2) == 12.12
    assert round_half_away(2.675) == 2.67  # 2.675 is 2.67499999... in binary: no half, as Python 2 too
    assert round_half_away(100 * 2 / 3) == 66.67


def test_files_and_duplicate_results(tmp_path):
    anns = {"annotations": [ann(1, answers(("red", 3), ("blue", 7))), ann(2, answers(("no", 10)), "yes/no")]}
    questions = {"questions": [{"question_id": 1, "image_id": 0, "question": "what?"},
                               {"question_id": 2, "image_id": 0, "question": "is it?"}]}
    results = [{"question_id": 1, "answer": "blue"}, {"question_id": 2, "answer": "no"},
               {"question_id": 1, "answer": "red"}]  # answered twice: the last answer counts (loadRes)
    for name, obj in (("a.json", anns), ("q.json", questions), ("r.json", results)):
        (tmp_path / name).write_text(json.dumps(obj))
    out = vqa_accuracy(tmp_path / "r.json", tmp_path / "a.json", tmp_path / "q.json")
    assert out["per_question"] == {1: 90.0, 2: 100.0} and out["overall"] == 95.0


def test_results_must_answer_exactly_the_annotated_questions(tmp_path):
    anns = {"annotations": [ann(q, answers(("no", 10))) for q in (1, 2, 3)]}
    with pytest.raises(VQAResultsError, match=r"no answer for 2 of the 3 annotated questions \(first question ids: "
                                              r"2, 3\)"):
        vqa_accuracy([{"question_id": 1, "answer": "no"}], anns)
    full = [{"question_id": q, "answer": "no"} for q in (1, 2, 3)]
    with pytest.raises(VQAResultsError, match=r"1 answers for question ids that are not in the annotations "
                                              r"\(first: 9\)"):
        vqa_accuracy(full + [{"question_id": 9, "answer": "no"}], anns)
    with pytest.raises(VQAResultsError, match=r"results\[1\]: expected"):
        vqa_accuracy([full[0], {"question_id": 2}], anns)
    with pytest.raises(VQAResultsError, match="not an array"):
        vqa_accuracy({"question_id": 1}, anns)
    with pytest.raises(FlorenceError, match="results file not found"):
        vqa_accuracy(tmp_path / "missing.json", anns)
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(VQAResultsError, match="bad.json: not valid JSON"):
        vqa_accuracy(tmp_path / "bad.json", anns)
    broken = {"annotations": [{"question_id": 1, "question_type": "what is", "answers": answers(("no", 10))}]}
    with pytest.raises(VQAResultsError, match=r"annotations\[0\]: missing key 'answer_type'"):
        vqa_accuracy(full[:1], broken)
    with pytest.raises(VQAResultsError, match="question id 1 appears twice"):
        vqa_accuracy(full[:1], {"annotations": [ann(1, answers(("no", 10)))] * 2})
    with pytest.raises(VQAResultsError, match=r"annotations\[0\] \(question 1\): 'answers' must be a non-empty"):
        vqa_accuracy(full[:1], {"annotations": [ann(1, [])]})
    with pytest.raises(VQAResultsError, match=r"3 annotated questions are not in this questions file"):
        vqa_accuracy(full, anns, {"questions": []})
