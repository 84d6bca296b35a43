"""One distillation step with optional mixed precision, shared by the Ray trainer, benchmarks and notebooks.

Pure PyTorch: the caller owns data, devices and distribution (wrap the Distiller in DDP before passing it).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
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
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.whole = None  # the whole step as one compiled graph (`compile_whole`), else eager

    def compiled(self, backend: str = "inductor", mode: str | None = None):
        """This step (forward, loss, backward, optimizer) as one compiled graph: a `camkd.compiled.CompiledStep`."""
        from camkd.compiled import CompiledStep

        return CompiledStep(self, backend=backend, mode=mode)

    def compile_whole(self, backend: str = "inductor", mode: str | None = None) -> None:
        """From now on `run` is one compiled graph (see `camkd.compiled`)."""
        self.whole = self.compiled(backend, mode)

    def run(self, images: torch.Tensor, labels: torch.Tensor, teachers: TeacherOutputs, epoch: int):
        """forward, backward and the optimizer's step → (loss, student logits, named terms, teacher weights)."""
        if self.whole is not None:
            return self.whole(images, labels, teachers, epoch)
        out = self.forward(images, labels, teachers, epoch)
        self.backward_and_step(out[0], epoch)
        return out

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


class Normalizer:
    """uint8 [B,C,H,W] → float (x/255 − mean)/std, then (with `size`) resized bilinearly (antialiased) to
    [H, W] where the images differ. The constants are built once per device: a tensor made from Python numbers on
    a GPU is a pageable host→device copy, which waits for the stream, so building them per call would make every
    step wait for the previous one's backward, all-reduce and optimizer step."""

    def __init__(self, mean, std, size: tuple[int, int] | None = None) -> None:
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.size = (int(size[0]), int(size[1])) if size else None
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"mean {list(self.mean)} and std {list(self.std)} need one value per channel")
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as [1,C,1,1] float32 tensors on `device`, made on the first call for that device."""
        c = self._constants.get(device)
        if c is None:
            m = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1).to(device)
            s = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1).to(device)
            c = self._constants[device] = (m, s)
        return c

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        m, s = self.constants(images.device)
        x = (images.float() / 255.0 - m) / s
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return x


@lru_cache(maxsize=64)
def _normalizer(mean: tuple[float, ...], std: tuple[float, ...]) -> Normalizer:
    return Normalizer(mean, std)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B,C,H,W] → float (x/255 − mean)/std, on the tensor's device (constants kept per device: no host
    sync after the first call)."""
    return _normalizer(tuple(float(m) for m in mean), tuple(float(s) for s in std))(images)
