"""Pre-activation ResNet-18 for 32x32 inputs (He et al. 2016, "Identity Mappings in Deep Residual Networks").

BN and ReLU come before each conv, so the residual stream carries un-normalised sums and the
shortcut stays a pure identity. A 3x3 stem (no pooling), four stages of two blocks with
64/128/256/512 channels, a final BN-ReLU, global average pooling and a linear classifier.

Note for scale invariance: only the first conv of a block feeds a BN alone; the second conv, the
projection shortcuts, and the stem when the first block has an identity shortcut add into the
residual stream, so none of them alone is scale-invariant (only the sum's terms scaled together).
"""

from __future__ import annotations

import torch
from torch import nn

from .cifar_resnet import init_resnet_


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3, plus identity or a 1x1 projection of the
    pre-activated input where the shape changes. Dropout is the wide-ResNet option."""

    def __init__(self, cin: int, cout: int, stride: int = 1, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        return out + skip


class PreActResNet(nn.Module):
    """Pre-activation ResNet with a CIFAR stem: 3x3 conv, stages of PreActBlocks (stride 2 at the start
    of every stage but the first), BN-ReLU, pool, linear. The stem has `stem_width` channels
    (default: the first stage's width)."""

    def __init__(
        self,
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        widths: tuple[int, ...] = (64, 128, 256, 512),
        num_classes: int = 10,
        in_channels: int = 3,
        drop_rate: float = 0.0,
        stem_width: int | None = None,
    ) -> None:
        super().__init__()
        cin = stem_width or widths[0]
        self.stem = nn.Conv2d(in_channels, cin, 3, padding=1, bias=False)
        layers: list[nn.Module] = []
        for stage, (count, cout) in enumerate(zip(blocks, widths)):
            for i in range(count):
                layers.append(PreActBlock(cin, cout, 2 if stage > 0 and i == 0 else 1, drop_rate))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.final = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)
        init_resnet_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.final(self.layers(self.stem(x)))))


def preact_resnet18(num_classes: int = 10, in_channels: int = 3) -> PreActResNet:
    """Pre-activation ResNet-18, about 11.2M parameters at 10 classes."""
    return PreActResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, in_channels)
