"""Experiment tracking with the real libraries, offline: MLflow read back with its client
from a local store and compared with metrics.jsonl; W&B in offline mode, read as far as it
allows offline (its run files). A resume continues the tracked run; a failed run is marked."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from helpers import run

from jacmatch.cli import main

RUN = ["train-teacher", "--dataset", "digits", "--model", "small_cnn_4", "--set", "progress=false",
       "--set", "eval.noise_sigmas=[]"]


def test_mlflow_holds_the_config_every_epoch_the_results_and_the_student_and_a_resume_continues_it(tmp_path):
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "t"
    track = ["--set", "tracking=[mlflow]", "--set", f"tracking_uri={uri}", "--set", "tracking_project=digits"]
    assert main([*RUN, *track, "--set", "optim.epochs=2", "--out", str(out)]) == 0
    client = MlflowClient(uri)
    run_id = json.loads((out / "tracking.json").read_text())["mlflow"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "t"
    assert client.get_experiment(run.info.experiment_id).name == "digits"
    assert run.data.params["optim.lr"] == "0.05" and run.data.params["model.name"] == "small_cnn_4"
    assert len(run.data.tags["provenance.config_sha256"]) == 64
    assert main([*RUN, "--set", "optim.epochs=3", "--out", str(out), "--resume"]) == 0  # its config keeps tracking
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key, pick in (("val/acc", lambda r: r["val"]["acc"]), ("train/ce", lambda r: r["train"]["ce"]),
                      ("train/lr", lambda r: r["lr"])):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert history == [(r["epoch"], pytest.approx(pick(r), rel=1e-6)) for r in records], key
    assert len(client.search_runs([run.info.experiment_id])) == 1  # the resume continued the same run
    results = json.loads((out / "results.json").read_text())
    final = client.get_run(run_id)
    assert final.data.metrics["final/test/acc"] == pytest.approx(results["final"]["test"]["acc"])
    assert {a.path for a in client.list_artifacts(run_id)} >= {"results.json", "metrics.jsonl", "config.yaml", "last.pt"}
    assert (tmp_path / "mlartifacts").is_dir()  # beside the local store, not in the working directory
    assert final.info.status == "FINISHED"


def test_a_failed_run_is_marked_failed_in_mlflow(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    import jacmatch.training.trainer as trainer
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setattr(trainer, "train_epoch", lambda *a: (_ for _ in ()).throw(MemoryError("out of memory")))
    runs_before = 0
    with pytest.raises(MemoryError):
        main([*RUN, "--set", "tracking=[mlflow]", "--set", f"tracking_uri={uri}", "--out", str(tmp_path / "t")])
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("jacmatch").experiment_id])
    assert len(runs) == runs_before + 1 and runs[0].info.status == "FAILED"


@pytest.mark.parametrize("where", ["the teacher cache", "the next tracker"])
def test_a_start_that_fails_after_its_tracked_run_began_ends_it_failed(tmp_path, monkeypatch, where, teacher):
    """The MLflow run is open before the teacher cache fills and before the next tracker starts:
    a failure there ends it FAILED, not left RUNNING."""
    from mlflow.tracking import MlflowClient

    import jacmatch.training.cache as cache
    import jacmatch.training.tracking as tracking
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    boom = lambda *a, **k: (_ for _ in ()).throw(MemoryError("out of memory"))  # noqa: E731
    run = RUN
    if where == "the teacher cache":  # a distillation whose inputs are fixed: the cache fills after the loggers open
        monkeypatch.setattr(cache.TeacherCache, "fill", boom)
        trackers = "[mlflow]"
        run = ["distill", "--teacher", teacher, "--recipe", "paper", "--dataset", "synthetic", *RUN[3:]]
    else:
        monkeypatch.setattr(tracking.WandbLogger, "__init__", boom)
        trackers = "[mlflow, wandb]"
    with pytest.raises(MemoryError):
        main([*run, "--set", f"tracking={trackers}", "--set", f"tracking_uri={uri}", "--out", str(tmp_path / "t")])
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("jacmatch").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"], where


@pytest.mark.slow  # (W&B runs its service, wandb-core, as a process)
def test_wandb_offline_logs_under_the_run_folder_and_a_resume_keeps_its_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "t"
    assert main([*RUN, "--set", "tracking=[wandb]", "--set", "tracking_group=g", "--set", "optim.epochs=2",
                 "--out", str(out)]) == 0
    run_id = json.loads((out / "tracking.json").read_text())["wandb"]
    logs = sorted((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(logs) == 1
    keys = (b"val/acc", b"train/ce", b"optim.lr", b"final/test/acc", b"last.pt")
    deadline = time.time() + 30  # W&B's service process writes the file; on a loaded machine, after finish returns
    while not all(key in logs[0].read_bytes() for key in keys) and time.time() < deadline:
        time.sleep(0.5)
    data = logs[0].read_bytes()  # its records, as far as offline allows: the keys logged
    assert all(key in data for key in keys), [k for k in keys if k not in data]
    assert main([*RUN, "--set", "optim.epochs=3", "--out", str(out), "--resume"]) == 0
    assert json.loads((out / "tracking.json").read_text())["wandb"] == run_id
    assert len(sorted((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))) >= 1


def test_tracking_names_are_checked_and_a_missing_extra_is_one_line(tmp_path, monkeypatch, capsys):
    import sys
    assert main([*RUN, "--set", "tracking=[neptune]", "--out", str(tmp_path / "a")]) == 2
    assert "tracking takes mlflow and wandb, got ['neptune']" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "mlflow", None)
    assert main([*RUN, "--set", "tracking=[mlflow]", "--out", str(tmp_path / "b")]) == 2
    assert "pip install 'jacmatch[mlflow]'" in capsys.readouterr().err
    assert not Path(tmp_path / "b").exists()  # said before anything was written


@pytest.mark.slow
def test_under_torchrun_one_process_logs_one_run(tmp_path):
    """Two processes train; only the main one opens a tracked run (and writes tracking.json)."""
    import sys

    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
         "jacmatch", *RUN, "--set", "optim.epochs=2", "--set", "optim.batch_size=32",
         "--set", "tracking=[mlflow]", "--set", f"tracking_uri={uri}", "--out", tmp_path / "t"],
        cwd=tmp_path, timeout=600, check=True)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("jacmatch").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val/acc")] == [1, 2]
