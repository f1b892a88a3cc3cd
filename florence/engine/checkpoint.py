"""Training checkpoints: save every N steps and at the end, atomically, keep the last K; resume exactly.

Layout of ``<run_dir>/checkpoints/step_<N>/``:

- ``meta.json``: step and trainer counters (plain JSON);
- ``state.pt``: model, optimizer, scheduler, grad-scaler (and weight-EMA) state dicts as plain tensors / numbers, written with
  ``torch.save`` and read back with ``weights_only=True`` (nothing is unpickled); with FSDP2 instead a
  ``torch.distributed.checkpoint`` directory ``sharded/`` written by all ranks (each saves its own shards);
- ``rank<r>.pt``: this rank's RNG states (python, numpy, torch, CUDA) and data position (the loader's
  ``state_dict()``: ``{"sampler": ...}`` for map-style sources, see :mod:`florence.data.mixing`; ``{"webdataset":
  ...}`` for shards: per DataLoader worker the shard, offset, shuffle-buffer content and mixer draws after the last
  batch handed to training, see :mod:`florence.data.webdataset_source`).

A checkpoint is written into ``.tmp_step_<N>`` and renamed (``os.replace``) once every rank has finished, so a
``step_*`` directory is always complete; a run killed while saving leaves only a temporary directory, ignored and
removed by the next save.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from florence.engine.distributed import DistEnv, barrier, is_fsdp, unwrap

_PREFIX = "step_"


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as plain tuples / tensors."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _training_state(model: nn.Module, optimizer, scheduler, scaler, ema: nn.Module | None = None) -> dict[str, Any]:
    state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    if ema is not None:
        state["ema"] = ema.state_dict()
    return state


def _save_sharded(path: Path, model: nn.Module, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path / "sharded"))


def _load_sharded(path: Path, model: nn.Module, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(path / "sharded"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def save_checkpoint(
    run_dir: str | Path,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler | None,
    data_state: Any,
    counters: dict[str, Any],
    env: DistEnv,
    keep_last: int,
    ema: nn.Module | None = None,
) -> Path:
    """Write ``step_<step>`` (all ranks call this), then delete all but the last ``keep_last`` checkpoints."""
    root = checkpoint_root(run_dir)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f".tmp_{_PREFIX}{step:08d}"
    if env.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    if is_fsdp(model):
        _save_sharded(tmp, model, optimizer)
        rest = {"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None}
        if env.is_main:
            torch.save(rest, tmp / "state.pt")
    elif env.is_main:
        torch.save(_training_state(model, optimizer, scheduler, scaler, ema), tmp / "state.pt")
    torch.save({"rng": rng_state(), "data": data_state}, tmp / f"rank{env.rank}.pt")
    barrier()
    if env.is_main:
        meta = {"step": step, "world_size": env.world_size, "sharded": is_fsdp(model), **counters}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    barrier()
    return final


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler | None,
    env: DistEnv,
    ema: nn.Module | None = None,
) -> tuple[dict[str, Any], Any]:
    """Restore everything saved by ``save_checkpoint``; return ``(meta, data_state)`` (data state of this rank).

    RNG states are restored last, so the resumed run draws the same numbers as the uninterrupted one.
    """
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path}: not a training checkpoint (no meta.json)")
    meta = json.loads(meta_file.read_text())
    if meta["world_size"] != env.world_size:
        raise ValueError(
            f"{path}: saved with {meta['world_size']} processes, resuming with {env.world_size}; "
            "resume with the same number of processes (the per-rank data position and RNG states depend on it)"
        )
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    if meta["sharded"]:
        if not is_fsdp(model):
            raise ValueError(f"{path}: sharded (FSDP) checkpoint; resume with distributed.strategy=fsdp")
        _load_sharded(path, model, optimizer)
    else:
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if ema is not None:
        if "ema" not in state:
            raise ValueError(f"{path}: saved without an EMA of the weights; resume with optim.ema_decay=null")
        ema.load_state_dict(state["ema"])
    rank_state = torch.load(path / f"rank{env.rank}.pt", map_location="cpu", weights_only=True)
    set_rng_state(rank_state["rng"])
    return meta, rank_state["data"]
