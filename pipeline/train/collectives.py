"""Every collective of the training loop, in one place, on tensors of the training device.

NCCL (Ray Train's backend for GPU workers) takes CUDA tensors only and gloo takes both, so a tensor on the
training device works everywhere; a tensor anywhere else is refused here, before it reaches the backend, with a
message naming both devices. There is no one-worker shortcut: Ray Train sets up a process group for any number of
workers, so a 1-GPU run makes the same calls as a 64-GPU run and a wrong device fails on the first run.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class CollectiveDeviceError(ValueError):
    """A tensor handed to a collective is not on the training device."""


def same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


class Collectives:
    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def backend(self) -> str:
        """The process group's backend ("nccl", "gloo"), or "none" outside a process group."""
        return str(dist.get_backend()) if self.active else "none"

    @property
    def world(self) -> int:
        return dist.get_world_size() if self.active else 1

    def _check(self, tensor: torch.Tensor, op: str) -> None:
        if not same_device(tensor.device, self.device):
            raise CollectiveDeviceError(
                f"{op}: the tensor is on {tensor.device}, but this worker trains on {self.device}; "
                f"collectives take tensors of the training device (NCCL accepts CUDA tensors only): "
                f"create it with device={self.device} or move it with .to(device) first"
            )

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) in place; returns the tensor."""
        self._check(tensor, "sum")
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def min(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce (min) in place; returns the tensor."""
        self._check(tensor, "min")
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s tensor on every rank, in place; returns the tensor."""
        self._check(tensor, "broadcast")
        if self.active:
            dist.broadcast(tensor, src=src)
        return tensor

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
