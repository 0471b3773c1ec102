import pytest
import torch
from torch import nn

#: Run settings that keep a test's output quiet: no progress bars, no TensorBoard files.
QUIET = {"progress": False, "tensorboard": False}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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
            "optim": {"epochs": 2, "batch_size": 32, "lr": 0.1}, "eval": {"noise_sigmas": [0.1]}, **QUIET}


@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    """The checkpoint of a teacher trained once per session (``teacher_values``)."""
    from jacmatch.training import config_from_dict, train
    out = tmp_path_factory.mktemp("teacher")
    train(config_from_dict(teacher_values(out)))
    return str(out / "last.pt")
