"""Image classification on a pre-trained tower: the tower's own timm-style head (``reset_classifier``).

``create_model("image_classifier", backbone="runs/demo/pretrain/final", num_classes=10, class_names=[...])`` takes the
image tower of a bundle (a dual encoder's image encoder or an image-tower bundle, with the bundle's preprocessing) and
attaches a freshly initialised linear classifier (``head.fc``): ``model(images)`` returns logits ``(B, num_classes)``.
The result is an image tower like any other (architecture ``image_tower``): its bundle config is the tower's name and
overrides plus ``num_classes``, so ``florence.from_pretrained`` rebuilds it without the original bundle.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from florence.registry import register_model


@register_model
def image_classifier(backbone: nn.Module, num_classes: int, class_names: Sequence[str] | None = None,
                     global_pool: str | None = None) -> nn.Module:
    """``backbone`` (an image tower made by ``create_model``) with a new ``num_classes``-way linear head
    (timm's ``reset_classifier``, which records the head in the tower's bundle config)."""
    if getattr(backbone, "florence_config", None) is None:
        raise TypeError(f"{type(backbone).__name__} was not built by florence.create_model; it cannot be saved")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for num_classes={num_classes}")
    backbone.reset_classifier(num_classes, global_pool=global_pool)
    backbone.class_names = list(class_names) if class_names is not None else None
    return backbone
