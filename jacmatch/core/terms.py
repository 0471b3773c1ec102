"""The contract of a term of the transfer objective (docs/method.md, "Losses"): a
:class:`Term` is an ``nn.Module`` with a weight; called with plain tensors and modules in a
user's own loop it returns its **weighted** value, ``weight · value``, and
:meth:`Term.value` the unweighted one. The built-in terms are in :mod:`.builtin_terms`,
each registered beside its class (:func:`register_term`).

Each term also declares what it needs from one training step (input gradients, feature
taps, teacher targets) and computes its value from a :class:`Step`
(:meth:`Term.from_step`), which is how :class:`~jacmatch.core.objective.TransferObjective`
composes them: one student forward pass, one teacher pass (cacheable), every term.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..errors import UsageError
from ..registry import Registry
from .losses import gaussian_noise
from .outputs import logits_of

__all__ = ["Term", "Needs", "Step", "TeacherSide", "TeacherTargets", "FeatureTaps", "teacher_targets", "TERMS", "list_terms",
           "register_term"]


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


def split_layers(at_layers: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
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

    @classmethod
    def of(cls, *, x: Tensor | None = None, y: Tensor | None = None, logits: Tensor | None = None,
           student: Callable[[Tensor], Tensor] | None = None, teacher: Callable[[Tensor], Tensor] | None = None,
           targets: TeacherTargets | None = None, features: dict[str, Tensor] | None = None,
           tangent: Tensor | None = None, generator: torch.Generator | None = None,
           y_soft: Tensor | None = None) -> Step:
        """A step from plain tensors and modules, what a loop of one's own has: how a term's
        :meth:`Term.value` reaches its :meth:`Term.from_step` (``x`` is also ``xs``)."""
        return cls(cast(Tensor, x), y, cast(Tensor, x), logits, cast(Callable, student), teacher, targets,
                   features or {}, tangent, generator, y_soft)

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


@dataclass(frozen=True)
class Needs:
    """What a term asks of a step, declared once: on its class (``needs = Needs(teacher=True)``),
    or on an instance when its settings decide (``dataclasses.replace(self.needs, ...)``). The
    objective reads it to run only what its terms need."""

    input_grad: bool = False           # the student's inputs require grad (a Jacobian of the student)
    jacobian: bool = False             # a Jacobian term: the objective's schedules (jacobian_fraction, _every) apply
    teacher: bool = False              # a teacher must be given
    teacher_targets: bool = False      # the teacher's pass on the clean batch (cacheable)
    clean_forward: bool = True         # the student's forward pass on the clean batch
    chunk_teacher: bool = False        # the teacher's pass is heavy: take it in chunks
    compares_outputs: bool = False     # teacher and student outputs compared one to one (same class count)
    own_student_forward: bool = False  # the term runs the student's forward pass itself (forward-mode JVPs)
    student_layers: tuple[str, ...] = ()  # the student's features the term reads (attention)
    teacher_layers: tuple[str, ...] = ()


class Term(nn.Module):
    """One weighted term ``weight · value``; ``key`` names it in the objective's terms.

    The defaults are ObjectiveConfig's: ``[CrossEntropyLoss(), KDLoss(), JacobianMatchingLoss()]``
    is CE + KD (τ = 8) + 10·JM, the objective that ``ObjectiveConfig()`` builds.

    A new loss is one subclass in a file of one's own: a ``key``, what it needs (one
    :class:`Needs` declaration) and ``from_step``, its value from a :class:`Step` (its
    ``logits``, ``xs``, ``y``, ``targets.logits``, ``targets.of(self)``, ``features``): the one
    method a term must write. ``value``, what a loop of one's own calls with plain tensors, is
    built on it (by default ``value(logits=..., y=...)`` takes :meth:`Step.of`'s fields; a
    built-in term names its arguments and maps them onto a step), so each loss has one code
    path. ``objective.terms: {"my_file:MyLoss": {weight: 0.5}}`` adds it to a run
    (tests/user_terms.py is one).
    """

    key = ""
    needs = Needs()

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

    def teacher_side(self, side: TeacherSide) -> dict[str, Tensor]:
        """This term's own tensors from the teacher's pass (see :class:`TeacherTargets`)."""
        return {}

    def contract(self, targets: dict[str, Tensor], x: Tensor, generator) -> dict[str, Tensor]:
        """This term's cached tensors, for this step (random estimators draw here)."""
        return targets

    def student_forward(self, student, xs: Tensor, targets: dict[str, Tensor]):
        """(logits, tangent) from a student forward pass of the term's own, or None."""
        return None

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """``weight · value``: what a training loop adds to its loss (arguments as :meth:`value`)."""
        return self.weight * self.value(*args, **kwargs)

    def value(self, *args: Any, **kwargs: Any) -> Tensor:
        """The term's unweighted value from plain tensors and modules: :meth:`from_step` on
        :meth:`Step.of` with these fields (by keyword)."""
        fields = [n for n in inspect.signature(Step.of).parameters]  # (the fields Step.of takes: one list)
        unknown = sorted(set(kwargs) - set(fields))
        if args or unknown:
            raise UsageError(f"{type(self).__name__}.value takes the step's fields by keyword ({', '.join(fields)}; "
                             "see Step.of), not " + (f"{len(args)} positional arguments" if args else f"{unknown}"))
        return self.from_step(Step.of(**kwargs))

    def from_step(self, step: Step) -> Tensor:
        """The unweighted value from one step of :class:`~jacmatch.core.objective.TransferObjective`:
        the one method a term must write."""
        raise NotImplementedError(f"{type(self).__name__} must define from_step(step)")

    def extra_repr(self) -> str:
        return f"weight={self.weight:g}"

    def describe(self) -> str:
        """The term in a line of the objective's summary, without its weight: its key and its
        settings (a built-in term says it in the method's notation, ``KD (τ = 8)``)."""
        settings = ", ".join(p for p in self.extra_repr().split(", ") if p and not p.startswith("weight="))
        return self.key + (f" ({settings})" if settings else "")


def teacher_targets(teacher: Callable, terms: Sequence[Term], x: Tensor, y: Tensor | None, *,
                    generator: torch.Generator | None = None, full_jacobian: bool = False) -> TeacherTargets:
    """The teacher's side of a step for ``terms``: per-sample tensors without a graph to
    the teacher's parameters, its logits and what each term takes from its pass."""
    needs_graph = any(t.teacher_needs_graph(full_jacobian) for t in terms)
    xt = x.detach().requires_grad_(needs_graph)
    layers = list(dict.fromkeys(n for t in terms for n in t.needs.teacher_layers))
    module = cast(nn.Module, teacher.module if isinstance(teacher, OutputLogits) else teacher)
    taps = FeatureTaps(module, layers) if layers else contextlib.nullcontext()
    fn = teacher if isinstance(teacher, OutputLogits) else OutputLogits(teacher)
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
        taken = {t.key: t.teacher_side(side) for t in terms}
    if owner is not None:  # what that term took from its own pass
        taken[owner.key] = {**first, **taken[owner.key]}
    return TeacherTargets(logits.detach(), {k: v for k, v in taken.items() if v})


class OutputLogits:
    """A model as a function of its inputs to its logits (see :func:`logits_of`)."""

    def __init__(self, module: Callable, output: str | int | None = None):
        self.module, self.output = module, output

    def __call__(self, x: Tensor) -> Tensor:
        return logits_of(self.module(x), self.output)


# ---- the built-in terms by the ObjectiveConfig weight that turns each on ---------------------

#: weight field -> the term an ObjectiveConfig with that weight > 0 builds, in the objective's order.
TERMS: Registry[Callable[[Any], Term]] = Registry("built-in term")


def register_term(weight: str) -> Callable:
    """Register a built-in term: ``build(config)`` makes it from an ObjectiveConfig whose
    ``weight`` field is not 0. A new built-in term is its class and this line beside it,
    and its weight a field of ObjectiveConfig; the objective's properties (teacher needed,
    outputs compared, memory, a dead student) follow from the term's own declarations."""
    return TERMS.register(weight)


def list_terms() -> list[str]:
    """The built-in terms, by the ObjectiveConfig weight that turns each on, in the objective's
    order (``alpha``: CE, ``beta``: KD, ``gamma``: JM, ...)."""
    return TERMS.names()
