"""Metrics of a trained student against its teacher (docs/method.md, "Evaluation")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import jacobian as J
from .losses import normalize_per_sample

__all__ = ["jacobian_cosine", "teacher_top1_gradient", "top1_agreement", "teacher_student_kl", "interpolation_pairs"]


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


def top1_agreement(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Per sample, 1.0 where the student's top-1 class is the teacher's (fidelity; Stanton
    et al. 2021): how often the student predicts what its teacher predicts."""
    return (student_logits.argmax(1) == teacher_logits.argmax(1)).double()


def teacher_student_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Per sample, ``KL(softmax(z_T) ‖ softmax(z_S))`` in nats (τ = 1: the predictions
    themselves): how far the student's predictive distribution is from its teacher's."""
    log_t = F.log_softmax(teacher_logits.double(), dim=1)
    log_s = F.log_softmax(student_logits.double(), dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(dim=1)


def interpolation_pairs(n: int, count: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """``count`` fixed pairs of distinct samples (i, j) of a set of ``n`` and mixing weights
    λ ~ U(0, 1), from ``seed`` alone: every student is measured on the same points
    ``λ·x_i + (1 − λ)·x_j`` between test images."""
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, n, (count,), generator=g)
    j = (i + torch.randint(1, n, (count,), generator=g)) % n  # never i itself
    return i, j, torch.rand(count, generator=g)
