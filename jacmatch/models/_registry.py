"""The model registry: names to factories (timm's ``_registry.py`` in small)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from torch import nn

__all__ = ["register_model", "list_models", "model_factory"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """``@register_model("name")`` on a class or a factory ``(num_classes, in_channels, **options)``."""
    def wrap(factory):
        _MODELS[name] = factory
        return factory
    return wrap


def list_models(pattern: str = "*") -> list[str]:
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def model_factory(name: str) -> Callable[..., nn.Module] | None:
    """The factory registered as ``name``, or None."""
    return _MODELS.get(name)
