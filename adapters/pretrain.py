"""UniCL pre-training as a task of the engine (``task: unicl``, the default): the Florence dual encoder on image–label
and image–text data, with the UniCL loss (SPEC §3) and the zero-shot check of ``florence eval zeroshot``.

- model: a named dual encoder (``model.name`` + ``model.overrides``), a dual-encoder config (``model.config``) or a
  bundle (``model.pretrained``, continued pre-training); a tokenizer from ``model.tokenizer`` or trained on the data's
  texts at run start (``model.train_tokenizer_vocab``, saved in ``<run_dir>/tokenizer``);
- data: ``florence.data.build_train_loader`` (batches of images, token ids, attention masks, UniCL labels);
- loss: ``UniCLLoss`` over the micro-batch (gathered across ranks), gradient-cache capable;
- after each step: the logit scale is clamped to [0, ln 100];
- evaluation: zero-shot top-1 / top-5 / mean-per-class on ``eval.source`` with ``evaluate_zeroshot``, the evaluator of
  ``florence eval zeroshot`` (same classifier, same default templates: the 80 CLIP ImageNet templates).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from florence.adapters.zeroshot import DEFAULT_TEMPLATES, evaluate_zeroshot
from florence.backbone.loss import UniCLLoss
from florence.backbone.unicl import build_unicl, check_tokenizer
from florence.bundle import from_pretrained
from florence.data.loader import build_source, build_train_loader
from florence.data.source_dataset import SourceImages
from florence.data.templates import format_prompt, resolve_templates
from florence.data.transforms import build_transform
from florence.engine.config import ConfigError
from florence.engine.distributed import DistEnv, barrier
from florence.engine.task import Task
from florence.factory import create_model, merge_overrides
from florence.registry import register_task
from florence.tokenizer import load_tokenizer, train_bpe_tokenizer


@dataclass
class UniCLOptions:
    eval_templates: str | None = None  # zero-shot evaluation templates: unicl | openai | a file (default: 80 CLIP)


def data_texts(data_cfg: dict) -> list[str]:
    """Every text the data can produce, to train a tokenizer on: each class name (and synonym) in each template
    for image-label sources, the captions for image-text sources."""
    texts: list[str] = []
    for i, spec in enumerate(data_cfg.get("sources", [])):
        source = build_source(dict(spec), key=f"data.sources[{i}]")
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


@register_task("unicl")
class UniCLTask(Task):
    """UniCL image–text–label contrastive pre-training (and continued training) of a dual encoder."""

    Options = UniCLOptions
    supports_grad_cache = True

    def __init__(self, cfg, options: UniCLOptions) -> None:
        super().__init__(cfg, options)
        self.loss_fn = UniCLLoss()

    def validate(self) -> None:
        m = self.cfg.model
        if m.backbone is not None:
            raise ConfigError("model.backbone: the unicl task trains a whole dual encoder; give model.name, "
                              "model.config or model.pretrained")
        self.validate_data()

    # -- model --------------------------------------------------------------------------------------------------

    def build_tokenizer(self, env: DistEnv, run_dir: Path):
        """The tokenizer to attach: trained on the data's texts into ``<run_dir>/tokenizer`` (rank 0, once: a resumed
        run reuses it), loaded from ``model.tokenizer``, or None (keep the model's own)."""
        m = self.cfg.model
        if m.train_tokenizer_vocab:
            out = run_dir / "tokenizer"
            if env.is_main and not (out / "tokenizer.json").is_file():
                texts = data_texts(self.cfg.data)
                if not texts:
                    raise ConfigError("model.train_tokenizer_vocab: the data gives no texts to train a tokenizer on")
                train_bpe_tokenizer(texts, out, vocab_size=m.train_tokenizer_vocab)
            barrier()
            return load_tokenizer(out)
        if m.tokenizer:
            return load_tokenizer(m.tokenizer)
        return None

    def build_model(self, env: DistEnv, run_dir: Path) -> nn.Module:
        """A dual encoder from ``model.name`` (+ overrides), ``model.config`` or ``model.pretrained`` (a bundle)."""
        m = self.cfg.model
        tokenizer = self.build_tokenizer(env, run_dir)
        text_overrides = {"vocab_size": len(tokenizer)} if tokenizer is not None else {}
        if m.pretrained is not None:
            model = from_pretrained(m.pretrained)
            if tokenizer is not None:
                origin = "model.train_tokenizer_vocab" if m.train_tokenizer_vocab else "model.tokenizer"
                try:
                    check_tokenizer(tokenizer, model.text_encoder)
                except ValueError as err:
                    raise ConfigError(f"{origin} with model.pretrained={m.pretrained}: {err} (a bundle's text tower "
                                      "keeps its vocabulary; use its own tokenizer or a compatible one)") from None
                model.tokenizer = tokenizer
        elif m.name is not None:
            overrides = dict(m.overrides)
            if text_overrides:
                overrides["text"] = {**overrides.get("text", {}), **text_overrides}
            model = create_model(m.name, tokenizer=tokenizer, **overrides)
        else:
            config = merge_overrides(m.config, m.overrides)
            if text_overrides:
                config = merge_overrides(config, {"text": text_overrides})
            model = build_unicl(config, tokenizer=tokenizer)
        if not hasattr(model, "encode_text"):
            raise ConfigError(f"task unicl: {type(model).__name__} is not a dual encoder")
        if m.context_length is not None:
            model.context_length = m.context_length
        return model

    def build_loader(self, model: nn.Module, env: DistEnv, run_dir: Path, micro_batch: int):
        data_cfg = {"seed": self.cfg.seed, **self.cfg.data, "batch_size": micro_batch}
        return build_train_loader(data_cfg, preprocess=model.preprocess, tokenize=model.tokenize, rank=env.rank,
                                  world_size=env.world_size, run_dir=run_dir)

    # -- loss ---------------------------------------------------------------------------------------------------

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = model(images=batch["images"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return {"image_embeds": out.image_embeds, "text_embeds": out.text_embeds, "logit_scale": out.logit_scale}

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]):
        scale = outputs["logit_scale"]
        loss = self.loss_fn(outputs["image_embeds"], outputs["text_embeds"], batch["labels"], scale)
        return loss, {"logit_scale": scale.detach()}

    def after_step(self, model: nn.Module) -> None:
        model.clamp_logit_scale_()  # FSDP2 leaves the 0-dim logit_scale unsharded: a plain clamp

    # -- evaluation ---------------------------------------------------------------------------------------------

    def evaluate(self, model: nn.Module, env: DistEnv, run_dir: Path, step: int) -> dict[str, float]:
        """Zero-shot top-1 / top-5 / mean-per-class on ``eval.source`` (first ``eval.max_images``)."""
        ev = self.cfg.eval
        if ev.source is None:
            return {}
        source = build_source(dict(ev.source), key="eval.source")
        if not hasattr(source, "class_names"):
            raise ConfigError(f"eval.source {ev.source}: zero-shot needs an image-label source with class names")
        templates = resolve_templates(self.options.eval_templates) if self.options.eval_templates else DEFAULT_TEMPLATES
        dataset = SourceImages(source, build_transform(model.preprocess, train=False), ev.max_images)
        result = evaluate_zeroshot(model, dataset, list(source.class_names), templates, batch_size=ev.batch_size,
                                   device=env.device, name="eval.source")
        return dict(result.metrics)
