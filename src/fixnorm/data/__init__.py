"""Datasets and data pipelines: in-memory datasets (Fashion-MNIST, CIFAR, synthetic) for the
device-side pipeline, a streaming ImageFolder loader for large datasets, batching, augmentation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fixnorm.data.augment import cutout, iterate_batches, normalize, random_crop_flip
from fixnorm.data.cifar import CIFAR_URL, load_cifar
from fixnorm.data.idx import DEFAULT_FASHION_MNIST_DIR, load_fashion_mnist, read_idx, write_idx
from fixnorm.data.imagefolder import (
    ImageFolderDataset,
    RandomResizedCropFlip,
    ResizeCenterCrop,
    SeededShardSampler,
    imagefolder_loader,
)
from fixnorm.data.synthetic import synthetic_dataset
from fixnorm.errors import FixNormError

#: Per-channel statistics of the Fashion-MNIST training images, for `normalize`.
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and `normalize` need to know about a dataset loaded by `load_dataset`."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


_INFO = {
    "fashion_mnist": DatasetInfo("fashion_mnist", 10, 1, 28, FASHION_MNIST_MEAN, FASHION_MNIST_STD),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "synthetic": DatasetInfo("synthetic", 10, 3, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}
_SYNTHETIC_SIZES = {"train": 5000, "test": 1000}

#: Names `load_dataset` accepts.
DATASETS = tuple(_INFO)


def load_dataset(
    name: str, data_dir: str | Path | None = None, split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor, DatasetInfo]:
    """Load an in-memory dataset by name as (uint8 NCHW images, int64 labels, DatasetInfo).

    `data_dir` defaults to `DEFAULT_FASHION_MNIST_DIR` for Fashion-MNIST, is
    required for CIFAR (fixnorm never downloads) and is ignored for "synthetic"
    (5000 train / 1000 test samples of one fixed task).
    """
    if name not in _INFO:
        raise FixNormError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    if split not in ("train", "test"):
        raise FixNormError(f"unknown split {split!r}; use 'train' or 'test'")
    info = _INFO[name]
    if name == "fashion_mnist":
        images, labels = load_fashion_mnist(data_dir, split)
    elif name == "synthetic":
        shape = (info.in_channels, info.image_size, info.image_size)
        seed = 0 if split == "train" else 1  # same classes, different samples
        images, labels = synthetic_dataset(_SYNTHETIC_SIZES[split], shape, info.num_classes, seed=seed)
    else:
        if data_dir is None:
            raise FixNormError(
                f"{name} needs data_dir: download it from {CIFAR_URL}, extract it and pass the "
                "folder that holds it"
            )
        images, labels = load_cifar(data_dir, name, split)
    return images, labels, info


__all__ = [
    "DATASETS",
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "DatasetInfo",
    "ImageFolderDataset",
    "RandomResizedCropFlip",
    "ResizeCenterCrop",
    "SeededShardSampler",
    "cutout",
    "imagefolder_loader",
    "iterate_batches",
    "load_cifar",
    "load_dataset",
    "load_fashion_mnist",
    "normalize",
    "random_crop_flip",
    "read_idx",
    "synthetic_dataset",
    "write_idx",
]
