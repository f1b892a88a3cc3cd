"""VQA inference over a VQAv2-format dataset and scoring with the official VQA accuracy (SPEC §9.1).

- ``predict_vqa(model, dataset, k=...)``: a METER model's top-``k`` answers (``MeterModel.answer``: sigmoid
  probabilities of the VQA logits) for every question whose image is readable, in dataset order.
- ``evaluate_vqa(model, questions, annotations, images, ...)``: predictions, the EvalAI results list
  ``[{"question_id", "answer"}]`` (the top answer) and, with annotations, the official accuracy
  (``florence.adapters.vqa_metric.vqa_accuracy``: overall, per answer type, per question type, in percent rounded as
  the official evaluator prints). Questions whose image could not be read are left out of the results and of the
  scoring, and reported (``report``), as the other evaluations score the good samples only.
- ``flat_vqa_metrics``: overall / yes/no / number / other as floats, for ``metrics.jsonl``.

Used by ``florence eval vqa`` (``florence.benchmarks.vqa_cli``) and the ``vqa`` training task's periodic evaluation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from florence.adapters.vqa_metric import vqa_accuracy
from florence.data.vqa import VQADataset, vqa_eval_loader

ANSWER_TYPES = ("yes/no", "number", "other")  # the official answer types, in the order results are shown


@torch.no_grad()
def _predict(model: nn.Module, dataset: VQADataset, *, batch_size: int, device, k: int,
             progress: Callable[[int], None] | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Top-``k`` answers of every readable question, and the loader's bad-sample report."""
    model.eval()
    answers = model.answers
    k = min(int(k), len(answers))
    loader = vqa_eval_loader(dataset, preprocess=model.preprocess, tokenize=model.tokenize, batch_size=batch_size)
    out: list[dict[str, Any]] = []
    for batch in loader:
        scores, indices = model.answer(batch["images"].to(device), batch["input_ids"].to(device),
                                       batch["attention_mask"].to(device), k=k)  # B, k each
        for qid, row_scores, row_indices in zip(batch["question_ids"].tolist(), scores.float().cpu().tolist(),
                                                indices.cpu().tolist()):
            record = {"question_id": int(qid), "answer": answers[row_indices[0]], "score": row_scores[0]}
            if k > 1:
                record.update(answers=[answers[i] for i in row_indices], scores=row_scores)
            out.append(record)
        if progress is not None:
            progress(len(batch["question_ids"]))
    return out, loader.report()


def predict_vqa(model: nn.Module, dataset: VQADataset, *, batch_size: int = 64, device="cpu", k: int = 1,
                progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """``[{"question_id", "answer", "score"}]`` per readable question (top answer, its sigmoid probability); with
    ``k > 1`` also ``answers`` / ``scores``: the top ``k`` (at most the vocabulary size), best first.
    ``progress`` is called with the number of questions of each batch."""
    return _predict(model, dataset, batch_size=batch_size, device=device, k=k, progress=progress)[0]


def evaluate_vqa(model: nn.Module, questions: str | Path, annotations: str | Path | None, images: str | Path, *,
                 batch_size: int = 64, device="cpu", max_questions: int | None = None,
                 image_pattern: str | None = None,
                 progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Answer the questions (the first ``max_questions``) and score them with the official VQA accuracy.

    Returns ``{"metrics": vqa_accuracy's dict (None without annotations), "results": [{"question_id", "answer"}],
    "predictions": predict_vqa's records, "report": {the loader's report of unreadable images, "dataset": what the
    dataset kept and skipped (``VQASummary.to_dict``: questions without annotation, missing image files, ...)},
    "dataset": the VQADataset}``. The metrics cover the questions answered (kept, with a readable image), scored
    against their entries of the annotations file as written.
    """
    dataset = VQADataset(questions, annotations, images, image_pattern=image_pattern, max_questions=max_questions)
    predictions, report = _predict(model, dataset, batch_size=batch_size, device=device, k=1, progress=progress)
    results = [{"question_id": p["question_id"], "answer": p["answer"]} for p in predictions]
    metrics = None
    if annotations is not None:
        metrics = vqa_accuracy(results, dataset.annotations_dict({r["question_id"] for r in results}))
    return {"metrics": metrics, "results": results, "predictions": predictions,
            "report": {**report, "dataset": dataset.summary().to_dict()}, "dataset": dataset}


def flat_vqa_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """``{"overall", "yes/no", "number", "other"}`` (percent floats) of an official metrics dict; an answer type
    without questions is left out."""
    flat = {"overall": float(metrics["overall"])}
    per_type = metrics.get("perAnswerType", {})
    flat.update({t: float(per_type[t]) for t in ANSWER_TYPES if t in per_type})
    return flat
