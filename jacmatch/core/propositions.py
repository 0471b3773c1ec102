"""Propositions 1 and 2 of docs/method.md §2 in closed form.

For a single input ``x ∈ R^D`` and networks ``T, S: R^D → R^k`` (float64), each
proposition's noisy loss ``E_ξ ℓ(x + ξ)``, ``ξ = σu`` (:data:`LOSSES`), is computed by the
closed forms of §2, full and short, from the values, gradients and exact Laplacians (from
Hessians) of the networks' outputs (:data:`CLOSED_FORMS`). The Monte-Carlo check of these
forms is an experiment: ``jacmatch.experiments.verify``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import hessian, jacrev

__all__ = ["Ingredients", "ingredients", "CLOSED_FORMS", "LOSSES", "PROPOSITIONS"]

PROPOSITIONS = ("1-sq", "1-ce", "2-sq", "2-ce")


@dataclass
class Ingredients:
    """Value, gradient and Laplacian of each of k outputs of ``f`` at one x."""

    value: Tensor      # [k]
    grad: Tensor       # [k, D]
    laplacian: Tensor  # [k]


def ingredients(f: Callable[[Tensor], Tensor], x: Tensor) -> Ingredients:
    """Exact, from autograd: Jacobian rows and the trace of each output's Hessian."""
    hess = hessian(f)(x)  # [k, D, D]
    return Ingredients(f(x), jacrev(f)(x), hess.diagonal(dim1=1, dim2=2).sum(dim=1))


def _soft(net: nn.Module, tau: float) -> Callable[[Tensor], Tensor]:
    return lambda x: F.softmax(net(x) / tau, dim=-1)


def _log_soft(net: nn.Module, tau: float) -> Callable[[Tensor], Tensor]:
    return lambda x: F.log_softmax(net(x) / tau, dim=-1)


# ---- closed forms of docs/method.md §2: each returns (full, short) ---------------------------


def prop1_sq(teacher, student, x, y, sigma, tau=1.0):
    """``Σd² + σ² Σ‖∇T_i − ∇S_i‖² + σ² Σ d_i Δd_i``; the short form drops the last term."""
    t, s = ingredients(teacher, x), ingredients(student, x)
    d = t.value - s.value
    short = d.pow(2).sum() + sigma**2 * (t.grad - s.grad).pow(2).sum()
    return short + sigma**2 * (d * (t.laplacian - s.laplacian)).sum(), short


def prop1_ce(teacher, student, x, y, sigma, tau=1.0):
    """``−ΣTˢ log Sˢ − σ² Σ ∇Tˢ·∇Sˢ/Sˢ − (σ²/2) Σ [Tˢ Δ log Sˢ + log Sˢ ΔTˢ]``; short: no bracket."""
    ts = ingredients(_soft(teacher, tau), x)
    ss = ingredients(_soft(student, tau), x)
    ls = ingredients(_log_soft(student, tau), x)
    base = -(ts.value * ls.value).sum()
    cross = -sigma**2 * ((ts.grad * ss.grad).sum(dim=1) / ss.value).sum()
    bracket = -0.5 * sigma**2 * (ts.value * ls.laplacian + ls.value * ts.laplacian).sum()
    return base + cross + bracket, base + cross


def prop2_sq(teacher, student, x, y, sigma, tau=1.0):
    """``Σ(y_i − S_i)² + σ² Σ‖∇S_i‖² − σ² Σ (y_i − S_i) ΔS_i``; short drops the last term."""
    s = ingredients(student, x)
    r = y - s.value
    short = r.pow(2).sum() + sigma**2 * s.grad.pow(2).sum()
    return short - sigma**2 * (r * s.laplacian).sum(), short


def prop2_ce(teacher, student, x, y, sigma, tau=1.0):
    """``−Σ y log Sˢ + (σ²/2) Σ y (‖∇Sˢ‖²/Sˢ² − ΔSˢ/Sˢ)``; the common short form is
    ``−Σ y log Sˢ + σ² Σ y ‖∇Sˢ‖²/Sˢ²`` (no 1/2, no curvature)."""
    ss = ingredients(_soft(student, tau), x)
    base = -(y * ss.value.log()).sum()
    grad_term = (y * ss.grad.pow(2).sum(dim=1) / ss.value**2).sum()
    full = base + 0.5 * sigma**2 * (grad_term - (y * ss.laplacian / ss.value).sum())
    return full, base + sigma**2 * grad_term


CLOSED_FORMS = {"1-sq": prop1_sq, "1-ce": prop1_ce, "2-sq": prop2_sq, "2-ce": prop2_ce}


# ---- the noisy losses themselves, for a batch of inputs [N, D] ---------------------------


def _loss_1sq(teacher, student, x, y, tau):
    return (teacher(x) - student(x)).pow(2).sum(dim=-1)


def _loss_1ce(teacher, student, x, y, tau):
    return -(F.softmax(teacher(x) / tau, dim=-1) * F.log_softmax(student(x) / tau, dim=-1)).sum(dim=-1)


def _loss_2sq(teacher, student, x, y, tau):
    return (y - student(x)).pow(2).sum(dim=-1)


def _loss_2ce(teacher, student, x, y, tau):
    return -(y * F.log_softmax(student(x) / tau, dim=-1)).sum(dim=-1)


LOSSES = {"1-sq": _loss_1sq, "1-ce": _loss_1ce, "2-sq": _loss_2sq, "2-ce": _loss_2ce}
