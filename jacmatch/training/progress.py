"""Progress: a bar on a terminal, plain lines in a log, and each epoch's record written
to metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..atomic import write_atomic
from .distributed import DistInfo

__all__ = ["progress", "log_epoch"]


class Sized:
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


def progress(batches, n: int, shown: bool, info: DistInfo, epoch: int, epochs: int):
    """``batches`` (``n`` of them) with the progress of epoch ``epoch`` of ``epochs``:
    nothing when not ``shown`` or off the main process, a bar on a terminal, plain lines
    otherwise."""
    batches = Sized(batches, n)
    if not (shown and info.is_main):
        return batches
    desc = f"epoch {epoch + 1}/{epochs}"
    if not sys.stderr.isatty():
        return _PlainProgress(batches, desc)
    from tqdm import tqdm
    return tqdm(batches, desc=desc, leave=False, dynamic_ncols=True)


def log_epoch(out: Path, history: list[dict], loggers: list, record: dict) -> None:
    """metrics.jsonl holds every epoch's record so far; each logger (TensorBoard, MLflow,
    W&B) gets this one's numbers."""
    write_atomic(out / "metrics.jsonl", lambda f: f.write("".join(json.dumps(r) + "\n" for r in history)))
    for logger in loggers:
        logger.log(record)
