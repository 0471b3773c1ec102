"""``jacmatch experiment schedules``: the Jacobian term on every k-th step
(``objective.jacobian_every``, times k), against the full term, in the converged view. Of
the two schedules, k is the one whose step costs what the targets ask (``jacmatch bench``:
on 2 CPU cores, FM+JM at k = 4 costs 1.3 FM steps, at ρ = 0.25 of each batch 1.9, since the
split passes over small batches pay the per-operation overhead twice).

k is chosen on validation at the profile's selection n and seeds, for CE+KD+JM (whose
patience does not wait on FM's convergence, and whose cached steps are the cheapest): the largest k
of the grid whose mean validation accuracy lies within ``CONVERGED_GAIN`` (the budget
check's tolerance) of the grid's best, the grid growing past its high edge while that edge is
chosen. With it, FM+JM (k) and CE+KD+JM (k) train at each of the profile's
``schedule_samples`` over the seeds exactly as their full rows did in the converged section
(the same values, views, patience and first maximum, early-stopped inside a maximum that
grows while it binds; the budget check is their baselines', as for every Jacobian row). The
section reads ``converge.json`` (which must be complete) and writes ``schedules.json``:

- each row's test accuracy and fidelity beside the full row's, paired by seed;
- each row's time to its own best, and to CE+KD's and FM's converged validation accuracy,
  from every row's steps times its step cost measured here, back to back;
- the verdict: whether the scheduled row lies within the full row's 95 % interval at every n.
"""

from __future__ import annotations

import shutil
import time

from ..errors import UsageError
from ..experiments import rows as R
from ..experiments.common import CONVERGED_GAIN, load_json, read_json, summarize, with_provenance, write_section
from .converge import CARRIED, FM_EVAL, converge_student, converged_cell, kept_costs, step_costs, to_target
from .protocol import MAX_EXTENSIONS, Layout, run_config, total_run_seconds

#: Each scheduled row and the full row it is measured against, in the order they train: CE+KD+JM's
#: patience is CE+KD's, FM+JM's waits on FM's (whose budget check may grow it).
SCHEDULED = {R.CE_KD_JM_SCHEDULED: R.CE_KD_JM, R.FM_JM_SCHEDULED: R.FM_JM}
#: The row k is chosen on.
SELECTED_ON = R.CE_KD_JM
#: The rows whose converged validation accuracy the scheduled rows' times are taken to.
TARGET_ROWS = (R.CE_KD, R.FM)
#: Its runs' folder under runs/paper/ (and its records' under results/paper/runs/), apart from
#: the converged section's, whose tidying deletes the weights that its own cells do not name.
SECTION = "schedules"


def _recipe(cell: dict, every: int | None = None) -> tuple[dict, float, dict | None]:
    """A converged cell's (objective, learning rate, data settings), with k when given."""
    objective = {**cell["objective"], **({"jacobian_every": every} if every is not None else {})}
    return objective, cell["lr"], cell.get("data")


def _tag(row: str, every: int) -> str:
    """The runs' name of ``row`` at k: ``FM_JM_every4``."""
    return row.replace("+", "_") + f"_every{every}"


def _first_max(lay: Layout, cell: dict) -> int:
    """The first maximum a row of ``cell``'s patience starts from (as the converged section's)."""
    return lay.profile.converge_steps * cell["patience"] // lay.profile.converge_patience


def choose_every(lay: Layout, cells: dict, teacher: str) -> tuple[int, dict]:
    """k for CE+KD+JM at the profile's selection n and seeds: each value of the grid trains
    CE+KD+JM with it as the converged cell at that n trained (its patience and first maximum,
    validation only; k = 1 is the converged cell itself, its seeds' validation accuracy read
    from it), and the largest value within CONVERGED_GAIN points of the best mean
    validation accuracy is chosen (the cheapest that keeps it); while the grid's highest value
    is chosen, the grid grows above it (doubling), at most MAX_EXTENSIONS times."""
    profile = lay.profile
    n, seeds = profile.selection_samples, profile.selection_seeds
    full = cells[R.key(SELECTED_ON, n)]
    grid, scores, seconds, extended = sorted(profile.grids["jacobian_every"]), {}, 0.0, []
    full_val = dict(zip(profile.seeds, full["val_acc"]["values"]))
    while True:
        for value in grid:
            if value == 1 and all(seed in full_val for seed in seeds):  # k = 1 is the full row: its cell's seeds
                scores[str(value)] = sum(full_val[seed] for seed in seeds) / len(seeds)
            elif str(value) not in scores:
                objective, lr, data = _recipe(full, value)
                runs = [converge_student(lay, f"select_{_tag(SELECTED_ON, value)}", n, seed, objective, teacher,
                                         _first_max(lay, full), full["patience"], lr, data=data, evaluation=FM_EVAL,
                                         keep=False, section=SECTION)
                        for seed in seeds]
                scores[str(value)] = sum(r["final"]["val"]["acc"] for r in runs) / len(runs)
                seconds += sum(r["train_seconds"] for r in runs)
        best = max(scores[str(v)] for v in grid)
        chosen = max(v for v in grid if 100 * (best - scores[str(v)]) < CONVERGED_GAIN)
        if chosen != grid[-1] or len(extended) == MAX_EXTENSIONS:
            break
        extended.append(2 * grid[-1])
        grid = [*grid, 2 * grid[-1]]
    return chosen, {"grid": grid, "val_acc": {str(v): scores[str(v)] for v in grid}, "chosen": chosen,
                    "rule": f"the largest k within {CONVERGED_GAIN} points of the best", "inside": chosen != grid[-1],
                    "row": SELECTED_ON,
                    "extended": extended, "samples_per_class": n, "seeds": list(seeds), "train_seconds": seconds}


def _records(lay: Layout, cell: dict) -> list[dict]:
    """The run records of a cell's tested students, in seed order (beside their kept weights)."""
    return [read_json((lay.out / w).with_suffix(".json")) for w in cell["weights"]]


def _fidelity(record: dict) -> dict[str, float]:
    f = record["final"]["test"]["fidelity"]
    return {"agreement": f["clean"]["agreement"], "kl": f["clean"]["kl"],
            "interpolated_agreement": (f.get("interpolated") or {}).get("agreement")}


def _paired(ours: list[float], theirs: list[float]) -> dict:
    """Scheduled minus full, seed by seed (mean, spread and 95 % interval of the differences)."""
    return summarize([a - b for a, b in zip(ours, theirs)])


def _curves(cell: dict, step_seconds: float) -> list[list[tuple]]:
    """The cell's validation curves with seconds from ``step_seconds`` (this section's cost)."""
    return [[(steps, steps * step_seconds, acc) for steps, _, acc in curve] for curve in cell["curves"]]


def compare(lay: Layout, cells: dict, row: str, n: int, costs: dict) -> dict:
    """The scheduled ``row`` at n against its full row: accuracy and fidelity paired by seed,
    time to its own best and to each target row's converged validation accuracy."""
    ours, full = cells[R.key(row, n)], cells[R.key(SCHEDULED[row], n)]
    a, b = _records(lay, ours), _records(lay, full)
    fa, fb = [_fidelity(r) for r in a], [_fidelity(r) for r in b]
    out = {"acc": ours["acc"], "full_acc": full["acc"], "acc_difference": _paired(ours["acc"]["values"], full["acc"]["values"]),
           "within_full_interval": abs(ours["acc"]["mean"] - full["acc"]["mean"]) <= full["acc"]["ci95"],
           "fidelity": {k: summarize([f[k] for f in fa]) for k in ("agreement", "kl")},
           "fidelity_difference": {k: _paired([f[k] for f in fa], [f[k] for f in fb]) for k in ("agreement", "kl")}}
    if all(f["interpolated_agreement"] is not None for f in fa + fb):
        out["fidelity"]["interpolated_agreement"] = summarize([f["interpolated_agreement"] for f in fa])
        out["fidelity_difference"]["interpolated_agreement"] = _paired(
            [f["interpolated_agreement"] for f in fa], [f["interpolated_agreement"] for f in fb])
    seconds = {name: costs[name][str(n)] for name in (row, SCHEDULED[row], *TARGET_ROWS)}
    out["step_seconds"] = seconds
    out["best_seconds"] = {name: summarize([r["best"]["step"] * seconds[name] for r in recs])
                           for name, recs in ((row, a), (SCHEDULED[row], b))}
    to = {}
    for target in TARGET_ROWS:
        goal = cells[R.key(target, n)]["val_acc"]["mean"]
        for name in (row, SCHEDULED[row], target):
            to[f"{name} to {target}"] = to_target({"curves": _curves(cells[R.key(name, n)], seconds[name])}, goal)
    out["to_target"] = to
    own = to[f"{R.FM} to {R.FM}"]["seconds"]
    mine = to[f"{row} to {R.FM}"]["seconds"]
    out["time_to_fm_over_fm"] = mine["mean"] / own["mean"] if own and mine else None
    return out


def schedules_section(lay: Layout) -> dict:
    """k chosen on validation, the scheduled rows trained at each n, compared with the full rows."""
    c = load_json(lay.out / "converge.json")
    if not c or not c.get("complete"):
        raise UsageError(f"{lay.out / 'converge.json'} is missing or incomplete: run `jacmatch experiment converge"
                         f"{'' if lay.profile.name == 'paper' else ' --' + lay.profile.name}` first (its rows are the "
                         "full ones the scheduled rows are measured against)")
    profile, teacher, start = lay.profile, c["teacher"], time.time()
    samples = [n for n in profile.schedule_samples if all(R.key(r, n) in c["cells"] for r in (*SCHEDULED.values(),
                                                                                                *TARGET_ROWS))]
    cells = {k: v for k, v in c["cells"].items() if R.split_key(k)[0] in (*SCHEDULED.values(), *TARGET_ROWS)}
    every, selection = choose_every(lay, c["cells"], teacher)
    summary: dict = {"teacher": teacher, "converge_chosen": c["chosen"], "fm": c["fm"]["chosen"],
                     "every": every, "selection": selection, "samples": samples, "seeds": list(profile.seeds),
                     "rows": SCHEDULED, "cells": {}, "comparisons": {}, "complete": False}
    recipes = {row: _recipe(c["cells"][R.key(full, samples[0])], every) for row, full in SCHEDULED.items()}
    recipes.update({row: _recipe(c["cells"][R.key(row, samples[0])]) for row in (*SCHEDULED.values(), *TARGET_ROWS)})
    previous = load_json(lay.out / "schedules.json")
    same = previous and (previous["teacher"], previous.get("every")) == (teacher, every)
    costs, summary["step_cost_measurements"] = kept_costs(step_costs(lay, recipes, teacher, samples),
                                                          previous if same else None)
    summary["step_seconds"] = costs
    config = run_config("distill", profile)
    for row, full_row in SCHEDULED.items():
        for n in samples:
            full = c["cells"][R.key(full_row, n)]
            cell = converged_cell(lay, row, n, _recipe(full, every), teacher, full["patience"], _first_max(lay, full),
                                  costs[row][str(n)], tag=_tag(full_row, every),
                                  section=SECTION)
            cells[R.key(row, n)] = summary["cells"][R.key(row, n)] = cell
            summary["comparisons"][R.key(row, n)] = compare(lay, cells, row, n, costs)
            summary["section_seconds"] = time.time() - start
            summary["run_seconds"] = total_run_seconds(summary["cells"], selection)
            print(f"  {row:<20} n={n:<4} test {100 * cell['acc']['mean']:.1f} ± {100 * cell['acc']['ci95']:.1f} "
                  f"(full {100 * full['acc']['mean']:.1f} ± {100 * full['acc']['ci95']:.1f})   "
                  f"[{time.time() - start:.0f} s]", flush=True)
            write_section(lay.out / "schedules.json", with_provenance(summary, config))
    comparisons = summary["comparisons"]
    summary["verdict"] = {row: all(comparisons[R.key(row, n)]["within_full_interval"] for n in samples)
                          for row in SCHEDULED}
    summary["complete"] = True
    if (lay.out / CARRIED.parent / SECTION).is_dir():  # every run a part could continue has its record now
        shutil.rmtree(lay.out / CARRIED.parent / SECTION)
    write_section(lay.out / "schedules.json", with_provenance(summary, config))
    return summary


__all__ = ["SCHEDULED", "SELECTED_ON", "TARGET_ROWS", "SECTION", "choose_every", "compare", "schedules_section"]
