"""Typed run configuration: one YAML file fully describes a training run.

``load_config(path, overrides)`` reads the YAML, applies ``key=value`` overrides (dotted keys, values parsed with
``yaml.safe_load`` so ``optim.lr=1e-3`` is a float and ``model.overrides={depths: [2, 2]}`` a dict) and returns a
``RunConfig``. Unknown keys raise ``ConfigError`` naming the dotted key. There is no inheritance between files: what
the file says (plus the overrides) is the run. ``save_config(cfg, path)`` writes the resolved config back as YAML.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from florence.errors import FlorenceError


class ConfigError(FlorenceError, ValueError):
    """A config file or override is invalid; the message names the file and the dotted key."""


PREPROCESS_KEYS = {"input_size": list, "mean": list, "std": list, "interpolation": str, "crop_pct": float}


@dataclass
class ModelConfig:
    name: str | None = None  # a registered model name for florence.create_model (e.g. "unicl_test", "coswin_test")
    config: dict | None = None  # or a dual-encoder config {"image": {...}, "text": {...}, "embed_dim": D} (unicl)
    overrides: dict = field(default_factory=dict)  # keyword overrides passed to create_model(name, **overrides)
    pretrained: str | None = None  # a checkpoint bundle directory to start from (continued training / fine-tuning)
    backbone: str | None = None  # a pre-trained image tower (bundle directory) for a task that adds new heads
    grad_checkpointing: bool = False  # activation checkpointing per block (model.set_grad_checkpointing)
    tokenizer: str | None = None  # unicl: a tokenizer directory; None keeps the model's own tokenizer
    train_tokenizer_vocab: int | None = None  # unicl: train a byte-level BPE tokenizer on the data's texts first
    context_length: int | None = None  # unicl: override the text context length (tokens)


@dataclass
class OptimConfig:
    lr: float = 5e-4  # peak learning rate
    weight_decay: float = 0.1  # decoupled weight decay on weight matrices (not norms, biases, logit scale, tables)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    clip_grad_norm: float | None = 5.0  # max global L2 gradient norm; None disables clipping
    lr_mult: dict = field(default_factory=dict)  # {module name prefix: LR multiplier}, e.g. {backbone: 0.1, head: 50}
    layer_decay: float | None = None  # layer-wise LR decay over model.group_matcher() layers (timm semantics)
    freeze: list = field(default_factory=list)  # module name prefixes whose parameters are not trained
    decay_embeddings: bool = True  # weight decay on nn.Embedding tables (false: none, as BERT/METER fine-tuning)
    ema_decay: float | None = None  # keep an exponential moving average of the weights (evaluated and saved)
    batch_size: int = 32  # global batch per optimizer step (all ranks, all accumulation steps)
    # gradient accumulation: micro-batches per optimizer step on each rank. The contrastive loss is computed per
    # micro-batch (negatives only from the same micro-batch, across ranks), so it is NOT the UniCL loss of the
    # global batch; for large-batch equivalence use grad_cache_chunk (exact global-batch loss, chunked memory).
    accum_steps: int = 1  # micro-batches per optimizer step on each rank (see the note above)
    grad_cache_chunk: int | None = None  # gradient cache: the loss over the whole micro-batch, forward in chunks
    max_nonfinite_in_a_row: int = 5  # abort after this many consecutive non-finite losses (each step is skipped)


@dataclass
class ScheduleConfig:
    steps: int | None = None  # total optimizer steps; or give epochs
    epochs: float | None = None  # total passes over the data (needs a sized data loader)
    warmup_steps: int = 0  # linear warmup from 0 to lr, per optimizer step
    warmup_fraction: float | None = None  # or warmup as a fraction of the total steps
    min_lr_ratio: float = 0.0  # the decay ends at lr * min_lr_ratio
    decay: str = "cosine"  # cosine | linear decay after the warmup


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
    tensorboard: bool = True  # TensorBoard event files in <run_dir>/tensorboard
    progress: bool = True  # tqdm progress bar on rank 0


@dataclass
class EvalConfig:
    source: dict | None = None  # the task's evaluation data, a data-source spec, e.g. {type: fashion_mnist, split: test}
    every_steps: int | None = None  # evaluate every N optimizer steps (metrics.jsonl "eval/<metric>")
    at_end: bool = True  # evaluate the final bundle (when the task has evaluation data; always with best_metric)
    batch_size: int = 256  # evaluation batch
    max_images: int | None = None  # evaluate on the first N images only
    best_metric: str | None = None  # keep <run_dir>/best, the bundle with the best value of this metric
    best_mode: str = "max"  # max | min: which direction of best_metric is better


@dataclass
class RunConfig:
    task: Any = "unicl"  # the task name (or package.module:Class), or {name: ..., <the task's options>}
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

    @property
    def task_name(self) -> str:
        return self.task["name"] if isinstance(self.task, dict) else self.task

    @property
    def task_options(self) -> dict:
        return {k: v for k, v in self.task.items() if k != "name"} if isinstance(self.task, dict) else {}

    def validate(self) -> None:
        """Cross-field checks; raises ``ConfigError`` naming the key."""
        if isinstance(self.task, dict) and not isinstance(self.task.get("name"), str):
            raise ConfigError("task.name: give the task name, e.g. task: {name: classify, label_smoothing: 0.1}")
        if not isinstance(self.task, (str, dict)):
            raise ConfigError(f"task: expected a name or a mapping, got {self.task!r}")
        sources = [k for k in ("name", "config", "pretrained") if getattr(self.model, k) is not None]
        if len(sources) > 1 or (not sources and self.model.backbone is None):
            raise ConfigError("model: give exactly one of model.name, model.config, model.pretrained (or "
                              "model.backbone for a task that builds its heads on a pre-trained tower)")
        preprocess = self.model.overrides.get("preprocess")
        if preprocess is not None:
            _check_preprocess(preprocess, "model.overrides.preprocess")
        if self.schedule.decay not in ("cosine", "linear"):
            raise ConfigError(f"schedule.decay: expected cosine or linear, got {self.schedule.decay!r}")
        if self.eval.best_mode not in ("max", "min"):
            raise ConfigError(f"eval.best_mode: expected max or min, got {self.eval.best_mode!r}")
        if self.optim.layer_decay is not None and not 0 < self.optim.layer_decay <= 1:
            raise ConfigError("optim.layer_decay: must be in (0, 1]")
        if self.optim.ema_decay is not None and not 0 < self.optim.ema_decay < 1:
            raise ConfigError("optim.ema_decay: must be in (0, 1)")
        for key, value in self.optim.lr_mult.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"optim.lr_mult.{key}: expected a number >= 0, got {value!r}")
        if not all(isinstance(p, str) for p in self.optim.freeze):
            raise ConfigError(f"optim.freeze: expected a list of module names, got {self.optim.freeze!r}")
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
        if "batch_size" in self.data:
            raise ConfigError("data.batch_size: set the global batch with optim.batch_size (the engine splits it "
                              "over ranks and accumulation steps)")
        if self.checkpoint.keep_last < 1:
            raise ConfigError("checkpoint.keep_last: must be >= 1")


def _check_preprocess(preprocess: Any, key: str) -> None:
    if not isinstance(preprocess, dict):
        raise ConfigError(f"{key}: expected a mapping, got {preprocess!r}")
    for name in preprocess:
        if name not in PREPROCESS_KEYS:
            raise ConfigError(f"{key}.{name}: unknown key (known keys here: {', '.join(sorted(PREPROCESS_KEYS))})")
    for name, kind in PREPROCESS_KEYS.items():
        value = preprocess.get(name)
        if value is None:
            if name != "crop_pct":
                raise ConfigError(f"{key}.{name}: missing (the preprocessing is never guessed)")
            continue
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            continue
        if not isinstance(value, kind):
            raise ConfigError(f"{key}.{name}: expected {kind.__name__}, got {value!r}")
    if len(preprocess["input_size"]) != 3:
        raise ConfigError(f"{key}.input_size: expected [channels, height, width], got {preprocess['input_size']}")


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


def build_section(cls: type, values: dict | None, prefix: str) -> Any:
    """A dataclass section (e.g. a task's options) from plain values; unknown keys and wrong types raise
    ``ConfigError`` naming ``prefix.key``."""
    if values is not None and not isinstance(values, dict):
        raise ConfigError(f"{prefix}: expected a mapping, got {values!r}")
    return _build(cls, values or {}, prefix)


def _field_comments(cls: type) -> dict[str, str]:
    """The ``# comment`` after each field in the class source: the schema's documentation."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found = {}
    for line in source.splitlines():
        match = re.match(r"\s+(\w+): [^#]*#\s*(.*)$", line)
        if match:
            found[match.group(1)] = match.group(2).strip()
    return found


def _reference_lines(cls: type, prefix: str) -> list[str]:
    lines = []
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            lines += _reference_lines(hints[f.name], key)
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "required"
        kind = str(hints[f.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
        shown = yaml.safe_dump(_plain(default), default_flow_style=True).strip().removesuffix("...").strip()
        meaning = comments.get(f.name, "").replace("|", "\\|")
        lines.append(f"| `{key}` | {kind.replace(' | ', ' or ')} | `{shown}` | {meaning} |")
    return lines


def config_reference(task_cls: type | None = None) -> str:
    """Markdown table of every run-config key (type, default, meaning), generated from the dataclasses; with a task
    class, a second table of its ``task.*`` options."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|", *_reference_lines(RunConfig, "")]
    lines += ["", "`data:` is read by the task's loader: its keys are in the `florence.data` module docstring."]
    if task_cls is not None:
        lines += ["", f"Options of `task: {{name: {task_cls.name}, ...}}`:", ""]
        if dataclasses.fields(task_cls.Options):
            lines += ["| key | type | default | meaning |", "|---|---|---|---|",
                      *_reference_lines(task_cls.Options, "task")]
        else:
            lines.append("(none)")
    return "\n".join(lines)


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
