"""The composed objective: frozen teacher, every estimator, cached targets, named terms."""

import pytest
import torch
from helpers import SmallCNN

import jacmatch as jm
from jacmatch.core.objective import JM_OUTPUTS
from helpers import batch, pair






@pytest.mark.parametrize("outputs", JM_OUTPUTS)
def test_every_estimator_trains_the_student_and_never_the_teacher(outputs):
    student, teacher = pair()
    form = "sq" if outputs in ("input_jvp", "input_fd") else "normalized"
    cfg = jm.ObjectiveConfig(alpha=1, beta=1, gamma=1, jm_outputs=outputs, jm_form=form, top_k=2,
                             num_projections=2)
    objective = jm.TransferObjective(student, teacher, cfg, generator=torch.Generator().manual_seed(0))
    x, y = batch()
    x.requires_grad_()  # a user's tensor that happens to require grad must stay untouched
    logits, total, terms = objective(x, y)
    assert set(terms) == {"ce", "kd", "jm"} and logits.shape == (6, 5)
    total.backward()
    assert x.grad is None
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training
    student.zero_grad()
    _, _, terms = objective(x, y)
    terms["jm"].backward()
    assert student.conv.weight.grad.abs().sum() > 0, "the Jacobian term must reach the student's parameters"


@pytest.mark.parametrize("outputs", ["teacher_top1", "top_k", "projection", "input_jvp"])
def test_cached_teacher_targets_give_the_same_step(outputs):
    student, teacher = pair()
    form = "sq" if outputs == "input_jvp" else "normalized"
    cfg = jm.ObjectiveConfig(beta=1, gamma=1, jm_outputs=outputs, jm_form=form, top_k=2, num_projections=3)
    x, y = batch()
    obj = jm.TransferObjective(student, teacher, cfg, generator=torch.Generator().manual_seed(1))
    _, direct, _ = obj(x, y)
    cached = obj.teacher_targets(x, y, full_jacobian=True)
    obj.generator = torch.Generator().manual_seed(1)
    _, via_cache, _ = obj(x, y, targets=cached)
    torch.testing.assert_close(direct, via_cache)


def _rows(model, x, fn=lambda z: z):
    """Every sample's Jacobian of ``fn(model(x))`` [B, K, D], one sample at a time (the slow reference)."""
    return torch.stack([torch.autograd.functional.jacobian(lambda v: fn(model(v[None]))[0], xi).flatten(1)
                        for xi in x])


def test_ce_form_penalties_and_noise_equal_their_formulas_computed_by_hand():
    """Each setting's total against docs/method.md's formula, with Jacobians taken one sample
    at a time by torch.autograd.functional.jacobian."""
    import torch.nn.functional as F
    student, teacher = pair()
    student.eval(), teacher.eval()  # BatchNorm on its running statistics: a sample's rows do not see the batch
    x, y = batch()
    ce, tau = F.cross_entropy(student(x), y), 8.0
    kd = tau ** 2 * F.kl_div(F.log_softmax(student(x) / tau, 1), F.log_softmax(teacher(x) / tau, 1),
                             reduction="batchmean", log_target=True)

    def total(cfg, teacher_given=True, generator=None):
        obj = jm.TransferObjective(student, teacher if teacher_given else None, cfg, generator=generator).eval()
        return obj(x, y)[1]
    # JM, ce form, every output: ½ Σ_i p_T,i ‖∇ log Sˢ_i − ∇ log Tˢ_i‖² with Sˢ = softmax(S/τ)
    log_s = _rows(student, x, lambda z: F.log_softmax(z / tau, 1))
    log_t = _rows(teacher, x, lambda z: F.log_softmax(z / tau, 1))
    p_t = F.softmax(teacher(x) / tau, 1)
    jm_ce = (0.5 * p_t * (log_s - log_t).pow(2).sum(2)).sum(1).mean()
    torch.testing.assert_close(total(jm.ObjectiveConfig(gamma=1, jm_form="ce", jm_outputs="all")), ce + kd + jm_ce)
    # penalty, ce form: ½‖∇ log softmax(S)_y‖²
    grad_y = _rows(student, x, lambda z: F.log_softmax(z, 1))[torch.arange(len(y)), y]
    penalty_ce = 0.5 * grad_y.pow(2).sum(1).mean()
    torch.testing.assert_close(total(jm.ObjectiveConfig(beta=0, gamma=0, penalty=0.1, penalty_form="ce"), False),
                               ce + 0.1 * penalty_ce)
    # penalty, sq form, by k orthogonal projections (exact at P = k): ‖J_S‖²_F
    frobenius = _rows(student, x).pow(2).sum((1, 2)).mean()
    cfg = jm.ObjectiveConfig(beta=0, gamma=0, penalty=0.1, penalty_form="sq", num_projections=5, projection="orthogonal")
    torch.testing.assert_close(total(cfg, False, torch.Generator().manual_seed(0)), ce + 0.1 * frobenius)
    # noise: CE and KD on the same M antithetic draws x + ξ
    cfg = jm.ObjectiveConfig(alpha=1, beta=1, gamma=0, noise_sigma=0.1, noise_draws=4, noise_antithetic=True)
    got = total(cfg, True, torch.Generator().manual_seed(3))
    noisy = jm.gaussian_noise(x, 0.1, 4, antithetic=True, generator=torch.Generator().manual_seed(3))
    zs = student(noisy)
    expected = F.cross_entropy(zs, y.repeat(4)) + tau ** 2 * F.kl_div(
        F.log_softmax(zs / tau, 1), F.log_softmax(teacher(noisy) / tau, 1), reduction="batchmean", log_target=True)
    torch.testing.assert_close(got, expected)
    assert got.requires_grad


def test_attention_transfer_with_jacobians():
    student, teacher = pair()
    x, y = batch()
    cfg = jm.ObjectiveConfig(alpha=1, beta=0, gamma=0, delta=1, delta_jacobian=1, at_layers=["bn:conv"])
    _, total, terms = jm.TransferObjective(student, teacher, cfg)(x, y)
    assert set(terms) == {"ce", "at", "at_jm"}
    total.backward()
    assert student.conv.weight.grad.abs().sum() > 0


def test_ce_penalty_is_the_short_form_of_noise_training():
    """Prop. 2 (CE, one-hot y): E CE(x+ξ) − CE(x) = σ²·(½‖∇ log Sˢ_y‖² − ½ ΔSˢ_y/Sˢ_y) + O(σ⁴).
    The penalty (ce form) is the first part; with the Laplacian term added, the library's
    noisy cross-entropy (Monte Carlo) must agree to its sampling error."""
    from torch.func import hessian
    torch.manual_seed(9)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 3)).double()
    x = torch.randn(1, 6, dtype=torch.float64)
    y = torch.tensor([1])
    obj = jm.TransferObjective(net, None, jm.ObjectiveConfig(alpha=0, beta=0, gamma=0, penalty=1.0, penalty_form="ce"))
    penalty = obj(x, y)[2]["penalty"].item()
    log_s = lambda z: torch.log_softmax(net(z[None]), dim=-1)[0, 1]  # noqa: E731
    s_y = lambda z: torch.softmax(net(z[None]), dim=-1)[0, 1]  # noqa: E731
    assert penalty == pytest.approx(0.5 * torch.func.grad(log_s)(x[0]).pow(2).sum().item(), rel=1e-12)
    full = penalty - 0.5 * (hessian(s_y)(x[0]).trace() / s_y(x[0])).item()
    sigma = 1e-2
    gen = torch.Generator().manual_seed(0)
    noisy = jm.noise_training_loss(net, x, y, sigma, 200_000, antithetic=True, generator=gen)
    measured = ((noisy - torch.nn.functional.cross_entropy(net(x), y)) / sigma**2).item()
    assert measured == pytest.approx(full, rel=0.02)
    assert abs(measured - penalty) > 0.1 * abs(full)  # the Laplacian term is not negligible here


def test_config_errors():
    student, teacher = pair()
    with pytest.raises(ValueError, match="need a teacher"):
        jm.TransferObjective(student, None, jm.ObjectiveConfig(beta=1))
    with pytest.raises(ValueError, match="jm_outputs"):
        jm.ObjectiveConfig(gamma=1, jm_outputs="everything").check()
    with pytest.raises(ValueError, match="jm_form=sq"):
        jm.ObjectiveConfig(gamma=1, jm_outputs="input_fd").check()
    with pytest.raises(ValueError, match="num_projections"):
        jm.ObjectiveConfig(gamma=1, num_projections=10**6).check()
    x, y = batch()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        jm.TransferObjective(student, teacher, jm.ObjectiveConfig(beta=1))(x, y)


def test_jacobian_cosine_is_one_for_identical_networks():
    student, _ = pair()
    x, _ = batch()
    torch.testing.assert_close(jm.jacobian_cosine(student.eval(), student, x), torch.ones(6, dtype=torch.float64))


@pytest.mark.parametrize("outputs", ["teacher_top1", "top_k", "all"])
def test_teacher_targets_in_chunks_equal_the_whole_batch(outputs):
    student, teacher = pair()
    x, y = batch()
    whole = jm.TransferObjective(student, teacher, jm.ObjectiveConfig(gamma=1, jm_outputs=outputs, top_k=2,
                                                                      teacher_chunk=0)).teacher_targets(x, y).tensors()
    chunked = jm.TransferObjective(student, teacher, jm.ObjectiveConfig(gamma=1, jm_outputs=outputs, top_k=2,
                                                                        teacher_chunk=4)).teacher_targets(x, y).tensors()
    assert whole.keys() == chunked.keys()
    for k in whole:
        torch.testing.assert_close(whole[k], chunked[k])


def test_bf16_autocast_agrees_with_float32():
    """Mixed precision: each term under bf16 autocast (CPU) within 2% (+1e-3) of float32, the
    Jacobian term included (its double backward runs under autocast too)."""
    torch.manual_seed(11)
    from jacmatch.models import create_model
    student, teacher = create_model("small_cnn_8", 5, 1), create_model("small_cnn_16", 5, 1)
    with torch.no_grad():  # a teacher unlike the student, so that KD is far from zero
        teacher.classifier.weight.mul_(20)
    x, y = torch.rand(16, 1, 12, 12), torch.randint(0, 5, (16,))
    cfg = jm.ObjectiveConfig(alpha=1, beta=1, gamma=1, jm_outputs="teacher_top1")
    obj = jm.TransferObjective(student, teacher, cfg)
    _, total32, terms32 = obj(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, total16, terms16 = obj(x, y)
    for k in terms32:
        assert abs(terms16[k].float().item() - terms32[k].item()) <= 0.02 * abs(terms32[k].item()) + 1e-3, k
    total16.float().backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters())


def test_attention_transfer_takes_a_teacher_of_another_class_count():
    """Transfer: AT and its Jacobians compare feature maps, not outputs, so an ImageNet-sized
    teacher teaches a 2-class student; KD between them is refused, naming both counts."""
    from torch import nn

    class Net(nn.Module):
        def __init__(self, k):
            super().__init__()
            self.layer1, self.head = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 64, k)

        def forward(self, x):
            return self.head(torch.tanh(self.layer1(x)).flatten(1))
    x, y = torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 0])
    at = jm.ObjectiveConfig(beta=0, gamma=0, delta=1.0, delta_jacobian=1.0, at_layers=["layer1:layer1"])
    _, total, terms = jm.TransferObjective(Net(2), Net(7).eval(), at)(x, y)
    assert set(terms) == {"ce", "at", "at_jm"} and torch.isfinite(total)
    with pytest.raises(ValueError, match="the teacher has 7 outputs and the student 2"):
        jm.TransferObjective(Net(2), Net(7).eval(), jm.ObjectiveConfig(beta=1.0))(x, y)


# ---- your loop: attention students, mixed precision, dead students --------------------------


class _Attention(torch.nn.Module):
    """A student with scaled dot-product attention, as a ViT calls it."""

    def __init__(self, k=5):
        super().__init__()
        self.embed, self.head = torch.nn.Linear(6, 8), torch.nn.Linear(8, k)

    def forward(self, x):
        h = self.embed(x.view(x.shape[0], 1, 6, 6))  # [B, heads, tokens, features]
        return self.head(torch.nn.functional.scaled_dot_product_attention(h, h, h).mean(dim=(1, 2)))


def test_an_attention_student_takes_the_jacobian_term_without_a_flag():
    """On the default (fused) CPU kernel the double backward fails; the objective runs the
    student on the math kernel whenever a term takes its input gradient."""
    student, teacher = _Attention(), SmallCNN(k=5)
    x, y = batch()
    x = x.float()
    xs = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="derivative for"):
        jm.JacobianMatchingLoss()(xs, student(xs), teacher).backward()
    _, total, _ = jm.TransferObjective(student, teacher)(x, y)
    total.backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in student.parameters())
    with jm.math_attention():  # the same in a loop of one's own
        zs = student(xs)
    jm.JacobianMatchingLoss()(xs, zs, teacher).backward()


@pytest.mark.parametrize("estimator", ["teacher_top1", "projection"])
def test_a_gradient_scale_changes_nothing_but_the_scale_of_the_backward(estimator):
    """PyTorch's AMP gradient-penalty recipe: the student's input gradients are taken from
    outputs times the scale and divided by it, so in fp32 the terms and the gradients equal
    those without a scale (to float rounding), the penalty's too."""
    cfg = jm.ObjectiveConfig(jm_outputs=estimator, penalty=0.5)
    results = []
    for scale in (None, 2.0 ** 16):
        student, teacher = pair()
        obj = jm.TransferObjective(student, teacher, cfg, generator=torch.Generator().manual_seed(0))
        _, total, terms = obj(*batch(), grad_scale=scale)
        total.backward()
        results.append((terms, [p.grad.clone() for p in student.parameters()]))
    (t1, g1), (t2, g2) = results
    assert all(torch.allclose(t1[k], t2[k], rtol=1e-5, atol=0) for k in t1)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(g1, g2))


def test_a_gradient_scale_keeps_fp16_input_gradients_from_underflowing():
    """Under fp16 autocast an input gradient below fp16's smallest subnormal (2^-24) vanishes
    unless scaled: with the scale it is the fp32 one. Weights of ±2^-17 are exact in fp16, so
    every product along the way is too: the Jacobian, 2^-34 times an integer, is exact."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 8, bias=False), torch.nn.Linear(8, 5, bias=False))
    with torch.no_grad():
        for layer in (net[1], net[2]):
            layer.weight.copy_(torch.randn_like(layer.weight).sign() * 2.0 ** -17)
    x = torch.rand(4, 1, 6, 6, requires_grad=True)
    idx = torch.zeros(4, dtype=torch.long)
    exact = jm.input_jacobian(net(x), x, idx, create_graph=True)
    with torch.autocast("cpu", dtype=torch.float16):
        plain = jm.input_jacobian(net(x), x, idx, create_graph=True)
        with jm.core.jacobian.scaled_gradients(2.0 ** 12):
            scaled = jm.input_jacobian(net(x), x, idx, create_graph=True)
    assert plain.abs().max() == 0 and exact.abs().max() > 0
    assert torch.equal(scaled.float(), exact)


def test_a_dead_student_is_named_once():
    """A ReLU student whose units are all off has an input Jacobian of zero: the Jacobian
    term (normalized: exactly 1) gives it no gradient, and a warning says so, once."""
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5))
    with torch.no_grad():
        student[1].bias.fill_(-100.0)
    student, teacher = student.double(), SmallCNN(k=5).double()
    obj = jm.TransferObjective(student, teacher)
    x, y = batch()
    with pytest.warns(jm.core.objective.DeadStudentWarning, match="zero for every sample"):
        _, _, terms = obj(x, y)
    assert terms["jm"].item() == pytest.approx(1.0)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        obj(x, y)  # once per objective
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jm.TransferObjective(*pair())(x, y)  # a live one: no warning


def test_teacher_targets_are_typed_per_term_and_select_samples():
    """The teacher's side is a TeacherTargets: its logits, and each term's own tensors under
    its key (JM's rows and AT's maps never share a name); selecting samples of it equals the
    teacher's side of those samples, which is what the cache relies on."""
    student, teacher = pair()
    x, y = batch()
    cfg = jm.ObjectiveConfig(delta=1.0, at_layers=["bn:conv"])
    obj = jm.TransferObjective(student, teacher, cfg)
    targets = obj.teacher_targets(x, y)
    assert isinstance(targets, jm.core.terms.TeacherTargets) and set(targets.terms) == {"jm", "at"}
    assert set(targets.of(obj.term_list[2])) == {"index", "jac"} and set(targets.terms["at"]) == {"at0"}
    index = torch.tensor([4, 1])
    part = obj.teacher_targets(x[index], y[index])
    assert part.tensors().keys() == targets[index].tensors().keys()
    for k, v in part.tensors().items():
        torch.testing.assert_close(targets[index].tensors()[k], v)
    assert jm.core.terms.TeacherTargets.cat([targets[index], targets[index]]).logits.shape[0] == 4
