"""Precompute throughput and cache cost, side by side in one run: 3 × resnet32x4 teachers, 100 classes, 32×32.

1. A plain loop: read the image parts, render each image's view once, run the same 3 teachers on it under
   `torch.no_grad` (logits + feature maps), nothing written.
2. The real precompute stage: one Ray Data pipeline (render tasks → one actor pool running all 3 teachers →
   quantise/encode/write tasks), Parquet parts with receipts and checksums, manifests.
3. Bytes per sample of a cache part for fp16 vs int8 features and full vs top-k logits (the stage's encoder).

4. CPU-µs per image of the CPU stages (render, the actor's host side, write) for fp16 maps, int8 maps and logits
   only, each stage run in this process: `benchmarks/precompute_stages.py` (`--stages-only`: that alone).

Prints Ray ÷ plain (goal ≥ 0.9), end to end and in steady state (after the first item: actor start and model
load excluded); the last line is one JSON object that names the teachers and the workload.

    python benchmarks/precompute.py [--images 1536] [--views 1] [--threads 2]
    python benchmarks/precompute.py --device cuda --precision bf16 --skip-ray   # teacher images/s on a GPU
    python benchmarks/precompute.py --stages-only                               # the CPU stages' µs per image
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import precompute_stages
import torch

from camkd import models
from camkd.training import normalize
from pipeline.cache.layout import OutputFormat, encode_outputs
from pipeline.config import validate
from pipeline.data.ingest import ingest, open_image_part, read_image_rows
from pipeline.data.views import make_view_spec, render_train
from pipeline.store import storage, tables
from pipeline.teachers import checkpoints

CLASSES = 100


TEACHERS = ["resnet32x4", "resnet32x4", "resnet32x4"]  # three seeds, the paper's CIFAR-100 teacher set


def plain_loop(cfg, meta, refs, batch: int, views: int, device, dtype) -> float:
    """Images/s (per image and view) of a single-process loop: load the teachers, read parts, render each view
    once, run every teacher on it (logits + fp16 feature maps to host memory). Its clock starts before the
    teachers load, as the Ray path's does (its actors load them)."""
    start = time.perf_counter()
    models_ = [checkpoints.build_model(r).to(device) for r in refs]
    spec = make_view_spec(cfg, meta.encoding)
    ddir = storage.dataset_dir(cfg.root, meta.name, meta.fingerprint)
    n = 0
    with (
        torch.no_grad(),
        torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
    ):
        for view in range(views):
            for part in meta.split("train").parts:
                rows = read_image_rows(open_image_part(ddir, "train", part.name), None)
                pixels = render_train(
                    rows["image"].combine_chunks(),
                    rows["idx"].to_numpy(),
                    view,
                    spec,
                    tuple(meta.image_shape),
                ).pixels
                for s in range(0, len(pixels), batch):
                    x = normalize(torch.from_numpy(pixels[s : s + batch]).to(device), spec.mean, spec.std)
                    for model in models_:
                        fmap = model.forward_features(x)
                        model.forward_head(fmap).float().cpu().numpy()
                        fmap.half().cpu().numpy()
                    n += min(batch, len(pixels) - s)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def bytes_per_sample(ref, rows: int = 256) -> dict[str, float]:
    """On-disk bytes per image (one view) of a cache part in each storage format (the stage's own encoder)."""
    model = checkpoints.build_model(ref)
    with torch.no_grad():
        fmap = model.forward_features(torch.randn(rows, 3, 32, 32))
        logits = model.forward_head(fmap).numpy()
    feats = fmap.half().numpy()
    out = {}
    for logit_fmt, feat_fmt in [
        ("fp16", "fp16"),
        ("fp16", "int8"),
        ("topk", "int8"),
        ("fp16", "none"),
        ("topk", "none"),
    ]:
        fmt = OutputFormat(logit_fmt, 10, feat_fmt, CLASSES)
        table = encode_outputs(np.arange(rows), logits, feats if feat_fmt != "none" else None, fmt)
        size = tables.encode_table(table, 256).size
        out[f"logits_{logit_fmt}{'10' if logit_fmt == 'topk' else ''}+features_{feat_fmt}"] = round(
            size / rows, 1
        )
    return out


def precision_error(ref, device, rows: int = 256) -> dict[str, float | str]:
    """What bf16 inference does to a teacher's outputs and to the KD targets cached from them, against fp32."""
    model = checkpoints.build_model(ref).to(device)
    x = torch.randn(rows, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        f32 = model.forward_features(x)
        z32 = model.forward_head(f32).float()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            f16 = model.forward_features(x)
            z16 = model.forward_head(f16).float()
    f16 = f16.float()
    p32, p16 = torch.softmax(z32 / 4, 1), torch.softmax(z16 / 4, 1)
    kl = (p32 * (p32.clamp_min(1e-12).log() - p16.clamp_min(1e-12).log())).sum(1).mean()
    return {
        "device": str(device),
        "rows": rows,
        "logits_max_abs": float((z16 - z32).abs().max()),
        "logits_rel": float((z16 - z32).norm() / z32.norm()),
        "features_rel": float((f16 - f32).norm() / f32.norm()),
        "kd_target_max_abs": float((p16 - p32).abs().max()),
        "kd_target_kl": float(kl),
        "top1_agreement": float((z16.argmax(1) == z32.argmax(1)).float().mean()),
    }


def median(values: list[float]) -> float:
    return float(np.median(values))


def _processes() -> dict[int, tuple[int, str, float]]:
    """pid → (parent pid, command line, CPU-seconds user + system) of every process readable in /proc."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                head, rest = f.read().rsplit(")", 1)
            fields = rest.split()
            cmd = cmd or head.split("(", 1)[-1]  # a worker renames itself "ray::…"; its stat keeps the name
            out[int(pid)] = (int(fields[1]), cmd, (int(fields[11]) + int(fields[12])) / tick)
        except (OSError, ValueError, IndexError):
            continue
    return out


def ray_own_cpu_seconds() -> float:
    """CPU-seconds so far of the Ray system processes this driver started (GCS, raylet, dashboard and its heads,
    agents, log monitor): its descendants that are not task or actor workers (nor below one). They started with
    this run's `ray.init`, so the sum is the run's; other Ray instances on the machine are not counted."""
    import os

    procs = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        cmd = procs[pid][1]
        if "default_worker.py" in cmd or cmd.startswith("ray::"):
            continue  # a worker: its CPU is the work's (and its own start-up), not Ray's bookkeeping
        total += procs[pid][2]
        todo.extend(children.get(pid, []))
    return total


def ray_once(cfg, refs, meta, threads: int, total: int, first_rows: int) -> dict[str, float]:
    """One precompute through Ray, from `ray.init` (Ray as `run.py` starts it on one machine, no dashboard) to the
    last part written: images×views/s end to end and after the first item, the first item's seconds, and the
    CPU-seconds Ray's own processes took."""
    import ray

    from pipeline.cache.precompute import precompute_teachers
    from pipeline.ops.runtime import local_ray_options, quiet_ray_data

    start = time.perf_counter()
    ray.init(**local_ray_options(threads), log_to_driver=False, include_dashboard=False)
    quiet_ray_data()
    rows = precompute_teachers(cfg, refs, meta, log=lambda *_: None)
    wall = time.perf_counter() - start
    overhead = ray_own_cpu_seconds()
    ray.shutdown()
    first = rows[0]["first_item_seconds"] or 0.0
    return {
        "end_to_end": total / wall,
        "steady": (total - first_rows) / max(wall - first, 1e-9),
        "startup": first,
        "overhead_cpu": overhead,
        "render_cpu_use": rows[0]["cpu_use"]["render"] or 0.0,
        "write_cpu_use": rows[0]["cpu_use"]["write"] or 0.0,
    }


FORMATS = {  # name → (cache.logits, cache.features)
    "fp16 maps": ("fp16", "fp16"),
    "int8 maps": ("fp16", "int8"),
    "top-k logits": ("topk", "none"),
}


def format_bytes(cfg, refs, threads: int, rows: int = 512) -> tuple[dict[str, float], dict[str, float]]:
    """Per cache format, one part of `rows` images precomputed by one teacher through the Ray stage: bytes per
    (image, view) that crossed the object store from the actor to the writer (all the row carries: stored columns,
    idx, keys), and bytes stored (the Parquet part on disk, with its footer and receipt)."""
    import ray

    from pipeline.cache.precompute import precompute_teachers
    from pipeline.config import with_updates
    from pipeline.ops.runtime import local_ray_options, quiet_ray_data

    ray.init(**local_ray_options(threads), log_to_driver=False, include_dashboard=False)
    quiet_ray_data()
    sent, stored = {}, {}
    small = with_updates(cfg, {"data.synthetic.train": rows, "data.rows_per_part": rows})
    small_meta = ingest(small, log=lambda *_: None)
    for name, (logits, features) in FORMATS.items():
        fcfg = with_updates(small, {"cache.logits": logits, "cache.features": features})
        out = precompute_teachers(fcfg, refs[:1], small_meta, overwrite=True, log=lambda *_: None)
        sent[name] = out[0]["object_store_bytes_per_sample"]
        stored[name] = round(float(np.mean([r["bytes_per_sample"]["on_disk"] for r in out])), 1)
    ray.shutdown()
    return sent, stored


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1536)
    ap.add_argument("--views", type=int, default=1)
    ap.add_argument("--rows-per-part", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of the plain loop = Ray CPUs")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--skip-ray", action="store_true", help="the plain loop only (a GPU machine without Ray)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved plain / Ray runs; medians reported")
    ap.add_argument("--stages-only", action="store_true", help="only the CPU stages' CPU-µs per image")
    args = ap.parse_args()
    if args.stages_only:
        stage_costs = precompute_stages.measure(precompute_stages.parser().parse_args([]))
        precompute_stages.report(stage_costs)
        print(json.dumps(stage_costs))
        return
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = (
        {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision) if device.type == "cuda" else None
    )
    root = Path(tempfile.mkdtemp(prefix="camkd-precompute-bench-"))
    entries = []
    for i, arch in enumerate(TEACHERS):
        torch.manual_seed(i)
        checkpoints.save_model_file(str(root / f"t{i}.pt"), models.create(arch, CLASSES, 3))
        entries.append({"name": f"t{i}", "arch": arch, "checkpoint": str(root / f"t{i}.pt")})
    # The actor holds 1.5 of the 2 CPUs (2 torch threads), render and write tasks a quarter each: the machine's
    # cores are shared the way the plain loop uses them.
    actor_cpus = max(1.0, args.threads - 0.5)
    cfg = validate(
        {
            "root": str(root),
            "data": {
                "source": "synthetic",
                "rows_per_part": args.rows_per_part,
                "synthetic": {"train": args.images, "test": 64, "num_classes": CLASSES, "size": 32},
            },
            "views": {"count": args.views},
            "teachers": entries,
            "cache": {
                "features": "fp16",
                "batch_size": args.batch,
                "eval_test": False,
                "cpus_per_actor": actor_cpus,
                "render_cpus": 0.25,
                "write_cpus": 0.25,
                "precision": args.precision,
            },
        }
    )
    meta = ingest(cfg, log=lambda *_: None)
    refs = checkpoints.resolve_all(cfg, CLASSES, 3)
    workload = {
        "teachers": [f"{e['name']}:{e['arch']}" for e in entries],
        "images": args.images,
        "views": args.views,
        "batch": args.batch,
        "rows_per_part": args.rows_per_part,
        "precision": args.precision,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {args.threads} threads",
    }
    print(f"workload: {json.dumps(workload)}")
    runs: list[dict] = []
    result = dict(workload)
    # A/B interleaved: plain, Ray, plain, Ray, ... (this VM's speed drifts within minutes); medians reported.
    for rep in range(args.repeats):
        run = {"plain": plain_loop(cfg, meta, refs, args.batch, args.views, device, dtype)}
        if not args.skip_ray:
            run |= ray_once(cfg, refs, meta, args.threads, args.images * args.views, args.rows_per_part)
            shutil.rmtree(storage.join(cfg.root, "cache", meta.fingerprint), ignore_errors=True)
            run["ratio_end_to_end"] = run["end_to_end"] / run["plain"]
            run["ratio_steady"] = run["steady"] / run["plain"]
        runs.append(run)
        print(f"run {rep + 1}/{args.repeats}: " + ", ".join(f"{k} {v:.3f}" for k, v in run.items()))
    result["plain_images_per_s"] = round(median([r["plain"] for r in runs]), 1)
    print(
        f"plain loop (render once, 3 teachers)   {result['plain_images_per_s']:8.1f} images×views/s (median)"
    )
    if not args.skip_ray:
        for key, out in (
            ("end_to_end", "ray_images_per_s_end_to_end"),
            ("steady", "ray_images_per_s_steady"),
            ("ratio_end_to_end", "ratio_end_to_end"),
            ("ratio_steady", "ratio_steady"),
            ("startup", "ray_startup_seconds"),
            ("overhead_cpu", "ray_overhead_cpu_seconds"),
            ("render_cpu_use", "render_task_cpu_use"),
            ("write_cpu_use", "write_task_cpu_use"),
        ):
            values = [r[key] for r in runs]
            result[out] = round(median(values), 3)
            result[out + "_spread"] = [round(min(values), 3), round(max(values), 3)]
        result["runs"] = [{k: round(v, 3) for k, v in r.items()} for r in runs]
        print(
            f"Ray Data precompute, end to end        {result['ray_images_per_s_end_to_end']:8.1f}   ratio "
            f"{result['ratio_end_to_end']:.3f} (spread {result['ratio_end_to_end_spread']}; goal ≥ 0.9)"
        )
        print(
            f"Ray Data precompute, steady state      {result['ray_images_per_s_steady']:8.1f}   ratio "
            f"{result['ratio_steady']:.3f} (spread {result['ratio_steady_spread']}; goal ≥ 0.95)"
        )
        print(
            f"Ray start-up (first item) {result['ray_startup_seconds']:.1f} s; Ray's own processes (GCS, raylet, "
            f"dashboard, agents) {result['ray_overhead_cpu_seconds']:.1f} CPU-s per run (medians of {args.repeats})"
        )
        print(
            f"CPUs a task kept busy while it ran (CPU-seconds ÷ seconds): render {result['render_task_cpu_use']:.2f}, "
            f"write {result['write_task_cpu_use']:.2f} (cache.render_cpus / cache.write_cpus ask for what this says)"
        )
        sent, stored = format_bytes(cfg, refs, args.threads)
        result["object_store_bytes_per_sample"], result["stored_bytes_per_sample"] = sent, stored
        print("per (image, view) of a teacher: bytes through the object store vs bytes stored (Parquet part)")
        print(f"  {'format':<24} {'sent':>10} {'stored':>10}")
        for name in sent:
            print(
                f"  {name:<24} {sent[name]:10.1f} {stored[name]:10.1f}   ratio {sent[name] / stored[name]:.3f}"
            )
    # bf16 convolutions are emulated on most CPUs (~3 s per image for resnet32x4): a small batch there
    error = precision_error(refs[0], device, rows=256 if device.type == "cuda" else 16)
    result["bf16_vs_fp32"] = error
    print(
        f"bf16 autocast vs fp32 ({error['device']}, one batch of {error['rows']}): logits max |Δ| {error['logits_max_abs']:.3g} "
        f"(rel {error['logits_rel']:.2e}), maps rel {error['features_rel']:.2e}, KD targets softmax(z/4): "
        f"max |Δp| {error['kd_target_max_abs']:.2e}, mean KL {error['kd_target_kl']:.2e}, top-1 agreement "
        f"{error['top1_agreement']:.4f}"
    )
    sizes = bytes_per_sample(refs[0])
    shutil.rmtree(root, ignore_errors=True)
    result["cpu_stages"] = precompute_stages.measure(precompute_stages.parser().parse_args([]))
    precompute_stages.report(result["cpu_stages"])
    result["bytes_per_sample_per_view"] = sizes
    print("cache bytes per image and view (resnet32x4: 100 logits, 256×8×8 map; with checksums)")
    for k, v in sizes.items():
        print(f"  {k:<34} {v:10.1f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
