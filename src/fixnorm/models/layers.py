"""Pieces shared by the models and the methods: conv-BN-activation, channel rounding, stochastic depth, and
forwards that leave BatchNorm's running statistics as they were."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fixnorm.errors import FixNormError


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to the nearest multiple of `divisor` (hardware-friendly widths), never
    dropping more than 10% below `value` (the rule of the MobileNet/EfficientNet reference code)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNAct(nn.Sequential):
    """Bias-free conv (the BN would cancel a bias), BN, and an optional activation; 'same' padding.
    Named children (conv, bn, act) keep parameter names readable in role tables and overrides."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int = 1,
        stride: int = 1,
        groups: int = 1,
        act: Callable[[], nn.Module] | None = nn.ReLU,
        bn_momentum: float = 0.1,
    ) -> None:
        layers = OrderedDict(
            conv=nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
            bn=nn.BatchNorm2d(cout, momentum=bn_momentum),
        )
        if act is not None:
            layers["act"] = act()
        super().__init__(layers)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): in training, zero a residual branch for each sample with
    probability `p` and scale the kept ones by 1/(1-p), so eval mode is the identity. The mask comes
    from torch's global RNG, so torch.manual_seed makes it reproducible."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise FixNormError(f"drop-path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = (torch.rand(shape, dtype=x.dtype, device=x.device) < keep).to(x.dtype)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class KeepBatchNormStatistics:
    """Restores the running statistics of every BatchNorm layer in ``modules`` on exit.

    For extra forwards in train mode (batch statistics) that must not count as training batches: A-FAN's
    adversarial forwards with ``bn_mode="frozen"``, the curvature probe. Restores through ``.data``, since a
    BatchNorm backward still to run holds these buffers and a tracked in-place write would void it.
    """

    def __init__(self, modules: Sequence[nn.Module], active: bool = True) -> None:
        self.layers = ([m for module in modules for m in module.modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm)] if active else [])

    def __enter__(self) -> KeepBatchNormStatistics:
        self.saved = [[b.clone() for b in layer.buffers()] for layer in self.layers]
        return self

    def __exit__(self, *exc: object) -> None:
        for layer, saved in zip(self.layers, self.saved):
            for buffer, value in zip(layer.buffers(), saved):
                buffer.data.copy_(value)
