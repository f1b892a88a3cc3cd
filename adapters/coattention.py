"""METER's co-attention fusion (SPEC §6.2): two streams of BERT cross layers updated in parallel.

One layer (``CoAttentionLayer``, METER ``bert_model.BertCrossLayer``) is, with BERT's post-LN residual blocks::

    x -> self-attention(x)                  -> dropout -> + x -> LayerNorm    (queries, keys, values: own stream)
      -> cross-attention(x, context)        -> dropout -> + . -> LayerNorm    (queries: own; keys, values: context)
      -> Linear -> act -> Linear (FFN)      -> dropout -> + . -> LayerNorm

The fusion (``CoAttentionFusion``) wires two stacks of them as METER's ``meter_module.infer`` does: for k = 1..M,
``x_k = text_layers[k](x_{k-1}, y_{k-1})`` and ``y_k = image_layers[k](y_{k-1}, x_{k-1})`` -- both streams read the
*previous* layer's outputs of the other. Padded text tokens (``text_mask`` 0) are never attended: not as keys of the
text self-attention, not as keys of the image stream's cross-attention. Their own outputs are computed (and ignored
downstream: the pooler reads token 0, MLM reads chosen tokens), as in METER.

Attention runs through ``F.scaled_dot_product_attention`` (its fused kernels; a boolean key mask where text is padded,
none on image keys, so flash attention stays available there) with the self-attention's Q, K, V in one matmul and the
cross-attention's K, V in one. Dropout is BERT's: on the attention probabilities and on each block's output, active in
training only. ``bert_cross_layer_state_dict`` writes a layer in the key layout of METER's ``BertCrossLayer`` and
transformers' ``BertLayer`` (with ``crossattention``), which the parity test and the speed benchmark load.

Initialisation: METER ``objectives.init_weights`` -- Linear weights normal(0, 0.02) with zero bias, LayerNorm 1 / 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.activations import ACT2FN


def init_weights(module: nn.Module) -> None:
    """METER ``objectives.init_weights``: Linear / Embedding normal(0, 0.02), biases 0, LayerNorm weight 1, bias 0."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def key_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, L) 1 / 0 (or bool) key mask -> (B, 1, 1, L) bool for SDPA (True: attend); None stays None (attend all)."""
    return None if mask is None else mask.bool()[:, None, None, :]


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, h) -> (B, heads, L, h / heads)."""
    B, L, C = x.shape
    return x.view(B, L, num_heads, C // num_heads).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout: float,
            training: bool) -> torch.Tensor:
    """Scaled dot-product attention of (B, heads, Lq, d) queries over (B, heads, Lk, d) keys / values with a
    (B, 1, 1, Lk) boolean mask; dropout on the probabilities in training. Returns (B, Lq, heads * d)."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout if training else 0.0)
    B, H, L, D = out.shape
    return out.transpose(1, 2).reshape(B, L, H * D)  # B, Lq, h


class SelfAttentionBlock(nn.Module):
    """BERT self-attention + output block (``BertAttention``): fused ``qkv`` (h -> 3h), ``proj``, dropout, residual,
    ``norm``."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, layer_norm_eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = dropout  # BERT attention_probs_dropout_prob
        self.proj_drop = dropout  # BERT hidden_dropout_prob
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, L, h), mask (B, 1, 1, L) bool or None -> (B, L, h)."""
        B, L, C = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)  # 3, B, H, L, d
        q, k, v = qkv.unbind(0)
        out = _attend(q, k, v, mask, self.attn_drop, self.training)  # B, L, h
        return self.norm(F.dropout(self.proj(out), self.proj_drop, self.training) + x)


class CrossAttentionBlock(nn.Module):
    """BERT cross-attention + output block: queries ``q`` from the stream, fused ``kv`` (h -> 2h) from the context,
    ``proj``, dropout, residual, ``norm``."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, layer_norm_eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = dropout
        self.proj_drop = dropout
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, L, h), context (B, M, h), context_mask (B, 1, 1, M) bool or None -> (B, L, h)."""
        B, M, C = context.shape
        q = _heads(self.q(x), self.num_heads)  # B, H, L, d
        kv = self.kv(context).view(B, M, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)  # 2,B,H,M,d
        k, v = kv.unbind(0)
        out = _attend(q, k, v, context_mask, self.attn_drop, self.training)  # B, L, h
        return self.norm(F.dropout(self.proj(out), self.proj_drop, self.training) + x)


class FeedForwardBlock(nn.Module):
    """BERT ``BertIntermediate`` + ``BertOutput``: ``fc1`` (h -> I), activation, ``fc2`` (I -> h), dropout, residual,
    ``norm``."""

    def __init__(self, hidden_size: int, intermediate_size: int, dropout: float, layer_norm_eps: float,
                 hidden_act: str):
        super().__init__()
        self.proj_drop = dropout
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.act = ACT2FN[hidden_act]
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, h) -> (B, L, h)."""
        return self.norm(F.dropout(self.fc2(self.act(self.fc1(x))), self.proj_drop, self.training) + x)


class CoAttentionLayer(nn.Module):
    """One stream's layer of the fusion (METER ``BertCrossLayer``); the same class serves the text and image streams.

    Args:
        hidden_size: width h of both streams.
        num_heads: attention heads (h must divide by it).
        intermediate_size: FFN width.
        dropout: BERT's ``attention_probs_dropout_prob`` and ``hidden_dropout_prob`` (METER: one ``drop_rate``).
        layer_norm_eps: LayerNorm epsilon (BERT: 1e-12).
        hidden_act: FFN activation, a transformers ``ACT2FN`` name ("gelu": exact erf GELU, as BERT).
    """

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, dropout: float = 0.1,
                 layer_norm_eps: float = 1e-12, hidden_act: str = "gelu"):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        self.self_attn = SelfAttentionBlock(hidden_size, num_heads, dropout, layer_norm_eps)
        self.cross_attn = CrossAttentionBlock(hidden_size, num_heads, dropout, layer_norm_eps)
        self.ffn = FeedForwardBlock(hidden_size, intermediate_size, dropout, layer_norm_eps, hidden_act)

    def forward(self, x: torch.Tensor, context: torch.Tensor, x_mask: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, h) the stream, context (B, M, h) the other stream's previous states; masks (B, 1, 1, L) and
        (B, 1, 1, M) bool (``key_mask``; True: attend) or None. Returns (B, L, h)."""
        x = self.self_attn(x, x_mask)
        x = self.cross_attn(x, context, context_mask)
        return self.ffn(x)


class Pooler(nn.Module):
    """METER ``heads.Pooler``: ``dense`` (h -> h) then tanh, on an already pooled (B, h) vector."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x))


class CoAttentionFusion(nn.Module):
    """Input projections, the two co-attention stacks and the poolers (METER's cross-modal part).

    Args:
        text_dim: width of the text tower's token states.
        image_dim: width of the image tower's last-stage tokens.
        hidden_size, num_heads, intermediate_size, dropout, layer_norm_eps, hidden_act: as ``CoAttentionLayer``.
        num_layers: M_co, layers per stream (0: no co-attention, the projected tokens go straight to the poolers).
        image_pos_grid: 0 (METER with a Swin tower: the image tokens get no position embedding; the tower's relative
            position biases are all they know of where they are), or k > 0: a learned k x k table of image position
            embeddings (trunc-normal 0.02), resized bilinearly to the token grid, added to the projected image tokens
            (what a ViT tower's absolute position embeddings give METER).
    """

    def __init__(self, text_dim: int, image_dim: int, *, hidden_size: int = 768, num_layers: int = 6,
                 num_heads: int = 12, intermediate_size: int = 3072, dropout: float = 0.1,
                 layer_norm_eps: float = 1e-12, hidden_act: str = "gelu", image_pos_grid: int = 0):
        super().__init__()
        self.hidden_size = hidden_size
        self.grad_checkpointing = False
        self.text_proj = nn.Linear(text_dim, hidden_size)  # METER cross_modal_text_transform
        self.image_proj = nn.Linear(image_dim, hidden_size)  # METER cross_modal_image_transform

        def stack() -> nn.ModuleList:
            return nn.ModuleList(CoAttentionLayer(hidden_size, num_heads, intermediate_size, dropout, layer_norm_eps,
                                                  hidden_act) for _ in range(num_layers))

        self.text_layers = stack()
        self.image_layers = stack()
        self.text_pooler = Pooler(hidden_size)
        self.image_pooler = Pooler(hidden_size)
        self.apply(init_weights)
        self.image_pos = None
        if image_pos_grid > 0:
            self.image_pos = nn.Parameter(torch.zeros(1, hidden_size, image_pos_grid, image_pos_grid))
            nn.init.trunc_normal_(self.image_pos, std=0.02)

    def add_image_positions(self, y: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, N, h) image tokens of an (H', W') grid (row-major) + the position table resized to it (if any)."""
        if self.image_pos is None:
            return y
        table = self.image_pos
        if tuple(table.shape[-2:]) != tuple(grid):
            table = F.interpolate(table, size=tuple(grid), mode="bilinear", align_corners=False)
        return y + table.flatten(2).transpose(1, 2).to(y.dtype)  # 1, N, h

    def forward(self, x: torch.Tensor, y: torch.Tensor, text_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both stacks, in parallel per layer.

        Args:
            x: (B, L, h) projected text tokens (token-type embedding added).
            y: (B, N, h) projected image tokens (token-type embedding added).
            text_mask: (B, L) 1 for real tokens, 0 for padding; None: no padding.

        Returns:
            (B, L, h) text and (B, N, h) image states of the last layer.
        """
        t_mask = key_mask(text_mask)  # B, 1, 1, L; image tokens are never padded: no mask
        for text_layer, image_layer in zip(self.text_layers, self.image_layers):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x1 = checkpoint(text_layer, x, y, t_mask, None, use_reentrant=False)
                y1 = checkpoint(image_layer, y, x, None, t_mask, use_reentrant=False)
            else:
                x1 = text_layer(x, y, t_mask, None)
                y1 = image_layer(y, x, None, t_mask)
            x, y = x1, y1
        return x, y

    def pool(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """METER's cls_feats: text pooler on token 0, image pooler on the mean of the image tokens (its Swin path),
        concatenated: (B, L, h), (B, N, h) -> (B, 2h)."""
        return torch.cat([self.text_pooler(x[:, 0]), self.image_pooler(y.mean(dim=1))], dim=-1)


def bert_cross_layer_state_dict(layer: CoAttentionLayer) -> dict[str, torch.Tensor]:
    """``layer``'s weights under the keys of METER's ``BertCrossLayer`` / transformers' ``BertLayer`` with
    ``add_cross_attention`` (``attention.self.query.weight``, ``crossattention.output.LayerNorm.bias``, ...): the fused
    QKV / KV matrices split row-wise into query, key, value."""
    s, c, f = layer.self_attn, layer.cross_attn, layer.ffn
    out: dict[str, torch.Tensor] = {}
    for kind in ("weight", "bias"):
        for name, part in zip(("query", "key", "value"), getattr(s.qkv, kind).chunk(3)):
            out[f"attention.self.{name}.{kind}"] = part
        out[f"crossattention.self.query.{kind}"] = getattr(c.q, kind)
        for name, part in zip(("key", "value"), getattr(c.kv, kind).chunk(2)):
            out[f"crossattention.self.{name}.{kind}"] = part
        for prefix, block in (("attention", s), ("crossattention", c)):
            out[f"{prefix}.output.dense.{kind}"] = getattr(block.proj, kind)
            out[f"{prefix}.output.LayerNorm.{kind}"] = getattr(block.norm, kind)
        out[f"intermediate.dense.{kind}"] = getattr(f.fc1, kind)
        out[f"output.dense.{kind}"] = getattr(f.fc2, kind)
        out[f"output.LayerNorm.{kind}"] = getattr(f.norm, kind)
    return {k: v.detach().clone() for k, v in out.items()}
