"""Training throughput and peak memory of a UniCL step, beside open_clip on the same machine in the same run.

    python -m florence.benchmarks.perf.train [--device cuda] [--models tiny coswin_tiny] [--steps 3] [--threads N]

Rows:

- ``florence <model> <dtype>``: one optimizer step (forward, UniCL loss, backward, AdamW) of the ``unicl_test``
  ("tiny") or ``unicl_coswin_tiny`` dual encoder, fp32 and bf16 autocast;
- ``open_clip <model> <dtype>``: open_clip's ``CLIP`` + ``ClipLoss`` + AdamW on a model of similar size built from a
  config (no pretrained weights): for tiny a 7-layer ViT of width 128 + a 2-layer text transformer of width 64; for
  coswin_tiny timm's Swin-T (``swin_tiny_patch4_window7_224``, random init) + a 12-layer width-768 text transformer
  (RoBERTa-base shaped);
- ``florence tiny grad-cache B=<n>``: one gradient-cached step at global batch 256 and 2048 with the same chunk size
  (peak memory should stay nearly flat), and the plain step at 256 for contrast.

Every row runs in a fresh process (``multiprocessing`` spawn; ``--in-process`` for a smoke run) so the peak-memory
numbers do not mix. Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the growth of the process's peak
resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) over its resident size after building the model,
inputs and optimizer (so it counts activations, gradients and optimizer state, not the weights or the Python
runtime).
Images/s is the global batch divided by the median step time over ``--steps`` timed steps after one warm-up step
(on CUDA each timed step is bracketed by synchronisations). The warm-up step's FLOPs are counted with
``FlopCounterMode`` (forward + backward as executed: the gradient-cached step's re-forward counts too; AdamW's
element-wise work is not counted); achieved FLOP/s is that count over the median step time, and its fraction of the
device's matmul peak in the row's dtype is measured in this run, before and after the rows (``common.py``).
Input ids are random tokens of full context length (77); images are random at the model's input size.
Small ``--steps``, ``--batch-tiny``, ``--cache-batches`` (none: no grad-cache rows) and ``--peak-size`` make a smoke
run.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import traceback
from dataclasses import asdict, dataclass
from queue import Empty

import torch

from florence.benchmarks.perf.common import (
    add_device_arguments, count_flops, default_peak_size, describe, markdown_table, measure_peaks, num, peak_line,
    resolve_device, si, timed, write_json,
)

MIB = 1024 * 1024


@dataclass
class Row:
    name: str
    dtype: str
    params_m: float
    batch: int
    images_per_s: float
    peak_mib: float
    gflop_per_step: float  # counted on the warm-up step
    flops_per_s: float
    peak_fraction: float = 0.0  # of the matmul peak in ``dtype`` (filled by ``main``, which measures the peak)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_bytes(device: torch.device, baseline: int) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - baseline
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline


def _florence_model(name: str, device: torch.device):
    import florence

    model = florence.create_model({"tiny": "unicl_test", "coswin_tiny": "unicl_coswin_tiny"}[name])
    return model.to(device), model.text_encoder.vocab_size, model.preprocess["input_size"][-1]


def _open_clip_model(name: str, device: torch.device):
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    if name == "tiny":
        vision = CLIPVisionCfg(layers=7, width=128, head_width=32, patch_size=8, image_size=56)
        text = CLIPTextCfg(context_length=77, vocab_size=512, width=64, heads=4, layers=2)
        embed_dim, size, vocab = 32, 56, 512
    else:
        vision = CLIPVisionCfg(timm_model_name="swin_tiny_patch4_window7_224", timm_model_pretrained=False,
                               timm_pool="avg", timm_proj="linear", image_size=224)
        text = CLIPTextCfg(context_length=77, vocab_size=49408, width=768, heads=12, layers=12)
        embed_dim, size, vocab = 512, 224, 49408
    return open_clip.CLIP(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text).to(device), vocab, size


def _inputs(batch: int, size: int, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "images": torch.randn(batch, 3, size, size, generator=g).to(device),
        "input_ids": torch.randint(3, vocab, (batch, 77), generator=g).to(device),
        "attention_mask": torch.ones(batch, 77, dtype=torch.long).to(device),
        "labels": torch.arange(batch).to(device),
    }


def _florence_step(model, inputs, precision, optimizer, chunk: int | None):
    """The engine's step with the UniCL task (what ``florence train`` runs), on fixed inputs."""
    from florence.adapters.pretrain import UniCLOptions, UniCLTask
    from florence.engine.config import RunConfig
    from florence.engine.step import StepContext, train_step

    ctx = StepContext(model=model, task=UniCLTask(RunConfig(), UniCLOptions()), optimizer=optimizer,
                      scheduler=_NoSchedule(),
                      precision=precision, device=inputs["images"].device, clip_grad_norm=None, grad_cache_chunk=chunk)
    return lambda: train_step(ctx, [inputs])


class _NoSchedule:
    def step(self) -> None:
        pass


def _open_clip_step(model, inputs, precision, optimizer):
    import open_clip

    loss_fn = open_clip.ClipLoss()

    def step():
        with precision.autocast():
            image, text, scale = model(inputs["images"], inputs["input_ids"])
        loss = loss_fn(image.float(), text.float(), scale.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def measure(library: str, model_name: str, dtype: str, batch: int, steps: int, threads: int, device: str,
            chunk: int | None = None) -> Row:
    """One row, in this process (``main`` calls it through ``_in_subprocess`` unless ``--in-process``)."""
    from florence.engine.precision import build_precision

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    build = _florence_model if library == "florence" else _open_clip_model
    model, vocab, size = build(model_name, device)
    model.train()
    inputs = _inputs(batch, size, vocab, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    precision = build_precision(dtype, device)
    if library == "florence":
        step = _florence_step(model, inputs, precision, optimizer, chunk)
    else:
        step = _open_clip_step(model, inputs, precision, optimizer)
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else _rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    flops = count_flops(step)  # the warm-up step (allocator, optimizer state), its FLOPs counted
    times = [timed(step, device) for _ in range(steps)]
    seconds = statistics.median(times)
    name = f"{library} {model_name} {dtype}" + (f" grad-cache chunk={chunk}" if chunk else "")
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return Row(name=name, dtype=dtype, params_m=params, batch=batch, images_per_s=batch / seconds,
               peak_mib=_peak_bytes(device, baseline) / MIB, gflop_per_step=flops / 1e9, flops_per_s=flops / seconds)


def _worker(queue, kwargs):
    try:
        queue.put((True, measure(**kwargs)))
    except BaseException:  # the parent waits on the queue: send the failure, never leave it waiting
        queue.put((False, traceback.format_exc()))
        raise


def _in_subprocess(**kwargs) -> Row:
    """``measure(**kwargs)`` in a fresh spawned process; its failure (or death) is a RuntimeError here."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(queue, kwargs))
    proc.start()
    while True:
        try:
            ok, value = queue.get(timeout=1.0)
            break
        except Empty:
            if not proc.is_alive() and queue.empty():
                raise RuntimeError(f"the row {kwargs} died with exit code {proc.exitcode}") from None
    proc.join()
    if not ok:
        raise RuntimeError(f"the row {kwargs} failed:\n{value}")
    return value


def markdown(rows: list[Row], ratios: dict[str, dict[str, float]]) -> str:
    """The table; ``ratios[name]`` holds a florence row's images/s and FLOP/s over its open_clip twin's."""
    header = ["run", "params (M)", "batch", "images/s", "peak memory (MiB)", "GFLOP/step", "FLOP/s", "% of matmul peak",
              "florence / open_clip images/s", "florence / open_clip FLOP/s"]
    body = []
    for r in rows:
        ratio = ratios.get(r.name, {})
        body.append([r.name, f"{r.params_m:.1f}", r.batch, num(r.images_per_s), f"{r.peak_mib:.0f}",
                     num(r.gflop_per_step), si(r.flops_per_s), f"{100 * r.peak_fraction:.1f}%",
                     f"{ratio['images_per_s']:.2f}" if ratio else "", f"{ratio['flops_per_s']:.2f}" if ratio else ""])
    return markdown_table(header, body, numeric_from=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_arguments(parser, threads=torch.get_num_threads())
    parser.add_argument("--models", nargs="+", default=["tiny", "coswin_tiny"], choices=["tiny", "coswin_tiny"])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row (after one warm-up step)")
    parser.add_argument("--batch-tiny", type=int, default=64)
    parser.add_argument("--batch-coswin-tiny", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=32, help="gradient-cache chunk size")
    parser.add_argument("--cache-batches", nargs="*", type=int, default=[256, 2048],
                        help="global batches of the gradient-cache rows (none: skip those rows)")
    parser.add_argument("--peak-size", type=int, default=None,
                        help="matmul size for the peak measurement (default 2048 on CPU, 8192 on CUDA)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the rows in this process, not one fresh process each (a smoke run: the peak memory "
                             "figures then carry over from row to row)")
    parser.add_argument("--json", type=str, default=None, help="also write the rows, ratios and peaks to this file")
    args = parser.parse_args(argv)
    device = resolve_device(parser, args)
    if "fp16" in args.dtypes and device.type != "cuda":
        parser.error("--dtypes fp16 needs a CUDA device (fp16 autocast + GradScaler)")
    peak_size = args.peak_size or default_peak_size(device)
    peak_dtypes = ["fp32", *args.dtypes]  # the gradient-cache rows are fp32
    peaks = measure_peaks(device, peak_dtypes, peak_size)
    common = dict(steps=args.steps, threads=args.threads, device=str(device))
    measure_row = measure if args.in_process else _in_subprocess

    rows, ratios = [], {}
    for model in args.models:
        batch = args.batch_tiny if model == "tiny" else args.batch_coswin_tiny
        for dtype in args.dtypes:
            ours = measure_row(library="florence", model_name=model, dtype=dtype, batch=batch, **common)
            theirs = measure_row(library="open_clip", model_name=model, dtype=dtype, batch=batch, **common)
            ratios[ours.name] = {"images_per_s": ours.images_per_s / theirs.images_per_s,
                                 "flops_per_s": ours.flops_per_s / theirs.flops_per_s}
            rows += [ours, theirs]
            print(f"{ours.name}: {ours.images_per_s:.1f} img/s; {theirs.name}: {theirs.images_per_s:.1f} img/s",
                  flush=True)
    if args.cache_batches:
        plain = measure_row(library="florence", model_name="tiny", dtype="fp32", batch=min(args.cache_batches),
                            **{**common, "steps": 1})
        plain.name += " (no grad cache)"
        rows.append(plain)
    for batch in args.cache_batches:
        rows.append(measure_row(library="florence", model_name="tiny", dtype="fp32", batch=batch, chunk=args.chunk,
                                **{**common, "steps": 1}))
        print(f"grad cache B={batch}: {rows[-1].peak_mib:.0f} MiB", flush=True)
    peaks = measure_peaks(device, peak_dtypes, peak_size, previous=peaks)  # before and after: the better
    for row in rows:
        row.peak_fraction = row.flops_per_s / peaks[row.dtype]
    print(f"\nUniCL training step, {describe(device, args.threads)}")
    print(peak_line(peaks, peak_size) + "\n")
    print(markdown(rows, ratios))
    write_json(args.json, {"rows": [asdict(r) for r in rows], "ratios": ratios,
                           "peak_gflops": {k: v / 1e9 for k, v in peaks.items()},
                           "device": describe(device, args.threads), "args": vars(args)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
