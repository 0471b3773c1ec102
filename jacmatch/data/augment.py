"""Batch augmentation on tensors: random crop with zero padding, horizontal flip, mixup
and CutMix."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.draws import ShardedGenerator, per_sample_draw

__all__ = ["random_crop_flip", "mix"]


def random_crop_flip(x: Tensor, padding: int, hflip: bool, generator: torch.Generator) -> Tensor:
    """Pad each image by ``padding`` and crop back at a random offset; flip left-right with
    probability ½ when ``hflip`` (only where flips preserve the classes)."""
    b, _, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding,) * 4)
        shift = functools.partial(torch.randint, 0, 2 * padding + 1)
        dy = per_sample_draw(shift, (b,), generator=generator)
        dx = per_sample_draw(shift, (b,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None]).to(x.device)   # [B, H]
        cols = (dx[:, None] + torch.arange(w)[None]).to(x.device)   # [B, W]
        x = padded[torch.arange(b, device=x.device)[:, None, None, None],
                   torch.arange(x.shape[1], device=x.device)[None, :, None, None],
                   rows[:, None, :, None], cols[:, None, None, :]]
    if hflip:
        flip = (per_sample_draw(torch.rand, (b,), generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def mix(x: Tensor, y: Tensor, num_classes: int, mixup: float, cutmix: float, generator,
        gather: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Mixup and CutMix (Beta(α, α) weights, α = ``mixup`` / ``cutmix``; 0 is off; with both,
    each sample takes one of them at random): each sample is mixed with a partner drawn from
    the global batch, and its label becomes the mixture of the two one-hot labels, by area
    for CutMix. Returns (mixed images, soft labels [B, K]).

    Every draw is per sample of the global batch, from one seed (``generator``, sharded
    under DDP): ``gather`` gives the global batch in the order the draws index it (the
    processes' shares interleaved, as DistributedSampler deals them), so 1 and 2 processes
    mix the same pairs with the same weights."""
    b = x.shape[0]
    base = generator.generator if isinstance(generator, ShardedGenerator) else generator
    world, rank = (generator.world_size, generator.rank) if isinstance(generator, ShardedGenerator) else (1, 0)
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=base)))  # one seed for the global batch
    g, mine = b * world, np.arange(rank, b * world, world)
    xg, yg = (gather(x), gather(y)) if gather is not None else (x, y)
    partner = torch.from_numpy(rng.integers(0, g, g)[mine]).to(x.device)
    lam = rng.beta(mixup, mixup, g) if mixup > 0 else np.ones(g)
    use_cut = (rng.random(g) < 0.5) if mixup > 0 and cutmix > 0 else np.full(g, cutmix > 0)
    cut_lam = rng.beta(cutmix, cutmix, g) if cutmix > 0 else np.ones(g)
    centres = rng.random((g, 2))
    lam, use_cut, cut_lam, centres = lam[mine], use_cut[mine], cut_lam[mine], centres[mine]
    h, w = x.shape[-2:]
    keep = torch.ones(b, 1, h, w, dtype=x.dtype, device=x.device)  # 1 where the sample keeps its own pixels
    weight = np.empty(b)
    for i in range(b):
        if use_cut[i]:  # a box of area (1 − λ) of the image, clipped at the borders: λ becomes its exact share
            ch, cw = int(h * np.sqrt(1 - cut_lam[i])), int(w * np.sqrt(1 - cut_lam[i]))
            cy, cx = int(centres[i, 0] * h), int(centres[i, 1] * w)
            top, bottom, left, right = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
            keep[i, :, top:bottom, left:right] = 0
            weight[i] = 1 - (bottom - top) * (right - left) / (h * w)
        else:
            keep[i] = float(lam[i])
            weight[i] = lam[i]
    mixed = keep * x + (1 - keep) * xg[partner]
    w_t = torch.as_tensor(weight, dtype=torch.float32, device=x.device)[:, None]
    soft = w_t * F.one_hot(y, num_classes).float() + (1 - w_t) * F.one_hot(yg[partner], num_classes).float()
    return mixed, soft
