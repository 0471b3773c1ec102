"""Nothing silent, round 3: each case of the third red-team pass, pinned (one test per cause).
A case's number is the one it has in the issue that listed them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from jacmatch.cli import main

TINY = ["--model", "small_cnn_4", "--set", "optim.epochs=1", "--set", "progress=false", "--device", "cpu"]


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    """A one-epoch small_cnn_4 teacher on scikit-learn's digits (a second or two)."""
    out = tmp_path_factory.mktemp("digits_teacher")
    assert main(["train-teacher", "--dataset", "digits", *TINY, "--out", str(out)]) == 0
    return out / "last.pt"


def _pngs(folder: Path, n: int, size: int = 8):
    import numpy as np
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8), "L").save(folder / f"{i}.png")


def _folder_with_a_truncated_test_image(root: Path, broken: str) -> Path:
    """train/ and test/ with 3 classes of 6 PNGs each; the test image ``broken`` cut to 60 bytes."""
    for c in ("a", "b", "c"):
        _pngs(root / "train" / c, 6)
        _pngs(root / "test" / c, 6)
    path = root / "test" / broken
    path.write_bytes(path.read_bytes()[:60])
    return root


# ---- 1. TensorBoard gets every number of an epoch's record, the nested fidelity too ------------


def test_distill_with_tensorboard_writes_its_results_and_every_number_of_the_record(tmp_path, digits_teacher):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "s"
    run = ["distill", "--recipe", "none", "--teacher", str(digits_teacher), "--dataset", "digits", *TINY,
           "--samples-per-class", "5", "--set", "tensorboard=true", "--out", str(out)]
    assert main(run) == 0  # it crashed at its end: the fidelity dict was handed to add_scalar
    assert (out / "results.json").is_file() and (out / "last.pt").is_file()
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/lr", "test/acc", "test/fidelity/clean/kl", "test/fidelity/noisy/0.1/agreement",
            "test/fidelity/interpolated/points", "test/jacobian_cosine"} <= tags, sorted(tags)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert events.Scalars("test/fidelity/clean/kl")[0].value == pytest.approx(record["test"]["fidelity"]["clean"]["kl"])
    assert main([*run[:-2], "--set", "optim.epochs=2", "--out", str(out), "--resume"]) == 0


# ---- 2. no command writes over a file that a run folder owns ------------------------------------


@pytest.mark.parametrize("name", ["metrics.jsonl", "best.pt", "results.json", "history.jsonl", "config.yaml",
                                  ".jacmatch.lock", "tensorboard/events.json"])
def test_json_outputs_never_write_over_a_run_folders_files(tmp_path, digits_teacher, capsys, name):
    import hashlib
    run = digits_teacher.parent
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}
    for command in (["evaluate", "--checkpoint", str(digits_teacher), "--noise-sigmas"],
                    ["check-model", "small_cnn_4", "--input-shape", "1x8x8", "--num-classes", "10"]):
        code = main([*command, "--json", str(run / name)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "would write over a file of the run in" in err[0], err
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()} == before
    assert main(["evaluate", "--checkpoint", str(digits_teacher), "--noise-sigmas", "--json",
                 str(run.parent / "elsewhere.json")]) == 0  # a new file is written


# ---- 3. one unreadable test image drops its own interpolation pairs, not a batch of them --------


def test_interpolated_fidelity_leaves_out_only_the_pairs_of_an_unreadable_sample(tmp_path):
    from jacmatch.core.metrics import interpolation_pairs
    from jacmatch.data import create_dataset
    from jacmatch.data.sources import Loading
    from jacmatch.training import evaluate
    root = _folder_with_a_truncated_test_image(tmp_path / "d", "b/2.png")
    data = create_dataset(str(root), val_size=0, loading=Loading(on_bad_sample="skip"))
    torch.manual_seed(0)
    student, teacher = (nn.Sequential(nn.Flatten(), nn.Linear(64, 3)) for _ in range(2))
    out = evaluate(student, data.test, "cpu", batch_size=7, teacher=teacher, cosine_samples=0,
                   interpolations=18, interpolation_seed=3)["fidelity"]["interpolated"]
    images = {}  # every readable test image by its index, one at a time
    for k in range(len(data.test)):
        for index, x, _ in data.test.batches([[k]]):
            images.update(zip(index.tolist(), x))
    assert len(images) == len(data.test) - 1
    i, j, lam = interpolation_pairs(len(data.test), 18, 3)
    kept = [k for k in range(18) if int(i[k]) in images and int(j[k]) in images]
    assert 0 < len(kept) < 18 and out["points"] == len(kept)  # one batch of 7 pairs was dropped before
    x = torch.stack([lam[k] * images[int(i[k])] + (1 - lam[k]) * images[int(j[k])] for k in kept])
    with torch.no_grad():
        zs, zt = student(x), teacher(x)
    kl = (torch.softmax(zt, 1) * (torch.log_softmax(zt, 1) - torch.log_softmax(zs, 1))).sum(1).mean()
    assert out["agreement"] == pytest.approx(float((zs.argmax(1) == zt.argmax(1)).double().mean()), abs=1e-12)
    assert out["kl"] == pytest.approx(float(kl), rel=1e-5) and math.isfinite(out["kl"])


def test_a_run_with_an_unreadable_test_image_finishes(tmp_path):
    root = _folder_with_a_truncated_test_image(tmp_path / "d", "a/0.png")
    skip = ["--set", "data.on_bad_sample=skip", "--set", "data.val_size=0", "--set", "data.workers=0"]
    assert main(["train-teacher", "--dataset", str(root), *TINY, *skip, "--out", str(tmp_path / "t")]) == 0
    assert main(["distill", "--recipe", "none", "--teacher", str(tmp_path / "t" / "last.pt"), "--dataset", str(root),
                 *TINY, *skip, "--out", str(tmp_path / "s")]) == 0
    fidelity = json.loads((tmp_path / "s" / "results.json").read_text())["final"]["test"]["fidelity"]
    assert 0 < fidelity["interpolated"]["points"] < 18 and math.isfinite(fidelity["interpolated"]["kl"])


# ---- 4. a teacher of another class count: no fidelity or cosine, and the reason recorded --------


def test_a_teacher_of_another_class_count_is_not_compared_and_the_record_says_why(tmp_path, digits_teacher, capsys):
    penalty_only = ["--set", "objective.beta=0", "--set", "objective.gamma=0", "--set", "objective.penalty=0.1"]
    assert main(["train-teacher", "--dataset", "synthetic", *TINY, "--out", str(tmp_path / "t4")]) == 0
    for teacher, dataset, k_teacher, k_model in ((digits_teacher, "synthetic", 10, 4),
                                                 (tmp_path / "t4" / "last.pt", "digits", 4, 10)):
        out = tmp_path / f"s_{dataset}"
        assert main(["distill", "--recipe", "none", "--teacher", str(teacher), "--dataset", dataset, *TINY,
                     *penalty_only, "--out", str(out)]) == 0  # it failed after training: "index out of range"
        test = json.loads((out / "results.json").read_text())["final"]["test"]
        assert "jacobian_cosine" not in test and "fidelity" not in test  # (the other way, a meaningless cosine)
        assert test["teacher_not_compared"].startswith(f"the teacher has {k_teacher} outputs and the model {k_model}")
        assert "no fidelity or Jacobian cosine: the teacher has" in capsys.readouterr().out


# ---- 5 and 19. result files: a cut or retyped one is one line naming it; a section never degrades


@pytest.mark.parametrize("text", ['{"cells": {"CE@1": {"ro', "[1, 2]", "", "\udcff"])
def test_a_cut_or_retyped_result_file_is_one_line_that_names_it(tmp_path, monkeypatch, capsys, text):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "distill.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--results", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{folder / 'distill.json'}" in err[0] and "restore it" in err[0], err


def test_a_cut_run_record_is_one_line_that_names_it_and_is_not_trained_over(tmp_path):
    from jacmatch.errors import UsageError
    from jacmatch.experiments.common import run_or_load
    record = tmp_path / "CE_n5_s0.json"
    record.write_text('{"config": {"seed": 0, "da')
    with pytest.raises(UsageError, match=f"{record} is not a readable JSON result file"):
        run_or_load({"out_dir": str(tmp_path / "run"), "objective": {"beta": 0.0, "gamma": 0.0}}, record=record)
    assert record.read_text() == '{"config": {"seed": 0, "da'


def test_a_section_file_is_never_replaced_by_fewer_cells(tmp_path):
    from jacmatch.experiments.common import RECORD_SUM, write_section
    path = tmp_path / "distill.json"

    def held() -> dict:  # the file's contents, without its checksum
        return {k: v for k, v in json.loads(path.read_text()).items() if k != RECORD_SUM}
    complete = {"cells": {f"c{i}": i for i in range(20)}, "complete": True}
    write_section(path, complete)
    for partial in ({"cells": {"c0": 0}, "complete": False}, {"cells": {f"c{i}": i for i in range(19)}, "complete": False}):
        write_section(path, partial)  # a rerun that trains nothing, cut after some cells
        assert held() == complete
    path.write_text(json.dumps({"cells": {"c0": 0, "c1": 1}, "complete": False}))
    write_section(path, {"cells": {"c0": 0}, "complete": False})
    assert len(held()["cells"]) == 2
    write_section(path, {"cells": {"c0": 0, "c1": 1, "c2": 2}, "complete": False})  # a run going further: written
    assert len(held()["cells"]) == 3
    write_section(path, {"cells": {"c0": 0}, "complete": True})  # a finished run of another profile stands
    assert held() == {"cells": {"c0": 0}, "complete": True}
    path.write_text('{"cells": {"c0"')  # a cut file: what the run has replaces it
    write_section(path, {"cells": {"c0": 0}, "complete": False})
    assert held()["cells"] == {"c0": 0}


# ---- 6. a start that fails before its first checkpoint leaves the folder as it found it ----------


@pytest.mark.parametrize("existed", [False, True])
@pytest.mark.parametrize("fails", ["missing-extra", "first-epoch"])
def test_a_failed_start_leaves_the_folder_as_it_was_and_the_same_command_runs(tmp_path, digits_teacher, monkeypatch,
                                                                             capsys, existed, fails):
    import sys

    import jacmatch.training.trainer as trainer
    out = tmp_path / "s"
    if existed:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = sorted(p.name for p in out.iterdir()) if existed else None
    run = ["distill", "--recipe", "none", "--teacher", str(digits_teacher), "--dataset", "digits", *TINY,
           "--set", "eval.noise_sigmas=[]", "--out", str(out)]
    with monkeypatch.context() as m:
        if fails == "missing-extra":
            m.setitem(sys.modules, "tensorboard", None)  # import tensorboard: ImportError
            code = main([*run, "--set", "tensorboard=true"])
            assert code == 2 and "pip install 'jacmatch[tensorboard]'" in capsys.readouterr().err
        else:
            m.setattr(trainer, "train_epoch", lambda *a: (_ for _ in ()).throw(MemoryError("out of memory")))
            with pytest.raises(MemoryError):
                main(run)
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before
    assert main(run) == 0  # it was refused: "already holds a run (config.yaml, ...)", and --resume had no last.pt


# ---- 12. --resume starts from the run's own config, changes only what is given, and says so -----


@pytest.mark.parametrize("recipe", ["none", "kd"])
def test_resume_keeps_the_runs_own_config_and_says_what_changed(tmp_path, digits_teacher, capsys, recipe):
    out = tmp_path / "s"
    assert main(["distill", "--recipe", recipe, "--teacher", str(digits_teacher), "--dataset", "digits",
                 "--model", "small_cnn_4", "--samples-per-class", "3", "--set", "optim.epochs=2", "--set",
                 "progress=false", "--set", "eval.noise_sigmas=[]", "--set", "optim.max_steps=0", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["distill", "--teacher", str(digits_teacher), "--out", str(out), "--resume"]) == 0
    said = capsys.readouterr().out
    assert f"resume: {out} from epoch 2, as it was configured" in said, said
    assert json.loads((out / "results.json").read_text())["epochs"] == 2  # it trained on to the default 10
    assert main(["distill", "--teacher", str(digits_teacher), "--out", str(out), "--resume",
                 "--set", "optim.epochs=3"]) == 0
    assert "changed: optim.epochs 2 -> 3" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["epochs"] == 3 and results["config"]["model"]["name"] == "small_cnn_4"
    assert results.get("recipe", {}).get("name") == (None if recipe == "none" else recipe)
    assert main(["distill", "--teacher", str(digits_teacher), "--out", str(out), "--resume"]) == 0  # again, as it is
    assert f"resume: {out} from epoch 3, as it was configured" in capsys.readouterr().out


# ---- 11. a mapping given to --set merges into its section, as a config file's does -------------


def test_a_mapping_given_to_set_merges_like_a_config_file():
    from jacmatch.training.config import resolve
    teacher = {"objective": {"beta": 0.0, "gamma": 0.0}}
    cfg = resolve(None, ["data.name=synthetic", "data={augment: true, val_size: 3}"], teacher)
    assert (cfg.data.name, cfg.data.augment, cfg.data.val_size) == ("synthetic", True, 3)  # it trained on digits
    cfg = resolve(None, [("data.name", "synthetic"), "data={augment: true}", "data.val_size=5"], teacher)
    assert (cfg.data.name, cfg.data.augment, cfg.data.val_size) == ("synthetic", True, 5)


# ---- 10, 20, 21. the objective: its teacher options, soft labels' width, the student as teacher ---


def _pair():
    torch.manual_seed(0)
    student, teacher = (nn.Sequential(nn.Flatten(), nn.Linear(16, 10)) for _ in range(2))
    return student, teacher


def test_the_objectives_teacher_options_apply_without_terms_and_a_clash_with_config_is_refused():
    import jacmatch as jm
    student, teacher = _pair()
    o = jm.TransferObjective(student, teacher, teacher_chunk=0, teacher_fold_bn=False, teacher_channels_last=False)
    assert (o.teacher_chunk, o._fast_options) == (0, {"fold": False, "channels_last": False})  # all three were 64, True
    assert (o.config.teacher_chunk, o.config.teacher_fold_bn, o.config.teacher_channels_last) == (0, False, False)
    same = jm.TransferObjective(student, teacher, jm.ObjectiveConfig(teacher_chunk=0), teacher_chunk=0)
    assert same.teacher_chunk == 0
    with pytest.raises(jm.UsageError, match=r"teacher_chunk=0 here but 64 in config: set each in one place"):
        jm.TransferObjective(student, teacher, jm.ObjectiveConfig(), teacher_chunk=0)


def test_soft_labels_of_the_wrong_width_and_labels_of_the_wrong_length_say_what_was_expected():
    import jacmatch as jm
    student, teacher = _pair()
    o = jm.TransferObjective(student, teacher)
    x = torch.rand(6, 1, 4, 4)
    with pytest.raises(jm.UsageError, match=r"soft labels of 7 columns for a student of 10 outputs: give \[B, 10\]"):
        o(x, torch.rand(6, 7))
    with pytest.raises(jm.UsageError, match=r"labels of shape \(5,\) for a batch of 6 inputs"):
        o(x, torch.zeros(5, dtype=torch.long))
    o(x, torch.softmax(torch.rand(6, 10), 1))  # the right width trains


def test_the_student_as_its_own_teacher_is_refused_at_construction():
    import jacmatch as jm
    student, _ = _pair()
    for teacher in (student, nn.Sequential(*student)):  # itself, or a module sharing its parameters
        with pytest.raises(jm.UsageError, match="the teacher is the student"):
            jm.TransferObjective(student, teacher)
    assert all(p.requires_grad for p in student.parameters())  # not frozen


# ---- 15. keep-best: an empty validation set, a deleted best.pt, patience without keep-best -------


def test_keep_best_refuses_an_empty_validation_set_and_a_missing_best_checkpoint(tmp_path, digits_teacher, capsys):
    run = ["distill", "--recipe", "kd", "--teacher", str(digits_teacher), "--dataset", "digits", "--model",
           "small_cnn_4", "--samples-per-class", "3", "--set", "progress=false", "--set", "eval.noise_sigmas=[]",
           "--set", "optim.max_steps=0", "--set", "eval.every=1"]
    assert main([*run, "--set", "data.val_size=0", "--out", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no validation samples here (data.val_size=0)" in err[0], err
    assert not (tmp_path / "empty").exists()  # (it early-stopped on 0.0 accuracy over no samples)
    out = tmp_path / "s"
    assert main([*run, "--set", "optim.epochs=2", "--out", str(out)]) == 0
    (out / "best.pt").unlink()
    capsys.readouterr()
    assert main(["distill", "--teacher", str(digits_teacher), "--out", str(out), "--resume",
                 "--set", "optim.epochs=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "best.pt is missing, but epoch" in err[0], err


def test_patience_and_min_delta_without_keep_best_are_refused():
    from jacmatch.training.config import ConfigError, resolve
    teacher = {"objective": {"beta": 0.0, "gamma": 0.0}}
    for setting in ("eval.patience=5", "eval.min_delta=0.01"):
        with pytest.raises(ConfigError, match="which eval.keep_best=false does not keep"):
            resolve(None, [setting], teacher)
    assert resolve(None, [setting, "eval.keep_best=true"], teacher).eval.keep_best


# ---- 18. a list changed in place is checked again -------------------------------------------------


def test_a_config_list_changed_in_place_is_checked_again():
    from jacmatch.training.config import ConfigError, resolve
    cfg = resolve(None, [], {"objective": {"beta": 0.0, "gamma": 0.0}})
    cfg.optim.milestones.append(-5)
    with pytest.raises(ConfigError, match=r"'optim.milestones' must be a list of epochs \(integers >= 0\); element 0"):
        cfg.check()
    cfg.optim.milestones[0] = 5
    cfg.check()
    cfg.data.classes = "0,1"
    with pytest.raises(ConfigError, match="'data.classes' must be a list"):
        cfg.check()


# ---- 9. the objective follows its teacher's weights -----------------------------------------------


@pytest.mark.parametrize("change", ["load_state_dict", "ema_in_place", "new_tensor"])
def test_the_objective_follows_a_teacher_whose_weights_changed(change):
    import copy

    import jacmatch as jm
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 10))
    teacher, other = copy.deepcopy(student), copy.deepcopy(student)
    for net in (teacher, other):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
    x, y = torch.rand(8, 1, 6, 6), torch.randint(0, 10, (8,))
    o = jm.TransferObjective(student, teacher, jm.ObjectiveConfig(beta=1, gamma=0))
    before = o(x, y)[2]["kd"].detach()
    with torch.no_grad():
        if change == "load_state_dict":
            teacher.load_state_dict(other.state_dict())
        elif change == "ema_in_place":
            for p, q in zip(teacher.parameters(), other.parameters()):
                p.mul_(0.0).add_(q)
            for b, c in zip(teacher.buffers(), other.buffers()):
                b.copy_(c)
        else:
            teacher[0].weight = nn.Parameter(other[0].weight.clone())
            teacher[4].weight = nn.Parameter(other[4].weight.clone())
            teacher[0].bias.copy_(other[0].bias)
            teacher[4].bias.copy_(other[4].bias)
            teacher[1].load_state_dict(other[1].state_dict())
    fresh = jm.TransferObjective(student, copy.deepcopy(other), jm.ObjectiveConfig(beta=1, gamma=0))(x, y)[2]["kd"].detach()
    after = o(x, y)[2]["kd"].detach()
    assert float(after) == pytest.approx(float(fresh), rel=1e-5) and float(after) != pytest.approx(float(before))


# ---- 17. result files carry a checksum; an edited one, or a NaN, is refused -----------------------


def test_an_edited_result_file_or_a_nan_in_one_is_refused_by_the_report(tmp_path, monkeypatch, capsys):
    from jacmatch.experiments.common import RECORD_SUM, read_json, write_result
    folder = tmp_path / "results"
    folder.mkdir()
    teacher = {"model": "resnet20", "test": {"acc": 0.91, "noisy_acc": {}}, "epochs": 3}
    write_result(folder / "teacher.json", teacher)
    assert read_json(folder / "teacher.json") == {**teacher, RECORD_SUM: read_json(folder / "teacher.json")[RECORD_SUM]}
    monkeypatch.chdir(tmp_path)
    for edited, message in (('"acc": 0.91', "fails its checksum: it was changed since jacmatch wrote it"),
                            ('"acc": true', "fails its checksum"), ('"acc": NaN', "it holds NaN, which jacmatch never")):
        text = (folder / "teacher.json").read_text()
        path = folder / "teacher.json"
        path.write_text(text.replace('"acc": 0.91', edited.replace("0.91", "0.99")))
        assert main(["report", "--results", str(folder)]) == 2  # it printed "nan%" or "100.00%"
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(path) in err[0] and message in err[0], err
        path.write_text(text)


# ---- 14. a finite divergence: warned, then stopped (or skipped) like a non-finite loss ------------


def test_a_loss_grown_by_orders_of_magnitude_is_warned_then_handled_as_non_finite(tmp_path, capsys):
    run = ["train-teacher", "--dataset", "digits", "--model", "small_cnn_4", "--set", "progress=false",
           "--set", "optim.epochs=3", "--set", "optim.lr=1000", "--set", "eval.noise_sigmas=[]"]
    with pytest.raises(SystemExit, match="3"):
        main([*run, "--out", str(tmp_path / "stop")])  # it trained a dead student and exited 0
    err = capsys.readouterr().err
    assert "warning: the loss grew from 2.302 at the first step to" in err and "may be diverging" in err, err
    assert "diverged loss (grown" in err, err
    with pytest.raises(SystemExit, match="3"):
        main([*run, "--set", "nonfinite=skip", "--set", "skip_limit=2", "--out", str(tmp_path / "skip")])
    err = capsys.readouterr().err
    assert "may be diverging" in err, err
    assert "nonfinite=skip skipped 3 steps in a row (more than skip_limit=2); the last: diverged loss" in err, err


# ---- 16. torchrun: the global batch, and what a resume keeps ------------------------------------


def test_a_batch_that_does_not_divide_among_the_processes_is_refused(tmp_path, digits_teacher):
    from jacmatch.training import config_from_dict, train
    from jacmatch.training.config import ConfigError
    from jacmatch.training.distributed import DistInfo
    values = {"out_dir": str(tmp_path / "r"), "data": {"name": "digits"}, "model": {"name": "small_cnn_4"},
              "objective": {"beta": 0.0, "gamma": 0.0}, "optim": {"batch_size": 5}, "progress": False}
    with pytest.raises(ConfigError, match=r"optim.batch_size=5 does not divide among 2 processes \(each would take 2"):
        train(config_from_dict(values), info=DistInfo(0, 2, 0))  # (refused before any process group is used)


def test_the_unreadable_samples_found_before_a_stop_are_kept_by_the_resume(tmp_path, monkeypatch):
    import os
    import signal

    from jacmatch.training import config_from_dict, epoch, train
    from jacmatch.training.checkpoint import load_checkpoint
    root = tmp_path / "d"
    for c in ("a", "b"):
        _pngs(root / "train" / c, 4)
        _pngs(root / "test" / c, 2)
    broken = root / "train" / "a" / "1.png"
    broken.write_bytes(broken.read_bytes()[:60])
    real, calls = epoch.train_step, {"n": 0}

    def signal_at_the_last_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # the last of the first epoch's 4 steps: every sample read before the stop
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(epoch, "train_step", signal_at_the_last_step)
    values = {"out_dir": str(tmp_path / "r"), "data": {"name": str(root), "on_bad_sample": "skip", "val_size": 0,
                                                      "workers": 0}, "model": {"name": "small_cnn_4"},
              "objective": {"beta": 0.0, "gamma": 0.0}, "eval": {"noise_sigmas": []},
              "optim": {"epochs": 1, "batch_size": 2, "min_steps_per_epoch": 4}, "progress": False}
    with pytest.raises(epoch.Preempted, match="epoch 1, step 4 of 4"):
        train(config_from_dict(values))
    assert "1.png" in load_checkpoint(tmp_path / "r" / "last.pt")["bad_samples"]
    train(config_from_dict(values), resume=True)
    record = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["bad_samples"] == 1 and "1.png" in record["first_bad_sample"], record  # both were lost


def test_a_training_set_that_does_not_divide_among_the_processes_is_said(tmp_path):
    from types import SimpleNamespace

    from jacmatch.training import config_from_dict
    from jacmatch.training.distributed import DistInfo
    from jacmatch.training.trainer import PaddedShardsWarning, _check_run_on
    cfg = config_from_dict({"objective": {"beta": 0.0, "gamma": 0.0}, "optim": {"batch_size": 4}})
    odd = SimpleNamespace(train=range(9), val=range(3), name="synthetic")
    with pytest.warns(PaddedShardsWarning, match="the 9 training samples do not divide among 2 processes: each epoch "
                                                 "repeats 1 of them"):
        _check_run_on(cfg, odd, DistInfo(0, 2, 0))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_run_on(cfg, SimpleNamespace(train=range(10), val=range(3), name="synthetic"), DistInfo(0, 2, 0))
        _check_run_on(cfg, odd, DistInfo(0, 1, 0))


# ---- 13. Lightning's DataModule applies the views it is given (and a recipe's) -----------------


@pytest.mark.slow
def test_the_lightning_data_module_applies_augment_and_mixup_and_a_recipe_trains_with_them():
    import pytorch_lightning as pl

    from jacmatch.integrations.lightning import DistillationModule, JacmatchDataModule
    from jacmatch.models import create_model
    plain = {"name": "digits", "samples_per_class": 5, "workers": 0}
    views = JacmatchDataModule(plain, recipe="fm+jm", batch_size=16)
    assert (views.data_config.augment, views.data_config.crop_padding, views.data_config.mixup) == (True, 2, 1.0)
    torch.manual_seed(0)
    teacher = create_model("small_cnn_4", 10, 1)

    def fit(data):
        torch.manual_seed(1)
        student = create_model("small_cnn_4", 10, 1)
        seen = []
        module = DistillationModule(student, teacher, recipe="fm+jm")
        step = module.training_step
        module.training_step = lambda batch, *rest: (seen.append(batch[1]), step(batch, *rest))[1]
        pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0).fit(module, datamodule=data)
        return student, seen
    without, labels_plain = fit(JacmatchDataModule(plain, batch_size=16))
    mixed, labels_mixed = fit(views)
    assert all(y.dim() == 1 for y in labels_plain) and all(y.shape == (len(y), 10) for y in labels_mixed)
    assert all(torch.allclose(y.sum(1), torch.ones(len(y))) for y in labels_mixed)  # soft labels: the mixtures
    assert any(not torch.equal(a, b) for a, b in zip(without.state_dict().values(), mixed.state_dict().values()))
    from jacmatch.errors import UsageError
    with pytest.raises(UsageError, match="recipe= sets the objective and the optimiser"):
        DistillationModule(without, teacher, recipe="fm+jm", optimizer=lambda p: torch.optim.SGD(p, lr=0.1))


# ---- 7. a data set that draws a random view at each read: detected, or declared ----------------


def test_a_data_set_of_random_views_is_refused_unless_declared_and_then_trains_uncached(tmp_path, monkeypatch,
                                                                                        capsys, digits_teacher):
    from jacmatch.data import load_data
    from jacmatch.training.config import config_from_dict
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    spec = ["--dataset", "user_data:random_flips", "--model", "small_cnn_4", "--set", "progress=false",
            "--set", "eval.noise_sigmas=[]", "--set", "optim.epochs=2", "--set", "data.workers=0"]
    assert main(["train-teacher", *spec, "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gives another image at each read of the same index" in err[0] \
        and "data.random_views=true" in err[0], err  # the cache froze the first view; the teacher's targets drifted
    declared = [*spec, "--set", "data.random_views=true"]
    assert main(["train-teacher", *declared, "--out", str(tmp_path / "t")]) == 0
    d = config_from_dict({"data": {"name": "user_data:random_flips", "random_views": True, "workers": 0}}).data
    a, b = load_data(d), load_data(d)
    assert a.data_sha256 == b.data_sha256  # the source, not its draws: a resume is not refused as "changed"
    assert a.train.loading.cache_bytes == 0  # nothing decoded is kept
    assert main(["train-teacher", *declared, "--set", "optim.epochs=3", "--out", str(tmp_path / "t"), "--resume"]) == 0
    assert main(["distill", "--recipe", "kd", "--teacher", str(tmp_path / "t" / "last.pt"), *declared,
                 "--set", "optim.max_steps=0", "--out", str(tmp_path / "s")]) == 0
    assert "the teacher cache is off: data.random_views changes the inputs" in capsys.readouterr().err


# ---- the final evaluation says what it does (it ran for minutes without a word) ----------------


def test_the_final_evaluation_is_announced_and_timed(tmp_path, digits_teacher, capsys):
    assert main(["distill", "--recipe", "kd", "--teacher", str(digits_teacher), "--dataset", "digits", "--model",
                 "small_cnn_4", "--samples-per-class", "2", "--set", "optim.max_steps=20", "--set", "progress=true",
                 "--out", str(tmp_path / "s")]) == 0
    err = capsys.readouterr().err
    assert "final evaluation of the best weights: validation (" in err and "fidelity and the Jacobian cosine" in err
    assert "final evaluation: done [" in err


def test_a_result_with_integer_keys_reads_back_through_its_checksum(tmp_path):
    from jacmatch.experiments.common import read_json, write_result
    write_result(tmp_path / "r.json", {"by_n": {1: 0.5, 10: 0.7, 5: 0.6}, "pair": (1, 2)})
    assert read_json(tmp_path / "r.json")["by_n"] == {"1": 0.5, "10": 0.7, "5": 0.6}  # (it failed its own checksum)


def test_a_result_whose_keys_collide_as_strings_is_written_as_it_reads_back(tmp_path):
    from jacmatch.experiments.common import read_json, write_result
    write_result(tmp_path / "r.json", {"costs": {1: 0.5, "1": 0.7}})  # an int key beside its string: JSON has one
    assert read_json(tmp_path / "r.json")["costs"] == {"1": 0.7}
