"""Minimal zero-shot check for training runs on image-label data (the full evaluator lives in ``adapters/``).

Class embeddings are template-ensembled (SPEC §9.4): each class name is formatted with every template, the text
embeddings are L2-normalised, averaged and normalised again; each test image is assigned the class whose embedding
has the highest cosine similarity with the image embedding.
"""
from __future__ import annotations

import random
from typing import Any, Sequence

import torch
from torch import nn


@torch.no_grad()
def class_embeddings(model: nn.Module, class_names: Sequence[str | Sequence[str]], templates: Sequence[str],
                     device: torch.device) -> torch.Tensor:
    """(C, D) normalised, template-averaged text embeddings (all synonyms of a class are averaged too)."""
    from florence.data.templates import clean_class_name

    rows = []
    for name in class_names:
        names = [name] if isinstance(name, str) else list(name)
        texts = [t.format(clean_class_name(n)) for n in names for t in templates]
        tokens = model.tokenize(texts)
        emb = model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))  # T, D
        rows.append(nn.functional.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(rows)  # C, D


@torch.no_grad()
def zero_shot_accuracy(model: nn.Module, source: Any, *, templates: Sequence[str] | None = None, batch_size: int = 256,
                       max_images: int | None = None, device: torch.device = torch.device("cpu")) -> float:
    """Top-1 accuracy of ranking the class prompts for the images of an image-label ``source`` (a
    ``florence.data`` source with ``class_names``, ``templates``, ``get(index, rng)``), with the model's eval
    transform."""
    from florence.data.transforms import build_transform

    was_training = model.training
    model.eval()
    transform = build_transform(model.preprocess, train=False)
    classes = class_embeddings(model, source.class_names, templates or source.templates, device)  # C, D
    n = len(source) if max_images is None else min(max_images, len(source))
    correct = 0
    rng = random.Random(0)
    for start in range(0, n, batch_size):
        samples = [source.get(i, rng) for i in range(start, min(start + batch_size, n))]
        images = torch.stack([transform(s.image) for s in samples]).to(device)  # B, 3, H, W
        labels = torch.tensor([s.label for s in samples], device=device)
        predicted = (model.encode_image(images) @ classes.t()).argmax(dim=1)  # B
        correct += int((predicted == labels).sum())
    model.train(was_training)
    return correct / n


def zero_shot_eval(model: nn.Module, source_spec: dict[str, Any], *, batch_size: int = 256,
                   max_images: int | None = None, device: torch.device = torch.device("cpu")) -> float:
    """``zero_shot_accuracy`` on the source described by a data-source config dict (e.g. ``{type: fashion_mnist,
    split: test}``)."""
    from florence.data.loader import build_source

    source = build_source(dict(source_spec))
    if not hasattr(source, "class_names"):
        raise ValueError(f"eval.source {source_spec}: zero-shot needs an image-label source with class names")
    return zero_shot_accuracy(model, source, batch_size=batch_size, max_images=max_images, device=device)
