"""Faults, non-finite values, determinism and hostile input (reliability guarantees)."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import QUIET, first_errors, jacmatch, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jacmatch.atomic import write_atomic
from jacmatch.data import DataError, read_cifar_batch, read_idx
from jacmatch.training import CheckpointError, config_from_dict, load_checkpoint, save_checkpoint, train
from jacmatch.training.config import ConfigError, load_config
from jacmatch.training.step import NonFiniteError

# ---- checkpoints ----------------------------------------------------------------------


def test_checkpoint_roundtrip_and_versions(tmp_path):
    save_checkpoint(tmp_path / "c.pt", {"model": {"w": torch.ones(3)}, "epoch": 2})
    state = load_checkpoint(tmp_path / "c.pt")
    assert state["epoch"] == 2 and torch.equal(state["model"]["w"], torch.ones(3))
    assert state["_versions"]["torch"] == torch.__version__


@pytest.mark.parametrize("damage", ["truncate", "flip", "foreign", "empty", "pickle"])
def test_damaged_checkpoints_are_refused(tmp_path, damage):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model": {"w": torch.arange(1000.0)}})
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 100])
        match = "truncated"
    elif damage == "flip":
        path.write_bytes(data[:-50] + bytes([data[-50] ^ 0xFF]) + data[-49:])
        match = "checksum"
    elif damage == "foreign":
        torch.save({"w": torch.ones(1)}, path)
        match = "not a jacmatch checkpoint"
    elif damage == "empty":
        path.write_bytes(b"")
        match = "not a jacmatch checkpoint"
    else:
        path.write_bytes(b"JACMATCH-CHECKPOINT\n{not json\n")
        match = "corrupt header"
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")

    def half_then_crash(f):
        f.write("ne")
        raise OSError("disk full")
    with pytest.raises(OSError):
        write_atomic(path, half_then_crash)
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]


@pytest.mark.slow
def test_sigkill_at_random_moments_always_leaves_a_loadable_checkpoint(tmp_path, teacher):
    """A real training process killed with SIGKILL at random points (checkpoints are
    written every epoch, epochs are tiny, so kills land inside writes too): whatever is
    on disk loads, and --resume finishes the run with the same weights as a straight run."""
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "jacmatch", "distill", "--recipe", "none", "--teacher", teacher, "--dataset", "synthetic",
            "--model", "small_cnn_4", "--out", str(out), "--set", "objective.beta=1", "--set", "objective.gamma=1",
            "--set", "optim.epochs=40", "--set", "optim.batch_size=64", "--set", "eval.every=1000",
            "--set", "progress=false", "--set", "tensorboard=false", "--set", "data.samples_per_class=16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    epochs_seen = []
    last = out / "last.pt"
    for _attempt in range(5):
        before = last.stat().st_mtime_ns if last.exists() else 0
        proc = subprocess.Popen(args + (["--resume"] if last.exists() else []), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None and \
                (not last.exists() or last.stat().st_mtime_ns == before):
            time.sleep(0.01)  # wait for this process's first new checkpoint, then strike at random
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = load_checkpoint(last)  # whatever is on disk must load
        epochs_seen.append(state["epoch"])
    assert epochs_seen and epochs_seen == sorted(epochs_seen)
    final = run(args + (["--resume"] if (out / "last.pt").exists() else []), env=env)
    assert final.returncode == 0, final.stderr[-2000:]
    straight = tmp_path / "straight"
    args[args.index(str(out))] = str(straight)
    run(args, env=env, check=True)
    a, b = load_checkpoint(out / "last.pt")["model"], load_checkpoint(straight / "last.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- non-finite values -----------------------------------------------------------------


def _nan_at_epoch(monkeypatch, epoch_to_break: int):
    import jacmatch.core.builtin_terms as objective_mod
    real = objective_mod.kd_loss
    calls = {"n": 0}

    def kd_with_nan(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] > epoch_to_break else value
    monkeypatch.setattr(objective_mod, "kd_loss", kd_with_nan)


def test_injected_nan_stops_with_term_and_step_and_keeps_last_checkpoint(tmp_path, teacher, monkeypatch):
    values = {"out_dir": str(tmp_path / "s"), "teacher": teacher, "data": {"name": "synthetic", "samples_per_class": 8},
              "model": {"name": "small_cnn_4"}, "objective": {"beta": 1.0},
              "optim": {"epochs": 3, "batch_size": 32}, **QUIET}
    _nan_at_epoch(monkeypatch, 1)  # one step per epoch: the second epoch's step turns NaN
    with pytest.raises(NonFiniteError, match=r"non-finite kd at epoch 2, step 1"):
        train(config_from_dict(values))
    assert load_checkpoint(tmp_path / "s" / "last.pt")["epoch"] == 1


def _nan_at_calls(monkeypatch, calls_to_break):
    """KD turns NaN at these calls (1-based; one call per step)."""
    import jacmatch.core.builtin_terms as objective_mod
    real = objective_mod.kd_loss
    calls = {"n": 0}

    def kd_with_nan(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] in calls_to_break else value
    monkeypatch.setattr(objective_mod, "kd_loss", kd_with_nan)


def _skip_values(tmp_path, teacher, **over):
    return {"out_dir": str(tmp_path / "s"), "teacher": teacher, "data": {"name": "synthetic", "samples_per_class": 8},
            "model": {"name": "small_cnn_4"}, "objective": {"beta": 1.0}, "nonfinite": "skip",
            "optim": {"epochs": 3, "batch_size": 32, "min_steps_per_epoch": 4}, **QUIET, **over}


def test_nonfinite_skip_mode_finishes(tmp_path, teacher, monkeypatch):
    _nan_at_calls(monkeypatch, {6, 10})  # 4 steps an epoch: the second step of epochs 2 and 3
    results = train(config_from_dict(_skip_values(tmp_path, teacher)))
    history = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [h["skipped_steps"] for h in history] == [0, 1, 1] and results["epochs"] == 3


@pytest.mark.parametrize("limit,broken,match", [
    (20, set(range(5, 9)), r"skipped every step of this epoch \(4\); the last: non-finite kd at epoch 2, step 4"),
    (2, set(range(3, 13)), r"skipped 3 steps in a row \(more than skip_limit=2\); the last: non-finite kd at epoch 2, "
                           r"step 1"),
])
def test_skipping_has_a_bound(tmp_path, teacher, monkeypatch, limit, broken, match):
    """A teacher that turns NaN does not end in exit 0 with untrained weights: past
    skip_limit steps in a row, or a whole epoch, the run stops as nonfinite=stop does."""
    _nan_at_calls(monkeypatch, broken)
    with pytest.raises(NonFiniteError, match=match):
        train(config_from_dict(_skip_values(tmp_path, teacher, skip_limit=limit)))
    if 1 not in broken and limit == 20:
        assert load_checkpoint(tmp_path / "s" / "last.pt")["epoch"] == 1  # the last good checkpoint is kept


@pytest.mark.slow
def test_nonfinite_exits_nonzero_from_the_cli(tmp_path, teacher):
    r = jacmatch("distill", "--recipe", "none", "--teacher", teacher, "--dataset", "synthetic",
                 "--out", tmp_path / "o", "--set", "objective.beta=1", "--set", "optim.lr=1000",
                 "--set", "optim.momentum=0.99", "--set", "optim.epochs=3", "--set", "progress=false",
                 "--set", "tensorboard=false", env=os.environ)
    assert r.returncode == 3, r.stderr
    assert ("non-finite" in r.stderr or "diverged loss" in r.stderr) and "Traceback" not in r.stderr


# ---- determinism -----------------------------------------------------------------------


# ---- hostile input: fuzzing ------------------------------------------------------------

FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _valid_idx() -> bytes:
    a = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    return bytes([0, 0, 8, 3]) + np.array(a.shape, dtype=">u4").tobytes() + a.tobytes()


@FUZZ
@given(st.binary(max_size=200) | st.builds(lambda cut, flip: bytearray(_valid_idx())[:cut] if flip is None else
                                          bytes(b ^ (0xFF if i == flip else 0) for i, b in enumerate(_valid_idx())),
                                          st.integers(0, 40), st.none() | st.integers(0, 30)))
def test_fuzz_idx_reader(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("idx") / "f"
    path.write_bytes(bytes(blob))
    try:
        a = read_idx(path)
        assert isinstance(a, np.ndarray)
    except DataError:
        pass


def test_idx_header_claiming_a_huge_size_is_refused_quickly(tmp_path):
    path = tmp_path / "huge"
    path.write_bytes(bytes([0, 0, 8, 3]) + np.array([100000, 100000, 100000], dtype=">u4").tobytes())
    start = time.time()
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)
    assert time.time() - start < 1.0


def _valid_cifar() -> bytes:
    import pickle
    return pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, protocol=2)


def test_cifar_pickle_naming_a_huge_memo_index_is_refused_quickly(tmp_path):
    # protocol 2, an empty dict, then LONG_BINPUT at index 2**29: the C unpickler allocates
    # a memo table that long (measured: 22 s and 8 GiB)
    path = tmp_path / "huge_memo"
    path.write_bytes(b"\x80\x02}r" + (2**29).to_bytes(4, "little") + b".")
    start = time.time()
    with pytest.raises(DataError, match="lacks the keys"):
        read_cifar_batch(path, "labels")
    assert time.time() - start < 1.0


@FUZZ
@given(st.binary(max_size=300) | st.builds(lambda cut, pos, val: (lambda b: b[:pos] + bytes([val]) + b[pos + 1:cut])(
    _valid_cifar()), st.integers(0, 6400), st.integers(0, 200), st.integers(0, 255)))
def test_fuzz_cifar_reader(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("cifar") / "f"
    path.write_bytes(blob)
    try:
        x, y = read_cifar_batch(path, "labels")
        assert x.shape[1:] == (3, 32, 32) and len(y) == len(x)
    except DataError:
        pass


@FUZZ
@given(st.text(max_size=300) | st.binary(max_size=300))
def test_fuzz_config_loader(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_bytes(blob.encode("utf-8", "surrogatepass") if isinstance(blob, str) else blob)
    try:
        config_from_dict(load_config(str(path))).check()
    except (ConfigError, ValueError):
        pass


def test_yaml_cannot_construct_objects(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(path))


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_checkpoint_loader(tmp_path_factory, tail):
    path = tmp_path_factory.mktemp("ckpt") / "c.pt"
    path.write_bytes(b"JACMATCH-CHECKPOINT\n" + tail)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


# ---- limits ----------------------------------------------------------------------------


@pytest.mark.parametrize("setting,match", [
    ({"optim": {"batch_size": 10**9}}, "batch_size"),
    ({"objective": {"gamma": 1, "num_projections": 10**7}, "teacher": "t.pt"}, "num_projections"),
    ({"objective": {"beta": 0, "gamma": 0, "noise_sigma": 0.1, "noise_draws": 10**6}}, "noise_draws"),
    ({"optim": {"epochs": 10**9}}, "epochs"),
])
def test_absurd_settings_are_refused_before_work_starts(setting, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(setting).check()


def test_atomic_files_get_the_usual_mode(tmp_path):
    write_atomic(tmp_path / "f.txt", lambda f: f.write("x"))
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o666 & ~mask


# ---- resume guard ----------------------------------------------------------------------


def test_resume_with_a_changed_objective_is_refused_with_the_diff(tmp_path, teacher, capsys):
    from jacmatch.cli import main
    run = ["distill", "--recipe", "none", "--teacher", teacher, "--dataset", "synthetic", "--model", "small_cnn_4",
           "--samples-per-class", "4", "--set", "objective.beta=1", "--set", "objective.gamma=1",
           "--set", "optim.epochs=1", "--set", "progress=false", "--out", str(tmp_path / "s")]
    assert main(run) == 0
    config_before = (tmp_path / "s" / "config.yaml").read_text()
    capsys.readouterr()
    assert main([*run, "--resume", "--set", "objective.beta=0", "--set", "objective.gamma=100"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "objective.beta: 1.0 -> 0.0" in err and "objective.gamma: 1.0 -> 100.0" in err
    assert (tmp_path / "s" / "config.yaml").read_text() == config_before  # the record of what was trained
    assert main([*run, "--resume", "--set", "optim.epochs=2"]) == 0  # more epochs: allowed, and recorded
    history = [json.loads(line) for line in (tmp_path / "s" / "history.jsonl").read_text().splitlines()]
    assert [h["event"] for h in history] == ["start", "resume"]
    assert history[1]["changes"] == {"optim.epochs": [1, 2]} and history[1]["epoch"] == 1
    metrics = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("config_changes") for m in metrics] == [None, {"optim.epochs": [1, 2]}]


@pytest.mark.slow
def test_progress_in_a_log_is_plain_lines(tmp_path):
    """stderr is a pipe here, as in a batch job's log: one line per epoch, no carriage return."""
    r = jacmatch("train-teacher", "--dataset", "synthetic", "--model", "small_cnn_4", "--set", "optim.epochs=2",
                 "--set", "data.samples_per_class=8", "--out", tmp_path / "t", env=os.environ)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "\r" not in r.stderr and "\r" not in r.stdout
    lines = [line for line in r.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"] and " ce " in lines[0]


def test_a_full_disk_keeps_the_last_checkpoint_and_says_where(tmp_path, monkeypatch, capsys):
    """ENOSPC while the second epoch's checkpoint is written: one line naming the file, a
    non-zero exit, and the first epoch's checkpoint intact."""
    import errno

    import jacmatch.atomic as jio
    from jacmatch.cli import main
    real_fsync, calls = os.fsync, {"n": 0}

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] > 6:  # config, indices, history; epoch 1: metrics, last.pt; epoch 2: metrics; then last.pt
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)
    out = tmp_path / "t"
    args = ["train-teacher", "--dataset", "synthetic", "--model", "small_cnn_4", "--set", "optim.epochs=2",
            "--set", "data.samples_per_class=4", "--set", "progress=false", "--out", str(out)]
    monkeypatch.setattr(jio.os, "fsync", fsync)
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "No space left on device" in err and str(out / "last.pt") in err, err
    monkeypatch.setattr(jio.os, "fsync", real_fsync)
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    assert not list(out.glob(".*.tmp")), "a temporary file was left behind"


# ---- every option, every value ---------------------------------------------------------

from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from jacmatch.training.config import config_keys  # noqa: E402

_VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-10**15, 10**15).map(str),
                    st.sampled_from(["[]", "null", "true", "-1", "0", "1e400", "nan", "-inf", "{}", "[-0.5]", "/"]),
                    st.text(max_size=6))
_KEYS = st.sampled_from([k for k, *_ in config_keys()])
_OPTIONS = st.sampled_from(["--seed", "--samples-per-class", "--dataset", "--model", "--device", "--data-dir"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=_KEYS, value=_VALUES, option=_OPTIONS, option_value=_VALUES)
@example(key="out_dir", value="0.0", option="--dataset", option_value="~0")  # found by the fuzz: a RuntimeError
def test_fuzz_the_command_line_exits_0_or_2_in_one_line(tmp_path, capsys, key, value, option, option_value):
    """Random values for every --set key and option: the command exits 2 with one line on
    stderr (or goes on to its --resume check, which refuses in one line too); never a
    traceback. Nothing trains: --resume of an empty folder stops after the checks."""
    from jacmatch.cli import main
    argv = ["distill", "--teacher", str(tmp_path / "t.pt"), "--out", str(tmp_path / "never"), "--resume",
            "--set", f"{key}={value}", option, option_value]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse refuses a value of the wrong type
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2, (argv, err)
    assert "Traceback" not in err and err.splitlines()[-1].startswith(("jacmatch distill: error:", "usage:",
                                                                        "jacmatch: error:")), err
    if not err.startswith("usage"):
        assert len(err.splitlines()) == 1, err


@pytest.mark.parametrize("argv,message", [
    (["evaluate", "--checkpoint", "c.pt", "--noise-sigmas", "-0.5"], "σ must be a finite number >= 0"),
    (["evaluate", "--checkpoint", "c.pt", "--noise-sigmas", "-1"], "σ must be a finite number >= 0"),
    (["evaluate", "--checkpoint", "c.pt", "--noise-sigmas", "nan"], "σ must be a finite number >= 0"),
    (["train-teacher", "--set", "eval.noise_sigmas=[-0.5]"], "eval.noise_sigmas"),
    (["train-teacher", "--set", "optim.lr=inf"], "optim.lr"),
    (["train-teacher", "--set", "objective.temperature=0"], "objective.temperature"),
    (["train-teacher", "--set", "optim.momentum=2"], "optim.momentum"),
    (["train-teacher", "--seed", "-3"], "must be >= 0"),
    (["distill", "--samples-per-class", "0", "--teacher", "x"], "must be >= 1"),
    (["check-model", "resnet20", "--input-shape", "3x32"], "C x H x W"),
    (["train-teacher", "--config", "."], "does not exist"),
    (["train-teacher", "--dataset", "~0"], "'~0' names no user's home folder here"),  # Path.expanduser raised
    (["train-teacher", "--dataset", "~no_such_user_0/x.npz"], "names no user's home folder here"),
])
def test_bad_values_exit_2_naming_them(argv, message, capsys):
    from jacmatch.cli import main
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


# ---- preemption --------------------------------------------------------------------------


def _wait_for_steps(process, out: Path, timeout: float = 120) -> None:
    """Until the run has trained past its first epoch (its first checkpoint exists)."""
    start = time.time()
    while not (out / "last.pt").is_file():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.time() - start < timeout
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_mid_epoch_then_resume_is_bit_identical(tmp_path, teacher, processes):
    """SIGTERM finishes the step, checkpoints it (with the sampler's position and the draws'
    state) and exits 75; --resume then ends with the weights of a run never stopped."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
        if processes > 1 else [sys.executable]
    common = ["-m", "jacmatch", "distill", "--recipe", "none",
        "--teacher", teacher, "--dataset", "synthetic", "--model", "small_cnn_4",
              "--samples-per-class", "8", "--set", "objective.jm_outputs=projection", "--set", "objective.noise_sigma=0.1",
              "--set", "data.augment=true", "--set", "optim.epochs=2", "--set", "optim.batch_size=8",
              "--set", "optim.min_steps_per_epoch=100", "--set", "progress=false", "--set", "eval.every=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "cut"
    process = subprocess.Popen([*launcher, *common, "--out", str(out)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    _wait_for_steps(process, out)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    state = load_checkpoint(out / "last.pt")
    assert 0 < state["step"] < 100 and state["epoch"] == 1, stderr[-2000:]  # stopped inside the last epoch
    if processes == 1:
        assert process.returncode == 75 and "--resume continues" in stderr, stderr[-2000:]
    resumed = run([*launcher, *common, "--out", str(out), "--resume"], env=env)
    assert resumed.returncode == 0, first_errors(resumed.stderr)
    straight = run([*launcher, *common, "--out", str(tmp_path / "straight")], env=env)
    assert straight.returncode == 0, first_errors(straight.stderr)
    assert "LiveDDPWarning" not in resumed.stderr + straight.stderr  # the CLI leaves the group after its DDP module
    a, b = load_checkpoint(out / "last.pt")["model"], load_checkpoint(tmp_path / "straight" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the cut epoch's training means: every process's sums (only rank 0's partial sums were kept)
    means = [json.loads((o / "metrics.jsonl").read_text().splitlines()[-1])["train"] for o in (out, tmp_path / "straight")]
    assert means[0] == pytest.approx(means[1], rel=1e-9), means


def test_a_signal_during_the_last_evaluation_stops_the_process_after_the_finished_run(tmp_path, teacher, monkeypatch):
    """A SIGTERM that lands after the last step (in the final evaluation) is not lost: the
    run finishes and writes its results, then Preempted stops the sweep it belongs to."""
    import signal

    from jacmatch.training import epoch
    real = epoch.evaluate_splits

    def evaluate_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(epoch, "evaluate_splits", evaluate_then_signal)
    values = {"out_dir": str(tmp_path / "r"), "teacher": teacher, "data": {"name": "synthetic", "samples_per_class": 4},
              "model": {"name": "small_cnn_4"}, "objective": {"beta": 1.0}, "optim": {"epochs": 1}, **QUIET}
    with pytest.raises(epoch.Preempted, match="after the last epoch"):
        train(config_from_dict(values))
    assert json.loads((tmp_path / "r" / "results.json").read_text())["epochs"] == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler before is back


def test_a_run_stopped_after_an_epochs_last_step_resumes_with_its_seconds_and_no_warning(tmp_path, teacher,
                                                                                        monkeypatch):
    """A signal during the first epoch's last step: the resumed run has no step left in that
    epoch. Its epoch_seconds keep the time trained before the stop (time-to-accuracy reads
    them), and torch's 'scheduler before optimizer' warning, wrong here, is not shown."""
    import warnings

    from jacmatch.training import epoch
    real, calls = epoch.train_step, {"n": 0}

    def slow_step_then_signal(*args, **kwargs):
        time.sleep(0.05)
        calls["n"] += 1
        if calls["n"] == 4:  # the last of the first epoch's 4 steps
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(epoch, "train_step", slow_step_then_signal)
    values = {"out_dir": str(tmp_path / "r"), "teacher": teacher, "data": {"name": "synthetic", "samples_per_class": 4},
              "model": {"name": "small_cnn_4"}, "objective": {"beta": 1.0},
              "optim": {"epochs": 2, "batch_size": 4, "min_steps_per_epoch": 4}, **QUIET}
    with pytest.raises(epoch.Preempted, match="epoch 1, step 4 of 4"):
        train(config_from_dict(values))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the resume
        train(config_from_dict(values), resume=True)
    first = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["epoch"] == 1 and first["epoch_seconds"] >= 4 * 0.05, first


# ---- mixed precision ------------------------------------------------------------------------


@pytest.mark.parametrize("nonfinite", ["stop", "skip"])
def test_an_fp16_overflow_skips_one_step_lowers_the_scale_and_trains_on(tmp_path, teacher, monkeypatch, nonfinite):
    """fp16 with a gradient scaler (on CPU here): an overflow of the scaled gradients, as
    fp16 has in its first steps, is the scaler's business, not a non-finite loss: the step
    is skipped, the scale halves, metrics.jsonl counts it, and the run goes on (exit 0)."""
    from torch.amp import GradScaler
    real, calls = GradScaler.unscale_, {"n": 0}

    def unscale_with_overflow(self, optimizer):
        calls["n"] += 1
        if calls["n"] == 2:  # the second step's scaled gradients overflow
            next(p for g in optimizer.param_groups for p in g["params"] if p.grad is not None).grad.fill_(float("inf"))
        return real(self, optimizer)
    monkeypatch.setattr(GradScaler, "unscale_", unscale_with_overflow)
    values = {"out_dir": str(tmp_path / "s"), "teacher": teacher, "amp": "fp16", "nonfinite": nonfinite,
              "data": {"name": "synthetic", "samples_per_class": 8}, "model": {"name": "small_cnn_4"},
              "objective": {"beta": 1.0, "gamma": 0.0}, "optim": {"epochs": 2, "batch_size": 8, "min_steps_per_epoch": 4},
              **QUIET}
    results = train(config_from_dict(values))
    metrics = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [m["overflow_steps"] for m in metrics] == [1, 0] and [m["skipped_steps"] for m in metrics] == [0, 0]
    assert metrics[0]["loss_scale"] == 65536.0 / 2 and results["epochs"] == 2 and calls["n"] == 8


def test_fp16_jacobian_matching_takes_scaled_input_gradients_and_overflows_are_skipped(tmp_path, teacher):
    """KD + JM in fp16 (a GradScaler on CPU): the student's input gradients are taken from
    outputs times the scale (a Jacobian row back-propagates 1 per output, so 2^16 overflows
    fp16's 65504 at once). Such a step is an overflow, not a non-finite loss: skipped, the
    scale lowered, counted, and never an exit; the run then trains at a scale that fits."""
    values = {"out_dir": str(tmp_path / "s"), "teacher": teacher, "amp": "fp16",
              "data": {"name": "synthetic", "samples_per_class": 8}, "model": {"name": "small_cnn_4"},
              "optim": {"epochs": 2, "batch_size": 8, "min_steps_per_epoch": 6}, **QUIET}
    results = train(config_from_dict(values))
    metrics = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["overflow_steps"] >= 1 and metrics[1]["overflow_steps"] == 0
    assert metrics[0]["loss_scale"] <= 2.0 ** 15 and [m["skipped_steps"] for m in metrics] == [0, 0]
    assert all(math.isfinite(v) for m in metrics for v in m["train"].values()) and results["epochs"] == 2
    assert results["final"]["train"]["jm"] < 2


def test_an_internal_error_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    """Only a UsageError (an option, a shape, a file, a model that cannot run) is one line
    with exit 2; any other ValueError is a bug of jacmatch's and propagates with its
    traceback (exit 1 from the interpreter)."""
    import jacmatch.training
    from jacmatch.cli import main
    from jacmatch.errors import UsageError

    def fails(error):
        def train(*args, **kwargs):
            raise error
        return train
    args = ["train-teacher", "--dataset", "synthetic", "--out", str(tmp_path / "r"), "--set", "progress=false"]
    monkeypatch.setattr(jacmatch.training, "train", fails(UsageError("a setting that cannot be used")))
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == "jacmatch train-teacher: error: a setting that cannot be used"
    monkeypatch.setattr(jacmatch.training, "train", fails(ValueError("shapes that cannot disagree do")))
    with pytest.raises(ValueError, match="shapes that cannot disagree do"):
        main(args)
