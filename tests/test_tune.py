"""jacmatch tune with the real Optuna and SQLite: two workers share one study, a killed
worker's study completes when the command runs again, best.yaml trains as it is."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import jacmatch, run

from jacmatch.training.tune import parse_space, space_of
from jacmatch.errors import UsageError


def test_the_space_is_the_recipe_s_with_the_user_s_on_top():
    space = space_of("fm+jm", parse_space(["optim.lr=log:0.0001:0.1", "data.crop_padding=int:0:4"]))
    assert space["optim.lr"] == ("log", 0.0001, 0.1) and space["data.crop_padding"] == ("int", 0.0, 4.0)
    assert space["objective.gamma"] == ("log", 0.1, 100.0)
    for bad in ("optim.lr=log:0:1", "optim.lr=cube:1:2", "optim.lr=0.1", "optim.lr=float:2:1"):
        with pytest.raises(UsageError, match="--space expects KEY=KIND:LOW:HIGH"):
            parse_space([bad])
    with pytest.raises(UsageError, match="unknown setting 'optim.nope'"):
        space_of("kd", parse_space(["optim.nope=float:0:1"]))


def _tune(teacher: str, out: Path, trials: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jacmatch", "tune", "--teacher", teacher, "--dataset", "synthetic",
            "--samples-per-class", "4", "--model", "small_cnn_4", "--out", str(out), "--trials", str(trials),
            "--heartbeat", "1", "--set", "eval.noise_sigmas=[]", "--set", "eval.fidelity=false",
            "--set", "eval.jacobian_cosine=false", *extra]


def _trials(out: Path) -> list[dict]:
    with open(out / "trials.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_two_workers_share_one_study_and_run_no_trial_twice(tmp_path, teacher):
    out = tmp_path / "study"
    cmd = _tune(teacher, out, 4, "--set", "optim.max_steps=60")
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    rows = _trials(out)
    done = [r for r in rows if r["state"] in ("COMPLETE", "PRUNED")]
    assert 4 <= len(done) <= 5, rows  # each worker stops once the study holds 4 (one may be finishing its own)
    assert len({r["folder"] for r in rows}) == len(rows) == len(list((out / "trials").iterdir()))
    assert all("trial" in log for log in logs), logs  # both workers ran trials
    assert (out / "best.yaml").is_file() and (out / "best.pt").is_file() and (out / "history.png").is_file()


@pytest.mark.slow
def test_a_killed_worker_s_study_completes_when_the_command_runs_again(tmp_path, teacher):
    out = tmp_path / "study"
    cmd = _tune(teacher, out, 2, "--set", "optim.max_steps=0", "--set", "optim.epochs=40",
                "--set", "checkpoint_every=1")
    worker = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (out / "trials" / "0000" / "last.pt").is_file() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(worker.pid, signal.SIGKILL)  # the trial's first epoch written, 39 to go
    worker.communicate()
    assert not (out / "trials" / "0000" / "results.json").is_file()  # cut mid-trial
    time.sleep(3)  # past the grace period (twice the heartbeat): Optuna fails the trial and enqueues it again
    again = run(cmd, env=os.environ, timeout=600, check=True)
    assert "resumes trial 0's folder" in again.stdout, again.stdout
    rows = _trials(out)
    states = sorted(r["state"] for r in rows)
    assert states.count("COMPLETE") + states.count("PRUNED") == 2 and states.count("FAIL") == 1, rows
    assert (out / "trials" / "0000" / "results.json").is_file()


@pytest.mark.slow
def test_best_yaml_trains_as_it_is(tmp_path, teacher):
    out = tmp_path / "study"
    run(_tune(teacher, out, 1, "--set", "optim.max_steps=40"), env=os.environ, timeout=600, check=True)
    d = jacmatch("distill", "--config", out / "best.yaml", "--out", tmp_path / "again", env=os.environ, timeout=600,
                 check=True)
    assert "recipe: fm+jm" in d.stdout
