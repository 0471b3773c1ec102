"""Data sets by name, with validation splits and few-sample training sets.

``create_dataset("fashion-mnist", samples_per_class=10, seed=3)`` returns a
:class:`DataSplits`: train / val / test image sets held in memory, pixel values in
[0, 1] (normalisation happens inside the models, so that noise σ and input Jacobians
are in units of the [0, 1] pixel range), and the indices of the training samples chosen.

The validation split is drawn from the official training set with ``split_seed``, before
and independently of the few-sample subset, so hyperparameters are never chosen on the
test set and the validation set does not change with the training seed.
"""

from __future__ import annotations

import hashlib
import math
import os
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._extras import require
from ..errors import UsageError
from ..registry import Registry
from .formats import DataError, read_cifar_batch, read_idx, user_path
from .sources import SourceOptions, open_source, source_kind
from .splits import Loading, Split, as_float, batch_by_batch

__all__ = ["ImageSet", "DataSplits", "DATASETS", "create_dataset", "load_data", "dataset_kind", "dataset_name",
           "list_datasets",
           "register_dataset",
           "stratified_subset", "check_labels", "DEBIAN_FASHION_MNIST"]

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

#: Official addresses and the md5 of each gzipped file, checked after a download.
DOWNLOADS = {
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", {
        "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310"}),
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", {
        "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c"}),
}


@dataclass
class ImageSet:
    """Images (uint8, or float in [0, 1]) [N, C, H, W] and labels [N], in memory."""

    images: Tensor
    labels: Tensor
    bad = None  # (the Split protocol) samples in memory are never unreadable

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batch(self, index: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
        """Float images in [0, 1] and labels for the given sample indices."""
        return as_float(self.images[index], "the data set's images"), self.labels[index]

    def subset(self, index: Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def batches(self, index_batches, keep: bool = True) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """``(index, x, y)`` for each batch of indices, in the order given (``keep``: for
        the split protocol; everything is in memory already)."""
        return batch_by_batch(self, index_batches)


@dataclass
class DataSplits:
    name: str
    train: Split  # ImageSet in memory, or a split of a source (jacmatch.data.splits)
    val: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool = False            # whether horizontal flips preserve the classes
    train_indices: list[int] = field(default_factory=list)  # into the official training set
    val_indices: list[int] = field(default_factory=list)
    data_sha256: str = ""          # SHA-256 of every image and label the loader read (train and test files)

    @property
    def in_channels(self) -> int:
        return self.train.sample_shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train.sample_shape[1:])


# ---- loaders: each returns (train ImageSet, test ImageSet, num_classes, hflip) -------------


def _find_idx(data_dir: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (data_dir / name).is_file():
            return data_dir / name
    raise DataError(f"{data_dir} has no {stem}[.gz]: put the four IDX files there "
                    "(or pass --set data.download=true when online)")


def _download_idx(name: str, data_dir: Path) -> None:
    base, md5s = DOWNLOADS[name]
    data_dir.mkdir(parents=True, exist_ok=True)
    for stem, md5 in md5s.items():
        target = data_dir / f"{stem}.gz"
        if target.is_file() and hashlib.md5(target.read_bytes()).hexdigest() == md5:
            continue
        tmp = target.with_suffix(".gz.part")
        try:
            with urllib.request.urlopen(base + f"{stem}.gz", timeout=60) as response, open(tmp, "wb") as f:
                f.write(response.read())
        except OSError as exc:
            raise DataError(f"could not download {name} ({exc}): put the IDX files in {data_dir} by hand") from None
        got = hashlib.md5(tmp.read_bytes()).hexdigest()
        if got != md5:
            tmp.unlink()
            raise DataError(f"downloaded {stem}.gz has md5 {got}, expected {md5}: try again later")
        os.replace(tmp, target)


def _load_idx_set(name: str, data_dir: str | None, download: bool):
    candidates = [Path(data_dir)] if data_dir else []
    if name == "fashion-mnist" and not data_dir:
        candidates.append(Path(DEBIAN_FASHION_MNIST))
    if not data_dir:
        candidates.append(user_path(os.environ.get("JACMATCH_DATA", "~/.cache/jacmatch")) / name)
    chosen = next((d for d in candidates if d.is_dir() and any(d.glob("train-images*"))), None)
    if chosen is None and download:
        chosen = candidates[0] if data_dir else candidates[-1]
        _download_idx(name, chosen)
    if chosen is None:
        hint = " or `apt-get install dataset-fashion-mnist`" if name == "fashion-mnist" else ""
        raise DataError(f"no {name} files found in {', '.join(map(str, candidates))}: pass --set data.data_dir=DIR"
                        f"{hint}, or --set data.download=true when online")
    arrays = [read_idx(_find_idx(chosen, stem)) for stem in _IDX_FILES]
    train_x, train_y, test_x, test_y = arrays
    for x, y, split in ((train_x, train_y, "train"), (test_x, test_y, "t10k")):
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise DataError(f"{chosen}: {split} images {x.shape} and labels {y.shape} do not pair up")
        if y.size and (y.min() < 0 or y.max() > 9):
            raise DataError(f"{chosen}: {split} labels outside 0..9")
    to_set = lambda x, y: ImageSet(torch.from_numpy(np.ascontiguousarray(x[:, None])),  # noqa: E731
                                   torch.from_numpy(y.astype(np.int64)))
    return to_set(train_x, train_y), to_set(test_x, test_y), 10, False


def _load_cifar(num_classes: int):
    def load(data_dir: str | None, download: bool):
        if not data_dir:
            raise DataError(f"cifar{num_classes} needs --set data.data_dir=DIR with the CIFAR python files "
                            "(they cannot be downloaded here)")
        root = Path(data_dir)
        sub = root / ("cifar-10-batches-py" if num_classes == 10 else "cifar-100-python")
        root = sub if sub.is_dir() else root
        key = "labels" if num_classes == 10 else "fine_labels"
        train_files = [f"data_batch_{i}" for i in range(1, 6)] if num_classes == 10 else ["train"]
        test_file = "test_batch" if num_classes == 10 else "test"
        missing = [f for f in train_files + [test_file] if not (root / f).is_file()]
        if missing:
            raise DataError(f"{root} lacks {missing}: point data.data_dir at the extracted "
                            f"cifar-{num_classes}-python archive")
        parts = [read_cifar_batch(root / f, key) for f in train_files]
        train_x = np.concatenate([p[0] for p in parts])
        train_y = np.concatenate([p[1] for p in parts])
        test_x, test_y = read_cifar_batch(root / test_file, key)
        for y in (train_y, test_y):
            if y.size and (y.min() < 0 or y.max() >= num_classes):
                raise DataError(f"{root}: labels outside 0..{num_classes - 1}")
        return (ImageSet(torch.from_numpy(train_x), torch.from_numpy(train_y)),
                ImageSet(torch.from_numpy(test_x), torch.from_numpy(test_y)), num_classes, True)
    return load


def _load_digits(data_dir: str | None, download: bool):
    """scikit-learn's bundled 8×8 digits (1797 images); a fixed stratified 80/20 train/test split."""
    require("sklearn", "data")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(d.target, dtype=torch.int64)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, stratify=d.target, random_state=0)
    return ImageSet(x[tr], y[tr]), ImageSet(x[te], y[te]), 10, False


def _load_synthetic(data_dir: str | None, download: bool, n_train: int = 600, n_test: int = 200,
                    num_classes: int = 4, size: int = 8):
    """Class templates plus noise, 1×8×8: learnable in a few steps, for tests."""
    g = torch.Generator().manual_seed(1234)
    templates = torch.rand(num_classes, 1, size, size, generator=g)

    def make(n):
        y = torch.arange(n) % num_classes
        x = (0.7 * templates[y] + 0.3 * torch.rand(n, 1, size, size, generator=g)).clamp(0, 1)
        return ImageSet(x, y)
    return make(n_train), make(n_test), num_classes, False


#: The built-in data sets: name -> loader ``(data_dir, download) -> (train, test, num_classes, hflip)``.
DATASETS: Registry[Callable] = Registry("data set", DataError, "or give a folder of class subfolders, npz:PATH, "
                                        "hf:PATH or package.module:callable")
for _name, _loader in (("fashion-mnist", lambda d, dl: _load_idx_set("fashion-mnist", d, dl)),
                       ("mnist", lambda d, dl: _load_idx_set("mnist", d, dl)), ("cifar10", _load_cifar(10)),
                       ("cifar100", _load_cifar(100)), ("digits", _load_digits), ("synthetic", _load_synthetic)):
    DATASETS.register(_name, _loader)


def _load_raw(name: str, data_dir: str | None, download: bool, cache: dict | None):
    """The parsed files and their SHA-256 (every image and label the loader returned).
    ``cache``: the caller's, for experiments that train hundreds of runs on one data set
    (never modified in place: splits and subsets index new tensors)."""
    key = (name, data_dir, download)
    if cache is not None and key in cache:
        return cache[key]
    raw = DATASETS.get(name)(data_dir, download)
    h = hashlib.sha256()
    for t in (raw[0].images, raw[0].labels, raw[1].images, raw[1].labels):
        h.update(t.contiguous().numpy().tobytes())
    if cache is not None:
        cache.clear()  # one data set at a time: a sweep reads one
        cache[key] = (raw, h.hexdigest())
    return raw, h.hexdigest()


def check_labels(labels: Tensor, num_classes: int, where: str) -> None:
    """Labels are integers in 0..num_classes-1: a float, negative (cross-entropy silently
    ignores -100), or too large label is refused, naming the first bad sample."""
    if not isinstance(labels, Tensor) or labels.ndim != 1:
        raise DataError(f"{where} labels must be a 1-d tensor of class indices, got "
                        f"{getattr(labels, 'shape', type(labels).__name__)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise DataError(f"{where} labels are {labels.dtype}, not integers: give class indices "
                        f"0..{num_classes - 1} (an integer tensor)")
    bad = ((labels < 0) | (labels >= num_classes)).nonzero()
    if len(bad):
        i = int(bad[0])
        note = " (cross-entropy would silently ignore it)" if int(labels[i]) == -100 else ""
        raise DataError(f"{where} label of sample {i} is {int(labels[i])}{note}, outside 0..{num_classes - 1}: "
                        f"{len(bad)} labels are out of range; fix the labels or the class count")


def register_dataset(name: str, loader: Callable) -> None:
    """Add a loader ``(data_dir, download) -> (train, test, num_classes, hflip)``."""
    DATASETS.register(name, loader)


def list_datasets() -> list[str]:
    return DATASETS.list()


def dataset_kind(name: str) -> tuple[str, str]:
    """``(kind, argument)`` of a ``--dataset`` value, by one rule: a built-in or registered
    name is that data set (``builtin``); a prefixed name (``imagefolder:``, ``npz:``, ``hf:``,
    a registered source's) is that source; an import path is a Dataset; any other name is a
    path. A built-in name that is also a path here is refused: it says how to write each."""
    if name in DATASETS:
        if user_path(name).exists():
            raise DataError(f"{name!r} names both the built-in data set and {Path(name).resolve()} here: write "
                            f"--dataset {name} --data-dir {name} for the built-in read from that folder, or "
                            f"--dataset ./{name} for the folder as a data set of its own")
        return "builtin", name
    return source_kind(name)


def dataset_name(value: str) -> str:
    """A data set's name as a run records it: a built-in or import path as given; a folder,
    .npz or Hugging Face folder as its absolute path with its kind (``imagefolder:/abs/path``),
    so that the run, its resume and ``evaluate`` read it from any working directory."""
    kind, arg = dataset_kind(value)
    if kind in ("builtin", "import"):
        return value
    return f"{kind}:{os.path.abspath(user_path(arg))}"


def stratified_subset(labels: Tensor, samples_per_class: int, seed: int) -> Tensor:
    """``samples_per_class`` indices of each class present, reproducible from ``seed``, sorted
    (a class that the validation split left without a sample is refused before: _validation_split)."""
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c in labels.unique().tolist():
        pool = (labels == c).nonzero().flatten()
        if samples_per_class > len(pool):
            raise DataError(f"samples_per_class={samples_per_class} but class {c} has only {len(pool)} "
                             "training samples after the validation split: ask for fewer")
        chosen.append(pool[torch.randperm(len(pool), generator=g)[:samples_per_class]])
    return torch.cat(chosen).sort().values


def _split_off(n: int, size: float | int, seed: int, what: str) -> tuple[Tensor, Tensor]:
    """(kept, split off): ``size`` (a fraction < 1, or a count) of ``n`` indices, drawn with
    ``seed``; both sorted."""
    n_off = int(round(size * n)) if isinstance(size, float) and size < 1 else int(size)
    if not 0 <= n_off < n:
        raise DataError(f"data.{what}={size} leaves no training samples out of {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_off:].sort().values, perm[:n_off].sort().values


def _validation_split(labels: Tensor, val_size: float | int, split_seed: int, num_classes: int,
                      name: str) -> tuple[Tensor, Tensor]:
    """(training pool, validation indices); every class keeps a training sample, or one line says which."""
    if num_classes < 2:
        raise DataError(f"{name} has {num_classes} class: a classifier needs at least 2 (a folder data set has one "
                        "subfolder per class; ROOT/train and ROOT/test hold the splits)")
    pool, val = _split_off(len(labels), val_size, 10_000 + split_seed, "val_size")
    left = torch.bincount(labels[pool], minlength=num_classes)
    lost = (left == 0) & (torch.bincount(labels, minlength=num_classes) > 0)  # all of a class drawn for validation
    if bool(lost.any()):
        c = int(lost.nonzero()[0])
        raise DataError(f"{name}: class {c} has no training sample once the validation split took its share "
                        f"({int((labels == c).sum())} in all): add samples of it, or lower data.val_size")
    return pool, val


def streamed_statistics(split, index: Tensor, batch_size: int = 1024) -> tuple[tuple, tuple]:
    """Per-channel mean and std (unbiased, at least 1e-3) of ``split``'s samples ``index``,
    read batch by batch (float64 sums: memory does not grow with the data set)."""
    total = squares = None
    read = 0  # the samples read: one skipped as unreadable (on_bad_sample=skip) counts for nothing
    batches = [index[start:start + batch_size] for start in range(0, len(index), batch_size)]
    for _, x, _ in split.batches(batches, keep=False):  # one pass: nothing kept for later epochs
        if not len(x):
            continue
        x = x.double()
        s, q = x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3))
        total, squares = (s, q) if total is None else (total + s, squares + q)
        read += len(x)
    if total is None:
        raise DataError("the training set is empty, or none of its samples can be read")
    count = read * math.prod(split.sample_shape[1:])
    mean = total / count
    var = (squares - count * mean * mean) / max(count - 1, 1)
    return tuple(mean.tolist()), tuple(var.clamp_min(0).sqrt().clamp_min(1e-3).tolist())


def create_dataset(name: str, *, data_dir: str | None = None, samples_per_class: int | None = None,
                   val_size: float | int = 0.1, split_seed: int = 0, seed: int = 0,
                   classes: Sequence[int] | None = None, download: bool = False, options: Any = None,
                   loading: Loading | None = None, cache: dict | None = None) -> DataSplits:
    """Load ``name`` and split it.

    ``name`` is a built-in or registered data set (held in memory), or one of the
    sources of :mod:`jacmatch.data.sources` (an image folder, ``npz:PATH``, ``hf:PATH``,
    ``package.module:callable``), read through ``loading`` with the options of
    ``options`` (a DataConfig: image size, channels, columns, test_size, mean and std).
    ``classes`` keeps only those classes, relabelled 0..len-1 in the given order (for
    transfer between tasks). ``samples_per_class`` draws that many training samples of
    each class with ``seed``. Mean and std for normalisation come from the training pool.
    ``cache``: the caller's dict that keeps a built-in data set's parsed files between calls.
    """
    if dataset_kind(name)[0] != "builtin":  # (a built-in name that is also a path here is refused)
        return _from_source(name, options or SourceOptions(), loading or Loading(), samples_per_class, val_size,
                            split_seed, seed, classes)
    (train, test, num_classes, hflip), data_sha256 = _load_raw(name, data_dir, download, cache)
    for split, part in (("training", train), ("test", test)):
        check_labels(part.labels, num_classes, f"{name} {split}")
    if classes is not None:
        classes = list(classes)
        if not classes or len(set(classes)) != len(classes) or min(classes) < 0 or max(classes) >= num_classes:
            raise UsageError(f"data.classes={classes} must be distinct classes in 0..{num_classes - 1}")
        remap = torch.full((num_classes,), -1, dtype=torch.long)
        remap[torch.tensor(classes)] = torch.arange(len(classes))

        def keep(s: ImageSet) -> ImageSet:
            mask = remap[s.labels] >= 0
            return ImageSet(s.images[mask], remap[s.labels[mask]])
        train, test, num_classes = keep(train), keep(test), len(classes)
    train_pool, val_idx = _validation_split(train.labels, val_size, split_seed, num_classes, name)
    pool = train.images[train_pool]
    pool = pool.float() / 255.0 if pool.dtype == torch.uint8 else pool.float()
    mean = tuple(pool.mean(dim=(0, 2, 3)).tolist())
    std = tuple(pool.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    del pool
    if samples_per_class is not None:
        if samples_per_class < 1:
            raise UsageError(f"samples_per_class must be >= 1, got {samples_per_class}")
        train_pool = train_pool[stratified_subset(train.labels[train_pool], samples_per_class, seed)]
    return DataSplits(name, train.subset(train_pool), train.subset(val_idx), test, num_classes, mean, std,
                      hflip, train_pool.tolist(), val_idx.tolist(), data_sha256)


def _from_source(name: str, d: Any, loading: Loading, samples_per_class, val_size, split_seed: int, seed: int,
                 classes) -> DataSplits:
    """A data set read through a source: index views for every split, statistics streamed."""
    if classes is not None:
        raise DataError(f"data.classes selects classes of a built-in data set; for {name!r}, keep only those "
                        "classes in the data itself (a folder per class)")
    opened = open_source(name, d, loading)
    train, test, num_classes = opened.train, opened.test, opened.num_classes
    for split, part in (("training", train), ("test", test)):
        if part is not None:  # sample numbers as the source counts them
            check_labels(part.labels, num_classes, f"{name} {split}")
    if test is None:  # one pool: the test set is drawn from it with split_seed, before validation
        kept, held_out = _split_off(len(train), d.test_size, 20_000 + split_seed, "test_size")
        train, test = train.subset(kept), train.subset(held_out)
    train_pool, val_idx = _validation_split(train.labels, val_size, split_seed, num_classes, name)
    _check_same_samples(name, train, test)
    if d.mean is not None and d.std is not None:
        mean, std = tuple(float(v) for v in d.mean), tuple(float(v) for v in d.std)
        if len(mean) != train.sample_shape[0] or len(std) != train.sample_shape[0]:
            raise DataError(f"data.mean and data.std need one value per channel ({train.sample_shape[0]})")
    else:
        mean, std = streamed_statistics(train, train_pool)
    if samples_per_class is not None:
        train_pool = train_pool[stratified_subset(train.labels[train_pool], samples_per_class, seed)]
    return DataSplits(name, train.subset(train_pool), train.subset(val_idx), test, num_classes, mean, std,
                      opened.hflip, train_pool.tolist(), val_idx.tolist(), opened.sha256)


def _check_same_samples(name: str, train: Split, test: Split) -> None:
    """The test split's images have the training images' shape (known from its first
    sample when it is opened, not after every epoch has run)."""
    if len(test) == 0:
        raise DataError(f"{name}: the test split is empty")
    if tuple(test.sample_shape) != tuple(train.sample_shape):
        raise DataError(f"{name}: the test images are {'x'.join(map(str, test.sample_shape))}, the training images "
                        f"{'x'.join(map(str, train.sample_shape))}: give both splits one size and channel count "
                        "(data.image_size and data.channels apply to both)")


def load_data(d: Any, *, seed: int = 0, pin_memory: bool = False, cache: dict | None = None) -> DataSplits:
    """The splits a DataConfig ``d`` names, with ``seed`` for its few-sample draws:
    :func:`create_dataset` with the config's options and its way of reading a source
    (workers, cache, what a bad sample does). ``cache``: the caller's, to keep a built-in
    data set's files parsed between runs."""
    workers = min(4, max(1, (os.cpu_count() or 2) // 2)) if d.workers == -1 else d.workers
    random = getattr(d, "random_views", False)  # a new view at each read: nothing decoded is kept
    loading = Loading(workers=workers, pin_memory=pin_memory, on_bad_sample=d.on_bad_sample,
                      cache_bytes=0 if random else d.cache_mib << 20)
    return create_dataset(d.name, data_dir=d.data_dir, samples_per_class=d.samples_per_class, val_size=d.val_size,
                          split_seed=d.split_seed, seed=seed, classes=d.classes, download=d.download,
                          options=d, loading=loading, cache=cache)
