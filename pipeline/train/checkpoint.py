"""The run's checkpoint: what a worker saves after every epoch, and what a resumed run, the driver and a sweep
read back. Written in one place (`RunState.save`), read in one place (`RunState.load`); never imports Ray (the
worker hands the folder to `ray.train.report`).

    <run_dir>/checkpoint_epoch_0003/state.pt     RunState (tensors and plain data only: weights_only loads it)
    <run_dir>/checkpoint_epoch_0003/config.json  the run's config
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from pipeline.store import storage

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
CHECKPOINT_PREFIX = "checkpoint_epoch_"


def checkpoint_dir_name(epoch: int) -> str:
    """The folder of the checkpoint written after (0-based) `epoch`."""
    return f"{CHECKPOINT_PREFIX}{epoch + 1:04d}"


@dataclass
class RunState:
    """Everything a run needs to go on after (0-based) `epoch`: its records, its best epoch and that epoch's student
    weights (the exported student), how often it resumed, with how many workers and lanes; and, for training to
    continue, the state of the distiller, optimizer, lr schedule, AMP scaler and RNG."""

    epoch: int
    history: list[dict[str, Any]]
    best: float
    best_epoch: int = 0
    best_student: dict[str, torch.Tensor] | None = None
    resumes: int = 0
    world: int | None = None
    lanes: int | None = None  # the lanes each epoch's rows were cut into (pipeline/train/order.py)
    distiller: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    scaler: dict[str, Any] = field(default_factory=dict)
    rng: torch.Tensor | None = None

    def save(self, folder: str, config: dict[str, Any]) -> None:
        """state.pt and config.json into a local folder (a checkpoint's contents)."""
        torch.save(asdict(self), os.path.join(folder, STATE_FILE))
        with open(os.path.join(folder, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=1)

    @classmethod
    def load(cls, folder: str, map_location: str | torch.device = "cpu") -> RunState:
        """The state saved in a local checkpoint folder."""
        with open(os.path.join(folder, STATE_FILE), "rb") as f:
            return cls._from_bytes(f.read(), map_location)

    @classmethod
    def read(cls, run_dir: str, epoch: int) -> RunState:
        """The state a run saved after its (1-based) `epoch`, from storage (a local path or a URL)."""
        url = storage.join(run_dir, f"{CHECKPOINT_PREFIX}{epoch:04d}", STATE_FILE)
        return cls._from_bytes(storage.read_bytes(url), "cpu")

    @classmethod
    def _from_bytes(cls, data: bytes, map_location) -> RunState:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in state.items() if k in known})


def checkpointed_epochs(run_dir: str) -> int:
    """The last epoch that has a checkpoint under `run_dir` (0 when none): where a resumed run starts."""
    epochs = [
        int(d[len(CHECKPOINT_PREFIX) :])
        for d in storage.listdir(run_dir)
        if d.startswith(CHECKPOINT_PREFIX) and d[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return max(epochs, default=0)
