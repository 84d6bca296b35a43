"""The training reader alone (no training): delivered samples/s and MB/s per read CPU, where a read task's time goes,
its peak memory against the bound it asks Ray for, and what JPEG draft decoding saves.

Scenarios (one view; the cache parts are written with the cache's own encoders and checksums, filled with
random teacher outputs of the right shapes: the reader's cost does not depend on the values):
  a  CIFAR-shaped rows (32×32×3 raw) + 3 teachers: fp16 logits (100 classes) + fp16 maps 256×8×8
  b  the same with int8 maps
  c  the same, logits only
  d  a 224-px JPEG image folder (generated, 1000 classes) + 2 teachers: top-200 logits + int8 maps 2048×7×7

For each: the rate of one read task in this process (one core, profiled), then the rate Ray Data delivers to a
training worker's consumer (`host_batches`, batches made tensors) with all of the machine's cores, and the rate the `threads` reader (as many threads
as cores, in the consumer's process) delivers (per core = that ÷ cores; goals at CIFAR scale
(a) ≥ 8k and (c) ≥ 30k samples/s per core, so ≤ 4 cores feed a GPU). The last line is one JSON object.

    python benchmarks/input_pipeline.py [--rows 6144] [--scenarios abcd]

Latency hiding (`--latency-ms N`): the reader over a storage layer that delays every open and every read by N ms
and counts them (`delay://N/<folder>`, `pipeline/store/delay.py`: the delay is a sleep, so the ratio measures latency
hiding, not a server's CPU), against the same layer at 0 ms. For scenarios (a) and (c) by default: delivered
samples/s of both readers at N ms and at 0 ms and their ratio, requests per 1,000 samples, and the round trips a
read task waits for in series per row group (time with at least one request outstanding ÷ N ms ÷ row groups).
`--root s3-proxy` runs the same over a real S3 protocol: moto's server behind the test proxy, which delays every
request by N ms and counts them (`tests/s3server.py`).

`--depth fixed,adaptive` measures both policies for the reads in flight, one after the other at each setting:
fixed (`scaling.read_ahead_mb` 0: `read_ahead` + 1 row groups per read task, 2 × threads + `read_ahead` in the
threads reader, as before) and adaptive (the default: grown to the measured latency × the rate rows are taken,
up to `read_ahead_mb`); the table adds the most reads in flight at once, of one read task and of the threads
reader (counted by the layer in this process).

    python benchmarks/input_pipeline.py --latency-ms 25 [--scenarios ac] [--rows 12288] [--root s3-proxy]
        [--depth fixed,adaptive]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from pipeline.cache.layout import (
    CachePart,
    Manifest,
    OutputFormat,
    ViewRecord,
    encode_outputs,
    manifest_url,
    part_metadata,
    receipt_url,
    store_dir,
    view_dir,
)
from pipeline.config import validate
from pipeline.data.ingest import ingest
from pipeline.data.views import make_view_spec, render_train
from pipeline.store import storage, tables
from pipeline.train.batches import ReaderOptions, host_batches
from pipeline.train.reader import (
    ReadPlan,
    Slice,
    TeacherSource,
    epoch_shares,
    items,
    local_batches,
    read_memory_bytes,
    read_slices,
    row_group_slices,
)

SCENARIOS = {
    "a": {"what": "CIFAR rows + 3 teachers, fp16 maps", "features": "fp16", "logits": "fp16", "teachers": 3},
    "b": {"what": "CIFAR rows + 3 teachers, int8 maps", "features": "int8", "logits": "fp16", "teachers": 3},
    "c": {
        "what": "CIFAR rows + 3 teachers, logits only",
        "features": "none",
        "logits": "fp16",
        "teachers": 3,
    },
    "d": {
        "what": "224-px JPEG folder + 2 teachers, int8 maps",
        "features": "int8",
        "logits": "topk",
        "teachers": 2,
    },
}


def make_jpeg_folder(root: Path, rows: int, classes: int, seed: int = 0) -> Path:
    """ImageNet-like files: smooth random scenes at 320-500 × 280-400 px, JPEG quality 90, one per class folder."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", rows), ("val", 64)):
        for i in range(n):
            c = i % classes
            d = root / split / f"c{c:04d}"
            d.mkdir(parents=True, exist_ok=True)
            w, h = int(rng.integers(320, 500)), int(rng.integers(280, 400))
            coarse = rng.uniform(0, 255, (h // 24 + 2, w // 24 + 2, 3)).astype(np.uint8)
            img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
            arr = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-12, 12, (h, w, 3)), 0, 255)
            Image.fromarray(arr.astype(np.uint8)).save(d / f"{i}.jpg", quality=90)
    return root


def synthetic_store(cfg, meta, k: int, fmt: OutputFormat, shape: list[int] | None) -> TeacherSource:
    """A complete store (parts, receipts, manifest) of random outputs in format `fmt`, as precompute writes."""
    rng = np.random.default_rng(k)
    spec = make_view_spec(cfg, meta.encoding).with_count(1)
    teacher = {"name": f"t{k}", "arch": "bench", "id": f"bench-{k:012d}", "sha256": f"{k:064d}"}
    store = store_dir(storage.teacher_dir(cfg.root, meta.fingerprint, teacher["id"]), spec, fmt)
    parts = []
    for p in meta.split("train").parts:
        idx = np.arange(p.first_idx, p.first_idx + p.rows)
        logits = rng.normal(0, 3, (p.rows, meta.num_classes)).astype(np.float32)
        feats = rng.normal(0, 1, (p.rows, *shape)).astype(np.float16) if shape else None
        table = encode_outputs(idx, logits, feats, fmt)
        meta_kv = part_metadata(teacher["id"], meta.fingerprint, spec, fmt, 0, p.name, p.rows)
        enc = tables.encode_table(table, meta.row_group_rows, meta_kv)
        url = storage.join(view_dir(store, 0), p.name)
        tables.write_table(url, enc)
        part = CachePart(name=p.name, rows=p.rows, bytes=enc.size, digest=enc.digest, correct=0)
        storage.write_json(receipt_url(url), part.model_dump())
        parts.append(part)
    total = sum(x.bytes for x in parts)
    manifest = Manifest(
        teacher=teacher,
        dataset={"name": meta.name, "fingerprint": meta.fingerprint},
        view_spec=spec.to_dict(),
        family=spec.family,
        output=fmt.describe() | {"num_classes": meta.num_classes, "feature_shape": shape},
        views=[ViewRecord(view=0, parts=parts)],
        rows=meta.split("train").rows,
        bytes_per_sample={"logits": 0, "features": 0, "on_disk": round(total / meta.split("train").rows, 1)},
        total_bytes=total,
        accuracy=0.0,
        head={},
    )
    storage.write_json(manifest_url(store), manifest.model_dump())
    return TeacherSource.from_manifest(teacher["name"], store, manifest)


def setup(
    name: str,
    rows: int,
    work: Path,
    decode: str = "full",
    group_rows: int = 256,
    root: str | None = None,
    part_rows: int = 4096,
):
    sc = SCENARIOS[name]
    if name == "d":
        src = work / "jpegs"
        if not src.exists():
            make_jpeg_folder(src, rows, classes=1000)
        data = {
            "source": "imagefolder",
            "path": str(src),
            "image_size": 224,
            "rows_per_part": 512,
            "row_group_rows": min(group_rows, 128),
        }
        shape, classes = [2048, 7, 7], 1000
    else:
        data = {
            "source": "synthetic",
            "rows_per_part": part_rows,
            "row_group_rows": group_rows,
            "synthetic": {"train": rows, "test": 64, "num_classes": 100, "size": 32},
        }
        shape, classes = [256, 8, 8], 100
    cfg = validate(
        {
            "root": (root.rstrip("/") + f"/root-{name}-{group_rows}")
            if root
            else str(work / f"root-{name}-{group_rows}"),
            "data": data,
            "views": {"count": 1, "decode": decode},
            "cache": {"logits": sc["logits"], "topk": 200, "features": sc["features"]},
        }
    )
    meta = ingest(cfg, log=lambda *_: None)
    fmt = OutputFormat(sc["logits"], min(200, classes - 1), sc["features"], meta.num_classes)
    sources = tuple(
        synthetic_store(cfg, meta, k, fmt, shape if sc["features"] != "none" else None)
        for k in range(sc["teachers"])
    )
    plan = ReadPlan(
        storage.dataset_dir(cfg.root, meta.name, meta.fingerprint),
        "train",
        tuple(meta.image_shape) if meta.image_shape else None,
        make_view_spec(cfg, meta.encoding).to_dict(),
        meta.row_group_rows,
        meta.num_classes,
        sources,
        logits=True,
        features=sc["features"] != "none",
        scope=f"bench-{name}-{time.time_ns()}",  # as a training worker reads: each part opened once per run
    )
    units = row_group_slices(meta, "train", 0, meta.split("train").rows)
    return cfg, meta, plan, units


def _items(units, epoch: int = 0):
    rows = items(units, 0, epoch)
    return {k: np.array([r[k] for r in rows], dtype=object if k == "part" else np.int64) for k in rows[0]}


def one_task(plan, units, profile: bool = False):
    """A read task's work over every unit, in this process: (rows/s, bytes/row, top profile lines)."""
    prof = cProfile.Profile() if profile else None
    rows = nbytes = 0
    start = time.perf_counter()
    if prof:
        prof.enable()
    for u in units:
        for block in read_slices(_items([u]), plan):
            rows += len(block["idx"])
            nbytes += sum(v.nbytes for v in block.values())
    if prof:
        prof.disable()
    seconds = time.perf_counter() - start
    top = []
    if prof:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(8)
        top = [ln.strip() for ln in buf.getvalue().splitlines() if ln.strip() and ln.strip()[0].isdigit()][:8]
    return rows / seconds, nbytes / max(rows, 1), top


def delivered(plan, units, epochs: int, batch: int, from_first_batch: bool = False) -> float:
    """Samples/s a training worker's reader (`batches.host_batches`, made tensors) delivers in steady state over
    `epochs` epochs, with every core: timed from the end of the first epoch to the end (or, with
    `from_first_batch`, from the first batch: Ray Data reads ahead, so a slow reader can still have the last epochs
    buffered by the time the first one is consumed)."""
    read_items = []
    for epoch in range(epochs):
        read_items += items(epoch_shares(units, 0, epoch, 1, batch)[0], 0, epoch)
    import torch

    first_epoch = batch if from_first_batch else sum(u.size for u in units) // batch * batch
    opts = ReaderOptions("ray_data", read_cpus=0.5, read_tasks=None, read_threads=1)
    n, start = 0, None
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # as the worker does
    for b in host_batches(
        plan, read_items, opts, batch, None, prefetch_batches=4
    ):  # as a training worker takes them
        tensors = {k: torch.from_numpy(v) for k, v in b.items()}
        n += len(tensors["label"])
        if start is None and n >= first_epoch:
            start, n = time.perf_counter(), 0
    return n / (time.perf_counter() - start)


def delivered_threads(
    plan, units, epochs: int, batch: int, threads: int, from_first_batch: bool = False
) -> float:
    """The same as `delivered` through the `threads` reader (scaling.reader: threads): `threads` threads in this
    process, batches turned into tensors as the training worker does."""
    import torch

    read_items = []
    for epoch in range(epochs):
        read_items += items(epoch_shares(units, 0, epoch, 1, batch)[0], 0, epoch)
    first_epoch = batch if from_first_batch else sum(u.size for u in units) // batch * batch
    n, start = 0, None
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # as the worker does
    for b in local_batches(plan, read_items, batch, threads):
        tensors = {k: torch.from_numpy(v) for k, v in b.items()}
        n += len(tensors["label"])
        if start is None and n >= first_epoch:
            start, n = time.perf_counter(), 0
    return n / (time.perf_counter() - start)


PEAK = """
import json, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from pipeline.train.reader import ReadPlan, Slice, TeacherSource, items, read_slices
d = json.loads(sys.argv[2])
from pipeline.cache.layout import OutputFormat, StoreRef
def source(t):
    ref = t["ref"]
    ref = StoreRef(**{**ref, "fmt": OutputFormat(**ref["fmt"]), "feature_shape": tuple(ref["feature_shape"] or ()) or None})
    return TeacherSource(t["name"], t["store"], ref)
plan = ReadPlan(**{**d["plan"], "teachers": tuple(source(t) for t in d["plan"]["teachers"])})
s = Slice(**d["slice"])
batch = {k: np.array([v]) for k, v in items([s], 0, 0)[0].items()}
for block in read_slices(batch, plan):  # warm: imports and first allocations
    break
def hwm():  # this process's peak resident set (VmHWM; ru_maxrss would carry the parent's over exec)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
base = hwm()
for block in read_slices(batch, plan):
    pass
print(json.dumps({"base": base, "peak": hwm()}))
"""


def peak_memory(plan, unit_part: Slice) -> dict[str, int]:
    """Peak RSS of one read task over a whole ImageNet-shaped part, in a fresh process."""
    from dataclasses import asdict

    d = {"plan": asdict(plan), "slice": asdict(unit_part)}
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            PEAK,
            str(Path(__file__).resolve().parent.parent),
            json.dumps(d, default=list),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def draft_gain(plan, units, n: int = 128) -> dict[str, float]:
    """Render rate (one core) of 224-px training and evaluation views from full-size vs draft-mode JPEG decodes,
    for the scenario's files (320-500 px, ImageNet-like) and for larger photos (1280×960)."""
    from PIL import Image

    from pipeline.data.ingest import open_image_part, read_image_rows
    from pipeline.data.views import ViewSpec, render_eval

    rows = read_image_rows(open_image_part(plan.dataset_dir, "train", units[0].part), None)
    small = rows["image"].to_pylist()[:n]
    rng = np.random.default_rng(1)
    large = []
    for _ in range(n // 2):
        coarse = rng.uniform(0, 255, (42, 55, 3)).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(coarse).resize((1280, 960), Image.BICUBIC).save(buf, format="JPEG", quality=90)
        large.append(buf.getvalue())
    out = {}
    for label, images in (("imagenet_like", small), ("1280x960", large)):
        idx = np.arange(len(images))
        for mode in ("full", "draft"):
            spec = ViewSpec.from_dict({**plan.spec, "decode": mode})
            start = time.perf_counter()
            render_train(images, idx, 0, spec)
            out[f"{label}_train_{mode}"] = len(images) / (time.perf_counter() - start)
            start = time.perf_counter()
            render_eval(images, spec)
            out[f"{label}_eval_{mode}"] = len(images) / (time.perf_counter() - start)
        for kind in ("train", "eval"):
            out[f"{label}_{kind}_gain"] = out[f"{label}_{kind}_draft"] / out[f"{label}_{kind}_full"]
    return out


def _at(plan: ReadPlan, local_root: str, root: str) -> ReadPlan:
    """The same plan with every URL moved from `local_root` to `root` (the delayed view of the same files)."""
    from dataclasses import replace

    def move(url: str) -> str:
        return root + url[len(local_root) :] if url.startswith(local_root) else url

    sources = tuple(replace(t, store=move(t.store)) for t in plan.teachers)
    scope = f"{plan.scope}-{root}" if getattr(plan, "scope", None) else None
    extra = {"scope": scope} if scope else {}
    return replace(plan, dataset_dir=move(plan.dataset_dir), teachers=sources, **extra)


def task_batches(units) -> list[dict[str, np.ndarray]]:
    """The item batches one Ray Data read task hands `read_slices`, in order, as `build_dataset` makes them."""
    from pipeline.train import reader

    per_call = getattr(reader, "ITEMS_PER_CALL", None)  # None: every item of the task in one call
    rows = items(units, 0, 0)
    size = per_call or len(rows)
    out = []
    for i in range(0, len(rows), size):
        chunk = rows[i : i + size]
        out.append(
            {k: np.array([r[k] for r in chunk], dtype=object if k == "part" else np.int64) for k in chunk[0]}
        )
    return out


SERIAL_PROBE_S = (
    0.1  # latency at which serial round trips are counted: CPU time and the GIL then blur them little
)


def counted_task(plan, units, latency_s: float, counter, at=None) -> dict[str, float]:
    """One read task's work over `units` (two epochs) in this process, through the counting layer: rows/s and
    requests; then, at latency, the round trips a row group's read waits for in series: the same reads one item
    at a time (no read ahead) at SERIAL_PROBE_S per request, time with at least one request outstanding ÷ that
    latency ÷ row groups. `at(seconds)` gives the plan at another latency (None: measure at `latency_s`)."""
    from dataclasses import replace

    out = _task_rate(plan, units, counter)
    if latency_s > 0:
        serial, probe = out, latency_s
        if hasattr(plan, "read_ahead"):
            probe = SERIAL_PROBE_S if at is not None else latency_s
            slow = at(probe) if at is not None else plan
            scope = f"{slow.scope}-serial" if slow.scope else None
            serial = _task_rate(replace(slow, read_ahead=0, read_ahead_bytes=0, scope=scope), units, counter)
        if "busy_seconds" in serial:
            out["serial_round_trips_per_row_group"] = round(
                serial["busy_seconds"] / probe / (2 * len(units)), 2
            )
    out.pop("busy_seconds", None)
    return out


def _task_rate(plan, units, counter) -> dict[str, float]:
    from pipeline.train.reader import items_per_task

    if hasattr(counter, "reset"):
        counter.reset()  # the most reads in flight is counted from here
    start_counts = counter()
    rows, start = 0, time.perf_counter()
    per_task = items_per_task(plan)
    for _ in range(2):  # two epochs: a training reader meets every part again (its opens are remembered)
        for i in range(0, len(units), per_task):
            for batch in task_batches(units[i : i + per_task]):
                for block in read_slices(batch, plan):
                    rows += len(block["idx"])
    seconds = time.perf_counter() - start
    end = counter()
    d = {k: end[k] - start_counts[k] for k in end}
    groups = 2 * len(units)
    out = {
        "one_task_samples_per_s": round(rows / seconds),
        "requests_per_1000_samples": round(1000 * d["requests"] / max(rows, 1), 2),
        "reads_per_1000_samples": round(1000 * d.get("reads", d["requests"]) / max(rows, 1), 2),
        "requests_per_row_group": round(d["requests"] / max(groups, 1), 2),
    }
    if "busy_seconds" in d:
        out["busy_seconds"] = d["busy_seconds"]
    if "peak_reads" in end:
        out["one_task_peak_reads_in_flight"] = end["peak_reads"]
    return out


class LayerCounter:
    """The delaying layer's counters of this process, as `counted_task` reads them."""

    def __call__(self) -> dict[str, float]:
        from pipeline.store import delay

        return delay.counters().snapshot()

    def reset(self) -> None:
        from pipeline.store import delay

        delay.counters().reset()


class S3Proxy:
    """moto's S3 server behind the test proxy, which delays every request and counts them (tests/s3server.py)."""

    def __init__(self) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from s3server import S3Server

        self.server = S3Server().start()
        os.environ.update(self.server.env())

    def counter(self) -> dict[str, float]:
        c = self.server.proxy.counter
        return {"requests": c.requests, "busy_seconds": c.busy_seconds}

    def set_latency(self, seconds: float) -> None:
        self.server.proxy.counter.delay = seconds

    def stop(self) -> None:
        self.server.stop()


DEPTHS = {
    "fixed": "reads in flight fixed by scaling.read_ahead (read_ahead_mb 0: as before issue 35 item 7)",
    "adaptive": "reads in flight grown to the measured latency × rate, up to read_ahead_mb (the default)",
}


def _with_depth(plan: ReadPlan, depth: str, rep: int) -> ReadPlan:
    """The plan read with reads-in-flight policy `depth`, in a scope of its own (every repetition starts as a
    run starts: no part open, nothing learned)."""
    from dataclasses import replace

    scope = f"{plan.scope}-{depth}-{rep}"
    if depth == "fixed":
        return replace(plan, read_ahead_bytes=0, scope=scope)
    return replace(plan, scope=scope)


def _measure(p, units, delay: float, counter, at, args, cores: int, serial: bool) -> dict[str, float]:
    """One setting's numbers: a read task in this process (rate, requests, most reads in flight, and with
    `serial` the serial round trips), then what each reader delivers (for threads, with the most reads in flight
    in this process)."""
    out = counted_task(p, units, delay if serial else 0.0, counter, at)
    out["ray_data_samples_per_s"] = round(delivered(p, units, args.epochs, args.batch, from_first_batch=True))
    if hasattr(counter, "reset"):
        counter.reset()
    out["threads_samples_per_s"] = round(
        delivered_threads(p, units, args.epochs, args.batch, cores, from_first_batch=True)
    )
    if hasattr(counter, "reset"):
        out["threads_peak_reads_in_flight"] = counter()["peak_reads"]
    return out


def _median(runs: list[dict]) -> dict:
    """Key by key, the median over repetitions of numbers (nested dicts likewise)."""
    out = {}
    for k, v in runs[0].items():
        if isinstance(v, dict):
            out[k] = _median([r[k] for r in runs])
        elif isinstance(v, (int, float)):
            values = [r[k] for r in runs if k in r]
            m = float(np.median(values))
            out[k] = round(m) if all(isinstance(x, int) for x in values) else round(m, 3)
    return out


def _setting(plan, units, local_root, s3, args, cores: int, serial: bool) -> dict[str, object]:
    """`plan` at 0 ms and at --latency-ms: each setting's numbers and the two readers' ratios."""
    from pipeline.store import delay as delay_layer

    ms = args.latency_ms
    got: dict[str, object] = {}
    for label, delay in (("0ms", 0.0), (f"{ms:g}ms", ms / 1000.0)):
        if s3:
            s3.set_latency(delay)
            p, counter, at = plan, s3.counter, None
        else:

            def at(seconds, plan=plan):
                return _at(plan, local_root, f"{delay_layer.SCHEME}{seconds * 1000:g}{local_root}")

            p, counter = at(delay), LayerCounter()
        got[label] = _measure(p, units, delay, counter, at, args, cores, serial)
    slow, fast = got[f"{ms:g}ms"], got["0ms"]
    for reader_key in ("ray_data", "threads"):
        got[f"{reader_key}_latency_ratio"] = round(
            slow[f"{reader_key}_samples_per_s"] / max(fast[f"{reader_key}_samples_per_s"], 1), 3
        )
    return got


def _latency_scenario(name, args, work, s3, cores: int) -> dict[str, object]:
    """Scenario `name` at 0 ms and at --latency-ms, for each reads-in-flight policy of --depth, the policies
    interleaved, --repeats times; medians (serial round trips from the first repetition)."""
    base = "s3://camkd/bench" if s3 else (args.root or str(work))
    cfg, meta, plan, units = setup(
        name, args.rows, work, group_rows=args.row_group_rows, root=base, part_rows=args.part_rows
    )
    local_root = storage.normalize_url(base)
    r: dict[str, object] = {"what": SCENARIOS[name]["what"], "rows": meta.split("train").rows}
    depths = args.depth.split(",")
    runs: dict[str, list] = {d: [] for d in depths}
    for rep in range(args.repeats):
        for depth in depths:
            planned = _with_depth(plan, depth, rep)
            runs[depth].append(_setting(planned, units, local_root, s3, args, cores, serial=rep == 0))
    ms = args.latency_ms
    for depth in depths:
        got = _median(runs[depth])
        got["runs"] = [{k: v for k, v in run.items() if k.endswith("ratio")} for run in runs[depth]]
        got["requests_per_1000_samples"] = got[f"{ms:g}ms"]["requests_per_1000_samples"]
        got["serial_round_trips_per_row_group"] = got[f"{ms:g}ms"].get("serial_round_trips_per_row_group")
        r[depth] = got
    return r


def latency_main(args, cores: int) -> None:
    """--latency-ms: each scenario's reader at N ms and at 0 ms of storage latency, side by side (module doc)."""
    import ray

    from pipeline.ops.runtime import local_ray_options, quiet_ray_data

    work = Path(tempfile.mkdtemp(prefix="camkd-latency-bench-"))
    s3 = S3Proxy() if args.root == "s3-proxy" else None
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    ray.init(
        **local_ray_options(cores),
        log_to_driver=False,
        include_dashboard=False,
        runtime_env={"env_vars": env} if env else None,
    )
    quiet_ray_data()
    results = {}
    try:
        for name in args.scenarios:
            results[name] = _latency_scenario(name, args, work, s3, cores)
    finally:
        ray.shutdown()
        if s3:
            s3.stop()
        shutil.rmtree(work, ignore_errors=True)
    where = "moto S3 behind a delaying proxy" if s3 else "a local folder behind the delaying layer"
    print(
        f"\nmachine: {cores} cores; storage: {where}; {args.rows} rows in {args.part_rows}-row parts of "
        f"{args.row_group_rows}-row groups; {args.epochs} epochs, rates from the first batch; medians of "
        f"{args.repeats} repetition(s), the policies interleaved"
    )
    _print_latency(results, args.latency_ms, args.depth.split(","))
    print(json.dumps({"cores": cores, "latency_ms": args.latency_ms, "storage": where, **results}))


def _print_latency(results, ms: float, depths: list[str]) -> None:
    print(
        f"{'':3}{'scenario':<30}{'depth':>9}{'latency':>8}{'1 task':>9}{'Ray Data':>10}{'threads':>10}"
        f"{'req/1k':>8}{'req/rg':>8}{'serial RT/rg':>13}{'in flight: task':>16}{'threads':>8}"
    )
    for name, r in results.items():
        for depth in depths:
            got = r[depth]
            for label in ("0ms", f"{ms:g}ms"):
                x = got[label]
                print(
                    f"{name:<3}{r['what'][:29]:<30}{depth:>9}{label:>8}{x['one_task_samples_per_s']:>9}"
                    f"{x['ray_data_samples_per_s']:>10}{x['threads_samples_per_s']:>10}"
                    f"{x['requests_per_1000_samples']:>8}{x['requests_per_row_group']:>8}"
                    f"{x.get('serial_round_trips_per_row_group', '–')!s:>13}"
                    f"{x.get('one_task_peak_reads_in_flight', '–')!s:>16}"
                    f"{x.get('threads_peak_reads_in_flight', '–')!s:>8}"
                )
            ok = min(got["ray_data_latency_ratio"], got["threads_latency_ratio"]) >= 0.8
            print(
                f"{name:<3}{'ratio ' + f'{ms:g} ms ÷ 0 ms':<30}{depth:>9}{'':>8}{'':>9}"
                f"{got['ray_data_latency_ratio']:>9.3f}×{got['threads_latency_ratio']:>9.3f}×   goal ≥ 0.8: "
                + ("met" if ok else "MISSED")
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=24576, help="training rows of scenarios a-c")
    ap.add_argument("--row-group-rows", type=int, default=1024, help="rows per row group (= per read block)")
    ap.add_argument("--jpeg-rows", type=int, default=1024, help="images of scenario d")
    ap.add_argument("--scenarios", default="abcd")
    ap.add_argument("--epochs", type=int, default=6, help="epochs read per scenario; timed after the first")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument(
        "--latency-ms",
        type=float,
        help="latency mode: the reader at this storage latency and at 0 ms (doc above)",
    )
    ap.add_argument(
        "--part-rows", type=int, default=2048, help="latency mode: rows per image part (data.rows_per_part)"
    )
    ap.add_argument(
        "--depth",
        default="adaptive",
        help="latency mode: reads-in-flight policies to compare, comma-separated: "
        + "; ".join(f"{k}: {v}" for k, v in DEPTHS.items()),
    )
    ap.add_argument(
        "--repeats", type=int, default=1, help="latency mode: repetitions (policies interleaved); medians"
    )
    ap.add_argument(
        "--root",
        help="latency mode: where the generated data lives (a folder or URL; s3-proxy: moto behind a proxy)",
    )
    args = ap.parse_args()
    if args.latency_ms is not None:
        if args.scenarios == "abcd":
            args.scenarios = "ac"
        if args.rows == 24576:
            args.rows = 12288
        if args.epochs == 6:
            args.epochs = 3
        latency_main(args, os.cpu_count() or 1)
        return
    import ray

    from pipeline.ops.runtime import local_ray_options, quiet_ray_data

    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="camkd-input-bench-"))
    ray.init(**local_ray_options(cores), log_to_driver=False, include_dashboard=False)
    quiet_ray_data()
    results = {}
    for name in args.scenarios:
        cfg, meta, plan, units = setup(
            name, args.jpeg_rows if name == "d" else args.rows, work, group_rows=args.row_group_rows
        )
        task_rate, row_bytes, top = one_task(plan, units, profile=True)
        rate = delivered(plan, units, args.epochs, args.batch)
        threads_rate = delivered_threads(plan, units, args.epochs, args.batch, cores)
        r = {
            "what": SCENARIOS[name]["what"],
            "rows": meta.split("train").rows,
            "bytes_per_sample": round(row_bytes),
            "one_task_samples_per_s": round(task_rate),
            "delivered_samples_per_s": round(rate),
            "per_core_samples_per_s": round(rate / cores),
            "per_core_mb_per_s": round(rate / cores * row_bytes / 1e6, 1),
            "threads_delivered_samples_per_s": round(threads_rate),
            "threads_per_core_samples_per_s": round(threads_rate / cores),
            "profile_top": top,
        }
        if name == "d":
            whole = next(
                Slice(p.name, p.first_idx, p.rows, p.first_idx, p.first_idx + p.rows)
                for p in meta.split("train").parts
            )
            mem = peak_memory(plan, whole)
            r["read_task_peak_rss_mb"] = round(mem["peak"] / 2**20, 1)
            r["read_task_growth_mb"] = round((mem["peak"] - mem["base"]) / 2**20, 1)
            r["read_task_memory_request_mb"] = round(read_memory_bytes(plan) / 2**20, 1)
            r["part_rows"] = whole.rows
            r["jpeg_draft"] = {k: round(v, 2) for k, v in draft_gain(plan, units).items()}
        results[name] = r
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nmachine: {cores} cores; rates in samples/s; 'per core' = delivered ÷ {cores}; Ray Data = read tasks "
        f"(scaling.reader ray_data), threads = {cores} reader threads in the consumer's process (reader threads)"
    )
    print(
        f"{'':3}{'scenario':<44}{'B/sample':>10}{'1 task':>9}{'Ray Data':>10}{'per core':>10}{'MB/s/core':>11}"
        f"{'threads':>10}{'per core':>10}{'threads÷Ray':>13}"
    )
    for name, r in results.items():
        print(
            f"{name:<3}{r['what']:<44}{r['bytes_per_sample']:>10}{r['one_task_samples_per_s']:>9}"
            f"{r['delivered_samples_per_s']:>10}{r['per_core_samples_per_s']:>10}{r['per_core_mb_per_s']:>11}"
            f"{r['threads_delivered_samples_per_s']:>10}{r['threads_per_core_samples_per_s']:>10}"
            f"{r['threads_delivered_samples_per_s'] / r['delivered_samples_per_s']:>12.2f}×"
        )
    for name, r in results.items():
        print(f"\n{name}: where one read task's time goes (cProfile, tottime):")
        for line in r["profile_top"][:6]:
            print("   " + line)
    if "d" in results:
        d = results["d"]
        print(
            f"\nd: one read task over a whole {d['part_rows']}-row part: peak RSS {d['read_task_peak_rss_mb']} MiB "
            f"(+{d['read_task_growth_mb']} MiB while reading), memory asked of Ray {d['read_task_memory_request_mb']} MiB"
        )
        j = d["jpeg_draft"]
        for label in ("imagenet_like", "1280x960"):
            print(
                f"d: 224-px views per core from {label} JPEGs: training {j[label + '_train_full']:.0f}/s full decode, "
                f"{j[label + '_train_draft']:.0f}/s draft ({j[label + '_train_gain']:.2f}×); evaluation "
                f"{j[label + '_eval_full']:.0f}/s vs {j[label + '_eval_draft']:.0f}/s ({j[label + '_eval_gain']:.2f}×)"
            )
    goals = {"a": 8000, "c": 30000}
    for name, goal in goals.items():
        if name in results:
            for reader, key in (
                ("Ray Data", "per_core_samples_per_s"),
                ("threads", "threads_per_core_samples_per_s"),
            ):
                got = results[name][key]
                print(
                    f"goal {name} ({reader}): {got} samples/s per core (goal ≥ {goal}): "
                    f"{'met' if got >= goal else 'MISSED'}"
                )
    print(
        json.dumps(
            {
                "cores": cores,
                **{k: {x: y for x, y in v.items() if x != "profile_top"} for k, v in results.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
