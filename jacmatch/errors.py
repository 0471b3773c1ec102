"""The two kinds of failure: what the user gave cannot be used, or jacmatch has a bug.

:class:`UsageError` is the first kind (an option, a shape, a file, a model that cannot
run): the command line reports it in one line with exit code 2. Every other exception is
the second kind and keeps its traceback (exit code 1). ``UsageError`` is a ``ValueError``,
so code that catches ``ValueError`` around jacmatch's calls keeps working.
"""

from __future__ import annotations

__all__ = ["UsageError", "check_range", "check_once"]


class UsageError(ValueError):
    """Something the user gave cannot be used; the message says what and what to do."""


def check_once(config, check) -> None:
    """Run ``check()`` on the dataclass ``config`` unless it passed with the values it has
    now: a config is checked once, and again only after it changed."""
    import dataclasses
    values = dataclasses.astuple(config)
    if config.__dict__.get("_checked_values") == values:
        return
    check()
    config.__dict__["_checked_values"] = values


def check_range(key: str, value, low, high=float("inf"), *, low_open: bool = False, optional: bool = False) -> None:
    """``low <= value <= high`` (``low < value`` when ``low_open``), finite: the one range check of
    every setting, a UsageError naming ``key`` otherwise; None passes when ``optional``."""
    if value is None and optional:
        return
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
        and abs(value) != float("inf")
    if not finite or value > high or (value <= low if low_open else value < low):
        bound = f"> {low}" if low_open else f">= {low}"
        upper = f" and <= {high}" if high != float("inf") else ""
        raise UsageError(f"{key} must be a finite number {bound}{upper}, got {value!r}")
