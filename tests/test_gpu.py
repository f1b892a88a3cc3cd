"""CUDA paths (marked ``gpu``; each skips with a reason on a machine without CUDA): bf16 autocast against fp32, fp16
with the GradScaler and bf16 through the public engine, fused SDPA against eager attention (and the fused kernel
actually used), NCCL DDP in one process.

Run them with ``pytest -m gpu tests/test_gpu.py`` (``benchmarks/perf/gpu_check.sh`` runs them with the perf scripts).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

import florence
from florence.backbone.loss import UniCLLoss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

CUDA = torch.device("cuda")
PREPROCESS = {"input_size": [3, 28, 28], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic",
              "crop_pct": 1.0}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in fp32: one number for a whole tensor, robust to single near-zero entries."""
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm()).item()


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    """Every parameter's gradient, concatenated (zeros where a parameter got none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float()
                      for p in model.parameters()])


def image_tower_step(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None):
    """Pooled output and flat gradient of a fixed linear function of it, under autocast to ``dtype`` (None: fp32)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        out = model(x)  # B, num_features
    weights = torch.linspace(-1, 1, out.numel(), device=x.device).view_as(out)
    (out.float() * weights).sum().backward()
    return out.detach().float(), flat_grad(model)


def dual_encoder_step(model: torch.nn.Module, batch: dict, dtype: torch.dtype | None):
    """UniCL loss and flat gradient of the dual encoder under autocast to ``dtype`` (None: fp32)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(batch["images"].device.type, dtype=dtype, enabled=dtype is not None):
        out = model(images=batch["images"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss = UniCLLoss()(out.image_embeds.float(), out.text_embeds.float(), batch["labels"], out.logit_scale.float())
    loss.backward()
    return loss.detach(), flat_grad(model)


def dual_encoder_batch(model: torch.nn.Module, device: torch.device, n: int = 8) -> dict[str, torch.Tensor]:
    """Random images and token ids (the last 3 tokens of every other row padded), labels in 4 classes."""
    g = torch.Generator().manual_seed(0)
    size = model.preprocess["input_size"][-1]
    mask = torch.ones(n, 16, dtype=torch.long)
    mask[::2, -3:] = 0
    return {"images": torch.randn(n, 3, size, size, generator=g).to(device),
            "input_ids": torch.randint(3, model.text_encoder.vocab_size, (n, 16), generator=g).to(device),
            "attention_mask": mask.to(device), "labels": (torch.arange(n) % 4).to(device)}


def first_linear_dtype(model: torch.nn.Module, run) -> torch.dtype:
    """The output dtype of the model's first ``nn.Linear`` during ``run()`` (is autocast really on?)."""
    seen = []
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    handle = linear.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


# -- bf16 autocast ------------------------------------------------------------------------------------------------


def test_coswin_bf16_autocast_matches_fp32():
    torch.manual_seed(0)
    model = florence.create_model("coswin_test").to(CUDA).eval()  # eval: no dropout; gradients still flow
    x = torch.randn(4, 3, 56, 56, device=CUDA)
    out32, grad32 = image_tower_step(model, x, None)
    assert first_linear_dtype(model, lambda: image_tower_step(model, x, torch.bfloat16)) == torch.bfloat16
    out16, grad16 = image_tower_step(model, x, torch.bfloat16)
    assert torch.isfinite(out16).all() and torch.isfinite(grad16).all()
    assert relative_error(out16, out32) < 3e-2  # bf16 keeps 8 bits of mantissa: ~0.4% per rounding
    assert relative_error(grad16, grad32) < 5e-2


def test_unicl_dual_encoder_bf16_autocast_matches_fp32():
    torch.manual_seed(0)
    model = florence.create_model("unicl_test").to(CUDA).eval()
    batch = dual_encoder_batch(model, CUDA)
    loss32, grad32 = dual_encoder_step(model, batch, None)
    loss16, grad16 = dual_encoder_step(model, batch, torch.bfloat16)
    assert torch.isfinite(grad16).all()
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-2)
    assert relative_error(grad16, grad32) < 5e-2


# -- the engine in fp16 (GradScaler) and bf16 ----------------------------------------------------------------------




@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("task", ["unicl", "classify"])
def test_engine_trains_on_cuda_in_half_precision(shapes, tmp_path, task, dtype):
    """``run(cfg)`` with ``precision.dtype`` fp16 (autocast + GradScaler) or bf16 on the GPU: every loss finite and
    the last three lower than the first three (16 steps on 32 images, the UniCL dual encoder or the classifier;
    on the CPU in bf16 the last three are 35-45% lower, with room for a few steps the GradScaler skips at first)."""
    from florence.engine.config import config_from_dict
    from florence.engine.train import run

    if task == "unicl":
        model = {"name": "unicl_test", "train_tokenizer_vocab": 300, "context_length": 16,
                 "overrides": {"preprocess": PREPROCESS}}
    else:
        model = {"name": "coswin_test", "overrides": {"preprocess": PREPROCESS}}
    cfg = config_from_dict({
        "task": task, "model": model, "data": {"sources": [{"type": "image_folder", "path": str(shapes)}]},
        "optim": {"lr": 1e-3, "batch_size": 16}, "schedule": {"steps": 16, "warmup_steps": 2},
        "precision": {"dtype": dtype}, "checkpoint": {"every_steps": None},
        "output": {"dir": str(tmp_path / "run"), "log_every": 1, "progress": False, "tensorboard": False},
    })
    torch.cuda.reset_peak_memory_stats()
    losses = [loss for _, loss in sorted(run(cfg).losses.items())]
    assert torch.cuda.max_memory_allocated() > 0  # the engine ran on the GPU
    assert len(losses) == 16 and all(math.isfinite(v) for v in losses), losses
    assert sum(losses[-3:]) < sum(losses[:3]), losses


# -- fused attention -----------------------------------------------------------------------------------------------


def test_fused_sdpa_matches_eager_and_uses_the_efficient_kernel():
    """``fused_attn=True`` (``F.scaled_dot_product_attention``) equals the eager softmax attention on CUDA, forward and
    backward. Swin attention always carries the relative-position bias (plus the shift mask) as a float mask, which
    the flash kernel does not take; the memory-efficient kernel does, bias gradient included. Restricting SDPA to
    that kernel (``sdpa_kernel``) makes PyTorch raise instead of falling back to the math path, so passing proves the
    fused kernel runs, in fp32 and in bf16."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = florence.create_model("coswin_test").to(CUDA).eval()
    x = torch.randn(4, 3, 56, 56, device=CUDA)
    model.set_fused_attn(False)
    eager_out, eager_grad = image_tower_step(model, x, None)
    eager_out16, eager_grad16 = image_tower_step(model, x, torch.bfloat16)
    model.set_fused_attn(True)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        fused_out, fused_grad = image_tower_step(model, x, None)
        fused_out16, fused_grad16 = image_tower_step(model, x, torch.bfloat16)
    torch.testing.assert_close(fused_out, eager_out, rtol=1e-4, atol=1e-4)
    assert relative_error(fused_grad, eager_grad) < 1e-4
    assert relative_error(fused_out16, eager_out16) < 3e-2  # both bf16, different summation order
    assert relative_error(fused_grad16, eager_grad16) < 5e-2


# -- NCCL DDP ------------------------------------------------------------------------------------------------------


def test_nccl_ddp_in_one_process():
    """DDP over an NCCL group of one process: the gradient after the all-reduce equals a plain replica's, and a few
    AdamW steps of the dual encoder run (DDP raises on the second step if the model leaves a parameter unused)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = florence.create_model("unicl_test").to(CUDA).eval()
        replica = copy.deepcopy(model)
        ddp = DistributedDataParallel(model, device_ids=[torch.cuda.current_device()])
        batch = dual_encoder_batch(model, CUDA)
        _, reduced = dual_encoder_step(ddp, batch, None)
        _, plain = dual_encoder_step(replica, batch, None)
        assert relative_error(reduced, plain) < 1e-5
        optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
        losses = []
        for _ in range(4):
            loss, _ = dual_encoder_step(ddp, batch, torch.bfloat16)
            optimizer.step()
            losses.append(loss.item())
        assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    finally:
        dist.destroy_process_group()
