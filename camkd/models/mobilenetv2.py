"""CIFAR MobileNetV2 (``MobileNetV2`` = RepDistiller's ``mobile_half``: T=6, width 0.5) ported from
RepDistiller ``models/mobilenetv2.py``. Parameter names match RepDistiller checkpoints.
Pure torch: never imports Ray, never downloads weights.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import FeatureClassifier, init_repdistiller_weights


def conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True)
    )


def conv_1x1_bn(inp: int, oup: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        assert stride in (1, 2)
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        hid = inp * expand_ratio
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hid, 1, 1, 0, bias=False),  # pw
            nn.BatchNorm2d(hid),
            nn.ReLU(inplace=True),
            nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False),  # dw
            nn.BatchNorm2d(hid),
            nn.ReLU(inplace=True),
            nn.Conv2d(hid, oup, 1, 1, 0, bias=False),  # pw-linear
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(FeatureClassifier):
    """MobileNetV2 for 32x32 inputs (total stride 16); feature map = conv2 output (1x1 conv + BN + ReLU)."""

    classifier_name = "classifier"

    def __init__(self, T: int, num_classes: int, width_mult: float = 1.0, in_chans: int = 3) -> None:
        last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        super().__init__(num_classes, in_chans, last_channel)
        setting = [  # t, c, n, s
            [1, 16, 1, 1],
            [T, 24, 2, 1],
            [T, 32, 3, 2],
            [T, 64, 4, 2],
            [T, 96, 3, 1],
            [T, 160, 3, 2],
            [T, 320, 1, 1],
        ]
        input_channel = int(32 * width_mult)
        self.conv1 = conv_bn(in_chans, input_channel, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in setting:
            output_channel, layers = int(c * width_mult), []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = last_channel
        self.conv2 = conv_1x1_bn(input_channel, last_channel)
        self.classifier = nn.Sequential(nn.Linear(last_channel, num_classes))
        self.avgpool = nn.AdaptiveAvgPool2d(1)

        init_repdistiller_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        return self.conv2(x)


def mobile_half(**kw) -> MobileNetV2:
    return MobileNetV2(T=6, width_mult=0.5, **kw)


def mobile_full(**kw) -> MobileNetV2:
    return MobileNetV2(T=6, width_mult=1.0, **kw)
