"""A reference detector for the Fashion-MNIST detection canvases: torchvision's ``FCOS`` on a small from-scratch CNN
+ FPN (P3-P7), trained for a fixed wall-time budget, evaluated with :func:`florence.adapters.coco_eval
.evaluate_detections`.

    python -m florence.benchmarks.fcos_baseline --data DIR --minutes 30 --out fcos.json

``DIR`` is a :mod:`florence.benchmarks.detection_canvas` output (``train/``, ``test/``,
``annotations/instances_{train,test}.json``). The model: a 4-stage conv-BN-ReLU backbone (strides 4/8/16/32, widths
w, 2w, 4w, 8w; two 3x3 convs per stage, the first strided), torchvision's ``FeaturePyramidNetwork`` on strides 8/16/32
with ``LastLevelP6P7`` (P3-P7, strides 8..128, as torchvision's ``fcos_resnet50_fpn``) and the stock ``FCOSHead``
(4 convs per branch, GroupNorm 32, focal loss + GIoU + centerness). ``GeneralizedRCNNTransform`` inside ``FCOS``
resizes to ``min_size = max_size = canvas`` (a no-op on square canvases) and normalises with the ImageNet mean/std.
Classes are the annotation file's categories in id order, as contiguous labels 0..K-1 (torchvision's FCOS has no
background channel: unmatched points get all-zero focal targets).

Training: AdamW (no weight decay on biases and norm weights), batch ``--batch-size``, random horizontal flips, linear
warm-up over ``--warmup-iters`` steps then cosine decay over the wall-time budget (the schedule's progress is elapsed /
budget, so it ends at ~0 whatever the speed), gradient-norm clipping; stops at ``--minutes`` (or ``--max-iters``).
Evaluation: score threshold 0.05, NMS 0.6, at most 100 detections per image, COCO box metrics on the test split.

Writes ``--out`` (JSON): ``mAP`` (AP at IoU .50:.95), ``AP50``, ``metrics`` (everything ``evaluate_detections``
returns), ``settings`` (the options), ``num_params``, ``iterations``, ``images_seen``, ``train_seconds``,
``eval_seconds``, ``final_loss``, ``versions``; and prints mAP / AP50.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from florence.adapters.coco_eval import evaluate_detections, load_annotations, to_coco_detections
from florence.engine.metrics import library_versions
from florence.errors import FlorenceError


class BaselineError(FlorenceError, ValueError):
    """A missing canvas folder or an invalid option; the message names it."""


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallConvFPN(nn.Module):
    """Backbone + FPN for ``FCOS``: (B, 3, H, W) -> OrderedDict of 5 maps (B, fpn_channels, H/s, W/s), s = 8..128."""

    def __init__(self, width: int = 32, fpn_channels: int = 128):
        super().__init__()
        chans = (width, 2 * width, 4 * width, 8 * width)  # strides 4, 8, 16, 32
        self.stem = nn.Sequential(_conv_bn_relu(3, width // 2, 2), _conv_bn_relu(width // 2, width, 2))
        self.stages = nn.ModuleList(
            nn.Sequential(_conv_bn_relu(cin, cout, 2), _conv_bn_relu(cout, cout, 1))
            for cin, cout in zip(chans[:-1], chans[1:]))
        self.fpn = FeaturePyramidNetwork(list(chans[1:]), fpn_channels,
                                         extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels))
        self.out_channels = fpn_channels  # FCOS reads this

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.stem(x)  # B, w, H/4, W/4
        feats = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)  # B, 2^(i+1) w, H/2^(i+3), W/2^(i+3)
            feats[f"c{i + 3}"] = x
        return self.fpn(feats)  # p3..p5 from c3..c5, then p6, p7


def build_model(num_classes: int, canvas: int = 128, width: int = 32, fpn_channels: int = 128) -> FCOS:
    """FCOS over :class:`SmallConvFPN`; the transform keeps ``canvas``-sized images at their size."""
    return FCOS(SmallConvFPN(width, fpn_channels), num_classes=num_classes, min_size=canvas, max_size=canvas,
                score_thresh=0.05, nms_thresh=0.6, detections_per_img=100)


class Canvases:
    """A canvas split: ``images[i]`` (3, H, W) float in [0, 1] and its target dict(boxes (n, 4) xyxy, labels (n,)
    contiguous), read lazily from ``folder`` and a COCO annotation file."""

    def __init__(self, annotations: Path, folder: Path):
        data, _ = load_annotations(annotations)
        self.cat_ids = sorted(cat["id"] for cat in data["categories"])
        label_of = {cat_id: k for k, cat_id in enumerate(self.cat_ids)}
        self.images = sorted(data["images"], key=lambda img: img["id"])
        self.folder = folder
        per_image: dict[int, list] = {img["id"]: [] for img in self.images}
        for ann in data["annotations"]:
            if not ann.get("iscrowd", 0):
                per_image[ann["image_id"]].append(ann)
        self.targets = []
        for img in self.images:
            anns = per_image[img["id"]]
            xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
            boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)  # n, 4 xyxy
            labels = torch.tensor([label_of[a["category_id"]] for a in anns], dtype=torch.int64)
            self.targets.append({"boxes": boxes, "labels": labels})

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> torch.Tensor:
        path = self.folder / self.images[i]["file_name"]
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0  # H, W, 3
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()  # 3, H, W


def _hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {"boxes": boxes, "labels": target["labels"]}


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(model: FCOS, data: Canvases, *, seconds: float, batch_size: int, lr: float, weight_decay: float,
          warmup_iters: int, seed: int, device: torch.device, max_iters: int | None = None,
          log_every: int = 50) -> dict:
    """Train until ``seconds`` of wall time (or ``max_iters`` steps) have passed; returns counters."""
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start, it, seen, loss_value = time.monotonic(), 0, 0, float("nan")
    order = torch.randperm(len(data), generator=gen)
    cursor = 0
    while time.monotonic() - start < seconds and (max_iters is None or it < max_iters):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(data), generator=gen), 0
        batch = order[cursor:cursor + batch_size].tolist()
        cursor += batch_size
        flips = torch.rand(len(batch), generator=gen) < 0.5
        images, targets = [], []
        for i, flip in zip(batch, flips.tolist()):
            image, target = data.image(i), data.targets[i]
            image, target = _hflip(image, target) if flip else (image, target)
            images.append(image.to(device))
            targets.append({k: v.to(device) for k, v in target.items()})
        progress = min(1.0, (time.monotonic() - start) / seconds)
        scale = min(1.0, (it + 1) / max(1, warmup_iters)) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        losses = model(images, targets)  # dict: classification, bbox_regression, bbox_ctrness
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        it, seen, loss_value = it + 1, seen + len(batch), loss.item()
        if log_every and it % log_every == 0:
            parts = " ".join(f"{k} {v.item():.3f}" for k, v in losses.items())
            print(f"it {it} {time.monotonic() - start:.0f}s lr {lr * scale:.2e} loss {loss_value:.3f} ({parts})",
                  flush=True)
    return {"iterations": it, "images_seen": seen, "train_seconds": time.monotonic() - start,
            "final_loss": loss_value}


@torch.no_grad()
def predict(model: FCOS, data: Canvases, batch_size: int, device: torch.device) -> list[dict]:
    """COCO results of ``model`` on every image of ``data``."""
    model.eval()
    results = []
    for begin in range(0, len(data), batch_size):
        idx = range(begin, min(begin + batch_size, len(data)))
        outputs = model([data.image(i).to(device) for i in idx])  # boxes already in original-image pixels
        ids = [data.images[i]["id"] for i in idx]
        results += to_coco_detections([{k: v.cpu() for k, v in o.items()} for o in outputs], ids, data.cat_ids)
    return results


def run(args: argparse.Namespace) -> dict:
    """Build, train, evaluate; returns (and writes to ``args.out``) the result record."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data_dir = Path(args.data)
    splits = {}
    for split in ("train", "test"):
        ann, folder = data_dir / "annotations" / f"instances_{split}.json", data_dir / split
        if not ann.is_file() or not folder.is_dir():
            raise BaselineError(f"{data_dir}: missing {ann} or {folder} (write canvases with "
                                "python -m florence.benchmarks.detection_canvas --out DIR)")
        splits[split] = Canvases(ann, folder)
    train_data, test_data = splits["train"], splits["test"]
    canvas = int(train_data.images[0]["height"])
    device = torch.device(args.device)
    model = build_model(len(train_data.cat_ids), canvas, args.width, args.fpn_channels).to(device)
    counters = train(model, train_data, seconds=args.minutes * 60, batch_size=args.batch_size, lr=args.lr,
                     weight_decay=args.weight_decay, warmup_iters=args.warmup_iters, seed=args.seed, device=device,
                     max_iters=args.max_iters, log_every=args.log_every)
    start = time.monotonic()
    detections = predict(model, test_data, args.batch_size, device)
    metrics = evaluate_detections(data_dir / "annotations" / "instances_test.json", detections)
    record = {"mAP": metrics["AP"], "AP50": metrics["AP50"], "metrics": metrics,
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "num_params": sum(p.numel() for p in model.parameters()), "canvas": canvas, **counters,
              "eval_seconds": time.monotonic() - start, "num_detections": len(detections),
              "versions": library_versions()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    return record


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m florence.benchmarks.fcos_baseline",
                                description="Train and evaluate torchvision FCOS on the Fashion-MNIST canvases.")
    p.add_argument("--data", required=True, type=Path, help="detection_canvas output folder")
    p.add_argument("--out", required=True, type=Path, help="result JSON")
    p.add_argument("--minutes", type=float, default=30.0, help="training wall-time budget")
    p.add_argument("--max-iters", type=int, default=None, help="stop after this many steps if sooner")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-iters", type=int, default=100)
    p.add_argument("--width", type=int, default=32, help="backbone width of the first stage (stages w, 2w, 4w, 8w)")
    p.add_argument("--fpn-channels", type=int, default=128, help="FPN / head channels (a multiple of 32)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: leave torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50, help="print the loss every N steps (0: never)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.fpn_channels % 32 or args.width < 2 or args.minutes <= 0 or args.batch_size < 1:
        print("fcos_baseline: need --fpn-channels a multiple of 32 (GroupNorm 32 in FCOSHead), --width >= 2, "
              "--minutes > 0, --batch-size >= 1", file=sys.stderr)
        return 2
    try:
        record = run(args)
    except FlorenceError as err:
        print(f"fcos_baseline: {err}", file=sys.stderr)
        return 2
    print(f"FCOS baseline: mAP {record['mAP']:.4f} AP50 {record['AP50']:.4f} ({record['iterations']} iterations, "
          f"{record['train_seconds']:.0f}s, {record['num_params'] / 1e6:.2f}M params) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
