"""The composed transfer objective: ``α·CE + β·KD + γ·JM + δ·AT + δ_J·ATJ + λ·penalty``
(docs/method.md §3, "Total").

:class:`TransferObjective` knows nothing about data, files, processes or progress bars:
one call computes one step's loss and returns its named terms (mdistiller's contract).
The teacher is frozen and kept in eval mode; its Jacobians are taken without a graph
and without parameter gradients (docs/method.md §3.2).

What the teacher contributes to a batch is collected in a dict of per-sample tensors
(:meth:`TransferObjective.teacher_targets`), so that a trainer can compute it once per
sample and cache it when the student's inputs are fixed.

The Jacobian terms (those that differentiate the student with respect to its inputs,
``Term.needs.jacobian``) may be taken on part of the work, as unbiased estimates of their
full value (:class:`JacobianSchedule`): on a random fraction ρ of each batch's samples
(each sample drawn with probability ρ from the run's seeded, sharded draws, the sum over
the drawn ones divided by ρB), and on every k-th step (multiplied by k). The other terms,
and the teacher's forward pass, stay on the whole batch at every step.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from .._imports import import_callable, is_import_path
from ..errors import UsageError, check_once, check_range
from . import jacobian as J
from .estimators import FD_STEP, PROJECTION, create_estimator, list_estimators
from .draws import SelectedGenerator, ShardedGenerator, drawn_part, per_sample_draw
from .fusion import fast_teacher
from .losses import JM_FORMS
from . import builtin_terms  # noqa: F401  (registers the built-in terms)
from .terms import TERMS, FeatureTaps, Step, TeacherTargets, Term, OutputLogits, teacher_targets

__all__ = ["ObjectiveConfig", "TEACHER_OBJECTIVE", "DeadStudentWarning", "TransferObjective", "FeatureTaps",
           "JM_OUTPUTS", "build_terms", "describe_terms", "rows_per_sample"]


class DeadStudentWarning(UserWarning):
    """The Jacobian term has no gradient for the student: its input Jacobian is zero."""


#: A dead student is looked for at the first step and every this many after it.
DEAD_CHECK_EVERY = 50

#: The built-in estimators (docs/method.md, "Which Jacobians"); users may register more.
JM_OUTPUTS = tuple(list_estimators())


@dataclass
class ObjectiveConfig:
    """Weights and settings of the objective; symbols as in docs/method.md §3.

    The defaults are jacmatch's distillation objective, the same in Python, on the command
    line and in ``jacmatch config --list``: CE + KD (τ = 8) + 10·JM (normalized, the
    teacher's top-1 output), the τ and γ that the distillation experiments chose on
    validation (results/REPORT.md). A teacher trains on CE only: ``beta=0, gamma=0``
    (:data:`TEACHER_OBJECTIVE`, what ``jacmatch train-teacher`` sets).
    """

    alpha: float = 1.0            # α: cross-entropy on labels
    beta: float = 1.0             # β: activation matching (KD)
    gamma: float = 10.0           # γ: Jacobian matching (the role of σ² in Prop. 1)
    delta: float = 0.0            # δ: attention transfer
    delta_jacobian: float = 0.0   # weight of the attention maps' Jacobian matching
    penalty: float = 0.0          # λ: Jacobian-norm penalty (Prop. 2)
    temperature: float = 8.0      # τ: softmax temperature of KD (and of the ce Jacobian form)
    kd_form: str = "kl"           # kl | mse
    jm_form: str = "normalized"   # normalized | sq | ce
    jm_outputs: str = "teacher_top1"  # which Jacobians: label, teacher_top1, top_k, all, projection, input_jvp, input_fd
    top_k: int = 3                # k of jm_outputs=top_k
    num_projections: int = 1      # projections or input directions per sample
    fd_step: float = FD_STEP      # h of the finite-difference estimator (from a measured error table)
    projection: str = PROJECTION  # output projections: auto | orthogonal | rademacher | sphere | gaussian
    penalty_form: str = "ce"      # ce: ½‖∇ log Sˢ_y‖²; sq: ‖J_S‖²_F by output projections
    at_layers: list = field(default_factory=list)  # ["student_module:teacher_module", ...]
    noise_sigma: float = 0.0      # σ of Gaussian-noise training / noisy distillation
    noise_draws: int = 1          # M: noise draws per sample (Monte Carlo)
    noise_antithetic: bool = False  # draw ξ and −ξ (cancels odd moments)
    terms: dict = field(default_factory=dict)  # more terms: {"package.module:TermClass": {weight: 0.5, ...}}
    teacher_chunk: int = 64       # teacher targets in chunks of this many samples (0: whole batch; jacmatch bench)
    teacher_fold_bn: bool = True  # the teacher runs as a copy with BatchNorm folded into its layers (faster)
    teacher_channels_last: bool = True  # that copy's weights channels-last (faster on CPU; jacmatch bench)
    jacobian_fraction: float = 1.0  # ρ: the Jacobian terms on this random fraction of each batch (unbiased)
    jacobian_every: int = 1       # k: the Jacobian terms on every k-th step, multiplied by k (unbiased)

    def check(self) -> None:
        """Every range and choice, in one line each. A config is checked once for its values:
        checked again unchanged (the trainer, then the objective it builds), it returns at once."""
        check_once(self, self._check)

    def _check(self) -> None:
        for name in (*TERMS.names(), "noise_sigma"):  # the weights, and σ
            check_range(f"objective.{name}", getattr(self, name), 0, 1e9)
        check_range("objective.temperature", self.temperature, 0, 1e6, low_open=True)
        check_range("objective.top_k", self.top_k, 1, 1e6)
        check_range("objective.fd_step", self.fd_step, 0, 1, low_open=True)
        if self.jm_outputs not in list_estimators() and not is_import_path(str(self.jm_outputs)):
            raise UsageError(f"unknown objective.jm_outputs {self.jm_outputs!r}: use one of {list_estimators()}, "
                             "or an estimator's import path (package.module:EstimatorClass)")
        if self.jm_form not in JM_FORMS:
            raise UsageError(f"unknown objective.jm_form {self.jm_form!r}: use normalized, sq or ce")
        estimator = create_estimator(self.jm_outputs, form=self.jm_form)  # each estimator says which forms it takes
        grads = [n for n in ("penalty", "delta_jacobian") if getattr(self, n)]
        if self.gamma and estimator.own_student_forward and grads:
            raise UsageError(f"objective.jm_outputs={self.jm_outputs} takes the student's logits from a forward-mode "
                             f"pass, which has no input gradient for objective.{' and objective.'.join(grads)}: use "
                             "jm_outputs=projection or input_fd with those terms")
        if self.kd_form not in ("kl", "mse"):
            raise UsageError(f"unknown objective.kd_form {self.kd_form!r}: use kl or mse")
        if self.projection not in J.PROJECTIONS:
            raise UsageError(f"unknown objective.projection {self.projection!r}: use one of {list(J.PROJECTIONS)}")
        if self.penalty_form not in ("ce", "sq"):
            raise UsageError(f"unknown objective.penalty_form {self.penalty_form!r}: use ce or sq")
        if not 1 <= self.num_projections <= 4096:
            raise UsageError(f"objective.num_projections must be in [1, 4096], got {self.num_projections}")
        if not 1 <= self.noise_draws <= 1024 or (self.noise_antithetic and self.noise_draws % 2):
            raise UsageError(f"objective.noise_draws must be in [1, 1024] (even if antithetic), got {self.noise_draws}")
        check_range("objective.jacobian_fraction", self.jacobian_fraction, 0, 1, low_open=True)
        if not (isinstance(self.jacobian_every, int) and 1 <= self.jacobian_every <= 1_000_000):
            raise UsageError(f"objective.jacobian_every must be a step count >= 1, got {self.jacobian_every!r}")
        if self.teacher_chunk < 0:
            raise UsageError(f"objective.teacher_chunk must be >= 0, got {self.teacher_chunk}")
        if (self.delta or self.delta_jacobian) and not self.at_layers:
            raise UsageError("attention transfer needs objective.at_layers, e.g. ['layer2:layer3']")
        for spec, options in self.terms.items():
            if not isinstance(options, dict):
                raise UsageError(f"objective.terms[{spec!r}] must be a mapping of the term's arguments, e.g. "
                                 f"{{weight: 0.5}}, got {options!r}")

    def describe(self) -> str:
        """The objective in one line, its terms with their weights and the Jacobian terms'
        schedule: ``1·CE + 1·KD (τ = 16) + 10·JM (normalized, teacher_top1) every 4 steps``."""
        return describe_terms(build_terms(self), JacobianSchedule(self.jacobian_fraction, self.jacobian_every))

    @property
    def needs_teacher(self) -> bool:
        """Whether a term needs a teacher: what the terms themselves declare (``Term.needs.teacher``)."""
        return any(t.needs.teacher for t in build_terms(self))

    @property
    def compares_outputs(self) -> bool:
        """Whether a term compares teacher and student outputs one to one (KD, JM): what
        the terms themselves declare (``Term.compares_outputs``)."""
        return any(t.needs.compares_outputs for t in build_terms(self))

    def check_memory(self, sample_numel: int, num_classes: int, batch: int, max_bytes: int) -> None:
        """Refuse (one line) settings whose step would need more than ``max_bytes``, before a run starts."""
        need = self.step_bytes(sample_numel, num_classes, batch)
        if need > max_bytes:
            raise UsageError(f"one step would need about {need >> 30} GiB: "
                             "lower optim.batch_size, objective.num_projections or objective.noise_draws")

    def step_bytes(self, sample_numel: int, num_classes: int, batch: int) -> int:
        """A coarse upper estimate of one step's activations, to refuse absurd settings early."""
        rows = rows_per_sample(build_terms(self), num_classes)
        noise = 4 * self.noise_draws * (self.noise_sigma > 0)
        return sample_numel * 4 * (64 + 8 * rows + noise) * batch


#: What a teacher trains with: cross-entropy only (the distillation terms set to 0).
TEACHER_OBJECTIVE = {"alpha": 1.0, "beta": 0.0, "gamma": 0.0}


def build_terms(cfg: ObjectiveConfig) -> list[Term]:
    """The terms that ``cfg``'s non-zero weights ask for, in the order of their registration
    (ce, kd, jm, at, at_jm, penalty: :data:`~jacmatch.core.terms.TERMS`), then the
    user's. With ``noise_sigma`` > 0, CE and KD are taken on noisy inputs."""
    terms = [build(cfg) for weight, build in TERMS.items() if getattr(cfg, weight)]
    terms += [_user_term(spec, options) for spec, options in cfg.terms.items()]
    if not terms:
        raise UsageError("every weight of the objective is 0: set alpha, beta, gamma, ... ")
    return terms


def _user_term(spec: str, options: dict) -> Term:
    """A term of one's own, given by import path (``package.module:TermClass``): a new loss
    is one file, a :class:`Term` subclass, and one line of config."""
    cls = import_callable(spec, "objective term", UsageError)
    if not (isinstance(cls, type) and issubclass(cls, Term)):
        raise UsageError(f"objective term {spec!r} is not a jacmatch.Term subclass")
    try:
        return cls(**options)
    except TypeError as exc:
        raise UsageError(f"objective term {spec!r} does not take {sorted(options)}: {exc}") from None


def describe_terms(terms: Sequence[Term], schedule: JacobianSchedule | None = None) -> str:
    """Terms in one line, each with its weight (and the Jacobian terms' schedule, when they
    have one): what ``jacmatch distill`` prints."""
    said = schedule.describe() if schedule is not None and schedule.active else ""
    return " + ".join(f"{t.weight:g}·{t.describe()}" + (f" {said}" if said and t.needs.jacobian else "")
                      for t in terms)


@dataclass(frozen=True)
class JacobianSchedule:
    """Which part of the work the Jacobian terms are taken on: a random ``fraction`` ρ of
    each batch, and every ``every``-th step (k). Both keep the term's estimate unbiased:
    the drawn samples' sum is divided by ρB (a sample is drawn with probability ρ), and
    a step's value is multiplied by k. ρ = 1 and k = 1 is the term as it is."""

    fraction: float = 1.0
    every: int = 1

    @property
    def active(self) -> bool:
        return self.fraction < 1 or self.every > 1

    def takes(self, step: int) -> bool:
        """Whether the Jacobian terms are taken at step ``step`` (counted from 0)."""
        return step % self.every == 0

    def describe(self) -> str:
        parts = ([f"on ρ = {self.fraction:g} of each batch"] if self.fraction < 1 else []) + \
            ([f"every {self.every} steps"] if self.every > 1 else [])
        return ", ".join(parts)


def _placed(first: TeacherTargets, at: Tensor, second: TeacherTargets, rest: Tensor, n: int) -> TeacherTargets:
    """The targets of a batch of ``n`` samples from those of its samples ``at`` and ``rest``
    (the tensors that ``second`` holds, each sample in its place)."""
    ours, theirs = first.tensors(), second.tensors()
    placed = {}
    for key, value in theirs.items():
        whole = value.new_empty((n, *value.shape[1:]))
        whole[at], whole[rest] = ours[key], value
        placed[key] = whole
    return TeacherTargets.from_tensors(placed)


@contextlib.contextmanager
def _batchnorm_statistics_kept(model: nn.Module):
    """A forward pass that leaves a BatchNorm model's running statistics as they were (a
    second pass of the same step on part of the batch must not move them twice; a part of
    no sample must not make them NaN). The pass is a drawn part of the batch
    (:func:`~jacmatch.core.draws.drawn_part`): global BatchNorm counts its samples."""
    names = ("running_mean", "running_var", "num_batches_tracked")
    kept = [(m, {n: getattr(m, n) for n in names}) for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
            and m.running_mean is not None]
    for m, buffers in kept:  # the pass moves copies; the graph may hold them, so they are swapped back, not copied
        for n, b in buffers.items():
            setattr(m, n, b.clone())
    try:
        with drawn_part():
            yield
    finally:
        for m, buffers in kept:
            for n, b in buffers.items():
                setattr(m, n, b)


def rows_per_sample(terms: Sequence[Term], num_classes: int) -> int:
    """Jacobian rows (or products) one sample costs under ``terms``: for memory estimates."""
    return max([t.rows_per_sample(num_classes) for t in terms] or [0])


def _run_settings(config: ObjectiveConfig | None, has_terms: bool, given: dict[str, Any]
                  ) -> tuple[ObjectiveConfig | None, dict[str, Any]]:
    """(config, settings): the objective's run settings (``given``'s keys) from ``config``, or
    from the keyword arguments ``given`` (with terms, or without a config); a config that says
    otherwise than a value given is refused. Their ranges are checked either way."""
    if has_terms:
        ObjectiveConfig(**given).check()
        return None, given
    default = ObjectiveConfig()
    clash = {k: (getattr(config, k), v) for k, v in given.items()
             if config and v != getattr(default, k) and getattr(config, k) != v}
    if clash:
        raise UsageError("; ".join(f"{k}={v!r} here but {c!r} in config" for k, (c, v) in clash.items())
                         + ": set each in one place (ObjectiveConfig's field)")
    config = config or ObjectiveConfig(**given)
    config.check()
    return config, {k: getattr(config, k) for k in given}


class TransferObjective(nn.Module):
    """One training step's loss for a student, with an optional frozen teacher: the sum
    of its terms' ``weight · value``.

    ``objective(x, y)`` returns ``(student_logits, total, terms)`` where ``terms`` maps
    each term's key (``ce``, ``kd``, ``jm``, ``at``, ``at_jm``, ``penalty``) to its
    unweighted value. Build it from an :class:`ObjectiveConfig` or from ``terms=[...]``.
    The student and the teacher are submodules (``.to(device)`` moves both); the teacher
    stays frozen and in eval mode whatever ``.train()`` is called. ``teacher_chunk``,
    ``teacher_fold_bn``, ``teacher_channels_last``, ``jacobian_fraction`` and ``jacobian_every``
    are ObjectiveConfig's fields: given here
    they apply to the default config or to ``terms``; a config that says otherwise than one
    given is refused.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None,
                 config: ObjectiveConfig | None = None, *, terms: Sequence[Term] | None = None,
                 generator: torch.Generator | None = None, teacher_chunk: int = 64,
                 student_output: str | int | None = None, teacher_output: str | int | None = None,
                 teacher_fold_bn: bool = True, teacher_channels_last: bool = True,
                 jacobian_fraction: float = 1.0, jacobian_every: int = 1):
        super().__init__()
        if terms is not None and config is not None:
            raise UsageError("pass either config or terms, not both")
        if teacher is not None and (teacher is student or {id(p) for p in teacher.parameters()}
                                    & {id(p) for p in student.parameters()}):
            raise UsageError("the teacher is the student (or shares its parameters): the objective freezes its "
                             "teacher, so the student would not train; pass a trained teacher, or a copy "
                             "(copy.deepcopy(student)) for self-distillation")
        given = {"teacher_chunk": teacher_chunk, "teacher_fold_bn": teacher_fold_bn,
                 "teacher_channels_last": teacher_channels_last, "jacobian_fraction": jacobian_fraction,
                 "jacobian_every": jacobian_every}
        config, settings = _run_settings(config, terms is not None, given)
        terms = build_terms(cast(ObjectiveConfig, config)) if terms is None else terms
        keys = [t.key for t in terms]
        if len(set(keys)) != len(keys) or not keys:
            raise UsageError(f"the terms' keys must be distinct and not empty, got {keys}")
        if any(t.needs.teacher for t in terms) and teacher is None:
            raise UsageError(f"the terms {[t.key for t in terms if t.needs.teacher]} need a teacher: "
                             "pass teacher=... or drop them (β, γ, δ need a teacher)")
        owner = [t for t in terms if t.needs.own_student_forward]
        if owner and any(t.needs.input_grad for t in terms):
            raise UsageError(f"{owner[0].describe()} runs the student's forward pass itself, which gives no input "
                             f"gradient for the terms {[t.key for t in terms if t.needs.input_grad]}: drop them, "
                             f"or choose a {owner[0].key} term that takes the student's input gradient")
        self.config = config
        self.schedule = JacobianSchedule(settings["jacobian_fraction"], settings["jacobian_every"])
        if self.schedule.active and not any(t.needs.jacobian for t in terms):
            raise UsageError(f"jacobian_fraction={self.schedule.fraction:g} and jacobian_every={self.schedule.every} "
                             f"schedule the Jacobian terms, and none of {keys} is one: leave them at 1, or add a "
                             "Jacobian term")
        self._owns_student_forward = bool(owner)
        self._warned_dead, self._steps = False, 0
        self.terms = nn.ModuleList(terms)
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        self.generator = generator
        self.teacher_chunk = settings["teacher_chunk"]
        self._student_fn = OutputLogits(student, student_output)
        self._teacher_output = teacher_output
        self._fast_options = {"fold": settings["teacher_fold_bn"], "channels_last": settings["teacher_channels_last"]}
        self._fast: OutputLogits | None = None
        self._fast_versions: tuple = ()

    def fast_teacher(self, x: Tensor) -> OutputLogits:
        """The teacher as the objective runs it: a copy with BatchNorm folded and weights
        channels-last (``teacher_fold_bn``, ``teacher_channels_last``), built from the first
        batch and checked against the teacher on it (see :mod:`jacmatch.core.fusion`). The
        user's teacher is not changed; the copy follows it: a teacher whose weights or buffers
        changed since (``load_state_dict``, an EMA update in place, new tensors) is copied again."""
        if self.teacher is None:
            raise UsageError("this objective has no teacher: pass teacher=... to take the teacher's side")
        device = next(iter(self.teacher.parameters()), x).device
        versions = self._teacher_versions()
        if self._fast is None or versions != self._fast_versions or \
                next(iter(cast(nn.Module, self._fast.module).parameters()), x).device != device:
            keep = [n for t in self.term_list for n in t.needs.teacher_layers]
            module = fast_teacher(self.teacher, x[:8].detach(), keep=keep, output=self._teacher_output,
                                  **self._fast_options)
            self._fast, self._fast_versions = OutputLogits(module, self._teacher_output), versions
        return self._fast

    def _teacher_versions(self) -> tuple:
        """Which tensors the teacher holds and how often each was written in place (PyTorch's
        version counters): what the fast copy was made from."""
        teacher = cast(nn.Module, self.teacher)
        return tuple((id(t), t._version) for t in itertools.chain(teacher.parameters(), teacher.buffers()))

    def prepare(self, x: Tensor) -> None:
        """Ready the objective for a run from an example batch ``x`` (a trainer passes the
        first 8 training samples, so that every process decides alike): the teacher's fast
        copy is built and checked on it. Without a teacher there is nothing to prepare."""
        if self.teacher is not None and len(x):
            self.fast_teacher(x)

    def _warn_if_dead(self, terms: Sequence[Term]) -> None:
        for t in terms:
            found = t.dead_student()
            if found is not None:
                self._warned_dead = True
                warnings.warn(DeadStudentWarning(
                    f"{found} is zero for every sample of a batch: the {t.key} term gives it no gradient (are all "
                    "its ReLUs off?); lower the learning rate, or check the student's initialisation and inputs"),
                    stacklevel=3)
                return

    def _keep_teacher_frozen(self) -> None:
        """The teacher runs in eval mode whatever its owner did since (``teacher.train()``
        would move its BatchNorm statistics at every step)."""
        if self.teacher is not None and self.teacher.training:
            self.teacher.eval()

    def describe(self) -> str:
        """The objective in one line, from its terms: ``1·CE + 1·KD (τ = 8) + 10·JM (normalized, teacher_top1)``."""
        return describe_terms(self.term_list, self.schedule)

    def reset_teacher(self) -> None:
        """Drop the fast copy of the teacher (rebuilt from the teacher at the next step)."""
        self._fast = None

    def train(self, mode: bool = True) -> TransferObjective:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    @property
    def term_list(self) -> list[Term]:
        """The terms, in order (``self.terms`` is their ModuleList)."""
        return cast(list[Term], list(self.terms))

    @property
    def needs_teacher_targets(self) -> bool:
        """Whether a step uses the teacher's pass on the clean batch (what a cache holds)."""
        return any(t.needs.teacher_targets for t in self.term_list)

    # ---- the teacher's side: per-sample tensors, cacheable -----------------------------

    def teacher_targets(self, x: Tensor, y: Tensor, *, full_jacobian: bool = False,
                        terms: Sequence[Term] | None = None, generator=None) -> TeacherTargets:
        """The teacher's side of a step, computed without a graph to its parameters.

        When a term's teacher pass is heavy (Jacobians), it is taken in chunks of
        ``teacher_chunk`` samples, each chunk's graph freed before the next: the peak
        memory of the teacher's reverse pass scales with the chunk, not the batch.
        With ``full_jacobian`` (for a cache), random estimators keep every row of the
        teacher's Jacobian and draw nothing; each step contracts it with its draws.
        ``terms``: only these terms' side (default: every term's); ``generator``: the draws'
        (default: the objective's).
        """
        self._keep_teacher_frozen()
        teacher = self.fast_teacher(x)
        chunk = self.teacher_chunk
        terms = self.term_list if terms is None else list(terms)
        if chunk and x.shape[0] > chunk and any(t.needs.chunk_teacher for t in terms):
            parts = [teacher_targets(teacher, terms, x[i:i + chunk], y[i:i + chunk],
                                     generator=generator or self.generator, full_jacobian=full_jacobian)
                     for i in range(0, x.shape[0], chunk)]
            return TeacherTargets.cat(parts)
        return teacher_targets(teacher, terms, x, y, generator=generator or self.generator, full_jacobian=full_jacobian)

    def cache_targets(self, x: Tensor, y: Tensor) -> TeacherTargets:
        """What a cache keeps for each sample: every term's teacher side as the term
        declares it (a random estimator keeps the teacher's full Jacobian and draws nothing;
        each step contracts it with its own draws)."""
        return self.teacher_targets(x, y, full_jacobian=True)

    # ---- one step ------------------------------------------------------------------------

    def forward(self, x: Tensor, y: Tensor, targets: TeacherTargets | None = None, *,
                grad_scale: float | None = None, step: int | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """One step: ``(student_logits, total, terms)``. ``y``: class indices [B], or soft labels
        [B, K] (mixup, CutMix: cross-entropy takes them). ``targets``: the teacher's side from
        :meth:`teacher_targets` (a cache); ``grad_scale``: under fp16 with a GradScaler, its
        current scale, which the student's input gradients are taken with (then divided by;
        see :func:`~jacmatch.core.jacobian.scaled_gradients`). ``step``: the run's step
        number, from 0, which ``jacobian_every`` counts (a trainer passes it, so that a resumed
        run takes the Jacobian terms at the steps of a straight one); by default the calls are
        counted."""
        with J.scaled_gradients(grad_scale):
            return self._step(x, y, targets, self._steps if step is None else step)

    def _step(self, x: Tensor, y: Tensor, targets: TeacherTargets | None, step: int
              ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        if not x.is_floating_point():
            raise UsageError(f"the input batch is {x.dtype}: give float images in [0, 1] (uint8 pixels: x.float() / 255)")
        if y.dim() not in (1, 2) or len(y) != len(x):
            raise UsageError(f"labels of shape {tuple(y.shape)} for a batch of {len(x)} inputs: give class indices "
                             "[B] or soft labels [B, K] (one column per class)")
        y_soft = None
        if y.dim() == 2:  # soft labels (mixup, CutMix): cross-entropy takes them; a term that indexes a class, the top one
            y_soft, y = y, y.argmax(1)
        if not torch.isfinite(x).all():
            raise UsageError("the input batch contains NaN or Inf: check the data pipeline")
        self._keep_teacher_frozen()
        all_terms = self.term_list
        schedule = self.schedule
        if not schedule.active:
            logits, values, noisy = self._pass(x, y, y_soft, targets, all_terms)
        else:
            jacobian = [t for t in all_terms if t.needs.jacobian]
            others = [t for t in all_terms if not t.needs.jacobian]
            taken = schedule.takes(step)
            scale = float(schedule.every)
            if not taken or schedule.fraction == 1:  # one pass: without the Jacobian terms, or with every term
                logits, values, noisy = self._pass(x, y, y_soft, targets, all_terms if taken else others,
                                                   need_logits=True)
            else:
                logits, values, noisy, part_scale = self._drawn_step(x, y, y_soft, targets, jacobian, others)
                scale *= part_scale
            for t in jacobian:  # an unbiased estimate of each term's full value; 0 where not taken
                values[t.key] = values[t.key] * scale if t.key in values else x.new_zeros(())
            values = {t.key: values[t.key] for t in all_terms}
        self._steps += 1
        if not self._warned_dead and self._steps % DEAD_CHECK_EVERY == 1:  # (reading the flag syncs a GPU)
            self._warn_if_dead(all_terms)
        total = cast(Tensor, sum(t.weight * values[t.key] for t in all_terms))
        if logits is None:  # noise training alone: the first draw's logits stand for the batch
            logits = noisy
        if logits is None:
            raise ValueError(f"no term of {[t.key for t in all_terms]} takes the student's logits")
        return logits, total, values

    def _drawn_step(self, x: Tensor, y: Tensor, y_soft: Tensor | None, targets: TeacherTargets | None,
                    jacobian: list[Term], others: list[Term]
                    ) -> tuple[Tensor | None, dict[str, Tensor], Tensor | None, float]:
        """A step whose Jacobian terms are taken on the samples drawn with probability ρ: the
        other terms on the whole batch, then the drawn samples' own pass. Returns (logits,
        values, the first noisy draw's logits, |S| / (ρB), what the drawn mean is scaled by)."""
        chosen = per_sample_draw(torch.rand, (len(x),), generator=self.generator, dtype=torch.float32,
                                 device=self.generator.device if self.generator is not None else x.device)
        drawn = chosen.to(x.device) < self.schedule.fraction
        index, rest = drawn.nonzero().squeeze(1), (~drawn).nonzero().squeeze(1)
        # the drawn samples' own draws (projections, directions) are those the whole batch gives them
        part_generator = None if self.generator is None else SelectedGenerator(self.generator, index, len(x))
        scale = len(index) / (self.schedule.fraction * len(x))
        main, part = targets, None if targets is None else targets[index]
        fresh = targets is None and len(index) > 0 and any(t.needs.teacher_targets for t in jacobian)
        if fresh:  # one teacher pass over the batch: the drawn samples with the graph the Jacobian
            # terms need, the others without (the frozen teacher treats each sample alone)
            part = self.teacher_targets(x[index], y[index], terms=[t for t in self.term_list if t.needs.teacher_targets],
                                        generator=part_generator)
            if any(t.needs.teacher_targets for t in others):
                main = part if not len(rest) else _placed(
                    part, index, self.teacher_targets(x[rest], y[rest], terms=others), rest, len(x))
        logits, values, noisy = self._pass(x, y, y_soft, main, others, need_logits=True,
                                           fresh=fresh and main is not None)
        # the drawn samples' own pass: the Jacobian terms' mean over them. Processes that share a
        # batch all take it, a process that drew no sample too (their collectives must match)
        shared = isinstance(self.generator, ShardedGenerator) and self.generator.world_size > 1
        if len(index) or shared:
            # through the module a DDP wrapper holds: the wrapper's forward (its buffer broadcast, its reducer's
            # preparation) runs once a step; the parameters' gradients reach its hooks in the one backward
            inner = self.student.module if isinstance(self.student, nn.parallel.DistributedDataParallel) else self.student
            with _batchnorm_statistics_kept(inner):
                _, drawn_values, _ = self._pass(x[index], y[index], None if y_soft is None else y_soft[index],
                                                part, jacobian, fresh=fresh, generator=part_generator,
                                                student=OutputLogits(inner, self._student_fn.output))
            if not len(index):  # the mean over no sample: 0, its graph kept for the others' collectives
                drawn_values = {k: 0 * torch.nan_to_num(v) for k, v in drawn_values.items()}
            values.update(drawn_values)
        return logits, values, noisy, scale

    def _pass(self, x: Tensor, y: Tensor, y_soft: Tensor | None, targets: TeacherTargets | None,
              terms: Sequence[Term], need_logits: bool = False, fresh: bool = False, generator=None,
              student: OutputLogits | None = None) -> tuple[Tensor | None, dict[str, Tensor], Tensor | None]:
        """``terms`` on the batch ``x``: one student pass (and the teacher's side, unless
        ``targets`` holds it: from a cache, or ``fresh`` from this step's teacher pass), each
        term's value (``generator``: the draws', ``student``: the student as a function, each
        default the objective's). Returns (logits, values, the first noisy draw's logits)."""
        generator = generator or self.generator
        student_fn = student or self._student_fn
        if targets is None and any(t.needs.teacher_targets for t in terms):
            targets = self.teacher_targets(x, y, terms=terms, generator=generator)
        elif targets is not None and not fresh:  # teacher_targets(..., full_jacobian=True), e.g. from a cache
            # a random estimator contracts the full Jacobian with this step's draws
            targets = TeacherTargets(targets.logits, {t.key: t.contract(targets.of(t), x, generator)
                                                      for t in terms if targets.of(t)})
        xs = x.detach().requires_grad_(any(t.needs.input_grad for t in terms))
        layers = list(dict.fromkeys(n for t in terms for n in t.needs.student_layers))
        taps = FeatureTaps(self.student, layers) if layers else contextlib.nullcontext()
        logits: Tensor | None = None
        tangent: Tensor | None = None
        # A term that back-propagates through the student's input gradient needs every op of
        # the student twice differentiable: attention then runs on the math kernel.
        owns = any(t.needs.own_student_forward for t in terms)
        kernel = J.math_attention() if xs.requires_grad or owns else contextlib.nullcontext()
        with taps, kernel:
            special = next((r for r in (t.student_forward(student_fn, xs, targets.of(t) if targets else {})
                                        for t in terms) if r is not None), None)
            if special is not None:
                logits, tangent = special
            elif need_logits or any(t.needs.clean_forward for t in terms):
                logits = student_fn(xs)
        if logits is not None and targets is not None and targets.logits.shape[1] != logits.shape[1] \
                and any(t.needs.compares_outputs for t in terms):
            raise UsageError(f"the teacher has {targets.logits.shape[1]} outputs and the student "
                             f"{logits.shape[1]}: KD and Jacobian matching compare outputs one to one, so "
                             "both must have as many classes as the data set")
        if y_soft is not None and logits is not None and y_soft.shape[1] != logits.shape[1]:
            raise UsageError(f"soft labels of {y_soft.shape[1]} columns for a student of {logits.shape[1]} outputs: "
                             f"give [B, {logits.shape[1]}] class probabilities, one column per class")
        teacher = self.fast_teacher(x) if self.teacher is not None else None
        step = Step(x, y, xs, logits, student_fn, teacher, targets,
                    taps.features if isinstance(taps, FeatureTaps) else {}, tangent, generator, y_soft)
        return logits, {t.key: t.from_step(step) for t in terms}, step.noisy_logits()
