"""The closed forms of docs/method.md §2 pinned to the Taylor identity, and the slopes of §4."""


import pytest
import torch
import torch.nn.functional as F
from torch.func import hessian

from jacmatch.core.propositions import CLOSED_FORMS, LOSSES
from jacmatch.experiments.verify import make_mlp, monte_carlo, sweep


@pytest.mark.parametrize("prop", list(CLOSED_FORMS))
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_full_form_is_value_plus_half_sigma_squared_laplacian(prop, activation):
    """Every full form equals ℓ(x) + (σ²/2) Δℓ(x) exactly (up to float64): this pins the
    algebra of §2 line by line against a Hessian of the loss itself."""
    teacher, student = make_mlp(4, 10, 3, activation, 0), make_mlp(4, 7, 3, activation, 1)
    x = torch.randn(4, dtype=torch.float64)
    y = F.one_hot(torch.tensor(2), 3).double()
    loss = lambda z: LOSSES[prop](teacher, student, z[None], y, 1.0)[0]  # noqa: E731
    sigma = 0.05
    expected = loss(x) + 0.5 * sigma**2 * hessian(loss)(x).diagonal().sum()
    full, short = CLOSED_FORMS[prop](teacher, student, x, y, sigma)
    torch.testing.assert_close(full, expected, atol=1e-12, rtol=1e-10)
    if activation == "tanh":
        assert abs(float(full - short)) > 1e-8, "the short form drops a term that is not zero here"


def test_monte_carlo_is_unbiased_for_a_quadratic():
    """For a quadratic ℓ the control variate is exact: the estimate has no error at all."""
    a = torch.randn(3, 3, dtype=torch.float64)
    loss = lambda z: (z @ a * z).sum(-1) + z.sum(-1)  # noqa: E731
    x = torch.randn(3, dtype=torch.float64)
    est, err = monte_carlo(loss, x, 0.3, 1000, torch.Generator().manual_seed(0))
    exact = float(loss(x[None])[0]) + 0.5 * 0.09 * float((a + a.T).diagonal().sum())
    assert est == pytest.approx(exact, abs=1e-12) and err < 1e-12


def test_slopes_on_a_smooth_network():
    sigmas = [10 ** e for e in (-2.5, -2.0, -1.5, -1.0)]
    records = sweep("tanh", sigmas, 20_000, seed=0)
    for r in records:
        assert r["slope"] is not None, r
        if r["form"] == "full":
            assert r["slope"] >= 3.5, r
        else:
            assert abs(r["slope"] - 2.0) < 0.2, r


def test_relu_squared_error_forms_are_exact_inside_a_linear_region():
    records = sweep("relu", [1e-3, 1e-2], 5_000, seed=0)
    for r in records:
        if r["proposition"] in ("1-sq", "2-sq"):
            assert max(r["residuals"]) < 1e-12, r
            assert r["slope"] is None
