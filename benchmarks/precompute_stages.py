"""CPU-µs per image of precompute's CPU stages, each run in this process (no Ray pipeline, one torch thread):

1. render: `render_item` (read the image part, checksums, crop + flip) and Ray Data's conversion of its row to a
   block;
2. the teacher actor's host side: `TeacherPool.__call__` with the teachers' forward replaced by replayed outputs
   (what is left: pixels to the device, normalisation, encoding, hits and finiteness checks, the device→host copy,
   the output row; on a GPU the encoding runs on the device), then Ray Data's block conversion;
3. write: Ray Data's block → numpy batch, then `write_item` (Arrow columns, Parquet with page CRCs, xxh3 column
   digests and the file's xxh3-128, receipts, file write + rename);

plus the object-store put of each stage's output block and its get by the next stage (`ray.put`/`ray.get` on a
local Ray). CIFAR-shaped synthetic images (32×32×3), 100 classes, 3 resnet32x4 teachers (256×8×8 maps), items of
`--rows-per-part` rows, for fp16 maps, int8 maps and logits only. Also prints the xxh3-128 digest of every part
the write stage wrote: the inputs are seeded, so equal digests mean byte-identical caches.

    python benchmarks/precompute_stages.py [--images 4096] [--rows-per-part 2048] [--repeats 3]
    python benchmarks/precompute.py --stages-only    # the same, from the precompute benchmark
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
from pipeline.cache.layout import OutputFormat
from pipeline.cache.stages import PrecomputeSpec, TeacherPool, render_item, write_item
from pipeline.config import validate
from pipeline.data.ingest import ingest
from pipeline.data.views import make_view_spec
from pipeline.store import storage
from pipeline.teachers import checkpoints

CLASSES = 100
TEACHERS = 3
ARCH = "resnet32x4"
FEATURE_SHAPE = (256, 8, 8)
FORMATS = {  # name → (cache.logits, cache.features)
    "fp16 maps": ("fp16", "fp16"),
    "int8 maps": ("fp16", "int8"),
    "logits only": ("fp16", "none"),
}


class Replay(torch.nn.Module):
    """A teacher whose forward returns fixed (seeded) outputs: the actor's host side without the compute."""

    def __init__(self, seed: int, rows: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fmap = torch.randn(rows, *FEATURE_SHAPE, generator=g).relu_()
        self.logits = torch.randn(rows, CLASSES, generator=g) * 4

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fmap[: len(x)]

    def forward_head(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.logits[: len(fmap)]


def workload(root: Path, images: int, rows_per_part: int, batch: int):
    """The ingested synthetic dataset, teacher refs and config (3 resnet32x4 checkpoints on disk)."""
    entries = []
    for k in range(TEACHERS):
        torch.manual_seed(k)
        checkpoints.save_model_file(str(root / f"t{k}.pt"), models.create(ARCH, CLASSES, 3))
        entries.append({"name": f"t{k}", "arch": ARCH, "checkpoint": str(root / f"t{k}.pt")})
    cfg = validate(
        {
            "root": str(root),
            "data": {
                "source": "synthetic",
                "rows_per_part": rows_per_part,
                "synthetic": {"train": images, "test": 64, "num_classes": CLASSES, "size": 32},
            },
            "views": {"count": 1},
            "teachers": entries,
            "cache": {"features": "fp16", "batch_size": batch, "cpus_per_actor": 1},
        }
    )
    meta = ingest(cfg, log=lambda *_: None)
    return cfg, meta, checkpoints.resolve_all(cfg, CLASSES, 3)


def precompute_spec(cfg, meta, refs, name: str, out: Path) -> PrecomputeSpec:
    """The stages' spec for one output format, writing its stores under `out`."""
    logits, features = FORMATS[name]
    return PrecomputeSpec(
        dataset_dir=storage.dataset_dir(cfg.root, meta.name, meta.fingerprint),
        dataset_fp=meta.fingerprint,
        image_shape=tuple(meta.image_shape),
        spec=make_view_spec(cfg, meta.encoding).to_dict(),
        fmt=OutputFormat(logits, 0, features, CLASSES),
        teachers=tuple(r.to_dict() for r in refs),
        stores=tuple(str(out / f"t{k}") for k in range(len(refs))),
        group_rows=meta.row_group_rows,
        batch_size=cfg.cache.batch_size,
        threads=1,
        compression="none",
    )


def cpu_us(fn, *args) -> tuple[float, object]:
    """(CPU-µs of this process, result) of one call."""
    c0 = time.process_time()
    out = fn(*args)
    return (time.process_time() - c0) * 1e6, out


def to_block(batch):
    from ray.data.block import BlockAccessor

    return BlockAccessor.batch_to_block(batch)


def to_numpy(block):
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(block).to_batch_format("numpy")


def item_batch(part: str) -> dict[str, np.ndarray]:
    return {
        "part": np.array([part], dtype=object),
        "view": np.array([0], dtype=np.int64),
        "mask": np.array([2**TEACHERS - 1], dtype=np.int64),
    }


STEPS = ("render", "render_block", "actor", "actor_block", "write_numpy", "write")


def run_stages(ps: PrecomputeSpec, pool: TeacherPool, parts: list[str], rows: int) -> tuple[dict, list, list]:
    """One pass over every item through the three stages: CPU-µs per image of each step for each item, the blocks
    each stage produced, and the write stage's records."""
    t: dict[str, list[float]] = {key: [] for key in STEPS}
    rendered, inferred, records = [], [], []
    for part in parts:
        steps = {}
        steps["render"], row = cpu_us(render_item, item_batch(part), ps)
        steps["render_block"], block = cpu_us(to_block, row)
        rendered.append(block)
        steps["actor"], row = cpu_us(pool, to_numpy(block))  # the actor's numpy view of its input: zero-copy
        steps["actor_block"], block = cpu_us(to_block, row)
        inferred.append(block)
        steps["write_numpy"], batch = cpu_us(to_numpy, block)
        steps["write"], rec = cpu_us(write_item, batch, ps)
        records.append(rec)
        for key, us in steps.items():
            t[key].append(us / rows)
    return t, rendered + inferred, records


def object_store_us(blocks: list, rows: int, repeats: int) -> tuple[float, float]:
    """CPU-µs per image of this process to put a block into a local Ray's object store, and to get it back
    (medians over blocks and repeats)."""
    import ray

    puts, gets = [], []
    for _ in range(repeats):
        for block in blocks:
            us, ref = cpu_us(ray.put, block)
            puts.append(us / rows)
            us, _ = cpu_us(ray.get, ref)
            gets.append(us / rows)
            del ref
    return float(np.median(puts)), float(np.median(gets))


def measure(args) -> dict:
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="camkd-precompute-stages-"))
    try:
        cfg, meta, refs = workload(root, args.images, args.rows_per_part, args.batch)
        parts = [p.name for p in meta.split("train").parts]
        rows = meta.split("train").parts[0].rows
        result = {"images": args.images, "rows_per_part": rows, "teachers": TEACHERS, "formats": {}}
        blocks = {}
        for name in FORMATS:
            pool = TeacherPool(precompute_spec(cfg, meta, refs, name, root), "fp32")
            pool.models = {k: Replay(k, rows) for k in range(TEACHERS)}
            samples: dict[str, list[float]] = {key: [] for key in STEPS}
            for rep in range(args.repeats + 1):  # new files every time, as a precompute writes (no overwrite)
                out = root / "out" / f"{name.replace(' ', '-')}-{rep}"
                pool.ps = ps = precompute_spec(cfg, meta, refs, name, out)
                t, blocks[name], records = run_stages(ps, pool, parts, rows)
                shutil.rmtree(out)
                for key in STEPS if rep else ():  # the first pass warms the caches and allocators up
                    samples[key] += t[key]
            stored = int(sum(int(b) for rec in records for b in rec["bytes"]))
            result["formats"][name] = {
                "us_per_image": {key: round(float(np.median(v)), 2) for key, v in samples.items()},
                "stored_bytes_per_image": round(stored / (rows * len(parts)), 1),
                "digests": [str(d) for rec in records for d in rec["digest"]],
            }
        puts(blocks, rows, args.repeats, result)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result


def puts(blocks: dict, rows: int, repeats: int, result: dict) -> None:
    """The object-store costs of each format's blocks: render → actor (pixels), actor → writer (stored columns)."""
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        for bl in blocks.values():  # the store's memory touched once, as in a running pipeline
            warm = [ray.put(b) for b in bl]
            del warm
        for name, bl in blocks.items():
            half = len(bl) // 2
            for stage, group in (("render", bl[:half]), ("actor", bl[half:])):
                put, get = object_store_us(group, rows, repeats)
                result["formats"][name]["us_per_image"][f"{stage}_put"] = round(put, 2)
                result["formats"][name]["us_per_image"][f"{stage}_get"] = round(get, 2)
    finally:
        ray.shutdown()


def report(result: dict) -> None:
    print(
        f"CPU-µs per image ({result['images']} images in items of {result['rows_per_part']} rows, "
        f"{result['teachers']} teachers' outputs; medians over items and repeats)"
    )
    head = ("render", "+block", "+put", "actor host", "+block", "+put", "write", "+get/numpy", "stored B")
    print(f"  {'format':<12}" + "".join(f"{h:>11}" for h in head))
    for name, f in result["formats"].items():
        u = f["us_per_image"]
        row = (
            u["render"],
            u["render_block"],
            u["render_put"],
            u["actor"],
            u["actor_block"],
            u["actor_put"],
            u["write"],
            u["write_numpy"] + u["actor_get"],
            f["stored_bytes_per_image"],
        )
        print(f"  {name:<12}" + "".join(f"{v:11.2f}" for v in row))
    print("per core (the stage function alone | with its Ray Data conversions and object-store traffic):")
    for name, f in result["formats"].items():
        u, b = f["us_per_image"], f["stored_bytes_per_image"]
        render = (u["render"], u["render"] + u["render_block"] + u["render_put"])
        actor = (u["actor"], u["actor"] + u["render_get"] + u["actor_block"] + u["actor_put"])
        write = (u["write"], u["write"] + u["write_numpy"] + u["actor_get"])
        print(
            f"  {name:<12} render {1e6 / render[0]:9,.0f} | {1e6 / render[1]:9,.0f} images/s;  actor host "
            f"{1e6 / actor[0]:9,.0f} | {1e6 / actor[1]:9,.0f} images/s;  write {1e6 / write[0]:9,.0f} | "
            f"{1e6 / write[1]:9,.0f} images/s = {b / write[0] / 1e3:.2f} | {b / write[1] / 1e3:.2f} GB/s stored"
        )
    print("xxh3-128 of the parts written (seeded inputs: equal digests, equal bytes):")
    for name, f in result["formats"].items():
        print(f"  {name:<12} " + " ".join(d[:12] for d in f["digests"]))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--rows-per-part", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256, help="the actor's batch (cache.batch_size)")
    ap.add_argument("--repeats", type=int, default=3, help="measured passes (after one warm-up pass)")
    return ap


def main() -> None:
    result = measure(parser().parse_args())
    report(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
