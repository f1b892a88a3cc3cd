"""Export a model's parts (towers, adapter models) as ``torch.export`` programs or ONNX graphs, with a JSON sidecar.

``export_part(model, part, format, out)`` writes ``out`` (``.pt2`` from ``torch.export.save``, or ``.onnx``) and
``out + ".json"`` (the sidecar: inputs and outputs with their dynamic dims, the preprocessing, the bundle's SHA-256, the
library versions and the check below), so the file runs elsewhere without florence. Every part is a small module with
plain tensors in and out; ``available_parts(model)`` says which a model has:

==============  =========================================  ==========================================================
part            models                                     inputs -> outputs
==============  =========================================  ==========================================================
``image``       dual encoders (``unicl``, open_clip, HF)   ``images`` (B, 3, H, W) -> ``embeddings`` (B, D), unit norm
                image towers / image classifiers           ``images`` -> ``features`` (B, F), pooled, before any head
``text``        dual encoders                              ``input_ids``, ``attention_mask`` (B, L) int64 ->
                                                           ``embeddings`` (B, D), unit norm
``classifier``  image classifiers (a tower with a head)    ``images`` -> ``logits`` (B, K)
``detector``    ``detector`` (DyHead ATSS)                 ``images`` -> ``cls_logits`` (B, N, K), ``centerness_logits``
                                                           (B, N), ``boxes`` (B, N, 4) decoded xyxy, clipped to the
                                                           input tensor; N = all anchors, P3 first, row-major
``vqa``         ``meter`` with a VQA head                  ``images``, ``input_ids``, ``attention_mask`` ->
                                                           ``vqa_logits`` (B, A)
``video``       video classifiers / video towers           ``videos`` (B, 3, T, H, W) -> ``logits`` (B, K) (a tower
                                                           without a head: ``features`` (B, F))
==============  =========================================  ==========================================================

Shapes. The batch is dynamic in every part (``batch``, 1 .. any). The other dims are the example's: the
preprocessing's ``input_size`` (a detector: its ``input.scale`` (long, short) placed as (short, long) and rounded up to
its ``size_divisor``; ``image_size=`` chooses another), text length L = the model's ``context_length`` /
``max_text_len`` (florence's tokenizers pad every text to it). ``dynamic_size=True`` makes H and W dynamic where the
tower allows it: a Swin / CoSwin tower's traced program has no branch on the map size only when every stage's map is a
multiple of its window and the last is larger than it (otherwise padding and window clamping are chosen per size),
so H = ``unit * h`` and W = ``unit * w`` with ``unit`` = the last stage's stride times the window (32 * 7 = 224 for
window 7; 384 for window 12) and h, w >= 2 (448, 672, ...). Offered for ``image`` and ``classifier`` on florence's
own towers, in ``torch-export`` only (tracing is slow: about ten seconds per Swin stage on one core, whatever its
width or depth, against seconds for a whole tiny tower with a dynamic batch only; torch 2.14's ONNX translation fails
on the window order's modulo by a symbolic size, ``aten.remainder.Scalar``). Not for ``detector``: its trace at
448 x 448 holds a guard on the stride-8 level's size (the DyHead's neighbour levels), so the program fails at any
other size; export it at the size you pad batches to (``image_size``). Not for ``vqa``, ``video``, ``text`` or
foreign (open_clip / HF) towers either.

Detector. Box decoding (anchors, deltas, clipping to the input) is inside the program; the score threshold, the top
``nms_pre`` per level, the centerness factor and NMS stay outside (the sidecar's ``postprocess`` gives ``test``
settings, strides and the level sizes), because their output sizes depend on the data. The DyHead's deformable
convolutions export as plain PyTorch ops (``impl="torch"``: ``embedding_bag`` sampling), so neither torchvision's
custom op nor an ONNX ``DeformConv`` is needed at run time.

ONNX. The ``torch.export`` program is translated by ``torch.onnx.export(program, dynamo=True)`` (onnx, onnxscript and
onnxruntime are florence dependencies); ``optimize=True`` (the default; ``--no-optimize`` turns it off) runs the ONNX
optimizer on the result, a smaller graph for about twice the translation time (``export_traced``).

Check. After writing, the exported file runs (``torch.export.load(...).module()`` or an onnxruntime session) on a
batch one larger than the example's (and, with ``dynamic_size``, one unit taller) and is compared with the eager model;
the sidecar records ``check.max_abs_diff``. ``ExportError`` (a ``FlorenceError``) reports what a user can fix: an
unknown part or format, a size the tower does not accept.

Cost. Tracing dominates (``trace_part``): seconds for a tiny model, a few minutes for a large detector; ``trace_part``
once then ``export_traced`` per format writes both formats from one trace.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnxruntime
import torch
from torch import nn
from torch.export import Dim

from florence import __version__
from florence.adapters.deform_conv import deform_impl
from florence.adapters.detector import Detector
from florence.adapters.meter import MeterModel
from florence.adapters.video_classifier import VideoClassifier
from florence.backbone.coswin import CoSwin
from florence.backbone.unicl import UniCLModel
from florence.backbone.video_coswin import VideoCoSwin
from florence.errors import FlorenceError

FORMATS = ("torch-export", "onnx")
PARTS = ("image", "text", "classifier", "detector", "vqa", "video")
SIDECAR_FORMAT = "florence-export/1"
EXAMPLE_BATCH = 2
_SIZE_RANGE = (2, 64)  # h, w multiples of the tower's unit with dynamic_size


class ExportError(FlorenceError, ValueError):
    """A part, format, size or installation that cannot export; the message says which and what is available."""


@dataclass
class TensorInfo:
    """One input or output: ``shape`` entries are ints (static) or dim names (dynamic: ``"batch"``, ``"224*h"``)."""

    name: str
    shape: list[int | str]
    dtype: str


@dataclass
class PartSpec:
    """What ``export_part`` traces: ``module(*example)`` returns the outputs named in ``output_names``.

    Attributes:
        part: the part name.
        module: plain tensors in, a tensor or a tuple of tensors out (eval mode).
        input_names / output_names: names in the exported graph and the sidecar.
        example: example inputs (batch ``EXAMPLE_BATCH``).
        dynamic: per input, {dim index: ``torch.export.Dim`` (or a multiple of one)}.
        make_inputs: ``(batch, (H, W) or None) -> inputs`` of another batch / image size, for the check.
        size_unit: (unit_h, unit_w) of a dynamic image size, else None.
        info: extra sidecar entries (``tokenizer``, ``postprocess``).
    """

    part: str
    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    example: tuple[torch.Tensor, ...]
    dynamic: dict[str, dict[int, Any]]
    make_inputs: Callable[[int, tuple[int, int] | None], tuple[torch.Tensor, ...]]
    size_unit: tuple[int, int] | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportResult:
    """``path`` of the exported file, ``sidecar`` (its JSON path) and ``metadata`` (the sidecar's content)."""

    path: Path
    sidecar: Path
    metadata: dict[str, Any]


# -- the parts ----------------------------------------------------------------------------------------------------


class ImageEmbedding(nn.Module):
    """``images (B, 3, H, W) -> (B, D)``: a dual encoder's ``encode_image`` (unit-norm embeddings)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images, normalize=True)


class TextEmbedding(nn.Module):
    """``input_ids, attention_mask (B, L) -> (B, D)``: a dual encoder's ``encode_text`` (unit-norm embeddings)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask, normalize=True)


class PooledFeatures(nn.Module):
    """``inputs -> (B, F)``: a tower's pooled features before its classifier (``forward_head(pre_logits=True)``)."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tower.forward_head(self.tower.forward_features(x), pre_logits=True)


class Forward(nn.Module):
    """``inputs -> model(inputs)``: a classifier's logits (image or video)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class DetectorOutputs(nn.Module):
    """``images (B, 3, H, W)`` -> ``cls_logits (B, N, K)``, ``centerness_logits (B, N)``, ``boxes (B, N, 4)``.

    The detector's head outputs with the levels flattened and concatenated as ``Detector.forward`` does (row-major per
    level, P3 first), the deltas decoded against the anchors (``DeltaXYWHBBoxCoder``) and the corners clipped to
    ``[0, W] x [0, H]`` of the input tensor (clip again to each image's own size outside; the result is the same).
    """

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        head = self.detector.head
        cls, reg, ctr = head(self.detector.features(images))
        anchors = head.anchors([tuple(c.shape[-2:]) for c in cls], images.device)  # N, 4
        cls = torch.cat([c.flatten(2).transpose(1, 2) for c in cls], dim=1)  # B, N, K
        reg = torch.cat([r.flatten(2).transpose(1, 2) for r in reg], dim=1)  # B, N, 4
        ctr = torch.cat([c.flatten(1) for c in ctr], dim=1)  # B, N
        boxes = head.bbox_coder.decode(anchors, reg)  # B, N, 4 (anchors broadcast over the batch)
        height, width = images.shape[-2:]
        x = boxes[..., 0::2].clamp(min=0).clamp(max=width)  # B, N, 2 (x1, x2)
        y = boxes[..., 1::2].clamp(min=0).clamp(max=height)  # B, N, 2 (y1, y2)
        boxes = torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)  # B, N, 4 xyxy
        return cls, ctr, boxes


class VQALogits(nn.Module):
    """``images (B, 3, H, W), input_ids, attention_mask (B, L) -> vqa_logits (B, A)`` of a METER model."""

    def __init__(self, model: MeterModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(images, input_ids, attention_mask)["vqa_logits"]


def _is_dual_encoder(model: nn.Module) -> bool:
    return callable(getattr(model, "encode_image", None)) and callable(getattr(model, "encode_text", None))


def _is_image_tower(model: nn.Module) -> bool:
    return isinstance(model, CoSwin)


def available_parts(model: nn.Module) -> list[str]:
    """The parts ``export_part`` offers for ``model`` (module docstring), in ``PARTS`` order."""
    parts: set[str] = set()
    if _is_dual_encoder(model):
        parts |= {"image", "text"}
    if _is_image_tower(model):
        parts.add("image")
        if getattr(model, "num_classes", 0):
            parts.add("classifier")
    if isinstance(model, Detector):
        parts.add("detector")
    if isinstance(model, MeterModel) and "vqa" in model.heads:
        parts.add("vqa")
    if isinstance(model, (VideoClassifier, VideoCoSwin)):
        parts.add("video")
    return [p for p in PARTS if p in parts]


def _without(model: nn.Module, names: Sequence[str], **attributes) -> nn.Module:
    """A shallow copy of ``model`` whose child modules ``names`` are empty (their weights are not exported) and whose
    ``attributes`` are replaced; the model itself is unchanged."""
    clone = copy.copy(model)
    clone._modules = {k: (nn.Module() if k in names else v) for k, v in model._modules.items()}
    clone.__dict__.update(attributes)
    return clone


def _describe(model: nn.Module) -> str:
    return getattr(type(model), "architecture", None) or type(model).__name__


def _swin_unit(tower: nn.Module, part: str) -> tuple[int, int]:
    """(unit_h, unit_w): the last stage's stride times the window (module docstring)."""
    if not isinstance(tower, CoSwin):
        raise ExportError(f"part {part!r}: dynamic image size needs a florence Swin / CoSwin tower, this model's is "
                          f"{type(tower).__name__}; export at a fixed size (without dynamic_size)")
    stride = tower.feature_info[len(tower.layers) - 1]["reduction"]
    return stride * tower.window_size[0], stride * tower.window_size[1]


def _image_size(preprocess: dict[str, Any]) -> tuple[int, int]:
    size = preprocess["input_size"]
    return int(size[-2]), int(size[-1])


def _detector_size(model: Detector) -> tuple[int, int]:
    long, short = (int(v) for v in model.input_cfg["scale"])
    div = int(model.input_cfg["size_divisor"])
    return math.ceil(short / div) * div, math.ceil(long / div) * div


def _example_text(model: nn.Module, batch: int, length: int, vocab: int, pad: int | None) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask) (batch, length) int64: ids below ``vocab``; every other row padded after half
    its length (so the mask matters)."""
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, max(vocab, 4), (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[1::2, max(length // 2, 1):] = 0
    if pad is not None:
        ids = ids.masked_fill(mask == 0, pad)
    return ids, mask


def _text_info(model: nn.Module) -> tuple[int, int, int | None]:
    """(L, vocabulary size, pad id) of a dual encoder's or METER's text input."""
    length = int(getattr(model, "context_length", None) or getattr(model, "max_text_len", None) or 77)
    tokenizer = getattr(model, "tokenizer", None)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if isinstance(model, UniCLModel):
        vocab = model.text_encoder.vocab_size
        pad = pad if pad is not None else getattr(model.text_encoder.encoder.config, "pad_token_id", None)
    elif isinstance(model, MeterModel):
        vocab, pad = model.vocab_size, model.pad_token_id
    else:
        vocab = len(tokenizer) if tokenizer is not None and hasattr(tokenizer, "__len__") else 100
    return length, int(vocab), pad


def _images(batch: int, size: tuple[int, int], seed: int = 0, frames: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + batch + 1000 * size[0] + size[1])
    shape = (batch, 3, size[0], size[1]) if frames is None else (batch, 3, frames, size[0], size[1])
    return torch.randn(shape, generator=g)


def part_spec(model: nn.Module, part: str, *, dynamic_size: bool = False,
              image_size: tuple[int, int] | None = None) -> PartSpec:
    """The module, example inputs and dynamic dims of ``model``'s ``part`` (module docstring)."""
    parts = available_parts(model)
    if part not in parts:
        raise ExportError(f"part {part!r} is not available for a {_describe(model)} model; available: "
                          f"{', '.join(parts) or 'none'}")
    if dynamic_size and part not in ("image", "classifier"):
        raise ExportError(f"part {part!r}: dynamic image size is offered for image and classifier only; export at a "
                          "fixed size (image_size)")
    batch = Dim("batch", min=1)
    info: dict[str, Any] = {}

    if part == "text":
        length, vocab, pad = _text_info(model)
        module = TextEmbedding(_without(model, ("image_encoder", "image_projection"))
                               if isinstance(model, UniCLModel) else model)
        info["tokenizer"] = {"context_length": length, "pad_token_id": pad,
                             "note": "tokenize with the bundle's tokenizer, padded to context_length"}
        return PartSpec(part, module, ["input_ids", "attention_mask"], ["embeddings"],
                        _example_text(model, EXAMPLE_BATCH, length, vocab, pad),
                        {"input_ids": {0: batch}, "attention_mask": {0: batch}},
                        lambda b, size: _example_text(model, b, length, vocab, pad), info=info)

    if part == "video":
        frames, height, width = (int(v) for v in _preprocess(model)["input_size"][-3:])
        size = image_size or (height, width)
        with_head = isinstance(model, VideoClassifier) or model.num_classes > 0
        return PartSpec(part, Forward(model), ["videos"], ["logits" if with_head else "features"],
                        (_images(EXAMPLE_BATCH, size, frames=frames),), {"videos": {0: batch}},
                        lambda b, s: (_images(b, s or size, frames=frames),))

    if part == "vqa":
        length, vocab, pad = _text_info(model)
        others = tuple(f"{h}_head" for h in model.heads if h != "vqa")
        module = VQALogits(_without(model, others, heads=["vqa"]))
        size = image_size or _image_size(model.preprocess)
        info["tokenizer"] = {"context_length": length, "pad_token_id": pad,
                             "note": "tokenize with the bundle's tokenizer, padded to max_text_len"}
        info["answers"] = list(model.answers or [])

        def vqa_inputs(b, s):
            return (_images(b, s or size), *_example_text(model, b, length, vocab, pad))

        return PartSpec(part, module, ["images", "input_ids", "attention_mask"], ["vqa_logits"],
                        vqa_inputs(EXAMPLE_BATCH, None),
                        {"images": {0: batch}, "input_ids": {0: batch}, "attention_mask": {0: batch}}, vqa_inputs,
                        info=info)

    # image, classifier, detector: one input (B, 3, H, W)
    if part == "detector":
        module, tower, size = DetectorOutputs(model), model.backbone, _detector_size(model)
        outputs = ["cls_logits", "centerness_logits", "boxes"]
        info["postprocess"] = {"test": dict(model.test_cfg), "strides": list(model.strides),
                               "num_classes": model.num_classes, "class_names": model.class_names,
                               "cat_ids": model.cat_ids, "input": dict(model.input_cfg),
                               "note": "per level l (H_l = ceil(H / stride_l), P3 first, row-major): sigmoid(cls) > "
                                       "score_thr, top nms_pre, score * sigmoid(centerness), class-aware NMS at "
                                       "iou_threshold, best max_per_img"}
    elif part == "classifier":
        module, tower, size, outputs = Forward(model), model, _image_size(_preprocess(model)), ["logits"]
    elif _is_dual_encoder(model):
        module = ImageEmbedding(_without(model, ("text_encoder",)) if isinstance(model, UniCLModel) else model)
        tower = model.image_encoder if isinstance(model, UniCLModel) else model  # foreign: no dynamic size
        size, outputs = _image_size(_preprocess(model)), ["embeddings"]
    else:
        module, tower, size, outputs = PooledFeatures(model), model, _image_size(_preprocess(model)), ["features"]
    size = tuple(image_size) if image_size else size
    dims: dict[int, Any] = {0: batch}
    unit = None
    if dynamic_size:
        unit = _swin_unit(tower, part)
        low, high = _SIZE_RANGE
        dims[2] = unit[0] * Dim("h", min=low, max=high)
        dims[3] = unit[1] * Dim("w", min=low, max=high)
        if image_size is None:
            size = (unit[0] * low, unit[1] * low)
        elif size[0] % unit[0] or size[1] % unit[1] or size[0] < low * unit[0] or size[1] < low * unit[1]:
            raise ExportError(f"part {part!r}: with a dynamic size the image size must be a multiple of {unit} and at "
                              f"least {low} units, got {tuple(size)}")
    return PartSpec(part, module, ["images"], outputs, (_images(EXAMPLE_BATCH, size),), {"images": dims},
                    lambda b, s: (_images(b, s or size),), size_unit=unit, info=info)


def _preprocess(model: nn.Module) -> dict[str, Any]:
    return dict(getattr(model, "preprocess", None) or model.default_preprocess)


# -- export ---------------------------------------------------------------------------------------------------------


def _dtype(x: torch.Tensor) -> str:
    return str(x.dtype).removeprefix("torch.")


def _shape_names(spec: PartSpec, shape: Sequence[int], axes: dict[int, Any]) -> list[int | str]:
    out: list[int | str] = list(int(v) for v in shape)
    for axis in axes:
        if axis == 0:
            out[0] = "batch"
        else:
            unit = spec.size_unit[axis - 2]
            out[axis] = f"{unit}*{'h' if axis == 2 else 'w'}"
    return out


def _outputs(value) -> tuple[torch.Tensor, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _check_inputs(spec: PartSpec) -> tuple[torch.Tensor, ...]:
    """Inputs of another batch (and, for a dynamic size, another height) than the example's."""
    size = None
    if spec.size_unit is not None:
        h, w = spec.example[0].shape[-2:]
        size = (int(h) + spec.size_unit[0], int(w))
    return spec.make_inputs(EXAMPLE_BATCH + 1, size)


def _run_onnx(path: Path, spec: PartSpec, inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {name: x.numpy() for name, x in zip(spec.input_names, inputs)}
    return session.run(spec.output_names, feed)


@dataclass
class TracedPart:
    """A part traced once by ``trace_part``; ``export_traced`` writes it in any format (trace once, write both).

    Attributes:
        model: the model (CPU float32, eval mode), for the sidecar.
        spec: what was traced (``part_spec``).
        program: the ``torch.export`` program (batch, and with ``dynamic_size`` H and W, dynamic).
        reference: the eager part's outputs on ``spec.example``.
    """

    model: nn.Module
    spec: PartSpec
    program: torch.export.ExportedProgram
    reference: tuple[torch.Tensor, ...]


def trace_part(model: nn.Module, part: str, *, dynamic_size: bool = False,
               image_size: tuple[int, int] | None = None) -> TracedPart:
    """Trace ``model``'s ``part`` with ``torch.export`` (the costly step: seconds for a tiny model, about ten more per
    Swin stage with ``dynamic_size``). Arguments as ``export_part``."""
    model = model.to("cpu", torch.float32).eval()
    spec = part_spec(model, part, dynamic_size=dynamic_size, image_size=image_size)
    dynamic = tuple(spec.dynamic.get(name, {}) for name in spec.input_names)  # positional: names may differ
    with deform_impl(model, "torch"):
        with torch.no_grad():
            reference = _outputs(spec.module(*spec.example))
        program = torch.export.export(spec.module, spec.example, dynamic_shapes=dynamic)
    return TracedPart(model, spec, program, reference)


def export_part(model: nn.Module, part: str, format: str, out: str | Path, *, dynamic_size: bool = False,
                image_size: tuple[int, int] | None = None, opset: int | None = None, optimize: bool = True,
                source: str | None = None, bundle_sha256: str | None = None, check: bool = True) -> ExportResult:
    """Export ``model``'s ``part`` to ``out`` in ``format`` ("torch-export" or "onnx") and write the sidecar.

    Args:
        model: a florence model (or a wrapped foreign dual encoder); moved to CPU float32 eval mode for tracing.
        part: one of ``available_parts(model)``.
        dynamic_size: make H, W dynamic (multiples of the tower's unit; module docstring).
        image_size: (H, W) of the example (default: the preprocessing's); the exported size when not dynamic.
        opset, optimize, source, bundle_sha256, check: as ``export_traced``.

    Returns an ``ExportResult``; raises ``ExportError`` for what a user can fix. ``trace_part`` then ``export_traced``
    per format writes several formats from one trace.
    """
    _check_format(format, dynamic_size)
    traced = trace_part(model, part, dynamic_size=dynamic_size, image_size=image_size)
    return export_traced(traced, format, out, opset=opset, optimize=optimize, source=source,
                         bundle_sha256=bundle_sha256, check=check)


def _check_format(format: str, dynamic_size: bool) -> None:
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if dynamic_size and format != "torch-export":
        raise ExportError("a dynamic image size exports with --format torch-export only (ONNX: a fixed size)")


def export_traced(traced: TracedPart, format: str, out: str | Path, *, opset: int | None = None,
                  optimize: bool = True, source: str | None = None, bundle_sha256: str | None = None,
                  check: bool = True) -> ExportResult:
    """Write a ``trace_part`` result to ``out`` in ``format`` and its sidecar ``out + ".json"``.

    Args:
        opset: ONNX opset (default: torch's).
        optimize: ONNX only: run the ONNX optimizer (constant folding, dead-code removal, rewrites) on the translated
            graph; about a third of the nodes (168 against 486 for the tiny image tower), at roughly twice the
            export time. onnxruntime's own graph optimisations make both run alike; other runtimes read the smaller
            graph more easily. ``False`` writes the direct translation (same outputs).
        source, bundle_sha256: the bundle directory / spelling and its hash, recorded in the sidecar.
        check: run the exported file on another batch size (and height) and record the max abs difference.
    """
    spec, model, reference = traced.spec, traced.model, traced.reference
    _check_format(format, spec.size_unit is not None)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if format == "torch-export":
        torch.export.save(traced.program, str(out))
    else:
        onnx_program = torch.onnx.export(traced.program, dynamo=True, input_names=spec.input_names,
                                         output_names=spec.output_names, opset_version=opset, optimize=optimize,
                                         verbose=False)
        onnx_program.save(str(out))
        opset = next((o.version for o in onnx_program.model_proto.opset_import if o.domain in ("", "ai.onnx")),
                     opset)
    check_record = None
    if check:
        with deform_impl(model, "torch"):
            check_record = _check(out, format, spec)

    inputs = [TensorInfo(n, _shape_names(spec, x.shape, spec.dynamic.get(n, {})), _dtype(x))
              for n, x in zip(spec.input_names, spec.example)]
    outputs = [TensorInfo(n, ["batch", *(int(v) for v in y.shape[1:])], _dtype(y))  # fixed but for the batch
               for n, y in zip(spec.output_names, reference)]
    dims: dict[str, Any] = {"batch": {"min": 1, "max": None}}
    if spec.size_unit is not None:
        dims["h"] = dims["w"] = {"min": _SIZE_RANGE[0], "max": _SIZE_RANGE[1]}
    preprocess = dict(getattr(model, "preprocess", None) or getattr(model, "default_preprocess", None) or {})
    metadata_ = {
        "format": SIDECAR_FORMAT,
        "export_format": format,
        "file": out.name,
        "part": spec.part,
        "architecture": _describe(model),
        "model": None if source is None else str(source),
        "bundle_sha256": bundle_sha256,
        "inputs": [vars(t) for t in inputs],
        "outputs": [vars(t) for t in outputs],
        "dims": dims,
        "preprocess": preprocess,
        **spec.info,
        "opset": opset if format == "onnx" else None,
        "onnx_optimized": optimize if format == "onnx" else None,
        "check": check_record,
        "versions": {"florence": __version__, "torch": torch.__version__, "onnx": _version("onnx"),
                     "onnxscript": _version("onnxscript"), "onnxruntime": _version("onnxruntime")},
    }
    sidecar = out.with_name(out.name + ".json")
    sidecar.write_text(json.dumps(metadata_, indent=2, default=str))
    return ExportResult(out, sidecar, metadata_)


def _check(path: Path, format: str, spec: PartSpec) -> dict[str, Any]:
    """Run the written file on ``_check_inputs`` and compare with the eager part: ``{runtime, inputs,
    max_abs_diff}``."""
    inputs = _check_inputs(spec)
    with torch.no_grad():
        expected = [y.numpy() for y in _outputs(spec.module(*inputs))]
        if format == "torch-export":
            got = [y.numpy() for y in _outputs(torch.export.load(str(path)).module()(*inputs))]
            runtime = f"torch {torch.__version__}"
        else:
            got = _run_onnx(path, spec, inputs)
            runtime = f"onnxruntime {_version('onnxruntime')}"
    diff = max(float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) for a, b in zip(got, expected))
    return {"runtime": runtime, "inputs": {n: list(x.shape) for n, x in zip(spec.input_names, inputs)},
            "max_abs_diff": diff}
