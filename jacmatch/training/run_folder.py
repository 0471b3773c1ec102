"""The run folder: its lock, the claim a new run makes on it, and the files it writes
before the first step (config, history, data indices, TensorBoard)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from .._extras import require
from ..atomic import write_atomic, write_json_atomic
from ..errors import UsageError
from .config import ConfigError, RunConfig, config_to_dict

__all__ = ["RunExistsError", "RunLock", "RUN_FILES", "LOCK_FILE", "claim_folder", "open_outputs", "append_jsonl",
           "run_reads", "data_reads", "check_spared", "forget_start"]


class RunExistsError(ConfigError):
    """The output folder already holds a run, or another process is training in it."""


#: The files that make a run folder's record; a new run never writes over them unasked.
RUN_FILES = ("last.pt", "best.pt", "config.yaml", "results.json", "metrics.jsonl", "history.jsonl", "indices.json",
             "tracking.json")
#: The folders a run writes in its folder (removed with the files by --overwrite).
RUN_FOLDERS = ("tensorboard", "wandb")
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


def run_reads(cfg: RunConfig, config_file: str | None = None) -> list[tuple[str, Path]]:
    """What a run reads besides its own folder, each as (what, path): the teacher, its
    weights, the checkpoint a fine-tune starts from, the config file, the data's files."""
    return [(what, Path(path)) for what, path in (("the teacher", cfg.teacher), ("the teacher weights",
            cfg.teacher_weights), ("init_from", cfg.init_from), ("the config", config_file)) if path] + data_reads(cfg.data)


def data_reads(d) -> list[tuple[str, Path]]:
    """The files or folders DataConfig ``d`` reads: a built-in set's data_dir, a source's path."""
    from ..data import dataset_kind
    from ..data.formats import user_path
    reads = [("the data folder", Path(d.data_dir))] if d.data_dir else []
    kind, arg = dataset_kind(d.name)
    if kind not in ("builtin", "import"):
        reads.append(("the data", user_path(arg)))
    return reads


def _inside(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or lies below it (both resolved: links followed)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _run_owning(path: Path) -> Path | None:
    """The run folder that owns ``path`` (one of its RUN_FILES, its lock, or a file under one of
    its RUN_FOLDERS), or None; a folder holds a run when it holds its lock or any of its files."""
    path = path.resolve()
    for folder, name in ((path.parent, path.name), *((p.parent, p.name) for p in path.parents if p.name in RUN_FOLDERS)):
        if name in (*RUN_FILES, LOCK_FILE, *RUN_FOLDERS) and \
                any((folder / f).exists() for f in (*RUN_FILES, LOCK_FILE)):
            return folder
    return None


def check_spared(writes: list[tuple[str, Path, bool]], reads: list[tuple[str, Path]]) -> None:
    """Refuse, before anything is written or removed, an output that would touch what the
    command reads. ``writes``: (option, path, whether the path is a folder the command fills
    and may empty); ``reads``: (what, path). An output file may not be a file read, nor lie in
    a folder read (a data set); an output folder may hold nothing read, nor lie in a folder read."""
    for option, out, folder in writes:
        for what, read in reads:
            if _inside(read, out) if folder else out.resolve() == read.resolve():
                raise UsageError(f"{option} {out} would {'write over' if not folder else 'hold, and --overwrite delete,'}"
                                 f" {what} {read}, which this command reads: choose another {option}")
            if read.is_dir() and _inside(out, read):
                raise UsageError(f"{option} {out} lies inside {what} {read}, which this command reads: its files "
                                 f"would mix with the data; choose another {option} outside {read}")
        owner = None if folder else _run_owning(out)
        if owner is not None:
            raise UsageError(f"{option} {out} would write over a file of the run in {owner}, which keeps its own "
                             f"record there: write to a new file (for example {owner / 'evaluation.json'})")


def claim_folder(out: Path, resume: bool, overwrite: bool, config_file: str | None,
                 reads: list[tuple[str, Path]] = ()) -> RunLock:
    """Lock ``out`` and check what it holds: a run is continued only with ``resume``,
    replaced only with ``overwrite``, and the user's own config file is never replaced;
    ``out`` may neither hold nor lie inside anything the run ``reads`` (checked before
    anything is written)."""
    mine = config_file is not None and Path(config_file).resolve() == (out / "config.yaml").resolve()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: give a folder for the run (it is created if missing)")
    check_spared([("--out", out, True)], [(what, p) for what, p in reads if not (mine and what == "the config")])

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
            for name in RUN_FOLDERS:  # what the earlier run wrote besides its files (its TensorBoard events)
                if (out / name).is_dir():
                    shutil.rmtree(out / name)
    except BaseException:
        lock.release()
        raise
    return lock


def forget_start(out: Path, found: list[str] | None, lock: RunLock) -> None:
    """Undo a start that failed before its first checkpoint (a missing extra, a crash in the
    first epoch): what it wrote in ``out`` is removed, so that the same command can run again;
    ``found``: what ``out`` held before (None: it did not exist, and is removed)."""
    if (out / "last.pt").exists() or not out.is_dir():
        return  # a checkpoint: the run can be resumed, and its files are its own
    for path in out.iterdir():
        if path.name not in (found or ()) and path.name != LOCK_FILE:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if LOCK_FILE not in (found or ()):
        lock.release()  # (the run ends here: its lock goes with what it made)
        (out / LOCK_FILE).unlink(missing_ok=True)
    if found is None and not any(out.iterdir()):
        out.rmdir()


def append_jsonl(path: Path, record: dict) -> None:
    """One more line, the earlier ones kept byte for byte (an atomic rewrite)."""
    before = path.read_text() if path.is_file() else ""
    write_atomic(path, lambda f: f.write(before + json.dumps(record) + "\n"))


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def open_outputs(cfg: RunConfig, out: Path, indices: dict, resume: bool, config_file: str | None) -> list:
    """The run folder's config, history, data indices (rank 0); returns the run's loggers
    (TensorBoard, MLflow, W&B: :mod:`.tracking`) as the config asks. A resume from the
    folder's own config.yaml leaves that file as it is (the checkpoint and history.jsonl hold
    the resolved config and what changed). A missing extra is said before anything is written."""
    from .tracking import open_loggers
    for wanted, module, extra in ((cfg.tensorboard, "tensorboard", "tensorboard"),
                                  ("mlflow" in cfg.tracking, "mlflow", "mlflow"), ("wandb" in cfg.tracking, "wandb", "wandb")):
        if wanted:
            require(module, extra)
    out.mkdir(parents=True, exist_ok=True)
    if config_file is None or Path(config_file).resolve() != (out / "config.yaml").resolve():
        write_atomic(out / "config.yaml", lambda f: f.write(_yaml(config_to_dict(cfg))))
    if not resume:
        append_jsonl(out / "history.jsonl", {"time": now(), "event": "start"})
    write_json_atomic(out / "indices.json", indices)
    return open_loggers(cfg, out, resume)


def _yaml(values: dict) -> str:
    import yaml
    return yaml.safe_dump(values, sort_keys=False)
