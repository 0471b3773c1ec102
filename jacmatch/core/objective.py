"""The composed transfer objective: ``α·CE + β·KD + γ·JM + δ·AT + δ_J·ATJ + λ·penalty``
(METHOD.md §3, "Total").

:class:`TransferObjective` knows nothing about data, files, processes or progress bars:
one call computes one step's loss and returns its named terms (mdistiller's contract).
The teacher is frozen and kept in eval mode; its Jacobians are taken without a graph
and without parameter gradients (METHOD.md §3.2).

What the teacher contributes to a batch is collected in a dict of per-sample tensors
(:meth:`TransferObjective.teacher_targets`), so that a trainer can compute it once per
sample and cache it when the student's inputs are fixed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import jacobian as J
from .losses import (attention_map, attention_transfer_loss, gaussian_noise, jacobian_matching_loss,
                     jacobian_penalty, kd_loss, normalize_per_sample)

__all__ = ["ObjectiveConfig", "TransferObjective", "FeatureTaps", "JM_OUTPUTS"]

#: Which Jacobians are matched (METHOD.md §3.1).
INDEX_OUTPUTS = ("label", "teacher_top1", "top_k", "all")
DRAWN_OUTPUTS = ("projection", "input_jvp", "input_fd")
JM_OUTPUTS = INDEX_OUTPUTS + DRAWN_OUTPUTS


@dataclass
class ObjectiveConfig:
    """Weights and settings of the objective; symbols as in METHOD.md §3."""

    alpha: float = 1.0            # α: cross-entropy on labels
    beta: float = 0.0             # β: activation matching (KD)
    gamma: float = 0.0            # γ: Jacobian matching (the role of σ² in Prop. 1)
    delta: float = 0.0            # δ: attention transfer
    delta_jacobian: float = 0.0   # weight of the attention maps' Jacobian matching
    penalty: float = 0.0          # λ: Jacobian-norm penalty (Prop. 2)
    temperature: float = 4.0      # τ
    kd_form: str = "kl"           # kl | mse
    jm_form: str = "normalized"   # normalized | sq | ce
    jm_outputs: str = "teacher_top1"  # one of JM_OUTPUTS
    top_k: int = 3
    num_projections: int = 1      # projections or input directions per sample
    fd_step: float = 1e-2         # h of the finite-difference estimator
    penalty_form: str = "ce"      # ce: ½‖∇ log Sˢ_y‖²; sq: ‖J_S‖²_F by output projections
    at_layers: list = field(default_factory=list)  # ["student_module:teacher_module", ...]
    noise_sigma: float = 0.0      # σ of Gaussian-noise training / noisy distillation
    noise_draws: int = 1          # M
    noise_antithetic: bool = False
    teacher_chunk: int = 32       # teacher targets in chunks of this many samples (0: whole batch)

    def check(self) -> None:
        for name in ("alpha", "beta", "gamma", "delta", "delta_jacobian", "penalty", "noise_sigma"):
            value = getattr(self, name)
            if not (value >= 0 and value < float("inf")):
                raise ValueError(f"objective.{name} must be a finite number >= 0, got {value}")
        if self.jm_outputs not in JM_OUTPUTS:
            raise ValueError(f"unknown objective.jm_outputs {self.jm_outputs!r}: use one of {JM_OUTPUTS}")
        if self.jm_form not in ("normalized", "sq", "ce"):
            raise ValueError(f"unknown objective.jm_form {self.jm_form!r}: use normalized, sq or ce")
        if self.jm_form == "ce" and self.jm_outputs in DRAWN_OUTPUTS:
            raise ValueError("objective.jm_form='ce' weights exact rows by teacher probabilities: "
                             "use jm_outputs label, teacher_top1, top_k or all")
        if self.jm_outputs in ("input_jvp", "input_fd") and self.jm_form != "sq":
            raise ValueError(f"jm_outputs={self.jm_outputs!r} estimates ‖J_T − J_S‖²_F: set jm_form=sq")
        if self.kd_form not in ("kl", "mse"):
            raise ValueError(f"unknown objective.kd_form {self.kd_form!r}: use kl or mse")
        if self.penalty_form not in ("ce", "sq"):
            raise ValueError(f"unknown objective.penalty_form {self.penalty_form!r}: use ce or sq")
        if self.temperature <= 0:
            raise ValueError(f"objective.temperature must be > 0, got {self.temperature}")
        if not 1 <= self.num_projections <= 4096:
            raise ValueError(f"objective.num_projections must be in [1, 4096], got {self.num_projections}")
        if not 1 <= self.noise_draws <= 1024 or (self.noise_antithetic and self.noise_draws % 2):
            raise ValueError(f"objective.noise_draws must be in [1, 1024] (even if antithetic), got {self.noise_draws}")
        if self.teacher_chunk < 0:
            raise ValueError(f"objective.teacher_chunk must be >= 0, got {self.teacher_chunk}")
        if (self.delta or self.delta_jacobian) and not self.at_layers:
            raise ValueError("attention transfer needs objective.at_layers, e.g. ['layer2:layer3']")

    @property
    def needs_teacher(self) -> bool:
        return bool(self.beta or self.gamma or self.delta or self.delta_jacobian)


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
            raise ValueError(f"no module named {missing} in {type(model).__name__}; "
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


def _split_layers(at_layers: Sequence[str]) -> tuple[list[str], list[str]]:
    pairs = [p.split(":") if ":" in p else (p, p) for p in at_layers]
    return [s for s, _ in pairs], [t for _, t in pairs]


class TransferObjective:
    """One training step's loss for a student, with an optional frozen teacher.

    ``objective(x, y)`` returns ``(student_logits, total, terms)`` where ``terms`` maps
    ``ce``, ``kd``, ``jm``, ``at``, ``at_jm``, ``penalty`` (those with a non-zero weight)
    to their unweighted values.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None,
                 config: ObjectiveConfig | None = None, *, generator: torch.Generator | None = None):
        self.config = config or ObjectiveConfig()
        self.config.check()
        if self.config.needs_teacher and teacher is None:
            raise ValueError("β, γ, δ need a teacher: pass teacher=... or set those weights to 0")
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        self.generator = generator
        self._student_layers, self._teacher_layers = _split_layers(self.config.at_layers)

    # ---- the teacher's side: per-sample tensors, cacheable -----------------------------

    def teacher_targets(self, x: Tensor, y: Tensor, *, full_jacobian: bool = False) -> dict[str, Tensor]:
        """The teacher's side of a step, computed without a graph to its parameters.

        The teacher's Jacobian needs no graph to the student, so it is taken in chunks of
        ``teacher_chunk`` samples, each chunk's graph freed before the next: the peak
        memory of the teacher's reverse pass scales with the chunk, not the batch.

        Always ``logits``. For index selectors, ``index`` and the Jacobian rows ``jac`` at
        the matched outputs (``probs`` too for the ce form). For random estimators, either
        the draws of this step and their products (``draws``, ``drawn``), or with
        ``full_jacobian`` (for a cache) every row ``full_jac`` and no draw. Attention
        features ``at{j}`` (and their Jacobians ``at_jac{j}``) when δ or δ_J is set.
        """
        chunk = self.config.teacher_chunk
        if chunk and x.shape[0] > chunk and (self.config.gamma or self.config.delta_jacobian):
            parts = [self._teacher_targets(x[i:i + chunk], y[i:i + chunk], full_jacobian)
                     for i in range(0, x.shape[0], chunk)]
            return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return self._teacher_targets(x, y, full_jacobian)

    def _teacher_targets(self, x: Tensor, y: Tensor, full_jacobian: bool) -> dict[str, Tensor]:
        cfg = self.config
        teacher = self.teacher
        teacher.eval()
        wants_jac = cfg.gamma > 0
        wants_at = cfg.delta > 0 or cfg.delta_jacobian > 0
        jvp_estimator = wants_jac and cfg.jm_outputs == "input_jvp" and not full_jacobian
        out: dict[str, Tensor] = {}
        needs_graph = (wants_jac and (full_jacobian or cfg.jm_outputs not in ("input_jvp", "input_fd"))) \
            or cfg.delta_jacobian > 0
        xt = x.detach().requires_grad_(needs_graph)
        taps = FeatureTaps(teacher, self._teacher_layers) if wants_at else contextlib.nullcontext()
        with torch.set_grad_enabled(xt.requires_grad), taps:
            if jvp_estimator:
                draws = self._draws(x, None)
                logits, drawn = J.jacobian_vector_product(teacher, xt, draws)
                logits = logits[:, 0]
                out.update(draws=draws, drawn=drawn.detach())
            else:
                logits = teacher(xt)
        out["logits"] = logits.detach()
        if wants_at:
            for j, name in enumerate(self._teacher_layers):
                feat = taps[name]
                out[f"at{j}"] = feat.detach()
                if cfg.delta_jacobian:
                    scalar = attention_map(feat).flatten(1).amax(dim=1)
                    out[f"at_jac{j}"] = torch.autograd.grad(scalar.sum(), xt, retain_graph=True)[0]
        if not wants_jac or jvp_estimator:
            return out
        if cfg.jm_outputs in INDEX_OUTPUTS:
            index = self._index(logits.detach(), y)
            out["index"] = index
            out["jac"] = J.input_jacobian(self._jacobian_outputs(logits), xt, index)
            if cfg.jm_form == "ce":
                out["probs"] = F.softmax(logits.detach() / cfg.temperature, dim=1).gather(1, index)
        elif full_jacobian:
            out["full_jac"] = J.input_jacobian(logits, xt, J.all_outputs(logits.detach()))
        else:
            draws = self._draws(x, logits.shape[1])
            out["draws"] = draws
            if cfg.jm_outputs == "projection":
                out["drawn"] = J.vector_jacobian_product(logits, xt, draws)
            else:
                with torch.no_grad():
                    out["drawn"] = J.finite_difference_jvp(teacher, x, draws, step=cfg.fd_step,
                                                           outputs=logits.detach())
        return out

    def _index(self, teacher_logits: Tensor, y: Tensor) -> Tensor:
        cfg = self.config
        if cfg.jm_outputs == "label":
            return J.label(y)[:, None]
        if cfg.jm_outputs == "teacher_top1":
            return J.teacher_top1(teacher_logits)[:, None]
        if cfg.jm_outputs == "top_k":
            return J.teacher_top_k(teacher_logits, cfg.top_k)
        return J.all_outputs(teacher_logits)

    def _jacobian_outputs(self, logits: Tensor) -> Tensor:
        """Logits for the sq and normalized forms; log softmax(z/τ) for the ce form (§3)."""
        if self.config.jm_form == "ce":
            return F.log_softmax(logits / self.config.temperature, dim=1)
        return logits

    # ---- one step ------------------------------------------------------------------------

    def __call__(self, x: Tensor, y: Tensor, targets: dict[str, Tensor] | None = None
                 ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        cfg = self.config
        if not torch.isfinite(x).all():
            raise ValueError("the input batch contains NaN or Inf: check the data pipeline")
        noisy_only = cfg.noise_sigma > 0 and not (cfg.gamma or cfg.penalty or cfg.delta or cfg.delta_jacobian)
        if targets is None and cfg.needs_teacher and not noisy_only:
            targets = self.teacher_targets(x, y)
        elif targets is not None and cfg.gamma and "full_jac" in targets:
            # A cached full teacher Jacobian: this step's draws are contracted with it.
            draws = self._draws(x, targets["logits"].shape[1])
            targets = {**targets, "draws": draws, **self._contract_cached(targets["full_jac"], draws)}
        draws = targets.get("draws") if targets is not None else None

        wants_input_grad = (cfg.gamma > 0 and cfg.jm_outputs not in ("input_jvp", "input_fd")) \
            or cfg.penalty > 0 or cfg.delta_jacobian > 0
        xs = x.detach().requires_grad_(wants_input_grad)
        wants_at = cfg.delta > 0 or cfg.delta_jacobian > 0
        taps = FeatureTaps(self.student, self._student_layers) if wants_at else contextlib.nullcontext()
        terms: dict[str, Tensor] = {}
        with taps:
            if cfg.gamma and cfg.jm_outputs == "input_jvp":
                logits, tangent = J.jacobian_vector_product(self.student, xs, draws)
                logits = logits[:, 0]
            elif not noisy_only:  # noise training alone needs no forward pass on the clean batch
                logits = self.student(xs)

        if cfg.noise_sigma > 0:
            noisy = gaussian_noise(x, cfg.noise_sigma, cfg.noise_draws, antithetic=cfg.noise_antithetic,
                                   generator=self.generator)
            noisy_logits = self.student(noisy)
            if noisy_only:
                logits = noisy_logits[: x.shape[0]]
            if cfg.alpha:
                terms["ce"] = F.cross_entropy(noisy_logits, y.repeat(cfg.noise_draws))
            if cfg.beta:
                with torch.no_grad():
                    noisy_teacher = self.teacher(noisy)
                terms["kd"] = kd_loss(noisy_logits, noisy_teacher, cfg.temperature, cfg.kd_form)
        else:
            if cfg.alpha:
                terms["ce"] = F.cross_entropy(logits, y)
            if cfg.beta:
                terms["kd"] = kd_loss(logits, targets["logits"], cfg.temperature, cfg.kd_form)

        if cfg.gamma:
            terms["jm"] = self._jacobian_matching(logits, xs, targets, draws,
                                                  tangent if cfg.jm_outputs == "input_jvp" else None)
        if wants_at:
            feats = [taps[n] for n in self._student_layers]
            if cfg.delta:
                terms["at"] = attention_transfer_loss(
                    feats, [targets[f"at{j}"] for j in range(len(feats))])
            if cfg.delta_jacobian:
                s_jac = []
                for j, feat in enumerate(feats):
                    scalar = attention_map(feat).flatten(1).amax(dim=1)
                    s_jac.append(torch.autograd.grad(scalar.sum(), xs, create_graph=True)[0])
                terms["at_jm"] = sum(jacobian_matching_loss(s, targets[f"at_jac{j}"], "normalized")
                                     for j, s in enumerate(s_jac))
        if cfg.penalty:
            terms["penalty"] = self._penalty(logits, xs, y)

        weights = {"ce": cfg.alpha, "kd": cfg.beta, "jm": cfg.gamma, "at": cfg.delta,
                   "at_jm": cfg.delta_jacobian, "penalty": cfg.penalty}
        total = sum(weights[name] * value for name, value in terms.items())
        if not terms:
            raise ValueError("every weight of the objective is 0: set alpha, beta, gamma, ... ")
        return logits, total, terms

    def _draws(self, x: Tensor, num_outputs: int | None) -> Tensor:
        """This step's random vectors: output projections v [B, P, k] or input directions u."""
        cfg = self.config
        if cfg.jm_outputs == "projection":
            return J.output_projections(x.shape[0], num_outputs, cfg.num_projections, generator=self.generator,
                                        dtype=x.dtype, device=x.device)
        return J.input_directions(x, cfg.num_projections, generator=self.generator)

    def _contract_cached(self, full_jac: Tensor, draws: Tensor) -> dict[str, Tensor]:
        """``vᵀ J_T`` or ``J_T u`` from a cached full teacher Jacobian [B, k, *in]."""
        flat = full_jac.flatten(start_dim=2)
        if self.config.jm_outputs == "projection":
            drawn = torch.einsum("bpk,bkd->bpd", draws, flat).reshape(*draws.shape[:2], *full_jac.shape[2:])
        else:
            drawn = torch.einsum("bkd,bpd->bpk", flat, draws.flatten(start_dim=2))
        return {"drawn": drawn}

    def _jacobian_matching(self, logits: Tensor, xs: Tensor, targets: dict[str, Tensor],
                           draws: Tensor | None, tangent: Tensor | None) -> Tensor:
        cfg = self.config
        if cfg.jm_outputs in INDEX_OUTPUTS:
            s_jac = J.input_jacobian(self._jacobian_outputs(logits), xs, targets["index"], create_graph=True)
            return jacobian_matching_loss(s_jac, targets["jac"], cfg.jm_form, multiple_outputs=True,
                                          teacher_probs=targets.get("probs"))
        if cfg.jm_outputs == "projection":
            s_drawn = J.vector_jacobian_product(logits, xs, draws, create_graph=True)
            # E over v of ‖vᵀ(J_T − J_S)‖² = ‖J_T − J_S‖²_F (METHOD.md §3.1): mean over draws.
            loss = jacobian_matching_loss(s_drawn, targets["drawn"], cfg.jm_form, multiple_outputs=True)
            return loss / draws.shape[1]
        if cfg.jm_outputs == "input_fd":
            tangent = J.finite_difference_jvp(self.student, xs.detach(), draws, step=cfg.fd_step,
                                              outputs=logits)
        # E over u of ‖(J_T − J_S)u‖² = ‖J_T − J_S‖²_F: the k-vectors J u play the rows here.
        return (targets["drawn"] - tangent).pow(2).sum(dim=2).mean(dim=1).mean()

    def _penalty(self, logits: Tensor, xs: Tensor, y: Tensor) -> Tensor:
        cfg = self.config
        if cfg.penalty_form == "ce":
            log_p = F.log_softmax(logits, dim=1)
            return jacobian_penalty(J.input_jacobian(log_p, xs, y, create_graph=True), "ce")
        v = J.output_projections(xs.shape[0], logits.shape[1], cfg.num_projections,
                                 generator=self.generator, dtype=logits.dtype, device=logits.device)
        rows = J.vector_jacobian_product(logits, xs, v, create_graph=True)
        return jacobian_penalty(rows, "sq", multiple_outputs=True) / cfg.num_projections


def teacher_top1_gradient(teacher: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """The teacher's top-1 output per sample and its input-gradient there, with no graph:
    the teacher's side of :func:`jacobian_cosine`, which a caller may compute once."""
    xt = x.detach().requires_grad_()
    with torch.enable_grad():
        zt = teacher(xt)
        idx = J.teacher_top1(zt.detach())
        return idx, J.input_jacobian(zt, xt, idx).detach()


def jacobian_cosine(student: nn.Module, teacher: nn.Module, x: Tensor, index: Tensor | None = None,
                    teacher_side: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Per-sample cosine between teacher and student input-gradients of one output
    (the teacher's top-1 unless ``index`` is given): [B]. For evaluation, no graph kept.
    ``teacher_side``: the (index, gradient) of :func:`teacher_top1_gradient` for this x."""
    xs = x.detach().requires_grad_()
    if teacher_side is not None:
        idx, gt = teacher_side
    elif index is None:
        idx, gt = teacher_top1_gradient(teacher, x)
    else:
        xt = x.detach().requires_grad_()
        with torch.enable_grad():
            idx, gt = index, J.input_jacobian(teacher(xt), xt, index)
    with torch.enable_grad():
        gs = J.input_jacobian(student(xs), xs, idx)
    gt, gs = gt.flatten(1)[:, None], gs.flatten(1)[:, None]
    return (normalize_per_sample(gt) * normalize_per_sample(gs)).sum(dim=-1)[:, 0]
