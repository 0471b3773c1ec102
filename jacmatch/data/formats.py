"""Readers of the standard files: IDX (MNIST, Fashion-MNIST) and CIFAR's python pickles.

Both readers treat files as untrusted: sizes are checked against headers before anything
is allocated, gzip output is capped, and CIFAR pickles go through an unpickler that can
build nothing but numpy arrays, lists, dicts and scalars (no code runs from a file).
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
from ..errors import UsageError

__all__ = ["DataError", "read_idx", "read_cifar_batch", "MAX_FILE_BYTES", "user_path"]

#: No data file this library reads is larger (CIFAR-100 train is 155 MB).
MAX_FILE_BYTES = 1 << 30

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(UsageError):
    """A data file that is missing, truncated, corrupt or not what was expected."""


def user_path(arg: str | Path) -> Path:
    """``arg`` as a path, a leading ``~`` or ``~user`` expanded; a ``~user`` with no home
    folder here is a DataError (``Path.expanduser`` raises a RuntimeError)."""
    try:
        return Path(arg).expanduser()
    except RuntimeError:
        raise DataError(f"{arg}: {str(arg).split('/')[0]!r} names no user's home folder here: give the path "
                        "in full (or ./ before a name that starts with ~)") from None


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(0)
        if head == b"\x1f\x8b":
            try:
                with gzip.GzipFile(fileobj=f) as g:
                    data = g.read(MAX_FILE_BYTES + 1)
            except (OSError, EOFError, gzip.BadGzipFile) as exc:
                raise DataError(f"{path} is not a valid gzip file ({exc}): download it again") from None
        else:
            data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise DataError(f"{path} is larger than {MAX_FILE_BYTES >> 20} MiB once decompressed: not a data file of this kind")
    return data


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a numpy array, its size checked against its header."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number): use the original MNIST-format files")
    ndim = data[3]
    if not 1 <= ndim <= 4 or len(data) < 4 + 4 * ndim:
        raise DataError(f"{path} has a corrupt IDX header ({ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    body = data[4 + 4 * ndim:]
    if len(body) != expected:
        raise DataError(f"{path} is truncated or corrupt: header says {dims} ({expected} bytes), "
                        f"file holds {len(body)}; download it again")
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


class _NumpyOnlyUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Builds numpy arrays and plain containers only; any other global is refused. The
    pure-Python unpickler: its memo is a dict, where the C one allocates a table as long as
    the largest memo index a (corrupt) file names (4 bytes: up to 32 GiB)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_cifar_batch(path: str | Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch: images uint8 [N, 3, 32, 32] and labels int64 [N]."""
    path = Path(path)
    raw = _read_bytes(path)
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # any malformed pickle: one clear error
        raise DataError(f"{path} is not a valid CIFAR batch ({type(exc).__name__}: {exc}); "
                        "use the 'python version' files of CIFAR") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR batch (no dict inside)")
    obj = {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if "data" not in obj or label_key not in obj:
        raise DataError(f"{path} lacks the keys 'data' and '{label_key}': is it a CIFAR-"
                        f"{'100' if label_key == 'fine_labels' else '10'} file?")
    data, labels = obj["data"], obj[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be a uint8 array [N, 3072]")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"{path}: '{label_key}' must be a list of integers") from None
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {data.shape[0]} images but {labels.shape} labels")
    return data.reshape(-1, 3, 32, 32), labels
