"""Trains the runs of a JSON file one after another in one process, alone or under
``torchrun`` (tests/test_training.py compares the two): ``python ddp_runs.py CASES.json``.

CASES.json maps a run's name to ``{"values": config values, "batch_sensitive": bool,
"poison": {"epoch": E, "sample": i} or null}``:

- ``batch_sensitive`` runs the teacher as ``user_models.BatchSensitive``;
- ``poison`` makes the terms non-finite at the step of epoch E whose batch holds training
  sample i: in one process that is one step of the global batch, under DDP the step of
  the one process that holds the sample.
"""

import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: user_models
from user_models import BatchSensitive  # noqa: E402

from jacmatch.core.objective import TransferObjective  # noqa: E402
from jacmatch.training import config_from_dict, epoch, train, trainer  # noqa: E402
from jacmatch.training.distributed import LiveDDPWarning, finish_distributed  # noqa: E402

warnings.simplefilter("error", LiveDDPWarning)  # a DDP module left to outlive the group can hang the exit


state = {"case": {}, "poisoned": False}
_load_teacher, _train_step, _forward = trainer.load_teacher, epoch.train_step, TransferObjective.forward


def load_teacher(cfg, data, device):
    teacher = _load_teacher(cfg, data, device)
    return BatchSensitive(teacher).eval() if state["case"].get("batch_sensitive") else teacher


def train_step(run, index, x, y, where, number):
    poison = state["case"].get("poison")
    state["poisoned"] = bool(poison) and where.startswith(f"epoch {poison['epoch']},") \
        and poison["sample"] in index.tolist()
    return _train_step(run, index, x, y, where, number)


def forward(self, x, y, targets=None, **kwargs):
    logits, total, terms = _forward(self, x, y, targets, **kwargs)
    if state["poisoned"]:
        terms = {**terms, "ce": terms["ce"] * float("nan")}
        total = total * float("nan")
    return logits, total, terms


trainer.load_teacher, epoch.train_step, TransferObjective.forward = load_teacher, train_step, forward

if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    for case in cases.values():
        state["case"] = case
        train(config_from_dict(case["values"]))
    finish_distributed()
