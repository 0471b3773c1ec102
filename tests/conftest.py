import multiprocessing.process
import os
import subprocess

import pytest
import torch
from torch import nn

#: Run settings that keep a test's output quiet: no progress bars, no TensorBoard files.
QUIET = {"progress": False, "tensorboard": False}


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


class SmallCNN(nn.Module):
    """A tiny CNN with optional BatchNorm, for Jacobian tests."""

    def __init__(self, in_ch=1, k=5, batchnorm=True):
        super().__init__()
        self.num_classes = k
        self.conv = nn.Conv2d(in_ch, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if batchnorm else nn.Identity()
        self.act = nn.Tanh()
        self.head = nn.Linear(4 * 6 * 6, k)

    def forward(self, x):
        return self.head(self.act(self.bn(self.conv(x))).flatten(1))


def mlp(d=6, k=4, h=8, act=nn.Tanh):
    net = nn.Sequential(nn.Flatten(), nn.Linear(d, h), act(), nn.Linear(h, k))
    net.num_classes = k
    return net


@pytest.fixture
def small_cnn():
    return SmallCNN


@pytest.fixture
def small_mlp():
    return mlp


def first_errors(stderr: str) -> str:
    """The workers' own error lines, before torchrun's summary of them (for assertion messages)."""
    lines = [line for line in stderr.splitlines() if any(w in line for w in ("Error", "error", "terminate", "what()"))]
    return "\n".join(lines[:15]) or stderr[-3000:]


def teacher_values(out):
    """A small teacher's run config on the synthetic data (seconds to train)."""
    return {"out_dir": str(out), "data": {"name": "synthetic"}, "model": {"name": "small_cnn_8"},
            "objective": {"beta": 0.0, "gamma": 0.0},  # a teacher: CE only
            "optim": {"epochs": 2, "batch_size": 32, "lr": 0.1}, "eval": {"noise_sigmas": [0.1]}, **QUIET}


@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    """The checkpoint of a teacher trained once per session (``teacher_values``)."""
    from jacmatch.training import config_from_dict, train
    out = tmp_path_factory.mktemp("teacher")
    train(config_from_dict(teacher_values(out)))
    return str(out / "last.pt")


#: The learning rate of the reference step (plain SGD).
REFERENCE_LR = 0.1


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


def same_weights(model: nn.Module, reference: dict, atol=1e-6):
    state = model.state_dict()
    worst = max((state[k].float() - v.float()).abs().max().item() for k, v in reference.items())
    assert worst <= atol, f"weights differ by {worst}"


def copy_model(model: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(model)
