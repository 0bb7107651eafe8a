"""Datasets and device-side data pipeline: IDX/Fashion-MNIST loading, batching, augmentation."""

from fixnorm.data.augment import iterate_batches, normalize, random_crop_flip
from fixnorm.data.idx import DEFAULT_FASHION_MNIST_DIR, load_fashion_mnist, read_idx, write_idx

#: Per-channel statistics of the Fashion-MNIST training images, for `normalize`.
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "iterate_batches",
    "load_fashion_mnist",
    "normalize",
    "random_crop_flip",
    "read_idx",
    "write_idx",
]
