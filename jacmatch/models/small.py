"""A small CNN family (widths 4 to 64) and LeNet-5: students sized for CPUs."""

from __future__ import annotations

from torch import nn

from ._registry import register_model
from .base import Classifier


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
