"""CIFAR MobileNetV2 (``MobileNetV2`` = RepDistiller's ``mobile_half``: T=6, width 0.5) ported from
RepDistiller ``models/mobilenetv2.py``. Parameter names match RepDistiller checkpoints.

The feature map is the output of the last inverted-residual stage (160 channels at width 0.5), the layer the
CA-MKD authors' code taps for the intermediate term; the final 1×1 conv (``conv2``, 1280 channels) then belongs to
the head. ``MobileNetV2_conv2`` keeps the earlier tap (the ``conv2`` output) for comparison. Both share every
parameter name, so one checkpoint loads into either.
Pure torch: never imports Ray, never downloads weights.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import FeatureClassifier, init_repdistiller_weights, pool_classify


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


class MobileNetV2Head(nn.Module):
    """conv2 (1×1 conv + BN + ReLU) → global pool → classifier, sharing the model's modules."""

    def __init__(self, conv2: nn.Module, pool: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.conv2, self.pool, self.classifier = conv2, pool, classifier

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return pool_classify(self.conv2(fmap), self.pool, self.classifier, True)


class MobileNetV2(FeatureClassifier):
    """MobileNetV2 for 32x32 inputs (total stride 16). Feature map: the last inverted-residual stage's output
    (``tap="blocks"``, the authors' layer) or the conv2 output (``tap="conv2"``)."""

    classifier_name = "classifier"

    def __init__(
        self, T: int, num_classes: int, width_mult: float = 1.0, in_chans: int = 3, tap: str = "blocks"
    ) -> None:
        if tap not in ("blocks", "conv2"):
            raise ValueError(f"MobileNetV2 tap must be 'blocks' or 'conv2', got {tap!r}")
        last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        stage_channel = int(320 * width_mult)
        super().__init__(num_classes, in_chans, stage_channel if tap == "blocks" else last_channel)
        self.tap = tap
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
        return x if self.tap == "blocks" else self.conv2(x)

    def forward_head(self, fmap: torch.Tensor) -> torch.Tensor:
        if self.tap == "blocks":
            fmap = self.conv2(fmap)
        return pool_classify(fmap, self.avgpool, self.classifier, True)

    @property
    def head(self) -> nn.Module:
        if self.tap == "blocks":
            return MobileNetV2Head(self.conv2, self.avgpool, self.classifier)
        return super().head


def mobile_half(**kw) -> MobileNetV2:
    return MobileNetV2(T=6, width_mult=0.5, **kw)


def mobile_half_conv2(**kw) -> MobileNetV2:
    return MobileNetV2(T=6, width_mult=0.5, tap="conv2", **kw)


def mobile_full(**kw) -> MobileNetV2:
    return MobileNetV2(T=6, width_mult=1.0, **kw)
