"""Data sources by name: a user's image folder, arrays on disk, any map-style
``torch.utils.data.Dataset``, a Hugging Face ``datasets`` folder, and those a user
registers. :func:`source_kind` tells what a name is; :func:`open_source` opens it into
splits (:mod:`.splits`) of samples read by :mod:`.readers`.

A new kind of source is one opener and one line: ``register_source("prefix", opener)``;
``--dataset prefix:ARG`` then opens ``opener(ARG, data_config, loading)``, which returns
an :class:`Opened`. The config's checks and the command line take it as they are.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._extras import require
from .._imports import import_callable, is_import_path
from ..registry import Registry
from .formats import DataError, user_path
from .readers import IMAGE_SUFFIXES, HFDataset, ImageFolder, UserDataset, array_splits
from .splits import ArraySplit, BadSamples, Fit, Loading, SampleCache, SampleSplit, Split, batch_by_batch, to_chw

__all__ = ["SampleSplit", "ArraySplit", "ImageFolder", "Loading", "SourceOptions", "open_source", "source_kind", "to_chw",
           "IMAGE_SUFFIXES", "SOURCE_FORMS", "register_source", "list_sources", "Opened", "Split", "BadSamples",
           "SampleCache", "batch_by_batch"]

#: The names a folder data set's test split may have, beside ROOT/train (the first found is taken).
TEST_FOLDERS = ("test", "val", "valid", "validation")
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


# ---- naming a source -------------------------------------------------------------------------



def source_kind(name: str) -> tuple[str, str]:
    """``(kind, argument)`` of a data set name: ``builtin``, ``import``, or a registered
    source's prefix (``imagefolder``, ``npz``, ``hf``, and the user's). A name without a
    prefix is a path when one exists there (a folder of class subfolders, a folder of .npy
    files, an .npz file), else an import path or a built-in name."""
    for prefix in SOURCES.names():
        if name.startswith(prefix + ":"):
            return prefix, name[len(prefix) + 1:]
    if is_import_path(name) and not Path(name).exists():
        return "import", name
    path = user_path(name)
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
    opener = SOURCES.find(kind)
    if opener is None:
        raise DataError(f"unknown data set {name!r}: give {', '.join(SOURCE_FORMS)}")
    return opener(arg, d, loading)


def _size(d) -> tuple[int, int] | None:
    """DataConfig ``d``'s image size as (H, W), or None."""
    return None if d.image_size is None else (tuple(d.image_size) if isinstance(d.image_size, list)
                                              else (d.image_size, d.image_size))


def _open_npz(arg: str, d, loading: Loading) -> Opened:
    path = user_path(arg)
    if not path.exists():
        raise DataError(f"{path} does not exist: pass an .npz file or a folder of .npy files")
    train_x, train_y, test_x, test_y = array_splits(path)
    files = sorted(path.glob("*.npy")) if path.is_dir() else [path]
    digest = _sha256_files(files, path if path.is_dir() else path.parent)
    k = int(max(int(train_y.max()), int(test_y.max()) if test_y is not None else 0)) + 1
    fit = Fit(d.channels, _size(d), d.resize)
    return Opened(ArraySplit(train_x, train_y, where=f"{path} (train)", fit=fit),
                  ArraySplit(test_x, test_y, where=f"{path} (test)", fit=fit) if test_x is not None else None, k, digest)


def _open_folder(arg: str, d, loading: Loading) -> Opened:
    root, size = user_path(arg), _size(d)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    parts = {p.name: p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    test_dir = next((parts[n] for n in TEST_FOLDERS if n in parts), None)
    if "train" in parts:  # ROOT/train (and ROOT/test): the splits; train alone: the test set drawn from it
        others = sorted(set(parts) - {"train"} - ({test_dir.name} if test_dir else set()))
        if others:
            raise DataError(f"{root} holds train/ beside {others}: keep only train/ and one of "
                            f"{'/, '.join(TEST_FOLDERS)}/ there, or give {root / 'train'} itself")
        train_root = parts["train"]
    elif test_dir is not None:
        raise DataError(f"{root} has {test_dir.name}/ but no train/: put the training images in {root / 'train'}")
    else:
        train_root = root
    train = ImageFolder(train_root, None, size, d.channels, d.resize)
    channels = 1 if train.mode == "L" else 3  # the test images as the training images
    if test_dir is not None:
        extra = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
                       and p.name not in train.classes)
        if extra:
            raise DataError(f"{test_dir} has class folders {extra} that {train_root} has not: the classes are the "
                            "training set's; give each split the same class folders")
    test = ImageFolder(test_dir, train.classes, size, channels, d.resize) if test_dir is not None else None
    h = hashlib.sha256()
    for part in (train, test) if test is not None else (train,):
        part.sha256(h)
    return Opened(SampleSplit(train, shape=train.sample_shape, loading=loading),
                  SampleSplit(test, shape=test.sample_shape, loading=loading) if test is not None else None,
                  len(train.classes), h.hexdigest())


def _open_hf(arg: str, d, loading: Loading) -> Opened:
    path = user_path(arg)
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
    fit = Fit(d.channels, _size(d), d.resize)
    shape = tuple(fit(to_chw(train[0][0], train.describe(0)), train.describe(0)).shape)
    return Opened(SampleSplit(train, shape=shape, loading=loading, fit=fit),
                  SampleSplit(test, loading=loading, fit=fit) if test else None, k,
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
    fit = Fit(d.channels, _size(d), d.resize)
    shape = tuple(fit(to_chw(train[0][0], train.describe(0)), train.describe(0)).shape)
    splits = [SampleSplit(part, shape=shape if part is train else None, loading=loading, fit=fit)
              for part in (train, test) if part is not None]
    random = getattr(d, "random_views", False)
    if random:  # its contents differ at every read: the run keys on the source and its options
        h.update(json.dumps([spec, d.options], sort_keys=True, default=str).encode())
    else:
        _check_same_views(splits[0], spec)
    for split in [] if random else splits:  # the data hash streams every sample once
        for start in range(0, len(split), 256):
            x, y = split.batch(range(start, min(start + 256, len(split))))
            h.update(x.numpy().tobytes())
            h.update(y.numpy().tobytes())
    classes = getattr(train.dataset, "classes", None)
    k = len(classes) if classes is not None else int(max(int(s.labels.max()) for s in splits)) + 1
    return Opened(splits[0], splits[1] if test is not None else None, k, h.hexdigest())


def _check_same_views(split, spec: str, samples: int = 4) -> None:
    """A data set must give the same image at each read of an index, unless it is declared to
    draw random views (data.random_views): its first samples are read twice and compared."""
    index = range(min(samples, len(split)))
    first, again = split.batch(index)[0], split.batch(index)[0]
    if not torch.equal(first, again):
        raise DataError(f"data set {spec!r} gives another image at each read of the same index (its first "
                        f"{len(index)} samples differ between two reads): its __getitem__ draws random views. "
                        "Declare it with data.random_views=true (the caches are then off, and a resume keys on the "
                        "source), or make __getitem__ return the same image for an index")


#: The sources by prefix: ``prefix:ARG`` opens ``opener(ARG, data_config, loading)``.
SOURCES: Registry[Callable[[str, Any, Loading], Opened]] = Registry("source", DataError)
for _prefix, _opener in (("imagefolder", _open_folder), ("npz", _open_npz), ("hf", _open_hf), ("import", _open_import)):
    SOURCES.register(_prefix, _opener)


def register_source(prefix: str, opener: Callable[[str, Any, Loading], Opened]) -> None:
    """Name a new kind of source: ``--dataset PREFIX:ARG`` then opens
    ``opener(ARG, data_config, loading)`` (an :class:`Opened`: train and test splits, the
    class count, the data hash)."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", prefix) or prefix == "builtin":
        raise ValueError(f"a source prefix is a lower-case word, not {prefix!r}")
    SOURCES.register(prefix, opener)


def list_sources() -> list[str]:
    """The prefixes of the registered sources."""
    return SOURCES.list()
