"""``jacmatch experiment converge``: every distilled student trained as long as it needs
(early-stopped inside a maximum that grows while it binds), the baselines' budget check,
and time-to-accuracy."""

from __future__ import annotations

import re
import time

from . import rows as R
from ..atomic import write_json_atomic
from ..errors import UsageError
from .common import load_json, summarize, summarize_runs, with_provenance
from .paper import FULL, ROWS, Layout, _fill, _run_seconds, _teacher_path, epochs_for_steps, run_config


CONVERGE_ROWS = (R.CE, R.CE_KD, R.CE_JM, R.CE_KD_JM)
CHECKED_ROWS = (R.CE, R.CE_KD)  # trained again with twice the patience and maximum: the budget check
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
            cells[R.key(row, n)] = _converged_cell(lay, row, n, objective, teacher, chosen["lr"],
                                                  profile.converge_patience)
        for row in CHECKED_ROWS:
            cell = _converged_cell(lay, row, n, cells[R.key(row, n)]["objective"], teacher, chosen["lr"],
                                   2 * profile.converge_patience, check=True)
            cells[R.key(R.twice_patience(row), n)] = {**cell, "row": R.twice_patience(row),
                                                 "val_gain": 100 * (cell["val_acc"]["mean"]
                                                                    - cells[R.key(row, n)]["val_acc"]["mean"])}
        kd = cells[R.key(R.CE_KD, n)]["val_acc"]["mean"]
        for row in CONVERGE_ROWS:
            cells[R.key(row, n)]["to_kd"] = _to_target(cells[R.key(row, n)], kd)
        summary["section_seconds"] = time.time() - start
        summary["run_seconds"] = _run_seconds(cells)
        print(f"  n={n}: " + ", ".join(f"{r} {100 * cells[R.key(r, n)]['acc']['mean']:.1f}" for r in CONVERGE_ROWS)
              + f"   [{time.time() - start:.0f} s]", flush=True)
        write_json_atomic(lay.out / "converge.json", with_provenance(summary, config))
    summary["complete"] = True
    write_json_atomic(lay.out / "converge.json", with_provenance(summary, config))
    return summary
