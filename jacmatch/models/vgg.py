"""VGG with BatchNorm, as in the KD literature's CIFAR code: vgg8, vgg9, vgg13."""

from __future__ import annotations

from torch import nn

from ._registry import register_model
from .base import Classifier

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
