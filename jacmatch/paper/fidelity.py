"""``jacmatch experiment fidelity``: how faithfully each converged student copies its
teacher (Stanton et al. 2021: top-1 agreement and KL(teacher ‖ student)), on the clean
test points, under each test noise σ and between pairs of test points, computed from the
weights that the converged section kept beside its records. Nothing is trained: a fresh
clone computes the table from the committed weights.

Each student's test accuracy is measured again beside its fidelity and compared with its
record: the weights are the ones that were tested. A student evaluated before, beside the
same teacher, is read back from ``fidelity.json`` while its weights file's SHA-256 is the
same, so a section that grows adds only its new students."""

from __future__ import annotations

import json
import time

from ..experiments import rows as R
from ..errors import UsageError
from ..experiments.common import load_json, summarize, with_provenance, write_section
from .converge import CONVERGE_ROWS
from .protocol import FULL, Layout, run_config

__all__ = ["fidelity_section"]


def _student_fidelity(lay: Layout, path, teacher, key, cache: dict) -> dict:
    """One kept student's evaluation beside the teacher, as its run evaluated it (the same
    noise draws, interpolations and memory format)."""
    import torch

    from ..training import config_from_dict, evaluate, load_data, load_model
    model, state = load_model(path)
    cfg = config_from_dict(json.loads(state["config"]))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if "data" not in cache:  # the test set the students were tested on (it does not depend on n or seed)
        cache["data"] = load_data(cfg, cache=lay.data_cache)
    data = cache["data"]
    trained_on = (state.get("inputs") or {}).get("data_sha256")
    if trained_on != data.data_sha256:
        raise UsageError(f"{path} was trained on data {str(trained_on)[:12]}…, this machine has {data.data_sha256[:12]}…: "
                         "restore the data the section was run on")
    e = cfg.eval
    result = evaluate(model, data.test, "cpu", batch_size=e.batch_size, noise_sigmas=e.noise_sigmas,
                      noise_seed=e.noise_seed, teacher=teacher, cosine_samples=0, teacher_key=key,
                      teacher_gradients=lay.teacher_gradients, interpolations=e.interpolations,
                      interpolation_seed=e.interpolation_seed)
    return {"acc": result["acc"], "fidelity": result["fidelity"], "data_sha256": data.data_sha256}


def _summaries(results: list[dict], measure: str) -> dict:
    """``measure`` (agreement or kl) over the seeds: clean, per noise σ, interpolated."""
    fid = [r["fidelity"] for r in results]
    out = {"clean": summarize([f["clean"][measure] for f in fid]),
           "noisy": {s: summarize([f["noisy"][s][measure] for f in fid]) for s in fid[0]["noisy"]}}
    if "interpolated" in fid[0]:
        out["interpolated"] = summarize([f["interpolated"][measure] for f in fid])
    return out


def fidelity_section(lay: Layout) -> dict:
    """Fidelity of every converged row at every n, over its seeds, from the kept weights."""
    from ..training import load_model
    from ..training.provenance import file_sha256
    c = load_json(lay.out / "converge.json")
    flag = "" if lay.profile is FULL else " --" + lay.profile.name
    if not c or not any("weights" in cell for cell in c["cells"].values()):
        raise UsageError(f"{lay.out / 'converge.json'} holds no kept weights: run `jacmatch experiment converge{flag}` "
                         "first")
    start, config = time.time(), run_config("distill", lay.profile)
    teacher, _ = load_model(c["teacher"])
    key = ("fidelity", c["teacher"])  # one teacher, one test set: its outputs are computed once
    cache: dict = {}
    cells: dict = {}
    teacher_sha = file_sha256(c["teacher"])
    before = load_json(lay.out / "fidelity.json") or {}
    # weights path -> its SHA-256 and evaluation: those of a partial converge.json's cells, and those kept before
    # whose weights are still here (a later part's cells reuse them)
    known = {w: v for w, v in (before.get("students_by_weights", {}) if before.get("teacher_sha256") == teacher_sha
                               else {}).items() if (lay.out / w).is_file()}
    students: set = set()

    def student(w: str) -> dict:
        sha = file_sha256(lay.out / w)
        if known.get(w, {}).get("sha256") != sha:
            known[w] = {"sha256": sha, **_student_fidelity(lay, lay.out / w, teacher, key, cache)}
            summary["evaluated"] += 1
        students.add(w)
        return known[w]
    summary = {"teacher": c["teacher"], "teacher_sha256": teacher_sha, "rows": list(CONVERGE_ROWS),
               "samples": c["samples"], "seeds": c["seeds"], "cells": cells, "complete": False, "evaluated": 0,
               "students_by_weights": known}
    for cell_key, cell in c["cells"].items():
        row, _ = R.split_key(cell_key)
        if row not in CONVERGE_ROWS or "weights" not in cell:
            continue
        missing = [w for w in cell["weights"] if not (lay.out / w).is_file()]
        if missing:
            raise UsageError(f"{lay.out / missing[0]} is missing: run `jacmatch experiment converge{flag}` to keep the "
                             "students' weights")
        results = [student(w) for w in cell["weights"]]
        recorded = cell["acc"]["values"]
        cells[cell_key] = {"row": row, "samples_per_class": cell["samples_per_class"], "weights": cell["weights"],
                           "agreement": _summaries(results, "agreement"), "kl": _summaries(results, "kl"),
                           "acc": summarize([r["acc"] for r in results]),
                           "acc_vs_record": max(abs(r["acc"] - a) for r, a in zip(results, recorded)),
                           "data_sha256": sorted({r["data_sha256"] for r in results})}
        summary["students"] = len(students)
        summary["weights_bytes"] = sum((lay.out / w).stat().st_size for c in cells.values() for w in c["weights"])
        summary["section_seconds"] = time.time() - start
        write_section(lay.out / "fidelity.json", with_provenance(summary, config))
    summary["complete"] = c.get("complete", True)  # every converged student so far: partial while converge is
    summary["section_seconds"] = time.time() - start
    write_section(lay.out / "fidelity.json", with_provenance(summary, config))
    return summary
