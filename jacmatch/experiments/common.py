"""Helpers shared by the experiments: runs that are reused when done, resumed when cut,
and summaries with mean, spread and a 95% interval over seeds."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Iterable
from pathlib import Path

from ..errors import UsageError
from ..atomic import write_json_atomic
from ..training import TeacherGradients, config_from_dict, train
from ..training.config import config_to_dict
from ..training.resume import patience_at_least

__all__ = ["CONVERGED_GAIN", "converged", "run_or_load", "passes_through", "epochs_trained", "RUN_STATE", "write_record",
           "keep_weights", "same_outcome", "run_history", "load_json", "read_json", "write_result", "write_section", "summarize",
           "summarize_runs", "with_provenance", "data_hashes"]


# points of validation accuracy: a baseline that gains less at twice its budget has converged
CONVERGED_GAIN = 0.5


def converged(val_gain: float) -> bool:
    """The budget check's rule, one-sided: less than CONVERGED_GAIN gained at twice the budget."""
    return val_gain < CONVERGED_GAIN


def run_or_load(values: dict, teacher_gradients: TeacherGradients | None = None, data_cache: dict | None = None,
                record: Path | None = None, keep: Path | None = None, donors: Iterable[Path] = (),
                need_weights: bool = True) -> dict:
    """Train the run described by ``values`` (a config dict), unless its folder already
    holds finished results for the same config; resume it when it holds a checkpoint.
    ``record``: where the finished run's record lives (its results and per-epoch metrics, a
    small JSON that is committed): a run whose folder is gone (another machine, a fresh
    clone) is that record, and nothing is trained. ``teacher_gradients`` and
    ``data_cache``: shared by the runs of a sweep (see :func:`train`). ``keep``: where the
    run's weights are kept beside its record (:func:`keep_weights`) as soon as it finishes;
    ``need_weights``: a record without them is trained again, and kept as it was when the run
    reproduces it (:func:`same_outcome`); without it, the record stands alone.
    ``donors``: finished runs of the same config with a smaller maximum or patience; a new
    run continues from the longest one it passes through (:func:`passes_through`) instead
    of training those epochs again."""
    cfg = config_from_dict(values)
    cfg.check()
    out = Path(cfg.out_dir)
    done = out / "results.json"
    if done.is_file():
        results = read_json(done)
        if not _same_config(results, cfg):
            raise UsageError(f"{out} holds results of another config: remove it or choose another folder")
        if record is not None and not record.is_file():
            write_record(record, results, out)
        if keep is not None and not keep.is_file():
            keep_weights(out, keep)
        return {**results, "history": run_history(out)}
    kept = None
    if record is not None and record.is_file():
        kept = read_json(record)
        if not _same_config(kept, cfg, where=False):
            raise UsageError(f"{record} records a run of another config: remove it (and commit that) to train "
                             "this one")
        if keep is None or keep.is_file() or not need_weights:
            return kept
    # A folder without a checkpoint holds a run cut before its first epoch ended: start it again.
    cut = (out / "last.pt").is_file()
    donor = None if cut else passes_through(cfg, donors)
    if donor is not None:
        print(f"  {out}: continues from {donor} (epoch {epochs_trained(donor)}), which it passes through", flush=True)
        for name in RUN_STATE:
            if (donor / name).is_file():
                out.mkdir(parents=True, exist_ok=True)
                shutil.copy2(donor / name, out / name)
        cut = True
    results = train(cfg, resume=cut, overwrite=not cut, teacher_gradients=teacher_gradients, data_cache=data_cache)
    if kept is not None and same_outcome(kept, results):
        results = kept  # trained again for its weights: the record (its seconds too) stands
    elif record is not None:
        if kept is not None:
            print(f"  {record}: trained again for its weights, the run differs from its record; the record is "
                  "replaced", flush=True)
        write_record(record, results, out)
    if keep is not None:
        keep_weights(out, keep)
    return results if results is kept else {**results, "history": run_history(out)}


#: The files a run continues from: its checkpoints and what it has logged.
RUN_STATE = ("last.pt", "best.pt", "metrics.jsonl", "history.jsonl")


def epochs_trained(run: Path) -> int:
    """The epochs a finished run's folder trained (its results.json)."""
    return read_json(run / "results.json")["epochs"]


def passes_through(cfg, donors: Iterable[Path]) -> Path | None:
    """The finished run among ``donors`` (folders) whose every epoch a run of ``cfg`` trains
    too, step for step (an epoch's draws depend on the seed and epoch alone): the same config
    but for its folder, a maximum and patience no larger (so ``cfg``'s run had not stopped
    where it did), ended on an evaluation epoch (a run's last epoch is evaluated whatever
    ``eval.every`` says). The one that trained longest; None when none does. A resume from
    its checkpoint ends bit for bit where ``cfg``'s run would
    (``test_raising_the_maximum_and_patience_on_resume_ends_where_a_run_given_them_ends``)."""
    found = []
    for run in donors:
        if run.resolve() == Path(cfg.out_dir).resolve() or not (run / "results.json").is_file() \
                or not (run / "last.pt").is_file():
            continue
        results = read_json(run / "results.json")
        theirs = config_from_dict(results.get("config") or {})
        if _same_config(results, cfg, where=False, but=("optim.epochs", "eval.patience")) \
                and theirs.optim.epochs <= cfg.optim.epochs and patience_at_least(theirs.eval.patience, cfg.eval.patience) \
                and results["epochs"] % cfg.eval.every == 0:
            found.append((results["epochs"], str(run), run))
    return max(found)[2] if found else None


def same_outcome(record: dict, results: dict) -> bool:
    """Whether a run trained again reproduces its record: the same best step, validation
    and test accuracy (to the last bit: training is deterministic for a config and seed)."""
    def outcome(r):
        return (r["final"]["test"]["acc"], r["final"]["val"]["acc"], (r.get("best") or {}).get("step"), r["epochs"])
    return outcome(record) == outcome(results)


def keep_weights(out: Path, keep: Path) -> None:
    """The weights a run was tested with (best.pt when it kept its best, else last.pt) as a
    small checkpoint at ``keep``: the model, its architecture, config and inputs, without
    the optimiser, schedule, history and RNG state. ``jacmatch evaluate --checkpoint``
    reads it."""
    from ..training import load_checkpoint, save_checkpoint
    source = out / "best.pt" if (out / "best.pt").is_file() else out / "last.pt"
    state = load_checkpoint(source)
    slim = {k: state[k] for k in ("model", "arch", "config", "epoch", "inputs") if k in state}
    keep.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(keep, slim)


def run_history(out: Path) -> list[dict]:
    """A run folder's per-epoch metrics (metrics.jsonl)."""
    metrics = out / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []


def _same_config(results: dict, cfg, where: bool = True, but: tuple[str, ...] = ()) -> bool:
    """Whether ``results`` are of ``cfg`` (``where``: in the same folder too), ``but`` for
    the settings named (``"optim.epochs"``). Read back through the dataclasses, so that
    settings added since take their defaults."""
    mine, theirs = config_to_dict(cfg), config_to_dict(config_from_dict(results.get("config") or {}))
    for key in (*but, *(() if where else ("out_dir",))):
        *parents, leaf = key.split(".")
        for values in (mine, theirs):
            for part in parents:
                values = values[part]
            values[leaf] = None
    return mine == theirs


def write_record(path: Path, results: dict, out: Path) -> None:
    """A finished run's record: its results (config, seed, metrics, provenance) and the
    metrics of every epoch (``history``: validation accuracy, steps and seconds, for
    time-to-accuracy), without its checkpoint."""
    write_result(path, {**results, "history": run_history(out)})


def load_json(path: str | Path) -> dict | None:
    """A result file's contents, or None when it does not exist (not run yet)."""
    path = Path(path)
    return read_json(path) if path.is_file() else None


#: The key of a result file's checksum: the SHA-256 of the rest of its contents.
RECORD_SUM = "record_sha256"


def _record_digest(value: dict) -> str:
    """The SHA-256 of ``value`` as JSON reads it back (integer keys become strings, tuples
    lists), without its checksum, keys sorted."""
    body = json.loads(json.dumps({k: v for k, v in value.items() if k != RECORD_SUM}, allow_nan=False))
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_result(path: Path, value: dict) -> None:
    """A result file or run record, with its checksum (:data:`RECORD_SUM`), atomically; written
    as JSON reads it back (a mapping whose keys collide as strings keeps the last, as a reader would)."""
    value = json.loads(json.dumps(value, allow_nan=False))
    write_json_atomic(path, {**value, RECORD_SUM: _record_digest(value)})


def _no_constant(name: str):
    raise ValueError(f"it holds {name}, which jacmatch never writes")


def read_json(path: Path) -> dict:
    """A result file or run record (a JSON object); one line naming the file when it is
    unreadable, cut, holds something else or a NaN, or fails its checksum (edited by hand:
    a record written before checksums has none)."""
    again = f"restore it (git checkout -- {path}) or remove it to run that part again"
    try:
        value = json.loads(path.read_text(), parse_constant=_no_constant)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"{path} is not a readable JSON result file ({exc}): {again}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path} holds a JSON {type(value).__name__} where a result (a JSON object) belongs: {again}")
    if RECORD_SUM in value and value[RECORD_SUM] != _record_digest(value):
        raise UsageError(f"{path} fails its checksum: it was changed since jacmatch wrote it; {again}")
    return value


def write_section(path: Path, summary: dict) -> None:
    """A section's result file, rewritten as its cells finish: a partial summary never
    replaces a complete file, or one that holds more cells (a rerun that trains nothing, cut or
    failing part-way, leaves the file as it was)."""
    if not summary.get("complete") and path.is_file():
        try:
            held = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            held = None  # a cut file: what this run has is more
        if isinstance(held, dict) and (held.get("complete") or
                                       len(held.get("cells") or {}) > len(summary.get("cells") or {})):
            return
    write_result(path, summary)


def summarize(values: list[float]) -> dict:
    """Mean, sample std, and a 95% Student-t interval half-width over seeds."""
    n = len(values)
    mean = sum(values) / n if n else float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    # two-sided 97.5% quantiles of Student's t for n-1 degrees of freedom
    t = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}.get(n - 1, 1.96)
    return {"mean": mean, "std": std, "ci95": t * std / math.sqrt(n) if n > 1 else 0.0, "n": n,
            "values": values}


def summarize_runs(runs: list[dict]) -> dict:
    """One cell of a table: test and validation accuracy, noisy accuracy per σ, Jacobian
    cosine (when a teacher was there), each summarised over the runs (seeds)."""
    tests = [r["final"]["test"] for r in runs]
    cell = {"acc": summarize([t["acc"] for t in tests]),
            "val_acc": summarize([r["final"]["val"]["acc"] for r in runs]),
            "noisy_acc": {s: summarize([t["noisy_acc"][s] for t in tests]) for s in tests[0].get("noisy_acc", {})},
            "train_seconds": sum(r["train_seconds"] for r in runs), "data_sha256": data_hashes(runs),
            "student_parameters": runs[0]["student_parameters"]}
    if "jacobian_cosine" in tests[0]:
        cell["jacobian_cosine"] = summarize([t["jacobian_cosine"] for t in tests])
    return cell


def data_hashes(runs: list[dict]) -> list[str]:
    """The distinct data hashes that ``runs`` read (from their provenance)."""
    return sorted({(r.get("provenance") or {}).get("data_sha256") for r in runs} - {None})


def with_provenance(summary: dict, config: dict | None = None, runs: list[dict] = ()) -> dict:
    """``summary`` with the provenance keys; its data hash is that of its cells' runs and of
    ``runs`` (one, unless they read different data, which the report refuses to put in one table)."""
    from ..training.provenance import provenance
    cells = summary.get("cells", {}).values()
    hashes = sorted({h for c in cells for h in c.get("data_sha256", [])} | set(data_hashes(list(runs))))
    return {**summary, "provenance": provenance(config, hashes[0] if len(hashes) == 1 else hashes or None)}


def machine_record(device) -> dict:
    """The machine a measurement ran on, for a result file: platform, torch, processor, cores, GPU."""
    import platform

    import torch

    from ..training.provenance import machine
    return {"platform": platform.platform(), "torch": torch.__version__, **machine(device)}
