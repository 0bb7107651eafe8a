"""MobileNetV2 (Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks").

A strided 3x3 stem, seven stages of inverted residual blocks, a 1x1 conv to 1280 channels,
global average pooling, dropout 0.2 and a linear classifier. Every conv is followed by BN.
`cifar=True` keeps 32x32 inputs from collapsing to 1x1: stride 1 in the stem and in the first
strided stage, so the last feature map is 4x4 instead of 1x1.
"""

from __future__ import annotations

import torch
from torch import nn

from .cifar_resnet import init_resnet_
from .layers import ConvBNAct, make_divisible

# (expansion t, output channels c, blocks n, first stride s), table 2 of the paper
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when t = 1), 3x3 depthwise, linear 1x1 projection (no activation, so
    the narrow bottleneck keeps its information); identity shortcut when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.expand = ConvBNAct(cin, hidden, act=nn.ReLU6) if expansion != 1 else nn.Identity()
        self.dw = ConvBNAct(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6)
        self.project = ConvBNAct(hidden, cout, act=None)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.dw(self.expand(x)))
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2; `width_mult` scales every width (rounded to multiples of 8), the last conv
    never drops below 1280 channels."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        width_mult: float = 1.0,
        drop_rate: float = 0.2,
        cifar: bool = False,
    ) -> None:
        super().__init__()
        cin = make_divisible(32 * width_mult)
        last = make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [ConvBNAct(in_channels, cin, 3, 1 if cifar else 2, act=nn.ReLU6)]
        for stage, (t, c, n, s) in enumerate(SETTINGS):
            cout = make_divisible(c * width_mult)
            stride = 1 if cifar and stage == 1 else s
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, t))
                cin = cout
        layers.append(ConvBNAct(cin, last, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(last, num_classes)
        init_resnet_(self)
        nn.init.normal_(self.fc.weight, 0, 0.01)  # the reference initialisation
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.pool(self.features(x))))


def mobilenetv2(
    num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0, drop_rate: float = 0.2,
    cifar: bool = False,
) -> MobileNetV2:
    """MobileNetV2, about 3.5M parameters at 1000 classes and width 1.0."""
    return MobileNetV2(num_classes, in_channels, width_mult, drop_rate, cifar)


def mobilenetv2_cifar(
    num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, drop_rate: float = 0.2
) -> MobileNetV2:
    """MobileNetV2 for 32x32 inputs (stride-1 stem and second stage), about 2.2M parameters at 10 classes."""
    return MobileNetV2(num_classes, in_channels, width_mult, drop_rate, cifar=True)
