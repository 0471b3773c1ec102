"""One home for checks: each config is checked once a run, and every user error is one type."""

from __future__ import annotations

import pytest

from jacmatch.cli import main
from jacmatch.core.objective import ObjectiveConfig
from jacmatch.errors import UsageError
from jacmatch.training.config import ConfigError, RunConfig


def test_a_one_epoch_distill_checks_each_config_once(tmp_path, teacher, monkeypatch):
    counts = {"run": 0, "objective": 0}
    run_check, objective_check = RunConfig._check, ObjectiveConfig._check

    def count_run(self):
        counts["run"] += 1
        run_check(self)

    def count_objective(self):
        counts["objective"] += 1
        objective_check(self)
    monkeypatch.setattr(RunConfig, "_check", count_run)
    monkeypatch.setattr(ObjectiveConfig, "_check", count_objective)
    assert main(["distill", "--recipe", "none", "--teacher", teacher, "--dataset", "synthetic", "--samples-per-class", "4",
                 "--model", "small_cnn_4", "--out", str(tmp_path / "s"), "--set", "optim.epochs=1",
                 "--set", "progress=false", "--set", "eval.noise_sigmas=[]"]) == 0
    assert counts == {"run": 1, "objective": 1}


def test_a_changed_config_is_checked_again():
    cfg = ObjectiveConfig()
    cfg.check()
    cfg.temperature = -1.0
    with pytest.raises(UsageError, match="objective.temperature must be a finite number > 0"):
        cfg.check()


def test_user_errors_have_one_type():
    assert ConfigError is UsageError
    from jacmatch.training.run_folder import RunExistsError
    assert issubclass(RunExistsError, UsageError)
    with pytest.raises(UsageError, match="objective.gamma must be a finite number >= 0"):
        RunConfig(objective=ObjectiveConfig(gamma=-1.0), teacher="t.pt").check()


@pytest.mark.parametrize("key, value, message", [
    ("beta", -1.0, "objective.beta must be a finite number >= 0"),
    ("temperature", 0.0, "objective.temperature must be a finite number > 0"),
    ("projection", "nope", "unknown objective.projection 'nope'"),
    ("penalty_form", "nope", "unknown objective.penalty_form 'nope'"),
    ("jm_outputs", "nope", "unknown objective.jm_outputs 'nope'"),
])
def test_each_range_and_choice_is_refused_by_the_config_in_one_line(key, value, message):
    with pytest.raises(UsageError, match=message):
        ObjectiveConfig(**{key: value}).check()


def test_a_new_jacobian_type_term_gets_the_memory_estimate_and_the_dead_student_warning():
    """The objective's properties come from what its terms declare, not from their classes."""
    import sys
    from pathlib import Path

    import torch
    from torch import nn

    import jacmatch as jm
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    own = {"user_terms:InputGradientNorm": {"weight": 1.0, "rows": 50}}
    base = ObjectiveConfig(beta=0, gamma=0)
    assert ObjectiveConfig(beta=0, gamma=0, terms=own).step_bytes(64, 10, 8) > base.step_bytes(64, 10, 8)
    assert not ObjectiveConfig(beta=0, gamma=0, terms=own).needs_teacher
    dead = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    nn.init.zeros_(dead[1].weight)  # a student whose input gradient is zero everywhere
    objective = jm.TransferObjective(dead, None, ObjectiveConfig(beta=0, gamma=0, terms=own))
    with pytest.warns(jm.core.objective.DeadStudentWarning, match="summed input gradient"):
        objective(torch.rand(2, 1, 2, 2), torch.tensor([0, 1]))


def test_an_estimator_is_named_by_import_path_as_a_term_is():
    import sys
    from pathlib import Path

    import torch

    import jacmatch as jm
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    student, teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)), \
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.rand(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    own = ObjectiveConfig(jm_outputs="user_estimators:LabelRows")
    own.check()
    _, _, mine = jm.TransferObjective(student, teacher, own)(x, y)
    _, _, builtin = jm.TransferObjective(student, teacher, ObjectiveConfig(jm_outputs="label"))(x, y)
    torch.testing.assert_close(mine["jm"], builtin["jm"], rtol=0, atol=0)
    with pytest.raises(UsageError, match="not a jacmatch Estimator subclass"):
        jm.create_estimator("user_terms:LogitNorm")
