"""Per-teacher connectors: map the student's last-stage feature map onto one teacher's feature shape.

Resize (adaptive average pool when the student map is at least as large, bilinear when smaller, as in the
official CA-MKD code), then Conv1x1 (with bias) → BN → ReLU to the teacher's channels. Trained with the student.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class Connector(nn.Module):
    """Student map [B,C_s,H_s,W_s] → teacher-shaped map [B,C_t,H_t,W_t]."""

    def __init__(self, student_channels: int, teacher_shape: Sequence[int]) -> None:
        super().__init__()
        if len(teacher_shape) != 3:
            raise ValueError(f"teacher_shape must be (C,H,W), got {tuple(teacher_shape)}")
        channels, height, width = (int(v) for v in teacher_shape)
        self.student_channels = int(student_channels)
        self.teacher_shape = (channels, height, width)
        self.transfer = nn.Sequential(
            nn.Conv2d(self.student_channels, channels, kernel_size=1, bias=True),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, student_features: Tensor) -> Tensor:
        if student_features.dim() != 4 or student_features.shape[1] != self.student_channels:
            raise ValueError(
                f"connector expects a student map [B,{self.student_channels},H,W], "
                f"got [{','.join(map(str, student_features.shape))}]"
            )
        _, height, width = self.teacher_shape
        h, w = student_features.shape[-2:]
        if (h, w) != (height, width):
            if h >= height:
                student_features = F.adaptive_avg_pool2d(student_features, (height, width))
            else:
                student_features = F.interpolate(student_features, size=(height, width), mode="bilinear")
        return self.transfer(student_features)


def build_connectors(student_channels: int, teacher_shapes: Sequence[Sequence[int]]) -> nn.ModuleList:
    """One `Connector` per teacher feature shape (C,H,W)."""
    return nn.ModuleList(Connector(student_channels, shape) for shape in teacher_shapes)
