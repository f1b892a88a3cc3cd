"""``florence convert --from FORMAT SRC OUT_BUNDLE``: a verified florence bundle from weights in a foreign layout.

    florence convert --from timm  DIR_OR_FILE OUT [--model swin_tiny] [--preprocess JSON|FILE] [--set k=v ...]
    florence convert --from microsoft FILE OUT --model swin_tiny --preprocess JSON|FILE
    florence convert --from unicl FILE OUT --preprocess unicl|JSON|FILE [--text-heads N]
    florence convert --from open_clip ARCH[@TAG]:WEIGHTS OUT
    florence convert --from hf DIR OUT
    florence convert --from mmdet|dynamichead FILE OUT --model dyhead_atss_swin_tiny --preprocess JSON|FILE
    florence convert --from mmaction2 FILE OUT --model video_swin_tiny --preprocess JSON|FILE

Each format goes through the converter that the model reading it owns (``florence.load_weights(model, src,
format=...)`` for Swin / detector / video layouts; ``florence.backbone.unicl_convert`` for UniCL releases;
``florence.backbone.foreign`` for open_clip and Hugging Face dual encoders), prints the ``LoadReport`` and writes the
bundle with ``save_pretrained``; the bundle is then read back with ``from_pretrained`` (manifest and hashes verified)
and its weights compared with the converted model's, so what is written is what was converted.

Preprocessing is taken from the source where the source records it (a timm Hugging Face Hub directory's
``config.json`` ``pretrained_cfg``; open_clip's ``preprocess_cfg``; a transformers directory's
``preprocessor_config.json``) and must otherwise be given with ``--preprocess`` (a JSON object or a JSON file with
``input_size``, ``mean``, ``std``, ``interpolation``, optionally ``crop_pct``; or ``unicl``, UniCL's own eval
transform: 224 px, ImageNet mean / std, bicubic, crop 0.875): florence never guesses it. A given ``--preprocess``
overrides a recorded one.

Strict by default: keys the model has no place for, or lacks (other than those it initialises fresh on purpose), stop
the conversion naming them; ``--no-strict`` writes what fits and the report lists the rest.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from florence.backbone.foreign import load_hf_dual_encoder, load_open_clip
from florence.backbone.unicl_convert import UNICL_EVAL_PREPROCESS, convert_unicl
from florence.bundle import PREPROCESS_KEYS, check_preprocess, from_pretrained, save_pretrained
from florence.engine.config import parse_overrides
from florence.errors import FlorenceError, first_line
from florence.factory import create_model, load_weights
from florence.weights import LoadReport

__all__ = ["FORMATS", "ConvertError", "convert", "main"]

# model-owned layouts: florence.load_weights(model, src, format=...) reads them
_LOAD_WEIGHTS_FORMATS = ("timm", "microsoft", "mmdet", "dynamichead", "mmaction2")
FORMATS = ("timm", "microsoft", "unicl", "open_clip", "hf", "mmdet", "dynamichead", "mmaction2")
_EXAMPLE_MODEL = {"timm": "swin_tiny", "microsoft": "swin_tiny", "mmdet": "dyhead_atss_swin_tiny",
                  "dynamichead": "dyhead_atss_swin_tiny", "mmaction2": "video_swin_tiny"}
_TIMM_SWIN_ARGS = ("img_size", "embed_dim", "depths", "num_heads", "window_size", "mlp_ratio", "qkv_bias",
                   "num_classes")
_TIMM_SWIN = re.compile(r"^swin_(tiny|small|base|large)_patch4_window(\d+)_(\d+)")


class ConvertError(FlorenceError, ValueError):
    """A conversion that cannot proceed as asked (missing preprocessing or model name, unreadable source)."""


PREPROCESS_PRESETS = {"unicl": UNICL_EVAL_PREPROCESS}  # named on purpose by the user, never applied by default


def read_preprocess(spec: str | None) -> dict[str, Any] | None:
    """``--preprocess``: a preset name (``unicl``: UniCL's eval transform), a JSON object, or the path of a JSON file
    holding one; checked for the required keys."""
    if spec is None:
        return None
    if spec in PREPROCESS_PRESETS:
        return dict(PREPROCESS_PRESETS[spec])
    path = Path(spec)
    text = path.read_text() if not spec.lstrip().startswith("{") and path.is_file() else spec
    try:
        preprocess = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConvertError(f"--preprocess {spec!r}: neither a JSON object nor a JSON file ({e})") from None
    return check_preprocess(preprocess, f"--preprocess {spec!r}")


def _timm_hub_dir(src: Path, model: str | None) -> tuple[Path, str, dict[str, Any], dict[str, Any], list | None]:
    """A timm Hugging Face Hub directory (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``) ->
    (weights file, our model name, overrides, recorded preprocessing, label names)."""
    try:
        config = json.loads((src / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConvertError(f"{src / 'config.json'}: not a timm Hub config ({first_line(err)})") from None
    weights = next((src / f for f in ("model.safetensors", "pytorch_model.bin") if (src / f).is_file()), None)
    if weights is None:
        raise ConvertError(f"{src}: no model.safetensors or pytorch_model.bin")
    architecture = str(config.get("architecture", ""))
    overrides: dict[str, Any] = {"num_classes": int(config.get("num_classes", 0))}
    if model is None:
        match = _TIMM_SWIN.match(architecture)
        if match is None:
            raise ConvertError(f"{src / 'config.json'}: architecture {architecture!r} is not a Swin florence maps; "
                               "give --model (a florence image-tower name)")
        model = f"swin_{match.group(1)}"
        overrides.update(window_size=int(match.group(2)), img_size=int(match.group(3)))
    # timm records the constructor arguments that differ from the architecture's defaults; ours have timm's names
    for key, value in (config.get("model_args") or {}).items():
        if key in _TIMM_SWIN_ARGS:
            overrides[key] = tuple(value) if isinstance(value, list) else value
    cfg = config.get("pretrained_cfg") or {}
    preprocess = {k: cfg[k] for k in (*PREPROCESS_KEYS, "crop_pct") if k in cfg}
    if any(k not in preprocess for k in PREPROCESS_KEYS):
        preprocess = {}
    return weights, model, overrides, preprocess, config.get("label_names")


def _convert_with_load_weights(fmt: str, src: str, model: str | None, overrides: dict[str, Any],
                               preprocess: dict[str, Any] | None, strict: bool) -> tuple[nn.Module, LoadReport]:
    path = Path(src)
    recorded: dict[str, Any] = {}
    labels = None
    if fmt == "timm" and path.is_dir():
        path, model, hub_overrides, recorded, labels = _timm_hub_dir(path, model)
        overrides = {**hub_overrides, **overrides}
    if model is None:
        raise ConvertError(f"--from {fmt} needs --model (the florence model to fill, e.g. {_EXAMPLE_MODEL[fmt]})")
    preprocess = preprocess or recorded
    if not preprocess:
        raise ConvertError(f"{src}: a {fmt} checkpoint does not record its preprocessing; give --preprocess "
                           "(JSON with input_size, mean, std, interpolation, crop_pct)")
    try:
        net = create_model(model, **overrides)
    except (TypeError, ValueError) as err:  # an override the constructor refuses (--set window_size=abc)
        raise ConvertError(f"--model {model} --set {overrides}: {first_line(err)}") from None
    report = load_weights(net, path, format=fmt, strict=strict)
    net.preprocess = dict(preprocess)
    if labels is not None and len(labels) == overrides.get("num_classes"):
        net.class_names = list(labels)
    return net, report


def _convert_unicl(src: str, preprocess: dict[str, Any] | None, text_heads: int | None,
                   strict: bool) -> tuple[nn.Module, LoadReport]:
    if preprocess is None:
        raise ConvertError(f"{src}: UniCL checkpoints do not record their preprocessing; give --preprocess "
                           "(--preprocess unicl for UniCL's eval transform, or a JSON object)")
    return convert_unicl(src, preprocess=preprocess, text_heads=text_heads, strict=strict)


def _convert_foreign(loader: Callable[[str], nn.Module], src: str, preprocess: dict[str, Any] | None,
                     strict: bool) -> tuple[nn.Module, LoadReport]:
    """open_clip / transformers: the source library loads its own weights (strictly); the wrapper keeps its report.
    Strict: a model whose weights were not all loaded (``open_clip:ARCH`` without WEIGHTS) is refused."""
    model = loader(src)
    if strict and model.load_report.newly_initialized:
        raise ConvertError(f"{src}: {len(model.load_report.newly_initialized)} tensors would be random (no weights "
                           "given: ARCH:WEIGHTS); --no-strict writes them anyway")
    if preprocess is not None:
        model.preprocess = dict(preprocess)
    return model, model.load_report


def convert(fmt: str, src: str, out: str | Path, *, model: str | None = None, overrides: dict[str, Any] | None = None,
            preprocess: dict[str, Any] | None = None, text_heads: int | None = None,
            strict: bool = True) -> tuple[Path, LoadReport]:
    """Convert ``src`` (layout ``fmt``) into a verified bundle at ``out``; returns (bundle path, load report)."""
    if fmt not in FORMATS:
        raise ConvertError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    overrides = dict(overrides or {})
    unused = [flag for flag, value, used in (("--model", model, fmt in _LOAD_WEIGHTS_FORMATS),
                                             ("--set", overrides, fmt in _LOAD_WEIGHTS_FORMATS),
                                             ("--text-heads", text_heads, fmt == "unicl")) if value and not used]
    if unused:
        raise ConvertError(f"--from {fmt} does not take {', '.join(unused)} (the source defines the architecture)")
    if fmt in _LOAD_WEIGHTS_FORMATS:
        net, report = _convert_with_load_weights(fmt, src, model, overrides, preprocess, strict)
    elif fmt == "unicl":
        net, report = _convert_unicl(src, preprocess, text_heads, strict)
    elif fmt == "open_clip":
        net, report = _convert_foreign(load_open_clip, src, preprocess, strict)
    else:
        net, report = _convert_foreign(load_hf_dual_encoder, src, preprocess, strict)
    out = save_pretrained(net.eval(), out)
    check_bundle(net, out)
    return out, report


def check_bundle(model: nn.Module, bundle: Path) -> None:
    """Read ``bundle`` back (manifest verified) and require every tensor equal to ``model``'s."""
    reloaded = from_pretrained(bundle).state_dict()
    own = model.state_dict()
    differ = [k for k in own if k not in reloaded or not torch.equal(own[k].cpu(), reloaded[k])]
    if differ or set(reloaded) - set(own):
        raise ConvertError(f"{bundle}: read back differs from the converted model at {differ[:5]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="florence convert", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="fmt", required=True, choices=FORMATS, help="the source's layout")
    parser.add_argument("src", help="checkpoint file or directory (open_clip: ARCH[@TAG]:WEIGHTS)")
    parser.add_argument("out", help="bundle directory to write (replaced atomically)")
    parser.add_argument("--model", help="florence model to fill (timm/microsoft/mmdet/dynamichead/mmaction2)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="constructor overrides of --model, e.g. window_size=12 img_size=384 num_classes=1000")
    parser.add_argument("--preprocess", help="'unicl', or a JSON object / file: input_size, mean, std, interpolation, "
                        "crop_pct")
    parser.add_argument("--text-heads", type=int, help="unicl: text attention heads (default width // 64)")
    parser.add_argument("--no-strict", dest="strict", action="store_false", help="write what fits; report the rest")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides = dict(parse_overrides(args.set))
        out, report = convert(args.fmt, args.src, args.out, model=args.model, overrides=overrides,
                              preprocess=read_preprocess(args.preprocess), text_heads=args.text_heads,
                              strict=args.strict)
    except (FlorenceError, FileNotFoundError) as err:  # one line; anything else is a bug and keeps its traceback
        print(f"florence convert: {err}", file=sys.stderr)
        return 2
    print(report)
    print(f"wrote {out} (verified: manifest, hashes, weights read back equal)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
