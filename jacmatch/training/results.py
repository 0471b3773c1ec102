"""What a run reports: its evaluation as the config asks, where its best validation
accuracy was, results.json, and what a checkpoint holds."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
from torch import nn

from ..data import DataSplits
from ..models import count_parameters
from .checkpoint import CheckpointError
from .config import RunConfig, config_to_dict
from .evaluate import evaluate
from .provenance import provenance

__all__ = ["evaluate_splits", "best_index", "no_better_for", "best_point", "run_results", "run_state", "loop_seconds",
           "past_budget"]


def evaluate_splits(model: nn.Module, data: DataSplits, cfg: RunConfig, device="cpu", *, teacher=None,
                    teacher_key=None, teacher_gradients=None, test: bool = True) -> dict:
    """A run's evaluation, as its config says: {"val": accuracy, "test": accuracy, under
    noise, and beside ``teacher`` its fidelity and the Jacobian cosine when the config asks}; without
    ``test``, validation only (a run's evaluations before its last)."""
    e = cfg.eval
    val = {"val": evaluate(model, data.val, device, batch_size=e.batch_size, noise_sigmas=())}
    if not test:
        return val
    return {**val,
            "test": evaluate(model, data.test, device, batch_size=e.batch_size,
                             noise_sigmas=e.noise_sigmas, noise_seed=e.noise_seed, teacher=teacher,
                             cosine_samples=e.cosine_samples if e.jacobian_cosine else 0, teacher_key=teacher_key,
                             teacher_gradients=teacher_gradients, fidelity=e.fidelity,
                             interpolations=e.interpolations, interpolation_seed=e.interpolation_seed)}


def best_index(history: list[dict], min_delta: float = 0.0) -> int | None:
    """The epoch record (index) of the best validation accuracy, in order: an evaluation is
    better when it beats the best so far by more than ``min_delta`` (the first of equals)."""
    best = None
    for i, h in enumerate(history):
        if "val" in h and (best is None or h["val"]["acc"] > history[best]["val"]["acc"] + min_delta):
            best = i
    return best


def no_better_for(cfg: RunConfig, history: list[dict]) -> int:
    """Evaluations since the best one (0 when the last is the best, or with keep_best off)."""
    best = best_index(history, cfg.eval.min_delta) if cfg.eval.keep_best else None
    return 0 if best is None else sum(1 for h in history[best + 1:] if "val" in h)


def loop_seconds(history: list[dict]) -> float:
    """The epochs' own training time (steps, no evaluation), over every invocation."""
    return sum(h.get("epoch_seconds", 0.0) for h in history)


def past_budget(cfg: RunConfig, history: list[dict], seconds: float = 0.0) -> bool:
    """Whether ``history``'s training time, and ``seconds`` more, reach ``cfg.time_budget`` (0: none)."""
    return cfg.time_budget > 0 and loop_seconds(history) + seconds >= 60 * cfg.time_budget


def best_point(history: list[dict], cfg: RunConfig, epochs: int | None = None) -> dict:
    """Where the best validation accuracy was: its epoch and step, whether the run stopped
    early (patience or the time budget), and whether that point lies strictly inside the
    run's maximum of ``epochs`` (default ``optim.epochs``; see ``planned_epochs``)."""
    best = best_index(history, cfg.eval.min_delta)
    epochs = epochs or cfg.optim.epochs
    if best is None:
        return {}
    steps = list(itertools.accumulate(h["steps"] for h in history))
    seconds = list(itertools.accumulate(h.get("epoch_seconds", 0.0) for h in history))
    return {"epoch": history[best]["epoch"], "step": steps[best], "val_acc": history[best]["val"]["acc"],
            "loop_seconds": seconds[best], "max_epochs": epochs, "epochs_trained": len(history),
            "stopped_early": history[-1]["epoch"] < epochs, "inside": history[best]["epoch"] < epochs,
            **({"stopped_by": "time_budget"} if history[-1].get("time_budget") else {})}


def run_results(cfg: RunConfig, data: DataSplits, model: nn.Module, teacher: nn.Module | None, history: list[dict],
                seconds: float) -> dict:
    """results.json's common part: config, data, sizes, the last epoch's values, times, provenance."""
    final = history[-1] if history else {}
    return {"config": config_to_dict(cfg), "dataset": data.name, "num_train": len(data.train), "num_val": len(data.val),
            "num_classes": data.num_classes, "student_parameters": count_parameters(model),
            "teacher_parameters": count_parameters(teacher) if teacher is not None else None,
            "final": {"val": final.get("val"), "test": final.get("test"), "train": final.get("train")},
            "epochs": len(history), "train_seconds": seconds, "torch": torch.__version__,
            # the epochs' own time (steps, no evaluation), over every invocation: what equal compute compares
            "loop_seconds": loop_seconds(history),
            "eval_seconds": sum(h.get("eval_seconds", 0.0) for h in history),
            "provenance": provenance(config_to_dict(cfg), data.data_sha256,
                                     next(model.parameters(), torch.empty(0)).device)}


def run_state(cfg, model, optimizer, scheduler, history, epoch: int, **extra) -> dict:
    """What a checkpoint holds: weights, optimiser, schedule, ``epoch`` completed epochs,
    the history, the config and the RNG state (``extra``: a mid-epoch stop's position)."""
    return {"model": model.state_dict(), "arch": model.arch, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch, "history": json.dumps(history),
            "config": json.dumps(config_to_dict(cfg)), "rng": torch.get_rng_state(), **extra}


def check_best_kept(out: Path, cfg: RunConfig, history: list[dict]) -> None:
    """With keep_best, best.pt holds the best epoch's weights once an evaluation has run:
    refused (one line) when it is missing, since the record would name an epoch whose weights
    are not the ones tested."""
    best = best_index(history, cfg.eval.min_delta) if cfg.eval.keep_best else None
    if best is not None and not (out / "best.pt").is_file():
        raise CheckpointError(f"{out / 'best.pt'} is missing, but epoch {history[best]['epoch']} was the best: "
                              "restore it, or train again with --overwrite")
