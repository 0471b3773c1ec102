"""The transfer losses of docs/method.md §3, as pure functions of tensors.

Every loss is per sample, summed over the matched outputs (or averaged over random
projections), averaged over the batch, and carries no weight: the weights α, β, γ, δ
live in :mod:`jacmatch.core.objective`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UsageError
from .draws import per_sample_draw

__all__ = [
    "normalize_per_sample",
    "jacobian_matching_loss",
    "jacobian_penalty",
    "kd_loss",
    "attention_map",
    "attention_transfer_loss",
    "noisy_distillation_loss",
    "noise_training_loss",
    "gaussian_noise",
]

JM_FORMS = ("normalized", "sq", "ce")


def _full(t: Tensor) -> Tensor:
    """float16/bfloat16 (autocast) up to float32; float32 and float64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _as_rows(jac: Tensor, name: str, multiple_outputs: bool) -> Tensor:
    """[B, *in] -> [B, 1, D]; with ``multiple_outputs``, [B, m, *in] -> [B, m, D]."""
    if jac.dim() < (3 if multiple_outputs else 2):
        raise UsageError(f"{name} must be {'[B, m, ...]' if multiple_outputs else '[B, ...]'}, "
                         f"got {tuple(jac.shape)}")
    if multiple_outputs:
        return jac.flatten(start_dim=2)
    return jac.flatten(start_dim=1).unsqueeze(1)


def normalize_per_sample(g: Tensor, eps: float = 1e-12) -> Tensor:
    """``ĝ = g / max(‖g‖₂, ε)`` over the last (flattened input) dimension of each sample
    and output row, g being [B, m, D] (docs/method.md §3): never one norm for the whole batch, never a NaN at a zero gradient."""
    return g / g.norm(dim=-1, keepdim=True).clamp_min(eps)


def _check_jacobians(student_jac: Tensor, teacher_jac: Tensor,
                     multiple_outputs: bool) -> tuple[Tensor, Tensor]:
    if student_jac.shape != teacher_jac.shape:
        raise UsageError(
            f"student_jac {tuple(student_jac.shape)} and teacher_jac {tuple(teacher_jac.shape)} differ "
            "in shape: take both at the same inputs and the same output index"
        )
    if torch.is_grad_enabled() and not student_jac.requires_grad:
        raise ValueError(
            "student_jac carries no graph, so the Jacobian term would train nothing: compute it "
            "with input_jacobian(..., create_graph=True) (or call this under torch.no_grad() to "
            "only measure)"
        )
    # The teacher is a fixed target: no gradient may flow into it (docs/method.md §3.2).
    return (_full(_as_rows(student_jac, "student_jac", multiple_outputs)),
            _full(_as_rows(teacher_jac.detach(), "teacher_jac", multiple_outputs)))


def jacobian_matching_loss(student_jac: Tensor, teacher_jac: Tensor, form: str = "normalized", *,
                           teacher_probs: Tensor | None = None, multiple_outputs: bool = False,
                           eps: float = 1e-12) -> Tensor:
    """Jacobian matching (docs/method.md §3, item 3): per sample, summed over rows, batch mean.

    ``student_jac`` and ``teacher_jac`` are [B, *in] (one matched output per sample), or
    [B, m, *in] with ``multiple_outputs=True`` (m matched outputs, or m projections).

    - ``"sq"``: ``Σ_c ‖∇T_c − ∇S_c‖²`` (Prop. 1; the weight γ plays the role of σ²).
    - ``"normalized"``: ``Σ_c ‖∇̂T_c − ∇̂S_c‖²`` with ``ĝ = g / max(‖g‖, ε)``; equals
      ``2 − 2 cos`` per row. The paper's practical loss.
    - ``"ce"``: ``½ Σ_i Tˢ_i ‖∇ log Sˢ_i − ∇ log Tˢ_i‖²``, the bounded completed-square
      form of the Prop. 1 cross-entropy term (§2). Here the Jacobians must be those of
      the log-probabilities ``log softmax(z/τ)`` at the matched outputs, and
      ``teacher_probs`` [B] or [B, m] holds the teacher's ``softmax(z_T/τ)`` there.
    """
    s, t = _check_jacobians(student_jac, teacher_jac, multiple_outputs)
    if form == "sq":
        per_row = (t - s).pow(2).sum(dim=2)
    elif form == "normalized":
        per_row = (normalize_per_sample(t, eps) - normalize_per_sample(s, eps)).pow(2).sum(dim=2)
    elif form == "ce":
        if teacher_probs is None:
            raise UsageError("form='ce' needs teacher_probs: the teacher's softmax probabilities "
                             "at the matched outputs, [B] or [B, m]")
        w = teacher_probs.detach().reshape(s.shape[0], -1)
        if w.shape[1] != s.shape[1]:
            raise UsageError(f"teacher_probs must have one entry per matched output ({s.shape[1]}), "
                             f"got {tuple(teacher_probs.shape)}")
        per_row = 0.5 * w * (s - t).pow(2).sum(dim=2)
    else:
        raise UsageError(f"unknown Jacobian matching form {form!r}: use one of {JM_FORMS}")
    return per_row.sum(dim=1).mean()


def jacobian_penalty(student_jac: Tensor, form: str, *, multiple_outputs: bool = False) -> Tensor:
    """Jacobian-norm penalty of Proposition 2 (docs/method.md §3, item 4).

    - ``"sq"``: ``Σ_c ‖∇S_c‖²``, the first-order part of squared-error noise training;
      ``student_jac`` holds the Jacobian rows of the outputs S.
    - ``"ce"``: ``½ Σ_i y_i ‖∇ log Sˢ_i‖²``, the first-order part of cross-entropy noise
      training; ``student_jac`` holds the input gradient of the label's log-probability.

    ``form`` has no default: it says what ``student_jac`` holds.
    """
    if torch.is_grad_enabled() and not student_jac.requires_grad:
        raise ValueError("student_jac carries no graph, so the penalty would train nothing: "
                         "compute it with create_graph=True")
    sq = _full(_as_rows(student_jac, "student_jac", multiple_outputs)).pow(2).sum(dim=2).sum(dim=1)
    if form == "sq":
        return sq.mean()
    if form == "ce":
        return 0.5 * sq.mean()
    raise UsageError(f"unknown penalty form {form!r}: use 'sq' or 'ce'")


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 8.0,
            form: str = "kl") -> Tensor:
    """Activation matching (docs/method.md §3, item 2).

    ``"kl"``: ``τ² · KL(softmax(z_T/τ) ‖ softmax(z_S/τ))`` (Hinton et al. 2015), batch mean.
    ``"mse"``: ``Σ_i (z_T,i − z_S,i)²`` on logits, summed over classes, batch mean.
    """
    if student_logits.shape != teacher_logits.shape:
        raise UsageError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    # Losses in float32 even under autocast: τ²·KL of bf16 log-probabilities is off by ~0.1.
    student_logits, teacher_logits = _full(student_logits), _full(teacher_logits.detach())
    if form == "kl":
        if temperature <= 0:
            raise UsageError(f"temperature τ must be > 0, got {temperature}")
        log_p_s = F.log_softmax(student_logits / temperature, dim=1)
        log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
        return temperature ** 2 * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    if form == "mse":
        return (student_logits - teacher_logits).pow(2).sum(dim=1).mean()
    raise UsageError(f"unknown KD form {form!r}: use 'kl' or 'mse'")


def attention_map(features: Tensor) -> Tensor:
    """``Q = Σ_channels |A|²`` of a feature map [B, C, H, W]: [B, H, W] (Zagoruyko & Komodakis)."""
    if features.dim() != 4:
        raise UsageError(f"attention maps need [B, C, H, W] feature maps, got {tuple(features.shape)}")
    return features.pow(2).sum(dim=1)


def attention_transfer_loss(student_features: Sequence[Tensor], teacher_features: Sequence[Tensor],
                            eps: float = 1e-12) -> Tensor:
    """``Σ_j ‖Q̂_S^j − Q̂_T^j‖₂`` over paired layers j, batch mean (docs/method.md §3, item 5).

    Each Q is flattened and L2-normalised per sample. Where a pair's spatial sizes differ,
    the larger map is average-pooled to the smaller one.
    """
    if len(student_features) != len(teacher_features) or not student_features:
        raise UsageError(f"attention transfer pairs layers: got {len(student_features)} student and "
                         f"{len(teacher_features)} teacher feature maps; list the same number of layers")
    total = 0.0
    for a_s, a_t in zip(student_features, teacher_features):
        q_s, q_t = attention_map(_full(a_s)), attention_map(_full(a_t.detach()))
        if q_s.shape[1:] != q_t.shape[1:]:
            size = (min(q_s.shape[1], q_t.shape[1]), min(q_s.shape[2], q_t.shape[2]))
            q_s = F.adaptive_avg_pool2d(q_s[:, None], size)[:, 0]
            q_t = F.adaptive_avg_pool2d(q_t[:, None], size)[:, 0]
        q_s = q_s.flatten(1)
        q_t = q_t.flatten(1)
        q_s = q_s / q_s.norm(dim=1, keepdim=True).clamp_min(eps)
        q_t = q_t / q_t.norm(dim=1, keepdim=True).clamp_min(eps)
        total = total + (q_s - q_t).norm(dim=1).mean()
    return torch.as_tensor(total)


# ---- Noise by Monte Carlo (docs/method.md §3, item 6): the quantities the propositions approximate


def gaussian_noise(inputs: Tensor, sigma: float, num_draws: int, *, antithetic: bool = False,
                   generator: torch.Generator | None = None) -> Tensor:
    """``x + ξ`` for M draws ``ξ = σu``, ``u ~ N(0, I)``: [M·B, *in], draw-major.

    With ``antithetic`` the second half of the draws is ``−ξ`` of the first (M even),
    which cancels every odd moment of ξ exactly.
    """
    if num_draws < 1 or (antithetic and num_draws % 2):
        raise UsageError(f"num_draws must be >= 1 (and even when antithetic), got {num_draws}")
    half = num_draws // 2 if antithetic else num_draws
    shape = (half, *inputs.shape)
    gen_device = generator.device if generator is not None else inputs.device
    xi = sigma * per_sample_draw(torch.randn, shape, batch_dim=1, generator=generator, dtype=inputs.dtype,
                                 device=gen_device).to(inputs.device)
    if antithetic:
        xi = torch.cat([xi, -xi])
    return (inputs.detach().unsqueeze(0) + xi).reshape(-1, *inputs.shape[1:])


def noisy_distillation_loss(student: Callable[[Tensor], Tensor], teacher: Callable[[Tensor], Tensor],
                            inputs: Tensor, sigma: float, num_draws: int = 1, *,
                            temperature: float = 8.0, form: str = "kl", antithetic: bool = False,
                            generator: torch.Generator | None = None) -> Tensor:
    """``E_ξ KD(T(x+ξ), S(x+ξ))`` by Monte Carlo over M draws: the left side of Prop. 1."""
    noisy = gaussian_noise(inputs, sigma, num_draws, antithetic=antithetic, generator=generator)
    with torch.no_grad():
        t = teacher(noisy)
    return kd_loss(student(noisy), t, temperature, form)


def noise_training_loss(student: Callable[[Tensor], Tensor], inputs: Tensor, labels: Tensor,
                        sigma: float, num_draws: int = 1, *, antithetic: bool = False,
                        generator: torch.Generator | None = None) -> Tensor:
    """``E_ξ CE(y, S(x+ξ))`` by Monte Carlo over M draws: the left side of Prop. 2."""
    noisy = gaussian_noise(inputs, sigma, num_draws, antithetic=antithetic, generator=generator)
    return F.cross_entropy(student(noisy), labels.repeat(num_draws))
