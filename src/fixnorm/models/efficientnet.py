"""EfficientNet-B0 (Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for CNNs").

A strided 3x3 stem, seven stages of MBConv blocks (inverted residuals with squeeze-excite), a
1x1 conv to 1280 channels, global average pooling, dropout 0.2 and a linear classifier, SiLU
throughout. Residual blocks use stochastic depth whose rate grows linearly with the block index.
`cifar=True` uses a stride-1 stem so 32x32 inputs end at 2x2 instead of 1x1.

Note for scale invariance: the two SE convs carry biases and feed a sigmoid gate, so they are
not scale-invariant; every other conv is followed by BN and is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cifar_resnet import init_resnet_
from .layers import ConvBNAct, DropPath

# (expansion, kernel, first stride, output channels, blocks), table 1 of the paper
SETTINGS = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
            (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))


class SqueezeExcite(nn.Module):
    """Channel gate: global average pool, 1x1 reduce + SiLU, 1x1 expand + sigmoid, multiply."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.expand = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.expand(F.silu(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class MBConv(nn.Module):
    """1x1 expand (skipped at expansion 1), kxk depthwise, SE (squeeze to a quarter of the block's
    input channels), linear 1x1 projection; stochastic depth on the branch when the shape is kept."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int, expansion: int,
        drop_path: float = 0.0, bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        hidden = cin * expansion
        conv = dict(act=nn.SiLU, bn_momentum=bn_momentum)
        self.expand = ConvBNAct(cin, hidden, **conv) if expansion != 1 else nn.Identity()
        self.dw = ConvBNAct(hidden, hidden, kernel, stride, groups=hidden, **conv)
        self.se = SqueezeExcite(hidden, max(1, cin // 4))
        self.project = ConvBNAct(hidden, cout, act=None, bn_momentum=bn_momentum)
        self.residual = stride == 1 and cin == cout
        self.drop_path = DropPath(drop_path) if self.residual else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.dw(self.expand(x))))
        return x + self.drop_path(out) if self.residual else out


class EfficientNet(nn.Module):
    """EfficientNet-B0. `bn_momentum` uses PyTorch's convention (weight of the new batch statistic):
    TensorFlow's decay 0.99 is 0.01 here. Block i of N gets drop-path rate drop_path_rate * i / N."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        drop_rate: float = 0.2,
        drop_path_rate: float = 0.2,
        bn_momentum: float = 0.1,
        cifar: bool = False,
    ) -> None:
        super().__init__()
        conv = dict(act=nn.SiLU, bn_momentum=bn_momentum)
        layers: list[nn.Module] = [ConvBNAct(in_channels, 32, 3, 1 if cifar else 2, **conv)]
        blocks = [(e, k, s if i == 0 else 1, c) for e, k, s, c, n in SETTINGS for i in range(n)]
        cin = 32
        for index, (expansion, kernel, stride, cout) in enumerate(blocks):
            rate = drop_path_rate * index / len(blocks)
            layers.append(MBConv(cin, cout, kernel, stride, expansion, rate, bn_momentum))
            cin = cout
        layers.append(ConvBNAct(cin, 1280, **conv))
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(1280, num_classes)
        init_resnet_(self)
        bound = 1 / math.sqrt(num_classes)  # the reference initialisation
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.pool(self.features(x))))


def efficientnet_b0(
    num_classes: int = 1000, in_channels: int = 3, drop_rate: float = 0.2, drop_path_rate: float = 0.2,
    bn_momentum: float = 0.1, cifar: bool = False,
) -> EfficientNet:
    """EfficientNet-B0, about 5.3M parameters at 1000 classes."""
    return EfficientNet(num_classes, in_channels, drop_rate, drop_path_rate, bn_momentum, cifar)


def efficientnet_b0_cifar(
    num_classes: int = 10, in_channels: int = 3, drop_rate: float = 0.2, drop_path_rate: float = 0.2,
    bn_momentum: float = 0.1,
) -> EfficientNet:
    """EfficientNet-B0 with a stride-1 stem for 32x32 inputs, about 4.0M parameters at 10 classes."""
    return EfficientNet(num_classes, in_channels, drop_rate, drop_path_rate, bn_momentum, cifar=True)
