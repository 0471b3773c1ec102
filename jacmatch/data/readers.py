"""What a source's samples are read from: an image folder, a user's Dataset, a Hugging
Face ``datasets`` split, arrays in an .npz file or a folder of .npy files. Each is a
map-style data set whose ``__getitem__`` returns ``(image, label)``, with ``labels`` and
``describe(i)`` (the file a sample came from, for errors)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .._extras import require
from .formats import DataError
from .splits import pil_pixels

__all__ = ["ImageFolder", "UserDataset", "HFDataset", "read_arrays", "class_indices", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def class_indices(values, where: str) -> Tensor:
    """Labels as int64 class indices; strings, fractions and negative numbers refused in one line."""
    try:
        a = np.asarray(values)
    except (TypeError, ValueError):
        raise DataError(f"{where}: the labels are not numbers: give class indices 0..K-1") from None
    if a.dtype.kind == "f" and a.size and np.isfinite(a).all() and (a == np.round(a)).all():
        a = a.astype(np.int64)  # whole numbers stored as floats
    if a.dtype.kind not in "iu" or a.ndim != 1:
        shown = a.ravel()[:3].tolist() if a.size else []
        raise DataError(f"{where}: the labels are {a.dtype} {shown}, not class indices: map them to 0..K-1 "
                        "(e.g. a ClassLabel column, or np.unique(labels, return_inverse=True)[1])")
    if a.size and int(a.min()) < 0:
        raise DataError(f"{where}: a label is {int(a.min())}: class indices are 0..K-1")
    return torch.from_numpy(a.astype(np.int64))


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
            # (a link whose target is gone is listed too, and named when it cannot be read)
            entries = sorted(p for p in folder.rglob("*") if (p.is_file() or p.is_symlink()) and not p.is_dir()
                             and not p.name.startswith("."))
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
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                raise DataError(f"{path} is not a readable image ({type(exc).__name__}: {exc}): fix or remove it") \
                    from None
            if self.size is None and len(sizes) > 1:
                (a, pa), (b, pb) = list(sizes.items())[:2]
                raise DataError(f"mixed image sizes: {pa} is {a[0]}x{a[1]}, {pb} is {b[0]}x{b[1]}: set "
                                "data.image_size (e.g. --image-size 32) to resize them")
        if self.mode is None:
            self.mode = "L" if modes <= {"L", "1", "I;16", "I", "F"} else "RGB"
        width, height = next(iter(sizes)) if self.size is None else (self.size[1], self.size[0])
        #: (C, H, W) of every decoded sample, from the headers: no file is decoded to know it
        self.sample_shape = (1 if self.mode == "L" else 3, height, width)

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, i: int) -> str:
        return str(self.files[i])

    def __getitem__(self, i: int):
        from PIL import Image
        try:
            return self._decode(Image, i)
        except Image.DecompressionBombError as exc:  # a bad sample like any file that cannot be read
            raise OSError(f"decompression bomb: {exc}") from None

    def _decode(self, Image, i: int):
        with Image.open(self.files[i]) as im:
            if im.mode in ("I", "F") or im.mode.startswith("I;16"):  # 16-bit or float grey: not clipped to 8 bits
                grey = pil_pixels(im, self.files[i])
                if self.size is not None and grey.shape != tuple(self.size):
                    resized = np.asarray(_resized(Image.fromarray(grey.astype(np.float32), "F"), self.size, self.resize))
                    grey = resized if im.mode == "F" else resized.clip(0, 65535).round().astype(np.uint16)
                return (grey if self.mode == "L" else np.repeat(grey[..., None], 3, axis=2)), int(self.labels[i])
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
        if len(dataset) == 0:
            raise DataError(f"{where} is empty: it has no (image, label) pairs")
        self._label(0)  # the samples' structure, before any label is believed
        known = next((getattr(dataset, a) for a in ("targets", "labels") if hasattr(dataset, a)), None)
        labels = known if known is not None else [self._label(i) for i in range(len(dataset))]
        if isinstance(labels, Tensor):
            labels = labels.numpy()
        self.labels = class_indices(labels, where)
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
        if len(dataset) == 0:
            raise DataError(f"{where} is empty")
        self.labels = class_indices(dataset[label_column], f"{where} column {label_column!r}")
        feature = dataset.features[label_column]
        self.num_classes = len(feature.names) if hasattr(feature, "names") else None
        # an array column (Array2D/3D) comes back as nested lists: read in the type its feature declares
        self.array_dtype = getattr(dataset.features[image_column], "dtype", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def describe(self, i: int) -> str:
        return f"{self.where} row {i}"

    def __getitem__(self, i: int):
        image = self.dataset[i][self.image_column]
        if isinstance(image, list):
            if self.array_dtype in (None, "string", "large_string"):
                raise DataError(f"{self.describe(i)} is a list of values without a pixel type: store the images "
                                "as an Image column, or as an Array2D/Array3D column of uint8, uint16 or float32")
            image = np.asarray(image, dtype=self.array_dtype)
        return image, int(self.labels[i])


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


def array_splits(path: Path) -> tuple[np.ndarray, Tensor, np.ndarray | None, Tensor | None]:
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
        if n == 0:
            raise DataError(f"{path}: {key} is empty: give samples, or leave the test arrays out to draw a test "
                            "set from the training samples")
        return class_indices(y, f"{path}: {key}")
    train = images(arrays[names[0]], names[0])
    test = images(arrays[names[2]], names[2]) if names[2] in arrays else None
    return (train, labels(names[1], len(train)), test,
            labels(names[3], len(test)) if test is not None else None)
