"""Adapter exposing timm models (``timm:<name>``) through the FeatureClassifier contract: ``forward_features``
is timm's own (the last stage's map, the tap the connectors use), ``forward_head`` timm's own head.

timm is optional (``pip install 'camkd-ray[timm]'``) and imported only when a ``timm:`` model is built or checked.
Models are always built with ``pretrained=False``: weights come from the teacher's local checkpoint file, never
from a hub. The timm model's children are this module's own children (same names), so timm state_dicts load
directly. Never imports Ray.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

from .base import FeatureClassifier

PREFIX = "timm:"
INSTALL_HINT = "pip install 'camkd-ray[timm]'"


def import_timm(name: str):
    """The timm package, or an ImportError that says how to install it."""
    try:
        import timm
    except ImportError:
        raise ImportError(f"{PREFIX}{name} needs timm: {INSTALL_HINT}") from None
    return timm


def check_name(name: str) -> None:
    """Raise ValueError unless timm lists ``name`` (an architecture, optionally with a pretrained tag such as
    ``resnet18.a1_in1k``); the message names close matches and the fix. Hub names (``hf-hub:``, ``local-dir:``)
    are refused: building them would read a config from outside."""
    timm = import_timm(name)
    if ":" not in name and timm.is_model(name):
        return
    known = timm.list_models()
    close = difflib.get_close_matches(name.split(".", 1)[0], known, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(PREFIX + c for c in close)}?" if close else ""
    raise ValueError(
        f"unknown timm model {name!r} (timm {timm.__version__}).{hint} Use a name timm.list_models() lists, "
        f"as '{PREFIX}<name>' (weights come from the teacher's checkpoint file, never from a hub)"
    )


def pretrained_preprocessing(name: str) -> dict[str, Any] | None:
    """timm's default input preprocessing for ``name`` (its ``pretrained_cfg``): ``{"mean", "std",
    "input_size": (C, H, W)}``, or None when timm registers none. What the pretrained weights expect; camkd
    applies it only when a teacher's config says so (``teachers[].mean/std/input_size``)."""
    timm = import_timm(name)
    cfg = timm.models.get_pretrained_cfg(name)
    return None if cfg is None else _preprocessing_of(cfg.to_dict())


def _preprocessing_of(cfg: dict[str, Any]) -> dict[str, Any]:
    return {
        "mean": list(cfg.get("mean") or ()),
        "std": list(cfg.get("std") or ()),
        "input_size": tuple(cfg.get("input_size") or ()),
    }


class TimmHead(nn.Module):
    """A stand-alone view of a timm model's head: the children its ``forward_head`` uses, shared with the model
    (so ``state_dict()`` holds exactly those parameters), applied through the model's own ``forward_head``."""

    def __init__(self, owner: TimmClassifier, names: list[str]) -> None:
        super().__init__()
        for n in names:
            self.add_module(n, owner.timm_model.get_submodule(n))
        self.__dict__["_owner"] = owner  # not a child: only the head's children are this module's

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return self._owner.forward_head(fmap)


class TimmClassifier(FeatureClassifier):
    """A timm model split at timm's own ``forward_features`` / ``forward_head``.

    ``forward_features`` returns timm's last-stage map ``[B, C, H, W]`` (NHWC models are permuted to NCHW, and
    back before their head); ``num_features`` is timm's. ``feature_info`` (timm's, where the model has it) lists
    every stage's channels and reduction; ``pretrained_cfg`` holds timm's default preprocessing (mean, std,
    input_size) for callers to use.
    """

    def __init__(self, name: str, num_classes: int, in_chans: int = 3) -> None:
        check_name(name)
        timm = import_timm(name)
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
        if getattr(model, "num_prefix_tokens", None) is not None:
            raise ValueError(
                f"{PREFIX}{name} is a vision transformer: its features are tokens [B, N, C], not a map; camkd's "
                "feature taps and connectors need a convolutional model (resnet*, mobilenetv3_*, efficientnet_*, "
                "convnext_*, regnet*, ...)"
            )
        super().__init__(num_classes, in_chans, int(model.num_features))
        self.nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"
        # The timm model's children, parameters and buffers ARE this module's (the same dicts): state_dict names
        # are timm's, `.to()` and `.train()` reach every one of them, and timm's forward_* run on them.
        for shared in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
            self.__dict__[shared] = model.__dict__[shared]
        self.__dict__["timm_model"] = model  # not a child: its children are already ours
        self.pretrained_cfg: dict[str, Any] = dict(getattr(model, "pretrained_cfg", None) or {})
        info = getattr(model, "feature_info", None)
        self.feature_info: list[dict[str, Any]] = [dict(i) for i in info] if isinstance(info, list) else []
        self._head_names: list[str] | None = None

    @property
    def default_preprocessing(self) -> dict[str, Any]:
        """timm's ``pretrained_cfg`` mean, std and input_size (C, H, W) of this model."""
        return _preprocessing_of(self.pretrained_cfg)

    def train(self, mode: bool = True) -> TimmClassifier:
        super().train(mode)
        self.timm_model.training = mode  # timm's own top-level checks (dropout) read it
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.timm_model.forward_features(x)
        if fmap.ndim != 4:
            raise ValueError(
                f"{self.arch}: timm's forward_features returned shape {list(fmap.shape)}, not a [B, C, H, W] map; "
                "use a convolutional timm model"
            )
        return fmap.permute(0, 3, 1, 2) if self.nhwc else fmap

    def forward_head(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.timm_model.forward_head(fmap.permute(0, 2, 3, 1) if self.nhwc else fmap)

    @property
    def head(self) -> nn.Module:
        """The children timm's ``forward_head`` uses (found once, by running it on a small map)."""
        if self._head_names is None:
            self._head_names = self._find_head_children()
        return TimmHead(self, self._head_names)

    def _find_head_children(self) -> list[str]:
        used: list[str] = []
        hooks = [
            child.register_forward_hook(lambda m, i, o, n=n: used.append(n) if n not in used else None)
            for n, child in self.timm_model.named_children()
        ]
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                p = next(iter(self.parameters()))
                self.forward_head(torch.zeros(2, self.feature_channels, 2, 2, dtype=p.dtype, device=p.device))
        finally:
            for h in hooks:
                h.remove()
            self.train(was_training)
        return used
