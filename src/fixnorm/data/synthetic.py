"""Deterministic synthetic images, for throughput tests and smoke runs without any dataset on disk."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fixnorm.errors import FixNormError

# Fixed so that every seed draws its samples from the same classes: seed 0 and seed 1
# then make a train and a test split of one task, not two unrelated tasks.
_TEMPLATE_SEED = 0x5EED


def synthetic_dataset(
    num_samples: int, image_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (uint8 images (N, *image_shape), int64 labels (N,)), identical for identical arguments.

    Each image is half a fixed per-class template plus half uniform noise, so
    the labels are learnable (a smoke run's loss falls) while pixels stay spread
    around mean 0.5, std ~0.2 of full scale.
    """
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise FixNormError(f"image_shape must be three positive ints (C, H, W), got {tuple(image_shape)}")
    if num_samples < 0:
        raise FixNormError(f"num_samples must be >= 0, got {num_samples}")
    if num_classes < 1:
        raise FixNormError(f"num_classes must be >= 1, got {num_classes}")
    g = torch.Generator().manual_seed(_TEMPLATE_SEED)
    templates = torch.randint(0, 128, (num_classes, *shape), generator=g, dtype=torch.uint8)
    g.manual_seed(int(seed))
    labels = torch.randint(0, num_classes, (num_samples,), generator=g)
    noise = torch.randint(0, 128, (num_samples, *shape), generator=g, dtype=torch.uint8)
    return noise.add_(templates[labels]), labels
