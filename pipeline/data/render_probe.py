"""A fingerprint of the view rendering itself: a fixed synthetic probe image rendered for a few views.

Precompute records it in every cache manifest; training's plan and `precompute --verify` render the same probe with
the code they run and compare, so a cache made by a rendering that has since changed (a new crop rule, another
resize, another Pillow) is named before any student trains on it. It depends on the view spec's family (never on
`views.count`: view v is a pure function of (seed, idx, v)). Imports neither Ray nor torch; renders through
`pipeline.data.views` as training does, never a copy of it.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image

from pipeline.data import views
from pipeline.data.views import ViewSpec

PROBE_IDX = (0, 1, 7, 1_000_003)  # idx values of the probe's images (the draws depend on idx)
PROBE_VIEWS = 4  # training views 0..3 are rendered, then the evaluation view
ENCODED_SIZE = (61, 47)  # (width, height) of the encoded probe: not square, so crops and resizes show


def _pattern(height: int, width: int, channels: int) -> np.ndarray:
    """uint8 [N,H,W,C]: a gradient per image and channel with a diagonal stripe, so no crop or flip is invisible."""
    i = np.arange(len(PROBE_IDX))[:, None, None, None]
    y = np.arange(height)[None, :, None, None]
    x = np.arange(width)[None, None, :, None]
    c = np.arange(channels)[None, None, None, :]
    values = (7 * y + 13 * x + 101 * c + 29 * i + 64 * ((x + y) % 5 == 0)) % 256
    return values.astype(np.uint8)


def probe_images(spec: ViewSpec, image_shape) -> list[bytes] | np.ndarray:
    """The probe as the dataset's images come: a uint8 [N,H,W,C] array of `image_shape` (raw sources), or
    lossless PNG files (encoded sources: the decoder's pixels do not depend on the encoder's version)."""
    if spec.kind == "crop_flip":
        return _pattern(*image_shape)
    files = []
    for image in _pattern(ENCODED_SIZE[1], ENCODED_SIZE[0], 3):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        files.append(buf.getvalue())
    return files


def render_digest(spec: ViewSpec, image_shape) -> str:
    """sha256 (first 16 hex digits) of the probe's pixels rendered for training views 0..3 and the evaluation view
    by the rendering this process runs."""
    images = probe_images(spec, image_shape)
    idx = np.asarray(PROBE_IDX, dtype=np.int64)
    digest = hashlib.sha256()
    for view in range(PROBE_VIEWS):
        digest.update(views.render_train(images, idx, view, spec, image_shape).pixels.tobytes())
    digest.update(views.render_eval(images, spec, image_shape).pixels.tobytes())
    return digest.hexdigest()[:16]
