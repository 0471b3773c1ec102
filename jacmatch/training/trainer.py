"""The training loop: teachers (CE) and students (any mix of the objective's terms).

The loop knows nothing about Jacobians: the objective prepares itself on an example batch,
each step asks it for ``(logits, total, terms)`` and logs whatever ``terms`` holds. This
module sets a run up and runs its epochs; each job has its module beside it: the run
folder (:mod:`.run_folder`), models and teachers (:mod:`.loading`), resume
(:mod:`.resume`), the optimiser and schedule (:mod:`.schedule`), the step (:mod:`.step`),
the epoch and its end (:mod:`.epoch`), progress (:mod:`.progress`) and results
(:mod:`.results`).

Under DDP every process draws for the global batch and keeps its own samples
(``ShardedGenerator``), so the number of processes does not change the draws.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from ..atomic import write_json_atomic
from ..core.objective import TransferObjective
from ..data import DataSplits
from .cache import TeacherCache
from .config import ConfigError, RunConfig
from .distributed import DistInfo, broadcast_parameters, global_batchnorm, init_distributed, resolve_device
from .epoch import Preempted, Run, StopOnSignal, draws, end_epoch, evaluate_best, train_epoch
from .tracking import close_loggers
from .evaluate import TeacherGradients, teacher_key
from .loading import (check_input_shape, init_from, load_data, load_teacher,
                      model_from_config)
from .results import best_point, no_better_for, past_budget, run_results
from .resume import ResumePoint, restore, run_inputs
from .run_folder import claim_folder, forget_start, open_outputs, run_reads
from .schedule import make_optimizer, make_scheduler, planned_epochs
from .step import StepPolicy, Stepper

__all__ = ["train", "CacheOffWarning", "PaddedShardsWarning"]

class CacheOffWarning(UserWarning):
    """The teacher cache cannot serve a run whose inputs change every step."""


class PaddedShardsWarning(UserWarning):
    """The training set does not divide among the processes: each epoch repeats a few samples."""


class StillImprovingWarning(UserWarning):
    """A run ended at its maximum (epochs or steps) while validation was still improving."""


def _say_how_it_ended(run) -> None:
    """One line when an early-stopped run (eval.keep_best and eval.patience) ended at its
    maximum, validation accuracy still improving (it had not run out of patience), and one
    when the time budget ended a run."""
    cfg, history = run.cfg, run.history
    if history and history[-1].get("time_budget"):
        print(f"{run.out}: stopped at the time budget ({cfg.time_budget:g} min) after epoch {history[-1]['epoch']}"
              + ("; its best weights are tested" if cfg.eval.keep_best else ""), flush=True)
        return
    point = best_point(history, cfg, run.epochs)
    if point and cfg.eval.keep_best and cfg.eval.patience > 0 and not point["stopped_early"]:
        warnings.warn(StillImprovingWarning(
            f"{run.out} ended at its maximum ({run.epochs} epochs, {sum(h['steps'] for h in history)} steps) while "
            f"validation accuracy was still improving (best {point['val_acc']:.4f} at epoch {point['epoch']}): raise "
            "optim.max_steps (or optim.epochs) and --resume to train on"), stacklevel=3)


#: Memory estimate above which a run is refused before it starts (bytes).
MAX_STEP_BYTES = 16 << 30


def train(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, data: DataSplits | None = None,
          info: DistInfo | None = None, teacher_gradients: TeacherGradients | None = None,
          config_file: str | None = None, data_cache: dict | None = None, on_evaluation=None) -> dict:
    """Train a teacher (no ``cfg.teacher``) or distil a student; returns the results dict
    also written to ``out_dir/results.json``. The run holds a lock on its folder; a folder
    that holds a run is continued only with ``resume`` and replaced only with
    ``overwrite``. ``config_file``: the user's config, never written over.
    ``teacher_gradients``: the caller's memo of the teacher's side of the Jacobian cosine,
    and ``data_cache`` the caller's parsed data set, both shared by the runs of a sweep.
    ``on_evaluation(steps, val_acc)``: called after each evaluation in the main process, and on
    resume first once for each evaluation the restored history holds (a tuner's pruner; what it
    raises ends the run, its checkpoint written)."""
    info = info or init_distributed(cfg.device)
    cfg.check()
    out = Path(cfg.out_dir)
    found = sorted(os.listdir(out)) if out.is_dir() else None  # what a start that fails leaves as it was
    lock = claim_folder(out, resume, overwrite, config_file, run_reads(cfg, config_file)) if info.is_main else None
    try:
        given = data is not None  # the caller's data: not named by the config, so no teacher key
        return _train(cfg, resume, data if given else load_data(cfg, data_cache), given, info,
                      teacher_gradients or TeacherGradients(), config_file, on_evaluation)
    except BaseException:
        if lock is not None and not resume:
            forget_start(out, found, lock)
        raise
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: RunConfig, resume: bool, data: DataSplits, given: bool, info: DistInfo,
           teacher_gradients: TeacherGradients, config_file: str | None, on_evaluation=None) -> dict:
    run = _setup(cfg, resume, data, given, info, teacher_gradients, config_file)
    run.on_evaluation = on_evaluation
    try:
        _replay_evaluations(run)
        return _fit(run)
    except BaseException as exc:  # the tracked runs end failed (or killed by a signal: a resume continues them)
        close_loggers(run.loggers, failed=not isinstance(exc, Preempted))
        raise


def _replay_evaluations(run: Run) -> None:
    """A resumed run's caller sees its whole curve: ``on_evaluation`` once for each evaluation
    the restored history holds, before training goes on (a retried Optuna trial reports the
    evaluations of the folder it resumes, so its pruner compares it step for step)."""
    if run.on_evaluation is None or not run.info.is_main:
        return
    steps = 0
    for record in run.history:
        steps += record["steps"]
        if "val" in record:
            run.on_evaluation(steps, record["val"]["acc"])


def _fit(run: Run) -> dict:
    """The epochs, the final evaluation and the results (results.json, the loggers)."""
    cfg = run.cfg
    t_start = time.time()
    with StopOnSignal() as stop:
        for epoch in range(run.point.start_epoch, run.epochs):
            if no_better_for(cfg, run.history) >= cfg.eval.patience > 0 or past_budget(cfg, run.history):
                # (a resumed run that had stopped)
                break
            steps, sums, skipped, seconds = train_epoch(run, epoch, stop)
            if end_epoch(run, epoch, steps, sums, skipped, seconds):
                break
        if cfg.eval.keep_best:
            evaluate_best(run)
    if run.info.is_main:
        _say_how_it_ended(run)
    results = run_results(cfg, run.data, run.model, run.teacher, run.history, time.time() - t_start)
    results["inputs"] = run.inputs
    if run.cache is not None and run.info.is_main:  # the teacher targets this invocation trained on
        results["teacher_cache"] = {**run.cache.digest(), "fill_seconds": run.cache.fill_seconds}
    if cfg.eval.keep_best:
        results["final"] = {**run.best_final, "train": results["final"]["train"]}
        results["best"] = best_point(run.history, cfg, run.epochs)
    if cfg.recipe:
        results["recipe"] = {"name": cfg.recipe, "reason": cfg.recipe_reason}
    if run.info.is_main:
        write_json_atomic(run.out / "results.json", results)
        for logger in run.loggers:
            logger.finish(results, run.out)
    if stop.requested:  # a signal during the last evaluation: the run is complete, and the process stops
        raise Preempted(f"stopped by a signal after the last epoch; {run.out} holds the finished run")
    return results


def _check_run_on(cfg: RunConfig, data: DataSplits, info: DistInfo) -> None:
    """What the config asks of the data and the processes, before any work."""
    if info.enabled and (cfg.data.mixup or cfg.data.cutmix) and cfg.data.on_bad_sample == "skip":
        raise ConfigError("under DDP, mixup and CutMix pair samples across the processes' shares, which a skipped "
                          "sample would misalign: set data.on_bad_sample=stop (and fix or remove unreadable files), "
                          "or train in one process")
    if info.enabled and cfg.optim.batch_size % info.world_size:
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} does not divide among {info.world_size} processes "
                          f"(each would take {cfg.optim.batch_size // info.world_size}, a smaller global batch): give "
                          f"a multiple of {info.world_size}")
    extra = -len(data.train) % info.world_size
    if info.enabled and extra and info.is_main:
        warnings.warn(PaddedShardsWarning(
            f"the {len(data.train)} training samples do not divide among {info.world_size} processes: each epoch "
            f"repeats {extra} of them (DistributedSampler pads the shares), so this run differs slightly from one "
            f"in a single process; a training set divisible by {info.world_size} trains as one process does"),
            stacklevel=3)
    if cfg.eval.keep_best and not len(data.val):
        raise ConfigError(f"eval.keep_best chooses the weights by validation accuracy, but {data.name} has no "
                          "validation samples here (data.val_size=0): give data.val_size > 0, or set "
                          "eval.keep_best=false and eval.patience=0 (the last weights are tested)")


def _setup(cfg: RunConfig, resume: bool, data: DataSplits, given: bool, info: DistInfo,
           teacher_gradients: TeacherGradients, config_file: str | None) -> Run:
    """Data, models, optimiser and objective, restored from ``last.pt`` when resuming."""
    _check_run_on(cfg, data, info)
    device = resolve_device(cfg.device, info)
    out = Path(cfg.out_dir)
    if resume and not (out / "last.pt").exists():  # every rank (rank 0 checked it under the lock)
        raise ConfigError(f"--resume: {out / 'last.pt'} does not exist (nothing to resume)")
    batch = min(cfg.optim.batch_size, max(len(data.train), 1))
    cfg.objective.check_memory(math.prod(data.train.sample_shape), data.num_classes, batch, MAX_STEP_BYTES)
    torch.manual_seed(cfg.seed)
    model = model_from_config(cfg.model, data.num_classes, data).to(device)
    check_input_shape(model, data, cfg.model.name, "model")  # before the teacher is loaded
    teacher = load_teacher(cfg, data, device)
    if cfg.channels_last:  # convolutions then run channels-last (NHWC); values and checkpoints unchanged
        model = model.to(memory_format=torch.channels_last)
    if cfg.init_from and not resume:
        init_from(model, cfg.init_from, device)
    optimizer = make_optimizer(cfg.optim, model.parameters())
    epochs = planned_epochs(cfg.optim, len(data.train))
    scheduler = make_scheduler(optimizer, cfg.optim, epochs)
    inputs = run_inputs(cfg, data)
    point = restore(cfg, out / "last.pt", model, optimizer, scheduler, info, device, inputs) if resume \
        else ResumePoint()
    if point.bad_samples and data.train.bad is not None:
        data.train.bad.add(point.bad_samples)
    global_bn = info.enabled and cfg.ddp.sync_batchnorm  # trained without the DDP wrapper, gradients averaged
    if global_bn:
        global_batchnorm(model)
        broadcast_parameters(model)
    net = DistributedDataParallel(model) if info.enabled and not global_bn else model
    # Draws (the objective's, crops) come from one seed for all processes,
    # each keeping its own samples of the global batch: the number of processes changes nothing.
    gen = torch.Generator()
    objective = TransferObjective(net, teacher, cfg.objective, generator=draws(gen, info))
    if teacher is not None:  # on the same 8 samples in every process, whatever its first batch
        (index, x, _), = data.train.batches([list(range(min(8, len(data.train))))], keep=False)
        if len(index):
            objective.prepare(x.to(device))
    moving = [k for k in ("augment", "mixup", "cutmix", "random_views") if getattr(cfg.data, k)]  # new inputs each epoch
    fixed_inputs = cfg.teacher_cache and objective.needs_teacher_targets and not moving
    if cfg.teacher_cache and objective.needs_teacher_targets and moving and info.is_main:
        warnings.warn(CacheOffWarning(f"the teacher cache is off: data.{', data.'.join(moving)} changes the inputs "
                                      "every step, so the teacher runs at every step"), stacklevel=2)
    stepper = Stepper(objective, optimizer, torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None,
                      StepPolicy.of(cfg), info, device, [p for p in model.parameters() if p.requires_grad],
                      average=model if global_bn else None, student_name=cfg.model.name)
    run = Run(cfg=cfg, info=info, device=device, out=out, data=data, model=model, net=net, teacher=teacher,
              objective=objective, cache=TeacherCache(objective, len(data.train)) if fixed_inputs else None,
              optimizer=optimizer, scheduler=scheduler, stepper=stepper, gen=gen, aug_gen=torch.Generator(),
              teacher_key=None if teacher is None or given else teacher_key(cfg),
              teacher_gradients=teacher_gradients, inputs=inputs, point=point, epochs=epochs)
    if info.is_main:
        run.loggers = open_outputs(cfg, out, {"train": data.train_indices, "val": data.val_indices,
                                             "data_sha256": data.data_sha256}, resume, config_file)
    if run.cache is not None:
        _fill_cache(run)
    return run


def _fill_cache(run: Run) -> None:
    """The teacher's side of every training sample, the same bits in every process; a failure
    here ends the run's tracked runs failed (they began with the run's outputs)."""
    try:
        run.cache.fill(run.data.train, run.cfg.objective.teacher_chunk or run.cfg.optim.batch_size, run.device, run.info)
    except BaseException as exc:
        close_loggers(run.loggers, failed=not isinstance(exc, Preempted))
        raise
    run.fill_seconds = run.cache.fill_seconds
