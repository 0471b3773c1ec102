"""Every Jacobian estimator pinned against torch.autograd.functional.jacobian."""

import pytest
import torch
from helpers import SmallCNN, mlp
from torch.autograd.functional import jacobian

import jacmatch as jm


def reference_jacobian(net, x):
    """[B, k, *in]: the per-sample blocks of the full batch Jacobian (samples independent)."""
    full = jacobian(net, x)  # [B, k, B, *in]
    b = x.shape[0]
    return torch.stack([full[i, :, i] for i in range(b)])


def nets_and_inputs():
    torch.manual_seed(1)
    yield "mlp", mlp().double(), torch.randn(5, 6, dtype=torch.float64)
    for bn in (True, False):
        net = SmallCNN(batchnorm=bn).double().eval()
        if bn:
            net.bn.running_mean.uniform_(-0.5, 0.5)
            net.bn.running_var.uniform_(0.5, 2.0)
        yield f"cnn-bn{bn}", net, torch.randn(5, 1, 6, 6, dtype=torch.float64)


CASES = list(nets_and_inputs())


@pytest.mark.parametrize("name,net,x", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("selector", ["label", "teacher_top1", "top_k", "all"])
@pytest.mark.parametrize("vectorize", [True, False])
def test_input_jacobian_rows_match_autograd(name, net, x, selector, vectorize):
    ref = reference_jacobian(net, x)
    xg = x.clone().requires_grad_()
    z = net(xg)
    labels = torch.tensor([0, 3, 1, 2, 1])[: x.shape[0]] % z.shape[1]
    index = {"label": lambda: jm.label(labels), "teacher_top1": lambda: jm.teacher_top1(z.detach()),
             "top_k": lambda: jm.teacher_top_k(z.detach(), 2), "all": lambda: jm.all_outputs(z.detach())}[selector]()
    got = jm.input_jacobian(z, xg, index, vectorize=vectorize)
    if index.dim() == 1:
        expected = ref[torch.arange(x.shape[0]), index]
    else:
        expected = torch.stack([ref[b, index[b]] for b in range(x.shape[0])])
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_one_class_per_sample_is_selected():
    net = mlp().double()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    z = net(x)
    ref = reference_jacobian(net, x.detach())
    got = jm.input_jacobian(z, x, torch.tensor([0, 1, 2]))
    # A common bug: marking all three classes for every sample gives the row sum.
    wrong = ref[:, [0, 1, 2]].sum(dim=1)
    torch.testing.assert_close(got, ref[torch.arange(3), torch.tensor([0, 1, 2])])
    assert not torch.allclose(got, wrong)


def test_output_projection_estimator_is_unbiased():
    torch.manual_seed(2)
    t, s = mlp().double(), mlp().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    exact = (reference_jacobian(t, x) - reference_jacobian(s, x)).pow(2).sum(dim=(1, 2))  # ‖J_T − J_S‖²_F
    gen = torch.Generator().manual_seed(0)
    xg = x.clone().requires_grad_()
    zt, zs = t(xg), s(xg)
    v = jm.output_projections(4, 4, 4000, generator=gen, dtype=torch.float64)
    diff = jm.vector_jacobian_product(zt, xg, v) - jm.vector_jacobian_product(zs, xg, v)
    draws = diff.pow(2).sum(dim=2)  # [B, P]
    mean, se = draws.mean(dim=1), draws.std(dim=1) / 4000**0.5
    assert ((mean - exact).abs() < 3 * se).all(), (mean, exact, se)


def test_input_direction_estimators_are_unbiased_and_fd_converges():
    torch.manual_seed(3)
    t, s = mlp().double(), mlp().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    jt, js = reference_jacobian(t, x), reference_jacobian(s, x)
    exact = (jt - js).pow(2).sum(dim=(1, 2))
    u = jm.input_directions(x, 4000, generator=torch.Generator().manual_seed(1))
    _, tu = jm.jacobian_vector_product(t, x, u)
    _, su = jm.jacobian_vector_product(s, x, u)
    torch.testing.assert_close(tu, torch.einsum("bkd,bpd->bpk", jt, u))
    draws = (tu - su).pow(2).sum(dim=2)
    mean, se = draws.mean(dim=1), draws.std(dim=1) / 4000**0.5
    assert ((mean - exact).abs() < 3 * se).all()
    errors = [(jm.finite_difference_jvp(t, x, u[:, :8], step=h) - tu[:, :8]).abs().max().item()
              for h in (1e-1, 1e-2, 1e-3)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-2 * errors[0]
    central = (jm.finite_difference_jvp(t, x, u[:, :8], step=1e-3, central=True) - tu[:, :8]).abs().max()
    assert central < errors[2]


def test_forward_mode_tangent_trains_the_parameters():
    s = mlp().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    u = jm.input_directions(x, 2)
    _, su = jm.jacobian_vector_product(s, x, u)
    su.pow(2).sum().backward()
    assert s[1].weight.grad is not None and s[1].weight.grad.abs().sum() > 0


def test_batchnorm_train_mode_couples_samples():
    """In train mode the batch statistics couple the samples, so the batch-summed gradient
    differs from each sample's own Jacobian row; in eval mode they agree exactly."""
    torch.manual_seed(4)
    net = SmallCNN(batchnorm=True).double()
    x = torch.randn(6, 1, 6, 6, dtype=torch.float64)
    index = torch.arange(6) % 5
    rows = {}
    for mode in ("train", "eval"):
        getattr(net, mode)()
        xg = x.clone().requires_grad_()
        rows[mode] = jm.input_jacobian(net(xg), xg, index)
    torch.testing.assert_close(rows["eval"], reference_jacobian(net.eval(), x)[torch.arange(6), index])
    # Each sample's own output differentiated with the other samples held fixed, in train mode.
    net.train()
    own = torch.stack([
        jacobian(lambda xi, b=b: net(torch.cat([x[:b], xi[None], x[b + 1:]]))[b, index[b]], x[b])
        for b in range(6)])
    assert (rows["train"] - own).abs().max() > 1e-6


@pytest.mark.parametrize("bad", ["no_grad_input", "no_graph", "index_range", "index_shape", "nan", "unused"])
def test_bad_input_gives_clear_value_error(bad):
    net = mlp()
    x = torch.randn(3, 6, requires_grad=True)
    z = net(x)
    idx = torch.tensor([0, 1, 2])
    if bad == "no_grad_input":
        x2 = torch.randn(3, 6)
        with pytest.raises(ValueError, match="inputs does not require grad"):
            jm.input_jacobian(net(x2), x2, idx)
    elif bad == "no_graph":
        with pytest.raises(ValueError, match="outputs has no autograd graph"):
            jm.input_jacobian(z.detach(), x, idx)
    elif bad == "index_range":
        with pytest.raises(ValueError, match="index out of range"):
            jm.input_jacobian(z, x, torch.tensor([0, 1, 4]))
    elif bad == "index_shape":
        with pytest.raises(ValueError, match="index must be"):
            jm.input_jacobian(z, x, torch.tensor([0, 1]))
    elif bad == "nan":
        xn = x.detach().clone()
        xn[0, 0] = float("nan")
        xn.requires_grad_()
        with pytest.raises(ValueError, match="NaN"):
            jm.input_jacobian(net(xn), xn, idx)
    elif bad == "unused":
        other = torch.randn(3, 6, requires_grad=True)
        with pytest.raises(ValueError, match="not computed from inputs"):
            jm.input_jacobian(z, other, idx)
