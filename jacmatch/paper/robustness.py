"""``jacmatch experiment robustness``: training with noise and with the Jacobian penalty
(Proposition 2) against CE, tested under noise; every row trained as long as CE needs."""

from __future__ import annotations

import time

from ..experiments import rows as R
from ..experiments.common import summarize_runs, with_provenance, write_result
from .growth import epochs_tag as _epochs_tag
from .growth import until_converged as _until_converged
from .protocol import Layout, total_run_seconds, run_config


SIGMA_TRAIN = 0.3
ROBUST_ROWS = {
    R.CE: {"alpha": 1.0},
    f"noise σ={SIGMA_TRAIN}": {"alpha": 1.0, "noise_sigma": SIGMA_TRAIN, "noise_draws": 1},
    # Prop. 2 (CE form): E CE(x+ξ) ≈ CE + σ²·½‖∇ log Sˢ_y‖², so λ = σ² is the equivalent weight.
    f"penalty λ=σ²={SIGMA_TRAIN ** 2:.2f}": {"alpha": 1.0, "penalty": SIGMA_TRAIN ** 2, "penalty_form": "ce"},
}




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
        grown_cells, checks, epochs, growth = _until_converged(lay, base, rows, (R.CE,))
        left_behind += growth["seconds_left_behind"]
        for row, cell in grown_cells.items():
            cells[R.key(row, where)] = cell
            print(f"  {row}|{where:<24} {epochs} epochs, clean {100 * cell['acc']['mean']:.1f}   "
                  f"[{time.time() - start:.0f} s]", flush=True)
        cells[R.key(R.DOUBLED_EPOCHS, where)] = {**checks[R.CE], "row": R.DOUBLED_EPOCHS, "training_set": training_set}
    summary = {"sigma_train": SIGMA_TRAIN, "seeds": list(profile.robust_seeds), "cells": cells, "base_epochs": base,
               "section_seconds": time.time() - start,
               "run_seconds": total_run_seconds(cells, {"train_seconds": left_behind})}
    write_result(out / "robustness.json", with_provenance(summary, run_config("robustness", profile)))
    return summary
