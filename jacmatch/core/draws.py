"""Random draws per sample that do not depend on how many processes share the batch.

Random estimators, noise and augmentation draw one value (or vector) per sample. Under
DDP each process sees only its share of the global batch; :class:`ShardedGenerator` makes
every process draw for the whole global batch and keep its own samples, so that the
number of processes changes nothing but speed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["ShardedGenerator", "per_sample_draw"]


class ShardedGenerator:
    """A generator for one of ``world_size`` processes that share a global batch.

    Every process draws for the whole global batch, from the same seed, and keeps its own
    samples: positions ``rank, rank + world_size, …`` of the global batch (the order in
    which ``DistributedSampler`` deals samples out). So each sample gets the same draw
    whatever the number of processes, and 1, 2 or 4 processes train the same weights.
    """

    def __init__(self, generator: torch.Generator, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.generator, self.rank, self.world_size = generator, rank, world_size

    @property
    def device(self) -> torch.device:
        return self.generator.device


def per_sample_draw(draw: Callable[..., Tensor], shape: tuple[int, ...], *, batch_dim: int = 0,
                    generator: torch.Generator | ShardedGenerator | None = None, **kwargs) -> Tensor:
    """``draw(shape, generator=…, **kwargs)`` (``torch.randn``, ``torch.rand``, …) for a
    batch whose samples lie along ``batch_dim``; sharded when ``generator`` is."""
    if not isinstance(generator, ShardedGenerator):
        return draw(shape, generator=generator, **kwargs)
    full = list(shape)
    full[batch_dim] *= generator.world_size
    values = draw(tuple(full), generator=generator.generator, **kwargs)
    mine = torch.arange(generator.rank, full[batch_dim], generator.world_size, device=values.device)
    return values.index_select(batch_dim, mine)
