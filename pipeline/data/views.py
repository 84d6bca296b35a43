"""Augmentation replay: view parameters are a pure function of (seed, idx, view).

Precompute and training call the same `render_train_view`, so the student trains on exactly the pixels the teacher
saw. Fixed-size sources use a zero-padded random crop + horizontal flip (the CIFAR recipe); image folders use
RandomResizedCrop + flip. At epoch e every image uses view e mod V, so one epoch reads one view's cache files.
Encoded images can be decoded at reduced size (`decode: draft`: JPEG DCT scaling, never below what the crop
needs); that changes pixels, so the decode mode is part of the view spec. Views of one spec differ only in their
number, so caches of V = 2 and V = 4 share a family (`ViewSpec.family`) and growing V computes only new views.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_RRC_ATTEMPTS = 10


@dataclass(frozen=True)
class ViewSpec:
    """Everything that determines the pixels a teacher sees (so it is part of the cache's identity)."""

    kind: str  # "crop_flip" (fixed-size raw images) or "rrc_flip" (encoded images)
    count: int
    seed: int
    pad: int
    flip: bool
    size: int  # output side (rrc_flip); 0 for crop_flip (the image's own size)
    scale: tuple[float, float]
    ratio: tuple[float, float]
    eval_resize: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    decode: str = "full"  # "full" | "draft" (encoded images: JPEG draft mode at the size the crop needs)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ViewSpec:
        d = dict(d)
        for key in ("scale", "ratio", "mean", "std"):
            d[key] = tuple(d[key])
        return cls(**d)

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    @property
    def family(self) -> str:
        """Digest of everything but `count`: view v renders the same pixels for every V of one family."""
        d = self.to_dict()
        d.pop("count")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def with_count(self, count: int) -> ViewSpec:
        return ViewSpec.from_dict({**self.to_dict(), "count": count})

    def diff(self, other: ViewSpec) -> list[str]:
        a, b = self.to_dict(), other.to_dict()
        return [
            f"{k}: {list(a[k]) if isinstance(a[k], tuple) else a[k]!r} vs "
            f"{list(b[k]) if isinstance(b[k], tuple) else b[k]!r}"
            for k in a
            if a[k] != b[k]
        ]


def make_view_spec(cfg, encoding: str) -> ViewSpec:
    """The ViewSpec of a validated `Config` for a dataset of the given encoding ("raw" or "encoded")."""
    mean, std = cfg.data.normalization
    v = cfg.views
    return ViewSpec(
        kind="crop_flip" if encoding == "raw" else "rrc_flip",
        count=v.count,
        seed=v.seed,
        pad=v.pad if encoding == "raw" else 0,
        flip=v.flip,
        size=0 if encoding == "raw" else cfg.data.image_size,
        scale=tuple(v.scale) if encoding != "raw" else (1.0, 1.0),
        ratio=tuple(v.ratio) if encoding != "raw" else (1.0, 1.0),
        eval_resize=0 if encoding == "raw" else cfg.data.eval_resize,
        mean=tuple(mean),
        std=tuple(std),
        decode=v.decode if encoding != "raw" else "full",
    )


def view_for_epoch(epoch: int, count: int) -> int:
    """The view every training image uses at `epoch` (0-based)."""
    return epoch % count


# ----------------------------------------------------------------------------------------- counter-based draws
def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def uniforms(seed: int, idx: np.ndarray, view: int, draws: int) -> np.ndarray:
    """[N, draws] floats in [0, 1), a pure function of (seed, idx, view, draw index)."""
    idx = np.asarray(idx, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        key = _mix(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + _GOLDEN)
        key = _mix(key ^ (np.uint64(view) * np.uint64(0xD1B54A32D192ED03)))
        base = _mix(idx * _GOLDEN ^ key)
        counters = base[:, None] + np.arange(1, draws + 1, dtype=np.uint64)[None, :] * _GOLDEN
    return (_mix(counters) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def crop_flip_params(spec: ViewSpec, idx: np.ndarray, view: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dy, dx, flip) per image for the padded random crop."""
    u = uniforms(spec.seed, idx, view, 3)
    span = 2 * spec.pad + 1
    dy = np.minimum((u[:, 0] * span).astype(np.int64), span - 1)
    dx = np.minimum((u[:, 1] * span).astype(np.int64), span - 1)
    flip = (u[:, 2] < 0.5) if spec.flip else np.zeros(len(u), dtype=bool)
    return dy, dx, flip


def rrc_box(spec: ViewSpec, u: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params driven by the draws `u` → (top, left, h, w)."""
    area = height * width
    log_lo, log_hi = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    for a in range(_RRC_ATTEMPTS):
        ua, ur, ui, uj = u[4 * a : 4 * a + 4]
        target = area * (spec.scale[0] + ua * (spec.scale[1] - spec.scale[0]))
        aspect = math.exp(log_lo + ur * (log_hi - log_lo))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(ui * (height - h + 1)), int(uj * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < spec.ratio[0]:
        w, h = width, round(width / spec.ratio[0])
    elif in_ratio > spec.ratio[1]:
        h, w = height, round(height * spec.ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# ----------------------------------------------------------------------------------------- rendering
@dataclass
class Rendered:
    """A batch of rendered views and how many images were decoded to make them (encoded sources)."""

    pixels: np.ndarray  # uint8 [N,C,H,W]
    decodes: int


def _open(data: bytes, need: tuple[int, int] | None, mode: str) -> Image.Image:
    """Decode an encoded image as RGB; with mode "draft" and `need` = (w, h) of the full image the output must
    keep, JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) that is still at least that large."""
    img = Image.open(io.BytesIO(data))
    if mode == "draft" and need is not None and img.format == "JPEG":
        img.draft("RGB", (max(1, need[0]), max(1, need[1])))
    return img.convert("RGB")


def _header_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def render_train_view(images, idx: np.ndarray, view: int, spec: ViewSpec, image_shape=None) -> np.ndarray:
    """Training view `view` of a batch → uint8 [N,C,H,W] (see `render_train`, which also counts decodes)."""
    return render_train(images, idx, view, spec, image_shape).pixels


def render_train(images, idx: np.ndarray, view: int, spec: ViewSpec, image_shape=None) -> Rendered:
    """Training view `view` of a batch.

    images: for crop_flip, a uint8 [N,H,W,C] array or raw H×W×C byte strings of `image_shape`; for rrc_flip,
    encoded image files (each decoded once).
    """
    idx = np.asarray(idx, dtype=np.int64)
    if spec.kind == "crop_flip":
        arr = _raw_array(images, image_shape)
        return Rendered(_crop_flip(arr, *crop_flip_params(spec, idx, view), spec.pad), 0)
    u = uniforms(spec.seed, idx, view, 4 * _RRC_ATTEMPTS + 1)
    out = np.empty((len(idx), 3, spec.size, spec.size), dtype=np.uint8)
    for i, data in enumerate(images):
        width, height = _header_size(data)
        top, left, h, w = rrc_box(spec, u[i], height, width)
        need = (-(-width * spec.size // w), -(-height * spec.size // h))  # the crop keeps ≥ size pixels
        img = _open(data, need, spec.decode)
        sx, sy = img.width / width, img.height / height
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        img = img.resize((spec.size, spec.size), Image.BILINEAR, box=box)
        if spec.flip and u[i, -1] < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        out[i] = np.asarray(img).transpose(2, 0, 1)
    return Rendered(out, len(idx))


def _crop_flip(arr: np.ndarray, dy: np.ndarray, dx: np.ndarray, flip: np.ndarray, pad: int) -> np.ndarray:
    """uint8 [N,H,W,C] → [N,C,H,W]: image i zero-padded by `pad`, cropped at (dy[i], dx[i]), mirrored if flip[i].

    Vectorised (1.8× a per-image loop at 32 px, the read task's largest cost for logits-only caches): the images
    are written once into a padded [N,C,H+2p,W+2p] array, the flipped ones mirrored as they are written, and one
    gather over its sliding windows takes every crop. A mirrored image's window starts at 2p - dx."""
    n, h, w, c = arr.shape
    chw = arr.transpose(0, 3, 1, 2)
    padded = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=np.uint8)
    rows, cols = slice(pad, pad + h), slice(pad, pad + w)
    padded[~flip, :, rows, cols] = chw[~flip]
    padded[flip, :, rows, cols] = chw[flip][..., ::-1]
    windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(2, 3))
    return windows[np.arange(n), :, dy, np.where(flip, 2 * pad - dx, dx)]


def render_eval_view(images, spec: ViewSpec, image_shape=None) -> np.ndarray:
    """The deterministic evaluation view → uint8 [N,C,H,W] (see `render_eval`)."""
    return render_eval(images, spec, image_shape).pixels


def render_eval(images, spec: ViewSpec, image_shape=None) -> Rendered:
    """The deterministic evaluation view: identity, or shorter side → eval_resize + center crop (image folders)."""
    if spec.kind == "crop_flip":
        return Rendered(np.ascontiguousarray(_raw_array(images, image_shape).transpose(0, 3, 1, 2)), 0)
    out = np.empty((len(images), 3, spec.size, spec.size), dtype=np.uint8)
    for i, data in enumerate(images):
        width, height = _header_size(data)
        scale = spec.eval_resize / min(width, height)
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
        img = _open(data, target, spec.decode)
        img = img.resize(target, Image.BILINEAR)
        left, top = (img.width - spec.size) // 2, (img.height - spec.size) // 2
        img = img.crop((left, top, left + spec.size, top + spec.size))
        out[i] = np.asarray(img).transpose(2, 0, 1)
    return Rendered(out, len(images))


def _raw_array(images, image_shape) -> np.ndarray:
    """Raw pixels as uint8 [N,H,W,C]: a uint8 array as is, a fixed-size binary Arrow column without a copy,
    or a list of byte strings."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4:
        return images
    if hasattr(images, "buffers"):  # pyarrow FixedSizeBinaryArray
        width = images.type.byte_width
        flat = np.frombuffer(
            images.buffers()[1], dtype=np.uint8, count=len(images) * width, offset=images.offset * width
        )
        return flat.reshape(len(images), *image_shape)
    flat = np.frombuffer(b"".join(images), dtype=np.uint8)
    return flat.reshape(len(images), *image_shape)
