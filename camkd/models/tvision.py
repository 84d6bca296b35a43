"""Adapter exposing torchvision classifiers (``torchvision:<name>``) through the FeatureClassifier contract.

Models are always built with ``weights=None``: this module must never download weights, and never imports Ray.
The torchvision submodules are re-registered under their own names, so torchvision state_dicts load directly.
"""

from __future__ import annotations

import difflib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import FeatureClassifier

# family -> name prefixes (checked longest first, so "resnext" never falls into "resnet")
FAMILIES: dict[str, tuple[str, ...]] = {
    "resnet": ("resnet", "resnext", "wide_resnet"),
    "regnet": ("regnet",),
    "vgg": ("vgg", "alexnet"),
    "mobilenet": ("mobilenet_v2", "mobilenet_v3"),
    "efficientnet": ("efficientnet",),  # efficientnet_b* and efficientnet_v2_*
    "convnext": ("convnext",),
    "densenet": ("densenet",),
}
SUPPORTED = (
    "resnet, resnext, wide_resnet, regnet, vgg, alexnet, mobilenet_v2, mobilenet_v3, "
    "efficientnet, efficientnet_v2, convnext, densenet"
)


def family_of(name: str) -> str | None:
    prefixes = sorted(((p, f) for f, ps in FAMILIES.items() for p in ps), key=lambda t: -len(t[0]))
    return next((f for p, f in prefixes if name.startswith(p)), None)


def _replace_first_conv(model: nn.Module, in_chans: int) -> None:
    """Swap the first Conv2d for one with the same configuration but ``in_chans`` input channels."""
    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    new = nn.Conv2d(
        in_chans,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


class TorchvisionClassifier(FeatureClassifier):
    """A torchvision classifier split into ``forward_features`` (last conv stage, after its activation) and
    ``forward_head`` (the model's own pooling + classifier)."""

    def __init__(self, name: str, num_classes: int, in_chans: int = 3) -> None:
        import torchvision.models as tvm

        family = family_of(name)
        known = tvm.list_models(module=tvm)
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" Did you mean: {', '.join('torchvision:' + c for c in close)}?" if close else ""
            raise ValueError(f"Unknown torchvision model {name!r}.{hint}")
        if family is None:
            raise ValueError(
                f"torchvision model {name!r} is of an unsupported family; supported families: {SUPPORTED}."
            )
        model = tvm.get_model(name, weights=None, num_classes=num_classes)
        if in_chans != 3:
            _replace_first_conv(model, in_chans)
        classifier_name = "fc" if family in ("resnet", "regnet") else "classifier"
        linear = next(m for m in getattr(model, classifier_name).modules() if isinstance(m, nn.Linear))
        pool = getattr(model, "avgpool", None)
        pool = nn.AdaptiveAvgPool2d(1) if pool is None else pool  # mobilenet_v2 and densenet pool inline
        size = pool.output_size if isinstance(pool.output_size, tuple) else (pool.output_size,) * 2
        super().__init__(num_classes, in_chans, linear.in_features // math.prod(size))
        self.family = family
        self.classifier_name = classifier_name
        self.head_flatten = family != "convnext"  # convnext's classifier is LayerNorm2d -> Flatten -> Linear
        for child_name, child in model.named_children():
            self.add_module(child_name, child)
        self.avgpool = pool

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.family == "resnet":
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            return self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.family == "regnet":
            return self.trunk_output(self.stem(x))
        x = self.features(x)
        return F.relu(x) if self.family == "densenet" else x
