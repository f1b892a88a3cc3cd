"""``florence train CONFIG [key=value ...]``: any task, from one CPU to many GPUs (under ``torchrun``).

The config's ``task:`` key names a task (``florence.engine.task.Task``: UniCL pre-training, classification
fine-tuning, retrieval fine-tuning, ...); the engine is the same for all of them. The pieces, each small and testable:

- ``resolve_task``: the task class (registry or ``package.module:Class``) and its validated options;
- ``setup``: run directory, process group, seed, model (from the task), frozen modules, wrapping, optimizer groups,
  schedule, precision, EMA, data loader (from the task), resume;
- ``train_step`` (``florence.engine.step``): one optimizer step with accumulation / gradient cache / clipping;
- ``fit``: the loop: steps, skips of non-finite losses, metrics, periodic evaluation and the best bundle, progress
  bar, checkpoints;
- ``finish``: the final checkpoint and the model bundle ``<run_dir>/final`` (``florence.from_pretrained`` loads it),
  then the task's evaluation of that bundle (``<run_dir>/eval.json``).
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from timm.utils import ModelEmaV3
from torch import nn

from florence.bundle import from_pretrained
from florence.engine import checkpoint as ckpt
from florence.engine.config import ConfigError, RunConfig, build_section, config_reference, load_config, save_config
from florence.engine.distributed import (DistEnv, barrier, init_distributed, is_fsdp, shutdown_distributed, unwrap,
                                         wrap_model)
from florence.engine.metrics import MetricsWriter, write_versions
from florence.engine.optim import OptimConfigError, WarmupDecay, build_optimizer, freeze_modules
from florence.engine.precision import build_precision
from florence.engine.step import StepContext, StepResult, train_step
from florence.engine.task import Task
from florence.errors import FlorenceError
from florence.registry import get_task, task_names


class NonFiniteLossError(FlorenceError, RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss."""


@dataclass
class TrainResult:
    """run_dir: the run directory; losses: loss per optimizer step run by this call (1-based steps as keys);
    final_dir: the model bundle; skipped: steps skipped for a non-finite loss; wall_time: seconds;
    eval_metrics: the task's metrics of the final bundle (when the task has evaluation data and ``eval.at_end``);
    best: ``{"step", "metric", "value"}`` of ``<run_dir>/best`` when ``eval.best_metric`` is set;
    bad_samples: the skipped-sample summary (rank 0)."""

    run_dir: Path
    losses: dict[int, float] = field(default_factory=dict)
    final_dir: Path | None = None
    skipped: int = 0
    wall_time: float = 0.0
    eval_metrics: dict[str, float] = field(default_factory=dict)
    best: dict[str, Any] | None = None
    bad_samples: str | None = None


@dataclass
class TrainState:
    cfg: RunConfig
    task: Task
    env: DistEnv
    run_dir: Path
    model: nn.Module  # possibly DDP/FSDP-wrapped
    loader: Any  # the task's stream: iterable of batch dicts, state_dict() / load_state_dict()
    ctx: StepContext
    total_steps: int
    micro_batch: int
    step: int = 0  # optimizer steps done
    skipped: int = 0
    nonfinite_in_a_row: int = 0
    best: dict[str, Any] | None = None  # {"step", "metric", "value"} of the best evaluation so far


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_task(cfg: RunConfig) -> Task:
    """The configured task with its options validated (``ConfigError`` naming ``task.<key>``), before anything is
    written."""
    try:
        cls = get_task(cfg.task_name)
    except FlorenceError as err:
        raise ConfigError(f"task: {err}") from None
    task = cls(cfg, build_section(cls.Options, cfg.task_options, "task"))
    if cfg.optim.grad_cache_chunk is not None and not cls.supports_grad_cache:
        raise ConfigError(f"optim.grad_cache_chunk: task {cfg.task_name!r} does not support the gradient cache")
    try:
        task.validate()
    except FlorenceError as err:  # e.g. florence.data's DataConfigError naming data.sources[0].path
        raise ConfigError(str(err)) from None
    if (cfg.eval.every_steps or cfg.eval.best_metric) and not task.has_evaluation():
        raise ConfigError(f"eval.every_steps / eval.best_metric: task {cfg.task_name!r} has no evaluation data "
                          "(eval.source, or the task's own option)")
    return task


# -- set-up -----------------------------------------------------------------------------------------------------


def _total_steps(cfg: RunConfig, loader: Any) -> int:
    """``schedule.steps``, or ``schedule.epochs`` x the loader's samples per epoch / the global batch."""
    if cfg.schedule.steps is not None:
        return cfg.schedule.steps
    per_epoch = getattr(loader, "samples_per_epoch", None)
    if per_epoch is None:
        raise ConfigError("schedule.epochs needs map-style data sources (an epoch length); give schedule.steps")
    return max(1, math.ceil(cfg.schedule.epochs * per_epoch / cfg.optim.batch_size))


def _micro_batch(cfg: RunConfig, env: DistEnv) -> int:
    per_step = env.world_size * cfg.optim.accum_steps
    if cfg.optim.batch_size % per_step:
        raise ConfigError(
            f"optim.batch_size={cfg.optim.batch_size} must be divisible by world size x optim.accum_steps "
            f"= {env.world_size} x {cfg.optim.accum_steps}"
        )
    return cfg.optim.batch_size // per_step


def _resume_path(cfg: RunConfig, run_dir: Path) -> Path | None:
    resume = cfg.checkpoint.resume
    if resume in (None, "none", "never"):
        return None
    if resume == "auto":
        return ckpt.latest_checkpoint(run_dir)
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise ConfigError(f"checkpoint.resume: {path} is not a training checkpoint directory (no meta.json)")
    return path


def _prepare_run_dir(cfg: RunConfig, env: DistEnv) -> tuple[Path, bool]:
    """The run directory with the resolved config and versions; whether this call created it."""
    run_dir = Path(cfg.output.dir)
    created = not run_dir.exists()
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        write_versions(run_dir)
    barrier()
    return run_dir, created


def _resume(state: TrainState, path: Path) -> None:
    """Restore model, optimizer, scheduler, scaler, EMA, RNG states, data position and counters from ``path``."""
    ctx = state.ctx
    meta, data_state = ckpt.load_checkpoint(path, model=state.model, optimizer=ctx.optimizer,
                                            scheduler=ctx.scheduler, scaler=ctx.precision.scaler, env=state.env,
                                            ema=ctx.ema)
    state.loader.load_state_dict(data_state)
    state.step, state.skipped = meta["step"], meta.get("skipped", 0)
    state.nonfinite_in_a_row = meta.get("nonfinite_in_a_row", 0)
    state.best = meta.get("best")
    ctx.steps_taken = meta.get("steps_taken", state.step - state.skipped)


def _build_ema(cfg: RunConfig, model: nn.Module, env: DistEnv) -> nn.Module | None:
    if cfg.optim.ema_decay is None:
        return None
    if env.distributed and cfg.distributed.strategy == "fsdp":
        raise ConfigError("optim.ema_decay: not supported with distributed.strategy=fsdp (use ddp)")
    return ModelEmaV3(model, decay=cfg.optim.ema_decay)


def setup(cfg: RunConfig, task: Task | None = None) -> TrainState:
    """Everything ``fit`` needs, restored from the latest checkpoint when resuming. A failure before training starts
    removes a run directory this call created (no partial runs left behind)."""
    task = task or resolve_task(cfg)
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    env = init_distributed(cfg.distributed.backend)
    run_dir, created = _prepare_run_dir(cfg, env)
    try:
        return _setup(cfg, task, env, run_dir)
    except BaseException:
        if created and env.is_main and ckpt.latest_checkpoint(run_dir) is None:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _setup(cfg: RunConfig, task: Task, env: DistEnv, run_dir: Path) -> TrainState:
    seed_everything(cfg.seed)  # identical model init on every rank (FSDP does not broadcast)
    model = task.build_model(env, run_dir)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    try:
        freeze_modules(model, cfg.optim.freeze)
    except OptimConfigError as err:
        raise ConfigError(str(err)) from None
    model = model.to(env.device)
    model.train()  # from_pretrained returns eval mode: dropout / drop-path back on
    precision = build_precision(cfg.precision.dtype, env.device)
    wrapped = wrap_model(model, env, cfg.distributed.strategy)
    o = cfg.optim  # the optimizer is built after wrapping: FSDP2 replaces the parameters by sharded ones
    try:
        optimizer = build_optimizer(unwrap(wrapped), lr=o.lr, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps,
                                    lr_mult=o.lr_mult, layer_decay=o.layer_decay,
                                    decay_embeddings=o.decay_embeddings)
    except OptimConfigError as err:
        raise ConfigError(str(err)) from None
    ema = _build_ema(cfg, unwrap(wrapped), env)
    seed_everything(cfg.seed + env.rank)  # per-rank dropout streams (augmentation is seeded per sample)
    micro = _micro_batch(cfg, env)
    loader = task.build_loader(model, env, run_dir, micro)
    total = _total_steps(cfg, loader)
    s = cfg.schedule
    warmup = round(s.warmup_fraction * total) if s.warmup_fraction is not None else s.warmup_steps
    scheduler = WarmupDecay(optimizer, total_steps=total, warmup_steps=warmup, min_lr_ratio=s.min_lr_ratio,
                            decay=s.decay)
    ctx = StepContext(
        model=wrapped, task=task, optimizer=optimizer, scheduler=scheduler, precision=precision, device=env.device,
        clip_grad_norm=o.clip_grad_norm, grad_cache_chunk=o.grad_cache_chunk, ema=ema,
    )
    state = TrainState(cfg=cfg, task=task, env=env, run_dir=run_dir, model=wrapped, loader=loader, ctx=ctx,
                       total_steps=total, micro_batch=micro)
    resume = _resume_path(cfg, run_dir)
    if resume is not None:
        _resume(state, resume)
    return state


# -- loop -------------------------------------------------------------------------------------------------------


def _batches(loader: Any) -> Iterator[dict[str, torch.Tensor]]:
    """Endless stream of batches; the loader keeps its own position (epoch, offset) for resume."""
    while True:
        produced = False
        for batch in loader:
            produced = True
            yield batch
        if not produced:
            raise RuntimeError("the training data loader produced no batches (empty data set?)")


def save(state: TrainState) -> Path:
    counters = {"skipped": state.skipped, "nonfinite_in_a_row": state.nonfinite_in_a_row, "best": state.best,
                "steps_taken": state.ctx.steps_taken}
    return ckpt.save_checkpoint(
        state.run_dir, step=state.step, model=state.model, optimizer=state.ctx.optimizer,
        scheduler=state.ctx.scheduler, scaler=state.ctx.precision.scaler, data_state=state.loader.state_dict(),
        counters=counters, env=state.env, keep_last=state.cfg.checkpoint.keep_last, ema=state.ctx.ema,
    )


def _account(state: TrainState, result: StepResult) -> None:
    """Count skipped steps; abort after ``optim.max_nonfinite_in_a_row`` in a row."""
    if result.finite:
        state.nonfinite_in_a_row = 0
        return
    state.skipped += 1
    state.nonfinite_in_a_row += 1
    limit = state.cfg.optim.max_nonfinite_in_a_row
    if state.nonfinite_in_a_row >= limit:
        raise NonFiniteLossError(
            f"step {state.step}: the loss was not finite for {state.nonfinite_in_a_row} steps in a row "
            f"(optim.max_nonfinite_in_a_row={limit}); lower optim.lr, use precision.dtype=fp32/bf16, or check the data"
        )


def _progress(state: TrainState):
    from tqdm import tqdm

    enabled = state.env.is_main and state.cfg.output.progress
    # at most one refresh a second: a redirected log gets a line a second, not one per step
    return tqdm(total=state.total_steps, initial=state.step, disable=not enabled, dynamic_ncols=True, unit="step",
                mininterval=1.0)


# -- evaluation -------------------------------------------------------------------------------------------------


def _model_for_bundle(state: TrainState) -> nn.Module | None:
    """The trained model as a plain module on rank 0 (the EMA weights when kept; FSDP: the gathered full state dict
    in a fresh copy); None on other ranks."""
    if state.ctx.ema is not None:
        return state.ctx.ema.module if state.env.is_main else None
    model = state.model
    if not is_fsdp(model):
        return unwrap(model) if state.env.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rng = ckpt.rng_state()  # the fresh copy's initialisation must not move the training RNG streams
    fresh = state.task.build_model(state.env, state.run_dir)  # on every rank: building may synchronise them
    ckpt.set_rng_state(rng)
    if not state.env.is_main:
        return None
    fresh.load_state_dict(full)
    return fresh.to(state.env.device)


def _run_evaluation(state: TrainState, model: nn.Module | None) -> dict[str, float]:
    """``task.evaluate`` on rank 0 in eval mode, without touching the training RNG streams (exact resume)."""
    metrics: dict[str, float] = {}
    if state.env.is_main and model is not None:
        rng = ckpt.rng_state()
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                metrics = dict(state.task.evaluate(model, state.env, state.run_dir, state.step))
        finally:
            model.train(was_training)
            ckpt.set_rng_state(rng)
    barrier()
    return metrics


def _better(value: float, best: dict[str, Any] | None, mode: str) -> bool:
    return best is None or (value > best["value"] if mode == "max" else value < best["value"])


def _record_evaluation(state: TrainState, writer: MetricsWriter, metrics: dict[str, float],
                       save_best: Callable[[Path], Any]) -> None:
    """Rank 0: metrics to ``metrics.jsonl`` (``eval/<name>``); ``save_best(<run_dir>/best)`` when
    ``eval.best_metric`` improved."""
    writer.log({"step": state.step, **{f"eval/{k}": v for k, v in metrics.items()}})
    name = state.cfg.eval.best_metric
    if name is None or not metrics:
        return
    if name not in metrics:
        raise ConfigError(f"eval.best_metric: {name!r} is not a metric of task {state.task.name!r} "
                          f"(it reports {sorted(metrics)})")
    if _better(metrics[name], state.best, state.cfg.eval.best_mode):
        state.best = {"step": state.step, "metric": name, "value": metrics[name]}
        save_best(state.run_dir / "best")
        (state.run_dir / "best.json").write_text(json.dumps({**state.best, "metrics": metrics}, indent=2))


def evaluate_and_keep_best(state: TrainState, writer: MetricsWriter) -> dict[str, float]:
    """Periodic evaluation of the model being trained (``eval.every_steps``)."""
    model = _model_for_bundle(state)
    metrics = _run_evaluation(state, model)
    if state.env.is_main:
        _record_evaluation(state, writer, metrics, lambda directory: state.task.save_bundle(model, directory))
    return metrics


KILL_AT_STEP_ENV = "FLORENCE_KILL_AT_STEP"


def open_metrics(state: TrainState) -> MetricsWriter:
    """``metrics.jsonl`` (and TensorBoard) of the run, continued after the resumed step."""
    return MetricsWriter(state.run_dir, enabled=state.env.is_main, tensorboard=state.cfg.output.tensorboard,
                         resume_step=state.step)


def fit(state: TrainState, *, stop_after_steps: int | None = None,
        writer: MetricsWriter | None = None) -> dict[int, float]:
    """Run optimizer steps until ``total_steps`` (or ``stop_after_steps`` steps in this call, to simulate a
    preemption in tests); return ``{step: loss}``.

    Preemption drill: with the environment variable ``FLORENCE_KILL_AT_STEP=k`` the process sends itself SIGKILL
    right after optimizer step k (its metrics line, evaluation and any checkpoint due written), as a real preemption
    would.
    """
    cfg = state.cfg
    kill_at = int(os.environ[KILL_AT_STEP_ENV]) if os.environ.get(KILL_AT_STEP_ENV) else None
    own_writer = writer is None
    writer = writer or open_metrics(state)
    batches = _batches(state.loader)
    losses: dict[int, float] = {}
    bar = _progress(state)
    images = cfg.optim.batch_size
    try:
        while state.step < state.total_steps:
            if stop_after_steps is not None and len(losses) >= stop_after_steps:
                break
            start = time.perf_counter()
            micro = [next(batches) for _ in range(cfg.optim.accum_steps)]
            result = train_step(state.ctx, micro)
            state.step += 1
            _account(state, result)
            losses[state.step] = result.loss
            seconds = time.perf_counter() - start
            bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}", img_s=f"{images / seconds:.1f}",
                            refresh=False)
            bar.update(1)  # refreshes (postfix included) at most once per mininterval
            if state.step % cfg.output.log_every == 0 or state.step == state.total_steps or state.step == 1:
                writer.log({"step": state.step, "loss": result.loss, **result.scalars, "lr": result.lr,
                            "images_per_s": images / seconds, "grad_norm": result.grad_norm,
                            "skipped": state.skipped})
            every = cfg.eval.every_steps
            if every and state.step % every == 0 and state.step < state.total_steps:
                evaluate_and_keep_best(state, writer)
            every = cfg.checkpoint.every_steps
            if every and state.step % every == 0 and state.step < state.total_steps:
                save(state)
            if state.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        bar.close()
        if own_writer:
            writer.close()
    return losses


# -- end of run -------------------------------------------------------------------------------------------------


def finish(state: TrainState) -> Path:
    """Final checkpoint (unless one exists for this step) and the model bundle ``<run_dir>/final``."""
    latest = ckpt.latest_checkpoint(state.run_dir)
    if latest is None or latest.name != f"step_{state.step:08d}":
        save(state)
    final_dir = state.run_dir / "final"
    model = _model_for_bundle(state)
    if model is not None:
        state.task.save_bundle(model, final_dir)
    barrier()
    return final_dir


def _copy_bundle(source: Path, directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(source, directory)


def evaluate_final(state: TrainState, final_dir: Path, writer: MetricsWriter) -> dict[str, float]:
    """The task's evaluation of the saved bundle, loaded back (``<run_dir>/eval.json``); the last step's entry in
    ``metrics.jsonl`` and its bid for the best bundle (a copy of ``final``), so the end is evaluated once."""
    model = from_pretrained(final_dir).to(state.env.device) if state.env.is_main else None
    metrics = _run_evaluation(state, model)
    if state.env.is_main:
        _record_evaluation(state, writer, metrics, lambda directory: _copy_bundle(final_dir, directory))
        record = {"step": state.step, "task": state.task.name, "source": state.cfg.eval.source, "metrics": metrics,
                  "max_images": state.cfg.eval.max_images}
        (state.run_dir / "eval.json").write_text(json.dumps(record, indent=2))
    return metrics


def run(cfg: RunConfig, *, task: Task | None = None, stop_after_steps: int | None = None) -> TrainResult:
    """Set up, train, save, evaluate; ``stop_after_steps`` ends the call early without the final save (tests of
    resume)."""
    start = time.perf_counter()
    threads = torch.get_num_threads()
    state = setup(cfg, task)
    writer = open_metrics(state)
    try:
        losses = fit(state, stop_after_steps=stop_after_steps, writer=writer)
        result = TrainResult(run_dir=state.run_dir, losses=losses, skipped=state.skipped)
        if hasattr(state.loader, "bad_sample_summary") and state.env.is_main:
            result.bad_samples = state.loader.bad_sample_summary().format()
        if state.step >= state.total_steps:
            result.final_dir = finish(state)
            if state.task.has_evaluation() and (cfg.eval.at_end or cfg.eval.best_metric):
                result.eval_metrics = evaluate_final(state, result.final_dir, writer)
        result.best = state.best
        result.wall_time = time.perf_counter() - start
        return result
    finally:
        writer.close()
        shutdown_distributed()
        torch.set_num_threads(threads)


def config_docs() -> str:
    """``docs/CONFIG.md``: the reference of every key, then each registered task's options."""
    parts = ["# Run configuration reference", "",
             "Generated from the config schema by `florence train --help-config --markdown`; "
             "`florence train --help-config TASK` prints one task's.", "", "## Every task", "",
             config_reference()]
    for name in task_names():
        cls = get_task(name)
        parts += ["", f"## task: {name}", "", (cls.__doc__ or "").strip().splitlines()[0], "",
                  config_reference(cls).split("Options of ", 1)[1].split("\n", 1)[1].strip()]
    return "\n".join(parts) + "\n"


USAGE = """usage: florence train CONFIG.yaml [section.key=value ...]

Runs the task named by the config's `task:` key ({tasks}) with the shared engine. Every key, its type and default:
`florence train --help-config [TASK]` (also docs/CONFIG.md)."""


def main(argv: list[str] | None = None) -> int:
    """``florence train CONFIG [key=value ...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0] + "\n\n" + USAGE.format(tasks=", ".join(task_names())))
        return 0 if argv else 2
    if argv[0] == "--help-config" and argv[1:] == ["--markdown"]:
        print(config_docs(), end="")
        return 0
    if argv[0] == "--help-config":
        try:
            print(config_reference(get_task(argv[1]) if len(argv) > 1 else None))
        except FlorenceError as err:
            print(f"florence train: {err}", file=sys.stderr)
            return 2
        return 0
    try:
        cfg = load_config(argv[0], argv[1:])  # errors name the file and the key
        result = run(cfg, task=resolve_task(cfg))
    except ConfigError as err:  # also those found while building the model / optimizer: name the file too
        message = str(err) if str(err).startswith(argv[0]) else f"{argv[0]}: {err}"
        print(f"florence train: {message}", file=sys.stderr)
        return 2
    except FlorenceError as err:
        print(f"florence train: {err}", file=sys.stderr)
        return 2
    if result.losses:
        first, last = min(result.losses), max(result.losses)
        print(f"trained steps {first}..{last}: loss {result.losses[first]:.4f} -> {result.losses[last]:.4f}; "
              f"{result.skipped} skipped; {result.wall_time:.1f}s; bundle: {result.final_dir}")
    if result.bad_samples:
        print(result.bad_samples)
    if result.best:
        print(f"best {result.best['metric']} {result.best['value']:.4f} at step {result.best['step']}: "
              f"{result.run_dir / 'best'}")
    if result.eval_metrics:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.eval_metrics.items())
        print(f"evaluation of the final bundle: {shown} ({result.run_dir / 'eval.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
