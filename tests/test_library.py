"""jacmatch as a library: terms as modules composed by hand, estimators registered by
users, any model (import paths, tuple/dict outputs, plain state_dicts), double-backward
checks, the shipped configs, the CLI's defaults, and the wheel installed elsewhere."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import helpers
from helpers import SmallCNN
from helpers import batch, pair

import jacmatch as jm
from jacmatch.cli import main as cli_main
from jacmatch.models import create_model, replace_hard_activations

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


# ---- terms composed by hand ------------------------------------------------------------

HAND = {
    "kd+jm": (jm.ObjectiveConfig(alpha=1, beta=0.5, gamma=2, temperature=3),
              lambda: [jm.CrossEntropyLoss(1), jm.KDLoss(0.5, temperature=3),
                       jm.JacobianMatchingLoss(2, "teacher_top1", temperature=3)]),
    "projection": (jm.ObjectiveConfig(beta=1, gamma=1, jm_outputs="projection", num_projections=3),
                   lambda: [jm.CrossEntropyLoss(), jm.KDLoss(1), jm.JacobianMatchingLoss(1, "projection",
                                                                                          num_projections=3)]),
    "noise+penalty": (jm.ObjectiveConfig(alpha=1, beta=1, noise_sigma=0.1, noise_draws=2, penalty=0.3,
                                         penalty_form="sq", num_projections=2, gamma=1, jm_outputs="input_fd",
                                         jm_form="sq"),
                      lambda: [jm.NoiseTrainingLoss(1, 0.1, 2), jm.NoisyDistillationLoss(1, 0.1, 2),
                               jm.JacobianMatchingLoss(1, "input_fd", "sq", num_projections=2),
                               jm.JacobianPenalty(0.3, "sq", 2)]),
    "attention": (jm.ObjectiveConfig(alpha=1, beta=0, gamma=0, delta=2, delta_jacobian=0.5, at_layers=["bn:conv"]),
                  lambda: [jm.CrossEntropyLoss(), jm.AttentionTransferLoss(2, ["bn:conv"]),
                           jm.AttentionJacobianLoss(0.5, ["bn:conv"])]),
}


@pytest.mark.parametrize("name", list(HAND))
def test_terms_composed_by_hand_equal_the_config_built_objective(name):
    cfg, terms = HAND[name]
    results = []
    for objective_args in ({"config": cfg}, {"terms": terms()}):
        student, teacher = pair()
        obj = jm.TransferObjective(student, teacher, generator=torch.Generator().manual_seed(2), **objective_args)
        x, y = batch()
        logits, total, values = obj(x, y)
        total.backward()
        results.append((logits.detach(), total.detach(), values, [p.grad.clone() for p in student.parameters()]))
    (l1, t1, v1, g1), (l2, t2, v2, g2) = results
    assert torch.equal(l1, l2) and torch.equal(t1, t2) and v1.keys() == v2.keys()
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_objective_is_a_module_that_moves_and_keeps_its_teacher_frozen():
    student, teacher = SmallCNN(k=5), SmallCNN(k=5)
    obj = jm.TransferObjective(student, teacher, jm.ObjectiveConfig(beta=1, gamma=1))
    obj.to(torch.float64).train()
    assert not teacher.training and student.training
    assert next(student.parameters()).dtype == torch.float64 == next(teacher.parameters()).dtype
    assert [t.key for t in obj.terms] == ["ce", "kd", "jm"]
    x, y = batch()
    _, total, _ = obj(x, y)
    assert total.dtype == torch.float64


def test_terms_in_a_plain_loop_equal_the_functional_api():
    student, teacher = pair()
    x, y = batch()
    x.requires_grad_()
    zs, zt = student(x), teacher(x)
    idx = jm.teacher_top1(zt.detach())
    js = jm.input_jacobian(zs, x, idx, create_graph=True)
    jt = jm.input_jacobian(zt, x, idx)
    assert torch.equal(jm.KDLoss(temperature=2)(zs, zt), jm.kd_loss(zs, zt, 2))
    assert torch.allclose(jm.JacobianMatchingLoss(1.0)(x, zs, teacher), jm.jacobian_matching_loss(js, jt), atol=0,
                          rtol=1e-12)
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(jm.NoiseTrainingLoss(1, 0.1, 4)(student, x, y, torch.Generator().manual_seed(1)),
                       jm.noise_training_loss(student, x, y, 0.1, 4, generator=gen))


def _arguments(kind, student, teacher, x, y):
    """The arguments a loop of one's own calls term ``kind`` with (a fresh generator each time)."""
    x = x.clone().requires_grad_()
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    if kind in ("at", "at_jm"):
        with jm.FeatureTaps(student, ["bn"]) as s_taps, jm.FeatureTaps(teacher, ["conv"]) as t_taps:
            student(x), teacher(x)
        if kind == "at":
            return lambda: ([s_taps["bn"]], [t_taps["conv"].detach()])
        return lambda: (x, [s_taps["bn"]], [torch.ones_like(x)])
    if kind == "noise":
        return lambda: (student, x, y, gen())
    if kind == "noisy_kd":
        return lambda: (student, teacher, x, gen())
    zs = student(x)
    return {"ce": lambda: (zs, y), "kd": lambda: (zs, teacher(x).detach()), "jm": lambda: (x, zs, teacher),
            "penalty": lambda: (x, zs, y, gen())}[kind]


TERMS = {"ce": lambda w: jm.CrossEntropyLoss(w), "kd": lambda w: jm.KDLoss(w),
         "jm": lambda w: jm.JacobianMatchingLoss(w), "penalty": lambda w: jm.JacobianPenalty(w),
         "noise": lambda w: jm.NoiseTrainingLoss(w, 0.1, 2), "noisy_kd": lambda w: jm.NoisyDistillationLoss(w, 0.1, 2),
         "at": lambda w: jm.AttentionTransferLoss(w, ["bn:conv"]),
         "at_jm": lambda w: jm.AttentionJacobianLoss(w, ["bn:conv"])}


@pytest.mark.parametrize("kind", list(TERMS))
def test_a_term_called_alone_returns_its_weight_times_its_value(kind):
    student, teacher = pair()
    x, y = batch()
    args = _arguments(kind, student, teacher, x, y)
    value = TERMS[kind](3.0).value(*args())
    assert value.abs() > 0
    for weight in (1.0, 10.0, 0.5):
        assert torch.allclose(TERMS[kind](weight)(*args()), weight * value, rtol=1e-12, atol=0)


def test_the_terms_defaults_are_the_objective_configs():
    """[CE, KD, JM] with their defaults is ObjectiveConfig(): CE + KD (τ = 8) + 10·JM."""
    cfg, terms = jm.ObjectiveConfig(), [jm.CrossEntropyLoss(), jm.KDLoss(), jm.JacobianMatchingLoss()]
    built = jm.build_terms(cfg)
    assert [repr(t) for t in built] == [repr(t) for t in terms]
    assert (cfg.beta, cfg.gamma, cfg.temperature) == (1.0, 10.0, 8.0)


def test_a_user_estimator_is_one_class_and_its_registration():
    from jacmatch.core.estimators import ESTIMATORS, TeacherTop1Row

    @jm.register_estimator("second_choice")
    class SecondChoice(TeacherTop1Row):
        """The teacher's second most likely class."""

        def index(self, teacher_logits, y):
            return jm.teacher_top_k(teacher_logits, 2)[:, 1:]

    try:
        student, teacher = pair()
        x, y = batch()
        obj = jm.TransferObjective(student, teacher, jm.ObjectiveConfig(gamma=1, jm_outputs="second_choice"))
        _, total, terms = obj(x, y)
        second = jm.teacher_top_k(teacher(x), 2)[:, 1]
        xs = x.clone().requires_grad_()
        expected = jm.jacobian_matching_loss(jm.input_jacobian(student(xs), xs, second, create_graph=True),
                                             jm.input_jacobian(teacher(xs), xs, second))
        torch.testing.assert_close(terms["jm"], expected)
        cached = obj.teacher_targets(x, y, full_jacobian=True)
        torch.testing.assert_close(obj(x, y, cached)[2]["jm"], terms["jm"])
    finally:
        ESTIMATORS.remove("second_choice")


def test_input_jvp_with_a_term_that_needs_input_gradients_is_refused():
    student, teacher = pair()
    with pytest.raises(ValueError, match="input_jvp"):
        jm.TransferObjective(student, teacher, terms=[jm.JacobianMatchingLoss(1, "input_jvp", "sq"),
                                                      jm.JacobianPenalty(1)])


def test_estimators_refuse_forms_they_cannot_estimate():
    with pytest.raises(ValueError, match="jm_form=sq"):
        jm.JacobianMatchingLoss(1, "input_fd", "normalized")
    with pytest.raises(ValueError, match="exact rows"):
        jm.JacobianMatchingLoss(1, "projection", "ce")
    with pytest.raises(ValueError, match="unknown Jacobian estimator 'everything'"):
        jm.JacobianMatchingLoss(1, "everything")


# ---- outputs of any model --------------------------------------------------------------


def test_logits_of_tuples_dicts_and_objects():
    z = torch.randn(3, 4)
    assert jm.logits_of(z) is z
    assert jm.logits_of((z, torch.randn(3, 4, 5))) is z
    assert jm.logits_of({"logits": z, "hidden": z}) is z
    assert jm.logits_of((torch.randn(3, 2), z), output=1) is z
    with pytest.raises(ValueError, match="model.output"):
        jm.logits_of((z, z))
    with pytest.raises(ValueError, match="no 'scores'"):
        jm.logits_of({"logits": z}, output="scores")


@pytest.mark.parametrize("spec,output", [("user_models:TupleNet", 0), ("user_models:DictNet", None)])
def test_models_with_tuple_or_dict_outputs_train_through_the_objective(spec, output):
    student = create_model(spec, 5, 1, output=output)
    teacher = create_model("small_cnn_4", 5, 1)
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 5, (4,))
    _, total, terms = jm.TransferObjective(student, teacher, jm.ObjectiveConfig(beta=1, gamma=1))(x, y)
    total.backward()
    assert set(terms) == {"ce", "kd", "jm"} and student.net.head.weight.grad.abs().sum() > 0


def test_ambiguous_output_names_the_option():
    student = create_model("user_models:TupleNet", 5, 1)
    student.net.head = torch.nn.Linear(4, 5)  # (logits, aux): both [B, 5], ambiguous without output=
    with pytest.raises(ValueError, match="model.output"):
        student(torch.rand(2, 1, 8, 8))


def test_teacher_student_class_count_mismatch_is_named():
    student, teacher = create_model("small_cnn_4", 10, 1), create_model("small_cnn_4", 1000, 1)
    with pytest.raises(ValueError, match="teacher has 1000 outputs and the student 10"):
        jm.TransferObjective(student, teacher, jm.ObjectiveConfig(beta=1, gamma=1))(torch.rand(2, 1, 8, 8),
                                                                                      torch.tensor([1, 2]))


def test_import_path_models_take_num_classes_and_options():
    model = create_model("user_models:tiny_cnn", 7, 3, width=4)
    assert model(torch.rand(2, 3, 9, 9)).shape == (2, 7)
    assert model.arch == {"name": "user_models:tiny_cnn", "num_classes": 7, "in_channels": 3, "width": 4}
    with pytest.raises(ValueError, match="cannot import 'no_such_module'"):
        create_model("no_such_module:f", 10, 1)
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        create_model("user_models:nope", 10, 1)


# ---- double backward -------------------------------------------------------------------


def test_check_model_names_the_hardsigmoid_module_and_the_fix_changes_no_output():
    from jacmatch.training.compat import check_model
    r = check_model("user_models:se_net", (3, 16, 16), fix=True)
    assert r.teacher_ok and not r.student_ok
    assert r.failing_module == "net.2.1 (Hardsigmoid)" and "hardsigmoid_backward" in r.student_error
    assert r.fix == "model.replace_hard_activations=true" and r.fixed_max_abs_diff <= 1e-6
    assert check_model("resnet20", (1, 12, 12)).student_ok


def test_replaced_hard_activations_match_torch_in_float64():
    torch.manual_seed(0)
    plain = create_model("user_models:se_net", 10, 3).double()
    fixed = create_model("user_models:se_net", 10, 3).double()
    fixed.load_state_dict(plain.state_dict())
    assert replace_hard_activations(fixed) == ["net.1", "net.2.1"]
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64) * 4  # both sides of ±3
    torch.testing.assert_close(fixed(x), plain(x), atol=1e-12, rtol=0)


def test_check_model_cli_exit_codes(capsys):
    sys.path.insert(0, str(TESTS))
    assert cli_main(["check-model", "user_models:se_net", "--input-shape", "3x8x8"]) == 1
    assert "net.2.1 (Hardsigmoid)" in capsys.readouterr().out
    assert cli_main(["check-model", "user_models:se_net", "--input-shape", "3x8x8", "--fix"]) == 0


def test_check_model_names_the_shape_to_pass_for_a_model_that_cannot_take_the_input(capsys):
    """A model too big for the input is the user's input to fix: one line, exit 2, the shape to pass."""
    assert cli_main(["check-model", "lenet5", "--input-shape", "1x8x8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("lenet5 cannot take an input of shape 1x8x8: its smallest input is 1x12x12: pass "
                        "--input-shape 1x12x12") and len(err.splitlines()) == 1, err


# ---- configs and the command line ------------------------------------------------------


def test_every_config_key_has_a_type_default_and_meaning(capsys):
    from jacmatch.training.config import config_keys
    rows = config_keys()
    assert not [k for k, _, _, meaning in rows if not meaning]
    assert cli_main(["config", "--list"]) == 0
    out = capsys.readouterr().out
    assert "objective.gamma" in out and "model.replace_hard_activations" in out


def test_every_cli_option_has_help():
    from jacmatch.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in sub.choices.items() for a in p._actions
               if a.help is None and a.dest != "help"]
    assert not missing


def test_shipped_configs_are_found_by_name():
    from jacmatch.training.config import ConfigError, load_config, packaged_configs
    assert {"paper/distill", "cifar/wrn_40_2_wrn_16_2"} <= set(packaged_configs())
    assert load_config("paper/distill") == load_config("configs/paper/distill.yaml")
    with pytest.raises(ConfigError, match="paper/distill"):
        load_config("paper/nothing")


def test_untrusted_import_path_checkpoint_is_refused(tmp_path):
    from jacmatch.training import load_model
    from jacmatch.training.checkpoint import CheckpointError, save_checkpoint
    model = create_model("user_models:tiny_cnn", 3, 1)
    save_checkpoint(tmp_path / "m.pt", {"model": model.state_dict(), "arch": model.arch})
    with pytest.raises(CheckpointError, match="--model user_models:tiny_cnn"):
        load_model(tmp_path / "m.pt")
    loaded, _ = load_model(tmp_path / "m.pt", trust="user_models:tiny_cnn")
    x = torch.rand(2, 1, 6, 6)
    torch.testing.assert_close(loaded(x), model(x))


def test_missing_extra_names_what_to_install():
    from jacmatch._extras import MissingExtra, require
    with pytest.raises(MissingExtra, match=r"pip install 'jacmatch\[plots\]'"):
        require("no_such_plotting_library", "plots")


def test_no_file_of_the_project_points_outside_it():
    tracked = helpers.run(["git", "grep", "-l", "shared" + "/", "--", "."], cwd=ROOT)
    assert tracked.stdout == "", tracked.stdout


# ---- end to end, from another folder ---------------------------------------------------


def _env(extra_path: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path:
        env["PYTHONPATH"] = extra_path
    return env


def run(args, cwd, env, timeout=600) -> str:
    """The process, which must succeed: its stdout."""
    return helpers.run(args, cwd=cwd, env=env, timeout=timeout, check=True).stdout


@pytest.mark.slow
def test_distill_defaults_to_auto_with_a_user_model_and_state_dict_teacher(tmp_path):
    """From a folder outside the checkout: an import-path student, a teacher from a plain
    state_dict, and no objective flags: auto trains fm+jm at 2 samples per class (kd and jm)."""
    torch.manual_seed(0)
    teacher = create_model("user_models:tiny_cnn", 10, 1, width=16)
    torch.save(teacher.net.state_dict(), tmp_path / "teacher_sd.pt")
    cli = [sys.executable, "-m", "jacmatch", "distill", "--dataset", "digits", "--model", "user_models:tiny_cnn",
           "--teacher-model", "user_models:tiny_cnn", "--set", "teacher_model.options.width=16",
           "--teacher-weights", str(tmp_path / "teacher_sd.pt"), "--samples-per-class", "2",
           "--set", "optim.epochs=1", "--set", "progress=false", "--out", str(tmp_path / "s")]
    out = run(cli, tmp_path, _env(str(TESTS)))
    assert "recipe: fm+jm (auto: n = 2 samples per class <= 50" in out
    assert "objective: 1·KD (τ = 16) + 10·JM (normalized, teacher_top1)" in out
    metrics = json.loads((tmp_path / "s" / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(metrics["train"]) == {"kd", "jm"}
    mismatch = helpers.run([*cli[:-1], str(tmp_path / "s2"), "--set", "teacher_model.num_classes=1000"],
                           cwd=tmp_path, env=_env(str(TESTS)))
    assert mismatch.returncode == 2 and "Traceback" not in mismatch.stderr
    assert "the teacher has 1000 outputs but digits has 10 classes" in mismatch.stderr.replace("\n", " ") or \
        "do not fit" in mismatch.stderr


@pytest.mark.slow
def test_the_wheel_installs_and_runs_from_another_folder(tmp_path):
    """Build the wheel, install it into a fresh venv (dependencies from the project's
    environment), and run an experiment from a folder that is not the checkout."""
    import sysconfig
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
        tmp_path, _env())
    wheel = next(dist.glob("jacmatch-*.whl"))
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, _env())
    py = venv / "bin" / "python"
    site = run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, _env()).strip()
    Path(site, "_project_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", str(wheel)], tmp_path, _env())
    where = run([str(py), "-c", "import jacmatch; print(jacmatch.__file__)"], tmp_path, _env()).strip()
    assert where.startswith(str(venv)), where
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = run([str(venv / "bin" / "jacmatch"), "experiment", "teacher", "--quick", "--out", str(tmp_path / "o")],
              work, _env())
    assert "== teacher done" in out
    assert (tmp_path / "o" / "results" / "quick" / "teacher.json").is_file()
    assert run([str(venv / "bin" / "jacmatch"), "--version"], work, _env()).strip().startswith("jacmatch ")
    assert "paper/distill" in run([str(venv / "bin" / "jacmatch"), "config", "--files"], work, _env())


@pytest.mark.slow
def test_demo_says_what_it_does_within_ten_seconds(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "jacmatch", "demo", "--out", str(tmp_path / "d")], cwd=tmp_path,
                            stdout=subprocess.PIPE, text=True)
    start = time.time()
    try:
        line = proc.stdout.readline()
    finally:
        proc.kill()
        proc.wait()
    assert time.time() - start < 10 and line.startswith("demo on digits"), line


# ---- torchvision and timm (the venv of `make vision-venv`) ------------------------------


@pytest.mark.vision
@pytest.mark.parametrize("spec,size", [("torchvision:resnet18", 32), ("timm:resnet10t", 32),
                                       ("torchvision:mobilenet_v3_small", 32), ("timm:vit_tiny_patch16_224", 224)])
def test_torchvision_and_timm_models_as_students(spec, size):
    """As they are (a ViT's attention included: the objective takes it on the math kernel),
    but for MobileNetV3's Hardsigmoid, which needs replace_hard_activations."""
    student = create_model(spec, 10, 3, replace_hard_activations="mobilenet" in spec)
    teacher = create_model("small_cnn_4", 10, 3)
    x, y = torch.rand(2, 3, size, size), torch.tensor([1, 2])
    _, total, terms = jm.TransferObjective(student.train(), teacher, jm.ObjectiveConfig(beta=1, gamma=1))(x, y)
    total.backward()
    assert set(terms) == {"ce", "kd", "jm"} and torch.isfinite(total)


@pytest.mark.vision
def test_check_model_names_the_one_size_a_vit_takes(capsys):
    assert cli_main(["check-model", "timm:vit_tiny_patch16_224", "--input-shape", "3x32x32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith("it takes 3x224x224 only: pass --input-shape 3x224x224"), err


def test_every_function_reads_in_one_screen():
    """No function in the package is over 60 lines (the trainer's loop included)."""
    import ast
    long = []
    for path in sorted((ROOT / "jacmatch").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, long


#: Layers of the package, bottom up: an import may point only to a lower layer (or within
#: its own package). The maths at the bottom (the package's own __init__ is its face); data
#: and models beside it; training above; the integrations and what the experiments share
#: (experiments: runs, records, rows, figures, tools) on top of training; the paper's sections
#: and the benchmarks side by side above them (neither imports the other); the report over
#: both; the command line over everything.
LAYERS = {"errors": 0, "atomic": 0, "_imports": 0, "_extras": 0, "registry": 0.5, "core": 1, "data": 2, "models": 2,
          "training": 3, "integrations": 4, "experiments": 4, "paper": 5, "bench": 5, "report": 6, "cli": 7, "__main__": 8}


def import_graph(root: Path) -> dict[str, set[str]]:
    """Every module of the package under ``root`` and the package modules it imports:
    absolute and relative imports, at any depth of the file (inside functions too)."""
    import ast
    package = root.name
    modules = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[:len(here.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                found = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in found:
                while target and target not in modules:  # a name imported from a module: the module
                    target = target.rpartition(".")[0]
                if target.split(".")[0] == package and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def import_problems(root: Path) -> list[str]:
    """The cycles of the import graph, and every arrow that points up a layer or across to
    another package of the same layer."""
    graph = import_graph(root)

    def layer(module: str) -> tuple[str, int]:
        top = module.split(".")[1] if "." in module else "core"  # the package's face is the maths'
        return top, LAYERS[top]
    problems = []
    for a, targets in sorted(graph.items()):
        for b in sorted(targets):
            (ta, la), (tb, lb) = layer(a), layer(b)
            if ta != tb and lb >= la:
                problems.append(f"{a} imports {b}, which is not below it")
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:  # depth first: a module met again on the path is a cycle
        if module in path:
            problems.append("cycle: " + " -> ".join(path[path.index(module):] + [module]))
            return
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, path + [module])
        done.add(module)
    for module in sorted(graph):
        visit(module, [])
    return problems


def test_imports_point_down_and_make_no_cycle():
    """The whole package's import graph, absolute and relative imports of every module."""
    graph = import_graph(ROOT / "jacmatch")
    assert "jacmatch.training.trainer" in graph and "jacmatch.core.objective" in graph["jacmatch.training.trainer"]
    assert "jacmatch.training" in graph["jacmatch.experiments.common"]  # absolute and relative imports count
    assert import_problems(ROOT / "jacmatch") == []


def test_the_import_check_finds_an_upward_arrow_and_a_cycle(tmp_path):
    pkg = tmp_path / "jacmatch"
    for folder in ("core", "training"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("def f():\n    import jacmatch.training.b\n")  # up, inside a function
    (pkg / "core" / "c.py").write_text("from . import d\n")
    (pkg / "core" / "d.py").write_text("from .c import x\n")
    (pkg / "training" / "b.py").write_text("from ..core import a\n")
    for floor in ("paper", "bench"):  # a sideways arrow between two floors of one layer
        (pkg / floor).mkdir()
        (pkg / floor / "__init__.py").write_text("")
    (pkg / "paper" / "protocol.py").write_text("ROWS = 1\n")
    (pkg / "bench" / "speed.py").write_text("from ..paper.protocol import ROWS\n")
    problems = import_problems(pkg)
    assert "jacmatch.bench.speed imports jacmatch.paper.protocol, which is not below it" in problems
    assert "jacmatch.core.a imports jacmatch.training.b, which is not below it" in problems
    assert any(p.startswith("cycle: jacmatch.core.a -> jacmatch.training.b") for p in problems), problems
    assert any(p.startswith("cycle: jacmatch.core.c -> jacmatch.core.d") for p in problems), problems


def test_distill_names_an_operation_without_a_double_backward_and_its_fix(tmp_path, capsys, teacher):
    """distill with a student that cannot take the Jacobian term's double backward: one line,
    exit 2, the module and the setting that fixes it (check-model's finding), no traceback."""
    sys.path.insert(0, str(TESTS))
    args = ["distill", "--teacher", teacher, "--dataset", "synthetic", "--samples-per-class", "2",
            "--model", "user_models:se_net", "--out", str(tmp_path / "s"), "--set", "progress=false", "--recipe", "paper"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot take the Jacobian term's double backward" in err, err
    assert "at module net.2.1 (Hardsigmoid)" in err and "set model.replace_hard_activations=true" in err
    assert cli_main([*args, "--set", "model.replace_hard_activations=true", "--overwrite"]) == 0


def test_a_new_loss_is_one_file_and_one_line_of_config(tmp_path, teacher):
    """tests/user_terms.py holds a Term subclass; objective.terms adds it, from Python and
    from the command line, beside the default terms."""
    sys.path.insert(0, str(TESTS))
    student, t = SmallCNN(k=5), SmallCNN(k=5)
    x, y = torch.rand(4, 1, 6, 6), torch.tensor([0, 1, 2, 3])
    cfg = jm.ObjectiveConfig(terms={"user_terms:LogitNorm": {"weight": 0.1, "power": 2}})
    logits, total, terms = jm.TransferObjective(student, t, cfg)(x, y)
    assert list(terms) == ["ce", "kd", "jm", "logit_norm"]
    assert torch.allclose(terms["logit_norm"], logits.pow(2).mean())
    from user_terms import LogitNorm  # only from_step written: value, and the weighted call, are built on it
    z = torch.randn(3, 5)
    assert torch.equal(LogitNorm(0.5, power=3).value(logits=z), z.abs().pow(3).mean())
    assert torch.equal(LogitNorm(0.5, power=3)(logits=z), 0.5 * z.abs().pow(3).mean())
    for bad in ((z,), ()):
        with pytest.raises(jm.UsageError, match=re.escape("takes the step's fields by keyword (x, y, logits")):
            LogitNorm().value(*bad, **({} if bad else {"logit": z}))
    assert torch.allclose(total, terms["ce"] + terms["kd"] + 10 * terms["jm"] + 0.1 * terms["logit_norm"])
    for spec, options, message in (("user_terms:not_a_term", {}, "is not a jacmatch.Term subclass"),
                                   ("user_terms:Missing", {}, "has no attribute 'Missing'"),
                                   ("user_terms:LogitNorm", {"alpha": 1}, "does not take ['alpha']")):
        with pytest.raises(jm.UsageError, match=re.escape(message)):
            jm.build_terms(jm.ObjectiveConfig(terms={spec: options}))
    args = ["distill", "--teacher", teacher, "--dataset", "synthetic", "--samples-per-class", "2", "--model",
            "small_cnn_4", "--out", str(tmp_path / "s"), "--set", "progress=false", "--set", "optim.epochs=1",
            "--set", "objective.terms={user_terms:LogitNorm: {weight: 0.1}}", "--recipe", "paper"]
    assert cli_main(args) == 0
    metrics = json.loads((tmp_path / "s" / "metrics.jsonl").read_text().splitlines()[0])
    assert set(metrics["train"]) == {"ce", "kd", "jm", "logit_norm"}


def test_the_five_registries_share_one_shape_and_one_error():
    import jacmatch as jm
    from jacmatch.core.estimators import ESTIMATORS
    from jacmatch.core.terms import TERMS
    from jacmatch.data.datasets import DATASETS
    from jacmatch.data.sources import SOURCES
    from jacmatch.models._registry import MODELS
    from jacmatch.registry import Registry
    for registry, known in ((MODELS, "small_cnn_4"), (DATASETS, "digits"), (SOURCES, "npz"),
                            (ESTIMATORS, "projection"), (TERMS, "gamma")):
        assert isinstance(registry, Registry) and known in registry.list() and registry.get(known) is not None
        with pytest.raises(Exception, match=rf"unknown {registry.what} 'nope': known {registry.what}s are .*{known}"):
            registry.get("nope")
    assert jm.list_terms() == ["alpha", "beta", "gamma", "delta", "delta_jacobian", "penalty"]  # the objective's order
    r = Registry("thing")
    r.register("b", 2)
    r.register("a")(1)
    assert (r.list(), r.names(), r.find("c"), r.remove("b"), r.list()) == (["a", "b"], ["b", "a"], None, 2, ["a"])


def imported_names(root: Path) -> list[tuple[Path, int, str, str, Path]]:
    """Every ``from M import name`` of the package under ``root`` whose M is one of its modules:
    (file, line, M, name, M's file)."""
    import ast
    modules = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    found = []
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[:len(here.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                if base in modules:
                    found += [(path, node.lineno, base, a.name, modules[base]) for a in node.names
                              if f"{base}.{a.name}" not in modules]  # (a submodule is not a name)
    return found


def defined_names(path: Path) -> set[str]:
    """The names a module defines at its top level (functions, classes, assignments, also
    under an if or a try), not those it imports."""
    import ast
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        for sub in ast.walk(node) if isinstance(node, (ast.If, ast.Try, ast.For)) else [node]:
            if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(sub.name)
            targets = sub.targets if isinstance(sub, ast.Assign) else [sub.target] if isinstance(
                sub, (ast.AnnAssign, ast.For)) else []
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def import_scan(root: Path) -> list[str]:
    """A private name imported from another module, and a name imported from a module that
    does not define it (a re-export), other than from a package's face (its __init__)."""
    problems = []
    for path, line, base, name, source in imported_names(root):
        where = f"{path.relative_to(root.parent)}:{line} imports {name} from {base}"
        if name.startswith("_") and not name.startswith("__"):
            problems.append(f"{where}: a private name")
        elif source.name != "__init__.py" and name not in defined_names(source):
            problems.append(f"{where}, which does not define it")
    return problems


def test_no_private_name_crosses_a_module_and_nothing_is_re_exported(tmp_path):
    assert import_scan(ROOT / "jacmatch") == []
    pkg = tmp_path / "jacmatch"  # the scan can fail: a private name and a re-export
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("_hidden = 1\n\ndef shown():\n    pass\n")
    (pkg / "core" / "b.py").write_text("from .a import _hidden, shown\n")
    (pkg / "core" / "c.py").write_text("from .b import shown\n")
    assert sorted(import_scan(pkg)) == ["jacmatch/core/b.py:1 imports _hidden from jacmatch.core.a: a private name",
                                "jacmatch/core/c.py:1 imports shown from jacmatch.core.b, which does not define it"]


def test_the_objective_line_is_written_from_every_term_in_effect():
    from jacmatch.core.objective import describe_terms
    cfg = jm.ObjectiveConfig(alpha=1, beta=0.5, gamma=2, penalty=0.1, noise_sigma=0.2, temperature=4,
                             terms={"user_terms:LogitNorm": {"weight": 0.3}})
    sys.path.insert(0, str(TESTS))
    line = describe_terms(jm.build_terms(cfg))
    assert line == ("1·CE on noise (σ = 0.2, 1 draws) + 0.5·KD on noise (σ = 0.2, 1 draws) + 2·JM (normalized, "
                    "teacher_top1) + 0.1·penalty + 0.3·logit_norm"), line
    student, teacher = pair()
    assert jm.TransferObjective(student, teacher).describe() == "1·CE + 1·KD (τ = 8) + 10·JM (normalized, teacher_top1)"
