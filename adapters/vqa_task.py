"""VQA fine-tuning (``task: vqa``; SPEC §6.1-6.3): the METER co-attention model answers questions about images.

- model: a named METER config (``model.name: meter_coswin_base``) on a pre-trained dual encoder (``model.backbone``: a
  UniCL bundle, both towers and its tokenizer are taken; fusion and the VQA head are new), or a METER bundle to
  continue (``model.pretrained``: a VQA bundle, or one pre-trained with ``task: vlp``, whose ITM / MLM heads are then
  replaced by a fresh VQA head). ``model.overrides`` change the named config (``fusion: {num_layers: 0}`` is the
  baseline without co-attention, ``max_text_len``, ``preprocess``);
- answers: the vocabulary METER builds (normalised most-common answers occurring at least ``task.min_answer_count``
  times over the training sources, SPEC §6.3) or a JSON list (``task.answers``); it travels in the bundle and is
  written to ``<run_dir>/answers.json``;
- data: ``florence.data.vqa`` (VQAv2 question + annotation files and image folders; several sources concatenated, as
  METER merges train and the trainable part of val; ``holdout_images`` keeps METER's minival out); each question's
  soft targets are 0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 / 3 / >= 4 annotators; questions without an in-vocabulary answer
  are dropped and counted;
- loss: binary cross-entropy with logits against the soft targets, averaged over elements and multiplied by the
  vocabulary size (METER ``objectives.compute_vqa``: summed over answers, averaged over questions);
- evaluation: the official VQA accuracy (``florence eval vqa`` computes the same) on ``eval.source: {type: vqa,
  questions: FILE, annotations: FILE, images: DIR}``, metrics ``overall``, ``yes/no``, ``number``, ``other``
  (``eval.best_metric: overall``).

METER's LR multipliers are engine settings: ``optim.lr_mult: {fusion: 5, vqa_head: 50}``, warmup then linear decay
(``schedule: {warmup_fraction: 0.1, decay: linear}``), no weight decay on embeddings (``optim.decay_embeddings:
false``). bf16, DDP / FSDP, exact resume and the best checkpoint are the engine's, as for every task.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from florence.adapters.vqa_eval import evaluate_vqa, flat_vqa_metrics
from florence.bundle import from_pretrained
from florence.data.vqa import build_answer_vocab, build_vqa_train_loader, training_datasets, validate_vqa_data
from florence.engine.config import ConfigError
from florence.engine.distributed import DistEnv
from florence.engine.task import Task
from florence.factory import create_model
from florence.registry import register_task

EVAL_SOURCE_KEYS = {"type", "questions", "annotations", "images", "image_pattern"}
logger = logging.getLogger("florence.adapters")


@dataclass
class VQAOptions:
    answers: str | None = None  # a JSON list of answers (the vocabulary); default: built from the training sources
    min_answer_count: int = 9  # METER: normalised most-common answers occurring at least this often (3,129 on VQAv2)


def check_vqa_eval_source(source: dict) -> None:
    """``eval.source`` of a VQA run: ``{type: vqa, questions, annotations, images[, image_pattern]}``."""
    if not isinstance(source, dict) or source.get("type") != "vqa":
        raise ConfigError("eval.source: the vqa task evaluates on {type: vqa, questions: FILE, annotations: FILE, "
                          "images: DIR}")
    unknown = sorted(set(source) - EVAL_SOURCE_KEYS)
    if unknown:
        raise ConfigError(f"eval.source.{unknown[0]}: unknown key (known: {sorted(EVAL_SOURCE_KEYS)})")
    for key in ("questions", "annotations", "images"):
        if not isinstance(source.get(key), str):
            raise ConfigError(f"eval.source.{key}: required (a path)")


def long_questions(texts: list[str], tokenizer, max_len: int) -> list[tuple[int, str]]:
    """``(token count, text)`` of the distinct ``texts`` longer than ``max_len`` tokens (special tokens included),
    longest first: what ``tokenize`` would cut."""
    distinct = sorted(set(texts))
    lengths = [len(ids) for ids in tokenizer(distinct)["input_ids"]] if distinct else []
    return sorted(((n, t) for n, t in zip(lengths, distinct) if n > max_len), reverse=True)


def _read_answers(path: str) -> list[str]:
    try:
        answers = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"task.answers: cannot read {path}: {err}") from None
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ConfigError(f"task.answers: {path} must hold a non-empty JSON list of strings")
    if len(set(answers)) != len(answers):
        raise ConfigError(f"task.answers: {path} lists an answer twice")
    return answers


@register_task("vqa")
class VQATask(Task):
    """Fine-tune a METER model for VQA (soft-target BCE over the answer vocabulary)."""

    Options = VQAOptions
    supports_grad_cache = True  # logits are per question; the loss is a mean over elements

    def __init__(self, cfg, options: VQAOptions) -> None:
        super().__init__(cfg, options)
        self.datasets = None  # the training sources' datasets, read once: for the vocabulary, then for the loader

    def validate(self) -> None:
        m = self.cfg.model
        if m.config is not None or m.tokenizer or m.train_tokenizer_vocab or m.context_length:
            raise ConfigError("model: the vqa task takes model.name (+ model.backbone) or model.pretrained; the "
                              "tokenizer and text length come with the model (model.overrides.max_text_len)")
        if m.pretrained is None and m.name is None:
            raise ConfigError("model.name: give a METER config (florence models meter) or model.pretrained")
        if self.options.min_answer_count < 1:
            raise ConfigError("task.min_answer_count: must be >= 1")
        self.validate_data()

    def validate_data(self) -> None:
        validate_vqa_data(self.cfg.data, key="data")
        if self.cfg.eval.source is not None:
            check_vqa_eval_source(self.cfg.eval.source)

    # -- model --------------------------------------------------------------------------------------------------

    def answer_vocabulary(self) -> list[str]:
        """``task.answers`` or METER's vocabulary of the training sources (deterministic: every rank builds the
        same)."""
        if self.options.answers is not None:
            return _read_answers(self.options.answers)
        self.datasets = training_datasets(self.cfg.data)
        answers = build_answer_vocab(self.datasets, min_count=self.options.min_answer_count)
        if not answers:
            raise ConfigError(f"task.min_answer_count={self.options.min_answer_count}: no answer occurs that often in "
                              "the training sources")
        return answers

    def build_model(self, env: DistEnv, run_dir: Path) -> nn.Module:
        m = self.cfg.model
        answers = self.answer_vocabulary()
        if m.pretrained is not None:
            model = from_pretrained(m.pretrained)
            if not hasattr(model, "set_heads"):
                raise ConfigError(f"model.pretrained={m.pretrained}: a {type(model).__name__}, not a METER model")
            if model.heads != ["vqa"] or model.answers != answers:
                model.set_heads(["vqa"], answers=answers)  # a VLP bundle, or another vocabulary: a fresh VQA head
        else:
            overrides = {**m.overrides, "answers": answers, "heads": ["vqa"]}
            if m.backbone is not None:
                overrides["backbone"] = m.backbone
            model = create_model(m.name, **overrides)
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "answers.json").write_text(json.dumps(answers, indent=0))
        return model.train()

    def build_loader(self, model: nn.Module, env: DistEnv, run_dir: Path, micro_batch: int):
        data_cfg = {"seed": self.cfg.seed, **self.cfg.data, "batch_size": micro_batch}
        loader = build_vqa_train_loader(data_cfg, preprocess=model.preprocess, tokenize=model.tokenize,
                                        answers=model.answers, rank=env.rank, world_size=env.world_size,
                                        run_dir=run_dir, datasets=self.datasets)
        if env.is_main:  # questions cut by the text length lose words: said once, with the longest
            texts = [s.dataset.question(i) for s in loader.sources for i in s.rows]
            cut = long_questions(texts, model.tokenizer, model.max_text_len)
            if cut:
                logger.warning("%d distinct training questions are longer than max_text_len=%d tokens and are cut "
                               "(longest: %d tokens, %r); raise model.overrides.max_text_len", len(cut),
                               model.max_text_len, cut[0][0], cut[0][1])
        return loader

    # -- loss ---------------------------------------------------------------------------------------------------

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
        return {"logits": out["vqa_logits"]}  # B, A

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]):
        logits, targets = outputs["logits"], batch["targets"]  # B, A each
        loss = F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]
        # METER's in-training VQAScore: the soft target of the top answer (a proxy, not the official metric)
        score = targets.gather(1, logits.detach().argmax(1, keepdim=True)).mean()
        return loss, {"vqa_score": score}

    # -- evaluation ---------------------------------------------------------------------------------------------

    def evaluate(self, model: nn.Module, env: DistEnv, run_dir: Path, step: int) -> dict[str, float]:
        """The official VQA accuracy (overall, yes/no, number, other) on ``eval.source`` (first ``eval.max_images``
        questions)."""
        ev = self.cfg.eval
        if ev.source is None:
            return {}
        s = ev.source
        result = evaluate_vqa(model, s["questions"], s["annotations"], s["images"], batch_size=ev.batch_size,
                              device=env.device, max_questions=ev.max_images, image_pattern=s.get("image_pattern"))
        return flat_vqa_metrics(result["metrics"])

    def describe(self) -> str:
        return "task vqa (METER co-attention, soft-target BCE)"
