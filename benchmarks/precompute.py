"""Precompute throughput and cache cost, side by side in one run (resnet32x4 teacher, 100 classes, 32×32).

1. A plain `torch.no_grad` loop over the same images (same view rendering, same model, same batch size).
2. The real Ray Data precompute stage (actor pool of teacher replicas, Parquet parts written atomically).
3. Bytes per sample of a cache part for fp16 vs int8 features and full vs top-k logits (same encoder as the stage).

Prints the ratio Ray ÷ plain (goal ≥ 0.8), both end to end and in steady state (after the first part: actor start
and model load excluded); the last line is one JSON object.

    python benchmarks/precompute.py [--images 2048] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from camkd import models
from camkd.training import normalize
from pipeline import storage, teachers
from pipeline.cache import OutputFormat, encode_view
from pipeline.config import validate
from pipeline.ingest import ingest, read_image_part
from pipeline.views import make_view_spec, render_train_view

TEACHER, CLASSES = "resnet32x4", 100


def plain_loop(cfg, meta, ref, batch: int) -> float:
    """Images/s of a single-process no_grad loop: read image parts, render view 0, forward (logits + features)."""
    model = teachers.build_model(ref)
    spec = make_view_spec(cfg, meta.encoding)
    ddir = storage.dataset_dir(cfg.root, meta.name, meta.fingerprint)
    n = 0
    start = time.perf_counter()
    with torch.no_grad():
        for part in meta.split("train").parts:
            table = read_image_part(ddir, "train", part.name)
            pixels = render_train_view(
                table["image"].to_pylist(), table["idx"].to_numpy(), 0, spec, tuple(meta.image_shape)
            )
            for s in range(0, len(pixels), batch):
                fmap = model.forward_features(
                    normalize(torch.from_numpy(pixels[s : s + batch]), spec.mean, spec.std)
                )
                model.forward_head(fmap).numpy()
                fmap.half().numpy()
                n += min(batch, len(pixels) - s)
    return n / (time.perf_counter() - start)


def bytes_per_sample(ref, rows: int = 256) -> dict[str, float]:
    """On-disk bytes per image (one view) of a Parquet part in each storage format."""
    model = teachers.build_model(ref)
    with torch.no_grad():
        x = torch.randn(rows, 3, 32, 32)
        fmap = model.forward_features(x)
        logits = model.forward_head(fmap).numpy()
    feats = fmap.numpy()
    out = {}
    for logit_fmt, feat_fmt in [
        ("fp16", "fp16"),
        ("fp16", "int8"),
        ("topk", "none"),
        ("fp16", "none"),
        ("topk", "int8"),
    ]:
        fmt = OutputFormat(logit_fmt, 10, feat_fmt, CLASSES)
        cols = {"idx": pa.array(np.arange(rows))} | encode_view(0, logits, feats, fmt)
        buf = pa.BufferOutputStream()
        pq.write_table(pa.table(cols), buf, compression="none", use_dictionary=False)
        out[f"logits_{logit_fmt}{'10' if logit_fmt == 'topk' else ''}+features_{feat_fmt}"] = round(
            buf.getvalue().size / rows, 1
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--rows-per-part", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of the plain loop = Ray CPUs")
    args = ap.parse_args()
    import ray

    from pipeline.precompute import precompute_teachers
    from pipeline.runtime import quiet_ray_data

    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="camkd-precompute-bench-"))
    torch.manual_seed(0)
    teachers.save_model_file(str(root / "t.pt"), models.create(TEACHER, CLASSES, 3))
    cfg = validate(
        {
            "root": str(root),
            "data": {
                "source": "synthetic",
                "rows_per_part": args.rows_per_part,
                "synthetic": {"train": args.images, "test": 64, "num_classes": CLASSES, "size": 32},
            },
            "views": {"count": 1},
            "teachers": [{"name": "t", "arch": TEACHER, "checkpoint": str(root / "t.pt")}],
            "cache": {"features": "fp16", "batch_size": args.batch, "eval_test": False, "cpus_per_actor": 1},
        }
    )
    meta = ingest(cfg, log=lambda *_: None)
    ref = teachers.resolve(cfg, cfg.teachers[0], CLASSES, 3)
    plain = plain_loop(cfg, meta, ref, args.batch)
    ray.init(num_cpus=args.threads, log_to_driver=False)
    quiet_ray_data()
    start = time.perf_counter()
    (row,) = precompute_teachers(cfg, [ref], meta, log=lambda *_: None)
    wall = time.perf_counter() - start
    ray.shutdown()
    first = row["first_part_seconds"] or 0.0
    e2e = args.images / wall
    steady = (args.images - args.rows_per_part) / max(wall - first, 1e-9)
    sizes = bytes_per_sample(ref)
    result = {
        "teacher": TEACHER,
        "images": args.images,
        "views": 1,
        "threads": args.threads,
        "plain_no_grad_images_per_s": round(plain, 1),
        "ray_images_per_s_end_to_end": round(e2e, 1),
        "ray_images_per_s_steady": round(steady, 1),
        "ray_startup_seconds": round(first, 1),
        "ratio_end_to_end": round(e2e / plain, 3),
        "ratio_steady": round(steady / plain, 3),
        "bytes_per_sample_per_view": sizes,
        "manifest_bytes_per_sample": row["bytes_per_sample"],
    }
    print(f"plain torch.no_grad loop           {plain:8.1f} images/s")
    print(
        f"Ray Data precompute, end to end    {e2e:8.1f} images/s   ratio {result['ratio_end_to_end']:.3f} (goal ≥ 0.8)"
    )
    print(
        f"Ray Data precompute, steady state  {steady:8.1f} images/s   ratio {result['ratio_steady']:.3f}"
        f"   (first part after {first:.1f} s)"
    )
    print("cache bytes per image and view (resnet32x4: 100 logits, 256×8×8 map)")
    for k, v in sizes.items():
        print(f"  {k:<34} {v:10.1f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
