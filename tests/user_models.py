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


class BatchSensitive(nn.Module):
    """A teacher that is a function of each sample, but not the same function in batches of
    different sizes: its input is scaled by 1 + B/100 for a batch of B. Kernels that round
    differently for each batch size (oneDNN's channels-last convolution for a batch of
    one) do the same in the last bits, which a max-pooling teacher's ties turn into O(1)
    changes of its Jacobian; this one does it at a size that no rounding can hide."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x * (1 + x.shape[0] / 100))
