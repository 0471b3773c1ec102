"""The growth rule of the sections that train for epochs: every row is trained as long as
its baselines need, the epochs doubling while a baseline still gains on validation at
twice them (``common.converged``)."""

from __future__ import annotations

from ..experiments import rows as R
from ..experiments.common import converged, summarize_runs

__all__ = ["epochs_tag", "check_cell", "until_converged"]


def epochs_tag(tag: str, epochs: int, base: int) -> str:
    """A run's folder name at ``epochs``: ``CE_full_s0`` at the config's, ``CE_full_e16_s0``
    at others; a baseline at twice the epochs is the same run as that row grown to them."""
    if epochs == base:
        return tag
    head, seed = tag.rsplit("_s", 1)
    return f"{head}_e{epochs}_s{seed}"


def check_cell(cell: dict, doubled: list[dict]) -> dict:
    """A baseline at twice its budget, beside the cell at its budget: the change in validation
    and test accuracy (points, the means over seeds)."""
    twice = summarize_runs(doubled)
    return {**twice, "epochs": doubled[0]["epochs"], "val_gain": 100 * (twice["val_acc"]["mean"] - cell["val_acc"]["mean"]),
            "test_gain": 100 * (twice["acc"]["mean"] - cell["acc"]["mean"])}


def until_converged(lay, base: int, rows, baselines: tuple[str, ...]) -> tuple[dict, dict, int, dict]:
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
        checks = {row: {**check_cell(cells[row], twice[row]["runs"]), "row": R.twice_epochs(row)} for row in baselines}
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
