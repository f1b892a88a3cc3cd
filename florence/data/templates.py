"""Prompt templates for image-label data (SPEC §3.1).

An image-label sample becomes text through a template drawn per sample: UniCL trains with
``"{}."`` plus the 80 CLIP ImageNet templates (81 in all, :data:`UNICL_TEMPLATES`); users can pass a
template file instead (:func:`load_templates`: a JSON list, or one template per line; ``{}`` or ``{c}`` marks the
class name).

:func:`format_prompt` is the one place a prompt is built, for training and evaluation alike: the class name is
cleaned as UniCL does (commas dropped, ``+`` becomes a space); a class given as a list of synonyms uses its first name
(evaluation), while :func:`make_prompt` draws one synonym per sample (training).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

from florence.data.errors import DataFileError, DataNotFound

# The 80 ImageNet prompt templates of OpenAI's CLIP notebook (same order as open_clip's
# OPENAI_IMAGENET_TEMPLATES), written with a "{}" placeholder.
OPENAI_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# UniCL's training list: "{}." (the bare class name) followed by the 80 CLIP templates.
UNICL_TEMPLATES: tuple[str, ...] = ("{}.",) + OPENAI_IMAGENET_TEMPLATES

ClassName = str | Sequence[str]


def _check_template(template: object, where: str) -> str:
    """``template`` with ``{c}`` written as ``{}``; ``ValueError`` naming ``where`` unless it has exactly one."""
    if not isinstance(template, str):
        raise DataFileError(f"{where}: a template must be a string, got {template!r}")
    template = template.replace("{c}", "{}")
    if template.count("{}") != 1:
        raise DataFileError(f"{where}: a template needs exactly one '{{}}' (or '{{c}}') placeholder, got {template!r}")
    return template


def load_templates(path: str | Path) -> tuple[str, ...]:
    """Read a template file: a JSON list of strings (``.json``), or one template per line.

    In a line file, blank lines and lines starting with ``#`` are ignored. ``{}`` or ``{c}`` marks the class name
    (returned as ``{}``), exactly once per template. Raises :class:`~florence.data.errors.DataFileError` (a
    ``ValueError``) naming the file and line (or list index) of a bad template, and for a file with no templates;
    :class:`~florence.data.errors.DataNotFound` for a missing file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFound(f"template file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFileError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(items, list):
            raise DataFileError(f"{path}: expected a JSON list of template strings")
        templates = [_check_template(t, f"{path}[{i}]") for i, t in enumerate(items)]
    else:
        templates = [
            _check_template(line.strip(), f"{path}:{lineno}")
            for lineno, line in enumerate(text.splitlines(), start=1)
            if line.strip() and not line.strip().startswith("#")
        ]
    if not templates:
        raise DataFileError(f"{path}: no templates found")
    return tuple(templates)


def resolve_templates(spec: str | Path | Sequence[str] | None) -> tuple[str, ...]:
    """Templates from a config value: ``None`` or ``"unicl"`` -> :data:`UNICL_TEMPLATES`, ``"openai"`` -> the 80
    CLIP templates, ``"none"`` -> the bare class name ``("{}",)``, a list -> those templates, anything else -> a
    template file path."""
    if spec is None or spec == "unicl":
        return UNICL_TEMPLATES
    if spec == "openai":
        return OPENAI_IMAGENET_TEMPLATES
    if spec == "none":
        return ("{}",)
    if isinstance(spec, (list, tuple)):
        return tuple(_check_template(t, f"templates[{i}]") for i, t in enumerate(spec))
    return load_templates(spec)


def clean_class_name(name: str) -> str:
    """UniCL's class-name cleanup: drop commas, turn ``+`` into a space (then collapse runs of spaces)."""
    return " ".join(name.replace(",", "").replace("+", " ").split())


def format_prompt(template: str, class_name: ClassName) -> str:
    """``template`` with its ``{}`` (or ``{c}``) placeholder replaced by the cleaned class name.

    A list of synonyms uses its first name (deterministic, for evaluation); training draws one with
    :func:`make_prompt`.
    """
    if not isinstance(class_name, str):
        if not class_name:
            raise DataFileError("a class needs at least one name")
        class_name = class_name[0]
    return template.replace("{c}", "{}").replace("{}", clean_class_name(class_name))


def make_prompt(class_name: ClassName, templates: Sequence[str], rng: random.Random) -> str:
    """One prompt for one sample: a template and (for a list of names) a synonym drawn from ``rng``."""
    template = templates[rng.randrange(len(templates))]
    if not isinstance(class_name, str):
        class_name = class_name[rng.randrange(len(class_name))]
    return format_prompt(template, class_name)
