"""Models that are not registered here: a Python import path, torchvision or timm.

``create_model("package.module:factory", 10, 3)`` imports ``package.module``, calls
``factory`` (with ``num_classes`` and ``in_channels`` when it takes them, plus any
options) and wraps the result in :class:`ExternalClassifier`, which normalises pixels
in [0, 1] when asked and picks the logits out of whatever the model returns.
``torchvision:NAME`` and ``timm:NAME`` build those libraries' models with random
weights (load trained ones with ``--teacher-weights``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .._extras import require
from .._imports import import_callable
from ..core.outputs import logits_of
from ..errors import UsageError
from .base import NormalizedInput

__all__ = ["ExternalClassifier", "build_external", "is_import_path", "replace_hard_activations"]


def is_import_path(spec: str) -> bool:
    """``module.path:callable``: code that loading a checkpoint would import and run."""
    return ":" in spec and spec.split(":", 1)[0] not in ("torchvision", "timm")


def _accepts(fn: Callable, name: str, *, by_name: bool = False) -> bool:
    """Whether ``fn`` takes keyword ``name`` (``by_name``: named in its signature, not
    only through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return not by_name
    return name in params or (not by_name and any(p.kind is p.VAR_KEYWORD for p in params.values()))


def _factory(spec: str, in_channels: int) -> tuple[Callable[..., nn.Module], dict]:
    source, _, target = spec.partition(":")
    if not target:
        raise UsageError(f"model {spec!r}: write module.path:callable, torchvision:NAME or timm:NAME")
    if source == "torchvision":
        tv = require("torchvision", "vision")
        if target not in tv.models.list_models():
            raise UsageError(f"torchvision has no model {target!r}: see torchvision.models.list_models()")
        return (lambda **kw: tv.models.get_model(target, weights=None, **kw)), {}
    if source == "timm":
        timm = require("timm", "vision")
        if not timm.is_model(target):
            raise UsageError(f"timm has no model {target!r}: see timm.list_models()")
        return (lambda **kw: timm.create_model(target, pretrained=False, **kw)), {"in_chans": in_channels}
    return import_callable(spec, "model"), {}


def build_external(spec: str, num_classes: int, in_channels: int, **options) -> nn.Module:
    """The bare network of ``spec``, called with ``num_classes`` (and ``in_channels``)
    when its factory accepts them, plus ``options``."""
    fn, extra = _factory(spec, in_channels)
    kwargs = dict(extra)
    if _accepts(fn, "num_classes"):
        kwargs["num_classes"] = num_classes
    if not extra and _accepts(fn, "in_channels", by_name=True):
        kwargs["in_channels"] = in_channels
    kwargs.update(options)
    try:
        net = fn(**kwargs)
    except TypeError as exc:
        raise UsageError(f"model {spec!r} does not take {sorted(kwargs)}: {exc}") from None
    if not isinstance(net, nn.Module):
        raise UsageError(f"model {spec!r} returned a {type(net).__name__}, not a torch.nn.Module")
    return net


class ExternalClassifier(NormalizedInput):
    """Pixels in [0, 1] -> (optionally) normalised -> ``net`` -> logits [B, k]."""

    feature_names: tuple[str, ...] = ()

    def __init__(self, net: nn.Module, num_classes: int, in_channels: int, *, output: str | int | None = None,
                 normalize: bool = True, math_attention: bool = False):
        super().__init__(in_channels)
        self.net = net
        self.math_attention = math_attention
        self.num_classes = num_classes
        self.output = output
        self.normalize = normalize

    def forward(self, x: Tensor) -> Tensor:
        if self.normalize:
            x = self.normalized(x)
        if not self.math_attention:
            return logits_of(self.net(x), self.output)
        # The fused CPU/GPU attention kernels have no double backward; the math one does.
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.MATH):
            return logits_of(self.net(x), self.output)


class _Hardsigmoid(nn.Module):
    """``clamp(x + 3, 0, 6) / 6``: the same values as ``nn.Hardsigmoid``, and a double backward."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.clamp(x + 3, 0, 6) / 6


class _Hardswish(_Hardsigmoid):
    """``x · clamp(x + 3, 0, 6) / 6``: the same values as ``nn.Hardswish``."""

    def forward(self, x: Tensor) -> Tensor:
        return x * super().forward(x)


def replace_hard_activations(model: nn.Module) -> list[str]:
    """Replace every ``nn.Hardsigmoid`` and ``nn.Hardswish`` (in place) by a twice-
    differentiable module with the same outputs; returns the names replaced.
    ``aten::hardsigmoid_backward`` has no derivative, so a student using it cannot take
    the Jacobian term's double backward."""
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            swap = _Hardswish() if isinstance(child, nn.Hardswish) else \
                _Hardsigmoid() if isinstance(child, nn.Hardsigmoid) else None
            if swap is not None:
                setattr(module, child_name, swap)
                replaced.append(f"{name}.{child_name}" if name else child_name)
    return replaced
