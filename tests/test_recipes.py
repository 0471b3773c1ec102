"""Recipes: the report's rows as complete run configs, auto's choice, the step maximum and
the time budget; on digits, the default command trains a few-sample student to its own end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from jacmatch.cli import main
from jacmatch.paper.converge import CONVERGE_ROWS, RECIPE_OF, _recipes
from jacmatch.training import config_from_dict, recipe, train
from jacmatch.training.config import config_to_dict, merge_values
from jacmatch.training.recipes import FEW_SAMPLES, RECIPES, SCHEDULE, choose, recipe_values, resolve_recipe, rule
from jacmatch.training.schedule import planned_epochs, steps_per_epoch

from helpers import QUIET

ROOT = Path(__file__).resolve().parents[1]
CONVERGE = json.loads((ROOT / "results" / "paper" / "converge.json").read_text())
RECIPES_SOURCE = (ROOT / "jacmatch" / "training" / "recipes.py").read_text()
RECORDS = ROOT / "results" / "paper" / "runs" / "converge"
#: What a run sets for itself, not its recipe: where and on what it runs, and what its evaluation
#: measures besides validation accuracy; the maximum is compared in steps.
OWN = {"out_dir", "seed", "device", "teacher", "data.name", "data.samples_per_class", "model.name",
       "eval.noise_sigmas", "eval.cosine_samples", "checkpoint_every", "channels_last", "progress", "tensorboard",
       "optim.epochs", "optim.max_steps", "eval.patience", "recipe", "recipe_reason"}


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in values.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v and k != "options" else {prefix + k: v})
    return out


def _same_settings(name: str, paths: list, ignored: set) -> None:
    """Every setting of recipe ``name`` is the run's in each record of ``paths`` (but where and on
    what it ran, and ``ignored``); the record's maximum and patience lie inside the recipe's (a
    row's cells grow them where its budget check asks, the recipe takes the largest)."""
    ours = recipe(name)
    mine = _flat(config_to_dict(ours))
    for path in paths:
        record = json.loads(path.read_text())
        cfg = config_from_dict(record["config"])
        theirs = _flat(config_to_dict(cfg))
        differ = {k: (mine[k], theirs[k]) for k in mine if k not in OWN | ignored and mine[k] != theirs[k]}
        assert differ == {}, (path.name, differ)
        steps = planned_epochs(cfg.optim, record["num_train"]) * steps_per_epoch(record["num_train"], cfg.optim)
        assert steps <= ours.optim.max_steps, path.name
        assert 0 < cfg.eval.patience <= ours.eval.patience, path.name


def _named(section: dict, row: str) -> list[Path]:
    """The run records beside the weights a result file's cells of ``row`` name (every n, every seed)."""
    return [(RECORDS.parents[1] / w).with_suffix(".json")
            for k, c in section["cells"].items() if k.split("|")[0] == row for w in c["weights"]]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_recipe_is_the_config_of_the_report_row_field_by_field(name):
    """recipe("fm+jm") and the report's FM+JM students (every n, every seed): every setting the
    same but where and on what each ran; the record's maximum and patience lie inside the
    recipe's. A recipe with the Jacobian term's schedule is §2e's scheduled row (FM+JM (every k),
    n = 1, 10, 100, every seed) field by field, and §2b's full row in everything but the schedule."""
    row, schedule = RECIPES[name].row, RECIPES[name].schedule
    named = _named(CONVERGE, row)
    assert len(named) == 30 and all(p.is_file() for p in named), named
    _same_settings(name, named, {f"objective.{k}" for k in schedule})
    if schedule:
        schedules = json.loads((ROOT / "results" / "paper" / "schedules.json").read_text())
        scheduled = _named(schedules, f"{row} (every k)")
        assert len(scheduled) == 15 and all(p.is_file() for p in scheduled), scheduled
        _same_settings(name, scheduled, set())
        for key, cell in schedules["cells"].items():  # each scheduled cell trained as its full row at its n
            scheduled_row, n = key.split("|")
            if scheduled_row == f"{row} (every k)":
                full = CONVERGE["cells"][f"{row}|{n}"]
                assert cell["patience"] == full["patience"], key


def test_each_recipe_holds_the_values_the_converged_section_chose_and_its_numbers():
    chosen, fm = CONVERGE["chosen"], CONVERGE["fm"]["chosen"]
    for name, r in RECIPES.items():
        o, lr = r.values["objective"], r.values["optim"]["lr"]
        tau, want_lr = (fm["fm_tau"], fm["fm_lr"]) if name.startswith("fm") else (chosen["tau"], chosen["lr"])
        assert (o["temperature"], lr) == (tau, want_lr), name
        if o.get("gamma"):
            assert o["gamma"] == chosen["gamma"], name
        if r.values["data"]["augment"]:
            assert r.values["data"]["mixup"] == fm["mixup"]
        cells = [CONVERGE["cells"][f"{r.row}|{n}"] for n in CONVERGE["samples"]]
        assert r.values["eval"]["patience"] == max(c["patience"] for c in cells), name
        assert r.values["optim"]["max_steps"] == max(c["max_steps"] for c in cells), name
        assert r.evidence == {c["samples_per_class"]: (round(100 * c["acc"]["mean"], 1), round(100 * c["acc"]["ci95"], 1))
                              for c in cells}, name


def test_a_recipe_takes_a_schedule_only_where_its_scheduled_row_held_at_every_n():
    """Report §2e: a recipe takes the Jacobian term's schedule when its row's scheduled twin lies
    within the full row's 95 % interval at every n measured, with those numbers; else none."""
    from jacmatch.experiments import rows as R
    from jacmatch.experiments.common import read_json
    s = read_json(ROOT / "results" / "paper" / "schedules.json")
    for name, r in RECIPES.items():
        twin = {R.FM_JM: R.FM_JM_SCHEDULED, R.CE_KD_JM: R.CE_KD_JM_SCHEDULED}.get(r.row)
        measured = {int(R.split_key(k)[1]): c for k, c in s["comparisons"].items() if R.split_key(k)[0] == twin}
        held = s["complete"] and set(measured) == set(s["samples"]) and all(c["within_full_interval"]
                                                                             for c in measured.values())
        assert bool(r.schedule) == bool(held) == s["verdict"].get(twin, False), name  # where it held, and only there
        if r.schedule:
            assert r.schedule == {"jacobian_every": s["every"]} == {"jacobian_every": r.values["objective"]["jacobian_every"]}
            assert set(measured) == set(s["samples"]) and all(c["within_full_interval"] for c in measured.values()), name
            assert r.schedule_evidence == {n: (round(100 * c["acc"]["mean"], 1), round(100 * c["acc"]["ci95"], 1))
                                           for n, c in measured.items()}, name
        else:
            assert "jacobian_every" not in r.values["objective"] and not r.schedule_evidence, name
    # the step times the README and the recipes' comment give for the schedules, from the same file
    readme = (ROOT / "README.md").read_text().replace("\n", " ")
    for scheduled, full in ((R.CE_KD_JM_SCHEDULED, R.CE_KD_JM), (R.FM_JM_SCHEDULED, R.FM_JM)):
        ratios = [c["step_seconds"][scheduled] / c["step_seconds"][full] for k, c in s["comparisons"].items()
                  if R.split_key(k)[0] == scheduled]
        said = f"{min(ratios):.2f}–{max(ratios):.2f}"
        assert said in readme and said.replace("–", "-") in RECIPES_SOURCE, said


def test_the_converged_rows_are_built_from_the_recipes():
    rows = _recipes(CONVERGE["chosen"], CONVERGE["fm"]["chosen"])
    for row in CONVERGE_ROWS:
        for n in CONVERGE["samples"]:
            cell = CONVERGE["cells"][f"{row}|{n}"]
            assert rows[row] == (cell["objective"], cell["lr"], cell.get("data")), (row, n)
    assert set(RECIPE_OF.values()) == set(RECIPES)


def test_auto_follows_the_evidence():
    """At each n of the report, auto's recipe lies within the 95 % interval of the best row there."""
    for n in CONVERGE["samples"]:
        best = max(RECIPES.values(), key=lambda r: r.evidence[n][0])
        name, reason = choose(n)
        assert RECIPES[name].evidence[n][0] >= best.evidence[n][0] - best.evidence[n][1], (n, name, best.name)
        assert f"n = {n} samples per class" in reason
    # what the reason says: "FM+JM is the best student up to n = 10 and ties the best at n = FEW_SAMPLES"
    fm_jm = RECIPES["fm+jm"].evidence
    assert "best student up to n = 10 and ties the best at n = 50" in choose(1)[1] and FEW_SAMPLES == 50
    assert all(fm_jm[n][0] == max(r.evidence[n][0] for r in RECIPES.values()) for n in (1, 5, 10))
    assert fm_jm[50][0] != max(r.evidence[50][0] for r in RECIPES.values())  # a tie, not the best: the text says so
    assert choose(FEW_SAMPLES)[0] == "fm+jm" and choose(FEW_SAMPLES + 0.5)[0] == "paper"
    costs = CONVERGE["step_seconds"]  # "at a third of FM+JM's step time", where paper takes over
    assert "a third of FM+JM's step time" in rule()
    assert all(0.25 <= costs["CE+KD+JM"][n] / costs["FM+JM"][n] <= 0.4 for n in ("100", "500"))


def test_auto_reads_the_training_set_and_records_its_choice(tmp_path):
    cfg = resolve_recipe(None, [("data.name", "digits"), ("teacher", "t.pt")])
    assert cfg.recipe == "paper" and "n = 129.3 samples per class > 50" in cfg.recipe_reason  # 1293 / 10 (val split off)
    cfg = resolve_recipe(None, [("data.samples_per_class", 3), ("teacher", "t.pt")])
    assert (cfg.recipe, cfg.data.mixup, cfg.eval.keep_best) == ("fm+jm", 1.0, True)
    path = tmp_path / "best.yaml"
    path.write_text("recipe: kd\noptim: {lr: 0.002}\n")
    cfg = resolve_recipe(str(path), [("teacher", "t.pt")])
    assert (cfg.recipe, cfg.optim.lr, cfg.objective.gamma, cfg.recipe_reason) == ("kd", 0.002, 0.0, None)
    cfg = resolve_recipe(str(path), [("teacher", "t.pt")], "none")
    assert (cfg.recipe, cfg.optim.name, cfg.optim.lr) == (None, "sgd", 0.002)


def test_an_unknown_recipe_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--recipe", "best", "--teacher", "t.pt"])
    assert exc.value.code == 2 and "invalid choice: 'best'" in capsys.readouterr().err


def test_config_lists_the_recipes_with_their_numbers(capsys):
    assert main(["config", "--recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [*RECIPES, "auto", "none"]
    assert "n=1: 69.6 ± 3.6" in lines[3] and "patience 80" in lines[3]


def _history(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]


def _digits(tmp_path, **over) -> dict:
    values = {"data": {"name": "digits", "samples_per_class": 5}, "model": {"name": "small_cnn_4"},
              "objective": {"beta": 0.0, "gamma": 0.0}, "eval": {"noise_sigmas": [], "fidelity": False,
                                                                  "jacobian_cosine": False},
              "out_dir": str(tmp_path / "r"), **QUIET}
    for k, v in over.items():
        values[k] = {**values.get(k, {}), **v} if isinstance(v, dict) else v
    return values


def test_max_steps_ends_a_run_in_whole_epochs(tmp_path):
    """50 samples, batch 64, 20 steps an epoch: at most 45 steps is 2 epochs."""
    cfg = config_from_dict(_digits(tmp_path, optim={"epochs": 50, "max_steps": 45, "min_steps_per_epoch": 20}))
    assert planned_epochs(cfg.optim, 50) == 2
    results = train(cfg)
    assert results["epochs"] == 2 and sum(h["steps"] for h in _history(tmp_path)) == 40


def test_an_early_stopped_run_at_its_maximum_says_so(tmp_path):
    cfg = config_from_dict(_digits(tmp_path, optim={"epochs": 2}, eval={"keep_best": True, "patience": 5}))
    with pytest.warns(UserWarning, match=r"ended at its maximum \(2 epochs, \d+ steps\) while validation accuracy was "
                                         "still improving"):
        results = train(cfg)
    assert results["best"]["stopped_early"] is False


def test_the_time_budget_stops_a_run_and_tests_its_best_weights(tmp_path, capsys):
    cfg = config_from_dict(_digits(tmp_path, optim={"epochs": 50}, eval={"keep_best": True, "patience": 0},
                                   time_budget=1e-6))
    results = train(cfg)
    assert results["epochs"] == 1 and _history(tmp_path)[-1]["time_budget"] is True
    assert results["best"]["stopped_by"] == "time_budget" and results["final"]["test"]["acc"] > 0
    assert "stopped at the time budget" in capsys.readouterr().out
    again = train(config_from_dict({**config_to_dict(cfg)}), resume=True)  # the same budget: nothing more
    assert again["epochs"] == 1
    more = config_from_dict({**config_to_dict(cfg), "time_budget": 10.0, "optim": {**config_to_dict(cfg)["optim"],
                                                                                    "epochs": 2}})
    assert train(more, resume=True)["epochs"] == 2


def test_a_resume_may_raise_max_steps_but_not_lower_it(tmp_path):
    cfg = config_from_dict(_digits(tmp_path, optim={"epochs": 50, "max_steps": 20, "min_steps_per_epoch": 20}))
    assert train(cfg)["epochs"] == 1
    raised = config_to_dict(cfg)
    raised["optim"]["max_steps"] = 40
    assert train(config_from_dict(raised), resume=True)["epochs"] == 2
    raised["optim"]["max_steps"] = 10
    with pytest.raises(Exception, match="optim.max_steps: 40 -> 10"):
        train(config_from_dict(raised), resume=True)


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    """A small_cnn_8 teacher of digits, 30 epochs (97.5 % test)."""
    out = tmp_path_factory.mktemp("teacher") / "t"
    assert main(["train-teacher", "--dataset", "digits", "--model", "small_cnn_8", "--out", str(out),
                 "--set", "optim.epochs=30", "--set", "progress=false"]) == 0
    return str(out / "last.pt")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])  # (one test per seed: the workers of `make test` share them out)
def test_the_default_trains_a_few_sample_student_to_its_own_end(tmp_path, digits_teacher, capsys, seed):
    """The issue's example: nothing but --samples-per-class 5 (today's default: 10 steps, 18 %)."""
    out = tmp_path / f"s{seed}"
    assert main(["distill", "--teacher", digits_teacher, "--dataset", "digits", "--model", "small_cnn_4",
                 "--samples-per-class", "5", "--seed", str(seed), "--out", str(out), "--set", "progress=false"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["recipe"]["name"] == "fm+jm" and "auto: n = 5" in results["recipe"]["reason"]
    assert "recipe: fm+jm" in (out / "config.yaml").read_text()
    assert results["best"]["stopped_early"], results["best"]
    assert results["final"]["test"]["acc"] >= 0.88, (seed, results["final"]["test"]["acc"])
    assert "recipe: fm+jm (auto: n = 5 samples per class <= 50" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPES))
@pytest.mark.parametrize("n", [1, 5])
def test_no_recipe_kills_a_student(tmp_path, digits_teacher, n, name):
    """Each recipe on digits, trained to its own end: finite losses, and a student well above
    chance (10 %) and above what CE on the same few samples reaches early (the floors)."""
    floor = {1: 0.35, 5: 0.6}[n]
    out = tmp_path / name
    assert main(["distill", "--recipe", name, "--teacher", digits_teacher, "--dataset", "digits", "--model",
                 "small_cnn_4", "--samples-per-class", str(n), "--out", str(out), "--set", "progress=false",
                 "--set", "eval.noise_sigmas=[]", "--set", "eval.fidelity=false"]) == 0
    results = json.loads((out / "results.json").read_text())
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [v for h in history for v in h["train"].values()]
    assert all(math.isfinite(v) for v in losses), name
    assert results["final"]["test"]["acc"] >= floor, (name, n, results["final"]["test"]["acc"])


def test_the_readme_answers_which_recipe_from_the_result_file():
    from jacmatch.report.document import recipe_table
    table = recipe_table(CONVERGE)
    assert "| 1 | `fm+jm` | 69.6 ± 3.6 |" in table and "| 500 | `paper` | 88.9 ± 0.6 |" in table
    assert table in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("name", ["cifar/wrn_40_2_wrn_16_2", "cifar/resnet32x4_resnet8x4", "cifar/few_sample_cifar100",
                                  "transfer/scenes_resnet34_resnet18"])
def test_a_shipped_protocol_is_trained_as_written_not_under_auto(name):
    """A shipped student config is a complete protocol (recipe: none): auto would cap the
    240-epoch CIFAR schedule at 6,400 steps and early-stop it."""
    from jacmatch.training.config import load_config
    cfg = resolve_recipe(name, [("teacher", "t.pt")])
    written = load_config(name)
    assert (cfg.recipe, cfg.recipe_reason, cfg.optim.max_steps, cfg.eval.keep_best) == (None, None, 0, False)
    assert cfg.optim.epochs == written["optim"]["epochs"] and cfg.optim.name == written["optim"]["name"]



def test_the_reports_product_table_sets_the_default_command_beside_the_best_row():
    from jacmatch.report.sections import product_text
    cells = {f"{row}|{n}": {"acc": {"mean": m, "ci95": 0.02}}
             for n in (1, 10) for row, m in (("CE+KD", 0.5), ("CE+KD+JM", 0.55), ("FM", 0.6), ("FM+JM", 0.7))}

    def record(n, acc, **objective):
        config = merge_values(recipe_values("fm+jm"), {"data": {"samples_per_class": n}, "objective": objective})
        return {"config": config, "final": {"test": {"acc": acc}}, "recipe": {"name": "fm+jm"}, "loop_seconds": 120.0}
    text = product_text([record(1, 0.69), record(1, 0.71), record(10, 0.60), record(10, 0.62)], {"cells": cells})
    rows = [line for line in text.splitlines() if line.startswith("| 1 ") or line.startswith("| 10 ")]
    assert rows[0] == "| 1 | fm+jm | 2 of 5 | 70.0 ± 12.7 | FM+JM: 70.0 ± 2.0 | yes | 2.0 |", rows
    assert "| FM+JM: 70.0 ± 2.0 | **below it** |" in rows[1], rows
    assert "older than today's recipes" not in text
    assert "No runs of the default command here" in product_text([], {"cells": cells})
    # a record trained before its recipe changed says so, with the settings that changed
    gamma = recipe_values("fm+jm")["objective"]["gamma"]
    stale = product_text([record(1, 0.69), record(1, 0.71, gamma=gamma + 1)], {"cells": cells})
    assert f"- n = 1: recorded before the recipe changed (objective.gamma: {gamma + 1} -> {gamma})" in stale, stale


def test_a_record_that_predates_a_setting_counts_as_its_default():
    from jacmatch.report.sections import differs_from_recipe
    config = recipe_values("paper")
    del config["objective"]["jacobian_every"]  # a record written before the setting existed ran with 1
    assert differs_from_recipe(config, "paper") == [f"objective.jacobian_every: 1 -> {SCHEDULE['jacobian_every']}"]
    assert differs_from_recipe(recipe_values("paper"), "paper") == []


def test_changing_a_recipe_s_values_changes_no_recipe():
    values = recipe_values("paper")
    values["objective"]["gamma"] = -1.0
    values["optim"]["lr"] = -1.0
    assert recipe_values("paper")["objective"]["gamma"] == RECIPES["paper"].values["objective"]["gamma"] == 10.0
    assert recipe("paper").optim.lr == 0.01


def test_the_tune_section_sets_the_best_values_seeds_against_the_hand_grid_s_cell():
    from jacmatch.report.sections import tune_text
    summary = {"complete": 5, "pruned": 19, "failed": 0, "trial_seconds": 7200.0,
               "best": {"val_acc": 0.86, "params": {"optim.lr": 0.004, "objective.gamma": 2.0}}}
    converge = {"cells": {"FM+JM|10": {"acc": {"mean": 0.846, "ci95": 0.013}}},
                "fm": {"selection": {"mixup": {"train_seconds": 3600.0, "samples_per_class": 10}}}}

    def seed(s, acc):
        return {"config": {**recipe_values("fm+jm"), "seed": s}, "final": {"test": {"acc": acc}}}
    text = tune_text({"summary": summary, "seeds": [seed(0, 0.84), seed(1, 0.85)]}, converge)
    assert "| 24 (5, 19, 0) | 86.0 | lr 0.004, gamma 2 | 2.00 | 1.00 (mixup at n = 10, 2 seeds each) |" in text, text
    assert "| 2 of 5 | 84.5 ± 6.4 | 84.6 ± 1.3 | 83.3 | yes |" in text, text
    low = tune_text({"summary": summary, "seeds": [seed(0, 0.82), seed(1, 0.83)]}, converge)
    assert "| 83.3 | **no** |" in low
    assert "the recipe of their day" not in text
    older = merge_values(recipe_values("fm+jm"), {"eval": {"patience": 5}})
    stale = tune_text({"summary": summary, "seeds": [{**seed(0, 0.84), "config": {**older, "seed": 0}}]}, converge)
    assert f"trained with the recipe of their day: eval.patience: 5 -> {recipe('fm+jm').eval.patience} in" in stale
    assert "has not run" in tune_text(None, converge)
    assert "seeds have not run yet" in tune_text({"summary": summary, "seeds": []}, converge)
