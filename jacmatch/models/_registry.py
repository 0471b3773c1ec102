"""The model registry: names to factories (timm's ``_registry.py`` in small)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..registry import Registry

__all__ = ["MODELS", "register_model", "list_models", "model_factory"]

#: The registered models: name -> a class or factory ``(num_classes, in_channels, **options)``.
MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register_model(name: str):
    """``@register_model("name")`` on a class or a factory ``(num_classes, in_channels, **options)``."""
    return MODELS.register(name)


def list_models(pattern: str = "*") -> list[str]:
    return MODELS.list(pattern)


def model_factory(name: str) -> Callable[..., nn.Module] | None:
    """The factory registered as ``name``, or None."""
    return MODELS.find(name)
