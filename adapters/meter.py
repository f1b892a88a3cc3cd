"""METER on a Florence dual encoder (architecture ``meter``; SPEC §6): co-attention fusion of the text tower's token
states and the image tower's last-stage tokens, poolers, and VQA / ITM / MLM heads.

::

    images (B, 3, H, W) -> image_encoder.forward_tokens -> (B, N, C_img)  (last stage after its final norm)
    input_ids (B, L)    -> text_encoder (transformers)  -> (B, L, C_txt)
        -> fusion.image_proj / text_proj (-> h) + token_type_embeddings (1 image, 0 text)
        -> fusion: M_co co-attention layers per stream (adapters/coattention.py)
        -> cls_feats (B, 2h) = [text_pooler(token 0), image_pooler(mean of image tokens)]
        -> vqa_head (B, A) | itm_head (B, 2) | mlm_head (B, L, V)

Build it from a named config (``configs/models/meter_coswin_*.json``) and a pre-trained UniCL dual encoder, whose
image tower, text encoder and tokenizer it takes (fusion and heads are new, METER's init)::

    create_model("meter_coswin_test", backbone=unicl_model_or_bundle_dir, answers=[...], heads=["vqa"],
                 fusion={"num_layers": 2}, max_text_len=24)

Config sections (keys starting with "_" are comments)::

    {"architecture": "meter",
     "image": {"model": "coswin_base", ...create_model overrides},   # without a backbone; optional "pretrained"
     "text": {"model_type": "roberta", ...HF config} | {"pretrained": local transformers dir},   # idem
     "fusion": FUSION_DEFAULTS keys,            # num_layers 0: no co-attention (projected tokens -> poolers)
     "heads": ["vqa", "itm", "mlm"],            # any of them, in any order
     "answers": [...],                          # the VQA answer vocabulary (needed with "vqa")
     "max_text_len": 40,
     "preprocess": {input_size, mean, std, interpolation, crop_pct}}   # optional, updates the tower's / backbone's

Semantics follow METER's code (meter_module.py, heads.py, objectives.init_weights) with one generalisation: the MLM
head's transform maps h to the text tower's embedding width E (METER: h = E = 768) so that its decoder can be the
text tower's word-embedding matrix itself (tied, as BERT's ``tie_weights``; METER's own MLM decoder is a separate
Linear). The tie is by reference at call time: the bundle holds that matrix once, and it stays tied after loading.

A bundle (``save_pretrained``) holds config.json (towers' configs included, no other bundle needed), the weights,
preprocess.json, ``answers.json`` and ``tokenizer/``.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from florence.adapters.coattention import CoAttentionFusion, init_weights
from florence.backbone.text_tower import (encoder_from_config, encoder_from_pretrained, set_encoder_checkpointing,
                                          text_positions)
from florence.bundle import BundleMixin, from_pretrained
from florence.errors import FlorenceError
from florence.factory import create_model
from florence.registry import register_architecture
from florence.tokenizer import load_tokenizer, tokenize

FUSION_DEFAULTS = dict(hidden_size=768, num_layers=6, num_heads=12, intermediate_size=3072, dropout=0.1,
                       layer_norm_eps=1e-12, hidden_act="gelu", image_pos_grid=0)
HEAD_NAMES = ("vqa", "itm", "mlm")
_CONFIG_KEYS = ("name", "image", "text", "fusion", "heads", "answers", "max_text_len", "preprocess")
_PREPROCESS_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct")
_PROVENANCE_KEYS = ("_name_or_path", "transformers_version")
ANSWERS_FILE = "answers.json"


class MeterConfigError(FlorenceError, ValueError):
    """A METER config, head list, answer vocabulary or backbone that cannot build the model; names the key."""


class MLMHead(nn.Module):
    """METER ``heads.MLMHead`` (BERT's prediction head): ``dense`` (h -> E), activation, ``norm`` (LayerNorm E), then
    the decoder -- the text tower's word embeddings (V, E), passed in at call time -- plus ``bias`` (V)."""

    def __init__(self, hidden_size: int, embed_dim: int, vocab_size: int, hidden_act: str, layer_norm_eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden_size, embed_dim)
        self.act = ACT2FN[hidden_act]
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: torch.Tensor, decoder_weight: torch.Tensor) -> torch.Tensor:
        """(B, L, h) states, (V, E) decoder -> (B, L, V) logits."""
        return F.linear(self.norm(self.act(self.dense(x))), decoder_weight, self.bias)


def vqa_classifier(width: int, num_answers: int) -> nn.Sequential:
    """METER ``vqa_classifier``: Linear(2h, 2h) -> LayerNorm -> GELU -> Linear(2h, A) (``width`` = 2h)."""
    return nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.GELU(), nn.Linear(width, num_answers))


def _fusion_section(given: dict[str, Any] | None) -> dict[str, Any]:
    given = {k: v for k, v in (given or {}).items() if not k.startswith("_")}
    unknown = sorted(set(given) - set(FUSION_DEFAULTS))
    if unknown:
        raise MeterConfigError(f"meter fusion: unknown keys {unknown} (known: {sorted(FUSION_DEFAULTS)})")
    cfg = {**FUSION_DEFAULTS, **given}
    if cfg["num_layers"] < 0 or cfg["image_pos_grid"] < 0 or cfg["hidden_size"] % cfg["num_heads"]:
        raise MeterConfigError(f"meter fusion: num_layers and image_pos_grid must be >= 0 and hidden_size a multiple "
                               f"of num_heads, got num_layers={cfg['num_layers']}, image_pos_grid="
                               f"{cfg['image_pos_grid']}, hidden_size={cfg['hidden_size']}, "
                               f"num_heads={cfg['num_heads']}")
    if cfg["hidden_act"] not in ACT2FN:
        raise MeterConfigError(f"meter fusion.hidden_act: unknown activation {cfg['hidden_act']!r}")
    return cfg


def _check_heads(heads: Sequence[str], answers: Sequence[str] | None) -> tuple[list[str], list[str] | None]:
    if isinstance(heads, str) or not all(isinstance(h, str) for h in heads):
        raise MeterConfigError(f"meter heads: expected a list of names from {list(HEAD_NAMES)}, got {heads!r}")
    unknown = [h for h in heads if h not in HEAD_NAMES]
    if unknown or len(set(heads)) != len(heads):
        raise MeterConfigError(f"meter heads {list(heads)}: unknown or repeated head {unknown or heads}; known: "
                               f"{list(HEAD_NAMES)}")
    if answers is not None:
        if isinstance(answers, str) or not all(isinstance(a, str) for a in answers):
            raise MeterConfigError("meter answers: expected a list of answer strings")
        counts = Counter(answers)
        twice = next((a for a in answers if counts[a] > 1), None)
        if twice is not None:
            raise MeterConfigError(f"meter answers: {twice!r} occurs twice in the answer vocabulary")
    if "vqa" in heads and not answers:
        raise MeterConfigError("meter heads: the 'vqa' head needs answers=[...] (the answer vocabulary), or choose "
                               "heads without it, e.g. ['itm', 'mlm']")
    return list(heads), (list(answers) if answers is not None else None)


@register_architecture("meter")
class MeterModel(BundleMixin, nn.Module):
    """Image tower + text encoder + co-attention fusion + heads (module docstring).

    Args:
        image_encoder: a florence image tower with ``forward_tokens`` (CoSwin / Swin), built by ``create_model``.
        text_encoder: a transformers encoder model (``last_hidden_state``; RobertaModel by default), no pooler.
        fusion: ``FUSION_DEFAULTS`` keys (hidden size h, M_co ``num_layers``, heads, FFN size, dropout, ...).
        heads: any of "vqa", "itm", "mlm".
        answers: the VQA answer vocabulary (A strings), required with "vqa".
        max_text_len: token length of ``tokenize``.
        tokenizer: a transformers tokenizer (or None: ``tokenize`` then raises).
        preprocess: image preprocessing dict (default: the tower's ``preprocess`` / ``default_preprocess``).
        name: the named config it came from (kept in the bundle).
    """

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, *, fusion: dict[str, Any] | None = None,
                 heads: Sequence[str] = ("vqa",), answers: Sequence[str] | None = None, max_text_len: int = 40,
                 tokenizer=None, preprocess: dict[str, Any] | None = None, name: str | None = None):
        super().__init__()
        if not hasattr(image_encoder, "forward_tokens") or getattr(image_encoder, "florence_config", None) is None:
            raise MeterConfigError(f"meter: the image tower {type(image_encoder).__name__} is not a florence image "
                                   "tower built by create_model (forward_tokens, florence_config)")
        if not hasattr(text_encoder, "get_input_embeddings") or not hasattr(text_encoder, "config"):
            raise MeterConfigError(f"meter: the text encoder {type(text_encoder).__name__} is not a transformers model")
        head = getattr(image_encoder, "head", None)
        if head is not None and any(True for _ in head.parameters()):
            image_encoder.reset_classifier(0)  # a classifier would be a parameter without a gradient (DDP)
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.fusion_cfg = _fusion_section(fusion)
        h = self.fusion_cfg["hidden_size"]
        self.token_type_embeddings = nn.Embedding(2, h)  # 0 text, 1 image (METER: outside the cross-modal part)
        init_weights(self.token_type_embeddings)
        self.fusion = CoAttentionFusion(text_encoder.config.hidden_size, image_encoder.num_features,
                                        **self.fusion_cfg)
        max_text_len = int(max_text_len)
        if not 2 <= max_text_len <= text_positions(text_encoder.config):
            raise MeterConfigError(f"meter max_text_len={max_text_len}: must be in [2, "
                                   f"{text_positions(text_encoder.config)}] (the text encoder's positions)")
        self.max_text_len = max_text_len
        self.tokenizer = tokenizer
        if tokenizer is not None:
            self._check_tokenizer(tokenizer)
        base = getattr(image_encoder, "preprocess", None) or image_encoder.default_preprocess
        self.preprocess = {**base, **(preprocess or {})}
        self.name = name
        self.heads: list[str] = []
        self.answers: list[str] | None = None
        self.set_heads(heads, answers)

    # -- heads ---------------------------------------------------------------------------------------------------

    def set_heads(self, heads: Sequence[str], answers: Sequence[str] | None = None) -> None:
        """Replace the heads by fresh ones (METER's init): ``heads`` from "vqa", "itm", "mlm"; ``answers`` the VQA
        vocabulary (default: the current one). Heads not listed are removed."""
        answers = self.answers if answers is None and "vqa" in heads else answers
        heads, answers = _check_heads(heads, answers)
        for old in self.heads:
            delattr(self, f"{old}_head")
        h, cfg = self.fusion_cfg["hidden_size"], self.fusion_cfg
        ref = self.token_type_embeddings.weight
        built = {
            "vqa": lambda: vqa_classifier(2 * h, len(answers)),
            "itm": lambda: nn.Linear(2 * h, 2),  # METER ITMHead.fc
            "mlm": lambda: MLMHead(h, self.text_encoder.config.hidden_size, self.vocab_size, cfg["hidden_act"],
                                   cfg["layer_norm_eps"]),
        }
        for name in heads:
            module = built[name]()
            module.apply(init_weights)
            setattr(self, f"{name}_head", module.to(device=ref.device, dtype=ref.dtype).train(self.training))
        self.heads = heads
        self.answers = answers if "vqa" in heads else None

    @property
    def num_answers(self) -> int:
        return len(self.answers) if self.answers else 0

    # -- text ----------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """V, the text encoder's vocabulary (rows of its word embeddings)."""
        return int(self.text_encoder.get_input_embeddings().weight.shape[0])

    @property
    def pad_token_id(self) -> int | None:
        if self.tokenizer is not None:
            return self.tokenizer.pad_token_id
        return getattr(self.text_encoder.config, "pad_token_id", None)

    @property
    def mask_token_id(self) -> int | None:
        return getattr(self.tokenizer, "mask_token_id", None) if self.tokenizer is not None else None

    def _check_tokenizer(self, tokenizer) -> None:
        if len(tokenizer) > self.vocab_size:
            raise MeterConfigError(f"meter tokenizer: {len(tokenizer)} tokens but the text encoder's vocab_size is "
                                   f"{self.vocab_size}")
        pad = getattr(self.text_encoder.config, "pad_token_id", None)
        if pad is not None and tokenizer.pad_token_id is not None and tokenizer.pad_token_id != pad:
            raise MeterConfigError(f"meter tokenizer: pad id {tokenizer.pad_token_id} differs from the text "
                                   f"encoder's pad_token_id {pad}")

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """``dict(input_ids, attention_mask)`` LongTensors (N, max_text_len): truncated, padded."""
        if self.tokenizer is None:
            raise MeterConfigError("meter: no tokenizer attached; build the model on a dual-encoder bundle that has "
                                   "one, or pass tokenizer= (a directory or a transformers tokenizer)")
        return tokenize(self.tokenizer, texts, self.max_text_len)

    # -- forward ------------------------------------------------------------------------------------------------

    def encode(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
        """Fused features: ``text_feats`` (B, L, h), ``image_feats`` (B, N, h), ``cls_feats`` (B, 2h).

        Args:
            images: (B, 3, H, W) normalised images.
            input_ids: (B, L) token ids.
            attention_mask: (B, L) 1 for tokens, 0 for padding (None: no padding).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # B, L, C_t
        image, grid = self.image_encoder.forward_tokens(images)  # B, N, C_img; (H', W')
        types = self.token_type_embeddings.weight  # 2, h
        x = self.fusion.text_proj(text) + types[0]  # B, L, h
        y = self.fusion.add_image_positions(self.fusion.image_proj(image) + types[1], grid)  # B, N, h
        x, y = self.fusion(x, y, attention_mask)
        return {"text_feats": x, "image_feats": y, "cls_feats": self.fusion.pool(x, y)}

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """``cls_feats`` (B, 2h) and, per present head, ``vqa_logits`` (B, A), ``itm_logits`` (B, 2), ``mlm_logits``
        (B, L, V). Every value is batch-first, so the dict splits along the batch."""
        feats = self.encode(images, input_ids, attention_mask)
        out = {"cls_feats": feats["cls_feats"]}
        if "vqa" in self.heads:
            out["vqa_logits"] = self.vqa_head(feats["cls_feats"])
        if "itm" in self.heads:
            out["itm_logits"] = self.itm_head(feats["cls_feats"])
        if "mlm" in self.heads:
            out["mlm_logits"] = self.mlm_head(feats["text_feats"], self.text_encoder.get_input_embeddings().weight)
        return out

    @torch.no_grad()
    def answer(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` answers (at most A): sigmoid probabilities (B, k) and answer indices (B, k), best first."""
        if "vqa" not in self.heads:
            raise MeterConfigError(f"meter: no VQA head (heads {self.heads}); set_heads(['vqa'], answers=...)")
        probs = self(images, input_ids, attention_mask)["vqa_logits"].float().sigmoid()  # B, A
        return probs.topk(min(int(k), self.num_answers), dim=-1)

    # -- training helpers ----------------------------------------------------------------------------------------

    def no_weight_decay(self) -> set[str]:
        """Biases and norm weights (every ndim <= 1 parameter) and the image tower's relative-position tables. (The
        Florence VLP recipe's undecayed text and token-type embeddings: the engine's ``decay_embeddings=False``.)"""
        names = {name for name, p in self.named_parameters() if p.ndim <= 1}
        names |= {f"image_encoder.{n}" for n in self.image_encoder.no_weight_decay()}
        params = dict(self.named_parameters())
        return {n for n in names if n in params}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the towers' blocks and each co-attention layer in the backward pass."""
        self.image_encoder.set_grad_checkpointing(enable)
        set_encoder_checkpointing(self.text_encoder, enable)
        self.fusion.grad_checkpointing = enable

    def fsdp_wrap_modules(self) -> list[nn.Module]:
        """FSDP2 units, innermost first: the image tower's blocks, the text encoder's layers, each co-attention
        layer, then the image tower. The text embeddings stay with the root unit: the MLM decoder reads them."""
        words = self.text_encoder.get_input_embeddings()
        names = set(getattr(self.text_encoder, "_no_split_modules", None) or ())
        text_layers = [m for m in self.text_encoder.modules() if type(m).__name__ in names
                       and any(True for _ in m.parameters()) and not any(s is words for s in m.modules())]
        return [*self.image_encoder.fsdp_wrap_modules(), *text_layers, *self.fusion.text_layers,
                *self.fusion.image_layers, self.image_encoder]

    # -- bundles and named configs (florence.registry) -----------------------------------------------------------

    default_weight_format = "florence"

    def bundle_config(self) -> dict[str, Any]:
        spec = self.image_encoder.florence_config
        text = self.text_encoder.config.to_dict()
        for key in _PROVENANCE_KEYS:
            text.pop(key, None)
        return {"name": self.name, "image": {"model": spec["name"], **spec.get("overrides", {})}, "text": text,
                "fusion": dict(self.fusion_cfg), "heads": list(self.heads), "max_text_len": self.max_text_len}

    def save_bundle_files(self, directory: Path) -> None:
        if self.answers is not None:
            (directory / ANSWERS_FILE).write_text(json.dumps(self.answers, indent=0))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory / "tokenizer"))

    @classmethod
    def from_bundle_config(cls, config: dict[str, Any], preprocess: dict[str, Any] | None,
                           directory: Path | None) -> "MeterModel":
        config = dict(config)
        tokenizer = None
        if directory is not None:
            if (directory / ANSWERS_FILE).is_file():
                config["answers"] = json.loads((directory / ANSWERS_FILE).read_text())
            if (directory / "tokenizer").is_dir():
                tokenizer = load_tokenizer(directory / "tokenizer")
        if preprocess is not None:
            config["preprocess"] = preprocess
        return build_meter(config, tokenizer=tokenizer)

    @classmethod
    def from_config(cls, config: dict[str, Any], backbone=None, tokenizer=None) -> "MeterModel":
        """A named JSON config (``configs/models/meter_*.json``) with ``create_model``'s overrides merged in."""
        return build_meter(config, backbone=backbone, tokenizer=tokenizer)

    @staticmethod
    def resolve_backbone(spec: str | os.PathLike | nn.Module) -> nn.Module:
        """The dual encoder a ``backbone=`` names: a bundle directory (loaded) or a model (as is)."""
        return spec if isinstance(spec, nn.Module) else from_pretrained(spec).train()


def _dual_encoder(backbone: nn.Module) -> tuple[nn.Module, nn.Module, Any, dict[str, Any] | None]:
    """(image tower, transformers text encoder, tokenizer, preprocess) of a UniCL-style dual encoder."""
    text = getattr(backbone, "text_encoder", None)
    if not hasattr(backbone, "image_encoder") or not hasattr(text, "encoder"):
        raise MeterConfigError(f"meter backbone: a {type(backbone).__name__} is not a dual encoder (METER takes both "
                               "towers and the tokenizer of a UniCL model or bundle)")
    return backbone.image_encoder, text.encoder, getattr(backbone, "tokenizer", None), getattr(
        backbone, "preprocess", None)


def _towers_from_config(config: dict[str, Any]) -> tuple[nn.Module, nn.Module, Any]:
    """Fresh (or ``pretrained``) towers from the config's ``image`` and ``text`` sections; a tokenizer found in a
    pretrained text directory."""
    image = {k: v for k, v in (config.get("image") or {}).items() if not k.startswith("_")}
    text = {k: v for k, v in (config.get("text") or {}).items() if not k.startswith("_")}
    if not isinstance(image.get("model"), str):
        raise MeterConfigError("meter config: 'image' needs a 'model' name, e.g. {\"model\": \"coswin_base\"} (or "
                               "pass backbone= a dual encoder)")
    image_encoder = create_model(image.pop("model"), **image)
    if "pretrained" in text:
        path = str(text["pretrained"])
        has_tokenizer = any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json"))
        return image_encoder, encoder_from_pretrained(path), load_tokenizer(path) if has_tokenizer else None
    if "model_type" not in text:
        raise MeterConfigError("meter config: 'text' needs 'model_type' (HF config fields) or 'pretrained' (a local "
                               "dir), or pass backbone= a dual encoder")
    return image_encoder, encoder_from_config(text), None


def build_meter(config: dict[str, Any], *, backbone: str | os.PathLike | nn.Module | None = None,
                tokenizer=None) -> MeterModel:
    """A ``MeterModel`` from a config dict (module docstring).

    Args:
        config: the METER config (a named config with overrides merged in, or a bundle's).
        backbone: a UniCL dual encoder (model or bundle directory) whose image tower, text encoder, tokenizer and
            preprocessing are taken (not copied); then the config's ``image`` / ``text`` sections are ignored.
        tokenizer: a transformers tokenizer or a local directory, replacing the backbone's / text directory's.
    """
    if config.get("architecture", "meter") != "meter":
        raise MeterConfigError(f"meter config: architecture {config['architecture']!r} is not 'meter'")
    config = {k: v for k, v in config.items() if not k.startswith("_") and k != "architecture"}
    unknown = sorted(set(config) - set(_CONFIG_KEYS))
    if unknown:
        raise MeterConfigError(f"meter config: unknown keys {unknown}; allowed: {list(_CONFIG_KEYS)}")
    preprocess = {k: v for k, v in (config.get("preprocess") or {}).items() if not k.startswith("_")}
    bad = sorted(set(preprocess) - set(_PREPROCESS_KEYS))
    if bad:
        raise MeterConfigError(f"meter preprocess: unknown keys {bad} (known: {list(_PREPROCESS_KEYS)})")
    if backbone is not None:
        image_encoder, text_encoder, found_tokenizer, base = _dual_encoder(MeterModel.resolve_backbone(backbone))
        preprocess = {**(base or {}), **preprocess}
    else:
        image_encoder, text_encoder, found_tokenizer = _towers_from_config(config)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    return MeterModel(image_encoder, text_encoder, fusion=config.get("fusion"), heads=config.get("heads", ["vqa"]),
                      answers=config.get("answers"), max_text_len=config.get("max_text_len", 40),
                      tokenizer=tokenizer if tokenizer is not None else found_tokenizer,
                      preprocess=preprocess or None, name=config.get("name")).train()
