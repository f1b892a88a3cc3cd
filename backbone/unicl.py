"""UniCL dual encoder: CoSwin image tower + transformers text tower + projections + learnable logit scale.

Config dict (JSON; ``configs/models/*.json``; ``model.config`` returns one that rebuilds the model)::

    {
      "image": {"model": "coswin_tiny", ...create_model overrides},   # optional "pretrained"(+"pretrained_format")
      "text": {"model_type": "roberta", ...HF config fields}          # from scratch
           or {"pretrained": "/local/transformers/dir"},              # encoder weights + architecture from a
                                                                      # local directory; other text keys ignored
                                                                      # (but "pooling")
           (+ "pooling": "first" | "eot"; default by model_type: "eot" for "clip_text_model", else "first"),
      "embed_dim": 512, "context_length": 77,
      "preprocess": {...}                                             # optional; default: the image tower's
    }

Keys starting with "_" are comments. ``model.config`` stores the text tower as its full HF config dict plus its
"pooling" rule and drops "pretrained" paths, so a checkpoint bundle rebuilds the architecture without the original
directories. A UniCL release (CLIP-style text transformer) becomes a ``clip_text_model`` text section with
``"pooling": "eot"`` (``florence.backbone.unicl_convert``).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from florence.backbone.text_tower import TextTower
from florence.bundle import PREPROCESS_KEYS, BundleMixin
from florence.factory import create_model
from florence.registry import register_architecture
from florence.tokenizer import load_tokenizer, tokenize

_CONFIG_KEYS = ("name", "image", "text", "embed_dim", "context_length", "preprocess")
_IMAGE_LOAD_KEYS = ("pretrained", "pretrained_format")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt")


@dataclass
class UniCLOutput:
    """Dual-encoder output.

    Attributes:
        image_embeds: (B, D) L2-normalised image embeddings.
        text_embeds: (B, D) L2-normalised text embeddings.
        logit_scale: () the multiplier s = exp(logit_scale), clamped at 100.
    """

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    logit_scale: torch.Tensor


@register_architecture("unicl")
class UniCLModel(BundleMixin, nn.Module):
    """Image tower -> ``image_projection`` (8C -> D, no bias); text tower (with its own projection);
    shared learnable ``logit_scale`` (log of the multiplier).

    Args:
        image_encoder: backbone returning pooled ``(B, num_features)`` with ``default_preprocess``.
        text_encoder: ``TextTower`` projecting to ``embed_dim``.
        embed_dim: shared embedding size D.
        config: the JSON-able dict that rebuilds this model with ``build_unicl`` (without the text section,
            which is read from the text tower).
        preprocess: image preprocessing ``dict(input_size, mean, std, interpolation, crop_pct)``.
        context_length: token length L of ``tokenize``.
        tokenizer: a transformers tokenizer, or None.
        logit_scale_init: initial log multiplier (CLIP: ln(1/0.07)).
        logit_scale_max: clamp for the log multiplier (ln 100).
    """

    def __init__(
        self,
        *,
        image_encoder: nn.Module,
        text_encoder: TextTower,
        embed_dim: int,
        config: dict[str, Any],
        preprocess: dict[str, Any],
        context_length: int = 77,
        tokenizer=None,
        logit_scale_init: float = math.log(1 / 0.07),
        logit_scale_max: float = math.log(100),
    ):
        super().__init__()
        if text_encoder.embed_dim != embed_dim:
            raise ValueError(f"text tower projects to {text_encoder.embed_dim}, model embed_dim is {embed_dim}")
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.image_projection = nn.Linear(image_encoder.num_features, embed_dim, bias=False)
        nn.init.trunc_normal_(self.image_projection.weight, std=0.02)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.logit_scale_max = float(logit_scale_max)
        self.embed_dim = embed_dim
        self.context_length = context_length
        self.preprocess = dict(preprocess)
        self.tokenizer = tokenizer
        self._config = {k: v for k, v in config.items() if k != "text"}

    @property
    def config(self) -> dict[str, Any]:
        """JSON-able dict that rebuilds this architecture with ``build_unicl`` (no directories needed)."""
        return {**self._config, "text": self.text_encoder.tower_config, "embed_dim": self.embed_dim,
                "context_length": self.context_length, "preprocess": dict(self.preprocess)}

    # -- architecture registry (florence.registry): named JSON configs and bundles -----------------------------

    default_weight_format = "florence"

    @classmethod
    def from_config(cls, config: dict[str, Any], tokenizer=None) -> "UniCLModel":
        return build_unicl(config, tokenizer=tokenizer)

    def bundle_config(self) -> dict[str, Any]:
        return self.config

    @classmethod
    def from_bundle_config(cls, config: dict[str, Any], preprocess: dict[str, Any], directory) -> "UniCLModel":
        tokenizer_dir = directory / "tokenizer" if directory is not None else None
        tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir is not None and tokenizer_dir.is_dir() else None
        return build_unicl({**config, "preprocess": preprocess}, tokenizer=tokenizer)

    def save_bundle_files(self, directory) -> None:
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory / "tokenizer"))

    def image_tower(self) -> nn.Module:
        """The image encoder (a composite model built on this bundle takes it with ``backbone=``)."""
        return self.image_encoder

    def load_foreign_weights(self, src, *, format: str, strict: bool = True):
        """A Swin checkpoint in a foreign layout ("timm", "microsoft") goes into the image tower."""
        return self.image_encoder.load_foreign_weights(src, format=format, strict=strict)

    # -- encoders ----------------------------------------------------------------------------------------------

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) image embeddings (L2-normalised if ``normalize``)."""
        x = self.image_projection(self.image_encoder(images))  # B, D
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    normalize: bool = True) -> torch.Tensor:
        """(B, L) ids and mask -> (B, D) text embeddings (L2-normalised if ``normalize``)."""
        x = self.text_encoder(input_ids, attention_mask)  # B, D
        return F.normalize(x, dim=-1) if normalize else x

    def scale(self) -> torch.Tensor:
        """() the multiplier exp(min(logit_scale, ln 100))."""
        return self.logit_scale.clamp(max=self.logit_scale_max).exp()

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> UniCLOutput:
        """Images (B, 3, H, W), token ids and mask (B, L) -> ``UniCLOutput`` (normalised embeddings, multiplier)."""
        return UniCLOutput(
            image_embeds=self.encode_image(images),
            text_embeds=self.encode_text(input_ids, attention_mask),
            logit_scale=self.scale(),
        )

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the stored log multiplier to [0, ln 100] in place (call after each optimizer step)."""
        self.logit_scale.clamp_(0.0, self.logit_scale_max)

    # -- text --------------------------------------------------------------------------------------------------

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """``dict(input_ids, attention_mask)`` LongTensors (N, context_length) from the attached tokenizer."""
        if self.tokenizer is None:
            raise RuntimeError(
                "UniCLModel has no tokenizer attached: pass tokenizer= (a directory or a transformers tokenizer) to "
                "create_model/build_unicl, or set model.tokenizer = florence.tokenizer.load_tokenizer(dir)")
        return tokenize(self.tokenizer, texts, self.context_length)

    # -- training helpers --------------------------------------------------------------------------------------

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.image_encoder.set_grad_checkpointing(enable)
        self.text_encoder.set_grad_checkpointing(enable)

    def fsdp_wrap_modules(self) -> list[nn.Module]:
        """FSDP2 units, innermost first: each tower's blocks, then the towers."""
        return [*self.image_encoder.fsdp_wrap_modules(), *self.text_encoder.fsdp_wrap_modules(),
                self.image_encoder, self.text_encoder]

    def no_weight_decay(self) -> set[str]:
        """Parameter names trained without weight decay: biases and norm weights (every ndim <= 1 parameter, which
        includes ``logit_scale``) and the towers' own lists (relative-position bias tables)."""
        names = {name for name, p in self.named_parameters() if p.ndim <= 1}
        names |= {f"image_encoder.{n}" for n in self.image_encoder.no_weight_decay()}
        names |= {f"text_encoder.{n}" for n in self.text_encoder.no_weight_decay()}
        params = dict(self.named_parameters())
        return {n for n in names if n in params}


def _check_config(config: dict[str, Any]) -> None:
    if not isinstance(config, dict):
        raise TypeError(f"UniCL config must be a dict, got {type(config).__name__}")
    unknown = [k for k in config if k not in _CONFIG_KEYS and not k.startswith("_")]
    if unknown:
        raise KeyError(f"UniCL config: unknown keys {unknown}; allowed: {list(_CONFIG_KEYS)} (and '_comment' keys)")
    for key in ("image", "text"):
        if not isinstance(config.get(key), dict):
            raise KeyError(f"UniCL config: {key!r} must be a dict, got {config.get(key)!r}")
    if not isinstance(config["image"].get("model"), str):
        raise KeyError("UniCL config: 'image' needs a 'model' name, e.g. {\"model\": \"coswin_tiny\"}")
    text = config["text"]
    if "pretrained" not in text and "model_type" not in text:
        raise KeyError("UniCL config: 'text' needs 'model_type' (HF config fields) or 'pretrained' (a local dir)")
    preprocess = config.get("preprocess")
    if preprocess is not None:
        missing = [k for k in PREPROCESS_KEYS if k not in preprocess]
        if missing:
            raise KeyError(f"UniCL config: 'preprocess' lacks {missing}")


def _resolve_tokenizer(tokenizer, text_config: dict[str, Any]):
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_tokenizer(tokenizer)
    if tokenizer is None and "pretrained" in text_config:
        path = text_config["pretrained"]
        if any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
            return load_tokenizer(path)
    return tokenizer


def check_tokenizer(tokenizer, tower: TextTower) -> None:
    """Raise ValueError if ``tokenizer`` has more tokens than the tower's vocabulary or a different pad id."""
    if len(tokenizer) > tower.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the text tower's vocab_size is "
                         f"{tower.vocab_size}")
    pad = getattr(tower.encoder.config, "pad_token_id", None)
    if pad is not None and tokenizer.pad_token_id is not None and tokenizer.pad_token_id != pad:
        raise ValueError(f"tokenizer pad id {tokenizer.pad_token_id} differs from the text tower's pad_token_id {pad}")


def build_unicl(config: dict[str, Any], tokenizer=None) -> UniCLModel:
    """Build a ``UniCLModel`` from a config dict (format in the module docstring).

    Args:
        config: the dual-encoder config.
        tokenizer: a transformers tokenizer, a local tokenizer directory, or None (then, for a pretrained text
            tower whose directory holds tokenizer files, that tokenizer is loaded).
    """
    if config.get("architecture", "unicl") != "unicl":
        raise KeyError(f"UniCL config: architecture {config['architecture']!r} is not 'unicl'")
    config = {k: v for k, v in config.items() if k != "architecture"}  # a named config file states it
    _check_config(config)
    embed_dim = int(config.get("embed_dim", 512))
    context_length = int(config.get("context_length", 77))

    image_cfg = {k: v for k, v in config["image"].items() if not k.startswith("_")}
    overrides = {k: v for k, v in image_cfg.items() if k != "model"}
    image_encoder = create_model(image_cfg["model"], **overrides)

    text_cfg = {k: v for k, v in config["text"].items() if not k.startswith("_")}
    if "pretrained" in text_cfg:
        text_encoder = TextTower.from_pretrained(text_cfg["pretrained"], embed_dim=embed_dim,
                                                 pooling=text_cfg.get("pooling"))
    else:
        text_encoder = TextTower.from_config(text_cfg, embed_dim=embed_dim)  # reads its "pooling" entry
    if context_length > text_encoder.max_length:
        raise ValueError(f"context_length {context_length} exceeds the text tower's {text_encoder.max_length} "
                         "positions")

    tokenizer = _resolve_tokenizer(tokenizer, text_cfg)
    if tokenizer is not None:
        check_tokenizer(tokenizer, text_encoder)

    preprocess = dict(config.get("preprocess") or image_encoder.default_preprocess)
    stored = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("text", "preprocess")}
    stored["image"] = {k: v for k, v in image_cfg.items() if k not in _IMAGE_LOAD_KEYS}
    return UniCLModel(
        image_encoder=image_encoder,
        text_encoder=text_encoder,
        embed_dim=embed_dim,
        config=stored,
        preprocess=preprocess,
        context_length=context_length,
        tokenizer=tokenizer,
    )
