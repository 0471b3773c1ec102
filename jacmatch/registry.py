"""One registry shape for every name jacmatch resolves (models, data sets, sources, Jacobian
estimators, built-in terms), after timm's ``_registry.py``: ``register`` (also as a
decorator), ``get`` with one error for an unknown name that lists the known ones, ``list``
(sorted, a glob pattern) and ``names`` (in registration order, where order matters)."""

from __future__ import annotations

import builtins
import fnmatch
from collections.abc import Iterator
from typing import Generic, TypeVar

from .errors import UsageError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Names to entries of one kind (``what``: "model", "data set", …)."""

    def __init__(self, what: str, error: type[Exception] = UsageError, hint: str = ""):
        self.what, self.error, self.hint = what, error, hint
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None):
        """``registry.register(name, entry)``, or ``@registry.register(name)`` above it. A name
        registered again is replaced (a user's own version of a built-in)."""
        if entry is not None:
            self._entries[name] = entry
            return entry

        def add(item: T) -> T:
            self._entries[name] = item
            return item
        return add

    def get(self, name: str) -> T:
        """The entry ``name``; one error naming the known ones otherwise."""
        if name not in self._entries:
            raise self.error(f"unknown {self.what} {name!r}: known {self.what}s are {', '.join(self.list())}"
                             + (f"; {self.hint}" if self.hint else ""))
        return self._entries[name]

    def remove(self, name: str) -> T:
        """Unregister ``name`` (a test's or a plugin's own entry); returns it."""
        self.get(name)
        return self._entries.pop(name)

    def find(self, name: str) -> T | None:
        """The entry ``name``, or None."""
        return self._entries.get(name)

    def list(self, pattern: str = "*") -> list[str]:
        """The names matching a glob ``pattern``, sorted."""
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def names(self) -> builtins.list[str]:  # (``list`` here is the method above)
        """Every name, in registration order."""
        return list(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(list(self._entries.items()))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)
