"""Batch augmentation on tensors: random crop with zero padding, horizontal flip."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.draws import per_sample_draw


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
