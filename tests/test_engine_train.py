"""Engine end to end on a tiny model and 32 generated images: resume, non-finite steps, outputs, torchrun DDP/FSDP."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from florence.engine.config import config_from_dict
from florence.engine.metrics import read_metrics
from florence.engine.train import NonFiniteLossError, fit, run, setup

CLASSES = ("circle", "square", "stripes", "dots")




def tiny_config(shapes: Path, run_dir: Path, **sections) -> dict:
    """A complete run config for the tiny model on the generated images (dropout and drop-path on, so resume has
    RNG streams to restore)."""
    cfg = {
        "model": {
            "name": "unicl_test",
            "train_tokenizer_vocab": 300,
            "context_length": 16,
            "overrides": {
                "image": {"drop_path_rate": 0.1},
                "text": {"hidden_dropout_prob": 0.1},
                "preprocess": {"input_size": [3, 28, 28], "mean": [0.5] * 3, "std": [0.25] * 3,
                               "interpolation": "bicubic", "crop_pct": 1.0},
            },
        },
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


def _train_process(config: dict, path: Path, **env) -> subprocess.CompletedProcess:
    """``python -m florence train CONFIG`` in a fresh process."""
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "florence", "train", str(path)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


@pytest.mark.slow  # two fresh training processes: 15-25 s on 2 cores
def test_resume_after_kill_gives_identical_losses(shapes, tmp_path):
    """A training process SIGKILLed after step 4 (last checkpoint: step 3) and resumed in a fresh process logs the
    same per-step losses and ends with the same parameters as an uninterrupted run (1 thread everywhere, so the
    in-process reference computes exactly like the subprocesses)."""
    import florence

    full = run(config_from_dict(tiny_config(shapes, tmp_path / "full", num_threads=1)))
    assert sorted(full.losses) == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(v) for v in full.losses.values())

    run_dir = tmp_path / "killed"
    config = tiny_config(shapes, run_dir, num_threads=1)
    killed = _train_process(config, tmp_path / "killed.yaml", FLORENCE_KILL_AT_STEP="4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (run_dir / "final").exists()
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000003"]
    assert {r["step"]: r["loss"] for r in read_metrics(run_dir)} == {s: full.losses[s] for s in (1, 2, 3, 4)}

    resumed = _train_process(config, tmp_path / "killed.yaml")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # each step once: step 4 was redone
    assert {r["step"]: r["loss"] for r in records} == full.losses
    assert all({"step", "loss", "lr"} <= set(r) for r in records)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["batch_size"] == 8
    assert "torch" in json.loads((run_dir / "versions.json").read_text())

    a, b = florence.from_pretrained(tmp_path / "full" / "final"), florence.from_pretrained(run_dir / "final")
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert b.tokenize(["a photo of a circle."])["input_ids"].shape == (1, 16)


def test_in_process_stop_and_resume(shapes, tmp_path):
    """``run(stop_after_steps=...)`` then ``run`` again (same process) repeats the uninterrupted losses."""
    full = run(config_from_dict(tiny_config(shapes, tmp_path / "full", schedule={"steps": 4},
                                            checkpoint={"every_steps": 2})))
    cfg = config_from_dict(tiny_config(shapes, tmp_path / "stopped", schedule={"steps": 4},
                                       checkpoint={"every_steps": 2}))
    first = run(cfg, stop_after_steps=3)  # the last checkpoint is step 2
    assert first.final_dir is None and sorted(first.losses) == [1, 2, 3]
    resumed = run(cfg)
    assert sorted(resumed.losses) == [3, 4]
    assert {**first.losses, **resumed.losses} == full.losses


def _bundle(shapes: Path, out: Path, vocab_size: int) -> Path:
    """A tiny model bundle (dropout and drop-path on, 28x28 preprocessing) whose text vocabulary is ``vocab_size``."""
    import florence
    from florence.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer([f"a photo of a {c}." for c in CLASSES] * 4, out / "tok", vocab_size=vocab_size)
    overrides = tiny_config(shapes, out)["model"]["overrides"]
    text = {**overrides["text"], "vocab_size": vocab_size}
    model = florence.create_model("unicl_test", tokenizer=str(out / "tok"), context_length=16,
                                  **{**overrides, "text": text})
    model.save_pretrained(out / "bundle")
    return out / "bundle"


def test_continued_training_from_a_bundle(shapes, tmp_path):
    """A run from ``model.pretrained`` trains in train mode (from_pretrained returns eval mode), and a tokenizer
    trained at run start that does not fit the bundle's text vocabulary is a ConfigError, not a silent mismatch."""
    from florence.engine.config import ConfigError
    from florence.engine.distributed import unwrap

    bundle = _bundle(shapes, tmp_path / "b", vocab_size=262)

    def config(name, **model):
        cfg = tiny_config(shapes, tmp_path / name, schedule={"steps": 1})
        cfg["model"] = {"pretrained": str(bundle), "context_length": 16, **model}
        return config_from_dict(cfg)

    state = setup(config("continued"))
    model = unwrap(state.model)
    assert all(m.training for m in model.modules())
    assert len(model.tokenizer) <= 262
    assert math.isfinite(fit(state)[1])

    with pytest.raises(ConfigError, match=r"model\.train_tokenizer_vocab.*vocab_size is 262"):
        setup(config("retokenized", train_tokenizer_vocab=300))


class _NaNOnCalls(torch.nn.Module):
    """Wraps the UniCL loss; returns NaN on the given call numbers (1-based)."""

    def __init__(self, loss_fn, bad_calls):
        super().__init__()
        self.loss_fn, self.bad_calls, self.calls = loss_fn, set(bad_calls), 0

    def forward(self, *args):
        self.calls += 1
        loss = self.loss_fn(*args)
        return loss * float("nan") if self.calls in self.bad_calls or "all" in self.bad_calls else loss


def test_nonfinite_steps_are_skipped_then_abort(shapes, tmp_path):
    cfg = config_from_dict(tiny_config(shapes, tmp_path / "nan", checkpoint={"every_steps": None},
                                       optim={"max_nonfinite_in_a_row": 2}))
    state = setup(cfg)
    state.task.loss_fn = _NaNOnCalls(state.task.loss_fn, bad_calls={2, 4})
    before = {n: p.detach().clone() for n, p in state.model.named_parameters()}
    losses = fit(state, stop_after_steps=2)
    assert math.isfinite(losses[1]) and math.isnan(losses[2])
    after_one = {n: p.detach().clone() for n, p in state.model.named_parameters()}
    assert any(not torch.equal(before[n], after_one[n]) for n in before)
    losses = fit(state)
    assert state.skipped == 2 and state.step == 6
    assert all(p.grad is None for p in state.model.parameters())

    state = setup(config_from_dict(tiny_config(shapes, tmp_path / "nan2", checkpoint={"every_steps": None},
                                               optim={"max_nonfinite_in_a_row": 2})))
    state.task.loss_fn = _NaNOnCalls(state.task.loss_fn, bad_calls={"all"})
    with pytest.raises(NonFiniteLossError, match="2 steps in a row"):
        fit(state)


NO_DROPOUT = {"image": {"drop_path_rate": 0.0}, "text": {"hidden_dropout_prob": 0.0}}


def test_grad_cache_and_accumulation_run(shapes, tmp_path):
    """The gradient-cached step gives the same losses as the plain step (same global batch, fp32, no dropout:
    dropout masks are drawn per chunk, so they differ from a full-batch forward)."""
    def config(name, **sections):
        cfg = tiny_config(shapes, tmp_path / name, schedule={"steps": 3}, **sections)
        cfg["model"]["overrides"].update(NO_DROPOUT)
        return config_from_dict(cfg)

    plain = run(config("plain"))
    cached = run(config("cached", optim={"grad_cache_chunk": 3}))
    for step in plain.losses:
        assert cached.losses[step] == pytest.approx(plain.losses[step], abs=1e-5)
    accum = run(config_from_dict(tiny_config(shapes, tmp_path / "accum", schedule={"steps": 2},
                                             optim={"accum_steps": 2}, precision={"dtype": "bf16"})))
    assert all(math.isfinite(v) for v in accum.losses.values())


def test_fp16_on_cpu_is_a_clear_error(shapes, tmp_path):
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        setup(config_from_dict(tiny_config(shapes, tmp_path / "fp16", precision={"dtype": "fp16"})))


def test_cli_main_with_overrides(shapes, tmp_path):
    from florence.engine.train import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(shapes, tmp_path / "cli")))
    # 0.5 epochs of 32 images at global batch 8 -> 2 steps
    source = f"{{type: image_folder, path: {shapes}}}"
    assert main([str(path), "schedule.steps=null", "schedule.epochs=0.5", "checkpoint.every_steps=null",
                 f"eval.source={source}"]) == 0
    records = read_metrics(tmp_path / "cli")
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert [r["step"] for r in records if "eval/top1" in r] == [2]  # the final bundle, evaluated once
    assert (tmp_path / "cli" / "final" / "model.safetensors").is_file()
    record = json.loads((tmp_path / "cli" / "eval.json").read_text())
    accuracy = record["metrics"]["top1"]
    assert 0.0 <= accuracy <= 1.0 and accuracy * 32 == round(accuracy * 32)  # 32 images scored
    assert record["task"] == "unicl" and accuracy <= record["metrics"]["top5"] == 1.0  # 4 classes: top-5 = all
    assert main([str(path), "optim.learning_rate=1"]) == 2  # unknown key: clear error, no run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(config: dict, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "florence", "train", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return Path(config["output"]["dir"])


def _final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    import florence

    return florence.from_pretrained(run_dir / "final").state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("strategy, chunk", [("ddp", 2), ("fsdp", None)])
def test_two_processes_match_one(shapes, tmp_path, strategy, chunk):
    """torchrun with 2 gloo processes (global batch 8 = 2 x 4; DDP with the gradient cache in chunks of 2, or FSDP2)
    matches 1 process with batch 8: per-step losses and final parameters. The FSDP run is then resumed from its
    sharded step-3 checkpoint and repeats the step-4 loss."""

    def config(name, **extra):
        cfg = tiny_config(shapes, tmp_path / name, schedule={"steps": 4}, optim={"grad_cache_chunk": chunk},
                          distributed={"strategy": strategy}, **extra)
        cfg["model"]["overrides"].update(NO_DROPOUT)
        return cfg

    single = run(config_from_dict(config("single")))
    multi_dir = _torchrun(config("multi"), tmp_path, "multi")
    multi = {r["step"]: r["loss"] for r in read_metrics(multi_dir)}
    for step, loss in single.losses.items():
        assert multi[step] == pytest.approx(loss, abs=1e-4), step
    a, b = _final_params(tmp_path / "single"), _final_params(multi_dir)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4, worst
    step3 = multi_dir / "checkpoints" / "step_00000003"
    assert (step3 / "sharded").is_dir() == (strategy == "fsdp")
    assert (step3 / "rank0.pt").is_file() and (step3 / "rank1.pt").is_file()
    if strategy == "fsdp":
        resumed_dir = _torchrun(config("resumed", checkpoint={"resume": str(step3)}), tmp_path, "resumed")
        resumed = {r["step"]: r["loss"] for r in read_metrics(resumed_dir)}
        assert list(resumed) == [4] and resumed[4] == pytest.approx(multi[4], abs=1e-6)
