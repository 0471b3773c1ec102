"""One optimiser step: the objective's loss, its backward, and what a non-finite value or
an fp16 overflow does.

The step receives what it uses (the objective, the optimiser, the gradient scaler, and a
:class:`StepPolicy`), never the run's config; it knows nothing of data, files or progress.
Under DDP it agrees with the other processes once a step (:func:`agree_on_step`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import jacobian as J
from ..errors import UsageError
from .distributed import DistInfo, agree_on_step, average_gradients

__all__ = ["NonFiniteError", "DivergingWarning", "GROWTH_WARNED", "GROWTH_DIVERGED",
           "StepPolicy", "StepCounters", "Stepper", "MAX_OVERFLOWS_IN_A_ROW"]

#: fp16 steps that overflow one after another before the run is taken to diverge (the scale
#: has then been halved this many times: 2^16 becomes 2^-34).
MAX_OVERFLOWS_IN_A_ROW = 50

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


#: A loss this many times its first step's (at least 1) warns that the run may be diverging; one
#: GROWTH_DIVERGED times larger is a divergence, handled as a non-finite step (``nonfinite``).
GROWTH_WARNED, GROWTH_DIVERGED = 1e3, 1e6


def explain_backward_failure(student: nn.Module, exc: RuntimeError, x: Tensor, student_name: str = "student"
                             ) -> UsageError | None:
    """A step's backward failed with ``exc`` on the batch ``x``: when the cause is an operation
    of the student with no double backward (which the Jacobian terms take), the one-line error
    that names the module and the fix; None for any other failure."""
    if "derivative for" not in str(exc):
        return None
    what = str(exc).strip().splitlines()[0]
    if isinstance(student, nn.parallel.DistributedDataParallel):
        student = student.module
    was_training = student.training
    module = J.first_failing_module(student.eval(), x[:2])
    student.train(was_training)
    fix = ("set model.replace_hard_activations=true" if "hardsigmoid" in what or "hardswish" in what else
           "replace it by a twice-differentiable equivalent, or use this model as a teacher only")
    return UsageError(f"the student {student_name!r} cannot take the Jacobian term's double backward"
                      f"{f' at module {module}' if module else ''} ({what}): {fix}; "
                      f"`jacmatch check-model {student_name} --fix` shows what works")


class DivergingWarning(UserWarning):
    """The loss grew by orders of magnitude: the run may be diverging."""


class NonFiniteError(RuntimeError):
    """A loss term or a gradient became NaN or Inf."""


@dataclass(frozen=True)
class StepPolicy:
    """How a step runs and what a non-finite one does: ``amp`` (none | bf16 | fp16),
    ``nonfinite`` (stop | skip) and ``skip_limit`` (skipped steps in a row before a run
    that skips is taken not to train)."""

    amp: str = "none"
    nonfinite: str = "stop"
    skip_limit: int = 20

    @classmethod
    def of(cls, cfg) -> StepPolicy:
        """The policy a RunConfig sets."""
        return cls(amp=cfg.amp, nonfinite=cfg.nonfinite, skip_limit=cfg.skip_limit)


@dataclass
class StepCounters:
    """What the steps count between two ends of an epoch."""

    skipped_in_a_row: int = 0  # nonfinite=skip: steps skipped since the last one trained
    overflow_steps: int = 0  # fp16 steps the gradient scaler skipped this epoch (it lowered its scale)
    forward_overflows: int = 0  # of those, steps whose terms overflowed (no values for the epoch's means)
    overflows_in_a_row: int = 0  # past MAX_OVERFLOWS_IN_A_ROW, a non-finite step is not an overflow but a divergence
    last_skip: str = ""  # why the last step was skipped
    first_total: float | None = None  # the loss of this invocation's first step (a divergence is measured from it)
    growth_warned: bool = False


class Stepper:
    """``stepper(x, y, targets, n, where)`` takes one optimiser step on a batch already on
    the device (``n`` samples of the global batch, ``targets`` the teacher's side from a
    cache or None) and returns the terms' values, ``{}`` for an fp16 overflow, or None
    when a non-finite step was skipped (``nonfinite=skip``).

    ``average``: a model whose gradients are averaged across processes after each
    backward (DDP with global BatchNorm, trained without the DDP wrapper)."""

    def __init__(self, objective: nn.Module, optimizer: torch.optim.Optimizer, scaler, policy: StepPolicy,
                 info: DistInfo, device: torch.device, trainable: list, *, average: nn.Module | None = None,
                 student_name: str = "student"):
        self.objective, self.optimizer, self.scaler, self.policy = objective, optimizer, scaler, policy
        self.info, self.device, self.trainable, self.average = info, device, trainable, average
        self.student_name = student_name
        self.counters = StepCounters()

    def __call__(self, x: Tensor, y: Tensor, targets, n: int, where: str, number: int | None = None
                 ) -> dict[str, float] | None:
        scaler, optimizer, counters = self.scaler, self.optimizer, self.counters
        amp_dtype = _AMP_DTYPES.get(self.policy.amp)
        with torch.autocast(self.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
            _, total, terms = self.objective(x, y, targets, grad_scale=float(scaler.get_scale()) if scaler else None,
                                             step=number)
        values = {k: float(v.detach()) for k, v in terms.items()}
        bad = [k for k, v in values.items() if not math.isfinite(v)] or self._diverged(float(total.detach()), where)
        if self.info.enabled:
            share, bad_elsewhere = agree_on_step(n, bool(bad), self.info, self.device)
            if bad_elsewhere and not bad:  # one process holding the global batch would see it: all skip or stop
                bad = ["terms of another process"]
            if share != 1.0:  # unreadable samples left this share short: weigh its mean by its part of the
                # global batch, so that the gradients DDP averages (and the logged terms) are the global mean
                total, values = total * share, {k: v * share for k, v in values.items()}
        optimizer.zero_grad(set_to_none=True)
        overflowing = scaler is not None and counters.overflows_in_a_row < MAX_OVERFLOWS_IN_A_ROW
        if overflowing and bad:
            # fp16: a non-finite term is an overflow (of fp16 activations, or of the scaled input
            # gradients): the step is skipped and the scale lowered, as the scaler does for gradients.
            scaler.scale(total)  # (a scaler's scale exists once it has scaled something)
            scaler.update(float(scaler.get_scale()) * scaler.get_backoff_factor())
            counters.overflow_steps += 1
            counters.overflows_in_a_row += 1
            counters.forward_overflows += 1
            return {}
        if not bad:
            # Gradients of the parameters only: the input, which requires grad for the Jacobian
            # terms, needs none (about 5% of a KD+JM step on CPU; jacmatch bench).
            self._backward(scaler.scale(total) if scaler else total, x)
            if self.average is not None:
                average_gradients(self.average)
            if scaler:
                scaler.unscale_(optimizer)
            if not all(torch.isfinite(p.grad).all() for p in self.trainable if p.grad is not None):
                if overflowing:  # an fp16 overflow of the scaled gradients: the scaler skips the step, lowers its scale
                    scaler.step(optimizer)
                    scaler.update()
                    counters.overflow_steps += 1
                    counters.overflows_in_a_row += 1
                    return values
                bad = ["gradient"]
        if bad:
            what = (bad[0] if bad[0].startswith("diverged") else f"non-finite {', '.join(bad)}") \
                + f" at {where} ({', '.join(f'{k}={values[k]}' for k in values)})"
            if self.policy.nonfinite == "skip":
                optimizer.zero_grad(set_to_none=True)  # (a scaler has seen nothing of this step: it stays consistent)
                counters.last_skip = what
                return None
            raise NonFiniteError(f"{what}; the last complete checkpoint is kept: lower the learning rate or weights, "
                                 f"or set nonfinite=skip")
        (scaler.step(optimizer), scaler.update()) if scaler else optimizer.step()
        counters.overflows_in_a_row = 0
        return values

    def _diverged(self, total: float, where: str) -> list[str]:
        """A finite loss that grew by orders of magnitude since this invocation's first step:
        a warning past :data:`GROWTH_WARNED`, and past :data:`GROWTH_DIVERGED` a divergence that
        the ``nonfinite`` policy handles like a non-finite step (stop, or skip)."""
        counters = self.counters
        if counters.first_total is None:
            counters.first_total = total
        if not math.isfinite(total):
            return []
        growth = total / max(abs(counters.first_total), 1.0)
        if growth > GROWTH_WARNED and not counters.growth_warned:
            counters.growth_warned = True
            warnings.warn(DivergingWarning(f"the loss grew from {counters.first_total:.4g} at the first step to "
                                           f"{total:.4g} at {where}: the run may be diverging (lower the learning "
                                           "rate or the terms' weights)"), stacklevel=3)
        return [f"diverged loss (grown {growth:.2g}-fold, from {counters.first_total:.4g} to {total:.4g})"] \
            if growth > GROWTH_DIVERGED else []

    def _backward(self, loss: Tensor, x: Tensor) -> None:
        """The step's backward pass; a failure the objective can explain (an operation of
        the student with no double backward) is raised as its one-line explanation."""
        try:
            loss.backward(inputs=self.trainable)
        except RuntimeError as exc:
            explained = explain_backward_failure(self.objective.student, exc, x, self.student_name)
            if explained is None:
                raise
            raise explained from None

    def too_many_skips(self, skipped: int, steps: int) -> None:
        """``nonfinite=skip`` has a bound: a run that skips more than ``skip_limit`` steps in
        a row, or every step of an epoch, is not training; it stops like ``nonfinite=stop``."""
        why = (f"every step of this epoch ({steps})" if skipped == steps else
               f"{self.counters.skipped_in_a_row} steps in a row (more than skip_limit={self.policy.skip_limit})")
        raise NonFiniteError(f"nonfinite=skip skipped {why}; the last: {self.counters.last_skip}. The last complete "
                             "checkpoint is kept: the loss cannot be trained as it is (check the teacher and the data, "
                             "lower the learning rate or weights), or raise skip_limit")
