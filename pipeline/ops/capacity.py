"""The capacity model: what a config costs in cache storage, and in read CPUs and read tasks per training worker.

A read costs about a fixed part per sample plus a part per KB it carries (READ_US[reader], for `scaling.reader`),
and an encoded image adds its decode and resize (DECODE_US). Storage latency adds a limit per read task: it waits
about SERIAL_ROUND_TRIPS round trips per row group (the image part and every teacher's part are read concurrently,
footers remembered), with up to `scaling.read_ahead_mb` of row groups in flight (the reader grows its reads in
flight to what the latency it measures needs, `train/inflight.py`), so one task delivers at most (row groups in
flight) × rows per group ÷ (round trips × latency). Faster server cores need fewer CPUs; the model is a first
estimate to size a cluster, not a promise. `--dry-run` prints it for a config. Where each constant comes from
(the measurement, its date, machine and command, or that it is assumed) is in docs/performance.md, "Capacity model".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline.train import inflight

# Read CPU per sample per core: a line through the input benchmark's scenarios (a)-(c) for each reader; the JPEG
# decode is what is left of scenario (d) and the same for both readers (docs/performance.md, "Capacity model").
READ_US = {"ray_data": (74.0, 1.70), "threads": (18.0, 1.07)}  # (µs per sample, µs per KB)
DECODE_US = 1960.0
# The training process's own input work per sample, outside the step, on a GPU worker: taking a batch from the
# reader and its one copy into a pinned staging buffer (docs/performance.md, "Host cost of training input").
TRAIN_PROCESS_US = (0.94, 0.32)  # (µs per sample, µs per KB)
# Student samples/s one GPU worker must be fed: CIFAR-sized CE and cached distillation (measured), and 224-px
# students (an assumption); docs/performance.md, "Capacity model".
GPU_RATES = {"ce": 37_263, "distill": 26_273, "224px": 3_000}
CPU_RATE = 150.0  # a CPU worker's student samples/s (docs/performance.md, "Capacity model")
# Precompute's CPU stages per image, Ray Data's conversions and the object store included: a render task of a raw-pixel
# image (an encoded one costs about DECODE_US), and a write task, a fixed part plus a part per KiB stored (every
# teacher's outputs of the image); docs/performance.md, "Precompute CPU stages". PRECOMPUTE_RATE: images/s of one
# GPU running 3 CIFAR teachers (docs/performance.md, "Precompute on an H100").
PRECOMPUTE_RENDER_US = 7.0
PRECOMPUTE_WRITE_US = (2.6, 0.96)  # (µs per image, µs per KiB stored)
PRECOMPUTE_RATE = 10_000
# Round trips a read task waits for in series per row group (`input_pipeline.py --latency-ms`), and the latency
# assumed per request for an object store when nothing better is known (`doctor` measures it).
SERIAL_ROUND_TRIPS = 1.2
OBJECT_STORE_LATENCY_S = 0.025

# Image sizes of the sources whose shape is known before ingest.
SOURCE_SHAPES = {
    "fashion-mnist": (28, 28, 1),
    "mnist": (28, 28, 1),
    "cifar10": (32, 32, 3),
    "cifar100": (32, 32, 3),
}
SOURCE_ROWS = {"fashion-mnist": 60_000, "mnist": 60_000, "cifar10": 50_000, "cifar100": 50_000}


@dataclass
class TeacherBytes:
    name: str
    logits: int
    features: int
    feature_shape: list[int] | None

    @property
    def per_view(self) -> int:
        return self.logits + self.features


def storage_latency(root: str) -> float:
    """Seconds per request assumed for `root`: 0 for a local path, the delay of a `delay://` root, and
    OBJECT_STORE_LATENCY_S for an object store."""
    from pipeline.store import delay

    if "://" not in root or root.startswith("file://"):
        return 0.0
    if root.startswith(delay.SCHEME):
        return delay.parse(root)[0]
    return OBJECT_STORE_LATENCY_S


def in_flight_per_task(read_ahead: int, read_ahead_mb: int, group_bytes: int, teachers: int) -> int:
    """The most row groups one read task keeps in flight (as `ReadPlan.most_in_flight` reckons it)."""
    return inflight.most_items(read_ahead + 1, read_ahead_mb * 2**20, group_bytes, 1 + teachers)


def read_tasks_for(
    rate: float, read_us: float, read_cpus: float, latency_s: float, group_rows: int, in_flight: int
) -> tuple[int, dict[str, float]]:
    """Ray Data read tasks one worker needs to deliver `rate` samples/s: enough CPUs for the reading itself
    (`read_us` µs per sample, `read_cpus` per task), and enough tasks that the storage latency is covered with
    `in_flight` row groups in flight per task. Returns (tasks, the two demands)."""
    cpu_tasks = rate * read_us / 1e6 / read_cpus
    per_task = in_flight * group_rows / (SERIAL_ROUND_TRIPS * latency_s) if latency_s > 0 else math.inf
    latency_tasks = rate / per_task
    return max(1, math.ceil(max(cpu_tasks, latency_tasks) - 1e-9)), {
        "cpu_tasks": cpu_tasks,
        "latency_tasks": latency_tasks,
    }


def plan_read_tasks(cfg, row_bytes: int, encoded: bool, group_rows: int) -> int:
    """scaling.read_tasks, else what a worker reading rows of `row_bytes` needs at its default rate."""
    s = cfg.scaling
    if s.read_tasks:
        return s.read_tasks
    fixed, per_kb = READ_US[s.reader]
    read_us = fixed + per_kb * row_bytes / 1024 + (DECODE_US if encoded else 0.0)
    in_flight = in_flight_per_task(s.read_ahead, s.read_ahead_mb, row_bytes * group_rows, len(cfg.teachers))
    return read_tasks_for(
        default_rate(cfg, encoded), read_us, s.read_cpus, storage_latency(cfg.root), group_rows, in_flight
    )[0]


def default_rate(cfg, encoded: bool) -> float:
    """The student rate a worker's reader is sized for: the measured GPU rates, or a CPU worker's."""
    if cfg.scaling.use_gpu and encoded:
        return GPU_RATES["224px"]
    if cfg.scaling.use_gpu:
        return GPU_RATES["distill" if cfg.teachers else "ce"]
    return CPU_RATE


@dataclass
class Estimate:
    rows: int | None
    views: int
    pixels: int
    encoded: bool
    teachers: list[TeacherBytes]
    rate: float
    workers: int
    reader: str = "ray_data"
    latency_s: float = 0.0
    group_rows: int = 1024
    read_ahead: int = 2
    read_cpus: float = 0.5
    read_ahead_mb: int = 256

    @property
    def reader_bytes(self) -> int:
        """Bytes one training sample carries through the reader (pixels + every teacher's outputs)."""
        return self.pixels + sum(t.per_view for t in self.teachers)

    @property
    def cache_bytes(self) -> int | None:
        if self.rows is None:
            return None
        return self.rows * self.views * sum(t.per_view for t in self.teachers)

    @property
    def read_us_per_sample(self) -> float:
        fixed, per_kb = READ_US[self.reader]
        return fixed + per_kb * self.reader_bytes / 1024 + (DECODE_US if self.encoded else 0.0)

    @property
    def read_cpus_per_worker(self) -> float:
        return self.rate * self.read_us_per_sample / 1e6

    @property
    def process_us_per_sample(self) -> float:
        """CPU the training process spends per sample on its input, outside the step (a GPU worker's)."""
        fixed, per_kb = TRAIN_PROCESS_US
        return fixed + per_kb * self.reader_bytes / 1024

    @property
    def cores_per_gpu(self) -> float:
        """Host cores one GPU worker keeps busy: its reads, its process's input work, and the step's own thread."""
        return self.read_cpus_per_worker + self.rate * self.process_us_per_sample / 1e6 + 1.0

    @property
    def in_flight(self) -> int:
        """The most row groups a read task keeps in flight."""
        return in_flight_per_task(
            self.read_ahead, self.read_ahead_mb, self.reader_bytes * self.group_rows, len(self.teachers)
        )

    @property
    def read_tasks(self) -> int:
        """Ray Data read tasks per worker for `rate` (the default of scaling.read_tasks)."""
        return self._read_tasks_model()[0]

    def _read_tasks_model(self) -> tuple[int, dict[str, float]]:
        """`read_tasks_for` at this estimate's rate, read cost, latency and depth: (tasks, why)."""
        return read_tasks_for(
            self.rate,
            self.read_us_per_sample,
            self.read_cpus,
            self.latency_s,
            self.group_rows,
            self.in_flight,
        )

    def lines(self, cfg) -> list[str]:
        gib = 2**30
        out = [
            f"reader: {self.reader_bytes / 1024:.1f} KB per sample ({self.pixels / 1024:.1f} KB pixels"
            + "".join(f" + {t.name} {t.per_view / 1024:.1f} KB" for t in self.teachers)
            + ")",
        ]
        if self.cache_bytes is not None:
            out.append(
                f"cache: {self.rows:,} rows × {self.views} view(s) × {sum(t.per_view for t in self.teachers) / 1024:.1f} KB "
                f"= {self.cache_bytes / gib:.2f} GiB"
            )
        else:
            out.append(
                "cache: rows unknown until ingest (per row and view: "
                f"{sum(t.per_view for t in self.teachers) / 1024:.1f} KB)"
            )
        need = self.read_cpus_per_worker
        out.append(
            f"read CPUs per worker at {self.rate:,.0f} samples/s: {need:.1f} "
            f"({self.read_us_per_sample:.0f} µs of read CPU per sample with the {self.reader} reader; measured on a "
            "2-core VM, see docs/performance.md "
            f"'Capacity model'); {self.workers} worker(s) need {math.ceil(need * self.workers)} read CPUs"
        )
        if cfg.scaling.use_gpu:
            out.append(
                f"training process outside the step: {self.process_us_per_sample:.1f} µs per sample (a batch from the "
                f"reader, one pinned copy): {self.rate * self.process_us_per_sample / 1e6:.2f} cores; with the "
                f"reads and the step's own thread {self.cores_per_gpu:.1f} cores per GPU, "
                f"{math.ceil(8 * self.cores_per_gpu)} for an 8-GPU node"
            )
        if cfg.scaling.reader == "ray_data":
            out += self._ray_data_lines(cfg)
        if cfg.scaling.reader == "threads":
            if cfg.scaling.read_threads < need:
                out.append(
                    f"warning: scaling.read_threads {cfg.scaling.read_threads} per worker < {need:.1f}: the GPU would "
                    "wait for input at that rate"
                )
            return out
        have = cfg.scaling.read_cpus * (cfg.scaling.read_tasks or 0)
        if cfg.scaling.read_tasks and have < need:
            out.append(
                f"warning: scaling.read_tasks × read_cpus = {have:g} CPUs per worker < {need:.1f}: the GPU would wait "
                "for input at that rate"
            )
        return out

    def _ray_data_lines(self, cfg) -> list[str]:
        """The Ray Data reader's read tasks per worker (and why) and each worker's budget."""
        tasks = cfg.scaling.read_tasks or self.read_tasks
        _, why = self._read_tasks_model()
        store = (
            f"{cfg.scaling.read_object_store_mb} MiB (scaling.read_object_store_mb)"
            if cfg.scaling.read_object_store_mb
            else "half its node's object store ÷ the workers on that node"
        )
        return [
            f"read tasks per worker: {tasks}"
            + (" (scaling.read_tasks)" if cfg.scaling.read_tasks else "")
            + f"; the model asks {why['cpu_tasks']:.1f} for CPU and {why['latency_tasks']:.1f} for "
            f"{self.latency_s * 1000:g} ms storage latency (up to {self.in_flight} row group(s) of "
            f"{self.group_rows} rows in flight per task, scaling.read_ahead_mb)",
            f"worker budget (Ray Data, per worker): {tasks} task(s) × {cfg.scaling.read_cpus:g} CPU = "
            f"{tasks * cfg.scaling.read_cpus:g} CPUs; object store: {store}",
        ]


def probe_shapes(cfg, meta=None) -> dict[str, list[int]]:
    """Teacher name → its feature map shape on this dataset's images (one forward of a zero image each); empty
    when no configured strategy reads features."""
    import torch

    from camkd import models

    if cfg.feature_dtype() == "none":
        return {}
    if meta is not None:
        hw = list(meta.image_shape[:2]) if meta.image_shape else [cfg.data.image_size] * 2
        chans, classes = meta.channels, meta.num_classes
    else:
        known = SOURCE_SHAPES.get(cfg.data.source)
        hw = list(known[:2]) if known else [cfg.data.image_size] * 2
        chans, classes = (known[2] if known else 3), 10
    shapes = {}
    for t in cfg.teachers:
        with torch.no_grad():
            model = models.create(t.arch, classes, chans).eval()
            size = list(t.input_size) if t.input_size else hw  # the size the teacher sees
            shapes[t.name] = list(model.forward_features(torch.zeros(1, chans, *size)).shape[1:])
    return shapes


def teacher_bytes(
    fmt: str, topk: int, features: str, num_classes: int, shape: list[int] | None
) -> tuple[int, int]:
    logits = 2 * num_classes if fmt == "fp16" else 4 * min(topk, num_classes - 1) + 4
    if features == "none" or not shape:
        return logits, 0
    values = int(math.prod(shape))
    return logits, (2 * values if features == "fp16" else values + 2 * shape[0])


def estimate(
    cfg, meta=None, rate: float | None = None, shapes: dict[str, list[int]] | None = None
) -> Estimate:
    """The capacity estimate of a config (with the ingested dataset's meta when there is one).
    `shapes`: teacher name → feature map shape (C, H, W), probed by the caller (None: logits only)."""
    source = cfg.data.source
    if meta is not None:
        rows = meta.split("train").rows
        shape = tuple(meta.image_shape) if meta.image_shape else None
        num_classes = meta.num_classes
    else:
        rows = cfg.data.limit_train or SOURCE_ROWS.get(source)
        shape = SOURCE_SHAPES.get(source)
        num_classes = (
            cfg.data.synthetic.num_classes if source == "synthetic" else (100 if source == "cifar100" else 10)
        )
        if source == "synthetic":
            s = cfg.data.synthetic
            shape, rows = (s.size, s.size, s.channels), s.train
    encoded = shape is None
    pixels = int(math.prod(shape)) if shape else 3 * cfg.data.image_size**2
    features = cfg.feature_dtype()
    teachers = []
    for t in cfg.teachers:
        t_shape = (shapes or {}).get(t.name)
        logits, feats = teacher_bytes(cfg.cache.logits, cfg.cache.topk, features, num_classes, t_shape)
        teachers.append(TeacherBytes(t.name, logits, feats, t_shape))
    if rate is None:
        rate = default_rate(cfg, encoded)
    group_rows = meta.row_group_rows if meta is not None else cfg.data.row_group_rows
    return Estimate(
        rows,
        cfg.views.count,
        pixels,
        encoded,
        teachers,
        rate,
        cfg.scaling.num_workers,
        cfg.scaling.reader,
        latency_s=storage_latency(cfg.root),
        group_rows=group_rows,
        read_ahead=cfg.scaling.read_ahead,
        read_cpus=cfg.scaling.read_cpus,
        read_ahead_mb=cfg.scaling.read_ahead_mb,
    )


def as_dict(e: Estimate) -> dict[str, Any]:
    return {
        "reader_bytes_per_sample": e.reader_bytes,
        "cache_bytes": e.cache_bytes,
        "read_us_per_sample": round(e.read_us_per_sample, 1),
        "rate": e.rate,
        "read_cpus_per_worker": round(e.read_cpus_per_worker, 2),
        "process_us_per_sample": round(e.process_us_per_sample, 2),
        "cores_per_gpu": round(e.cores_per_gpu, 2),
        "read_tasks_per_worker": e.read_tasks,
        "storage_latency_ms": e.latency_s * 1000,
    }


def precompute_lines(e: Estimate) -> list[str]:
    """What precompute's render and write tasks cost per image of this config, and the CPUs they take per GPU
    (cache.render_cpus / cache.write_cpus ask for their share)."""
    kib = sum(t.per_view for t in e.teachers) / 1024
    render = DECODE_US if e.encoded else PRECOMPUTE_RENDER_US
    write = PRECOMPUTE_WRITE_US[0] + PRECOMPUTE_WRITE_US[1] * kib
    cpus = (render + write) * PRECOMPUTE_RATE / 1e6
    return [
        f"precompute CPU stages: render {render:,.0f} µs + write {write:,.0f} µs per image ({kib:.1f} KiB stored): "
        f"{cpus:.2f} CPUs per {PRECOMPUTE_RATE:,} images/s (one GPU's teachers; measured on a 2-core VM, see "
        f"docs/performance.md 'Precompute CPU stages'), {math.ceil(8 * cpus)} for an 8-GPU node"
    ]
