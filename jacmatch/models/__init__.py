"""Models by name: ``create_model("resnet20", num_classes=10, in_channels=1)``.

Every model takes images with pixel values in [0, 1], normalises them itself (mean and
std are buffers, saved with the weights), and exposes ``feature_names``: the modules
whose outputs attention transfer may tap (``FeatureTaps``). All run on 1×28×28 and
3×32×32 inputs (global pooling before the classifier); the small ones on 8×8 too.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .base import NormalizedInput
from .external import ExternalClassifier, build_external, is_import_path, replace_hard_activations

__all__ = ["create_model", "list_models", "register_model", "Classifier", "count_parameters", "takes_input",
           "smallest_input", "dry_forward",
           "ExternalClassifier", "is_import_path", "replace_hard_activations"]

_MODELS: dict[str, Callable[..., "Classifier"]] = {}


def register_model(name: str):
    def wrap(factory):
        _MODELS[name] = factory
        return factory
    return wrap


def list_models(pattern: str = "*") -> list[str]:
    import fnmatch
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


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
        raise ValueError(f"num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}")
    if name in _MODELS:
        try:
            model = _MODELS[name](num_classes=num_classes, in_channels=in_channels, **kwargs)
        except TypeError as exc:
            raise ValueError(f"bad options {kwargs} for model {name!r}: {exc}") from None
    elif ":" in name:
        model = ExternalClassifier(build_external(name, num_classes, in_channels, **kwargs), num_classes,
                                   in_channels, output=output, normalize=normalize, math_attention=math_attention)
    else:
        raise ValueError(f"unknown model {name!r}: choose one of {list_models()}, or give an import path "
                         "package.module:callable, torchvision:NAME or timm:NAME")
    if replace_hard_activations:
        _replace_hard(model)
    if normalize:
        model.set_normalization(mean or [0.0] * in_channels, std or [1.0] * in_channels)
    # What rebuilds the model from a checkpoint; options at their defaults are left out.
    chosen = {"output": output, "normalize": normalize, "replace_hard_activations": replace_hard_activations,
              "math_attention": math_attention}
    defaults = {"output": None, "normalize": True, "replace_hard_activations": False, "math_attention": False}
    model.arch = {"name": name, "num_classes": num_classes, "in_channels": in_channels, **kwargs,
                  **{k: v for k, v in chosen.items() if v != defaults[k]}}
    return model


_replace_hard = replace_hard_activations


def dry_forward(model: nn.Module, shape: Sequence[int]) -> Tensor | None:
    """``model``'s output on one zero sample of ``shape`` (C, H, W), in eval mode and
    without a graph; None when the model cannot take that shape."""
    was_training = model.training
    device = next(iter(model.buffers()), next(iter(model.parameters()), torch.zeros(0))).device
    model.eval()
    try:
        with torch.no_grad():
            return model(torch.zeros(1, *shape, device=device))
    except (RuntimeError, ValueError):
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


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Classifier(NormalizedInput):
    """Normalise, ``features`` (a Sequential of named stages), pool, ``classifier``."""

    feature_names: tuple[str, ...] = ()

    def __init__(self, num_classes: int, in_channels: int):
        super().__init__(in_channels)
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(f"{type(self).__name__} expects images [B, {self.mean.shape[1]}, H, W], "
                             f"got {tuple(x.shape)}")
        return self.head(self.body(self.normalized(x)))

    def body(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def head(self, h: Tensor) -> Tensor:
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


# ---- small CNN family and LeNet-5 -------------------------------------------------------


class SmallCNN(Classifier):
    """Three conv stages of width w, 2w, 4w (ReLU; BatchNorm optional), global average pool."""

    feature_names = ("layer1", "layer2", "layer3")

    def __init__(self, num_classes, in_channels, width: int = 16, batchnorm: bool = False):
        super().__init__(num_classes, in_channels)

        def stage(cin, cout, pool):
            layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=not batchnorm)]
            layers += [nn.BatchNorm2d(cout)] if batchnorm else []
            layers += [nn.ReLU(inplace=False)] + ([nn.MaxPool2d(2)] if pool else [])
            return nn.Sequential(*layers)
        self.layer1 = stage(in_channels, width, True)
        self.layer2 = stage(width, 2 * width, True)
        self.layer3 = stage(2 * width, 4 * width, False)
        self.classifier = nn.Linear(4 * width, num_classes)

    def body(self, x):
        return self.layer3(self.layer2(self.layer1(x)))


for _w in (4, 8, 16, 32, 64):
    register_model(f"small_cnn_{_w}")(lambda num_classes, in_channels, w=_w, **kw:
                                      SmallCNN(num_classes, in_channels, width=w, **kw))
register_model("small_cnn")(SmallCNN)


@register_model("lenet5")
class LeNet5(Classifier):
    """LeCun et al. 1998, with ReLU and max pooling; the 5×5 map before the classifier is
    reached by adaptive pooling, so 28×28 and 32×32 inputs both work."""

    feature_names = ("layer1", "layer2")

    def __init__(self, num_classes, in_channels):
        super().__init__(num_classes, in_channels)
        self.layer1 = nn.Sequential(nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))
        self.layer2 = nn.Sequential(nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 25, 120), nn.ReLU(), nn.Linear(120, 84),
                                        nn.ReLU(), nn.Linear(84, num_classes))

    def body(self, x):
        return self.layer2(self.layer1(x))

    def head(self, h):
        return self.classifier(nn.functional.adaptive_avg_pool2d(h, 5))


# ---- CIFAR ResNets (He et al. 2016) -----------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(Classifier):
    feature_names = ("layer1", "layer2", "layer3")

    def __init__(self, num_classes, in_channels, depth: int, widths: Sequence[int]):
        super().__init__(num_classes, in_channels)
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        cin, stages = widths[0], []
        for i, w in enumerate(widths[1:]):
            blocks = [BasicBlock(cin if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.layer1, self.layer2, self.layer3 = stages
        self.classifier = nn.Linear(cin, num_classes)

    def body(self, x):
        return self.layer3(self.layer2(self.layer1(self.stem(x))))


for _name, _depth, _widths in (("resnet20", 20, (16, 16, 32, 64)), ("resnet32", 32, (16, 16, 32, 64)),
                               ("resnet56", 56, (16, 16, 32, 64)), ("resnet8x4", 8, (32, 64, 128, 256)),
                               ("resnet32x4", 32, (32, 64, 128, 256))):
    register_model(_name)(lambda num_classes, in_channels, d=_depth, w=_widths:
                          CifarResNet(num_classes, in_channels, d, w))


# ---- Wide ResNets (Zagoruyko & Komodakis 2016) ------------------------------------------


class WideBlock(nn.Module):
    """Pre-activation basic block."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        o = torch.relu(self.bn1(x))
        y = self.conv2(torch.relu(self.bn2(self.conv1(o))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(Classifier):
    feature_names = ("layer1", "layer2", "layer3")

    def __init__(self, num_classes, in_channels, depth: int, widen: int):
        super().__init__(num_classes, in_channels)
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        cin, stages = widths[0], []
        for i, w in enumerate(widths[1:]):
            stages.append(nn.Sequential(*[WideBlock(cin if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1)
                                          for j in range(n)]))
            cin = w
        self.layer1, self.layer2, self.layer3 = stages
        self.final = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU())
        self.classifier = nn.Linear(cin, num_classes)

    def body(self, x):
        return self.final(self.layer3(self.layer2(self.layer1(self.stem(x)))))


for _d, _w in ((16, 1), (16, 2), (16, 4), (28, 2), (40, 1), (40, 2), (40, 4)):
    register_model(f"wrn_{_d}_{_w}")(lambda num_classes, in_channels, d=_d, w=_w:
                                     WideResNet(num_classes, in_channels, d, w))


# ---- VGG (with BatchNorm, as in the KD literature's CIFAR code) -------------------------

_VGG = {"vgg8": [[64], [128], [256], [512], [512]],
        "vgg9": [[64], [128], [256, 256], [512], [512]],
        "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]]}


class VGG(Classifier):
    feature_names = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, num_classes, in_channels, cfg, width_divisor: int = 1):
        super().__init__(num_classes, in_channels)
        cin, stages = in_channels, []
        for i, group in enumerate(cfg):
            layers = []
            for c in group:
                c //= width_divisor
                layers += [nn.Conv2d(cin, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
                cin = c
            if i < len(cfg) - 1:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            stages.append(nn.Sequential(*layers))
        self.layer0, self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.classifier = nn.Linear(cin, num_classes)

    def body(self, x):
        for stage in (self.layer0, self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
        return x


for _name, _cfg in _VGG.items():
    register_model(_name)(lambda num_classes, in_channels, cfg=_cfg, width_divisor=1:
                          VGG(num_classes, in_channels, cfg, width_divisor))
