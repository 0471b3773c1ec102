"""``jacmatch experiment converge``: every distilled student trained as long as it needs
(early-stopped inside a maximum that grows while it binds, with the patience that its
baseline's budget check asks for), and time-to-accuracy; beside the paper's rows, function
matching (Beyer et al. 2022) with and without the Jacobian term. Each cell's students keep
their tested weights beside their records, so that any metric of them is computed again
without training (``fidelity``). A run with a larger maximum or patience than a finished run
of its seed continues from that run's checkpoint, which it passes through step for step."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from ..experiments import rows as R
from ..errors import UsageError
from ..training.recipes import recipe_values
from ..experiments.common import (RUN_STATE, converged, epochs_trained, load_json, summarize, summarize_runs, with_provenance,
                                  write_section)
from .protocol import (FULL, ROWS, Layout, epochs_for_steps, fill_placeholders, run_config, select_on_validation, teacher_path,
                       total_run_seconds)


CONVERGE_ROWS = (R.CE, R.CE_KD, R.CE_JM, R.CE_KD_JM, R.FM, R.FM_JM)
#: Each row trains with the patience that its baseline needs: the baselines are trained again
#: with twice their patience and maximum (the budget check), and grow it while that gains
#: (:func:`patient_cell`); a Jacobian row takes its baseline's, so that the pair stays equal
PATIENCE_OF = {R.CE: R.CE, R.CE_KD: R.CE_KD, R.FM: R.FM, R.CE_JM: R.CE, R.CE_KD_JM: R.CE_KD, R.FM_JM: R.FM}
CHECKED_ROWS = tuple(dict.fromkeys(PATIENCE_OF.values()))
FM_ROWS = {R.FM: ROWS[R.KD], R.FM_JM: ROWS[R.KD_JM]}  # KD alone (γ: the distillation section's), on FM's views
#: FM's values, chosen on validation in this order, each with those chosen before it (the
#: profile's grids of these names; τ and lr start from the distillation section's choice)
FM_SELECTION = ("mixup", "fm_tau", "fm_lr")
FM_EVAL = {"noise_sigmas": [], "jacobian_cosine": False, "fidelity": False}  # FM's selection reads validation only
REACH = 0.99  # time-to-accuracy: steps and seconds to 99% of a row's own best validation accuracy


def fm_data(mixup: float) -> dict:
    """Function matching's views: random crops and flips, mixed up with Beta(α, α); the
    teacher sees the student's view (the trainer's consistent teaching)."""
    return {"augment": True, "mixup": mixup}


def converge_student(lay, tag, n, seed, objective, teacher, max_steps, patience, lr, data=None, evaluation=None,
                     keep=True, need_weights=False, section: str = "converge") -> dict:
    """A student trained up to ``max_steps`` at a constant learning rate, evaluated on
    validation every ``converge_every`` epochs, stopped after ``patience`` evaluations
    without a better accuracy, and tested with its best weights. ``keep``: those weights are
    kept beside its record as soon as the run finishes, so that a part cut later in the cell
    leaves them committed; ``need_weights``: a record without them is trained again for them.
    ``data`` and ``evaluation``: settings over the config's."""
    values = run_config("distill", lay.profile, seed=seed, teacher=teacher, data={"samples_per_class": n, **(data or {})},
                        objective=objective, optim={"lr": lr, "schedule": "constant"},
                        eval={"every": lay.profile.converge_every, "keep_best": True, "patience": patience,
                              "min_delta": lay.profile.converge_min_delta, **(evaluation or {})},
                        out_dir=str(_run_dir(lay, tag, n, seed, max_steps, patience, section)))
    values["optim"]["epochs"] = epochs_for_steps(n, values, max_steps)
    shorter = _run_dir(lay, tag, n, seed, "*", "*", section)  # a larger maximum or patience passes through these
    carried = lay.out / CARRIED.parent / section / f"n{n}"  # per n: parts at other n carry theirs beside it
    results = lay.train(values, keep=keep, need_weights=need_weights, donors=[*sorted(shorter.parent.glob(shorter.name)),
                                                   *sorted(carried.glob(shorter.name))])
    carry(lay, Path(values["out_dir"]), carried)
    return results


#: Under results/<profile>/: the longest finished run of each seed of the cell in progress at
#: each n (``carried/converge/n<N>/``: its checkpoints, metrics and results), for a part that goes
#: on on another machine to continue from (runs/ is not committed); deleted once the section is
#: complete.
CARRIED = Path("carried") / "converge"
CARRIED_FILES = (*RUN_STATE, "results.json")


def carry(lay: Layout, run: Path, carried: Path | None = None) -> None:
    """Copy the finished run in folder ``run`` to ``carried`` (default :data:`CARRIED`) when it
    trained longer than the carried run of its seed; the carried runs of other cells (row and
    n) are deleted, so that the folder holds at most one run per seed."""
    if not (run / "results.json").is_file():  # a record: nothing trained here
        return
    carried = carried or lay.out / CARRIED
    seed_of = lambda folder: folder.name.rsplit("_max", 1)[0]  # noqa: E731
    cell_of = lambda folder: seed_of(folder).rsplit("_s", 1)[0]  # noqa: E731
    for other in sorted(carried.iterdir()) if carried.is_dir() else ():
        if cell_of(other) != cell_of(run):
            shutil.rmtree(other)
        elif seed_of(other) == seed_of(run):
            if other.name == run.name or epochs_trained(other) >= epochs_trained(run):
                return
            shutil.rmtree(other)
    (carried / run.name).mkdir(parents=True)
    for name in CARRIED_FILES:
        if (run / name).is_file():
            shutil.copy2(run / name, carried / run.name / name)


def _tidy(lay: Layout, cells: dict) -> None:
    """What a complete section no longer needs: the carried runs (every run they could
    continue has its record now) and the kept weights that no cell names."""
    if (lay.out / CARRIED).is_dir():
        shutil.rmtree(lay.out / CARRIED)
        print(f"  {lay.out / CARRIED}: removed (the section is complete)", flush=True)
    unnamed_weights(lay, cells)


def unnamed_weights(lay: Layout, cells: dict) -> list[Path]:
    """Delete the kept weights that no cell names, once the section is complete: each run
    keeps its weights when it finishes (:func:`converge_student`), and the runs that a grown
    maximum or patience superseded, or a budget check's, are not the cells' students. Returns
    the files deleted."""
    named = {lay.out / w for cell in cells.values() for w in cell.get("weights", ())}
    gone = [p for p in sorted((lay.records / "converge").glob("*.pt")) if p not in named]
    for p in gone:
        p.unlink()
    if gone:
        print(f"  {len(gone)} kept weights that no cell names removed from {lay.records / 'converge'}", flush=True)
    return gone


def _run_dir(lay, tag, n, seed, max_steps, patience, section: str = "converge") -> Path:
    return lay.runs / section / f"{tag}_n{n}_s{seed}_max{max_steps}_p{patience}"


def _curve(run: dict, step_seconds: float) -> list[tuple[int, float, float]]:
    """(steps, training seconds, validation accuracy) after each evaluated epoch; the
    seconds are the steps times the row's measured step cost (:func:`step_costs`)."""
    steps = 0
    out = []
    for h in run["history"]:
        steps += h["steps"]
        if "val" in h:
            out.append((steps, steps * step_seconds, h["val"]["acc"]))
    return out


STEP_COST_EPOCHS = 4  # a step's cost: the fastest of these epochs after the first (which fills the teacher cache)


def step_costs(lay, recipes: dict, teacher: str, samples=None) -> dict[str, dict[str, float]]:
    """{row: {n: seconds per training step}}: each row of ``recipes`` (its step) at each n
    (default: the profile's samples), measured back to back in this process over a few
    epochs without evaluation. The converged view's times (time-to-accuracy, equal time, the
    curves) are steps times these, so that they do not depend on what else the machine ran
    while each cell trained; a run's own measured seconds stay in its record. A resumed
    section keeps the fastest of its invocations' measurements (:func:`kept_costs`)."""
    import tempfile

    from ..training import config_from_dict, train
    from ..experiments.common import run_history
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in samples or lay.profile.samples:
            for row, (objective, lr, data) in recipes.items():
                folder = Path(tmp) / f"{re.sub(r'[^A-Za-z0-9]+', '_', row)}_n{n}"
                values = run_config("distill", lay.profile, seed=0, teacher=teacher, objective=objective,
                                    data={"samples_per_class": n, **(data or {})},
                                    optim={"lr": lr, "schedule": "constant", "epochs": STEP_COST_EPOCHS},
                                    eval={"every": 10**5, **FM_EVAL, "interpolations": 0}, out_dir=str(folder))
                train(config_from_dict(values), teacher_gradients=lay.teacher_gradients, data_cache=lay.data_cache)
                history = run_history(folder)
                epochs = history[1:] or history
                out.setdefault(row, {})[str(n)] = min(h["epoch_seconds"] / h["steps"] for h in epochs)
    return out


def kept_costs(measured: dict, previous: dict | None) -> tuple[dict, int]:
    """The step costs a resumed section uses: per row and n, the smallest of this
    invocation's measurement and those kept in ``previous``, the ``converge.json`` of the
    same recipes (another process on the machine can only slow a step, so the fastest
    measurement is the closest to the step's own cost), and how many measurements that is."""
    old = (previous or {}).get("step_seconds")
    if not old or {r: set(v) for r, v in old.items()} != {r: set(v) for r, v in measured.items()}:
        return measured, 1
    return ({row: {n: min(v, old[row][n]) for n, v in by_n.items()} for row, by_n in measured.items()},
            previous.get("step_cost_measurements", 1) + 1)


def _reach(curve: list[tuple], target: float) -> tuple[int, float] | None:
    """The first (steps, seconds) of ``curve`` at or above ``target`` validation accuracy."""
    return next(((st, sec) for st, sec, acc in curve if acc >= target - 1e-12), None)


def _settled(run: dict) -> bool:
    """The run stopped early, its best point strictly inside its maximum. At a constant rate a
    larger maximum trains it step for step the same (the rate and draws of an epoch do not
    depend on the maximum), so it is not trained again when its cell's maximum grows."""
    return run["best"]["inside"] and run["best"]["stopped_early"]


def converged_cell(lay, row, n, recipe, teacher, patience, first_max, step_seconds, keep=True, tag: str | None = None,
                   section: str = "converge") -> dict:
    """One row at n over the seeds with ``recipe`` (objective, learning rate, data settings),
    stopped after ``patience`` evaluations without a better one, inside a maximum that starts
    at ``first_max`` steps and doubles while a seed's best point lies at it (or a seed did not
    stop); only those seeds train again. ``keep``: the tested students have their weights,
    and the cell names them."""
    profile, (objective, lr, data) = lay.profile, recipe
    tag = tag or re.sub(r"[^A-Za-z0-9]+", "_", row).strip("_")
    max_steps, grown, by_seed = first_max, [], {}

    def student(seed, steps, need_weights=False):
        return converge_student(lay, tag, n, seed, objective, teacher, steps, patience, lr, data=data, section=section,
                                 need_weights=need_weights)
    while True:
        by_seed = {s: by_seed[s] if s in by_seed and _settled(by_seed[s][1]) else (max_steps, student(s, max_steps))
                   for s in profile.seeds}
        runs = [run for _, run in by_seed.values()]
        inside = all(_settled(r) for r in runs)
        if inside or len(grown) == profile.converge_growths:
            break
        grown.append(max_steps)
        max_steps *= 2
    if keep:  # the tested students have their weights (kept when they finished; a record without them trains again)
        runs = [student(s, steps, need_weights=True) for s, (steps, _) in by_seed.items()]
    curves = [_curve(r, step_seconds) for r in runs]
    own = [_reach(c, REACH * r["best"]["val_acc"]) for c, r in zip(curves, runs)]
    return {"row": row, "samples_per_class": n, "objective": objective, **({"data": data} if data else {}), "lr": lr,
            "max_steps": max_steps, "patience": patience, "grown_from": grown, "inside": inside, **summarize_runs(runs),
            "best_step": summarize([r["best"]["step"] for r in runs]),
            "best_seconds": summarize([r["best"]["step"] * step_seconds for r in runs]), "step_seconds": step_seconds,
            "to_own_99": {"steps": _summary([o[0] for o in own if o]), "seconds": _summary([o[1] for o in own if o])},
            "curves": curves, **({"weights": [
                lay.weights_of(_run_dir(lay, tag, n, s, steps, patience, section)).relative_to(lay.out).as_posix()
                for s, (steps, _) in by_seed.items()]} if keep else {})}


def patient_cell(lay, row, n, recipe, teacher, step_seconds) -> tuple[dict, dict]:
    """A checked row at n with the patience it needs: trained again with twice its patience
    and maximum (the budget check), and while that gains ``CONVERGED_GAIN`` or more of
    validation accuracy (at most ``converge_patience_growths`` times, or the row's own cap in
    ``converge_patience_growths_of`` at the n of ``converge_patience_growths_samples``), the check's students
    become the row's own and are checked at twice theirs. Returns (cell, check): the cell with
    its kept weights and the patience it grew from (with the gains that grew it), the last
    check with its ``val_gain`` (points) over the cell as returned: a record trained again for
    its weights on another host may differ from the one the rule read."""
    profile = lay.profile
    patience, first, grown = profile.converge_patience, profile.converge_steps, []
    cell = converged_cell(lay, row, n, recipe, teacher, patience, first, step_seconds, keep=False)
    while True:
        if grown and not _recorded(lay, row, n, 2 * patience, 2 * first):
            # a new check continues from the grown cell's runs (step for step the same): train
            # them first, with their weights, which the cell needs if the check gains too little;
            # its gain is over them as trained (a record trained again on another host may differ)
            cell = converged_cell(lay, row, n, recipe, teacher, patience, first, step_seconds)
        check = converged_cell(lay, row, n, recipe, teacher, 2 * patience, 2 * first, step_seconds, keep=False)
        gain = 100 * (check["val_acc"]["mean"] - cell["val_acc"]["mean"])
        if converged(gain) or len(grown) == profile.patience_growths(row, n):
            break
        grown.append({"patience": patience, "val_gain": gain})
        patience, first, cell = 2 * patience, 2 * first, check  # the check's students are the row's own
    cell = converged_cell(lay, row, n, recipe, teacher, patience, first, step_seconds)  # its students' weights kept
    gain = 100 * (check["val_acc"]["mean"] - cell["val_acc"]["mean"])
    return {**cell, "patience_grown_from": grown}, {**check, "row": R.twice_patience(row), "val_gain": gain}


def _recorded(lay, row: str, n, patience: int, first_max: int) -> bool:
    """Whether every seed of ``row`` at n with ``patience`` has a record at its first maximum."""
    tag = re.sub(r"[^A-Za-z0-9]+", "_", row).strip("_")
    return all(lay.record_of(_run_dir(lay, tag, n, seed, first_max, patience)).is_file() for seed in lay.profile.seeds)


def _summary(values: list) -> dict | None:
    """``summarize`` of the seeds that have a value (None when none has)."""
    return summarize(values) if values else None


def to_target(cell: dict, target: float) -> dict:
    """Steps and seconds of each seed's curve to ``target`` validation accuracy (seeds that reach it)."""
    reached = [r for r in (_reach(c, target) for c in cell["curves"]) if r]
    return {"target": target, "reached": len(reached), "seeds": len(cell["curves"]),
            "steps": _summary([r[0] for r in reached]), "seconds": _summary([r[1] for r in reached])}


def _fm_student(lay, n, seed, values: dict, teacher) -> dict:
    """A student of FM with ``values`` (mixup, fm_tau, fm_lr) for FM's selection, trained
    as the cells' are: early-stopped, its maximum doubled while it binds. Runs of the same
    values share their folder, whichever grid tried them."""
    profile = lay.profile
    tag = f"select_FM_mixup{values['mixup']}_tau{values['fm_tau']}_lr{values['fm_lr']}"
    max_steps = profile.converge_steps
    for _ in range(profile.converge_growths + 1):
        run = converge_student(lay, tag, n, seed, {**FM_ROWS[R.FM], "temperature": values["fm_tau"]}, teacher,
                                max_steps, profile.converge_patience, values["fm_lr"], data=fm_data(values["mixup"]),
                                evaluation=FM_EVAL, keep=False)
        if _settled(run):
            break
        max_steps *= 2
    return run


def fm_selection(lay: Layout, teacher: str, chosen: dict) -> tuple[dict, dict]:
    """FM's mixup α, τ and learning rate (:data:`FM_SELECTION`), each chosen on validation at
    the profile's selection n and seeds with the values chosen before it, inside its grid
    (which grows past a winning edge). Returns (values, selection records)."""
    values = {"mixup": lay.profile.grids["mixup"][0], "fm_tau": chosen["tau"], "fm_lr": chosen["lr"]}
    selection = {}
    for name in FM_SELECTION:
        values[name], selection[name] = select_on_validation(
            lay, name, lambda value, tag, n, seed, name=name: _fm_student(lay, n, seed, {**values, name: value}, teacher))
    return values, selection


#: The rows that are the product's recipes (jacmatch.training.recipes): their terms and views
#: come from the recipe, their values from this section's choices on validation
RECIPE_OF = {R.CE_KD: "kd", R.CE_KD_JM: "paper", R.FM: "fm", R.FM_JM: "fm+jm"}


def recipe_row(name: str, tau: float, gamma: float, lr: float, mixup: float) -> tuple[dict, float, dict | None]:
    """A row of recipe ``name`` with the values chosen on validation: (objective, learning
    rate, data settings). The objective holds the recipe's α, β and τ, and γ where it has the
    Jacobian term; the data settings its views (crops and flips with mixup) where it has them."""
    values = recipe_values(name)
    objective = {k: v for k, v in values["objective"].items()
                 if k in ("alpha", "beta", "temperature") or (k == "gamma" and v)}
    objective = {**objective, "temperature": tau, **({"gamma": gamma} if "gamma" in objective else {})}
    return objective, lr, fm_data(mixup) if values["data"]["augment"] else None


def _recipes(chosen: dict, fm: dict) -> dict:
    """Each row's (objective, learning rate, data settings): the recipes' rows with the
    distillation section's choices (FM's with its own), CE and CE+JM (no recipe) from the
    paper's rows."""
    weights = {"γ": chosen["gamma"], "γ_ce": chosen["gamma_ce"]}
    out = {row: ({**fill_placeholders(ROWS[row], weights), "temperature": chosen["tau"]}, chosen["lr"], None)
           for row in CONVERGE_ROWS if row not in RECIPE_OF}
    for row, name in RECIPE_OF.items():
        tau, lr, mixup = (fm["fm_tau"], fm["fm_lr"], fm["mixup"]) if row in FM_ROWS else (chosen["tau"], chosen["lr"], 0.0)
        out[row] = recipe_row(name, tau, chosen["gamma"], lr, mixup)
    return out


def _rule(profile) -> dict:
    """How the section trains every student (converge.json's "rule")."""
    return {"first_max_steps": profile.converge_steps, "patience": profile.converge_patience,
            "eval_every_epochs": profile.converge_every, "min_delta": profile.converge_min_delta,
            "growths": profile.converge_growths, "patience_growths": profile.converge_patience_growths,
            **({"patience_growths_of": profile.converge_patience_growths_of}
               if profile.converge_patience_growths_of else {}),
            **({"patience_growths_samples": list(profile.converge_patience_growths_samples)}
               if profile.converge_patience_growths_of and profile.converge_patience_growths_samples else {}),
            "schedule": "constant", "reach": REACH}


def _part(profile, samples: list | None) -> list:
    """The n a part trains: ``samples`` (each one the section trains), or all of the section's."""
    if samples is not None and not set(samples) <= set(profile.samples):
        raise UsageError(f"--samples {' '.join(map(str, samples))}: the section trains at n = "
                         f"{', '.join(map(str, profile.samples))}; choose among them")
    return list(samples) if samples is not None else list(profile.samples)


def _cells_at(lay, n, recipes: dict, teacher: str, costs: dict, cells: dict, save) -> None:
    """Every row's cell at n into ``cells`` (``save`` after each): the checked baselines first,
    with their budget checks (their patience is their rows'), then each Jacobian row with its
    baseline's patience; then every row's time to CE+KD's converged validation accuracy."""
    profile = lay.profile
    for row in CHECKED_ROWS:
        cell, check = patient_cell(lay, row, n, recipes[row], teacher, costs[row][str(n)])
        for c in (cell, check):
            cells[R.key(c["row"], n)] = c
            save(c)
    for row in (r for r in CONVERGE_ROWS if r not in CHECKED_ROWS):
        patience = cells[R.key(PATIENCE_OF[row], n)]["patience"]
        cells[R.key(row, n)] = converged_cell(lay, row, n, recipes[row], teacher, patience,
                                               profile.converge_steps * patience // profile.converge_patience,
                                               costs[row][str(n)])
        save(cells[R.key(row, n)])
    kd = cells[R.key(R.CE_KD, n)]["val_acc"]["mean"]
    for row in CONVERGE_ROWS:
        cells[R.key(row, n)]["to_kd"] = to_target(cells[R.key(row, n)], kd)


def converge_section(lay: Layout, samples: list | None = None) -> dict:
    """Every student trained as long as it needs: the paper's four rows at every n, with the
    learning rate, τ and γ that the distillation section chose on validation, and FM and
    FM+JM with FM's mixup α, τ and learning rate chosen on validation; each early-stopped
    inside a maximum that grows while it binds; CE, CE+KD and FM again with twice the
    patience and maximum (the budget check, on validation accuracy), their patience doubled
    while that gains, each Jacobian row with its baseline's; time-to-accuracy from each
    run's validation curve.

    ``samples``: a part that trains the cells at these n only (their records and carried runs),
    beside parts at other n (one process each: the records are one file per run, the carried
    runs one folder per n); it writes no converge.json, which the section without ``samples``
    assembles from the records."""
    d = load_json(lay.out / "distill.json")
    if not d or "selection" not in d:
        raise UsageError(f"{lay.out / 'distill.json'} is missing: run `jacmatch experiment distill"
                         f"{'' if lay.profile is FULL else ' --' + lay.profile.name}` first (its choices are used)")
    profile, teacher, start = lay.profile, teacher_path(lay), time.time()
    ns = _part(profile, samples)
    chosen = {k: d["selection"][k]["chosen"] for k in ("lr", "tau", "gamma", "gamma_ce")}
    cells: dict = {}
    summary = {"teacher": teacher, "chosen": chosen, "rows": list(CONVERGE_ROWS), "checked_rows": list(CHECKED_ROWS),
               "samples": list(profile.samples), "seeds": list(profile.seeds), "cells": cells, "complete": False,
               "rule": _rule(profile)}
    config = run_config("distill", profile)
    fm, fm_records = fm_selection(lay, teacher, chosen)
    summary["fm"] = {"chosen": fm, "selection": fm_records}
    recipes = _recipes(chosen, fm)
    previous = load_json(lay.out / "converge.json")
    same = previous and (previous["teacher"], previous["chosen"], previous.get("fm", {}).get("chosen")) == (teacher, chosen, fm)
    costs, summary["step_cost_measurements"] = kept_costs(
        step_costs(lay, {row: recipes[row] for row in CONVERGE_ROWS}, teacher, ns), previous if same else None)
    summary["step_seconds"] = costs
    print("  seconds per step: " + "; ".join(f"{row} " + ", ".join(f"n={n}: {1000 * v:.1f} ms" for n, v in by_n.items())
                                            for row, by_n in costs.items()), flush=True)

    def save(cell: dict) -> None:  # after each cell: a partial run's file holds every cell run so far
        summary["section_seconds"] = time.time() - start
        summary["run_seconds"] = total_run_seconds(cells, *fm_records.values())
        print(f"  {cell['row']:<22} n={cell['samples_per_class']:<4} test {100 * cell['acc']['mean']:.1f} ± "
              f"{100 * cell['acc']['std']:.1f}   [{time.time() - start:.0f} s]", flush=True)
        if samples is None:
            write_section(lay.out / "converge.json", with_provenance(summary, config))
    for n in ns:
        _cells_at(lay, n, recipes, teacher, costs, cells, save)
        if samples is None:
            write_section(lay.out / "converge.json", with_provenance(summary, config))
    if samples is not None:
        print(f"  the cells at n = {', '.join(map(str, ns))} are recorded; `jacmatch experiment converge` writes "
              "converge.json from the records once every n has its part", flush=True)
        return summary
    summary["complete"] = True
    _tidy(lay, cells)
    write_section(lay.out / "converge.json", with_provenance(summary, config))
    return summary
