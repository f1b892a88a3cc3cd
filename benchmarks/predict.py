"""``florence predict --model BUNDLE IMAGE... [--labels "a,b,c" | --labels-file F] [--top-k 5] [--json]``: classify
your own image files.

- A dual encoder (``unicl_*`` bundle, or another library's weights spelled ``open_clip:ARCH[:WEIGHTS]`` or ``hf:DIR``,
  ``florence.backbone.foreign``) classifies zero-shot among the labels you give (``--labels`` comma-separated, or
  ``--labels-file`` with one label a line), each label prompt-ensembled over the 80 CLIP ImageNet templates
  (``florence.adapters.zeroshot.DEFAULT_TEMPLATES``, the set ``florence eval zeroshot`` uses for ImageNet,
  Fashion-MNIST and ImageFolder data). Probabilities: softmax of the model's logit scale times the cosine similarity.
- An image classifier bundle (an image tower with a linear head) uses its head: the labels are the bundle's class
  names (``--labels`` renames them; one per class, in the head's order). Probabilities: softmax of the logits.

Images are read as training and evaluation read them (any mode becomes RGB, EXIF orientation applied) and go through
the bundle's evaluation transform. A missing or unreadable image stops with a one-line error naming the file; with
``--on-bad-sample skip`` it is skipped instead, counted and listed on stderr (and in ``--json`` output), and the
other images are classified.

Output: a table (file, then the top-k labels with their probabilities), or with ``--json`` a JSON object
``{"model", "mode", "labels", "templates", "predictions": [{"file", "top_k": [{"label", "probability"}, ...]}],
"skipped": [{"file", "reason"}]}``. Exit status 0, or 2 for a problem you can fix (the message says which).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from florence.adapters import zeroshot as zs
from florence.bundle import from_pretrained
from florence.data.source_dataset import ImageList
from florence.data.eval_loader import EvalLoader, map_batches
from florence.data.transforms import build_transform
from florence.errors import FlorenceError


class PredictError(FlorenceError, ValueError):
    """A ``florence predict`` request that cannot work (no labels for a dual encoder, a label count that does not
    match the head, an empty labels file); the message says what to change."""


@dataclass
class Predictions:
    """What :func:`predict` returns.

    Attributes:
        mode: ``"zero-shot"`` (dual encoder) or ``"classifier"`` (image tower with a head).
        labels: the ``C`` label names, in score-column order.
        files: the classified images (skipped ones left out), in the order given.
        probabilities: ``(N, C)`` float32, each row summing to 1.
        skipped: ``[{"file", "reason"}]`` of the images left out under ``on_bad_sample="skip"``.
    """

    mode: str
    labels: list[str]
    files: list[str]
    probabilities: np.ndarray
    skipped: list[dict[str, str]] = field(default_factory=list)

    def top_k(self, k: int) -> list[list[tuple[str, float]]]:
        """Per image, the ``min(k, C)`` most probable ``(label, probability)`` pairs, best first."""
        order = np.argsort(-self.probabilities, axis=1, kind="stable")[:, :k]  # N, k
        return [[(self.labels[c], float(p[c])) for c in row] for row, p in zip(order, self.probabilities)]


def parse_labels(text: str | None, path: str | None) -> list[str] | None:
    """Labels from ``--labels "a,b,c"`` or ``--labels-file F`` (one a line; blank lines and ``#`` comments skipped)."""
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise PredictError(f"--labels-file {file}: no such file")
        labels = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()
                  if line.strip() and not line.strip().startswith("#")]
        where = f"--labels-file {file}"
    elif text is not None:
        labels = [part.strip() for part in text.split(",") if part.strip()]
        where = "--labels"
    else:
        return None
    if not labels:
        raise PredictError(f"{where}: no labels")
    duplicates = sorted({name for name in labels if labels.count(name) > 1})
    if duplicates:
        raise PredictError(f"{where}: repeated label(s) {', '.join(duplicates)}")
    return labels


@torch.no_grad()
def predict(model: torch.nn.Module, images: Sequence[str | Path], labels: Sequence[str] | None = None, *,
            batch_size: int = 32, device: torch.device | str = "cpu", on_bad_sample: str = "raise") -> Predictions:
    """Classify image files with a dual encoder (zero-shot among ``labels``) or an image classifier bundle (its head;
    ``labels`` optionally renames its classes). See the module docstring."""
    model.eval()
    paths = [str(p) for p in images]
    transform = build_transform(dict(model.preprocess), train=False)
    loader = EvalLoader(ImageList(paths, np.arange(len(paths)), transform), batch_size=batch_size,
                        on_bad_sample=on_bad_sample, name="images")
    if hasattr(model, "encode_text"):
        if not labels:
            raise PredictError("a dual encoder classifies zero-shot among labels you give: --labels \"a,b,c\" or "
                               "--labels-file FILE")
        classifier = zs.build_zeroshot_classifier(zs.model_text_encoder(model, device), list(labels),
                                                  zs.DEFAULT_TEMPLATES, batch_size)  # C, D
        embeds, kept = map_batches(model.encode_image, loader, device=device)  # N, D
        scale = float(model.scale()) if hasattr(model, "scale") else 100.0
        logits = scale * (embeds @ classifier.numpy().T)  # N, C
        mode, names = "zero-shot", list(labels)
    else:
        logits, kept = map_batches(model, loader, device=device)  # N, C
        head = getattr(model, "class_names", None)
        names = list(labels) if labels else ([n if isinstance(n, str) else n[0] for n in head] if head
                                             else [str(i) for i in range(logits.shape[1])])
        if logits.ndim != 2:
            raise PredictError(f"the model gives outputs of shape {tuple(logits.shape[1:])} per image, not class "
                               "logits: use an image classifier bundle or a dual encoder")
        if len(names) != logits.shape[1]:
            raise PredictError(f"the head has {logits.shape[1]} classes but {len(names)} labels were given: one label "
                               "per class, in the head's order")
        mode = "classifier"
    probabilities = torch.softmax(torch.from_numpy(logits).double(), dim=1).float().numpy()  # N, C
    return Predictions(mode, names, [paths[i] for i in kept], probabilities, loader.skipped)


def format_table(predictions: Predictions, k: int) -> str:
    """One row per image: the file, then ``label probability%`` for each of the top ``k``."""
    rows = [[file] + [f"{label} {100 * p:.1f}%" for label, p in top]
            for file, top in zip(predictions.files, predictions.top_k(k))]
    width = max(len(r) for r in rows) if rows else 1
    header = ["file"] + [f"top-{i}" for i in range(1, width)]
    columns = [max(len(r[i]) for r in [header] + rows) for i in range(width)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, columns)).rstrip() for row in [header] + rows)


def to_json(predictions: Predictions, k: int, model_path: str) -> dict[str, Any]:
    templates = {"set": "imagenet", "count": len(zs.DEFAULT_TEMPLATES)} if predictions.mode == "zero-shot" else None
    return {
        "model": model_path,
        "mode": predictions.mode,
        "labels": predictions.labels,
        "templates": templates,
        "predictions": [{"file": f, "top_k": [{"label": label, "probability": p} for label, p in top]}
                        for f, top in zip(predictions.files, predictions.top_k(k))],
        "skipped": predictions.skipped,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="florence predict",
        description="Classify image files: zero-shot among your labels with a dual-encoder bundle (each label "
        "prompt-ensembled over the 80 CLIP ImageNet templates, as `florence eval zeroshot` does for ImageNet, "
        "Fashion-MNIST and ImageFolder data), or with the head of an image classifier bundle.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--model", required=True,
                   help="checkpoint bundle directory (florence.from_pretrained), or another library's weights: "
                   "open_clip:ARCH[@TAG][:WEIGHTS] (ARCH an open_clip model name, TAG its pretrained tag, or an "
                   "open_clip_config.json) or hf:DIR (a "
                   "transformers CLIPModel / VisionTextDualEncoderModel directory)")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--labels", default=None,
                        help='comma-separated labels, e.g. "cat,dog,rocket" (needed for a dual encoder; for a '
                        "classifier they rename its classes, in the head's order)")
    labels.add_argument("--labels-file", default=None, help="a text file with one label a line")
    p.add_argument("--top-k", type=int, default=5, help="labels shown per image (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--on-bad-sample", choices=("raise", "skip"), default="raise",
                   help="a missing or unreadable image: stop with an error naming it (default) or skip it with a note")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.top_k < 1:
        print("florence predict: --top-k must be at least 1", file=sys.stderr)
        return 2
    try:
        labels = parse_labels(args.labels, args.labels_file)
        model = from_pretrained(args.model, map_location=args.device)
        result = predict(model, args.images, labels, batch_size=args.batch_size, device=args.device,
                         on_bad_sample=args.on_bad_sample)
    except FlorenceError as err:  # a user-fixable problem: one line; anything else is a bug and keeps its traceback
        print(f"florence predict: {err}", file=sys.stderr)
        return 2
    for skipped in result.skipped:
        print(f"florence predict: skipped {skipped['file']}: {skipped['reason']}", file=sys.stderr)
    if args.json:
        print(json.dumps(to_json(result, args.top_k, str(args.model)), indent=2))
    else:
        print(format_table(result, args.top_k))
    return 0


if __name__ == "__main__":
    sys.exit(main())
