"""Fidelity: top-1 agreement with the teacher and KL(teacher ‖ student), on clean, noisy and
interpolated test points, pinned against a computation by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from jacmatch.data import ImageSet
from jacmatch.training import evaluate


def _models():
    torch.manual_seed(0)
    return (nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), nn.Sequential(nn.Flatten(), nn.Linear(16, 3)))


def _by_hand(student, teacher, x):
    """Agreement and mean KL, one sample at a time, with Python's own arithmetic (float32 logits
    batched or alone round apart by about 1e-7: the KLs agree to 1e-6)."""
    agree, kls = 0, []
    for xi in x:
        zs, zt = student(xi[None])[0].tolist(), teacher(xi[None])[0].tolist()
        agree += max(range(3), key=lambda c: zs[c]) == max(range(3), key=lambda c: zt[c])
        ps = [math.exp(v) / sum(math.exp(u) for u in zs) for v in zs]
        pt = [math.exp(v) / sum(math.exp(u) for u in zt) for v in zt]
        kls.append(sum(t * math.log(t / s) for s, t in zip(ps, pt)))
    return agree / len(x), sum(kls) / len(kls)


@torch.no_grad()
def test_agreement_and_kl_equal_a_computation_by_hand_on_clean_noisy_and_interpolated_points():
    from jacmatch.core.metrics import interpolation_pairs
    student, teacher = _models()
    g = torch.Generator().manual_seed(1)
    data = ImageSet(torch.rand(37, 1, 4, 4, generator=g), torch.randint(0, 3, (37,), generator=g))
    out = evaluate(student, data, "cpu", batch_size=10, noise_sigmas=[0.2], noise_seed=5, teacher=teacher,
                   cosine_samples=0, interpolations=25, interpolation_seed=3)["fidelity"]
    agree, kl = _by_hand(student, teacher, data.images)
    assert out["clean"]["agreement"] == pytest.approx(agree, abs=1e-12)
    assert out["clean"]["kl"] == pytest.approx(kl, rel=1e-6) and out["clean"]["points"] == 37
    # the noise of the accuracy under σ = 0.2: one generator seeded noise_seed, drawn batch by batch
    gen = torch.Generator().manual_seed(5)
    noisy = torch.cat([data.images[s:s + 10] + 0.2 * torch.randn(data.images[s:s + 10].shape, generator=gen)
                       for s in range(0, 37, 10)])
    agree, kl = _by_hand(student, teacher, noisy)
    assert out["noisy"]["0.2"]["agreement"] == pytest.approx(agree, abs=1e-12)
    assert out["noisy"]["0.2"]["kl"] == pytest.approx(kl, rel=1e-6)
    i, j, lam = interpolation_pairs(37, 25, 3)
    assert bool((i != j).all()) and 0 <= float(lam.min()) and float(lam.max()) <= 1
    between = lam.view(-1, 1, 1, 1) * data.images[i] + (1 - lam.view(-1, 1, 1, 1)) * data.images[j]
    agree, kl = _by_hand(student, teacher, between)
    assert out["interpolated"]["agreement"] == pytest.approx(agree, abs=1e-12)
    assert out["interpolated"]["kl"] == pytest.approx(kl, rel=1e-6) and out["interpolated"]["points"] == 25


@torch.no_grad()
def test_a_student_equal_to_its_teacher_is_perfectly_faithful_and_the_points_are_the_same_for_every_student():
    student, teacher = _models()
    data = ImageSet(torch.rand(20, 1, 4, 4), torch.randint(0, 3, (20,)))
    same = evaluate(teacher, data, "cpu", teacher=nn.Sequential(*teacher), noise_sigmas=[0.1], cosine_samples=0)
    for where in (same["fidelity"]["clean"], same["fidelity"]["noisy"]["0.1"], same["fidelity"]["interpolated"]):
        assert where["agreement"] == 1.0 and abs(where["kl"]) < 1e-12
    a = evaluate(student, data, "cpu", teacher=teacher, cosine_samples=0)["fidelity"]
    b = evaluate(student, data, "cpu", teacher=teacher, cosine_samples=0)["fidelity"]
    assert a == b


def test_every_distillation_run_records_fidelity(tmp_path, teacher):
    import json

    from jacmatch.training import config_from_dict, train
    values = {"out_dir": str(tmp_path / "s"), "teacher": teacher, "data": {"name": "synthetic", "samples_per_class": 4},
              "model": {"name": "small_cnn_4"}, "optim": {"epochs": 1}, "eval": {"noise_sigmas": [0.1]},
              "progress": False}
    train(config_from_dict(values))
    test = json.loads((tmp_path / "s" / "results.json").read_text())["final"]["test"]
    fidelity = test["fidelity"]
    assert set(fidelity) == {"clean", "noisy", "interpolated"} and set(fidelity["noisy"]) == {"0.1"}
    assert 0 <= fidelity["clean"]["agreement"] <= 1 and fidelity["clean"]["kl"] >= 0


def test_jacmatch_evaluate_with_a_teacher_prints_fidelity(tmp_path, teacher, capsys):
    import json

    from jacmatch.cli import main
    assert main(["distill", "--recipe", "none",
        "--teacher", teacher, "--dataset", "synthetic", "--samples-per-class", "4", "--model",
                 "small_cnn_4", "--out", str(tmp_path / "s"), "--set", "optim.epochs=1", "--set", "progress=false"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(tmp_path / "s" / "last.pt"), "--teacher", teacher,
                 "--noise-sigmas", "0.1", "--json", str(tmp_path / "e.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "e.json").read_text())
    fidelity = printed["fidelity"]
    for where in (fidelity["clean"], fidelity["noisy"]["0.1"], fidelity["interpolated"]):
        assert 0 <= where["agreement"] <= 1 and where["kl"] >= 0 and where["points"] > 0


@torch.no_grad()
def test_a_teacher_of_other_classes_has_no_fidelity():
    """A transfer's source teacher (1000 ImageNet outputs beside a 3-class student): its
    outputs are other classes, so agreement and KL do not apply; the accuracies are measured."""
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    source = nn.Sequential(nn.Flatten(), nn.Linear(16, 7))
    data = ImageSet(torch.rand(10, 1, 4, 4), torch.randint(0, 3, (10,)))
    out = evaluate(student, data, "cpu", teacher=source, cosine_samples=0)
    assert "fidelity" not in out and "acc" in out


def test_the_converged_plots_wait_for_every_row_at_an_n():
    from jacmatch.experiments import rows as R
    from jacmatch.experiments.figures import curve_samples

    def section(ran: dict) -> dict:
        return {"rows": ["CE", "FM"], "cells": {R.key(row, n): {"row": row, "samples_per_class": n}
                                                 for n, rows in ran.items() for row in rows}}
    assert curve_samples(section({1: ["CE", "FM"], 5: ["CE", "FM"], 10: ["CE"]})) == [1, 5]  # n=10 partial
    assert curve_samples(section({1: ["CE", "FM"], 10: ["CE", "FM"], 50: ["CE", "FM"]})) == [10]
    assert curve_samples(section({10: ["CE", "FM"], 100: ["CE", "FM"], 500: ["CE"]})) == [10, 100]
    assert curve_samples(section({1: ["CE"], 5: ["FM"]})) == [1, 5]  # none complete: where any ran
    assert curve_samples(section({})) == []
