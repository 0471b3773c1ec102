"""What the tests share: small models, run settings, data writers, the README's snippets and
the one runner of a child process (:func:`run`, :func:`jacmatch`) and the reading of its
errors. Test modules import from here, never from conftest or from one another."""

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PIL
from torch import nn

#: Run settings that keep a test's output quiet: no progress bars, no TensorBoard files.
QUIET = {"progress": False, "tensorboard": False}


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


def first_errors(stderr: str) -> str:
    """The workers' own error lines, before torchrun's summary of them (for assertion messages)."""
    lines = [line for line in stderr.splitlines() if any(w in line for w in ("Error", "error", "terminate", "what()"))]
    return "\n".join(lines[:15]) or stderr[-3000:]


#: A child process's environment: one thread each (the two cores are shared with the test runner).
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(args, *, cwd=None, env=None, timeout=300, check=False, text=True) -> subprocess.CompletedProcess:
    """Run a process to its end, its output captured (``env``: :data:`CHILD_ENV` unless given);
    with ``check``, assert that it exited 0, showing its first error lines."""
    r = subprocess.run([str(a) if isinstance(a, Path) else a for a in args], cwd=cwd,
                       env=CHILD_ENV if env is None else env, capture_output=True, text=text, timeout=timeout)
    if check:
        assert r.returncode == 0, (r.stdout[-2000:] + first_errors(r.stderr)) if text else r.stderr[-3000:]
    return r


def jacmatch(*args, **kwargs) -> subprocess.CompletedProcess:
    """``python -m jacmatch ARGS`` in a child process (keywords as :func:`run`)."""
    return run([sys.executable, "-m", "jacmatch", *map(str, args)], **kwargs)


def teacher_values(out):
    """A small teacher's run config on the synthetic data (seconds to train)."""
    return {"out_dir": str(out), "data": {"name": "synthetic"}, "model": {"name": "small_cnn_8"},
            "objective": {"beta": 0.0, "gamma": 0.0},  # a teacher: CE only
            "optim": {"epochs": 2, "batch_size": 32, "lr": 0.1}, "eval": {"noise_sigmas": [0.1]}, **QUIET}


#: The learning rate of the reference step (plain SGD).
REFERENCE_LR = 0.1


def same_weights(model: nn.Module, reference: dict, atol=1e-6):
    state = model.state_dict()
    worst = max((state[k].float() - v.float()).abs().max().item() for k, v in reference.items())
    assert worst <= atol, f"weights differ by {worst}"


def copy_model(model: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(model)


def write_cifar_dir(root, num_classes=10, per_file=20, per_class=1):
    """CIFAR-format files of ``per_file`` random images each, ``per_class`` in a row of each class."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    key = b"labels" if num_classes == 10 else b"fine_labels"
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if num_classes == 10 else ["train", "test"]
    for name in files:
        obj = {b"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
               key: [int(i // per_class % num_classes) for i in range(per_file)]}
        with open(root / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    return root


def pair():
    torch.manual_seed(7)
    return SmallCNN(k=5).double(), SmallCNN(k=5).double()


def batch():
    g = torch.Generator().manual_seed(8)
    return torch.randn(6, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 5, (6,), generator=g)


def pixels(n: int, classes: int = 4, size: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, H, W] with a learnable stripe per class, and their labels."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.integers(0, 120, (n, size, size), dtype=np.uint8)
    x[np.arange(n), (2 * y) % size, :] = 250
    return x, y


def write_folder(root: Path, x: np.ndarray, y: np.ndarray, suffix: str = ".png") -> list[tuple[int, int]]:
    """Class folders of images; returns (class, index) in the order the folder lists them."""
    order = []
    for c in sorted(set(y.tolist())):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(y == c):
            PIL.fromarray(x[i]).save(root / f"class_{c}" / f"{i:05d}{suffix}")
            order.append((c, int(i)))
    return order


README = Path(__file__).resolve().parents[1] / "README.md"


DOCS = README.parent / "docs"


def readme_snippets() -> dict[str, str]:
    """Every ``<!-- snippet: NAME -->`` block of the README and of the docs' pages, by name."""
    text = "\n".join(p.read_text() for p in [README, *sorted(DOCS.glob("*.md"))])
    blocks = dict(re.findall(r"<!-- snippet: (\w+).*?-->\s*```python\n(.*?)```", text, re.S))
    assert {"recipe", "functional", "module", "lightning", "transformers", "torchdistill"} <= set(blocks), \
        "the README or a page of docs/ lost a snippet block"
    return blocks
