"""Input preprocessing per model: the (mean, std) a teacher's or the student's uint8 pixels are normalised with,
and the [H, W] they are resized to (None: the data's own size).

Precedence, one rule for every model: the model's own config (`teachers[].mean/std/input_size`,
`student.mean/std/input_size`), else the dataset's (`data.mean/std`, the views' size). A teacher's own values are
part of its cache's identity (`TeacherRef.id`), so its cached outputs stay valid per preprocessing; the default
keeps the id it always had. timm's `pretrained_cfg` and torchvision's weights meta apply to a teacher that says
`preprocessing: pretrained` (filled in by its config, `pipeline/config/schema.py`); otherwise `pretrained_hint` says what
they hold. Imports neither Ray nor torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Size = tuple[int, int]


@dataclass(frozen=True)
class Preprocessing:
    """What a model's inputs go through after the views: `(x/255 − mean)/std`, then a resize to `size`."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: Size | None = None  # None: the data's own size

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": list(self.mean),
            "std": list(self.std),
            "size": list(self.size) if self.size else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        size = d.get("size")
        return cls(tuple(d["mean"]), tuple(d["std"]), (int(size[0]), int(size[1])) if size else None)

    def input_hw(self, data_hw: Size) -> Size:
        """[H, W] the model sees when the data is `data_hw`."""
        return self.size or data_hw

    def normalizer(self):
        """The `camkd.training.Normalizer` that applies it (on the images' device; torch imported here)."""
        from camkd.training import Normalizer

        return Normalizer(self.mean, self.std, self.size)


def square_size(v: Any) -> Any:
    """`input_size: 224` → (224, 224); a pair stays as it is (the config's validators call this)."""
    return (v, v) if isinstance(v, int) and not isinstance(v, bool) else v


def check_own(who: str, mean, std, size) -> None:
    """A config's own values: both or neither of mean/std, as many values each, std positive; sizes of at least
    8 pixels. (Their channel count is checked against the dataset once it is known: `own_values`.)"""
    if (mean is None) != (std is None):
        raise ValueError(f"{who}: set both mean and std, or neither (the dataset's are used)")
    if mean is not None and (len(mean) != len(std) or not mean):
        raise ValueError(f"{who}: mean {mean} and std {std} need one value per channel each")
    if std is not None and any(s <= 0 for s in std):
        raise ValueError(f"{who}: std must be positive, got {std}")
    if size is not None and min(size) < 8:
        raise ValueError(f"{who}: input_size must be at least 8 pixels a side, got {list(size)}")


def data_hw(cfg, meta) -> Size:
    """[H, W] of the data's views, what a model sees without its own `input_size`: the images' own size, or
    `data.image_size` for encoded images (image folders)."""
    if meta.image_shape:
        return int(meta.image_shape[0]), int(meta.image_shape[1])
    return int(cfg.data.image_size), int(cfg.data.image_size)


def own_values(
    who: str,
    mean,
    std,
    size,
    channels: int,
    dataset: tuple[list[float], list[float]],
    data_size: Size | None = None,
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None, Size | None]:
    """A model's own (mean, std, size) from its config, checked against the dataset's channels; mean/std equal to
    the dataset's, and a size equal to the data's (`data_size`, when known), count as unset (the same inputs, the
    same cache). Raises ValueError naming the field and fix."""
    if mean is not None and len(mean) != channels:
        raise ValueError(
            f"{who}.mean has {len(mean)} value(s) and {who}.std {len(std)}, the dataset has {channels} channel(s); "
            f"give one value per channel (or drop them: the dataset's {dataset[0]} / {dataset[1]} are used)"
        )
    if mean is not None and [_per_channel(v, channels) for v in (mean, std)] == [
        _per_channel(v, channels) for v in dataset
    ]:
        mean = std = None
    if size is not None and data_size is not None and tuple(size) == tuple(data_size):
        size = None
    return (
        None if mean is None else tuple(float(m) for m in mean),
        None if std is None else tuple(float(s) for s in std),
        None if size is None else (int(size[0]), int(size[1])),
    )


def _per_channel(values, channels: int) -> list[float]:
    """Values per channel (one value, as data.mean may give, stands for every channel)."""
    values = [float(v) for v in values]
    return values * channels if len(values) == 1 else values


def of_teacher(ref, spec) -> Preprocessing:
    """A resolved teacher's preprocessing (`TeacherRef`'s own values, else the views' mean/std and size)."""
    return Preprocessing(
        tuple(ref.mean or spec.mean),
        tuple(ref.std or spec.std),
        tuple(ref.input_size) if ref.input_size else None,
    )


def of_student(cfg, spec, channels: int) -> Preprocessing:
    """The student's preprocessing for this config and dataset (ValueError when it does not fit the data)."""
    s = cfg.student
    mean, std, size = own_values("student", s.mean, s.std, s.input_size, channels, (spec.mean, spec.std))
    return Preprocessing(tuple(mean or spec.mean), tuple(std or spec.std), size)


def pretrained_hint(teacher, channels: int, dataset: tuple[list[float], list[float]]) -> str | None:
    """One line saying what the teacher architecture's pretrained weights expect (timm's `pretrained_cfg`,
    torchvision's weights meta) when that differs from what it gets now; None when nothing is known or it
    matches."""
    if (
        teacher.mean is not None or teacher.checkpoint is None
    ):  # its own values, or trained here on the data's
        return None
    from camkd.models import pretrained_preprocessing

    try:
        pre = pretrained_preprocessing(teacher.arch)
    except (ImportError, ValueError, RuntimeError):
        return None
    if not pre or len(pre["mean"]) != channels:
        return None
    if [round(m, 4) for m in pre["mean"]] == [round(m, 4) for m in dataset[0]] and [
        round(s, 4) for s in pre["std"]
    ] == [round(s, 4) for s in dataset[1]]:
        return None
    size = pre.get("input_size") or ()
    side = f", input_size: {list(size[-2:])}" if len(size) >= 2 else ""
    return (
        f"teacher {teacher.name!r} ({teacher.arch}) gets the dataset's normalisation; its pretrained weights "
        f"expect mean: {pre['mean']}, std: {pre['std']}{side} — if the checkpoint holds them, set "
        f"`preprocessing: pretrained` under teachers[{teacher.name}] (or mean/std/input_size)"
    )
