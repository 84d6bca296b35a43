"""CIFAR VGGs with BatchNorm (vgg8/11/13/16/19 = RepDistiller's vgg*_bn), ported from RepDistiller
``models/vgg.py``.

Parameter names match RepDistiller checkpoints. Pure torch: never imports Ray, never downloads weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import FeatureClassifier, init_repdistiller_weights

CFG: dict[str, list[list[int]]] = {
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
    "S": [[64], [128], [256], [512], [512]],
}


def _make_layers(cfg: list[int], batch_norm: bool, in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for v in cfg:
        layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1)]
        layers += [nn.BatchNorm2d(v), nn.ReLU(inplace=True)] if batch_norm else [nn.ReLU(inplace=True)]
        in_channels = v
    return nn.Sequential(*layers[:-1])  # the block's last ReLU is applied in forward


class VGG(FeatureClassifier):
    """Five conv blocks; feature map = relu(block4 output): 4x4 at 32x32 input (pool3 only runs at 64x64)."""

    classifier_name = "classifier"
    pool_name = "pool4"

    def __init__(
        self, cfg: list[list[int]], batch_norm: bool = True, num_classes: int = 1000, in_chans: int = 3
    ) -> None:
        super().__init__(num_classes, in_chans, cfg[4][-1])
        self.block0 = _make_layers(cfg[0], batch_norm, in_chans)
        self.block1 = _make_layers(cfg[1], batch_norm, cfg[0][-1])
        self.block2 = _make_layers(cfg[2], batch_norm, cfg[1][-1])
        self.block3 = _make_layers(cfg[3], batch_norm, cfg[2][-1])
        self.block4 = _make_layers(cfg[4], batch_norm, cfg[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)

        init_repdistiller_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[2]
        x = self.pool0(F.relu(self.block0(x)))
        x = self.pool1(F.relu(self.block1(x)))
        x = self.pool2(F.relu(self.block2(x)))
        x = F.relu(self.block3(x))
        if h == 64:  # RepDistiller quirk, kept for checkpoint/behaviour parity
            x = self.pool3(x)
        return F.relu(self.block4(x))


def vgg8(**kw) -> VGG:
    return VGG(CFG["S"], batch_norm=True, **kw)


def vgg11(**kw) -> VGG:
    return VGG(CFG["A"], batch_norm=True, **kw)


def vgg13(**kw) -> VGG:
    return VGG(CFG["B"], batch_norm=True, **kw)


def vgg16(**kw) -> VGG:
    return VGG(CFG["D"], batch_norm=True, **kw)


def vgg19(**kw) -> VGG:
    return VGG(CFG["E"], batch_norm=True, **kw)
