"""``jacmatch experiment SECTION``: the paper's experiments on Fashion-MNIST (issue: the
paper's claims measured on real data).

Each section composes run configs from ``configs/paper/*.yaml`` (what a run is) and a
:class:`Profile` (which runs: grids, seeds, sizes, as data), trains them through
:func:`run_or_load` (finished runs are reused, interrupted ones resumed) and writes one
JSON summary under ``results/paper/``. ``jacmatch report`` turns those JSONs into
``results/REPORT.md`` and its plots.

Hyperparameters are chosen on the validation split (never the test set), and the choice
is recorded in the section's JSON.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import write_json_atomic
from ..errors import UsageError
from ..training import TeacherGradients, load_checkpoint
from ..training.config import load_config, merge_values
from .common import converged, load_json, run_or_load, summarize, summarize_runs, with_provenance
from .figures import plot_gradients

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "paper"

ROWS = {  # the paper's rows: α (CE), β (KD), γ (JM; its value chosen on validation)
    "CE": {"alpha": 1.0},
    "CE+KD": {"alpha": 1.0, "beta": 1.0},
    "CE+JM": {"alpha": 1.0, "gamma": "γ_ce"},  # without KD, γ has its own choice
    "CE+KD+JM": {"alpha": 1.0, "beta": 1.0, "gamma": "γ"},
    "KD": {"alpha": 0.0, "beta": 1.0},
    "KD+JM": {"alpha": 0.0, "beta": 1.0, "gamma": "γ"},
}
NOISY_KD = {"alpha": 1.0, "beta": 1.0, "noise_sigma": "σ", "noise_draws": "M"}  # Proposition 1 taken literally
COMPUTE_ROWS = {  # what JM's cost buys otherwise: noisy KD, and KD trained for longer
    "noisy KD M=1": {**NOISY_KD, "noise_draws": 1},
    "CE+KD (JM's time)": None,  # CE+KD for as many steps as CE+KD+JM's measured training time allows
}
EQUAL_TIME_ROW = "CE+KD (JM's time)"
DOUBLED_ROW = "CE (2× steps)"
ABLATIONS = {  # at a few n: the form, and which Jacobians
    "CE+KD+JM sq": {"alpha": 1.0, "beta": 1.0, "gamma": "γ_sq", "jm_form": "sq"},
    "CE+KD+JM label": {"alpha": 1.0, "beta": 1.0, "gamma": "γ", "jm_outputs": "label"},
    "CE+KD+JM projection": {"alpha": 1.0, "beta": 1.0, "gamma": "γ", "jm_outputs": "projection"},
}
TAU_PRIOR = 4.0  # τ while the step budget is chosen (the KD literature's usual value)
SELECTION_EVAL = {"noise_sigmas": [], "jacobian_cosine": False}  # selection reads validation accuracy only
PLACEHOLDERS = ("τ", "γ", "γ_ce", "γ_sq", "σ", "δ", "δ_J")


@dataclass(frozen=True)
class Profile:
    """Which runs the sections train, as data: the grids searched on validation, the
    seeds, the sample counts, and settings merged into every run's config."""

    name: str  # results/<name>/ and runs/paper/<runs>/
    runs: str
    samples: tuple[int, ...]
    seeds: tuple[int, ...]
    ablation_samples: tuple[int, ...]
    selection_samples: int  # n of the validation runs that choose the grids' values
    selection_seeds: tuple[int, ...]
    grids: dict[str, tuple]  # lr, steps (budget per student), tau, gamma, gamma_ce, gamma_sq, sigma, delta, …
    robust_seeds: tuple[int, ...]
    robust_subsets: tuple  # training sets of section 3: None (the full set) or n per class
    transfer_samples: tuple[int, ...]
    pictures_samples: int
    models: dict[str, str] = field(default_factory=dict)  # teacher, student: instead of the configs'
    overrides: dict = field(default_factory=dict)  # merged into every run config
    budget_epochs: bool = True  # students' epochs from the step budget (else the config's)
    committed_teacher: bool = True  # the teacher lives in results/teachers/ and is reused once trained
    verify: dict = field(default_factory=dict)  # sizes of the propositions' check (experiments.verify.main)
    min_epochs: int = 0  # a student's budget: at least this many passes over its data ...
    max_steps: int = 10**9  # ... and at most this many steps (the time a section may take)
    max_chosen_steps: int = 10**9  # the budget chosen on validation is capped here (time), the passes are not
    noise_draws_equal: int = 1  # M of noisy KD at JM's cost; a row "noisy KD M=<M>" when over 1
    budget_check_samples: int | None = None  # n where CE also trains for twice its budget
    converge_steps: int = 3200  # the converged view: each student's first maximum (steps), early stopping inside it
    converge_patience: int = 10  # ... evaluations without a better validation accuracy before it stops
    converge_every: int = 2  # ... one evaluation every this many epochs (6,000 validation images each)
    converge_min_delta: float = 0.001  # ... better: by more than 0.1 point (6 of 6,000 validation images)
    converge_growths: int = 2  # ... and how often a maximum that binds is doubled
    budget_growths: int = 2  # how often sections 3 and 4 double their epochs while a baseline still gains at twice them


FULL = Profile(
    name="paper", runs="", samples=(1, 5, 10, 50, 100, 500), seeds=(0, 1, 2, 3, 4), ablation_samples=(50,),
    selection_samples=10, selection_seeds=(0, 1),
    grids={"lr": (0.003, 0.01, 0.03), "check_steps": (1600, 3200, 6400), "steps": (200, 400), "tau": (2.0, 4.0, 8.0),
           "gamma": (0.1, 1.0, 10.0, 100.0), "gamma_ce": (0.1, 1.0, 10.0, 100.0), "gamma_sq": (0.01, 0.1, 1.0),
           "sigma": (0.03, 0.1, 0.3), "delta": (0.1, 1.0, 10.0), "delta_jacobian": (0.1, 1.0, 10.0)},
    robust_seeds=(0, 1, 2), robust_subsets=(None, 100), transfer_samples=(5, 10, 50), pictures_samples=10,
    # A student takes at least 40 passes over its data, at most 1600 steps: what n = 500 needs at
    # the learning rate chosen on validation there; the report's budget check (CE at twice the
    # budget) says whether that was enough.
    # The budget validation chooses at n = 10 is capped at 400 steps, for time: each of the 5 n <= 100
    # trains 8 rows x 5 seeds at that budget (results/paper/distill.json has their seconds); the
    # report says when the cap binds.
    # At n = 500, where the budget is checked, the rule's 1600 steps were not enough (CE gained 1.1
    # points at twice that: distill.json of commit 97a06f5), so that n's budget is chosen on
    # validation among the rule's and its doublings (grid "check_steps").
    min_epochs=40, max_steps=1600, max_chosen_steps=400, budget_check_samples=500)

QUICK = Profile(  # a smoke run of every section: digits, tiny grids, one seed
    name="quick", runs="quick", samples=(1, 5), seeds=(0,), ablation_samples=(5,),
    selection_samples=5, selection_seeds=(0,),
    grids={"lr": (0.01, 0.03), "check_steps": (800,), "steps": (400,), "tau": (2.0, 4.0), "gamma": (0.1, 1.0),
           "gamma_ce": (1.0,), "gamma_sq": (0.1,), "sigma": (0.1,), "delta": (1.0,), "delta_jacobian": (1.0,)},
    robust_seeds=(0,), robust_subsets=(None, 10), transfer_samples=(5,), pictures_samples=5,
    models={"teacher": "small_cnn_16", "student": "small_cnn_4"},
    overrides={"data": {"name": "digits", "augment": False}, "eval": {"every": 1},
               "optim": {"epochs": 2, "min_steps_per_epoch": 2, "batch_size": 64}},
    budget_epochs=False, committed_teacher=False, verify={"num_sigmas": 5, "num_draws": 100_000},
    budget_check_samples=5, converge_steps=12, converge_patience=2, converge_growths=1, converge_every=1,
    budget_growths=1)

PROFILES = {p.name: p for p in (FULL, QUICK)}


@dataclass
class Layout:
    """Where a profile's runs and results live, under ``root`` (``--out``; default the
    current folder): ``runs/paper/`` and ``results/paper/``; and what the section's runs
    share in this process (the teacher's side of the Jacobian cosine)."""

    root: Path = Path(".")
    profile: Profile = FULL
    teacher_gradients: TeacherGradients = field(default_factory=TeacherGradients)
    data_cache: dict = field(default_factory=dict)  # the parsed data set, shared by the section's runs

    @property
    def runs(self) -> Path:
        return self.root / "runs" / "paper" / self.profile.runs

    @property
    def out(self) -> Path:
        return self.root / "results" / self.profile.name

    @property
    def teacher(self) -> Path:
        return self.root / "results" / "teachers" / "fmnist_resnet20.pt" if self.profile.committed_teacher \
            else self.out / "teacher.pt"

    @property
    def source_teacher(self) -> Path:
        return self.root / "results" / "teachers" / "fmnist_0-4_resnet20.pt" if self.profile.committed_teacher \
            else self.out / "source_teacher.pt"

    @property
    def records(self) -> Path:
        """The finished runs' records (committed): results/<profile>/runs/."""
        return self.out / "runs"

    def record_of(self, run: Path) -> Path:
        """The record of the run in folder ``run`` (``runs/paper/distill/CE_n5_s0`` ->
        ``results/paper/runs/distill/CE_n5_s0.json``)."""
        relative = run.relative_to(self.runs)
        return self.records / relative.parent / f"{relative.name}.json"

    def train(self, values: dict, record: bool = True) -> dict:
        """A run of this layout, reused when finished, in its folder under runs/ or as its
        record under results/<profile>/runs/ (``record``: a student's; a teacher's run
        needs its checkpoint). The teacher's gradients are shared."""
        where = self.record_of(Path(values["out_dir"])) if record else None
        return run_or_load(values, teacher_gradients=self.teacher_gradients, data_cache=self.data_cache,
                           record=where)


def run_config(name: str, profile: Profile = FULL, **over) -> dict:
    """The config of a run of section config ``name`` under ``profile``, with ``over``."""
    values = merge_values(load_config(str(CONFIGS / f"{name}.yaml")), {"progress": False, "tensorboard": False})
    values = merge_values(values, profile.overrides)
    if profile.models:
        values = merge_values(values, {"model": {"name": profile.models["teacher" if "teacher" in name else "student"]}})
    if values["data"].get("classes"):
        values["data"]["classes"] = [int(c) for c in values["data"]["classes"]]
    return merge_values(values, over)


# ---- 1. teacher ---------------------------------------------------------------------------


def _train_teacher(config: str, run: str, target: Path, lay: Layout) -> tuple[dict, Path]:
    """Train (or reuse) a teacher and copy its checkpoint where the students read it:
    under results/teachers/ (committed, so students rerun without retraining)."""
    r = lay.train(run_config(config, lay.profile, out_dir=str(lay.runs / run), seed=0), record=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(lay.runs / run / "last.pt", target)
    return r, target


def _committed_teacher(path: Path) -> dict:
    """What a section needs of a committed teacher checkpoint, read back from it: its config,
    final test metrics and training time (the epochs' own seconds, evaluation left out)."""
    state = load_checkpoint(path)
    history = json.loads(state["history"])
    return {"config": json.loads(state["config"]), "final": {"test": history[-1]["test"]},
            "train_seconds": sum(h.get("epoch_seconds", 0.0) for h in history)}


def _check_committed_teacher(lay: Layout, record: dict) -> dict:
    """The committed teacher re-evaluated by this code, on the data its config reads now,
    as the trainer evaluated it at its last epoch. ``reproduced`` says whether every
    accuracy came out the same; the record keeps its training numbers and gains the
    provenance of this check and its checkpoint's SHA-256."""
    import hashlib

    from ..training import config_from_dict, evaluate_splits, load_data, load_model
    from ..training.provenance import provenance
    model, state = load_model(lay.teacher)
    cfg = config_from_dict(json.loads(state["config"]))
    data = load_data(cfg)
    again = evaluate_splits(model, data, cfg)
    check = {**again, "reproduced": again["test"] == record["test"] and again["val"]["acc"] == record["val"]["acc"],
             "checkpoint_sha256": hashlib.sha256(lay.teacher.read_bytes()).hexdigest(),
             "note": "the training predates provenance: this provenance is the check's, run on the committed checkpoint"}
    summary = {**record, "check": check, "provenance": provenance(record["config"], data.data_sha256)}
    write_json_atomic(lay.out / "teacher.json", summary)
    return summary


def teacher_section(lay: Layout) -> dict:
    out = lay.out
    if lay.profile.committed_teacher and (out / "teacher.json").is_file() and lay.teacher.is_file():
        record = load_json(out / "teacher.json")  # trained and committed: keep its record
        return record if "provenance" in record else _check_committed_teacher(lay, record)
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
        raise UsageError(f"{lay.teacher} is missing: run `jacmatch experiment teacher"
                         f"{'' if lay.profile is FULL else ' --' + lay.profile.name}` first")
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


def epochs_for_steps(n: int, values: dict, steps: int) -> int:
    """Epochs that give a student of n samples per class (10 classes) about ``steps`` steps
    (minus less than one epoch): an epoch repeats whole passes over the data up to
    min_steps_per_epoch, so it has 20 steps up to n = 50, 24 at n = 100, 40 at n = 500."""
    o = values["optim"]
    per_pass = math.ceil(10 * n / o["batch_size"])
    per_epoch = per_pass * max(math.ceil(o["min_steps_per_epoch"] / per_pass), 1)
    return max(steps // per_epoch, 1)


def _student(lay, tag, n, seed, objective, teacher, steps, selection=False, lr=None) -> dict:
    values = run_config("distill", lay.profile, out_dir=str(lay.runs / "distill" / f"{tag}_n{n}_s{seed}"),
                        seed=seed, teacher=teacher, data={"samples_per_class": n}, objective=objective,
                        eval=SELECTION_EVAL if selection else {}, optim={} if lr is None else {"lr": lr})
    if lay.profile.budget_epochs:
        values["optim"]["epochs"] = epochs_for_steps(n, values, steps)
    return lay.train(values)


MAX_EXTENSIONS = 3  # how far a grid may grow past an edge that wins


def _beyond(grid: list, low: bool) -> float:
    """The next value past the grid's low or high edge, at the grid's own spacing there
    (geometric: 10 after 0.1, 1; 16 after 4, 8)."""
    a, b = (grid[1], grid[0]) if low else (grid[-2], grid[-1])
    value = b * b / a if a > 0 and b > 0 else 2 * b - a
    return type(b)(float(f"{value:.12g}"))  # 0.01, not 0.010000000000000002


def _select(lay, name, train, samples=None) -> tuple[float, dict]:
    """The value in the profile's grid ``name`` with the best mean validation accuracy
    (never the test set) of students of ``samples`` per class (default: the profile's
    selection_samples); ``train(value, tag, n, seed)`` trains one run with that value.
    When an edge of the grid wins, the grid grows past it (at its own spacing, up to
    MAX_EXTENSIONS times) until the choice lies strictly inside; the record says so."""
    grid, seeds = list(lay.profile.grids[name]), lay.profile.selection_seeds
    n = samples or lay.profile.selection_samples
    scores: dict[str, float] = {}
    seconds = 0.0
    extended: list = []
    while True:
        for value in grid:
            if str(value) not in scores:
                runs = [train(value, f"select-{name}-{value}", n, s) for s in seeds]
                scores[str(value)] = sum(r["final"]["val"]["acc"] for r in runs) / len(runs)
                seconds += sum(r["train_seconds"] for r in runs)
        best = max(grid, key=lambda v: scores[str(v)])
        at = grid.index(best)
        if len(grid) < 2 or 0 < at < len(grid) - 1 or len(extended) == MAX_EXTENSIONS:
            break
        new = _beyond(grid, low=at == 0)
        grid = [new, *grid] if at == 0 else [*grid, new]
        extended.append(new)
    return best, {"grid": grid, "val_acc": {str(v): scores[str(v)] for v in grid}, "chosen": best,
                  "inside": 0 < at < len(grid) - 1, "extended": extended, "samples_per_class": n,
                  "seeds": list(seeds), "train_seconds": seconds}


def _placeholder(lay, objective, teacher, student=_student, **kw):
    """A ``train`` for :func:`_select` that puts the value in place of ``objective``'s
    placeholder (τ, γ, γ_sq, δ or δ_J)."""
    return lambda value, tag, n, seed: student(lay, tag, n, seed, _fill(objective, dict.fromkeys(PLACEHOLDERS, value)),
                                               teacher, **kw)


def _budget(profile: Profile, n: int, values: dict, steps: int, check_steps: int | None = None) -> int:
    """The step budget of a student of n samples per class: the budget chosen on validation
    (at most ``max_chosen_steps``), or at least ``min_epochs`` passes over its data, at most
    ``max_steps`` (time); at the n where the budget is checked, ``check_steps`` when given
    (chosen on validation there)."""
    if check_steps is not None and n == profile.budget_check_samples:
        return check_steps
    per_pass = math.ceil(10 * n / values["optim"]["batch_size"])
    return min(max(min(steps, profile.max_chosen_steps), profile.min_epochs * per_pass), profile.max_steps)


def _distill_selection(lay: Layout, teacher: str) -> tuple[dict, dict]:
    """In this order, each on validation with the values chosen before it: the learning
    rate on CE at the n where the budget is checked (the largest, slowest to converge), with
    the rule's budget there; that n's own step budget on CE; the step budget (for the other
    n) and τ on CE+KD; then γ for CE+KD+JM (also KD+JM and the label and projection
    ablations), γ for CE+JM, γ for the sq form, and σ of noisy KD (one draw). Returns
    (values, selection records)."""
    profile, config = lay.profile, run_config("distill", lay.profile)
    lr, sel_lr = _select(lay, "lr", lambda v, tag, n, seed: _student(
        lay, tag, n, seed, ROWS["CE"], teacher, _budget(profile, n, config, 0), selection=True, lr=v),
        samples=profile.budget_check_samples)
    check_steps, sel_check = _select(lay, "check_steps", lambda v, tag, n, seed: _student(
        lay, tag, n, seed, ROWS["CE"], teacher, v, selection=True, lr=lr), samples=profile.budget_check_samples)
    kd = {**ROWS["CE+KD"], "temperature": TAU_PRIOR}
    steps, sel_steps = _select(lay, "steps", lambda v, tag, n, seed: _student(lay, tag, n, seed, kd, teacher, v,
                                                                               selection=True, lr=lr))
    steps = _budget(profile, profile.selection_samples, config, steps)  # what the cells at that n take
    tau, sel_tau = _select(lay, "tau", _placeholder(lay, {**ROWS["CE+KD"], "temperature": "τ"}, teacher,
                                                    steps=steps, selection=True, lr=lr))
    chosen = {"lr": lr, "check_steps": check_steps, "steps": steps, "tau": tau}
    selection = {"lr": sel_lr, "check_steps": sel_check, "steps": sel_steps, "tau": sel_tau}
    for name, objective in (("gamma", ROWS["CE+KD+JM"]), ("gamma_ce", ROWS["CE+JM"]),
                            ("gamma_sq", ABLATIONS["CE+KD+JM sq"]), ("sigma", COMPUTE_ROWS["noisy KD M=1"])):
        chosen[name], selection[name] = _select(lay, name, _placeholder(
            lay, {**objective, "temperature": tau}, teacher, steps=steps, selection=True, lr=lr))
    return chosen, selection


def _noisy_rows(profile: Profile) -> dict:
    """Noisy KD's rows: one draw, and M at JM's cost when that is more than one."""
    m = profile.noise_draws_equal
    return {"noisy KD M=1": COMPUTE_ROWS["noisy KD M=1"], **({f"noisy KD M={m}": NOISY_KD} if m > 1 else {})}


def _cell(lay, row, n, objective, teacher, steps, lr, tag=None) -> dict:
    tag = tag or re.sub(r"[^A-Za-z0-9]+", "_", row).strip("_")  # CE+KD+JM sq -> CE_KD_JM_sq
    runs = [_student(lay, tag, n, s, objective, teacher, steps, lr=lr) for s in lay.profile.seeds]
    return {"row": row, "samples_per_class": n, "objective": objective, "steps": steps, **summarize_runs(runs),
            "loop_seconds": summarize([r.get("loop_seconds", r["train_seconds"]) for r in runs])}


def _cells_at(lay: Layout, n: int, chosen: dict, teacher: str, cells: dict, say) -> None:
    """Every row at n: the paper's, noisy KD, KD at JM's training time, the ablations, and
    CE at twice its budget where the budget is checked."""
    profile, values = lay.profile, run_config("distill", lay.profile)
    steps = _budget(profile, n, values, chosen["steps"], chosen["check_steps"])
    weights = {"γ": chosen["gamma"], "γ_ce": chosen["gamma_ce"], "γ_sq": chosen["gamma_sq"], "σ": chosen["sigma"],
               "M": profile.noise_draws_equal}
    grid = {**ROWS, **_noisy_rows(profile), **(ABLATIONS if n in profile.ablation_samples else {})}
    for row, objective in grid.items():
        cells[f"{row}|{n}"] = _cell(lay, row, n, {**_fill(objective, weights), "temperature": chosen["tau"]}, teacher,
                                    steps, chosen["lr"])
        say(cells[f"{row}|{n}"])
    # CE+KD trained for as long as CE+KD+JM took (the epochs' own seconds, mean over seeds)
    ratio = cells[f"CE+KD+JM|{n}"]["loop_seconds"]["mean"] / cells[f"CE+KD|{n}"]["loop_seconds"]["mean"]
    kd = {**ROWS["CE+KD"], "temperature": chosen["tau"]}
    cell = _cell(lay, EQUAL_TIME_ROW, n, kd, teacher, max(round(steps * ratio), steps), chosen["lr"],
                 tag="CE_KD_equal_time")
    cells[f"{EQUAL_TIME_ROW}|{n}"] = {**cell, "time_ratio": ratio}
    say(cell)
    if n == profile.budget_check_samples:
        ce = cells[f"CE|{n}"]["objective"]  # the CE row's own settings, for twice its steps
        cells[f"{DOUBLED_ROW}|{n}"] = _cell(lay, DOUBLED_ROW, n, ce, teacher, 2 * steps, chosen["lr"], tag="CE_doubled")
        say(cells[f"{DOUBLED_ROW}|{n}"])


def distill_section(lay: Layout) -> dict:
    out, profile = lay.out, lay.profile
    teacher = _teacher_path(lay)
    start = time.time()
    chosen, selection = _distill_selection(lay, teacher)
    cells: dict = {}
    config = run_config("distill", profile)
    summary = {"teacher": teacher, "selection": selection, "lr": chosen["lr"], "steps": chosen["steps"], "tau": chosen["tau"],
               "budgets": {str(n): _budget(profile, n, config, chosen["steps"], chosen["check_steps"])
                           for n in profile.samples},
               "budget_rule": {"min_epochs": profile.min_epochs, "max_steps": profile.max_steps,
                               "max_chosen_steps": min(profile.max_chosen_steps, profile.max_steps)},
               "noise_draws_equal": profile.noise_draws_equal, "seeds": list(profile.seeds),
               "samples": list(profile.samples), "cells": cells, "complete": False, "student": config["model"]["name"],
               "rows": {"paper": list(ROWS), "equal_compute": ["CE+KD", "CE+KD+JM", *_noisy_rows(profile), EQUAL_TIME_ROW],
                        "ablations": list(ABLATIONS), "budget_check": ["CE", DOUBLED_ROW]},
               "budget_check_samples": profile.budget_check_samples}

    def say(cell):  # the JSON is rewritten after each cell, so the report can show what has run so far
        print(f"  {cell['row']:<22} n={cell['samples_per_class']:<4} test {100 * cell['acc']['mean']:.1f} ± "
              f"{100 * cell['acc']['std']:.1f}   [{time.time() - start:.0f} s]", flush=True)
        summary["section_seconds"] = time.time() - start
        summary["run_seconds"] = _run_seconds(cells, *summary["selection"].values())
        write_json_atomic(out / "distill.json", with_provenance(summary, config))
    for n in profile.samples:  # n-major, smallest first: a partial run has every row at the smallest n
        _cells_at(lay, n, chosen, teacher, cells, say)
    summary["complete"] = True
    write_json_atomic(out / "distill.json", with_provenance(summary, config))
    return summary


# ---- 2b. distillation at convergence ---------------------------------------------------------

CONVERGE_ROWS = ("CE", "CE+KD", "CE+JM", "CE+KD+JM")
CHECKED_ROWS = ("CE", "CE+KD")  # trained again with twice the patience and maximum: the budget check
REACH = 0.99  # time-to-accuracy: steps and seconds to 99% of a row's own best validation accuracy


def _converge_student(lay, tag, n, seed, objective, teacher, max_steps, patience, lr) -> dict:
    """A student trained up to ``max_steps`` at a constant learning rate, evaluated on
    validation every ``converge_every`` epochs, stopped after ``patience`` evaluations
    without a better accuracy, and tested with its best weights."""
    values = run_config("distill", lay.profile, seed=seed, teacher=teacher, data={"samples_per_class": n},
                        objective=objective, optim={"lr": lr, "schedule": "constant"},
                        eval={"every": lay.profile.converge_every, "keep_best": True, "patience": patience,
                              "min_delta": lay.profile.converge_min_delta},
                        out_dir=str(lay.runs / "converge" / f"{tag}_n{n}_s{seed}_max{max_steps}_p{patience}"))
    values["optim"]["epochs"] = epochs_for_steps(n, values, max_steps)
    return lay.train(values)


def _curve(run: dict) -> list[tuple[int, float, float]]:
    """(steps, training seconds, validation accuracy) after each evaluated epoch."""
    steps = seconds = 0.0
    out = []
    for h in run["history"]:
        steps, seconds = steps + h["steps"], seconds + h.get("epoch_seconds", 0.0)
        if "val" in h:
            out.append((int(steps), seconds, h["val"]["acc"]))
    return out


def _reach(curve: list[tuple], target: float) -> tuple[int, float] | None:
    """The first (steps, seconds) of ``curve`` at or above ``target`` validation accuracy."""
    return next(((st, sec) for st, sec, acc in curve if acc >= target - 1e-12), None)


def _settled(run: dict) -> bool:
    """The run stopped early, its best point strictly inside its maximum. At a constant rate a
    larger maximum trains it step for step the same (the rate and draws of an epoch do not
    depend on the maximum), so it is not trained again when its cell's maximum grows."""
    return run["best"]["inside"] and run["best"]["stopped_early"]


def _converged_cell(lay, row, n, objective, teacher, lr, patience, check=False) -> dict:
    """One row at n over the seeds, its maximum doubled while a seed's best point lies at it
    (or a seed did not stop); only those seeds train again."""
    profile = lay.profile
    tag = re.sub(r"[^A-Za-z0-9]+", "_", row).strip("_")
    max_steps, grown, by_seed = profile.converge_steps * (2 if check else 1), [], {}
    while True:
        by_seed = {s: by_seed[s] if s in by_seed and _settled(by_seed[s])
                   else _converge_student(lay, tag, n, s, objective, teacher, max_steps, patience, lr)
                   for s in profile.seeds}
        runs = list(by_seed.values())
        inside = all(_settled(r) for r in runs)
        if inside or len(grown) == profile.converge_growths:
            break
        grown.append(max_steps)
        max_steps *= 2
    curves = [_curve(r) for r in runs]
    own = [_reach(c, REACH * r["best"]["val_acc"]) for c, r in zip(curves, runs)]
    return {"row": row, "samples_per_class": n, "objective": objective, "max_steps": max_steps, "patience": patience,
            "grown_from": grown, "inside": inside, **summarize_runs(runs),
            "best_step": summarize([r["best"]["step"] for r in runs]),
            "best_seconds": summarize([r["best"]["loop_seconds"] for r in runs]),
            "to_own_99": {"steps": _summary([o[0] for o in own if o]), "seconds": _summary([o[1] for o in own if o])},
            "curves": curves}


def _summary(values: list) -> dict | None:
    """``summarize`` of the seeds that have a value (None when none has)."""
    return summarize(values) if values else None


def _to_target(cell: dict, target: float) -> dict:
    """Steps and seconds of each seed's curve to ``target`` validation accuracy (seeds that reach it)."""
    reached = [r for r in (_reach(c, target) for c in cell["curves"]) if r]
    return {"target": target, "reached": len(reached), "seeds": len(cell["curves"]),
            "steps": _summary([r[0] for r in reached]), "seconds": _summary([r[1] for r in reached])}


def converge_section(lay: Layout) -> dict:
    """Every student trained as long as it needs: the paper's four rows at every n, with the
    learning rate, τ and γ that the distillation section chose on validation, early-stopped
    inside a maximum that grows while it binds; CE and CE+KD again with twice the patience
    and maximum (the budget check, on validation accuracy); time-to-accuracy from each
    run's validation curve."""
    d = load_json(lay.out / "distill.json")
    if not d or "selection" not in d:
        raise UsageError(f"{lay.out / 'distill.json'} is missing: run `jacmatch experiment distill"
                         f"{'' if lay.profile is FULL else ' --' + lay.profile.name}` first (its choices are used)")
    profile, teacher, start = lay.profile, _teacher_path(lay), time.time()
    chosen = {k: d["selection"][k]["chosen"] for k in ("lr", "tau", "gamma", "gamma_ce")}
    weights = {"γ": chosen["gamma"], "γ_ce": chosen["gamma_ce"]}
    cells: dict = {}
    summary = {"teacher": teacher, "chosen": chosen, "rows": list(CONVERGE_ROWS), "checked_rows": list(CHECKED_ROWS),
               "samples": list(profile.samples), "seeds": list(profile.seeds), "cells": cells, "complete": False,
               "rule": {"first_max_steps": profile.converge_steps, "patience": profile.converge_patience,
                        "eval_every_epochs": profile.converge_every, "min_delta": profile.converge_min_delta,
                        "growths": profile.converge_growths, "schedule": "constant", "reach": REACH}}
    config = run_config("distill", profile)
    for n in profile.samples:
        for row in CONVERGE_ROWS:
            objective = {**_fill(ROWS[row], weights), "temperature": chosen["tau"]}
            cells[f"{row}|{n}"] = _converged_cell(lay, row, n, objective, teacher, chosen["lr"],
                                                  profile.converge_patience)
        for row in CHECKED_ROWS:
            cell = _converged_cell(lay, row, n, cells[f"{row}|{n}"]["objective"], teacher, chosen["lr"],
                                   2 * profile.converge_patience, check=True)
            cells[f"{row} (2× patience)|{n}"] = {**cell, "row": f"{row} (2× patience)",
                                                 "val_gain": 100 * (cell["val_acc"]["mean"]
                                                                    - cells[f"{row}|{n}"]["val_acc"]["mean"])}
        kd = cells[f"CE+KD|{n}"]["val_acc"]["mean"]
        for row in CONVERGE_ROWS:
            cells[f"{row}|{n}"]["to_kd"] = _to_target(cells[f"{row}|{n}"], kd)
        summary["section_seconds"] = time.time() - start
        summary["run_seconds"] = _run_seconds(cells)
        print(f"  n={n}: " + ", ".join(f"{r} {100 * cells[f'{r}|{n}']['acc']['mean']:.1f}" for r in CONVERGE_ROWS)
              + f"   [{time.time() - start:.0f} s]", flush=True)
        write_json_atomic(lay.out / "converge.json", with_provenance(summary, config))
    summary["complete"] = True
    write_json_atomic(lay.out / "converge.json", with_provenance(summary, config))
    return summary


# ---- 3. robustness to noisy inputs --------------------------------------------------------

SIGMA_TRAIN = 0.3
ROBUST_ROWS = {
    "CE": {"alpha": 1.0},
    f"noise σ={SIGMA_TRAIN}": {"alpha": 1.0, "noise_sigma": SIGMA_TRAIN, "noise_draws": 1},
    # Prop. 2 (CE form): E CE(x+ξ) ≈ CE + σ²·½‖∇ log Sˢ_y‖², so λ = σ² is the equivalent weight.
    f"penalty λ=σ²={SIGMA_TRAIN ** 2:.2f}": {"alpha": 1.0, "penalty": SIGMA_TRAIN ** 2, "penalty_form": "ce"},
}


DOUBLED_EPOCHS = "CE (2× epochs)"


def _epochs_tag(tag: str, epochs: int, base: int) -> str:
    """A run's folder name at ``epochs``: ``CE_full_s0`` at the config's, ``CE_full_e16_s0``
    at others; a baseline at twice the epochs is the same run as that row grown to them."""
    if epochs == base:
        return tag
    head, seed = tag.rsplit("_s", 1)
    return f"{head}_e{epochs}_s{seed}"


def _check_cell(cell: dict, doubled: list[dict]) -> dict:
    """A baseline at twice its budget, beside the cell at its budget: the change in validation
    and test accuracy (points, the means over seeds)."""
    twice = summarize_runs(doubled)
    return {**twice, "epochs": doubled[0]["epochs"], "val_gain": 100 * (twice["val_acc"]["mean"] - cell["val_acc"]["mean"]),
            "test_gain": 100 * (twice["acc"]["mean"] - cell["acc"]["mean"])}


def _until_converged(lay: Layout, base: int, rows, baselines: tuple[str, ...]) -> tuple[dict, dict, int, dict]:
    """A section's rows trained as long as their baselines need: ``rows(epochs)`` trains
    every row at ``epochs`` (one cell per row); each baseline also at twice them (the
    budget check). While a baseline still gains ``CONVERGED_GAIN`` or more of validation
    accuracy there, every row is trained again at twice the epochs (at most
    ``budget_growths`` times); a baseline's check is then its row's own run. Returns
    (cells, checks, epochs, growth): the cells without their runs, with the epochs grown
    from and the gains that grew them; ``growth`` has those and the training seconds of the
    rows left behind."""
    epochs, growth = base, {"grown_from": [], "val_gains": [], "seconds_left_behind": 0.0}
    while True:
        cells, twice = rows(epochs), rows(2 * epochs, only=baselines)
        checks = {row: {**_check_cell(cells[row], twice[row]["runs"]), "row": f"{row} (2× epochs)"} for row in baselines}
        if (all(converged(c["val_gain"]) for c in checks.values())
                or len(growth["grown_from"]) == lay.profile.budget_growths):
            kept = {"grown_from": growth["grown_from"], "gains_grown_from": growth["val_gains"]}
            return ({row: {k: v for k, v in c.items() if k != "runs"} | kept for row, c in cells.items()}, checks,
                    epochs, growth)
        growth["grown_from"].append(epochs)
        growth["val_gains"].append({row: c["val_gain"] for row, c in checks.items()})
        # the baselines' runs at twice the epochs are the next rows' own: not left behind
        growth["seconds_left_behind"] += sum(c["train_seconds"] for c in cells.values())
        epochs *= 2


def robustness_section(lay: Layout) -> dict:
    """Training with noise and with the Jacobian penalty against CE, tested under noise, on
    the full set and on n per class; all rows at the epochs that CE needs (grown while CE at
    twice them still gains on validation)."""
    out, profile = lay.out, lay.profile
    start = time.time()
    cells, left_behind = {}, 0.0
    base = run_config("robustness", profile)["optim"]["epochs"]
    for subset in profile.robust_subsets:
        where = "full" if subset is None else subset
        training_set = "full" if subset is None else f"{subset} per class"

        def rows(epochs, only=tuple(ROBUST_ROWS), subset=subset, training_set=training_set):
            out = {}
            for row in only:
                results = [lay.train(run_config(
                    "robustness", profile, seed=seed, data={"samples_per_class": subset}, objective=ROBUST_ROWS[row],
                    optim={"epochs": epochs}, out_dir=str(lay.runs / "robustness" / _epochs_tag(
                        f"{row.split()[0]}_{'full' if subset is None else f'n{subset}'}_s{seed}", epochs, base))))
                    for seed in profile.robust_seeds]
                out[row] = {"row": row, "training_set": training_set, "objective": ROBUST_ROWS[row], "epochs": epochs,
                            **summarize_runs(results), "runs": results}
            return out
        grown_cells, checks, epochs, growth = _until_converged(lay, base, rows, ("CE",))
        left_behind += growth["seconds_left_behind"]
        for row, cell in grown_cells.items():
            cells[f"{row}|{where}"] = cell
            print(f"  {row}|{where:<24} {epochs} epochs, clean {100 * cell['acc']['mean']:.1f}   "
                  f"[{time.time() - start:.0f} s]", flush=True)
        cells[f"{DOUBLED_EPOCHS}|{where}"] = {**checks["CE"], "row": DOUBLED_EPOCHS, "training_set": training_set}
    summary = {"sigma_train": SIGMA_TRAIN, "seeds": list(profile.robust_seeds), "cells": cells, "base_epochs": base,
               "section_seconds": time.time() - start,
               "run_seconds": _run_seconds(cells, {"train_seconds": left_behind})}
    write_json_atomic(out / "robustness.json", with_provenance(summary, run_config("robustness", profile)))
    return summary


# ---- 4. transfer --------------------------------------------------------------------------

TRANSFER_ROWS = {  # δ (AT) and δ_J (its Jacobians) chosen on validation, in that order
    "CE (scratch)": {"alpha": 1.0},
    "CE+AT": {"alpha": 1.0, "delta": "δ"},
    "CE+AT+JM": {"alpha": 1.0, "delta": "δ", "delta_jacobian": "δ_J"},
}
ORACLE = "fine-tune teacher (oracle)"


def _transfer_epochs(profile: Profile) -> int:
    return run_config("transfer", profile)["optim"]["epochs"]


def _transfer_student(lay, tag, n, seed, objective, teacher, epochs: int | None = None) -> dict:
    """A target-task student; ``epochs``: the config's when None."""
    base = _transfer_epochs(lay.profile)
    epochs = epochs or base
    return lay.train(run_config("transfer", lay.profile, seed=seed, teacher=teacher, data={"samples_per_class": n},
                                objective=objective, optim={"epochs": epochs}, out_dir=str(
                                    lay.runs / "transfer" / _epochs_tag(f"{tag}_n{n}_s{seed}", epochs, base))))


def _fine_tune(lay, n, seed, source: dict, target: Path, epochs: int) -> dict:
    """The teacher's own network and weights (5 classes each side), fine-tuned."""
    base = _transfer_epochs(lay.profile)
    return lay.train(run_config("transfer", lay.profile, seed=seed, data={"samples_per_class": n}, init_from=str(target),
                                model={"name": source["config"]["model"]["name"]}, optim={"epochs": epochs},
                                objective={"alpha": 1.0, "at_layers": []},
                                out_dir=str(lay.runs / "transfer" / _epochs_tag(f"finetune_n{n}_s{seed}", epochs, base))))


def transfer_section(lay: Layout) -> dict:
    out, profile = lay.out, lay.profile
    start = time.time()
    if lay.profile.committed_teacher and lay.source_teacher.is_file():  # committed: students rerun without it
        source, target = _committed_teacher(lay.source_teacher), lay.source_teacher
    else:
        source, target = _train_teacher("transfer_teacher", "source_teacher", lay.source_teacher, lay)
    delta, sel_at = _select(lay, "delta", _placeholder(lay, {"alpha": 1.0, "delta": "δ"}, str(target),
                                                       _transfer_student))
    delta_j, sel_jm = _select(lay, "delta_jacobian", _placeholder(
        lay, {"alpha": 1.0, "delta": delta, "delta_jacobian": "δ_J"}, str(target), _transfer_student))
    weights = {"δ": delta, "δ_J": delta_j}
    cells, left_behind, base = {}, 0.0, _transfer_epochs(profile)
    for n in profile.transfer_samples:
        def rows(epochs, only=(*TRANSFER_ROWS, ORACLE), n=n):
            out = {}
            for row in only:
                objective = TRANSFER_ROWS.get(row)
                results = [_fine_tune(lay, n, seed, source, target, epochs) if objective is None else
                           _transfer_student(lay, row.split()[0].replace("+", "_"), n, seed, _fill(objective, weights),
                                             str(target), epochs) for seed in profile.seeds]
                out[row] = {"row": row, "samples_per_class": n, "epochs": epochs, **summarize_runs(results),
                            "runs": results}
            return out
        # the baselines of claim (d): CE from scratch and CE+AT
        grown_cells, checks, epochs, growth = _until_converged(lay, base, rows, ("CE (scratch)", "CE+AT"))
        left_behind += growth["seconds_left_behind"]
        for row, cell in grown_cells.items():
            cells[f"{row}|{n}"] = cell
            print(f"  {row:<28} n={n:<3} {epochs} epochs, test {100 * cell['acc']['mean']:.1f}   "
                  f"[{time.time() - start:.0f} s]", flush=True)
        for check in checks.values():
            cells[f"{check['row']}|{n}"] = {**check, "samples_per_class": n}
    summary = {"source_teacher": {"test": source["final"]["test"], "checkpoint": str(target),
                                  "train_seconds": source["train_seconds"]},
               "selection": {"delta": sel_at, "delta_jacobian": sel_jm},
               "seeds": list(profile.seeds), "cells": cells, "base_epochs": base, "section_seconds": time.time() - start,
               "run_seconds": _run_seconds(cells, source, sel_at, sel_jm, {"train_seconds": left_behind})}
    write_json_atomic(out / "transfer.json", with_provenance(summary, run_config("transfer", profile)))
    return summary


# ---- 5. propositions and pictures ---------------------------------------------------------


def verify_section(lay: Layout) -> dict:
    from .verify import main as verify_main
    start = time.time()
    records = verify_main(None, str(lay.out / "verify.png"), **lay.profile.verify)
    summary = {"records": records, "section_seconds": time.time() - start}
    write_json_atomic(lay.out / "verify.json", with_provenance(summary))
    return summary


def pictures_section(lay: Layout) -> dict:
    """Input-gradients of the teacher and of the n=10, seed-0 students (KD and KD + JM)."""
    import torch

    from ..core.jacobian import input_jacobian, teacher_top1
    from ..data import create_dataset
    from ..training import load_model
    runs, out = lay.runs, lay.out
    teacher, _ = load_model(_teacher_path(lay))
    n = lay.profile.pictures_samples
    students = {"CE+KD": runs / "distill" / f"CE_KD_n{n}_s0" / "last.pt",
                "CE+KD+JM": runs / "distill" / f"CE_KD_JM_n{n}_s0" / "last.pt"}
    for path in students.values():  # a run known by its record only (a fresh clone): trained again, as recorded
        record = lay.record_of(path.parent)
        if not path.is_file() and record.is_file():
            lay.train(json.loads(record.read_text())["config"], record=False)
    missing = [str(p) for p in students.values() if not p.is_file()]
    if missing:
        raise UsageError(f"{missing} missing: run `jacmatch experiment distill` first")
    models = {"teacher": teacher, **{k: load_model(p)[0] for k, p in students.items()}}
    data = create_dataset(run_config("distill", lay.profile)["data"]["name"])
    x, _ = data.test.batch(torch.arange(6))
    with torch.enable_grad():
        xt = x.clone().requires_grad_()
        index = teacher_top1(teacher(xt).detach())
        grads = {}
        for name, model in models.items():
            xi = x.clone().requires_grad_()
            grads[name] = input_jacobian(model.eval()(xi), xi, index).detach()
    plot_gradients(x, grads, n, out / "gradients.png")
    return {"figure": str(out / "gradients.png")}


SECTIONS = {"teacher": teacher_section, "distill": distill_section, "converge": converge_section,
            "robustness": robustness_section,
            "transfer": transfer_section, "verify": verify_section, "pictures": pictures_section}


def main(section: str, quick: bool = False, out: str | None = None) -> None:
    """Run ``section`` (or ``all``), writing under ``out`` (default: the current folder)."""
    lay = Layout(Path(out) if out else Path("."), QUICK if quick else FULL)
    names = list(SECTIONS) if section == "all" else [section]
    if any(n not in SECTIONS for n in names):
        raise UsageError(f"unknown section {section!r}: choose one of {list(SECTIONS) + ['all']}")
    timings = {}
    for name in names:
        start = time.time()
        print(f"== {name}", flush=True)
        SECTIONS[name](lay)
        timings[name] = time.time() - start
        print(f"== {name} done in {timings[name]:.0f} s")
