"""Experiments, report and benchmark run end to end (quick modes), and the CIFAR configs
run on small CIFAR-format files the test writes."""

import json
import math
import re
import os
import shutil
from pathlib import Path

import pytest
import torch

import helpers
from helpers import write_cifar_dir

ROOT = Path(__file__).resolve().parents[1]


def jacmatch(*args, cwd):
    """The command in a child process, which must succeed: its stdout."""
    return helpers.jacmatch(*args, cwd=cwd, env=os.environ, timeout=600, check=True).stdout


@pytest.mark.slow
def test_every_experiment_section_and_the_report_quick(tmp_path):
    from jacmatch.paper.converge import PATIENCE_OF
    jacmatch("experiment", "all", "--quick", cwd=tmp_path)
    out = tmp_path / "results" / "quick"
    for name in ("teacher", "distill", "robustness", "transfer", "verify"):
        assert (out / f"{name}.json").is_file(), name
    distill = json.loads((out / "distill.json").read_text())
    for name, sel in distill["selection"].items():  # the best validation score wins, and the cells use it
        assert sel["chosen"] == max(sel["grid"], key=lambda v: sel["val_acc"][str(v)]), name
    assert len(distill["selection"]["tau"]["grid"]) > 1 and len(distill["selection"]["gamma"]["grid"]) > 1
    assert distill["steps"] == distill["selection"]["steps"]["chosen"]
    for row in ("CE", "CE+KD+JM", "noisy KD M=1"):  # every student trains at the learning rate chosen first
        run = tmp_path / "runs" / "paper" / "quick" / "distill" / f"{re.sub('[^A-Za-z0-9]+', '_', row)}_n5_s0"
        config = json.loads((run / "results.json").read_text())["config"]
        assert config["optim"]["lr"] == distill["lr"] == distill["selection"]["lr"]["chosen"], row
    assert distill["selection"]["lr"]["samples_per_class"] == 5  # the quick profile's budget check
    check = distill["selection"]["check_steps"]  # that n's budget: its own choice, not the rule's (400)
    assert check["samples_per_class"] == 5 and distill["budgets"] == {"1": 400, "5": check["chosen"]} == {"1": 400, "5": 800}
    for cell in distill["cells"].values():
        assert cell["objective"]["temperature"] == distill["selection"]["tau"]["chosen"]
        if cell["row"] in ("CE+KD+JM", "KD+JM"):
            assert cell["objective"]["gamma"] == distill["selection"]["gamma"]["chosen"]
    selection_run = json.loads((tmp_path / "runs" / "paper" / "quick" / "distill" / "select-gamma-1.0_n5_s0"
                                / "results.json").read_text())["final"]
    assert selection_run["test"]["noisy_acc"] == {} and "jacobian_cosine" not in selection_run["test"]
    assert {c["row"] for c in distill["cells"].values()} >= {"CE", "CE+KD", "CE+KD+JM", "KD+JM"}
    assert (out / "gradients.png").is_file()
    for name in ("teacher", "distill", "robustness", "transfer"):
        assert len(json.loads((out / f"{name}.json").read_text())["provenance"]["data_sha256"]) == 64, name
    jacmatch("report", "--results", str(out), cwd=tmp_path)
    report = (tmp_path / "results" / "REPORT.md").read_text()
    assert "## 2. Distillation with few samples" in report and "Not run yet" not in report
    assert "| CE+KD+JM |" in report
    ce, doubled = distill["cells"]["CE|5"], distill["cells"]["CE (2× steps)|5"]  # the budget check, in the findings
    assert f"Step budgets: a CE student at n=5 reaches {100 * ce['acc']['mean']:.1f} ± " in report
    assert f"{100 * doubled['acc']['mean']:.1f} ± {100 * doubled['acc']['std']:.1f}% with twice as many" in report
    assert f"(validation: {100 * ce['val_acc']['mean']:.1f} ± {100 * ce['val_acc']['std']:.1f}% and " in report
    assert "M = 1 draw, which is also the M at JM's cost" in report and "| noisy KD M=1 |" in report
    assert "At equal compute, CE+KD+JM − the rows that cost as much, test points (seeds won) against noisy KD M=1: " \
           "n=1: " in report and "Jacobian matching is " in report
    # The converged view: every cell early-stopped, its maximum grown while it bound, the budget check at every n,
    # time-to-accuracy, and verdicts shaped like the claim.
    converge = json.loads((out / "converge.json").read_text())
    assert set(converge["cells"]) == {f"{r}|{n}" for n in (1, 5) for r in
                                      ("CE", "CE+KD", "CE+JM", "CE+KD+JM", "FM", "FM+JM", "CE (2× patience)",
                                       "CE+KD (2× patience)", "FM (2× patience)")}
    fm = converge["fm"]  # FM's own values, chosen on validation, and its views: crops, flips and mixup
    for name, sel in fm["selection"].items():
        assert sel["chosen"] == fm["chosen"][name] == max(sel["grid"], key=lambda v: sel["val_acc"][str(v)]), name
    for row in ("FM", "FM+JM"):
        cell = converge["cells"][f"{row}|5"]
        assert cell["data"] == {"augment": True, "mixup": fm["chosen"]["mixup"]} and cell["lr"] == fm["chosen"]["fm_lr"]
        assert cell["objective"]["alpha"] == 0 and cell["objective"]["temperature"] == fm["chosen"]["fm_tau"]
    assert converge["cells"]["FM+JM|5"]["objective"]["gamma"] == distill["selection"]["gamma"]["chosen"]
    kept = sorted(p.name for p in (out / "runs" / "converge").glob("*.pt"))  # the tested students' weights, no others
    assert kept == sorted(f"{re.sub('[^A-Za-z0-9]+', '_', c['row'])}_n{n}_s0_max{c['max_steps']}_p{c['patience']}.pt"
                          for n in (1, 5) for c in (converge["cells"][f"{r}|{n}"] for r in converge["rows"])), kept
    for cell in converge["cells"].values():  # inside its maximum, or grown as far as the rule lets it
        assert max(cell["best_step"]["values"]) < cell["max_steps"] if cell["inside"] else \
            len(cell["grown_from"]) == converge["rule"]["growths"]
        assert cell["max_steps"] == cell["grown_from"][0] * 2 ** len(cell["grown_from"]) if cell["grown_from"] else True
    assert {"val_gain"} <= set(converge["cells"]["CE (2× patience)|1"])
    for key, cell in converge["cells"].items():  # a baseline's patience grew only while its check gained
        row, n = key.split("|")
        if row in converge["checked_rows"]:
            check = converge["cells"][f"{row} (2× patience)|{n}"]
            assert check["patience"] == 2 * cell["patience"] == 2 * converge["rule"]["patience"] * 2 ** len(
                cell["patience_grown_from"])
            assert check["val_gain"] < 0.5 or len(cell["patience_grown_from"]) == converge["rule"]["patience_growths"]
        elif "val_gain" not in cell:  # a Jacobian row: its baseline's patience
            assert cell["patience"] == converge["cells"][f"{PATIENCE_OF[row]}|{n}"]["patience"]
    assert "to_kd" in converge["cells"]["CE+KD+JM|5"] and (out / "converge_curves.png").is_file()
    assert "## 2b. Distillation at convergence" in report and "| (b) Jacobian matching improves distillation (at " \
        "convergence) |" in report and "(at an equal budget of 400 steps, 800 at n=5)" in report
    # Resumed, the section trains no student again; its step costs are the fastest of both invocations' measurements.
    # A folder of runs carried for a next part is deleted once the section is complete.
    (out / "carried" / "converge" / "CE_n1_s0_max12_p2").mkdir(parents=True)
    assert "carried/converge: removed (the section is complete)" in jacmatch("experiment", "converge", "--quick",
                                                                           cwd=tmp_path)
    assert not (out / "carried" / "converge").exists()
    resumed = json.loads((out / "converge.json").read_text())
    assert {k: c["acc"] for k, c in resumed["cells"].items()} == {k: c["acc"] for k, c in converge["cells"].items()}
    assert resumed["step_cost_measurements"] == 2 and all(
        v <= converge["step_seconds"][row][n] for row, by_n in resumed["step_seconds"].items() for n, v in by_n.items())
    # Robustness and transfer: their baselines at twice their epochs, the difference shown.
    robust, transfer = (json.loads((out / f"{k}.json").read_text()) for k in ("robustness", "transfer"))
    assert {"CE (2× epochs)|full", "CE (2× epochs)|10"} <= set(robust["cells"])
    assert {"CE (scratch) (2× epochs)|5", "CE+AT (2× epochs)|5"} <= set(transfer["cells"])
    for section, at, check in ((robust, "full", "CE (2× epochs)|full"), (transfer, 5, "CE+AT (2× epochs)|5")):
        rows = [c for k, c in section["cells"].items() if k.endswith(f"|{at}") and "val_gain" not in c]
        assert {c["epochs"] for c in rows} == {rows[0]["epochs"]}  # one budget for every row, grown or not
        assert section["cells"][check]["epochs"] == 2 * rows[0]["epochs"]
        assert rows[0]["epochs"] == section["base_epochs"] * 2 ** len(rows[0]["grown_from"])
        assert section["cells"][check]["val_gain"] < 0.5 or len(rows[0]["grown_from"]) == 1  # the quick profile's
    assert report.count("Budget check: the baselines trained for twice their epochs") == 2
    # A fresh clone: no runs/ folder. The section reuses the committed run records and trains nothing.
    assert len(list((out / "runs" / "distill").glob("*.json"))) == len(list((tmp_path / "runs" / "paper" / "quick"
                                                                            / "distill").iterdir()))
    shutil.rmtree(tmp_path / "runs")
    jacmatch("experiment", "distill", "--quick", cwd=tmp_path)
    assert not (tmp_path / "runs").exists()
    # Fidelity from the kept weights alone: every converged row at every n, the same as beside the runs, and each
    # student's test accuracy measured again equal to its record's (the weights are the tested ones).
    fidelity = json.loads((out / "fidelity.json").read_text())
    (out / "fidelity.json").unlink()
    jacmatch("experiment", "fidelity", "--quick", cwd=tmp_path)
    assert not (tmp_path / "runs").exists()
    again = json.loads((out / "fidelity.json").read_text())
    assert again["cells"] == fidelity["cells"] and set(again["cells"]) == {f"{r}|{n}" for r in converge["rows"]
                                                                         for n in (1, 5)}
    # Run again, it reads each student back while its weights are the same file, and evaluates a changed one again.
    assert again["evaluated"] == again["students"] == len(again["students_by_weights"]) == 2 * len(converge["rows"])
    jacmatch("experiment", "fidelity", "--quick", cwd=tmp_path)
    assert json.loads((out / "fidelity.json").read_text())["evaluated"] == 0
    changed = out / again["cells"]["CE|1"]["weights"][0]
    shutil.copyfile(changed, tmp_path / "kept.pt")
    shutil.copyfile(out / again["cells"]["CE|5"]["weights"][0], changed)
    jacmatch("experiment", "fidelity", "--quick", cwd=tmp_path)
    reread = json.loads((out / "fidelity.json").read_text())
    assert reread["evaluated"] == 1 and reread["cells"]["CE|1"]["agreement"] == again["cells"]["CE|5"]["agreement"]
    shutil.copyfile(tmp_path / "kept.pt", changed)
    # A converge.json without a cell (a partial part): its students' evaluations are kept for when the cell is back.
    saved = (out / "converge.json").read_text()
    (out / "converge.json").write_text(json.dumps({**{k: v for k, v in converge.items() if k != "record_sha256"},
                                                   "cells": {k: c for k, c in json.loads(saved)["cells"].items()
                                                             if k != "CE|5"}}))  # (a file of its own: no checksum)
    jacmatch("experiment", "fidelity", "--quick", cwd=tmp_path)
    partial = json.loads((out / "fidelity.json").read_text())
    assert "CE|5" not in partial["cells"] and partial["students"] == again["students"] - 1
    assert partial["evaluated"] == 1  # CE|1's weights, back as they were
    assert again["cells"]["CE|5"]["weights"][0] in partial["students_by_weights"]
    (out / "converge.json").write_text(saved)
    jacmatch("experiment", "fidelity", "--quick", cwd=tmp_path)
    assert json.loads((out / "fidelity.json").read_text())["evaluated"] == 0
    for cell in again["cells"].values():
        assert cell["acc_vs_record"] == 0 and set(cell["agreement"]["noisy"]) == {"0.1", "0.2", "0.3", "0.5", "0.7"}
        assert 0 <= cell["agreement"]["interpolated"]["mean"] <= 1 and cell["kl"]["clean"]["mean"] >= 0
    kept = again["cells"]["CE+KD+JM|5"]  # a kept student is a checkpoint the CLI evaluates beside its teacher
    jacmatch("evaluate", "--checkpoint", str(out / kept["weights"][0]), "--teacher", str(out / "teacher.pt"), "--json",
             "kept.json", cwd=tmp_path)
    evaluated = json.loads((tmp_path / "kept.json").read_text())
    assert evaluated["acc"] == pytest.approx(kept["acc"]["mean"], abs=1e-3)
    assert evaluated["fidelity"]["clean"]["agreement"] == pytest.approx(kept["agreement"]["clean"]["mean"], abs=1e-3)
    again = json.loads((out / "distill.json").read_text())
    assert again["cells"] == distill["cells"] and again["selection"] == distill["selection"]
    assert distill["run_seconds"] == pytest.approx(
        sum(c["train_seconds"] for c in distill["cells"].values())
        + sum(s["train_seconds"] for s in distill["selection"].values()))
    assert (out / "distill_noise.png").is_file()
    assert "students under noise" in report


def _fake_rows(val_acc: dict, trained: list):
    """A section's ``rows`` for ``paper._until_converged``: one seed, the given validation
    accuracy at each number of epochs, as many seconds as epochs."""
    from jacmatch.experiments.common import summarize_runs

    def rows(epochs, only=("CE", "noise")):
        out = {}
        for row in only:
            trained.append((row, epochs))
            runs = [{"final": {"test": {"acc": val_acc[epochs]}, "val": {"acc": val_acc[epochs]}},
                     "train_seconds": float(epochs), "student_parameters": 1, "epochs": epochs}]
            out[row] = {"row": row, "epochs": epochs, **summarize_runs(runs), "runs": runs}
        return out
    return rows


def test_a_section_doubles_its_epochs_while_its_baseline_still_gains_at_twice_them():
    from dataclasses import replace

    from jacmatch.paper import growth as growth_rule
    from jacmatch.paper import protocol as paper
    lay = paper.Layout(profile=replace(paper.FULL, budget_growths=2))
    trained = []  # CE gains 3 points from 8 to 16 epochs, then 0.2 from 16 to 32: 16 epochs it is
    cells, checks, epochs, growth = growth_rule.until_converged(lay, 8, _fake_rows({8: .80, 16: .83, 32: .832}, trained),
                                                           ("CE",))
    assert epochs == 16 and {c["epochs"] for c in cells.values()} == {16} and set(cells) == {"CE", "noise"}
    assert growth["grown_from"] == [8] and growth["val_gains"] == [{"CE": pytest.approx(3.0)}]
    assert checks["CE"]["row"] == "CE (2× epochs)" and checks["CE"]["epochs"] == 32
    assert checks["CE"]["val_gain"] == pytest.approx(0.2)
    assert growth["seconds_left_behind"] == 16.0  # CE and noise at 8 epochs; CE at 16 is the next rows' own
    assert trained == [("CE", 8), ("noise", 8), ("CE", 16), ("CE", 16), ("noise", 16), ("CE", 32)]
    # a baseline that never settles grows as often as the profile lets it, then stops, its check shown
    cells, checks, epochs, growth = growth_rule.until_converged(lay, 8, _fake_rows({8: .5, 16: .6, 32: .7, 64: .8}, []),
                                                           ("CE",))
    assert epochs == 32 and growth["grown_from"] == [8, 16] and checks["CE"]["val_gain"] == pytest.approx(10.0)
    # where it has converged at once, nothing grows
    _, checks, epochs, growth = growth_rule.until_converged(lay, 8, _fake_rows({8: .8, 16: .804}, []), ("CE",))
    assert epochs == 8 and growth == {"grown_from": [], "val_gains": [], "seconds_left_behind": 0.0}


def test_a_baseline_at_twice_its_epochs_is_the_run_its_row_grows_into():
    """The check's folder at twice the epochs is the row's own at them, so growing reuses it;
    the config's epochs keep the names the committed records have."""
    from jacmatch.paper.growth import epochs_tag as _epochs_tag
    assert _epochs_tag("CE_full_s0", 8, 8) == "CE_full_s0"
    assert _epochs_tag("CE_full_s0", 16, 8) == "CE_full_e16_s0"
    assert _epochs_tag("finetune_n5_s12", 32, 8) == "finetune_n5_e32_s12"


def test_every_paper_student_takes_the_same_number_of_steps():
    """The distillation grid gives every n the same step budget (to within one epoch),
    counted by the trainer's own batching: larger n, longer epochs, fewer of them."""
    from jacmatch.paper import protocol as paper
    from jacmatch.training import config_from_dict
    from jacmatch.training.config import merge_values
    from jacmatch.training.distributed import DistInfo
    from jacmatch.training.schedule import epoch_batches
    values = paper.run_config("distill")
    for steps in paper.FULL.grids["steps"]:
        for n in paper.FULL.samples:
            cfg = config_from_dict(merge_values(values, {"optim": {"epochs": paper.epochs_for_steps(n, values, steps)}}))
            per_epoch = len(epoch_batches(10 * n, cfg.optim, cfg.seed, DistInfo(), 0))
            assert steps - per_epoch < cfg.optim.epochs * per_epoch <= steps, (steps, n, per_epoch)


@pytest.mark.slow
def test_bench_quick_writes_valid_json(tmp_path):
    jacmatch("bench", "--quick", "--json", str(tmp_path / "b.json"), cwd=tmp_path)
    b = json.loads((tmp_path / "b.json").read_text())
    ratios, seconds = b["shapes"]["mnist-like"]["ratios"], b["shapes"]["mnist-like"]["seconds"]
    assert ratios["jm_over_kd"] == pytest.approx(seconds["jm_step"] / seconds["kd_step"])
    assert ratios["proj_over_top1"] == pytest.approx(seconds["jm_proj_step"] / seconds["jm_step"])
    from jacmatch.bench.speed import DEFAULT_STEPS
    assert set(seconds) == set(DEFAULT_STEPS) and ratios["library_over_handwritten"] > 0
    assert b["shapes"]["mnist-like"]["peak_bytes"].keys() == seconds.keys()


def test_bench_plans():
    from jacmatch.bench.speed import DEFAULT_STEPS, Plan
    assert Plan.choose().steps == DEFAULT_STEPS and not Plan.choose().scaling
    assert Plan.choose(only="kd,jm,jm_proj").steps == ("kd_step", "jm_step", "jm_proj_step")
    assert Plan.choose(only="teacher_forward,jm_step_cached").steps == ("teacher_forward", "jm_step_cached")
    full = Plan.choose(full=True, shape="cifar100-like")
    assert full.scaling and full.shapes == ("cifar100-like",) and set(DEFAULT_STEPS) < set(full.steps)
    with pytest.raises(ValueError, match="unknown bench step"):
        Plan.choose(only="kd,warp")
    with pytest.raises(ValueError, match="unknown --shape"):
        Plan.choose(shape="imagenet")


@pytest.mark.slow
@pytest.mark.parametrize("config,teacher_model", [("resnet32x4_resnet8x4", "resnet8x4"),
                                                  ("wrn_40_2_wrn_16_2", "wrn_16_2"),
                                                  ("few_sample_cifar100", "wrn_16_1")])
def test_cifar_configs_run_on_cifar_format_files(tmp_path, config, teacher_model):
    # four samples of each of ten classes: a validation split leaves each a training sample (else refused)
    data = write_cifar_dir(tmp_path / "cifar", num_classes=100, per_file=40, per_class=4)
    small = ["--set", f"data.data_dir={data}", "--set", "optim.epochs=1", "--set", "optim.batch_size=16",
             "--set", "progress=false", "--set", "tensorboard=false", "--set", "eval.cosine_samples=8",
             "--set", "optim.min_steps_per_epoch=1"]
    cfg = f"cifar/{config}"  # a config shipped in the package, by name
    from jacmatch.cli import main  # the teacher is the setup: trained in this process
    assert main(["train-teacher", "--config", cfg, "--model", teacher_model, "--out", str(tmp_path / "t"),
                 "--set", "objective.beta=0", "--set", "objective.gamma=0", "--set", "data.samples_per_class=null",
                 *small]) == 0
    out = jacmatch("distill", "--config", cfg, "--teacher", str(tmp_path / "t" / "last.pt"), "--out",
                   str(tmp_path / "s"), "--set", "data.samples_per_class=1", "--set", "data.val_size=5", *small,
                   cwd=tmp_path)
    assert "test accuracy" in out
    metrics = json.loads((tmp_path / "s" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < metrics["train"]["jm"] < 4 and -1 <= metrics["test"]["jacobian_cosine"] <= 1


def test_results_carry_provenance_and_the_report_refuses_mixed_data(tmp_path):
    from jacmatch.report.sections import check_one_data_set
    from jacmatch.training import config_from_dict, train
    results = train(config_from_dict({"out_dir": str(tmp_path / "r"), "data": {"name": "synthetic"},
                                      "model": {"name": "small_cnn_4"}, "objective": {"beta": 0, "gamma": 0},
                                      "optim": {"epochs": 1}, "eval": {"noise_sigmas": [], "jacobian_cosine": False},
                                      "progress": False}))
    p = json.loads((tmp_path / "r" / "results.json").read_text())["provenance"]
    assert p == results["provenance"]
    assert {"jacmatch", "torch", "python", "platform", "machine", "git_commit", "config_sha256",
            "data_sha256"} <= set(p)
    # bit-identical reruns hold per processor and thread count, so the record names both
    assert p["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert p["machine"]["threads"] == torch.get_num_threads() and p["machine"]["processor"]
    assert "gpu" not in p["machine"]  # it ran on the CPU
    assert len(p["config_sha256"]) == 64 and len(p["data_sha256"]) == 64
    assert p["git_commit"] is None or len(p["git_commit"].split("+")[0]) == 40
    check_one_data_set({"distill": {"provenance": {"data_sha256": "a" * 64}}})
    with pytest.raises(ValueError, match="mixes runs on 2 different data sets"):
        check_one_data_set({"distill": {"provenance": {"data_sha256": ["a" * 64, "b" * 64]}}})


def test_a_budget_check_flags_a_gain_as_not_converged_and_names_a_loss():
    """One-sided, as the growth rule is: a baseline worse at twice its budget was not held back by it."""
    from jacmatch.experiments.common import CONVERGED_GAIN
    from jacmatch.experiments.report_text import check_flag as _check_flag
    assert _check_flag(CONVERGED_GAIN - 0.01) == "" and _check_flag(-CONVERGED_GAIN + 0.01) == ""
    assert _check_flag(CONVERGED_GAIN) == " **not converged**" and _check_flag(3.0) == " **not converged**"
    assert _check_flag(-2.1) == " (lower when trained longer)"
    from jacmatch.report.claims import _transfer_view
    from jacmatch.report.claims import claim_label as _claim_label
    cells = {"CE+AT (2× epochs)|5": {"val_gain": -2.1}, "CE (scratch) (2× epochs)|5": {"val_gain": 0.2}, "CE|5": {}}
    assert _transfer_view({"cells": cells}) == " (at its baselines' convergence)"
    assert _claim_label("(d) x" + _transfer_view({"cells": cells})) == "(d), at its baselines' convergence"
    cells["CE (scratch) (2× epochs)|5"]["val_gain"] = CONVERGED_GAIN
    assert "a baseline still gains" in _transfer_view({"cells": cells}) and _transfer_view({"cells": {"CE|5": {}}}) == ""


def test_a_signed_difference_that_rounds_to_zero_has_no_sign():
    """A gain of -0.04 points is printed 0.0, not -0.0; a real loss or gain keeps its sign."""
    from jacmatch.experiments.report_text import evidence, signed
    assert [signed(x) for x in (-0.04, 0.04, 0.0, -0.0, -0.05001, 1.26)] == ["0.0", "0.0", "0.0", "0.0", "-0.1", "+1.3"]
    assert signed(-0.004, digits=2) == "0.00" and signed(-0.006, digits=2) == "-0.01"
    assert evidence([(5, -0.01, 2, 5), (10, 2.0, 5, 5)]) == "n=5: 0.0 (2/5), n=10: +2.0 (5/5)"


def test_report_regenerates_the_committed_report_byte_for_byte(tmp_path, monkeypatch):
    """REPORT.md, BENCHMARKS.md, the README's recipe table and the manual's findings are what `jacmatch report` makes
    of the committed JSONs: nothing in them was typed by hand or left stale."""
    import shutil

    from jacmatch.report import document as report
    shutil.copytree(ROOT / "results", tmp_path / "results")
    (tmp_path / "docs").mkdir()
    for name in ("README.md", "BENCHMARKS.md", "docs/experiments.md"):
        shutil.copyfile(ROOT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    report.main()
    for name in ("results/REPORT.md", "README.md", "BENCHMARKS.md", "docs/experiments.md"):
        assert (tmp_path / name).read_text() == (ROOT / name).read_text(), f"{name} is stale: run `jacmatch report`"


def test_a_selection_grows_its_grid_until_the_choice_is_inside():
    """An edge that wins extends the grid at its own spacing; the record says where it ended."""
    import dataclasses

    from jacmatch.paper import protocol as paper
    profile = dataclasses.replace(paper.QUICK, grids={"w": (1.0, 10.0, 100.0)}, selection_seeds=(0, 1))
    lay = paper.Layout(profile=profile)

    def train(peak):
        def run(value, tag, n, seed):
            return {"final": {"val": {"acc": -abs(math.log10(value) - math.log10(peak))}}, "train_seconds": 1.0}
        return run
    best, rec = paper.select_on_validation(lay, "w", train(1000.0))
    assert best == 1000.0 and rec["inside"] and rec["extended"] == [1000.0, 10000.0]
    assert rec["grid"] == [1.0, 10.0, 100.0, 1000.0, 10000.0] and rec["train_seconds"] == 10.0
    best, rec = paper.select_on_validation(lay, "w", train(1e-6))  # keeps winning at the low edge: 3 extensions, then stops
    assert best == 0.001 and not rec["inside"] and rec["extended"] == [0.1, 0.01, 0.001]
    best, rec = paper.select_on_validation(lay, "w", train(10.0))
    assert best == 10.0 and rec["inside"] and rec["extended"] == []



def test_a_converged_cell_grows_its_maximum_and_trains_again_only_the_seeds_that_bound(monkeypatch):
    """Seed 1's best point lies at the first maximum: the maximum doubles and only seed 1
    trains again (seed 0 stopped early inside; a larger maximum trains it identically, as
    test_training pins); the cell reports the grown maximum and seed 1's longer run."""
    import dataclasses

    from jacmatch.paper import converge, protocol as paper
    lay = paper.Layout(profile=dataclasses.replace(paper.QUICK, seeds=(0, 1), converge_steps=100, converge_growths=2))
    trained, kept = [], []

    def student(lay, tag, n, seed, objective, teacher, max_steps, patience, lr, data=None, keep=True, need_weights=False,
                section="converge"):
        assert keep  # every run keeps its weights as it finishes; the cell names its students' in the end
        (kept if need_weights else trained).append((seed, max_steps))
        settled = seed == 0 or max_steps == 200
        acc = 0.5 + 0.1 * seed + (0.05 if max_steps == 200 else 0.0)
        return {"best": {"inside": settled, "stopped_early": settled, "step": 60, "loop_seconds": 1.0, "val_acc": acc},
                "final": {"test": {"acc": acc}, "val": {"acc": acc}}, "train_seconds": 2.0, "student_parameters": 10,
                "history": [{"steps": 60, "epoch_seconds": 1.0, "val": {"acc": acc}}]}
    monkeypatch.setattr(converge, "converge_student", student)
    cell = converge.converged_cell(lay, "CE", 5, ({"alpha": 1.0}, 0.01, None), None, 2, 100, 0.25)
    assert trained == [(0, 100), (1, 100), (1, 200)]
    assert kept == [(0, 100), (1, 200)]  # each seed's tested run keeps its weights, not the one that bound
    # times are steps times the row's measured step cost: the machine's other load does not enter them
    assert cell["best_seconds"]["values"] == [15.0, 15.0] and cell["curves"][0] == [(60, 15.0, 0.5)]
    assert cell["max_steps"] == 200 and cell["grown_from"] == [100] and cell["inside"]
    assert cell["acc"]["values"] == [0.5, 0.65]


def test_a_run_with_a_larger_maximum_and_patience_continues_from_the_one_it_passes_through(tmp_path, teacher,
                                                                                            capsys):
    """converge's runs of one seed differ only in maximum and patience: a longer one continues
    from the longest finished one it passes through and ends where a run trained from the
    start ends; a run of another config, a larger patience, or one that ended off an
    evaluation epoch is not continued from."""
    from helpers import QUIET

    from jacmatch.experiments.common import passes_through, run_or_load, same_outcome
    from jacmatch.training import config_from_dict

    def values(name, patience, epochs, every=1, gamma=1.0):
        return {"out_dir": str(tmp_path / name), "teacher": teacher, "data": {"name": "synthetic", "samples_per_class": 6},
                "model": {"name": "small_cnn_4"}, "objective": {"beta": 1.0, "gamma": gamma},
                "optim": {"epochs": epochs, "batch_size": 8, "lr": 0.05, "schedule": "constant"},
                "eval": {"every": every, "keep_best": True, "patience": patience, "min_delta": 0.5}, **QUIET}
    short = run_or_load(values("p1", 1, 3))
    assert short["epochs"] == 2  # stopped early: nothing beats the first evaluation by 0.5
    run_or_load(values("p1_max1", 1, 1))  # finished, but shorter
    donors = sorted(tmp_path.iterdir())
    assert passes_through(config_from_dict(values("p3", 3, 6)), donors) == tmp_path / "p1"
    assert passes_through(config_from_dict(values("p3", 3, 6, gamma=2.0)), donors) is None  # another objective
    assert passes_through(config_from_dict(values("p0", 0, 2)), [tmp_path / "p1"]) is None  # a larger maximum
    assert passes_through(config_from_dict(values("p3", 3, 6, every=3)), donors) is None  # 2 epochs: off every=3
    capsys.readouterr()
    grown = run_or_load(values("p3", 3, 6), donors=donors)
    assert f"continues from {tmp_path / 'p1'} (epoch 2)" in capsys.readouterr().out
    straight = run_or_load(values("straight", 3, 6))
    assert grown["epochs"] == straight["epochs"] == 4 and same_outcome(straight, grown)
    assert grown["final"] == straight["final"]
    strip = lambda h: [{k: v for k, v in e.items() if "seconds" not in k and k != "config_changes"} for e in h]  # noqa: E731
    assert strip(grown["history"]) == strip(straight["history"])
    assert grown["history"][2]["config_changes"]["eval.patience"] == [1, 3]  # the resume is on the record


def test_a_run_keeps_its_weights_as_it_finishes_and_a_cut_part_does_not_train_them_again(tmp_path, teacher):
    """A converge run keeps its tested weights beside its record as soon as it finishes, so a
    part cut later in its cell leaves them committed, and the next machine (no run folder)
    trains nothing; an older record without weights stands until its cell names its weights
    (``need_weights``), and is trained again then."""
    from helpers import QUIET

    from jacmatch.experiments.common import run_or_load
    values = {"out_dir": str(tmp_path / "runs" / "CE_n6_s0"), "teacher": teacher,
              "data": {"name": "synthetic", "samples_per_class": 6}, "model": {"name": "small_cnn_4"},
              "objective": {"beta": 1.0}, "optim": {"epochs": 2, "batch_size": 8, "lr": 0.05}, **QUIET}
    record, weights, folder = tmp_path / "records" / "CE_n6_s0.json", tmp_path / "records" / "CE_n6_s0.pt", \
        tmp_path / "runs" / "CE_n6_s0"
    first = run_or_load(values, record=record, keep=weights, need_weights=False)
    assert record.is_file() and weights.is_file()  # kept when it finished, not when the cell names it
    shutil.rmtree(folder)  # the next part, on a fresh clone: records and weights only
    again = run_or_load(values, record=record, keep=weights, need_weights=True)
    assert not folder.exists() and again["final"] == first["final"]  # nothing trained
    weights.unlink()  # a record from before weights were kept as runs finished
    assert run_or_load(values, record=record, keep=weights, need_weights=False)["final"] == first["final"]
    assert not folder.exists() and not weights.exists()  # it stands alone while its cell grows
    run_or_load(values, record=record, keep=weights, need_weights=True)  # the cell names it: trained for them
    assert folder.is_dir() and weights.is_file()


def test_a_complete_section_removes_the_kept_weights_that_no_cell_names(tmp_path):
    from jacmatch.paper import protocol as paper
    from jacmatch.paper.converge import unnamed_weights
    lay = paper.Layout(root=tmp_path, profile=paper.QUICK)
    (lay.records / "converge").mkdir(parents=True)
    for name in ("CE_n5_s0_max100_p2", "CE_n5_s0_max200_p2", "CE_n5_s0_max200_p4"):  # grown, named, a check's
        (lay.records / "converge" / f"{name}.pt").write_bytes(b"w")
        (lay.records / "converge" / f"{name}.json").write_text("{}")
    cells = {"CE|5": {"weights": ["runs/converge/CE_n5_s0_max200_p2.pt"]}, "CE (2× patience)|5": {}}
    gone = unnamed_weights(lay, cells)
    assert [p.name for p in gone] == ["CE_n5_s0_max100_p2.pt", "CE_n5_s0_max200_p4.pt"]
    assert sorted(p.name for p in (lay.records / "converge").iterdir()) == [
        "CE_n5_s0_max100_p2.json", "CE_n5_s0_max200_p2.json", "CE_n5_s0_max200_p2.pt", "CE_n5_s0_max200_p4.json"]


def test_the_carried_folder_holds_the_longest_finished_run_of_each_seed_of_the_cell_in_progress(tmp_path):
    from jacmatch.paper import protocol as paper
    from jacmatch.paper.converge import CARRIED, carry
    lay = paper.Layout(root=tmp_path, profile=paper.QUICK)

    def run(name, epochs, finished=True):
        folder = lay.runs / "converge" / name
        folder.mkdir(parents=True)
        (folder / "last.pt").write_text(name)
        if finished:
            (folder / "results.json").write_text(json.dumps({"epochs": epochs}))
        return folder

    def carried(n=5):
        return sorted(p.name for p in (lay.out / CARRIED / f"n{n}").iterdir())
    for folder in (run("FM_JM_n5_s0_max12_p2", 4), run("FM_JM_n5_s1_max12_p2", 6), run("FM_JM_n5_s0_max24_p2", 9),
                   run("FM_JM_n5_s0_max24_p4", 7), run("FM_JM_n5_s1_max24_p2", 2, finished=False)):
        carry(lay, folder, lay.out / CARRIED / "n5")
    assert carried() == ["FM_JM_n5_s0_max24_p2", "FM_JM_n5_s1_max12_p2"]  # each seed's longest finished run
    assert (lay.out / CARRIED / "n5" / "FM_JM_n5_s0_max24_p2" / "last.pt").read_text() == "FM_JM_n5_s0_max24_p2"
    carry(lay, run("FM_n5_s0_max12_p2", 3), lay.out / CARRIED / "n5")  # another row: the cell before it is done
    assert carried() == ["FM_n5_s0_max12_p2"]
    carry(lay, run("FM_n10_s0_max12_p2", 3), lay.out / CARRIED / "n10")  # another n: a part of its own, beside
    assert carried(10) == ["FM_n10_s0_max12_p2"] and carried(5) == ["FM_n5_s0_max12_p2"]


def test_a_baseline_whose_budget_check_gains_trains_with_twice_the_patience(monkeypatch):
    """FM gains 3 points of validation accuracy at twice its patience, then 0.2 more at four
    times: its check's students become its own (their weights kept, no others), and the check
    shown is the last, at four times; CE's first check gains 0.2: nothing grows."""
    import dataclasses

    from jacmatch.paper import converge, protocol as paper
    lay = paper.Layout(profile=dataclasses.replace(paper.QUICK, seeds=(0,), converge_steps=100, converge_patience=2,
                                                   converge_patience_growths=2))
    acc = {"FM": {2: .80, 4: .83, 8: .832}, "CE": {2: .70, 4: .702}}
    trained, kept, order = [], [], []

    def student(lay, tag, n, seed, objective, teacher, max_steps, patience, lr, data=None, keep=True, need_weights=False,
                section="converge"):
        (kept if need_weights else trained).append((tag, max_steps, patience))
        order.append((tag, max_steps, patience, need_weights))
        a = acc[tag][patience]
        return {"best": {"inside": True, "stopped_early": True, "step": 60, "loop_seconds": 1.0, "val_acc": a},
                "final": {"test": {"acc": a}, "val": {"acc": a}}, "train_seconds": 2.0, "student_parameters": 10,
                "history": [{"steps": 60, "epoch_seconds": 1.0, "val": {"acc": a}}]}
    monkeypatch.setattr(converge, "converge_student", student)
    cell, check = converge.patient_cell(lay, "FM", 5, ({"alpha": 0.0}, 0.01, None), None, 0.25)
    assert cell["patience"] == 4 and cell["max_steps"] == 200 and cell["acc"]["values"] == [.83]
    assert cell["patience_grown_from"] == [{"patience": 2, "val_gain": pytest.approx(3.0)}]
    assert check["row"] == "FM (2× patience)" and check["patience"] == 8 and check["max_steps"] == 400
    assert check["val_gain"] == pytest.approx(0.2) and "weights" not in check
    assert kept == [("FM", 200, 4), ("FM", 200, 4)] and cell["weights"] == ["runs/converge/FM_n5_s0_max200_p4.pt"]
    # the grown cell's runs (with their weights) come before the new check, which continues from them
    assert order.index(("FM", 200, 4, True)) < order.index(("FM", 400, 8, False))
    kept.clear()
    cell, check = converge.patient_cell(lay, "CE", 5, ({"alpha": 1.0}, 0.01, None), None, 0.25)
    assert cell["patience"] == 2 and cell["patience_grown_from"] == [] and check["patience"] == 4
    assert kept == [("CE", 100, 2)]
    # at most converge_patience_growths times: the last check's gain is shown, however large
    lay = paper.Layout(profile=dataclasses.replace(lay.profile, converge_patience_growths=0))
    cell, check = converge.patient_cell(lay, "FM", 5, ({"alpha": 0.0}, 0.01, None), None, 0.25)
    assert cell["patience"] == 2 and check["val_gain"] == pytest.approx(3.0)
    # a row's own cap (converge_patience_growths_of) over the common one: FM grows, CE keeps the common cap
    lay = paper.Layout(profile=dataclasses.replace(lay.profile, converge_patience_growths_of={"FM": 1}))
    cell, check = converge.patient_cell(lay, "FM", 5, ({"alpha": 0.0}, 0.01, None), None, 0.25)
    assert cell["patience"] == 4 and check["patience"] == 8
    acc["CE"] = {2: .70, 4: .75}
    cell, check = converge.patient_cell(lay, "CE", 5, ({"alpha": 1.0}, 0.01, None), None, 0.25)
    assert cell["patience"] == 2 and check["val_gain"] == pytest.approx(5.0)
    acc["CE"] = {2: .70, 4: .702}
    # ... only at the n the profile names for it: elsewhere FM keeps the common cap
    few = paper.Layout(profile=dataclasses.replace(lay.profile, converge_patience_growths_samples=(1,)))
    cell, check = converge.patient_cell(few, "FM", 5, ({"alpha": 0.0}, 0.01, None), None, 0.25)
    assert cell["patience"] == 2 and check["val_gain"] == pytest.approx(3.0)
    cell, check = converge.patient_cell(few, "FM", 1, ({"alpha": 0.0}, 0.01, None), None, 0.25)
    assert cell["patience"] == 4 and check["patience"] == 8
    # a record trained again for its weights reads 0.1 point lower: the check's gain is over it
    kept_acc = {("CE", 2): .699}
    lay = paper.Layout(profile=dataclasses.replace(lay.profile, converge_patience_growths=2))

    def student_again(lay, tag, n, seed, objective, teacher, max_steps, patience, lr, data=None, keep=True,
                      need_weights=False, section="converge"):
        run = student(lay, tag, n, seed, objective, teacher, max_steps, patience, lr, data, keep, need_weights)
        a = kept_acc.get((tag, patience)) if need_weights else None
        return {**run, "final": {"test": {"acc": a}, "val": {"acc": a}}, "best": {**run["best"], "val_acc": a}} if a else run
    monkeypatch.setattr(converge, "converge_student", student_again)
    cell, check = converge.patient_cell(lay, "CE", 5, ({"alpha": 1.0}, 0.01, None), None, 0.25)
    assert cell["val_acc"]["values"] == [.699] and check["val_gain"] == pytest.approx(0.3)
    # FM's grown cell trained again for its weights reads 0.4 point higher than the record that
    # grew it: the next check's gain (0.3) is over the runs it continues from, not the record (0.7)
    acc["FM"], kept_acc[("FM", 4)] = {2: .80, 4: .826, 8: .833, 16: .84}, .830
    lay = paper.Layout(profile=dataclasses.replace(lay.profile, converge_patience_growths_of={"FM": 2}))
    cell, check = converge.patient_cell(lay, "FM", 5, ({"alpha": 0.0}, 0.01, None), None, 0.25)
    assert cell["patience"] == 4 and cell["val_acc"]["values"] == [.830] and check["val_gain"] == pytest.approx(0.3)


def test_the_converged_findings_name_the_grown_patience_and_a_baseline_still_gaining():
    """The findings give each check's gain with the patience it doubled where that grew, and
    name a baseline that still gains at the largest patience the rule allows."""
    from jacmatch.report.distill import _converge_findings

    def cell(row, patience, val_gain=None):
        acc = {"mean": .5, "std": 0, "ci95": 0, "n": 1, "values": [.5]}
        return {"row": row, "samples_per_class": 1, "patience": patience, "inside": True, "acc": acc,
                **({} if val_gain is None else {"val_gain": val_gain})}
    c = {"rule": {"patience": 10, "patience_growths": 2}, "checked_rows": ["CE", "FM"],
         "cells": {"CE|1": cell("CE", 10), "CE (2× patience)|1": cell("CE (2× patience)", 20, 0.1),
                   "FM|1": cell("FM", 40), "FM (2× patience)|1": cell("FM (2× patience)", 80, 1.6),
                   "CE+KD|1": cell("CE+KD", 10), "CE+KD+JM|1": cell("CE+KD+JM", 10)}}
    text = _converge_findings(c)[0]
    assert "CE n=1: +0.1, FM n=1 (from patience 40): +1.6 points" in text
    assert text.endswith("**not converged at the largest patience the rule allows: FM n=1**.")
    c["cells"]["FM (2× patience)|1"]["val_gain"] = 0.4
    assert "not converged" not in _converge_findings(c)[0]
    c["cells"]["FM (2× patience)|1"]["val_gain"] = 0.48  # shown as +0.5, it would read as not converged
    assert "FM n=1 (from patience 40): +0.48 points" in _converge_findings(c)[0]


def test_the_report_states_a_row_s_own_patience_cap_and_the_n_it_applies_at():
    from jacmatch.report.distill import _patience_grown
    grown = {"row": "FM", "samples_per_class": 1, "patience": 20, "patience_grown_from": [{"patience": 10, "val_gain": 0.9}]}
    c = {"rule": {"patience": 10, "patience_growths": 2, "patience_growths_of": {"FM": 4}}, "checked_rows": ["FM"],
         "samples": [1, 500], "cells": {"FM|1": grown, "FM|500": {**grown, "patience_grown_from": []}}}
    text = _patience_grown(c)[1]
    assert "(at most 2 times, FM at most 4)" in text and "Grown: FM at n=1: patience 20 (+0.9 at patience 10)." in text
    c["rule"]["patience_growths_samples"] = [1, 5, 10, 50]
    assert "(at most 2 times, FM at most 4 at n = 1, 5, 10, 50)" in _patience_grown(c)[1]


def test_a_resumed_section_keeps_the_fastest_step_cost_of_its_invocations():
    """Load on the machine only slows a step: per row and n the smaller measurement is kept,
    and counted; another layout's costs are not mixed in."""
    from jacmatch.paper.converge import kept_costs
    now = {"CE": {"1": 0.004, "5": 0.010}, "FM": {"1": 0.013, "5": 0.020}}
    before = {"step_seconds": {"CE": {"1": 0.005, "5": 0.009}, "FM": {"1": 0.011, "5": 0.030}},
              "step_cost_measurements": 2}
    assert kept_costs(now, before) == ({"CE": {"1": 0.004, "5": 0.009}, "FM": {"1": 0.011, "5": 0.020}}, 3)
    assert kept_costs(now, {"step_seconds": {"CE": {"1": 0.001}}}) == (now, 1)  # other rows or n
    assert kept_costs(now, None) == (now, 1)  # no previous run, or one of other recipes


def test_a_committed_teacher_is_re_evaluated_and_gains_provenance(tmp_path):
    """A teacher.json from before provenance: `experiment teacher` re-evaluates the committed
    checkpoint, says whether every accuracy came out the same, and adds the provenance keys."""
    import dataclasses
    import shutil

    from jacmatch.paper import protocol as paper
    quick = paper.Layout(root=tmp_path, profile=paper.QUICK)
    record = paper.teacher_section(quick)  # a quick teacher, trained here
    lay = paper.Layout(root=tmp_path, profile=dataclasses.replace(paper.QUICK, committed_teacher=True))
    lay.teacher.parent.mkdir(parents=True)
    shutil.copyfile(quick.teacher, lay.teacher)
    old = {k: v for k, v in json.loads((lay.out / "teacher.json").read_text()).items()
           if k not in ("provenance", "record_sha256")}  # a record from before provenance (and checksums)
    for test_acc, reproduced in ((record["test"]["acc"], True), (0.5, False)):
        (lay.out / "teacher.json").write_text(json.dumps({**old, "test": {**old["test"], "acc": test_acc}}))
        checked = paper.teacher_section(lay)
        assert checked["check"]["reproduced"] is reproduced and checked["test"]["acc"] == test_acc
        written = json.loads((lay.out / "teacher.json").read_text())
        assert len(written["provenance"]["data_sha256"]) == 64 and len(written["check"]["checkpoint_sha256"]) == 64
        assert paper.teacher_section(lay) == written  # checked once: read back as it is


def test_the_step_budget_rule_and_its_cap():
    """A student's budget: the chosen steps (capped), at least 40 passes, at most 1600 steps;
    at the n where the budget is checked, the budget chosen there on validation; the report
    says when the cap bound, and where the budget was chosen at the check."""
    from jacmatch.paper import protocol as paper
    from jacmatch.report import distill as report
    values, full = paper.run_config("distill"), paper.FULL
    assert [paper._budget(full, n, values, 800) for n in full.samples] == [400, 400, 400, 400, 400, 1600]
    assert [paper._budget(full, n, values, 200) for n in full.samples] == [200, 200, 200, 200, 320, 1600]
    assert [paper._budget(full, n, values, 800, 6400) for n in full.samples] == [400, 400, 400, 400, 400, 6400]
    assert full.grids["check_steps"][0] == paper._budget(full, full.budget_check_samples, values, 0)  # the rule's
    d = {"budgets": {"10": 400, "500": 1600}, "budget_rule": {"max_chosen_steps": 400},
         "selection": {"steps": {"chosen": 800}}, "budget_check_samples": 500}
    assert "validation chose 800 steps, capped at 400**: at n=10 the budget" in report._step_cap(d)
    assert report._step_cap({**d, "selection": {"steps": {"chosen": 400}}}) == ""
    assert report._budget_at_check(d) == ""
    assert "at n=500, where the budget is checked, its own budget is chosen on validation" in report._budget_at_check(
        {**d, "selection": {"check_steps": {"chosen": 3200}}})


def test_noisy_kd_at_jm_cost_gets_its_own_row_when_it_needs_more_than_one_draw():
    import dataclasses

    from jacmatch.paper import protocol as paper
    assert list(paper._noisy_rows(paper.FULL)) == ["noisy KD M=1"]
    rows = paper._noisy_rows(dataclasses.replace(paper.FULL, noise_draws_equal=3))
    assert list(rows) == ["noisy KD M=1", "noisy KD M=3"]
    filled = {r: paper.fill_placeholders(o, {"σ": 0.1, "M": 3}) for r, o in rows.items()}
    assert filled["noisy KD M=1"]["noise_draws"] == 1 and filled["noisy KD M=3"]["noise_draws"] == 3
    assert filled["noisy KD M=3"]["noise_sigma"] == 0.1


def test_a_findings_label_names_the_claims_view_and_part():
    from jacmatch.report.claims import claim_label as _claim_label
    assert _claim_label("(b) Jacobian matching improves distillation (at convergence)") == "(b), at convergence"
    assert _claim_label("(b) … most with few samples (at convergence)") == "(b) … most with few samples, at convergence"
    assert _claim_label("(d) attention transfer plus Jacobians helps transfer") == "(d)"


def test_every_committed_section_round_trips_through_its_typed_record():
    """Section.from_json(name, d).to_json() is d, key order included; cells are found by row
    and by where they were measured, and their summaries are typed."""
    from jacmatch.experiments import rows as R
    from jacmatch.experiments.records import Section, Summary
    for name in ("teacher", "distill", "converge", "fidelity", "robustness", "transfer", "verify"):
        d = json.loads((ROOT / "results" / "paper" / f"{name}.json").read_text())
        if isinstance(d, dict):
            assert json.dumps(Section.from_json(name, d).to_json()) == json.dumps(d), name
    converge = Section.from_json("converge", json.loads((ROOT / "results" / "paper" / "converge.json").read_text()))
    first = min(converge.at())  # the smallest n, which a partial run has first
    cell = converge.cell(R.CE_KD_JM, first)
    assert isinstance(cell.acc, Summary) and cell.acc.n == len(cell.acc.values) == 5
    assert cell.noisy_acc("0.3").mean < cell.acc.mean and converge.cell(R.twice_patience(R.CE), first) is not None
    robustness = Section.from_json("robustness", json.loads((ROOT / "results" / "paper" / "robustness.json").read_text()))
    assert robustness.cell(R.CE, "full") is not None and R.DOUBLED_EPOCHS in robustness.rows()


def test_a_converge_part_trains_its_n_only_and_writes_no_section_file(tmp_path, monkeypatch):
    """`jacmatch experiment converge --samples N`: the cells at those n only (a part beside
    parts at other n), no converge.json (the section without --samples writes it from the
    records); an n the section does not train, or --samples on another section, is refused."""
    from jacmatch.errors import UsageError
    from jacmatch.paper import converge, protocol as paper, sections
    lay = paper.Layout(root=tmp_path, profile=paper.QUICK)
    lay.out.mkdir(parents=True)
    (lay.out / "distill.json").write_text(json.dumps({"selection": {k: {"chosen": 1.0}
                                                                    for k in ("lr", "tau", "gamma", "gamma_ce")}}))
    lay.teacher.parent.mkdir(parents=True, exist_ok=True)
    lay.teacher.write_text("")
    trained = []

    def cell(lay, row, n, *args, **kwargs):
        trained.append((row, n))
        return {"row": row, "samples_per_class": n, "patience": 2, "acc": {"mean": 0.5, "std": 0.0},
                "val_acc": {"mean": 0.5}, "curves": [], "train_seconds": 1.0}
    monkeypatch.setattr(converge, "fm_selection", lambda lay, teacher, chosen: ({"mixup": 1.0, "fm_tau": 1.0,
                                                                                  "fm_lr": 1.0}, {}))
    monkeypatch.setattr(converge, "step_costs", lambda lay, recipes, teacher, samples=None:
                        {row: {str(n): 0.01 for n in samples} for row in recipes})
    monkeypatch.setattr(converge, "patient_cell", lambda lay, row, n, *a: (cell(lay, row, n), {**cell(lay, row, n),
                                                                                              "row": f"{row} (2×)"}))
    monkeypatch.setattr(converge, "converged_cell", cell)
    converge.converge_section(lay, samples=[5])
    assert trained and {n for _, n in trained} == {5}
    assert not (lay.out / "converge.json").exists()
    with pytest.raises(UsageError, match="--samples 7: the section trains at n = 1, 5"):
        converge.converge_section(lay, samples=[7])
    with pytest.raises(UsageError, match="--samples splits the converge section"):
        sections.main("fidelity", quick=True, out=str(tmp_path), samples=[5])
