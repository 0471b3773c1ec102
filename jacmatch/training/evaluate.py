"""Evaluation: clean accuracy, accuracy under Gaussian input noise, Jacobian cosine."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..core.metrics import jacobian_cosine, teacher_top1_gradient
from ..data import Split

__all__ = ["evaluate", "TeacherGradients", "teacher_key"]


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield torch.arange(start, min(start + size, n))


@torch.no_grad()
def _accuracy(model: nn.Module, data: Split, device, batch_size: int, sigma: float = 0.0,
              generator: torch.Generator | None = None) -> float:
    correct = 0
    for _, x, y in data.batches(list(_batches(len(data), batch_size))):  # read ahead by the source's workers
        if not len(x):  # every sample of the batch unreadable (on_bad_sample=skip)
            continue
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator)
        correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
    return correct / max(len(data), 1)  # a sample skipped as unreadable counts as wrong


class TeacherGradients:
    """The teacher's side of the Jacobian cosine (its top-1 outputs and their input-gradients
    on the first samples of an evaluation set), kept for the last key it was asked for.

    Its owner decides how long it lives: a sweep of students of one teacher (an
    experiment) passes one to every run, so the teacher's gradients are computed once.
    The key names the teacher's weights and the data; without a key nothing is kept."""

    def __init__(self):
        self._key: tuple | None = None
        self._sides: list = []

    def __call__(self, teacher: nn.Module, data: Split, device, n: int, batch_size: int, key=None) -> list:
        full_key = None if key is None else (key, n, batch_size, str(device))
        if full_key is not None and full_key == self._key:
            return self._sides
        sides = [teacher_top1_gradient(teacher, data.batch(idx)[0].to(device)) for idx in _batches(n, batch_size)]
        if full_key is not None:
            self._key, self._sides = full_key, sides
        return sides


def evaluate(model: nn.Module, data: Split, device, *, batch_size: int = 500, noise_sigmas=(),
             noise_seed: int = 0, teacher: nn.Module | None = None, cosine_samples: int = 1000,
             teacher_key=None, teacher_gradients: TeacherGradients | None = None) -> dict:
    """``acc``; ``noisy_acc`` {σ: accuracy on x + σ·N(0, I)} (σ in [0, 1] pixel units, the
    same noise for every model: seeded per σ); ``jacobian_cosine``: the mean cosine between
    the teacher's and the model's input-gradients of the teacher's top-1 output.

    ``teacher_key`` (hashable) names the teacher's weights and ``data``: calls that pass the
    same ``teacher_gradients`` and key reuse the teacher's side. None: always recompute."""
    was_training = model.training
    model.eval()
    try:
        out = {"acc": _accuracy(model, data, device, batch_size)}
        out["noisy_acc"] = {str(s): _accuracy(model, data, device, batch_size, s,
                                              torch.Generator().manual_seed(noise_seed + 7919 * i))
                            for i, s in enumerate(noise_sigmas) if s > 0}
        if teacher is not None and teacher is not model and cosine_samples > 0:
            n = min(cosine_samples, len(data))
            sides = (teacher_gradients or TeacherGradients())(teacher, data, device, n, batch_size, teacher_key)
            cosines = [jacobian_cosine(model, teacher, data.batch(idx)[0].to(device), teacher_side=side).cpu()
                       for idx, side in zip(_batches(n, batch_size), sides)]
            out["jacobian_cosine"] = float(torch.cat(cosines).mean())
    finally:
        model.train(was_training)
    return out


def teacher_key(cfg) -> tuple:
    """Names a RunConfig's teacher weights (path, mtime, size) and the data that fix the
    test set: the key of :class:`TeacherGradients`, so that evaluation computes the
    teacher's side of the Jacobian cosine once per process."""
    weights = cfg.teacher or cfg.teacher_weights
    st = os.stat(weights)
    d = cfg.data
    return (str(Path(weights).resolve()), st.st_mtime_ns, st.st_size, d.name, d.data_dir,
            tuple(d.classes or ()), d.val_size, d.split_seed)
