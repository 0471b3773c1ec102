"""Which Jacobians are matched, and how (docs/method.md, "Which Jacobians").

An estimator is a small registered class with three parts:

- the teacher's side (:meth:`Estimator.teacher_side`): per-sample tensors computed
  without a graph to the teacher's parameters, so that a trainer may cache them;
- for random estimators, how to contract a cached full teacher Jacobian with this
  step's draws (:meth:`Estimator.contract`);
- the student's side and the loss between the two (:meth:`Estimator.loss`).

``create_estimator("projection", num_projections=4)`` builds one by name;
``@register_estimator("name")`` adds one. Nothing outside this file branches on an
estimator's name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .._imports import import_callable, is_import_path
from ..errors import UsageError
from ..registry import Registry
from . import jacobian as J
from .losses import JM_FORMS, jacobian_matching_loss

__all__ = ["Estimator", "ESTIMATORS", "register_estimator", "create_estimator", "list_estimators", "PROJECTION", "FD_STEP"]

#: The registered Jacobian estimators, in registration order.
ESTIMATORS: Registry[type[Estimator]] = Registry("Jacobian estimator")

#: Output projections by default: the lowest variance measured (``jacmatch estimators``,
#: BENCHMARKS.md): rademacher for one projection, orthogonal for several.
PROJECTION = "auto"
#: The finite-difference step h by default: the smallest worst-case error in the measured
#: table (ReLU and smooth networks, float32; BENCHMARKS.md).
FD_STEP = 3e-4


def register_estimator(name: str) -> Callable[[type[Estimator]], type[Estimator]]:
    def wrap(cls: type[Estimator]) -> type[Estimator]:
        cls.name = name
        return ESTIMATORS.register(name, cls)
    return wrap


def list_estimators() -> list[str]:
    """The registered names, in registration order."""
    return ESTIMATORS.names()


def create_estimator(name: str, **options) -> Estimator:
    """The estimator registered as ``name``, or named by import path
    (``package.module:EstimatorClass``, an :class:`Estimator` subclass), as terms are."""
    if name in ESTIMATORS:
        return ESTIMATORS.get(name)(**options)
    if not is_import_path(name):
        raise UsageError(f"unknown Jacobian estimator {name!r}: use one of {list_estimators()}, or an import path "
                         "(package.module:EstimatorClass)")
    cls = import_callable(name, "Jacobian estimator", UsageError)
    if not (isinstance(cls, type) and issubclass(cls, Estimator)):
        raise UsageError(f"Jacobian estimator {name!r} is not a jacmatch Estimator subclass")
    if not cls.name:
        cls.name = name
    return cls(**options)


class Estimator:
    """Estimates the Jacobian-matching term ``Σ_c ‖∇T_c − ∇S_c‖²`` (in one of its forms)."""

    name = ""
    forms: tuple[str, ...] = JM_FORMS
    #: the student's side is a reverse-mode input gradient (its inputs must require grad)
    input_grad = True
    #: the student's logits come from a forward pass of the estimator's own (forward-mode AD)
    own_student_forward = False

    def __init__(self, form: str = "normalized", temperature: float = 8.0, top_k: int = 3,
                 num_projections: int = 1, fd_step: float = FD_STEP, projection: str = PROJECTION):
        if form not in self.forms:
            raise UsageError(f"jm_outputs={self.name!r} takes jm_form={' or '.join(self.forms)}, got {form!r}"
                             + (" (the ce form weights exact rows by teacher probabilities)" if form == "ce" else ""))
        self.form, self.temperature, self.top_k = form, temperature, top_k
        self.num_projections, self.fd_step = num_projections, fd_step
        self.projection = projection  # (a choice ObjectiveConfig checks; output_projections refuses others)

    def rows_per_sample(self, num_classes: int) -> int:
        """How many Jacobian rows (or products) one sample costs: for memory estimates."""
        return self.num_projections

    def teacher_needs_graph(self, full_jacobian: bool) -> bool:
        return True

    def teacher_forward(self, teacher: Callable, xt: Tensor, generator, full_jacobian: bool
                        ) -> tuple[Tensor, dict[str, Tensor]] | None:
        """A forward pass of the teacher of the estimator's own (forward-mode AD), or None."""
        return None

    def teacher_side(self, teacher: Callable, x: Tensor, xt: Tensor, logits: Tensor, y: Tensor,
                     generator, full_jacobian: bool) -> dict[str, Tensor]:
        raise NotImplementedError

    def contract(self, targets: dict[str, Tensor], x: Tensor, generator) -> dict[str, Tensor]:
        """Targets read from a cache, made ready for this step (draws contracted)."""
        return targets

    def student_forward(self, student: Callable, xs: Tensor, targets: dict[str, Tensor]
                        ) -> tuple[Tensor, Tensor] | None:
        """(logits, tangent) from a forward pass of the estimator's own, or None."""
        return None

    def loss(self, student: Callable | None, xs: Tensor, logits: Tensor, targets: dict[str, Tensor],
             tangent: Tensor | None) -> Tensor:
        raise NotImplementedError

    #: Whether the student's side of the last :meth:`loss` was zero for every sample (a
    #: tensor, read without a device sync until asked): a dead student, which the Jacobian
    #: term cannot train (its ReLUs all off, say).
    dead: Tensor | None = None

    def _observe(self, student_side: Tensor) -> Tensor:
        self.dead = student_side.detach().flatten(1).abs().amax(dim=1).eq(0).all()
        return student_side


# ---- exact rows at chosen outputs ---------------------------------------------------------


class _Rows(Estimator):
    """Exact Jacobian rows at one or several outputs per sample."""

    def index(self, teacher_logits: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def rows_per_sample(self, num_classes: int) -> int:
        return 1

    def _outputs(self, logits: Tensor) -> Tensor:
        """Logits for the sq and normalized forms; log softmax(z/τ) for the ce form."""
        return F.log_softmax(logits / self.temperature, dim=1) if self.form == "ce" else logits

    def teacher_side(self, teacher, x, xt, logits, y, generator, full_jacobian):
        # Deterministic: the same rows serve a cache (full_jacobian) and a single step.
        index = self.index(logits.detach(), y)
        out = {"index": index, "jac": J.input_jacobian(self._outputs(logits), xt, index)}
        if self.form == "ce":
            out["probs"] = F.softmax(logits.detach() / self.temperature, dim=1).gather(1, index)
        return out

    def loss(self, student, xs, logits, targets, tangent):
        s_jac = self._observe(J.input_jacobian(self._outputs(logits), xs, targets["index"], create_graph=True))
        return jacobian_matching_loss(s_jac, targets["jac"], self.form, multiple_outputs=True,
                                      teacher_probs=targets.get("probs"))


@register_estimator("label")
class LabelRow(_Rows):
    """The ground-truth class (cheap; needs labels)."""

    def index(self, teacher_logits, y):
        return J.label(y)[:, None]


@register_estimator("teacher_top1")
class TeacherTop1Row(_Rows):
    """The teacher's predicted class."""

    def index(self, teacher_logits, y):
        return J.teacher_top1(teacher_logits)[:, None]


@register_estimator("top_k")
class TopKRows(_Rows):
    """The teacher's k largest outputs."""

    def rows_per_sample(self, num_classes):
        return self.top_k

    def index(self, teacher_logits, y):
        return J.teacher_top_k(teacher_logits, self.top_k)


@register_estimator("all")
class AllRows(_Rows):
    """Every output: k vector-Jacobian products, for small k."""

    def rows_per_sample(self, num_classes):
        return num_classes

    def index(self, teacher_logits, y):
        return J.all_outputs(teacher_logits)


# ---- random estimators of ‖J_T − J_S‖²_F ---------------------------------------------------


class _Drawn(Estimator):
    """Random draws per step. For a cache, the teacher's side is its full Jacobian, which
    each step contracts with its own draws."""

    forms: tuple[str, ...] = ("normalized", "sq")  # the ce form weights exact rows by probabilities

    def draws(self, x: Tensor, num_outputs: int, generator) -> Tensor:
        raise NotImplementedError

    def contract_full(self, full_jac: Tensor, draws: Tensor) -> Tensor:
        raise NotImplementedError

    def teacher_drawn(self, teacher, x, xt, logits, draws) -> Tensor:
        raise NotImplementedError

    def teacher_side(self, teacher, x, xt, logits, y, generator, full_jacobian):
        if full_jacobian:
            return {"full_jac": J.input_jacobian(logits, xt, J.all_outputs(logits.detach()))}
        draws = self.draws(x, logits.shape[1], generator)
        return {"draws": draws, "drawn": self.teacher_drawn(teacher, x, xt, logits, draws)}

    def contract(self, targets, x, generator):
        full_jac = targets["full_jac"]
        draws = self.draws(x, full_jac.shape[1], generator)
        return {**targets, "draws": draws, "drawn": self.contract_full(full_jac, draws)}


@register_estimator("projection")
class OutputProjection(_Drawn):
    """``E_v ‖vᵀ(J_T − J_S)‖² = ‖J_T − J_S‖²_F`` for random v with ``E[v vᵀ] = I_k``
    (``projection``: gaussian, sphere, orthogonal or rademacher): one VJP per projection
    whatever k is."""

    def draws(self, x, num_outputs, generator):
        return J.output_projections(x.shape[0], num_outputs, self.num_projections, generator=generator,
                                    dtype=x.dtype, device=x.device, kind=self.projection)

    def contract_full(self, full_jac, draws):
        flat = full_jac.flatten(start_dim=2)
        return torch.einsum("bpk,bkd->bpd", draws, flat).reshape(*draws.shape[:2], *full_jac.shape[2:])

    def teacher_drawn(self, teacher, x, xt, logits, draws):
        return J.vector_jacobian_product(logits, xt, draws)

    def loss(self, student, xs, logits, targets, tangent):
        draws = targets["draws"]
        s_drawn = self._observe(J.vector_jacobian_product(logits, xs, draws, create_graph=True))
        # The mean over draws estimates ‖J_T − J_S‖²_F.
        return jacobian_matching_loss(s_drawn, targets["drawn"], self.form, multiple_outputs=True) / draws.shape[1]


class _InputDirections(_Drawn):
    """``E_u ‖(J_T − J_S)u‖² = ‖J_T − J_S‖²_F`` for ``u ~ N(0, I_D)``: the k-vectors J·u
    play the rows, so only the sq form applies."""

    forms = ("sq",)
    input_grad = False

    def draws(self, x, num_outputs, generator):
        return J.input_directions(x, self.num_projections, generator=generator)

    def contract_full(self, full_jac, draws):
        return torch.einsum("bkd,bpd->bpk", full_jac.flatten(start_dim=2), draws.flatten(start_dim=2))

    def loss(self, student, xs, logits, targets, tangent):
        return (targets["drawn"] - self._observe(tangent)).pow(2).sum(dim=2).mean(dim=1).mean()


@register_estimator("input_jvp")
class InputJVP(_InputDirections):
    """Forward-mode J·u for teacher and student: no input gradient, no double backward."""

    own_student_forward = True

    def teacher_needs_graph(self, full_jacobian):
        return full_jacobian

    def teacher_forward(self, teacher, xt, generator, full_jacobian):
        if full_jacobian:
            return None
        draws = self.draws(xt, 0, generator)
        logits, drawn = J.jacobian_vector_product(teacher, xt, draws)
        return logits[:, 0], {"draws": draws, "drawn": drawn.detach()}

    def teacher_side(self, teacher, x, xt, logits, y, generator, full_jacobian):
        return super().teacher_side(teacher, x, xt, logits, y, generator, True) if full_jacobian else {}

    def student_forward(self, student, xs, targets):
        logits, tangent = J.jacobian_vector_product(student, xs, targets["draws"])
        return logits[:, 0], tangent


@register_estimator("input_fd")
class InputFiniteDifference(_InputDirections):
    """``(f(x + hu) − f(x)) / h``: Proposition 1 read right to left, no double backward."""

    def teacher_needs_graph(self, full_jacobian):
        return full_jacobian

    def teacher_drawn(self, teacher, x, xt, logits, draws):
        with torch.no_grad():
            return J.finite_difference_jvp(teacher, x, draws, step=self.fd_step, outputs=logits.detach())

    def loss(self, student, xs, logits, targets, tangent):
        tangent = J.finite_difference_jvp(student, xs.detach(), targets["draws"], step=self.fd_step, outputs=logits)
        return super().loss(student, xs, logits, targets, tangent)

