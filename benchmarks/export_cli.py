"""``florence export --model BUNDLE --part PART --format torch-export|onnx OUT``: one part of a model as a
``torch.export`` program (``.pt2``) or an ONNX graph, with a JSON sidecar ``OUT.json``.

    florence export --model runs/demo/pretrain/final --part image --format onnx image.onnx
    florence export --model runs/demo/pretrain/final --part text --format torch-export text.pt2
    florence export --model runs/det/final --part detector --format onnx det.onnx --image-size 896 1408
    florence export --model open_clip:ViT-B-32:/path/weights.pt --part image --format onnx vit.onnx

Parts: ``image``, ``text`` (dual encoders), ``classifier``, ``detector``, ``vqa``, ``video`` -- whichever the model has
(``florence.adapters.export``: inputs, outputs and what is dynamic per part). The batch is always dynamic; the image
size is the bundle's (``--image-size H W`` for another), or dynamic in multiples of the tower's unit with
``--dynamic-size`` (image, classifier on florence's Swin towers). The sidecar records the inputs with their
dynamic dims, the outputs, the preprocessing, the bundle's SHA-256 and a check: the exported file run on another batch
size (and height) against the eager model, ``max_abs_diff``.

``--no-optimize`` writes ONNX without the ONNX optimizer pass (faster to export, a larger graph with the same outputs;
``florence.adapters.export.export_traced``).

Exit status 0, or 2 with a one-line message for a problem you can fix (a part the model does not have, an unknown
format, a bundle that does not verify).
"""
from __future__ import annotations

import argparse
import logging
import sys

from florence.adapters.export import FORMATS, PARTS, export_part
from florence.bundle import bundle_sha256, from_pretrained
from florence.errors import FlorenceError

_NOISY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._export")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="florence export", description=__doc__.split("\n\n")[0])
    p.add_argument("out", metavar="OUT", help="the file to write (.pt2 / .onnx); the sidecar is OUT.json")
    p.add_argument("--model", required=True, help="checkpoint bundle directory (florence.from_pretrained), or "
                   "open_clip:ARCH[:WEIGHTS] / hf:DIR")
    p.add_argument("--part", required=True, help=f"one of {', '.join(PARTS)} (those the model has)")
    p.add_argument("--format", required=True, help=f"{' or '.join(FORMATS)}")
    p.add_argument("--dynamic-size", action="store_true",
                   help="dynamic image height and width (multiples of the tower's stride x window, at least 2 of them)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="example (and, without --dynamic-size, exported) image size; default: the bundle's")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch's)")
    p.add_argument("--no-optimize", action="store_true",
                   help="ONNX: skip the ONNX optimizer pass (about half the export time, a larger graph)")
    p.add_argument("--no-check", action="store_true", help="skip running the exported file against the eager model")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in _NOISY_LOGGERS:  # the exporters log every pass at WARNING/INFO
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        model = from_pretrained(args.model, map_location="cpu")
        result = export_part(model, args.part, args.format, args.out, dynamic_size=args.dynamic_size,
                             image_size=tuple(args.image_size) if args.image_size else None, opset=args.opset,
                             optimize=not args.no_optimize, source=args.model,
                             bundle_sha256=bundle_sha256(args.model), check=not args.no_check)
    except FlorenceError as err:  # a user-fixable problem: one line; anything else is a bug and keeps its traceback
        print(f"florence export: {err}", file=sys.stderr)
        return 2
    meta = result.metadata
    shapes = "; ".join(f"{t['name']} {t['shape']}" for t in meta["inputs"])
    print(f"wrote {result.path} ({meta['part']}, {meta['export_format']}): {shapes}")
    print(f"sidecar {result.sidecar}")
    if meta["check"] is not None:
        check = meta["check"]
        print(f"check ({check['runtime']}, inputs {check['inputs']}): max abs diff {check['max_abs_diff']:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
