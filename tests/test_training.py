"""The trainer: exact resume, the teacher cache, DDP against one process, CLI errors."""

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import QUIET, jacmatch, run

import jacmatch as jm
from jacmatch.training import config_from_dict, load_checkpoint, train
from jacmatch.training.run_folder import RunExistsError


def student_values(out, teacher, **objective):
    return {"out_dir": str(out), "teacher": teacher, "data": {"name": "synthetic", "samples_per_class": 6},
            "model": {"name": "small_cnn_4"},
            "objective": {"alpha": 1.0, "beta": 1.0, "gamma": 1.0, **objective},
            "optim": {"epochs": 4, "batch_size": 8, "lr": 0.05}, "eval": {"every": 2, "noise_sigmas": [0.2]},
            **QUIET}


def weights(path):
    return load_checkpoint(path)["model"]


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0 if atol == 0 else 1e-5, msg=k)


def test_teacher_run_writes_everything(teacher):
    out = Path(teacher).parent
    for name in ("last.pt", "results.json", "metrics.jsonl", "config.yaml", "indices.json"):
        assert (out / name).is_file(), name
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "acc" in json.loads(lines[-1])["test"]
    results = json.loads((out / "results.json").read_text())
    assert results["final"]["test"]["acc"] > 0.5


@pytest.mark.parametrize("objective", [{"jm_outputs": "projection", "noise_sigma": 0.1},
                                       # the schedule counts the run's steps, not the process's
                                       {"jacobian_fraction": 0.5, "jacobian_every": 4}])
def test_resume_continues_exactly(tmp_path, teacher, monkeypatch, objective):
    straight = tmp_path / "straight"
    train(config_from_dict(student_values(straight, teacher, **objective)))
    cut = tmp_path / "cut"
    import jacmatch.training.epoch as trainer_mod  # where checkpoints are written
    real_save = trainer_mod.save_checkpoint
    calls = []

    def save_then_die(path, state):
        real_save(path, state)
        calls.append(state["epoch"])
        if state["epoch"] == 2:
            raise KeyboardInterrupt  # killed right after the checkpoint of epoch 2
    monkeypatch.setattr(trainer_mod, "save_checkpoint", save_then_die)
    cfg = config_from_dict(student_values(cut, teacher, **objective))
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(trainer_mod, "save_checkpoint", real_save)
    with pytest.raises(RunExistsError, match="--resume"):
        train(cfg)
    train(cfg, resume=True)
    assert_same_weights(weights(straight / "last.pt"), weights(cut / "last.pt"))
    a = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["train"] for r in a] == [r["train"] for r in b]


def test_raising_the_maximum_and_patience_on_resume_ends_where_a_run_given_them_ends(tmp_path, teacher):
    """A run stopped early (patience 1), resumed with patience 3 and twice the epochs, trains on
    and ends bit for bit where a run given them from the start ends: early stopping reads the
    history, and an epoch's draws do not depend on the maximum. Lower patience is refused."""
    import shutil

    from jacmatch.training.config import ConfigError

    def values(out, patience, epochs):
        v = student_values(out, teacher)
        v["optim"].update(epochs=epochs, schedule="constant")
        v["eval"].update(every=1, keep_best=True, patience=patience, min_delta=0.5)  # no epoch beats the first
        return v
    short = train(config_from_dict(values(tmp_path / "short", 1, 3)))
    assert short["best"]["stopped_early"] and short["epochs"] == 2
    shutil.copytree(tmp_path / "short", tmp_path / "grown")
    grown = train(config_from_dict(values(tmp_path / "grown", 3, 6)), resume=True)
    straight = train(config_from_dict(values(tmp_path / "straight", 3, 6)))
    timeless = lambda r: {k: v for k, v in r["best"].items() if k != "loop_seconds"}  # noqa: E731
    assert straight["epochs"] == grown["epochs"] == 4 and timeless(grown) == timeless(straight)
    assert grown["final"] == straight["final"]
    for name in ("last.pt", "best.pt"):
        assert_same_weights(weights(tmp_path / "straight" / name), weights(tmp_path / "grown" / name))
    with pytest.raises(ConfigError, match=r"eval.patience: 3 -> 2"):
        train(config_from_dict(values(tmp_path / "grown", 2, 8)), resume=True)


def test_a_resumed_run_replays_its_evaluations_to_its_caller_before_training_on(tmp_path, teacher):
    """on_evaluation sees a resumed run's whole curve: first the restored history's evaluations
    (steps so far, validation accuracy), then the new ones, as a straight run reports them."""
    def values(epochs):
        v = student_values(tmp_path / "run", teacher)
        v["optim"].update(epochs=epochs)
        v["eval"].update(every=1)
        return v
    first, again, straight = [], [], []
    train(config_from_dict(values(2)), on_evaluation=lambda *a: first.append(a))
    train(config_from_dict(values(4)), resume=True, on_evaluation=lambda *a: again.append(a))
    v = values(4)
    v["out_dir"] = str(tmp_path / "straight")
    train(config_from_dict(v), on_evaluation=lambda *a: straight.append(a))
    assert len(first) == 2 and again[:2] == first and len(again) == 4
    assert [s for s, _ in again] == [s for s, _ in straight] and sorted({s for s, _ in again}) == [s for s, _ in again]


def test_same_seed_gives_bit_identical_runs(tmp_path, teacher):
    for name in ("a", "b"):
        train(config_from_dict(student_values(tmp_path / name, teacher)))
    assert_same_weights(weights(tmp_path / "a" / "last.pt"), weights(tmp_path / "b" / "last.pt"))
    ra, rb = (json.loads((tmp_path / n / "results.json").read_text())["final"] for n in "ab")
    assert ra["test"] == rb["test"] and ra["train"] == rb["train"]


@pytest.mark.parametrize("outputs", ["teacher_top1", "projection"])
def test_teacher_cache_gives_the_same_training(tmp_path, teacher, outputs):
    runs = {}
    for cached in (True, False):
        values = student_values(tmp_path / f"{outputs}{cached}", teacher, jm_outputs=outputs, num_projections=2)
        values["teacher_cache"] = cached
        train(config_from_dict(values))
        runs[cached] = weights(tmp_path / f"{outputs}{cached}" / "last.pt")
    assert_same_weights(runs[True], runs[False], atol=1e-5)


def test_the_teacher_cache_holds_what_fixed_blocks_computed_whatever_batch_a_step_holds(teacher):
    """The cache is filled before the first step, in blocks of the training set's order; a
    step's lookup returns those bits for any batch. With a teacher whose result depends on the
    batch it runs in (user_models.BatchSensitive, as rounding does in the last bits), a fresh
    pass over the step's own batch gives other targets: what a cache filled from each
    step's unseen samples stored, and why it differed between 1 and 2 processes."""
    from user_models import BatchSensitive

    from jacmatch.models import create_model
    from jacmatch.training import load_data, load_model
    from jacmatch.training.cache import TeacherCache
    cfg = config_from_dict(student_values("unused", teacher, jm_outputs="projection"))
    data = load_data(cfg)
    objective = jm.TransferObjective(create_model("small_cnn_4", 4, 1), BatchSensitive(load_model(teacher)[0]),
                                     cfg.objective)
    cache = TeacherCache(objective, len(data.train))
    cache.fill(data.train, 8, torch.device("cpu"))
    assert bool(cache.filled.all()) and cache.digest()["samples"] == len(data.train) == 24
    step = [5, 17, 2]
    (index, x, y), = data.train.batches([step])
    got = cache(index, x, y).tensors()
    (_, xb, yb), = data.train.batches([list(range(16, 24))])  # the block that holds sample 17
    block = objective.teacher_targets(xb, yb, full_jacobian=True).tensors()
    fresh = objective.teacher_targets(x, y, full_jacobian=True).tensors()
    assert got.keys() == {("", "logits"), ("jm", "full_jac")}
    for name in got:
        assert torch.equal(got[name][1], block[name][1]) and not torch.equal(got[name][1], fresh[name][1]), name
    before = cache.digest()
    cache(index, x, y)  # a lookup computes nothing
    assert cache.digest() == before


def test_a_teacher_cache_over_its_budget_is_refused_in_one_line(teacher):
    from jacmatch.models import create_model
    from jacmatch.training import load_data, load_model
    from jacmatch.training.cache import TeacherCache
    cfg = config_from_dict(student_values("unused", teacher, jm_outputs="projection"))
    data = load_data(cfg)
    objective = jm.TransferObjective(create_model("small_cnn_4", 4, 1), load_model(teacher)[0], cfg.objective)
    with pytest.raises(jm.UsageError, match=r"teacher cache would need .* MiB .* teacher_cache=false"):
        TeacherCache(objective, len(data.train), max_bytes=1 << 10).fill(data.train, 8, torch.device("cpu"))


def test_augmentation_changes_the_inputs_and_bypasses_the_cache(tmp_path, teacher):
    plain = student_values(tmp_path / "plain", teacher)
    augmented = student_values(tmp_path / "aug", teacher)
    augmented["data"].update(augment=True, crop_padding=1)
    for values in (plain, augmented):
        train(config_from_dict(values))
    a, b = weights(tmp_path / "plain" / "last.pt"), weights(tmp_path / "aug" / "last.pt")
    assert any(not torch.equal(a[k], b[k]) for k in a), "augmentation had no effect on training"


def _ddp_case(out, teacher, *, batch_sensitive=True, poison=None, compared=True, **over) -> dict:
    """A 3-epoch run (samples move between processes) of 32 synthetic samples, global batch 16."""
    values = student_values(out, teacher)
    values["data"]["samples_per_class"] = 8
    values["optim"].update(epochs=3, batch_size=16)
    values["eval"]["every"] = 3
    for key, value in over.items():  # "objective.jm_outputs": ..., "eval": {...}
        section, _, name = key.partition(".")
        if name:
            values.setdefault(section, {})[name] = value
        else:
            values[section] = {**values.get(section, {}), **value} if isinstance(value, dict) else value
    return {"values": values, "batch_sensitive": batch_sensitive, "poison": poison, "compared": compared}


@pytest.fixture(scope="module")
def fashion_teacher(tmp_path_factory):
    """A max-pooling CNN teacher on Fashion-MNIST (flat backgrounds: its max-pool ties are
    exact, and broken by rounding), trained for one epoch."""
    out = tmp_path_factory.mktemp("fashion-teacher")
    values = {"out_dir": str(out), "data": {"name": "fashion-mnist", "samples_per_class": 2000},
              "model": {"name": "small_cnn_8"}, "objective": {"beta": 0.0, "gamma": 0.0},
              "optim": {"epochs": 1, "batch_size": 128},
              "eval": {"noise_sigmas": [], "jacobian_cosine": False}, **QUIET}
    train(config_from_dict(values))
    return str(out / "last.pt")


def _fashion_case(out, teacher, outputs) -> dict:
    """The issue's reproduction on the real data (200 samples, global batch 64, 3 epochs), at
    lr 0.01: at its lr of 0.05 a ReLU student's input Jacobian jumps where rounding moves an
    activation across zero, and 1 and 2 processes part by 1e-4 with or without the cache."""
    values = {"out_dir": str(out), "teacher": teacher, "data": {"name": "fashion-mnist", "samples_per_class": 20},
              "model": {"name": "lenet5"}, "objective": {"jm_outputs": outputs},
              "optim": {"epochs": 3, "batch_size": 64, "lr": 0.01},
              "eval": {"every": 3, "noise_sigmas": [], "jacobian_cosine": False}, **QUIET}
    return {"values": values, "batch_sensitive": False, "poison": None}


def _folder_with_a_truncated_image(root: Path) -> Path:
    from helpers import pixels, write_folder
    write_folder(root, *pixels(40))
    data = (root / "class_2" / "00002.png").read_bytes()
    (root / "class_2" / "00002.png").write_bytes(data[: len(data) // 2])
    return root


def _bad_samples_case(out, folder, teacher) -> dict:
    """KD + JM over a folder of 40 PNGs read by a worker process, one truncated and skipped:
    one process's batch holding it is one short, and so is the share of the one process of
    two that holds it."""
    values = student_values(out, teacher)
    values["data"] = {"name": f"imagefolder:{folder}", "samples_per_class": None, "val_size": 0.0,
                      "mean": [0.3], "std": [0.3], "workers": 1, "on_bad_sample": "skip"}
    values["optim"].update(epochs=3, batch_size=8)
    return {"values": values, "batch_sensitive": False, "poison": None}


@pytest.mark.slow
def test_the_number_of_processes_does_not_change_the_run(tmp_path, teacher, fashion_teacher):
    """Every run below trains alone and under torchrun with 2 CPU processes (gloo); each
    gives the weights of one process to 1e-5, the same terms every epoch, and the same
    record. With the teacher cache on (the default), the teacher is a BatchSensitive one
    (tests/scripts/ddp_runs.py): a cache filled from each process's own samples gives it
    other targets than one process's, and the weights part by far more than 1e-5; so do
    the two Fashion-MNIST runs with the real teacher, where the cache filled some samples in
    a batch of one, whose channels-last convolution rounds otherwise. Also: a non-finite
    step on one process is skipped (or an fp16 overflow lowers the scale) on every
    process, as one process with the global batch does; early stopping stops at the same
    best point; random draws, noise and augmentation (cache off), mixup and CutMix (their
    pairs drawn from the global batch), and a BatchNorm student with ddp.sync_batchnorm,
    train the same weights."""
    poison = {"epoch": 2, "sample": 5}
    def cases(root):
        return {
            **{f"cache-{o}": _ddp_case(root / f"cache-{o}", teacher, **{"objective.jm_outputs": o, **extra})
               for o, extra in [("teacher_top1", {}), ("top_k", {"objective.top_k": 2}),
                                ("projection", {"objective.num_projections": 2}),
                                ("input_jvp", {"objective.jm_form": "sq", "objective.gamma": 0.01}),
                                ("input_fd", {"objective.jm_form": "sq", "objective.gamma": 0.01})]},
            **{f"cache-bn-{o}": _ddp_case(root / f"cache-bn-{o}", teacher, **{
                "objective.jm_outputs": o, "model": {"name": "small_cnn_4", "options": {"batchnorm": True}},
                "ddp": {"sync_batchnorm": True}}) for o in ("teacher_top1", "projection")},
            "projection+noise+augment": _ddp_case(
                root / "pna", teacher, batch_sensitive=False, **{
                    "objective.jm_outputs": "projection", "objective.num_projections": 2,
                    "objective.noise_sigma": 0.1, "data.augment": True, "data.crop_padding": 1}),
            "mixup+cutmix+augment": _ddp_case(root / "mix", teacher, batch_sensitive=False, **{
                "data.mixup": 0.4, "data.cutmix": 1.0, "data.augment": True, "data.crop_padding": 1}),
            "nonfinite-skip": _ddp_case(root / "skip", teacher, poison=poison, nonfinite="skip"),
            "fp16-overflow": _ddp_case(root / "fp16", teacher, poison=poison, amp="fp16"),
            "early-stop": _ddp_case(root / "early", teacher, **{
                "optim.epochs": 12, "optim.lr": 0.2, "eval": {"every": 1, "keep_best": True, "patience": 2}}),
            **{f"fashion-{o}": _fashion_case(root / f"fashion-{o}", fashion_teacher, o)
               for o in ("teacher_top1", "projection")},
            "bad-samples": _bad_samples_case(root / "bad", folder, teacher),
            "again": _ddp_case(root / "again", teacher, **{"objective.jm_outputs": "projection",
                                                         "objective.num_projections": 2}),
            # the Jacobian term's schedules: a fraction of each batch (drawn per sample), every 2nd step
            "schedule": _ddp_case(root / "schedule", teacher, **{"objective.jacobian_fraction": 0.5,
                                                               "objective.jacobian_every": 2}),
            "schedule-projection": _ddp_case(root / "schedule-p", teacher, **{
                "objective.jm_outputs": "projection", "objective.jacobian_fraction": 0.5}),
            # ρ = 0.1 of 8 samples a process: steps where a process draws none (it still takes the pass)
            "schedule-bn-sparse": _ddp_case(root / "schedule-s", teacher, **{
                "objective.jacobian_fraction": 0.1,
                "model": {"name": "small_cnn_4", "options": {"batchnorm": True}}, "ddp": {"sync_batchnorm": True}}),
            "schedule-bn": _ddp_case(root / "schedule-b", teacher, **{
                "objective.jacobian_fraction": 0.5,
                "model": {"name": "small_cnn_4", "options": {"batchnorm": True}}, "ddp": {"sync_batchnorm": True}}),
            # a BatchNorm student of its own statistics per process (the DDP wrapper's default): it trains (its
            # statistics, over each process's samples, differ from one process's by design: not compared)
            "schedule-bn-local": _ddp_case(root / "schedule-l", teacher, compared=False, **{
                "objective.jacobian_fraction": 0.5, "model": {"name": "small_cnn_4", "options": {"batchnorm": True}}}),
            "schedule-bn-projection": _ddp_case(root / "schedule-bn", teacher, **{
                "objective.jm_outputs": "projection", "objective.jacobian_fraction": 0.5,
                "model": {"name": "small_cnn_4", "options": {"batchnorm": True}}, "ddp": {"sync_batchnorm": True}}),
        }
    folder = _folder_with_a_truncated_image(tmp_path / "images")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = str(Path(__file__).parent / "scripts" / "ddp_runs.py")
    for launcher, root in (([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
                            tmp_path / "two"), ([sys.executable], tmp_path / "one")):
        (tmp_path / f"{root.name}.json").write_text(json.dumps(cases(root)))
        run([*launcher, script, tmp_path / f"{root.name}.json"], env=env, timeout=600, check=True)
    one, two = cases(tmp_path / "one"), cases(tmp_path / "two")
    gaps, terms = {}, {}  # each run's largest difference of weights, and of terms (relative), 1 to 2 processes
    for name in one:
        a, b = Path(one[name]["values"]["out_dir"]), Path(two[name]["values"]["out_dir"])
        if not one[name].get("compared", True):
            assert (a / "results.json").is_file() and (b / "results.json").is_file(), name
            continue
        wa, wb = weights(a / "last.pt"), weights(b / "last.pt")
        gaps[name] = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
        ma, mb = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b))
        assert len(ma) == len(mb), name
        for ra, rb in zip(ma, mb):
            assert ra["train"].keys() == rb["train"].keys(), name
            terms[name] = max([terms.get(name, 0.0)] + [abs(rb["train"][k] - ra["train"][k]) / max(abs(ra["train"][k]), 1)
                                                        for k in ra["train"]])
            for k in ("steps", "skipped_steps", "overflow_steps", "loss_scale", "bad_samples", "first_bad_sample"):
                assert ra.get(k) == rb.get(k), (name, ra["epoch"], k)
        resa, resb = (json.loads((d / "results.json").read_text()) for d in (a, b))
        assert resa["final"]["test"]["acc"] == resb["final"]["test"]["acc"] or gaps[name] > 1e-5, name
        point = lambda r: {k: v for k, v in r.get("best", {}).items() if k != "loop_seconds"}  # noqa: E731
        assert point(resa) == point(resb), name
        cached = "augment" not in name
        assert ("teacher_cache" in resa) == cached, name
        if "teacher_cache" in resa:  # the same teacher targets, bit for bit
            assert resa["teacher_cache"]["sha256"] == resb["teacher_cache"]["sha256"], name
    # fp16: the two differ in the rounding of half-precision activations, not in a step (1.7e-3 measured)
    tolerance = {name: 1e-2 if name == "fp16-overflow" else 1e-5 for name in gaps}
    apart = {n: (gaps[n], terms[n]) for n in gaps if not (gaps[n] <= tolerance[n] and terms[n] <= tolerance[n])}
    assert not apart, apart
    metrics = lambda n: [json.loads(x) for x in (tmp_path / "one" / n / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert sum(r["skipped_steps"] for r in metrics("skip")) == 1 and metrics("fp16")[1]["overflow_steps"] == 1
    assert [r["bad_samples"] for r in metrics("bad")] == [1, 1, 1] and "00002.png" in metrics("bad")[0]["first_bad_sample"]
    early = json.loads((tmp_path / "one" / "early" / "results.json").read_text())["best"]
    assert early["stopped_early"] and early["inside"], early  # patience stopped it, at a point both found
    assert metrics("cache-teacher_top1")[-1]["train"]["jm"] > 0
    # the same seed twice under torchrun: the same weights, bit for bit
    assert_same_weights(weights(tmp_path / "two" / "again" / "last.pt"),
                        weights(tmp_path / "two" / "cache-projection" / "last.pt"))


def test_sharded_draws_are_the_single_process_draws_of_the_same_samples():
    from jacmatch.core.draws import ShardedGenerator
    one = jm.output_projections(8, 3, 2, generator=torch.Generator().manual_seed(5))
    for world in (2, 4):
        shards = [jm.output_projections(8 // world, 3, 2, generator=ShardedGenerator(
            torch.Generator().manual_seed(5), rank, world)) for rank in range(world)]
        for rank, shard in enumerate(shards):
            assert torch.equal(shard, one[rank::world])
    noise = jm.gaussian_noise(torch.zeros(6, 1, 2, 2), 0.1, 2, generator=torch.Generator().manual_seed(3))
    half = jm.gaussian_noise(torch.zeros(3, 1, 2, 2), 0.1, 2, generator=ShardedGenerator(
        torch.Generator().manual_seed(3), 1, 2))
    assert torch.equal(half.reshape(2, 3, 1, 2, 2), noise.reshape(2, 6, 1, 2, 2)[:, 1::2])


def run_cli(*args, cwd=None):
    return jacmatch(*args, cwd=cwd, env=os.environ)


@pytest.mark.parametrize("args,message", [
    (["train-teacher", "--dataset", "imagenet"], "unknown data set 'imagenet'"),
    (["train-teacher", "--model", "resnet1000", "--dataset", "synthetic"], "unknown model 'resnet1000'"),
    (["train-teacher", "--set", "optim.lr_typo=1"], "unknown config key 'optim.lr_typo'"),
    (["train-teacher", "--set", "optim.lr=fast"], "must be a float"),
    (["train-teacher", "--dataset", "mnist", "--data-dir", "/nonexistent"], "data.data_dir"),
    (["train-teacher", "--config", "/nonexistent.yaml"], "does not exist"),
    (["distill", "--dataset", "synthetic"], "needs a teacher"),
    (["distill", "--teacher", "/nonexistent.pt", "--set", "objective.beta=1"], "does not exist"),
    (["train-teacher", "--set", "optim.batch_size=100000000"], "batch_size"),
    (["evaluate", "--checkpoint", "/nonexistent.pt"], "does not exist"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, args, message, capsys):
    """In process, through the CLI's main (a subprocess per case would add a second each)."""
    from jacmatch.cli import main
    assert main([*args, "--out", str(tmp_path / "o")] if args[0] != "evaluate" else args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow  # starts a process (data-loading workers or the command line)
def test_samples_per_class_too_large(tmp_path, teacher):
    r = run_cli("distill", "--recipe", "none", "--teacher", teacher, "--dataset", "synthetic", "--samples-per-class", "10000",
                "--set", "objective.beta=1", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "samples_per_class=10000" in r.stderr


def test_checkpoint_of_another_model_is_refused_on_resume(tmp_path, teacher):
    values = student_values(tmp_path / "s", teacher)
    values["optim"]["epochs"] = 1
    train(config_from_dict(values))
    values["model"]["name"] = "small_cnn_8"
    with pytest.raises(ValueError, match="holds model"):
        train(config_from_dict(values), resume=True)


@pytest.mark.slow  # starts a process (data-loading workers or the command line)
def test_evaluate_command(tmp_path, teacher):
    r = run_cli("evaluate", "--checkpoint", teacher, "--noise-sigmas", "0.1", "--json", str(tmp_path / "e.json"))
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "e.json").read_text())
    assert 0 <= result["acc"] <= 1 and "0.1" in result["noisy_acc"]


def test_bf16_autocast_trains_close_to_float32(tmp_path, teacher):
    """bf16 autocast changes the rounding, not the training: the same terms, finite, and
    losses close to the float32 run's (while the weights do differ, so autocast was on)."""
    runs = {}
    for amp in ("none", "bf16"):
        values = student_values(tmp_path / amp, teacher)
        values.update(amp=amp)
        values["optim"]["epochs"] = 1
        runs[amp] = train(config_from_dict(values))["final"]["train"]
    assert runs["bf16"].keys() == runs["none"].keys() == {"ce", "kd", "jm"}
    for k, v in runs["bf16"].items():
        assert math.isfinite(v) and v == pytest.approx(runs["none"][k], rel=0.02), (k, runs)
    assert runs["bf16"] != runs["none"]


def test_channels_last_trains_the_same_student(tmp_path, teacher):
    """The fast memory layout against the plain one: same weights after training (to float
    rounding: other convolution kernels), and the run really used channels-last."""
    runs = {}
    for cl in (False, True):
        values = student_values(tmp_path / f"cl{cl}", teacher, jm_outputs="teacher_top1")
        values["channels_last"] = cl
        train(config_from_dict(values))
        runs[cl] = weights(tmp_path / f"cl{cl}" / "last.pt")
    assert runs[True]["layer2.0.weight"].is_contiguous(memory_format=torch.channels_last)
    assert not runs[False]["layer2.0.weight"].is_contiguous(memory_format=torch.channels_last)
    assert_same_weights(runs[True], runs[False], atol=1e-4)


def test_evaluation_reuses_the_teachers_gradients_for_the_same_key_only(teacher):
    import copy

    from jacmatch.data import create_dataset
    from jacmatch.training import TeacherGradients, evaluate, load_model
    t, _ = load_model(teacher)
    student = copy.deepcopy(t)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    calls = []
    t.register_forward_hook(lambda *a: calls.append(1))
    test = create_dataset("synthetic").test
    memo = TeacherGradients()
    kw = dict(teacher=t, cosine_samples=50, batch_size=20, teacher_gradients=memo)
    plain = evaluate(student, test, "cpu", teacher=t, cosine_samples=50, batch_size=20)
    first = evaluate(student, test, "cpu", teacher_key="k", **kw)
    before = len(calls)
    again = evaluate(student, test, "cpu", teacher_key="k", **kw)
    assert len(calls) == before, "the same key must reuse the teacher's gradients"
    assert plain == first == again and -1 < plain["jacobian_cosine"] < 1
    with torch.no_grad():  # other weights under another key: recomputed, and the cosine moves
        for p in t.parameters():
            p.mul_(-1.0)
    other = evaluate(student, test, "cpu", teacher_key="k2", **kw)
    assert len(calls) > before and other["jacobian_cosine"] != plain["jacobian_cosine"]


def test_keep_best_tests_the_best_validation_weights_and_patience_stops(tmp_path, monkeypatch):
    """eval.keep_best writes best.pt at each new best validation accuracy and tests those
    weights at the end; eval.patience stops the run after that many evaluations without a
    better one. The record says where the best point was, and whether it lies inside the
    maximum."""
    import json

    import jacmatch.training.results as results_mod
    import jacmatch.training.trainer as trainer
    from jacmatch.training import config_from_dict, load_checkpoint, load_model, train
    real, scripted = results_mod.evaluate, iter([0.50, 0.70, 0.60, 0.65, 0.60, 0.90])

    def evaluate(model, split, *args, **kwargs):
        result = real(model, split, *args, **kwargs)
        return {**result, "acc": next(scripted)} if split is data["splits"].val else result
    data = {}
    original_load = trainer.load_data

    def load_data(cfg, cache=None):
        data["splits"] = original_load(cfg, cache)
        return data["splits"]
    monkeypatch.setattr(results_mod, "evaluate", evaluate)
    monkeypatch.setattr(trainer, "load_data", load_data)
    values = {"out_dir": str(tmp_path / "r"), "data": {"name": "synthetic", "samples_per_class": 4},
              "model": {"name": "small_cnn_4"}, "objective": {"beta": 0, "gamma": 0},
              "optim": {"epochs": 6}, "eval": {"keep_best": True, "patience": 2, "noise_sigmas": []},
              "progress": False}
    results = train(config_from_dict(values))
    metrics = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [m["val"]["acc"] for m in metrics] == [0.50, 0.70, 0.60, 0.65]  # stopped: 2 evaluations without 0.70
    assert all("test" not in m for m in metrics)
    best = results["best"]
    assert (best["epoch"], best["stopped_early"], best["inside"], best["epochs_trained"]) == (2, True, True, 4)
    assert best["step"] == sum(m["steps"] for m in metrics[:2]) and best["val_acc"] == 0.70
    assert load_checkpoint(tmp_path / "r" / "best.pt")["epoch"] == 2
    model, _ = load_model(tmp_path / "r" / "best.pt")
    assert results["final"]["test"]["acc"] == real(model, data["splits"].test, "cpu", batch_size=500)["acc"]
    last, _ = load_model(tmp_path / "r" / "last.pt")
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), last.state_dict().values()))


def test_a_run_stopped_early_at_a_constant_rate_is_the_same_run_under_a_larger_maximum(tmp_path, teacher):
    """What `experiment converge` relies on when a cell's maximum grows: a seed that stopped
    early inside the smaller maximum is not trained again, since the larger one trains it
    identically (weights, best point, test accuracy)."""
    runs = {}
    for epochs in (5, 10):
        values = {"out_dir": str(tmp_path / f"e{epochs}"), "teacher": teacher, "seed": 3,
                  "data": {"name": "synthetic", "samples_per_class": 4}, "model": {"name": "small_cnn_4"},
                  "objective": {"beta": 1.0, "gamma": 1.0}, "optim": {"epochs": epochs, "schedule": "constant"},
                  "eval": {"keep_best": True, "patience": 1, "min_delta": 0.5, "noise_sigmas": []}, "progress": False}
        runs[epochs] = train(config_from_dict(values))
    small, large = runs[5], runs[10]
    assert small["best"]["stopped_early"] and small["best"]["inside"] and small["best"]["epochs_trained"] == 2
    assert {k: v for k, v in small["best"].items() if k not in ("loop_seconds", "max_epochs")} == \
        {k: v for k, v in large["best"].items() if k not in ("loop_seconds", "max_epochs")}
    assert small["final"]["test"]["acc"] == large["final"]["test"]["acc"]
    for name in ("best.pt", "last.pt"):
        a, b = (load_checkpoint(tmp_path / f"e{e}" / name)["model"] for e in (5, 10))
        assert all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in json.loads(line).items() if k not in ("epoch_seconds", "eval_seconds")}
             for e in (5, 10) for line in (tmp_path / f"e{e}" / "metrics.jsonl").read_text().splitlines()]
    assert strip[:2] == strip[2:]


def test_a_better_validation_accuracy_must_beat_the_best_by_min_delta():
    from jacmatch.training.results import best_index as _best_index
    history = [{"val": {"acc": a}} if a is not None else {} for a in (0.50, None, 0.5004, 0.52, 0.5205, 0.53)]
    assert _best_index(history) == 5 and _best_index(history, 0.001) == 5
    assert _best_index(history[:5]) == 4 and _best_index(history[:5], 0.001) == 3  # 0.5205 is not better by 0.1 point
    assert _best_index(history[:3], 0.001) == 0 and _best_index([{}]) is None


def test_a_run_that_succeeds_leaves_its_process_group(tmp_path):
    """A gloo group left to the interpreter's exit can abort it (SIGABRT): finish_distributed
    leaves it, and is a no-op outside one. A DDP module that would outlive the group (its
    reducer, destroying the group with the GIL held, can hang the exit) is collected first
    when only a reference cycle holds it, and named when its caller still does."""
    import warnings

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from jacmatch.training.distributed import LiveDDPWarning, finish_distributed
    finish_distributed()  # no group: nothing to do
    for n, held in enumerate((False, True)):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / f'store{n}'}", rank=0, world_size=1)  # no port
        try:
            assert dist.is_initialized()
            ddp = DistributedDataParallel(torch.nn.Linear(2, 2))
            ddp(torch.ones(1, 2)).sum().backward()  # a finished all-reduce
            ddp.cycle = [ddp]  # only the garbage collector frees it
            del ddp
            # one still referenced: a bare instance, without the reducer that would destroy the
            # group after it (the hazard itself, not to be run in the test process)
            live = DistributedDataParallel.__new__(DistributedDataParallel) if held else None
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                finish_distributed()
            assert [w.category for w in caught] == ([LiveDDPWarning] if held else [])
            assert not dist.is_initialized()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()  # leave no group to the tests after a failure
    del live
