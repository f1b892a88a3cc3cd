"""Vision-language pre-training of the METER fusion (``task: vlp``; SPEC §6.1-6.2): image-text matching (ITM) plus
masked language modelling (MLM), as METER pre-trains before VQA.

- model: a named METER config on a pre-trained dual encoder (``model.backbone``: a UniCL bundle) with the ``itm`` and
  ``mlm`` heads, or a METER bundle to continue (``model.pretrained``); ``florence train`` with ``task: vqa`` and
  ``model.pretrained`` on the result replaces those heads by a VQA head;
- data: the image-label and image-text sources of ``florence.data.build_train_loader`` (captions, or class names in
  prompt templates), tokenized by the model (``max_text_len``);
- ITM (METER ``objectives.compute_itm``): half of the pairs of a micro-batch, chosen at random, get a false image: the
  image of another pair of the micro-batch whose label differs (METER draws a random image of the dataset; taking it
  from the batch costs no extra loading, and the label check keeps a same-class image from posing as a negative);
  cross-entropy on the 2-way head (label 1 = matched);
- MLM (METER ``objectives.compute_mlm``, BERT's recipe): 15% of the real tokens (``task.mlm_probability``; never
  ``<s>``, ``</s>`` or padding) are predicted; of those 80% become ``<mask>``, 10% a random token, 10% stay;
  cross-entropy on the predicted positions, with the true images;
- one forward of the model over the 2B pairs (the MLM half with masked text and true images, the ITM half with
  clean text and the drawn images), so DDP sees every parameter used once; the draws happen in ``prepare_batch`` with
  torch's global generator (checkpointed: a resumed run draws the same).

``optim.lr_mult: {fusion: 5, itm_head: 5, mlm_head: 5}`` is METER's pre-training multiplier (SPEC §6.2).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from florence.bundle import from_pretrained
from florence.data.loader import build_train_loader
from florence.engine.config import ConfigError
from florence.engine.distributed import DistEnv
from florence.engine.task import Task
from florence.factory import create_model
from florence.registry import register_task

IGNORE = -100  # cross-entropy's ignore_index: positions without an MLM target


@dataclass
class VLPOptions:
    mlm_probability: float = 0.15  # fraction of real tokens predicted by MLM (METER / BERT)
    itm_negative_fraction: float = 0.5  # fraction of pairs given a false image (METER: half)


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, probability: float, mask_token_id: int,
                vocab_size: int, special_ids: list[int], generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (transformers ``DataCollatorForLanguageModeling`` semantics).

    Args:
        input_ids, attention_mask: (B, L).
        special_ids: token ids never chosen (``<s>``, ``</s>``, padding).

    Returns:
        masked ids (B, L) and MLM labels (B, L): the original id at chosen positions, ``IGNORE`` elsewhere.
    """
    candidates = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(special_ids, device=input_ids.device))
    draw = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    chosen = (draw < probability) & candidates
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    kind = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    to_mask = chosen & (kind < 0.8)
    to_random = chosen & (kind >= 0.8) & (kind < 0.9)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=input_ids.device)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def draw_false_images(labels: torch.Tensor, fraction: float, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM pairs: which pairs get a false image and from which pair of the batch.

    Args:
        labels: (B,) data labels; a false image comes from a pair with another label.

    Returns:
        ``source`` (B,) the index of the image each pair is shown, and ``matched`` (B,) 1 where ``source[i] == i``.
        ``round(fraction * B)`` pairs are chosen at random; a chosen pair whose label every other pair shares
        keeps its own image.
    """
    B = labels.shape[0]
    order = torch.randperm(B, generator=generator)
    negative = torch.zeros(B, dtype=torch.bool)
    negative[order[: round(fraction * B)]] = True
    source = torch.arange(B)
    for i in torch.nonzero(negative).flatten().tolist():
        others = torch.nonzero(labels.cpu() != labels[i].cpu()).flatten()
        if len(others):
            source[i] = others[torch.randint(len(others), (1,), generator=generator)].item()
    return source, (source == torch.arange(B)).long()


@register_task("vlp")
class VLPTask(Task):
    """ITM + MLM pre-training of a METER model on image-text (or image-label) data."""

    Options = VLPOptions
    supports_grad_cache = True  # both losses are means over pairs / tokens; the draws are made once per micro-batch

    def validate(self) -> None:
        m, o = self.cfg.model, self.options
        if m.config is not None or m.tokenizer or m.train_tokenizer_vocab or m.context_length:
            raise ConfigError("model: the vlp task takes model.name (+ model.backbone) or model.pretrained")
        if m.pretrained is None and m.name is None:
            raise ConfigError("model.name: give a METER config (florence models meter) or model.pretrained")
        if not 0 < o.mlm_probability < 1:
            raise ConfigError("task.mlm_probability: must be in (0, 1)")
        if not 0 <= o.itm_negative_fraction <= 1:
            raise ConfigError("task.itm_negative_fraction: must be in [0, 1]")
        if self.cfg.eval.source is not None:
            raise ConfigError("eval.source: the vlp task has no evaluation of its own; fine-tune with task: vqa and "
                              "evaluate there")
        self.validate_data()

    # -- model --------------------------------------------------------------------------------------------------

    def build_model(self, env: DistEnv, run_dir: Path) -> nn.Module:
        m = self.cfg.model
        if m.pretrained is not None:
            model = from_pretrained(m.pretrained)
            if not hasattr(model, "set_heads"):
                raise ConfigError(f"model.pretrained={m.pretrained}: a {type(model).__name__}, not a METER model")
            if sorted(model.heads) != ["itm", "mlm"]:
                model.set_heads(["itm", "mlm"])
        else:
            overrides = {**m.overrides, "heads": ["itm", "mlm"]}
            if m.backbone is not None:
                overrides["backbone"] = m.backbone
            model = create_model(m.name, **overrides)
        if model.mask_token_id is None:
            raise ConfigError("task vlp: the model's tokenizer has no mask token (MLM needs one)")
        tok = model.tokenizer
        self.special_ids = sorted({i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
                                               tok.cls_token_id, tok.sep_token_id) if i is not None})
        self.mask_token_id, self.vocab_size = model.mask_token_id, model.vocab_size
        return model.train()

    def build_loader(self, model: nn.Module, env: DistEnv, run_dir: Path, micro_batch: int):
        data_cfg = {"seed": self.cfg.seed, **self.cfg.data, "batch_size": micro_batch}
        return build_train_loader(data_cfg, preprocess=model.preprocess, tokenize=model.tokenize, rank=env.rank,
                                  world_size=env.world_size, run_dir=run_dir)

    # -- loss ---------------------------------------------------------------------------------------------------

    def prepare_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The random draws (MLM masking, ITM false images), once per micro-batch."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        masked, mlm_labels = mask_tokens(ids.cpu(), mask.cpu(), probability=self.options.mlm_probability,
                                         mask_token_id=self.mask_token_id, vocab_size=self.vocab_size,
                                         special_ids=self.special_ids)
        source, matched = draw_false_images(batch["labels"], self.options.itm_negative_fraction)
        device = ids.device
        return {**batch, "mlm_input_ids": masked.to(device), "mlm_labels": mlm_labels.to(device),
                "itm_images": batch["images"][source.to(device)], "itm_labels": matched.to(device)}

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        B = batch["images"].shape[0]
        images = torch.cat([batch["images"], batch["itm_images"]])  # 2B, 3, H, W
        ids = torch.cat([batch["mlm_input_ids"], batch["input_ids"]])  # 2B, L
        mask = torch.cat([batch["attention_mask"], batch["attention_mask"]])
        out = model(images, ids, mask)
        return {"mlm_logits": out["mlm_logits"][:B], "itm_logits": out["itm_logits"][B:]}  # B, L, V; B, 2

    def loss(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]):
        mlm_logits, labels = outputs["mlm_logits"], batch["mlm_labels"]
        if (labels != IGNORE).any():
            mlm = F.cross_entropy(mlm_logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        else:  # no token drawn in this micro-batch: a zero that keeps the graph (every parameter used)
            mlm = mlm_logits.sum() * 0.0
        itm = F.cross_entropy(outputs["itm_logits"], batch["itm_labels"])
        with torch.no_grad():
            chosen = labels != IGNORE
            mlm_acc = (mlm_logits.argmax(-1)[chosen] == labels[chosen]).float().mean() if chosen.any() else mlm * 0
            itm_acc = (outputs["itm_logits"].argmax(-1) == batch["itm_labels"]).float().mean()
        return mlm + itm, {"mlm_loss": mlm.detach(), "itm_loss": itm.detach(), "mlm_acc": mlm_acc,
                           "itm_acc": itm_acc}

    def describe(self) -> str:
        return (f"task vlp (ITM with {self.options.itm_negative_fraction:.0%} false images + MLM at "
                f"{self.options.mlm_probability:.0%})")
