"""Text tower: a transformers encoder (RoBERTa by default, any ``AutoModel`` encoder accepted), a pooling rule and a
bias-free projection to the shared embedding size (SPEC §2.2: ``text_projection`` without bias, trunc-normal 0.02).

Pooling (SPEC §2.2, UniCL ``model/model.py`` ``encode_text``):

- ``"first"``: the hidden state at position 0 (``<s>`` / ``[CLS]``), for RoBERTa / BERT tokenizers (the default for
  every encoder but CLIP's).
- ``"eot"``: the hidden state at ``argmax(input_ids)`` per row, i.e. the first end-of-text token of the CLIP BPE
  tokenizer (its id, 49407, is the largest in the vocabulary; padding repeats it, and argmax returns the first).
  The default for ``model_type == "clip_text_model"``.

UniCL's own text encoder (CLIP-style pre-LN blocks, QuickGELU, LayerNorm eps 1e-12, causal mask, token + learned
positional embedding, final LayerNorm) is transformers' ``CLIPTextModel`` with ``hidden_act="quick_gelu"`` and
``layer_norm_eps=1e-12`` (``florence.backbone.unicl_convert`` maps its weights). UniCL applies the causal mask
only; ``CLIPTextModel`` adds the padding mask from ``attention_mask``. At the EOT position both attend to the same
keys (every earlier token is real text), so the pooled state is the same; only the states at padding positions,
which nothing reads, differ.

The tower never re-implements the encoder. It keeps the encoder's Hugging Face config as a plain dict
(``hf_config``; with the pooling rule: ``tower_config``), which rebuilds the same architecture without the
directory it was first loaded from; weights then come from a checkpoint bundle.
"""
from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from torch import nn
from transformers import CONFIG_MAPPING, MODEL_MAPPING, AutoConfig, AutoModel

# Config entries that describe where/when a config was produced, not the architecture.
_PROVENANCE_KEYS = ("_name_or_path", "transformers_version")
POOLINGS = ("first", "eot")


def default_pooling(model_type: str) -> str:
    """"eot" for CLIP's text model (CLIP BPE tokenizer), "first" for every other encoder (SPEC §2.2)."""
    return "eot" if model_type == "clip_text_model" else "first"


def pool_tokens(states: torch.Tensor, input_ids: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, L, H) token states -> (B, H): position 0 ("first") or the row's ``argmax(input_ids)`` ("eot")."""
    if pooling == "first":
        return states[:, 0]
    rows = torch.arange(states.shape[0], device=states.device)
    return states[rows, input_ids.argmax(dim=-1).to(states.device)]  # B, H


def pooling_kwargs(model_class: type) -> dict[str, Any]:
    """``add_pooling_layer=False`` where the class supports it: an unused pooler leaves parameters without
    gradients, which DDP rejects."""
    params = inspect.signature(model_class.__init__).parameters
    return {"add_pooling_layer": False} if "add_pooling_layer" in params else {}


def text_positions(config) -> int:
    """Longest input a transformers encoder's position table admits (RoBERTa reserves ``pad_token_id + 1``)."""
    n = int(config.max_position_embeddings)
    if config.model_type in ("roberta", "xlm-roberta", "camembert"):
        n -= int(config.pad_token_id) + 1
    return n


def hf_config_from_dict(config: dict[str, Any]):
    """A transformers ``PretrainedConfig`` from a plain dict with a ``model_type`` key (e.g. "roberta", "bert")."""
    if "model_type" not in config:
        raise KeyError(f"text config needs a 'model_type' key (e.g. 'roberta'); got keys {sorted(config)}")
    model_type = config["model_type"]
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"text config: unknown transformers model_type {model_type!r}")
    return CONFIG_MAPPING[model_type].from_dict({k: v for k, v in config.items() if k not in _PROVENANCE_KEYS})


def encoder_from_config(hf_config: dict[str, Any]) -> nn.Module:
    """A randomly initialised transformers encoder (no pooler) from a config dict with ``model_type``."""
    config = hf_config_from_dict(hf_config)
    return AutoModel.from_config(config, **pooling_kwargs(MODEL_MAPPING[type(config)]))


def encoder_from_pretrained(path: str | os.PathLike) -> nn.Module:
    """A transformers encoder (no pooler) from a local directory (``config.json`` + weights); never downloads."""
    path = str(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"text tower: {path!r} has no config.json (expected a local transformers model "
                                "directory)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    return AutoModel.from_pretrained(path, local_files_only=True, **pooling_kwargs(MODEL_MAPPING[type(config)]))


def set_encoder_checkpointing(encoder: nn.Module, enable: bool = True) -> None:
    """Recompute each layer of a transformers encoder in the backward pass (transformers' activation checkpointing;
    the method is ``activation_checkpointing_*`` from transformers 5.2x, ``gradient_checkpointing_*`` before)."""
    if hasattr(encoder, "activation_checkpointing_enable"):
        if enable:
            encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            encoder.activation_checkpointing_disable()
    elif enable:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        encoder.gradient_checkpointing_disable()


class TextTower(nn.Module):
    """Transformers encoder -> pooled token state ("first" or "eot", module docstring) -> ``projection`` (no bias).

    Args:
        encoder: a transformers encoder model whose output has ``last_hidden_state`` (B, L, H).
        embed_dim: output embedding size D.
        pooling: "first", "eot", or None for the encoder's default (``default_pooling``).
    """

    def __init__(self, encoder: nn.Module, embed_dim: int, pooling: str | None = None):
        super().__init__()
        pooling = pooling or default_pooling(encoder.config.model_type)
        if pooling not in POOLINGS:
            raise ValueError(f"text tower pooling must be one of {POOLINGS}, got {pooling!r}")
        self.encoder = encoder
        self.embed_dim = embed_dim
        self.pooling = pooling
        self.width = encoder.config.hidden_size
        self.projection = nn.Linear(self.width, embed_dim, bias=False)
        nn.init.trunc_normal_(self.projection.weight, std=0.02)

    @classmethod
    def from_config(cls, hf_config: dict[str, Any], embed_dim: int, pooling: str | None = None) -> "TextTower":
        """Randomly initialised encoder from a Hugging Face config dict (``model_type`` + config fields). A
        ``"pooling"`` entry (as ``tower_config`` writes it) is the pooling rule unless ``pooling`` is given."""
        hf_config = dict(hf_config)
        stored = hf_config.pop("pooling", None)
        return cls(encoder_from_config(hf_config), embed_dim, pooling or stored)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, embed_dim: int, pooling: str | None = None) -> "TextTower":
        """Encoder weights from a local transformers directory (``config.json`` + weights); never downloads.
        The projection is newly initialised."""
        return cls(encoder_from_pretrained(path), embed_dim, pooling)

    @property
    def hf_config(self) -> dict[str, Any]:
        """JSON-able encoder config (with ``model_type``) that rebuilds the architecture via ``from_config``."""
        config = self.encoder.config.to_dict()
        for key in _PROVENANCE_KEYS:
            config.pop(key, None)
        return config

    @property
    def tower_config(self) -> dict[str, Any]:
        """``hf_config`` plus ``"pooling"``: what ``from_config`` needs to rebuild this tower."""
        return {**self.hf_config, "pooling": self.pooling}

    @property
    def vocab_size(self) -> int:
        return int(self.encoder.config.vocab_size)

    @property
    def max_length(self) -> int:
        """Longest input the position table admits (RoBERTa reserves ``pad_token_id + 1`` positions)."""
        return text_positions(self.encoder.config)

    def forward_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token states of the last layer.

        Args:
            input_ids: (B, L) token ids.
            attention_mask: (B, L), 1 for real tokens, 0 for padding.

        Returns:
            (B, L, H) ``last_hidden_state``.
        """
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids and mask -> (B, D) projected pooled features (not normalised)."""
        pooled = pool_tokens(self.forward_features(input_ids, attention_mask), input_ids, self.pooling)  # B, H
        return self.projection(pooled)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        set_encoder_checkpointing(self.encoder, enable)

    @property
    def grad_checkpointing(self) -> bool:
        encoder = self.encoder
        if hasattr(type(encoder), "is_activation_checkpointing"):
            return bool(encoder.is_activation_checkpointing)
        return bool(encoder.is_gradient_checkpointing)

    def fsdp_wrap_modules(self) -> list[nn.Module]:
        """FSDP2 units: the encoder's transformer layers, as transformers declares them (``_no_split_modules``)."""
        names = set(getattr(self.encoder, "_no_split_modules", None) or ())
        return [m for m in self.encoder.modules() if type(m).__name__ in names and any(True for _ in m.parameters())]

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this tower) of biases and normalisation weights: every parameter with ndim <= 1."""
        return {name for name, p in self.named_parameters() if p.ndim <= 1}
