"""A torch.profiler trace of precompute's teacher actor: do its copies to and from the GPU overlap compute?

Builds the actor (`TeacherPool`) with 3 resnet32x4 teachers (as `benchmarks/precompute.py`) and runs items of
`--rows` rendered CIFAR-shaped images through it in this process (no Ray), the last `--profile-items` of them under
torch.profiler. From the trace it reports the GPU time of kernels and of host→device and device→host copies, the
share of each copy direction that ran while a kernel ran (1.0: fully hidden behind compute), and the GPU's idle
share between the first and the last event of the traced items. Writes the Chrome trace to `--trace-dir`.
`--device cpu` rehearses it on a machine without a GPU (nothing to overlap: the shares are null).

    python benchmarks/actor_trace.py --device cuda --precision bf16 [--rows 2048] [--batch 512]
    python benchmarks/actor_trace.py --device cpu --precision fp32 --rows 64 --batch 32 --items 1 --profile-items 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def intervals_union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def covered(span: tuple[float, float], union: list[tuple[float, float]]) -> float:
    """Microseconds of `span` inside the (sorted, disjoint) intervals of `union`."""
    return sum(max(0.0, min(span[1], e) - max(span[0], s)) for s, e in union if s < span[1] and e > span[0])


def overlap_report(trace_file: Path) -> dict:
    """Kernel and copy time of a Chrome trace, the share of each copy direction that overlapped a kernel, and the
    GPU's idle share over the traced span."""
    events = json.loads(trace_file.read_text())["traceEvents"]
    kernels, copies = [], {"HtoD": [], "DtoH": []}
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        span = (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        if e.get("cat") == "kernel":
            kernels.append(span)
        elif e.get("cat") == "gpu_memcpy":
            for direction in copies:
                if direction in e.get("name", ""):
                    copies[direction].append(span)
    busy_kernels = intervals_union(kernels)
    out: dict = {"kernel_ms": round(sum(e - s for s, e in busy_kernels) / 1e3, 3)}
    for direction, spans in copies.items():
        total = sum(e - s for s, e in spans)
        hidden = sum(covered(s, busy_kernels) for s in spans)
        out[f"{direction}_ms"] = round(total / 1e3, 3)
        out[f"{direction}_overlapped"] = round(hidden / total, 3) if total else None
    everything = intervals_union(kernels + copies["HtoD"] + copies["DtoH"])
    if everything:
        span = everything[-1][1] - everything[0][0]
        out["gpu_idle_share"] = round(1 - sum(e - s for s, e in everything) / span, 3)
    else:
        out["gpu_idle_share"] = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--rows", type=int, default=2048, help="images per item (a part's rows)")
    ap.add_argument("--batch", type=int, default=512, help="cache.batch_size")
    ap.add_argument("--items", type=int, default=2, help="items run before tracing (warm-up)")
    ap.add_argument("--profile-items", type=int, default=3)
    ap.add_argument("--trace-dir", default="/tmp/camkd-profile/actor")
    args = ap.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the actor takes the GPU whenever it sees one
    import precompute_stages as stages
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pipeline.cache.stages import TeacherPool, render_item

    root = Path(tempfile.mkdtemp(prefix="camkd-actor-trace-"))
    try:
        cfg, meta, refs = stages.workload(root, args.rows, args.rows, args.batch)
        ps = stages.precompute_spec(cfg, meta, refs, "fp16 maps", root / "out")
        pool = TeacherPool(ps, args.precision)
        row = render_item(stages.item_batch(meta.split("train").parts[0].name), ps)
        for _ in range(args.items):
            pool(dict(row))
        cuda = pool.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(args.profile_items):
                pool(dict(row))
        seconds = time.perf_counter() - start
        trace_dir = Path(args.trace_dir)
        trace_dir.mkdir(parents=True, exist_ok=True)
        trace = trace_dir / f"actor-{pool.device.type}-{args.precision}.json"
        prof.export_chrome_trace(str(trace))
        sort = "cuda_time_total" if cuda else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=15))
        result = {
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "precision": args.precision,
            "rows": args.rows,
            "batch": args.batch,
            "teachers": len(refs),
            "traced_items": args.profile_items,
            "images_per_s_traced": round(args.profile_items * args.rows / seconds, 1),
            "trace": str(trace),
        } | overlap_report(trace)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
