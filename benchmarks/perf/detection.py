"""Detection speed: the DyHead with torchvision's deformable-conv kernel vs ours, detector images/s for training and
inference, and where the time goes (backbone, FPN, DyHead, head, loss / post-processing, optimizer).

Run: ``python -m florence.benchmarks.perf.detection [--device cuda] [--threads 2]`` (defaults: cuda when available,
1 warm-up and 3 timed rounds, 1 + 1 at 800x1333). Three tables:

1. **DyHead alone** on random FPN-shaped levels (P3-P7 of the input size, strides 8-128), ``impl`` "torchvision"
   (``torchvision.ops.deform_conv2d``) vs "torch" (``deform_conv2d_torch``, ``adapters/deform_conv.py``): a training
   step (forward, mean-square loss over the levels, backward) and an inference step (forward without autograd).
   Cases: ``demo`` -- a Fashion-MNIST-sized neck (64 channels, 4 blocks, 128x128 input, batch 16; the recipe
   ``configs/detection/fashion_mnist_dyhead.yaml`` now runs 2 blocks at batch 8); ``coco`` -- 256 channels at
   800x1333 padded to a multiple of 128,
   batch 1, ``--large-dyhead-blocks`` blocks (default 1: every block costs the same, and six blocks with
   torchvision's CPU kernel take minutes). The ratio column is torchvision's time over ours (> 1: ours is faster).
2. **Detector images/s**: a training step (forward, ATSS loss, backward, AdamW step) and inference (``predict``,
   post-processing included) of ``dyhead_atss_coswin_test`` as the demo configures it (64 channels, 4 blocks,
   10 classes, 128x128, batch 16; every ``--impls``) and of ``dyhead_atss_swin_tiny`` (Swin-T, 256 channels,
   6 blocks, 80 classes) at 800x1333 (padded to 896x1408, batch 1, ``--large-impls``). Random weights; the score
   threshold is 0 so that post-processing handles its worst case (1000 candidates per level into NMS) as a trained
   model may, where random weights would leave nothing above the default 0.05. Each image carries 4 random boxes.
3. **Time split** of those steps. The stages run one after the other with the device synchronised between them;
   in the training step, identity autograd nodes at the stage boundaries timestamp the backward pass as the gradient
   crosses them (the engine finishes a later stage's backward before it reaches the boundary), so each stage's row
   is its forward plus its backward. "loss" is ATSS target assignment and the losses; "post-processing" is
   ``ATSSHead.predict`` (top-k, decoding, NMS).

Times are medians over rounds; every round runs each case once, cases interleaved so background load hits them
alike. With 2 threads on a 2-core machine, another busy process makes every parallel region wait (we saw 20x slower
steps for both kernels): measure on a quiet machine. The 800x1333 training step peaks at ~9 GB resident on CPU.
``--test-size`` (coswin_test / 32-channel models everywhere), small ``--large-size`` / batches / rounds make a
seconds-long smoke run.

Measured (CPU, 2 threads, quiet, defaults): DyHead torchvision / ours time: demo train 6.8x, inference 2.8x; coco
train 9.1x, inference 3.4x. Detector 128x128 batch 16: train 25.6 vs 5.4 images/s (4.75x), inference 65 vs 33
(1.96x; post-processing 50 ms of 246); Swin-T 800x1333 (ours): train 0.049 images/s (20.6 s: DyHead 64%, backbone
30%), inference 0.20 images/s (4.9 s: DyHead 56%, backbone 39%).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from florence.adapters.deform_conv import set_deform_impl
from florence.adapters.dyhead import DyHead
from florence.benchmarks.perf.common import (
    add_device_arguments, describe, markdown_table, num, resolve_device, synchronize, write_json,
)
from florence.factory import create_model

TRAIN_STAGES = ("backbone", "fpn", "dyhead", "head", "loss", "optimizer")
INFER_STAGES = ("backbone", "fpn", "dyhead", "head", "post-processing")
STAGES = ("backbone", "fpn", "dyhead", "head", "loss", "post-processing", "optimizer")  # rows of the split table
DEMO = dict(config="dyhead_atss_coswin_test", num_classes=10, channels=64, blocks=4)  # fashion_mnist_dyhead.yaml


def padded(size: Sequence[int], divisor: int) -> tuple[int, int]:
    """(h, w) rounded up to a multiple of ``divisor`` (the detector's batch padding)."""
    return tuple(-(-int(s) // divisor) * divisor for s in size)


def pyramid_sizes(size: Sequence[int], num_levels: int = 5, stride: int = 8) -> list[tuple[int, int]]:
    """FPN level sizes of a (padded) input: ceil(size / stride), then halved (rounding up) per level."""
    h, w = -(-size[0] // stride), -(-size[1] // stride)
    sizes = [(h, w)]
    for _ in range(num_levels - 1):
        h, w = (h + 1) // 2, (w + 1) // 2
        sizes.append((h, w))
    return sizes


def _median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3


# -- 1. DyHead alone ---------------------------------------------------------------------------------------------


@dataclass
class DyHeadRow:
    case: str
    step: str  # "train" or "inference"
    impl: str
    batch: int
    channels: int
    blocks: int
    levels: list[tuple[int, int]]
    ms: float
    ms_min: float


def dyhead_rows(name: str, batch: int, channels: int, blocks: int, size: tuple[int, int], impls: Sequence[str],
                warmup: int, rounds: int, device: torch.device) -> list[DyHeadRow]:
    """Train / inference steps of one DyHead for each ``impl``, interleaved per round."""
    torch.manual_seed(0)
    head = DyHead(channels, num_blocks=blocks).to(device)
    sizes = pyramid_sizes(size)
    levels = [torch.randn(batch, channels, h, w, device=device) for h, w in sizes]

    def train() -> None:
        head.zero_grad(set_to_none=True)
        sum(out.square().mean() for out in head(levels)).backward()

    def inference() -> None:
        with torch.no_grad():
            head(levels)

    steps = {"train": train, "inference": inference}
    times: dict[tuple[str, str], list[float]] = {(s, i): [] for s in steps for i in impls}
    for r in range(warmup + rounds):
        for (step, impl), record in times.items():
            set_deform_impl(head, impl)
            synchronize(device)
            start = time.perf_counter()
            steps[step]()
            synchronize(device)
            if r >= warmup:
                record.append(time.perf_counter() - start)
    return [DyHeadRow(name, step, impl, batch, channels, blocks, sizes, _median_ms(t), min(t) * 1e3)
            for (step, impl), t in times.items()]


# -- 2./3. the detector, stage by stage --------------------------------------------------------------------------


class _Clock:
    """Wall time with the device synchronised first; ``marks`` keeps the latest backward crossing per boundary."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.marks: dict[str, float] = {}

    def now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()


class _BackwardMark(torch.autograd.Function):
    """Identity whose backward records when the gradient reaches it (``clock.marks[name]``, the latest of a
    boundary's tensors: the engine runs the later stage's backward nodes first, they have higher sequence numbers)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, clock: _Clock, name: str) -> torch.Tensor:
        ctx.clock, ctx.name = clock, name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.clock.marks[ctx.name] = max(ctx.clock.marks.get(ctx.name, 0.0), ctx.clock.now())
        return grad, None, None


def _marked(tensors: Sequence[torch.Tensor], clock: _Clock, name: str) -> list[torch.Tensor]:
    return [_BackwardMark.apply(t, clock, name) for t in tensors]


def _backbone_levels(model, images: torch.Tensor) -> list[torch.Tensor]:
    """What ``Detector.features`` feeds the FPN."""
    return model.backbone.forward_intermediates(images, indices=list(model.in_indices), output_fmt="NCHW",
                                                intermediates_only=True)


def train_step(model, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, clock: _Clock
               ) -> dict[str, float]:
    """One training step; seconds per ``TRAIN_STAGES`` (forward + backward of each) and ``total``."""
    t0 = clock.now()
    optimizer.zero_grad(set_to_none=True)
    feats = _marked(_backbone_levels(model, batch["images"]), clock, "backbone")
    t1 = clock.now()
    feats = _marked(model.neck["fpn"](feats), clock, "fpn")
    t2 = clock.now()
    feats = _marked(model.neck["dyhead"](feats), clock, "dyhead")
    t3 = clock.now()
    cls, reg, ctr = (_marked(out, clock, "head") for out in model.head(feats))
    t4 = clock.now()
    losses = model.head.loss(cls, reg, ctr, batch["image_sizes"], batch["boxes"], batch["labels"],
                             pad_divisor=model.input_cfg["size_divisor"])
    total = losses["loss_cls"] + losses["loss_bbox"] + losses["loss_centerness"]
    t5 = clock.now()
    clock.marks.clear()
    total.backward()
    t6 = clock.now()
    optimizer.step()
    t7 = clock.now()
    m = clock.marks  # backward runs loss -> head -> dyhead -> fpn -> backbone
    return {"backbone": (t1 - t0) + (t6 - m["backbone"]), "fpn": (t2 - t1) + (m["backbone"] - m["fpn"]),
            "dyhead": (t3 - t2) + (m["fpn"] - m["dyhead"]), "head": (t4 - t3) + (m["dyhead"] - m["head"]),
            "loss": (t5 - t4) + (m["head"] - t5), "optimizer": t7 - t6, "total": t7 - t0}


@torch.no_grad()
def inference_step(model, batch: dict[str, torch.Tensor], clock: _Clock) -> dict[str, float]:
    """``Detector.predict`` stage by stage; seconds per ``INFER_STAGES`` and ``total``."""
    t = [clock.now()]
    feats = _backbone_levels(model, batch["images"])
    t.append(clock.now())
    feats = model.neck["fpn"](feats)
    t.append(clock.now())
    feats = model.neck["dyhead"](feats)
    t.append(clock.now())
    cls, reg, ctr = model.head(feats)
    t.append(clock.now())
    model.head.predict(cls, reg, ctr, batch["image_sizes"], **model.test_cfg)
    t.append(clock.now())
    split = {stage: b - a for stage, a, b in zip(INFER_STAGES, t, t[1:])}
    return {**split, "total": t[-1] - t[0]}


def synthetic_batch(batch: int, size: tuple[int, int], num_classes: int, divisor: int, device: torch.device,
                    boxes_per_image: int = 4) -> dict[str, torch.Tensor]:
    """Random normalised images of ``size`` zero-padded to ``divisor`` and ``boxes_per_image`` random boxes each."""
    g = torch.Generator().manual_seed(0)
    (h, w), (ph, pw) = size, padded(size, divisor)
    images = torch.zeros(batch, 3, ph, pw)
    images[:, :, :h, :w] = torch.randn(batch, 3, h, w, generator=g)
    corners = torch.rand(batch, boxes_per_image, 2, 2, generator=g) * torch.tensor([w, h])  # B, M, 2 points, (x, y)
    boxes = torch.cat([corners.min(dim=2).values, corners.max(dim=2).values + 8], dim=-1)  # B, M, 4 xyxy
    boxes = torch.minimum(boxes, torch.tensor([w, h, w, h], dtype=boxes.dtype))
    labels = torch.randint(0, num_classes, (batch, boxes_per_image), generator=g)
    data = dict(images=images, image_sizes=torch.tensor([[h, w]] * batch), boxes=boxes, labels=labels)
    return {k: v.to(device) for k, v in data.items()}


@dataclass
class DetectorRow:
    model: str
    input: str  # "HxW" before padding
    batch: int
    impl: str
    train_images_per_s: float
    inference_images_per_s: float
    train_ms: float
    inference_ms: float
    train_split_ms: dict[str, float] = field(default_factory=dict)
    inference_split_ms: dict[str, float] = field(default_factory=dict)


def detector_rows(config: str, overrides: dict, batch: int, size: tuple[int, int], impls: Sequence[str],
                  warmup: int, rounds: int, device: torch.device) -> list[DetectorRow]:
    """Training and inference of one detector config for each ``impl`` (a copy per impl), interleaved per round."""
    torch.manual_seed(0)
    model = create_model(config, test={"score_thr": 0.0}, **overrides).to(device)
    data = synthetic_batch(batch, size, model.num_classes, model.input_cfg["size_divisor"], device)
    clock = _Clock(device)
    runs = {}
    for impl in impls:
        train_model = copy.deepcopy(model).train()
        infer_model = copy.deepcopy(model).eval()
        set_deform_impl(train_model, impl)
        set_deform_impl(infer_model, impl)
        optimizer = torch.optim.AdamW(train_model.parameters(), lr=1e-5)
        runs[impl] = (lambda m=train_model, o=optimizer: train_step(m, data, o, clock),
                      lambda m=infer_model: inference_step(m, data, clock), [], [])
    for r in range(warmup + rounds):
        for train, infer, train_splits, infer_splits in runs.values():
            train_result, infer_result = train(), infer()
            if r >= warmup:
                train_splits.append(train_result)
                infer_splits.append(infer_result)
    rows = []
    for impl, (_, _, train_splits, infer_splits) in runs.items():
        train_ms = {k: _median_ms([s[k] for s in train_splits]) for k in (*TRAIN_STAGES, "total")}
        infer_ms = {k: _median_ms([s[k] for s in infer_splits]) for k in (*INFER_STAGES, "total")}
        rows.append(DetectorRow(config, f"{size[0]}x{size[1]}", batch, impl, batch / train_ms["total"] * 1e3,
                                batch / infer_ms["total"] * 1e3, train_ms.pop("total"), infer_ms.pop("total"),
                                train_ms, infer_ms))
    return rows


# -- the report ---------------------------------------------------------------------------------------------------


def _ratios(rows: list, key: Callable, value: Callable) -> dict[str, float]:
    """``{key: torchvision time / torch time}`` for every key that has both impls."""
    by = {(key(r), r.impl): value(r) for r in rows}
    return {k: by[(k, "torchvision")] / by[(k, "torch")] for k, impl in by if impl == "torch"
            and (k, "torchvision") in by}


def split_table(rows: list[DetectorRow]) -> str:
    lines = []
    for r in rows:
        train_total, infer_total = sum(r.train_split_ms.values()), sum(r.inference_split_ms.values())
        for stage in STAGES:
            tr, inf = r.train_split_ms.get(stage), r.inference_split_ms.get(stage)
            lines.append([r.model, r.input, r.impl, stage,
                          "-" if tr is None else num(tr), "-" if tr is None else f"{100 * tr / train_total:.1f}%",
                          "-" if inf is None else num(inf), "-" if inf is None else f"{100 * inf / infer_total:.1f}%"])
    return markdown_table(["model", "input", "impl", "stage", "train ms", "train %", "inference ms", "inference %"],
                          lines, numeric_from=4)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_device_arguments(parser, threads=2)
    parser.add_argument("--impls", nargs="+", default=["torch", "torchvision"], choices=["torch", "torchvision"],
                        help="deformable-conv kernels compared (DyHead rows and the 128x128 detector)")
    parser.add_argument("--large-impls", nargs="+", default=["auto"], choices=["auto", "torch", "torchvision"],
                        help="kernels of the 800x1333 detector (auto: ours on CPU, torchvision on CUDA)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; medians are reported")
    parser.add_argument("--large-warmup", type=int, default=1, help="untimed rounds of the 800x1333 detector")
    parser.add_argument("--large-rounds", type=int, default=1, help="timed rounds of the 800x1333 detector")
    parser.add_argument("--small-batch", type=int, default=16, help="batch at 128x128 (the demo's)")
    parser.add_argument("--small-size", type=int, nargs=2, default=[128, 128], metavar=("H", "W"))
    parser.add_argument("--large-batch", type=int, default=1)
    parser.add_argument("--large-size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"))
    parser.add_argument("--large-dyhead-blocks", type=int, default=1, help="blocks of the 256-channel DyHead rows")
    parser.add_argument("--skip-large", action="store_true", help="only the 128x128 cases")
    parser.add_argument("--test-size", action="store_true",
                        help="coswin_test / 32-channel models everywhere (a smoke run, not a benchmark)")
    parser.add_argument("--json", type=str, default=None, help="also write the rows and ratios to this file")
    args = parser.parse_args(argv)
    device = resolve_device(parser, args)
    small, large = tuple(args.small_size), tuple(args.large_size)
    demo = dict(DEMO, channels=32, blocks=2) if args.test_size else DEMO
    large_config, large_channels = ("dyhead_atss_coswin_test", 32) if args.test_size else ("dyhead_atss_swin_tiny", 256)

    dyhead = dyhead_rows("demo", args.small_batch, demo["channels"], demo["blocks"], small, args.impls,
                         args.warmup, args.rounds, device)
    if not args.skip_large:
        dyhead += dyhead_rows("coco", args.large_batch, large_channels, args.large_dyhead_blocks, padded(large, 128),
                              args.impls, args.warmup, args.rounds, device)
    demo_overrides = dict(num_classes=demo["num_classes"], neck=dict(channels=demo["channels"],
                                                                     num_blocks=demo["blocks"]),
                          input=dict(scale=[max(small), min(small)], size_divisor=32))
    detector = detector_rows(demo["config"], demo_overrides, args.small_batch, small, args.impls, args.warmup,
                             args.rounds, device)
    if not args.skip_large:
        detector += detector_rows(large_config, {}, args.large_batch, large, args.large_impls, args.large_warmup,
                                  args.large_rounds, device)

    dyhead_ratios = _ratios(dyhead, lambda r: f"dyhead {r.case} {r.step}", lambda r: r.ms)
    detector_ratios = {**_ratios(detector, lambda r: f"detector {r.model} {r.input} train", lambda r: r.train_ms),
                       **_ratios(detector, lambda r: f"detector {r.model} {r.input} inference",
                                 lambda r: r.inference_ms)}
    ratios = {**dyhead_ratios, **detector_ratios}

    print(f"\n{describe(device, args.threads)}; median of {args.rounds} rounds after {args.warmup} warm-up rounds "
          f"({args.large_rounds} after {args.large_warmup} for the {large[0]}x{large[1]} detector)\n")
    print(markdown_table(
        ["case", "step", "impl", "batch", "channels", "blocks", "levels", "ms (median)", "ms (min)"],
        [[r.case, r.step, r.impl, r.batch, r.channels, r.blocks, " ".join(f"{h}x{w}" for h, w in r.levels),
          num(r.ms), num(r.ms_min)] for r in dyhead], numeric_from=7))
    print()
    print(markdown_table(["model", "input", "batch", "impl", "train images/s", "inference images/s", "train ms",
                          "inference ms"],
                         [[r.model, r.input, r.batch, r.impl, num(r.train_images_per_s),
                           num(r.inference_images_per_s), num(r.train_ms), num(r.inference_ms)] for r in detector],
                         numeric_from=4))
    print()
    print(markdown_table(["torchvision / ours (time)", "ratio"], [[k, f"{v:.2f}"] for k, v in ratios.items()],
                         numeric_from=1))
    print()
    print(split_table(detector))
    result = {"dyhead": [asdict(r) for r in dyhead], "detector": [asdict(r) for r in detector], "ratios": ratios,
              "device": describe(device, args.threads), "args": vars(args)}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
