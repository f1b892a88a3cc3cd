"""UniCL releases -> florence ``UniCLModel``: shapes inferred from the checkpoint, weights mapped, a ``LoadReport``.

Source layout (microsoft/UniCL ``model/model.py``; what its ``main.py --resume`` loads into ``UniCLModel``:
``{"model": state_dict, ...}``, unwrapped by ``florence.weights.read_state_dict``; a ``module.`` prefix on every key
is stripped). Files are read with ``torch.load(weights_only=True)``: a file that also pickles objects (a training
checkpoint's yacs ``config``) is refused, naming the file; extract its ``"model"`` entry once with a load you trust.
The older ``visual.`` / ``text.`` / ``vision_projection`` names (UniCL's ``_convert_old_weights``) are not read.

- ``image_encoder.*``: the official Swin layout (``model/image_encoder/swin_transformer.py``, built with
  ``num_classes=0``): ``patch_embed.proj`` (Conv 4x4 s4) + ``patch_embed.norm``, ``layers.N.blocks.M.{norm1,
  attn.qkv, attn.proj, attn.relative_position_bias_table, norm2, mlp.fc1, mlp.fc2}``, ``layers.N.downsample``
  (patch merging at the *end* of stage N), ``norm``; buffers ``relative_position_index`` / ``attn_mask``. Mapped by
  ``florence.backbone.convert`` (format "microsoft"). A ``head.*`` (absent in UniCL, whose ``encode_image`` never
  uses it) is skipped.
- ``text_encoder.*``: a CLIP-style text transformer (``model/text_encoder/transformer.py``):
  ``token_embedding.weight`` (V, W), ``positional_embedding`` (L, W), ``resblocks.N.{ln_1, attn.in_proj_weight
  (3W, W: q, k, v stacked), attn.in_proj_bias (3W), attn.out_proj, ln_2, mlp.c_fc (4W, W), mlp.c_proj}``,
  ``ln_final``. It is transformers' ``CLIPTextModel`` (``hidden_act="quick_gelu"``, ``layer_norm_eps=1e-12``, causal
  attention) with EOT pooling (``florence.backbone.text_tower``); ``in_proj`` is split into ``q_proj``,
  ``k_proj``, ``v_proj`` in that order, ``ln_1/ln_2/c_fc/c_proj/ln_final`` become ``layer_norm1/layer_norm2/fc1/
  fc2/final_layer_norm``.
- ``text_projection`` (W, D) and ``image_projection`` (8C, D), applied as ``x @ P`` -> our bias-free
  ``nn.Linear`` weights (their transposes).
- ``logit_scale`` (): the log multiplier. UniCL uses ``exp(logit_scale)`` unclamped; ``UniCLModel.scale`` clamps
  it at ln 100 (the released values are far below; the stored value is loaded as is).

What the shapes tell: Swin C (``patch_embed.proj``), depths (block indices), heads per stage (bias-table columns),
window (the largest bias table: ``(2w-1)^2`` rows), MLP ratio, qkv bias; text vocabulary V, context length L,
width W, layers, MLP width; the shared size D. What they cannot tell comes as arguments: the text heads (UniCL's
configs use W / 64: 512 -> 8; default), the image size and preprocessing (must be given, no guessing; the
``attn_mask`` buffers, when present, are checked against the given size). ``UNICL_EVAL_PREPROCESS`` is what
UniCL's own evaluation uses at 224 (``data/build.py``: resize 256/224, centre crop, bicubic, ImageNet mean/std),
for a caller that chooses it explicitly.

A stage whose feature map is no larger than the window (e.g. 7 x 7 with window 7 is not; 4 x 4 is) is built by the
official code with a smaller window and bias table; our tower keeps the configured table and reads its central
part there, so the smaller table is placed at the centre (``florence.backbone.convert``; exact at that input size;
listed in ``resized``).
"""
from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from typing import Any, Mapping

import torch

from florence.backbone.coswin import swin_name
from florence.backbone.unicl import UniCLModel, build_unicl
from florence.bundle import PREPROCESS_KEYS
from florence.errors import FlorenceError
from florence.tokenizer import CLIP_CONTEXT_LENGTH, clip_tokenizer, load_tokenizer
from florence.weights import LoadReport, WeightsError, read_state_dict

__all__ = ["UNICL_EVAL_PREPROCESS", "UniCLConvertError", "convert_unicl", "unicl_config"]

UNICL_EVAL_PREPROCESS = dict(input_size=[3, 224, 224], mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
                             interpolation="bicubic", crop_pct=0.875)
_TOP_KEYS = ("text_projection", "image_projection", "logit_scale")
# UniCL text-encoder names -> CLIPTextModel names (the in_proj split is separate)
_TEXT_RULES = [
    (re.compile(r"^token_embedding\.weight$"), "embeddings.token_embedding.weight"),
    (re.compile(r"^positional_embedding$"), "embeddings.position_embedding.weight"),
    (re.compile(r"^ln_final\.(weight|bias)$"), r"final_layer_norm.\1"),
    (re.compile(r"^resblocks\.(\d+)\.ln_1\.(weight|bias)$"), r"encoder.layers.\1.layer_norm1.\2"),
    (re.compile(r"^resblocks\.(\d+)\.ln_2\.(weight|bias)$"), r"encoder.layers.\1.layer_norm2.\2"),
    (re.compile(r"^resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)$"), r"encoder.layers.\1.mlp.fc1.\2"),
    (re.compile(r"^resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)$"), r"encoder.layers.\1.mlp.fc2.\2"),
    (re.compile(r"^resblocks\.(\d+)\.attn\.out_proj\.(weight|bias)$"), r"encoder.layers.\1.self_attn.out_proj.\2"),
]
_IN_PROJ = re.compile(r"^resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")
_RESBLOCK = re.compile(r"^resblocks\.(\d+)\.")
_ATTN_MASK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.attn_mask$")


class UniCLConvertError(FlorenceError, ValueError):
    """An argument of the UniCL conversion that cannot work (preprocessing, text heads, tokenizer)."""


def _split(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict, list[str]]:
    """(image subtree, text subtree, top-level tensors, other keys), prefixes removed."""
    image, text, top, other = {}, {}, {}, []
    for k, v in state.items():
        if k.startswith("image_encoder."):
            image[k[len("image_encoder."):]] = v
        elif k.startswith("text_encoder."):
            text[k[len("text_encoder."):]] = v
        elif k in _TOP_KEYS:
            top[k] = v
        else:
            other.append(k)
    return image, text, top, other


def _need(state: Mapping[str, torch.Tensor], key: str, where: str, origin: str) -> torch.Tensor:
    if key not in state:
        raise WeightsError(f"{origin}: no {where}{key}; not a UniCL checkpoint (see florence.backbone.unicl_convert)")
    return state[key]


def _swin_shape(image: dict[str, torch.Tensor], origin: str) -> dict[str, Any]:
    """CoSwin(embed="patch") arguments read off an official-layout Swin state dict."""
    proj = _need(image, "patch_embed.proj.weight", "image_encoder.", origin)  # C, 3, 4, 4
    if tuple(proj.shape[-2:]) != (4, 4):
        raise WeightsError(f"{origin}: image_encoder.patch_embed.proj has patch {tuple(proj.shape[-2:])}; "
                           "florence's Swin uses 4 x 4")
    depth: dict[int, int] = defaultdict(int)
    for k in image:
        m = _BLOCK.match(k)
        if m:
            depth[int(m[1])] = max(depth[int(m[1])], int(m[2]) + 1)
    stages = sorted(depth)
    if not stages or stages != list(range(len(stages))):
        raise WeightsError(f"{origin}: image_encoder.layers.N.blocks stages {stages} are not 0..S-1")
    tables = [_need(image, f"layers.{i}.blocks.0.attn.relative_position_bias_table", "image_encoder.", origin)
              for i in stages]
    side = math.isqrt(max(t.shape[0] for t in tables))
    if side * side != max(t.shape[0] for t in tables) or side % 2 == 0:
        raise WeightsError(f"{origin}: relative-position tables of {[t.shape[0] for t in tables]} rows are not "
                           "(2w-1)^2 for a window w")
    dim = proj.shape[0]
    fc1 = _need(image, "layers.0.blocks.0.mlp.fc1.weight", "image_encoder.", origin)
    return dict(embed="patch", in_chans=int(proj.shape[1]), embed_dim=int(dim),
                depths=[depth[i] for i in stages], num_heads=[int(t.shape[1]) for t in tables],
                window_size=(side + 1) // 2, mlp_ratio=fc1.shape[0] / dim,
                qkv_bias="layers.0.blocks.0.attn.qkv.bias" in image)


def _check_image_size(image: dict[str, torch.Tensor], shape: dict[str, Any], size: tuple[int, int], origin: str):
    """The official Swin stores a shift mask (nW, N, N) per shifted block, built for one input size: refuse a given
    preprocessing size that gives another window count."""
    w = shape["window_size"]
    for k, mask in image.items():
        m = _ATTN_MASK.match(k)
        if m:
            stride = 4 * 2 ** int(m[1])
            expected = math.ceil(size[0] / stride / w) * math.ceil(size[1] / stride / w)
            if mask.ndim != 3 or mask.shape[0] != expected:
                raise UniCLConvertError(
                    f"{origin}: image_encoder.{k} has {mask.shape[0]} windows, but input size {list(size)} gives "
                    f"{expected}; the checkpoint was built for another image size (check preprocess input_size)")
            return


def _text_shape(text: dict[str, torch.Tensor], origin: str) -> dict[str, int]:
    tok = _need(text, "token_embedding.weight", "text_encoder.", origin)  # V, W
    pos = _need(text, "positional_embedding", "text_encoder.", origin)  # L, W
    layers = {int(m[1]) for m in map(_RESBLOCK.match, text) if m}
    if not layers or sorted(layers) != list(range(len(layers))):
        raise WeightsError(f"{origin}: text_encoder.resblocks indices {sorted(layers)} are not 0..N-1")
    fc = _need(text, "resblocks.0.mlp.c_fc.weight", "text_encoder.", origin)  # 4W, W
    return dict(vocab_size=int(tok.shape[0]), width=int(tok.shape[1]), context_length=int(pos.shape[0]),
                layers=len(layers), intermediate_size=int(fc.shape[0]))


def _image_model_name(shape: dict[str, Any]) -> str:
    """The named Swin of this shape; another shape builds on ``swin_tiny`` with every shape key as an override."""
    return swin_name(shape["embed_dim"], shape["depths"], shape["num_heads"]) or "swin_tiny"


def unicl_config(state: Mapping[str, torch.Tensor], *, preprocess: dict[str, Any], text_heads: int | None = None,
                 tokenizer=None, origin: str = "state dict") -> dict[str, Any]:
    """The florence UniCL config (``build_unicl`` format) of a UniCL state dict (module docstring for what is
    inferred). ``tokenizer`` (a transformers tokenizer) gives the text config's pad / bos / eos ids."""
    image, text, top, _ = _split(dict(state))
    if not isinstance(preprocess, dict) or any(k not in preprocess for k in PREPROCESS_KEYS):
        raise UniCLConvertError(f"{origin}: preprocess must give {list(PREPROCESS_KEYS)} (the checkpoint does not "
                                "record its image size and normalisation; florence refuses to guess them), got "
                                f"{preprocess!r}")
    shape = _swin_shape(image, origin)
    size = tuple(int(s) for s in preprocess["input_size"][1:])
    if len(size) != 2 or int(preprocess["input_size"][0]) != shape["in_chans"]:
        raise UniCLConvertError(f"{origin}: preprocess input_size {preprocess['input_size']} is not "
                                f"[{shape['in_chans']}, H, W]")
    _check_image_size(image, shape, size, origin)
    txt = _text_shape(text, origin)
    heads = txt["width"] // 64 if text_heads is None else int(text_heads)
    if heads < 1 or txt["width"] % heads:
        raise UniCLConvertError(f"{origin}: text width {txt['width']} is not divisible into {heads} heads "
                                "(pass text_heads=)")
    dim = int(_need(top, "text_projection", "", origin).shape[1])
    image_dim = tuple(_need(top, "image_projection", "", origin).shape)
    if image_dim != (shape["embed_dim"] * 2 ** (len(shape["depths"]) - 1), dim):
        raise WeightsError(f"{origin}: image_projection has shape {image_dim}, expected "
                           f"({shape['embed_dim'] * 2 ** (len(shape['depths']) - 1)}, {dim})")
    ids = {}
    if tokenizer is not None:
        ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    return {
        "image": {"model": _image_model_name(shape), **shape, "img_size": list(size)},
        "text": {"model_type": "clip_text_model", "vocab_size": txt["vocab_size"], "hidden_size": txt["width"],
                 "intermediate_size": txt["intermediate_size"], "num_hidden_layers": txt["layers"],
                 "num_attention_heads": heads, "max_position_embeddings": txt["context_length"],
                 "hidden_act": "quick_gelu", "layer_norm_eps": 1e-12, "attention_dropout": 0.0,
                 "projection_dim": dim, **ids, "pooling": "eot"},
        "embed_dim": dim,
        "context_length": txt["context_length"],
        "preprocess": dict(preprocess),
    }


def _map_text(text: dict[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """UniCL text-encoder tensors -> our names (``prefix`` + CLIPTextModel names); unmapped source keys."""
    out, unknown = {}, []
    for k, v in text.items():
        m = _IN_PROJ.match(k)
        if m:  # nn.MultiheadAttention packs q, k, v along dim 0
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                out[f"{prefix}encoder.layers.{m[1]}.self_attn.{name}.{m[2]}"] = part
            continue
        for pattern, target in _TEXT_RULES:
            if pattern.match(k):
                out[prefix + pattern.sub(target, k)] = v
                break
        else:
            unknown.append(f"text_encoder.{k}")
    return out, unknown


def convert_unicl(
    src: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    preprocess: dict[str, Any],
    text_heads: int | None = None,
    tokenizer=None,
    strict: bool = True,
) -> tuple[UniCLModel, LoadReport]:
    """A florence ``UniCLModel`` with the weights of a UniCL release, and the ``LoadReport`` of the load.

    Args:
        src: a UniCL checkpoint file (``.pth`` read with ``weights_only=True``, or ``.safetensors``) or a state dict.
        preprocess: image preprocessing ``dict(input_size=[3, H, W], mean, std, interpolation[, crop_pct])``; the
            image size sets the Swin's nominal size (``UNICL_EVAL_PREPROCESS`` is UniCL's own at 224).
        text_heads: attention heads of the text transformer (not in the weights); None: width // 64 (UniCL).
        tokenizer: a transformers tokenizer or a local tokenizer directory; None: the CLIP BPE tokenizer
            (``florence.tokenizer.clip_tokenizer``, as UniCL). Its end-of-text id must be its largest id (EOT
            pooling is ``argmax(input_ids)``, as in UniCL).
        strict: raise ``WeightsError`` naming the keys when any model key is not filled or any checkpoint key has no
            place (buffers and an image ``head`` are skipped, not unexpected); False: load what fits.

    Returns:
        ``(model, report)``: the model in eval mode with the tokenizer attached (``save_pretrained`` writes a bundle
        that needs nothing else); report names in our layout (``image_encoder.*``, ``text_encoder.*``, ...).
    """
    origin = "state dict" if isinstance(src, Mapping) else str(src)
    state = read_state_dict(src)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    elif tokenizer is None:
        ctx = state.get("text_encoder.positional_embedding")
        tokenizer = clip_tokenizer(context_length=ctx.shape[0] if ctx is not None else CLIP_CONTEXT_LENGTH)
    config = unicl_config(state, preprocess=preprocess, text_heads=text_heads, tokenizer=tokenizer, origin=origin)
    vocab = config["text"]["vocab_size"]
    if len(tokenizer) > vocab or tokenizer.eos_token_id != len(tokenizer) - 1:
        raise UniCLConvertError(
            f"{origin}: tokenizer {type(tokenizer).__name__} ({len(tokenizer)} tokens, end-of-text id "
            f"{tokenizer.eos_token_id}) does not fit the text encoder (vocabulary {vocab}, EOT pooling = "
            "argmax(input_ids) needs the end-of-text id to be the largest)")
    model = build_unicl(config, tokenizer=tokenizer)

    image, text, top, other = _split(state)
    image_report = model.image_encoder.load_foreign_weights(image, format="microsoft", strict=False)

    own = model.state_dict()
    prefix = next(k for k in own if k.endswith("embeddings.token_embedding.weight"))
    prefix = prefix[: -len("embeddings.token_embedding.weight")]  # "text_encoder.encoder." (transformers 5)
    mapped, unknown = _map_text(text, prefix)
    if "text_projection" in top:
        mapped["text_encoder.projection.weight"] = top["text_projection"].t()  # D, W
    if "image_projection" in top:
        mapped["image_projection.weight"] = top["image_projection"].t()  # D, 8C
    if "logit_scale" in top:
        mapped["logit_scale"] = top["logit_scale"].reshape(())
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in mapped.items()
                  if k in own and v.shape != own[k].shape]
    unexpected = [k for k in mapped if k not in own] + unknown + other + [m.split(" ")[0] for m in mismatched]
    loadable = {k: v for k, v in mapped.items() if k in own and v.shape == own[k].shape}

    def tower(names):
        return [f"image_encoder.{k}" for k in names]

    loaded = tower(image_report.loaded) + sorted(loadable)
    missing = tower(image_report.missing) + sorted(k for k in own if not k.startswith("image_encoder.")
                                                    and k not in loadable)
    unexpected = tower(image_report.unexpected) + sorted(unexpected)
    if strict and (missing or unexpected):
        raise WeightsError(f"{origin}: UniCL checkpoint does not fit the model built from its shapes: "
                           f"missing {missing[:10]} ({len(missing)} in all), unexpected {unexpected[:10]} "
                           f"({len(unexpected)} in all)" + (f"; shape mismatch {mismatched[:5]}" if mismatched else ""))
    model.load_state_dict(loadable, strict=False)
    report = LoadReport(
        loaded=sorted(loaded), missing=sorted(missing), unexpected=sorted(unexpected),
        newly_initialized=tower(image_report.newly_initialized),
        resized=tower(image_report.resized),
        skipped=tower(image_report.skipped),
    )
    return model.eval(), report
