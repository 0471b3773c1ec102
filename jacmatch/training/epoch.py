"""An epoch of steps and its end: draws seeded per epoch, a signal's stop mid-epoch, and
at the end the log, the evaluation, the best weights, patience and the checkpoint.

Randomness is derived from ``(seed, epoch)`` at the start of every epoch (data order,
augmentation, the objective's random draws), so a run resumed from the checkpoint of epoch e
continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..core.draws import ShardedGenerator
from ..data import DataSplits, random_crop_flip
from ..data.augment import mix
from ..data.formats import DataError
from .cache import TeacherCache
from .checkpoint import load_checkpoint, save_checkpoint
from .config import RunConfig
from .distributed import DistInfo, any_process, gather_interleaved, mean_across_processes
from .evaluate import TeacherGradients
from .progress import log_epoch, progress
from .results import best_index, check_best_kept, evaluate_splits, no_better_for, past_budget, run_state
from .resume import ResumePoint
from .schedule import epoch_batches, seed_of
from .step import Stepper

__all__ = ["Run", "Preempted", "StopOnSignal", "train_epoch", "end_epoch", "evaluate_best", "draws"]


class Preempted(RuntimeError):
    """SIGTERM or SIGINT stopped the run, after the current step and a checkpoint at it."""


class StopOnSignal(contextlib.AbstractContextManager):
    """SIGTERM (cluster preemption, eviction) and SIGINT ask the loop to stop after the
    current step; the handlers before are restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._before: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._before[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._before.items():
            signal.signal(sig, handler)
        return None


def draws(gen: torch.Generator, info: DistInfo):
    """A generator's draws for this process: its own samples of the global batch (the
    number of processes changes no draw)."""
    return ShardedGenerator(gen, info.rank, info.world_size) if info.enabled else gen


@dataclass
class Run:
    """What a run holds between its phases: set up once (:mod:`.trainer`), then epochs."""

    cfg: RunConfig
    info: DistInfo
    device: torch.device
    out: Path
    data: DataSplits
    model: nn.Module  # the student, unwrapped (what a checkpoint holds)
    net: nn.Module  # the student as trained: the model, or its DDP wrapper
    teacher: nn.Module | None
    objective: Any  # the TransferObjective
    cache: TeacherCache | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    stepper: Stepper
    gen: torch.Generator  # the objective's draws
    aug_gen: torch.Generator  # crops and flips
    teacher_key: tuple | None
    teacher_gradients: TeacherGradients
    point: ResumePoint = field(default_factory=ResumePoint)  # where the run starts (a resume's point)
    fill_seconds: float = 0.0  # the teacher cache's fill, counted in the first epoch this process trains
    loggers: list = field(default_factory=list)  # TensorBoard, MLflow, W&B (.tracking), in the main process
    inputs: dict = field(default_factory=dict)  # the teacher's and the data's hashes (run_inputs)
    best_final: dict = field(default_factory=dict)  # eval.keep_best: the best weights' validation and test
    epochs: int = 0  # the epochs the run trains at most (optim.epochs, fewer under optim.max_steps)
    on_evaluation: Any = None  # called (steps so far, validation accuracy) after each evaluation (jacmatch tune)

    @property
    def history(self) -> list:
        return self.point.history

    @property
    def last(self) -> Path:
        return self.out / "last.pt"

    def state(self, epoch: int, **extra) -> dict:
        bad = self.data.train.bad  # the unreadable samples found so far: a resume counts on from them
        if bad is not None and bad.found:
            extra["bad_samples"] = json.dumps({str(k): v for k, v in bad.found.items()})
        return run_state(self.cfg, self.model, self.optimizer, self.scheduler, self.history, epoch,
                         inputs=self.inputs, **extra)


def train_epoch(run: Run, epoch: int, stop: StopOnSignal) -> tuple[int, dict[str, float], int, float]:
    """The epoch's steps; returns (steps, sums of the terms, skipped steps, seconds). Its
    draws are seeded from (seed, epoch), or restored where a signal stopped it, and so are
    its seconds: a stopped epoch's time before the stop counts in its ``epoch_seconds``."""
    cfg, info, point = run.cfg, run.info, run.point
    t_epoch, before = time.time(), run.fill_seconds  # the teacher's passes that the cache took ahead
    run.fill_seconds = 0.0
    torch.manual_seed(seed_of(cfg.seed, epoch, info.rank, 1))
    run.gen.manual_seed(seed_of(cfg.seed, epoch, 0, 2))
    run.aug_gen.manual_seed(seed_of(cfg.seed, epoch, 0, 3))
    batches = epoch_batches(len(run.data.train), cfg.optim, cfg.seed, info, epoch)
    run.net.train()
    sums: dict[str, float] = {}
    skipped = 0
    if point.first_step:  # continue the epoch a signal stopped: its draws and sums where they were
        assert point.mid_epoch is not None
        run.gen.set_state(point.mid_epoch["gen"])
        run.aug_gen.set_state(point.mid_epoch["aug"])
        if not info.enabled:
            torch.set_rng_state(point.rng)
        sums, skipped = json.loads(point.mid_epoch["sums"]), int(point.mid_epoch["skipped"])
        before += float(point.mid_epoch.get("seconds", 0.0))  # (older checkpoints lack it)
    todo = batches[point.first_step:]  # read ahead by the source's workers, in this order
    bar = progress(run.data.train.batches(todo), len(todo), cfg.progress, info, epoch, run.epochs)
    counters = run.stepper.counters
    for step, (index, x, y) in enumerate(bar, start=point.first_step):
        if not len(index):  # every sample of the batch was unreadable (on_bad_sample=skip)
            if info.enabled:  # the other processes' steps would wait for this one's gradients
                raise DataError(f"every sample of a batch at epoch {epoch + 1}, step {step + 1} was unreadable "
                                f"(the first: {run.data.train.bad and run.data.train.bad.first}); "
                                "under DDP a process cannot skip a step: fix or remove the files")
            skipped += 1
            continue
        values = train_step(run, index, x, y, f"epoch {epoch + 1}, step {step + 1}", epoch * len(batches) + step)
        if values is None:
            skipped += 1
            counters.skipped_in_a_row += 1
            if counters.skipped_in_a_row > cfg.skip_limit or skipped == len(batches):
                run.stepper.too_many_skips(skipped, len(batches))
            continue
        counters.skipped_in_a_row = 0
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        if hasattr(bar, "set_postfix"):
            bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()}, refresh=False)
        if any_process(stop.requested, info, run.device):
            _stop_mid_epoch(run, epoch, step + 1, len(batches), sums, skipped, before + time.time() - t_epoch)
    point.first_step = 0
    return len(batches), sums, skipped, before + time.time() - t_epoch


def train_step(run: Run, index: torch.Tensor, x: torch.Tensor, y: torch.Tensor, where: str,
               number: int) -> dict[str, float] | None:
    """The batch of training samples ``index`` made ready (augmented, on the device, the
    teacher's side from the cache) and one step on it (:class:`~.step.Stepper`); ``number``:
    the run's step number from 0 (what the Jacobian terms' schedule counts)."""
    d = run.cfg.data
    if d.augment:
        x = random_crop_flip(x, d.crop_padding, run.data.hflip, draws(run.aug_gen, run.info))
    if d.mixup or d.cutmix:  # the teacher sees the mixed view too: the objective takes x as it is
        x, y = mix(x, y, run.data.num_classes, d.mixup, d.cutmix, draws(run.aug_gen, run.info),
                   gather_interleaved if run.info.enabled else None)
    x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
    targets = run.cache(index, x, y) if run.cache is not None else None
    return run.stepper(x, y, targets, len(index), where, number)


def _stop_mid_epoch(run: Run, epoch: int, step: int, steps: int, sums: dict, skipped: int, seconds: float) -> None:
    """A signal asked to stop: checkpoint this step (with the epoch's draws and seconds so far,
    and its sums of the terms over every process: each holds its share's) and raise."""
    if run.info.enabled:
        sums = mean_across_processes(sums, run.device)
    if run.info.is_main:
        save_checkpoint(run.last, run.state(epoch, step=step, mid_epoch={
            "gen": run.gen.get_state(), "aug": run.aug_gen.get_state(), "sums": json.dumps(sums),
            "skipped": skipped, "seconds": seconds}))
    run.info.barrier()
    raise Preempted(f"stopped by a signal at epoch {epoch + 1}, step {step} of {steps}; "
                    f"{run.last} holds that step: --resume continues from it")


def end_epoch(run: Run, epoch: int, steps: int, sums: dict, skipped: int, seconds: float) -> bool:
    """Log, evaluate and checkpoint the epoch; True when the run stops early (patience)."""
    cfg, info, counters = run.cfg, run.info, run.stepper.counters
    lr = run.optimizer.param_groups[0]["lr"]  # the rate this epoch trained with
    with warnings.catch_warnings():  # this loop always steps the optimizer first; a run resumed
        # after its first epoch's last step has not in this process, and torch would say so
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
        run.scheduler.step()
    n_steps = max(steps - skipped - counters.forward_overflows, 1)
    counters.forward_overflows = 0
    record = {"epoch": epoch + 1, "lr": lr, "steps": steps,
              "skipped_steps": skipped, "train": {k: v / n_steps for k, v in sums.items()},
              "epoch_seconds": seconds}
    if run.point.changes:  # the settings this resume changed, beside the first epoch trained with them
        record["config_changes"], run.point.changes = run.point.changes, {}
    if info.enabled:
        record["train"] = mean_across_processes(record["train"], run.device)
    if run.stepper.scaler is not None:
        record["overflow_steps"], record["loss_scale"] = counters.overflow_steps, float(run.stepper.scaler.get_scale())
        counters.overflow_steps = 0
    _count_bad_samples(run, record)
    over = cfg.time_budget > 0 and any_process(past_budget(cfg, run.history, seconds), info, run.device)
    if over:
        record["time_budget"] = True
    last = epoch + 1 == run.epochs or over
    if (epoch + 1) % cfg.eval.every == 0 or last:
        if info.is_main:
            t_eval = time.time()
            # with keep_best, the test set is for the best weights, at the end
            record.update(evaluate_splits(run.model, run.data, run.cfg, run.device, teacher=run.teacher,
                                          teacher_key=run.teacher_key, teacher_gradients=run.teacher_gradients,
                                          test=(last and not cfg.eval.keep_best) or cfg.eval.test_each_time))
            record["eval_seconds"] = time.time() - t_eval
        info.barrier()
    run.history.append(record)
    stop = False
    if info.is_main:
        log_epoch(run.out, run.history, run.loggers, record)
        if cfg.eval.keep_best and "val" in record and best_index(run.history, cfg.eval.min_delta) == len(run.history) - 1:
            save_checkpoint(run.out / "best.pt", run.state(epoch + 1))
        stop = no_better_for(cfg, run.history) >= cfg.eval.patience > 0 or over
        if (epoch + 1) % cfg.checkpoint_every == 0 or last or stop:
            save_checkpoint(run.last, run.state(epoch + 1))
        if run.on_evaluation is not None and "val" in record:  # after the checkpoint: it may raise (a pruned trial)
            run.on_evaluation(sum(h["steps"] for h in run.history), record["val"]["acc"])
    info.barrier()
    return any_process(stop, info, run.device)


def _count_bad_samples(run: Run, record: dict) -> None:
    """The samples skipped as unreadable (data.on_bad_sample=skip), found by any process:
    what one process would have read."""
    bad = run.data.train.bad
    if bad is not None and run.info.enabled and run.cfg.data.on_bad_sample == "skip":
        found: list = [None] * run.info.world_size
        dist.all_gather_object(found, bad.found)
        for f in found:
            bad.add(f)
    if bad is not None and bad.count:
        record["bad_samples"], record["first_bad_sample"] = bad.count, bad.first


def evaluate_best(run: Run) -> None:
    """The final evaluation (validation and test) of the best weights (best.pt)."""
    if run.info.is_main:
        best = run.out / "best.pt"
        if best.is_file():
            run.model.load_state_dict(load_checkpoint(best, map_location=run.device)["model"])
        else:
            check_best_kept(run.out, run.cfg, run.history)  # (deleted while the run trained)
        shown, t_eval = run.cfg.progress, time.time()
        if shown:  # (minutes on a large test set with fidelity and the cosine: said, not silent)
            e = run.cfg.eval
            print(f"final evaluation of the best weights: validation ({len(run.data.val)}) and test "
                  f"({len(run.data.test)}) accuracy" + (f", under noise σ = {e.noise_sigmas}" if e.noise_sigmas else "")
                  + (", fidelity and the Jacobian cosine" if run.teacher is not None else "") + " ...",
                  file=sys.stderr, flush=True)
        run.best_final = evaluate_splits(run.model, run.data, run.cfg, run.device, teacher=run.teacher,
                                         teacher_key=run.teacher_key, teacher_gradients=run.teacher_gradients)
        if shown:
            print(f"final evaluation: done [{time.time() - t_eval:.0f} s]", file=sys.stderr, flush=True)
    run.info.barrier()

