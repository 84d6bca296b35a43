"""Connectors: map the student's last-stage feature map onto the feature shape of a group of teachers.

Resize (adaptive average pool when the student map is at least as large, bilinear when smaller, as in the
official CA-MKD code), then Conv1x1 (with bias) → BN → ReLU to the teacher's channels, trained with the student.
The K teachers of one feature shape (C,H,W) share one stacked connector: the map is resized once, then one 1×1
convolution with K·C output channels, one BatchNorm over the K·C channels and one ReLU compute all K connectors
(channel block k is teacher k's connector, the same math as K separate ones): adding a teacher adds data, not ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


def _teacher_shape(teacher_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(teacher_shape) != 3:
        raise ValueError(f"teacher_shape must be (C,H,W), got {tuple(teacher_shape)}")
    channels, height, width = (int(v) for v in teacher_shape)
    return channels, height, width


class Connector(nn.Module):
    """Student map [B,C_s,H_s,W_s] → K teacher-shaped maps, as one tensor [B,K·C_t,H_t,W_t] (`per_teacher` views
    it as [B,K,C_t,H_t,W_t]). K = 1 is one teacher's connector."""

    def __init__(self, student_channels: int, teacher_shape: Sequence[int], count: int = 1) -> None:
        super().__init__()
        channels, height, width = _teacher_shape(teacher_shape)
        if count < 1:
            raise ValueError(f"a connector serves at least one teacher, got count={count}")
        self.student_channels, self.count = int(student_channels), int(count)
        self.teacher_shape = (channels, height, width)
        self.conv = nn.Conv2d(self.student_channels, count * channels, kernel_size=1, bias=True)
        self.bn = nn.BatchNorm2d(count * channels)

    def forward(self, student_features: Tensor) -> Tensor:
        return F.relu(self.pre_activation(student_features), inplace=True)

    def pre_activation(self, student_features: Tensor) -> Tensor:
        """The map before the ReLU: resize → Conv1x1 → BN, [B,K·C_t,H_t,W_t] (`camkd.closed_form.HeadsAndMSE`
        applies the ReLU itself)."""
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
        return self.bn(self.conv(student_features))

    def per_teacher(self, connected: Tensor) -> Tensor:
        """[B,K·C,H,W] → [B,K,C,H,W] (a view: no copy, no op per teacher)."""
        return connected.view(connected.shape[0], self.count, *self.teacher_shape)
