"""The Jacobian terms' schedules (objective.jacobian_fraction ρ, objective.jacobian_every k):
pinned against a hand-written step on the same draws, ρ = 1 and k = 1 bit-identical to the
unscheduled term, the estimate unbiased, the cache serving the scheduled term, a BatchNorm
student's statistics moved once per step, and the settings refused where they mean nothing.
Resume and 1 against 2 processes are in test_training.py (its resume and DDP tests)."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import SmallCNN, mlp

import jacmatch as jm
from jacmatch.core import jacobian as J
from jacmatch.core.draws import per_sample_draw
from jacmatch.core.losses import jacobian_matching_loss

EXACT = {"teacher_fold_bn": False, "teacher_channels_last": False}  # the teacher as given: hand-written steps match


def _pair(batchnorm=False):
    torch.manual_seed(0)
    return SmallCNN(k=5, batchnorm=batchnorm), SmallCNN(k=5, batchnorm=False)


def _batch(b=16):
    g = torch.Generator().manual_seed(1)
    return torch.rand(b, 1, 6, 6, generator=g), torch.randint(0, 5, (b,), generator=g)


def _grads(model, total):
    model.zero_grad(set_to_none=True)
    total.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_rho_and_k_at_one_are_the_unscheduled_term_bit_for_bit():
    student, teacher = _pair()
    x, y = _batch()
    plain = jm.TransferObjective(student, teacher, jm.ObjectiveConfig(**EXACT))
    ones = jm.TransferObjective(student, teacher, jm.ObjectiveConfig(**EXACT, jacobian_fraction=1.0,
                                                                     jacobian_every=1))
    for step in range(3):
        (la, ta, va), (lb, tb, vb) = plain(x, y, step=step), ones(x, y, step=step)
        assert torch.equal(la, lb) and torch.equal(ta, tb) and all(torch.equal(va[k], vb[k]) for k in va)
    ga, gb = _grads(student, plain(x, y)[1]), _grads(student, ones(x, y)[1])
    assert all(torch.equal(ga[k], gb[k]) for k in ga)
    # and the unscheduled term is the terms written by hand
    zs, zt = student(x), teacher(x)
    xs = x.clone().requires_grad_()
    jm_value = jm.JacobianMatchingLoss(10.0).value(xs, student(xs), teacher, y)
    _, _, values = plain(x, y)
    assert torch.equal(values["ce"], F.cross_entropy(zs, y)) and torch.equal(values["kd"], jm.KDLoss().value(zs, zt))
    assert torch.equal(values["jm"], jm_value)


def test_every_k_steps_takes_the_term_at_steps_0_k_2k_times_k_and_nothing_between():
    student, teacher = _pair()
    x, y = _batch()
    full = jm.TransferObjective(student, teacher, jm.ObjectiveConfig(**EXACT))
    every = jm.TransferObjective(student, teacher, jm.ObjectiveConfig(**EXACT, jacobian_every=3))
    _, total, reference = full(x, y)
    for step in range(7):
        _, t, values = every(x, y, step=step)
        if step % 3 == 0:
            assert torch.equal(values["jm"], 3 * reference["jm"]) and torch.equal(values["kd"], reference["kd"])
            ga = _grads(student, t)
            gb = _grads(student, reference["ce"] + reference["kd"] + 10 * 3 * reference["jm"])
            assert all(torch.allclose(ga[k], gb[k], rtol=1e-6, atol=1e-8) for k in ga)
            _, total, reference = full(x, y)  # (a fresh graph for the next comparison)
        else:
            assert values["jm"].item() == 0.0
            ga = _grads(student, t)
            gb = _grads(student, reference["ce"] + reference["kd"])
            assert all(torch.equal(ga[k], gb[k]) for k in ga), step
            _, total, reference = full(x, y)
    # without a step number the objective counts its own calls
    counted = jm.TransferObjective(student, teacher, jm.ObjectiveConfig(**EXACT, jacobian_every=2))
    assert [bool(counted(x, y)[2]["jm"].item()) for _ in range(4)] == [True, False, True, False]


@pytest.mark.parametrize("estimator", ["teacher_top1", "projection"])
def test_a_fraction_of_the_batch_is_the_hand_written_step_on_the_same_draws(estimator):
    """The objective against a step written out: the same generator draws each sample's
    uniform number, then the whole batch's projections (each drawn sample keeps its own); the
    samples under ρ take the term, its mean over them times |S| / (ρB) is the estimate; CE and
    KD stay on the whole batch."""
    student, teacher = _pair()
    x, y = _batch(32)
    rho = 0.4
    cfg = jm.ObjectiveConfig(**EXACT, jm_outputs=estimator, jacobian_fraction=rho)
    objective = jm.TransferObjective(student, teacher, cfg, generator=torch.Generator().manual_seed(7))
    _, total, values = objective(x, y, step=0)
    got = _grads(student, total)

    gen = torch.Generator().manual_seed(7)
    chosen = (per_sample_draw(torch.rand, (32,), generator=gen) < rho).nonzero().squeeze(1)
    assert 0 < len(chosen) < 32
    xs, xt = x[chosen].clone().requires_grad_(), x[chosen].clone().requires_grad_()
    zs, zt = student(xs), teacher(xt)
    if estimator == "teacher_top1":
        index = J.teacher_top1(zt.detach())[:, None]
        mean = jacobian_matching_loss(J.input_jacobian(zs, xs, index, create_graph=True), J.input_jacobian(zt, xt, index),
                                      multiple_outputs=True)
    else:  # each drawn sample's projection: the one the whole batch's draw gives it
        v = J.output_projections(32, 5, 1, generator=gen, kind="auto")[chosen]
        mean = jacobian_matching_loss(J.vector_jacobian_product(zs, xs, v, create_graph=True),
                                      J.vector_jacobian_product(zt, xt, v), multiple_outputs=True)
    by_hand = mean * len(chosen) / (rho * 32)
    zs, zt = student(x), teacher(x)
    hand_total = F.cross_entropy(zs, y) + jm.KDLoss().value(zs, zt) + 10 * by_hand
    assert torch.allclose(values["jm"], by_hand, rtol=1e-6), (values["jm"], by_hand)
    # the teacher ran once over the batch, in two parts (with and without a graph), each sample in its place
    assert torch.allclose(values["kd"], jm.KDLoss().value(zs, zt), rtol=1e-6)
    want = _grads(student, hand_total)
    assert all(torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-7) for k in got)


def test_a_fraction_of_the_batch_is_unbiased():
    """The mean of ρ = 0.3's estimate over many steps' draws is the full term (a smooth MLP, so
    that the term is the mean of per-sample values): within four standard errors."""
    torch.manual_seed(0)
    student, teacher = mlp(d=6, k=4), mlp(d=6, k=4)
    x, y = torch.randn(24, 6), torch.randint(0, 4, (24,))
    full = jm.TransferObjective(student, teacher, jm.ObjectiveConfig(**EXACT))(x, y)[2]["jm"].item()
    objective = jm.TransferObjective(student, teacher, jm.ObjectiveConfig(**EXACT, jacobian_fraction=0.3),
                                     generator=torch.Generator().manual_seed(0))
    draws = torch.tensor([objective(x, y, step=0)[2]["jm"].item() for _ in range(600)])
    error = draws.std().item() / len(draws) ** 0.5
    assert abs(draws.mean().item() - full) < 4 * error, (draws.mean().item(), full, error)
    assert draws.std().item() > 0  # (it does draw)


@pytest.mark.parametrize("estimator", ["teacher_top1", "projection"])
def test_the_cache_serves_the_scheduled_term_as_the_full_one(estimator):
    student, teacher = _pair()
    x, y = _batch(32)
    cfg = jm.ObjectiveConfig(**EXACT, jm_outputs=estimator, jacobian_fraction=0.5, jacobian_every=2)
    fresh = jm.TransferObjective(student, teacher, cfg, generator=torch.Generator().manual_seed(3))
    cached = jm.TransferObjective(student, teacher, cfg, generator=torch.Generator().manual_seed(3))
    targets = cached.cache_targets(x, y)
    for step in range(3):
        _, ta, va = fresh(x, y, step=step)
        _, tb, vb = cached(x, y, targets, step=step)
        assert all(torch.allclose(va[k], vb[k], rtol=1e-5, atol=1e-7) for k in va), (step, va, vb)


def test_a_batchnorm_students_statistics_move_once_per_step():
    """The drawn samples' pass leaves the running statistics as the whole batch's pass set them."""
    student, teacher = _pair(batchnorm=True)
    x, y = _batch(32)
    plain = copy.deepcopy(student)
    jm.TransferObjective(plain, teacher, jm.ObjectiveConfig(**EXACT, gamma=0))(x, y)
    jm.TransferObjective(student, teacher, jm.ObjectiveConfig(**EXACT, jacobian_fraction=0.5),
                         generator=torch.Generator().manual_seed(0))(x, y)
    for (name, a), b in zip(student.named_buffers(), plain.buffers()):
        assert torch.equal(a, b), name


def test_the_schedule_is_said_and_its_settings_checked():
    student, teacher = _pair()
    cfg = jm.ObjectiveConfig(jacobian_fraction=0.25, jacobian_every=2)
    line = jm.TransferObjective(student, teacher, cfg).describe()
    assert line == "1·CE + 1·KD (τ = 8) + 10·JM (normalized, teacher_top1) on ρ = 0.25 of each batch, every 2 steps"
    assert cfg.describe() == line  # what `jacmatch distill` prints, from the config alone
    for settings, message in (({"jacobian_fraction": 0.0}, "objective.jacobian_fraction"),
                              ({"jacobian_fraction": 1.5}, "objective.jacobian_fraction"),
                              ({"jacobian_every": 0}, "objective.jacobian_every must be a step count"),
                              ({"jacobian_every": 2, "gamma": 0}, "none of ['ce', 'kd'] is one")):
        with pytest.raises(jm.UsageError, match=re.escape(message)):
            jm.TransferObjective(student, teacher, jm.ObjectiveConfig(**settings))
    with pytest.raises(jm.UsageError, match="jacobian_fraction"):
        jm.TransferObjective(student, teacher, terms=[jm.JacobianMatchingLoss(1.0)], jacobian_fraction=2.0)


def test_the_report_states_the_verdict_and_the_time_to_fm_s_accuracy_or_that_no_seed_reached_it():
    """§2e from a schedules.json: per row and n the comparison, the time to FM's accuracy over
    FM's own (or which rows never reached it), and the verdict once complete."""
    from jacmatch.experiments import rows as R
    from jacmatch.report.sections import schedules_text

    def acc(mean, ci=0.01):
        return {"mean": mean, "ci95": ci}

    def comparison(row, full, over_fm, reached):
        to = {f"{name} to {target}": {"seconds": acc(10.0) if n else None, "reached": n, "seeds": 5}
              for name, n in ((row, reached[0]), (full, reached[1]), (R.CE_KD, 5), (R.FM, 3)) for target in (R.CE_KD, R.FM)}
        return {"acc": acc(0.8), "full_acc": acc(0.81), "acc_difference": acc(-0.01, 0.005), "within_full_interval": True,
                "fidelity_difference": {"agreement": {"mean": -0.002}}, "step_seconds": {row: 0.01, full: 0.02},
                "best_seconds": {row: acc(5.0), full: acc(9.0)}, "to_target": to, "time_to_fm_over_fm": over_fm}
    s = {"selection": {"val_acc": {"1": 0.8, "4": 0.79}, "samples_per_class": 10, "rule": "the rule", "inside": True,
                       "row": R.CE_KD_JM},
         "every": 4, "seeds": [0, 1, 2, 3, 4], "rows": {R.FM_JM_SCHEDULED: R.FM_JM},
         "comparisons": {f"{R.FM_JM_SCHEDULED}|1": comparison(R.FM_JM_SCHEDULED, R.FM_JM, 0.31, (5, 5)),
                         f"{R.FM_JM_SCHEDULED}|100": comparison(R.FM_JM_SCHEDULED, R.FM_JM, None, (0, 0)),
                         f"{R.FM_JM_SCHEDULED}|500": comparison(R.FM_JM_SCHEDULED, R.FM_JM, None, (0, 2))},
         "complete": False, "verdict": {}}
    text = schedules_text(s)
    assert ("over FM's own time to it: n = 1: 0.31; n = 100: no seed reaches it, nor of the full row; "
            "n = 500: no seed reaches it (2 of the full row's do).") in text, text
    assert "the verdict waits for every n" in text
    text = schedules_text({**s, "complete": True, "verdict": {R.FM_JM_SCHEDULED: True}})
    assert f"**{R.FM_JM_SCHEDULED}**: within the full row's 95 % interval at every n measured" in text
