"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4) ported from RepDistiller ``models/resnet.py``.

Parameter names match RepDistiller checkpoints. Pure torch: never imports Ray, never downloads weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import FeatureClassifier, init_resnet_weights


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + residual)


class ResNet(FeatureClassifier):
    """ResNet of depth 6n+2 with BasicBlocks; feature map = layer3 output after ReLU (stride 4)."""

    def __init__(self, depth: int, num_filters: list[int], num_classes: int = 10, in_chans: int = 3) -> None:
        assert (depth - 2) % 6 == 0, "depth should be 6n+2, e.g. 20, 32, 44, 56, 110"
        n, block = (depth - 2) // 6, BasicBlock
        super().__init__(num_classes, in_chans, num_filters[3] * block.expansion)
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(in_chans, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, num_filters[1], n)
        self.layer2 = self._make_layer(block, num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(block, num_filters[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(num_filters[3] * block.expansion, num_classes)

        init_resnet_weights(self)

    def _make_layer(
        self, block: type[BasicBlock], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))


_THIN, _WIDE = [16, 16, 32, 64], [32, 64, 128, 256]


def resnet8(**kw) -> ResNet:
    return ResNet(8, _THIN, **kw)


def resnet14(**kw) -> ResNet:
    return ResNet(14, _THIN, **kw)


def resnet20(**kw) -> ResNet:
    return ResNet(20, _THIN, **kw)


def resnet32(**kw) -> ResNet:
    return ResNet(32, _THIN, **kw)


def resnet44(**kw) -> ResNet:
    return ResNet(44, _THIN, **kw)


def resnet56(**kw) -> ResNet:
    return ResNet(56, _THIN, **kw)


def resnet110(**kw) -> ResNet:
    return ResNet(110, _THIN, **kw)


def resnet8x4(**kw) -> ResNet:
    return ResNet(8, _WIDE, **kw)


def resnet32x4(**kw) -> ResNet:
    return ResNet(32, _WIDE, **kw)
