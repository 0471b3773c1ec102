"""Teacher cache: the teacher's per-sample targets, computed once when inputs are fixed."""

from __future__ import annotations

import hashlib
import time

import torch
import torch.distributed as dist
from torch import Tensor

from ..core.objective import TransferObjective
from ..core.terms import TeacherTargets
from ..data import Split
from ..data.formats import DataError
from ..errors import UsageError
from .distributed import DistInfo

__all__ = ["TeacherCache"]


class TeacherCache:
    """The teacher's side of ``objective`` for every training sample, by training index.

    One contract: ``cache(index, x, y)`` returns what ``objective.cache_targets(x, y)``
    gives for those samples (whatever the terms declare), and the objective takes it as
    ``objective(x, y, targets)`` with each step's draws.

    :meth:`fill` computes every sample before the first step, in fixed blocks of the
    training set's own order (samples ``0..b-1``, ``b..2b-1``, ...): under DDP each process
    computes a contiguous share of the blocks and receives the others' by broadcast. A
    sample's targets are then the same bits whatever the number of processes, the order
    the sampler deals samples in, or the epoch a run resumes at. Filled instead from each
    step's not-yet-seen samples, they were not: a teacher pass on a batch of another size
    may round differently (oneDNN's channels-last convolution on a batch of one does), and
    a max-pooling teacher on images with a flat background breaks its exact ties by those
    last bits, so its targets moved by O(1) between 1 and 2 processes.

    Valid only while the student sees the same inputs every epoch (no augmentation): the
    teacher is frozen and in eval mode, so its targets for a sample never change. Stored on
    the training device, at most ``max_bytes``.
    """

    def __init__(self, objective: TransferObjective, size: int, max_bytes: int = 2 << 30):
        self.objective = objective
        self.size = size
        self.max_bytes = max_bytes
        self.store: dict[tuple[str, str], Tensor] = {}
        self.filled = torch.zeros(size, dtype=torch.bool)
        self.fill_seconds = 0.0

    def fill(self, split: Split, block: int, device: torch.device, info: DistInfo | None = None) -> None:
        """Every sample of ``split`` (the training split the indices refer to), in blocks of
        ``block`` samples; this process computes blocks ``[r·K/W, (r+1)·K/W)`` of the K
        and receives the rest. A sample that cannot be read (``on_bad_sample=skip``)
        stays unfilled on every process, and is computed if a step reads it after all."""
        t_start = time.time()
        self._fill(split, block, device, info or DistInfo())
        self.fill_seconds = time.time() - t_start

    def _fill(self, split: Split, block: int, device: torch.device, info: DistInfo) -> None:
        blocks = [list(range(s, min(s + block, self.size))) for s in range(0, self.size, block)]
        share = [(len(blocks) * r // info.world_size, len(blocks) * (r + 1) // info.world_size)
                 for r in range(info.world_size)]
        first, end = share[info.rank]
        for index, x, y in split.batches(blocks[first:end]):
            if len(index):
                self._store(index, self._targets(x.to(device), y.to(device)))
        if not info.enabled:
            return
        if not self.store:  # a share with no block (or none readable) still receives the whole store
            self._allocate(split, device)
        filled = self.filled.to(device=device, dtype=torch.uint8)
        for r, (a, b) in enumerate(share):
            lo, hi = a * block, min(b * block, self.size)
            if lo < hi:
                for name in sorted(self.store):  # the same order in every process
                    dist.broadcast(self.store[name][lo:hi], src=r)
                dist.broadcast(filled[lo:hi], src=r)
        self.filled = filled.bool().cpu()

    def __call__(self, index: Tensor, x: Tensor, y: Tensor) -> TeacherTargets:
        """Targets for the batch ``x, y`` of training indices ``index`` [B] (on CPU). A
        sample :meth:`fill` did not compute (it could not be read then) is computed now."""
        missing = (~self.filled[index]).nonzero().flatten()
        if len(missing):
            m = missing.to(x.device)
            self._store(index[missing], self._targets(x[m], y[m]))
        dev_index = index.to(next(iter(self.store.values())).device)
        return TeacherTargets.from_tensors({name: value[dev_index] for name, value in self.store.items()})

    def _targets(self, x: Tensor, y: Tensor) -> dict[tuple[str, str], Tensor]:
        return self.objective.cache_targets(x, y).tensors()

    def _allocate(self, split: Split, device: torch.device) -> None:
        """The store's tensors, shaped from the first 8 samples' targets."""
        (index, x, y), = split.batches([list(range(min(8, self.size)))], keep=False)
        if not len(index):
            raise DataError("none of the first 8 training samples can be read: the teacher cache takes the shapes "
                            "of its targets from them (fix the files, or set teacher_cache=false)")
        for name, value in self._targets(x.to(device), y.to(device)).items():
            self._reserve(name, value)

    def _reserve(self, name: tuple[str, str], value: Tensor) -> None:
        need = value[0].numel() * value.element_size() * self.size
        have = sum(t.numel() * t.element_size() for t in self.store.values())
        if have + need > self.max_bytes:
            raise UsageError(f"the teacher cache would need over {(have + need) >> 20} MiB for {self.size} samples "
                             f"(at most {self.max_bytes >> 20} MiB): set teacher_cache=false, or "
                             "use an estimator that keeps one Jacobian row per sample "
                             "(objective.jm_outputs=teacher_top1)")
        self.store[name] = torch.zeros((self.size, *value.shape[1:]), dtype=value.dtype, device=value.device)

    def _store(self, index: Tensor, fresh: dict[tuple[str, str], Tensor]) -> None:
        for name, value in fresh.items():
            if name not in self.store:
                self._reserve(name, value)
            self.store[name][index.to(value.device)] = value
        self.filled[index] = True

    def digest(self) -> dict:
        """What the cache holds, for a run's record: how many samples, and the SHA-256 of
        every stored tensor (names, shapes, dtypes and bytes, in name order). Equal digests:
        two runs distilled from the same teacher targets, bit for bit."""
        h = hashlib.sha256()
        for name in sorted(self.store):
            value = self.store[name].detach().contiguous().cpu()
            h.update(f"{name}{tuple(value.shape)}{value.dtype}".encode())
            h.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
        h.update(self.filled.numpy().tobytes())
        return {"samples": int(self.filled.sum()), "sha256": h.hexdigest()}
