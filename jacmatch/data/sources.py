"""Data sources behind one split protocol: a user's image folder, arrays on disk, any
map-style ``torch.utils.data.Dataset``, a Hugging Face ``datasets`` folder.

Every split the trainer, the teacher cache, evaluation and DDP see has the same small
surface (the built-in in-memory :class:`~jacmatch.data.datasets.ImageSet` too):

- ``len(split)``, ``split.labels`` (int64 [N], known without decoding an image) and
  ``split.sample_shape`` (C, H, W);
- ``split.batch(index)``: float images in [0, 1] [B, C, H, W] and labels, for a list of
  indices;
- ``split.subset(index)``: a view on those samples (nothing is copied);
- ``split.batches(index_batches, keep=True)``: an epoch's batches in the order given, each
  ``(index, x, y)``, read ahead by a ``DataLoader``'s workers where decoding costs (and
  kept for the next epochs, within a budget, unless ``keep`` is false).

A source is a map-style data set whose ``__getitem__`` returns ``(image, label)``, with
``labels`` and ``describe(i)`` (the file a sample came from, for errors). A new source is
one such class; :func:`open_source` names them.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._extras import require
from .._imports import import_callable
from .formats import DataError

__all__ = ["SampleSplit", "ArraySplit", "ImageFolder", "Loading", "SourceOptions", "open_source", "source_kind", "to_chw",
           "IMAGE_SUFFIXES", "SOURCE_FORMS"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SOURCE_FORMS = ("a built-in name", "a folder of class subfolders (or imagefolder:PATH)", "npz:PATH",
                "hf:PATH", "package.module:callable")


@dataclass
class SourceOptions:
    """What a source is read with (the defaults of DataConfig's fields of the same names)."""

    image_size: int | list | None = None  # H = W, or [H, W]: resize every image (needed when sizes differ)
    resize: str = "resize"                # resize | center_crop (short side to size, then the centre)
    channels: int | None = None           # 1 (grey) or 3 (RGB); default: the images' own
    image_column: str = "image"           # hf: the column of the images
    label_column: str = "label"           # hf: the column of the labels
    test_size: float = 0.2                # a source without a test split: this part of it is the test set
    mean: list | None = None              # per-channel pixel mean (default: streamed over the training pool)
    std: list | None = None               # per-channel pixel std (default: streamed)
    options: dict = field(default_factory=dict)  # keyword arguments of a package.module:callable


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


def to_chw(image: Any, where: str) -> Tensor:
    """An image as a [C, H, W] tensor (uint8, or float in [0, 1]): a PIL image, a tensor
    [C, H, W] or [H, W], or an array [H, W], [H, W, C] or [C, H, W]."""
    if hasattr(image, "mode") and hasattr(image, "size"):  # PIL, without importing it
        image = np.asarray(image).copy()
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
    if image.dtype == torch.bool or image.dtype.is_complex:
        raise DataError(f"{where} has dtype {image.dtype}: give uint8 pixels or floats in [0, 1]")
    return image


def _as_float(x: Tensor) -> Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def batch_by_batch(split, index_batches) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """``(index, x, y)`` for each batch of indices, in order, through ``split.batch``: the
    ``batches`` of a split whose samples need no decoding."""
    for idx in index_batches:
        index = torch.as_tensor(idx, dtype=torch.long)
        yield (index, *split.batch(index))


# ---- a split over a source: any map-style data set -------------------------------------------


class _Fetch(torch.utils.data.Dataset):
    """What a DataLoader worker runs: split index -> (index, image or None, label, error)."""

    def __init__(self, source, index: Tensor, shape: tuple[int, ...]):
        self.source, self.index, self.shape = source, index, shape

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        j = int(self.index[i])
        label = int(self.source.labels[j])
        try:
            x = to_chw(self.source[j][0], self.source.describe(j))
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
                 loading: Loading | None = None, bad: BadSamples | None = None, cache: SampleCache | None = None):
        self.source = source
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
        return tuple(to_chw(self.source[j][0], self.source.describe(j)).shape)

    def __len__(self) -> int:
        return len(self.index)

    def subset(self, index) -> SampleSplit:
        return SampleSplit(self.source, self.index[torch.as_tensor(index, dtype=torch.long)], self.sample_shape,
                           self.loading, self.bad, self.cache)

    def batch(self, index) -> tuple[Tensor, Tensor]:
        fetch = _Fetch(self.source, self.index, self.sample_shape)
        _, raw, y, _ = self._checked(_collate([fetch[int(i)] for i in index]))
        return _as_float(raw), y

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
            _Fetch(self.source, self.index, self.sample_shape), batch_sampler=to_load, num_workers=lo.workers,
            collate_fn=_collate, pin_memory=lo.pin_memory, prefetch_factor=lo.prefetch if lo.workers else None)) \
            if to_load else iter(())
        for b, k, hit in zip(wanted, keys, cached):
            if hit:
                yield b, _as_float(torch.stack([cache.samples[j] for j in k])), self.labels[b]
                continue
            index, raw, y, _ = self._checked(next(loaded))
            cache.add(self.index[index].tolist(), raw)
            yield index, _as_float(raw), y

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

    def __init__(self, images: np.ndarray, labels: Tensor, index: Tensor | None = None):
        self.images, self.all_labels = images, labels
        self.index = torch.arange(len(labels)) if index is None else index
        self.labels = labels[self.index]
        self.sample_shape = tuple(images.shape[1:])

    def __len__(self) -> int:
        return len(self.index)

    def subset(self, index) -> ArraySplit:
        return ArraySplit(self.images, self.all_labels, self.index[torch.as_tensor(index, dtype=torch.long)])

    def batch(self, index) -> tuple[Tensor, Tensor]:
        rows = self.index[torch.as_tensor(index, dtype=torch.long)].numpy()
        return _as_float(torch.from_numpy(np.ascontiguousarray(self.images[rows]))), self.all_labels[rows]

    def batches(self, index_batches, keep: bool = True) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """``(index, x, y)`` for each batch, read from the map as it is asked for."""
        return batch_by_batch(self, index_batches)


# ---- sources ---------------------------------------------------------------------------------


class ImageFolder(torch.utils.data.Dataset):
    """Class subfolders of image files, decoded with Pillow to ``channels`` (1: grey, 3:
    RGB) and, with ``size`` (H, W), resized (``resize``) or resized on the short side and
    centre-cropped (``center_crop``)."""

    def __init__(self, root: Path, classes: list[str] | None = None, size: tuple[int, int] | None = None,
                 channels: int | None = None, resize: str = "resize"):
        require("PIL", "images")
        self.root = root
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.classes = classes if classes is not None else found
        if not self.classes:
            raise DataError(f"{root} has no class subfolders: put each class's images in a folder of its own "
                            "(ROOT/CLASS/IMAGE.png)")
        files, labels = [], []
        for c, name in enumerate(self.classes):
            folder = root / name
            if not folder.is_dir():
                raise DataError(f"{root} has no class folder {name!r}, which the training set has")
            entries = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
            others = [p for p in entries if p.suffix.lower() not in IMAGE_SUFFIXES]
            if others:
                raise DataError(f"{others[0]} is not an image file ({others[0].suffix or 'no suffix'}): keep only "
                                f"images ({', '.join(IMAGE_SUFFIXES)}) in the class folders")
            if not entries:
                raise DataError(f"class folder {folder} holds no images")
            files += [str(p) for p in entries]  # strings: a tenth of a Path's memory, in every worker too
            labels += [c] * len(entries)
        self.files, self.labels = files, torch.tensor(labels, dtype=torch.long)
        self.size, self.resize = size, resize
        self.mode = {1: "L", 3: "RGB", None: None}[channels]
        self._check_headers()

    def _check_headers(self) -> None:
        """Every file opens as an image (its header only), and without ``size`` all share
        one size."""
        from PIL import Image
        sizes: dict[tuple[int, int], str] = {}
        modes = set()
        for path in self.files:
            try:
                with Image.open(path) as im:
                    sizes.setdefault(im.size, path)
                    modes.add(im.mode)
            except (OSError, ValueError, SyntaxError) as exc:
                raise DataError(f"{path} is not a readable image ({type(exc).__name__}: {exc}): fix or remove it") \
                    from None
            if self.size is None and len(sizes) > 1:
                (a, pa), (b, pb) = list(sizes.items())[:2]
                raise DataError(f"mixed image sizes: {pa} is {a[0]}x{a[1]}, {pb} is {b[0]}x{b[1]}: set "
                                "data.image_size (e.g. --image-size 32) to resize them")
        if self.mode is None:
            self.mode = "L" if modes <= {"L", "1", "I;16", "I", "F"} else "RGB"

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, i: int) -> str:
        return str(self.files[i])

    def __getitem__(self, i: int):
        from PIL import Image
        with Image.open(self.files[i]) as im:
            im = im.convert(self.mode)
            if self.size is not None and im.size != (self.size[1], self.size[0]):
                im = _resized(im, self.size, self.resize)
            return np.asarray(im).copy(), int(self.labels[i])

    def sha256(self, h) -> None:
        for path, label in zip(self.files, self.labels.tolist()):
            h.update(f"{Path(path).relative_to(self.root)}\0{label}\0".encode("utf-8", "surrogateescape"))
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)


def _resized(im, size: tuple[int, int], how: str):
    from PIL import Image
    h, w = size
    if how == "center_crop":
        scale = max(h / im.size[1], w / im.size[0])
        im = im.resize((max(w, round(im.size[0] * scale)), max(h, round(im.size[1] * scale))), Image.BILINEAR)
        left, top = (im.size[0] - w) // 2, (im.size[1] - h) // 2
        return im.crop((left, top, left + w, top + h))
    return im.resize((w, h), Image.BILINEAR)


class UserDataset(torch.utils.data.Dataset):
    """A user's map-style data set of ``(image, label)`` pairs, with its labels read once
    (``targets`` or ``labels`` when it has them, else from its samples)."""

    def __init__(self, dataset, where: str):
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise DataError(f"{where} is a {type(dataset).__name__}, not a data set: return a map-style "
                            "torch.utils.data.Dataset of (image, label), or a (train, test) pair of them")
        self.dataset, self.where = dataset, where
        known = next((getattr(dataset, a) for a in ("targets", "labels") if hasattr(dataset, a)), None)
        labels = known if known is not None else [self._label(i) for i in range(len(dataset))]
        try:
            self.labels = torch.as_tensor(np.asarray(labels))
        except (TypeError, ValueError):
            raise DataError(f"{where}'s labels are not numbers: return (image, class index) pairs") from None
        if len(self.labels) != len(dataset):
            raise DataError(f"{where} has {len(dataset)} samples but {len(self.labels)} labels")

    def _label(self, i: int):
        item = self.dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise DataError(f"{self.where}[{i}] is a {type(item).__name__}, not an (image, label) pair")
        label = item[1]
        return label.item() if isinstance(label, Tensor) and label.numel() == 1 else label

    def __len__(self) -> int:
        return len(self.dataset)

    def describe(self, i: int) -> str:
        return f"{self.where}[{i}]"

    def __getitem__(self, i: int):
        return self.dataset[i][0], int(self.labels[i])


class HFDataset(torch.utils.data.Dataset):
    """A Hugging Face ``datasets.Dataset`` with an image and a label column."""

    def __init__(self, dataset, image_column: str, label_column: str, where: str):
        for column, option in ((image_column, "image_column"), (label_column, "label_column")):
            if column not in dataset.column_names:
                raise DataError(f"{where} has no column {column!r} (its columns: {dataset.column_names}): set "
                                f"data.{option}")
        self.dataset, self.image_column, self.where = dataset, image_column, where
        self.labels = torch.as_tensor(np.asarray(dataset[label_column]))
        feature = dataset.features[label_column]
        self.num_classes = len(feature.names) if hasattr(feature, "names") else None

    def __len__(self) -> int:
        return len(self.dataset)

    def describe(self, i: int) -> str:
        return f"{self.where} row {i}"

    def __getitem__(self, i: int):
        return self.dataset[i][self.image_column], int(self.labels[i])


# ---- arrays on disk, memory-mapped ------------------------------------------------------------

_ARRAY_NAMES = (("train_images", "train_labels", "test_images", "test_labels"), ("x_train", "y_train", "x_test", "y_test"))


def _npz_member(path: Path, zf: zipfile.ZipFile, name: str) -> np.ndarray:
    """A member of an .npz, memory-mapped when stored uncompressed (else read)."""
    info = zf.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        return np.load(zf.open(name))
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
        f.seek(start)
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        offset = f.tell()
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C", offset=offset)


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz file or a folder of .npy files, memory-mapped."""
    try:
        if path.is_dir():
            return {p.stem: np.load(p, mmap_mode="r") for p in sorted(path.glob("*.npy"))}
        with zipfile.ZipFile(path) as zf:
            return {n[:-4]: _npz_member(path, zf, n) for n in zf.namelist() if n.endswith(".npy")}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is not a readable .npz file or folder of .npy files ({exc})") from None


def _array_splits(path: Path) -> tuple[np.ndarray, Tensor, np.ndarray | None, Tensor | None]:
    arrays = read_arrays(path)
    names = next((n for n in _ARRAY_NAMES if n[0] in arrays and n[1] in arrays), None)
    if names is None and {"images", "labels"} <= set(arrays):
        names = ("images", "labels", "", "")
    if names is None:
        raise DataError(f"{path} holds {sorted(arrays)}: name the arrays train_images, train_labels, test_images, "
                        "test_labels (or x_train, y_train, x_test, y_test; or images, labels)")

    def images(a: np.ndarray, key: str) -> np.ndarray:
        if a.ndim == 3:
            a = a[:, None]
        if a.ndim != 4:
            raise DataError(f"{path}: {key} has shape {a.shape}, not [N, C, H, W], [N, H, W] or [N, H, W, C]")
        if a.shape[-1] in (1, 3, 4) and a.shape[1] not in (1, 3, 4):
            raise DataError(f"{path}: {key} is [N, H, W, C] {a.shape}; store it as [N, C, H, W] so that it can "
                            "be memory-mapped as it is (np.transpose(a, (0, 3, 1, 2)))")
        return a

    def labels(key: str, n: int) -> Tensor:
        y = np.asarray(arrays[key])
        if y.shape != (n,):
            raise DataError(f"{path}: {key} has shape {y.shape}, the images {n}")
        return torch.from_numpy(y.copy())
    train = images(arrays[names[0]], names[0])
    test = images(arrays[names[2]], names[2]) if names[2] in arrays else None
    return (train, labels(names[1], len(train)), test,
            labels(names[3], len(test)) if test is not None else None)


# ---- naming a source -------------------------------------------------------------------------

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def source_kind(name: str) -> tuple[str, str]:
    """``(kind, argument)`` of a data set name: ``builtin``, ``imagefolder``, ``npz``,
    ``hf`` or ``import``."""
    for prefix in ("imagefolder", "npz", "hf"):
        if name.startswith(prefix + ":"):
            return prefix, name[len(prefix) + 1:]
    if _IMPORT_PATH.match(name) and not Path(name).exists():
        return "import", name
    path = Path(name).expanduser()
    if path.is_dir():
        return ("npz" if any(path.glob("*.npy")) and not any(p.is_dir() for p in path.iterdir()) else
                "imagefolder"), name
    if path.suffix in (".npz",) and path.is_file():
        return "npz", name
    return "builtin", name


def _sha256_files(paths: Iterable[Path], root: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{p.relative_to(root)}\0".encode("utf-8", "surrogateescape"))
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


@dataclass
class Opened:
    """What a source gives the splitter: train and test splits (test None: drawn from
    train), the class count, whether flips preserve classes, and the data hash."""

    train: Any
    test: Any
    num_classes: int
    sha256: str
    hflip: bool = False


def open_source(name: str, d, loading: Loading) -> Opened:
    """The splits of a non-built-in data set ``name``, with the options of DataConfig ``d``."""
    kind, arg = source_kind(name)
    size = None if d.image_size is None else (tuple(d.image_size) if isinstance(d.image_size, list)
                                               else (d.image_size, d.image_size))
    if kind == "imagefolder":
        return _open_folder(Path(arg).expanduser(), size, d, loading)
    if kind == "npz":
        path = Path(arg).expanduser()
        if not path.exists():
            raise DataError(f"{path} does not exist: pass an .npz file or a folder of .npy files")
        train_x, train_y, test_x, test_y = _array_splits(path)
        files = sorted(path.glob("*.npy")) if path.is_dir() else [path]
        digest = _sha256_files(files, path if path.is_dir() else path.parent)
        k = int(max(int(train_y.max()), int(test_y.max()) if test_y is not None else 0)) + 1
        return Opened(ArraySplit(train_x, train_y), ArraySplit(test_x, test_y) if test_x is not None else None,
                      k, digest)
    if kind == "hf":
        return _open_hf(Path(arg).expanduser(), d, loading)
    if kind == "import":
        return _open_import(arg, d, loading)
    raise DataError(f"unknown data set {name!r}: give {', '.join(SOURCE_FORMS)}")


def _open_folder(root: Path, size, d, loading: Loading) -> Opened:
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    parts = {p.name: p for p in root.iterdir() if p.is_dir()}
    test_dir = parts.get("test") or parts.get("val")
    train_root = parts["train"] if "train" in parts and test_dir is not None else root
    train = ImageFolder(train_root, None, size, d.channels, d.resize)
    channels = 1 if train.mode == "L" else 3  # the test images as the training images
    test = ImageFolder(test_dir, train.classes, size, channels, d.resize) if train_root is not root else None
    h = hashlib.sha256()
    for part in (train, test) if test is not None else (train,):
        part.sha256(h)
    shape = tuple(to_chw(train[0][0], train.describe(0)).shape)
    return Opened(SampleSplit(train, shape=shape, loading=loading),
                  SampleSplit(test, shape=shape, loading=loading) if test is not None else None,
                  len(train.classes), h.hexdigest())


def _open_hf(path: Path, d, loading: Loading) -> Opened:
    require("datasets", "hf")
    import datasets
    if not path.exists():
        raise DataError(f"Hugging Face data set {path} does not exist (a datasets.save_to_disk folder, or a "
                        ".parquet, .json or .csv data file)")
    builders = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}
    try:
        if path.is_file() and path.suffix in builders:  # a data file: one split, the test set drawn from it
            loaded = datasets.load_dataset(builders[path.suffix], data_files=str(path), split="train")
        else:
            loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{path} is not a datasets.save_to_disk folder or data file ({str(exc).splitlines()[0]})") \
            from None
    splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    if "train" not in splits:
        raise DataError(f"{path} has splits {sorted(splits)}, none named train")
    test_name = next((s for s in ("test", "validation", "val") if s in splits), None)
    train = HFDataset(splits["train"], d.image_column, d.label_column, f"{path} (train)")
    test = HFDataset(splits[test_name], d.image_column, d.label_column, f"{path} ({test_name})") if test_name else None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    k = train.num_classes or int(max(int(train.labels.max()), int(test.labels.max()) if test else 0)) + 1
    shape = tuple(to_chw(train[0][0], train.describe(0)).shape)
    return Opened(SampleSplit(train, shape=shape, loading=loading),
                  SampleSplit(test, shape=shape, loading=loading) if test else None, k,
                  _sha256_files(files, path.parent if path.is_file() else path))


def _open_import(spec: str, d, loading: Loading) -> Opened:
    made = import_callable(spec, "data set", DataError)(**d.options)
    if isinstance(made, dict):
        if "train" not in made:
            raise DataError(f"data set {spec!r} returned a dict without 'train' (keys: {sorted(made)})")
        made = (made["train"], made.get("test", made.get("val")))
    train, test = made if isinstance(made, (tuple, list)) and len(made) == 2 else (made, None)
    train = UserDataset(train, f"{spec} (train)")
    test = UserDataset(test, f"{spec} (test)") if test is not None else None
    h = hashlib.sha256()
    shape = tuple(to_chw(train[0][0], train.describe(0)).shape)
    splits = [SampleSplit(part, shape=shape, loading=loading) for part in (train, test) if part is not None]
    for split in splits:  # the data hash streams every sample once
        for start in range(0, len(split), 256):
            x, y = split.batch(range(start, min(start + 256, len(split))))
            h.update(x.numpy().tobytes())
            h.update(y.numpy().tobytes())
    classes = getattr(train.dataset, "classes", None)
    k = len(classes) if classes is not None else int(max(int(s.labels.max()) for s in splits)) + 1
    return Opened(splits[0], splits[1] if test is not None else None, k, h.hexdigest())
