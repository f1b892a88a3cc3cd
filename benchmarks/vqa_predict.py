"""``florence vqa --model BUNDLE IMAGE "question" ["another question" ...] [--top-k 5] [--json]``: ask a METER
bundle questions about your own image.

The image is read as evaluation reads it (any mode becomes RGB, EXIF orientation applied) and goes through the
bundle's VQA transform (``florence.data.vqa.vqa_transform``: the whole image resized, normalised); each question is
tokenized by the bundle's tokenizer (padded / truncated to its ``max_text_len``). The answers are the top ``k`` of
the bundle's answer vocabulary by the sigmoid of the VQA logits (METER's classifier is trained with soft-target
BCE, so the scores are independent probabilities, not a distribution).

Output: per question the top-k answers and scores, or with ``--json`` the object ``{"model", "image",
"predictions": [{"question", "answers": [{"answer", "score"}, ...]}]}``. A missing or unreadable image, or a bundle
without a VQA head, stops with a one-line error (exit status 2).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from florence.bundle import from_pretrained
from florence.data.images import BadSample, decode_image
from florence.data.vqa import vqa_transform
from florence.errors import FlorenceError


class VQAPredictError(FlorenceError, ValueError):
    """A ``florence vqa`` request that cannot work; the message names the file or option."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="florence vqa", description=__doc__.split("\n\n")[0])
    p.add_argument("image", help="image file")
    p.add_argument("questions", nargs="+", help="one or more questions about the image")
    p.add_argument("--model", required=True, help="METER bundle with a VQA head")
    p.add_argument("--top-k", type=int, default=5, help="answers shown per question")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


@torch.no_grad()
def answer_questions(model, image, questions: list[str], k: int = 5, device="cpu") -> list[dict[str, Any]]:
    """``[{"question", "answers": [{"answer", "score"}]}]``: the top ``k`` answers (at most the vocabulary) to each
    question about one PIL ``image``."""
    pixels = vqa_transform(model.preprocess)(image).unsqueeze(0).to(device)  # 1, 3, H, W
    tokens = model.tokenize(list(questions))  # input_ids, attention_mask: Q, L
    scores, indices = model.answer(pixels.expand(len(questions), -1, -1, -1), tokens["input_ids"].to(device),
                                   tokens["attention_mask"].to(device), k=min(k, len(model.answers)))  # Q, k each
    return [{"question": q, "answers": [{"answer": model.answers[i], "score": round(float(s), 4)}
                                        for s, i in zip(row_scores, row_indices)]}
            for q, row_scores, row_indices in zip(questions, scores.float().cpu().tolist(), indices.cpu().tolist())]


def predict(args: argparse.Namespace) -> dict[str, Any]:
    if args.top_k < 1:
        raise VQAPredictError(f"--top-k {args.top_k}: must be >= 1")
    try:
        image = decode_image(args.image)
    except BadSample as err:
        raise VQAPredictError(str(err)) from None
    model = from_pretrained(args.model, map_location=args.device).eval()
    if "vqa" not in getattr(model, "heads", ()) or not getattr(model, "answers", None):
        raise VQAPredictError(f"{args.model}: not a VQA model (a METER bundle with a vqa head)")
    return {"model": str(args.model), "image": str(args.image),
            "predictions": answer_questions(model, image, args.questions, args.top_k, args.device)}


def format_table(result: dict[str, Any]) -> str:
    lines = []
    for p in result["predictions"]:
        lines.append(f"{result['image']}: {p['question']}")
        lines += [f"  {a['answer']:<24} {a['score']:.3f}" for a in p["answers"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = predict(args)
    except FlorenceError as err:
        print(f"florence vqa: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
