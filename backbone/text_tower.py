"""Text tower: a transformers encoder (RoBERTa by default, any ``AutoModel`` encoder accepted), first-token
pooling and a bias-free projection to the shared embedding size (SPEC §2.2: pooling at position 0 for
RoBERTa/BERT tokenizers, ``text_projection`` without bias, trunc-normal 0.02).

The tower never re-implements the encoder. It keeps the encoder's Hugging Face config as a plain dict
(``hf_config``), which rebuilds the same architecture without the directory it was first loaded from; weights
then come from a checkpoint bundle.
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
    """Transformers encoder -> hidden state of the first token -> ``projection`` (no bias).

    Args:
        encoder: a transformers encoder model whose output has ``last_hidden_state`` (B, L, H).
        embed_dim: output embedding size D.
    """

    def __init__(self, encoder: nn.Module, embed_dim: int):
        super().__init__()
        self.encoder = encoder
        self.embed_dim = embed_dim
        self.width = encoder.config.hidden_size
        self.projection = nn.Linear(self.width, embed_dim, bias=False)
        nn.init.trunc_normal_(self.projection.weight, std=0.02)

    @classmethod
    def from_config(cls, hf_config: dict[str, Any], embed_dim: int) -> "TextTower":
        """Randomly initialised encoder from a Hugging Face config dict (``model_type`` + config fields)."""
        return cls(encoder_from_config(hf_config), embed_dim)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, embed_dim: int) -> "TextTower":
        """Encoder weights from a local transformers directory (``config.json`` + weights); never downloads.
        The projection is newly initialised."""
        return cls(encoder_from_pretrained(path), embed_dim)

    @property
    def hf_config(self) -> dict[str, Any]:
        """JSON-able encoder config (with ``model_type``) that rebuilds the architecture via ``from_config``."""
        config = self.encoder.config.to_dict()
        for key in _PROVENANCE_KEYS:
            config.pop(key, None)
        return config

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
        """(B, L) ids and mask -> (B, D) projected first-token features (not normalised)."""
        pooled = self.forward_features(input_ids, attention_mask)[:, 0]  # B, H
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
