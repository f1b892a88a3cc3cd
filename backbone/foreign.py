"""Foreign dual encoders: open_clip models and transformers ``CLIPModel`` / ``VisionTextDualEncoderModel`` wrapped with
the ``UniCLModel`` interface, so every ``florence eval`` protocol, ``florence predict`` and ``florence index`` run on
them unchanged.

Spellings (model sources, ``florence.registry.register_source``; ``florence.from_pretrained`` and
``florence.bundle.bundle_sha256`` accept them wherever a bundle directory goes, e.g. ``--model``):

- ``open_clip:ARCH[@TAG][:WEIGHTS]`` -- ARCH is an open_clip model name (``open_clip.list_models()``, e.g.
  ``ViT-B-32``) or a local ``open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg": ...}``, as open_clip
  writes it next to released weights); TAG an open_clip pretrained tag of ARCH
  (``open_clip.list_pretrained_tags_by_model``, e.g. ``ViT-L-14@laion2b_s32b_b82k``) naming the release whose
  preprocessing the weights need; WEIGHTS is a local checkpoint file read by open_clip's own ``load_checkpoint``
  (strict; ``.safetensors`` or a ``torch.load(weights_only=True)`` state dict). ARCH may not contain ``:``.
  ``open_clip:ARCH`` alone is a random initialisation drawn with seed 0 (tests).
- ``hf:DIR`` -- a transformers directory (``config.json``, weights, tokenizer files, ``preprocessor_config.json``) of a
  ``CLIPModel`` or a ``VisionTextDualEncoderModel``, loaded with ``from_pretrained`` in float32, offline.

Nothing is downloaded: tokenizers, Hugging Face text-tower configs and models are read with ``local_files_only`` in
Hugging Face Hub offline mode (``hub_offline``), so a name that is not in the local cache stops with a one-line error.

Interface (as ``florence.backbone.unicl.UniCLModel``): ``encode_image(images (B, 3, H, W), normalize=True) -> (B, D)``,
``encode_text(input_ids, attention_mask, normalize=True) -> (B, D)``, ``tokenize(texts) -> dict(input_ids,
attention_mask)`` ``(N, L)`` int64 with the model's own tokenizer (open_clip's CLIP BPE, shipped in the package, pads to
the context length with 0; an HF tokenizer pads to the longest text, at most the context length), ``preprocess``,
``scale()`` (``exp(logit_scale)``, unclamped as in the source) and ``logit_scale``. For the protocols that reuse
pooled image features (linear probe, retrieval; ``florence.adapters.features``) ``image_encoder`` is a view whose
``forward_head(forward_features(x), pre_logits=True)`` gives the features before the image projection and
``image_projection`` a view mapping them to the (unnormalised) embedding; where a tower has no separable projection
(open_clip's ModifiedResNet attention pool) the features are the embedding and the projection is the identity.

Preprocessing is the source's own, never guessed: for ``ARCH@TAG`` open_clip's pretrained config of the tag (mean,
std, interpolation, resize_mode over open_clip's defaults, the size from the tower: what open_clip's
``create_model_and_transforms(ARCH, pretrained=TAG)`` uses, read without downloading); for a bare built-in ARCH the
same when all of ARCH's tags agree (else a one-line error listing them); for an ``open_clip_config.json`` its
``preprocess_cfg`` (``mean`` and ``std`` required; a bare open_clip model config records none and is refused); for an
HF directory its ``preprocessor_config.json`` read through the image-processor class it names (so absent keys take
that class's transformers defaults, e.g. CLIPImageProcessor's 224 x 224 centre crop). Both resize the short side and
centre-crop, which ``florence.data.transforms.build_transform`` reproduces with ``crop_pct = crop / resize``; sources
that squash or letterbox (open_clip ``resize_mode`` "squash" / "longest", HF without centre crop) are refused rather
than approximated. Measured on the eight scikit-image photos: identical to open_clip's eval
transform (RGB input; a bilevel mode-"1" image differs, as open_clip resizes before converting to RGB and we after);
identical to transformers' PIL ``CLIPImageProcessorPil`` except that transformers places the centre crop at
``floor((W - crop) / 2)`` and torchvision at round-half-even, one pixel apart for some sizes (2 of the 8 photos at 224);
its torchvision ``CLIPImageProcessor`` differs besides by at most two 8-bit levels (0.03 after normalisation).

Identity: the hash of a spelling is the SHA-256 of a JSON record of the source, the model configuration and the SHA-256
of every file that defines the model (the weights file; for ``hf:`` every top-level file of the directory except
other frameworks' weights and docs), not of the paths, so a copy elsewhere hashes alike.

Both wrappers are registered architectures ("open_clip", "hf_dual_encoder"): ``save_pretrained`` writes a verified
bundle (config: the open_clip model config / the HF config dict; the tokenizer: open_clip's tokenizer settings, or the
HF tokenizer saved under ``tokenizer/``) and ``from_pretrained(bundle)`` rebuilds it. The converters ``florence
convert`` calls are :func:`load_open_clip` and :func:`load_hf_dual_encoder`; each sets ``model.load_report``.

An open_clip model whose image tower is a timm Swin (``vision_cfg.timm_model_name``, e.g. open_clip's
``swin_base_patch4_window7_224`` config) gives our CoSwin from ``image_tower()`` (the trunk's weights loaded through the
"timm" format, the source's preprocessing kept), so ``florence.factory.image_tower("open_clip:...")`` and
``create_model("image_classifier", backbone="open_clip:...")`` build adapters on it.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
import pickle
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import huggingface_hub.constants as hf_constants
import open_clip
import torch
import torch.nn.functional as F
import transformers
from open_clip.timm_model import TimmModel
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
from open_clip.transform import PreprocessCfg, merge_preprocess_dict
from open_clip.transformer import VisionTransformer
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from florence.backbone.coswin import swin_name
from florence.backbone.unicl import UniCLOutput
from florence.bundle import BundleMixin, sha256_file
from florence.errors import FlorenceError, first_line
from florence.factory import create_model
from florence.registry import register_architecture, register_source
from florence.tokenizer import load_tokenizer
from florence.weights import LoadReport, WeightsError

__all__ = ["ForeignModelError", "OpenCLIPDualEncoder", "HFDualEncoder", "load_open_clip", "load_hf_dual_encoder",
           "open_clip_sha256", "hf_sha256", "hub_offline"]

_INTERPOLATIONS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}  # PIL codes
_HF_MODELS = {"clip": "CLIPModel", "vision-text-dual-encoder": "VisionTextDualEncoderModel"}  # transformers classes
_HF_SKIPPED_SUFFIXES = (".h5", ".msgpack", ".onnx", ".md", ".ot")  # not read by the torch model
RANDOM_INIT_SEED = 0


class ForeignModelError(FlorenceError, ValueError):
    """A foreign model spelling, config or directory that florence cannot load; the message names the file or key."""


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) for the process (weights files are large)."""
    st = path.stat()
    return _file_digest(str(path.resolve()), st.st_size, st.st_mtime_ns)


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face Hub offline mode for the block (``HF_HUB_OFFLINE=1``; huggingface_hub reads the setting once at
    import, so its module constant is set too): transformers and huggingface_hub read only local files and the local
    cache, and fail fast instead of downloading. Restored on exit."""
    saved_env, saved_flag = os.environ.get("HF_HUB_OFFLINE"), hf_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hf_constants.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = saved_flag
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


def _record_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def crop_preprocess(crop: tuple[int, int], resize: int, mean: Sequence[float], std: Sequence[float],
                    interpolation: str) -> dict[str, Any]:
    """Our ``preprocess`` dict for "resize the short side to ``resize``, centre-crop ``crop`` (H, W)".

    timm's eval transform resizes to ``floor(crop / crop_pct)``; ``crop_pct`` is chosen so that this is ``resize``.
    """
    crop_pct = min(crop) / resize
    if int(min(crop) / crop_pct) != resize:  # float rounding below the integer: aim at the middle of the step
        crop_pct = min(crop) / (resize + 0.5)
    return {"input_size": [3, int(crop[0]), int(crop[1])], "mean": [float(v) for v in mean],
            "std": [float(v) for v in std], "interpolation": interpolation, "crop_pct": crop_pct}


class _PooledTower:
    """``image_encoder`` view for ``florence.adapters.features``: pooled features before the projection."""

    def __init__(self, pooled: Callable[[torch.Tensor], torch.Tensor]):
        self._pooled = pooled

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, F) pooled features."""
        return self._pooled(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._pooled(x)


class _Projection:
    """``image_projection`` view: (B, F) pooled features -> (B, D) unnormalised embeddings; ``weight`` gives the
    dtype and device (``florence.adapters.features.project``)."""

    def __init__(self, project: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor):
        self._project, self.weight = project, weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._project(x)


class ForeignDualEncoder(BundleMixin, nn.Module):
    """What both wrappers share: the wrapped library model as ``self.model`` (so its state dict keys are
    ``model.<the source's keys>``), ``preprocess`` and the UniCL-style outputs. Subclasses give ``encode_image``,
    ``encode_text``, ``tokenize``, ``_pooled`` / ``_project`` and ``logit_scale``."""

    source_spec: str = ""  # the spelling it was loaded from (``open_clip:...``, ``hf:...``); "" for a bundle
    load_report: LoadReport | None = None

    def __init__(self, model: nn.Module, preprocess: dict[str, Any]):
        super().__init__()
        self.model = model
        self.preprocess = dict(preprocess)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def scale(self) -> torch.Tensor:
        """() the multiplier ``exp(logit_scale)``."""
        return self.logit_scale.exp().reshape(())

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> UniCLOutput:
        return UniCLOutput(image_embeds=self.encode_image(images),
                           text_embeds=self.encode_text(input_ids, attention_mask), logit_scale=self.scale())

    @property
    def image_encoder(self) -> _PooledTower:
        return _PooledTower(self._pooled)

    @property
    def image_projection(self) -> _Projection:
        return _Projection(self._project, self._projection_weight())

    def image_tower(self) -> nn.Module:
        raise ForeignModelError(f"{type(self).__name__} ({self.source_spec or 'bundle'}): its image tower is not a "
                                "Swin florence can rebuild; only open_clip timm-Swin towers serve as adapter backbones")

    @staticmethod
    def _check_texts(texts: Sequence[str]) -> list[str]:
        if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("tokenize: texts must be a non-empty list of strings")
        return list(texts)


# -- open_clip --------------------------------------------------------------------------------------------------------


def _open_clip_class(cfg: dict[str, Any]) -> type:
    """open_clip's model class for a model config (its factory's rule): CoCa with a ``multimodal_cfg``, CustomTextCLIP
    for a custom or Hugging Face text tower, else CLIP."""
    custom = cfg.get("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    if custom:
        return open_clip.CoCa if "multimodal_cfg" in cfg else open_clip.CustomTextCLIP
    return open_clip.CLIP


def build_open_clip(cfg: dict[str, Any], preprocess_cfg: dict[str, Any]) -> nn.Module:
    """An open_clip model from its model config, freshly initialised (no tower weights downloaded; a Hugging Face text
    tower's config read offline), with ``visual.preprocess_cfg`` = ``preprocess_cfg`` merged over open_clip's defaults
    and the tower's image size, as open_clip's own loader merges a recorded ``preprocess_cfg`` (the source's record:
    ``_parse_open_clip``, a bundle's config)."""
    cfg = copy.deepcopy(cfg)
    cls = _open_clip_class(cfg)
    cfg.pop("custom_text", None)
    if "timm_model_name" in cfg["vision_cfg"]:
        cfg["vision_cfg"]["timm_model_pretrained"] = False
    if "hf_model_name" in cfg["text_cfg"]:
        cfg["text_cfg"]["hf_model_pretrained"] = False
    try:
        with hub_offline():
            model = cls(**cfg)
    except (OSError, RuntimeError) as err:  # a Hugging Face text tower's config not cached, an unknown timm model
        raise ForeignModelError(f"open_clip model config: cannot build its towers offline "
                                f"({first_line(err)})") from None
    pp = merge_preprocess_dict({**asdict(PreprocessCfg()), "size": getattr(model.visual, "image_size", 224)},
                               preprocess_cfg)
    open_clip.set_model_preprocess_cfg(model, pp)
    return model


def open_clip_preprocess(preprocess_cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """Our ``preprocess`` dict from open_clip's ``preprocess_cfg`` (size, mode, mean, std, interpolation,
    resize_mode); ``ForeignModelError`` naming ``where`` for what our eval transform cannot reproduce."""
    if preprocess_cfg.get("resize_mode", "shortest") != "shortest":
        raise ForeignModelError(f"{where}: preprocess_cfg resize_mode {preprocess_cfg['resize_mode']!r} is not "
                                "supported (florence's eval transform resizes the short side and centre-crops)")
    if preprocess_cfg.get("mode", "RGB") != "RGB":
        raise ForeignModelError(f"{where}: preprocess_cfg mode {preprocess_cfg['mode']!r} is not supported (RGB)")
    size = preprocess_cfg["size"]
    crop = (size, size) if isinstance(size, int) else tuple(size)
    return crop_preprocess(crop, min(crop), preprocess_cfg["mean"], preprocess_cfg["std"],
                           preprocess_cfg.get("interpolation", "bicubic"))


def open_clip_tokenizer(cfg: dict[str, Any], name: str | None = None, directory: Path | None = None):
    """The tokenizer open_clip pairs with a model config: an ``HFTokenizer`` when ``text_cfg`` names
    ``hf_tokenizer_name`` (read from ``directory`` when given: a bundle's ``tokenizer/``; else from the local Hugging
    Face cache, offline: never downloaded), else the CLIP BPE ``SimpleTokenizer`` (its vocabulary ships in the
    package). (open_clip's SigLIP-name fallback is not needed: every built-in SigLIP config names its tokenizer.)"""
    text = cfg.get("text_cfg", {})
    context_length = text.get("context_length", 77)
    kwargs = dict(text.get("tokenizer_kwargs", {}))
    if "hf_tokenizer_name" not in text:
        return SimpleTokenizer(context_length=context_length, **kwargs)
    source = str(directory) if directory is not None else text["hf_tokenizer_name"]
    try:
        with hub_offline():
            tokenizer = HFTokenizer(source, context_length=context_length, tokenizer_mode=text.get("tokenizer_mode"),
                                    local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        raise ForeignModelError(f"open_clip {name or 'model'}: its tokenizer {source!r} cannot be loaded offline "
                                f"({first_line(err)})") from None
    if tokenizer.tokenizer.pad_token_id is None:
        raise ForeignModelError(f"open_clip {name or 'model'}: its tokenizer {source!r} has no pad token")
    return tokenizer


class OpenCLIPSource(NamedTuple):
    """A parsed ``open_clip:ARCH[@TAG][:WEIGHTS]`` spelling."""

    arch: str  # as spelled; a config file's path absolute
    tag: str | None  # the open_clip pretrained tag, or None
    weights: str | None  # the weights file, or None (seeded random initialisation)
    name: str  # the open_clip model name, or the config file's stem (a label)
    model_config: dict[str, Any]  # open_clip's model config
    preprocess_cfg: dict[str, Any]  # the recorded preprocessing (open_clip keys, without the size: the tower's)

    @property
    def spec(self) -> str:
        """The spelling with absolute paths."""
        weights = [str(Path(self.weights).absolute())] if self.weights else []
        return "open_clip:" + ":".join([self.arch + (f"@{self.tag}" if self.tag else ""), *weights])


def _tag_preprocess(arch: str, tag: str) -> dict[str, Any]:
    """The preprocessing open_clip gives ``create_model_and_transforms(arch, pretrained=tag)``: its defaults with the
    tag's pretrained config over them (no size: open_clip takes the tower's); read from open_clip's table, no
    download."""
    merged = merge_preprocess_dict(PreprocessCfg(), open_clip.get_pretrained_cfg(arch, tag))
    return {k: list(v) if isinstance(v, tuple) else v for k, v in merged.items() if k != "size"}


def _builtin_preprocess(arch: str, tag: str | None, cfg: dict[str, Any], spec: str) -> dict[str, Any]:
    """The preprocessing of a built-in ARCH: its tag's, or, without a tag, the one all of its tags agree on."""
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag is not None:
        if not open_clip.get_pretrained_cfg(arch, tag):
            raise ForeignModelError(f"{spec!r}: {tag!r} is not an open_clip pretrained tag of {arch} (its tags: "
                                    f"{', '.join(tags) or 'none'})")
        quick = open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu", False)
        if quick != cfg.get("quick_gelu", False):
            raise ForeignModelError(f"{spec!r}: tag {tag!r} was trained with quick_gelu={quick} but {arch}'s config "
                                    f"has quick_gelu={cfg.get('quick_gelu', False)}; spell the matching model name "
                                    f"(e.g. {arch.removesuffix('-quickgelu')}{'-quickgelu' if quick else ''}@{tag})")
        return _tag_preprocess(arch, tag)
    if not tags:
        raise ForeignModelError(f"{spec!r}: open_clip records no preprocessing for {arch} (it has no pretrained tags); "
                                "use a local open_clip_config.json with its preprocess_cfg")
    found = {t: _tag_preprocess(arch, t) for t in tags}
    if any(pp != found[tags[0]] for pp in found.values()):
        raise ForeignModelError(f"{spec!r}: {arch}'s pretrained tags preprocess differently ({', '.join(tags)}); spell "
                                f"open_clip:{arch}@TAG[:WEIGHTS] with the weights' tag, or use a local "
                                "open_clip_config.json with its preprocess_cfg")
    return found[tags[0]]


def _config_file(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model config, preprocess_cfg) of an ``open_clip_config.json``; a file that records no preprocessing (a bare
    open_clip model config, or no ``preprocess_cfg`` mean / std) is refused: open_clip's defaults are not a record."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ForeignModelError(f"{path}: cannot read an open_clip config ({first_line(err)})") from None
    if not isinstance(data, dict):
        raise ForeignModelError(f"{path}: not an open_clip config (a JSON object)")
    cfg, preprocess_cfg = data.get("model_cfg", data), data.get("preprocess_cfg")
    missing = [k for k in ("mean", "std") if not isinstance(preprocess_cfg, dict) or k not in preprocess_cfg]
    if missing:
        raise ForeignModelError(f"{path}: no preprocess_cfg {'/'.join(missing)}; florence never guesses "
                                'preprocessing: write {"model_cfg": ..., "preprocess_cfg": {"mean": ..., "std": ..., '
                                '"interpolation": ..., "resize_mode": ...}} (open_clip_config.json) or spell a '
                                "built-in open_clip:ARCH@TAG")
    return cfg, {k: v for k, v in preprocess_cfg.items() if k != "size"}  # open_clip takes the tower's size


def _parse_open_clip(spec: str) -> OpenCLIPSource:
    """``[open_clip:]ARCH[@TAG][:WEIGHTS]`` -> its parts, the model config and the recorded preprocessing."""
    rest = spec.removeprefix("open_clip:")
    arch, _, weights = rest.partition(":")
    arch, _, tag = arch.partition("@") if not arch.endswith(".json") else (arch, "", "")
    if not arch:
        raise ForeignModelError(f"{spec!r}: spell an open_clip model as open_clip:ARCH[@TAG][:WEIGHTS]")
    if arch.endswith(".json"):
        if tag:
            raise ForeignModelError(f"{spec!r}: @TAG names an open_clip pretrained tag of a built-in model name; a "
                                    ".json config records its own preprocess_cfg")
        path = Path(arch)
        cfg, preprocess_cfg = _config_file(path)
        name, arch = path.stem, str(path.absolute())
    else:
        cfg, name = open_clip.get_model_config(arch), arch
        if cfg is None:
            raise ForeignModelError(f"{spec!r}: {arch!r} is neither an open_clip model name (open_clip.list_models()) "
                                    "nor a .json config")
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise ForeignModelError(f"{arch}: not an open_clip model config (lacks {missing})")
    if not arch.endswith(".json"):
        preprocess_cfg = _builtin_preprocess(arch, tag or None, cfg, spec)
    if weights and not Path(weights).is_file():
        raise ForeignModelError(f"{weights}: open_clip weights file not found")
    return OpenCLIPSource(arch, tag or None, weights or None, name, cfg, preprocess_cfg)


@register_architecture("open_clip")
class OpenCLIPDualEncoder(ForeignDualEncoder):
    """An open_clip model (CLIP / CustomTextCLIP / CoCa) as a florence dual encoder (module docstring).

    Args:
        model: the open_clip model; ``model.visual.preprocess_cfg`` set.
        model_config: its open_clip model config (what rebuilds it).
        tokenizer: the open_clip tokenizer (callable: texts -> (N, L) ids).
        name: the open_clip model name or config file stem.
        preprocess: our preprocessing dict; default: from ``model.visual.preprocess_cfg``.
    """

    def __init__(self, model: nn.Module, model_config: dict[str, Any], tokenizer, name: str,
                 preprocess: dict[str, Any] | None = None):
        super().__init__(model, preprocess or open_clip_preprocess(model.visual.preprocess_cfg, f"open_clip {name}"))
        self.model_config = copy.deepcopy(model_config)
        self.tokenizer = tokenizer
        self.name = name
        self.context_length = int(model_config["text_cfg"].get("context_length", 77))

    # -- bundles

    def bundle_config(self) -> dict[str, Any]:
        return {"name": self.name, "model_config": self.model_config,
                "preprocess_cfg": dict(self.model.visual.preprocess_cfg)}

    @classmethod
    def from_bundle_config(cls, config: dict[str, Any], preprocess: dict[str, Any] | None,
                           directory: Path | None) -> "OpenCLIPDualEncoder":
        cfg = config["model_config"]
        if not isinstance(config.get("preprocess_cfg"), dict):
            raise ForeignModelError(f"{directory}: an open_clip bundle's config.json needs its preprocess_cfg")
        model = build_open_clip(cfg, config["preprocess_cfg"])
        tok_dir = directory / "tokenizer" if directory is not None and (directory / "tokenizer").is_dir() else None
        return cls(model, cfg, open_clip_tokenizer(cfg, config["name"], tok_dir), config["name"], preprocess)

    def save_bundle_files(self, directory: Path) -> None:
        if isinstance(self.tokenizer, HFTokenizer):
            self.tokenizer.save_pretrained(str(directory / "tokenizer"))

    # -- encoders

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D), open_clip's ``encode_image``."""
        return self.model.encode_image(images, normalize=normalize)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    normalize: bool = True) -> torch.Tensor:
        """(B, L) ids -> (B, D), open_clip's ``encode_text`` (the mask is implied by the ids: open_clip pools at the
        end-of-text token and masks padding itself)."""
        return self.model.encode_text(input_ids, normalize=normalize)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``dict(input_ids, attention_mask)`` (N, context_length) int64 from open_clip's tokenizer. The mask marks the
        text: for the CLIP BPE the positions up to and including the first end-of-text token (its padding id 0 is
        also the "!" of "!??", so the ids cannot tell padding apart), for an ``HFTokenizer`` the ids other than its
        pad token (as open_clip's Hugging Face text tower masks)."""
        ids = self.tokenizer(self._check_texts(texts)).long()  # N, L
        if isinstance(self.tokenizer, HFTokenizer):
            return {"input_ids": ids, "attention_mask": (ids != self.tokenizer.tokenizer.pad_token_id).long()}
        is_eot = ids == self.tokenizer.eot_token_id  # N, L; the tokenizer ends every row with one (truncation too)
        first = torch.where(is_eot.any(1), is_eot.int().argmax(1), ids.shape[1] - 1)  # N
        return {"input_ids": ids, "attention_mask": (torch.arange(ids.shape[1]) <= first[:, None]).long()}

    # -- pooled features before the projection (florence.adapters.features)

    def _pooled(self, images: torch.Tensor) -> torch.Tensor:
        visual = self.model.visual
        if isinstance(visual, VisionTransformer):
            pooled, _ = visual._pool(visual.transformer(visual._embeds(images)))  # B, width
            return pooled
        if isinstance(visual, TimmModel) and "pool" not in visual.head:
            return visual.trunk(images)  # B, num_features
        return visual(images)  # the tower has no separable projection: B, D

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        visual = self.model.visual
        if isinstance(visual, VisionTransformer):
            return pooled @ visual.proj if visual.proj is not None else pooled  # B, D
        if isinstance(visual, TimmModel) and "pool" not in visual.head:
            return visual.head(pooled)  # B, D
        return pooled

    def _projection_weight(self) -> torch.Tensor:
        visual = self.model.visual
        if isinstance(visual, VisionTransformer) and visual.proj is not None:
            return visual.proj
        return next(visual.parameters())

    # -- Swin image tower as an adapter backbone

    def image_tower(self) -> nn.Module:
        """A CoSwin with the timm Swin trunk's weights (``format="timm"``) and this model's preprocessing; the trunk's
        pooled output equals the tower's ``forward``. ``ForeignModelError`` for any other tower."""
        visual = self.model.visual
        trunk = getattr(visual, "trunk", None)
        if not isinstance(visual, TimmModel) or type(trunk) is not SwinTransformer:
            return super().image_tower()
        overrides = swin_overrides(trunk)
        name = swin_name(overrides["embed_dim"], overrides["depths"], overrides["num_heads"])  # a label: every shape
        tower = create_model(name or "swin_tiny", **overrides)                              # is an override
        report = tower.load_foreign_weights(trunk.state_dict(), format="timm", strict=True)
        tower.load_report = report
        tower.preprocess = dict(self.preprocess)
        return tower.train(self.training)


def swin_overrides(trunk: SwinTransformer) -> dict[str, Any]:
    """CoSwin keyword arguments reproducing a timm ``SwinTransformer`` (patch embedding, timm's window padding)."""
    block = trunk.layers[0].blocks[0]
    if tuple(trunk.patch_embed.patch_size) != (4, 4):
        raise ForeignModelError(f"timm Swin with patch size {trunk.patch_embed.patch_size}: florence's Swin uses 4")
    return {"img_size": list(trunk.patch_embed.img_size), "embed_dim": int(trunk.embed_dim),
            "depths": [len(layer.blocks) for layer in trunk.layers],
            "num_heads": [layer.blocks[0].attn.num_heads for layer in trunk.layers],
            "window_size": list(block.window_size), "mlp_ratio": block.mlp.fc1.out_features / block.mlp.fc1.in_features,
            "qkv_bias": block.attn.qkv.bias is not None, "window_pad": "after_shift"}


def load_open_clip(spec: str) -> OpenCLIPDualEncoder:
    """``[open_clip:]ARCH[@TAG][:WEIGHTS]`` (module docstring) -> a wrapped model in eval mode, ``load_report`` set.

    The weights go through open_clip's ``load_checkpoint`` (its key conversions, then a strict load); without WEIGHTS
    the model is a random initialisation with seed ``RANDOM_INIT_SEED`` (the global RNG is left untouched)."""
    src = _parse_open_clip(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = build_open_clip(src.model_config, src.preprocess_cfg)
    if src.weights is not None:
        try:
            open_clip.load_checkpoint(model, src.weights, strict=True, weights_only=True)
        except (RuntimeError, KeyError, ValueError, OSError, pickle.UnpicklingError) as err:  # read / strict load
            raise WeightsError(f"{src.weights}: not an open_clip checkpoint for {src.name} "
                               f"({first_line(err)})") from None
    wrapped = OpenCLIPDualEncoder(model, src.model_config, open_clip_tokenizer(src.model_config, src.name), src.name)
    keys = sorted(wrapped.state_dict())  # model.<open_clip key>
    report = LoadReport(loaded=keys) if src.weights is not None else LoadReport(newly_initialized=keys)
    wrapped.source_spec = src.spec
    wrapped.load_report = report
    return wrapped.eval()


def open_clip_sha256(spec: str) -> str:
    """SHA-256 of ``[open_clip:]ARCH[@TAG][:WEIGHTS]``: the model config, the recorded preprocessing (the tag's, the
    file's) and the weights' SHA-256 (or the random-initialisation seed)."""
    src = _parse_open_clip(spec)
    weights_id = file_sha256(Path(src.weights)) if src.weights else f"random-init-seed-{RANDOM_INIT_SEED}"
    return _record_hash({"source": "open_clip", "name": src.name, "model_config": src.model_config,
                         "preprocess_cfg": src.preprocess_cfg, "weights": weights_id})


# -- Hugging Face -----------------------------------------------------------------------------------------------------


def _hf_image_processor(cfg: dict[str, Any], path: Path):
    """The transformers image processor a ``preprocessor_config.json`` describes, built from it by the class it names
    (``image_processor_type``; an older file's ``feature_extractor_type`` maps as transformers maps it): keys the file
    leaves out take that class's defaults, exactly as transformers reads the file."""
    name = cfg.get("image_processor_type") or str(cfg.get("feature_extractor_type", "")).replace(
        "FeatureExtractor", "ImageProcessor")
    cls = getattr(transformers, name, None) if name else None
    if not isinstance(cls, type) or not issubclass(cls, transformers.ImageProcessingMixin):
        what = f"image_processor_type {name!r} is not a transformers image processor class" if name else \
            "no image_processor_type"
        raise ForeignModelError(f"{path}: {what}; florence reads the file through the image processor class it names")
    return cls.from_dict({k: v for k, v in cfg.items() if k not in ("image_processor_type", "feature_extractor_type")})


def hf_preprocess(path: Path) -> dict[str, Any]:
    """Our ``preprocess`` dict from a transformers ``preprocessor_config.json`` (read through the image-processor
    class it names: size, crop_size, resample, image_mean, image_std, do_*, with that class's defaults for absent
    keys). Required: florence does not guess preprocessing."""
    if not path.is_file():
        raise ForeignModelError(f"{path}: missing; florence takes the preprocessing from it and refuses to guess")
    try:
        cfg = json.loads(path.read_text())
        cfg = cfg.get("image_processor", cfg)  # a processor_config.json nests it
        proc = _hf_image_processor(cfg, path)
        size, crop = proc.size, getattr(proc, "crop_size", None)
        shortest, center_crop = size.get("shortest_edge"), getattr(proc, "do_center_crop", False)
        normalize = proc.do_normalize
        mean, std = (proc.image_mean, proc.image_std) if normalize else ([0.0] * 3, [1.0] * 3)
        resample = _INTERPOLATIONS[int(proc.resample)]
    except ForeignModelError:
        raise
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise ForeignModelError(f"{path}: unreadable image preprocessing ({type(err).__name__}: "
                                f"{first_line(err)})") from None
    if not proc.do_resize or not center_crop or shortest is None or crop is None or crop.get("height") is None:
        raise ForeignModelError(f"{path}: only 'resize the shortest edge, then centre-crop' preprocessing is supported "
                                f"(do_resize, do_center_crop, size.shortest_edge, crop_size); got size="
                                f"{cfg.get('size')!r}, do_center_crop={center_crop}")
    if proc.do_rescale and abs(float(proc.rescale_factor) - 1 / 255) > 1e-12:
        raise ForeignModelError(f"{path}: rescale_factor {proc.rescale_factor} is not 1/255")
    return crop_preprocess((crop["height"], crop["width"]), int(shortest), mean, std, resample)


def _hf_dir(spec: str | Path) -> Path:
    directory = Path(str(spec).removeprefix("hf:"))
    if not (directory / "config.json").is_file():
        raise ForeignModelError(f"{directory}: not a transformers model directory (no config.json)")
    return directory


def _hf_model_class(config: dict[str, Any], where: str) -> type:
    model_type = config.get("model_type")
    if model_type not in _HF_MODELS:
        raise ForeignModelError(f"{where}: model_type {model_type!r} is not a supported dual encoder "
                                f"({', '.join(sorted(_HF_MODELS))})")
    return getattr(transformers, _HF_MODELS[model_type])  # imported on first use (transformers is lazy)


def _hf_tokenizer(directory: Path):
    """The transformers tokenizer saved in ``directory`` (local files only), which must have a pad token: the wrapper
    pads batches of texts."""
    try:
        with hub_offline():
            tokenizer = load_tokenizer(directory)
    except (OSError, ValueError) as err:
        raise ForeignModelError(f"{directory}: no usable tokenizer ({first_line(err)})") from None
    if tokenizer.pad_token_id is None:
        raise ForeignModelError(f"{directory}: its tokenizer has no pad token (tokenizer_config.json pad_token); "
                                "florence pads batches of texts")
    return tokenizer


def _hf_context_length(model: nn.Module, tokenizer) -> int:
    limit = getattr(model.config.text_config, "max_position_embeddings", None) or 77
    return int(min(limit, tokenizer.model_max_length or limit))


@register_architecture("hf_dual_encoder")
class HFDualEncoder(ForeignDualEncoder):
    """A transformers ``CLIPModel`` or ``VisionTextDualEncoderModel`` as a florence dual encoder (module docstring).

    Args:
        model: the transformers model (float32).
        tokenizer: its transformers tokenizer (with a pad token).
        preprocess: our preprocessing dict (``hf_preprocess``).
    """

    def __init__(self, model: nn.Module, tokenizer, preprocess: dict[str, Any]):
        super().__init__(model, preprocess)
        self.tokenizer = tokenizer
        self.context_length = _hf_context_length(model, tokenizer)

    # -- bundles

    def bundle_config(self) -> dict[str, Any]:
        return {"hf_config": self.model.config.to_dict()}

    @classmethod
    def from_bundle_config(cls, config: dict[str, Any], preprocess: dict[str, Any] | None,
                           directory: Path | None) -> "HFDualEncoder":
        hf = dict(config["hf_config"])
        model_cls = _hf_model_class(hf, "bundle config.json")
        model = model_cls(model_cls.config_class.from_dict(hf))
        if directory is None or not (directory / "tokenizer").is_dir():
            raise ForeignModelError(f"{directory}: an hf_dual_encoder bundle needs its tokenizer/ directory")
        return cls(model, _hf_tokenizer(directory / "tokenizer"), preprocess)

    def save_bundle_files(self, directory: Path) -> None:
        self.tokenizer.save_pretrained(str(directory / "tokenizer"))

    # -- encoders

    @staticmethod
    def _features(out) -> torch.Tensor:
        return out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns an output object

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D), the model's ``get_image_features``."""
        x = self._features(self.model.get_image_features(pixel_values=images))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    normalize: bool = True) -> torch.Tensor:
        """(B, L) ids and mask -> (B, D), the model's ``get_text_features``."""
        x = self._features(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
        return F.normalize(x, dim=-1) if normalize else x

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``dict(input_ids, attention_mask)`` (N, L) int64, padded to the longest text (L <= ``context_length``)."""
        enc = self.tokenizer(self._check_texts(texts), padding=True, truncation=True, max_length=self.context_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}

    # -- pooled features before the projection (florence.adapters.features)

    def _pooled(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.vision_model(pixel_values=images).pooler_output  # B, vision hidden

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.model.visual_projection(pooled)  # B, D

    def _projection_weight(self) -> torch.Tensor:
        return self.model.visual_projection.weight


def load_hf_dual_encoder(spec: str | Path) -> HFDualEncoder:
    """``[hf:]DIR`` -> a wrapped transformers dual encoder in eval mode (float32, offline), ``load_report`` set from
    transformers' loading info; weights the model lacks or cannot place stop the load (``WeightsError``)."""
    directory = _hf_dir(spec)
    try:
        config = json.loads((directory / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ForeignModelError(f"{directory / 'config.json'}: unreadable ({first_line(err)})") from None
    model_cls = _hf_model_class(config, str(directory / "config.json"))
    preprocess = hf_preprocess(directory / "preprocessor_config.json")
    tokenizer = _hf_tokenizer(directory)
    try:
        with hub_offline():
            model, info = model_cls.from_pretrained(str(directory), dtype=torch.float32, local_files_only=True,
                                                    output_loading_info=True)
    except (OSError, ValueError) as err:
        raise WeightsError(f"{directory}: transformers cannot load it ({first_line(err)})") from None
    missing, mismatched = sorted(info.get("missing_keys", [])), sorted(info.get("mismatched_keys", []))
    if missing or mismatched:
        raise WeightsError(f"{directory}: weights do not fit {model_cls.__name__}: missing {missing[:10]} "
                           f"({len(missing)}), shape mismatch {[str(m) for m in mismatched[:5]]}")
    wrapped = HFDualEncoder(model, tokenizer, preprocess)
    wrapped.source_spec = f"hf:{directory.absolute()}"
    keys = sorted(wrapped.state_dict())
    wrapped.load_report = LoadReport(loaded=keys, unexpected=sorted(info.get("unexpected_keys", [])))
    return wrapped.eval()


def hf_sha256(spec: str | Path) -> str:
    """SHA-256 of ``[hf:]DIR``: the SHA-256 of every top-level file (weights, config, tokenizer, preprocessing; not
    other frameworks' weights, docs or hidden files)."""
    directory = _hf_dir(spec)
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")
                   and not p.name.endswith(_HF_SKIPPED_SUFFIXES))
    return _record_hash({"source": "hf", "files": {p.name: file_sha256(p) for p in files}})


register_source("open_clip", load=load_open_clip, sha256=open_clip_sha256,
                spelling="open_clip:ARCH[@TAG][:WEIGHTS]")
register_source("hf", load=load_hf_dual_encoder, sha256=hf_sha256, spelling="hf:DIR")

