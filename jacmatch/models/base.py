"""What every model of jacmatch shares: pixels in [0, 1], normalised inside the model."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["NormalizedInput"]


class NormalizedInput(nn.Module):
    """Holds the per-channel ``mean`` and ``std`` (buffers, saved with the weights) that
    the model subtracts and divides by, so that noise σ and input Jacobians stay in [0, 1]
    pixel units whatever the data set."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, in_channels, 1, 1))
        self.register_buffer("std", torch.ones(1, in_channels, 1, 1))

    def set_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean.copy_(torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.std.copy_(torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def normalized(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std
