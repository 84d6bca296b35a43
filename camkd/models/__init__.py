"""camkd model zoo: RepDistiller/CRD/CA-MKD CIFAR networks (checkpoint-compatible names) plus torchvision
classifiers via ``torchvision:<name>`` and timm models via ``timm:<name>`` (the optional ``[timm]`` extra), all
behind the FeatureClassifier contract (see ``base``).
Pure torch: never imports Ray, never downloads weights (torchvision: ``weights=None``; timm: ``pretrained=False``).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from .base import FeatureClassifier, GlobalPoolHead
from .mobilenetv2 import mobile_half, mobile_half_conv2
from .resnet import (
    resnet8,
    resnet8x4,
    resnet14,
    resnet20,
    resnet32,
    resnet32x4,
    resnet44,
    resnet56,
    resnet110,
)
from .resnetv2 import ResNet50
from .shufflenetv1 import ShuffleV1
from .shufflenetv2 import ShuffleV2
from .timm_adapter import PREFIX as TIMM_PREFIX
from .timm_adapter import TimmClassifier
from .timm_adapter import check_name as check_timm_name
from .timm_adapter import pretrained_preprocessing as timm_preprocessing
from .tvision import SUPPORTED as TORCHVISION_FAMILIES
from .tvision import TorchvisionClassifier, family_of
from .vgg import vgg8, vgg11, vgg13, vgg16, vgg19
from .wrn import wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2

__all__ = [
    "TIMM_PREFIX",
    "TORCHVISION_PREFIX",
    "FeatureClassifier",
    "GlobalPoolHead",
    "available",
    "check_timm_name",
    "create",
    "pretrained_preprocessing",
]

TORCHVISION_PREFIX = "torchvision:"

_ZOO: dict[str, Callable[..., FeatureClassifier]] = {
    "resnet8": resnet8,
    "resnet14": resnet14,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "ResNet50": ResNet50,  # RepDistiller's CIFAR ResNet50 (bottleneck, 23.7 M parameters at 100 classes)
    "wrn_16_1": wrn_16_1,
    "wrn_16_2": wrn_16_2,
    "wrn_40_1": wrn_40_1,
    "wrn_40_2": wrn_40_2,
    "vgg8": vgg8,
    "vgg11": vgg11,
    "vgg13": vgg13,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "MobileNetV2": mobile_half,  # RepDistiller's mobile_half (width 0.5), the papers' "MobileNetV2"
    "MobileNetV2_conv2": mobile_half_conv2,  # the same network, feature map tapped after conv2 (1280 ch)
    "ShuffleV1": ShuffleV1,
    "ShuffleV2": ShuffleV2,
}


def available(include_torchvision: bool = False) -> list[str]:
    """Zoo architecture names; with ``include_torchvision`` also every supported ``torchvision:<name>``."""
    names = list(_ZOO)
    if include_torchvision:
        import torchvision.models as tvm

        names += [TORCHVISION_PREFIX + n for n in tvm.list_models(module=tvm) if family_of(n) is not None]
    return names


def create(name: str, num_classes: int, in_chans: int = 3) -> FeatureClassifier:
    """Build ``name`` (a zoo name, ``torchvision:<name>`` or ``timm:<name>``) with fresh, randomly initialised
    weights."""
    if num_classes < 1 or in_chans < 1:
        raise ValueError(f"num_classes and in_chans must be >= 1, got {num_classes} and {in_chans}")
    if name.startswith(TORCHVISION_PREFIX):
        model: FeatureClassifier = TorchvisionClassifier(
            name[len(TORCHVISION_PREFIX) :], num_classes, in_chans
        )
    elif name.startswith(TIMM_PREFIX):
        model = TimmClassifier(name[len(TIMM_PREFIX) :], num_classes, in_chans)
    elif name in _ZOO:
        model = _ZOO[name](num_classes=num_classes, in_chans=in_chans)
    else:
        close = difflib.get_close_matches(name, list(_ZOO), n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"Unknown model {name!r}.{hint} Available: {', '.join(_ZOO)}; "
            f"or '{TORCHVISION_PREFIX}<name>' for torchvision families: {TORCHVISION_FAMILIES}; "
            f"or '{TIMM_PREFIX}<name>' for a timm model (pip install 'camkd-ray[timm]')."
        )
    model.arch = name
    return model


def pretrained_preprocessing(name: str) -> dict | None:
    """What pretrained weights of ``name`` expect: ``{"mean", "std", "input_size": (C, H, W)}`` from timm's
    ``pretrained_cfg`` or torchvision's default weights meta; None for zoo models or when neither says. Reads the
    libraries' registries only: nothing is built or downloaded."""
    if name.startswith(TIMM_PREFIX):
        return timm_preprocessing(name[len(TIMM_PREFIX) :])
    if name.startswith(TORCHVISION_PREFIX):
        import torchvision.models as tvm

        try:
            weights = tvm.get_model_weights(name[len(TORCHVISION_PREFIX) :]).DEFAULT
        except (ValueError, KeyError, AttributeError):
            return None
        t = weights.transforms()
        crop = list(getattr(t, "crop_size", []) or [])
        side = (crop * 2)[:2] if crop else []
        return {"mean": list(t.mean), "std": list(t.std), "input_size": (3, *side) if side else ()}
    return None
