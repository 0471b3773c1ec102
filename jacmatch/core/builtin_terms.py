"""The built-in terms of the transfer objective (docs/method.md, "Losses"), each a class
and, beside it, its registration: the ObjectiveConfig weight that turns it on and how the
config builds it (:func:`~jacmatch.core.terms.register_term`). The registrations run in
this file's order, which is the objective's: ce, kd, jm, at, at_jm, penalty.

Each term computes its value in ``from_step``; its ``value``, for plain tensors, names its
arguments and maps them onto a :class:`~jacmatch.core.terms.Step`, so a loss has one code path.
Called in a user's own loop with plain tensors, a term returns its weighted value::

    kd = KDLoss(1.0, temperature=8.0)
    jm = JacobianMatchingLoss(10.0, estimator="teacher_top1")
    x.requires_grad_()
    zs = student(x)
    loss = F.cross_entropy(zs, y) + kd(zs, teacher(x)) + jm(x, zs, teacher)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UsageError
from . import jacobian as J
from .estimators import FD_STEP, PROJECTION, create_estimator
from .losses import attention_map, attention_transfer_loss, jacobian_matching_loss, jacobian_penalty, kd_loss
from .terms import Needs, Step, TeacherTargets, Term, register_term, split_layers, teacher_targets

__all__ = ["CrossEntropyLoss", "KDLoss", "JacobianMatchingLoss", "AttentionTransferLoss", "AttentionJacobianLoss",
           "JacobianPenalty", "NoiseTrainingLoss", "NoisyDistillationLoss"]


class CrossEntropyLoss(Term):
    """α · CE(y, S(x))."""

    key = "ce"

    def describe(self):
        return "CE"

    def value(self, logits: Tensor, labels: Tensor) -> Tensor:
        return self.from_step(Step.of(logits=logits, y=labels))

    def from_step(self, step):
        return F.cross_entropy(step.logits, step.y_soft if step.y_soft is not None else step.y)


@register_term("alpha")
def _cross_entropy(cfg) -> Term:
    """α: cross-entropy on labels, on noisy inputs when ``noise_sigma`` > 0 (Prop. 2's left side)."""
    return NoiseTrainingLoss(cfg.alpha, **_noise(cfg)) if cfg.noise_sigma else CrossEntropyLoss(cfg.alpha)


class KDLoss(Term):
    """β · activation matching: τ²·KL(softmax(z_T/τ) ‖ softmax(z_S/τ)), or squared error on logits."""

    key = "kd"
    needs = Needs(teacher=True, teacher_targets=True, compares_outputs=True)

    def __init__(self, weight: float = 1.0, temperature: float = 8.0, form: str = "kl"):
        super().__init__(weight)
        self.temperature, self.form = temperature, form

    def value(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return self.from_step(Step.of(logits=student_logits, targets=TeacherTargets(teacher_logits)))

    def from_step(self, step):
        return kd_loss(step.logits, step.targets.logits, self.temperature, self.form)

    def extra_repr(self):
        return f"weight={self.weight:g}, temperature={self.temperature:g}, form={self.form!r}"

    def describe(self):
        return f"KD (τ = {self.temperature:g}" + (f", {self.form}" if self.form != "kl" else "") + ")"


@register_term("beta")
def _distillation(cfg) -> Term:
    """β: activation matching, on noisy inputs when ``noise_sigma`` > 0 (Prop. 1's left side)."""
    kd: dict[str, Any] = {"temperature": cfg.temperature, "form": cfg.kd_form}
    return NoisyDistillationLoss(cfg.beta, **_noise(cfg), **kd) if cfg.noise_sigma else KDLoss(cfg.beta, **kd)


class JacobianMatchingLoss(Term):
    """γ · Jacobian matching, estimated by a registered estimator (``teacher_top1``,
    ``label``, ``top_k``, ``all``, ``projection``, ``input_jvp``, ``input_fd``)."""

    key = "jm"
    needs = Needs(teacher=True, teacher_targets=True, chunk_teacher=True, compares_outputs=True, jacobian=True)

    def __init__(self, weight: float = 10.0, estimator: str = "teacher_top1", form: str = "normalized",
                 temperature: float = 8.0, top_k: int = 3, num_projections: int = 1, fd_step: float = FD_STEP,
                 projection: str = PROJECTION):
        super().__init__(weight)
        self.estimator = create_estimator(estimator, form=form, temperature=temperature, top_k=top_k,
                                          num_projections=num_projections, fd_step=fd_step, projection=projection)
        self.needs = replace(type(self).needs, input_grad=self.estimator.input_grad,
                             own_student_forward=self.estimator.own_student_forward)

    def rows_per_sample(self, num_classes):
        return self.estimator.rows_per_sample(num_classes)

    def dead_student(self):
        dead = self.estimator.dead  # (reading the flag syncs a GPU)
        return f"the student's input Jacobian ({self.estimator.name})" if dead is not None and bool(dead) else None

    def teacher_needs_graph(self, full_jacobian):
        return self.estimator.teacher_needs_graph(full_jacobian)

    def teacher_forward(self, teacher, xt, generator, full_jacobian):
        return self.estimator.teacher_forward(teacher, xt, generator, full_jacobian)

    def teacher_side(self, side):
        return self.estimator.teacher_side(side.teacher, side.x, side.xt, side.logits, side.y,
                                           side.generator, side.full_jacobian)

    def contract(self, targets, x, generator):
        return self.estimator.contract(targets, x, generator)

    def student_forward(self, student, xs, targets):
        return self.estimator.student_forward(student, xs, targets)

    def value(self, inputs: Tensor, student_logits: Tensor, teacher: Callable[[Tensor], Tensor],
                labels: Tensor | None = None, *, student: Callable[[Tensor], Tensor] | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        """``inputs`` require grad and ``student_logits`` were computed from them; the
        teacher's side is taken here, without a graph to its parameters."""
        targets = teacher_targets(teacher, [self], inputs, labels, generator=generator)
        tangent = None
        if not self.needs.input_grad:
            if student is None:
                raise UsageError(f"estimator {self.estimator.name!r} runs the student itself: pass student=")
            found = self.student_forward(student, inputs, targets.of(self))
            tangent = found[1] if found is not None else None
        return self.from_step(Step.of(x=inputs, y=labels, logits=student_logits, student=student, teacher=teacher,
                                      targets=targets, tangent=tangent, generator=generator))

    def from_step(self, step):
        return self.estimator.loss(step.student, step.xs, step.logits, step.targets.of(self), step.tangent)

    def extra_repr(self):
        e = self.estimator
        return f"weight={self.weight:g}, estimator={e.name!r}, form={e.form!r}"

    def describe(self):
        return f"JM ({self.estimator.form}, {self.estimator.name})"


@register_term("gamma")
def _jacobian_matching(cfg) -> Term:
    return JacobianMatchingLoss(cfg.gamma, cfg.jm_outputs, cfg.jm_form, cfg.temperature, cfg.top_k,
                                cfg.num_projections, cfg.fd_step, cfg.projection)


class AttentionTransferLoss(Term):
    """δ · attention transfer: ``Σ_j ‖Q̂_S^j − Q̂_T^j‖₂`` at paired layers."""

    key = "at"
    needs = Needs(teacher=True, teacher_targets=True)

    def __init__(self, weight: float = 1.0, layers: Sequence[str] = ()):
        super().__init__(weight)
        if not layers:
            raise UsageError("attention transfer needs layers, e.g. ['layer2:layer3'] (student:teacher)")
        student_layers, teacher_layers = split_layers(layers)
        self.needs = replace(type(self).needs, student_layers=student_layers, teacher_layers=teacher_layers)

    def value(self, student_features: Sequence[Tensor], teacher_features: Sequence[Tensor]) -> Tensor:
        return self.from_step(self._plain_step(student_features, teacher_features, "at"))

    def _plain_step(self, student_features: Sequence[Tensor], teacher_tensors: Sequence[Tensor], name: str,
                    x: Tensor | None = None) -> Step:
        """A step holding, for each of the term's layers, the student's features and the
        teacher's tensor of that layer (as its pass would have given them)."""
        layers = self.needs.student_layers
        if not len(student_features) == len(teacher_tensors) == len(layers):
            raise UsageError(f"{type(self).__name__} was built for {len(layers)} layers {list(layers)}: pass as many "
                             f"student and teacher tensors, got {len(student_features)} and {len(teacher_tensors)}")
        targets = TeacherTargets(torch.empty(0), {self.key: {f"{name}{j}": t for j, t in enumerate(teacher_tensors)}})
        return Step.of(x=x, features=dict(zip(layers, student_features)), targets=targets)

    def teacher_side(self, side):
        return {f"at{j}": side.features[n].detach() for j, n in enumerate(self.needs.teacher_layers)}

    def from_step(self, step):
        return attention_transfer_loss([step.features[n] for n in self.needs.student_layers],
                                       [step.targets.of(self)[f"at{j}"] for j in range(len(self.needs.student_layers))])


@register_term("delta")
def _attention_transfer(cfg) -> Term:
    return AttentionTransferLoss(cfg.delta, cfg.at_layers)


def _attention_gradient(features: Tensor, inputs: Tensor, create_graph: bool) -> Tensor:
    """The input-gradient of an attention map's largest entry, per sample."""
    scalar = attention_map(features).flatten(1).amax(dim=1)
    return torch.autograd.grad(scalar.sum(), inputs, create_graph=create_graph, retain_graph=True)[0]


class AttentionJacobianLoss(AttentionTransferLoss):
    """δ_J · matching the input-gradients of the attention maps' largest entries (normalized)."""

    key = "at_jm"
    needs = replace(AttentionTransferLoss.needs, input_grad=True, chunk_teacher=True, jacobian=True)

    def rows_per_sample(self, num_classes):
        return len(self.needs.student_layers)

    def teacher_needs_graph(self, full_jacobian):
        return True

    def teacher_side(self, side):
        return {f"at_jac{j}": _attention_gradient(side.features[n], side.xt, False)
                for j, n in enumerate(self.needs.teacher_layers)}

    def value(self, inputs: Tensor, student_features: Sequence[Tensor],  # type: ignore[override]
                teacher_gradients: Sequence[Tensor]) -> Tensor:
        # The same layers and weight as AttentionTransferLoss; its inputs are the maps' gradients.
        return self.from_step(self._plain_step(student_features, teacher_gradients, "at_jac", inputs))

    def from_step(self, step):
        teacher = step.targets.of(self)
        return cast(Tensor, sum(jacobian_matching_loss(_attention_gradient(step.features[n], step.xs, True),
                                                       teacher[f"at_jac{j}"], "normalized")
                                for j, n in enumerate(self.needs.student_layers)))


@register_term("delta_jacobian")
def _attention_jacobians(cfg) -> Term:
    return AttentionJacobianLoss(cfg.delta_jacobian, cfg.at_layers)


class JacobianPenalty(Term):
    """λ · the Jacobian-norm penalty of Proposition 2: ``½‖∇ log Sˢ_y‖²`` (ce) or
    ``‖J_S‖²_F`` by random output projections (sq)."""

    key = "penalty"
    needs = Needs(input_grad=True, jacobian=True)

    def __init__(self, weight: float = 1.0, form: str = "ce", num_projections: int = 1, projection: str = PROJECTION):
        super().__init__(weight)
        self.form, self.num_projections, self.projection = form, num_projections, projection

    def rows_per_sample(self, num_classes):
        return 1 if self.form == "ce" else self.num_projections

    def value(self, inputs: Tensor, student_logits: Tensor, labels: Tensor,
                generator: torch.Generator | None = None) -> Tensor:
        return self.from_step(Step.of(x=inputs, logits=student_logits, y=labels, generator=generator))

    def from_step(self, step):
        inputs, logits = step.xs, step.logits
        if self.form == "ce":
            log_p = F.log_softmax(logits, dim=1)
            return jacobian_penalty(J.input_jacobian(log_p, inputs, step.y, create_graph=True), "ce")
        v = J.output_projections(inputs.shape[0], logits.shape[1], self.num_projections, generator=step.generator,
                                 dtype=logits.dtype, device=logits.device, kind=self.projection)
        rows = J.vector_jacobian_product(logits, inputs, v, create_graph=True)
        return jacobian_penalty(rows, "sq", multiple_outputs=True) / self.num_projections


@register_term("penalty")
def _penalty(cfg) -> Term:
    return JacobianPenalty(cfg.penalty, cfg.penalty_form, cfg.num_projections, cfg.projection)


def _noise(cfg) -> dict[str, Any]:
    return {"sigma": cfg.noise_sigma, "draws": cfg.noise_draws, "antithetic": cfg.noise_antithetic}


class _Noise(Term):
    needs = Needs(clean_forward=False)

    def __init__(self, weight: float = 1.0, sigma: float = 0.1, draws: int = 1, antithetic: bool = False):
        super().__init__(weight)
        self.sigma, self.draws, self.antithetic = sigma, draws, antithetic

    def extra_repr(self):
        return f"weight={self.weight:g}, sigma={self.sigma:g}, draws={self.draws}"

    def describe(self):
        return f"{self.key.upper()} on noise (σ = {self.sigma:g}, {self.draws} draws)"


class NoiseTrainingLoss(_Noise):
    """α · ``E_ξ CE(y, S(x+ξ))`` by Monte Carlo: Gaussian-noise training (left side of Prop. 2)."""

    key = "ce"

    def value(self, student: Callable[[Tensor], Tensor], inputs: Tensor, labels: Tensor,
                generator: torch.Generator | None = None) -> Tensor:
        return self.from_step(Step.of(x=inputs, y=labels, student=student, generator=generator))

    def from_step(self, step):
        _, logits = step.noisy(self.sigma, self.draws, self.antithetic)
        labels = step.y_soft if step.y_soft is not None else step.y
        return F.cross_entropy(logits, labels.repeat(self.draws, *([1] * (labels.dim() - 1))))


class NoisyDistillationLoss(_Noise):
    """β · ``E_ξ KD(T(x+ξ), S(x+ξ))`` by Monte Carlo: distillation on noisy inputs (left side of Prop. 1)."""

    key = "kd"
    needs = Needs(clean_forward=False, teacher=True, compares_outputs=True)

    def __init__(self, weight: float = 1.0, sigma: float = 0.1, draws: int = 1, antithetic: bool = False,
                 temperature: float = 8.0, form: str = "kl"):
        super().__init__(weight, sigma, draws, antithetic)
        self.temperature, self.form = temperature, form

    def value(self, student: Callable[[Tensor], Tensor], teacher: Callable[[Tensor], Tensor], inputs: Tensor,
                generator: torch.Generator | None = None) -> Tensor:
        return self.from_step(Step.of(x=inputs, student=student, teacher=teacher, generator=generator))

    def from_step(self, step):
        noisy, logits = step.noisy(self.sigma, self.draws, self.antithetic)
        with torch.no_grad():
            teacher_logits = step.teacher(noisy)
        return kd_loss(logits, teacher_logits, self.temperature, self.form)
