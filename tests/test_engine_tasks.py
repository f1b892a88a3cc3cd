"""The task-agnostic engine: the classification task end to end, accumulation, fine-tuning controls (against timm's
layer-wise decay), periodic evaluation and the best bundle, config validation before anything is written, resume
and 2-process runs for a task other than UniCL."""
from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch
import yaml

from florence.engine.config import ConfigError, config_from_dict
from florence.engine.metrics import read_metrics
from florence.engine.train import main, resolve_task, run, setup

CLASSES = ("circle", "square", "stripes", "dots")
PREPROCESS = {"input_size": [3, 28, 28], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic",
              "crop_pct": 1.0}




def classify_config(shapes: Path, run_dir: Path, **sections) -> dict:
    """Classification from scratch with coswin_test (drop-path on, so resume has RNG streams to restore)."""
    cfg = {
        "task": {"name": "classify", "label_smoothing": 0.1},
        "model": {"name": "coswin_test", "overrides": {"drop_path_rate": 0.1, "preprocess": PREPROCESS}},
        "data": {"sources": [{"type": "image_folder", "path": str(shapes)}], "augment": {"scale": [0.7, 1.0]}},
        "optim": {"lr": 2e-3, "batch_size": 8, "weight_decay": 0.05},
        "schedule": {"steps": 6, "warmup_steps": 2},
        "checkpoint": {"every_steps": 3, "keep_last": 2},
        "output": {"dir": str(run_dir), "log_every": 1, "progress": False, "tensorboard": False},
        "seed": 3,
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    return cfg


# -- accumulation -----------------------------------------------------------------------------------------------


def _step_gradients(shapes: Path, tmp_path: Path, name: str, accum: int) -> dict[str, torch.Tensor]:
    """The gradient the optimizer receives in the first step (captured just before ``optimizer.step``)."""
    cfg = config_from_dict(classify_config(shapes, tmp_path / name, optim={"accum_steps": accum, "clip_grad_norm": None},
                                           model={"overrides": {"preprocess": PREPROCESS}},
                                           task={"name": "classify"}, data={"augment": {"hflip": 0.0,
                                                                                        "scale": [1.0, 1.0],
                                                                                        "ratio": [1.0, 1.0]}}))
    state = setup(cfg)
    captured = {}

    def capture(*args, **kwargs):
        captured.update({n: p.grad.detach().clone() for n, p in state.model.named_parameters() if p.grad is not None})

    state.ctx.optimizer.step = capture
    from florence.engine.step import train_step
    from florence.engine.train import _batches

    batches = _batches(state.loader)
    train_step(state.ctx, [next(batches) for _ in range(accum)])
    return captured


def test_accumulation_gives_the_full_batch_gradient(shapes, tmp_path):
    """Two micro-batches of 4 accumulate exactly the gradient of one batch of 8 (same samples: the data stream is the
    global batch split in order). A missing ``1 / accum_steps`` doubles it (AdamW would hide that: its first update
    does not depend on the gradient's scale, so the gradient itself is compared)."""
    full = _step_gradients(shapes, tmp_path, "full", 1)
    accumulated = _step_gradients(shapes, tmp_path, "accum", 2)
    assert full.keys() == accumulated.keys() and len(full) > 10
    largest = max(g.abs().max().item() for g in full.values())
    worst = max((full[k] - accumulated[k]).abs().max().item() for k in full)
    assert largest > 1e-3 and worst <= 1e-6 * max(1.0, largest), (worst, largest)


# -- fine-tuning controls ---------------------------------------------------------------------------------------


def _scales(groups, model) -> dict[str, tuple[float, float]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}


@pytest.mark.parametrize("name", ["swin_tiny", "coswin_test"])
def test_layer_decay_equals_timm(name):
    """Per-parameter LR scale and weight decay equal timm's ``param_groups_layer_decay`` on the same model."""
    import florence
    from timm.optim import param_groups_layer_decay

    from florence.engine.optim import param_groups

    model = florence.create_model(name, num_classes=5)
    ours = _scales(param_groups(model, 0.05, layer_decay=0.7), model)
    theirs = _scales(param_groups_layer_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay(),
                                              layer_decay=0.7), model)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key] == pytest.approx(theirs[key]), key
    assert len({s for s, _ in ours.values()}) == sum(len(stage.blocks) for stage in model.layers) + 2
    assert ours["head.fc.weight"][0] == 1.0 and ours["patch_embed.proj.weight"][0] < ours["norm.weight"][0]


def test_lr_mult_freeze_and_embedding_decay(tmp_path):
    import florence

    from florence.engine.optim import OptimConfigError, freeze_modules, param_groups, warmup_decay

    model = florence.create_model("coswin_test", num_classes=3)
    assert freeze_modules(model, ["patch_embed"]) == 4
    scales = _scales(param_groups(model, 0.1, lr=2.0, lr_mult={"": 0.1, "head": 50}), model)
    assert "patch_embed.proj.weight" not in scales
    assert scales["head.fc.weight"] == (50, 0.1) and scales["layers.0.blocks.0.mlp.fc1.weight"] == (0.1, 0.1)
    assert scales["head.fc.bias"] == (50, 0.0)
    with pytest.raises(OptimConfigError, match="'haed'"):
        param_groups(model, 0.1, lr_mult={"haed": 2})
    # a key with * is a glob over parameter names, longer than (so winning over) a module prefix
    globbed = _scales(param_groups(model, 0.1, lr_mult={"layers": 2, "*.relative_position_bias_table": 50}), model)
    tables = [k for k in globbed if k.endswith("relative_position_bias_table")]
    assert len(tables) == 5 and all(globbed[k] == (50, 0.0) for k in tables)
    assert globbed["layers.0.blocks.0.attn.qkv.weight"] == (2, 0.1) and globbed["norm.weight"] == (1.0, 0.0)
    with pytest.raises(OptimConfigError, match="'\\*.nothing'"):
        param_groups(model, 0.1, lr_mult={"*.nothing": 2})
    with pytest.raises(OptimConfigError, match="'nothing'"):
        freeze_modules(model, ["nothing"])
    emb = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 3))
    assert _scales(param_groups(emb, 0.1), emb)["0.weight"] == (1.0, 0.1)
    assert _scales(param_groups(emb, 0.1, decay_embeddings=False), emb)["0.weight"] == (1.0, 0.0)
    linear = [warmup_decay(s, total_steps=10, warmup_steps=2, min_lr_ratio=0.0, decay="linear") for s in range(11)]
    assert linear[:3] == [0.5, 1.0, 1.0] and linear[6] == pytest.approx(0.5) and linear[10] == 0.0


# -- end to end -------------------------------------------------------------------------------------------------


def test_classification_from_scratch_learns_and_keeps_best(shapes, tmp_path):
    """A short run learns the 4 shapes; evaluation every 10 steps lands in metrics.jsonl, the best bundle is kept and
    reloads with its class names, and the final bundle is evaluated (eval.json)."""
    import florence

    cfg = classify_config(shapes, tmp_path / "run", schedule={"steps": 30, "warmup_steps": 3},
                          eval={"source": {"type": "image_folder", "path": str(shapes)}, "every_steps": 10,
                                "best_metric": "top1"}, checkpoint={"every_steps": None}, optim={"layer_decay": 0.9})
    result = run(config_from_dict(cfg))
    evals = [r for r in read_metrics(tmp_path / "run") if "eval/top1" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert result.best["metric"] == "top1" and result.best["value"] == max(r["eval/top1"] for r in evals)
    assert result.eval_metrics["top1"] >= 0.75, result.eval_metrics  # 4 classes: chance is 0.25
    assert json.loads((tmp_path / "run" / "best.json").read_text())["step"] == result.best["step"]
    best = florence.from_pretrained(tmp_path / "run" / "best")
    assert best.class_names == sorted(CLASSES) and best.num_classes == 4
    assert best(torch.zeros(2, 3, 28, 28)).shape == (2, 4)
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["metrics"] == result.eval_metrics
    assert any("train_top1" in r for r in read_metrics(tmp_path / "run"))


def test_fine_tuning_from_a_dual_encoder_bundle(shapes, tmp_path):
    """model.backbone = a UniCL bundle: its image tower (and preprocessing) with a new head; EMA weights go into the
    final bundle; mixup runs."""
    import florence
    from florence.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer([f"a photo of a {c}." for c in CLASSES] * 4, tmp_path / "tok", vocab_size=262)
    dual = florence.create_model("unicl_test", tokenizer=str(tmp_path / "tok"), preprocess=PREPROCESS,
                                 text={"vocab_size": 262})
    dual.save_pretrained(tmp_path / "dual")
    cfg = classify_config(shapes, tmp_path / "ft", schedule={"steps": 4}, checkpoint={"every_steps": None},
                          task={"name": "classify", "mixup": 0.8, "cutmix": 1.0},
                          optim={"ema_decay": 0.5, "lr_mult": {"head": 10.0}})
    cfg["model"] = {"backbone": str(tmp_path / "dual"), "overrides": {"drop_path_rate": 0.05}}
    state = setup(config_from_dict(cfg))
    tower = state.model
    assert tower.preprocess == PREPROCESS and tower.num_classes == 4
    torch.testing.assert_close(tower.layers[0].blocks[0].attn.qkv.weight,
                               dual.image_encoder.layers[0].blocks[0].attn.qkv.weight)
    result = run(config_from_dict(cfg))
    assert all(math.isfinite(v) for v in result.losses.values())
    final = florence.from_pretrained(result.final_dir)
    assert final.florence_config["overrides"]["drop_path_rate"] == 0.05


@pytest.mark.parametrize("override, key", [
    ("task.label_smothing=0.1", "task.label_smothing"),
    ("data.augment.scael=[0.5,1.0]", "data.augment.scael"),
    ("data.sources=[{type: image_folder, pth: x}]", r"data.sources\[0\].pth"),
    ("model.overrides.preprocess.men=[0.5]", "model.overrides.preprocess.men"),
    ("task=clasify", "clasify"),
    ("optim.lr_mult={haed: 2}", "haed"),
])
def test_config_errors_name_the_key_and_leave_nothing(shapes, tmp_path, override, key, capsys):
    """A typo anywhere in the config is one line naming the key, exit 2, and no run directory."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(classify_config(shapes, tmp_path / "never")))
    assert main([str(path), override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"florence train: {path}")
    assert __import__("re").search(key.replace(".", r"\."), err), err
    assert not (tmp_path / "never").exists()


def test_help_lists_every_config_key(capsys):
    from florence.engine.config import RunConfig

    assert main(["--help"]) == 0
    assert "--help-config" in capsys.readouterr().out
    assert main(["--help-config", "classify"]) == 0
    text = capsys.readouterr().out
    import dataclasses

    for section in dataclasses.fields(RunConfig):
        value = section.default_factory() if section.default_factory is not dataclasses.MISSING else None
        names = [f"{section.name}.{f.name}" for f in dataclasses.fields(value)] if dataclasses.is_dataclass(value) \
            else [section.name]
        for name in names:
            assert f"`{name}`" in text, name
    assert "`task.label_smoothing`" in text and "`optim.layer_decay`" in text
    from florence.engine.train import config_docs

    docs = Path(__file__).parents[1] / "docs" / "CONFIG.md"
    assert docs.read_text() == config_docs(), "docs/CONFIG.md is stale: florence train --help-config --markdown > it"


def test_unknown_task_and_class_path(tmp_path):
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        resolve_task(config_from_dict({"task": "nope", "model": {"name": "coswin_test"}, "schedule": {"steps": 1}}))
    task = resolve_task(config_from_dict({"task": "florence.adapters.classify:ClassifyTask",
                                          "model": {"name": "coswin_test"}, "schedule": {"steps": 1},
                                          "data": {"sources": [{"type": "fashion_mnist"}]}}))
    assert task.name == "classify"


# -- resume and distributed -------------------------------------------------------------------------------------


@pytest.mark.slow  # two fresh training processes
def test_classification_resume_after_kill_is_bit_exact(shapes, tmp_path):
    """SIGKILL after step 4 (checkpoint at 3), resume in a fresh process: identical per-step losses, identical final
    weights, with drop-path, mixup (numpy RNG), EMA and periodic evaluation (which must not disturb the RNG) on."""
    import florence
    from test_engine_train import _train_process

    extra = dict(num_threads=1, task={"name": "classify", "mixup": 0.5}, optim={"ema_decay": 0.9},
                 eval={"source": {"type": "image_folder", "path": str(shapes)}, "every_steps": 2,
                       "best_metric": "top1", "at_end": False})
    full = run(config_from_dict(classify_config(shapes, tmp_path / "full", **extra)))
    run_dir = tmp_path / "killed"
    config = classify_config(shapes, run_dir, **extra)
    killed = _train_process(config, tmp_path / "killed.yaml", FLORENCE_KILL_AT_STEP="4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = _train_process(config, tmp_path / "killed.yaml")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    losses = {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
    assert losses == full.losses
    a, b = florence.from_pretrained(tmp_path / "full" / "final"), florence.from_pretrained(run_dir / "final")
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert json.loads((run_dir / "best.json").read_text())["value"] == full.best["value"]


@pytest.mark.slow
def test_classification_two_processes_match_one(shapes, tmp_path):
    """torchrun with 2 gloo processes (global batch 8 = 2 x 4, DDP) matches 1 process at batch 8."""
    from test_engine_train import _final_params, _torchrun

    def config(name):
        cfg = classify_config(shapes, tmp_path / name, schedule={"steps": 4})
        cfg["model"]["overrides"]["drop_path_rate"] = 0.0
        return cfg

    single = run(config_from_dict(config("single")))
    multi_dir = _torchrun(config("multi"), tmp_path, "multi")
    multi = {r["step"]: r["loss"] for r in read_metrics(multi_dir)}
    for step, loss in single.losses.items():
        assert multi[step] == pytest.approx(loss, abs=1e-5), step
    a, b = _final_params(tmp_path / "single"), _final_params(multi_dir)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
