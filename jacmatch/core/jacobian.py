"""Input-output Jacobians of a network and their estimators (docs/method.md §1, §3.1, §3.2).

Everything here is a small pure function of tensors. A network maps inputs ``x`` of
shape [B, ...] to outputs ``z`` of shape [B, k]; ``J(x) = ∂z/∂x`` has shape
[k, *x.shape[1:]] per sample. Samples are assumed not to interact (see the note on
BatchNorm in :func:`input_jacobian`), so one backward pass of a sum over the batch gives
every sample's gradient at once.

Estimators of the full Jacobian (docs/method.md §3.1):

- exact rows: :func:`input_jacobian` with an index per sample ([B] or [B, m]);
- random output projections: :func:`output_projections` then
  :func:`vector_jacobian_product`, ``E‖vᵀ(J_T − J_S)‖² = ‖J_T − J_S‖²_F``;
- random input directions: :func:`input_directions` then
  :func:`jacobian_vector_product` (forward-mode AD) or
  :func:`finite_difference_jvp` (no double backward at all),
  ``E‖(J_T − J_S)u‖² = ‖J_T − J_S‖²_F``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from ..errors import UsageError
from .draws import per_sample_draw

__all__ = [
    "input_jacobian",
    "vector_jacobian_product",
    "output_projections",
    "PROJECTIONS",
    "input_directions",
    "jacobian_vector_product",
    "finite_difference_jvp",
    "label",
    "teacher_top1",
    "teacher_top_k",
    "all_outputs",
    "math_attention",
    "scaled_gradients",
    "first_failing_module",
]


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Scaled dot-product attention on PyTorch's math kernel inside the block.

    The fused kernels (flash, memory-efficient, cuDNN, and the CPU flash kernel) have no
    double backward, so a student with attention (a ViT) cannot take a Jacobian term's
    gradient through them. The math kernel computes the same attention from matmuls and a
    softmax, which have one. :class:`~jacmatch.core.objective.TransferObjective` runs the
    student's forward pass in this block whenever a term back-propagates through the
    student's input gradient; a loop of one's own calls the student inside it::

        with jm.math_attention():
            zs = student(x.requires_grad_())
        loss = jm.JacobianMatchingLoss(10.0)(x, zs, teacher)
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        yield


def _check_graph_inputs(outputs: Tensor, inputs: Tensor) -> None:
    if not isinstance(inputs, Tensor) or not inputs.requires_grad:
        raise ValueError(
            "inputs does not require grad: call inputs.requires_grad_() before the forward "
            "pass that computes outputs"
        )
    if not isinstance(outputs, Tensor) or outputs.grad_fn is None:
        raise ValueError(
            "outputs has no autograd graph: compute outputs from inputs with grad enabled "
            "(not under torch.no_grad(), not detached)"
        )
    if outputs.dim() != 2 or outputs.shape[0] != inputs.shape[0]:
        raise UsageError(
            f"outputs must be [B, k] with B = inputs.shape[0] = {inputs.shape[0]}, "
            f"got {tuple(outputs.shape)}: flatten the network's outputs to [B, k]"
        )
    if not torch.isfinite(inputs).all():
        raise UsageError("inputs contains NaN or Inf: clean the batch before taking Jacobians")


_GRAD_SCALE: contextvars.ContextVar[float | None] = contextvars.ContextVar("jacmatch_grad_scale", default=None)


@contextlib.contextmanager
def scaled_gradients(scale: float | None) -> Iterator[None]:
    """Mixed precision as PyTorch's AMP gradient-penalty recipe takes it: inside the block,
    every input gradient taken with ``create_graph=True`` (the student's side of a Jacobian
    term) back-propagates ``scale`` times the outputs, so that fp16 gradients do not
    underflow, and is divided by ``scale`` before it is returned (the term sees the
    unscaled Jacobian). ``scale`` is the GradScaler's current scale; None: no scaling."""
    token = _GRAD_SCALE.set(scale)
    try:
        yield
    finally:
        _GRAD_SCALE.reset(token)


def _grad(outputs: Tensor, inputs: Tensor, grad_outputs: Tensor | None, *,
          create_graph: bool, batched: bool = False) -> Tensor:
    scale = _GRAD_SCALE.get() if create_graph else None
    if scale is not None:
        grad_outputs = (torch.ones_like(outputs) if grad_outputs is None else grad_outputs) * scale
    (g,) = torch.autograd.grad(
        outputs, inputs, grad_outputs=grad_outputs, create_graph=create_graph,
        retain_graph=True, allow_unused=True, is_grads_batched=batched,
    )
    if g is None:
        raise ValueError(
            "outputs were not computed from inputs: pass the tensor that went into the "
            "network's forward pass as inputs"
        )
    return g if scale is None else g / scale


def vector_jacobian_product(outputs: Tensor, inputs: Tensor, vectors: Tensor, *,
                            create_graph: bool = False, vectorize: bool = False) -> Tensor:
    """Per-sample ``vᵀ J``: ``vectors`` [B, k] gives [B, *in]; [B, m, k] gives [B, m, *in].

    With m vectors per sample the m products run as a loop of m backward passes, or with
    ``vectorize`` as one vmapped pass (``is_grads_batched``). The loop is the default:
    on CPU the vmapped double backward is no faster at m = 10 and many times slower at
    m = 100 (``jacmatch bench --profile`` measures both; see BENCHMARKS.md).
    ``create_graph=True`` keeps the graph so that a loss of the result can be
    back-propagated to the parameters (double backward, docs/method.md §3.2).
    """
    _check_graph_inputs(outputs, inputs)
    if vectors.dim() == 2:
        if vectors.shape != outputs.shape:
            raise UsageError(f"vectors must be {tuple(outputs.shape)} like outputs, got {tuple(vectors.shape)}")
        return _grad(outputs, inputs, vectors, create_graph=create_graph)
    if vectors.dim() != 3 or vectors.shape[0] != outputs.shape[0] or vectors.shape[2] != outputs.shape[1]:
        raise UsageError(
            f"vectors must be [B, m, k] = [{outputs.shape[0]}, m, {outputs.shape[1]}], got {tuple(vectors.shape)}"
        )
    if vectorize:
        g = _grad(outputs, inputs, vectors.transpose(0, 1), create_graph=create_graph, batched=True)
        return g.transpose(0, 1)
    rows = [_grad(outputs, inputs, vectors[:, j], create_graph=create_graph) for j in range(vectors.shape[1])]
    return torch.stack(rows, dim=1)


def input_jacobian(outputs: Tensor, inputs: Tensor, index: Tensor, *,
                   create_graph: bool = False, vectorize: bool = False) -> Tensor:
    """Rows of the input-output Jacobian: ``∂ outputs[b, index[b]] / ∂ inputs[b]``.

    ``index`` is a LongTensor [B] (one output per sample, result [B, *in]) or [B, m]
    (result [B, m, *in]). One output per sample is selected with ``gather`` so that
    exactly one class per sample is differentiated (docs/method.md §3.2); the sum over the
    batch then gives each sample's own gradient because samples do not interact.

    BatchNorm: in eval mode samples are independent and the rows are exact. In train
    mode the batch statistics couple the samples, and the result is the gradient of
    ``Σ_b outputs[b, index[b]]`` with respect to ``inputs[b]``, which includes the
    other samples' terms through the batch mean and variance. The library takes the
    student's Jacobian in train mode, in the same forward pass as its logits, which is
    how the student is trained; the teacher is always in eval mode (exact rows).
    """
    _check_graph_inputs(outputs, inputs)
    if not isinstance(index, Tensor) or index.dtype not in (torch.int64, torch.int32):
        raise UsageError("index must be an integer tensor [B] or [B, m] of output indices")
    batch, k = outputs.shape
    if index.shape[0] != batch or index.dim() not in (1, 2):
        raise UsageError(f"index must be [B] or [B, m] with B = {batch}, got {tuple(index.shape)}")
    if index.numel() and (index.min() < 0 or index.max() >= k):
        raise UsageError(f"index out of range: outputs have k = {k} entries, index spans "
                         f"[{int(index.min())}, {int(index.max())}]")
    index = index.long()
    if index.dim() == 1 or index.shape[1] == 1:
        # One output per sample: a plain backward pass of a gathered sum, never a vmapped one.
        selected = outputs.gather(1, index.reshape(batch, 1)).sum()
        g = _grad(selected, inputs, None, create_graph=create_graph)
        return g if index.dim() == 1 else g.unsqueeze(1)
    onehot = torch.zeros(batch, index.shape[1], k, dtype=outputs.dtype, device=outputs.device)
    onehot.scatter_(2, index[:, :, None], 1.0)
    return vector_jacobian_product(outputs, inputs, onehot, create_graph=create_graph, vectorize=vectorize)


# ---- Which outputs to match (docs/method.md §3.1) -------------------------------------------


def label(labels: Tensor) -> Tensor:
    """The ground-truth class of each sample: index [B]."""
    return labels.long()


def teacher_top1(teacher_logits: Tensor) -> Tensor:
    """The teacher's predicted class of each sample: index [B]."""
    return teacher_logits.argmax(dim=1)


def teacher_top_k(teacher_logits: Tensor, k: int) -> Tensor:
    """The teacher's k largest outputs of each sample: index [B, k]."""
    if not 1 <= k <= teacher_logits.shape[1]:
        raise UsageError(f"top_k must be in [1, {teacher_logits.shape[1]}], got {k}")
    return teacher_logits.topk(k, dim=1).indices


def all_outputs(teacher_logits: Tensor) -> Tensor:
    """Every output of every sample: index [B, k] (k vector-Jacobian products)."""
    batch, k = teacher_logits.shape
    return torch.arange(k, device=teacher_logits.device).expand(batch, k)


# ---- Random projections (docs/method.md §3.1) ---------------------------------------------


#: Output projection kinds: each has E[v vᵀ] = I_k, so the mean of ‖vᵀA‖² is ‖A‖²_F.
#: ``auto``: the lowest variance measured (``jacmatch estimators``): rademacher for one
#: projection, orthogonal for several.
PROJECTIONS = ("auto", "gaussian", "sphere", "orthogonal", "rademacher")


def output_projections(batch: int, num_classes: int, num_projections: int = 1, *,
                       generator: torch.Generator | None = None, dtype=torch.float32,
                       device=None, kind: str = "gaussian") -> Tensor:
    """Random projections of the k outputs: [B, P, k], each with ``E[v vᵀ] = I_k`` so that
    ``E (1/P) Σ_p ‖v_pᵀ A‖² = ‖A‖²_F`` for any [k, D] matrix A.

    ``gaussian``: v ~ N(0, I_k). ``sphere``: uniform on the sphere of radius √k.
    ``orthogonal``: the P vectors of a sample are orthonormal (blocks of k when P > k; the
    directions of a random orthogonal matrix), scaled by √k; with P = k the estimate is
    exact. ``rademacher``: independent ±1 entries. All but gaussian have a lower variance
    (``jacmatch estimators`` measures it; docs/method.md §3.1); ``auto`` takes the lowest
    measured: rademacher for P = 1, orthogonal for P > 1."""
    if num_projections < 1:
        raise UsageError(f"num_projections must be >= 1, got {num_projections}")
    if kind not in PROJECTIONS:
        raise UsageError(f"unknown projection kind {kind!r}: use one of {PROJECTIONS}")
    if kind == "auto":
        kind = "rademacher" if num_projections == 1 else "orthogonal"
    draw_device = "cpu" if generator is not None and generator.device.type == "cpu" else device
    if kind == "orthogonal":
        blocks = -(-num_projections // num_classes)  # ceil: P > k takes several orthonormal blocks
        g = per_sample_draw(torch.randn, (batch, blocks, num_classes, num_classes), generator=generator,
                            dtype=dtype, device=draw_device)
        q, r = torch.linalg.qr(g)  # columns of q: a random orthonormal basis (signs fixed by r's diagonal)
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
        v = q.transpose(-2, -1).reshape(batch, blocks * num_classes, num_classes)[:, :num_projections]
        v = v * math.sqrt(num_classes)
    elif kind == "rademacher":
        bits = per_sample_draw(lambda shape, **kw: torch.randint(0, 2, shape, **kw), (batch, num_projections, num_classes),
                               generator=generator, device=draw_device)
        v = (2 * bits - 1).to(dtype)
    else:
        v = per_sample_draw(torch.randn, (batch, num_projections, num_classes), generator=generator, dtype=dtype,
                            device=draw_device)
        if kind == "sphere":
            v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12) * math.sqrt(num_classes)
    return v.to(device) if device is not None else v


def input_directions(inputs: Tensor, num_directions: int = 1, *,
                     generator: torch.Generator | None = None) -> Tensor:
    """``u ~ N(0, I_D)`` per sample: [B, P, *in]. ``E‖A u‖² = ‖A‖²_F``."""
    if num_directions < 1:
        raise UsageError(f"num_directions must be >= 1, got {num_directions}")
    shape = (inputs.shape[0], num_directions, *inputs.shape[1:])
    gen_device = generator.device if generator is not None else inputs.device
    u = per_sample_draw(torch.randn, shape, generator=generator, dtype=inputs.dtype, device=gen_device)
    return u.to(inputs.device)


def _flatten_directions(inputs: Tensor, directions: Tensor) -> tuple[Tensor, Tensor, int]:
    if directions.dim() != inputs.dim() + 1 or directions.shape[0] != inputs.shape[0] \
            or directions.shape[2:] != inputs.shape[1:]:
        raise UsageError(f"directions must be [B, P, *inputs.shape[1:]], got {tuple(directions.shape)} "
                         f"for inputs {tuple(inputs.shape)}")
    p = directions.shape[1]
    x = inputs.detach().unsqueeze(1).expand_as(directions).reshape(-1, *inputs.shape[1:])
    return x, directions.reshape(-1, *inputs.shape[1:]), p


def jacobian_vector_product(fn: Callable[[Tensor], Tensor], inputs: Tensor,
                            directions: Tensor) -> tuple[Tensor, Tensor]:
    """Forward-mode ``J u`` for directions [B, P, *in]: returns (outputs [B, P, k], Ju [B, P, k]).

    The tangent keeps its graph to the parameters of ``fn`` (reverse over forward), so a
    loss of ``Ju`` trains them; no input gradient and no double backward are built.
    """
    x, u, p = _flatten_directions(inputs, directions)
    with fwAD.dual_level():
        out = fwAD.unpack_dual(fn(fwAD.make_dual(x, u)))
        primal, tangent = out.primal, out.tangent
    if tangent is None:
        raise ValueError("fn's outputs do not depend on its inputs: no forward-mode tangent")
    b = inputs.shape[0]
    return primal.reshape(b, p, -1), tangent.reshape(b, p, -1)


def finite_difference_jvp(fn: Callable[[Tensor], Tensor], inputs: Tensor, directions: Tensor, *,
                          step: float = 1e-3, central: bool = False,
                          outputs: Tensor | None = None) -> Tensor:
    """``(f(x + h u) − f(x)) / h`` (or the central form): [B, P, k], an O(h) (O(h²)) estimate of ``J u``.

    This is Proposition 1 read right to left: no input gradient, no double backward.
    ``outputs`` may pass ``f(x)`` [B, k] already computed, to save a forward pass.
    """
    if step <= 0:
        raise UsageError(f"step must be > 0, got {step}")
    x, u, p = _flatten_directions(inputs, directions)
    b = inputs.shape[0]
    plus = fn(x + step * u).reshape(b, p, -1)
    if central:
        minus = fn(x - step * u).reshape(b, p, -1)
        return (plus - minus) / (2 * step)
    base = outputs if outputs is not None else fn(inputs)
    return (plus - base.reshape(b, 1, -1)) / step


def first_failing_module(model: nn.Module, x: Tensor) -> str | None:
    """The first leaf module (in forward order) whose output's input-gradient cannot be
    differentiated again, found by re-running each leaf on the input it was given."""
    seen: list[tuple[str, nn.Module, Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: seen.append((name, mod, inp[0])))
             for name, m in model.named_modules() if not list(m.children()) and name]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    for name, module, inp in seen:
        if not isinstance(inp, Tensor) or not inp.is_floating_point():
            continue
        z = inp.detach().clone().requires_grad_()
        try:
            out = module(z)
            if not isinstance(out, Tensor) or not out.requires_grad:
                continue
            (g,) = torch.autograd.grad((out * torch.randn_like(out)).sum(), z, create_graph=True, allow_unused=True)
            if g is not None and g.requires_grad:
                g.pow(2).sum().backward()
        except RuntimeError as exc:
            if "derivative for" in str(exc) or "not implemented" in str(exc):
                return f"{name} ({type(module).__name__})"
    return None
