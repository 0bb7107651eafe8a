"""A convnet built for wall-clock speed on small images: most of its convolutions run at half resolution or less."""

from __future__ import annotations

import torch
from torch import nn

from fixnorm.models.small_cnn import _conv_bn_relu


class FastCNN(nn.Module):
    """Three blocks of conv-BN-ReLU, 2x2 max pool, conv-BN-ReLU at widths w, 2w, 4w; global max pool; linear.

    The layout of the CIFAR-10 speedrun networks (airbench): each block pools right after its first convolution, so
    only one layer runs at full resolution. On 28x28 Fashion-MNIST, width 32 (0.29M parameters) trains an epoch in
    about half ResNet-20's time on 2 CPU cores (the `fmnist-speedrun-fast` recipe).

    ``pool_first=True`` pools each block's first convolution *before* its BN and ReLU, as airbench does: the same
    parameters, with the BN and ReLU of those layers at a quarter of the pixels (a training step about 1.3x faster
    on 2 CPU cores, `benchmarks/fast_cnn_layout_speed.py`). Max-pooling is positively homogeneous per channel, so
    the convolution stays scale-invariant filter by filter; BN's statistics are those of the pooled map, so it is a
    different network, not a faster evaluation of the same one.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, pool_first: bool = False) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be a positive integer, got {width}")
        layers: list[nn.Module] = []
        cin = in_channels
        for cout in (width, 2 * width, 4 * width):
            if pool_first:
                layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(cout),
                           nn.ReLU(inplace=True), _conv_bn_relu(cout, cout)]
            else:
                layers += [_conv_bn_relu(cin, cout), nn.MaxPool2d(2), _conv_bn_relu(cout, cout)]
            cin = cout
        self.features = nn.Sequential(*layers, nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
