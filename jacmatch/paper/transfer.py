"""``jacmatch experiment transfer``: a teacher of five classes teaches a student of the
other five, with attention transfer and its Jacobians, against CE from scratch and the
fine-tuned teacher; every row trained as long as its baselines need."""

from __future__ import annotations

import time
from pathlib import Path

from ..experiments import rows as R
from ..experiments.common import summarize_runs, with_provenance, write_result
from .protocol import (Layout, Profile, committed_teacher_record, fill_placeholders, placeholder_trainer, run_config,
                       select_on_validation, total_run_seconds, train_teacher)
from .growth import epochs_tag as _epochs_tag
from .growth import until_converged as _until_converged


TRANSFER_ROWS = {  # δ (AT) and δ_J (its Jacobians) chosen on validation, in that order
    R.CE_SCRATCH: {"alpha": 1.0},
    R.CE_AT: {"alpha": 1.0, "delta": "δ"},
    R.CE_AT_JM: {"alpha": 1.0, "delta": "δ", "delta_jacobian": "δ_J"},
}


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
        source, target = committed_teacher_record(lay.source_teacher), lay.source_teacher
    else:
        source, target = train_teacher("transfer_teacher", "source_teacher", lay.source_teacher, lay)
    delta, sel_at = select_on_validation(lay, "delta", placeholder_trainer(lay, {"alpha": 1.0, "delta": "δ"}, str(target),
                                                       _transfer_student))
    delta_j, sel_jm = select_on_validation(lay, "delta_jacobian", placeholder_trainer(
        lay, {"alpha": 1.0, "delta": delta, "delta_jacobian": "δ_J"}, str(target), _transfer_student))
    weights = {"δ": delta, "δ_J": delta_j}
    cells, left_behind, base = {}, 0.0, _transfer_epochs(profile)
    for n in profile.transfer_samples:
        def rows(epochs, only=(*TRANSFER_ROWS, R.ORACLE), n=n):
            out = {}
            for row in only:
                objective = TRANSFER_ROWS.get(row)
                results = [_fine_tune(lay, n, seed, source, target, epochs) if objective is None else
                           _transfer_student(lay, row.split()[0].replace("+", "_"), n, seed,
                                             fill_placeholders(objective, weights), str(target), epochs)
                           for seed in profile.seeds]
                out[row] = {"row": row, "samples_per_class": n, "epochs": epochs, **summarize_runs(results),
                            "runs": results}
            return out
        # the baselines of claim (d): CE from scratch and CE+AT
        grown_cells, checks, epochs, growth = _until_converged(lay, base, rows, (R.CE_SCRATCH, R.CE_AT))
        left_behind += growth["seconds_left_behind"]
        for row, cell in grown_cells.items():
            cells[R.key(row, n)] = cell
            print(f"  {row:<28} n={n:<3} {epochs} epochs, test {100 * cell['acc']['mean']:.1f}   "
                  f"[{time.time() - start:.0f} s]", flush=True)
        for check in checks.values():
            cells[R.key(check['row'], n)] = {**check, "samples_per_class": n}
    summary = {"source_teacher": {"test": source["final"]["test"], "checkpoint": str(target),
                                  "train_seconds": source["train_seconds"]},
               "selection": {"delta": sel_at, "delta_jacobian": sel_jm},
               "seeds": list(profile.seeds), "cells": cells, "base_epochs": base, "section_seconds": time.time() - start,
               "run_seconds": total_run_seconds(cells, source, sel_at, sel_jm, {"train_seconds": left_behind})}
    write_result(out / "transfer.json", with_provenance(summary, run_config("transfer", profile)))
    return summary
