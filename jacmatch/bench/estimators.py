"""``jacmatch estimators``: the random estimators measured, to choose their defaults.

1. **Output projections.** For a teacher and a student, ``A = J_T − J_S`` per sample
   ([k, D]); a projection estimate of ``‖A‖²_F`` is ``(1/P) Σ_p v_pᵀ (A Aᵀ) v_p``. Over
   ``draws`` draws of each kind (gaussian, sphere, orthogonal, rademacher) and P, its
   mean (against the exact value, in standard errors) and its relative variance.
2. **Finite differences.** ``(f(x + h u) − f(x)) / h`` (the estimator's forward form)
   and the central form against the exact ``J u`` (forward-mode AD), over a range of h,
   on a ReLU network and the same network with smooth activations: the relative error.

Networks: the committed Fashion-MNIST teacher (ResNet-20) and a small CNN student on
Fashion-MNIST test images when those are there, else both at random initialisation on
uniform noise (the JSON says which).
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from ..atomic import write_json_atomic
from ..core import jacobian as J
from ..models import create_model

__all__ = ["projection_variance", "fd_error_table", "main"]

TEACHER = Path("results/teachers/fmnist_resnet20.pt")
STEPS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)


def _networks(samples: int, seed: int) -> tuple[nn.Module, nn.Module, Tensor, str]:
    """(teacher, student, inputs, where they come from)."""
    torch.manual_seed(seed)
    student = create_model("small_cnn_16", 10, 1).eval()
    try:
        from ..data import create_dataset
        from ..training import load_model
        teacher, _ = load_model(TEACHER)
        x, _ = create_dataset("fashion-mnist").test.batch(torch.arange(samples))
        return teacher.eval(), student, x, f"{TEACHER} on Fashion-MNIST test images"
    except Exception:  # noqa: BLE001 - a machine without the data or the checkpoint measures on noise
        teacher = create_model("resnet20", 10, 1).eval()
        return teacher, student, torch.rand(samples, 1, 28, 28), "random initialisation, uniform noise inputs"


def _gram(teacher: nn.Module, student: nn.Module, x: Tensor) -> Tensor:
    """``(J_T − J_S)(J_T − J_S)ᵀ`` per sample: [B, k, k] (all k rows, exactly)."""
    rows = []
    for net in (teacher, student):
        xs = x.clone().requires_grad_()
        z = net(xs)
        rows.append(J.input_jacobian(z, xs, J.all_outputs(z.detach())).flatten(2).detach())
    a = (rows[0] - rows[1]).double()
    return a @ a.transpose(1, 2)


def projection_variance(gram: Tensor, draws: int = 4000, projections=(1, 4, 16), seed: int = 0) -> dict:
    """Per kind and P: the mean estimate's distance from ``tr(A Aᵀ)`` in standard errors
    (the worst sample), and the relative variance of one estimate (mean over samples)."""
    exact = gram.diagonal(dim1=1, dim2=2).sum(-1)  # [B]
    b, k = gram.shape[:2]
    out: dict = {}
    for kind in J.PROJECTIONS[1:]:  # auto is one of the others
        gen = torch.Generator().manual_seed(seed)
        for p in projections:
            v = J.output_projections(b * draws, k, p, generator=gen, dtype=torch.float64, kind=kind)
            v = v.reshape(draws, b, p, k)
            est = torch.einsum("nbpk,bkl,nbpl->nb", v, gram, v) / p  # [draws, B]
            mean, sd = est.mean(0), est.std(0)
            out[f"{kind}_p{p}"] = {"kind": kind, "projections": p,
                                   "max_bias_in_se": float(((mean - exact).abs() / (sd / math.sqrt(draws))).max()),
                                   "relative_variance": float((sd.pow(2) / exact.pow(2)).mean())}
    for row in out.values():
        row["variance_over_gaussian"] = row["relative_variance"] / out[f"gaussian_p{row['projections']}"][
            "relative_variance"]
    return out


def _without_max_pool(net: nn.Module, smooth: bool = False) -> nn.Module:
    """A copy with max pooling made average pooling (max pooling over the constant
    background of real images has ties, where no difference quotient converges), and
    with ``smooth`` every ReLU module made Softplus(β = 10)."""
    net = copy.deepcopy(net)
    for name, module in list(net.named_modules()):
        new = nn.AvgPool2d(module.kernel_size, module.stride) if isinstance(module, nn.MaxPool2d) else \
            nn.Softplus(beta=10.0) if smooth and isinstance(module, nn.ReLU) else None
        if new is not None:
            parent, _, leaf = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, leaf, new)
    return net


def fd_error_table(net: nn.Module, x: Tensor, steps=STEPS, directions: int = 4, seed: int = 0) -> list[dict]:
    """Relative error ‖estimate − J u‖ / ‖J u‖ of the forward and central differences, per h."""
    u = J.input_directions(x, directions, generator=torch.Generator().manual_seed(seed))
    exact = J.jacobian_vector_product(net, x, u)[1].detach()
    with torch.no_grad():
        base = net(x)
        rows = []
        for h in steps:
            errors = {}
            for form, central in (("forward", False), ("central", True)):
                est = J.finite_difference_jvp(net, x, u, step=h, central=central, outputs=base)
                errors[form] = float((est - exact).norm() / exact.norm())
            rows.append({"step": h, **errors})
    return rows


def main(json_path: str | None, samples: int = 32, draws: int = 4000, seed: int = 0) -> dict:
    start = time.time()
    teacher, student, x, source = _networks(samples, seed)
    variance = projection_variance(_gram(teacher, student, x), draws, seed=seed)
    print(f"output projections ({source}; {draws} draws, {samples} samples):")
    for key, row in variance.items():
        print(f"  {key:<16} variance/gaussian {row['variance_over_gaussian']:6.3f}   "
              f"relative variance {row['relative_variance']:9.4f}   |bias| ≤ {row['max_bias_in_se']:.1f} SE")
    fd = {"ReLU teacher (resnet20)": fd_error_table(teacher, x, seed=seed),
          "ReLU student (small_cnn_16, average pooling)": fd_error_table(_without_max_pool(student), x, seed=seed),
          "smooth student (Softplus, average pooling)": fd_error_table(_without_max_pool(student, True), x, seed=seed),
          "ReLU student with max pooling (ties)": fd_error_table(student, x, seed=seed)}
    for name, rows in fd.items():
        print(f"finite differences, {name}: " + ", ".join(f"h={r['step']:g}: {100 * r['forward']:.1f}% "
                                                           f"({100 * r['central']:.1f}%)" for r in rows))
    results = {"source": source, "samples": samples, "draws": draws, "seed": seed, "projections": variance,
               "finite_differences": fd, "torch": torch.__version__, "seconds": time.time() - start}
    if json_path:
        write_json_atomic(json_path, results)
    return results
