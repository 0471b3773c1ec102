"""A loss of one's own, in its own file: the one file a new term needs (objective.terms)."""

import torch
from torch import Tensor

from jacmatch import Needs, Term


class LogitNorm(Term):
    """weight · mean squared logit: keeps the student's logits small."""

    key = "logit_norm"

    def __init__(self, weight: float = 1.0, power: float = 2.0):
        super().__init__(weight)
        self.power = power

    def from_step(self, step) -> Tensor:  # the one method a term writes: value(logits=...) is built on it
        return step.logits.abs().pow(self.power).mean()


def not_a_term():
    return torch.zeros(())


class InputGradientNorm(Term):
    """weight · ‖∇ₓ Σ_c S_c‖²: a Jacobian-type term of one's own, which declares its Jacobian
    rows (for the memory estimate) and when the student's input gradient is zero (for the
    dead-student warning), as the built-in Jacobian terms do."""

    key = "grad_norm"
    needs = Needs(input_grad=True, jacobian=True)

    def __init__(self, weight: float = 1.0, rows: int = 7):
        super().__init__(weight)
        self.rows, self.zero = rows, None

    def rows_per_sample(self, num_classes: int) -> int:
        return self.rows

    def dead_student(self):
        return "the student's summed input gradient" if self.zero is not None and bool(self.zero) else None

    def from_step(self, step) -> Tensor:
        (g,) = torch.autograd.grad(step.logits.sum(), step.xs, create_graph=True)
        self.zero = g.detach().flatten(1).abs().amax(dim=1).eq(0).all()
        return g.pow(2).flatten(1).sum(dim=1).mean()
