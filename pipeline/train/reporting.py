"""Each epoch's report: every rank hands Ray Train the epoch's metrics (Ray Train needs the same number of reports
from every rank); rank 0 also tracks the record (TensorBoard, MLflow, W&B), prints its one line and attaches the
run's checkpoint."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

from pipeline.train.checkpoint import RunState, checkpoint_dir_name
from pipeline.train.plan import TrainPlan
from pipeline.train.progress import epoch_line, say

# Epoch-record entries that are not numbers: kept in the history, never reported to Ray Train / Tune as metrics.
NON_METRIC_KEYS = (
    "class_weight",
    "workers",
    "backend",
    "reader_budget",
    "student_digest",
    "student_digests",
)


class Reporter:
    """One run's reports, from one rank."""

    def __init__(self, plan: TrainPlan, rank: int) -> None:
        self.plan, self.rank = plan, rank
        self.cfg = plan.config
        self.tracker = None

    def report(self, epoch: int, record: dict[str, Any], best: float, state: Callable[[], RunState]) -> None:
        """The epoch's metrics to Ray Train; on rank 0 with the checkpoint `state()` makes (built on rank 0 only)."""
        import ray.train

        metrics = {k: v for k, v in record.items() if k not in NON_METRIC_KEYS}  # numbers only
        if self.rank != 0:
            ray.train.report(metrics)
            return
        if self.tracker is None:
            from pipeline.train.tracking import Tracker

            name = self.plan.run_dir.rstrip("/").rsplit("/", 1)[-1]
            self.tracker = Tracker(self.cfg.tracking, self.plan.run_dir, name, self.plan.cfg)
        self.tracker.log(record, epoch + 1)
        say(epoch_line(record, self.cfg.train.epochs, best))
        with tempfile.TemporaryDirectory() as tmp:
            state().save(tmp, self.plan.cfg)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=checkpoint_dir_name(epoch),
            )

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
