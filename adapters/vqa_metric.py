"""The official VQA accuracy (SPEC §9.1), exactly as GT-Vision-Lab/VQA ``vqaEval.py`` computes and prints it.

Reference: ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` (``VQAEval.evaluate``) and ``vqaTools/vqa.py``
(``VQA.loadRes``) at the repository's latest revision (a013f00, "Fixed processing answers bug", 2021). Per annotated
question, in the annotation file's order:

1. Every ground-truth answer and the prediction: ``"\\n"`` and ``"\\t"`` become spaces, then ``strip()``.
2. Only when the 10 ground-truth answers are not all equal (``len(set(answers)) > 1``), the ground-truth answers
   **and the prediction** go through ``processPunctuation`` then ``processDigitArticle``
   (:mod:`florence.data.vqa_answers`). When all annotators agree, nothing is normalised: a unanimous ``"2"`` does not
   match the prediction ``"two"``, nor a unanimous ``"yes"`` the prediction ``"Yes"``. (The SPEC's summary, "the
   prediction always processed, the ground truth only punctuation-processed when annotators disagree", describes the
   revision before a013f00.)
3. For each ground-truth answer dict ``g``: ``acc = min(1, #{o in others : o.answer == prediction} / 3)`` where
   ``others`` are the answer dicts *not equal to* ``g`` (whole-dict comparison: with VQAv2's distinct ``answer_id``
   these are the other 9; two identical dicts would leave each other out). The question's accuracy is the mean of
   the 10 (the "10 choose 9" average): e.g. 3 of 10 annotators giving the prediction -> (7 * 1 + 3 * 2/3) / 10 = 0.9.
4. ``overall`` = mean over questions, ``perAnswerType`` / ``perQuestionType`` = means over each type's questions
   (keys as in the annotations: ``yes/no``, ``number``, ``other``; ``what color is the``, ...), each
   ``round(100 * mean, precision)``; ``per_question``: ``round(100 * acc, precision)``.

Rounding is Python 2's ``round`` (the evaluator is Python 2 code): half away from zero on the exact binary value,
which differs from Python 3's round-half-even only at exact binary halves (97 correct of 800 -> 12.13, where
Python 3 gives 12.12).

Like ``loadRes``, the results (``[{"question_id", "answer"}]``, a list or a JSON file: the EvalAI results format)
must answer exactly the annotated questions: a missing or an unknown question id is a :class:`VQAResultsError`
naming the first ids. A question answered twice keeps its last answer (``loadRes`` indexes by question id).
"""
from __future__ import annotations

import json
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Sequence

from florence.data.vqa_answers import process_digit_article, process_punctuation
from florence.errors import FlorenceError

MAX_IDS = 5  # question ids named in a message


class VQAResultsError(FlorenceError, ValueError):
    """A results, annotation or question file (or list) that cannot be scored; the message names it and the entry."""


def round_half_away(value: float, precision: int = 2) -> float:
    """Python 2's ``round(value, precision)``: the exact binary value rounded half away from zero."""
    quantum = Decimal(1).scaleb(-precision)
    exact = Decimal(value).quantize(quantum, rounding=ROUND_HALF_UP)  # ROUND_HALF_UP is away from zero in decimal
    return float(exact)


def _read_json(source: Any, what: str) -> tuple[Any, str]:
    """``(data, name for messages)`` of a JSON file path, or of data given in memory."""
    if not isinstance(source, (str, Path)):
        return source, what
    path = Path(source)
    if not path.is_file():
        raise VQAResultsError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8")), str(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise VQAResultsError(f"{path}: not valid JSON ({err})") from None


def _first(ids: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in list(ids)[:MAX_IDS])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > MAX_IDS else "")


def _check_annotations(annotations: Any) -> tuple[list[dict], str]:
    data, name = _read_json(annotations, "annotations")
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list) or not anns:
        raise VQAResultsError(f"{name}: expected a VQA annotations object with a non-empty 'annotations' list")
    seen = set()
    for i, ann in enumerate(anns):
        if not isinstance(ann, dict):
            raise VQAResultsError(f"{name}: annotations[{i}]: expected an object, got {ann!r}")
        for key in ("question_id", "question_type", "answer_type", "answers"):
            if key not in ann:
                raise VQAResultsError(f"{name}: annotations[{i}]: missing key {key!r}")
        answers = ann["answers"]
        if not isinstance(answers, list) or not answers or not all(
                isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
            raise VQAResultsError(f"{name}: annotations[{i}] (question {ann['question_id']}): 'answers' must be a "
                                  f"non-empty list of {{'answer': str, ...}}")
        if ann["question_id"] in seen:
            raise VQAResultsError(f"{name}: annotations[{i}]: question id {ann['question_id']} appears twice")
        seen.add(ann["question_id"])
    return anns, name


def _check_results(results: Any, annotated: list[int]) -> dict[int, str]:
    """Question id -> answer, the last one where a question is answered twice (``loadRes``)."""
    data, name = _read_json(results, "results")
    if not isinstance(data, list):
        raise VQAResultsError(f"{name}: results is not an array of objects")
    answers: dict[int, str] = {}
    for i, res in enumerate(data):
        if not isinstance(res, dict) or "question_id" not in res or not isinstance(res.get("answer"), str):
            raise VQAResultsError(f"{name}: results[{i}]: expected {{'question_id': int, 'answer': str}}, got {res!r}")
        answers[res["question_id"]] = res["answer"]
    missing = [q for q in annotated if q not in answers]
    unknown = sorted(set(answers) - set(annotated), key=str)
    if missing:
        raise VQAResultsError(f"{name}: no answer for {len(missing)} of the {len(annotated)} annotated questions "
                              f"(first question ids: {_first(missing)})")
    if unknown:
        raise VQAResultsError(f"{name}: {len(unknown)} answers for question ids that are not in the annotations "
                              f"(first: {_first(unknown)})")
    return answers


def _check_questions(questions: Any, annotated: list[int]) -> None:
    data, name = _read_json(questions, "questions")
    entries = data.get("questions") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise VQAResultsError(f"{name}: expected a VQA questions object with a 'questions' list")
    known = {q.get("question_id") for q in entries if isinstance(q, dict)}
    stray = [q for q in annotated if q not in known]
    if stray:
        raise VQAResultsError(f"{name}: {len(stray)} annotated questions are not in this questions file (first "
                              f"question ids: {_first(stray)}): annotations and questions of different splits?")


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def question_accuracy(prediction: str, gt_answers: list[dict]) -> float:
    """One question's accuracy in [0, 1] (steps 1-3 of the module docstring); ``gt_answers``: the annotation's
    ``answers`` dicts (not modified)."""
    gts = [dict(a, answer=_clean(a["answer"])) for a in gt_answers]
    prediction = _clean(prediction)
    if len({g["answer"] for g in gts}) > 1:  # annotators disagree: normalise both sides
        for g in gts:
            g["answer"] = process_digit_article(process_punctuation(g["answer"]))
        prediction = process_digit_article(process_punctuation(prediction))
    accs = []
    for g in gts:
        others = [o for o in gts if o != g]
        accs.append(min(1, float(sum(o["answer"] == prediction for o in others)) / 3))
    return float(sum(accs)) / len(accs)


def vqa_accuracy(results: Any, annotations: Any, questions: Any = None, *, precision: int = 2) -> dict[str, Any]:
    """The official VQA accuracy of ``results`` (module docstring), in percent.

    Args:
        results: ``[{"question_id", "answer"}]`` or the path of such a JSON file (EvalAI format).
        annotations: a VQAv2 annotations object (``{"annotations": [{"question_id", "question_type", "answer_type",
            "answers": [{"answer", ...}] * 10, ...}]}``) or its path; the questions scored are exactly these.
        questions: optionally the matching questions object or path (``loadRes`` reads it only for metadata that
            does not affect the scores); given, every annotated question must be in it.
        precision: decimals of the printed numbers (``VQAEval(n=2)``).

    Returns:
        ``{"overall", "perAnswerType": {type: acc}, "perQuestionType": {type: acc}, "per_question": {question_id:
        acc}, "num_questions"}``.
    """
    anns, _ = _check_annotations(annotations)
    annotated = [ann["question_id"] for ann in anns]
    answers = _check_results(results, annotated)
    if questions is not None:
        _check_questions(questions, annotated)
    overall: list[float] = []
    by_answer_type: dict[str, list[float]] = {}
    by_question_type: dict[str, list[float]] = {}
    per_question: dict[int, float] = {}
    for ann in anns:
        acc = question_accuracy(answers[ann["question_id"]], ann["answers"])
        overall.append(acc)
        by_answer_type.setdefault(ann["answer_type"], []).append(acc)
        by_question_type.setdefault(ann["question_type"], []).append(acc)
        per_question[ann["question_id"]] = round_half_away(100 * acc, precision)

    def mean(accs: list[float]) -> float:
        return round_half_away(100 * float(sum(accs)) / len(accs), precision)

    return {"overall": mean(overall),
            "perAnswerType": {k: mean(v) for k, v in by_answer_type.items()},
            "perQuestionType": {k: mean(v) for k, v in by_question_type.items()},
            "per_question": per_question,
            "num_questions": len(anns)}
