"""What every model of jacmatch shares: pixels in [0, 1], normalised inside the model;
the classifier skeleton of the built-in families, and their residual stage builder."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from ..errors import UsageError

__all__ = ["NormalizedInput", "Classifier", "residual_stages"]


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


class Classifier(NormalizedInput):
    """Normalise, ``features`` (a Sequential of named stages), pool, ``classifier``."""

    feature_names: tuple[str, ...] = ()

    def __init__(self, num_classes: int, in_channels: int):
        super().__init__(in_channels)
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.mean.shape[1]:
            raise UsageError(f"{type(self).__name__} expects images [B, {self.mean.shape[1]}, H, W], "
                             f"got {tuple(x.shape)}")
        return self.head(self.body(self.normalized(x)))

    def body(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def head(self, h: Tensor) -> Tensor:
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


def residual_stages(block: Callable[[int, int, int], nn.Module], widths: Sequence[int], blocks: int
                    ) -> tuple[list[nn.Sequential], int]:
    """The stages of a CIFAR ResNet or WRN: one per width after the first (the stem's), each
    of ``blocks`` blocks ``block(cin, cout, stride)``; every stage after the first starts
    with stride 2. Returns the stages and the last width."""
    cin, stages = widths[0], []
    for i, w in enumerate(widths[1:]):
        stages.append(nn.Sequential(*[block(cin if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1)
                                      for j in range(blocks)]))
        cin = w
    return stages, cin
