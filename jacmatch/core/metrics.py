"""Metrics of a trained student against its teacher (docs/method.md, "Evaluation")."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import jacobian as J
from .losses import normalize_per_sample

__all__ = ["jacobian_cosine", "teacher_top1_gradient"]


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
