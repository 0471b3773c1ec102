"""``jacmatch experiment SECTION``: the paper's experiments on Fashion-MNIST (issue: the
paper's claims measured on real data).

Each section composes run configs from ``configs/paper/*.yaml`` (what a run is) and the
grid below (which runs), trains them through :func:`run_or_load` (finished runs are
reused, interrupted ones resumed) and writes one JSON summary under ``results/paper/``.
``jacmatch report`` turns those JSONs into ``results/REPORT.md`` and its plots.

Hyperparameters are chosen on the validation split (never the test set), and the choice
is recorded in the section's JSON.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .._extras import require
from ..io import write_json_atomic
from ..training.config import merge_values, load_config
from .common import load_json, run_or_load, summarize_runs, with_provenance

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "paper"


@dataclass(frozen=True)
class Layout:
    """Where a profile's runs and results live, under ``root`` (``--out``; default the
    current folder): ``runs/paper/`` and ``results/paper/`` (``quick/`` for the smoke run)."""

    root: Path = Path(".")
    quick: bool = False

    @property
    def runs(self) -> Path:
        return self.root / "runs" / "paper" / ("quick" if self.quick else "")

    @property
    def out(self) -> Path:
        return self.root / "results" / ("quick" if self.quick else "paper")

    @property
    def teacher(self) -> Path:
        return self.out / "teacher.pt" if self.quick else self.root / "results" / "teachers" / "fmnist_resnet20.pt"

    @property
    def source_teacher(self) -> Path:
        return self.out / "source_teacher.pt" if self.quick else \
            self.root / "results" / "teachers" / "fmnist_0-4_resnet20.pt"


SAMPLES = (1, 5, 10, 50, 100, 500)
SEEDS = (0, 1, 2, 3, 4)
SIGMAS = (0.1, 0.2, 0.3, 0.5, 0.7)
ROWS = {  # the paper's rows: α (CE), β (KD), γ (JM; its value chosen on validation)
    "CE": {"alpha": 1.0},
    "CE+KD": {"alpha": 1.0, "beta": 1.0},
    "CE+JM": {"alpha": 1.0, "gamma": "γ_ce"},  # without KD, γ has its own choice
    "CE+KD+JM": {"alpha": 1.0, "beta": 1.0, "gamma": "γ"},
    "KD": {"alpha": 0.0, "beta": 1.0},
    "KD+JM": {"alpha": 0.0, "beta": 1.0, "gamma": "γ"},
}
ABLATIONS = {  # at a few n: the form, and which Jacobians
    "CE+KD+JM sq": {"alpha": 1.0, "beta": 1.0, "gamma": "γ_sq", "jm_form": "sq"},
    "CE+KD+JM label": {"alpha": 1.0, "beta": 1.0, "gamma": "γ", "jm_outputs": "label"},
    "CE+KD+JM projection": {"alpha": 1.0, "beta": 1.0, "gamma": "γ", "jm_outputs": "projection"},
}
ABLATION_SAMPLES = (5, 50)
STEP_BUDGETS = (200, 400)  # optimizer steps per student; 800 would take the section past its 60 minutes
TEMPERATURES = (2.0, 4.0, 8.0)
TAU_PRIOR = 4.0  # τ while the step budget is chosen (the KD literature's usual value)
GAMMAS = (0.1, 1.0, 10.0, 100.0)
GAMMAS_SQ = (0.01, 0.1, 1.0)
SELECTION = {"samples_per_class": 10, "seeds": (0, 1)}
SELECTION_EVAL = {"noise_sigmas": [], "jacobian_cosine": False}  # selection reads validation accuracy only
PLACEHOLDERS = ("τ", "γ", "γ_ce", "γ_sq", "δ", "δ_J")

QUICK = {  # a smoke run of every section: digits, tiny grids, one or two seeds
    "data": {"name": "digits", "augment": False},
    "model_teacher": "small_cnn_16", "model_student": "small_cnn_4",
    "optim": {"epochs": 2, "min_steps_per_epoch": 2, "batch_size": 64},
}


def _config(name: str, lay: "Layout", **over) -> dict:
    values = load_config(str(CONFIGS / f"{name}.yaml"))
    values = merge_values(values, {"progress": False, "tensorboard": False})
    if lay.quick:
        model = QUICK["model_teacher"] if "teacher" in name else QUICK["model_student"]
        values = merge_values(values, {"data": dict(QUICK["data"]), "model": {"name": model},
                                 "optim": dict(QUICK["optim"]), "eval": {"every": 1}})
        if values["data"].get("classes"):
            values["data"]["classes"] = [int(c) for c in values["data"]["classes"]]
    return merge_values(values, over)


def _paths(lay: Layout) -> tuple[Path, Path]:
    return lay.runs, lay.out


# ---- 1. teacher ---------------------------------------------------------------------------


def _train_teacher(config: str, run: str, target: Path, lay: Layout) -> tuple[dict, Path]:
    """Train (or reuse) a teacher and copy its checkpoint where the students read it:
    under results/teachers/ (committed, so students rerun without retraining)."""
    r = run_or_load(_config(config, lay, out_dir=str(lay.runs / run), seed=0))
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(lay.runs / run / "last.pt", target)
    return r, target


def teacher_section(lay: Layout) -> dict:
    _, out = _paths(lay)
    if not lay.quick and (out / "teacher.json").is_file() and lay.teacher.is_file():
        return load_json(out / "teacher.json")  # trained and committed: keep its record
    start = time.time()
    r, target = _train_teacher("teacher", "teacher", lay.teacher, lay)
    summary = {"model": r["config"]["model"]["name"], "parameters": r["student_parameters"],
               "test": r["final"]["test"], "val": r["final"]["val"], "epochs": r["epochs"],
               "train_seconds": r["train_seconds"], "section_seconds": time.time() - start,
               "checkpoint": str(target), "config": r["config"]}
    write_json_atomic(out / "teacher.json", with_provenance(summary, r["config"], [r]))
    return summary


def _teacher_path(lay: Layout) -> str:
    if not lay.teacher.is_file():
        raise ValueError(f"{lay.teacher} is missing: run `jacmatch experiment teacher"
                         f"{' --quick' if lay.quick else ''}` first")
    return str(lay.teacher)


def _run_seconds(cells: dict, *extra: dict) -> float:
    """The training time of a section's runs (cells, then selections or a teacher), summed:
    what a rerun from scratch costs (``section_seconds`` is only the last invocation's,
    which reuses finished runs)."""
    return sum(c["train_seconds"] for c in [*cells.values(), *extra])


def _fill(objective: dict, values: dict) -> dict:
    """``objective`` with its placeholders (τ, γ, …) replaced by their ``values``."""
    return {k: values.get(v, v) if isinstance(v, str) else v for k, v in objective.items()}


# ---- 2. distillation with few samples -----------------------------------------------------


def _epochs(n: int, values: dict, steps: int) -> int:
    """Epochs that give a student of n samples per class (10 classes) about ``steps`` steps
    (minus less than one epoch): an epoch repeats whole passes over the data up to
    min_steps_per_epoch, so it has 20 steps up to n = 50, 24 at n = 100, 40 at n = 500."""
    o = values["optim"]
    per_pass = math.ceil(10 * n / o["batch_size"])
    per_epoch = per_pass * max(math.ceil(o["min_steps_per_epoch"] / per_pass), 1)
    return max(steps // per_epoch, 1)


def _student(lay, tag, n, seed, objective, teacher, steps, selection=False) -> dict:
    runs, _ = _paths(lay)
    values = _config("distill", lay, out_dir=str(runs / "distill" / f"{tag}_n{n}_s{seed}"), seed=seed,
                     teacher=teacher, data={"samples_per_class": n}, objective=objective,
                     eval=SELECTION_EVAL if selection else {})
    if not lay.quick:
        values["optim"]["epochs"] = _epochs(n, values, steps)
    return run_or_load(values)


def _select(lay, name, grid, train) -> tuple[float, dict]:
    """The value in ``grid`` with the best mean validation accuracy (never the test set);
    ``train(value, tag, n, seed)`` trains one run with that value."""
    n = 5 if lay.quick else SELECTION["samples_per_class"]
    seeds = (0,) if lay.quick else SELECTION["seeds"]
    scores, seconds = {}, 0.0
    for value in grid:
        runs = [train(value, f"select-{name}-{value}", n, s) for s in seeds]
        scores[str(value)] = sum(r["final"]["val"]["acc"] for r in runs) / len(runs)
        seconds += sum(r["train_seconds"] for r in runs)
    best = max(grid, key=lambda v: scores[str(v)])
    return best, {"grid": list(grid), "val_acc": scores, "chosen": best, "samples_per_class": n,
                  "seeds": list(seeds), "train_seconds": seconds}


def _placeholder(lay, objective, teacher, student=_student, **kw):
    """A ``train`` for :func:`_select` that puts the value in place of ``objective``'s
    placeholder (τ, γ, γ_sq, δ or δ_J)."""
    return lambda value, tag, n, seed: student(lay, tag, n, seed, _fill(objective, dict.fromkeys(PLACEHOLDERS, value)),
                                               teacher, **kw)


def distill_section(lay: Layout) -> dict:
    runs, out = _paths(lay)
    teacher = _teacher_path(lay)
    start = time.time()
    # In this order, each on validation with the values chosen before it: the step budget
    # and τ on CE+KD, then γ for CE+KD+JM (also KD+JM and the label and projection
    # ablations), γ for CE+JM, and γ for the sq form.
    kd = {**ROWS["CE+KD"], "temperature": TAU_PRIOR}
    steps, sel_steps = _select(lay, "steps", STEP_BUDGETS[-1:] if lay.quick else STEP_BUDGETS,
                               lambda v, tag, n, seed: _student(lay, tag, n, seed, kd, teacher, v, selection=True))
    tau, sel_tau = _select(lay, "tau", (TAU_PRIOR,) if lay.quick else TEMPERATURES,
                           _placeholder(lay, {**ROWS["CE+KD"], "temperature": "τ"}, teacher, steps=steps,
                                        selection=True))
    choose = lambda name, grid, objective: _select(  # noqa: E731
        lay, name, grid[1:2] if lay.quick else grid,
        _placeholder(lay, {**objective, "temperature": tau}, teacher, steps=steps, selection=True))
    gamma, sel = choose("gamma", GAMMAS, ROWS["CE+KD+JM"])
    gamma_ce, sel_ce = choose("gamma_ce", GAMMAS, ROWS["CE+JM"])
    gamma_sq, sel_sq = choose("gamma_sq", GAMMAS_SQ, ABLATIONS["CE+KD+JM sq"])
    weights = {"γ": gamma, "γ_ce": gamma_ce, "γ_sq": gamma_sq}
    samples = (1, 5) if lay.quick else SAMPLES
    seeds = (0,) if lay.quick else SEEDS
    cells = {}
    ablation_samples = (5,) if lay.quick else ABLATION_SAMPLES
    summary = {"teacher": teacher, "selection": {"steps": sel_steps, "tau": sel_tau, "gamma": sel,
                                                   "gamma_ce": sel_ce, "gamma_sq": sel_sq},
               "steps": steps, "tau": tau, "seeds": list(seeds),
               "samples": list(samples), "cells": cells, "complete": False,
               "student": _config("distill", lay)["model"]["name"]}
    # n-major, smallest first: a partial run has every row at the smallest n, and the
    # JSON is rewritten after each cell, so the report can show what has run so far.
    for n in samples:
        grid = list(ROWS.items()) + (list(ABLATIONS.items()) if n in ablation_samples else [])
        for row, objective in grid:
            obj = {**_fill(objective, weights), "temperature": tau}
            tag = row.replace("+", "_").replace(" ", "_")
            cells[f"{row}|{n}"] = {"row": row, "samples_per_class": n, "objective": obj,
                                   **summarize_runs([_student(lay, tag, n, s, obj, teacher, steps) for s in seeds])}
            print(f"  {row:<22} n={n:<4} test {100 * cells[f'{row}|{n}']['acc']['mean']:.1f}"
                  f" ± {100 * cells[f'{row}|{n}']['acc']['std']:.1f}   [{time.time() - start:.0f} s]")
            summary["section_seconds"] = time.time() - start
            summary["run_seconds"] = _run_seconds(cells, *summary["selection"].values())
            write_json_atomic(out / "distill.json", with_provenance(summary, _config("distill", lay)))
    summary["complete"] = True
    write_json_atomic(out / "distill.json", with_provenance(summary, _config("distill", lay)))
    return summary


# ---- 3. robustness to noisy inputs --------------------------------------------------------

SIGMA_TRAIN = 0.3
ROBUST_ROWS = {
    "CE": {"alpha": 1.0},
    f"noise σ={SIGMA_TRAIN}": {"alpha": 1.0, "noise_sigma": SIGMA_TRAIN, "noise_draws": 1},
    # Prop. 2 (CE form): E CE(x+ξ) ≈ CE + σ²·½‖∇ log Sˢ_y‖², so λ = σ² is the equivalent weight.
    f"penalty λ=σ²={SIGMA_TRAIN ** 2:.2f}": {"alpha": 1.0, "penalty": SIGMA_TRAIN ** 2, "penalty_form": "ce"},
}


def robustness_section(lay: Layout) -> dict:
    runs, out = _paths(lay)
    start = time.time()
    seeds = (0,) if lay.quick else (0, 1, 2)
    cells = {}
    for subset in ((None, 10) if lay.quick else (None, 100)):
        for row, obj in ROBUST_ROWS.items():
            results = []
            for seed in seeds:
                tag = f"{row.split()[0]}_{'full' if subset is None else f'n{subset}'}_s{seed}"
                values = _config("robustness", lay, out_dir=str(runs / "robustness" / tag), seed=seed,
                                 data={"samples_per_class": subset}, objective=obj)
                results.append(run_or_load(values))
            key = f"{row}|{'full' if subset is None else subset}"
            cells[key] = {"row": row, "training_set": "full" if subset is None else f"{subset} per class",
                          "objective": obj, **summarize_runs(results)}
            print(f"  {key:<30} clean {100 * cells[key]['acc']['mean']:.1f}   [{time.time() - start:.0f} s]")
    summary = {"sigma_train": SIGMA_TRAIN, "seeds": list(seeds), "cells": cells,
               "section_seconds": time.time() - start, "run_seconds": _run_seconds(cells)}
    write_json_atomic(out / "robustness.json", with_provenance(summary, _config("robustness", lay)))
    return summary


# ---- 4. transfer --------------------------------------------------------------------------

TRANSFER_ROWS = {  # δ (AT) and δ_J (its Jacobians) chosen on validation, in that order
    "CE (scratch)": {"alpha": 1.0},
    "CE+AT": {"alpha": 1.0, "delta": "δ"},
    "CE+AT+JM": {"alpha": 1.0, "delta": "δ", "delta_jacobian": "δ_J"},
}
DELTAS = (0.1, 1.0, 10.0)


def _transfer_student(lay, tag, n, seed, objective, teacher) -> dict:
    runs, _ = _paths(lay)
    return run_or_load(_config("transfer", lay, out_dir=str(runs / "transfer" / f"{tag}_n{n}_s{seed}"), seed=seed,
                               teacher=teacher, data={"samples_per_class": n}, objective=objective))


def transfer_section(lay: Layout) -> dict:
    runs, out = _paths(lay)
    start = time.time()
    source, target = _train_teacher("transfer_teacher", "source_teacher", lay.source_teacher, lay)
    grid = (1.0,) if lay.quick else DELTAS
    delta, sel_at = _select(lay, "delta", grid,
                            _placeholder(lay, {"alpha": 1.0, "delta": "δ"}, str(target), _transfer_student))
    delta_j, sel_jm = _select(lay, "delta_jacobian", grid, _placeholder(
        lay, {"alpha": 1.0, "delta": delta, "delta_jacobian": "δ_J"}, str(target), _transfer_student))
    weights = {"δ": delta, "δ_J": delta_j}
    seeds = (0,) if lay.quick else SEEDS
    cells = {}
    for n in ((5,) if lay.quick else (5, 10, 50)):
        for row, objective in {**TRANSFER_ROWS, "fine-tune teacher (oracle)": None}.items():
            results = []
            for seed in seeds:
                if objective is None:  # the teacher's own network and weights (5 classes each side), fine-tuned
                    values = _config("transfer", lay, out_dir=str(runs / "transfer" / f"finetune_n{n}_s{seed}"),
                                     seed=seed, data={"samples_per_class": n}, init_from=str(target),
                                     model={"name": source["config"]["model"]["name"]},
                                     objective={"alpha": 1.0, "at_layers": []})
                    results.append(run_or_load(values))
                else:
                    results.append(_transfer_student(lay, row.split()[0].replace("+", "_"), n, seed,
                                                     _fill(objective, weights), str(target)))
            cells[f"{row}|{n}"] = {"row": row, "samples_per_class": n, **summarize_runs(results)}
            print(f"  {row:<28} n={n:<3} test {100 * cells[f'{row}|{n}']['acc']['mean']:.1f}   "
                  f"[{time.time() - start:.0f} s]")
    summary = {"source_teacher": {"test": source["final"]["test"], "checkpoint": str(target),
                                  "train_seconds": source["train_seconds"]},
               "selection": {"delta": sel_at, "delta_jacobian": sel_jm},
               "seeds": list(seeds), "cells": cells, "section_seconds": time.time() - start,
               "run_seconds": _run_seconds(cells, source, sel_at, sel_jm)}
    write_json_atomic(out / "transfer.json", with_provenance(summary, _config("transfer", lay)))
    return summary


# ---- 5. propositions and pictures ---------------------------------------------------------


def verify_section(lay: Layout) -> dict:
    from .verify import main as verify_main
    _, out = _paths(lay)
    start = time.time()
    records = verify_main(lay.quick, str(out / "verify.json"), str(out / "verify.png"))
    return {"records": len(records), "section_seconds": time.time() - start}


def pictures_section(lay: Layout) -> dict:
    """Input-gradients of the teacher and of the n=10, seed-0 students (KD and KD + JM)."""
    import torch

    from ..core.jacobian import input_jacobian, teacher_top1
    from ..data import create_dataset
    from ..training import load_model
    runs, out = _paths(lay)
    teacher, _ = load_model(_teacher_path(lay))
    n = 5 if lay.quick else 10
    students = {"CE+KD": runs / "distill" / f"CE_KD_n{n}_s0" / "last.pt",
                "CE+KD+JM": runs / "distill" / f"CE_KD_JM_n{n}_s0" / "last.pt"}
    missing = [str(p) for p in students.values() if not p.is_file()]
    if missing:
        raise ValueError(f"{missing} missing: run `jacmatch experiment distill` first")
    models = {"teacher": teacher, **{k: load_model(p)[0] for k, p in students.items()}}
    data = create_dataset("digits" if lay.quick else "fashion-mnist")
    x, _ = data.test.batch(torch.arange(6))
    with torch.enable_grad():
        xt = x.clone().requires_grad_()
        index = teacher_top1(teacher(xt).detach())
        grads = {}
        for name, model in models.items():
            xi = x.clone().requires_grad_()
            grads[name] = input_jacobian(model.eval()(xi), xi, index).detach()
    matplotlib = require("matplotlib", "plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(x), 1 + len(models), figsize=(2.0 * (1 + len(models)), 2.0 * len(x)))
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
    fig.savefig(out / "gradients.png", dpi=100)
    plt.close(fig)
    return {"figure": str(out / "gradients.png")}


SECTIONS = {"teacher": teacher_section, "distill": distill_section, "robustness": robustness_section,
            "transfer": transfer_section, "verify": verify_section, "pictures": pictures_section}


def main(section: str, quick: bool = False, out: str | None = None) -> None:
    """Run ``section`` (or ``all``), writing under ``out`` (default: the current folder)."""
    lay = Layout(Path(out) if out else Path("."), quick)
    names = list(SECTIONS) if section == "all" else [section]
    if any(n not in SECTIONS for n in names):
        raise ValueError(f"unknown section {section!r}: choose one of {list(SECTIONS) + ['all']}")
    timings = {}
    for name in names:
        start = time.time()
        print(f"== {name}", flush=True)
        SECTIONS[name](lay)
        timings[name] = time.time() - start
        print(f"== {name} done in {timings[name]:.0f} s")
