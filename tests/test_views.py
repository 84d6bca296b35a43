"""Augmentation replay: view parameters are a pure function of (seed, idx, view) and render the right pixels."""

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from pipeline.data.views import (
    ViewSpec,
    crop_flip_params,
    render_eval_view,
    render_train_view,
    rrc_box,
    uniforms,
    view_for_epoch,
)

CROP = ViewSpec("crop_flip", 4, 7, 4, True, 0, (1.0, 1.0), (1.0, 1.0), 0, (0.5,), (0.25,))
RRC = ViewSpec("rrc_flip", 2, 3, 0, True, 24, (0.08, 1.0), (3 / 4, 4 / 3), 28, (0.5,) * 3, (0.25,) * 3)


def test_draws_are_pure_and_distinct():
    idx = np.arange(1000)
    a = uniforms(7, idx, 2, 3)
    assert np.array_equal(a, uniforms(7, idx, 2, 3))
    assert np.array_equal(a[500:], uniforms(7, idx[500:], 2, 3)), "a row's draws must not depend on its batch"
    assert not np.array_equal(a, uniforms(7, idx, 3, 3))
    assert not np.array_equal(a, uniforms(8, idx, 2, 3))
    assert a.min() >= 0 and a.max() < 1 and abs(a.mean() - 0.5) < 0.03


def test_crop_flip_params_cover_the_range():
    dy, dx, flip = crop_flip_params(CROP, np.arange(5000), 0)
    assert set(np.unique(dy)) == set(range(9)) and set(np.unique(dx)) == set(range(9))
    assert 0.45 < flip.mean() < 0.55


@pytest.mark.parametrize("shape,pad", [((32, 32, 3), 4), ((28, 20, 1), 2), ((32, 32, 3), 0)])
def test_render_train_view_matches_a_manual_crop_and_flip(shape, pad):
    spec = dataclasses.replace(CROP, pad=pad)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(16, *shape), dtype=np.uint8)
    idx = np.arange(100, 116)
    out = render_train_view([im.tobytes() for im in images], idx, 1, spec, shape)
    assert out.shape == (16, shape[2], shape[0], shape[1]) and out.dtype == np.uint8
    dy, dx, flip = crop_flip_params(spec, idx, 1)
    assert flip.any() and not flip.all() and (pad == 0 or len(set(dx)) > 1)
    for i in range(16):
        padded = np.pad(images[i], ((pad, pad), (pad, pad), (0, 0)))
        crop = padded[dy[i] : dy[i] + shape[0], dx[i] : dx[i] + shape[1]]
        if flip[i]:
            crop = crop[:, ::-1]
        assert np.array_equal(out[i], crop.transpose(2, 0, 1))
    # same (seed, idx, view) → same pixels, from a different batch composition
    again = render_train_view([im.tobytes() for im in images[3:5]], idx[3:5], 1, spec, shape)
    assert np.array_equal(again, out[3:5])
    assert np.array_equal(render_eval_view(images, spec), images.transpose(0, 3, 1, 2))


def test_rrc_views_of_encoded_images():
    rng = np.random.default_rng(1)
    files = []
    for h, w in [(40, 60), (50, 30), (28, 28)]:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
        files.append(buf.getvalue())
    a = render_train_view(files, np.array([0, 1, 2]), 0, RRC)
    assert a.shape == (3, 3, 24, 24)
    assert np.array_equal(a, render_train_view(files, np.array([0, 1, 2]), 0, RRC))
    assert not np.array_equal(a, render_train_view(files, np.array([0, 1, 2]), 1, RRC))
    assert render_eval_view(files, RRC).shape == (3, 3, 24, 24)
    for i in range(200):
        top, left, h, w = rrc_box(RRC, uniforms(3, np.array([i]), 0, 41)[0], 40, 60)
        assert top >= 0 and left >= 0 and top + h <= 40 and left + w <= 60 and h > 0 and w > 0


def test_view_schedule_and_spec_digest():
    assert [view_for_epoch(e, 4) for e in range(9)] == [0, 1, 2, 3, 0, 1, 2, 3, 0]
    other = ViewSpec.from_dict({**CROP.to_dict(), "seed": 8})
    assert other.digest != CROP.digest and ViewSpec.from_dict(CROP.to_dict()).digest == CROP.digest
    assert CROP.diff(other) == ["seed: 7 vs 8"]
