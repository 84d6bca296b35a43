"""A run's summary: what `train` returns and writes to `<run_dir>/summary.json` once a run has finished. Its metrics
describe the student file the run exports (the weights of its best validation epoch)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from pipeline.store import storage
from pipeline.train.checkpoint import RunState, checkpointed_epochs

SUMMARY_FILE = "summary.json"


class RunSummary(BaseModel):
    """A finished run. `history` holds one record per epoch (loss terms, top-1, weights per teacher, rates)."""

    model_config = ConfigDict(extra="allow")

    status: str = "finished"
    name: str
    run_dir: str
    strategy: str
    mode: str = "cached"
    student: str
    teachers: list[str]
    seed: int = 0
    epochs: int
    best_val_top1: float
    best_epoch: int
    final_val_top1: float | None = None
    final_val_top5: float | None = None
    test_top1: float | None = (
        None  # scored once, after the last epoch, with the best validation epoch's weights
    )
    test_top5: float | None = None
    validation: dict[str, Any] = {}
    mean_samples_per_s: float | None = None
    wall_seconds: float | None = None
    checkpoint: str | None = None
    workers: list[str] = []
    backend: str = "none"
    resumes: int = 0
    history: list[dict[str, Any]]
    exports: dict[str, Any] = {}  # student.pt (always), student.pt2 / .torchscript.pt / .onnx when exported
    params: int | None = None  # the exported student's cost: parameters, MACs per image, student.pt's bytes
    macs: int | None = None
    export_bytes: int | None = None

    @classmethod
    def finished(cls, run_dir: str) -> RunSummary | None:
        """The summary of a finished run under `run_dir`; None while it has not finished."""
        url = storage.join(run_dir, SUMMARY_FILE)
        if not storage.exists(url):
            return None
        raw = storage.read_json(url)
        return cls.model_validate(raw) if raw.get("status") == "finished" else None

    def write(self) -> str:
        url = storage.join(self.run_dir, SUMMARY_FILE)
        storage.write_json(url, self.model_dump(mode="json"))
        return url


def recorded_history(run_dir: str) -> list[dict[str, Any]]:
    """The epoch records a run has kept: all of them once finished (summary.json), else those of its last
    checkpoint (where a resumed run starts); [] for a run that never finished an epoch."""
    summary = RunSummary.finished(run_dir)
    if summary is not None:
        return summary.history
    epoch = checkpointed_epochs(run_dir)
    return RunState.read(run_dir, epoch).history if epoch else []
