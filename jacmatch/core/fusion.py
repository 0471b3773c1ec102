"""A faster copy of a frozen teacher: BatchNorm folded into the layer before it.

A frozen teacher in eval mode needs neither BatchNorm's statistics nor weight gradients:
each BatchNorm that directly follows a convolution or a linear layer is an affine map
that PyTorch's own ``torch.nn.utils.fusion`` folds into that layer's weights. The
teacher's forward pass and its input-gradient (the Jacobian term's reverse pass) then
skip every BatchNorm, forward and backward (``jacmatch bench``: the teacher's
forward-plus-input-gradient of a ResNet-20 takes about 0.6× the time).

The user's teacher is never changed: the folding works on a copy, and the copy is
checked against the original on the batch it was built from; a copy that disagrees
(a layer pattern the folding misread) is dropped for the original.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from .outputs import logits_of

__all__ = ["fold_batchnorm", "fast_teacher"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _foldable_pairs(model: nn.Module, example: Tensor, keep: Iterable[str]) -> list[tuple[str, str]]:
    """(layer, batchnorm) names where the layer's output goes to the BatchNorm and nowhere
    else (read from the autograd graph of one forward pass of ``example``), each module
    called once. Pairs with a module named in ``keep`` are left alone: something reads
    that module's own output (a feature tap)."""
    keep = set(keep)
    names = {id(m): n for n, m in model.named_modules()}
    produced: dict[int, tuple[str, Tensor]] = {}
    calls: Counter = Counter()
    pairs: list[tuple[str, str, Tensor]] = []

    def after_layer(module, args, out):
        calls[names[id(module)]] += 1
        produced[id(out)] = (names[id(module)], out)

    def before_bn(module, args):
        calls[names[id(module)]] += 1
        source = produced.get(id(args[0])) if args else None
        if source is not None and source[1] is args[0]:
            pairs.append((source[0], names[id(module)], args[0]))

    hooks = [m.register_forward_hook(after_layer) for m in model.modules() if isinstance(m, (*_CONV, nn.Linear))]
    hooks += [m.register_forward_pre_hook(before_bn) for m in model.modules() if isinstance(m, _BN)]
    try:
        with torch.enable_grad():
            readers = _readers(model(example.detach().requires_grad_()))
    finally:
        for h in hooks:
            h.remove()
    return [(a, b) for a, b, out in pairs
            if calls[a] == 1 and calls[b] == 1 and not {a, b} & keep and readers[out.grad_fn] == 1]


def _readers(output) -> Counter:
    """How many operations read each autograd node's result, over the graph of ``output``
    (a tensor, or tensors in tuples, lists and dicts)."""
    roots = [t.grad_fn for t in _tensors(output) if t.grad_fn is not None]
    readers: Counter = Counter()
    seen, stack = set(), list(roots)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None:
                readers[child] += 1
                stack.append(child)
    for root in roots:
        readers[root] += 1  # an output is read by the caller
    return readers


def _tensors(value) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return [t for v in vars(value).values() for t in _tensors(v)] if hasattr(value, "__dict__") else []


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def fold_batchnorm(model: nn.Module, example: Tensor, keep: Iterable[str] = ()) -> nn.Module:
    """A copy of ``model`` in eval mode with every BatchNorm that directly follows a
    convolution or a linear layer folded into it (and replaced by ``nn.Identity``).
    ``example``: a batch the model takes (its layer order is read from one forward
    pass). ``keep``: module names whose outputs something reads (feature taps)."""
    folded = copy.deepcopy(model).eval()
    modules = dict(folded.named_modules())
    for layer, bn in _foldable_pairs(folded, example, keep):
        a, b = modules[layer], modules[bn]
        fused = fuse_conv_bn_eval(a, b) if isinstance(a, _CONV) else fuse_linear_bn_eval(a, b)
        _set(folded, layer, fused.requires_grad_(False))
        _set(folded, bn, nn.Identity())
    return folded


def fast_teacher(teacher: nn.Module, example: Tensor, *, fold: bool = True, channels_last: bool = True,
                 keep: Iterable[str] = (), output: str | int | None = None) -> nn.Module:
    """The copy of a frozen eval-mode ``teacher`` that the objective runs: BatchNorm folded
    (``fold``), weights channels-last (``channels_last``, for 4-D inputs). Checked against
    ``teacher`` on ``example`` (its logits: ``output`` as in :func:`logits_of`); on a
    mismatch the original is returned, with a warning."""
    if not (fold or channels_last):
        return teacher
    fast = fold_batchnorm(teacher, example, keep) if fold else copy.deepcopy(teacher).eval()
    if channels_last and example.dim() == 4:
        fast = fast.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    fast.requires_grad_(False)
    with torch.no_grad():
        want, got = logits_of(teacher(example), output), logits_of(fast(example), output)
    scale = want.abs().max().clamp_min(1.0)
    tol = 1e-3 if want.dtype in (torch.float16, torch.bfloat16) else 1e-4 if want.dtype == torch.float32 else 1e-9
    if (want - got).abs().max() > tol * scale:
        warnings.warn(f"folding the teacher's BatchNorm changed its outputs by {float((want - got).abs().max()):.2e}: "
                      "the teacher runs unfolded (set objective.teacher_fold_bn=false to silence this)", stacklevel=2)
        return teacher
    return fast
