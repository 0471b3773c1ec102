"""``jacmatch verify``: Propositions 1 and 2 checked numerically (docs/method.md §4).

For a single input and small float64 networks, each proposition's noisy loss is
estimated by Monte Carlo with antithetic draws (ξ and −ξ) and, as a control variate,
the second-order Taylor polynomial of ℓ at x subtracted from each draw and its exact
expectation ``ℓ(x) + (σ²/2) tr ∇²ℓ(x)`` added back (:func:`monte_carlo`), and compared
with the closed forms of ``core.propositions``. The residual then falls like σ⁴ for a
full form and like σ² for a short form whose dropped term is not zero; :func:`sweep`
fits the log-log slope.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import hessian, jacrev, vmap

from .._extras import require
from ..atomic import save_figure, write_json_atomic
from ..core.propositions import CLOSED_FORMS, LOSSES, PROPOSITIONS
from ..errors import UsageError

__all__ = ["make_mlp", "monte_carlo", "fit_slope", "sweep", "run_verify", "main"]

ACTIVATIONS = ("tanh", "softplus", "relu")
MODULES = {"tanh": nn.Tanh, "softplus": nn.Softplus, "gelu": nn.GELU, "relu": nn.ReLU}


def make_mlp(in_dim: int, hidden: int, out_dim: int, activation: str, seed: int) -> nn.Module:
    """A two-hidden-layer MLP in float64, initialised from ``seed``."""
    if activation not in MODULES:
        raise UsageError(f"unknown activation {activation!r}: use one of {list(MODULES)}")
    gen = torch.Generator().manual_seed(seed)
    act = MODULES[activation]
    net = nn.Sequential(nn.Linear(in_dim, hidden), act(), nn.Linear(hidden, hidden), act(),
                        nn.Linear(hidden, out_dim)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(max(p.shape[-1], 1)))
    return net.requires_grad_(False)


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
                grads = jacrev(lambda z, net=net, upto=layer: _prefix(net, upto)(z))
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


def run_verify(num_sigmas: int = 9, num_draws: int = 1_000_000, seed: int = 0) -> list[dict]:
    """Every proposition × activation × form, at ``num_sigmas`` σ from 10⁻³ to 10⁻¹."""
    sigmas = [float(s) for s in np.logspace(-3, -1, num_sigmas)]
    records = []
    for activation in ACTIVATIONS:
        records.extend(sweep(activation, sigmas, num_draws, seed=seed))
    return records


def format_table(records: list[dict]) -> str:
    lines = [f"{'proposition':<12}{'activation':<11}{'form':<7}{'slope':>8}{'below kink':>12}"
             f"{'residual@σmax':>15}", "-" * 65]
    for r in records:
        slope = "—" if r["slope"] is None else f"{r['slope']:.2f}"
        below = "" if r.get("slope_below_kink") is None else f"{r['slope_below_kink']:.2f}"
        lines.append(f"{r['proposition']:<12}{r['activation']:<11}{r['form']:<7}{slope:>8}{below:>12}"
                     f"{r['residuals'][-1]:>15.2e}")
    return "\n".join(lines)


def plot_verify(records: list[dict], path: str) -> None:
    matplotlib = require("matplotlib", "plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PROPOSITIONS), figsize=(4.2 * len(PROPOSITIONS), 3.8), sharey=True)
    styles = {"full": "-", "short": "--"}
    colors = {"tanh": "C0", "softplus": "C1", "relu": "C2", "gelu": "C3"}
    for ax, prop in zip(axes, PROPOSITIONS):
        for r in (r for r in records if r["proposition"] == prop):
            pts = [(s, v) for s, v in zip(r["sigmas"], r["residuals"]) if v > 0]
            if pts:
                ax.loglog(*zip(*pts), styles[r["form"]], color=colors[r["activation"]], marker="o", ms=3,
                          label=f"{r['activation']} {r['form']}")
        sig = np.array(records[0]["sigmas"])
        ax.loglog(sig, 1e-1 * sig**2, ":", color="grey", lw=0.8, label="σ² guide")
        ax.loglog(sig, 1e-1 * sig**4, "-.", color="grey", lw=0.8, label="σ⁴ guide")
        ax.set_title(f"Proposition {prop}")
        ax.set_xlabel("σ")
    axes[0].set_ylabel("|Monte Carlo − closed form|")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def main(json_path: str | None, plot_path: str | None, seed: int = 0, num_sigmas: int = 9,
         num_draws: int = 1_000_000) -> list[dict]:
    start = time.time()
    records = run_verify(num_sigmas, num_draws, seed)
    print(format_table(records))
    print(f"({time.time() - start:.1f} s; full forms on smooth networks should slope ≥ 3.5, "
          "short cross-entropy forms ≈ 2)")
    if json_path:
        write_json_atomic(json_path, records)
    if plot_path:
        plot_verify(records, plot_path)
    return records
