"""Prompt templates for image-label data (SPEC §3.1).

An image-label sample becomes text through a template drawn per sample: UniCL trains with
``"{}."`` plus the 80 CLIP ImageNet templates (81 in all, :data:`UNICL_TEMPLATES`); users can pass a
template file instead (one template per line, each with exactly one ``{}``).

Class names are cleaned as UniCL does before formatting (commas dropped, ``+`` becomes a space); a class
given as a list of names uses one synonym drawn per sample.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

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


def load_templates(path: str | Path) -> tuple[str, ...]:
    """Read a template file: one template per line, each containing ``{}`` exactly once.

    Blank lines and lines starting with ``#`` are ignored. Raises ``ValueError`` naming the file and line
    for a template without (or with several) placeholders, and for a file with no templates.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"template file not found: {path}")
    templates = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.count("{}") != 1:
            raise ValueError(f"{path}:{lineno}: a template needs exactly one '{{}}' placeholder, got {line!r}")
        templates.append(line)
    if not templates:
        raise ValueError(f"{path}: no templates found")
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
        for t in spec:
            if not isinstance(t, str) or t.count("{}") != 1:
                raise ValueError(f"a template needs exactly one '{{}}' placeholder, got {t!r}")
        return tuple(spec)
    return load_templates(spec)


def clean_class_name(name: str) -> str:
    """UniCL's class-name cleanup: drop commas, turn ``+`` into a space (then collapse runs of spaces)."""
    return " ".join(name.replace(",", "").replace("+", " ").split())


def make_prompt(class_name: ClassName, templates: Sequence[str], rng: random.Random) -> str:
    """One prompt for one sample: a template and (for a list of names) a synonym drawn from ``rng``."""
    template = templates[rng.randrange(len(templates))]
    if not isinstance(class_name, str):
        class_name = class_name[rng.randrange(len(class_name))]
    return template.format(clean_class_name(class_name))
