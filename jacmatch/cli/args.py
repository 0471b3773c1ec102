"""Argument types of the command line: each refuses a bad value in argparse's one line."""

from __future__ import annotations

import argparse

from ..errors import UsageError
from ..training.config import check_noise_sigmas


def sigma_arg(text: str) -> float:
    """A noise σ for argparse, by the rule of eval.noise_sigmas (check_noise_sigmas)."""
    value = float(text)
    try:
        check_noise_sigmas([value])
    except UsageError:
        raise argparse.ArgumentTypeError(f"σ must be a finite number >= 0, got {text}") from None
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def shape_arg(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1 or max(shape) > 4096:
        raise argparse.ArgumentTypeError(f"write C x H x W, e.g. 3x32x32, got {text!r}")
    return shape


def non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value
