"""One home for defaults: every public function, term, estimator and integration takes its
defaults from the config dataclasses (or requires the value). This test walks their
signatures in the source, so a new one is checked without being listed here."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from jacmatch.core.estimators import FD_STEP, PROJECTION
from jacmatch.core.objective import ObjectiveConfig
from jacmatch.training.config import EvalConfig

ROOT = Path(__file__).resolve().parent.parent / "jacmatch"

#: A parameter of this name means the same as this ObjectiveConfig field wherever it appears.
SAME_MEANING = {"temperature": "temperature", "top_k": "top_k", "num_projections": "num_projections",
                "fd_step": "fd_step", "projection": "projection", "teacher_chunk": "teacher_chunk",
                "teacher_fold_bn": "teacher_fold_bn", "teacher_channels_last": "teacher_channels_last",
                "antithetic": "noise_antithetic"}
#: Parameters whose meaning depends on the callable: (callable's name, parameter) -> field.
BY_CALLABLE = {("JacobianMatchingLoss", "weight"): "gamma", ("JacobianMatchingLoss", "estimator"): "jm_outputs",
               ("JacobianMatchingLoss", "form"): "jm_form", ("JacobianMatching", "estimator"): "jm_outputs",
               ("JacobianMatching", "form"): "jm_form", ("jacobian_matching_loss", "form"): "jm_form",
               ("KDLoss", "weight"): "beta", ("KDLoss", "form"): "kd_form", ("kd_loss", "form"): "kd_form",
               ("KnowledgeDistillation", "form"): "kd_form", ("NoisyDistillationLoss", "form"): "kd_form",
               ("noisy_distillation_loss", "form"): "kd_form", ("CrossEntropyLoss", "weight"): "alpha",
               ("JacobianPenalty", "form"): "penalty_form", ("JacobianNormPenalty", "form"): "penalty_form",
               ("jacobian_penalty", "form"): "penalty_form"}
NAMES = {"FD_STEP": FD_STEP, "PROJECTION": PROJECTION}


def _signatures():
    """(file, callable, parameter, default) for every default of every public def in
    jacmatch/core and jacmatch/integrations (classes by their __init__)."""
    for path in sorted((ROOT / "core").glob("*.py")) + sorted((ROOT / "integrations").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                inits = [n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"]
                defs = [(node.name, f) for f in inits]
            elif isinstance(node, ast.FunctionDef) and node.col_offset == 0:
                defs = [(node.name, node)]
            else:
                continue
            for name, f in defs:
                if name.startswith("_"):
                    continue
                a = f.args
                positional = a.posonlyargs + a.args
                pairs = list(zip(positional[len(positional) - len(a.defaults):], a.defaults))
                pairs += [(arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
                for arg, default in pairs:
                    yield path.relative_to(ROOT.parent), name, arg.arg, default


def _value(node: ast.AST):
    if isinstance(node, ast.Name) and node.id in NAMES:
        return NAMES[node.id]
    return ast.literal_eval(node)


def test_every_public_default_equals_its_config_default():
    config = ObjectiveConfig()
    checked, wrong = [], []
    for path, name, param, default in _signatures():
        field = BY_CALLABLE.get((name, param)) or SAME_MEANING.get(param)
        if field is None:
            continue
        value = _value(default)
        checked.append(f"{name}.{param}")
        if value != getattr(config, field):
            wrong.append(f"{path}: {name}({param}={value!r}) but ObjectiveConfig().{field} = {getattr(config, field)!r}")
    assert not wrong, "\n".join(wrong)
    # the walk reaches the functions, terms, estimators and integrations it is meant to
    for expected in ("kd_loss.temperature", "KDLoss.temperature", "JacobianMatchingLoss.weight",
                     "noisy_distillation_loss.temperature", "KnowledgeDistillation.temperature",
                     "JacobianMatching.estimator", "TransferObjective.teacher_chunk", "JacobianPenalty.projection"):
        assert expected in checked, expected


def test_kd_loss_and_the_kd_term_compute_the_same_loss_by_default():
    import torch

    import jacmatch as jm
    zs, zt = torch.randn(4, 5), torch.randn(4, 5)
    assert torch.equal(jm.kd_loss(zs, zt), jm.KDLoss()(zs, zt))
    assert torch.equal(jm.kd_loss(zs, zt), jm.kd_loss(zs, zt, ObjectiveConfig().temperature))


def test_the_command_lines_defaults_are_the_configs():
    from jacmatch.cli import build_parser
    from jacmatch.cli.inspect import NOISE_SIGMAS
    assert NOISE_SIGMAS == EvalConfig().noise_sigmas
    parser = build_parser()
    evaluate = parser.parse_args(["evaluate", "--checkpoint", "x.pt"])
    assert evaluate.noise_sigmas == EvalConfig().noise_sigmas


@pytest.mark.parametrize("name", ["estimator", "temperature"])
def test_the_walk_would_see_a_wrong_default(tmp_path, monkeypatch, name):
    """The test above could fail: a def with a wrong default is reported."""
    src = tmp_path / "jacmatch" / "core"
    src.mkdir(parents=True)
    (tmp_path / "jacmatch" / "integrations").mkdir()
    (src / "x.py").write_text(f"def JacobianMatching_like(estimator='label', temperature=4.0):\n    pass\n"
                              f"class JacobianMatching:\n    def __init__(self, {name}={'label'!r}):\n        pass\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path / "jacmatch")
    with pytest.raises(AssertionError, match="ObjectiveConfig"):
        test_every_public_default_equals_its_config_default()


def test_evaluations_defaults_are_eval_configs():
    """jacmatch.training.evaluate's defaults are EvalConfig's (the evaluation a run does)."""
    config, checked = EvalConfig(), []
    tree = ast.parse((ROOT / "training" / "evaluate.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "evaluate")
    for arg, default in zip(fn.args.kwonlyargs, fn.args.kw_defaults):
        if default is not None and hasattr(config, arg.arg):
            value = ast.literal_eval(default)
            assert (list(value) if isinstance(value, tuple) else value) == getattr(config, arg.arg), arg.arg
            checked.append(arg.arg)
    assert {"batch_size", "cosine_samples", "noise_seed", "fidelity", "interpolations", "interpolation_seed"} <= \
        set(checked)
