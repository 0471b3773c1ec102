"""The report's figures, drawn from the section JSONs into the paths given (matplotlib,
the ``plots`` extra). Rendering the report's text never draws; ``jacmatch report`` calls
:func:`draw_report_figures` beside it."""

from __future__ import annotations

from pathlib import Path

from . import rows as R
from .._extras import require
from ..atomic import save_figure

__all__ = ["draw_report_figures", "plot_fidelity_noise", "plot_distill", "plot_student_noise", "plot_robust", "noise_curve"]


def _pyplot():
    matplotlib = require("matplotlib", "plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def draw_report_figures(sections: dict, folder: Path) -> None:
    """distill.png, distill_noise.png, converge_curves.png, fidelity_noise.png and
    robustness.png in ``folder``, for the sections run."""
    d, r, c, f = (sections.get(k) for k in ("distill", "robustness", "converge", "fidelity"))
    if d is not None:
        plot_distill(d, main_rows(d), folder / "distill.png")
    if c is not None and c["cells"]:
        plot_converge_curves(c, folder / "converge_curves.png")
    if f is not None and f["cells"]:
        plot_fidelity_noise(f, folder / "fidelity_noise.png")
    if r is not None:
        if d is not None and any(R.key(R.CE_KD_JM, n) in d["cells"] for n in d["samples"]):
            plot_student_noise(d, folder / "distill_noise.png")
        plot_robust(r, noise_sigmas(r), folder / "robustness.png")


def curve_samples(c: dict) -> list[int]:
    """The n of the converged view's plots: 10 and 100 when every row ran there, else the
    smallest and largest such n (a partial run's last n, where only some rows ran, waits
    until they all have; with none complete yet, the n where any ran)."""
    ran = sorted({cell["samples_per_class"] for cell in c["cells"].values()})
    complete = [n for n in ran if all(R.key(row, n) in c["cells"] for row in c["rows"])]
    ran = complete or ran
    wanted = [n for n in (10, 100) if n in ran]
    return wanted or sorted({ran[0], ran[-1]}) if ran else []


def _panels_by_n(section: dict, path: Path, draw, xlabel: str, ylabel: str, title: str) -> None:
    """One panel per n of :func:`curve_samples`, ``draw(ax, i, row, cell)`` for every row
    that ran there (one colour per row), saved at ``path``."""
    plt = _pyplot()
    ns = curve_samples(section)
    fig, axes = plt.subplots(1, len(ns), figsize=(6 * len(ns), 4), squeeze=False)
    for ax, n in zip(axes[0], ns):
        for i, row in enumerate(section["rows"]):
            cell = section["cells"].get(R.key(row, n))
            if cell is not None:
                draw(ax, i, row, cell)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"n = {n} samples per class, {title}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def plot_converge_curves(c: dict, path: Path) -> None:
    """Validation accuracy against training seconds for every row, at n = 10 and n = 100:
    each seed's curve (early stopping ends it), one colour per row."""
    def draw(ax, i, row, cell):
        for j, curve in enumerate(cell["curves"]):
            ax.plot([sec for _, sec, _ in curve], [100 * acc for _, _, acc in curve], color=f"C{i}", alpha=0.6,
                    lw=1, label=row if j == 0 else None)
    _panels_by_n(c, path, draw, "training seconds (steps × measured step cost)" if "step_seconds" in c else
                 "training seconds (2-core CPU)", "validation accuracy (%)", "every seed")


def plot_fidelity_noise(f: dict, path: Path) -> None:
    """Top-1 agreement with the teacher against test noise σ (0: the clean test points) for
    every converged row, at n = 10 and n = 100: mean and std over seeds."""
    def draw(ax, i, row, cell):
        a = cell["agreement"]
        sigmas = sorted(a["noisy"], key=float)
        points = [a["clean"]] + [a["noisy"][s] for s in sigmas]
        ax.errorbar([0.0] + [float(s) for s in sigmas], [100 * p["mean"] for p in points],
                    yerr=[100 * p["std"] for p in points], color=f"C{i}", marker="o", ms=3, capsize=2, label=row)
    _panels_by_n(f, path, draw, "test noise σ (pixels in [0, 1])", "top-1 agreement with the teacher (%)",
                 "mean ± std over seeds")


def main_rows(d: dict) -> list[str]:
    """The rows a section ran at every n, in the order it ran them (the rest are ablations)."""
    rows = list(dict.fromkeys(c["row"] for c in d["cells"].values()))
    ran = {n for n in d["samples"] if any(c["samples_per_class"] == n for c in d["cells"].values())}
    return [r for r in rows if all(R.key(r, n) in d["cells"] for n in ran)]


def noise_sigmas(section: dict) -> list[str]:
    """The test-noise σ keys its cells hold, ascending."""
    return sorted({s for c in section["cells"].values() for s in c["noisy_acc"]}, key=float)


def noise_curve(c: dict, sigmas: list[str]) -> tuple[list, list, list]:
    """σ_test (0 first), mean and std accuracy in % of a cell, for an error-bar plot."""
    cs = [c["acc"]] + [c["noisy_acc"][s] for s in sigmas]
    return [0.0] + [float(s) for s in sigmas], [100 * a["mean"] for a in cs], [100 * a["std"] for a in cs]


def plot_distill(d: dict, rows: list[str], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        ns = [n for n in d["samples"] if R.key(r, n) in d["cells"]]
        cells = [d["cells"][R.key(r, n)] for n in ns]
        if cells:
            ax.errorbar(ns, [100 * c["acc"]["mean"] for c in cells], yerr=[100 * c["acc"]["std"] for c in cells],
                        marker="o", capsize=3, label=r)
    ax.set_xscale("log")
    ax.set_xlabel("samples per class")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=8)
    ax.set_title("Fashion-MNIST students, mean ± std over seeds")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def plot_student_noise(d: dict, path: Path, rows: tuple[str, str] = (R.CE_KD, R.CE_KD_JM)) -> None:
    """Accuracy against σ_test for two rows of students, one panel per n."""
    plt = _pyplot()
    ns = [n for n in d["samples"] if all(R.key(row, n) in d["cells"] for row in rows)]
    fig, axes = plt.subplots(1, len(ns), figsize=(2.6 * len(ns), 3.2), sharey=True, squeeze=False)
    for ax, n in zip(axes[0], ns):
        for row in rows:
            c = d["cells"][R.key(row, n)]
            xs, ys, es = noise_curve(c, sorted(c["noisy_acc"], key=float))
            ax.errorbar(xs, ys, yerr=es, marker="o", markersize=3, capsize=2, label=row)
        ax.set_title(f"n={n}", fontsize=9)
        ax.set_xlabel("σ_test")
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("distilled students under Gaussian input noise (mean ± std over seeds)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def plot_robust(r: dict, sigmas: list[str], path: Path) -> None:
    plt = _pyplot()
    sets = list(dict.fromkeys(c["training_set"] for c in r["cells"].values()))
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 3.8), sharey=True, squeeze=False)
    for ax, ts in zip(axes[0], sets):
        for c in (c for c in r["cells"].values() if c["training_set"] == ts and "val_gain" not in c):
            xs, ys, es = noise_curve(c, sigmas)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=c["row"])
        ax.set_title(f"trained on: {ts}")
        ax.set_xlabel("σ_test")
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def plot_gradients(x, grads: dict, n: int, path: Path) -> None:
    """Inputs (first column) beside each model's input-gradient, scaled to ±1 per image."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(x), 1 + len(grads), figsize=(2.0 * (1 + len(grads)), 2.0 * len(x)))
    for i in range(len(x)):
        axes[i, 0].imshow(x[i, 0], cmap="gray")
        for j, (name, g) in enumerate(grads.items()):
            m = g[i, 0].abs().max().clamp_min(1e-12)
            axes[i, j + 1].imshow(g[i, 0] / m, cmap="seismic", vmin=-1, vmax=1)
            if i == 0:
                axes[i, j + 1].set_title(name, fontsize=9)
        if i == 0:
            axes[i, 0].set_title("input", fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"input-gradients of the teacher's top-1 logit (students: n={n}, seed 0)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
