"""``jacmatch demo``: the main job, end to end on real data, in a few minutes on 2 cores.

A teacher is trained on the full training set; students several times smaller are
distilled with CE, KD and KD + JM from 1, 5 and 10 samples per class over 3 seeds, then
evaluated clean and under Gaussian input noise. Prints a table, writes ``summary.json``
and ``demo.png`` in the output folder. Finished runs are reused on a rerun.
"""

from __future__ import annotations

import time
from pathlib import Path

from .._extras import require
from ..atomic import save_figure, write_json_atomic
from ..core.objective import TEACHER_OBJECTIVE
from ..errors import UsageError
from .common import run_or_load, summarize_runs

SAMPLES = (1, 5, 10)
METHODS = {  # objective weights: α (CE), β (KD, τ = 4), γ (JM, normalised form, teacher top-1)
    "CE": {"alpha": 1.0, "beta": 0.0, "gamma": 0.0, "temperature": 4.0},
    "KD": {"alpha": 1.0, "beta": 1.0, "gamma": 0.0, "temperature": 4.0},
    "KD+JM": {"alpha": 1.0, "beta": 1.0, "gamma": 1.0, "temperature": 4.0},
}
SETTINGS = {
    "digits": {"teacher": "small_cnn_32", "student": "small_cnn_8", "teacher_epochs": 15, "student_epochs": 150},
    "fashion-mnist": {"teacher": "small_cnn_32", "student": "small_cnn_8", "teacher_epochs": 3,
                      "student_epochs": 60},
}
NOISE = [0.1, 0.3]


def teacher_config(dataset: str, out: Path, device: str) -> dict:
    s = SETTINGS[dataset]
    return {"out_dir": str(out / "teacher"), "seed": 0, "device": device, "data": {"name": dataset},
            "model": {"name": s["teacher"]},
            "objective": dict(TEACHER_OBJECTIVE), "optim": {"epochs": s["teacher_epochs"], "batch_size": 64, "lr": 0.05},
            "eval": {"every": s["teacher_epochs"], "noise_sigmas": NOISE, "jacobian_cosine": False},
            "progress": False, "tensorboard": False}


def student_config(dataset: str, out: Path, device: str, method: str, n: int, seed: int) -> dict:
    s = SETTINGS[dataset]
    return {"out_dir": str(out / "students" / f"{method}_n{n}_s{seed}"), "seed": seed, "device": device,
            "data": {"name": dataset, "samples_per_class": n}, "model": {"name": s["student"]},
            "teacher": str(out / "teacher" / "last.pt"), "objective": dict(METHODS[method]),
            "optim": {"name": "adam", "lr": 3e-3, "weight_decay": 0.0, "epochs": s["student_epochs"],
                      "batch_size": 64, "min_steps_per_epoch": 2},
            "eval": {"every": s["student_epochs"], "noise_sigmas": NOISE, "cosine_samples": 500},
            "checkpoint_every": s["student_epochs"], "progress": False, "tensorboard": False}


def main(dataset: str = "digits", out: str = "runs/demo", seeds: int = 3, device: str = "auto") -> dict:
    if dataset not in SETTINGS:
        raise UsageError(f"the demo runs on {sorted(SETTINGS)}, not {dataset!r}")
    out = Path(out)
    start = time.time()
    s = SETTINGS[dataset]
    print(f"demo on {dataset}: a teacher ({s['teacher']}, {s['teacher_epochs']} epochs), then students "
          f"({s['student']}) with {', '.join(METHODS)} at {', '.join(map(str, SAMPLES))} samples per class "
          f"× {seeds} seeds; writing to {out}", flush=True)
    teacher = run_or_load(teacher_config(dataset, out, device))
    print(f"teacher {SETTINGS[dataset]['teacher']} ({teacher['student_parameters']} parameters): "
          f"test accuracy {teacher['final']['test']['acc']:.4f}  [{time.time() - start:.0f} s]")
    cells: dict = {}
    for n in SAMPLES:
        for method in METHODS:
            runs = [run_or_load(student_config(dataset, out, device, method, n, seed)) for seed in range(seeds)]
            cells[f"{method}/n={n}"] = {"method": method, "samples_per_class": n, **summarize_runs(runs)}
        print(f"  n={n} done  [{time.time() - start:.0f} s]")
    summary = {"dataset": dataset, "teacher": {"model": SETTINGS[dataset]["teacher"],
                                               "test": teacher["final"]["test"]},
               "student_model": SETTINGS[dataset]["student"], "seeds": seeds, "cells": cells,
               "seconds": time.time() - start}
    write_json_atomic(out / "summary.json", summary)
    print(format_table(summary))
    plot_demo(summary, out / "demo.png")
    print(f"wrote {out / 'summary.json'} and {out / 'demo.png'}")
    return summary


def format_table(summary: dict) -> str:
    head = f"{'method':<8}{'n/class':>8}{'test acc':>16}" + "".join(f"{'σ=' + str(s):>16}" for s in NOISE) \
        + f"{'Jac. cosine':>14}"
    lines = [f"{summary['dataset']}: mean ± std over {summary['seeds']} seeds", head, "-" * len(head)]
    for c in summary["cells"].values():
        fmt = lambda d: f"{100 * d['mean']:6.1f} ± {100 * d['std']:4.1f}"  # noqa: E731
        lines.append(f"{c['method']:<8}{c['samples_per_class']:>8}{fmt(c['acc']):>16}"
                     + "".join(f"{fmt(c['noisy_acc'][str(s)]):>16}" for s in NOISE)
                     + f"{c['jacobian_cosine']['mean']:>14.3f}")
    return "\n".join(lines)


def plot_demo(summary: dict, path: Path) -> None:
    matplotlib = require("matplotlib", "plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(NOISE), figsize=(4.2 * (1 + len(NOISE)), 3.6), sharey=True)
    for ax, (title, get) in zip(axes, [("clean", lambda c: c["acc"])] +
                                [(f"noise σ={s}", lambda c, s=s: c["noisy_acc"][str(s)]) for s in NOISE]):
        for method in METHODS:
            cs = [c for c in summary["cells"].values() if c["method"] == method]
            ns = [c["samples_per_class"] for c in cs]
            ax.errorbar(ns, [100 * get(c)["mean"] for c in cs], yerr=[100 * get(c)["std"] for c in cs],
                        marker="o", capsize=3, label=method)
        ax.set_xscale("log")
        ax.set_xticks(list(SAMPLES), [str(n) for n in SAMPLES])
        ax.set_xlabel("samples per class")
        ax.set_title(title)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend()
    fig.suptitle(f"{summary['dataset']}: students distilled from a teacher, mean ± std over {summary['seeds']} seeds")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
