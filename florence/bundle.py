"""Checkpoint bundles: a directory that rebuilds a model without pickle.

Layout written by ``save_pretrained(model, dir)``::

    dir/
      config.json        {"format": "florence-bundle/1", "architecture": name, "library_version": ..., "model": {...}}
      model.safetensors  the state dict
      preprocess.json    {"input_size": [3, H, W], "mean": [...], "std": [...], "interpolation": ..., "crop_pct": ...}
      ...                extra files the architecture writes (``save_bundle_files``), e.g. tokenizer/ of a dual encoder
      manifest.json      {"format": ..., "files": {relative path: sha256}}

``from_pretrained(dir)`` verifies every file against the manifest first, refuses a bundle without preprocessing, a
missing file or a hash mismatch (``BundleError`` naming the file), rebuilds the model from ``config.json`` and loads
the weights strictly from safetensors. Nothing is unpickled.

The architecture name selects the model class (``florence.registry.register_architecture``); the class rebuilds itself
from the ``model`` section (``from_bundle_config``), so this module knows no model. An architecture no installed module
registers is a ``BundleError`` naming it.

``from_pretrained`` and ``bundle_sha256`` also take a model source spelling ``SCHEME:REST`` that an installed module
registers (``florence.registry.register_source``): ``open_clip:ARCH:WEIGHTS`` and ``hf:DIR`` (florence.backbone.
foreign) load another library's weights as they are; their hash is the source's (weights files + configuration). A
directory of that name, if one exists, is still read as a bundle.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from florence import __version__
from florence.errors import FlorenceError
from florence.registry import (ModelSource, UnknownNameError, find_source, get_architecture, get_entrypoint,
                               source_spellings)

BUNDLE_FORMAT = "florence-bundle/1"
REQUIRED_FILES = ("config.json", "model.safetensors", "preprocess.json")
PREPROCESS_KEYS = ("input_size", "mean", "std", "interpolation")


class BundleError(FlorenceError, ValueError):
    """A bundle directory that cannot be trusted or read; the message names the path."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _model_source(spec: str | Path) -> tuple[ModelSource, str] | None:
    """The registered source of a ``SCHEME:REST`` spelling (not an existing directory), else None."""
    if Path(spec).is_dir():
        return None
    return find_source(str(spec))


def bundle_sha256(directory: str | Path) -> str:
    """One hash for a whole bundle: the SHA-256 of its manifest (which lists every file's SHA-256); for a model source
    spelling (``open_clip:...``, ``hf:...``) the source's own hash of its weights files and configuration."""
    found = _model_source(directory)
    if found is not None:
        source, rest = found
        return source.sha256(rest)
    manifest = Path(directory) / "manifest.json"
    if not manifest.is_file():
        verify_bundle(directory)  # the BundleError that says what is wrong
    return sha256_file(manifest)


def _describe(model: nn.Module) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(architecture, model config, preprocessing) of a model ``save_pretrained`` can write."""
    architecture = getattr(type(model), "architecture", None)
    if architecture is None:
        raise TypeError(f"{type(model).__name__} is not a registered architecture (florence.registry."
                        "register_architecture); cannot describe it in a bundle")
    preprocess = getattr(model, "preprocess", None) or getattr(model, "default_preprocess", None)
    return architecture, model.bundle_config(), dict(preprocess or {})


def check_preprocess(preprocess: Any, where: str) -> dict[str, Any]:
    """``preprocess`` if it is a JSON object with the required keys, else ``BundleError`` naming ``where``."""
    if not isinstance(preprocess, dict):
        raise BundleError(f"{where}: preprocessing must be a JSON object")
    missing = [k for k in PREPROCESS_KEYS if k not in preprocess]
    if missing:
        raise BundleError(f"{where}: preprocessing lacks {missing}; florence refuses to guess it")
    return preprocess


def save_pretrained(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model`` as a bundle into ``directory`` (replaced atomically if it exists). Returns the path."""
    from safetensors.torch import save_model

    directory = Path(directory)
    architecture, config, preprocess = _describe(model)
    check_preprocess(preprocess, str(directory))
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        header = {"format": BUNDLE_FORMAT, "architecture": architecture, "library_version": __version__}
        (tmp / "config.json").write_text(json.dumps({**header, "model": config}, indent=2))
        (tmp / "preprocess.json").write_text(json.dumps(preprocess, indent=2))
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if hasattr(model, "save_bundle_files"):
            model.save_bundle_files(tmp)  # e.g. the tokenizer of a dual encoder
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {"format": BUNDLE_FORMAT, "files": {p.relative_to(tmp).as_posix(): sha256_file(p) for p in files}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def verify_bundle(directory: str | Path) -> dict[str, Any]:
    """Check the manifest and every hash; return the parsed manifest or raise ``BundleError`` naming the file."""
    directory = Path(directory)
    if not directory.is_dir():
        scheme, colon, _ = str(directory).partition(":")
        hint = (f" (nor a model source: {scheme!r} is not one of {', '.join(source_spellings())})"
                if colon and scheme.isidentifier() else "")
        raise BundleError(f"{directory}: not a bundle directory{hint}")
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path}: missing; a bundle without a manifest is refused")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise BundleError(f"{manifest_path}: unreadable manifest ({e})") from None
    for required in REQUIRED_FILES:
        if required not in files:
            raise BundleError(f"{directory / required}: not listed in the manifest")
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}
    unlisted = sorted(present - set(files) - {"manifest.json"})
    if unlisted:
        raise BundleError(f"{directory / unlisted[0]}: present in the bundle but not in its manifest")
    for rel, digest in files.items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise BundleError(f"{manifest_path}: entry {rel!r} points outside the bundle")
        path = directory / rel
        if not path.is_file():
            raise BundleError(f"{path}: listed in the manifest but missing")
        if sha256_file(path) != digest:
            raise BundleError(f"{path}: SHA-256 mismatch with the manifest (file changed or corrupt)")
    return manifest


def read_bundle_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """The verified weights of a bundle (safetensors; no pickle)."""
    from safetensors.torch import load_file

    verify_bundle(directory)
    return load_file(str(Path(directory) / "model.safetensors"))


def from_pretrained(directory: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model from a verified bundle and load its weights strictly. Returns it in eval mode.

    ``directory`` may also be a model source spelling (``open_clip:ARCH:WEIGHTS``, ``hf:DIR``; module docstring)."""
    from safetensors.torch import load_model

    found = _model_source(directory)
    if found is not None:
        source, rest = found
        return source.load(rest).to(map_location).eval()
    directory = Path(directory)
    verify_bundle(directory)
    config = json.loads((directory / "config.json").read_text())
    if config.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{directory / 'config.json'}: unknown bundle format {config.get('format')!r}")
    preprocess = check_preprocess(json.loads((directory / "preprocess.json").read_text()), str(directory / "preprocess.json"))
    try:
        cls = get_architecture(config.get("architecture"))
    except UnknownNameError as err:
        raise BundleError(f"{directory / 'config.json'}: {err}") from None
    model = cls.from_bundle_config(config["model"], preprocess, directory)
    missing, unexpected = load_model(model, str(directory / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise BundleError(
            f"{directory / 'model.safetensors'}: does not match config.json: missing {sorted(missing)[:10]}, "
            f"unexpected {sorted(unexpected)[:10]}"
        )
    return model.to(map_location).eval()


class BundleMixin:
    """Gives a registered architecture ``save_pretrained(dir)``; ``florence.from_pretrained(dir)`` reads it back.

    The class provides ``bundle_config()`` and ``from_bundle_config(config, preprocess, directory)`` (see
    ``florence.registry``); a model made by ``florence.create_model`` from a registered name gets the defaults below:
    its config is that name and its overrides, and it rebuilds through ``create_model``.
    """

    florence_config: dict[str, Any]  # {"name": registered model name, "overrides": {...}}; set by create_model
    class_names: list[str] | None = None  # label names of a classifier head, kept in the bundle

    def bundle_config(self) -> dict[str, Any]:
        spec = getattr(self, "florence_config", None)
        if spec is None:
            raise TypeError(f"{type(self).__name__} was not built by florence.create_model; cannot describe it in a "
                            "bundle")
        config = dict(spec)
        if self.class_names is not None:
            config["class_names"] = list(self.class_names)
        return config

    @classmethod
    def from_bundle_config(cls, config: dict[str, Any], preprocess: dict[str, Any] | None,
                           directory: Path | None) -> nn.Module:
        overrides = dict(config.get("overrides", {}))
        model = get_entrypoint(config["name"])(**overrides)
        model.florence_config = {"name": config["name"], "overrides": overrides}
        model.class_names = config.get("class_names")
        if preprocess is not None:
            model.preprocess = dict(preprocess)
        return model

    def save_pretrained(self, directory: str | Path) -> Path:
        return save_pretrained(self, directory)
