"""What a student costs to deploy, counted from the model itself: parameters and multiply-accumulates per image.

MACs come from torch's own `FlopCounterMode` over one forward pass of a single image (convolutions, matrix
multiplies, attention: the operations it counts, each at 2 FLOPs per multiply-accumulate); normalisation,
activations and additions are not counted, as in the usual published MAC figures. Pure torch: never imports Ray.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def parameter_count(model: nn.Module) -> int:
    """Every parameter's elements (trainable or not); buffers such as BatchNorm's running statistics excluded."""
    return sum(p.numel() for p in model.parameters())


def macs_per_image(model: nn.Module, in_chans: int, height: int, width: int | None = None) -> int:
    """Multiply-accumulates of one forward pass of one `in_chans × height × width` image, in eval mode (the
    model's mode is restored). Runs on the model's device."""
    was_training = model.training
    device = next(model.parameters()).device
    x = torch.zeros(1, in_chans, height, width or height, device=device)
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
