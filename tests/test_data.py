"""Data: IDX and CIFAR readers on small files the tests write, splits, few-sample sets."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from jacmatch.data import DataError, create_dataset, random_crop_flip, read_cifar_batch, read_idx, stratified_subset
from helpers import write_cifar_dir


def write_idx(path, array, gz=False):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    (gzip.open if gz else open)(path, "wb").write(body)


def write_mnist_dir(root, n_train=60, n_test=20, gz=True):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{split}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), gz)
        write_idx(root / f"{split}-labels-idx1-ubyte{suffix}", (np.arange(n) % 10).astype(np.uint8), gz)
    return root




@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path, gz):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.idx", a, gz)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx"), a)
    b = np.arange(5, dtype=np.int32) - 2
    write_idx(tmp_path / "b.idx", b)
    np.testing.assert_array_equal(read_idx(tmp_path / "b.idx"), b)


def test_idx_truncated_and_bad_magic(tmp_path):
    a = np.zeros((4, 5, 5), dtype=np.uint8)
    write_idx(tmp_path / "a.idx", a)
    data = (tmp_path / "a.idx").read_bytes()
    (tmp_path / "t.idx").write_bytes(data[:-3])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "t.idx")
    (tmp_path / "m.idx").write_bytes(b"\x01\x02" + data[2:])
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "m.idx")
    (tmp_path / "g.idx").write_bytes(b"\x1f\x8b" + b"garbage")
    with pytest.raises(DataError, match="gzip"):
        read_idx(tmp_path / "g.idx")


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_from_a_directory(tmp_path, gz):
    root = write_mnist_dir(tmp_path / "m", gz=gz)
    d = create_dataset("mnist", data_dir=str(root), val_size=10)
    assert (len(d.train), len(d.val), len(d.test)) == (50, 10, 20)
    x, y = d.train.batch(torch.arange(4))
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert set(d.train_indices).isdisjoint(d.val_indices)


def test_missing_directory_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match="data.data_dir"):
        create_dataset("mnist", data_dir=str(tmp_path / "nothing"))
    (tmp_path / "half").mkdir()
    write_idx(tmp_path / "half" / "train-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataError, match="train-labels"):
        create_dataset("mnist", data_dir=str(tmp_path / "half"))


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_loader(tmp_path, num_classes):
    root = write_cifar_dir(tmp_path / "c", num_classes)
    # (the 100-class files hold one sample of each of 20 classes: none may go to validation)
    d = create_dataset(f"cifar{num_classes}", data_dir=str(root), val_size=0.1 if num_classes == 10 else 0)
    assert d.num_classes == num_classes and d.in_channels == 3 and d.hflip
    assert len(d.train) + len(d.val) == (100 if num_classes == 10 else 20)
    x, _ = d.test.batch(torch.arange(3))
    assert x.shape == (3, 3, 32, 32)


def test_cifar_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    with open(tmp_path / "evil", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f)
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        read_cifar_batch(tmp_path / "evil", "labels")


def test_fashion_mnist_from_debian():
    d = create_dataset("fashion-mnist", samples_per_class=2, seed=0)
    assert (len(d.train), len(d.test), d.num_classes) == (20, 10_000, 10)


def test_few_sample_sets_are_stratified_and_reproducible():
    d1 = create_dataset("digits", samples_per_class=3, seed=5)
    d2 = create_dataset("digits", samples_per_class=3, seed=5)
    d3 = create_dataset("digits", samples_per_class=3, seed=6)
    assert d1.train_indices == d2.train_indices != d3.train_indices
    assert torch.bincount(d1.train.labels).tolist() == [3] * 10
    assert d1.val_indices == d3.val_indices, "the validation split must not move with the seed"
    with pytest.raises(ValueError, match="samples_per_class=1000"):
        create_dataset("digits", samples_per_class=1000)


def test_class_subset_relabels():
    d = create_dataset("digits", classes=[5, 6, 7, 8, 9])
    assert d.num_classes == 5 and d.train.labels.max() == 4


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown data set 'imagenet'"):
        create_dataset("imagenet")


def test_random_crop_flip_shapes_and_content():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    y = random_crop_flip(x, 0, True, g)
    assert all(torch.equal(y[i], x[i]) or torch.equal(y[i], x[i].flip(2)) for i in range(2))
    z = random_crop_flip(x, 2, False, g)
    assert z.shape == x.shape
    assert stratified_subset(torch.tensor([0, 0, 1, 1]), 1, 0).tolist() in ([0, 2], [0, 3], [1, 2], [1, 3])


def test_download_checks_md5(tmp_path, monkeypatch):
    """The download path, served from a file:// address: files land, are verified, load;
    a wrong checksum is refused and leaves nothing behind."""
    import hashlib

    import jacmatch.data.datasets as ds
    src = write_mnist_dir(tmp_path / "server", gz=True)
    md5s = {p.name[:-3]: hashlib.md5(p.read_bytes()).hexdigest() for p in src.glob("*.gz")}
    monkeypatch.setitem(ds.DOWNLOADS, "mnist", (src.as_uri() + "/", md5s))
    d = create_dataset("mnist", data_dir=str(tmp_path / "dl"), download=True, val_size=10)
    assert len(d.test) == 20 and len(list((tmp_path / "dl").glob("*.gz"))) == 4
    bad = dict(md5s, **{"t10k-labels-idx1-ubyte": "0" * 32})
    monkeypatch.setitem(ds.DOWNLOADS, "mnist", (src.as_uri() + "/", bad))
    with pytest.raises(DataError, match="md5"):
        create_dataset("mnist", data_dir=str(tmp_path / "dl2"), download=True)
    assert not list((tmp_path / "dl2").glob("t10k-labels*"))
