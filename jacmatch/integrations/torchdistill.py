"""Jacobian matching inside torchdistill: jacmatch's terms and the forward processes they
need, registered into torchdistill's registries on import.

::

    import jacmatch.integrations.torchdistill  # registers the names below
    # then, in a torchdistill YAML (see jacmatch/configs/torchdistill/kd_jm.yaml):
    #   teacher: {forward_proc: 'jacmatch_teacher_forward', requires_grad: False, ...}
    #   student: {forward_proc: 'jacmatch_student_forward', requires_grad: True, ...}
    #   criterion: {key: 'WeightedSumLoss', kwargs: {sub_terms: {jm: {criterion: {key:
    #     'jacmatch.JacobianMatchingLoss', kwargs: {estimator: 'teacher_top1'}}, weight: 10.0}}}}

Registered forward processes (``register_forward_proc_func``):

- ``jacmatch_student_forward``: the student's pass on inputs that require grad, attention on
  the math kernel (which has the double backward the term takes); its logits carry those
  inputs for the Jacobian terms.
- ``jacmatch_teacher_forward``: the teacher's one pass, taken with a graph from its input to
  its logits (its parameters stay frozen). The Jacobian terms take the teacher's input
  gradients from that graph, so the teacher runs once per step; the logits other losses
  see are detached.

Registered middle-level losses (``register_mid_level_loss``), each reading the students' and
teachers' outputs at ``module_path`` (``'.'``, the model's output) and weighted by the YAML's
``weight``:

- ``jacmatch.JacobianMatchingLoss`` (estimator, form, temperature, top_k, num_projections,
  projection, seed): the estimators whose student side is an input gradient (``label``,
  ``teacher_top1``, ``top_k``, ``all``, ``projection``);
- ``jacmatch.KDLoss`` (temperature, form): τ²·KL, as jacmatch's objective computes it;
- ``jacmatch.JacobianPenalty`` (form, num_projections, projection, seed): Proposition 2's
  penalty, no teacher needed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._extras import require
from ..core import jacobian as J
from ..core.estimators import FD_STEP, PROJECTION, create_estimator
from ..core.losses import kd_loss
from ..core.outputs import logits_of
from ..core.builtin_terms import JacobianPenalty
from ..errors import UsageError

require("torchdistill", "torchdistill")
from torchdistill.core.interfaces.registry import register_forward_proc_func  # noqa: E402
from torchdistill.losses.registry import register_mid_level_loss  # noqa: E402

__all__ = ["jacmatch_student_forward", "jacmatch_teacher_forward", "JacobianMatching", "KnowledgeDistillation",
           "JacobianNormPenalty", "STUDENT_FORWARD", "TEACHER_FORWARD"]

STUDENT_FORWARD, TEACHER_FORWARD = "jacmatch_student_forward", "jacmatch_teacher_forward"


@register_forward_proc_func(key=STUDENT_FORWARD)
def jacmatch_student_forward(model: nn.Module, sample_batch: Tensor, targets: Any = None, supp_dict: Any = None,
                             **kwargs: Any) -> Tensor:
    """The student's logits on ``sample_batch``, which they carry as ``jacmatch_input``
    (requiring grad) for the Jacobian terms."""
    xs = sample_batch.detach().requires_grad_()
    with J.math_attention():
        logits = logits_of(model(xs))
    logits.jacmatch_input = xs  # type: ignore[attr-defined]
    return logits


@register_forward_proc_func(key=TEACHER_FORWARD)
def jacmatch_teacher_forward(model: nn.Module, sample_batch: Tensor, targets: Any = None, supp_dict: Any = None,
                             **kwargs: Any) -> Tensor:
    """The teacher's logits on ``sample_batch``, detached, carrying ``jacmatch_graph``: the
    input (requiring grad) and the logits with their graph from it."""
    with torch.enable_grad():  # torchdistill runs a frozen teacher under no_grad
        xt = sample_batch.detach().requires_grad_()
        logits = logits_of(model(xt))
    out = logits.detach()
    out.jacmatch_graph = (xt, logits)  # type: ignore[attr-defined]
    return out


def _outputs(io_dict: dict, path: str, who: str) -> Tensor:
    try:
        return io_dict[path]["output"]
    except KeyError:
        raise UsageError(f"the {who}'s I/O dict has no output at module_path {path!r}: use '.' (the model's "
                         "output) or a module torchdistill hooks with io 'output'") from None


def _student_input(logits: Tensor) -> Tensor:
    xs = getattr(logits, "jacmatch_input", None)
    if xs is None:
        raise UsageError(f"the student's output carries no input gradient: set the student's forward_proc to "
                         f"{STUDENT_FORWARD!r} in the YAML (import jacmatch.integrations.torchdistill first)")
    return xs


def _generator(seed: int | None) -> torch.Generator | None:
    return torch.Generator().manual_seed(seed) if seed is not None else None


@register_mid_level_loss(key="jacmatch.JacobianMatchingLoss")
class JacobianMatching(nn.Module):
    """Jacobian matching between the student's and the teacher's outputs at ``module_path``."""

    def __init__(self, estimator: str = "teacher_top1", form: str = "normalized", temperature: float = 8.0,
                 top_k: int = 3, num_projections: int = 1, projection: str = PROJECTION, seed: int | None = None,
                 module_path: str = ".", **kwargs: Any):
        super().__init__()
        self.estimator = create_estimator(estimator, form=form, temperature=temperature, top_k=top_k,
                                          num_projections=num_projections, fd_step=FD_STEP, projection=projection)
        if not self.estimator.input_grad:
            raise UsageError(f"estimator {estimator!r} runs the student itself, which torchdistill's forward "
                             "process does: use label, teacher_top1, top_k, all or projection")
        self.generator, self.module_path = _generator(seed), module_path

    def forward(self, student_io_dict: dict, teacher_io_dict: dict, targets: Any, *args: Any, **kwargs: Any) -> Tensor:
        s_logits = _outputs(student_io_dict, self.module_path, "student")
        t_out = _outputs(teacher_io_dict, self.module_path, "teacher")
        graph = getattr(t_out, "jacmatch_graph", None)
        if graph is None:
            raise UsageError(f"the teacher's output carries no graph to its input: set the teacher's forward_proc "
                             f"to {TEACHER_FORWARD!r} in the YAML")
        xt, t_logits = graph
        with torch.enable_grad():
            side = self.estimator.teacher_side(None, xt.detach(), xt, t_logits, targets, self.generator, False)
            side = {k: v.detach() for k, v in side.items()}
        return self.estimator.loss(None, _student_input(s_logits), s_logits, side, None)

    def extra_repr(self) -> str:
        return f"estimator={self.estimator.name!r}, form={self.estimator.form!r}"


@register_mid_level_loss(key="jacmatch.KDLoss")
class KnowledgeDistillation(nn.Module):
    """τ²·KL(softmax(z_T/τ) ‖ softmax(z_S/τ)) (or ``form='mse'`` on logits), as jacmatch computes it."""

    def __init__(self, temperature: float = 8.0, form: str = "kl", module_path: str = ".", **kwargs: Any):
        super().__init__()
        self.temperature, self.form, self.module_path = temperature, form, module_path

    def forward(self, student_io_dict: dict, teacher_io_dict: dict, targets: Any, *args: Any, **kwargs: Any) -> Tensor:
        return kd_loss(_outputs(student_io_dict, self.module_path, "student"),
                       _outputs(teacher_io_dict, self.module_path, "teacher").detach(), self.temperature, self.form)


@register_mid_level_loss(key="jacmatch.JacobianPenalty")
class JacobianNormPenalty(nn.Module):
    """Proposition 2's penalty on the student's input Jacobian (``form`` ce or sq)."""

    def __init__(self, form: str = "ce", num_projections: int = 1, projection: str = PROJECTION,
                 seed: int | None = None, module_path: str = ".", **kwargs: Any):
        super().__init__()
        self.term = JacobianPenalty(1.0, form, num_projections, projection)
        self.generator, self.module_path = _generator(seed), module_path

    def forward(self, student_io_dict: dict, teacher_io_dict: dict, targets: Any, *args: Any, **kwargs: Any) -> Tensor:
        logits = _outputs(student_io_dict, self.module_path, "student")
        return self.term.value(_student_input(logits), logits, targets, self.generator)
