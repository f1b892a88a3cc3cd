"""Published numbers to compare against (SPEC §6.4, §8.1, §8.2, §8.5), in percent, keyed by our ``--dataset`` names.

- ``ZERO_SHOT``: Florence Table 1 (zero-shot classification; the dataset's metric, SPEC §8.2 convention).
- ``LINEAR_PROBE``: Florence Table 2 (linear probe, CLIP protocol).
- ``FINE_TUNED``: Florence Table 3 (ImageNet-1K fine-tuning, top-1 / top-5), beside ``florence eval classify``
  results of fine-tuned classifiers.
- ``RETRIEVAL``: Florence Table 5 (Flickr30K 1K test, MSCOCO 5K test; R@1 / R@5), zero-shot and fine-tuned.
- ``DETECTION``: Florence Table 6 (COCO minival AP, Objects365 AP, Visual Genome AP50) beside ``florence eval
  detection`` results.
- ``VQA``: Florence Table 8 (VQAv2 test-dev / test-std official VQA accuracy, SPEC §6.4) beside ``florence eval vqa``
  results.
- ``VIDEO_RETRIEVAL``: Florence Table 9 (MSR-VTT 1K-A zero-shot text->video R@1 / R@5 / R@10, SPEC §8.9) beside
  ``florence eval video-retrieval`` results on MSR-VTT.
- ``ACTION``: Florence Table 10 (Kinetics-400 / 600 top-1 / top-5, 4x3 views unless noted, SPEC §7.3) beside
  ``florence eval action`` results on Kinetics.

Each table maps a model name to ``{dataset: value}``; ``FLORENCE`` names Florence's row, ``CLIP_BASELINES`` the CLIP
rows that SPEC lists. A value is missing where the paper has "–".
"""
from __future__ import annotations

import re

FLORENCE = "Florence-CoSwin-H@384"
CLIP_BASELINES = ("CLIP-RN50x64", "CLIP-ViT-L/14@336")
_COLUMNS = ("food101", "cifar10", "cifar100", "sun397", "cars", "fgvc_aircraft", "voc2007", "dtd", "pets",
            "caltech101", "flowers102", "imagenet")


def paper_metric(dataset: str) -> str:
    """The metric the paper's column for ``dataset`` reports: the dataset specification's (CLIP's convention,
    SPEC §8.2); top-1 for a dataset without a specification."""
    from florence.benchmarks.datasets import build_specs

    spec = build_specs().get(dataset)
    return spec.metric if spec is not None else "top1"


def _row(*values: float | None) -> dict[str, float]:
    return {name: v for name, v in zip(_COLUMNS, values) if v is not None}


# Table 1: zero-shot transfer, 12 datasets [FL-T1]
ZERO_SHOT: dict[str, dict[str, float]] = {
    "CLIP-RN50x64": _row(91.8, 86.8, 61.3, 48.9, 76.0, 35.6, 83.8, 53.4, 93.4, 90.6, 77.3, 73.6),
    "CLIP-ViT-L/14@336": _row(93.8, 95.7, 77.5, 68.4, 78.8, 37.2, 84.3, 55.7, 93.5, 92.8, 78.3, 76.2),
    "FILIP-ViT-L/14": _row(92.2, 95.7, 75.3, 73.1, 70.8, 60.2, None, 60.7, 92.0, 93.0, 90.1, 78.3),
    FLORENCE: _row(95.1, 94.6, 77.6, 77.0, 93.2, 55.5, 85.5, 66.4, 95.9, 94.7, 86.2, 83.7),
}
# ImageNet-1K zero-shot top-5 [FL abstract, §3.1]
FLORENCE_IMAGENET_ZERO_SHOT_TOP5 = 97.18

# Table 2: linear probe, 11 datasets (no ImageNet column) [FL-T2]
LINEAR_PROBE: dict[str, dict[str, float]] = {
    "SimCLRv2-R152x3": _row(83.6, 96.8, 84.5, 69.1, 68.5, 63.1, 86.7, 80.5, 92.6, 94.9, 96.3),
    "ViT-L/16@384": _row(87.4, 97.9, 89.0, 74.9, 62.5, 52.2, 86.1, 75.0, 92.9, 94.7, 99.3),
    "EfficientNet-L2@800": _row(92.0, 98.7, 89.0, 75.7, 75.5, 68.4, 89.4, 82.5, 95.6, 94.7, 97.9),
    "CLIP-RN50x64": _row(94.8, 94.1, 78.6, 81.1, 90.5, 67.7, 88.9, 82.0, 94.5, 95.4, 98.9),
    "CLIP-ViT-L/14@336": _row(95.9, 97.9, 87.4, 82.2, 91.5, 71.6, 89.9, 83.0, 95.1, 96.0, 99.2),
    FLORENCE: _row(96.2, 97.6, 87.1, 84.2, 95.7, 83.9, 90.5, 86.0, 96.4, 96.6, 99.7),
}


# Table 3: ImageNet-1K fine-tuning [FL-T3]; {model: {metric: value}}
FINE_TUNED_IMAGENET: dict[str, dict[str, float]] = {
    "BiT-L-ResNet152x4": {"top1": 87.54, "top5": 98.46},
    "ALIGN-EfficientNet-L2": {"top1": 88.64, "top5": 98.67},
    "ViT-G/14": {"top1": 90.45},
    "CoAtNet-7": {"top1": 90.88},
    "Florence-CoSwin-H": {"top1": 90.05, "top5": 99.02},
}


def _retrieval(f30k_i2t, f30k_t2i, coco_i2t, coco_t2i) -> dict[str, dict[str, float]]:
    """Per dataset, the four R@1/R@5 numbers under our metric names."""
    out: dict[str, dict[str, float]] = {}
    for dataset, i2t, t2i in (("flickr30k", f30k_i2t, f30k_t2i), ("coco", coco_i2t, coco_t2i)):
        row = {}
        if i2t is not None:
            row.update({"image_to_text_R@1": i2t[0], "image_to_text_R@5": i2t[1]})
        if t2i is not None:
            row.update({"text_to_image_R@1": t2i[0], "text_to_image_R@5": t2i[1]})
        if row:
            out[dataset] = row
    return out


# Table 5: image-text retrieval, zero-shot and fine-tuned [FL-T5]; {model: {dataset: {metric: value}}}
RETRIEVAL_ZERO_SHOT: dict[str, dict[str, dict[str, float]]] = {
    "ImageBERT": _retrieval((70.7, 90.2), (54.3, 79.6), (44.0, 71.2), (32.3, 59.0)),
    "UNITER": _retrieval((83.6, 95.7), (68.7, 89.2), None, None),
    "CLIP": _retrieval((88.0, 98.7), (68.7, 90.6), (58.4, 81.5), (37.8, 62.4)),
    "ALIGN": _retrieval((88.6, 98.7), (75.7, 93.8), (58.6, 83.0), (45.6, 69.8)),
    "FILIP": _retrieval((89.8, 99.2), (75.0, 93.4), (61.3, 84.3), (45.9, 70.6)),
    "Florence": _retrieval((90.9, 99.1), (76.7, 93.6), (64.7, 85.9), (47.2, 71.4)),
}
RETRIEVAL_FINE_TUNED: dict[str, dict[str, dict[str, float]]] = {
    "GPO": _retrieval((88.7, 98.9), (76.1, 94.5), (68.1, 90.2), (52.7, 80.2)),
    "UNITER": _retrieval((87.3, 98.0), (75.6, 94.1), (65.7, 88.6), (52.9, 79.9)),
    "ERNIE-ViL": _retrieval((88.1, 98.0), (76.7, 93.6), None, None),
    "VILLA": _retrieval((87.9, 97.5), (76.3, 94.2), None, None),
    "Oscar": _retrieval(None, None, (73.5, 92.2), (57.5, 82.8)),
    "ALIGN": _retrieval((95.3, 99.8), (84.9, 97.4), (77.0, 93.5), (59.9, 83.3)),
    "FILIP": _retrieval((96.6, 100.0), (87.1, 97.7), (78.9, 94.4), (61.2, 84.3)),
    "Florence": _retrieval((97.2, 99.9), (87.9, 98.1), (81.8, 95.2), (63.2, 85.7)),
}


# Table 6: object detection fine-tuned [FL-T6, SPEC §5.4]; {dataset: (metric, {model: value})}. Our ``--name`` of a
# COCO val2017 evaluation is "coco" (also accepted: instances_val2017, coco_minival), "objects365", "visual_genome".
DETECTION: dict[str, tuple[str, dict[str, float]]] = {
    "coco": ("AP", {"Florence-CoSwin-H + DyHead": 62.0, "DyHead-Swin-L (multi-scale)": 58.4,
                    "DyHead-Swin-L (ms + self-training)": 60.3, "Soft Teacher": 60.7}),
    "objects365": ("AP", {"Florence-CoSwin-H + DyHead": 39.3, "Multi-dataset Detection": 33.7}),
    "visual_genome": ("AP50", {"Florence-CoSwin-H + DyHead": 16.2, "VinVL": 13.8}),
}
DETECTION_ALIASES = {"instances_val2017": "coco", "coco_minival": "coco", "coco_val2017": "coco"}


VQAV2_NAMES = re.compile(r"vqa|mscoco|coco|val2014|minival|test-?dev|test2015", re.IGNORECASE)


def is_vqav2(dataset: str) -> bool:
    """Whether a ``florence eval vqa`` result name is a VQAv2 split (``mscoco_val2014``, ``minival``, ...), the data
    of Table 8; other VQA data (Fashion-MNIST VQA) has no paper number."""
    return bool(VQAV2_NAMES.search(dataset))


# Table 8: VQAv2 fine-tuned, official VQA accuracy (overall) [FL-T8, SPEC §6.4]; {model: (test-dev, test-std)}.
# Both splits are scored on EvalAI only; a local ``florence eval vqa`` result (val, minival, Fashion-MNIST) is shown
# beside them for orientation, not as the same number.
VQA: dict[str, tuple[float, float]] = {
    "UNITER": (73.82, 74.02),
    "Visual Parsing": (74.00, 74.17),
    "PixelBERT": (74.45, 74.55),
    "VILLA": (74.69, 74.87),
    "UNIMO": (75.06, 75.27),
    "ALBEF": (75.84, 76.04),
    "VinVL": (76.52, 76.60),
    "CLIP-ViL": (76.48, 76.70),
    "METER (CLIP-ViT-B/16 + RoBERTa)": (77.68, 77.64),
    "SimVLM": (80.03, 80.34),
    "Florence": (80.16, 80.36),
}


# Table 9: MSR-VTT 1K-A (1K video-caption pairs) zero-shot text->video recall [FL-T9, SPEC §8.9]; "–" left out.
VIDEO_RETRIEVAL: dict[str, dict[str, float]] = {
    "Florence": {"text_to_video_R@1": 37.6, "text_to_video_R@5": 63.8, "text_to_video_R@10": 72.6},
    "CLIP-ViT-B/16": {"text_to_video_R@1": 26.0, "text_to_video_R@5": 49.4, "text_to_video_R@10": 60.7},
    "Frozen-in-Time": {"text_to_video_R@1": 18.7, "text_to_video_R@5": 39.5, "text_to_video_R@10": 51.6},
    "VideoCLIP": {"text_to_video_R@1": 10.4, "text_to_video_R@5": 22.2, "text_to_video_R@10": 30.0},
}
MSRVTT_NAMES = re.compile(r"msr-?vtt", re.IGNORECASE)

# Table 10: Kinetics fine-tuned, {dataset: {model: {metric: value}}} (4x3 views; VideoSwin-L also 10x5) [FL-T10].
ACTION: dict[str, dict[str, dict[str, float]]] = {
    "kinetics400": {"Florence": {"top1": 86.5, "top5": 97.3}, "VideoSwin-L": {"top1": 84.6, "top5": 96.5},
                    "ViViT-H/16x2": {"top1": 84.8, "top5": 95.8}, "TokenLearner 16at18+L/10": {"top1": 85.4,
                                                                                              "top5": 96.3}},
    "kinetics600": {"Florence": {"top1": 87.8, "top5": 97.8}, "VideoSwin-L": {"top1": 85.9, "top5": 97.1},
                    "ViViT-H/16x2": {"top1": 85.8, "top5": 96.5}, "TokenLearner 16at18+L/10": {"top1": 86.3,
                                                                                              "top5": 97.0}},
}


def kinetics_split(dataset: str) -> str | None:
    """``kinetics400`` / ``kinetics600`` for an ``florence eval action`` result name naming one (``k400_val``,
    ``kinetics-600``), else None (other data has no paper number)."""
    match = re.search(r"(?:kinetics|k)[-_]?(400|600)", dataset, re.IGNORECASE)
    return f"kinetics{match.group(1)}" if match else None


def reference_rows(task: str, dataset: str, metric: str) -> list[tuple[str, float]]:
    """``[(model, value %), ...]`` for one result: Florence first, then the CLIP baselines (where reported).

    ``task`` is ``zeroshot``, ``linear-probe``, ``classify`` (Table 3), ``detection`` (Table 6), ``retrieval`` or
    ``retrieval-finetune`` (Table 5), ``vqa`` (Table 8: test-dev ``overall`` of Florence and METER, VQAv2 data
    only), ``video-retrieval`` (Table 9, MSR-VTT only) or ``action`` (Table 10, Kinetics only); classification
    tables are compared on the dataset's paper metric only (``paper_metric``), retrieval
    tables per R@K key.
    """
    if task in ("zeroshot", "linear-probe"):
        if task == "zeroshot" and dataset == "imagenet" and metric == "top5":
            return [(FLORENCE, FLORENCE_IMAGENET_ZERO_SHOT_TOP5)]
        if metric != paper_metric(dataset):
            return []
        table = ZERO_SHOT if task == "zeroshot" else LINEAR_PROBE
        rows = [(m, table[m].get(dataset)) for m in (FLORENCE, *CLIP_BASELINES)]
        return [(m, v) for m, v in rows if v is not None]
    if task == "classify":  # Table 3 reports ImageNet only; the other rows are its baselines
        if dataset != "imagenet":
            return []
        order = ["Florence-CoSwin-H"] + [m for m in FINE_TUNED_IMAGENET if m != "Florence-CoSwin-H"]
        return [(m, FINE_TUNED_IMAGENET[m][metric]) for m in order if metric in FINE_TUNED_IMAGENET[m]]
    if task == "detection":
        paper_metric_name, rows = DETECTION.get(DETECTION_ALIASES.get(dataset, dataset), ("", {}))
        return list(rows.items()) if metric == paper_metric_name else []
    if task == "vqa":  # Table 8: test-dev, for results on VQAv2 data only
        if metric != "overall" or not is_vqav2(dataset):
            return []
        return [(m, VQA[m][0]) for m in ("Florence", "METER (CLIP-ViT-B/16 + RoBERTa)")]
    if task == "video-retrieval":
        if not MSRVTT_NAMES.search(dataset):
            return []
        return [(m, row[metric]) for m, row in VIDEO_RETRIEVAL.items() if metric in row]
    if task == "action":
        split = kinetics_split(dataset)
        rows = ACTION.get(split, {}) if split else {}
        return [(m, row[metric]) for m, row in rows.items() if metric in row]
    if task in ("retrieval", "retrieval-finetune"):
        table = RETRIEVAL_ZERO_SHOT if task == "retrieval" else RETRIEVAL_FINE_TUNED
        rows = [("Florence", table["Florence"].get(dataset, {}).get(metric))]
        if "CLIP" in table:
            rows.append(("CLIP", table["CLIP"].get(dataset, {}).get(metric)))
        return [(m, v) for m, v in rows if v is not None]
    return []
