"""Process-group set-up for ``torchrun`` launches, and DDP / FSDP2 wrapping of any model.

One process (no ``WORLD_SIZE`` in the environment, or 1) runs without a process group. Under ``torchrun`` the
default group is initialised from the environment (nccl with CUDA, gloo otherwise) and the model is wrapped in DDP, or
sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``) per unit the model declares (``fsdp_wrap_modules()``:
transformer blocks, towers).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(backend: str | None = None) -> DistEnv:
    """Read ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (set by torchrun) and initialise the default group if needed."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"))
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is true on any rank (all ranks get the same answer)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of ``values`` over all ranks (a copy; the tensor itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    total = values.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)  # gloo has no AVG
    return total / dist.get_world_size()


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The submodules FSDP2 shards one by one (innermost first), as the model declares them with
    ``fsdp_wrap_modules()`` (transformer blocks, then towers); the root is sharded after them."""
    if not hasattr(model, "fsdp_wrap_modules"):
        raise ValueError(f"distributed.strategy=fsdp: {type(model).__name__} does not declare its FSDP units "
                         "(fsdp_wrap_modules()); use distributed.strategy=ddp")
    return list(model.fsdp_wrap_modules())


def wrap_model(model: nn.Module, env: DistEnv, strategy: str) -> nn.Module:
    """DDP or FSDP2 for several processes; the model itself for one."""
    if not env.distributed:
        return model
    if strategy == "ddp":
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        # FSDP2 cannot shard 0-dim parameters (the logit scale): they stay replicated, their gradients are
        # averaged by ``sync_replicated_grads``
        replicated = [p for p in model.parameters() if p.ndim == 0]
        for unit in fsdp_units(model):
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh, ignored_params=set(replicated))
        model._replicated_params = replicated
        return model
    raise ValueError(f"distributed.strategy: expected ddp or fsdp, got {strategy!r}")


def sync_replicated_grads(model: nn.Module) -> None:
    """Average across ranks the gradients of parameters FSDP2 leaves replicated (after the last backward)."""
    for param in getattr(model, "_replicated_params", []):
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)  # gloo has no AVG
            param.grad /= dist.get_world_size()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Turn gradient synchronisation across ranks on or off for the backward passes inside (DDP ``no_sync``, FSDP2
    ``set_requires_gradient_sync``); a no-op for a plain model."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield
