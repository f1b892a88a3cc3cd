"""UniCL loss: CLIP parity, the SPEC §3.2 formula with duplicate labels, and 2-process gather with gradients."""
from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from florence.backbone.loss import UniCLLoss, unicl_loss


def _embeds(n: int, d: int, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    v = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    return u, v


def _reference_loss(u: torch.Tensor, v: torch.Tensor, labels: list[int], s: float) -> float:
    """SPEC §3.2 written out per row and per column with the sets P(i) and Q(j), mean instead of sum."""
    n = len(labels)
    z = [[s * float(u[i] @ v[j]) for j in range(n)] for i in range(n)]
    i2t = 0.0
    for i in range(n):
        p_i = [k for k in range(n) if labels[k] == labels[i]]
        log_norm = math.log(sum(math.exp(z[i][j]) for j in range(n)))
        i2t -= sum(z[i][k] - log_norm for k in p_i) / len(p_i)
    t2i = 0.0
    for j in range(n):
        q_j = [k for k in range(n) if labels[k] == labels[j]]
        log_norm = math.log(sum(math.exp(z[i][j]) for i in range(n)))
        t2i -= sum(z[k][j] - log_norm for k in q_j) / len(q_j)
    return i2t / n + t2i / n


def test_distinct_labels_equal_twice_open_clip_loss():
    from open_clip.loss import ClipLoss

    u, v = _embeds(8, 16, seed=0, dtype=torch.float32)
    scale = torch.tensor(1 / 0.07)
    ours = UniCLLoss()(u, v, torch.arange(8) * 3 + 5, scale)
    theirs = ClipLoss()(u, v, scale)
    torch.testing.assert_close(ours, 2 * theirs, rtol=1e-6, atol=1e-6)


def test_duplicate_labels_match_per_row_formula():
    u, v = _embeds(7, 5, seed=1)
    labels = [3, 1, 3, 0, 1, 3, 9]
    s = 4.5
    ours = UniCLLoss()(u, v, torch.tensor(labels), torch.tensor(s, dtype=torch.float64))
    assert ours.item() == pytest.approx(_reference_loss(u, v, labels, s), rel=1e-6)


def test_duplicates_differ_from_clip_loss():
    """The targets matter: the same logits with a shared label give a different loss than with distinct labels."""
    u, v = _embeds(6, 5, seed=2)
    logits = 3.0 * u @ v.t()
    assert not torch.isclose(unicl_loss(logits, torch.tensor([0, 0, 1, 2, 3, 4])), unicl_loss(logits, torch.arange(6)))


def test_unicl_loss_gradcheck():
    u, v = _embeds(5, 4, seed=3)
    logits = (6.0 * u @ v.t()).requires_grad_(True)
    labels = torch.tensor([2, 0, 2, 1, 0])
    assert torch.autograd.gradcheck(lambda z: unicl_loss(z, labels), (logits,))


def test_low_precision_logits_give_float32_loss():
    u, v = _embeds(6, 8, seed=4, dtype=torch.float32)
    labels = torch.tensor([0, 1, 1, 2, 3, 3])
    ref = UniCLLoss()(u, v, labels, torch.tensor(20.0))
    low = UniCLLoss()(u.bfloat16(), v.bfloat16(), labels, torch.tensor(20.0))
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, rtol=5e-2, atol=5e-2)


def test_bad_inputs_raise():
    u, v = _embeds(4, 3, seed=5, dtype=torch.float32)
    with pytest.raises(ValueError, match="labels"):
        UniCLLoss()(u, v, torch.arange(3), 1.0)
    with pytest.raises(ValueError, match="text_embeds"):
        UniCLLoss()(u, v[:3], torch.arange(4), 1.0)
    with pytest.raises(TypeError, match="integer"):
        unicl_loss(u @ v.t(), torch.zeros(4))
    with pytest.raises(ValueError, match="square"):
        unicl_loss(u @ v[:3].t(), torch.arange(4))


# -- 2-process gather ------------------------------------------------------------------------------------------

_WORLD = 2
_SIZES = [3, 2]  # unequal local batches exercise the padding path
_LABELS = [4, 1, 7, 4, 1]  # duplicates across the two ranks


class _ToyDualEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(6, 4)
        self.text = nn.Linear(5, 4)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, x, t):
        return F.normalize(self.image(x), dim=-1), F.normalize(self.text(t), dim=-1), self.logit_scale.exp()


def _global_batch():
    g = torch.Generator().manual_seed(1)
    n = sum(_SIZES)
    return torch.randn(n, 6, generator=g), torch.randn(n, 5, generator=g), torch.tensor(_LABELS)


def _single_process_reference():
    x, t, labels = _global_batch()
    model = _ToyDualEncoder()
    u, v, s = model(x, t)
    u.retain_grad()
    v.retain_grad()
    loss = UniCLLoss()(u, v, labels, s)
    loss.backward()
    return loss.detach(), u.grad, v.grad, {n: p.grad for n, p in model.named_parameters()}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=_WORLD)
    try:
        start = sum(_SIZES[:rank])
        local = slice(start, start + _SIZES[rank])
        x, t, labels = _global_batch()
        model = nn.parallel.DistributedDataParallel(_ToyDualEncoder())
        u, v, s = model(x[local], t[local])
        u.retain_grad()
        v.retain_grad()
        loss = UniCLLoss()(u, v, labels[local], s)
        loss.backward()  # DDP averages the parameter gradients over the ranks here
        result = dict(loss=loss.detach(), u_grad=u.grad, v_grad=v.grad,
                      params={n: p.grad for n, p in model.module.named_parameters()})
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gather_matches_single_process(tmp_path):
    # spawn, not fork: earlier tests in this process may have started autograd / compile worker threads, which a
    # forked child cannot use
    context = mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=_WORLD,
                                 start_method="spawn", join=False)
    deadline = time.monotonic() + 300  # a hang guard only; the workers finish in about a second
    while not context.join(timeout=5):  # True once every worker has exited (raises if one failed)
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("distributed workers did not finish")
    ref_loss, ref_u_grad, ref_v_grad, ref_params = _single_process_reference()
    for rank in range(_WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        start = sum(_SIZES[:rank])
        local = slice(start, start + _SIZES[rank])
        torch.testing.assert_close(got["loss"], ref_loss)
        # every rank computes the global loss, so the gathered backward sums W equal contributions per shard
        torch.testing.assert_close(got["u_grad"], _WORLD * ref_u_grad[local])
        torch.testing.assert_close(got["v_grad"], _WORLD * ref_v_grad[local])
        # ... and DDP's average over W ranks gives exactly the single-process parameter gradient
        assert set(got["params"]) == set(ref_params)
        for name, grad in got["params"].items():
            torch.testing.assert_close(grad, ref_params[name], msg=f"parameter {name}")
