"""The optimiser, its learning-rate schedule, and each epoch's batches of indices."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DistributedSampler

from .config import OptimConfig
from .distributed import DistInfo

__all__ = ["lr_factor", "make_optimizer", "make_scheduler", "epoch_batches", "seed_of", "steps_per_epoch",
           "planned_epochs"]


def seed_of(*parts: int) -> int:
    """A seed derived from ``parts`` (a run's seed, its epoch, a rank, a stream's number)."""
    return int.from_bytes(str(parts).encode(), "little") % (2**61 - 1)


def steps_per_epoch(n: int, o: OptimConfig) -> int:
    """Optimizer steps in an epoch over ``n`` training samples: whole passes over the data
    (global batches) up to ``min_steps_per_epoch``; the same for any number of processes."""
    per_pass = max(math.ceil(n / o.batch_size), 1)
    return per_pass * max(math.ceil(o.min_steps_per_epoch / per_pass), 1)


def planned_epochs(o: OptimConfig, n: int) -> int:
    """The epochs a run over ``n`` training samples trains at most: ``o.epochs``, fewer when
    ``o.max_steps`` ends it first (whole epochs, at least one)."""
    if not o.max_steps:
        return o.epochs
    return min(o.epochs, max(o.max_steps // steps_per_epoch(n, o), 1))


def lr_factor(optim_cfg: OptimConfig, epochs: int | None = None):
    """Learning-rate factor per epoch: cosine, step (milestones) or constant, over ``epochs``
    (default ``optim_cfg.epochs``: the epochs the run trains, :func:`planned_epochs`). A plain
    function, so the scheduler's state holds nothing but numbers."""
    epochs, schedule, decay = epochs or optim_cfg.epochs, optim_cfg.schedule, optim_cfg.lr_decay
    milestones = tuple(optim_cfg.milestones)

    def factor(epoch: int) -> float:
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        if schedule == "step":
            return decay ** sum(epoch >= m for m in milestones)
        return 1.0
    return factor


def make_optimizer(o: OptimConfig, params):
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                               nesterov=o.nesterov and o.momentum > 0)
    return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)


def epoch_batches(n: int, o: OptimConfig, seed: int, info: DistInfo, epoch: int) -> list[list[int]]:
    """This rank's batches of training indices for ``epoch``; the global batch of step j
    is the union of the ranks' j-th batches (DistributedSampler interleaves ranks)."""
    local = max(o.batch_size // info.world_size, 1)
    per_pass = max(math.ceil(n / o.batch_size), 1)
    passes = steps_per_epoch(n, o) // per_pass
    sampler = DistributedSampler(range(n), num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=seed, drop_last=False)
    batches = []
    for p in range(passes):
        sampler.set_epoch(epoch * passes + p)
        order = list(sampler)
        batches += [order[i:i + local] for i in range(0, len(order), local)]
    return batches


def make_scheduler(optimizer: torch.optim.Optimizer, o: OptimConfig, epochs: int | None = None
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(o, epochs))
