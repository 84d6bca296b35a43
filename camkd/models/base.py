"""The one model contract of camkd: ``forward_features`` (last conv map) + ``forward_head`` (pool+classifier).

Pure torch; never imports Ray and never downloads weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def pool_classify(fmap: torch.Tensor, pool: nn.Module, classifier: nn.Module, flatten: bool) -> torch.Tensor:
    """Global pooling, optional flatten, then the classifier: the shared body of every head."""
    x = pool(fmap)
    return classifier(torch.flatten(x, 1) if flatten else x)


def init_repdistiller_weights(module: nn.Module) -> None:
    """RepDistiller's initialisation for VGG and MobileNetV2: He-normal convs (fan-out), unit BN, N(0, 0.01) linear."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2.0 / fan))
            if m.bias is not None:
                m.bias.data.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
        elif isinstance(m, nn.Linear):
            m.weight.data.normal_(0, 0.01)
            m.bias.data.zero_()


class GlobalPoolHead(nn.Module):
    """A stand-alone view of a model's head. It shares the model's (parameter-free) pooling and its
    classifier module, so ``state_dict()`` holds exactly the classifier parameters (``classifier.*``)."""

    def __init__(self, classifier: nn.Module, pool: nn.Module | None = None, flatten: bool = True) -> None:
        super().__init__()
        self.pool = pool if pool is not None else nn.AdaptiveAvgPool2d(1)
        self.classifier = classifier
        self.flatten = flatten

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return pool_classify(fmap, self.pool, self.classifier, self.flatten)


class FeatureClassifier(nn.Module):
    """Base of every camkd model.

    ``forward_features(x)`` returns the last convolutional stage's map ``[B, C, H, W]`` (after its final
    activation, before global pooling); ``forward_head(fmap)`` pools it globally and applies the classifier;
    ``forward(x) == forward_head(forward_features(x))``. Subclasses register a parameter-free pooling module
    under ``pool_name`` and their classifier under ``classifier_name`` (the original checkpoint names).
    """

    pool_name: str = "avgpool"
    classifier_name: str = "fc"
    head_flatten: bool = True

    def __init__(self, num_classes: int, in_chans: int, feature_channels: int, arch: str = "") -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.in_chans = int(in_chans)
        self.feature_channels = int(feature_channels)
        self.arch = arch

    @property
    def num_features(self) -> int:
        return self.feature_channels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, fmap: torch.Tensor) -> torch.Tensor:
        pool, classifier = getattr(self, self.pool_name), getattr(self, self.classifier_name)
        return pool_classify(fmap, pool, classifier, self.head_flatten)

    @property
    def head(self) -> GlobalPoolHead:
        """The head as its own module sharing this model's classifier (e.g. to ship a frozen teacher head)."""
        return GlobalPoolHead(
            getattr(self, self.classifier_name), getattr(self, self.pool_name), self.head_flatten
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, in_chans={self.in_chans}, num_classes={self.num_classes}"


def init_resnet_weights(model: nn.Module) -> None:
    """RepDistiller's ResNet initialisation: Kaiming-normal (fan_out) convolutions, unit-weight zero-bias norms."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
