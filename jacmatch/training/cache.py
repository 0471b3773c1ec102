"""Teacher cache: the teacher's per-sample targets, computed once when inputs are fixed."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["TeacherCache"]


class TeacherCache:
    """Per-sample tensors of :meth:`TransferObjective.teacher_targets`, by training index.

    Valid only while the student sees the same inputs every epoch (no augmentation): the
    teacher is frozen and in eval mode, so its targets for a sample never change. Filled
    lazily, batch by batch; stored on the training device.
    """

    def __init__(self, size: int, max_bytes: int = 2 << 30):
        self.size = size
        self.max_bytes = max_bytes
        self.store: dict[str, Tensor] = {}
        self.filled = torch.zeros(size, dtype=torch.bool)

    def get(self, index: Tensor, compute) -> dict[str, Tensor]:
        """Targets for ``index`` [B]; ``compute(missing_positions)`` fills what is new."""
        missing = (~self.filled[index]).nonzero().flatten()
        if len(missing):
            fresh = compute(missing)
            for name, value in fresh.items():
                if name not in self.store:
                    need = value[0].numel() * value.element_size() * self.size
                    if sum(t.numel() * t.element_size() for t in self.store.values()) + need > self.max_bytes:
                        raise MemoryError(f"teacher cache would need over {self.max_bytes >> 20} MiB")
                    self.store[name] = torch.zeros((self.size, *value.shape[1:]), dtype=value.dtype,
                                                   device=value.device)
                self.store[name][index[missing].to(value.device)] = value
            self.filled[index[missing]] = True
        dev_index = index.to(next(iter(self.store.values())).device) if self.store else index
        return {name: value[dev_index] for name, value in self.store.items()}
