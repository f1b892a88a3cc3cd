"""The ``data:`` config schema: accepted keys and value types of the data section, its sources and ``augment``,
checked without reading any data (``validate_data_config``, ``validate_source_spec``). Both loaders
(``florence.data.loader``, ``florence.data.webdataset_source``) and the engine's tasks use it."""
from __future__ import annotations

import os
from typing import Any, Callable

from florence.data.errors import DataConfigError

# A check takes a value and returns None (fine) or what was expected; validate_data_config prefixes the dotted key.
Check = Callable[[Any], "str | None"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(minimum: int) -> Check:
    return lambda v: None if _is_int(v) and v >= minimum else f"expected an integer >= {minimum}"


def _number(low: float, high: float | None = None) -> Check:
    span = f"in [{low}, {high}]" if high is not None else f">= {low}"
    return lambda v: None if _is_number(v) and low <= v and (high is None or v <= high) else f"expected a number {span}"


def _choice(*options: str) -> Check:
    return lambda v: None if v in options else f"expected one of {', '.join(options)}"


def _optional(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else "expected true or false"


def _path(v: Any) -> str | None:
    return None if isinstance(v, (str, os.PathLike)) and str(v).strip() else "expected a path"


def _text(v: Any) -> str | None:
    return None if isinstance(v, str) and v.strip() else "expected a non-empty string"


def _shards(v: Any) -> str | None:
    if _path(v) is None or (isinstance(v, (list, tuple)) and v and all(_path(u) is None for u in v)):
        return None
    return "expected a shard pattern or a non-empty list of shard paths"


def _templates(v: Any) -> str | None:
    if v is None or _path(v) is None:  # unicl | openai | none | a template file
        return None
    if isinstance(v, (list, tuple)) and v and all(isinstance(t, str) and t.replace("{c}", "{}").count("{}") == 1
                                                 for t in v):
        return None
    return "expected unicl, openai, none, a template file, or a list of templates each with one {} placeholder"


def _class_names(v: Any) -> str | None:
    if _path(v) is None:  # a .txt / .json file
        return None
    if isinstance(v, (list, tuple)) and v and all(_text(n) is None or (isinstance(n, (list, tuple)) and n and all(
            _text(s) is None for s in n)) for n in v):
        return None
    return "expected a class-names file or a non-empty list of names (or of synonym lists)"


def _range_pair(low: float, high: float | None) -> Check:
    def check(v: Any) -> str | None:
        if (isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(x) for x in v)
                and low < v[0] <= v[1] and (high is None or v[1] <= high)):
            return None
        return f"expected [min, max] with {low} < min <= max" + (f" <= {high}" if high is not None else "")
    return check


def _randaugment(v: Any) -> str | None:
    return None if v is None or (isinstance(v, str) and v.startswith("rand")) else \
        "expected a timm RandAugment spec such as rand-m9-mstd0.5, or null"


def _augment(v: Any) -> str | None:
    return None if v is None or isinstance(v, dict) else "expected a mapping of augmentation keys"


# the keys every training stream takes (image-label / caption, detection, VQA, video); each adds its own
STREAM_SCHEMA: dict[str, Check] = {
    "batch_size": _int(1),
    "seed": _int(0),
    "num_workers": _int(0),
    "on_bad_sample": _choice("skip", "raise"),
    "max_bad_retries": _int(0),
    "pin_memory": _bool,
    "prefetch_factor": _optional(_int(1)),
    "run_dir": _optional(_path),
}
CONFIG_SCHEMA: dict[str, Check] = {
    **STREAM_SCHEMA,
    "sources": lambda v: None if isinstance(v, (list, tuple)) and v else "expected a non-empty list of sources",
    "samples_per_epoch": _optional(_int(1)),
    "augment": _augment,
}
AUGMENT_SCHEMA: dict[str, Check] = {
    "randaugment": _randaugment,
    "scale": _range_pair(0.0, 1.0),
    "ratio": _range_pair(0.0, None),
    "hflip": _number(0.0, 1.0),
}
_COMMON_SOURCE: dict[str, Check] = {"type": _text, "name": _text, "weight": _number(0.0)}
SOURCE_SCHEMAS: dict[str, dict[str, Check]] = {  # per source type; "path" is required except for fashion_mnist
    "fashion_mnist": {**_COMMON_SOURCE, "path": _path, "split": _choice("train", "test"), "templates": _templates},
    "image_folder": {**_COMMON_SOURCE, "path": _path, "class_names": _class_names, "templates": _templates},
    "label_table": {**_COMMON_SOURCE, "path": _path, "class_names": _class_names, "root": _path,
                    "templates": _templates},
    "caption_table": {**_COMMON_SOURCE, "path": _path, "root": _path},
    "webdataset": {**_COMMON_SOURCE, "path": _shards, "resampled": _bool, "shuffle_buffer": _int(0),
                   "class_names": _class_names, "templates": _templates},
}


def _check_keys(values: dict, schema: dict[str, Check], key: str) -> None:
    """Every key of ``values`` known to ``schema`` and its value accepted; else :class:`DataConfigError`."""
    for name, value in values.items():
        if name not in schema:
            raise DataConfigError(f"{key}.{name}: unknown key (known: {', '.join(sorted(schema))})")
        problem = schema[name](value)
        if problem is not None:
            raise DataConfigError(f"{key}.{name}: {problem}, got {value!r}")


def validate_source_spec(spec: Any, key: str = "source") -> None:
    """Check one data-source spec (a ``data.sources`` entry, or a task's evaluation source) by its type's accepted
    keys and value types, without reading any data. ``key`` is the dotted name used in the message."""
    if not isinstance(spec, dict):
        raise DataConfigError(f"{key}: expected a mapping with a 'type' key, got {spec!r}")
    kind = spec.get("type")
    if kind not in SOURCE_SCHEMAS:
        raise DataConfigError(f"{key}.type: unknown data source type {kind!r} (known: {', '.join(SOURCE_SCHEMAS)})")
    _check_keys(spec, SOURCE_SCHEMAS[kind], key)
    if kind != "fashion_mnist" and "path" not in spec:
        raise DataConfigError(f"{key}.path: required for source type {kind}")


def validate_data_config(data: Any, key: str = "data") -> None:
    """Check a whole ``data:`` config section without reading any data: top-level keys, every ``data.sources[i]``
    entry by its type's keys and value types, and ``data.augment``.

    Raises :class:`~florence.data.errors.DataConfigError` (a ``FlorenceError`` and ``ValueError``) whose message starts
    with the dotted key, e.g. ``data.sources[0].pth: unknown key (known: ...)`` or ``data.augment.scael: unknown
    key (known: ...)``. ``batch_size`` is optional here (the training engine sets it); ``build_train_loader`` needs it.
    """
    if not isinstance(data, dict):
        raise DataConfigError(f"{key}: expected a mapping, got {data!r}")
    _check_keys(data, CONFIG_SCHEMA, key)
    if "sources" not in data:
        raise DataConfigError(f"{key}.sources: required (a list of data sources)")
    for i, spec in enumerate(data["sources"]):
        validate_source_spec(spec, f"{key}.sources[{i}]")
    kinds = {spec["type"] == "webdataset" for spec in data["sources"]}
    if len(kinds) > 1:
        raise DataConfigError(f"{key}.sources: webdataset sources cannot be mixed with map-style sources")
    if not any(spec.get("weight", 1.0) > 0 for spec in data["sources"]):
        raise DataConfigError(f"{key}.sources: every sampling weight is 0")
    _check_keys(data.get("augment") or {}, AUGMENT_SCHEMA, f"{key}.augment")
