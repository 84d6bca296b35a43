"""Host batches onto the training device: each batch copied once into a reused staging buffer (pinned on a GPU)
and sent in one asynchronous host→device copy, on a copy stream of its own; the batch's tensors are views of that
one device buffer.

Runs in a worker's lane threads (`epochs.LaneFeeder`), never in the training thread: the training thread only
makes its stream wait for the copy (`Staged.ready`, no host sync).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

ALIGN = 64  # bytes: every column starts on a 64-byte boundary of the staging buffer


@dataclass
class Staged:
    """One batch on the device, and the copy it waits for (None on a CPU device)."""

    tensors: dict[str, torch.Tensor]
    copied: torch.cuda.Event | None = None
    buffer: torch.Tensor | None = None  # the device buffer the tensors are views of

    def ready(self) -> dict[str, torch.Tensor]:
        """The batch, usable on the current stream: it waits for the copy on the device, not on the host, and
        the batch's memory is not reused before the current stream is done with it."""
        if self.copied is not None and self.buffer is not None:
            stream = torch.cuda.current_stream()
            stream.wait_event(self.copied)
            self.buffer.record_stream(stream)
        return self.tensors


def _layout(batch: dict[str, np.ndarray]) -> tuple[list[tuple[str, int, np.ndarray]], int]:
    """(column, offset, array) for each column of `batch`, and the bytes the staging buffer needs."""
    out, offset = [], 0
    for k, v in batch.items():
        out.append((k, offset, v))
        offset += -(-v.nbytes // ALIGN) * ALIGN
    return out, offset


class Staging:
    """A lane's staging buffers: `slots` of them, reused in turn (a slot is refilled only once its last copy to
    the device is done). On a CPU device the batch is used where it lies (views, no copy) unless `copy` asks for
    the staging copy anyway (what a GPU's host side does, measured on a CPU: `benchmarks/host_cost.py --stage`)."""

    def __init__(self, device: torch.device, pin: bool, slots: int, copy: bool = False) -> None:
        self.device, self.pin, self.copy = device, pin and device.type == "cuda", copy
        self.slots: list[tuple[torch.Tensor, torch.cuda.Event | None] | None] = [None] * max(2, slots)
        self.turn = 0
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, batch: dict[str, np.ndarray]) -> Staged:
        if self.device.type == "cpu" and not self.copy:
            return Staged({k: torch.from_numpy(v) for k, v in batch.items()})
        columns, nbytes = _layout(batch)
        turn = self.turn
        self.turn = (turn + 1) % len(self.slots)
        host = self._buffer(turn, nbytes)
        flat = host.numpy()
        for _, offset, v in columns:
            np.copyto(flat[offset : offset + v.nbytes].view(v.dtype).reshape(v.shape), v)
        if self.stream is None:
            return Staged(_views(host, columns))
        with torch.cuda.stream(self.stream):
            on_device = host[:nbytes].to(self.device, non_blocking=self.pin)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        self.slots[turn] = (host, copied)
        return Staged(_views(on_device, columns), copied, on_device)

    def _buffer(self, turn: int, nbytes: int) -> torch.Tensor:
        """Slot `turn`'s buffer, at least `nbytes` long, once its previous copy is done (this thread waits)."""
        slot = self.slots[turn]
        if slot is not None:
            host, copied = slot
            if copied is not None:
                copied.synchronize()
            if host.numel() >= nbytes:
                return host
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
        self.slots[turn] = (host, None)
        return host


def _views(buffer: torch.Tensor, columns: list[tuple[str, int, np.ndarray]]) -> dict[str, torch.Tensor]:
    """The batch's columns as views of `buffer` (host or device), each in its own dtype and shape."""
    out = {}
    for k, offset, v in columns:
        dtype = torch.from_numpy(v[:0]).dtype
        out[k] = buffer[offset : offset + v.nbytes].view(dtype).view(v.shape)
    return out
