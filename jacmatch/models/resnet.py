"""CIFAR ResNets (He et al. 2016): resnet20/32/56 and the KD literature's resnet8x4/32x4."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import UsageError
from ._registry import register_model
from .base import Classifier, residual_stages


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
            raise UsageError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, cin = residual_stages(BasicBlock, widths, n)
        self.layer1, self.layer2, self.layer3 = stages
        self.classifier = nn.Linear(cin, num_classes)

    def body(self, x):
        return self.layer3(self.layer2(self.layer1(self.stem(x))))


for _name, _depth, _widths in (("resnet20", 20, (16, 16, 32, 64)), ("resnet32", 32, (16, 16, 32, 64)),
                               ("resnet56", 56, (16, 16, 32, 64)), ("resnet8x4", 8, (32, 64, 128, 256)),
                               ("resnet32x4", 32, (32, 64, 128, 256))):
    register_model(_name)(lambda num_classes, in_channels, d=_depth, w=_widths:
                          CifarResNet(num_classes, in_channels, d, w))
