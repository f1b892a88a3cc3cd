"""Zero-shot classifier, metrics and template sets, checked against independent computations."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

from florence.adapters import zeroshot as zs
from florence.adapters.prompt_templates import DATASET_TEMPLATES, get_template_set
from florence.data.templates import make_prompt


def _toy_encoder(dim: int = 16):
    """A deterministic text 'encoder': a fixed random vector per prompt string (not normalised), and a call log."""
    calls = []

    def encode(prompts: list[str]) -> torch.Tensor:
        calls.append(len(prompts))
        rows = []
        for p in prompts:
            g = torch.Generator().manual_seed(sum(ord(ch) * (i + 1) for i, ch in enumerate(p)))
            rows.append(3.0 * torch.randn(dim, generator=g))
        return torch.stack(rows)

    return encode, calls


def test_classifier_is_the_normalised_mean_of_normalised_prompt_embeddings():
    encode, calls = _toy_encoder()
    classnames = ["cat", "dog", "ankle boot"]
    templates = ["a photo of a {}.", "a {c} in a video game.", "art of the {}."]
    got = zs.build_zeroshot_classifier(encode, classnames, templates, batch_size=4)
    # independent: one class at a time, one prompt at a time
    expected = []
    for c in classnames:
        vecs = [F.normalize(encode([t.replace("{c}", "{}").format(c)])[0], dim=0) for t in templates]
        expected.append(F.normalize(torch.stack(vecs).mean(0), dim=0))
    assert torch.allclose(got, torch.stack(expected), atol=1e-6)
    assert torch.allclose(got.norm(dim=1), torch.ones(3))
    assert calls[:3] == [4, 4, 1]  # 9 prompts in batches of 4 across class boundaries


def test_classifier_does_not_depend_on_batch_size():
    encode, _ = _toy_encoder()
    a = zs.build_zeroshot_classifier(encode, ["a", "b", "c", "d"], ["x {}", "y {}"], batch_size=1)
    b = zs.build_zeroshot_classifier(encode, ["a", "b", "c", "d"], ["x {}", "y {}"], batch_size=1000)
    assert torch.allclose(a, b, atol=1e-6)


def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(300, 12))
    labels = rng.integers(0, 12, size=300)
    scores[np.arange(300)[:100], labels[:100]] += 3.0  # some signal
    got = zs.classification_metrics(scores, labels)
    assert got["top1"] == pytest.approx(top_k_accuracy_score(labels, scores, k=1, labels=range(12)))
    assert got["top5"] == pytest.approx(top_k_accuracy_score(labels, scores, k=5, labels=range(12)))
    assert got["mean_per_class"] == pytest.approx(balanced_accuracy_score(labels, scores.argmax(1)))


def test_mean_per_class_differs_from_top1_on_imbalanced_data():
    scores = np.array([[1, 0], [1, 0], [1, 0], [1, 0]], dtype=float)  # always predicts class 0
    labels = np.array([0, 0, 0, 1])
    m = zs.classification_metrics(scores, labels)
    assert m["top1"] == pytest.approx(0.75) and m["mean_per_class"] == pytest.approx(0.5)


def test_voc11_average_precision_by_hand():
    # ranked: pos, neg, pos, neg, neg -> precision 1, 1/2, 2/3, 1/2, 2/5 ; recall .5, .5, 1, 1, 1
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    targets = np.array([1, 0, 1, 0, 0])
    # recall thresholds 0..0.5 (6 points): max precision 1; 0.6..1.0 (5 points): 2/3
    assert zs.voc11_average_precision(scores, targets) == pytest.approx((6 * 1.0 + 5 * 2 / 3) / 11)
    # a difficult (-1) sample is ignored, wherever it ranks
    with_difficult = zs.voc11_average_precision(np.append(scores, 0.95), np.append(targets, -1))
    assert with_difficult == pytest.approx((6 * 1.0 + 5 * 2 / 3) / 11)


def _voc07_devkit_ap(scores: np.ndarray, targets: np.ndarray) -> float:
    """The VOC2007 devkit recipe written independently: sorted tp/fp, cumulative, 11 recall points."""
    order = np.argsort(-scores, kind="stable")
    tp = (targets[order] == 1).astype(float)
    fp = 1.0 - tp
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec = tp / (targets == 1).sum()
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        p = 0.0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
        ap += p / 11.0
    return ap


def test_voc11_map_matches_devkit_recipe_and_is_one_for_a_perfect_ranking():
    rng = np.random.default_rng(1)
    targets = (rng.random((200, 5)) < 0.3).astype(int)
    scores = rng.normal(size=(200, 5)) + 1.5 * targets
    expected = np.mean([_voc07_devkit_ap(scores[:, c], targets[:, c]) for c in range(5)])
    assert zs.voc11_map(scores, targets)["map_11point"] == pytest.approx(expected)
    assert zs.voc11_map(targets.astype(float), targets)["map_11point"] == pytest.approx(1.0)


def test_template_hash_depends_on_templates_and_class_order():
    h = zs.template_hash(["a {}."], ["cat", "dog"])
    assert h == zs.template_hash(("a {}.",), ("cat", "dog"))
    assert h != zs.template_hash(["a {}."], ["dog", "cat"])
    assert h != zs.template_hash(["the {}."], ["cat", "dog"])


def test_class_embeddings_are_cached_on_disk(tmp_path):
    encode, calls = _toy_encoder()

    def build():
        return zs.build_zeroshot_classifier(encode, ["a", "b"], ["{}"], batch_size=8)

    first, hit1 = zs.cached_class_embeddings(tmp_path, "m" * 64, ["a", "b"], ["{}"], "fp32", build)
    second, hit2 = zs.cached_class_embeddings(tmp_path, "m" * 64, ["a", "b"], ["{}"], "fp32", build)
    other, hit3 = zs.cached_class_embeddings(tmp_path, "n" * 64, ["a", "b"], ["{}"], "fp32", build)
    bf16, hit4 = zs.cached_class_embeddings(tmp_path, "m" * 64, ["a", "b"], ["{}"], "bf16", build)  # own key
    assert (hit1, hit2, hit3, hit4) == (False, True, False, False)
    assert torch.equal(first, second) and len(calls) == 3


class _OnAnotherDevice:
    """Stands in for a tensor built on a GPU: only ``.float()`` and ``.cpu()`` (which hands back the CPU tensor)."""

    def __init__(self, cpu_tensor: torch.Tensor):
        self.cpu_tensor = cpu_tensor

    def float(self):
        return self

    def cpu(self) -> torch.Tensor:
        return self.cpu_tensor


@pytest.mark.parametrize("use_cache", [False, True])
def test_class_embeddings_come_back_on_the_cpu(tmp_path, use_cache):
    built = torch.randn(3, 4)
    got, from_cache = zs.cached_class_embeddings(tmp_path if use_cache else None, "m" * 64, ["a", "b", "c"], ["{}"],
                                                 "fp32", lambda: _OnAnotherDevice(built))
    assert from_cache is False and isinstance(got, torch.Tensor) and got.device.type == "cpu"
    assert torch.equal(got, built)


def test_eval_prompts_are_the_training_prompts():
    """Zero-shot prompts come from ``florence.data.templates.format_prompt``: class names cleaned as in training,
    a synonym list contributes its first name."""
    seen = []

    def encode(prompts: list[str]) -> torch.Tensor:
        seen.extend(prompts)
        return torch.randn(len(prompts), 8)

    classnames = ["tench, Tinca tinca", ["rock+roll", "music"]]
    zs.build_zeroshot_classifier(encode, classnames, ["a photo of a {}.", "{c} art"], batch_size=16)
    assert seen == ["a photo of a tench Tinca tinca.", "tench Tinca tinca art", "a photo of a rock roll.",
                    "rock roll art"]
    import random

    assert make_prompt("tench, Tinca tinca", ("a photo of a {}.",), random.Random(0)) == seen[0]


def test_template_sets_have_clip_counts():
    counts = {k: len(v) for k, v in DATASET_TEMPLATES.items()}
    assert counts == {"cifar10": 18, "cifar100": 18, "food101": 1, "sun397": 2, "cars": 8, "fgvc_aircraft": 2,
                      "voc2007": 1, "dtd": 8, "pets": 1, "caltech101": 34, "flowers102": 1}
    assert len(get_template_set("imagenet")) == 80
    assert all(t.count("{}") == 1 for v in DATASET_TEMPLATES.values() for t in v)
    assert DATASET_TEMPLATES["food101"] == ("a photo of {}, a type of food.",)


def test_classifier_matches_open_clip_on_the_same_encoder():
    """Same text encoder, class names and templates: our prompt-ensemble classifier equals open_clip's
    ``build_zero_shot_classifier`` (which returns it transposed, (D, C)), column for column in the class order."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    encode, _ = _toy_encoder()

    class Shim:  # open_clip calls tokenizer(texts).to(device) and model.encode_text(tokens, normalize=True)
        def tokenizer(self, texts):
            self.texts = texts
            return torch.zeros(len(texts))

        def encode_text(self, tokens, normalize=True):
            return F.normalize(encode(self.texts), dim=-1)

    shim = Shim()
    classnames = ["ankle boot", "bag", "coat", "dress", "pullover"]
    templates = ["a photo of a {}.", "a blurry photo of the {}.", "itap of my {}."]
    reference = build_zero_shot_classifier(shim, shim.tokenizer, classnames, templates, num_classes_per_batch=2)
    ours = zs.build_zeroshot_classifier(encode, classnames, templates, batch_size=4)
    assert torch.allclose(ours, reference.T, atol=1e-6)


class _Colours(torch.utils.data.Dataset):
    """Solid-colour 2x2 images labelled red 0 / green 1 / blue 2; sample 2 is an undecodable file."""

    items = [(0, 0), (2, 2), None, (1, 1), (0, 0)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from florence.data.images import BadSample

        if self.items[i] is None:
            raise BadSample("broken.png", "empty file")
        channel, label = self.items[i]
        image = torch.zeros(3, 2, 2)
        image[channel] = 1.0
        return image, label


class _ColourModel(torch.nn.Module):
    """A dual encoder that sees colours: an image is its mean colour, a prompt is the one-hot of the colour it
    names. Zero-shot classification of _Colours is then exact."""

    names = ("red", "green", "blue")

    def __init__(self):
        super().__init__()
        self.image_projection = torch.nn.Linear(3, 3, bias=False)

    def tokenize(self, texts):
        ids = torch.tensor([[next(i for i, n in enumerate(self.names) if n in t)] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def encode_text(self, input_ids, attention_mask, normalize=True):
        return F.one_hot(input_ids[:, 0], 3).float()

    def encode_image(self, images, normalize=True):
        return F.normalize(images.mean(dim=(2, 3)), dim=-1)


def test_evaluate_zeroshot_skips_bad_samples_and_restores_the_mode():
    model = _ColourModel().train()
    ev = zs.evaluate_zeroshot(model, _Colours(), list(_ColourModel.names), batch_size=2)
    assert model.training  # restored
    assert ev.metrics == {"top1": 1.0, "top5": 1.0, "mean_per_class": 1.0}
    assert ev.targets.tolist() == [0, 2, 1, 0] and ev.scores.shape == (4, 3)
    assert ev.scores.argmax(1).tolist() == [0, 2, 1, 0]
    assert ev.bad_samples["skipped"] == 1 and ev.bad_samples["evaluated"] == 4
    assert ev.bad_samples["samples"] == [{"file": "broken.png", "reason": "empty file"}]
    assert ev.trivial_metrics == ["top5"]  # 3 classes
    from florence.data.bad_samples import BadSampleError

    with pytest.raises(BadSampleError, match="broken.png: empty file"):
        zs.evaluate_zeroshot(model, _Colours(), list(_ColourModel.names), on_bad_sample="raise")


def test_evaluate_zeroshot_default_templates_are_the_80_clip_templates():
    import inspect

    from florence.data.templates import OPENAI_IMAGENET_TEMPLATES, UNICL_TEMPLATES

    default = inspect.signature(zs.evaluate_zeroshot).parameters["templates"].default
    assert default is zs.DEFAULT_TEMPLATES == OPENAI_IMAGENET_TEMPLATES and len(default) == 80
    assert len(UNICL_TEMPLATES) == 81  # training's set: "{}." + the 80


def test_an_image_tower_is_refused_with_a_user_error():
    from florence.errors import FlorenceError

    with pytest.raises(FlorenceError, match="needs a dual encoder"):
        zs.evaluate_zeroshot(torch.nn.Linear(2, 2), _Colours(), ["a", "b"])
