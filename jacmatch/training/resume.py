"""Resume: what a run read (by content), what a resume may change, and the point a
checkpoint restores (weights, optimiser, schedule, history, position)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data import DataSplits
from .checkpoint import CheckpointError, load_checkpoint
from .config import ConfigError, RunConfig, config_from_dict, config_to_dict
from .distributed import DistInfo
from .provenance import file_sha256
from .results import check_best_kept
from .run_folder import append_jsonl, now
from .schedule import lr_factor

__all__ = ["RESUME_MAY_CHANGE", "RESUME_MAY_MOVE", "ResumePoint", "run_inputs", "check_same_inputs",
           "resume_changes", "patience_at_least", "restore"]


@dataclass
class ResumePoint:
    """Where a run continues: its history, the epochs done, a signal's stop inside an epoch
    (``first_step`` > 0 with that epoch's draws, sums and seconds), the CPU generator's
    state, and the settings the resume changed (logged with its first epoch). A new run
    starts from ``ResumePoint()``."""

    history: list = field(default_factory=list)
    start_epoch: int = 0
    first_step: int = 0
    mid_epoch: dict | None = None
    rng: torch.Tensor | None = None
    changes: dict = field(default_factory=dict)
    bad_samples: dict = field(default_factory=dict)  # the unreadable training samples found before, by index


#: Settings a resume may change: they cannot alter the epochs already trained (the
#: maximum and the patience only upwards: a run that would have stopped sooner is refused).
RESUME_MAY_CHANGE = ("optim.epochs", "optim.max_steps", "eval.patience", "time_budget", "recipe_reason", "progress",
                     "eval.every", "device", "out_dir", "tensorboard", "tracking", "tracking_uri", "tracking_project",
                     "tracking_group")
#: Paths that may move too, when the checkpoint records their contents (run_inputs).
RESUME_MAY_MOVE = ("teacher", "teacher_weights", "data.data_dir")


def run_inputs(cfg: RunConfig, data: DataSplits) -> dict:
    """What a run read, by content: the data's hash, and the teacher file's SHA-256 with
    its path as given and as resolved (a relative path means another file elsewhere)."""
    inputs: dict = {"data_sha256": data.data_sha256}
    weights = cfg.teacher or cfg.teacher_weights
    if weights:
        inputs["teacher"] = {"given": weights, "path": str(Path(weights).resolve()), "sha256": file_sha256(weights)}
    if cfg.data.data_dir:
        inputs["data_dir"] = {"given": cfg.data.data_dir, "path": str(Path(cfg.data.data_dir).resolve())}
    return inputs


def check_same_inputs(trained: dict | None, now: dict, last: Path) -> None:
    """A resume reads the teacher and data its run was trained with, by content: refused
    (one line, both hashes) otherwise. Checkpoints from before this record pass."""
    if not trained:
        return
    old_t, new_t = trained.get("teacher"), now.get("teacher")
    if old_t and new_t and old_t["sha256"] != new_t["sha256"]:
        raise ConfigError(f"--resume: the teacher {new_t['given']} ({new_t['path']}) has SHA-256 {new_t['sha256']}, "
                          f"but {last.parent} was trained with {old_t['path']} of SHA-256 {old_t['sha256']}: pass "
                          "that teacher, or start a new run in another --out")
    if trained.get("data_sha256") and trained["data_sha256"] != now["data_sha256"]:
        raise ConfigError(f"--resume: the data read now has SHA-256 {now['data_sha256']}, but {last.parent} was "
                          f"trained on data of SHA-256 {trained['data_sha256']}: the files changed; restore them, "
                          "or start a new run in another --out")


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in values.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "options" else {prefix + k: v})
    return out


def resume_changes(trained: dict, cfg: RunConfig, epochs_done: int, last: Path, contents_recorded: bool = False) -> dict:
    """The settings that differ between the checkpoint's run and ``cfg``, as
    ``{key: [old, new]}``; refused (one line, every key as ``key: old -> new``) unless
    each is one of :data:`RESUME_MAY_CHANGE` (or of :data:`RESUME_MAY_MOVE`, when the
    checkpoint records the contents those paths held)."""
    old = _flat(config_to_dict(config_from_dict(trained)))
    new = _flat(config_to_dict(cfg))
    changes = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
    allowed = RESUME_MAY_CHANGE + (RESUME_MAY_MOVE if contents_recorded else ())
    refused = {k: v for k, v in changes.items() if k not in allowed}
    if cfg.optim.epochs < epochs_done:
        refused["optim.epochs"] = [old.get("optim.epochs"), cfg.optim.epochs]
    if "optim.max_steps" in changes and not patience_at_least(*changes["optim.max_steps"]):  # 0: no maximum
        refused["optim.max_steps"] = changes["optim.max_steps"]
    if "eval.patience" in changes and not patience_at_least(*changes["eval.patience"]):
        refused["eval.patience"] = changes["eval.patience"]
    if refused:
        diff = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise ConfigError(f"--resume would change what {last.parent} was trained with ({diff}); resume with its "
                          f"config.yaml, or start a new run in another --out (a resume may change only "
                          f"{', '.join(allowed)}, and epochs, max_steps and patience only upwards)")
    return changes


def patience_at_least(old: int, new: int) -> bool:
    """Whether patience ``new`` waits at least as long as ``old`` (0 waits for ever): a run
    that had not stopped under ``old`` has not under ``new`` either."""
    return new == 0 or (old != 0 and new >= old)


def extend_schedule(trained_optim: dict, cfg: RunConfig, scheduler) -> dict:
    """A resume that raises ``optim.epochs``: from the epoch where the run stopped on, the
    learning rate follows the schedule of a run planned that long from the start (the
    restored optimiser holds the old plan's rate there, which is 0 at the end of a
    cosine). Returns both plans' rates for the epochs still to train, for history.jsonl."""
    epoch, factor = scheduler.last_epoch, lr_factor(cfg.optim)
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * factor(epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    old = lr_factor(config_from_dict({"optim": trained_optim}).optim)
    ahead = range(epoch, min(cfg.optim.epochs, epoch + 1000))  # at most 1000 epochs of each plan
    base = scheduler.base_lrs[0]
    return {"from_epoch": epoch + 1,
            "old": {"epochs": trained_optim["epochs"], "lr": [base * old(e) for e in ahead
                                                             if e < trained_optim["epochs"]]},
            "new": {"epochs": cfg.optim.epochs, "lr": [base * factor(e) for e in ahead]}}


def restore(cfg: RunConfig, last: Path, model: nn.Module, optimizer, scheduler, info: DistInfo, device,
            inputs: dict) -> ResumePoint:
    """Weights, optimiser and schedule loaded from ``last``; returns the point the run
    continues from. The config changes the resume makes are checked and logged."""
    state = load_checkpoint(last, map_location=device)
    if state.get("arch") != model.arch:
        raise CheckpointError(f"{last} holds model {state.get('arch')}, the config asks for {model.arch}")
    changes = resume_changes(json.loads(state["config"]), cfg, state["epoch"], last, "inputs" in state)
    check_same_inputs(state.get("inputs"), inputs, last)
    check_best_kept(last.parent, cfg, json.loads(state["history"]))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    event = {"time": now(), "event": "resume", "epoch": state["epoch"],
             "changes": changes}
    if "optim.epochs" in changes:
        event["schedule"] = extend_schedule(json.loads(state["config"])["optim"], cfg, scheduler)
    if info.is_main:
        append_jsonl(last.parent / "history.jsonl", event)
        said = {k: v for k, v in changes.items() if k not in ("progress", "recipe_reason")}
        print(f"resume: {last.parent} from epoch {state['epoch']}" + ("; changed: " + "; ".join(
            f"{k} {a!r} -> {b!r}" for k, (a, b) in said.items()) if said else ", as it was configured"), flush=True)
    return ResumePoint(history=json.loads(state["history"]), start_epoch=state["epoch"], changes=changes,
                       bad_samples={int(k): v for k, v in json.loads(state.get("bad_samples", "{}")).items()},
                       first_step=state.get("step", 0), mid_epoch=state.get("mid_epoch"),  # stopped mid-epoch
                       rng=state["rng"])
