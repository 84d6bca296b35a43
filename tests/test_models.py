"""Tests for camkd.models: RepDistiller parity (parameter counts, checkpoint names), the FeatureClassifier
contract for every zoo model, and the torchvision adapter. CPU only, no downloads, no Ray.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import camkd.models as M

ZOO = M.available()

# Exact counts of RepDistiller's own models at num_classes=100 (verified by loading RepDistiller's
# state_dicts into these ports with strict=True and comparing logits), and the rounded figures the
# RepDistiller/CRD/CA-MKD papers quote.
EXACT_PARAMS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "ResNet50": 23_705_252,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "MobileNetV2": 812_836,
    "MobileNetV2_conv2": 812_836,
    "ShuffleV1": 949_258,
    "ShuffleV2": 1_355_528,
}
PAPER_PARAMS_M = {
    "resnet32x4": 7.43,
    "ResNet50": 23.71,
    "resnet8x4": 1.23,
    "wrn_40_2": 2.26,
    "resnet56": 0.86,
    "resnet110": 1.73,
    "resnet20": 0.28,
    "vgg8": 3.96,
    "vgg13": 9.46,
    "wrn_16_2": 0.70,
    "MobileNetV2": 0.81,
    "ShuffleV1": 0.95,
    "ShuffleV2": 1.36,
}


@functools.cache
def _model(name: str, num_classes: int = 100, in_chans: int = 3) -> M.FeatureClassifier:
    torch.manual_seed(0)
    return M.create(name, num_classes, in_chans).eval()


def _nparams(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_available_is_the_registry() -> None:
    assert set(ZOO) == set(EXACT_PARAMS)
    assert len(ZOO) == len(set(ZOO))


@pytest.mark.parametrize("name", ZOO)
def test_param_counts_match_repdistiller(name: str) -> None:
    n = _nparams(_model(name))
    assert n == EXACT_PARAMS[name], f"{name}: {n} params, RepDistiller has {EXACT_PARAMS[name]}"
    if name in PAPER_PARAMS_M:  # the quoted figure is the exact count rounded to 0.01 M (resnet20: 0.278 M)
        ref = PAPER_PARAMS_M[name] * 1e6
        ok = abs(n - ref) / ref < 0.005 or round(n / 1e6, 2) == PAPER_PARAMS_M[name]
        assert ok, f"{name}: {n} params vs paper {PAPER_PARAMS_M[name]} M"


@pytest.mark.parametrize("in_chans,size", [(3, 32), (1, 28)])
@pytest.mark.parametrize("name", ZOO)
def test_feature_classifier_contract(name: str, in_chans: int, size: int) -> None:
    model = _model(name, 100, in_chans)
    assert (model.arch, model.num_classes, model.in_chans) == (name, 100, in_chans)
    assert model.num_features == model.feature_channels
    x = torch.randn(2, in_chans, size, size)
    with torch.no_grad():
        fmap = model.forward_features(x)
        logits = model(x)
        assert fmap.ndim == 4 and fmap.shape[:2] == (2, model.feature_channels)
        assert logits.shape == (2, 100)
        torch.testing.assert_close(logits, model.forward_head(fmap), rtol=0, atol=0)
        torch.testing.assert_close(model.head(fmap), logits, rtol=0, atol=0)

        # ship the head alone into a fresh, differently initialised instance
        torch.manual_seed(1)
        fresh = M.create(name, 100, in_chans).eval()
        assert not torch.equal(fresh.forward_head(fmap), logits)
        fresh.head.load_state_dict(model.head.state_dict())
        torch.testing.assert_close(fresh.head(fmap), logits, rtol=0, atol=0)
        torch.testing.assert_close(fresh.forward_head(fmap), logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["resnet8x4", "MobileNetV2_conv2", "vgg8", "torchvision:resnet18"])
def test_head_state_dict_is_exactly_the_classifier(name: str) -> None:
    model = _model(name)
    classifier = getattr(model, model.classifier_name)
    head_sd = model.head.state_dict()
    assert set(head_sd) == {f"classifier.{k}" for k in classifier.state_dict()}
    assert all(
        head_sd[f"classifier.{k}"].data_ptr() == v.data_ptr() for k, v in classifier.state_dict().items()
    )
    assert not any(k.startswith("head.") for k in model.state_dict())


@pytest.mark.parametrize(
    "name,shape",
    [
        ("resnet32x4", (2, 256, 8, 8)),
        ("ResNet50", (2, 2048, 4, 4)),
        ("resnet8x4", (2, 256, 8, 8)),
        ("resnet56", (2, 64, 8, 8)),
        ("wrn_40_2", (2, 128, 8, 8)),
        (
            "vgg8",
            (2, 512, 4, 4),
        ),  # RepDistiller pools 3x before block4 at 32x32 (pool3 only for 64x64 inputs)
        ("vgg13", (2, 512, 4, 4)),
        ("MobileNetV2", (2, 160, 2, 2)),  # the last inverted-residual stage: the CA-MKD authors' layer
        ("MobileNetV2_conv2", (2, 1280, 2, 2)),
        ("ShuffleV1", (2, 960, 4, 4)),
        ("ShuffleV2", (2, 1024, 4, 4)),
    ],
)
def test_feature_map_shapes_at_32(name: str, shape: tuple[int, ...]) -> None:
    with torch.no_grad():
        assert tuple(_model(name).forward_features(torch.randn(2, 3, 32, 32)).shape) == shape


def test_vgg_extra_pool_at_64() -> None:
    with torch.no_grad():
        assert tuple(_model("vgg8").forward_features(torch.randn(1, 3, 64, 64)).shape) == (1, 512, 4, 4)


def test_repdistiller_state_dict_names_round_trip() -> None:
    keys = set(M.create("resnet8x4", 100).state_dict())
    assert {
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.downsample.0.weight",
        "layer3.0.conv1.weight",
    } <= keys
    assert {"fc.weight", "fc.bias"} <= keys
    expected = {
        "wrn_40_2": [
            "conv1.weight",
            "block1.layer.0.convShortcut.weight",
            "block3.layer.5.conv2.weight",
            "bn1.weight",
        ],
        "vgg8": ["block0.0.weight", "block0.1.running_var", "block4.1.bias", "classifier.weight"],
        "MobileNetV2": [
            "conv1.0.weight",
            "blocks.6.0.conv.7.running_var",
            "conv2.1.weight",
            "classifier.0.weight",
        ],
        "ShuffleV1": ["conv1.weight", "layer1.0.conv3.weight", "layer3.3.bn3.bias", "linear.weight"],
        "ShuffleV2": [
            "layer1.0.conv5.weight",
            "layer3.3.conv3.weight",
            "conv2.weight",
            "bn2.bias",
            "linear.bias",
        ],
    }
    for name, names in expected.items():
        assert set(names) <= set(_model(name).state_dict()), name

    src, dst = _model("resnet8x4"), M.create("resnet8x4", 100).eval()
    dst.load_state_dict(src.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


@pytest.mark.parametrize("tv_name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_models(tv_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.models as tvm

    def no_download(*args, **kwargs):
        raise AssertionError("camkd.models must never download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    model = M.create(f"torchvision:{tv_name}", 10).eval()
    assert isinstance(model, M.FeatureClassifier) and model.arch == f"torchvision:{tv_name}"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap = model.forward_features(x)
        assert fmap.ndim == 4 and fmap.shape[:2] == (2, model.feature_channels)
        logits = model(x)
        assert logits.shape == (2, 10)
        torch.testing.assert_close(model.head(fmap), logits, rtol=0, atol=0)
        # torchvision names are kept and the split forward equals torchvision's own forward
        ref = tvm.get_model(tv_name, weights=None, num_classes=10).eval()
        ref.load_state_dict(model.state_dict(), strict=True)
        torch.testing.assert_close(ref(x), logits)

        gray = M.create(f"torchvision:{tv_name}", 10, in_chans=1).eval()
        assert gray.in_chans == 1
        assert gray(torch.randn(2, 1, 64, 64)).shape == (2, 10)


def test_unknown_names_error_clearly() -> None:
    with pytest.raises(ValueError, match=r"vit_b_16.*supported families:.*resnet.*convnext"):
        M.create("torchvision:vit_b_16", 10)
    with pytest.raises(ValueError, match=r"Unknown torchvision model 'resnet19'.*torchvision:resnet18"):
        M.create("torchvision:resnet19", 10)
    with pytest.raises(
        ValueError, match=r"Unknown model 'resnet33'.*Did you mean 'resnet32'.*Available:.*wrn_40_2"
    ):
        M.create("resnet33", 10)


def test_import_never_pulls_ray() -> None:
    code = (
        "import sys, camkd.models; assert 'ray' not in sys.modules; assert 'torchvision' not in sys.modules"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(M.__file__).parents[2]), os.environ.get("PYTHONPATH", "")]),
    }
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_mobilenetv2_taps_the_last_inverted_residual_stage_and_its_head_holds_conv2() -> None:
    """The CA-MKD authors tap the last inverted-residual stage (160 channels); conv2 then belongs to the head,
    so a teacher's frozen head scores a connected 160-channel map exactly as the full network would."""
    model, other = _model("MobileNetV2"), _model("MobileNetV2_conv2")
    assert model.feature_channels == 160 and other.feature_channels == 1280
    assert set(model.head.state_dict()) == {
        *(f"conv2.{k}" for k in model.conv2.state_dict()),
        *(f"classifier.{k}" for k in model.classifier.state_dict()),
    }
    other.load_state_dict(model.state_dict(), strict=True)  # one checkpoint fits both taps
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), other(x), rtol=0, atol=0)
