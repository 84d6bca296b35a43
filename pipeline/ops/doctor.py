"""The `doctor` stage: what limits training on this cluster, measured where it runs, and what to change.

From every node: storage latency and read throughput from `root`. Where training would place its workers (a
placement group like Ray Train's): on the node that holds the most of them, one reader per worker there, all at once,
each with its rank's share and its worker's budget of that node; and the student's step rate on the configured
device. Then one verdict: the slower side is the bottleneck, and the
measurements say why (storage latency, read CPU, or the step itself) and which setting moves it. Writes
`<root>/doctor/summary.json`. Reads and writes nothing else; trains nothing that is kept.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from pipeline.config import Config
from pipeline.store import storage

LATENCY_PROBES = 8
PLACEMENT_TIMEOUT_S = 120  # for the resources of training's workers, before the doctor says they do not fit
PROBE_ROWS = 200_000  # rows the reader probe may read (it stops after its seconds)
SLOW_REQUEST_S = 0.010  # above this per request, storage latency is worth naming


def _probe_target(cfg: Config, meta) -> tuple[str, str]:
    """(a small file, a big part) under root to time: the dataset's summary and its largest training part."""
    ddir = storage.dataset_dir(cfg.root, meta.name, meta.fingerprint)
    part = max(meta.split("train").parts, key=lambda p: p.rows)
    return storage.join(ddir, "summary.json"), storage.join(ddir, "train", part.name)


def _storage_probe(small: str, big: str) -> dict[str, Any]:
    """Runs on one node: median seconds of a small read, and a whole part read raw and as the reader reads it."""
    import ray

    from pipeline.store import tables

    times = []
    for _ in range(LATENCY_PROBES):  # one metadata request each (a HEAD on an object store)
        t0 = time.perf_counter()
        storage.exists(small)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    raw = len(storage.read_bytes(big))
    raw_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    part = tables.open_table(big)
    rows = part.read(None, part.schema.names).num_rows
    decoded_s = time.perf_counter() - t0
    return {
        "node": ray.get_runtime_context().get_node_id(),
        "ip": ray.util.get_node_ip_address(),
        "latency_ms": round(1000 * statistics.median(times), 2),
        "raw_mb_per_s": round(raw / 1e6 / max(raw_s, 1e-9), 1),
        "read_rows_per_s": round(rows / max(decoded_s, 1e-9)),
        "part_bytes": raw,
    }


def _reader_probe(plan_dict: dict, seconds: float, rank: int, workers_on_node: int) -> dict[str, Any]:
    """Runs like worker `rank`, one of `workers_on_node` on its node: its share of an epoch through the configured
    reader, under its budget, for `seconds` after the first batch; delivered samples/s and the budget it had."""
    from dataclasses import replace

    import ray
    import torch

    from pipeline.data.views import view_for_epoch
    from pipeline.ops.runtime import quiet_ray_data
    from pipeline.train.batches import apply_reader_budget, torch_batches
    from pipeline.train.plan import TrainPlan
    from pipeline.train.reader import Slice, epoch_shares, items

    began = time.time()
    plan = TrainPlan(**plan_dict)
    cfg = plan.config
    quiet_ray_data()
    node = ray.get_runtime_context().get_node_id()
    opts = plan.reader_options()
    budget = apply_reader_budget(cfg.scaling, opts, node, workers_on_node)
    if cfg.scaling.read_budget == "worker":
        opts = replace(opts, budget_bytes=budget["object_store_bytes"])
    world = cfg.scaling.num_workers
    b = cfg.train.batch_size // world
    units = [Slice(**u) for u in plan.train_units]
    read_items, rows, epoch = [], 0, 0
    while (
        rows < PROBE_ROWS or epoch == 0
    ):  # epochs after epochs (a small dataset is read again) until enough rows
        share = epoch_shares(units, cfg.train.seed, epoch, world, b)[rank]
        read_items += items(share, view_for_epoch(epoch, cfg.views.count), epoch)
        rows += sum(x.size for x in share)
        epoch += 1
    read = plan.read_plan("train", with_teachers=True)
    n, start = 0, None
    for batch in torch_batches(read, read_items, opts, b, torch.device("cpu"), node, drop_last=True):
        if start is None:
            start = time.perf_counter()
            continue
        n += len(batch["label"])
        if time.perf_counter() - start >= seconds:
            break
    elapsed = time.perf_counter() - start if start else 0.0
    return {
        "rank": rank,
        "node": node,
        "samples_per_s": round(n / elapsed) if elapsed else 0,
        "seconds": round(elapsed, 1),
        "budget": budget,
        "started": began,
        "ended": time.time(),
    }


def worker_placement(cfg: Config):
    """Where training would put its workers: a placement group of `scaling.num_workers` bundles of one worker's
    resources under `scaling.placement_strategy` (the group Ray Train reserves), and each bundle's node. The
    caller removes the group."""
    import ray
    from ray.exceptions import GetTimeoutError
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from pipeline.ops.runtime import ClusterError

    s = cfg.scaling
    bundle = {"CPU": s.cpus_per_worker} | ({"GPU": s.gpus_per_worker} if s.use_gpu else {})
    group = placement_group([bundle] * s.num_workers, strategy=s.placement_strategy)
    try:
        ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except GetTimeoutError:
        remove_placement_group(group)
        raise ClusterError(
            f"the cluster has no room now for training's {s.num_workers} worker(s) of {bundle} "
            f"({s.placement_strategy}) after {PLACEMENT_TIMEOUT_S} s: free it, or lower scaling.num_workers / "
            "cpus_per_worker, then run doctor again"
        ) from None
    nodes = placement_group_table(group)["bundles_to_node_id"]
    return group, [nodes[i] for i in range(s.num_workers)]


def _probe_readers(cfg: Config, plan_dict: dict, seconds: float, log=print) -> dict[str, Any]:
    """On the node where training would place the most workers: one reader per worker there, at once, each in its
    worker's reserved resources; the slowest sets the pace (every rank steps together)."""
    import ray
    from ray.util.placement_group import remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    log(
        f"[doctor] the {cfg.scaling.reader} reader of each worker training places on one node, at once, {seconds:g} s"
    )
    group, nodes = worker_placement(cfg)
    try:
        busiest = max(nodes, key=nodes.count)
        ranks = [r for r, n in enumerate(nodes) if n == busiest]
        s = cfg.scaling
        probe = ray.remote(
            max_retries=0, num_cpus=s.cpus_per_worker, num_gpus=s.gpus_per_worker if s.use_gpu else 0
        )
        refs = [
            probe(_reader_probe)
            .options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=r, placement_group_capture_child_tasks=False
                )
            )
            .remote(plan_dict, seconds, r, len(ranks))
            for r in ranks
        ]
        probes = ray.get(refs)
    finally:
        remove_placement_group(group)
    each = ", ".join(f"{p['samples_per_s']:,}" for p in probes)
    log(
        f"[doctor]   {min(p['samples_per_s'] for p in probes):,} samples/s delivered to the slowest of the "
        f"{len(ranks)} worker(s) on node {busiest[:8]} (each: {each})"
    )
    return {
        "samples_per_s": min(p["samples_per_s"] for p in probes),
        "reader": cfg.scaling.reader,
        "node": busiest,
        "workers_on_node": len(ranks),
        "workers": probes,
    }


def _step_probe(plan_dict: dict, seconds: float) -> dict[str, Any]:
    """Runs like one worker: the student's training step (the configured strategy, connectors and teacher heads)
    on batches of the real shapes, on the worker's device, for `seconds`; samples/s."""
    import torch

    from camkd.optim import build_optimizer
    from camkd.training import TrainStep
    from camkd.training import amp_dtype as amp_dtype_for
    from pipeline.train.model import build_distiller
    from pipeline.train.plan import TrainPlan
    from pipeline.train.step import CachedTeachers, DummyBatch, EpochStats, StudentStep

    plan = TrainPlan(**plan_dict)
    cfg = plan.config
    device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    torch.set_num_threads(cfg.scaling.torch_threads or max(1, int(cfg.scaling.cpus_per_worker)))
    distiller = build_distiller(plan, cfg).to(device)
    optimizer = build_optimizer(
        distiller.parameters(), lr=1e-3, momentum=0.9, nesterov=False, weight_decay=0.0
    )
    amp = amp_dtype_for(cfg.train.amp, device)
    read = plan.read_plan("train", with_teachers=True)
    step = StudentStep(
        TrainStep(distiller, distiller, optimizer, device, amp),
        plan.student_preprocessing().normalizer(),
        CachedTeachers(read, plan.num_classes),
        cfg.train.channels_last and device.type == "cuda",
    )
    b = cfg.train.batch_size // cfg.scaling.num_workers
    h, w = plan.image_hw
    batch = DummyBatch(plan.channels, h, w, read, b, device).batch
    batch["image"] = torch.randint(0, 255, batch["image"].shape, dtype=torch.uint8, device=device)
    batch["label"] = torch.randint(0, plan.num_classes, (b,), device=device)
    stats = EpochStats(device, len(read.teachers), plan.num_classes)
    epoch = max(1, cfg.strategy.inter_warmup_epochs)  # every term on
    for _ in range(3):
        step(batch, epoch, stats)
    if device.type == "cuda":
        torch.cuda.synchronize()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(5):
            step(batch, epoch, stats)
            n += b
        if device.type == "cuda":
            torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"samples_per_s": round(n / elapsed), "device": str(device), "batch": b}


def verdict(nodes: list[dict], reader: dict, step: dict, cfg: Config) -> tuple[str, list[str]]:
    """(the bottleneck, what to change), from the measurements."""
    latency = max(n["latency_ms"] for n in nodes) / 1000
    slow_node = max(nodes, key=lambda n: n["latency_ms"])
    if reader["samples_per_s"] >= 0.9 * step["samples_per_s"]:
        fixes = ["the reader keeps up (it delivers ≥ 0.9 × the step rate): the student's step sets the pace"]
        if step["device"] == "cpu":
            fixes.append(
                "train on GPUs (scaling.use_gpu: true) or give workers more CPUs (scaling.cpus_per_worker)"
            )
        else:
            fixes.append("try train.channels_last / train.compile, or a larger train.batch_size per GPU")
        return "the student's step (compute)", fixes
    s = cfg.scaling
    fixes = []
    if latency >= SLOW_REQUEST_S:
        what = (
            f"input: storage latency (~{1000 * latency:.0f} ms per request from node {slow_node['ip']}); the "
            f"reader delivers {reader['samples_per_s']:,} samples/s against a step rate of {step['samples_per_s']:,}"
        )
        fixes += [
            f"read further ahead (scaling.read_ahead: {s.read_ahead} → {min(64, 2 * s.read_ahead + 2)})",
            "more read tasks per worker (scaling.read_tasks), or the threads reader (scaling.reader: threads) "
            "with more scaling.read_threads",
            f"or a copy of the cache next to the workers (a local volume as root) instead of {cfg.root}",
        ]
    else:
        what = (
            f"input: read CPU (storage answers in {1000 * latency:.1f} ms; the reader delivers "
            f"{reader['samples_per_s']:,} samples/s against a step rate of {step['samples_per_s']:,})"
        )
        fixes += [
            "more CPUs for reading per GPU (scaling.read_tasks × scaling.read_cpus, or scaling.reader: threads "
            "with scaling.read_threads and scaling.cpus_per_worker)",
            "int8 feature maps (cache.features: int8) halve the bytes a sample carries",
        ]
    return what, fixes


def run_stage(cfg: Config, seconds: float = 20.0, log=print) -> dict[str, Any]:
    """Measure storage from every node, the reader and the student step like one worker; name the bottleneck."""
    from dataclasses import asdict

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.data.ingest import require_dataset
    from pipeline.ops.runtime import ensure_ray
    from pipeline.train.driver import make_plan, run_name_for

    ensure_ray(cfg, log=log)
    meta = require_dataset(cfg, log=log)
    small, big = _probe_target(cfg, meta)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    log(f"[doctor] storage at {cfg.root}, from {len(nodes)} node(s) ...")
    probe = ray.remote(num_cpus=0, max_retries=0)(_storage_probe)
    per_node = ray.get(
        [
            probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                small, big
            )
            for n in nodes
        ]
    )
    for n in per_node:
        log(
            f"[doctor]   node {n['ip']}/{n['node'][:8]}: {n['latency_ms']:.1f} ms per request, "
            f"{n['raw_mb_per_s']:.1f} MB/s raw, {n['read_rows_per_s']:,} rows/s through the reader's checks"
        )
    run_dir = storage.join(storage.runs_dir(cfg.root, cfg.experiment), f"doctor-{run_name_for(cfg)}")
    plan_dict = asdict(make_plan(cfg, meta, run_dir))
    s = cfg.scaling
    worker_resources = {"num_cpus": s.cpus_per_worker, "num_gpus": s.gpus_per_worker if s.use_gpu else 0}
    reader = _probe_readers(cfg, plan_dict, seconds, log)
    log(f"[doctor] the {cfg.strategy.name} step of {cfg.student.arch}, {seconds / 2:g} s ...")
    step = ray.get(ray.remote(max_retries=0, **worker_resources)(_step_probe).remote(plan_dict, seconds / 2))
    log(
        f"[doctor]   {step['samples_per_s']:,} samples/s on {step['device']} (batch {step['batch']} per worker)"
    )
    what, fixes = verdict(per_node, reader, step, cfg)
    log(f"[doctor] bottleneck: {what}")
    for fix in fixes:
        log(f"[doctor]   - {fix}")
    summary = {
        "root": cfg.root,
        "nodes": per_node,
        "reader": reader,
        "step": step,
        "bottleneck": what,
        "fixes": fixes,
    }
    url = storage.join(cfg.root, "doctor", "summary.json")
    storage.write_json(url, summary)
    log(f"[doctor] summary: {url}")
    return summary
