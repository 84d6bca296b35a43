"""The epoch order's costs: what keeping every epoch to its own rows costs a worker's reader (issue 35, item 3),
and the files a reader opens when the order has locality (item 5).

  stream    one worker's training stream over 4 epochs, the way it was built before (one Ray Data reader for every
            epoch in completion order, Ray's local shuffle buffer across the epochs) and now (`EpochStream`: the
            reader in order, each epoch's rows shuffled within the epoch in a thread beside training), interleaved,
            each with and without a simulated step: delivered samples/s and input wait (medians).
  locality  the ImageNet config's layout (1,251 parts of four row groups; image + 2 teachers) through the counting
            `delay://` layer: lane 0 of 8 read as read tasks in this process, and all 8 lanes read round-robin by
            one process (a node's read tasks share processes), with the row groups of all parts uniformly mixed
            (before) and in the two-level order (now): file opens and requests per row group, and, for lane 0 at
            `--latency-ms`, the round trips a row group waits for in series (read_ahead 0, read_ahead_mb 0).

    python benchmarks/read_order.py [--parts stream,locality] [--rows 12288] [--latency-ms 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from input_pipeline import SCENARIOS, _at, setup, task_batches

from pipeline.config import with_updates
from pipeline.store import delay as delay_layer
from pipeline.store import storage
from pipeline.train import order
from pipeline.train.batches import ReaderOptions, torch_batches
from pipeline.train.epochs import EpochStream
from pipeline.train.reader import epoch_shares, items, items_per_task, read_slices

SCENARIOS["i"] = {
    "what": "ImageNet layout: 32-px rows + 2 teachers, logits only",
    "features": "none",
    "logits": "fp16",
    "teachers": 2,
}


def old_stream(cfg, plan, units, opts, epochs: int):
    """The worker's stream as it was built before: one reader over every epoch, Ray's local shuffle buffer."""
    b, read_items, steps = cfg.train.batch_size, [], {}
    for epoch in range(epochs):
        share = epoch_shares(units, cfg.train.seed, epoch, 1, b)[0]
        steps[epoch] = sum(s.size for s in share) // b
        read_items += items(share, 0, epoch)
    it = iter(
        torch_batches(
            plan, read_items, opts, b, torch.device("cpu"), None, True, 4, False, cfg.train.shuffle_buffer, 7
        )
    )
    return steps, lambda e: (next(it) for _ in range(steps[e]))


def timed_run(kind: str, cfg, plan, units, opts, epochs: int, step_s: float) -> dict[str, float]:
    """Samples/s from the first batch to the last, and the time spent waiting for batches after the first."""
    if kind == "before":
        steps, epoch = old_stream(cfg, plan, units, opts, epochs)
    else:
        stream = EpochStream(cfg, plan, units, opts, 1, 0, 0, torch.device("cpu"), None)
        steps, epoch = stream.steps, stream.epoch
    n, wait, start = 0, 0.0, None
    for e in range(epochs):
        it = epoch(e)
        for _ in range(steps[e]):
            t0 = time.perf_counter()
            batch = next(it)
            if start is None:
                start = time.perf_counter()
            else:
                wait += time.perf_counter() - t0
                n += len(batch["label"])
            if step_s:
                time.sleep(step_s)
    return {"samples_per_s": n / (time.perf_counter() - start), "input_wait_s": wait}


def stream_part(args, work: Path) -> dict:
    import ray

    from pipeline.ops.runtime import local_ray_options, quiet_ray_data

    ray.init(**local_ray_options(2), log_to_driver=False, include_dashboard=False)
    quiet_ray_data(preserve_order=False)  # as a training worker sets it
    try:
        cfg, meta, plan, units = setup("c", args.rows, work, group_rows=1024, part_rows=2048)
        cfg = with_updates(cfg, {"train.batch_size": 256, "train.epochs": 4, "train.shuffle_buffer": 4096})
        opts = ReaderOptions("ray_data", 0.5, 2, 2)
        local_root = storage.normalize_url(str(work))
        out = {}
        for ms in (0, args.latency_ms):
            p = _at(plan, local_root, f"delay://{ms:g}{local_root}") if ms else plan
            for step_ms in (0, args.step_ms):
                runs: dict[str, list[dict[str, float]]] = {"before": [], "now": []}
                for rep in range(args.reps):
                    for kind in ("before", "now") if rep % 2 == 0 else ("now", "before"):
                        p_run = replace(p, scope=f"{p.scope}-{kind}-{rep}-{ms}-{step_ms}")
                        runs[kind].append(timed_run(kind, cfg, p_run, units, opts, 4, step_ms / 1000))
                out[f"{ms:g}ms storage, {step_ms:g} ms step"] = {
                    kind: {
                        k: round(statistics.median(r[k] for r in rs), 3 if k == "input_wait_s" else 0)
                        for k in rs[0]
                    }
                    | {"runs": [round(r["samples_per_s"]) for r in rs]}
                    for kind, rs in runs.items()
                }
        return {"rows": meta.split("train").rows, "epochs": 4, "batch": 256, "read_tasks": 2, "results": out}
    finally:
        ray.shutdown()


def read_lanes(plan, lanes, counter) -> dict[str, float]:
    """The lanes' items as read tasks in this process (`items_per_task` items each), the tasks of the lanes taken
    round-robin: requests and opens per row group."""
    per_task = items_per_task(plan)
    tasks = [[lane[i : i + per_task] for i in range(0, len(lane), per_task)] for lane in lanes]
    start = counter()
    groups = 0
    for k in range(max(len(t) for t in tasks)):
        for lane_tasks in tasks:
            if k < len(lane_tasks):
                for batch in task_batches(lane_tasks[k]):
                    for _ in read_slices(batch, plan):
                        pass
                groups += len(lane_tasks[k])
    end = counter()
    d = {key: end[key] - start[key] for key in end}
    return {
        "row_groups": groups,
        "opens_per_row_group": round(d["opens"] / groups, 2),
        "requests_per_row_group": round(d["requests"] / groups, 2),
        "busy_seconds": d["busy_seconds"],
    }


def locality_part(args, work: Path) -> dict:
    rows = args.parts_count * 64
    cfg, meta, plan, units = setup("i", rows, work, group_rows=16, part_rows=64)
    local_root = storage.normalize_url(str(work))
    counter = delay_layer.counters().snapshot
    out = {"parts": len(meta.split("train").parts), "row_groups": len(units), "files_per_part": 3}
    for label, window in (("uniform (before)", 10**9), ("two-level (now)", order.WINDOW_ROW_GROUPS)):
        order.WINDOW_ROW_GROUPS = window
        lanes = epoch_shares(units, 0, 0, 8, 32)
        counted = _at(plan, local_root, f"delay://0{local_root}")
        r = {
            "lane 0": read_lanes(replace(counted, scope=f"{label}-one"), lanes[:1], counter),
            "8 lanes, one process": read_lanes(replace(counted, scope=f"{label}-eight"), lanes, counter),
        }
        slow = _at(plan, local_root, f"delay://{args.latency_ms:g}{local_root}")
        serial = read_lanes(
            replace(slow, read_ahead=0, read_ahead_bytes=0, scope=f"{label}-serial"), lanes[:1], counter
        )
        r["lane 0"]["serial_round_trips_per_row_group"] = round(
            serial["busy_seconds"] / (args.latency_ms / 1000) / serial["row_groups"], 2
        )
        for v in r.values():
            v.pop("busy_seconds")
        out[label] = r
    order.WINDOW_ROW_GROUPS = 16
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="stream,locality")
    ap.add_argument("--rows", type=int, default=12288, help="stream: training rows (1024-row groups)")
    ap.add_argument("--reps", type=int, default=3, help="stream: interleaved runs of each")
    ap.add_argument("--step-ms", type=float, default=20.0, help="stream: the simulated step")
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--parts-count", type=int, default=1251, help="locality: parts of four 16-row groups")
    args = ap.parse_args()
    np.random.seed(0)
    results = {}
    with tempfile.TemporaryDirectory(prefix="camkd-read-order-") as tmp:
        if "stream" in args.parts:
            results["stream"] = stream_part(args, Path(tmp) / "stream")
            print(json.dumps(results["stream"], indent=1))
        if "locality" in args.parts:
            results["locality"] = locality_part(args, Path(tmp) / "locality")
            print(json.dumps(results["locality"], indent=1))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
