"""Weights on disk, for any model: reading a state dict without unpickling, and the report of a load.

``read_state_dict(src)`` reads ``.safetensors`` (safetensors) or ``.pth/.pt/.bin`` (``torch.load(weights_only=True)``)
and unwraps ``model`` / ``state_dict`` / ``module``; ``LoadReport`` says what a load did. Layout converters for foreign
checkpoints (``florence.backbone.convert``) build on both.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file

from florence.errors import FlorenceError, first_line


class WeightsError(FlorenceError, KeyError, ValueError):
    """A weights file that cannot be read as plain tensors, or whose keys / shapes do not fit the model (strict load);
    the message names the file and the keys."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass
class LoadReport:
    """What a weight load did. Lists are sorted names in the model's (= timm's) layout; checkpoint keys are named
    after prefix stripping and the Microsoft -> timm mapping.

    - ``loaded``: taken from the checkpoint (possibly resized).
    - ``missing``: model keys the checkpoint lacks (a strict load fails if any is not newly initialised on purpose).
    - ``unexpected``: checkpoint keys the model has no place for (a strict load fails on any).
    - ``newly_initialized``: model keys that keep their fresh initialisation on purpose (CoSwin conv embeddings).
    - ``resized``: relative-position tables interpolated to the model's window size.
    - ``skipped``: checkpoint keys dropped on purpose (buffers, classifier, Swin embeddings, other towers).
    - ``inflated``: loaded after a change of dimension (a 2D kernel or bias table made 3D for the video tower).
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    newly_initialized: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    inflated: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"loaded {len(self.loaded)}, missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
            f"newly initialised {len(self.newly_initialized)}, resized {len(self.resized)}, skipped {len(self.skipped)}"
            + (f", inflated {len(self.inflated)}" if self.inflated else "")
        ]
        for name in ("missing", "unexpected", "newly_initialized", "resized", "skipped", "inflated"):
            keys = getattr(self, name)
            if keys:  # grouped by module: "patch_embed.proj (weight, bias)"
                groups: dict[str, list[str]] = {}
                for key in keys:
                    module, _, leaf = key.rpartition(".")
                    groups.setdefault(module, []).append(leaf)
                shown = [f"{m} ({', '.join(leaves)})" if m else ", ".join(leaves) for m, leaves in groups.items()]
                more = f", ... (+{len(shown) - 12} modules)" if len(shown) > 12 else ""
                lines.append(f"  {name}: " + ", ".join(shown[:12]) + more)
        return "\n".join(lines)


def read_state_dict(src: str | Path | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A flat ``name -> tensor`` dict from a mapping or a file, unwrapping ``model`` / ``state_dict`` / ``module``.

    ``.safetensors`` is read with safetensors; anything else with ``torch.load(weights_only=True)``.
    """
    if isinstance(src, Mapping):
        state = dict(src)
        origin = "state dict"
    else:
        path = Path(src)
        origin = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # UnpicklingError and friends: refuse, naming the file, in one line
                found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
                reason = f"it holds a pickled {found.group(1)}" if found else first_line(e)
                raise WeightsError(
                    f"{path}: not a plain tensor checkpoint ({reason}); florence reads weights with torch.load("
                    "weights_only=True) and never unpickles objects. If you trust the file, extract its tensors once: "
                    "torch.save(torch.load(path, weights_only=False)['model'], 'weights.pth')") from None
    while True:
        wrapper = next((w for w in ("model", "state_dict", "module") if isinstance(state.get(w), Mapping)), None)
        if wrapper is None:
            break
        state = dict(state[wrapper])
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{origin}: entries that are not tensors: {bad[:5]}")
    return state


