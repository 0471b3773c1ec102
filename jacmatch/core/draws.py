"""Random draws per sample that do not depend on how many processes share the batch.

Random estimators, noise and augmentation draw one value (or vector) per sample. Under
DDP each process sees only its share of the global batch; :class:`ShardedGenerator` makes
every process draw for the whole global batch and keep its own samples, so that the
number of processes changes nothing but speed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

__all__ = ["ShardedGenerator", "SelectedGenerator", "per_sample_draw", "drawn_part", "in_drawn_part"]


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


class SelectedGenerator:
    """A generator for the samples ``index`` of a batch of ``size``: each of them gets the
    draw that the whole batch's draw gives it, so that a part of a batch draws alike
    whichever samples it holds (and, over a :class:`ShardedGenerator`, however many
    processes share the batch)."""

    def __init__(self, generator: torch.Generator | ShardedGenerator, index: Tensor, size: int):
        self.generator, self.index, self.size = generator, index, size

    @property
    def device(self) -> torch.device:
        return self.generator.device


def per_sample_draw(draw: Callable[..., Tensor], shape: tuple[int, ...], *, batch_dim: int = 0,
                    generator: torch.Generator | ShardedGenerator | SelectedGenerator | None = None,
                    **kwargs) -> Tensor:
    """``draw(shape, generator=…, **kwargs)`` (``torch.randn``, ``torch.rand``, …) for a
    batch whose samples lie along ``batch_dim``; sharded when ``generator`` is, and for a
    part of the batch when it is a :class:`SelectedGenerator`."""
    if isinstance(generator, SelectedGenerator):
        if shape[batch_dim] != len(generator.index):
            raise ValueError(f"a draw for {shape[batch_dim]} samples from a generator of {len(generator.index)}")
        whole = (*shape[:batch_dim], generator.size, *shape[batch_dim + 1:])
        values = per_sample_draw(draw, whole, batch_dim=batch_dim, generator=generator.generator, **kwargs)
        return values.index_select(batch_dim, generator.index.to(values.device))
    if not isinstance(generator, ShardedGenerator):
        return draw(shape, generator=generator, **kwargs)
    full = list(shape)
    full[batch_dim] *= generator.world_size
    values = draw(tuple(full), generator=generator.generator, **kwargs)
    mine = torch.arange(generator.rank, full[batch_dim], generator.world_size, device=values.device)
    return values.index_select(batch_dim, mine)


_drawn_parts = [0]  # how many drawn-part passes are running (nested: one)


@contextlib.contextmanager
def drawn_part() -> Iterator[None]:
    """A pass over a drawn part of the batch: each process holds the samples it drew, so the
    processes' shares differ (a global BatchNorm then counts the samples of every process
    instead of assuming equal shares: :func:`in_drawn_part`)."""
    _drawn_parts[0] += 1
    try:
        yield
    finally:
        _drawn_parts[0] -= 1


def in_drawn_part() -> bool:
    """Whether a pass over a drawn part of the batch is running (:func:`drawn_part`)."""
    return _drawn_parts[0] > 0
