"""``jacmatch tune``: a recipe's values chosen on the user's own validation split, by Optuna.

The search is Optuna's: a TPE sampler, a median pruner fed each evaluation's validation
accuracy (it may stop a trial once the trial has had its run's early-stopping patience in
evaluations), the study in a database (SQLite in ``OUT/study.db`` by default; any URL Optuna takes,
so that workers on several machines share one study). Each trial is an ordinary run folder,
``OUT/trials/NNNN``, with its config, provenance and checkpoints.

An interrupted worker (SIGTERM, Ctrl-C, a kill) leaves its trial running in the database
without a heartbeat; after the grace period Optuna fails it and enqueues its values again
(Optuna's retry callback), and the retry resumes the cut trial's folder from its last
checkpoint. A failed trial is never counted: ``--trials N`` counts complete and pruned ones.
"""

from __future__ import annotations

import csv
import inspect
import json
import os
import random
import shutil
import time
from pathlib import Path

import yaml

from .._extras import require
from ..errors import UsageError
from .config import apply_overrides, config_from_dict, config_to_dict
from .recipes import RECIPES

__all__ = ["parse_space", "space_of", "tune"]

KINDS = ("log", "float", "int")
EXIT_PREEMPTED = 75
#: a trial's grace (evaluations before the pruner may stop it) when its run has no early stopping
GRACE_WITHOUT_PATIENCE = 10
CREATE_ATTEMPTS = 5  # creating the study, while other workers may be creating it too


def parse_space(items: list[str]) -> dict:
    """``KEY=KIND:LOW:HIGH`` strings (kind log, float or int) as ``{key: (kind, low, high)}``."""
    out = {}
    for item in items or []:
        key, _, spec = item.partition("=")
        parts = spec.split(":")
        try:
            kind, low, high = parts[0], float(parts[1]), float(parts[2])
        except (IndexError, ValueError):
            kind, low, high = "", 0.0, 0.0
        if len(parts) != 3 or kind not in KINDS or not (low < high) or (kind == "log" and low <= 0):
            raise UsageError(f"--space expects KEY=KIND:LOW:HIGH with KIND one of {', '.join(KINDS)} and LOW < HIGH "
                             f"(LOW > 0 for log), e.g. optim.lr=log:0.001:0.03; got {item!r}")
        out[key.strip()] = (kind, low, high)
    return out


def space_of(recipe_name: str, overrides: dict) -> dict:
    """The recipe's search space with ``overrides`` on top; each key must be a setting."""
    space = {**RECIPES[recipe_name].space, **overrides}
    from .config import config_keys
    known = {k for k, *_ in config_keys()}
    for key in space:
        if key not in known:
            raise UsageError(f"--space: unknown setting {key!r}; every key: `jacmatch config --list`")
    return space


def _suggest(trial, space: dict) -> dict:
    values = {}
    for key, (kind, low, high) in space.items():
        if kind == "int":
            values[key] = trial.suggest_int(key, int(low), int(high))
        else:
            values[key] = trial.suggest_float(key, low, high, log=kind == "log")
    return values


def _retry_callback():
    """Optuna's callback that enqueues a stale trial again: RetryHeartbeatStaleTrialCallback
    from Optuna 4.9 (which deprecates RetryFailedTrialCallback), the older name before."""
    import optuna.storages as storages
    return getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback


def _storage(optuna, url: str, heartbeat: int):
    """Optuna's database storage with heartbeats: a trial whose worker died is failed after
    the grace period and enqueued again (its retry resumes the trial's folder)."""
    from optuna.storages import RDBStorage
    retry = _retry_callback()(max_retry=3)
    params = inspect.signature(RDBStorage.__init__).parameters
    callback = {"heartbeat_stale_trial_callback": retry} if "heartbeat_stale_trial_callback" in params \
        else {"failed_trial_callback": retry}
    return RDBStorage(url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat, **callback)


def _open_study(optuna, root: Path, storage: str | None, study_name: str, heartbeat: int, seed: int):
    """The study in its database, created by the first worker (the workers of one folder one at a time)."""
    import fcntl
    import warnings
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # retry_history: stable since 3.0
    url = storage or f"sqlite:///{(root / 'study.db').resolve()}"
    with open(root / ".study.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for attempt in range(CREATE_ATTEMPTS):
            try:
                return optuna.create_study(
                    study_name=study_name, storage=_storage(optuna, url, heartbeat), load_if_exists=True,
                    direction="maximize",
                    # each worker its own draws (the same seed would propose the same values to workers starting together)
                    sampler=optuna.samplers.TPESampler(seed=seed * 1_000_003 + os.getpid()),
                    pruner=optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0))
            except Exception as exc:  # workers on other machines creating the same tables or study at once
                if attempt + 1 == CREATE_ATTEMPTS or not _lost_a_creation_race(exc):
                    raise
                time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


def _lost_a_creation_race(exc: Exception) -> bool:
    """Whether creating the study failed because another worker created the same schema or
    study at the same moment (the database's integrity or duplicate-object error), which the
    next attempt finds there."""
    try:
        from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
    except ImportError:
        return False
    text = str(exc).lower()
    return isinstance(exc, (IntegrityError, ProgrammingError, OperationalError)) and any(
        word in text for word in ("already exists", "duplicate", "unique"))


def grace_of(cfg) -> int:
    """How many evaluations a trial has before the pruner may stop it: the run's own early-stopping
    patience (the grace the recipe gives any run before it gives up on it), or
    :data:`GRACE_WITHOUT_PATIENCE` for a run without early stopping. A first evaluation says
    little: at n = 10, an FM+JM run that ended at 82 % validation sat at 10 % for its first 200 steps."""
    return cfg.eval.patience if cfg.eval.patience > 0 else GRACE_WITHOUT_PATIENCE


def _run_trial(trial, study, root: Path, values0: dict, space: dict, data_cache: dict | None) -> float:
    """One trial: a run folder trained with the trial's values (a retry resumes the folder of
    the trial it retries, and reports the evaluations that folder holds), reported at each
    evaluation, and pruned only after its grace (:func:`grace_of`); its best validation accuracy.
    Its ``seconds`` are the worker's wall time on it (a retry's: its own part)."""
    import optuna
    from optuna.trial import TrialState

    from .epoch import Preempted
    from .trainer import train
    frozen = next(t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t.number == trial.number)
    first = (_retry_callback().retry_history(frozen) or [trial.number])[0]
    folder = root / "trials" / f"{first:04d}"
    chosen = _suggest(trial, space)
    group = values0.get("tracking_group") or study.study_name  # a tracker shows the study's trials as one group
    cfg = config_from_dict(apply_overrides(values0, [*chosen.items(), ("out_dir", str(folder)), ("progress", False),
                                                     ("tracking_group", group)]))
    cfg.check()
    trial.set_user_attr("folder", str(folder))
    resume = (folder / "last.pt").is_file()
    print(f"trial {trial.number}: " + ", ".join(f"{k}={v:.4g}" for k, v in chosen.items())
          + (f" (resumes trial {first}'s folder)" if resume else ""), flush=True)
    grace, evaluations, start = grace_of(cfg), [], time.time()

    def on_evaluation(steps: int, val_acc: float) -> None:
        evaluations.append(steps)
        trial.report(val_acc, steps)
        if len(evaluations) >= grace and trial.should_prune():
            trial.set_user_attr("seconds", time.time() - start)
            raise optuna.TrialPruned(f"validation {val_acc:.4f} at step {steps} (evaluation {len(evaluations)}): "
                                     "below the median")
    try:
        results = train(cfg, resume=resume, overwrite=not resume, data_cache=data_cache, on_evaluation=on_evaluation)
    except Preempted as exc:  # the trial stays running without a heartbeat: Optuna retries it, and
        print(f"trial {trial.number}: {exc}", flush=True)  # its retry resumes this folder
        os._exit(EXIT_PREEMPTED)
    trial.set_user_attr("test_acc", (results["final"].get("test") or {}).get("acc"))
    trial.set_user_attr("seconds", time.time() - start)
    return (results.get("best") or {}).get("val_acc", (results["final"].get("val") or {}).get("acc", 0.0))


def tune(base, recipe_name: str, out: str, trials: int = 24, space: dict | None = None, storage: str | None = None,
         study_name: str = "jacmatch", minutes: float = 0.0, heartbeat: int = 60, seed: int = 0,
         data_cache: dict | None = None) -> dict:
    """Run trials of ``base`` (a resolved RunConfig of ``recipe_name``) with values from
    ``space`` until the study holds ``trials`` complete or pruned trials (or ``minutes``
    pass); then write ``best.yaml``, ``best.pt``, ``trials.csv`` and ``history.png`` in
    ``out``. Returns the summary written to ``out/tune.json``."""
    optuna = require("optuna", "tune")
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState
    root = Path(out)
    (root / "trials").mkdir(parents=True, exist_ok=True)
    space = space if space is not None else space_of(recipe_name, {})
    study = _open_study(optuna, root, storage, study_name, heartbeat, seed)
    values0, counted, start = config_to_dict(base), (TrialState.COMPLETE, TrialState.PRUNED), time.time()
    if len(study.get_trials(deepcopy=False, states=counted)) < trials:
        study.optimize(lambda trial: _run_trial(trial, study, root, values0, space, data_cache),
                       callbacks=[MaxTrialsCallback(trials, states=counted)],
                       timeout=60 * minutes if minutes else None, gc_after_trial=True)
    return write_outputs(study, root, recipe_name, space, trials, time.time() - start)


def write_outputs(study, root: Path, recipe_name: str, space: dict, trials: int, seconds: float) -> dict:
    """best.yaml (distill --config trains it as it is), best.pt, trials.csv, history.png, tune.json."""
    from optuna.trial import TrialState

    from ..atomic import write_json_atomic
    all_trials = study.get_trials(deepcopy=False)
    complete = [t for t in all_trials if t.state == TrialState.COMPLETE]
    with open(root / "trials.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["number", "state", *space, "val_acc", "test_acc", "seconds", "folder"])
        for t in all_trials:
            w.writerow([t.number, t.state.name, *(t.params.get(k) for k in space), t.value,
                        t.user_attrs.get("test_acc"), t.user_attrs.get("seconds"), t.user_attrs.get("folder")])
    summary = {"study": study.study_name, "recipe": recipe_name, "space": {k: list(v) for k, v in space.items()},
               "trials": trials, "complete": len(complete),
               "pruned": sum(t.state == TrialState.PRUNED for t in all_trials),
               "failed": sum(t.state == TrialState.FAIL for t in all_trials), "worker_seconds": seconds,
               # the study's cost: the workers' time on its complete and pruned trials (a failed trial's
               # part is not known: its worker died; its retry resumes its folder)
               "trial_seconds": sum(t.user_attrs.get("seconds") or 0.0 for t in all_trials
                                    if t.state in (TrialState.COMPLETE, TrialState.PRUNED))}
    if complete:
        best = study.best_trial
        folder = Path(best.user_attrs["folder"])
        values = json.loads((folder / "results.json").read_text())["config"]
        values = {k: v for k, v in values.items() if k not in ("out_dir", "recipe_reason")}
        (root / "best.yaml").write_text(f"# jacmatch tune: trial {best.number} of study {study.study_name!r}, "
                                        f"validation accuracy {best.value:.4f}\n"
                                        + yaml.safe_dump(values, sort_keys=False))
        weights = folder / "best.pt" if (folder / "best.pt").is_file() else folder / "last.pt"
        shutil.copyfile(weights, root / "best.pt")
        summary.update(best={"number": best.number, "val_acc": best.value, "params": best.params,
                             "test_acc": best.user_attrs.get("test_acc"), "folder": str(folder)})
        _plot(all_trials, root / "history.png")
    write_json_atomic(root / "tune.json", summary)
    return summary


def _plot(all_trials, path: Path) -> None:
    """The optimisation history: each complete trial's validation accuracy and the best so far,
    each pruned trial's last reported validation accuracy (where the pruner stopped it)."""
    from optuna.trial import TrialState
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    done = [t for t in all_trials if t.state == TrialState.COMPLETE]
    best, running = [], 0.0
    for t in done:
        running = max(running, t.value)
        best.append(running)
    pruned = [t for t in all_trials if t.state == TrialState.PRUNED and t.intermediate_values]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([t.number for t in done], [100 * t.value for t in done], "o", label="complete")
    ax.plot([t.number for t in pruned], [100 * t.intermediate_values[max(t.intermediate_values)] for t in pruned], "x",
            label="pruned (last evaluation)")
    ax.plot([t.number for t in done], [100 * b for b in best], "-", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
