"""``florence train CONFIG [key=value ...]``: UniCL pre-training from one CPU to many GPUs (under ``torchrun``).

The pieces, each small and testable:

- ``build_model``: a named dual encoder, a ``build_unicl`` config, or a bundle; tokenizer attached (optionally
  trained on the data's texts at run start and saved in the run directory);
- ``setup``: run directory, process group, seed, model, data loader, optimizer, schedule, precision, resume;
- ``train_step`` (``florence.engine.step``): one optimizer step with accumulation / gradient cache / clipping;
- ``fit``: the loop: steps, skips of non-finite losses, metrics, progress bar, checkpoints;
- ``finish``: the final checkpoint and the model bundle ``<run_dir>/final`` (``florence.from_pretrained`` loads it).
"""
from __future__ import annotations

import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from florence.engine import checkpoint as ckpt
from florence.engine.config import ConfigError, RunConfig, load_config, save_config
from florence.engine.distributed import DistEnv, barrier, init_distributed, is_fsdp, shutdown_distributed, unwrap, wrap_model
from florence.engine.metrics import MetricsWriter, write_versions
from florence.engine.optim import WarmupCosine, build_optimizer
from florence.engine.precision import build_precision
from florence.engine.step import StepContext, StepResult, train_step


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss."""


@dataclass
class TrainResult:
    """run_dir: the run directory; losses: loss per optimizer step run by this call (1-based steps as keys);
    final_dir: the model bundle; skipped: steps skipped for a non-finite loss; wall_time: seconds;
    zero_shot_accuracy: top-1 on ``eval.source`` when ``eval.zero_shot`` is on; bad_samples: the skipped-sample
    summary (rank 0)."""

    run_dir: Path
    losses: dict[int, float] = field(default_factory=dict)
    final_dir: Path | None = None
    skipped: int = 0
    wall_time: float = 0.0
    zero_shot_accuracy: float | None = None
    bad_samples: str | None = None


@dataclass
class TrainState:
    cfg: RunConfig
    env: DistEnv
    run_dir: Path
    model: nn.Module  # possibly DDP/FSDP-wrapped
    loader: Any  # florence.data loader: iterable of batch dicts, state_dict() / load_state_dict()
    ctx: StepContext
    total_steps: int
    micro_batch: int
    step: int = 0  # optimizer steps done
    skipped: int = 0
    nonfinite_in_a_row: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def data_texts(data_cfg: dict) -> list[str]:
    """Every text the data can produce, to train a tokenizer on: each class name (and synonym) in each template
    for image-label sources, the captions for image-text sources."""
    from florence.data.loader import build_source
    from florence.data.templates import format_prompt

    texts: list[str] = []
    for spec in data_cfg.get("sources", []):
        source = build_source(dict(spec))
        if hasattr(source, "class_names"):
            for name in source.class_names:
                for n in [name] if isinstance(name, str) else name:
                    texts += [format_prompt(t, n) for t in source.templates]
        elif hasattr(source, "items"):
            # captions that are not valid UTF-8 stay bytes in the source (the loader skips them): not tokenizer text
            texts += [caption for _, caption, _ in source.items if isinstance(caption, str) and caption.strip()]
        else:
            raise ConfigError(f"model.train_tokenizer_vocab: cannot list the texts of data source {spec}")
    return texts


# -- model ------------------------------------------------------------------------------------------------------


def build_tokenizer(cfg: RunConfig, env: DistEnv, run_dir: Path):
    """The tokenizer to attach: trained on the data's texts into ``<run_dir>/tokenizer`` (rank 0, once: a resumed
    run reuses it), loaded from ``model.tokenizer``, or None (keep the model's own)."""
    from florence.tokenizer import load_tokenizer, train_bpe_tokenizer

    if cfg.model.train_tokenizer_vocab:
        out = run_dir / "tokenizer"
        if env.is_main and not (out / "tokenizer.json").is_file():
            texts = data_texts(cfg.data)
            if not texts:
                raise ConfigError("model.train_tokenizer_vocab: the data gives no texts to train a tokenizer on")
            train_bpe_tokenizer(texts, out, vocab_size=cfg.model.train_tokenizer_vocab)
        barrier()
        return load_tokenizer(out)
    if cfg.model.tokenizer:
        return load_tokenizer(cfg.model.tokenizer)
    return None


def _check_bundle_tokenizer(tokenizer, model: nn.Module, m) -> None:
    """A tokenizer given for (or trained at the start of) a run from a bundle must fit the bundle's text tower:
    its vocabulary cannot grow, and the pad id must match."""
    from florence.backbone.unicl import check_tokenizer

    origin = "model.train_tokenizer_vocab" if m.train_tokenizer_vocab else "model.tokenizer"
    try:
        check_tokenizer(tokenizer, model.text_encoder)
    except ValueError as err:
        raise ConfigError(f"{origin} with model.pretrained={m.pretrained}: {err} (a bundle's text tower keeps its "
                          "vocabulary; use its own tokenizer or a compatible one)") from None


def build_model(cfg: RunConfig, tokenizer=None) -> nn.Module:
    """A dual encoder from ``model.name`` (+ overrides), ``model.config`` or ``model.pretrained`` (a bundle)."""
    import florence
    from florence.backbone.unicl import build_unicl

    m = cfg.model
    text_overrides = {}
    if tokenizer is not None:
        text_overrides["vocab_size"] = len(tokenizer)
    if m.pretrained is not None:
        model = florence.from_pretrained(m.pretrained)
        if tokenizer is not None:
            _check_bundle_tokenizer(tokenizer, model, m)
            model.tokenizer = tokenizer
    elif m.name is not None:
        overrides = dict(m.overrides)
        if text_overrides:
            overrides["text"] = {**overrides.get("text", {}), **text_overrides}
        model = florence.create_model(m.name, tokenizer=tokenizer, **overrides)
    else:
        from florence.factory import merge_overrides

        config = merge_overrides(m.config, m.overrides)
        if text_overrides:
            config = merge_overrides(config, {"text": text_overrides})
        model = build_unicl(config, tokenizer=tokenizer)
    if m.context_length is not None:
        model.context_length = m.context_length
    if m.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


# -- set-up -----------------------------------------------------------------------------------------------------


def _total_steps(cfg: RunConfig, loader: Any) -> int:
    """``schedule.steps``, or ``schedule.epochs`` x the loader's samples per epoch / the global batch."""
    if cfg.schedule.steps is not None:
        return cfg.schedule.steps
    plan = getattr(getattr(loader, "sampler", None), "plan", None)
    if plan is None:
        raise ConfigError("schedule.epochs needs map-style data sources (an epoch length); give schedule.steps")
    return max(1, math.ceil(cfg.schedule.epochs * plan.epoch_length / cfg.optim.batch_size))


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


def _prepare_run_dir(cfg: RunConfig, env: DistEnv) -> Path:
    run_dir = Path(cfg.output.dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        write_versions(run_dir)
    barrier()
    return run_dir


def _resume(state: TrainState, path: Path) -> None:
    """Restore model, optimizer, scheduler, scaler, RNG states, data position and counters from ``path``."""
    ctx = state.ctx
    meta, data_state = ckpt.load_checkpoint(path, model=state.model, optimizer=ctx.optimizer,
                                            scheduler=ctx.scheduler, scaler=ctx.precision.scaler, env=state.env)
    state.loader.load_state_dict(data_state)
    state.step, state.skipped = meta["step"], meta.get("skipped", 0)
    state.nonfinite_in_a_row = meta.get("nonfinite_in_a_row", 0)


def setup(cfg: RunConfig) -> TrainState:
    """Everything ``fit`` needs, restored from the latest checkpoint when resuming."""
    from florence.backbone.loss import UniCLLoss
    from florence.data.loader import build_train_loader

    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    env = init_distributed(cfg.distributed.backend)
    run_dir = _prepare_run_dir(cfg, env)
    seed_everything(cfg.seed)  # identical model init on every rank (FSDP does not broadcast)
    model = build_model(cfg, build_tokenizer(cfg, env, run_dir)).to(env.device)
    model.train()  # from_pretrained (bundle, pretrained text tower) returns eval mode: dropout / drop-path back on
    precision = build_precision(cfg.precision.dtype, env.device)
    wrapped = wrap_model(model, env, cfg.distributed.strategy)
    o = cfg.optim  # the optimizer is built after wrapping: FSDP2 replaces the parameters by sharded ones
    optimizer = build_optimizer(unwrap(wrapped), lr=o.lr, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps)
    seed_everything(cfg.seed + env.rank)  # per-rank dropout streams (augmentation is seeded per sample)
    micro = _micro_batch(cfg, env)
    data_cfg = {"seed": cfg.seed, **cfg.data, "batch_size": micro}
    loader = build_train_loader(data_cfg, preprocess=model.preprocess, tokenize=model.tokenize, rank=env.rank,
                                world_size=env.world_size, run_dir=run_dir)
    total = _total_steps(cfg, loader)
    s = cfg.schedule
    warmup = round(s.warmup_fraction * total) if s.warmup_fraction is not None else s.warmup_steps
    scheduler = WarmupCosine(optimizer, total_steps=total, warmup_steps=warmup, min_lr_ratio=s.min_lr_ratio)
    ctx = StepContext(
        model=wrapped, loss_fn=UniCLLoss(), optimizer=optimizer, scheduler=scheduler, precision=precision,
        device=env.device, clip_grad_norm=o.clip_grad_norm, grad_cache_chunk=o.grad_cache_chunk,
    )
    state = TrainState(cfg=cfg, env=env, run_dir=run_dir, model=wrapped, loader=loader, ctx=ctx, total_steps=total,
                       micro_batch=micro)
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
    counters = {"skipped": state.skipped, "nonfinite_in_a_row": state.nonfinite_in_a_row}
    return ckpt.save_checkpoint(
        state.run_dir, step=state.step, model=state.model, optimizer=state.ctx.optimizer,
        scheduler=state.ctx.scheduler, scaler=state.ctx.precision.scaler, data_state=state.loader.state_dict(),
        counters=counters, env=state.env, keep_last=state.cfg.checkpoint.keep_last,
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


KILL_AT_STEP_ENV = "FLORENCE_KILL_AT_STEP"


def fit(state: TrainState, *, stop_after_steps: int | None = None) -> dict[int, float]:
    """Run optimizer steps until ``total_steps`` (or ``stop_after_steps`` steps in this call, to simulate a
    preemption in tests); return ``{step: loss}``.

    Preemption drill: with the environment variable ``FLORENCE_KILL_AT_STEP=k`` the process sends itself SIGKILL
    right after optimizer step k (its metrics line and any checkpoint due written), as a real preemption would.
    """
    cfg, env = state.cfg, state.env
    kill_at = int(os.environ[KILL_AT_STEP_ENV]) if os.environ.get(KILL_AT_STEP_ENV) else None
    writer = MetricsWriter(state.run_dir, enabled=env.is_main, tensorboard=cfg.output.tensorboard,
                           resume_step=state.step)
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
                writer.log({"step": state.step, "loss": result.loss, "lr": result.lr, "images_per_s": images / seconds,
                            "grad_norm": result.grad_norm, "skipped": state.skipped})
            every = cfg.checkpoint.every_steps
            if every and state.step % every == 0 and state.step < state.total_steps:
                save(state)
            if state.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        bar.close()
        writer.close()
    return losses


# -- end of run -------------------------------------------------------------------------------------------------


def _full_model_for_bundle(state: TrainState) -> nn.Module | None:
    """The trained model as a plain module on rank 0 (FSDP: gathered full state dict into a fresh copy)."""
    model = state.model
    if not is_fsdp(model):
        return unwrap(model) if state.env.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not state.env.is_main:
        return None
    fresh = build_model(state.cfg, getattr(model, "tokenizer", None))
    fresh.load_state_dict(full)
    return fresh


def finish(state: TrainState) -> Path:
    """Final checkpoint (unless one exists for this step) and the model bundle ``<run_dir>/final``."""
    latest = ckpt.latest_checkpoint(state.run_dir)
    if latest is None or latest.name != f"step_{state.step:08d}":
        save(state)
    final_dir = state.run_dir / "final"
    model = _full_model_for_bundle(state)
    if model is not None:
        model.save_pretrained(final_dir)
    barrier()
    return final_dir


def run(cfg: RunConfig, *, stop_after_steps: int | None = None) -> TrainResult:
    """Set up, train, save; ``stop_after_steps`` ends the call early without the final save (tests of resume)."""
    start = time.perf_counter()
    threads = torch.get_num_threads()
    state = setup(cfg)
    try:
        losses = fit(state, stop_after_steps=stop_after_steps)
        result = TrainResult(run_dir=state.run_dir, losses=losses, skipped=state.skipped)
        if hasattr(state.loader, "bad_sample_summary") and state.env.is_main:
            result.bad_samples = state.loader.bad_sample_summary().format()
        if state.step >= state.total_steps:
            result.final_dir = finish(state)
            if cfg.eval.zero_shot and state.env.is_main:
                result.zero_shot_accuracy = evaluate_zero_shot(state)
        result.wall_time = time.perf_counter() - start
        return result
    finally:
        shutdown_distributed()
        torch.set_num_threads(threads)


def evaluate_zero_shot(state: TrainState) -> float:
    """Top-1 zero-shot accuracy of the saved bundle (``<run_dir>/final``, loaded back with
    ``florence.from_pretrained``) on ``eval.source``, with the evaluation classifier of ``florence.adapters.zeroshot``
    (prompt ensemble over the source's templates, first cleaned name of each class); top-1, top-5 and mean-per-class are
    written to ``<run_dir>/zero_shot.json``."""
    import json

    import florence
    from florence.adapters.zeroshot import build_zeroshot_classifier, classification_metrics, model_text_encoder
    from florence.data.loader import build_source
    from florence.data.templates import resolve_templates
    from florence.data.transforms import build_transform

    device, ev = state.env.device, state.cfg.eval
    model = florence.from_pretrained(state.run_dir / "final").to(device)  # eval mode
    source = build_source(dict(ev.source))
    if not hasattr(source, "class_names"):
        raise ConfigError(f"eval.source {ev.source}: zero-shot needs an image-label source with class names")
    names = list(source.class_names)  # prompts are formatted as in training (florence.data.templates.format_prompt)
    templates = getattr(source, "templates", None) or resolve_templates(None)
    classifier = build_zeroshot_classifier(model_text_encoder(model, device), names, templates,
                                           batch_size=ev.batch_size).to(device)  # C, D
    transform = build_transform(model.preprocess, train=False)
    n = len(source) if ev.max_images is None else min(ev.max_images, len(source))
    rng = random.Random(0)  # get() draws a prompt we do not use
    scores, labels = [], []
    with torch.no_grad():
        for start in range(0, n, ev.batch_size):
            samples = [source.get(i, rng) for i in range(start, min(start + ev.batch_size, n))]
            images = torch.stack([transform(s.image) for s in samples]).to(device)  # B, 3, H, W
            scores.append((model.encode_image(images).float() @ classifier.t()).cpu())  # B, C
            labels += [s.label for s in samples]
    metrics = classification_metrics(torch.cat(scores), torch.tensor(labels))
    record = {**metrics, "images": n, "step": state.step, "source": ev.source, "max_images": ev.max_images}
    (state.run_dir / "zero_shot.json").write_text(json.dumps(record, indent=2))
    return metrics["top1"]


def main(argv: list[str] | None = None) -> int:
    """``florence train CONFIG [key=value ...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0] + "\n\nusage: florence train CONFIG.yaml [section.key=value ...]")
        return 0 if argv else 2
    try:
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as err:
        print(f"florence train: {err}", file=sys.stderr)
        return 2
    result = run(cfg)
    if result.losses:
        first, last = min(result.losses), max(result.losses)
        print(f"trained steps {first}..{last}: loss {result.losses[first]:.4f} -> {result.losses[last]:.4f}; "
              f"{result.skipped} skipped; {result.wall_time:.1f}s; bundle: {result.final_dir}")
    if result.bad_samples:
        print(result.bad_samples)
    if result.zero_shot_accuracy is not None:
        print(f"zero-shot top-1 on the test split: {100 * result.zero_shot_accuracy:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
