"""Precompute throughput and cache cost, side by side in one run: 3 × resnet32x4 teachers, 100 classes, 32×32.

1. A plain loop: read the image parts, render each image's view once, run the same 3 teachers on it under
   `torch.no_grad` (logits + feature maps), nothing written.
2. The real precompute stage: one Ray Data pipeline (render tasks → one actor pool running all 3 teachers →
   quantise/encode/write tasks), Parquet parts with receipts and checksums, manifests.
3. Bytes per sample of a cache part for fp16 vs int8 features and full vs top-k logits (the stage's encoder).

Prints Ray ÷ plain (goal ≥ 0.9), end to end and in steady state (after the first item: actor start and model
load excluded); the last line is one JSON object that names the teachers and the workload.

    python benchmarks/precompute.py [--images 1536] [--views 1] [--threads 2]
    python benchmarks/precompute.py --device cuda --precision bf16 --skip-ray   # teacher images/s on a GPU
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
import torch

from camkd import models
from camkd.training import normalize
from pipeline import storage, tables, teachers
from pipeline.cache import OutputFormat, encode_outputs
from pipeline.config import validate
from pipeline.ingest import ingest, open_image_part, read_image_rows
from pipeline.views import make_view_spec, render_train

CLASSES = 100


TEACHERS = ["resnet32x4", "resnet32x4", "resnet32x4"]  # three seeds, the paper's CIFAR-100 teacher set


def plain_loop(cfg, meta, refs, batch: int, views: int, device, dtype) -> float:
    """Images/s (per image and view) of a single-process loop: load the teachers, read parts, render each view
    once, run every teacher on it (logits + fp16 feature maps to host memory). Its clock starts before the
    teachers load, as the Ray path's does (its actors load them)."""
    start = time.perf_counter()
    models_ = [teachers.build_model(r).to(device) for r in refs]
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
    model = teachers.build_model(ref)
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
    model = teachers.build_model(ref).to(device)
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = (
        {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision) if device.type == "cuda" else None
    )
    root = Path(tempfile.mkdtemp(prefix="camkd-precompute-bench-"))
    entries = []
    for i, arch in enumerate(TEACHERS):
        torch.manual_seed(i)
        teachers.save_model_file(str(root / f"t{i}.pt"), models.create(arch, CLASSES, 3))
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
    refs = teachers.resolve_all(cfg, CLASSES, 3)
    workload = {
        "teachers": [f"{e['name']}:{e['arch']}" for e in entries],
        "images": args.images,
        "views": args.views,
        "batch": args.batch,
        "rows_per_part": args.rows_per_part,
        "precision": args.precision,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {args.threads} threads",
    }
    plain = plain_loop(cfg, meta, refs, args.batch, args.views, device, dtype)
    result = {**workload, "plain_images_per_s": round(plain, 1)}
    print(f"workload: {json.dumps(workload)}")
    print(f"plain loop (render once, 3 teachers)   {plain:8.1f} images×views/s")
    if not args.skip_ray:
        import ray

        from pipeline.precompute import precompute_teachers
        from pipeline.runtime import local_ray_options, quiet_ray_data

        # Ray as `run.py` starts it on one machine (its worker-pool setting), without the dashboard
        ray.init(**local_ray_options(args.threads), log_to_driver=False, include_dashboard=False)
        quiet_ray_data()
        start = time.perf_counter()
        rows = precompute_teachers(cfg, refs, meta, log=lambda *_: None)
        wall = time.perf_counter() - start
        ray.shutdown()
        first = rows[0]["first_item_seconds"] or 0.0
        total = args.images * args.views
        e2e = total / wall
        steady = (total - args.rows_per_part) / max(wall - first, 1e-9)
        result.update(
            {
                "ray_images_per_s_end_to_end": round(e2e, 1),
                "ray_images_per_s_steady": round(steady, 1),
                "ray_startup_seconds": round(first, 1),
                "ratio_end_to_end": round(e2e / plain, 3),
                "ratio_steady": round(steady / plain, 3),
                "renders": rows[0]["renders"],
                "manifest_bytes_per_sample": rows[0]["bytes_per_sample"],
            }
        )
        print(
            f"Ray Data precompute, end to end        {e2e:8.1f}   ratio {result['ratio_end_to_end']:.3f} (goal ≥ 0.9)"
        )
        print(
            f"Ray Data precompute, steady state      {steady:8.1f}   ratio {result['ratio_steady']:.3f}"
            f"   (first item after {first:.1f} s)"
        )
        print(f"renders: {rows[0]['renders']} for {total} (image, view) pairs and {len(refs)} teachers")
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
    result["bytes_per_sample_per_view"] = sizes
    print("cache bytes per image and view (resnet32x4: 100 logits, 256×8×8 map; with checksums)")
    for k, v in sizes.items():
        print(f"  {k:<34} {v:10.1f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
