"""Data sets by name, the standard file formats, augmentation."""

from .augment import random_crop_flip
from .config import DataConfig
from .datasets import (DataSplits, ImageSet, create_dataset, dataset_kind, dataset_name, list_datasets, load_data,
                       register_dataset, stratified_subset)
from .formats import DataError, read_cifar_batch, read_idx
from .sources import list_sources, register_source
from .splits import Split

__all__ = ["DataConfig", "DataSplits", "ImageSet", "create_dataset", "dataset_kind", "dataset_name", "load_data", "list_datasets",
           "register_dataset", "stratified_subset", "random_crop_flip", "Split", "register_source", "list_sources",
           "DataError", "read_idx", "read_cifar_batch"]
