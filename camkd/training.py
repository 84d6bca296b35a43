"""One distillation step with optional mixed precision, shared by the Ray trainer, benchmarks and notebooks.

Pure PyTorch: the caller owns data, devices and distribution (wrap the Distiller in DDP before passing it).
"""

from __future__ import annotations

import warnings
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


def _fused_devices() -> set[str]:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return set(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - an older or newer torch without the helper
        return {"cuda"}


def build_optimizer(
    params, lr: float, momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 5e-4
) -> torch.optim.SGD:
    """SGD (the paper's recipe) in as few ops per step as torch allows, chosen once: fused (one kernel for every
    parameter) where torch has fused SGD for the parameters' device, else foreach (a handful of ops whatever the
    parameter count). The same update as torch's per-parameter loop. Momentum buffers exist from the start, zeros
    (with no dampening the first update is the same as torch's buffer = gradient): parameters that join late, as
    CA-MKD's connectors after the warm-up, would otherwise break the fused kernel; a loaded state is filled in
    the same way."""
    params = [p for p in params if p.requires_grad]
    fused = bool(params) and all(p.device.type in _fused_devices() and p.is_floating_point() for p in params)
    optimizer = torch.optim.SGD(
        params,
        lr=lr,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
        foreach=not fused,
        fused=fused or None,
    )
    if fused and momentum:
        _fill_momentum_buffers(optimizer)
        optimizer.register_load_state_dict_post_hook(_fill_momentum_buffers)
    return optimizer


def _fill_momentum_buffers(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        if group["momentum"] and group.get("dampening", 0) == 0:
            for p in group["params"]:
                state = optimizer.state[p]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, distiller: Distiller) -> None:
    """`optimizer.load_state_dict(state)`; a state written by camkd <= 0.1 (CA-MKD with one connector per teacher:
    4 tensors per teacher after the student's) is converted first, with a warning (its momentum buffers stacked
    per teacher group as the connectors are)."""
    saved = state["param_groups"][0]["params"] if len(state["param_groups"]) == 1 else None
    params = optimizer.param_groups[0]["params"]
    groups = getattr(distiller.strategy, "teacher_groups", None)
    if saved is None or len(saved) == len(params) or groups is None:
        optimizer.load_state_dict(state)
        return
    mine = {id(p) for p in groups.parameters()}
    others = [i for i, p in enumerate(params) if id(p) not in mine]
    n_old = len(others) + 4 * groups.count
    if len(saved) != n_old or others != list(range(len(others))):
        optimizer.load_state_dict(state)  # torch's own error names the mismatch
        return
    position = {pid: i for i, pid in enumerate(saved)}
    old = {position[pid]: v for pid, v in state["state"].items()}
    per_teacher = [
        [old.get(len(others) + 4 * i + j, {}).get("momentum_buffer") for j in range(4)]
        for i in range(groups.count)
    ]
    new_state = {i: old[i] for i in range(len(others)) if i in old}
    for j, buf in enumerate(groups.stack_per_teacher(per_teacher)):
        if buf is not None:
            new_state[len(others) + j] = {"momentum_buffer": buf}
    group = dict(state["param_groups"][0], params=list(range(len(params))))
    warnings.warn(
        f"converted an optimizer state of per-teacher CA-MKD connectors ({groups.count} teachers, written by "
        f"camkd <= 0.1) into {len(groups.groups)} stacked teacher group(s)",
        stacklevel=2,
    )
    optimizer.load_state_dict({"state": new_state, "param_groups": [group]})


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
