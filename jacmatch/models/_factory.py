"""Building a model by name or import path, and checking which inputs it takes
(timm's ``_factory.py`` in small)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import UsageError
from ._registry import list_models, model_factory
from .external import ExternalClassifier, build_external
from .external import replace_hard_activations as replace_hard

__all__ = ["create_model", "dry_forward", "takes_input", "smallest_input", "input_side", "count_parameters"]


def create_model(name: str, num_classes: int, in_channels: int, *, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, output: str | int | None = None, normalize: bool = True,
                 replace_hard_activations: bool = False, math_attention: bool = False, **kwargs) -> nn.Module:
    """A model by name: a registered one (``list_models()``), a Python import path
    ``package.module:callable``, or ``torchvision:NAME`` / ``timm:NAME``.

    ``kwargs`` go to the model's factory. ``normalize``: the model normalises pixels in
    [0, 1] with ``mean`` and ``std`` itself. ``output`` picks the logits out of a model
    that returns a tuple, a dict or an object (a key, a field or an index).
    ``replace_hard_activations``: Hardsigmoid/Hardswish become twice-differentiable
    modules with the same outputs (needed by a student under Jacobian matching).
    ``math_attention``: attention runs on PyTorch's math kernel, the one whose backward has
    a derivative (vision transformers as students).
    """
    if num_classes < 1 or in_channels < 1:
        raise UsageError(f"num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}")
    factory = model_factory(name)
    if factory is not None:
        try:
            model = factory(num_classes=num_classes, in_channels=in_channels, **kwargs)
        except TypeError as exc:
            raise UsageError(f"bad options {kwargs} for model {name!r}: {exc}") from None
    elif ":" in name:
        model = ExternalClassifier(build_external(name, num_classes, in_channels, **kwargs), num_classes,
                                   in_channels, output=output, normalize=normalize, math_attention=math_attention)
    else:
        raise UsageError(f"unknown model {name!r}: choose one of {list_models()}, or give an import path "
                         "package.module:callable, torchvision:NAME or timm:NAME")
    if replace_hard_activations:
        replace_hard(model)
    if normalize:
        model.set_normalization(mean or [0.0] * in_channels, std or [1.0] * in_channels)
    # What rebuilds the model from a checkpoint; options at their defaults are left out.
    chosen = {"output": output, "normalize": normalize, "replace_hard_activations": replace_hard_activations,
              "math_attention": math_attention}
    defaults = {"output": None, "normalize": True, "replace_hard_activations": False, "math_attention": False}
    model.arch = {"name": name, "num_classes": num_classes, "in_channels": in_channels, **kwargs,
                  **{k: v for k, v in chosen.items() if v != defaults[k]}}
    return model


def dry_forward(model: nn.Module, shape: Sequence[int]) -> Tensor | None:
    """``model``'s output on one zero sample of ``shape`` (C, H, W), in eval mode and
    without a graph; None when the model cannot take that shape."""
    was_training = model.training
    device = next(iter(model.buffers()), next(iter(model.parameters()), torch.zeros(0))).device
    model.eval()
    try:
        with torch.no_grad():
            return model(torch.zeros(1, *shape, device=device))
    except (RuntimeError, ValueError, AssertionError):  # timm asserts a ViT's input size
        return None
    finally:
        model.train(was_training)


def takes_input(model: nn.Module, shape: Sequence[int]) -> bool:
    """Whether ``model`` runs on one zero sample of ``shape`` (C, H, W)."""
    return dry_forward(model, shape) is not None


def smallest_input(model: nn.Module, channels: int, max_side: int = 256) -> int | None:
    """The smallest square side that ``model`` takes (None: none up to ``max_side``).
    Pooling and strided layers only ever need more pixels, so a bisection suffices."""
    if not takes_input(model, (channels, max_side, max_side)):
        return None
    lo, hi = 0, max_side  # lo fails (or is 0), hi works
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if takes_input(model, (channels, mid, mid)) else (mid, hi)
    return hi


#: The sides a model of one input size (a ViT) is most often built for.
COMMON_SIDES = (224, 384, 256, 299, 32, 28, 64, 96, 128, 512)


def input_side(model: nn.Module, channels: int) -> tuple[int | None, bool]:
    """``(side, only)``: the smallest square side ``model`` takes and False, or, for a model
    that takes one size only (a ViT), that size (the first of COMMON_SIDES it takes) and
    True; ``(None, True)`` when it takes none of them."""
    side = smallest_input(model, channels)
    if side is not None:
        return side, False
    return next((s for s in COMMON_SIDES if takes_input(model, (channels, s, s))), None), True


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
