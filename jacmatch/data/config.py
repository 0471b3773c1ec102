"""What a run reads: the data set, its few-sample draw and validation split, its views
(crops, flips, mixup, CutMix) and how its samples are decoded. The data layer's own config,
checked here; a run's config (:class:`~jacmatch.training.config.RunConfig`) holds one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError, check_range
from .datasets import dataset_kind

__all__ = ["DataConfig", "READS_DATA_DIR"]

#: The built-in data sets that read data.data_dir (the others refuse it).
READS_DATA_DIR = ("fashion-mnist", "mnist", "cifar10", "cifar100")


@dataclass
class DataConfig:
    name: str = "digits"          # built-in name, folder of class subfolders, npz:PATH, hf:PATH or module:callable
    data_dir: str | None = None   # folder of a built-in data set's files (fashion-mnist, mnist, cifar10, cifar100)
    samples_per_class: int | None = None   # n: few-sample training sets
    val_size: float = 0.1                  # fraction (< 1) or count of the training set
    split_seed: int = 0                    # the validation split does not move with the seed
    classes: list | None = None            # keep only these classes (transfer tasks)
    augment: bool = False                  # random crop (padding 2 or 4) and flips where valid
    crop_padding: int = 2                  # padding of the random crop, in pixels
    mixup: float = 0.0                     # mixup's Beta(α, α) α (0: off): each sample mixed with a partner
    cutmix: float = 0.0                    # CutMix's α (0: off); with mixup too, each sample takes one of them
    download: bool = False                 # fetch missing files (checksummed) when online
    image_size: Any = None                 # H (= W) or [H, W]: resize every image of a source (needed when sizes differ)
    resize: str = "resize"                 # resize | center_crop (short side to image_size, then the centre)
    channels: int | None = None            # 1 (grey) or 3 (RGB) for an image source; default: the images' own
    image_column: str = "image"            # hf:PATH: the column of the images
    label_column: str = "label"            # hf:PATH: the column of the labels
    test_size: float = 0.2                 # a source without a test split: this part of it is drawn as the test set
    mean: list | None = None               # per-channel pixel mean (default: streamed over the training pool)
    std: list | None = None                # per-channel pixel std (default: streamed over the training pool)
    options: dict = field(default_factory=dict)  # keyword arguments of a package.module:callable data set
    workers: int = -1                      # processes decoding a source's samples (-1: min(4, CPUs / 2); 0: none)
    cache_mib: int = 512                   # decoded samples of a source kept for the next epochs (MiB; 0: none)
    on_bad_sample: str = "stop"            # stop | skip: a sample that cannot be read stops the run, or is skipped and counted
    random_views: bool = False             # the data set draws a new view at each read (random augmentation in __getitem__)

    def check(self) -> None:
        """The data set's name, the folder only the built-in file formats read, the source
        options and the ranges, one line each."""
        for key, value, low, high, optional in (
                ("data.samples_per_class", self.samples_per_class, 1, 1e9, True),
                ("data.val_size", self.val_size, 0, 1e9, False),
                ("data.crop_padding", self.crop_padding, 0, 64, False),
                ("data.mixup", self.mixup, 0, 1e3, False),
                ("data.cutmix", self.cutmix, 0, 1e3, False)):
            check_range(key, value, low, high, optional=optional)
        kind, _ = dataset_kind(self.name)
        if self.data_dir is not None and (kind != "builtin" or self.name in ("digits", "synthetic")):
            what = self.name if kind == "builtin" else f"the {kind} data set {self.name!r}"
            raise UsageError(f"--data-dir (data.data_dir={self.data_dir!r}) is read only by "
                             f"{', '.join(READS_DATA_DIR)}, not by {what}: name the data set with --dataset (a folder "
                             f"goes there too: --dataset {self.data_dir})")
        size = self.image_size
        sizes = size if isinstance(size, list) else [size]
        if size is not None and (len(sizes) not in (1, 2) or not all(
                isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 8192 for v in sizes)):
            raise UsageError(f"data.image_size must be a side in 1..8192 or [H, W], got {size!r}")
        if self.channels not in (None, 1, 3):
            raise UsageError(f"data.channels must be 1 (grey) or 3 (RGB), got {self.channels!r}")
        if self.resize not in ("resize", "center_crop"):
            raise UsageError(f"data.resize must be resize or center_crop, got {self.resize!r}")
        if self.on_bad_sample not in ("stop", "skip"):
            raise UsageError(f"data.on_bad_sample must be stop or skip, got {self.on_bad_sample!r}")
        if not (isinstance(self.workers, int) and -1 <= self.workers <= 256):
            raise UsageError(f"data.workers must be -1 (auto), 0 or a count up to 256, got {self.workers!r}")
        if not (isinstance(self.cache_mib, int) and 0 <= self.cache_mib <= 1 << 20):
            raise UsageError(f"data.cache_mib must be a size in MiB, 0 to {1 << 20}, got {self.cache_mib!r}")
        if not 0 < self.test_size < 1:
            raise UsageError(f"data.test_size must be a fraction in (0, 1), got {self.test_size!r}")
        for key in ("mean", "std"):
            values = getattr(self, key)
            if values is not None and not all(isinstance(v, (int, float)) and not isinstance(v, bool) and
                                              math.isfinite(v) for v in values):
                raise UsageError(f"data.{key} must be a list of finite numbers, one per channel, got {values!r}")
