"""``package.module:callable``: what a model or a data set given by import path names."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

__all__ = ["import_callable", "IMPORT_PATH", "is_import_path"]

#: ``package.module:attr``, the form every import path takes (models, data sets, terms, estimators).
IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def is_import_path(name: str) -> bool:
    return bool(IMPORT_PATH.match(name))


def import_callable(spec: str, what: str, error: type[Exception] = ValueError) -> Callable:
    """The callable ``spec`` names (``module.path:attr.path``); ``error`` with one line
    that says what is missing otherwise. ``what`` names it in the message (model, data set)."""
    module, _, target = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as exc:
        raise error(f"{what} {spec!r}: cannot import {module!r} ({exc}); is it on PYTHONPATH?") from None
    for part in target.split("."):
        if not hasattr(obj, part):
            raise error(f"{what} {spec!r}: {module!r} has no attribute {target!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise error(f"{what} {spec!r}: {target!r} is a {type(obj).__name__}, not callable")
    return obj
