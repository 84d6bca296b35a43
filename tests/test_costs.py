"""A student's deployment cost, counted from the model, against a count by hand."""

from __future__ import annotations

from camkd import models
from camkd.costs import macs_per_image, parameter_count


def test_resnet8_parameters_exactly_and_macs_within_one_percent_of_a_hand_count():
    """resnet8 (16-16-32-64 filters, one BasicBlock per stage, 1×1 downsampling where the width or stride
    changes), 10 classes, 3 × 32 × 32 inputs, counted by hand below."""
    conv = lambda cin, cout, k: cin * cout * k * k  # weights of a bias-free convolution
    bn = lambda c: 2 * c  # BatchNorm's weight and bias
    stem = conv(3, 16, 3) + bn(16)
    block1 = 2 * (conv(16, 16, 3) + bn(16))
    block2 = conv(16, 32, 3) + bn(32) + conv(32, 32, 3) + bn(32) + conv(16, 32, 1) + bn(32)
    block3 = conv(32, 64, 3) + bn(64) + conv(64, 64, 3) + bn(64) + conv(32, 64, 1) + bn(64)
    fc = 64 * 10 + 10
    assert stem + block1 + block2 + block3 + fc == 78_042
    model = models.create("resnet8", 10, 3)
    assert parameter_count(model) == 78_042
    # MACs: each convolution's weights × its output positions (32², 16², 8² per stage), plus the classifier.
    macs = (
        conv(3, 16, 3) * 32 * 32
        + 2 * conv(16, 16, 3) * 32 * 32
        + (conv(16, 32, 3) + conv(32, 32, 3) + conv(16, 32, 1)) * 16 * 16
        + (conv(32, 64, 3) + conv(64, 64, 3) + conv(32, 64, 1)) * 8 * 8
        + 64 * 10
    )
    assert macs == 12_501_632
    counted = macs_per_image(model, 3, 32)
    assert abs(counted - macs) / macs < 0.01, (counted, macs)
    assert model.training, "the model's mode is restored"
