"""The vqa and vlp tasks end to end on tiny Fashion-MNIST VQA canvases: training, soft-target loss, the official metric
in periodic evaluation, resume, the VLP draws (MLM masking, ITM false images) and ``florence demo vqa``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import florence
from florence.adapters.meter import MeterModel
from florence.adapters.vlp_task import IGNORE, draw_false_images, mask_tokens
from florence.adapters.vqa_task import VQATask, long_questions
from florence.benchmarks import vqa_canvas, vqa_demo
from florence.engine import train
from florence.engine.config import ConfigError, load_config
from florence.tokenizer import train_bpe_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread_module")

TINY = {"fusion": {"hidden_size": 32, "num_layers": 1, "num_heads": 4, "intermediate_size": 64},
        "max_text_len": 16,
        "preprocess": {"input_size": [3, 96, 96], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic",
                       "crop_pct": 1.0}}


@pytest.fixture(scope="module")
def vqa_data(tmp_path_factory, fake_fmnist) -> Path:
    root = tmp_path_factory.mktemp("vqa_data")
    vqa_canvas.generate(root, "train", 12, seed=0, root=fake_fmnist)
    vqa_canvas.generate(root, "test", 4, seed=1, root=fake_fmnist)
    return root


@pytest.fixture(scope="module")
def dual_bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dual")
    texts = ["is there a bag?", "how many sneakers are there?", "what is in the top left corner?",
             "what is the largest item?", "what is left of the sandal?", "a photo of a coat."]
    train_bpe_tokenizer(texts * 3, root / "tok", vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    return florence.create_model("unicl_test", tokenizer=str(root / "tok")).save_pretrained(root / "model")


def _files(data: Path, split: str) -> dict:
    return {"questions": str(data / f"v2_OpenEnded_fmnist_{split}_questions.json"),
            "annotations": str(data / f"v2_fmnist_{split}_annotations.json"), "images": str(data / split)}


def _vqa_config(tmp_path: Path, data: Path, backbone: Path, **task) -> Path:
    config = {
        "task": {"name": "vqa", "min_answer_count": 1, **task},
        "model": {"name": "meter_coswin_test", "backbone": str(backbone), "overrides": TINY},
        "data": {"sources": [_files(data, "train")]},
        "optim": {"lr": 1e-3, "batch_size": 4, "lr_mult": {"fusion": 5, "vqa_head": 50}, "decay_embeddings": False},
        "schedule": {"steps": 4, "warmup_fraction": 0.25, "decay": "linear"},
        "checkpoint": {"every_steps": 2},
        "output": {"dir": str(tmp_path / "run"), "log_every": 1},
        "eval": {"source": {"type": "vqa", **_files(data, "test")}, "every_steps": 2, "best_metric": "overall"},
        "num_threads": 1,
    }
    path = tmp_path / "vqa.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, vqa_data, dual_bundle) -> Path:
    tmp = tmp_path_factory.mktemp("vqa_run")
    assert train.main([str(_vqa_config(tmp, vqa_data, dual_bundle))]) == 0
    return tmp / "run"


@pytest.mark.slow
def test_vqa_training_writes_a_bundle_with_its_vocabulary_and_official_metrics(trained):
    model = florence.from_pretrained(trained / "final")
    answers = json.loads((trained / "answers.json").read_text())
    assert isinstance(model, MeterModel) and model.answers == answers and model.heads == ["vqa"]
    assert {"yes", "no"} <= set(answers)
    lines = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(line["loss"])) for line in lines if "loss" in line)
    assert "vqa_score" in lines[0]
    evaluated = [line for line in lines if "eval/overall" in line]
    assert len(evaluated) == 2 and all(0.0 <= line["eval/overall"] <= 100.0 for line in evaluated)
    assert {"eval/yes/no", "eval/number", "eval/other"} <= set(evaluated[-1])
    assert (trained / "best" / "manifest.json").is_file()


@pytest.mark.slow
def test_vqa_resume_continues_exactly(tmp_path, vqa_data, dual_bundle):
    """Stopped after step 3 (last checkpoint: step 2) and run again: the losses of the uninterrupted run (dropout on,
    so the RNG state and the data position must both come back)."""
    overrides = ["eval.source=null", "eval.every_steps=null", "eval.best_metric=null",
                 "model.overrides.fusion.dropout=0.1"]
    path = _vqa_config(tmp_path, vqa_data, dual_bundle)
    full = train.run(load_config(path, [*overrides, f"output.dir={tmp_path / 'full'}"]))
    cfg = load_config(path, [*overrides, f"output.dir={tmp_path / 'cut'}"])
    first = train.run(cfg, stop_after_steps=3)
    resumed = train.run(cfg)
    assert sorted(resumed.losses) == [3, 4]
    assert {**first.losses, **resumed.losses} == full.losses


def test_soft_target_loss_is_meters_bce_times_vocabulary(tmp_path, vqa_data, dual_bundle):
    task = VQATask(load_config(_vqa_config(tmp_path, vqa_data, dual_bundle)), VQATask.Options())
    logits = torch.tensor([[2.0, -1.0, 0.0], [0.5, 0.5, -3.0]])
    targets = torch.tensor([[1.0, 0.0, 0.3], [0.0, 0.6, 0.0]])
    loss, scalars = task.loss({"logits": logits}, {"targets": targets})
    # per element: -(t log s(x) + (1 - t) log(1 - s(x))); summed over the 3 answers, averaged over the 2 questions
    s = torch.sigmoid(logits)
    by_hand = -(targets * s.log() + (1 - targets) * (1 - s).log()).sum() / 2
    torch.testing.assert_close(loss, by_hand)
    # the top answers are 0 (target 1.0) and 0 (ties pick the first: target 0.0)
    assert scalars["vqa_score"].item() == pytest.approx(0.5)


def test_vqa_config_errors_name_the_key(tmp_path, vqa_data, dual_bundle):
    path = _vqa_config(tmp_path, vqa_data, dual_bundle)
    with pytest.raises(ConfigError, match="eval.source"):
        train.resolve_task(load_config(path, ["eval.source={type: coco, annotations: a, images: b}"])).validate()
    with pytest.raises(ConfigError, match="task.min_answer_count"):
        train.resolve_task(load_config(path, ["task.min_answer_count=0"])).validate()
    bad = tmp_path / "answers.json"
    bad.write_text('["yes", "yes"]')
    task = train.resolve_task(load_config(path, [f"task.answers={bad}"]))
    with pytest.raises(ConfigError, match="task.answers"):
        task.answer_vocabulary()


def test_long_questions_are_found(dual_bundle):
    tokenizer = florence.from_pretrained(dual_bundle).tokenizer
    texts = ["is there a bag?", "what is in the bottom left corner of this picture?", "is there a bag?"]
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    cut = long_questions(texts, tokenizer, lengths[0])
    assert cut == [(lengths[1], texts[1])]
    assert long_questions(texts, tokenizer, lengths[1]) == []


def test_mlm_masking_follows_berts_recipe():
    torch.manual_seed(0)
    ids = torch.randint(5, 100, (64, 32))
    ids[:, 0], ids[:, -1] = 0, 2  # <s> ... </s>
    mask = torch.ones_like(ids)
    mask[:, 24:] = 0  # padding
    ids[:, 24:] = 1
    masked, labels = mask_tokens(ids, mask, probability=0.15, mask_token_id=4, vocab_size=100, special_ids=[0, 1, 2])
    chosen = labels != IGNORE
    assert not chosen[:, 0].any() and not chosen[:, 24:].any()  # never <s> or padding
    torch.testing.assert_close(labels[chosen], ids[chosen])  # the targets are the original tokens
    assert (masked[~chosen] == ids[~chosen]).all()  # nothing else changes
    rate = chosen.sum().item() / (64 * 23)
    assert 0.11 < rate < 0.19
    to_mask = (masked[chosen] == 4).float().mean().item()
    assert 0.7 < to_mask < 0.9  # 80% <mask> (+ a few random draws that hit the mask id)


def test_itm_false_images_come_from_other_labels():
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    source, matched = draw_false_images(labels, 0.5)
    assert matched.sum().item() == 4  # half the pairs keep their image
    negatives = matched == 0
    assert (labels[source[negatives]] != labels[negatives]).all()
    source, matched = draw_false_images(torch.zeros(4, dtype=torch.long), 1.0)  # one label: nothing to draw from
    assert matched.tolist() == [1, 1, 1, 1]


@pytest.mark.slow
def test_vlp_pretraining_then_vqa_fine_tuning(tmp_path, fake_fmnist, vqa_data, dual_bundle):
    config = {
        "task": {"name": "vlp"},
        "model": {"name": "meter_coswin_test", "backbone": str(dual_bundle), "overrides": TINY},
        "data": {"sources": [{"type": "fashion_mnist", "path": str(fake_fmnist), "split": "train",
                              "templates": ["a photo of a {}."]}]},
        "optim": {"lr": 1e-3, "batch_size": 8},
        "schedule": {"steps": 3},
        "output": {"dir": str(tmp_path / "vlp"), "log_every": 1},
        "num_threads": 1,
    }
    path = tmp_path / "vlp.yaml"
    path.write_text(yaml.safe_dump(config))
    assert train.main([str(path)]) == 0
    lines = [json.loads(line) for line in (tmp_path / "vlp" / "metrics.jsonl").read_text().splitlines()]
    assert {"mlm_loss", "itm_loss", "itm_acc"} <= set(lines[0])
    pretrained = florence.from_pretrained(tmp_path / "vlp" / "final")
    assert sorted(pretrained.heads) == ["itm", "mlm"]
    # VQA from the VLP bundle: the ITM / MLM heads give way to a fresh VQA head, the fusion is kept
    vqa = _vqa_config(tmp_path, vqa_data, dual_bundle)
    assert train.main([str(vqa), "model.name=null", "model.backbone=null", "model.overrides={}",
                       f"model.pretrained={tmp_path / 'vlp' / 'final'}", "schedule.steps=1", "eval.source=null",
                       "eval.every_steps=null", "eval.best_metric=null", f"output.dir={tmp_path / 'ft'}"]) == 0
    tuned = florence.from_pretrained(tmp_path / "ft" / "final")
    assert tuned.heads == ["vqa"] and tuned.num_answers > 2


def test_packaged_recipe_is_valid():
    path = vqa_demo.packaged_config("vqa", "fashion_mnist_meter.yaml")
    cfg = load_config(path)
    assert cfg.task["name"] == "vqa" and cfg.optim.lr_mult == {"fusion": 5, "vqa_head": 50}
    train.resolve_task(cfg).validate_data()


@pytest.mark.slow
@pytest.mark.skipif(not Path(vqa_canvas.FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="needs the Debian package dataset-fashion-mnist")
def test_vqa_demo_end_to_end_tiny(tmp_path, dual_bundle, capsys):
    code = vqa_demo.main(["--workdir", str(tmp_path / "demo"), "--backbone", str(dual_bundle), "--baseline",
                          "--train-images", "8", "--test-images", "4", "schedule.steps=2", "optim.batch_size=4",
                          "task.min_answer_count=1", "checkpoint.every_steps=1000",
                          "model.overrides.fusion={hidden_size: 32, num_layers: 1, num_heads: 4, "
                          "intermediate_size: 64}"])
    assert code == 0
    results = tmp_path / "demo" / "results"
    for name in ("meter", "concat"):
        metrics = json.loads((results / f"vqa_fashion_mnist_{name}.json").read_text())["metrics"]
        assert 0.0 <= metrics["overall"] <= 100.0
    assert list(results.glob("*.png"))
    out = capsys.readouterr().out
    assert "VQA demo finished" in out and "baseline without co-attention" in out
