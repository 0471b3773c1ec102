"""Models defined outside jacmatch, reached by import path (``user_models:tiny_cnn``)."""

from torch import nn


def tiny_cnn(num_classes=10, in_channels=1, width=8):
    """A plain CNN: jacmatch passes num_classes and in_channels, since it names them."""
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(4 * width, num_classes))


class TupleNet(nn.Module):
    """Returns (logits, features), like a network with an auxiliary output."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, num_classes)
        self.aux = nn.Linear(4, num_classes)

    def forward(self, x):
        h = self.body(x)
        return self.head(h), self.aux(h)


class HFOutput(dict):
    """A Hugging Face-style output: a mapping with a ``logits`` entry."""


class DictNet(TupleNet):
    def forward(self, x):
        logits, _ = super().forward(x)
        return HFOutput(logits=logits, hidden=x)


def se_net(num_classes=10, in_channels=3):
    """Squeeze-excitation with Hardsigmoid (as MobileNetV3): not twice differentiable as it is."""
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.Hardswish(),
                         nn.Sequential(nn.Conv2d(8, 8, 1), nn.Hardsigmoid()),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
