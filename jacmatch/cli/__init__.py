"""The command line, a shell over the library: each command is a module of this package
(``run``: train-teacher and distill; ``tune``; ``inspect``: evaluate, check-model and config;
``experiments``: the experiments, benchmarks and report) calling a function of
:mod:`jacmatch.training` or :mod:`jacmatch.experiments`.

A user error (bad file, unknown name, bad setting, a missing optional dependency, a model
that cannot run: :class:`~jacmatch.errors.UsageError`) ends in one line on stderr and exit
code 2, never a traceback; any other exception is a bug of jacmatch's and keeps its
traceback (exit code 1).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings

from .. import __version__
from .._extras import MissingExtra
from ..errors import UsageError
from ..training.epoch import Preempted
from ..training.provenance import git_commit
from .exits import EXIT_IO, EXIT_PREEMPTED, EXIT_TERMINATED, EXIT_USAGE
from .experiments import add_experiment_commands, add_measurement_commands
from .inspect import add_inspect_commands
from .run import add_run_commands
from .tune import add_tune_command

#: What ``jacmatch --help`` opens with.
DESCRIPTION = ("jacmatch: knowledge transfer with Jacobian matching. Distil a teacher into a student "
               "(`jacmatch distill`), choose a recipe's values on your data (`jacmatch tune`), evaluate, "
               "and rerun the evidence (`jacmatch experiment`, `jacmatch report`).")


class Terminated(BaseException):
    """SIGTERM outside a training loop (which checkpoints and exits 75 instead)."""


def _terminate_in(main_pid: int):
    """The SIGTERM handler of the process ``main_pid``: Terminated there; a forked DataLoader
    worker dies as it would have before."""
    def terminate(signum, frame):
        if os.getpid() != main_pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Terminated()
    return terminate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jacmatch", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"jacmatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_commands(sub)
    add_tune_command(sub)
    add_inspect_commands(sub)
    add_experiment_commands(sub)
    add_measurement_commands(sub)
    return parser


def _one_line(text: str) -> str:
    """A message as one line: control characters (a newline or form feed in a path) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _warning_line(command: str):
    """jacmatch's own warnings as one line on stderr, each text once (a section loads its
    teacher once per run); others as Python shows them."""
    default, shown = warnings.showwarning, set()

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith("jacmatch"):
            text = f"jacmatch {command}: warning: {_one_line(str(message))}"
            if text not in shown:
                shown.add(text)
                print(text, file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)
    return show


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    git_commit()  # the commit of the code this process loaded, before anyone edits the checkout
    before = signal.signal(signal.SIGTERM, _terminate_in(os.getpid())) if _main_thread() else None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_line(args.command)
            return _run(args)
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _run(args) -> int:
    try:
        code = args.run(args)
    except (UsageError, MissingExtra, FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        message = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc) or type(exc).__name__
        print(f"jacmatch {args.command}: error: {_one_line(message)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a full disk, a read-only folder, a directory where a file goes
        where = f" {_one_line(str(exc.filename))}" if exc.filename else ""
        print(f"jacmatch {args.command}: error: cannot write or read{where}: {exc.strerror or exc}; "
              "what was written before is kept", file=sys.stderr)
        return EXIT_IO
    except Preempted as exc:
        print(f"jacmatch {args.command}: {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print(f"jacmatch {args.command}: interrupted; the last complete checkpoint is kept", file=sys.stderr)
        return 130
    except Terminated:
        print(f"jacmatch {args.command}: stopped by SIGTERM; every file written so far is complete (files are "
              "written atomically: each is its old or its new self)", file=sys.stderr)
        return EXIT_TERMINATED
    return code or 0
