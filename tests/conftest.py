import multiprocessing.process
import os
import subprocess

import pytest
import torch
from helpers import QUIET, REFERENCE_LR, SmallCNN, mlp, teacher_values



@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


#: Processes a fast-tier test may start: git, which provenance asks once per process for
#: the checkout's commit, and uname, which Python's platform module asks for the machine.
ALLOWED_PROGRAMS = ("git", "uname")


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_process(request, monkeypatch):
    """The fast tier (tests not marked slow) starts no process: a test that does (a command
    in a subprocess, torchrun, data-loading workers) fails, and says to mark it slow."""
    if request.node.get_closest_marker("slow") or request.node.get_closest_marker("vision"):
        return

    def refuse(what: str):
        raise AssertionError(f"{request.node.nodeid} starts a process ({what}) but is not marked slow: "
                             "mark it @pytest.mark.slow, or make it run in this process")
    popen_init, process_start = subprocess.Popen.__init__, multiprocessing.process.BaseProcess.start

    def popen(self, args, *rest, **kwargs):
        program = os.path.basename(str(args[0] if isinstance(args, (list, tuple)) else args).split()[0])
        if program not in ALLOWED_PROGRAMS:
            refuse(program)
        popen_init(self, args, *rest, **kwargs)

    def start(self):
        refuse(f"multiprocessing {type(self).__name__}")
        process_start(self)
    monkeypatch.setattr(subprocess.Popen, "__init__", popen)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", start)






@pytest.fixture
def small_cnn():
    return SmallCNN


@pytest.fixture
def small_mlp():
    return mlp






@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    """The checkpoint of a teacher trained once per session (``teacher_values``)."""
    from jacmatch.training import config_from_dict, train
    out = tmp_path_factory.mktemp("teacher")
    train(config_from_dict(teacher_values(out)))
    return str(out / "last.pt")




@pytest.fixture(scope="session")
def trainer_step(tmp_path_factory, teacher):
    """One full-batch SGD step (no momentum, no decay) of ``jacmatch distill``'s objective:
    the weights before and after, the batch, and the terms the trainer logged."""
    import json

    from jacmatch.training import config_from_dict, load_data, load_model, train
    from jacmatch.training.loading import model_from_config
    out = tmp_path_factory.mktemp("reference")
    values = {"out_dir": str(out), "teacher": teacher, "data": {"name": "synthetic", "samples_per_class": 6},
              "model": {"name": "small_cnn_4"}, "teacher_cache": False,
              "optim": {"name": "sgd", "lr": REFERENCE_LR, "momentum": 0.0, "weight_decay": 0.0, "schedule": "constant",
                        "epochs": 1, "batch_size": 1000},
              "eval": {"noise_sigmas": [], "jacobian_cosine": False}, **QUIET}
    cfg = config_from_dict(values)
    train(cfg)
    data = load_data(cfg)
    torch.manual_seed(cfg.seed)
    before = model_from_config(cfg.model, data.num_classes, data)
    after, _ = load_model(out / "last.pt")
    x, y = data.train.batch(torch.arange(len(data.train)))
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["steps"] == 1
    return {"before": before, "after": after.state_dict(), "x": x, "y": y, "terms": metrics["train"],
            "teacher": load_model(teacher)[0]}




