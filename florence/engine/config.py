"""Typed run configuration: one YAML file fully describes a training run.

``load_config(path, overrides)`` reads the YAML, applies ``key=value`` overrides (dotted keys, values parsed with
``yaml.safe_load`` so ``optim.lr=1e-3`` is a float and ``model.overrides={depths: [2, 2]}`` a dict) and returns a
``RunConfig``. Unknown keys raise ``ConfigError`` naming the dotted key. There is no inheritance between files: what
the file says (plus the overrides) is the run. ``save_config(cfg, path)`` writes the resolved config back as YAML.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the dotted key."""


@dataclass
class ModelConfig:
    name: str | None = None  # a registered model name for florence.create_model (e.g. "unicl_test")
    config: dict | None = None  # or a build_unicl config {"image": {...}, "text": {...}, "embed_dim": D}
    overrides: dict = field(default_factory=dict)  # keyword overrides passed to create_model(name, **overrides)
    pretrained: str | None = None  # a checkpoint bundle directory to start from (continued pre-training)
    grad_checkpointing: bool = False  # activation checkpointing per block (model.set_grad_checkpointing)
    tokenizer: str | None = None  # a tokenizer directory; None keeps the model's own tokenizer
    train_tokenizer_vocab: int | None = None  # train a byte-level BPE tokenizer on the data's texts at run start
    context_length: int | None = None  # override the text context length (tokens)


@dataclass
class OptimConfig:
    lr: float = 5e-4  # peak learning rate
    weight_decay: float = 0.1  # decoupled weight decay on weight matrices (not norms, biases, logit scale, tables)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad_norm: float | None = 5.0  # max global L2 gradient norm; None disables clipping
    batch_size: int = 32  # global batch per optimizer step (all ranks, all accumulation steps)
    # gradient accumulation: micro-batches per optimizer step on each rank. The contrastive loss is computed per
    # micro-batch (negatives only from the same micro-batch, across ranks), so it is NOT the UniCL loss of the
    # global batch; for large-batch equivalence use grad_cache_chunk (exact global-batch loss, chunked memory).
    accum_steps: int = 1
    grad_cache_chunk: int | None = None  # gradient cache: UniCL loss over the whole micro-batch, forward in chunks
    max_nonfinite_in_a_row: int = 5  # abort after this many consecutive non-finite losses (each step is skipped)


@dataclass
class ScheduleConfig:
    steps: int | None = None  # total optimizer steps; or give epochs
    epochs: float | None = None  # total passes over the data (needs a sized data loader)
    warmup_steps: int = 0  # linear warmup from 0 to lr, per optimizer step
    warmup_fraction: float | None = None  # or warmup as a fraction of the total steps
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio


@dataclass
class PrecisionConfig:
    dtype: str = "fp32"  # fp32 | bf16 (autocast, CPU and GPU) | fp16 (autocast + GradScaler, GPU only)


@dataclass
class DistributedConfig:
    strategy: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard, sharded checkpoints); ignored with one process
    backend: str | None = None  # None: nccl with CUDA, gloo otherwise


@dataclass
class CheckpointConfig:
    every_steps: int | None = 1000  # save every N optimizer steps (and always at the end); None: only at the end
    keep_last: int = 2  # keep the last K checkpoints
    resume: str | None = "auto"  # auto (latest in the run dir, if any) | a checkpoint directory | null


@dataclass
class OutputConfig:
    dir: str = "runs/unicl"  # the run directory (config, metrics, checkpoints, final bundle)
    log_every: int = 10  # write metrics every N optimizer steps
    tensorboard: bool = True
    progress: bool = True  # tqdm progress bar on rank 0


@dataclass
class EvalConfig:
    zero_shot: bool = False  # zero-shot accuracy of the final model on eval.source (image-label data)
    source: dict | None = None  # a data-source spec, e.g. {type: fashion_mnist, split: test}
    batch_size: int = 256
    max_images: int | None = None  # evaluate on the first N test images only


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: dict = field(default_factory=dict)  # passed to florence.data.build_train_loader (validated there)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    num_threads: int | None = None  # torch.set_num_threads for this process (None: torch's default)

    def validate(self) -> None:
        """Cross-field checks; raises ``ConfigError`` naming the key."""
        if (self.model.name is None) == (self.model.config is None) and self.model.pretrained is None:
            raise ConfigError("model: give exactly one of model.name, model.config (or model.pretrained)")
        if self.precision.dtype not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"precision.dtype: expected fp32, bf16 or fp16, got {self.precision.dtype!r}")
        if self.distributed.strategy not in ("ddp", "fsdp"):
            raise ConfigError(f"distributed.strategy: expected ddp or fsdp, got {self.distributed.strategy!r}")
        if self.schedule.steps is None and self.schedule.epochs is None:
            raise ConfigError("schedule: give schedule.steps or schedule.epochs")
        for key in ("batch_size", "accum_steps"):
            if getattr(self.optim, key) < 1:
                raise ConfigError(f"optim.{key}: must be >= 1")
        if self.optim.grad_cache_chunk is not None and self.optim.grad_cache_chunk < 1:
            raise ConfigError("optim.grad_cache_chunk: must be >= 1 or null")
        if self.eval.zero_shot and not self.eval.source:
            raise ConfigError("eval.zero_shot: give eval.source (e.g. {type: fashion_mnist, split: test})")
        if "batch_size" in self.data:
            raise ConfigError("data.batch_size: set the global batch with optim.batch_size (the engine splits it "
                              "over ranks and accumulation steps)")
        if self.checkpoint.keep_last < 1:
            raise ConfigError("checkpoint.keep_last: must be >= 1")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML value to the annotated field type (nested dataclasses, tuples, numbers)."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(annotation, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(annotation)
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # yaml.safe_load reads "1e-3" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    base = origin or annotation
    if base in (int, str, bool, dict, list) and not isinstance(value, base):
        raise ConfigError(f"{key}: expected {base.__name__}, got {value!r}")
    if base is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected int, got {value!r}")
    return value


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key {dotted!r} (known keys here: {known})")
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["optim.lr=1e-3", "model.name=unicl_test"]`` -> ``[("optim.lr", 0.001), ...]`` (values via yaml.safe_load)."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        parsed.append((key, yaml.safe_load(text) if text.strip() else None))
    return parsed


def config_from_dict(values: dict, overrides: list[str] | None = None, source: str = "<dict>") -> RunConfig:
    """Build and validate a ``RunConfig`` from a plain dict plus ``key=value`` overrides."""
    tree = yaml.safe_load(yaml.safe_dump(values or {}))  # deep copy of plain data
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)  # unknown typed keys are reported by _build below
    try:
        cfg = _build(RunConfig, tree)
        cfg.validate()
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config and apply ``key=value`` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            values = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return config_from_dict(values, overrides, source=str(path))


def config_to_dict(cfg: RunConfig) -> dict:
    """The resolved config as plain YAML-able data (tuples become lists)."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(cfg))))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with ``load_config``)."""
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
