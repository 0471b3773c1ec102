"""The split protocol, and the splits that read a source's samples in batches.

Every split the trainer, the teacher cache, evaluation and DDP see is a :class:`Split`
(the built-in in-memory :class:`~jacmatch.data.datasets.ImageSet` too):

- ``len(split)``, ``split.labels`` (int64 [N], known without decoding an image) and
  ``split.sample_shape`` (C, H, W);
- ``split.batch(index)``: float images in [0, 1] [B, C, H, W] and labels, for a list of
  indices;
- ``split.subset(index)``: a view on those samples (nothing is copied);
- ``split.batches(index_batches, keep=True)``: an epoch's batches in the order given, each
  ``(index, x, y)``, read ahead by a ``DataLoader``'s workers where decoding costs (and
  kept for the next epochs, within a budget, unless ``keep`` is false);
- ``split.bad``: the samples found unreadable so far (:class:`BadSamples`), or None for a
  split that cannot have any.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from .formats import DataError

__all__ = ["Split", "SampleSplit", "ArraySplit", "Fit", "Loading", "SampleCache", "BadSamples", "to_chw", "batch_by_batch"]


@runtime_checkable
class Split(Protocol):
    """What the loop, the teacher cache, evaluation and DDP read of a split of data."""

    labels: Tensor
    bad: BadSamples | None

    def __len__(self) -> int: ...

    @property
    def sample_shape(self) -> tuple[int, ...]: ...

    def batch(self, index) -> tuple[Tensor, Tensor]: ...

    def subset(self, index) -> Split: ...

    def batches(self, index_batches: Sequence[Sequence[int]], keep: bool = True
                ) -> Iterator[tuple[Tensor, Tensor, Tensor]]: ...


@dataclass
class Loading:
    """How a split reads its samples: ``workers`` decoding processes (0: in the training
    process), batches read ahead per worker, pinned memory (on CUDA), and what a sample
    that cannot be read does (``stop`` the run naming its file, or ``skip`` it)."""

    workers: int = 0
    prefetch: int = 2
    pin_memory: bool = False
    on_bad_sample: str = "stop"
    cache_bytes: int = 512 << 20  # decoded samples kept for the next epochs, up to this many bytes


class SampleCache:
    """Decoded samples by source index, up to a byte budget, owned by the splits of one
    source: a few-sample run decodes each file once, not once an epoch. Values are the
    decoded pixels as decoded, so a cached batch equals a decoded one bit for bit."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.samples: dict[int, Tensor] = {}

    def has(self, keys) -> bool:
        return all(k in self.samples for k in keys)

    def add(self, keys, raw: Tensor) -> None:
        for k, x in zip(keys, raw):
            size = x.numel() * x.element_size()
            if k not in self.samples and self.bytes + size <= self.max_bytes:
                self.samples[k] = x.clone()
                self.bytes += size


class BadSamples:
    """The samples found unreadable so far (``on_bad_sample=skip``), owned by the run that
    reads: each once, by source index, however often it was read. ``count`` and ``first``
    (the message of the one first in the source's order) are what one process reading
    every sample finds, once :meth:`add` has taken what the other processes found too."""

    def __init__(self):
        self.found: dict[int, str] = {}

    def add(self, found) -> None:
        """(source index, message) pairs, or another process's ``found``."""
        self.found.update(found)

    @property
    def count(self) -> int:
        return len(self.found)

    @property
    def first(self) -> str | None:
        return self.found[min(self.found)] if self.found else None


# ---- images as tensors ----------------------------------------------------------------------


#: PIL modes whose values are not intensities (palette indices, other colour spaces): converted.
_PIL_CONVERT = {"1": "L", "P": "RGB", "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB",
                "La": "LA", "RGBa": "RGBA", "RGBX": "RGB"}
#: Integer pixel types and the value that stands for 1.
PIXEL_RANGE = {torch.uint8: 255.0, torch.uint16: 65535.0}


def pil_pixels(image: Any, where: str) -> np.ndarray:
    """A PIL image's intensities as an array: palette and other colour modes converted (a
    palette with transparency to RGBA), 16-bit grey kept as uint16 (32-bit "I" images, as
    Pillow opens some 16-bit files, must hold values in 0..65535)."""
    mode = image.mode
    if mode in _PIL_CONVERT:
        target = "RGBA" if mode == "P" and "transparency" in image.info else _PIL_CONVERT[mode]
        return np.asarray(image.convert(target)).copy()
    if mode == "I" or mode.startswith("I;16"):
        a = np.asarray(image)
        if a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise DataError(f"{where} is a 32-bit integer image with values in [{int(a.min())}, {int(a.max())}]: "
                            "give 8- or 16-bit images")
        return a.astype(np.uint16)
    return np.asarray(image).copy()


def to_chw(image: Any, where: str) -> Tensor:
    """An image as a [C, H, W] tensor (uint8, uint16, or float in [0, 1]): a PIL image, a
    tensor [C, H, W] or [H, W], or an array [H, W], [H, W, C] or [C, H, W]."""
    if isinstance(getattr(image, "mode", None), str) and hasattr(image, "getbands"):  # PIL, without importing it
        image = pil_pixels(image, where)
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[-1] in (1, 3, 4) and image.shape[0] not in (1, 3, 4):
            image = image.transpose(2, 0, 1)  # H, W, C -> C, H, W
        image = torch.from_numpy(np.array(image) if not image.flags.writeable else np.ascontiguousarray(image))
    if not isinstance(image, Tensor):
        raise DataError(f"{where} is a {type(image).__name__}, not an image: return a PIL image, a tensor "
                        "[C, H, W] or an array [H, W, C]")
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise DataError(f"{where} has shape {tuple(image.shape)}, not [C, H, W]")
    if not (image.dtype in PIXEL_RANGE or image.dtype.is_floating_point):
        raise DataError(f"{where} has pixels of type {image.dtype}: give uint8 or uint16 pixels, or floats in [0, 1]")
    return image


@dataclass(frozen=True)
class Fit:
    """The data options every source applies to each decoded image [C, H, W]: ``channels``
    (1: grey by the ITU-R 601 luma Pillow uses, 3: grey repeated; an alpha channel dropped)
    and ``size`` (H, W), resized (``resize``) or resized on the short side and centre-cropped
    (``center_crop``), bilinear with antialiasing, in floats in [0, 1]."""

    channels: int | None = None
    size: tuple[int, int] | None = None
    how: str = "resize"

    def __call__(self, x: Tensor, where: str) -> Tensor:
        if self.channels is not None and x.shape[0] != self.channels:
            x = self._channels(x, where)
        if self.size is not None:  # every sample float in [0, 1], resized or not: one type in a batch
            x = x if x.is_floating_point() else x.float().div_(PIXEL_RANGE[x.dtype])
            if tuple(x.shape[1:]) != tuple(self.size):
                x = self._resized(x)
        return x

    def _channels(self, x: Tensor, where: str) -> Tensor:
        c = x.shape[0]
        if c in (2, 4):  # grey or RGB with alpha: the colour channels
            x, c = x[:c - 1], c - 1
        if c == self.channels:
            return x
        if c == 1 and self.channels == 3:
            return x.expand(3, *x.shape[1:]).clone()
        if c == 3 and self.channels == 1:
            if x.is_floating_point():
                return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
            wide = x.to(torch.int64)  # Pillow's integer luma, rounded: exact for grey pixels
            return ((wide[0] * 299 + wide[1] * 587 + wide[2] * 114 + 500) // 1000).to(x.dtype)[None]
        raise DataError(f"{where} has {x.shape[0]} channels: data.channels={self.channels} takes images of 1, 3 "
                        "(or with alpha, 2 and 4) channels")

    def _resized(self, x: Tensor) -> Tensor:
        import torch.nn.functional as F
        h, w = self.size
        if self.how == "center_crop":
            scale = max(h / x.shape[1], w / x.shape[2])
            mid = (max(h, round(x.shape[1] * scale)), max(w, round(x.shape[2] * scale)))
            x = F.interpolate(x[None], size=mid, mode="bilinear", antialias=True, align_corners=False)[0]
            top, left = (mid[0] - h) // 2, (mid[1] - w) // 2
            return x[:, top:top + h, left:left + w].clamp_(0, 1)
        return F.interpolate(x[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0].clamp_(0, 1)


def as_float(x: Tensor, where: str) -> Tensor:
    """Pixels as floats in [0, 1]: an integer type scaled by its range (uint8 by 255, uint16
    by 65535), floats as they are, refused (one line, the range found) outside [0, 1]."""
    if x.dtype in PIXEL_RANGE:
        return x.float().div_(PIXEL_RANGE[x.dtype])
    if not x.is_floating_point():
        raise DataError(f"{where} has pixels of type {x.dtype}: give uint8 or uint16 pixels, or floats in [0, 1]")
    x = x.float()
    if x.numel():
        lo, hi = float(x.min()), float(x.max())
        if not (lo >= 0 and hi <= 1):  # (NaN fails too)
            raise DataError(f"{where} has float pixels in [{lo:g}, {hi:g}], not in [0, 1]: scale them to [0, 1] "
                            "(8-bit values / 255), or give them as uint8")
    return x


def batch_by_batch(split, index_batches) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """``(index, x, y)`` for each batch of indices, in order, through ``split.batch``: the
    ``batches`` of a split whose samples need no decoding."""
    for idx in index_batches:
        index = torch.as_tensor(idx, dtype=torch.long)
        yield (index, *split.batch(index))


# ---- a split over a source: any map-style data set -------------------------------------------


class _Fetch(torch.utils.data.Dataset):
    """What a DataLoader worker runs: split index -> (index, image or None, label, error)."""

    def __init__(self, source, index: Tensor, shape: tuple[int, ...], fit: Fit = Fit()):
        self.source, self.index, self.shape, self.fit = source, index, shape, fit

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        j = int(self.index[i])
        label = int(self.source.labels[j])
        try:
            x = self.fit(to_chw(self.source[j][0], self.source.describe(j)), self.source.describe(j))
        except (OSError, ValueError, SyntaxError) as exc:  # PIL raises all three for damaged files
            return i, None, label, f"{self.source.describe(j)} cannot be read ({type(exc).__name__}: {exc})"
        if tuple(x.shape) != self.shape:
            return i, None, label, (f"{self.source.describe(j)} is {'x'.join(map(str, x.shape))}, the others "
                                    f"{'x'.join(map(str, self.shape))}: set data.image_size (and data.channels)")
        return i, x, label, None


def _collate(items):
    """(index, pixels as decoded, labels, errors as (index, message)); floats are made in
    the training process."""
    good = [it for it in items if it[1] is not None]
    bad = [(it[0], it[3]) for it in items if it[1] is None]
    index = torch.tensor([it[0] for it in good], dtype=torch.long)
    raw = torch.stack([it[1] for it in good]) if good else torch.zeros(0)
    return index, raw, torch.tensor([it[2] for it in good], dtype=torch.long), bad


class SampleSplit:
    """A split of a map-style source, as an index view (``subset`` copies nothing)."""

    def __init__(self, source, index: Tensor | None = None, shape: tuple[int, ...] | None = None,
                 loading: Loading | None = None, bad: BadSamples | None = None, cache: SampleCache | None = None,
                 fit: Fit = Fit()):
        self.source, self.fit = source, fit
        self.index = torch.arange(len(source)) if index is None else index
        self.labels = source.labels[self.index]
        self.loading = loading or Loading()
        self.bad = bad or BadSamples()
        self.cache = cache or SampleCache(self.loading.cache_bytes)
        self.sample_shape = shape if shape is not None else self._first_shape()

    def _first_shape(self) -> tuple[int, ...]:
        if not len(self.index):
            raise DataError("the data set has no samples")
        j = int(self.index[0])
        return tuple(self.fit(to_chw(self.source[j][0], self.source.describe(j)), self.source.describe(j)).shape)

    def __len__(self) -> int:
        return len(self.index)

    def subset(self, index) -> SampleSplit:
        return SampleSplit(self.source, self.index[torch.as_tensor(index, dtype=torch.long)], self.sample_shape,
                           self.loading, self.bad, self.cache, self.fit)

    def batch(self, index) -> tuple[Tensor, Tensor]:
        fetch = _Fetch(self.source, self.index, self.sample_shape, self.fit)
        _, raw, y, _ = self._checked(_collate([fetch[int(i)] for i in index]))
        return as_float(raw, self.where), y

    def batches(self, index_batches: Sequence[Sequence[int]], keep: bool = True) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """The batches in the order given: from the cache where it holds every sample of a
        batch, else decoded ahead by the loader's workers (and cached, within its budget,
        unless ``keep`` is false: a single pass such as the statistics')."""
        lo, cache = self.loading, self.cache if keep else SampleCache(0)
        wanted = [torch.as_tensor(list(b), dtype=torch.long) for b in index_batches]
        keys = [self.index[b].tolist() for b in wanted]
        cached = [cache.has(k) for k in keys]
        to_load = [b.tolist() for b, c in zip(wanted, cached) if not c]
        loaded = iter(torch.utils.data.DataLoader(
            _Fetch(self.source, self.index, self.sample_shape, self.fit), batch_sampler=to_load, num_workers=lo.workers,
            collate_fn=_collate, pin_memory=lo.pin_memory, prefetch_factor=lo.prefetch if lo.workers else None)) \
            if to_load else iter(())
        for b, k, hit in zip(wanted, keys, cached):
            if hit:
                yield b, as_float(torch.stack([cache.samples[j] for j in k]), self.where), self.labels[b]
                continue
            index, raw, y, _ = self._checked(next(loaded))
            cache.add(self.index[index].tolist(), raw)
            yield index, as_float(raw, self.where), y

    @property
    def where(self) -> str:
        """The source, as an error names it."""
        return getattr(self.source, "where", None) or str(getattr(self.source, "root", type(self.source).__name__))

    def _checked(self, item):
        bad = item[3]
        if bad:
            if self.loading.on_bad_sample != "skip":
                raise DataError(f"{bad[0][1]}; nothing after the last complete checkpoint is kept: fix or remove the "
                                "file, or set data.on_bad_sample=skip")
            self.bad.add([(int(self.index[i]), message) for i, message in bad])
        return item


class ArraySplit:
    """A split of arrays (a NumPy memmap: nothing is read until a batch asks for it)."""

    bad = None  # an array has no unreadable sample

    def __init__(self, images: np.ndarray, labels: Tensor, index: Tensor | None = None, where: str = "the arrays",
                 fit: Fit = Fit()):
        self.images, self.all_labels, self.where, self.fit = images, labels, where, fit
        self.index = torch.arange(len(labels)) if index is None else index
        self.labels = labels[self.index]
        first = torch.from_numpy(np.ascontiguousarray(images[:1]))
        self.sample_shape = tuple(fit(first[0], where).shape) if len(images) else tuple(images.shape[1:])

    def __len__(self) -> int:
        return len(self.index)

    def subset(self, index) -> ArraySplit:
        return ArraySplit(self.images, self.all_labels, self.index[torch.as_tensor(index, dtype=torch.long)], self.where,
                          self.fit)

    def batch(self, index) -> tuple[Tensor, Tensor]:
        rows = self.index[torch.as_tensor(index, dtype=torch.long)].numpy()
        raw = torch.from_numpy(np.ascontiguousarray(self.images[rows]))
        if self.fit != Fit():
            raw = torch.stack([self.fit(x, self.where) for x in raw]) if len(raw) else raw
        return as_float(raw, self.where), self.all_labels[rows]

    def batches(self, index_batches, keep: bool = True) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """``(index, x, y)`` for each batch, read from the map as it is asked for."""
        return batch_by_batch(self, index_batches)
