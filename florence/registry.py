"""The library's registries, filled at each definition site (timm style) and found through entry points.

- **Model names** (``@register_model``): name -> a function that builds the model from keyword overrides
  (``create_model("coswin_tiny", window_size=12)``).
- **Architectures** (``@register_architecture("unicl")`` on a model class): how a bundle's ``config.json`` rebuilds
  a model. The class implements ``bundle_config(self) -> dict`` (JSON-able) and the classmethod
  ``from_bundle_config(config, preprocess, directory) -> nn.Module`` (``directory`` is the verified bundle, for extra
  files such as a tokenizer; None when building from a named JSON config); optionally ``save_bundle_files(self,
  directory)`` to write those extra files.
- **Tasks** (``@register_task("classify")`` on a ``florence.engine.task.Task`` subclass): what ``florence train``
  runs for a config's ``task:`` key.
- **Model sources** (``register_source("open_clip", load=..., sha256=..., spelling=...)``): a spelling
  ``SCHEME:REST`` that ``florence.from_pretrained`` / ``bundle_sha256`` accept besides a bundle directory, for weights
  another library reads (``open_clip:ViT-B-32:/path/weights.pt``, ``hf:/path/dir``). ``load(rest)`` builds the model,
  ``sha256(rest)`` hashes what defines it (weights files and configuration), so the core knows no model class.

The core never imports the modules that define models or tasks. They announce themselves as Python entry points of
the distribution (``pyproject.toml``: groups ``florence.models`` and ``florence.tasks``, each entry a module whose
import registers its names); the first lookup imports them. A third-party package adds its own models and tasks the
same way, or a config names a task class directly as ``package.module:ClassName``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable

from florence.errors import FlorenceError

MODEL_GROUP = "florence.models"
TASK_GROUP = "florence.tasks"

_ENTRYPOINTS: dict[str, Callable] = {}
_ARCHITECTURES: dict[str, type] = {}
_TASKS: dict[str, type] = {}
_SOURCES: dict[str, "ModelSource"] = {}
_LOADED: set[str] = set()


class UnknownNameError(FlorenceError, KeyError):
    """A model, architecture or task name that no installed module registers."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def load_plugins(group: str) -> None:
    """Import every module announced under the entry-point ``group`` (once per process)."""
    if group in _LOADED:
        return
    _LOADED.add(group)
    found = entry_points(group=group)
    if not found:
        raise FlorenceError(f"no {group} entry points are installed: the package metadata is stale (an old "
                            "*.egg-info in the working directory?); reinstall with `pip install -e .`")
    for ep in found:
        ep.load()


def _register(table: dict, kind: str, name: str, obj) -> None:
    if name in table and table[name] is not obj:
        raise ValueError(f"{kind} name {name!r} registered twice ({table[name]!r} and {obj!r})")
    table[name] = obj


# -- model names ------------------------------------------------------------------------------------------------


def register_model(fn: Callable) -> Callable:
    """Register ``fn`` under its own ``__name__``; the function builds the model from keyword overrides."""
    _register(_ENTRYPOINTS, "model", fn.__name__, fn)
    return fn


def get_entrypoint(name: str) -> Callable:
    load_plugins(MODEL_GROUP)
    try:
        return _ENTRYPOINTS[name]
    except KeyError:
        raise UnknownNameError(f"unknown model {name!r}; florence.list_models() gives the known names") from None


def registered_names() -> list[str]:
    load_plugins(MODEL_GROUP)
    return sorted(_ENTRYPOINTS)


# -- architectures ----------------------------------------------------------------------------------------------


def register_architecture(name: str) -> Callable[[type], type]:
    """Class decorator: ``name`` is written into bundles of this class and rebuilds them."""

    def decorate(cls: type) -> type:
        for method in ("bundle_config", "from_bundle_config"):
            if not callable(getattr(cls, method, None)):
                raise TypeError(f"architecture {name!r}: {cls.__name__} lacks {method}()")
        _register(_ARCHITECTURES, "architecture", name, cls)
        cls.architecture = name
        return cls

    return decorate


def get_architecture(name: str) -> type:
    load_plugins(MODEL_GROUP)
    try:
        return _ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(_ARCHITECTURES)) or "none"
        raise UnknownNameError(f"unknown architecture {name!r} (installed: {known}); is the package that defines "
                               "it installed?") from None


def architecture_names() -> list[str]:
    load_plugins(MODEL_GROUP)
    return sorted(_ARCHITECTURES)


# -- tasks ------------------------------------------------------------------------------------------------------


def register_task(name: str) -> Callable[[type], type]:
    """Class decorator for a ``florence.engine.task.Task`` subclass: ``task: name`` in a run config selects it."""

    def decorate(cls: type) -> type:
        _register(_TASKS, "task", name, cls)
        cls.name = name
        return cls

    return decorate


def get_task(name: str) -> type:
    """A task class by registered name, or by ``package.module:ClassName``."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise UnknownNameError(f"task {name!r}: cannot import it ({err})") from None
    load_plugins(TASK_GROUP)
    try:
        return _TASKS[name]
    except KeyError:
        known = ", ".join(sorted(_TASKS)) or "none"
        raise UnknownNameError(f"unknown task {name!r} (known: {known}, or package.module:ClassName)") from None


def task_names() -> list[str]:
    load_plugins(TASK_GROUP)
    return sorted(_TASKS)


# -- model sources ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """A model spelled ``SCHEME:REST`` instead of a bundle directory.

    Attributes:
        scheme: the prefix before the first ``:`` (``"open_clip"``, ``"hf"``).
        load: ``REST -> model`` (an ``nn.Module`` with ``preprocess``), weights loaded.
        sha256: ``REST -> hex digest`` of what defines the model (weights files' content, configuration).
        spelling: how ``REST`` is written, for messages (``"open_clip:ARCH[:WEIGHTS]"``).
    """

    scheme: str
    load: Callable[[str], Any]
    sha256: Callable[[str], str]
    spelling: str


def register_source(scheme: str, *, load: Callable[[str], Any], sha256: Callable[[str], str],
                    spelling: str) -> ModelSource:
    """Register the model source ``scheme`` (``florence.from_pretrained("SCHEME:REST")`` calls ``load(REST)``)."""
    if not scheme.isidentifier():
        raise ValueError(f"model source scheme {scheme!r} must be an identifier")
    source = ModelSource(scheme, load, sha256, spelling)
    if scheme in _SOURCES and _SOURCES[scheme] != source:
        raise ValueError(f"model source {scheme!r} registered twice ({_SOURCES[scheme]!r} and {source!r})")
    _SOURCES[scheme] = source
    return source


def find_source(spec: str) -> tuple[ModelSource, str] | None:
    """``(source, REST)`` when ``spec`` is ``SCHEME:REST`` with a registered scheme, else None."""
    scheme, colon, rest = str(spec).partition(":")
    if not colon or not scheme.isidentifier():
        return None
    load_plugins(MODEL_GROUP)
    source = _SOURCES.get(scheme)
    return (source, rest) if source is not None else None


def source_spellings() -> list[str]:
    """How each registered model source is spelled (``open_clip:ARCH[:WEIGHTS]``, ``hf:DIR``)."""
    load_plugins(MODEL_GROUP)
    return [_SOURCES[k].spelling for k in sorted(_SOURCES)]
