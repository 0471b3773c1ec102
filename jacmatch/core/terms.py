"""The terms of the transfer objective as ``nn.Module`` s (docs/method.md, "Losses").

Each term is a small class with a weight. Called in a user's own training loop with plain
tensors and modules, it returns its **weighted** value, ``weight · value``::

    kd = KDLoss(1.0, temperature=8.0)
    jm = JacobianMatchingLoss(10.0, estimator="teacher_top1")
    x.requires_grad_()
    zs = student(x)
    loss = F.cross_entropy(zs, y) + kd(zs, teacher(x)) + jm(x, zs, teacher)

:meth:`Term.value` takes the same arguments and returns the unweighted value.

Each term also declares what it needs from one training step (input gradients, feature
taps, teacher targets) and computes its value from a :class:`Step`
(:meth:`Term.from_step`), which is how :class:`~jacmatch.core.objective.TransferObjective`
composes them: one student forward pass, one teacher pass (cacheable), every term.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UsageError
from . import jacobian as J
from .estimators import FD_STEP, PROJECTION, create_estimator
from .losses import (attention_map, attention_transfer_loss, gaussian_noise, jacobian_matching_loss,
                     jacobian_penalty, kd_loss, noise_training_loss, noisy_distillation_loss)
from .outputs import logits_of

__all__ = ["Term", "Step", "TeacherSide", "TeacherTargets", "CrossEntropyLoss", "KDLoss", "JacobianMatchingLoss",
           "AttentionTransferLoss", "AttentionJacobianLoss", "JacobianPenalty", "NoiseTrainingLoss",
           "NoisyDistillationLoss", "FeatureTaps", "teacher_targets", "BUILT_IN_TERMS", "register_term"]


class FeatureTaps(contextlib.AbstractContextManager):
    """Record the outputs of named submodules with forward hooks (for attention transfer).

    >>> with FeatureTaps(model, ["layer2"]) as taps:
    ...     model(x)
    >>> taps["layer2"]
    """

    def __init__(self, model: nn.Module, names: Sequence[str]):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise UsageError(f"no module named {missing} in {type(model).__name__}; "
                             f"available: {[n for n in modules if n][:30]}")
        self.features: dict[str, Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def record(_module, _inputs, output):
            self.features[name] = output
        return record

    def __getitem__(self, name: str) -> Tensor:
        return self.features[name]

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        return None


def _split_layers(at_layers: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``["student_module:teacher_module", "same_name", ...]`` -> (student names, teacher names)."""
    pairs = [p.split(":", 1) if ":" in p else (p, p) for p in at_layers]
    return tuple(s for s, _ in pairs), tuple(t for _, t in pairs)


@dataclass
class TeacherTargets:
    """The teacher's side of a batch, per sample: its logits, and what each term took from
    its pass (by the term's key: a term's own tensors never meet another's). Selecting
    samples (``targets[index]``) gives the same structure, which is what a cache stores."""

    logits: Tensor
    terms: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    def of(self, term: Term) -> dict[str, Tensor]:
        """What ``term`` took from the teacher's pass (empty when nothing)."""
        return self.terms.get(term.key, {})

    def __getitem__(self, index: Tensor) -> TeacherTargets:
        return TeacherTargets(self.logits[index], {k: {n: v[index] for n, v in d.items()} for k, d in self.terms.items()})

    def tensors(self) -> dict[tuple[str, str], Tensor]:
        """Every tensor, by (term key, name); the logits under ("", "logits")."""
        return {("", "logits"): self.logits, **{(k, n): v for k, d in self.terms.items() for n, v in d.items()}}

    @classmethod
    def from_tensors(cls, tensors: dict[tuple[str, str], Tensor]) -> TeacherTargets:
        terms: dict[str, dict[str, Tensor]] = {}
        for (key, name), value in tensors.items():
            if key:
                terms.setdefault(key, {})[name] = value
        return cls(tensors[("", "logits")], terms)

    @classmethod
    def cat(cls, parts: Sequence[TeacherTargets]) -> TeacherTargets:
        """The targets of consecutive chunks of a batch, as one."""
        flat = [p.tensors() for p in parts]
        return cls.from_tensors({k: torch.cat([f[k] for f in flat]) for k in flat[0]})


@dataclass
class TeacherSide:
    """What the teacher's pass offers the terms: inputs, logits, tapped features."""

    teacher: Callable[[Tensor], Tensor]
    x: Tensor
    xt: Tensor                   # x, requiring grad when a term needs the teacher's graph
    logits: Tensor
    y: Tensor | None
    features: dict[str, Tensor]
    generator: torch.Generator | None
    full_jacobian: bool


@dataclass
class Step:
    """What the student's pass of one step offers the terms."""

    x: Tensor                    # the batch
    y: Tensor | None
    xs: Tensor                   # x as the student saw it (requiring grad when a term needs it)
    logits: Tensor | None        # None when no term needs a clean forward pass
    student: Callable[[Tensor], Tensor]
    teacher: Callable[[Tensor], Tensor] | None
    targets: TeacherTargets | None  # the teacher's side (None without a teacher)
    features: dict[str, Tensor]
    tangent: Tensor | None = None
    generator: torch.Generator | None = None
    y_soft: Tensor | None = None  # soft labels [B, K] (mixup, CutMix): cross-entropy takes them; ``y`` is their top class
    _noisy: dict = field(default_factory=dict)

    def noisy(self, sigma: float, draws: int, antithetic: bool) -> tuple[Tensor, Tensor]:
        """``x + ξ`` for M draws and the student's logits there, drawn once per step and
        shared by the noise terms (noise training and noisy distillation see one draw)."""
        key = (sigma, draws, antithetic)
        if key not in self._noisy:
            noisy = gaussian_noise(self.x, sigma, draws, antithetic=antithetic, generator=self.generator)
            self._noisy[key] = (noisy, self.student(noisy))
        return self._noisy[key]

    def noisy_logits(self) -> Tensor | None:
        """The student's logits on the first noisy draw of this step, if any was taken."""
        return next(iter(self._noisy.values()))[1][: self.x.shape[0]] if self._noisy else None


class Term(nn.Module):
    """One weighted term ``weight · value``; ``key`` names it in the objective's terms.

    The defaults are ObjectiveConfig's: ``[CrossEntropyLoss(), KDLoss(), JacobianMatchingLoss()]``
    is CE + KD (τ = 8) + 10·JM, the objective that ``ObjectiveConfig()`` builds.

    A new loss is one subclass in a file of one's own: a ``key``, the flags of what it needs
    (``needs_input_grad``, ``needs_teacher``, ``needs_teacher_targets``, ...), ``value`` for
    plain tensors and ``from_step`` for a :class:`Step` (its ``logits``, ``xs``, ``y``,
    ``targets.logits``, ``targets.of(self)``, ``features``). ``objective.terms: {"my_file:MyLoss": {weight: 0.5}}``
    adds it to a run (tests/user_terms.py is one).
    """

    key = ""
    needs_input_grad = False       # the student's inputs must require grad
    needs_teacher = False          # a teacher must be given
    needs_teacher_targets = False  # the teacher's pass on the clean batch (cacheable)
    needs_clean_forward = True     # the student's forward pass on the clean batch
    chunk_teacher = False          # the teacher's pass is heavy: take it in chunks
    compares_outputs = False       # teacher and student outputs are compared one to one (same class count)
    owns_student_forward = False   # the term runs the student's forward pass itself (forward-mode JVPs)
    student_layers: tuple[str, ...] = ()
    teacher_layers: tuple[str, ...] = ()

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = float(weight)  # (its range is ObjectiveConfig's check)

    def rows_per_sample(self, num_classes: int) -> int:
        """Jacobian rows (or products) one sample costs this term: for memory estimates."""
        return 0

    def dead_student(self) -> str | None:
        """After a step: what this term found of the student's input Jacobian, when it was zero
        for every sample of the batch (the term then gives the student no gradient); else None."""
        return None

    def teacher_needs_graph(self, full_jacobian: bool) -> bool:
        return False

    def teacher_forward(self, teacher, xt: Tensor, generator, full_jacobian: bool):
        """A teacher forward pass of the term's own, or None for the plain one."""
        return None

    def teacher_targets(self, side: TeacherSide) -> dict[str, Tensor]:
        """This term's own tensors from the teacher's pass (see :class:`TeacherTargets`)."""
        return {}

    def from_cache(self, targets: dict[str, Tensor], x: Tensor, generator) -> dict[str, Tensor]:
        """This term's cached tensors, for this step (random estimators draw here)."""
        return targets

    def student_forward(self, student, xs: Tensor, targets: dict[str, Tensor]):
        """(logits, tangent) from a student forward pass of the term's own, or None."""
        return None

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """``weight · value``: what a training loop adds to its loss (arguments as :meth:`value`)."""
        return self.weight * self.value(*args, **kwargs)

    def value(self, *args: Any, **kwargs: Any) -> Tensor:
        """The term's unweighted value from plain tensors and modules."""
        raise NotImplementedError

    def from_step(self, step: Step) -> Tensor:
        """The unweighted value from one step of :class:`~jacmatch.core.objective.TransferObjective`."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"weight={self.weight:g}"


class CrossEntropyLoss(Term):
    """α · CE(y, S(x))."""

    key = "ce"

    def value(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits, labels)

    def from_step(self, step):
        return self.value(step.logits, step.y_soft if step.y_soft is not None else step.y)


class KDLoss(Term):
    """β · activation matching: τ²·KL(softmax(z_T/τ) ‖ softmax(z_S/τ)), or squared error on logits."""

    key = "kd"
    needs_teacher = needs_teacher_targets = compares_outputs = True

    def __init__(self, weight: float = 1.0, temperature: float = 8.0, form: str = "kl"):
        super().__init__(weight)
        self.temperature, self.form = temperature, form

    def value(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return kd_loss(student_logits, teacher_logits, self.temperature, self.form)

    def from_step(self, step):
        return self.value(step.logits, step.targets.logits)

    def extra_repr(self):
        return f"weight={self.weight:g}, temperature={self.temperature:g}, form={self.form!r}"


class JacobianMatchingLoss(Term):
    """γ · Jacobian matching, estimated by a registered estimator (``teacher_top1``,
    ``label``, ``top_k``, ``all``, ``projection``, ``input_jvp``, ``input_fd``)."""

    key = "jm"
    needs_teacher = needs_teacher_targets = chunk_teacher = compares_outputs = True

    def __init__(self, weight: float = 10.0, estimator: str = "teacher_top1", form: str = "normalized",
                 temperature: float = 8.0, top_k: int = 3, num_projections: int = 1, fd_step: float = FD_STEP,
                 projection: str = PROJECTION):
        super().__init__(weight)
        self.estimator = create_estimator(estimator, form=form, temperature=temperature, top_k=top_k,
                                          num_projections=num_projections, fd_step=fd_step, projection=projection)
        self.needs_input_grad = self.estimator.student_input_grad
        self.owns_student_forward = self.estimator.owns_student_forward

    def rows_per_sample(self, num_classes):
        return self.estimator.rows_per_sample(num_classes)

    def dead_student(self):
        dead = self.estimator.dead  # (reading the flag syncs a GPU)
        return f"the student's input Jacobian ({self.estimator.name})" if dead is not None and bool(dead) else None

    def teacher_needs_graph(self, full_jacobian):
        return self.estimator.teacher_needs_graph(full_jacobian)

    def teacher_forward(self, teacher, xt, generator, full_jacobian):
        return self.estimator.teacher_forward(teacher, xt, generator, full_jacobian)

    def teacher_targets(self, side):
        return self.estimator.teacher_side(side.teacher, side.x, side.xt, side.logits, side.y,
                                           side.generator, side.full_jacobian)

    def from_cache(self, targets, x, generator):
        return self.estimator.contract(targets, x, generator)

    def student_forward(self, student, xs, targets):
        return self.estimator.student_forward(student, xs, targets)

    def value(self, inputs: Tensor, student_logits: Tensor, teacher: Callable[[Tensor], Tensor],
                labels: Tensor | None = None, *, student: Callable[[Tensor], Tensor] | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        """``inputs`` require grad and ``student_logits`` were computed from them; the
        teacher's side is taken here, without a graph to its parameters."""
        targets = teacher_targets(teacher, [self], inputs, labels, generator=generator).of(self)
        tangent = None
        if not self.needs_input_grad:
            if student is None:
                raise UsageError(f"estimator {self.estimator.name!r} runs the student itself: pass student=")
            found = self.student_forward(student, inputs, targets)
            tangent = found[1] if found is not None else None
        return self.estimator.loss(student, inputs, student_logits, targets, tangent)

    def from_step(self, step):
        return self.estimator.loss(step.student, step.xs, step.logits, step.targets.of(self), step.tangent)

    def extra_repr(self):
        e = self.estimator
        return f"weight={self.weight:g}, estimator={e.name!r}, form={e.form!r}"


class AttentionTransferLoss(Term):
    """δ · attention transfer: ``Σ_j ‖Q̂_S^j − Q̂_T^j‖₂`` at paired layers."""

    key = "at"
    needs_teacher = needs_teacher_targets = True

    def __init__(self, weight: float = 1.0, layers: Sequence[str] = ()):
        super().__init__(weight)
        if not layers:
            raise UsageError("attention transfer needs layers, e.g. ['layer2:layer3'] (student:teacher)")
        self.student_layers, self.teacher_layers = _split_layers(layers)

    def value(self, student_features: Sequence[Tensor], teacher_features: Sequence[Tensor]) -> Tensor:
        return attention_transfer_loss(student_features, teacher_features)

    def teacher_targets(self, side):
        return {f"at{j}": side.features[n].detach() for j, n in enumerate(self.teacher_layers)}

    def from_step(self, step):
        return self.value([step.features[n] for n in self.student_layers],
                    [step.targets.of(self)[f"at{j}"] for j in range(len(self.student_layers))])


def _attention_gradient(features: Tensor, inputs: Tensor, create_graph: bool) -> Tensor:
    """The input-gradient of an attention map's largest entry, per sample."""
    scalar = attention_map(features).flatten(1).amax(dim=1)
    return torch.autograd.grad(scalar.sum(), inputs, create_graph=create_graph, retain_graph=True)[0]


class AttentionJacobianLoss(AttentionTransferLoss):
    """δ_J · matching the input-gradients of the attention maps' largest entries (normalized)."""

    key = "at_jm"
    needs_input_grad = chunk_teacher = True

    def rows_per_sample(self, num_classes):
        return len(self.student_layers)

    def teacher_needs_graph(self, full_jacobian):
        return True

    def teacher_targets(self, side):
        return {f"at_jac{j}": _attention_gradient(side.features[n], side.xt, False)
                for j, n in enumerate(self.teacher_layers)}

    def value(self, inputs: Tensor, student_features: Sequence[Tensor],  # type: ignore[override]
                teacher_gradients: Sequence[Tensor]) -> Tensor:
        # The same layers and weight as AttentionTransferLoss; its inputs are the maps' gradients.
        return cast(Tensor, sum(jacobian_matching_loss(_attention_gradient(f, inputs, True), t, "normalized")
                                for f, t in zip(student_features, teacher_gradients)))

    def from_step(self, step):
        return self.value(step.xs, [step.features[n] for n in self.student_layers],
                    [step.targets.of(self)[f"at_jac{j}"] for j in range(len(self.student_layers))])


class JacobianPenalty(Term):
    """λ · the Jacobian-norm penalty of Proposition 2: ``½‖∇ log Sˢ_y‖²`` (ce) or
    ``‖J_S‖²_F`` by random output projections (sq)."""

    key = "penalty"
    needs_input_grad = True

    def __init__(self, weight: float = 1.0, form: str = "ce", num_projections: int = 1, projection: str = PROJECTION):
        super().__init__(weight)
        self.form, self.num_projections, self.projection = form, num_projections, projection

    def rows_per_sample(self, num_classes):
        return 1 if self.form == "ce" else self.num_projections

    def value(self, inputs: Tensor, student_logits: Tensor, labels: Tensor,
                generator: torch.Generator | None = None) -> Tensor:
        if self.form == "ce":
            log_p = F.log_softmax(student_logits, dim=1)
            return jacobian_penalty(J.input_jacobian(log_p, inputs, labels, create_graph=True), "ce")
        v = J.output_projections(inputs.shape[0], student_logits.shape[1], self.num_projections, generator=generator,
                                 dtype=student_logits.dtype, device=student_logits.device, kind=self.projection)
        rows = J.vector_jacobian_product(student_logits, inputs, v, create_graph=True)
        return jacobian_penalty(rows, "sq", multiple_outputs=True) / self.num_projections

    def from_step(self, step):
        return self.value(step.xs, step.logits, step.y, step.generator)


class _Noise(Term):
    needs_clean_forward = False

    def __init__(self, weight: float = 1.0, sigma: float = 0.1, draws: int = 1, antithetic: bool = False):
        super().__init__(weight)
        self.sigma, self.draws, self.antithetic = sigma, draws, antithetic

    def extra_repr(self):
        return f"weight={self.weight:g}, sigma={self.sigma:g}, draws={self.draws}"


class NoiseTrainingLoss(_Noise):
    """α · ``E_ξ CE(y, S(x+ξ))`` by Monte Carlo: Gaussian-noise training (left side of Prop. 2)."""

    key = "ce"

    def value(self, student: Callable[[Tensor], Tensor], inputs: Tensor, labels: Tensor,
                generator: torch.Generator | None = None) -> Tensor:
        return noise_training_loss(student, inputs, labels, self.sigma, self.draws,
                                   antithetic=self.antithetic, generator=generator)

    def from_step(self, step):
        _, logits = step.noisy(self.sigma, self.draws, self.antithetic)
        labels = step.y_soft if step.y_soft is not None else step.y
        return F.cross_entropy(logits, labels.repeat(self.draws, *([1] * (labels.dim() - 1))))


class NoisyDistillationLoss(_Noise):
    """β · ``E_ξ KD(T(x+ξ), S(x+ξ))`` by Monte Carlo: distillation on noisy inputs (left side of Prop. 1)."""

    key = "kd"
    needs_teacher = compares_outputs = True

    def __init__(self, weight: float = 1.0, sigma: float = 0.1, draws: int = 1, antithetic: bool = False,
                 temperature: float = 8.0, form: str = "kl"):
        super().__init__(weight, sigma, draws, antithetic)
        self.temperature, self.form = temperature, form

    def value(self, student: Callable[[Tensor], Tensor], teacher: Callable[[Tensor], Tensor], inputs: Tensor,
                generator: torch.Generator | None = None) -> Tensor:
        return noisy_distillation_loss(student, teacher, inputs, self.sigma, self.draws, temperature=self.temperature,
                                       form=self.form, antithetic=self.antithetic, generator=generator)

    def from_step(self, step):
        noisy, logits = step.noisy(self.sigma, self.draws, self.antithetic)
        with torch.no_grad():
            teacher_logits = step.teacher(noisy)
        return kd_loss(logits, teacher_logits, self.temperature, self.form)


# ---- the built-in terms by the ObjectiveConfig weight that turns each on ---------------------

#: weight field -> the term an ObjectiveConfig with that weight > 0 builds, in the objective's order.
BUILT_IN_TERMS: dict[str, Callable[[Any], Term]] = {}


def register_term(weight: str) -> Callable:
    """Register a built-in term: ``build(config)`` makes it from an ObjectiveConfig whose
    ``weight`` field is not 0. A new built-in term is its class and this line beside it,
    and its weight a field of ObjectiveConfig; the objective's properties (teacher needed,
    outputs compared, memory, a dead student) follow from the term's own declarations."""
    def add(build: Callable[[Any], Term]) -> Callable[[Any], Term]:
        BUILT_IN_TERMS[weight] = build
        return build
    return add


def _noise(cfg) -> dict[str, Any]:
    return {"sigma": cfg.noise_sigma, "draws": cfg.noise_draws, "antithetic": cfg.noise_antithetic}


@register_term("alpha")
def _cross_entropy(cfg) -> Term:
    """α: cross-entropy on labels, on noisy inputs when ``noise_sigma`` > 0 (Prop. 2's left side)."""
    return NoiseTrainingLoss(cfg.alpha, **_noise(cfg)) if cfg.noise_sigma else CrossEntropyLoss(cfg.alpha)


@register_term("beta")
def _distillation(cfg) -> Term:
    """β: activation matching, on noisy inputs when ``noise_sigma`` > 0 (Prop. 1's left side)."""
    kd: dict[str, Any] = {"temperature": cfg.temperature, "form": cfg.kd_form}
    return NoisyDistillationLoss(cfg.beta, **_noise(cfg), **kd) if cfg.noise_sigma else KDLoss(cfg.beta, **kd)


@register_term("gamma")
def _jacobian_matching(cfg) -> Term:
    return JacobianMatchingLoss(cfg.gamma, cfg.jm_outputs, cfg.jm_form, cfg.temperature, cfg.top_k,
                                cfg.num_projections, cfg.fd_step, cfg.projection)


@register_term("delta")
def _attention_transfer(cfg) -> Term:
    return AttentionTransferLoss(cfg.delta, cfg.at_layers)


@register_term("delta_jacobian")
def _attention_jacobians(cfg) -> Term:
    return AttentionJacobianLoss(cfg.delta_jacobian, cfg.at_layers)


@register_term("penalty")
def _penalty(cfg) -> Term:
    return JacobianPenalty(cfg.penalty, cfg.penalty_form, cfg.num_projections, cfg.projection)


def teacher_targets(teacher: Callable, terms: Sequence[Term], x: Tensor, y: Tensor | None, *,
                    generator: torch.Generator | None = None, full_jacobian: bool = False) -> TeacherTargets:
    """The teacher's side of a step for ``terms``: per-sample tensors without a graph to
    the teacher's parameters, its logits and what each term takes from its pass."""
    needs_graph = any(t.teacher_needs_graph(full_jacobian) for t in terms)
    xt = x.detach().requires_grad_(needs_graph)
    layers = list(dict.fromkeys(n for t in terms for n in t.teacher_layers))
    module = cast(nn.Module, teacher.module if isinstance(teacher, _Logits) else teacher)
    taps = FeatureTaps(module, layers) if layers else contextlib.nullcontext()
    fn = teacher if isinstance(teacher, _Logits) else _Logits(teacher)
    with torch.set_grad_enabled(needs_graph):
        owner, first = None, {}
        with taps:
            for t in terms:  # a term may run the teacher's pass itself (forward-mode JVPs)
                special = t.teacher_forward(fn, xt, generator, full_jacobian)
                if special is not None:
                    owner, (logits, first) = t, special
                    break
            else:
                logits = fn(xt)
        features = taps.features if isinstance(taps, FeatureTaps) else {}
        side = TeacherSide(fn, x, xt, logits, y, features, generator, full_jacobian)
        taken = {t.key: t.teacher_targets(side) for t in terms}
    if owner is not None:  # what that term took from its own pass
        taken[owner.key] = {**first, **taken[owner.key]}
    return TeacherTargets(logits.detach(), {k: v for k, v in taken.items() if v})


class _Logits:
    """A model as a function of its inputs to its logits (see :func:`logits_of`)."""

    def __init__(self, module: Callable, output: str | int | None = None):
        self.module, self.output = module, output

    def __call__(self, x: Tensor) -> Tensor:
        return logits_of(self.module(x), self.output)
