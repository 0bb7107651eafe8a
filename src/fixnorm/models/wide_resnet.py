"""Wide ResNets for 32x32 inputs (Zagoruyko & Komodakis 2016, "Wide Residual Networks").

WRN-d-k: a 3x3 stem with 16 channels, three stages of (d-4)/6 pre-activation basic blocks with
16k/32k/64k channels (strides 1, 2, 2), a final BN-ReLU, global average pooling and a linear
classifier. Dropout (the paper's 0.3 for some runs) sits between the two convs of a block.
"""

from __future__ import annotations

from fixnorm.errors import FixNormError

from .preact_resnet import PreActResNet


def wide_resnet(
    depth: int, widen_factor: int, num_classes: int = 10, in_channels: int = 3, drop_rate: float = 0.0
) -> PreActResNet:
    """WRN-depth-widen_factor; depth must be 6n+4 (n blocks per stage, two convs each)."""
    if depth < 10 or (depth - 4) % 6:
        raise FixNormError(f"wide ResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
    n = (depth - 4) // 6
    widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
    return PreActResNet((n, n, n), widths, num_classes, in_channels, drop_rate, stem_width=16)


def wrn(num_classes: int = 10, in_channels: int = 3, depth: int = 16, widen_factor: int = 1,
        drop_rate: float = 0.0) -> PreActResNet:
    """Any WRN-depth-widen_factor by name (``model=wrn``, ``model_kwargs={depth: 16, widen_factor: 2}``)."""
    return wide_resnet(depth, widen_factor, num_classes, in_channels, drop_rate)


def wrn16_4(num_classes: int = 10, in_channels: int = 3, drop_rate: float = 0.0) -> PreActResNet:
    """WRN-16-4, about 2.75M parameters at 10 classes."""
    return wide_resnet(16, 4, num_classes, in_channels, drop_rate)


def wrn28_10(num_classes: int = 10, in_channels: int = 3, drop_rate: float = 0.0) -> PreActResNet:
    """WRN-28-10, about 36.5M parameters at 10 classes."""
    return wide_resnet(28, 10, num_classes, in_channels, drop_rate)
