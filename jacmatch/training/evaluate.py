"""Evaluation: clean accuracy, accuracy under Gaussian input noise, and beside a teacher
its fidelity (top-1 agreement and KL on clean, noisy and interpolated test points) and the
Jacobian cosine."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..core.metrics import (interpolation_pairs, jacobian_cosine, teacher_student_kl, teacher_top1_gradient,
                            top1_agreement)
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
        self._logits: dict = {}  # the teacher's logits on the points fidelity is measured at, by (key, points)

    def logits(self, key, points: tuple, compute) -> list:
        """The teacher's logits on ``points`` (clean, a noise σ, interpolations): kept for
        ``key``, as its gradients are; ``compute()`` when not known."""
        if key is None:
            return compute()
        if (key, points) not in self._logits:
            self._logits = {k: v for k, v in self._logits.items() if k[0] == key}  # one teacher and data at a time
            self._logits[(key, points)] = compute()
        return self._logits[(key, points)]

    def __call__(self, teacher: nn.Module, data: Split, device, n: int, batch_size: int, key=None) -> list:
        full_key = None if key is None else (key, n, batch_size, str(device))
        if full_key is not None and full_key == self._key:
            return self._sides
        sides = [teacher_top1_gradient(teacher, data.batch(idx)[0].to(device)) for idx in _batches(n, batch_size)]
        if full_key is not None:
            self._key, self._sides = full_key, sides
        return sides


def evaluate(model: nn.Module, data: Split, device, *, batch_size: int = 500, noise_sigmas=(0.1, 0.3),
             noise_seed: int = 0, teacher: nn.Module | None = None, cosine_samples: int = 1000,
             teacher_key=None, teacher_gradients: TeacherGradients | None = None, fidelity: bool = True,
             interpolations: int = 1000, interpolation_seed: int = 0) -> dict:
    """``acc``; ``noisy_acc`` {σ: accuracy on x + σ·N(0, I)} (σ in [0, 1] pixel units, the
    same noise for every model: seeded per σ). With a ``teacher``: ``fidelity``, the top-1
    agreement with the teacher and the mean KL(teacher ‖ student) at τ = 1, on the clean test
    points, under each noise σ (the same draws as ``noisy_acc``) and on ``interpolations``
    fixed points between pairs of test images (:func:`interpolation_pairs` of
    ``interpolation_seed``); ``jacobian_cosine``: the mean cosine between the teacher's and
    the model's input-gradients of the teacher's top-1 output, on ``cosine_samples``.

    ``teacher_key`` (hashable) names the teacher's weights and ``data``: calls that pass the
    same ``teacher_gradients`` and key reuse the teacher's side. None: always recompute."""
    was_training = model.training
    model.eval()
    noise = [(str(s), s, noise_seed + 7919 * i) for i, s in enumerate(noise_sigmas) if s > 0]
    try:
        out = {"acc": _accuracy(model, data, device, batch_size)}
        out["noisy_acc"] = {name: _accuracy(model, data, device, batch_size, s, torch.Generator().manual_seed(seed))
                            for name, s, seed in noise}
        memo = teacher_gradients or TeacherGradients()
        differ = _outputs_differ(model, teacher, data, device, lambda points, compute: memo.logits(
            teacher_key, points, compute)) if teacher is not None and teacher is not model else None
        if differ:
            out["teacher_not_compared"] = differ
            teacher = None
        if teacher is not None and teacher is not model and fidelity:
            measured = _fidelity(model, teacher, data, device, batch_size, noise, interpolations, interpolation_seed,
                                 lambda points, compute: memo.logits(teacher_key, points, compute))
            if measured is not None:  # (None: a teacher of other classes, whose outputs compare to none)
                out["fidelity"] = measured
        if teacher is not None and teacher is not model and cosine_samples > 0:
            n = min(cosine_samples, len(data))
            sides = (teacher_gradients or TeacherGradients())(teacher, data, device, n, batch_size, teacher_key)
            cosines = [jacobian_cosine(model, teacher, data.batch(idx)[0].to(device), teacher_side=side).cpu()
                       for idx, side in zip(_batches(n, batch_size), sides)]
            out["jacobian_cosine"] = float(torch.cat(cosines).mean())
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def _outputs_differ(model: nn.Module, teacher: nn.Module, data: Split, device, teacher_logits) -> str | None:
    """Why ``model`` and ``teacher`` cannot be compared (they have different numbers of
    outputs: a transfer's source teacher, or a teacher of other classes), or None."""
    for _, x, _ in data.batches([[k] for k in range(min(len(data), 64))]):
        if not len(x):  # (an unreadable sample)
            continue
        ks = model(x.to(device)).shape[-1]
        kt = teacher_logits(("first",), lambda x=x: teacher(x.to(device)).cpu()).shape[-1]
        if ks != kt:
            return (f"the teacher has {kt} outputs and the model {ks}: fidelity and the Jacobian cosine compare "
                    "outputs one to one, so neither is measured")
        return None
    return None


@torch.no_grad()
def _fidelity(model: nn.Module, teacher: nn.Module, data: Split, device, batch_size: int, noise: list,
              interpolations: int, seed: int, teacher_logits) -> dict | None:
    """Agreement and KL of ``model`` with ``teacher`` on the clean points, each noise σ (the
    draws of the accuracies under noise) and the interpolations; None when the two have
    different numbers of outputs: fidelity compares outputs one to one, so a teacher of
    other classes (a transfer's source teacher) has none."""
    teacher.eval()

    def measure(points: tuple, inputs) -> dict | None:
        xs = list(inputs())  # the batches, each as its model sees it
        zt = teacher_logits(points, lambda: [teacher(x.to(device)).cpu() for x in xs])
        zs = [model(x.to(device)).cpu() for x in xs]
        if not xs:  # no readable point: nothing measured (null, not NaN)
            return {"agreement": None, "kl": None, "points": 0}
        zs_all, zt_all = torch.cat(zs), torch.cat(zt)
        if zs_all.shape[1] != zt_all.shape[1]:
            return None
        return {"agreement": float(top1_agreement(zs_all, zt_all).mean()),
                "kl": float(teacher_student_kl(zs_all, zt_all).mean()), "points": len(zs_all)}

    def test_points(sigma: float = 0.0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        for _, x, _ in data.batches(list(_batches(len(data), batch_size))):
            if len(x):
                yield x + sigma * torch.randn(x.shape, generator=g) if sigma > 0 else x

    def between(count: int):
        i, j, lam = interpolation_pairs(len(data), count, seed)
        for part in _batches(count, batch_size):
            read = {}  # the pairs' readable samples by index (an unreadable one is absent)
            for index, x, _ in data.batches([torch.unique(torch.cat([i[part], j[part]])).tolist()]):
                read.update(zip(index.tolist(), x))
            kept = [k for k, (a, b) in enumerate(zip(i[part].tolist(), j[part].tolist())) if a in read and b in read]
            if kept:  # a pair with an unreadable sample is left out, and only that pair
                xi = torch.stack([read[int(i[part][k])] for k in kept])
                xj = torch.stack([read[int(j[part][k])] for k in kept])
                w = lam[part][kept].view(-1, *([1] * (xi.dim() - 1)))
                yield w * xi + (1 - w) * xj
    clean = measure(("clean",), test_points)
    if clean is None:
        return None
    out = {"clean": clean, "noisy": {name: measure(("noisy", name, seed), lambda s=s, seed=seed: test_points(s, seed))
                                     for name, s, seed in noise}}
    count = min(interpolations, len(data)) if len(data) > 1 else 0
    if count:
        out["interpolated"] = measure(("interpolated", count, seed), lambda: between(count))
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
