"""Propositions 1 and 2 of docs/method.md §2, in closed form and by Monte Carlo (§4).

For a single input ``x ∈ R^D`` and small networks ``T, S: R^D → R^k`` (float64), each
proposition's noisy loss ``E_ξ ℓ(x + ξ)``, ``ξ = σu``, is

- estimated by Monte Carlo with antithetic draws (ξ and −ξ) and, as a control variate,
  the second-order Taylor polynomial of ℓ at x subtracted from each draw and its exact
  expectation ``ℓ(x) + (σ²/2) tr ∇²ℓ(x)`` added back (:func:`monte_carlo`);
- computed by the closed forms of §2, full and short, from the values, gradients and
  exact Laplacians (from Hessians) of the networks' outputs (:data:`CLOSED_FORMS`).

The residual |Monte Carlo − closed form| then falls like σ⁴ for a full form and like σ²
for a short form whose dropped term is not zero; :func:`sweep` fits the log-log slope.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import hessian, jacrev, vmap

__all__ = ["make_mlp", "Ingredients", "ingredients", "CLOSED_FORMS", "LOSSES", "monte_carlo",
           "fit_slope", "sweep", "PROPOSITIONS"]

PROPOSITIONS = ("1-sq", "1-ce", "2-sq", "2-ce")
ACTIVATIONS = {"tanh": nn.Tanh, "softplus": nn.Softplus, "gelu": nn.GELU, "relu": nn.ReLU}


def make_mlp(in_dim: int, hidden: int, out_dim: int, activation: str, seed: int) -> nn.Module:
    """A two-hidden-layer MLP in float64, initialised from ``seed``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: use one of {list(ACTIVATIONS)}")
    gen = torch.Generator().manual_seed(seed)
    act = ACTIVATIONS[activation]
    net = nn.Sequential(nn.Linear(in_dim, hidden), act(), nn.Linear(hidden, hidden), act(),
                        nn.Linear(hidden, out_dim)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(max(p.shape[-1], 1)))
    return net.requires_grad_(False)


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


def monte_carlo(loss: Callable[[Tensor], Tensor], x: Tensor, sigma: float, num_draws: int,
                generator: torch.Generator, chunk: int = 65536) -> tuple[float, float]:
    """``E_ξ ℓ(x+ξ)`` by antithetic draws with a second-order Taylor control variate.

    Each of the ``num_draws`` pairs contributes
    ``a = (ℓ(x+ξ) + ℓ(x−ξ))/2 − ℓ(x) − ½ ξᵀ∇²ℓ(x)ξ``, whose mean is O(σ⁴) and whose
    spread is O(σ⁴) too (odd orders cancel in the pair); the estimate is
    ``ℓ(x) + (σ²/2) tr ∇²ℓ(x) + mean(a)``. Returns (estimate, standard error).
    """
    scalar = lambda z: loss(z[None])[0]  # noqa: E731
    base = scalar(x)
    hess = hessian(scalar)(x)
    total, total_sq, done = 0.0, 0.0, 0
    while done < num_draws:
        n = min(chunk, num_draws - done)
        xi = sigma * torch.randn(n, x.shape[0], generator=generator, dtype=x.dtype)
        pair = 0.5 * (loss(x + xi) + loss(x - xi))
        quad = 0.5 * torch.einsum("nd,de,ne->n", xi, hess, xi)
        a = pair - base - quad
        total += float(a.sum())
        total_sq += float(a.pow(2).sum())
        done += n
    mean = total / num_draws
    var = max(total_sq / num_draws - mean**2, 0.0) * num_draws / max(num_draws - 1, 1)
    estimate = float(base) + 0.5 * sigma**2 * float(hess.diagonal().sum()) + mean
    return estimate, math.sqrt(var / num_draws)


def fit_slope(sigmas, residuals, stderrs, floor: float = 1e-13) -> float | None:
    """Least-squares slope of log residual on log σ over the σ where the residual stands
    clear of Monte-Carlo noise (> 3 standard errors, and above float64 round-off);
    None where fewer than three σ do."""
    pts = [(math.log(s), math.log(r)) for s, r, e in zip(sigmas, residuals, stderrs)
           if r > 3 * e and r > floor]
    if len(pts) < 3:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((a - mx) * (b - my) for a, b in pts) / sum((a - mx) ** 2 for a, _ in pts)


def sweep(activation: str, sigmas, num_draws: int, *, in_dim: int = 4, num_classes: int = 3,
          seed: int = 0, tau: float = 1.0) -> list[dict]:
    """One record per proposition and form, for one activation (docs/method.md §4)."""
    teacher = make_mlp(in_dim, 24, num_classes, activation, seed)
    student = make_mlp(in_dim, 12, num_classes, activation, seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    x, margin = _point_away_from_kinks([teacher, student], torch.randn(256, in_dim, generator=gen,
                                                                       dtype=torch.float64))
    y = F.one_hot(torch.tensor(1), num_classes).double()
    records = []
    for prop in PROPOSITIONS:
        loss = lambda z, prop=prop: LOSSES[prop](teacher, student, z, y, tau)  # noqa: E731
        rows = {"full": ([], []), "short": ([], [])}
        for i, sigma in enumerate(sigmas):
            est, err = monte_carlo(loss, x, sigma, num_draws, torch.Generator().manual_seed(seed * 1000 + i))
            full, short = CLOSED_FORMS[prop](teacher, student, x, y, sigma, tau)
            for form, value in (("full", full), ("short", short)):
                rows[form][0].append(abs(est - float(value)))
                rows[form][1].append(err)
        for form, (residuals, stderrs) in rows.items():
            records.append({
                "proposition": prop, "activation": activation, "form": form,
                "sigmas": list(sigmas), "residuals": residuals, "mc_stderr": stderrs,
                "slope": fit_slope(sigmas, residuals, stderrs),
                # Where the network is piecewise linear: the fit over σ well inside the
                # linear region around x (3σ√D below the distance to the nearest kink).
                "slope_below_kink": fit_slope(*zip(*[(s, r, e) for s, r, e in zip(sigmas, residuals, stderrs)
                                                     if 3 * s * math.sqrt(in_dim) < margin]))
                if activation == "relu" and any(3 * s * math.sqrt(in_dim) < margin for s in sigmas) else None,
                "num_draws": num_draws, "seed": seed, "in_dim": in_dim, "num_classes": num_classes,
                "kink_margin": margin,
            })
    return records


def _point_away_from_kinks(nets, candidates: Tensor) -> tuple[Tensor, float]:
    """The candidate whose hidden pre-activations are farthest from zero, in input units
    (|a_j(x)| / ‖∇a_j(x)‖, the distance to unit j's kink where the network is linear).

    For ReLU networks the squared-error forms are exact inside a linear region, and the
    check is meaningful only while σ is small against the distance to the nearest kink.
    """
    margins = torch.full((candidates.shape[0],), float("inf"), dtype=candidates.dtype)
    for net in nets:
        h = candidates
        for layer in net:
            if isinstance(layer, nn.Linear) and layer is not net[-1]:
                pre = layer(h)
                grads = jacrev(lambda z, upto=layer: _prefix(net, upto)(z))
                norms = vmap(grads)(candidates).norm(dim=-1).clamp_min(1e-12)  # [N, hidden]
                margins = torch.minimum(margins, (pre.abs() / norms).amin(dim=1))
                h = pre
            else:
                h = layer(h)
    best = int(margins.argmax())
    return candidates[best], float(margins[best])


def _prefix(net: nn.Sequential, upto: nn.Module) -> Callable[[Tensor], Tensor]:
    """The network up to and including the layer ``upto``."""
    def run(z: Tensor) -> Tensor:
        for layer in net:
            z = layer(z)
            if layer is upto:
                return z
        raise ValueError("layer not in network")
    return run

