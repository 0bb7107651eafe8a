"""A small BN convnet: fast enough for CPU experiments on 28x28 images."""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    # No conv bias: the following BN would cancel it, and it would be an unconstrained parameter.
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class SmallCNN(nn.Module):
    """conv-BN-ReLU x2, maxpool, conv-BN-ReLU x2 (double width), global average pool, linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, width),
            _conv_bn_relu(width, width),
            nn.MaxPool2d(2),
            _conv_bn_relu(width, 2 * width),
            _conv_bn_relu(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
