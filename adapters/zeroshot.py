"""Zero-shot classification (SPEC §8.1, §9.4): a classifier from class names x prompt templates, and its metrics.

:func:`evaluate_zeroshot` is THE zero-shot evaluator: ``florence eval zeroshot`` runs it, and so does the training
engine's end-of-run check, so both give the same number for the same model, data and templates. Its default
templates are :data:`DEFAULT_TEMPLATES`, the 80 CLIP ImageNet templates (``florence eval zeroshot`` uses them for
ImageNet, Fashion-MNIST and any ImageFolder; the other paper datasets have their own CLIP sets,
``florence.adapters.prompt_templates``). UniCL *trains* with 81 (``"{}."`` plus these 80,
``florence.data.templates.UNICL_TEMPLATES``); evaluation does not use the bare ``"{}."``.

The classifier is the CLIP prompt ensemble: format every template with a class name
(``florence.data.templates.format_prompt``: the cleaning training uses, the first name of a synonym list), encode each
prompt, L2-normalise each text embedding, average per class, re-normalise. Logits are ``image_embeds @ classifier.T``
(the scale does not change any ranking metric). The metrics are pure functions of scores and labels:

- ``classification_metrics``: top-1, top-5 and mean-per-class accuracy, as fractions in [0, 1]
  (``trivial_classification_metrics`` names those that cannot miss: top-5 with at most 5 classes);
- ``voc11_map``: the VOC2007 11-point interpolated mean average precision for multi-label targets.

``template_hash`` (SHA-256 of the template strings and class names) goes into every result, and
``cached_class_embeddings`` keeps classifiers on disk keyed by (model hash, template/class hash, precision).

Nothing here imports the training engine (the engine imports this module).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from florence.data.eval_loader import EvalLoader, map_batches
from florence.data.templates import OPENAI_IMAGENET_TEMPLATES, ClassName, format_prompt
from florence.errors import FlorenceError

DEFAULT_TEMPLATES: tuple[str, ...] = OPENAI_IMAGENET_TEMPLATES  # the 80 CLIP ImageNet templates

TextEncoder = Callable[[list[str]], torch.Tensor]  # prompts -> (N, D) text embeddings


class NotADualEncoder(FlorenceError, ValueError):
    """A protocol that needs text (zero-shot, retrieval) was given an image-only model; the message says what works."""


def require_dual_encoder(model: torch.nn.Module, task: str) -> None:
    """:class:`NotADualEncoder` unless ``model`` has the dual-encoder interface: ``encode_image``, ``encode_text`` and
    ``tokenize`` (a UniCL bundle, or a wrapped open_clip / Hugging Face model, ``florence.backbone.foreign``). An
    image-tower bundle can only be probed or, with a classifier head, evaluated with ``florence eval classify``."""
    missing = [name for name in ("encode_text", "tokenize", "encode_image") if not hasattr(model, name)]
    if missing:
        raise NotADualEncoder(
            f"{task} needs a dual encoder (image + text towers, e.g. a unicl_* bundle or open_clip:/hf: weights); this "
            f"{type(model).__name__} is an image tower only (no {', '.join(missing)}). Use linear-probe or few-shot "
            f"(or classify, for a tower with a classifier head)."
        )

def template_hash(templates: Sequence[str], classnames: Sequence[ClassName]) -> str:
    """SHA-256 of the template set and the class names (order matters: it fixes the label order)."""
    names = [c if isinstance(c, str) else list(c) for c in classnames]
    payload = json.dumps({"templates": list(templates), "classnames": names}, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@torch.no_grad()
def build_zeroshot_classifier(
    encode_text: TextEncoder,
    classnames: Sequence[ClassName],
    templates: Sequence[str],
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Class embeddings from prompt ensembles.

    Args:
        encode_text: maps a list of prompts to their ``(N, D)`` embeddings (normalised or not).
        classnames: ``C`` class names (or synonym lists: the first name is used), in label order.
        templates: ``T`` templates with a ``{}`` (or ``{c}``) placeholder.
        batch_size: prompts per ``encode_text`` call (prompts of several classes share a batch).
        progress: optional callback with the number of prompts just encoded.

    Returns:
        ``(C, D)`` float32 tensor of unit-norm class embeddings.
    """
    if not classnames or not templates:
        raise ValueError("a zero-shot classifier needs at least one class name and one template")
    prompts = [format_prompt(t, c) for c in classnames for t in templates]  # class-major: C*T prompts
    text = encode_in_batches(encode_text, prompts, batch_size, progress)  # C*T, D
    text = text.reshape(len(classnames), len(templates), -1)  # C, T, D
    return F.normalize(text.mean(dim=1), dim=-1)


def encode_in_batches(encode_text: TextEncoder, texts: Sequence[str], batch_size: int,
                      progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """``(N, D)`` float32 unit-norm embeddings of ``texts``, ``batch_size`` texts per ``encode_text`` call."""
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start:start + batch_size])
        chunks.append(F.normalize(encode_text(batch).float(), dim=-1))
        if progress is not None:
            progress(len(batch))
    return torch.cat(chunks)


def model_text_encoder(model, device: torch.device | str = "cpu",
                       task: str = "zero-shot classification") -> TextEncoder:
    """A ``TextEncoder`` over a ``UniCLModel`` (``model.tokenize`` then ``model.encode_text``)."""
    require_dual_encoder(model, task)

    def encode(prompts: list[str]) -> torch.Tensor:
        tokens = model.tokenize(prompts)
        return model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device), normalize=True)

    return encode


def cached_class_embeddings(
    cache_dir: str | Path | None,
    model_hash: str,
    classnames: Sequence[ClassName],
    templates: Sequence[str],
    precision: str,
    build: Callable[[], torch.Tensor],
) -> tuple[torch.Tensor, bool]:
    """Class embeddings from ``cache_dir/zeroshot-<model>-<templates>-<precision>.pt`` when present, else ``build()``
    and store.

    The file holds a plain tensor and is read with ``weights_only=True``. Returns ``(embeddings (C, D) float32 on the
    CPU, from_cache)`` whichever device ``build()`` ran on.
    """
    if cache_dir is None:
        return build().float().cpu(), False
    key = f"{model_hash[:16]}-{template_hash(templates, classnames)[:16]}-{precision}"
    path = Path(cache_dir) / f"zeroshot-{key}.pt"
    if path.is_file():
        embeddings = torch.load(path, map_location="cpu", weights_only=True)
        if embeddings.shape[0] == len(classnames):
            return embeddings, True
    embeddings = build().float().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(embeddings, tmp)
    tmp.replace(path)
    return embeddings, False


def classification_metrics(scores: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> dict[str, float]:
    """Top-1, top-5 and mean-per-class accuracy (fractions in [0, 1]).

    Args:
        scores: ``(N, C)`` class scores (logits, similarities or probabilities).
        labels: ``(N,)`` integer labels in ``[0, C)``.

    Mean-per-class accuracy averages the per-class top-1 recall over the classes present in ``labels``. Top-5 is
    top-min(5, C). Ties are broken towards the lower class index (stable sort).
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if scores.ndim != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(f"scores must be (N, C) and labels (N,); got {scores.shape} and {labels.shape}")
    order = np.argsort(-scores, axis=1, kind="stable")
    k = min(5, scores.shape[1])
    hit1 = order[:, 0] == labels
    hit5 = (order[:, :k] == labels[:, None]).any(axis=1)
    per_class = [hit1[labels == c].mean() for c in np.unique(labels)]
    return {"top1": float(hit1.mean()), "top5": float(hit5.mean()), "mean_per_class": float(np.mean(per_class))}


def trivial_classification_metrics(num_classes: int, prefix: str = "") -> list[str]:
    """Names of the metrics that are 1.0 whatever the model: top-5 with at most 5 classes (``prefix`` as in the few-shot
    names ``"5shot_"``). Results list them so that a reader does not take them for a signal."""
    return [f"{prefix}top5"] if num_classes <= 5 else []


def score_metrics(scores: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """All metrics that apply: top-1/top-5/mean-per-class for ``(N,)`` labels, 11-point mAP for ``(N, C)`` targets."""
    if np.asarray(targets).ndim == 2:
        return voc11_map(scores, targets)
    return classification_metrics(scores, targets)


def voc11_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """VOC2007 11-point interpolated AP of one class.

    Args:
        scores: ``(N,)`` scores.
        targets: ``(N,)`` with 1 = positive, 0 = negative, -1 = difficult (ignored, as in the VOC devkit).

    AP = mean over recall thresholds t in {0, 0.1, ..., 1} of the maximum precision at recall >= t (0 if none).
    """
    keep = targets >= 0
    scores, targets = scores[keep], targets[keep]
    if targets.sum() == 0:
        raise ValueError("a class without positive samples has no average precision")
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(targets[order] == 1)
    precision = tp / np.arange(1, len(tp) + 1)
    recall = tp / targets.sum()
    ap = 0.0
    for t in np.linspace(0.0, 1.0, 11):
        above = precision[recall >= t]
        ap += (above.max() if above.size else 0.0) / 11.0
    return float(ap)


def voc11_map(scores: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor) -> dict[str, float]:
    """Mean of the per-class VOC 11-point AP over the classes with a positive sample.

    Args:
        scores: ``(N, C)`` class scores.
        targets: ``(N, C)`` multi-label targets (1 positive, 0 negative, -1 difficult), or ``(N,)`` single labels.

    Returns:
        ``{"map_11point": float}`` (fraction in [0, 1]).
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets)
    if targets.ndim == 1:
        targets = np.eye(scores.shape[1], dtype=np.int64)[targets]
    if targets.shape != scores.shape:
        raise ValueError(f"targets {targets.shape} do not match scores {scores.shape}")
    present = [c for c in range(scores.shape[1]) if (targets[:, c] == 1).any()]
    aps = [voc11_average_precision(scores[:, c], targets[:, c]) for c in present]
    return {"map_11point": float(np.mean(aps))}


# -- the evaluator ----------------------------------------------------------------------------------------------------


@dataclass
class ClassEmbeddingCache:
    """Where :func:`evaluate_zeroshot` keeps class embeddings (``cached_class_embeddings``): a folder, the model's
    hash and the precision name that together key the file."""

    directory: str | Path
    model_hash: str
    precision: str = "fp32"


@dataclass
class ZeroShotEval:
    """What :func:`evaluate_zeroshot` returns.

    Attributes:
        metrics: ``top1``, ``top5``, ``mean_per_class`` (or ``map_11point`` for multi-label targets), fractions.
        scores: ``(N, C)`` float32 cosine similarities of the good images to the class embeddings.
        targets: ``(N,)`` labels (or ``(N, C)`` multi-label targets) of the good images.
        bad_samples: ``EvalLoader.report()``: policy, skipped count, evaluated count, by reason, skipped files.
        trivial_metrics: metric names that are 1.0 whatever the model (top-5 with <= 5 classes).
        class_embeddings_from_cache: True when the classifier was read from a :class:`ClassEmbeddingCache`.
    """

    metrics: dict[str, float]
    scores: np.ndarray
    targets: np.ndarray
    bad_samples: dict[str, Any] = field(default_factory=dict)
    trivial_metrics: list[str] = field(default_factory=list)
    class_embeddings_from_cache: bool = False


def evaluate_zeroshot(
    model: torch.nn.Module,
    dataset: Dataset,
    class_names: Sequence[ClassName],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    *,
    batch_size: int = 128,
    device: torch.device | str | None = None,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    on_bad_sample: str = "skip",
    num_workers: int = 0,
    cache: ClassEmbeddingCache | None = None,
    progress: bool = False,
    name: str = "zero-shot",
) -> ZeroShotEval:
    """Zero-shot classification of ``dataset`` by a dual encoder: prompt-ensemble classifier, image embeddings,
    cosine scores, metrics.

    Args:
        model: a dual encoder (``encode_image``, ``encode_text``, ``tokenize``), already on ``device``; its train/eval
            mode is restored afterwards.
        dataset: ``dataset[i] -> (image (3, H, W) tensor, label)``, images already transformed for the model
            (``florence.data.transforms.build_transform(model.preprocess, train=False)``).
        class_names: ``C`` names (or synonym lists: the first is used) in the dataset's label order.
        templates: prompt templates with one ``{}``; default :data:`DEFAULT_TEMPLATES` (80 CLIP ImageNet templates).
        batch_size: images per forward, and prompts per text forward.
        device: where the images and tokens go (default: the model's parameters' device).
        autocast: a context-manager factory wrapping the image and text forwards (e.g. bf16 autocast).
        on_bad_sample: ``"skip"`` (count and leave out undecodable images) or ``"raise"`` (stop naming the file).
        num_workers: DataLoader workers for the images.
        cache: keep / read the class embeddings on disk (``florence eval``); None computes them.
        progress: show tqdm bars.
        name: the split's name in bad-sample messages.
    """
    require_dual_encoder(model, "zero-shot classification")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        def build() -> torch.Tensor:
            with tqdm(total=len(class_names) * len(templates), desc="class prompts", unit="prompt",
                      disable=not progress) as bar, torch.no_grad(), autocast():
                return build_zeroshot_classifier(model_text_encoder(model, device), class_names, templates,
                                                 batch_size, bar.update)

        if cache is not None:
            classifier, from_cache = cached_class_embeddings(cache.directory, cache.model_hash, class_names,
                                                             templates, cache.precision, build)
        else:
            classifier, from_cache = build().float().cpu(), False  # C, D
        loader = EvalLoader(dataset, batch_size=batch_size, num_workers=num_workers, on_bad_sample=on_bad_sample,
                            name=name)
        with tqdm(total=len(dataset), desc="images", unit="img", disable=not progress) as bar:
            image_embeds, targets = map_batches(model.encode_image, loader, device=device, autocast=autocast,
                                                progress=bar.update)  # N, D
    finally:
        model.train(was_training)
    scores = image_embeds @ classifier.numpy().T  # N, C
    return ZeroShotEval(
        metrics=score_metrics(scores, targets),
        scores=scores,
        targets=targets,
        bad_samples=loader.report(),
        trivial_metrics=trivial_classification_metrics(len(class_names)) if targets.ndim == 1 else [],
        class_embeddings_from_cache=from_cache,
    )
