"""What the cache checks cost: `precompute --verify N` on a small synthetic cache (2 teachers, 256 images × 2 views,
fp16 logits and maps), N interleaved over repeats, and the rendering probe digest that training's plan and precompute
compute once per run (raw 32-px images and 224-px image folders).

    python benchmarks/verify_cache.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from camkd import models
from pipeline.config import validate
from pipeline.data.render_probe import render_digest
from pipeline.data.views import ViewSpec
from pipeline.teachers import checkpoints


def small_cache(folder: Path):
    """A synthetic dataset (256 training images, 10 classes, 32 px) and 2 untrained teachers, precomputed."""
    from pipeline.cache import precompute
    from pipeline.data.ingest import ingest

    teachers = []
    for name, arch in (("t1", "resnet8"), ("t2", "resnet14")):
        torch.manual_seed(len(teachers))
        path = folder / f"{name}.pt"
        checkpoints.save_model_file(str(path), models.create(arch, 10, 3).eval())
        teachers.append({"name": name, "arch": arch, "checkpoint": str(path)})
    cfg = validate(
        {
            "root": str(folder / "root"),
            "data": {
                "source": "synthetic",
                "rows_per_part": 64,
                "synthetic": {"train": 256, "test": 64, "num_classes": 10, "size": 32, "channels": 3},
            },
            "views": {"count": 2, "pad": 2},
            "cache": {"features": "fp16", "batch_size": 64, "actors": 1, "cpus_per_actor": 0.5},
            "teachers": teachers,
        }
    )
    ingest(cfg, log=lambda *_: None)
    precompute.run_stage(cfg, log=lambda *_: None)
    return cfg


def verify_seconds(cfg, repeats: int) -> dict[int, list[float]]:
    from pipeline.cache.verify import verify_cache

    verify_cache(cfg, 16, log=lambda *_: None)  # warm-up: the task's worker imports torch once
    times: dict[int, list[float]] = {64: [], 256: [], 512: []}
    for _ in range(repeats):
        for n in times:  # interleaved
            t0 = time.perf_counter()
            verify_cache(cfg, n, log=lambda *_: None)
            times[n].append(time.perf_counter() - t0)
    return times


def probe_ms(repeats: int = 21) -> dict[str, float]:
    raw = ViewSpec("crop_flip", 8, 0, 4, True, 0, (1.0, 1.0), (1.0, 1.0), 0, (0.5,) * 3, (0.25,) * 3)
    folder = ViewSpec(
        "rrc_flip", 8, 0, 0, True, 224, (0.08, 1.0), (0.75, 4 / 3), 256, (0.5,) * 3, (0.25,) * 3
    )
    out = {}
    for name, spec, shape in (("raw 32x32x3", raw, (32, 32, 3)), ("image folder, 224 px", folder, None)):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            render_digest(spec, shape)
            times.append(time.perf_counter() - t0)
        out[name] = 1000 * statistics.median(times)
    return out


def main() -> None:
    import ray

    from pipeline.ops.runtime import local_ray_options, quiet_ray_data

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    for name, ms in probe_ms().items():
        print(f"rendering probe digest, {name}: median {ms:.2f} ms")
    ray.init(**local_ray_options(4), log_to_driver=False)
    quiet_ray_data()
    try:
        with tempfile.TemporaryDirectory() as folder:
            cfg = small_cache(Path(folder))
            for n, times in verify_seconds(cfg, args.repeats).items():
                print(
                    f"verify {n} (image, view) pairs per teacher, 2 teachers: median {statistics.median(times):.2f} s "
                    f"({', '.join(f'{t:.2f}' for t in times)})"
                )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
