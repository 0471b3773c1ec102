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


@pytest.fixture
def postgres_url():
    """A PostgreSQL server of its own (Debian's postgresql: initdb, then pg_ctl start on a Unix
    socket in a fresh folder, trust authentication), stopped and removed after the test; its
    URL. Behind the ``postgres`` marker (``make test-postgres``, which CI runs): where PostgreSQL
    is not installed, the test fails and says what to install."""
    import glob
    import shutil
    import tempfile
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL is not installed: apt-get install postgresql (or deselect with -m 'not postgres')")
    bindir = Path(found[-1]).parent
    folder = Path(tempfile.mkdtemp(prefix="jacmatch-pg-", dir="/tmp"))  # a short path: the socket's name has a limit
    as_owner: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: as Debian's postgres user, in a folder it owns
        shutil.chown(folder, "postgres", "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    port = 20000 + os.getpid() % 20000
    data = folder / "data"
    run([*as_owner, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
        timeout=120, check=True)
    run([*as_owner, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w", "-o",
         f"-k {folder} -p {port} -c listen_addresses='' -c fsync=off", "start"], timeout=120, check=True)
    try:
        yield f"postgresql+psycopg2://postgres@/postgres?host={folder}&port={port}"
    finally:
        run([*as_owner, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.postgres
def test_two_workers_share_one_postgresql_study(tmp_path, teacher, postgres_url):
    """Two workers, each its own output folder (as on two machines), one study in a real
    PostgreSQL server: together they finish the trials, and no trial runs twice."""
    import optuna
    outs = [tmp_path / "a", tmp_path / "b"]
    workers = [subprocess.Popen(_tune(teacher, out, 4, "--set", "optim.max_steps=60", "--storage", postgres_url,
                                      "--study", "shared"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for out in outs]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert 4 <= len(done) <= 5 and len(study.trials) == len(done), study.trials
    folders = [t.user_attrs["folder"] for t in study.trials]
    assert len(set(folders)) == len(folders)
    assert all(any(f.startswith(str(out)) for f in folders) for out in outs), folders  # both workers ran trials
    for out in outs:
        assert (out / "best.yaml").is_file() and (out / "trials.csv").is_file()


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
    # the retry reported the cut trial's evaluations too: the pruner sees its whole curve
    import optuna
    study = optuna.load_study(study_name="jacmatch", storage=f"sqlite:///{out / 'study.db'}")
    retry = next(t for t in study.trials if t.state.name != "FAIL" and t.user_attrs["folder"].endswith("0000"))
    with open(out / "trials" / "0000" / "metrics.jsonl") as f:
        evaluations = [line for line in f if '"val"' in line]
    assert len(retry.intermediate_values) == len(evaluations) == 20  # 40 epochs, the recipe evaluates every 2


def test_a_trial_is_pruned_only_after_its_run_s_patience_in_evaluations(tmp_path, teacher):
    """Against four finished trials that were better at every step, a trial is pruned at its
    grace, the run's early-stopping patience in evaluations, and not before."""
    import optuna

    from jacmatch.training.config import config_from_dict
    from jacmatch.training.tune import _run_trial, grace_of
    values = {"out_dir": str(tmp_path / "unused"), "teacher": teacher, "recipe": "fm+jm",
              "data": {"name": "synthetic", "samples_per_class": 4}, "model": {"name": "small_cnn_4"},
              "optim": {"epochs": 12, "max_steps": 0, "batch_size": 8},
              "eval": {"every": 1, "patience": 5, "keep_best": True, "noise_sigmas": [], "fidelity": False,
                       "jacobian_cosine": False},
              "progress": False, "tensorboard": False}
    base = config_from_dict(values)
    assert grace_of(base) == 5
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=4))
    for _ in range(4):
        study.add_trial(optuna.trial.create_trial(value=1.0, intermediate_values={s: 1.0 for s in range(1, 200)}))
    study.optimize(lambda trial: _run_trial(trial, study, tmp_path, values, {"optim.lr": ("log", 1e-3, 1e-2)}, None),
                   n_trials=1)
    trial = study.trials[-1]
    assert trial.state.name == "PRUNED" and len(trial.intermediate_values) == 5, trial
    assert trial.user_attrs["seconds"] > 0


@pytest.mark.slow
def test_best_yaml_trains_as_it_is(tmp_path, teacher):
    out = tmp_path / "study"
    run(_tune(teacher, out, 1, "--set", "optim.max_steps=40"), env=os.environ, timeout=600, check=True)
    d = jacmatch("distill", "--config", out / "best.yaml", "--out", tmp_path / "again", env=os.environ, timeout=600,
                 check=True)
    assert "recipe: fm+jm" in d.stdout
