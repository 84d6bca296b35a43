"""One distillation step with optional mixed precision, shared by the Ray trainer, benchmarks and notebooks.

Pure PyTorch: the caller owns data, devices and distribution (wrap the Distiller in DDP before passing it).
"""

from __future__ import annotations

import torch
from torch import nn

from camkd.strategies import Distiller, TeacherOutputs


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `mode` ("auto" | "off" | "bf16" | "fp16"): None on CPU or when off."""
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


class TrainStep:
    """Forward under autocast, then backward/step with a GradScaler (fp16 only).

    `model` is the Distiller itself or its DDP wrapper; `distiller` is always the unwrapped module (its strategy
    says which parameters sit out the current epoch).
    """

    def __init__(
        self,
        model: nn.Module,
        distiller: Distiller,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        dtype: torch.dtype | None,
    ) -> None:
        self.model, self.distiller, self.optimizer = model, distiller, optimizer
        self.device, self.dtype = device, dtype
        self.scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, teachers: TeacherOutputs, epoch: int):
        """→ (loss, student logits, named terms, per-sample teacher weights or None)."""
        with torch.autocast(
            self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None
        ):
            return self.model(images, labels, teachers, epoch)

    def backward_and_step(self, loss: torch.Tensor, epoch: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        for p in self.distiller.strategy.idle_parameters(epoch):
            p.grad = None  # not in the loss yet: the optimiser skips it (no decay, no momentum), as upstream
        self.scaler.step(self.optimizer)
        self.scaler.update()


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B,C,H,W] → float (x/255 − mean)/std, on the tensor's device."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s
