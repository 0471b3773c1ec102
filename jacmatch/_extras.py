"""Optional dependencies, imported when first needed: a missing one is named with the
extra that installs it (``pip install 'jacmatch[plots]'``)."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require", "MissingExtra"]


class MissingExtra(ImportError):
    """An optional dependency that is not installed."""


def require(module: str, extra: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{module} is not installed: pip install 'jacmatch[{extra}]'") from None
