"""The doctor's reader probe for a config with 2 workers on one node: what it measured before (one reader alone,
under the budget of a node with one worker: the whole node's reader share) against what it measures now (the
readers of both workers at once, each under its worker's budget, the slower one counting). Interleaved rounds,
medians; a CE student (image parts only) on a synthetic CIFAR-shaped dataset; Ray started locally with 4 logical
CPUs. Prints the table and ends with one JSON line.

    python benchmarks/doctor_readers.py [--rounds 3] [--seconds 4] [--rows 8192]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def config(root: str, rows: int):
    from pipeline.config import validate

    return validate(
        {
            "root": root,
            "data": {
                "source": "synthetic",
                "rows_per_part": 1024,
                "row_group_rows": 128,
                "synthetic": {"train": rows, "test": 256, "num_classes": 10, "size": 32, "channels": 3},
            },
            "strategy": {"name": "ce"},
            "student": {"arch": "resnet8"},
            "train": {"batch_size": 64},
            "scaling": {"num_workers": 2, "cpus_per_worker": 1, "read_tasks": 1},
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rows", type=int, default=8192)
    args = parser.parse_args()
    import ray

    from pipeline.data.ingest import ingest
    from pipeline.ops import doctor
    from pipeline.ops.runtime import local_ray_options
    from pipeline.train.driver import make_plan

    root = tempfile.mkdtemp(prefix="camkd-doctor-readers-")
    ray.init(**local_ray_options(4), log_to_driver=False)
    try:
        cfg = config(root, args.rows)
        meta = ingest(cfg, log=lambda *_: None)
        plan = asdict(make_plan(cfg, meta, f"{root}/runs/probe", log=lambda *_: None))
        alone_probe = ray.remote(max_retries=0, num_cpus=1)(doctor._reader_probe)
        alone, together = [], []
        for _ in range(args.rounds):  # interleaved: before, after, before, after, ...
            alone.append(ray.get(alone_probe.remote(plan, args.seconds, 0, 1)))
            together.append(doctor._probe_readers(cfg, plan, args.seconds, log=lambda *_: None))
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    before = statistics.median(p["samples_per_s"] for p in alone)
    after = statistics.median(r["samples_per_s"] for r in together)
    result = {
        "rounds": args.rounds,
        "seconds": args.seconds,
        "rows": args.rows,
        "before_samples_per_s": [p["samples_per_s"] for p in alone],
        "after_slowest_samples_per_s": [r["samples_per_s"] for r in together],
        "before_object_store_bytes": alone[-1]["budget"]["object_store_bytes"],
        "after_object_store_bytes": [p["budget"]["object_store_bytes"] for p in together[-1]["workers"]],
        "after_readers_at_once": together[-1]["workers_on_node"],
        "ratio_median": round(after / before, 3) if before else None,
    }
    print("| probe | readers at once | object store per reader | samples/s per worker (median) |")
    print("| --- | ---: | ---: | ---: |")
    print(
        f"| before: one reader, the node's share | 1 | {result['before_object_store_bytes'] / 2**20:,.0f} MiB | {before:,.0f} |"
    )
    print(
        f"| now: every worker's reader, its share | {result['after_readers_at_once']} | "
        f"{result['after_object_store_bytes'][0] / 2**20:,.0f} MiB | {after:,.0f} (slowest) |"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
