"""``jacmatch verify``: Propositions 1 and 2 checked numerically (docs/method.md §4)."""

from __future__ import annotations

import time

import numpy as np

from .._extras import require
from ..core.propositions import PROPOSITIONS, sweep
from ..io import write_json_atomic

ACTIVATIONS = ("tanh", "softplus", "relu")


def run_verify(quick: bool = False, seed: int = 0) -> list[dict]:
    """Every proposition × activation × form. Quick: 5 σ and 10⁵ draws; full: 9 σ and 10⁶."""
    sigmas = [float(s) for s in np.logspace(-3, -1, 5 if quick else 9)]
    draws = 100_000 if quick else 1_000_000
    records = []
    for activation in ACTIVATIONS:
        records.extend(sweep(activation, sigmas, draws, seed=seed))
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(quick: bool, json_path: str | None, plot_path: str | None, seed: int = 0) -> list[dict]:
    start = time.time()
    records = run_verify(quick=quick, seed=seed)
    print(format_table(records))
    print(f"({time.time() - start:.1f} s; full forms on smooth networks should slope ≥ 3.5, "
          "short cross-entropy forms ≈ 2)")
    if json_path:
        write_json_atomic(json_path, records)
    if plot_path:
        plot_verify(records, plot_path)
    return records
