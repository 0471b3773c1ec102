"""Losses: gradients against finite differences, and docs/method.md §3.2's failure modes."""

import pytest
import torch
import torch.nn.functional as F
from helpers import mlp

import jacmatch as jm


def _student_loss_fn(form):
    """A loss of the student's parameters only, through its input Jacobian (double backward)."""
    torch.manual_seed(5)
    student, teacher = mlp().double(), mlp().double()
    x = torch.randn(3, 6, dtype=torch.float64)
    xt = x.clone().requires_grad_()
    zt = teacher(xt)
    idx = jm.teacher_top_k(zt.detach(), 2)
    out_t = F.log_softmax(zt, 1) if form == "ce" else zt
    jac_t = jm.input_jacobian(out_t, xt, idx)
    probs = F.softmax(zt.detach(), 1).gather(1, idx)
    params = [p for p in student.parameters()]

    def loss(*ps):
        names = [n for n, _ in student.named_parameters()]
        xs = x.clone().requires_grad_()
        z = torch.func.functional_call(student, dict(zip(names, ps)), (xs,))
        out = F.log_softmax(z, 1) if form == "ce" else z
        jac_s = jm.input_jacobian(out, xs, idx, create_graph=True)
        if form == "penalty":
            return jm.jacobian_penalty(jac_s, "sq", multiple_outputs=True)
        total = jm.jacobian_matching_loss(jac_s, jac_t, form, teacher_probs=probs, multiple_outputs=True)
        return total + jm.kd_loss(z, zt.detach(), 2.0) + jm.kd_loss(z, zt.detach(), form="mse")

    return loss, [p.detach().clone().requires_grad_() for p in params]


@pytest.mark.parametrize("form", ["normalized", "sq", "ce", "penalty"])
def test_loss_gradients_match_finite_differences(form):
    loss, params = _student_loss_fn(form)
    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=1e-5)


def test_attention_transfer_gradcheck_and_value():
    torch.manual_seed(6)
    a_s = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    a_t = torch.randn(2, 5, 8, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: jm.attention_transfer_loss([a], [a_t]), (a_s,))
    same = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert jm.attention_transfer_loss([same], [2 * same]).item() == pytest.approx(0.0, abs=1e-12)


def test_normalized_form_equals_two_minus_two_cosine():
    g_s = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    g_t = torch.randn(4, 10, dtype=torch.float64)
    cos = F.cosine_similarity(g_s, g_t, dim=1)
    torch.testing.assert_close(jm.jacobian_matching_loss(g_s, g_t), (2 - 2 * cos).mean())


def test_jacobian_term_without_create_graph_is_detected():
    student = mlp()
    x = torch.randn(4, 6, requires_grad=True)
    jac_s = jm.input_jacobian(student(x), x, torch.zeros(4, dtype=torch.long))  # create_graph forgotten
    with pytest.raises(ValueError, match="create_graph=True"):
        jm.jacobian_matching_loss(jac_s, torch.randn(4, 6))
    with pytest.raises(ValueError, match="create_graph=True"):
        jm.jacobian_penalty(jac_s, "sq")
    with torch.no_grad():  # measuring only is allowed
        jm.jacobian_matching_loss(jac_s, torch.randn(4, 6))


def test_normalisation_is_per_sample_not_per_batch():
    g_t = torch.randn(2, 5, dtype=torch.float64)
    g_s = g_t.clone()
    g_s[0] *= 100.0  # same direction, different scale for one sample only
    g_s.requires_grad_()
    assert jm.jacobian_matching_loss(g_s, g_t).item() == pytest.approx(0.0, abs=1e-12)
    # A single global norm would have left a large mismatch.
    global_norm = (g_s / g_s.norm() - g_t / g_t.norm()).pow(2).sum(1).mean()
    assert global_norm.item() > 0.1


def test_zero_gradient_gives_no_nan():
    g_s = torch.zeros(3, 1, 4, 4, requires_grad=True)
    g_t = torch.zeros(3, 1, 4, 4)
    loss = jm.jacobian_matching_loss(g_s, g_t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(g_s.grad).all()


def test_mse_is_not_averaged_over_input_size():
    """The weight must not silently scale with image size: sum over D, not mean."""
    small_s, small_t = torch.ones(2, 1, 4, 4, requires_grad=True), torch.zeros(2, 1, 4, 4)
    big_s, big_t = torch.ones(2, 1, 8, 8, requires_grad=True), torch.zeros(2, 1, 8, 8)
    small = jm.jacobian_matching_loss(small_s, small_t, "sq")
    big = jm.jacobian_matching_loss(big_s, big_t, "sq")
    assert big.item() == pytest.approx(4 * small.item())


def test_bad_shapes_and_forms():
    s = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(ValueError, match="student_jac .* and teacher_jac .* differ in shape"):
        jm.jacobian_matching_loss(s, torch.randn(3, 5))
    with pytest.raises(ValueError, match="unknown Jacobian matching form"):
        jm.jacobian_matching_loss(s, torch.randn(3, 4), "cosine")
    with pytest.raises(ValueError, match="teacher_probs"):
        jm.jacobian_matching_loss(s, torch.randn(3, 4), "ce")
    with pytest.raises(ValueError, match="temperature"):
        jm.kd_loss(torch.randn(2, 3), torch.randn(2, 3), temperature=0)


def test_kd_loss_is_tau_squared_kl():
    zs, zt = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    tau = 3.0
    p_t = F.softmax(zt / tau, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(zs / tau, 1))).sum(1).mean()
    torch.testing.assert_close(jm.kd_loss(zs, zt, tau), tau**2 * kl)


def test_noisy_losses_antithetic_and_shapes():
    student, teacher = mlp(), mlp()
    x = torch.randn(3, 6)
    gen = torch.Generator().manual_seed(0)
    noisy = jm.gaussian_noise(x, 0.1, 4, antithetic=True, generator=gen)
    assert noisy.shape == (12, 6)
    torch.testing.assert_close((noisy[:6] - x.repeat(2, 1)), -(noisy[6:] - x.repeat(2, 1)))
    # each is its definition on the draws of the same generator: KD and CE on x + ξ
    y = torch.tensor([0, 1, 2])
    draws = jm.gaussian_noise(x, 0.1, 4, generator=torch.Generator().manual_seed(1))
    kd = jm.noisy_distillation_loss(student, teacher, x, 0.1, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(kd, jm.kd_loss(student(draws), teacher(draws).detach()))
    assert kd.requires_grad
    draws = jm.gaussian_noise(x, 0.1, 2, generator=torch.Generator().manual_seed(2))
    ce = jm.noise_training_loss(student, x, y, 0.1, 2, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ce, F.cross_entropy(student(draws), y.repeat(2)))
    with pytest.raises(ValueError, match="even"):
        jm.gaussian_noise(x, 0.1, 3, antithetic=True)
