"""The command line: ``jacmatch {demo,train-teacher,distill,evaluate,verify,bench}``.

Every command is a thin layer over a function of :mod:`jacmatch.experiments` or
:mod:`jacmatch.training`. A user error (bad file, unknown name, bad setting) ends in one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

EXIT_USAGE = 2


class UserError(Exception):
    """A problem with the user's input: shown as one line, exit code 2."""


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="check Propositions 1 and 2 numerically (METHOD.md §4)",
                       description="Monte-Carlo noisy losses against the closed forms of METHOD.md §2, "
                                   "over a sweep of σ, for smooth and ReLU networks.")
    p.add_argument("--quick", action="store_true", help="fewer σ and draws (under a minute)")
    p.add_argument("--json", metavar="PATH", help="write the records as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a log-log PNG, one panel per proposition")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=lambda a: __import__("jacmatch.experiments.verify", fromlist=["main"]).main(
        a.quick, a.json, a.plot, a.seed))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jacmatch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_verify(sub)
    try:
        from .commands import add_commands
    except ImportError as exc:  # pragma: no cover - only while the training system is absent
        if "commands" not in str(exc):
            raise
    else:
        add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (UserError, ValueError, FileNotFoundError, KeyError) as exc:
        message = exc.args[0] if exc.args else type(exc).__name__
        print(f"jacmatch {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"jacmatch {args.command}: interrupted; the last complete checkpoint is kept", file=sys.stderr)
        return 130
    return 0
