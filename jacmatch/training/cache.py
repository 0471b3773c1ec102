"""Teacher cache: the teacher's per-sample targets, computed once when inputs are fixed."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.objective import TransferObjective
from ..core.terms import TeacherTargets

__all__ = ["TeacherCache"]


class TeacherCache:
    """The teacher's side of ``objective`` for every training sample, by training index.

    One contract: ``cache(index, x, y)`` returns what
    ``objective.teacher_targets(x, y, full_jacobian=True)`` would (random estimators keep
    the full teacher Jacobian), computing only the samples not seen before; the objective
    takes it as ``objective(x, y, targets)`` and contracts it with each step's draws.

    Valid only while the student sees the same inputs every epoch (no augmentation): the
    teacher is frozen and in eval mode, so its targets for a sample never change. Filled
    lazily, batch by batch; stored on the training device.
    """

    def __init__(self, objective: TransferObjective, size: int, max_bytes: int = 2 << 30):
        self.objective = objective
        self.size = size
        self.max_bytes = max_bytes
        self.store: dict[tuple[str, str], Tensor] = {}
        self.filled = torch.zeros(size, dtype=torch.bool)

    def __call__(self, index: Tensor, x: Tensor, y: Tensor) -> TeacherTargets:
        """Targets for the batch ``x, y`` of training indices ``index`` [B] (on CPU)."""
        missing = (~self.filled[index]).nonzero().flatten()
        if len(missing):
            m = missing.to(x.device)
            self._store(index[missing], self.objective.teacher_targets(x[m], y[m], full_jacobian=True).tensors())
        dev_index = index.to(next(iter(self.store.values())).device)
        return TeacherTargets.from_tensors({name: value[dev_index] for name, value in self.store.items()})

    def _store(self, index: Tensor, fresh: dict[tuple[str, str], Tensor]) -> None:
        for name, value in fresh.items():
            if name not in self.store:
                need = value[0].numel() * value.element_size() * self.size
                if sum(t.numel() * t.element_size() for t in self.store.values()) + need > self.max_bytes:
                    raise MemoryError(f"teacher cache would need over {self.max_bytes >> 20} MiB")
                self.store[name] = torch.zeros((self.size, *value.shape[1:]), dtype=value.dtype, device=value.device)
            self.store[name][index.to(value.device)] = value
        self.filled[index] = True
