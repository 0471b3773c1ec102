"""Your own data: image folders (PNG and JPEG through Pillow), .npz memmaps, a map-style
Dataset by import path and a local Hugging Face data set, each through the same trainer,
on real files the tests write."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import helpers
from helpers import QUIET

from jacmatch.data import DataError, create_dataset, register_dataset
from jacmatch.data.datasets import ImageSet
from jacmatch.training import config_from_dict, load_checkpoint, train

from PIL import Image as PIL  # noqa: N812  (the test extra installs Pillow: jacmatch[images])
from helpers import pixels, write_folder
TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
SMALL = ["--model", "small_cnn_4", "--set", "progress=false", "--set", "tensorboard=false"]


def jacmatch(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """``python -m jacmatch`` with tests/ on the path (its user data sets)."""
    return helpers.jacmatch(*args, cwd=cwd, env=ENV, timeout=timeout)


def refused(r, *words) -> None:
    err = r.stderr.strip()
    assert r.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, (r.returncode, err[-2000:])
    for w in words:
        assert w in err, (w, err)






@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """train/ and test/ folders of PNGs, 4 classes of 8×8 grey images."""
    root = tmp_path_factory.mktemp("images")
    write_folder(root / "train", *pixels(160))
    write_folder(root / "test", *pixels(40, seed=1))
    return root


def _in_memory(root_x, root_y, test_x, test_y) -> str:
    """The same samples as the folder, in the folder's order, as an in-memory data set."""
    def ordered(x, y):
        idx = np.lexsort((np.arange(len(y)), y))  # by class, then by file name (the index)
        return ImageSet(torch.from_numpy(x[idx][:, None].copy()), torch.from_numpy(y[idx].astype(np.int64)))
    name = "same-as-folder"
    register_dataset(name, lambda d, dl: (ordered(root_x, root_y), ordered(test_x, test_y), 4, False))
    return name


def _values(out, name, **over) -> dict:
    return {"out_dir": str(out), "data": {"name": name, "samples_per_class": 5, "val_size": 0.2},
            "model": {"name": "small_cnn_4"}, "optim": {"epochs": 2, "batch_size": 8, "min_steps_per_epoch": 3},
            "objective": {"beta": 0.0, "gamma": 0.0}, **QUIET, **over}


# ---- the seam -----------------------------------------------------------------------------


@pytest.mark.slow  # starts a process (data-loading workers or the command line)
def test_a_folder_gives_the_weights_of_the_same_samples_in_memory(folder, tmp_path):
    """Same samples, same order: the weights of a run over PNG files equal those of the
    in-memory set to 1e-6 (only the streamed statistics' rounding differs)."""
    name = _in_memory(*pixels(160), *pixels(40, seed=1))
    a = train(config_from_dict(_values(tmp_path / "mem", name)))
    b = train(config_from_dict(_values(tmp_path / "png", f"imagefolder:{folder}")))
    assert a["num_train"] == b["num_train"] == 20 and a["final"]["test"]["acc"] == b["final"]["test"]["acc"]
    wa, wb = (load_checkpoint(tmp_path / n / "last.pt")["model"] for n in ("mem", "png"))
    for k in wa:
        torch.testing.assert_close(wa[k].float(), wb[k].float(), atol=1e-6, rtol=0)
    indices = [json.loads((tmp_path / n / "indices.json").read_text())["train"] for n in ("mem", "png")]
    assert indices[0] == indices[1]


def test_streamed_statistics_equal_the_in_memory_ones(folder):
    from jacmatch.data.datasets import streamed_statistics
    data = create_dataset(f"imagefolder:{folder}", val_size=0)
    x = torch.from_numpy(pixels(160)[0]).float()[:, None] / 255
    mean, std = streamed_statistics(data.train, torch.arange(len(data.train)), batch_size=7)
    assert mean[0] == pytest.approx(float(x.mean()), abs=1e-6) and std[0] == pytest.approx(float(x.std()), abs=1e-6)


def test_views_copy_nothing_and_read_only_what_a_batch_asks_for(tmp_path):
    x, y = pixels(200)
    np.savez(tmp_path / "a.npz", train_images=x[:, None], train_labels=y, test_images=x[:20, None],
             test_labels=y[:20])
    data = create_dataset(f"npz:{tmp_path / 'a.npz'}", samples_per_class=3, val_size=0.1)
    assert isinstance(data.train.images, np.memmap) and data.train.images is data.val.images  # one map, two views
    xb, yb = data.train.batch(torch.tensor([0, 5]))
    rows = data.train_indices
    assert torch.equal(xb, torch.from_numpy(x[[rows[0], rows[5]]][:, None]).float() / 255)
    assert yb.tolist() == [int(y[rows[0]]), int(y[rows[5]])]


# ---- every form, from Python and from the command line --------------------------------------


@pytest.mark.slow
def test_a_folder_from_any_working_directory_and_evaluate_without_data_options(folder, tmp_path, teacher):
    """The done-when of the issue: distil from a folder given relative to the working
    directory, then evaluate from another folder with no data option."""
    r = jacmatch("distill", "--recipe", "none", "--dataset", folder.name, "--teacher", teacher, "--samples-per-class", "5",
                 *SMALL, "--set", "optim.epochs=2", "--out", tmp_path / "s", cwd=folder.parent)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "evaluation" in r.stdout and "training" in r.stdout
    e = jacmatch("evaluate", "--checkpoint", tmp_path / "s" / "last.pt", "--teacher", teacher, cwd=tmp_path)
    assert e.returncode == 0, e.stderr[-2000:]
    assert json.loads(e.stdout)["acc"] == json.loads((tmp_path / "s" / "results.json").read_text())["final"]["test"]["acc"]


@pytest.mark.slow
def test_a_dataset_by_import_path_trains_and_evaluates(tmp_path, teacher, monkeypatch):
    r = jacmatch("distill", "--recipe", "none",
        "--dataset", "user_data:make_dataset", "--teacher", teacher, "--samples-per-class", "5",
                 *SMALL, "--set", "optim.epochs=2", "--out", tmp_path / "s", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    from jacmatch.cli import main
    monkeypatch.syspath_prepend(str(TESTS))
    assert main(["evaluate", "--checkpoint", str(tmp_path / "s" / "last.pt")]) == 2  # names the path to trust
    assert main(["evaluate", "--checkpoint", str(tmp_path / "s" / "last.pt"), "--dataset", "user_data:make_dataset"]) == 0


@pytest.mark.slow  # starts a process (data-loading workers or the command line)
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_png_and_jpeg_folders_train_from_python(tmp_path, suffix):
    x, y = pixels(80, size=10)
    write_folder(tmp_path / "imgs", x, y, suffix)  # one folder: the test set is drawn from it
    r = train(config_from_dict(_values(tmp_path / "r", str(tmp_path / "imgs"), data={
        "name": f"imagefolder:{tmp_path / 'imgs'}", "samples_per_class": 3, "image_size": 8})))
    assert r["num_classes"] == 4 and r["num_train"] == 12
    assert r["final"]["test"]["acc"] is not None and r["config"]["data"]["image_size"] == 8


def test_an_npz_memmap_trains(tmp_path):
    x, y = pixels(120)
    np.savez(tmp_path / "d.npz", x_train=x[:100], y_train=y[:100], x_test=x[100:], y_test=y[100:])
    r = train(config_from_dict(_values(tmp_path / "r", f"npz:{tmp_path / 'd.npz'}")))
    assert r["num_train"] == 20 and r["provenance"]["data_sha256"]


@pytest.mark.slow  # starts a process (data-loading workers or the command line)
def test_a_hugging_face_dataset_folder_trains(tmp_path):
    import datasets  # the test extra installs it (jacmatch[hf])
    x, y = pixels(100)
    features = datasets.Features({"img": datasets.Image(), "fine": datasets.ClassLabel(num_classes=4)})
    whole = datasets.Dataset.from_dict({"img": [PIL.fromarray(a) for a in x], "fine": y.tolist()}, features=features)
    datasets.DatasetDict({"train": whole.select(range(80)), "test": whole.select(range(80, 100))}).save_to_disk(
        str(tmp_path / "hf"))
    values = _values(tmp_path / "r", "")
    values["data"] = {"name": f"hf:{tmp_path / 'hf'}", "samples_per_class": 4, "image_column": "img",
                      "label_column": "fine"}
    r = train(config_from_dict(values))
    assert r["num_classes"] == 4 and r["num_train"] == 16
    values["data"]["label_column"] = "label"
    values["out_dir"] = str(tmp_path / "r2")
    with pytest.raises(DataError, match=r"has no column 'label' \(its columns: \['img', 'fine'\]\): set data.label_column"):
        train(config_from_dict(values))


@pytest.mark.slow  # starts a process (data-loading workers or the command line)
def test_the_teacher_cache_works_over_a_folder(folder, tmp_path, teacher):
    over = {"teacher": teacher, "objective": {"beta": 1.0, "gamma": 1.0}}
    cached = train(config_from_dict(_values(tmp_path / "c", f"imagefolder:{folder}", **over)))
    fresh = train(config_from_dict(_values(tmp_path / "f", f"imagefolder:{folder}", teacher_cache=False, **over)))
    wa, wb = (load_checkpoint(tmp_path / n / "last.pt")["model"] for n in "cf")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)
    assert cached["final"]["test"]["acc"] == fresh["final"]["test"]["acc"]


# ---- processes ----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_mid_epoch_resume_over_a_folder_is_bit_identical(folder, tmp_path, teacher):
    common = ["distill", "--recipe", "none", "--teacher", teacher, "--dataset", f"imagefolder:{folder}", *SMALL,
              "--samples-per-class", "8", "--set", "data.augment=true", "--set", "optim.epochs=4",
              "--set", "optim.batch_size=8", "--set", "optim.min_steps_per_epoch=75", "--set", "eval.every=2"]
    out = tmp_path / "cut"
    process = subprocess.Popen([sys.executable, "-m", "jacmatch", *map(str, common), "--out", str(out)], env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start = time.time()
    while not (out / "last.pt").is_file() and time.time() - start < 120:
        assert process.poll() is None, process.communicate()[1][-2000:]
        time.sleep(0.05)
    time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    state = load_checkpoint(out / "last.pt")
    assert process.returncode == 75 and 0 < state["step"] <= 75, err[-2000:]
    resumed = jacmatch(*common, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = jacmatch(*common, "--out", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    a, b = load_checkpoint(out / "last.pt")["model"], load_checkpoint(tmp_path / "straight" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- bad input: one line, exit 2, nothing written ------------------------------------------------


def _bad_folder(tmp_path, case: str) -> Path:
    root = tmp_path / case
    x, y = pixels(40)
    if case == "empty":
        root.mkdir()
    elif case == "empty-class":
        write_folder(root, x, y)
        (root / "class_9").mkdir()
    elif case == "non-image":
        write_folder(root, x, y)
        (root / "class_0" / "notes.txt").write_text("not an image")
    elif case == "corrupt":
        write_folder(root, x, y)
        (root / "class_1" / "00001.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    elif case == "truncated":
        write_folder(root, x, y)
        data = (root / "class_2" / "00002.png").read_bytes()
        (root / "class_2" / "00002.png").write_bytes(data[: len(data) // 2])
    elif case == "mixed-sizes":
        write_folder(root, x, y)
        PIL.fromarray(np.zeros((12, 12), np.uint8)).save(root / "class_3" / "big.png")
    return root


@pytest.mark.parametrize("case,words", [
    ("empty", ["has no class subfolders"]), ("empty-class", ["class_9 holds no images"]),
    ("non-image", ["notes.txt is not an image file"]), ("corrupt", ["00001.png is not a readable image"]),
    ("truncated", ["00002.png cannot be read"]), ("mixed-sizes", ["mixed image sizes", "set data.image_size"]),
])
@pytest.mark.slow  # starts a process (data-loading workers or the command line)
def test_bad_folders_are_one_line(tmp_path, capsys, case, words):
    from jacmatch.cli import main
    root = _bad_folder(tmp_path, case)
    assert main(["train-teacher", "--dataset", str(root), *SMALL, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert not (tmp_path / "r" / "last.pt").exists()


@pytest.mark.slow  # starts a process (data-loading workers or the command line)
def test_other_bad_data_is_one_line(tmp_path, capsys):
    from jacmatch.cli import main
    x, y = pixels(40)
    cases = {
        "user_data:not_a_dataset": "not a data set",
        "user_data:labels_out_of_range": "label of sample 3 is 5, outside 0..3",
        "user_data:missing": "has no attribute 'missing'",
        f"npz:{tmp_path / 'none.npz'}": "does not exist",
    }
    for spec, words in cases.items():
        assert main(["train-teacher", "--dataset", spec, *SMALL, "--out", str(tmp_path / "r")]) == 2, spec
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, (spec, err)
    root = tmp_path / "f"
    write_folder(root, x, y)
    assert main(["train-teacher", "--dataset", str(root), "--set", "data.samples_per_class=50", *SMALL,
                 "--out", str(tmp_path / "r")]) == 2
    assert "samples_per_class=50 but class" in capsys.readouterr().err
    assert main(["train-teacher", "--data-dir", str(root), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not by digits" in err and f"--dataset {root}" in err and len(err.splitlines()) == 1


def _truncated_in_training(tmp_path, skip: bool) -> tuple[dict, Path]:
    """A truncated file among the training images, found mid-run (the statistics are given,
    so nothing reads the file before training does)."""
    root = _bad_folder(tmp_path, "truncated")
    values = _values(tmp_path / "r", f"imagefolder:{root}")
    values["data"].update({"samples_per_class": None, "val_size": 0.0, "mean": [0.3], "std": [0.3],
                           "on_bad_sample": "skip" if skip else "stop", "workers": 0})
    return values, root


def test_a_bad_sample_mid_run_names_its_file_and_stops(tmp_path):
    values, root = _truncated_in_training(tmp_path, skip=False)
    with pytest.raises(DataError, match=r"00002.png cannot be read .*data.on_bad_sample=skip"):
        train(config_from_dict(values))
    assert not (tmp_path / "r" / "last.pt").exists()


def test_a_bad_sample_is_skipped_and_counted_with_skip(tmp_path):
    values, root = _truncated_in_training(tmp_path, skip=True)
    train(config_from_dict(values))
    metrics = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    # one file, read in every epoch: counted once
    assert [m["bad_samples"] for m in metrics] == [1, 1] and "00002.png" in metrics[-1]["first_bad_sample"]


def test_bad_samples_are_counted_once_each_and_the_first_is_first_in_the_data_sets_order():
    from jacmatch.data.sources import BadSamples
    mine, theirs = BadSamples(), BadSamples()
    mine.add([(7, "seven cannot be read"), (3, "three cannot be read")])
    mine.add([(7, "seven cannot be read")])  # read again next epoch
    theirs.add([(1, "one cannot be read")])
    assert (mine.count, mine.first) == (2, "three cannot be read")
    mine.add(theirs.found)  # what another process found
    assert (mine.count, mine.first) == (3, "one cannot be read")


# ---- the paper's protocols as shipped configs -----------------------------------------------


@pytest.mark.vision
def test_the_scenes_transfer_config_runs_over_a_folder_of_jpegs(tmp_path):
    """transfer/scenes_resnet34_resnet18 as shipped (224×224, centre crops, ImageNet
    statistics, a torchvision teacher from a local weights file), on a tiny MIT-Scenes-like
    folder of RGB JPEGs of other sizes; only the length of the run is cut."""
    import torchvision
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 1)):
        for c in ("bar", "kitchen"):
            (tmp_path / "scenes" / split / c).mkdir(parents=True)
            for i in range(n):
                PIL.fromarray(rng.integers(0, 255, (240 + 10 * i, 300, 3), dtype=np.uint8)).save(
                    tmp_path / "scenes" / split / c / f"{i}.jpg", quality=90)
    torch.save(torchvision.models.resnet34(num_classes=1000).state_dict(), tmp_path / "resnet34.pth")
    r = jacmatch("distill", "--config", "transfer/scenes_resnet34_resnet18", "--dataset", tmp_path / "scenes",
                 "--teacher-weights", tmp_path / "resnet34.pth", "--samples-per-class", "2", "--out", tmp_path / "s",
                 "--set", "optim.epochs=1", "--set", "optim.min_steps_per_epoch=1", "--set", "optim.batch_size=4",
                 "--set", "progress=false", "--set", "data.val_size=1", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "s" / "results.json").read_text())
    assert results["num_classes"] == 2 and results["config"]["data"]["image_size"] == 224
    assert {"at", "at_jm"} <= set(results["final"]["train"]) and results["teacher_parameters"] > 2e7


@pytest.mark.slow  # starts a process (data-loading workers or the command line)
def test_check_model_takes_the_shape_and_classes_of_a_data_set(folder, capsys):
    from jacmatch.cli import main
    assert main(["check-model", "small_cnn_4", "--dataset", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "input 1x8x8" in out, out


@pytest.mark.slow  # starts a process (data-loading workers or the command line)
def test_every_form_trains_from_the_command_line(tmp_path, monkeypatch, capsys):
    """npz, a Hugging Face folder and a parquet data file, and a Dataset by import path,
    through `jacmatch train-teacher` (in this process: the subprocess tests above cover the
    folder and the import path in their own processes)."""
    from jacmatch.cli import main
    x, y = pixels(100)
    np.savez(tmp_path / "d.npz", images=x, labels=y)
    forms = [f"npz:{tmp_path / 'd.npz'}", "user_data:make_dataset"]
    import datasets
    ds = datasets.Dataset.from_dict({"image": [PIL.fromarray(a) for a in x], "label": y.tolist()},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.ClassLabel(num_classes=4)}))
    ds.save_to_disk(str(tmp_path / "hf"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    forms += [f"hf:{tmp_path / 'hf'}", f"hf:{tmp_path / 'd.parquet'}"]
    monkeypatch.syspath_prepend(str(TESTS))
    for i, form in enumerate(forms):
        out = tmp_path / f"r{i}"
        assert main(["train-teacher", "--dataset", form, *SMALL, "--set", "optim.epochs=1", "--out", str(out)]) == 0, \
            capsys.readouterr().err
        assert json.loads((out / "results.json").read_text())["num_classes"] == 4
        assert main(["evaluate", "--checkpoint", str(out / "last.pt")] +
                    (["--dataset", form] if form.startswith("user_data") else [])) == 0, capsys.readouterr().err


def test_a_new_kind_of_source_is_one_opener_and_one_line(monkeypatch):
    """register_source names a new kind: --dataset PREFIX:ARG opens it, the config's checks
    and the splitter take it as they take the built-in kinds, and its splits are Splits."""
    from jacmatch.data import Split, create_dataset, register_source, sources
    from jacmatch.data.sources import Opened, source_kind
    from jacmatch.data.splits import ArraySplit
    from jacmatch.training import config_from_dict
    monkeypatch.setattr(sources.SOURCES, "_entries", dict(sources.SOURCES._entries))  # as it was, after the test

    def opener(arg, d, loading):
        n = int(arg)
        images = np.random.default_rng(0).random((n, 1, 4, 4)).astype(np.float32)
        return Opened(ArraySplit(images, torch.arange(n) % 2), None, 2, f"toy-{n}")
    register_source("toy", opener)
    assert source_kind("toy:40") == ("toy", "40") and "toy" in sources.list_sources()
    data = create_dataset("toy:40", val_size=4)
    assert len(data.train) + len(data.val) + len(data.test) == 40 and data.num_classes == 2
    assert all(isinstance(s, Split) for s in (data.train, data.val, data.test)) and data.data_sha256
    config_from_dict({"data": {"name": "toy:40"}, "objective": {"beta": 0, "gamma": 0}}).check()
    with pytest.raises(ValueError, match="lower-case word"):
        register_source("Bad Prefix", opener)
