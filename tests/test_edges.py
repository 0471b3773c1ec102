"""Nothing silent at the edges: no command deletes or overwrites a file that it reads, or
any file in a folder that holds one."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from jacmatch.cli import main

QUIET = ["--set", "progress=false", "--set", "eval.noise_sigmas=[]", "--set", "optim.epochs=1"]


def digest(folder: Path) -> dict:
    """Every file under ``folder`` by its SHA-256: what must not change."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run_folder(tmp_path, teacher):
    """A copy of the session's teacher run: a folder whose last.pt is read as teacher or init_from."""
    folder = tmp_path / "teacher_run"
    shutil.copytree(Path(teacher).parent, folder)
    return folder


@pytest.mark.parametrize("reads", ["--teacher", "init_from"])
@pytest.mark.parametrize("overwrite", [True, False])
def test_out_and_overwrite_never_touch_the_checkpoint_the_run_reads(run_folder, teacher, capsys, reads, overwrite):
    before = digest(run_folder)
    read = ["--teacher", str(run_folder / "last.pt")] if reads == "--teacher" else \
        ["--teacher", teacher, "--set", f"init_from={run_folder / 'last.pt'}"]
    code = main(["distill", "--recipe", "none",
        *read, "--dataset", "synthetic", "--samples-per-class", "2", "--model", "small_cnn_8",
                 "--out", str(run_folder), *(["--overwrite"] if overwrite else []), *QUIET])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "which this command reads" in err[0] or "already holds a run" in err[0], err
    assert digest(run_folder) == before  # nothing removed, nothing written


def test_evaluate_json_never_writes_over_the_checkpoint_or_the_teacher(run_folder, teacher, capsys):
    before = digest(run_folder)
    for target, extra in ((run_folder / "last.pt", []), (run_folder / "t.pt", ["--teacher", str(run_folder / "t.pt")])):
        if extra:
            shutil.copyfile(teacher, target)
            before = digest(run_folder)
        code = main(["evaluate", "--checkpoint", str(run_folder / "last.pt"), *extra, "--json", str(target),
                     "--noise-sigmas"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "which this command reads" in err[0], err
        assert digest(run_folder) == before


def _png_folder(root: Path) -> Path:
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_a_run_folder_inside_the_data_or_json_into_it_is_refused(tmp_path, teacher, capsys):
    data = _png_folder(tmp_path / "images")
    before = digest(data)
    code = main(["train-teacher", "--dataset", str(data), "--model", "small_cnn_4", "--out", str(data / "train" / "a"),
                 *QUIET])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "lies inside the data" in err[0], err
    assert digest(data) == before
    assert main(["train-teacher", "--dataset", str(data), "--model", "small_cnn_4", "--out", str(tmp_path / "r"),
                 "--set", "data.workers=0", *QUIET]) == 0
    capsys.readouterr()
    code = main(["evaluate", "--checkpoint", str(tmp_path / "r" / "last.pt"), "--json", str(data / "test" / "r.json"),
                 "--noise-sigmas"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "lies inside the data" in err[0], err
    assert digest(data) == before


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    code = main(["train-teacher", "--dataset", "synthetic", "--model", "small_cnn_4", "--out", str(target), *QUIET])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is a file" in err[0], err
    assert target.read_text() == "mine"


def test_overwrite_removes_what_the_earlier_run_wrote_its_tensorboard_events_too(tmp_path):
    out = tmp_path / "r"
    args = ["train-teacher", "--dataset", "synthetic", "--model", "small_cnn_4", "--out", str(out),
            "--set", "tensorboard=true", *QUIET]
    assert main(args) == 0
    first = sorted(p.name for p in (out / "tensorboard").iterdir())
    assert main([*args, "--overwrite"]) == 0
    second = sorted(p.name for p in (out / "tensorboard").iterdir())
    assert len(first) == len(second) == 1 and first != second  # one run's events, not two


@pytest.mark.parametrize("fold", [True, False])
def test_the_objective_keeps_its_teacher_in_eval_mode_whatever_the_caller_does(fold):
    import torch
    from torch import nn

    import jacmatch as jm
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    student = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
    objective = jm.TransferObjective(student, teacher, jm.ObjectiveConfig(teacher_fold_bn=fold))
    stats = teacher[1].running_mean.clone()
    teacher.train()  # after the objective took it
    objective(torch.rand(4, 1, 6, 6), torch.tensor([0, 1, 2, 0]))
    assert not teacher.training and torch.equal(teacher[1].running_mean, stats)


def test_integer_images_given_to_the_objective_are_one_line():
    import torch
    from torch import nn

    import jacmatch as jm
    from jacmatch.errors import UsageError
    objective = jm.TransferObjective(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), None,
                                     jm.ObjectiveConfig(beta=0, gamma=0))
    with pytest.raises(UsageError, match=r"torch.uint8: give float images in \[0, 1\]"):
        objective(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1]))


# ---- pixels mean the same thing whatever the source ------------------------------------------


def _ten_images():
    import numpy as np
    return np.random.default_rng(7).integers(0, 256, (10, 8, 8)).astype(np.uint8)


def _forms(base):
    """The same images as 8-bit, 16-bit, float and palette pixels (PIL images for files)."""
    import numpy as np
    from PIL import Image
    def palette(b):  # index i stands for the grey (i, i, i)
        im = Image.new("P", (8, 8))
        im.putpalette([v for i in range(256) for v in (i, i, i)])
        im.putdata(b.flatten().tolist())
        return im
    return {"8-bit": [Image.fromarray(b) for b in base],
            "16-bit": [Image.fromarray(b.astype(np.uint16) * 257) for b in base],
            "float": [Image.fromarray((b / 255.0).astype(np.float32), "F") for b in base],
            "palette": [palette(b) for b in base]}


def _read_all(name, tmp_path, channels=None, n=10):
    """The ``n`` images of source ``name``, in their order, as the loop reads them."""
    from jacmatch.data.sources import Loading, SourceOptions, open_source
    opened = open_source(name, SourceOptions(channels=channels), Loading())
    x, _ = opened.train.batch(list(range(n)))
    return x


@pytest.mark.parametrize("form", ["8-bit", "16-bit", "float", "palette"])
def test_the_same_ten_images_give_the_same_tensors_in_every_source(tmp_path, form, monkeypatch):
    """Folder, npz, a Dataset by import path and a Hugging Face folder, each in 8-bit, 16-bit,
    float and palette forms: the same tensors in [0, 1] (float32 of the 8-bit values / 255)."""
    import sys

    import numpy as np
    import torch
    base = _ten_images()
    expected = torch.from_numpy(base).float().div(255)[:, None]
    images = _forms(base)[form]
    grey = 1 if form == "palette" else None  # a palette decodes to RGB; grey asked for: the same values
    # a folder: one class, files in name order (TIFF holds the float images)
    folder = tmp_path / form.replace("-", "") / "a"
    folder.mkdir(parents=True)
    suffix = ".tif" if form == "float" else ".png"
    for i, im in enumerate(images):
        im.save(folder / f"{i:02d}{suffix}")
    got = {"folder": _read_all(str(folder.parent), tmp_path, grey)}
    # arrays: npz in the array's own type (the palette as the pixels its indices stand for)
    arrays = np.stack([np.asarray(im.convert("L") if form == "palette" else im) for im in images])
    np.savez(tmp_path / "a.npz", train_images=arrays[:, None], train_labels=np.zeros(10, dtype=np.int64))
    got["npz"] = _read_all(f"npz:{tmp_path / 'a.npz'}", tmp_path)
    # a Dataset returning the PIL images themselves
    module = tmp_path / "ten_images.py"
    module.write_text("DATA = []\n\ndef make():\n    return DATA\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    mod = importlib.import_module("ten_images")
    mod.DATA[:] = [(im, 0) for im in images]
    got["Dataset"] = _read_all("ten_images:make", tmp_path, grey)
    sys.modules.pop("ten_images", None)
    # Hugging Face: the images as arrays in a column
    import datasets
    features = datasets.Features({"image": datasets.Array2D(shape=(8, 8), dtype=str(arrays.dtype)),
                                  "label": datasets.Value("int64")})
    hf = datasets.Dataset.from_dict({"image": [a.tolist() for a in arrays], "label": [0] * 10}, features=features)
    hf.save_to_disk(str(tmp_path / "hf"))
    got["Hugging Face"] = _read_all(f"hf:{tmp_path / 'hf'}", tmp_path)
    for source, x in got.items():
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8), (source, x.shape)
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-6, msg=f"{source}, {form}")


@pytest.mark.parametrize("bad, message", [("float255", r"float pixels in \[0, 255\], not in \[0, 1\]"),
                                          ("int32", "pixels of type torch.int32")])
def test_pixels_out_of_range_or_of_another_type_are_one_line(tmp_path, bad, message):
    import numpy as np

    from jacmatch.data.formats import DataError
    images = np.zeros((4, 1, 4, 4), dtype=np.float64 if bad == "float255" else np.int32)
    images[0, 0, 0, 0] = 255
    np.savez(tmp_path / "a.npz", train_images=images, train_labels=np.zeros(4, dtype=np.int64))
    with pytest.raises(DataError, match=message):
        _read_all(f"npz:{tmp_path / 'a.npz'}", tmp_path, n=4)


# ---- evaluation reads the data its checkpoint saw; names are not shadowed by folders ----------


def test_evaluate_refuses_data_that_changed_since_training_unless_told(tmp_path, capsys):
    import json
    data = _png_folder(tmp_path / "images")
    run = tmp_path / "r"
    assert main(["train-teacher", "--dataset", str(data), "--model", "small_cnn_4", "--out", str(run),
                 "--set", "data.workers=0", *QUIET]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run / "last.pt"), "--noise-sigmas"]) == 0  # the same data: fine
    assert "data_sha256" in json.loads(capsys.readouterr().out)
    shutil.copyfile(data / "train" / "a" / "0.png", data / "test" / "b" / "9.png")  # a training image in the test set
    code = main(["evaluate", "--checkpoint", str(run / "last.pt"), "--noise-sigmas"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "has changed since" in err[0] and "--data-changed" in err[0], err
    assert main(["evaluate", "--checkpoint", str(run / "last.pt"), "--noise-sigmas", "--data-changed",
                 "--json", str(tmp_path / "e.json")]) == 0
    recorded = json.loads((tmp_path / "e.json").read_text())
    assert recorded["data_sha256"] != recorded["trained_on_data_sha256"]


def test_a_built_in_name_that_is_also_a_folder_here_is_refused_with_both_spellings(tmp_path, capsys, monkeypatch):
    _png_folder(tmp_path / "digits")
    monkeypatch.chdir(tmp_path)
    code = main(["train-teacher", "--dataset", "digits", "--model", "small_cnn_4", "--out", str(tmp_path / "r"),
                 *QUIET])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "names both the built-in data set" in err[0], err
    assert "--dataset ./digits" in err[0] and "--data-dir digits" in err[0]
    assert main(["train-teacher", "--dataset", "./digits", "--model", "small_cnn_4", "--out", str(tmp_path / "r"),
                 "--set", "data.workers=0", *QUIET]) == 0  # the folder, written as a path


# ---- every wrong input is one line, exit 2 ---------------------------------------------------

USER_DATASETS = '''
import torch

class DictsWithTargets(torch.utils.data.Dataset):
    targets = [0, 1, 0, 1]
    def __len__(self):
        return 4
    def __getitem__(self, i):
        return {"image": torch.rand(1, 4, 4), "label": self.targets[i]}

class Empty(torch.utils.data.Dataset):
    def __len__(self):
        return 0
    def __getitem__(self, i):
        raise IndexError(i)

class Named(torch.utils.data.Dataset):
    def __len__(self):
        return 4
    def __getitem__(self, i):
        return torch.rand(1, 4, 4), ["cat", "dog"][i % 2]

def dicts():
    return DictsWithTargets()

def empty():
    return Empty()

def named():
    return Named()
'''


@pytest.mark.parametrize("case, message", [
    ("edge_data:dicts", "is a dict, not an (image, label) pair"),
    ("edge_data:empty", "is empty"),
    ("edge_data:named", "not class indices"),
    ("npz-empty-test", "test_labels is empty"),
    ("npz-strings", "not class indices"),
    ("hf-strings", "not class indices"),
])
def test_wrong_data_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, case, message):
    import numpy as np
    (tmp_path / "edge_data.py").write_text(USER_DATASETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    images = np.zeros((6, 1, 4, 4), dtype=np.uint8)
    if case == "npz-empty-test":
        np.savez(tmp_path / "d.npz", train_images=images, train_labels=np.arange(6) % 2,
                 test_images=images[:0], test_labels=np.zeros(0, dtype=np.int64))
        case = f"npz:{tmp_path / 'd.npz'}"
    elif case == "npz-strings":
        np.savez(tmp_path / "d.npz", train_images=images, train_labels=np.array(["cat", "dog"] * 3))
        case = f"npz:{tmp_path / 'd.npz'}"
    elif case == "hf-strings":
        import datasets
        datasets.Dataset.from_dict({"image": [np.zeros((4, 4), dtype=np.uint8).tolist()] * 6,
                                    "label": ["cat", "dog"] * 3},
                                   features=datasets.Features({"image": datasets.Array2D((4, 4), "uint8"),
                                                               "label": datasets.Value("string")})
                                   ).save_to_disk(str(tmp_path / "hf"))
        case = f"hf:{tmp_path / 'hf'}"
    capsys.readouterr()  # (the datasets library's progress while saving)
    code = main(["train-teacher", "--dataset", case, "--model", "small_cnn_4", "--out", str(tmp_path / "r"),
                 "--set", "data.workers=0", *QUIET])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


# ---- splits agree with each other, when the data is loaded -----------------------------------


def _pngs(folder: Path, n: int, size=8, mode="L"):
    import numpy as np
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    for i in range(n):
        shape = (size, size) if mode == "L" else (size, size, 3)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(folder / f"{i}.png")


@pytest.mark.parametrize("layout, message", [
    ("test-3-channels", None),  # a folder decodes its test images as its training images: grey
    ("test-extra-class", "has class folders ['c'] that"),
    ("train-alone-one-class", "has 1 class: a classifier needs at least 2"),
    ("train-alone", None),  # ROOT/train alone: its class folders are the classes, the test set drawn from them
    ("train-beside-valid", None),
    ("train-beside-other", "holds train/ beside ['other']"),
])
def test_folder_splits_agree_when_the_data_is_loaded(tmp_path, layout, message):
    from jacmatch.data import create_dataset
    from jacmatch.data.formats import DataError
    from jacmatch.data.sources import Loading
    root = tmp_path / "d"
    for c in ("a", "b"):
        _pngs(root / "train" / c, 6)
    if layout == "test-3-channels":
        for c in ("a", "b"):
            _pngs(root / "test" / c, 2, mode="RGB")
    elif layout == "test-extra-class":
        for c in ("a", "b", "c"):
            _pngs(root / "test" / c, 2)
    elif layout == "train-alone":  # more images: its test set comes out of them too
        for c in ("a", "b"):
            _pngs(root / "train" / c / "more", 6)
    elif layout == "train-alone-one-class":
        shutil.rmtree(root / "train" / "b")
    elif layout == "train-beside-valid":
        for c in ("a", "b"):
            _pngs(root / "valid" / c, 2)
    elif layout == "train-beside-other":
        _pngs(root / "other" / "a", 2)
    load = lambda: create_dataset(str(root), val_size=0.5, samples_per_class=2, loading=Loading())  # noqa: E731
    if message is None:  # ROOT/train beside ROOT/valid or ROOT/test: the splits, two classes named a and b
        data = load()
        assert data.num_classes == 2 and len(data.test) == (4 if layout != "train-alone" else 5)
        assert data.test.sample_shape == data.train.sample_shape == (1, 8, 8)
        assert data.test.batch([0])[0].shape == (1, 1, 8, 8)
        return
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load()


@pytest.mark.parametrize("test_shape", [(1, 10, 10), (3, 8, 8)])
def test_npz_test_images_of_another_size_or_channels_are_refused_when_loaded(tmp_path, test_shape):
    import numpy as np

    from jacmatch.data import create_dataset
    from jacmatch.data.formats import DataError
    np.savez(tmp_path / "d.npz", train_images=np.zeros((8, 1, 8, 8), np.uint8), train_labels=np.arange(8) % 2,
             test_images=np.zeros((4, *test_shape), np.uint8), test_labels=np.arange(4) % 2)
    shape = "x".join(map(str, test_shape))
    with pytest.raises(DataError, match=f"the test images are {shape}, the training images 1x8x8"):
        create_dataset(f"npz:{tmp_path / 'd.npz'}")


def test_a_class_whose_only_image_falls_into_validation_is_named(tmp_path):
    """Whatever the split's seed: where class c's one image is drawn for validation, the
    load is refused naming the class (it trained with no sample of it before); elsewhere c
    has its training sample."""
    from jacmatch.data import create_dataset
    from jacmatch.data.formats import DataError
    from jacmatch.data.sources import Loading
    root = tmp_path / "d"
    for c, n in (("a", 6), ("b", 6), ("c", 1)):
        _pngs(root / "train" / c, n)
        _pngs(root / "test" / c, 2)
    refused = 0
    for seed in range(12):
        try:
            data = create_dataset(str(root), val_size=0.4, split_seed=seed, loading=Loading())
        except DataError as exc:
            assert "class 2 has no training sample once the validation split took its share (1 in all)" in str(exc)
            refused += 1
        else:
            assert int((data.train.labels == 2).sum()) == 1
    assert 0 < refused < 12


# ---- bad samples are counted and named everywhere --------------------------------------------


def _folder_with_a_truncated_png(root: Path) -> Path:
    for c in ("a", "b"):
        _pngs(root / "train" / c, 4)
        _pngs(root / "test" / c, 2)
    broken = root / "train" / "a" / "0.png"
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # its header reads; its pixels do not
    return broken


def test_statistics_are_taken_over_the_readable_samples_only(tmp_path):
    import numpy as np
    from PIL import Image

    from jacmatch.data import create_dataset
    from jacmatch.data.sources import Loading
    root = tmp_path / "d"
    broken = _folder_with_a_truncated_png(root)
    data = create_dataset(str(root), val_size=0, loading=Loading(on_bad_sample="skip"))
    good = [np.asarray(Image.open(p), dtype=np.float64) / 255 for p in sorted((root / "train").rglob("*.png"))
            if p != broken]
    assert data.mean[0] == pytest.approx(float(np.mean(good)), abs=1e-6)  # (pixels are float32)
    assert data.std[0] == pytest.approx(float(np.std(good, ddof=1)), abs=1e-6)


def test_an_evaluation_batch_of_unreadable_samples_only_is_evaluated(tmp_path):
    import torch

    from jacmatch.data import create_dataset
    from jacmatch.data.sources import Loading
    from jacmatch.training import evaluate
    root = tmp_path / "d"
    _folder_with_a_truncated_png(root)
    data = create_dataset(str(root), val_size=0, loading=Loading(on_bad_sample="skip"))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    bad = int((data.train.index == 0).nonzero()[0]) if hasattr(data.train, "index") else 0
    result = evaluate(model, data.train.subset([bad]), "cpu", batch_size=1)  # the one sample: unreadable
    assert result["acc"] == 0.0 and data.train.bad.count == 1


def test_a_dangling_link_is_named_like_any_unreadable_file(tmp_path):
    from jacmatch.data import create_dataset
    from jacmatch.data.formats import DataError
    root = tmp_path / "d"
    for c in ("a", "b"):
        _pngs(root / c, 3)
    (root / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(DataError, match="gone.png is not a readable image"):
        create_dataset(str(root))


def test_a_decompression_bomb_is_a_bad_file_not_a_traceback(tmp_path, monkeypatch):
    from PIL import Image

    from jacmatch.data import create_dataset
    from jacmatch.data.formats import DataError
    root = tmp_path / "d"
    for c in ("a", "b"):
        _pngs(root / c, 3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # an 8x8 image is then over twice the limit
    with pytest.raises(DataError, match="is not a readable image.*DecompressionBombError"):
        create_dataset(str(root))


def test_the_lightning_data_module_says_what_it_skipped(tmp_path):
    from jacmatch.integrations.lightning import JacmatchDataModule, SkippedSamplesWarning
    root = tmp_path / "d"
    _folder_with_a_truncated_png(root)
    module = JacmatchDataModule({"name": str(root), "on_bad_sample": "skip", "val_size": 0, "workers": 0},
                                batch_size=16)
    module.setup()
    with pytest.warns(SkippedSamplesWarning, match="skipped 1 unreadable sample"):
        batches = list(module.train_dataloader())
    assert sum(len(x) for x, _ in batches) == len(module.splits.train) - 1


# ---- options apply to every source ------------------------------------------------------------


def test_channels_and_image_size_apply_to_arrays_datasets_and_hugging_face(tmp_path, monkeypatch):
    """--channels and --image-size, which config.yaml records, change what npz, a Dataset by
    import path and a Hugging Face folder give: RGBA to RGB, grey to RGB, 8x8 to 4x4; and
    Hugging Face images of mixed sizes train once --image-size is set, as its error says."""
    import datasets
    import numpy as np
    from PIL import Image

    from jacmatch.data.sources import Loading, SourceOptions, open_source
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "g.npz", train_images=rng.integers(0, 255, (6, 1, 8, 8), dtype=np.uint8),
             train_labels=np.arange(6) % 2)
    (tmp_path / "rgba_data.py").write_text(
        "import numpy as np\nfrom PIL import Image\n\ndef make():\n"
        "    rng = np.random.default_rng(2)\n"
        "    return [(Image.fromarray(rng.integers(0, 255, (8, 8, 4), dtype=np.uint8), 'RGBA'), i % 2)"
        " for i in range(6)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sizes = [(8, 8), (10, 6), (8, 8), (12, 12), (8, 8), (6, 10)]
    datasets.Dataset.from_dict({"image": [Image.fromarray(rng.integers(0, 255, s, dtype=np.uint8)) for s in sizes],
                                "label": [i % 2 for i in range(6)]},
                               features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
                               ).save_to_disk(str(tmp_path / "hf"))
    for name, options, shape in ((f"npz:{tmp_path / 'g.npz'}", {"channels": 3, "image_size": 4}, (3, 4, 4)),
                                 ("rgba_data:make", {"channels": 3}, (3, 8, 8)),
                                 ("rgba_data:make", {"channels": 1, "image_size": [4, 6]}, (1, 4, 6)),
                                 (f"hf:{tmp_path / 'hf'}", {"image_size": 8}, (1, 8, 8))):
        opened = open_source(name, SourceOptions(**options), Loading())
        x, _ = opened.train.batch(list(range(6)))
        assert opened.train.sample_shape == shape and x.shape == (6, *shape), (name, options, x.shape)
        assert 0 <= float(x.min()) and float(x.max()) <= 1


def test_measurement_commands_never_write_over_what_they_read(tmp_path, capsys):
    """estimators reads the committed teacher; check-model --dataset reads the data."""
    from jacmatch.bench.estimators import TEACHER
    root = Path(__file__).resolve().parent.parent
    teacher = root / TEACHER
    before = hashlib.sha256(teacher.read_bytes()).hexdigest()
    assert main(["estimators", "--json", str(teacher)]) == 2
    assert "which this command reads" in capsys.readouterr().err
    assert hashlib.sha256(teacher.read_bytes()).hexdigest() == before
    data = _png_folder(tmp_path / "images")
    assert main(["check-model", "small_cnn_4", "--dataset", str(data), "--json", str(data / "train" / "a" / "r.json")]) == 2
    assert "lies inside the data" in capsys.readouterr().err and not (data / "train" / "a" / "r.json").exists()
