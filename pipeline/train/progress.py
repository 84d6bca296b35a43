"""What a worker says while it trains: rank 0's progress line inside an epoch and its one line per epoch, and the
optional torch.profiler window ($CAMKD_PROFILE_DIR). Host timers only: nothing here waits for the device."""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.train.worker import WorkerRun

PROFILE_ENV = "CAMKD_PROFILE_DIR"


def say(line: str) -> None:
    """One progress line to the driver's console. Ray Train (2.60) patches `print` in its workers to go through
    logging, and the driver then shows every printed line twice; a write to stdout shows it once."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class StepProfiler:
    """With $CAMKD_PROFILE_DIR set (a local folder on every worker's node), profiles steps 6–25 of the run's
    second epoch (steps 4–5 warm the profiler up) with torch.profiler (CPU, and CUDA on GPUs) and writes each
    rank's operator table and Chrome trace there: how a slow step spends its time (kernels, host syncs, copies,
    the reader's threads). Off, it costs nothing."""

    WAIT, WARMUP, ACTIVE = 3, 2, 20

    def __init__(self, run: WorkerRun, epoch: int, steps: int) -> None:
        folder = os.environ.get(PROFILE_ENV, "")
        self.prof = None
        if not folder or epoch != run.start_epoch + 1 or steps < self.WAIT + self.WARMUP + self.ACTIVE:
            return
        from torch.profiler import ProfilerActivity, profile, schedule

        name = run.plan.run_dir.rstrip("/").rsplit("/", 1)[-1]
        self.path = os.path.join(folder, f"{name}-rank{run.rank}-epoch{epoch + 1}")
        os.makedirs(folder, exist_ok=True)
        activities = [ProfilerActivity.CPU]
        if run.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self.sort = "self_cuda_time_total" if run.device.type == "cuda" else "self_cpu_time_total"
        self.prof = profile(
            activities=activities,
            schedule=schedule(wait=self.WAIT, warmup=self.WARMUP, active=self.ACTIVE, repeat=1),
            on_trace_ready=self._write,
        )
        self.prof.__enter__()

    def _write(self, prof) -> None:
        with open(self.path + ".txt", "w") as f:
            f.write(f"{self.ACTIVE} steps\n")
            f.write(prof.key_averages().table(sort_by=self.sort, row_limit=40))
        prof.export_chrome_trace(self.path + ".trace.json.gz")

    def step(self) -> None:
        if self.prof is not None:
            self.prof.step()

    def close(self) -> None:
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.prof = None


class Progress:
    """Rank 0's progress line inside an epoch, from host timers only (no device sync): step, samples/s, ETA."""

    def __init__(self, run: WorkerRun, epoch: int, steps: int) -> None:
        self.every = run.cfg.tracking.progress_seconds if run.rank == 0 else 0
        self.run, self.epoch, self.steps = run, epoch, steps
        self.start = self.last = time.perf_counter()

    def tick(self, step: int, input_wait: float) -> None:
        if not self.every or step == 0:
            return
        now = time.perf_counter()
        if now - self.last < self.every:
            return
        self.last = now
        rate = step * self.run.cfg.train.batch_size / (now - self.start)
        eta = (self.steps - step) * (now - self.start) / step
        say(
            f"[train] epoch {self.epoch + 1}/{self.run.cfg.train.epochs}: step {step}/{self.steps} "
            f"({100 * step / self.steps:.0f} %), {rate:.0f} samples/s, ETA {eta:.0f} s, input wait {input_wait:.1f} s"
        )


def epoch_line(record: dict[str, Any], epochs: int, best: float) -> str:
    """The one console line of an epoch: loss terms, top-1, rate and time."""
    terms = ", ".join(
        f"{n} {v:.3f}" for n, v in record.items() if n.startswith("train_") and n != "train_top1"
    )
    test = (
        f"; test top-1 {record['test_top1']:.4f} (epoch {record['test_epoch']})"
        if "test_top1" in record
        else ""
    )
    return (
        f"[train] epoch {record['epoch']}/{epochs}: {terms}; top-1 train {record['train_top1']:.4f} "
        f"val {record['val_top1']:.4f} (best {best:.4f}){test}; {record['samples_per_s']:.0f} samples/s, "
        f"{record['epoch_seconds']:.1f} s"
    )
