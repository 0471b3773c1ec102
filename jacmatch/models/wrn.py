"""Wide ResNets (Zagoruyko & Komodakis 2016): wrn_DEPTH_WIDEN."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UsageError
from ._registry import register_model
from .base import Classifier, residual_stages


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
            raise UsageError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        stages, cin = residual_stages(WideBlock, widths, n)
        self.layer1, self.layer2, self.layer3 = stages
        self.final = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU())
        self.classifier = nn.Linear(cin, num_classes)

    def body(self, x):
        return self.final(self.layer3(self.layer2(self.layer1(self.stem(x)))))


for _d, _w in ((16, 1), (16, 2), (16, 4), (28, 2), (40, 1), (40, 2), (40, 4)):
    register_model(f"wrn_{_d}_{_w}")(lambda num_classes, in_channels, d=_d, w=_w:
                                     WideResNet(num_classes, in_channels, d, w))
