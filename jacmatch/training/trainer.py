"""The training loop: teachers (CE) and students (any mix of the objective's terms).

The loop knows nothing about Jacobians: each step asks :class:`TransferObjective` for
``(logits, total, terms)`` and logs whatever ``terms`` holds. This module owns devices,
processes, randomness, checkpoints, metrics and progress.

Randomness is derived from ``(seed, epoch)`` at the start of every epoch (data order,
augmentation, random projections, noise), so a run resumed from the checkpoint of epoch e
continues exactly as the uninterrupted run would have. Under DDP every process draws for
the global batch and keeps its own samples (``ShardedGenerator``), so the number of
processes does not change the draws.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
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
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from .._extras import require
from ..atomic import write_atomic, write_json_atomic
from ..core.draws import ShardedGenerator
from ..core.objective import TransferObjective
from ..data import DataSplits, create_dataset, random_crop_flip
from ..data.formats import DataError
from ..data.sources import Loading
from ..errors import UsageError
from ..models import ExternalClassifier, count_parameters, create_model, dry_forward, input_side, is_import_path
from .cache import TeacherCache
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import ConfigError, RunConfig, config_from_dict, config_to_dict
from .distributed import (
    DistInfo,
    average_gradients,
    broadcast_parameters,
    global_batchnorm,
    init_distributed,
    resolve_device,
)
from .evaluate import TeacherGradients, evaluate
from .provenance import file_sha256, provenance

__all__ = ["train", "load_model", "load_data", "evaluate_splits", "epoch_batches", "check_input_shape",
           "check_teacher_for", "NonFiniteError", "RunExistsError",
           "Preempted"]

#: Memory estimate above which a run is refused before it starts (bytes).
MAX_STEP_BYTES = 16 << 30


#: fp16 steps that overflow one after another before the run is taken to diverge (the scale
#: has then been halved this many times: 2^16 becomes 2^-34).
MAX_OVERFLOWS_IN_A_ROW = 50


class NonFiniteError(RuntimeError):
    """A loss term or a gradient became NaN or Inf."""


class Preempted(RuntimeError):
    """SIGTERM or SIGINT stopped the run, after the current step and a checkpoint at it."""


class _StopOnSignal(contextlib.AbstractContextManager):
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


def _agreed(flag: bool, info: DistInfo, device) -> bool:
    """Whether any process asks to stop (so that all stop at the same step)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class RunExistsError(ConfigError):
    """The output folder already holds a run, or another process is training in it."""


#: The files that make a run folder's record; a new run never writes over them unasked.
RUN_FILES = ("last.pt", "best.pt", "config.yaml", "results.json", "metrics.jsonl", "history.jsonl", "indices.json")
LOCK_FILE = ".jacmatch.lock"


class RunLock:
    """An exclusive lock on a run folder for a run's whole life (``flock`` on a file in
    it, released by the OS if the process dies). A second run on the folder is refused
    at once, with the holder's PID."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            _lock_fd(fd)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunExistsError(f"{self.path.parent} is in use by another jacmatch run (PID {holder}): wait for "
                                 "it to finish, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None


def _lock_fd(fd: int) -> None:
    """A non-blocking exclusive lock on ``fd``; OSError when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _claim_folder(out: Path, resume: bool, overwrite: bool, config_file: str | None) -> RunLock:
    """Lock ``out`` and check what it holds: a run is continued only with ``resume``,
    replaced only with ``overwrite``, and the user's own config file is never replaced."""
    mine = config_file is not None and Path(config_file).resolve() == (out / "config.yaml").resolve()

    def check() -> list[str]:
        held = [name for name in RUN_FILES if (out / name).exists()]
        if held and not resume and not overwrite:
            raise RunExistsError(f"{out} already holds a run ({', '.join(held)}): pass --resume to continue it, "
                                 "--overwrite to replace it, or choose another --out")
        if overwrite and mine:
            raise RunExistsError(f"--config {config_file} is the config.yaml that --overwrite would replace in "
                                 f"{out}: keep your config outside the run folder")
        return held
    if resume and not (out / "last.pt").exists():  # before anything is written
        raise ConfigError(f"--resume: {out / 'last.pt'} does not exist (nothing to resume)")
    lock = RunLock(out).acquire()  # a run in progress is named first, by its PID
    try:
        held = check()
        if overwrite and not resume:
            for name in held:
                (out / name).unlink()
    except BaseException:
        lock.release()
        raise
    return lock


def load_model(path: str | Path, device="cpu", *, trust: str | None = None) -> tuple[nn.Module, dict]:
    """A model from a checkpoint (architecture and weights), and the checkpoint's state.

    A model built from an import path (``package.module:callable``) is rebuilt only when
    ``trust`` names that same path: loading it imports and runs that code."""
    state = load_checkpoint(path, map_location=device)
    arch = state.get("arch")
    if not isinstance(arch, dict) or "name" not in arch:
        raise CheckpointError(f"{path} holds no model architecture: is it a jacmatch run checkpoint?")
    if is_import_path(str(arch["name"])) and trust != arch["name"]:
        raise CheckpointError(f"{path} was built by the import path {arch['name']!r}, which loading would import "
                              f"and run: pass --model {arch['name']} (--teacher-model for a teacher) to trust it")
    options = {k: v for k, v in arch.items() if k not in ("name", "num_classes", "in_channels")}
    model = create_model(arch["name"], arch["num_classes"], arch["in_channels"], **options)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path}: weights do not fit {arch['name']} ({str(exc).splitlines()[0]})") from None
    return model.to(device), state


def model_from_config(mc, num_classes: int, data: DataSplits) -> nn.Module:
    """``cfg.model`` (or ``cfg.teacher_model``) built for ``data``'s channels and pixel statistics."""
    return create_model(mc.name, num_classes, data.in_channels, mean=data.mean, std=data.std, output=mc.output,
                        normalize=mc.normalize, replace_hard_activations=mc.replace_hard_activations,
                        math_attention=mc.math_attention, **mc.options)


def check_input_shape(model: nn.Module, data: DataSplits, name: str, key: str) -> int:
    """One dry forward pass of a zero sample of the data set's shape; returns the number
    of outputs. A model that cannot take the shape is refused in one line that says the
    smallest input it takes."""
    shape = tuple(data.train.sample_shape)
    out = dry_forward(model, shape)
    if out is None:
        side, only = input_side(model, shape[0])
        c = shape[0]
        hint = (f"it takes no {c}-channel square input of the usual sizes; choose another model or data set"
                if side is None else
                f"it takes {c}x{side}x{side} only: resize the images with --image-size {side} "
                f"(data.image_size), or choose another model" if only else
                f"its smallest input is {c}x{side}x{side}; choose another model or data set"
                + (f", or resize the images with --image-size {side} (data.image_size)"
                   if data.train.sample_shape[1] < side else ""))
        raise ConfigError(f"{key} {name!r} cannot take {data.name} inputs of shape {'x'.join(map(str, shape))}: "
                          f"{hint}")
    return int(out.shape[-1])


def check_teacher_for(teacher: nn.Module, teacher_state: dict, student_outputs: int, data: DataSplits,
                      student_state: dict, name: str) -> str | None:
    """A teacher beside a student on ``data`` (``jacmatch evaluate``): refused (one line)
    unless it takes the data's inputs and has the student's number of outputs. Returns a
    warning when it was trained on other data, which may be a deliberate transfer."""
    outputs = check_input_shape(teacher, data, name, "teacher")
    if outputs != student_outputs:
        raise ConfigError(f"class-count mismatch: the teacher {name} has {outputs} outputs, the student "
                          f"{student_outputs}; the Jacobian cosine compares outputs one to one (use the "
                          "student's teacher)")

    def trained_on(state: dict) -> tuple:
        d = json.loads(state["config"])["data"] if "config" in state else {}
        digest = (state.get("inputs") or {}).get("data_sha256")
        return d.get("name"), d.get("classes"), digest
    (t_name, t_classes, t_hash), (s_name, s_classes, s_hash) = trained_on(teacher_state), trained_on(student_state)
    if (t_name, t_classes) != (s_name, s_classes) or (t_hash and s_hash and t_hash != s_hash):
        return (f"the teacher {name} was trained on {t_name}" + (f" classes {t_classes}" if t_classes else "")
                + (f" (data {t_hash[:12]})" if t_hash else "") + f", the student on {s_name}"
                + (f" classes {s_classes}" if s_classes else "") + (f" (data {s_hash[:12]})" if s_hash else "")
                + ": fine for a deliberate transfer, otherwise pass the student's teacher")
    return None


def _load_teacher(cfg: RunConfig, data: DataSplits, device) -> nn.Module | None:
    """The frozen teacher: a jacmatch checkpoint, or ``teacher_model`` with a plain state_dict."""
    if cfg.teacher:
        teacher, _ = load_model(cfg.teacher, device, trust=cfg.teacher_model.name or None)
    elif cfg.teacher_weights:
        mc = cfg.teacher_model
        teacher = model_from_config(mc, mc.num_classes or data.num_classes, data).to(device)
        _load_state_dict(teacher, cfg.teacher_weights, device)
    else:
        return None
    outputs = check_input_shape(teacher, data, cfg.teacher_model.name or cfg.teacher, "teacher")
    if cfg.objective.compares_outputs and outputs != data.num_classes:
        raise ConfigError(f"class-count mismatch: the teacher has {outputs} outputs but {data.name} has "
                          f"{data.num_classes} classes here; KD and Jacobian matching compare outputs one to one "
                          "(use a teacher trained on these classes)")
    return teacher


def _load_state_dict(model: nn.Module, path: str, device) -> None:
    """Weights from a plain ``state_dict`` file (``torch.load(weights_only=True)``)."""
    if not Path(path).is_file():
        raise ConfigError(f"teacher weights {path} do not exist")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise ConfigError(f"teacher weights {path} could not be read as a state_dict "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"teacher weights {path} hold a {type(state).__name__}, not a state_dict")
    target = model.net if isinstance(model, ExternalClassifier) else model
    try:
        result = target.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ConfigError(f"teacher weights {path} do not fit {model.arch['name']}: "
                          f"{str(exc).splitlines()[-1].strip()[:300]}") from None
    missing = [k for k in result.missing_keys if k not in ("mean", "std")]
    if missing or result.unexpected_keys:
        raise ConfigError(f"teacher weights {path} do not fit {model.arch['name']}: missing {missing[:5]}, "
                          f"unexpected {result.unexpected_keys[:5]}")


def _init_from(model: nn.Module, path: str, device) -> None:
    """Copy the weights whose names and shapes fit (fine-tuning: a new classifier head
    keeps its fresh initialisation); at least one tensor must fit."""
    source = load_checkpoint(path, map_location=device)["model"]
    own = model.state_dict()
    fitting = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape and k not in ("mean", "std")}
    if not fitting:
        raise CheckpointError(f"init_from {path}: no weight fits {model.arch['name']}")
    model.load_state_dict(fitting, strict=False)


def _teacher_key(cfg: RunConfig) -> tuple:
    """Names the teacher's weights (path, mtime, size) and the data that fix the test set,
    so that evaluation computes the teacher's side of the Jacobian cosine once per process."""
    weights = cfg.teacher or cfg.teacher_weights
    st = os.stat(weights)
    d = cfg.data
    return (str(Path(weights).resolve()), st.st_mtime_ns, st.st_size, d.name, d.data_dir,
            tuple(d.classes or ()), d.val_size, d.split_seed)


#: Settings a resume may change: they cannot alter the epochs already trained.
RESUME_MAY_CHANGE = ("optim.epochs", "progress", "eval.every", "device", "out_dir", "tensorboard")
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
    if refused:
        diff = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise ConfigError(f"--resume would change what {last.parent} was trained with ({diff}); resume with its "
                          f"config.yaml, or start a new run in another --out (a resume may change only "
                          f"{', '.join(allowed)}, and epochs only upwards)")
    return changes


def _append_jsonl(path: Path, record: dict) -> None:
    """One more line, the earlier ones kept byte for byte (an atomic rewrite)."""
    before = path.read_text() if path.is_file() else ""
    write_atomic(path, lambda f: f.write(before + json.dumps(record) + "\n"))


def _seed(*parts: int) -> int:
    return int.from_bytes(str(parts).encode(), "little") % (2**61 - 1)


def _lr_factor(optim_cfg):
    """Learning-rate factor per epoch: cosine, step (milestones) or constant. A plain
    function, so the scheduler's state holds nothing but numbers."""
    epochs, schedule, decay = optim_cfg.epochs, optim_cfg.schedule, optim_cfg.lr_decay
    milestones = tuple(optim_cfg.milestones)

    def factor(epoch: int) -> float:
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        if schedule == "step":
            return decay ** sum(epoch >= m for m in milestones)
        return 1.0
    return factor


def _extend_schedule(trained_optim: dict, cfg: RunConfig, scheduler) -> dict:
    """A resume that raises ``optim.epochs``: from the epoch where the run stopped on, the
    learning rate follows the schedule of a run planned that long from the start (the
    restored optimiser holds the old plan's rate there, which is 0 at the end of a
    cosine). Returns both plans' rates for the epochs still to train, for history.jsonl."""
    epoch, factor = scheduler.last_epoch, _lr_factor(cfg.optim)
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * factor(epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    old = _lr_factor(config_from_dict({"optim": trained_optim}).optim)
    ahead = range(epoch, min(cfg.optim.epochs, epoch + 1000))  # at most 1000 epochs of each plan
    base = scheduler.base_lrs[0]
    return {"from_epoch": epoch + 1,
            "old": {"epochs": trained_optim["epochs"], "lr": [base * old(e) for e in ahead
                                                             if e < trained_optim["epochs"]]},
            "new": {"epochs": cfg.optim.epochs, "lr": [base * factor(e) for e in ahead]}}


def _make_optimizer(cfg: RunConfig, params):
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                               nesterov=o.nesterov and o.momentum > 0)
    return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)


def epoch_batches(n: int, cfg: RunConfig, info: DistInfo, epoch: int) -> list[list[int]]:
    """This rank's batches of training indices for ``epoch``; the global batch of step j
    is the union of the ranks' j-th batches (DistributedSampler interleaves ranks)."""
    o = cfg.optim
    local = max(o.batch_size // info.world_size, 1)
    per_pass = max(math.ceil(n / o.batch_size), 1)
    passes = max(math.ceil(o.min_steps_per_epoch / per_pass), 1)
    sampler = DistributedSampler(range(n), num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=False)
    batches = []
    for p in range(passes):
        sampler.set_epoch(epoch * passes + p)
        order = list(sampler)
        batches += [order[i:i + local] for i in range(0, len(order), local)]
    return batches


@dataclass
class _Run:
    """What a run holds between its phases: set up once, then epochs of steps."""

    cfg: RunConfig
    info: DistInfo
    device: torch.device
    out: Path
    data: DataSplits
    model: nn.Module  # the student, unwrapped (what a checkpoint holds)
    net: nn.Module  # the student as trained: the model, or its DDP wrapper
    teacher: nn.Module | None
    objective: TransferObjective
    cache: TeacherCache | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: Any  # a GradScaler for fp16, else None
    gen: torch.Generator  # projections, directions and noise
    aug_gen: torch.Generator  # crops and flips
    teacher_key: tuple | None
    teacher_gradients: TeacherGradients
    history: list = field(default_factory=list)
    start_epoch: int = 0
    first_step: int = 0  # > 0: resume inside an epoch that a signal stopped
    fill_seconds: float = 0.0  # the teacher cache's fill, counted in the first epoch this process trains
    mid_epoch: dict | None = None
    resume_rng: torch.Tensor | None = None
    changes: dict = field(default_factory=dict)  # what a resume changed, logged with its first epoch
    writer: Any = None
    trainable: list = field(default_factory=list)  # the parameters a step takes gradients of
    inputs: dict = field(default_factory=dict)  # the teacher's and the data's hashes (run_inputs)
    skipped_in_a_row: int = 0  # nonfinite=skip: steps skipped since the last one trained
    overflow_steps: int = 0  # fp16 steps the gradient scaler skipped this epoch (it lowered its scale)
    forward_overflows: int = 0  # of those, steps whose terms overflowed (no values for the epoch's means)
    overflows_in_a_row: int = 0  # past MAX_OVERFLOWS_IN_A_ROW, a non-finite step is not an overflow but a divergence
    last_skip: str = ""  # why the last step was skipped
    best_final: dict = field(default_factory=dict)  # eval.keep_best: the best weights' validation and test

    @property
    def last(self) -> Path:
        return self.out / "last.pt"

    @property
    def global_bn(self) -> bool:
        return _global_bn(self.cfg, self.info)

    def state(self, epoch: int, **extra) -> dict:
        return _run_state(self.cfg, self.model, self.optimizer, self.scheduler, self.history, epoch,
                          inputs=self.inputs, **extra)


def _global_bn(cfg: RunConfig, info: DistInfo) -> bool:
    """DDP with global BatchNorm: trained without the DDP wrapper, gradients averaged after each backward."""
    return info.enabled and cfg.ddp.sync_batchnorm


def train(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, data: DataSplits | None = None,
          info: DistInfo | None = None, teacher_gradients: TeacherGradients | None = None,
          config_file: str | None = None, data_cache: dict | None = None) -> dict:
    """Train a teacher (no ``cfg.teacher``) or distil a student; returns the results dict
    also written to ``out_dir/results.json``. The run holds a lock on its folder; a folder
    that holds a run is continued only with ``resume`` and replaced only with
    ``overwrite``. ``config_file``: the user's config, never written over.
    ``teacher_gradients``: the caller's memo of the teacher's side of the Jacobian cosine,
    and ``data_cache`` the caller's parsed data set, both shared by the runs of a sweep."""
    info = info or init_distributed(cfg.device)
    cfg.check()
    lock = _claim_folder(Path(cfg.out_dir), resume, overwrite, config_file) if info.is_main else None
    try:
        given = data is not None  # the caller's data: not named by the config, so no teacher key
        return _train(cfg, resume, data if given else load_data(cfg, data_cache), given, info,
                      teacher_gradients or TeacherGradients(), config_file)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: RunConfig, resume: bool, data: DataSplits, given: bool, info: DistInfo,
           teacher_gradients: TeacherGradients, config_file: str | None) -> dict:
    run = _setup(cfg, resume, data, given, info, teacher_gradients, config_file)
    t_start = time.time()
    with _StopOnSignal() as stop:
        for epoch in range(run.start_epoch, cfg.optim.epochs):
            if _no_better_for(cfg, run.history) >= cfg.eval.patience > 0:  # (a resumed run that had stopped)
                break
            steps, sums, skipped, seconds = _train_epoch(run, epoch, stop)
            if _end_epoch(run, epoch, steps, sums, skipped, seconds):
                break
        if cfg.eval.keep_best:
            _evaluate_best(run)
    results = _results(cfg, run.data, run.model, run.teacher, run.history, time.time() - t_start)
    results["inputs"] = run.inputs
    if run.cache is not None and run.info.is_main:  # the teacher targets this invocation trained on
        results["teacher_cache"] = {**run.cache.digest(), "fill_seconds": run.cache.fill_seconds}
    if cfg.eval.keep_best:
        results["final"] = {**run.best_final, "train": results["final"]["train"]}
        results["best"] = best_point(run.history, cfg)
    if run.info.is_main:
        write_json_atomic(run.out / "results.json", results)
        if run.writer is not None:
            run.writer.close()
    if stop.requested:  # a signal during the last evaluation: the run is complete, and the process stops
        raise Preempted(f"stopped by a signal after the last epoch; {run.out} holds the finished run")
    return results


# ---- setup ------------------------------------------------------------------------------------


def _setup(cfg: RunConfig, resume: bool, data: DataSplits, given: bool, info: DistInfo,
           teacher_gradients: TeacherGradients, config_file: str | None) -> _Run:
    """Data, models, optimiser and objective, restored from ``last.pt`` when resuming."""
    device = resolve_device(cfg.device, info)
    out = Path(cfg.out_dir)
    if resume and not (out / "last.pt").exists():  # every rank (rank 0 checked it under the lock)
        raise ConfigError(f"--resume: {out / 'last.pt'} does not exist (nothing to resume)")
    batch = min(cfg.optim.batch_size, max(len(data.train), 1))
    step_bytes = cfg.objective.step_bytes(math.prod(data.train.sample_shape), data.num_classes, batch)
    if step_bytes > MAX_STEP_BYTES:
        raise ConfigError(f"one step would need about {step_bytes >> 30} GiB: "
                          "lower optim.batch_size, objective.num_projections or objective.noise_draws")
    torch.manual_seed(cfg.seed)
    model = model_from_config(cfg.model, data.num_classes, data).to(device)
    check_input_shape(model, data, cfg.model.name, "model")  # before the teacher is loaded
    teacher = _load_teacher(cfg, data, device)
    if cfg.channels_last:  # convolutions then run channels-last (NHWC); values and checkpoints unchanged
        model = model.to(memory_format=torch.channels_last)
    if cfg.init_from and not resume:
        _init_from(model, cfg.init_from, device)
    optimizer = _make_optimizer(cfg, model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(cfg.optim))
    inputs = run_inputs(cfg, data)
    restored = _restore(cfg, out / "last.pt", model, optimizer, scheduler, info, device, inputs) if resume else {}
    if _global_bn(cfg, info):
        global_batchnorm(model)
        broadcast_parameters(model)
    net = DistributedDataParallel(model) if info.enabled and not _global_bn(cfg, info) else model
    # Draws (projections, directions, noise, crops) come from one seed for all processes,
    # each keeping its own samples of the global batch: the number of processes changes nothing.
    gen = torch.Generator()
    objective = TransferObjective(net, teacher, cfg.objective, generator=_draws(gen, info))
    if teacher is not None:
        _build_fast_teacher(objective, data, device)
    fixed_inputs = cfg.teacher_cache and objective.needs_teacher_targets and not cfg.data.augment
    run = _Run(cfg=cfg, info=info, device=device, out=out, data=data, model=model, net=net, teacher=teacher,
               objective=objective, cache=TeacherCache(objective, len(data.train)) if fixed_inputs else None,
               optimizer=optimizer, scheduler=scheduler,
               scaler=torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None,
               gen=gen, aug_gen=torch.Generator(),
               teacher_key=None if teacher is None or given else _teacher_key(cfg),
               teacher_gradients=teacher_gradients, inputs=inputs, **restored)
    run.trainable = [p for p in model.parameters() if p.requires_grad]  # once, not every step
    if info.is_main:
        _open_outputs(run, resume, config_file)
    if run.cache is not None:  # the teacher's side of every sample, the same bits in every process
        run.cache.fill(data.train, cfg.objective.teacher_chunk or cfg.optim.batch_size, device, info)
        run.fill_seconds = run.cache.fill_seconds
    return run


def _build_fast_teacher(objective: TransferObjective, data: DataSplits, device) -> None:
    """The objective's fast copy of the teacher (BatchNorm folded, channels-last), built
    from and checked on the first 8 training samples: the same decision, and the same
    copy, in every process and whatever the first batch is."""
    (index, x, _), = data.train.batches([list(range(min(8, len(data.train))))], keep=False)
    if len(index):
        objective.fast_teacher(x.to(device))


def _draws(gen: torch.Generator, info: DistInfo):
    """A generator's draws for this process: its own samples of the global batch."""
    return ShardedGenerator(gen, info.rank, info.world_size) if info.enabled else gen


def load_data(cfg: RunConfig, cache: dict | None = None) -> DataSplits:
    """The data a run of ``cfg`` reads: its splits, subset and seed. ``cache``: the
    caller's, to keep a built-in data set's files parsed between runs."""
    d = cfg.data
    device = resolve_device(cfg.device, DistInfo()) if cfg.device != "cpu" else torch.device("cpu")
    workers = min(4, max(1, (os.cpu_count() or 2) // 2)) if d.workers == -1 else d.workers
    loading = Loading(workers=workers, pin_memory=device.type == "cuda", on_bad_sample=d.on_bad_sample,
                      cache_bytes=d.cache_mib << 20)
    return create_dataset(d.name, data_dir=d.data_dir, samples_per_class=d.samples_per_class, val_size=d.val_size,
                          split_seed=d.split_seed, seed=cfg.seed, classes=d.classes, download=d.download,
                          options=d, loading=loading, cache=cache)


def _restore(cfg: RunConfig, last: Path, model, optimizer, scheduler, info: DistInfo, device, inputs: dict) -> dict:
    """Weights, optimiser and schedule loaded from ``last``; returns the run's history and
    position. The config changes the resume makes are checked and logged."""
    state = load_checkpoint(last, map_location=device)
    if state.get("arch") != model.arch:
        raise CheckpointError(f"{last} holds model {state.get('arch')}, the config asks for {model.arch}")
    changes = resume_changes(json.loads(state["config"]), cfg, state["epoch"], last, "inputs" in state)
    check_same_inputs(state.get("inputs"), inputs, last)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    event = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": "resume", "epoch": state["epoch"],
             "changes": changes}
    if "optim.epochs" in changes:
        event["schedule"] = _extend_schedule(json.loads(state["config"])["optim"], cfg, scheduler)
    if info.is_main:
        _append_jsonl(last.parent / "history.jsonl", event)
    return {"history": json.loads(state["history"]), "start_epoch": state["epoch"], "changes": changes,
            "first_step": state.get("step", 0), "mid_epoch": state.get("mid_epoch"),  # stopped mid-epoch
            "resume_rng": state["rng"]}


def _open_outputs(run: _Run, resume: bool, config_file: str | None) -> None:
    """The run folder's config, history, data indices and TensorBoard writer (rank 0).
    A resume from the folder's own config.yaml leaves that file as it is (the checkpoint
    and history.jsonl hold the resolved config and what changed)."""
    cfg, out, data = run.cfg, run.out, run.data
    out.mkdir(parents=True, exist_ok=True)
    if config_file is None or Path(config_file).resolve() != (out / "config.yaml").resolve():
        write_atomic(out / "config.yaml", lambda f: f.write(_yaml(config_to_dict(cfg))))
    if not resume:
        _append_jsonl(out / "history.jsonl", {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": "start"})
    write_json_atomic(out / "indices.json", {"train": data.train_indices, "val": data.val_indices,
                                             "data_sha256": data.data_sha256})
    if cfg.tensorboard:
        require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter
        run.writer = SummaryWriter(str(out / "tensorboard"))


# ---- one epoch, one step ----------------------------------------------------------------------


def _train_epoch(run: _Run, epoch: int, stop: _StopOnSignal) -> tuple[int, dict[str, float], int, float]:
    """The epoch's steps; returns (steps, sums of the terms, skipped steps, seconds). Its
    draws are seeded from (seed, epoch), or restored where a signal stopped it, and so are
    its seconds: a stopped epoch's time before the stop counts in its ``epoch_seconds``."""
    cfg, info = run.cfg, run.info
    t_epoch, before = time.time(), run.fill_seconds  # the teacher's passes that the cache took ahead
    run.fill_seconds = 0.0
    torch.manual_seed(_seed(cfg.seed, epoch, info.rank, 1))
    run.gen.manual_seed(_seed(cfg.seed, epoch, 0, 2))
    run.aug_gen.manual_seed(_seed(cfg.seed, epoch, 0, 3))
    batches = epoch_batches(len(run.data.train), cfg, info, epoch)
    run.net.train()
    sums: dict[str, float] = {}
    skipped = 0
    if run.first_step:  # continue the epoch a signal stopped: its draws and sums where they were
        assert run.mid_epoch is not None
        run.gen.set_state(run.mid_epoch["gen"])
        run.aug_gen.set_state(run.mid_epoch["aug"])
        if not info.enabled:
            torch.set_rng_state(run.resume_rng)
        sums, skipped = json.loads(run.mid_epoch["sums"]), int(run.mid_epoch["skipped"])
        before += float(run.mid_epoch.get("seconds", 0.0))  # (older checkpoints lack it)
    todo = batches[run.first_step:]  # read ahead by the source's workers, in this order
    bar = _progress(_Sized(run.data.train.batches(todo), len(todo)), cfg, info, epoch)
    for step, (index, x, y) in enumerate(bar, start=run.first_step):
        if not len(index):  # every sample of the batch was unreadable (on_bad_sample=skip)
            if info.enabled:  # the other processes' steps would wait for this one's gradients
                raise DataError(f"every sample of a batch at epoch {epoch + 1}, step {step + 1} was unreadable "
                                f"(the first: {getattr(run.data.train, 'bad', None) and run.data.train.bad.first}); "
                                "under DDP a process cannot skip a step: fix or remove the files")
            skipped += 1
            continue
        values = _train_step(run, index, x, y, f"epoch {epoch + 1}, step {step + 1}")
        if values is None:
            skipped += 1
            run.skipped_in_a_row += 1
            if run.skipped_in_a_row > cfg.skip_limit or skipped == len(batches):
                _too_many_skips(run, skipped, len(batches))
            continue
        run.skipped_in_a_row = 0
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        if hasattr(bar, "set_postfix"):
            bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()}, refresh=False)
        if _agreed(stop.requested, info, run.device):
            _stop_mid_epoch(run, epoch, step + 1, len(batches), sums, skipped, before + time.time() - t_epoch)
    run.first_step = 0
    return len(batches), sums, skipped, before + time.time() - t_epoch


def _train_step(run: _Run, index: torch.Tensor, x: torch.Tensor, y: torch.Tensor, where: str) -> dict[str, float] | None:
    """One optimiser step on the training samples ``index`` (images ``x``, labels ``y``);
    returns the terms' values, or None when a non-finite step was skipped (``nonfinite=skip``)."""
    cfg, device, optimizer = run.cfg, run.device, run.optimizer
    if cfg.data.augment:
        x = random_crop_flip(x, cfg.data.crop_padding, run.data.hflip, _draws(run.aug_gen, run.info))
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    targets = run.cache(index, x, y) if run.cache is not None else None
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    scaler = run.scaler
    with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
        _, total, terms = run.objective(x, y, targets, grad_scale=float(scaler.get_scale()) if scaler else None)
    values = {k: float(v.detach()) for k, v in terms.items()}
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if run.info.enabled:
        share, bad_elsewhere = _agree_on_step(len(index), bool(bad), run.info, device)
        if bad_elsewhere and not bad:  # one process holding the global batch would see it: all skip or stop
            bad = ["terms of another process"]
        if share != 1.0:  # unreadable samples left this share short: weigh its mean by its part of the
            # global batch, so that the gradients DDP averages (and the logged terms) are the global mean
            total, values = total * share, {k: v * share for k, v in values.items()}
    optimizer.zero_grad(set_to_none=True)
    overflowing = scaler is not None and run.overflows_in_a_row < MAX_OVERFLOWS_IN_A_ROW
    if overflowing and bad:
        # fp16: a non-finite term is an overflow (of fp16 activations, or of the scaled input
        # gradients): the step is skipped and the scale lowered, as the scaler does for gradients.
        scaler.scale(total)  # (a scaler's scale exists once it has scaled something)
        scaler.update(float(scaler.get_scale()) * scaler.get_backoff_factor())
        run.overflow_steps += 1
        run.overflows_in_a_row += 1
        run.forward_overflows += 1
        return {}
    if not bad:
        # Gradients of the parameters only: the input, which requires grad for the Jacobian
        # terms, needs none (about 5% of a KD+JM step on CPU; jacmatch bench).
        _backward(run, scaler.scale(total) if scaler else total, x)
        if run.global_bn:
            average_gradients(run.model)
        if scaler:
            scaler.unscale_(optimizer)
        if not all(torch.isfinite(p.grad).all() for p in run.model.parameters() if p.grad is not None):
            if overflowing:  # an fp16 overflow of the scaled gradients: the scaler skips the step, lowers its scale
                scaler.step(optimizer)
                scaler.update()
                run.overflow_steps += 1
                run.overflows_in_a_row += 1
                return values
            bad = ["gradient"]
    if bad:
        what = f"non-finite {', '.join(bad)} at {where} ({', '.join(f'{k}={values[k]}' for k in values)})"
        if cfg.nonfinite == "skip":
            optimizer.zero_grad(set_to_none=True)  # (a scaler has seen nothing of this step: it stays consistent)
            run.last_skip = what
            return None
        raise NonFiniteError(f"{what}; the last complete checkpoint is kept: lower the learning rate or weights, "
                             f"or set nonfinite=skip")
    (scaler.step(optimizer), scaler.update()) if scaler else optimizer.step()
    run.overflows_in_a_row = 0
    return values


def _agree_on_step(n: int, bad: bool, info: DistInfo, device) -> tuple[float, bool]:
    """One all-reduce a step: this process's ``n`` samples over the mean per process (1.0
    for equal shares), and whether any process's terms are non-finite."""
    t = torch.tensor([float(n), 1.0 if bad else 0.0], device=device)
    dist.all_reduce(t)
    return n * info.world_size / float(t[0]), bool(t[1] > 0)


def _backward(run: _Run, loss: torch.Tensor, x: torch.Tensor) -> None:
    """The step's backward pass; a student with an operation that has no double backward
    (which the Jacobian term takes) is named in one line, with the module and the fix."""
    try:
        loss.backward(inputs=run.trainable)
    except RuntimeError as exc:
        if "derivative for" not in str(exc):
            raise
        from .compat import first_failing_module
        what = str(exc).strip().splitlines()[0]
        module = first_failing_module(run.model.eval(), x[:2])
        run.model.train()
        fix = ("set model.replace_hard_activations=true" if "hardsigmoid" in what or "hardswish" in what else
               "replace it by a twice-differentiable equivalent, or use this model as a teacher only")
        raise UsageError(f"the student {run.cfg.model.name!r} cannot take the Jacobian term's double backward"
                         f"{f' at module {module}' if module else ''} ({what}): {fix}; "
                         f"`jacmatch check-model {run.cfg.model.name} --fix` shows what works") from None


def _too_many_skips(run: _Run, skipped: int, steps: int) -> None:
    """``nonfinite=skip`` has a bound: a run that skips more than ``skip_limit`` steps in a
    row, or every step of an epoch, is not training; it stops like ``nonfinite=stop``."""
    why = (f"every step of this epoch ({steps})" if skipped == steps else
           f"{run.skipped_in_a_row} steps in a row (more than skip_limit={run.cfg.skip_limit})")
    raise NonFiniteError(f"nonfinite=skip skipped {why}; the last: {run.last_skip}. The last complete checkpoint "
                         "is kept: the loss cannot be trained as it is (check the teacher and the data, lower the "
                         "learning rate or weights), or raise skip_limit")


def _stop_mid_epoch(run: _Run, epoch: int, step: int, steps: int, sums: dict, skipped: int,
                    seconds: float) -> None:
    """A signal asked to stop: checkpoint this step (with the epoch's draws and seconds so far) and raise."""
    if run.info.is_main:
        save_checkpoint(run.last, run.state(epoch, step=step, mid_epoch={
            "gen": run.gen.get_state(), "aug": run.aug_gen.get_state(), "sums": json.dumps(sums),
            "skipped": skipped, "seconds": seconds}))
    run.info.barrier()
    raise Preempted(f"stopped by a signal at epoch {epoch + 1}, step {step} of {steps}; "
                    f"{run.last} holds that step: --resume continues from it")


# ---- end of an epoch: evaluate, log, checkpoint -----------------------------------------------


def _end_epoch(run: _Run, epoch: int, steps: int, sums: dict, skipped: int, seconds: float) -> bool:
    """Log, evaluate and checkpoint the epoch; True when the run stops early (patience)."""
    cfg, info = run.cfg, run.info
    lr = run.optimizer.param_groups[0]["lr"]  # the rate this epoch trained with
    with warnings.catch_warnings():  # this loop always steps the optimizer first; a run resumed
        # after its first epoch's last step has not in this process, and torch would say so
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
        run.scheduler.step()
    n_steps = max(steps - skipped - run.forward_overflows, 1)
    run.forward_overflows = 0
    record = {"epoch": epoch + 1, "lr": lr, "steps": steps,
              "skipped_steps": skipped, "train": {k: v / n_steps for k, v in sums.items()},
              "epoch_seconds": seconds}
    if run.changes:  # the settings this resume changed, beside the first epoch trained with them
        record["config_changes"], run.changes = run.changes, {}
    if info.enabled:
        record["train"] = _mean_across_ranks(record["train"], run.device)
    if run.scaler is not None:
        record["overflow_steps"], record["loss_scale"] = run.overflow_steps, float(run.scaler.get_scale())
        run.overflow_steps = 0
    bad = getattr(run.data.train, "bad", None)  # samples skipped as unreadable (data.on_bad_sample=skip)
    if bad is not None and info.enabled and cfg.data.on_bad_sample == "skip":
        found: list = [None] * info.world_size  # what every process found: what one process would have read
        dist.all_gather_object(found, bad.found)
        for f in found:
            bad.add(f)
    if bad is not None and bad.count:
        record["bad_samples"], record["first_bad_sample"] = bad.count, bad.first
    last = epoch + 1 == cfg.optim.epochs
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
        _log(run.out, run.history, run.writer, record)
        if cfg.eval.keep_best and "val" in record and _best_index(run.history, cfg.eval.min_delta) == len(run.history) - 1:
            save_checkpoint(run.out / "best.pt", run.state(epoch + 1))
        stop = _no_better_for(cfg, run.history) >= cfg.eval.patience > 0
        if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.optim.epochs or stop:
            save_checkpoint(run.last, run.state(epoch + 1))
    info.barrier()
    return _agreed(stop, info, run.device)


def evaluate_splits(model: nn.Module, data: DataSplits, cfg: RunConfig, device="cpu", *, teacher=None,
                    teacher_key=None, teacher_gradients=None, test: bool = True) -> dict:
    """A run's evaluation, as its config says: {"val": accuracy, "test": accuracy, under
    noise, and the Jacobian cosine with ``teacher`` when the config asks for it}; without
    ``test``, validation only (a run's evaluations before its last)."""
    e = cfg.eval
    val = {"val": evaluate(model, data.val, device, batch_size=e.batch_size)}
    if not test:
        return val
    return {**val,
            "test": evaluate(model, data.test, device, batch_size=e.batch_size,
                             noise_sigmas=e.noise_sigmas, noise_seed=e.noise_seed,
                             teacher=teacher if e.jacobian_cosine else None, cosine_samples=e.cosine_samples,
                             teacher_key=teacher_key, teacher_gradients=teacher_gradients)}


class _Sized:
    """An iterator with the length a progress bar shows."""

    def __init__(self, items, n: int):
        self.items, self.n = items, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(self.items)


class _PlainProgress:
    """Progress as plain lines for logs (stderr not a terminal): one every ``every``
    seconds within an epoch and one at its end, never a carriage return."""

    def __init__(self, batches, desc: str, every: float = 30.0):
        self.batches, self.desc, self.every = batches, desc, every
        self.postfix: dict = {}

    def set_postfix(self, values: dict, refresh: bool = False) -> None:
        self.postfix = values

    def _line(self, step: int, start: float) -> None:
        terms = " ".join(f"{k} {v}" for k, v in self.postfix.items())
        print(f"{self.desc}: step {step}/{len(self.batches)} {terms} [{time.time() - start:.0f} s]",
              file=sys.stderr, flush=True)

    def __iter__(self):
        start = last = time.time()
        for step, item in enumerate(self.batches, 1):
            yield item
            if time.time() - last >= self.every and step < len(self.batches):
                self._line(step, start)
                last = time.time()
        self._line(len(self.batches), start)


def _progress(batches, cfg: RunConfig, info: DistInfo, epoch: int):
    if not (cfg.progress and info.is_main):
        return batches
    desc = f"epoch {epoch + 1}/{cfg.optim.epochs}"
    if not sys.stderr.isatty():
        return _PlainProgress(batches, desc)
    from tqdm import tqdm
    return tqdm(batches, desc=desc, leave=False, dynamic_ncols=True)


def _mean_across_ranks(values: dict, device) -> dict:
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t)}


def _log(out: Path, history: list[dict], writer, record: dict) -> None:
    write_atomic(out / "metrics.jsonl", lambda f: f.write("".join(json.dumps(r) + "\n" for r in history)))
    if writer is not None:
        step = record["epoch"]
        for k, v in record["train"].items():
            writer.add_scalar(f"train/{k}", v, step)
        writer.add_scalar("train/lr", record["lr"], step)
        for split in ("val", "test"):
            for k, v in record.get(split, {}).items():
                if isinstance(v, dict):
                    for s, a in v.items():
                        writer.add_scalar(f"{split}/{k}@{s}", a, step)
                else:
                    writer.add_scalar(f"{split}/{k}", v, step)
        writer.flush()


def _best_index(history: list[dict], min_delta: float = 0.0) -> int | None:
    """The epoch record (index) of the best validation accuracy, in order: an evaluation is
    better when it beats the best so far by more than ``min_delta`` (the first of equals)."""
    best = None
    for i, h in enumerate(history):
        if "val" in h and (best is None or h["val"]["acc"] > history[best]["val"]["acc"] + min_delta):
            best = i
    return best


def _no_better_for(cfg: RunConfig, history: list[dict]) -> int:
    """Evaluations since the best one (0 when the last is the best, or with keep_best off)."""
    best = _best_index(history, cfg.eval.min_delta) if cfg.eval.keep_best else None
    return 0 if best is None else sum(1 for h in history[best + 1:] if "val" in h)


def best_point(history: list[dict], cfg: RunConfig) -> dict:
    """Where the best validation accuracy was: its epoch and step, whether the run stopped
    early (patience), and whether that point lies strictly inside the run's maximum."""
    best = _best_index(history, cfg.eval.min_delta)
    if best is None:
        return {}
    steps = list(itertools.accumulate(h["steps"] for h in history))
    seconds = list(itertools.accumulate(h.get("epoch_seconds", 0.0) for h in history))
    return {"epoch": history[best]["epoch"], "step": steps[best], "val_acc": history[best]["val"]["acc"],
            "loop_seconds": seconds[best], "max_epochs": cfg.optim.epochs, "epochs_trained": len(history),
            "stopped_early": len(history) < cfg.optim.epochs, "inside": history[best]["epoch"] < cfg.optim.epochs}


def _evaluate_best(run: _Run) -> None:
    """The final evaluation (validation and test) of the best weights (best.pt)."""
    if run.info.is_main:
        best = run.out / "best.pt"
        if best.is_file():
            run.model.load_state_dict(load_checkpoint(best, map_location=run.device)["model"])
        run.best_final = evaluate_splits(run.model, run.data, run.cfg, run.device, teacher=run.teacher,
                                         teacher_key=run.teacher_key, teacher_gradients=run.teacher_gradients)
    run.info.barrier()


def _results(cfg, data, model, teacher, history, seconds) -> dict:
    final = history[-1] if history else {}
    return {"config": config_to_dict(cfg), "dataset": data.name, "num_train": len(data.train),
            "num_classes": data.num_classes, "student_parameters": count_parameters(model),
            "teacher_parameters": count_parameters(teacher) if teacher is not None else None,
            "final": {"val": final.get("val"), "test": final.get("test"), "train": final.get("train")},
            "epochs": len(history), "train_seconds": seconds, "torch": torch.__version__,
            # the epochs' own time (steps, no evaluation), over every invocation: what equal compute compares
            "loop_seconds": sum(h.get("epoch_seconds", 0.0) for h in history),
            "eval_seconds": sum(h.get("eval_seconds", 0.0) for h in history),
            "provenance": provenance(config_to_dict(cfg), data.data_sha256,
                                     next(model.parameters(), torch.empty(0)).device)}


def _run_state(cfg, model, optimizer, scheduler, history, epoch: int, **extra) -> dict:
    """What a checkpoint holds: weights, optimiser, schedule, ``epoch`` completed epochs,
    the history, the config and the RNG state (``extra``: a mid-epoch stop's position)."""
    return {"model": model.state_dict(), "arch": model.arch, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch, "history": json.dumps(history),
            "config": json.dumps(config_to_dict(cfg)), "rng": torch.get_rng_state(), **extra}


def _yaml(values: dict) -> str:
    import yaml
    return yaml.safe_dump(values, sort_keys=False)
