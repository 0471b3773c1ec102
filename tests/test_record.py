"""Nothing silent: every everyday situation that could leave a wrong or mixed run record
is refused in one line (exit 2) or works correctly. Real processes, as the README's
other guarantees are tested; each test names the case of the README it holds."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CHILD_ENV, QUIET, jacmatch, run

from jacmatch.data import DataError, create_dataset, register_dataset
from jacmatch.data.datasets import ImageSet
from jacmatch.training import CheckpointError, config_from_dict, load_checkpoint, save_checkpoint, train
from jacmatch.training.checkpoint import VersionWarning

SMALL = ["--model", "small_cnn_4", "--set", "progress=false", "--set", "tensorboard=false"]



def cli(*args) -> int:
    """The same command in this process (the setup of a test whose checked step runs in its own)."""
    from jacmatch.cli import main
    return main([str(a) for a in args])


def refused(r: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 2, one line on stderr that holds every word, no traceback."""
    err = r.stderr.strip()
    assert r.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, (r.returncode, err[-2000:])
    for word in words:
        assert word in err, (word, err)


def write_idx(folder: Path, shift: int = 0, size: int = 8, n_train: int = 120, n_test: int = 40) -> None:
    """The four IDX files of an MNIST-format data set (``shift`` moves every label)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        labels = ((np.arange(n) + shift) % 10).astype(np.uint8)
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        images[np.arange(n), labels % size, :] = 255  # a learnable stripe per class
        for kind, a in (("images", images), ("labels", labels)):
            header = bytes([0, 0, 8, a.ndim]) + np.array(a.shape, dtype=">u4").tobytes()
            (folder / f"{stem}-{kind}-idx{a.ndim}-ubyte").write_bytes(header + a.tobytes())


# ---- 1. extending a run ------------------------------------------------------------------


@pytest.mark.slow
def test_extending_a_finished_run_trains_at_a_rate_above_zero(tmp_path):
    a, r = tmp_path / "A", tmp_path / "R"
    base = ["train-teacher", "--dataset", "synthetic", *SMALL, "--set", "data.samples_per_class=16"]
    assert cli(*base, "--out", a, "--set", "optim.epochs=2") == 0
    shutil.copytree(a, r)
    done = jacmatch(*base, "--out", r, "--set", "optim.epochs=3", "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    lrs = [json.loads(line)["lr"] for line in (r / "metrics.jsonl").read_text().splitlines()]
    assert lrs[:2] == [0.05, 0.025] and lrs[2] == pytest.approx(0.05 * 0.25)  # cosine of a 3-epoch plan at epoch 2
    before, after = load_checkpoint(a / "last.pt")["model"], load_checkpoint(r / "last.pt")["model"]
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())
    resume = json.loads((r / "history.jsonl").read_text().splitlines()[-1])
    assert resume["schedule"] == {"from_epoch": 3, "old": {"epochs": 2, "lr": []},
                                  "new": {"epochs": 3, "lr": [pytest.approx(0.0125)]}}


def test_extending_by_several_epochs_follows_the_longer_plan(tmp_path):
    values = {"out_dir": str(tmp_path / "r"), "data": {"name": "synthetic", "samples_per_class": 4},
              "model": {"name": "small_cnn_4"}, "objective": {"beta": 0, "gamma": 0}, "optim": {"epochs": 2}, **QUIET}
    train(config_from_dict(values))
    values["optim"]["epochs"] = 5
    train(config_from_dict(values), resume=True)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    import math
    plan = [0.05 * 0.5 * (1 + math.cos(math.pi * e / 5)) for e in range(2, 5)]
    assert lrs[2:] == pytest.approx(plan) and min(lrs) > 0


# ---- 2. resume and evaluate guard contents ------------------------------------------------


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory) -> Path:
    """A teacher of the same architecture as the session's, with other weights."""
    from helpers import teacher_values
    values = teacher_values(tmp_path_factory.mktemp("other_teacher"))
    values["seed"] = 1
    train(config_from_dict(values))
    return Path(values["out_dir"]) / "last.pt"


@pytest.mark.slow
def test_a_teacher_replaced_at_the_same_path_is_refused_on_resume(tmp_path, teacher, other_teacher):
    path = tmp_path / "teacher.pt"
    shutil.copyfile(teacher, path)
    run = ["distill", "--recipe", "none", "--teacher", path, "--dataset", "synthetic", *SMALL, "--samples-per-class", "4",
           "--out", tmp_path / "s"]
    assert cli(*run, "--set", "optim.epochs=1") == 0
    from jacmatch.training.provenance import file_sha256
    old = file_sha256(path)
    shutil.copyfile(other_teacher, path)
    refused(jacmatch(*run, "--set", "optim.epochs=2", "--resume"), "SHA-256", old, file_sha256(path), str(path))
    results = json.loads((tmp_path / "s" / "results.json").read_text())
    assert results["epochs"] == 1 and results["inputs"]["teacher"]["sha256"] == old  # the record is intact


@pytest.mark.slow
def test_a_relative_teacher_path_from_another_folder_is_checked_by_content(tmp_path, teacher, other_teacher,
                                                                         monkeypatch):
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir(), there.mkdir()
    shutil.copyfile(teacher, here / "t.pt")
    shutil.copyfile(other_teacher, there / "t.pt")
    run = ["distill", "--recipe", "none", "--teacher", "t.pt", "--dataset", "synthetic", *SMALL, "--samples-per-class", "4",
           "--out", tmp_path / "s"]
    with monkeypatch.context() as m:
        m.chdir(here)
        assert cli(*run, "--set", "optim.epochs=1") == 0
    refused(jacmatch(*run, "--set", "optim.epochs=2", "--resume", cwd=there), str(there / "t.pt"), str(here / "t.pt"))
    moved = tmp_path / "moved.pt"  # the same teacher at another path: its content is what counts
    shutil.copyfile(teacher, moved)
    run[run.index("t.pt")] = str(moved)
    r = jacmatch(*run, "--set", "optim.epochs=2", "--resume", cwd=there)
    assert r.returncode == 0, r.stderr[-2000:]
    history = [json.loads(line) for line in (tmp_path / "s" / "history.jsonl").read_text().splitlines()]
    assert history[-1]["changes"]["teacher"] == ["t.pt", str(moved)]


@pytest.mark.slow
def test_data_rewritten_between_stop_and_resume_is_refused(tmp_path):
    data = tmp_path / "data"
    write_idx(data)
    run = ["train-teacher", "--dataset", "mnist", "--data-dir", data, *SMALL, "--set", "data.samples_per_class=5",
           "--out", tmp_path / "r"]
    assert cli(*run, "--set", "optim.epochs=1") == 0
    indices = (tmp_path / "r" / "indices.json").read_text()
    write_idx(data, shift=1)  # the labels moved by one
    refused(jacmatch(*run, "--set", "optim.epochs=2", "--resume"), "data", "SHA-256", "the files changed")
    assert (tmp_path / "r" / "indices.json").read_text() == indices  # nothing written over


@pytest.mark.slow
def test_evaluate_refuses_a_teacher_of_another_class_count_and_names_other_data(tmp_path, teacher, capsys):
    """A 4-class teacher beside a 10-class student is refused; a 10-class teacher trained
    on other data (28×28 MNIST-format files, the student on 8×8 digits) is one warning line."""
    student = tmp_path / "student"
    assert cli("train-teacher", "--dataset", "digits", *SMALL, "--set", "optim.epochs=1", "--set",
               "data.samples_per_class=5", "--out", student) == 0
    capsys.readouterr()
    assert cli("evaluate", "--checkpoint", student / "last.pt", "--teacher", teacher) == 2
    err = capsys.readouterr().err.strip()
    assert "class-count mismatch" in err and "4 outputs, the student 10" in err and len(err.splitlines()) == 1, err
    write_idx(tmp_path / "mnist", size=28)
    other = tmp_path / "other"
    assert cli("train-teacher", "--dataset", "mnist", "--data-dir", tmp_path / "mnist", *SMALL,
               "--set", "optim.epochs=1", "--out", other) == 0
    r = jacmatch("evaluate", "--checkpoint", student / "last.pt", "--teacher", other / "last.pt")
    assert r.returncode == 0, r.stderr[-2000:]
    warning = [line for line in r.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and "trained on mnist" in warning[0] and "the student on digits" in warning[0], r.stderr
    assert "jacobian_cosine" in json.loads(r.stdout)


# ---- 3. one run per folder ----------------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_on_a_folder_in_use_is_refused_with_the_holders_pid(tmp_path):
    out = tmp_path / "r"
    args = [sys.executable, "-m", "jacmatch", "train-teacher", "--dataset", "synthetic", *SMALL,
            "--set", "optim.epochs=10000", "--set", "eval.every=10000", "--set", "data.samples_per_class=4",
            "--out", str(out)]
    first = subprocess.Popen(args, env=CHILD_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (out / "last.pt").is_file():  # written under the lock, once the run has trained an epoch
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.05)
        for extra in ([], ["--overwrite"], ["--resume"]):
            start = time.time()
            second = jacmatch(*args[3:], *extra)
            refused(second, f"PID {first.pid}", str(out))
            assert time.time() - start < 30  # at once: nothing is loaded before the lock is tried
    finally:
        first.kill()
        first.wait()
    assert json.loads((out / "history.jsonl").read_text().splitlines()[0])["event"] == "start"
    assert len((out / "history.jsonl").read_text().splitlines()) == 1  # one run's record


@pytest.mark.slow
def test_a_folder_with_run_files_or_the_users_config_is_never_written_over(tmp_path):
    mine = tmp_path / "myexp"
    mine.mkdir()
    text = "# my experiment: a comment jacmatch must keep\noptim:\n  epochs: 1\nprogress: false\n"
    (mine / "config.yaml").write_text(text)
    (mine / "results.json").write_text('{"mine": true}')
    run = ["train-teacher", "--config", mine / "config.yaml", "--dataset", "synthetic", "--out", mine]
    refused(jacmatch(*run), "already holds a run", "config.yaml", "results.json", "--overwrite")
    assert cli(*run, "--overwrite") == 2  # --overwrite would replace the user's config: refused
    assert (mine / "config.yaml").read_text() == text and (mine / "results.json").read_text() == '{"mine": true}'
    other = tmp_path / "other"
    (other).mkdir()
    (other / "metrics.jsonl").write_text("{}\n")
    assert cli("train-teacher", "--dataset", "synthetic", *SMALL, "--out", other) == 2  # it holds metrics.jsonl
    r = jacmatch("train-teacher", "--dataset", "synthetic", *SMALL, "--set", "optim.epochs=1", "--out", other,
                 "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len((other / "metrics.jsonl").read_text().splitlines()) == 1  # the new run's, alone


def test_a_resume_from_the_folders_own_config_keeps_that_file(tmp_path):
    from jacmatch.cli import main
    out = tmp_path / "r"
    run = ["train-teacher", "--dataset", "synthetic", *SMALL, "--set", "optim.epochs=1", "--out", str(out)]
    assert main(run) == 0
    config = out / "config.yaml"
    config.write_text("# resumed from here\n" + config.read_text())
    assert main(["train-teacher", "--config", str(config), "--out", str(out), "--set", "optim.epochs=2",
                 "--resume"]) == 0
    assert config.read_text().startswith("# resumed from here\n")
    assert load_checkpoint(out / "last.pt")["epoch"] == 2


# ---- 4. every file atomic -----------------------------------------------------------------


def _complete_png(path: Path) -> bool:
    data = path.read_bytes()
    return data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82")


@pytest.mark.slow
def test_kills_during_the_report_leave_every_file_whole(tmp_path):
    """`jacmatch report` over a copy of the committed results, killed with SIGTERM or
    SIGKILL at random moments: every figure and REPORT.md on disk is complete, SIGTERM
    says so in one line, and the next report writes them all."""
    root = Path(__file__).resolve().parents[1]
    folder = tmp_path / "results" / "paper"
    shutil.copytree(root / "results" / "paper", folder)
    drawn = ("distill.png", "distill_noise.png", "robustness.png")  # the report's own figures
    for name in drawn:
        (folder / name).unlink()  # each kill lands while figures are written for the first time or again
    rng = random.Random(0)
    outcomes = []
    for attempt in range(4):
        proc = subprocess.Popen([sys.executable, "-m", "jacmatch", "report", "--results", str(folder)], cwd=tmp_path,
                                env=CHILD_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(1.2, 3.2))
        kill = signal.SIGTERM if attempt % 2 == 0 else signal.SIGKILL
        proc.send_signal(kill)
        _, err = proc.communicate(timeout=60)
        outcomes.append(proc.returncode)
        if kill == signal.SIGTERM and proc.returncode == 143:
            assert len(err.strip().splitlines()) == 1 and "stopped by SIGTERM" in err, err
        for png in folder.glob("*.png"):
            assert _complete_png(png), (attempt, png.name, png.stat().st_size)
        report = tmp_path / "results" / "REPORT.md"
        if report.is_file():
            assert report.read_text().rstrip().endswith((".", ")", "|", "`", "*")), report.read_text()[-200:]
    assert {143, -signal.SIGKILL} & set(outcomes), outcomes  # some kills landed mid-run
    final = jacmatch("report", "--results", folder, cwd=tmp_path)
    assert final.returncode == 0, final.stderr[-2000:]
    assert all(_complete_png(folder / name) for name in drawn)


def test_a_failed_figure_write_keeps_the_old_file(tmp_path):
    import matplotlib  # the test extra installs it (jacmatch[plots])
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jacmatch.atomic import save_figure
    fig = plt.figure()
    save_figure(fig, tmp_path / "f.png")
    before = (tmp_path / "f.png").read_bytes()
    with pytest.raises(ValueError):
        save_figure(fig, tmp_path / "f.png", dpi=float("nan"))
    assert (tmp_path / "f.png").read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["f.png"]
    plt.close(fig)


# ---- 5. configs ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_duplicated_key_is_refused_naming_both_lines(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("optim:\n  lr: 0.1\nseed: 1\noptim:\n  epochs: 2\n")
    refused(jacmatch("train-teacher", "--config", config, "--out", tmp_path / "r"),
            "duplicate key 'optim' on lines 1 and 4")
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_an_alias_bomb_is_refused_at_once_in_constant_memory(tmp_path):
    lines = ["model:", "  options:", '    a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"    {name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    config = tmp_path / "bomb.yaml"
    config.write_text("\n".join(lines) + "\n")  # 9^9 "lol"s once expanded
    start = time.time()
    r = run(["/usr/bin/time", "-f", "%M", sys.executable, "-m", "jacmatch", "train-teacher", "--config", config,
             "--out", tmp_path / "r"], timeout=120) if Path("/usr/bin/time").exists() else None
    if r is None:
        r = jacmatch("train-teacher", "--config", config, "--out", tmp_path / "r")
        peak_kib = 0
    else:
        peak_kib = int(r.stderr.strip().splitlines()[-1])
        r = subprocess.CompletedProcess(r.args, 2 if "Command exited with non-zero status 2" in r.stderr else
                                        r.returncode, r.stdout, r.stderr.strip().splitlines()[0] + "\n")
    assert time.time() - start < 30
    refused(r, "expands (through its aliases) past 1 MiB")
    assert peak_kib < 1_000_000, peak_kib  # the interpreter and torch, not the expansion (3.7 GB before)


@pytest.mark.parametrize("value", ["[[0],[1]]", '["a","b"]', "[0.5,1.5]", "[true,false]", "7", "[1,1]", "[-1]"])
def test_data_classes_of_the_wrong_type_is_one_line(value, capsys):
    from jacmatch.cli import main
    assert main(["train-teacher", "--set", f"data.classes={value}", "--out", "never"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.classes" in err and "Traceback" not in err, err


@pytest.mark.parametrize("key,value", [("data.samples_per_class", "'5'"), ("data.data_dir", "[1]"),
                                       ("teacher", "3"), ("optim.milestones", "[a]"), ("model.num_classes", "1.5")])
def test_every_optional_key_is_type_checked(key, value):
    from jacmatch.training import resolve
    from jacmatch.training.config import ConfigError
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve(None, [f"{key}={value}"])


# ---- 6. labels ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad,match", [(4, "sample 3 is 4"), (-1, "sample 3 is -1"),
                                       (-100, "sample 3 is -100 \\(cross-entropy would silently ignore it\\)"),
                                       (0.5, "float32, not integers")])
def test_labels_out_of_range_negative_or_not_integers_are_refused(bad, match, tmp_path, capsys):
    def loader(data_dir, download):
        x = torch.rand(40, 1, 8, 8)
        y = (torch.arange(40) % 4).float() if isinstance(bad, float) else torch.arange(40) % 4
        y[3] = bad
        return ImageSet(x, y), ImageSet(x[:8], torch.arange(8) % 4), 4, False
    register_dataset(f"bad-labels-{bad}", loader)
    with pytest.raises(DataError, match=match):
        create_dataset(f"bad-labels-{bad}")
    from jacmatch.cli import main
    assert main(["train-teacher", "--dataset", f"bad-labels-{bad}", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "training label" in err and not (tmp_path / "r" / "last.pt").exists(), err


# ---- 7. skipping has a bound (tests/test_reliability.py holds the steps) ----------------------


@pytest.mark.slow
def test_a_run_that_only_skips_exits_3(tmp_path, teacher):
    r = jacmatch("distill", "--recipe", "none", "--teacher", teacher, "--dataset", "synthetic", "--out", tmp_path / "o",
                 "--set", "objective.beta=1", "--set", "optim.lr=1000", "--set", "optim.momentum=0.99",
                 "--set", "nonfinite=skip", "--set", "optim.epochs=30", *SMALL[2:])
    assert r.returncode == 3, r.stderr[-2000:]
    assert "nonfinite=skip skipped" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "results.json").exists()


# ---- 8. checkpoint versions ---------------------------------------------------------------


def _edit_header(path: Path, edit) -> None:
    data = path.read_bytes()
    magic_end = data.index(b"\n") + 1
    header_end = data.index(b"\n", magic_end) + 1
    header = json.loads(data[magic_end:header_end])
    edit(header)
    path.write_bytes(data[:magic_end] + json.dumps(header).encode() + b"\n" + data[header_end:])


@pytest.mark.slow
def test_an_edited_version_field_is_refused_on_resume(tmp_path):
    run = ["train-teacher", "--dataset", "synthetic", *SMALL, "--set", "optim.epochs=1", "--out", tmp_path / "r"]
    assert cli(*run) == 0
    _edit_header(tmp_path / "r" / "last.pt", lambda h: h["versions"].update(jacmatch="99.0.0"))
    refused(jacmatch(*run[:-4], "--set", "optim.epochs=2", "--out", tmp_path / "r", "--resume"), "fails its checksum")


def test_a_newer_format_is_refused_and_another_version_loads_with_one_line(tmp_path, monkeypatch):
    import jacmatch
    path = tmp_path / "c.pt"
    monkeypatch.setattr(jacmatch, "__version__", "0.0.9")
    save_checkpoint(path, {"w": torch.ones(2)})
    monkeypatch.undo()
    with pytest.warns(VersionWarning, match=r"written by jacmatch 0\.0\.9, this is"):
        assert torch.equal(load_checkpoint(path)["w"], torch.ones(2))
    _edit_header(path, lambda h: h.update(format=3))
    with pytest.raises(CheckpointError, match="format 3.*upgrade jacmatch"):
        load_checkpoint(path)


def test_a_warning_said_again_is_shown_once_on_the_command_line(capsys):
    """A section loads its teacher once per run: its version warning is one line, not one per run."""
    from jacmatch.cli import _warning_line
    show = _warning_line("experiment")
    for text in ("t.pt was written by jacmatch 0.1.0", "t.pt was written by jacmatch 0.1.0", "u.pt was written"):
        show(VersionWarning(text), VersionWarning, "f.py", 1)
    assert capsys.readouterr().err.splitlines() == [
        "jacmatch experiment: warning: t.pt was written by jacmatch 0.1.0",
        "jacmatch experiment: warning: u.pt was written"]


def test_format_1_checkpoints_still_load(tmp_path):
    """The committed teachers were written in format 1 (the payload's hash only)."""
    root = Path(__file__).resolve().parents[1]
    teacher = root / "results" / "teachers" / "fmnist_resnet20.pt"
    from jacmatch.training.checkpoint import read_header
    assert read_header(teacher)["format"] == 1
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VersionWarning)
        assert "model" in load_checkpoint(teacher)


# ---- 9. paths ------------------------------------------------------------------------------


@pytest.mark.slow
def test_any_path_the_os_accepts_works(tmp_path):
    out = tmp_path / "runs é😀 x"
    r = jacmatch("train-teacher", "--dataset", "synthetic", *SMALL, "--set", "optim.epochs=1", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert cli("evaluate", "--checkpoint", out / "last.pt", "--noise-sigmas") == 0
    odd = os.fsencode(str(tmp_path)) + b"/not-utf8-\xff"  # bytes no encoding names: argv keeps them
    done = run([sys.executable, "-m", "jacmatch", "train-teacher", "--dataset", "synthetic", *SMALL,
                "--set", "optim.epochs=1", "--out", odd], text=False)
    assert done.returncode == 0 and os.path.isfile(odd + b"/last.pt"), done.stderr[-2000:]
    missing = tmp_path / "nowhere 😀" / "last.pt"
    from jacmatch.training import CheckpointError as Missing
    with pytest.raises(Missing, match=f"checkpoint {missing} does not exist"):
        load_checkpoint(missing)
