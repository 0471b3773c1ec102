"""Data sets as a user writes them, reached by import path (``--dataset user_data:make_dataset``)."""

import torch


class Stripes(torch.utils.data.Dataset):
    """A map-style data set of (image [1, 8, 8], label): a bright row per class."""

    classes = ["a", "b", "c", "d"]

    def __init__(self, n: int, seed: int, bad_label: int | None = None):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 4
        self.x = 0.4 * torch.rand(n, 1, 8, 8, generator=g)
        self.x[torch.arange(n), 0, 2 * self.y] = 1.0
        if bad_label is not None:
            self.y[3] = bad_label

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def make_dataset():
    return Stripes(120, 0), Stripes(40, 1)


def labels_out_of_range():
    return Stripes(40, 0, bad_label=5)


def not_a_dataset():
    return 42


class RandomFlips(Stripes):
    """Stripes whose __getitem__ flips each image at random, as a user's augmentation does."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return (x.flip(-1) if torch.rand(()) < 0.5 else x), y


def random_flips():
    return RandomFlips(120, 0), Stripes(40, 1)
