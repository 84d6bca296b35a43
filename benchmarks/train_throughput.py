"""Student training throughput, measured side by side in one run: 3 × resnet32x4 → resnet8x4 at 32×32, 100 classes.

In-memory (the same camkd TrainStep over tensors already in memory): CE-only, cached CA-MKD (teacher outputs as
stored in the cache: fp16 logits and feature maps) and online CA-MKD (teachers run in the loop). Ray path: the real
pipeline (ingest → precompute → Ray Train + Ray Data reading the Parquet cache) for CE and cached CA-MKD. Prints
the ratios the product promises (goals: cached ÷ CE ≥ 0.90, cached ÷ online ≥ 5, Ray ÷ in-memory ≥ 0.80);
the last line is one JSON object. Synthetic data: throughput does not depend on pixel values.

    python benchmarks/train_throughput.py                      # CPU: in-memory + Ray path
    python benchmarks/train_throughput.py --device cuda --amp bf16 --skip-ray   # GPU: in-memory with AMP
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from camkd import Distiller, TeacherOutputs, create_strategy, models
from camkd.optim import build_optimizer
from camkd.training import TrainStep, amp_dtype, normalize

TEACHER, STUDENT, CLASSES, K = "resnet32x4", "resnet8x4", 100, 3
MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def build(strategy: str, device, teachers):
    student = models.create(STUDENT, CLASSES, 3)
    names = [f"t{i}" for i in range(K)] if strategy != "ce" else []
    kwargs = {}
    if strategy == "camkd":
        kwargs = {
            "student_channels": student.feature_channels,
            "teacher_feature_shapes": [[t.feature_channels, 8, 8] for t in teachers],
            "teacher_heads": [t.head for t in teachers],
        }
    distiller = Distiller(student, create_strategy(strategy, names, **kwargs)).to(device)
    opt = build_optimizer(distiller.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return distiller, opt


class InMemoryRun:
    """One training setup (ce / cached / online) over in-memory tensors, timed in repeated short rounds."""

    def __init__(
        self, mode: str, images, labels, teachers, cached, batch: int, device, dtype, opts=frozenset()
    ) -> None:
        self.mode, self.images, self.labels, self.teachers, self.cached = (
            mode,
            images,
            labels,
            teachers,
            cached,
        )
        self.batch, self.device, self.dtype = batch, device, dtype
        distiller, opt = build("ce" if mode == "ce" else "camkd", device, teachers)
        self.channels_last = "channels_last" in opts and device.type == "cuda"
        if self.channels_last:  # as the worker does with train.channels_last
            distiller = distiller.to(memory_format=torch.channels_last)
        self.step = TrainStep(distiller, distiller, opt, device, dtype)
        if "compile" in opts or "cudagraphs" in opts:  # as train.compile does: the whole step as one graph
            self.step.compile_whole(mode="reduce-overhead" if "cudagraphs" in opts else None)
        self.i = 0

    def one(self) -> None:
        n, b = self.images.shape[0], self.batch
        start = (self.i * b) % (n - b + 1)
        sl = slice(start, start + b)
        self.i += 1
        x = normalize(self.images[sl], MEAN, STD)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.mode == "ce":
            out = TeacherOutputs()
        elif self.mode == "cached":
            logits, feats = self.cached
            out = TeacherOutputs(logits[:, sl].float(), [f[sl].float() for f in feats])
        else:
            dtype = self.dtype
            with (
                torch.no_grad(),
                torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None),
            ):
                fm = [t.forward_features(x) for t in self.teachers]
                out = TeacherOutputs(
                    torch.stack([t.forward_head(f) for t, f in zip(self.teachers, fm)]).float(),
                    [f.float() for f in fm],
                )
        self.step.run(x, self.labels[sl], out, epoch=1)

    def rate(self, steps: int) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            self.one()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return steps * self.batch / (time.perf_counter() - start)


def in_memory_rates(
    images, labels, teachers, cached, batch: int, steps: int, rounds: int, device, dtype, modes, opts
):
    """Median samples/s per mode; modes are interleaved round by round so drift (clock, caches) hits all alike."""
    runs = {m: InMemoryRun(m, images, labels, teachers, cached, batch, device, dtype, opts) for m in modes}
    for run in runs.values():  # warm-up: allocator, oneDNN/cuDNN kernel selection, torch.compile
        for _ in range(6 if opts & {"compile", "cudagraphs"} else 3):
            run.one()
    samples: dict[str, list[float]] = {m: [] for m in runs}
    for _ in range(rounds):
        for m, run in runs.items():
            samples[m].append(run.rate(steps if m != "online" else max(1, steps // 3)))
    return {m: statistics.median(v) for m, v in samples.items()}


# Ray-path variants of the cached CA-MKD run (--ray-variants): config changes a GPU user would try.
RAY_VARIANTS = {
    "compile": {"train.compile": True},
    "channels_last": {"train.channels_last": True},
    "compile_channels_last": {"train.compile": True, "train.channels_last": True},
    "pin_off": {"train.pin_memory": False},
    "prefetch1": {"train.prefetch_batches": 1},
    "threads": {"scaling.reader": "threads", "scaling.read_threads": 2},
}


def ray_path(
    n_images: int,
    epochs: int,
    threads: int,
    batch: int = 64,
    device: str = "cpu",
    amp: str = "off",
    variants: tuple[str, ...] = (),
    profile_dir: str | None = None,
) -> tuple[dict[str, float], str]:
    """Steady-state samples/s (epochs after the first) of the real Ray Train + Ray Data pipeline: one worker
    (one GPU with --device cuda, NCCL as the process group backend), its reader beside it. CE, cached CA-MKD,
    then cached CA-MKD with each variant's config changes, on the same cache. Also returns the process group's
    backend."""
    import ray

    from pipeline.cache import precompute
    from pipeline.config import validate, with_updates
    from pipeline.data.ingest import ingest
    from pipeline.ops.runtime import local_ray_options, quiet_ray_data
    from pipeline.teachers import checkpoints
    from pipeline.train import driver

    root = Path(tempfile.mkdtemp(prefix="camkd-bench-"))
    files = []
    for i in range(K):
        torch.manual_seed(i)
        path = root / f"t{i}.pt"
        checkpoints.save_model_file(str(path), models.create(TEACHER, CLASSES, 3))
        files.append({"name": f"t{i}", "arch": TEACHER, "checkpoint": str(path)})
    cfg = validate(
        {
            "root": str(root),
            "experiment": "bench",
            "data": {
                "source": "synthetic",
                "rows_per_part": 512,
                "synthetic": {"train": n_images, "test": 256, "num_classes": CLASSES, "size": 32},
            },
            "views": {"count": 1},
            "teachers": files,
            "student": {"arch": STUDENT},
            "cache": {"features": "fp16", "eval_test": False},
            "train": {
                "epochs": epochs,
                "batch_size": batch,
                "milestones": [],
                "export": False,
                "shuffle_buffer": 0,
                "amp": amp if device == "cuda" else "off",
                "nan_check_every": 1000,
            },
            "scaling": {
                "num_workers": 1,
                "cpus_per_worker": 1,
                "torch_threads": threads,
                "use_gpu": device == "cuda",
            },
            "tracking": {"tensorboard": False, "progress_seconds": 0},
        }
    )
    if profile_dir:  # read by every Ray Train worker (they inherit the local cluster's environment)
        os.environ["CAMKD_PROFILE_DIR"] = os.path.abspath(profile_dir)
    # Ray as `run.py` starts it on one machine; no dashboard: nothing here needs the state API, and a GPU machine
    # may lack ray[default]'s packages.
    options = local_ray_options(max(2, threads), 1 if device == "cuda" else None)
    ray.init(**options, log_to_driver=False, include_dashboard=False)
    quiet_ray_data()
    meta = ingest(cfg, log=lambda *_: None)
    precompute.run_stage(cfg, log=lambda *_: None)
    out, backend = {}, "none"
    runs = [("ce", {"strategy.name": "ce"}), ("camkd", {})]
    runs += [(f"camkd+{v}", RAY_VARIANTS[v]) for v in variants]
    for strategy, updates in runs:
        s = driver.fit(
            with_updates(cfg, updates),
            meta,
            str(root / "runs"),
            strategy.replace("+", "-"),
            log=lambda *_: None,
        ).model_dump()
        backend = s["backend"]
        # Steady state: after the reader's start (epoch 1) and, with torch.compile, after its second compile
        # (epoch 2: the epoch number becomes dynamic and CA-MKD's warm-up branch flips).
        # The profiled epoch (2, with --profile-dir) is left out too.
        warm = (2 if updates.get("train.compile") else 1) + (1 if profile_dir else 0)
        if epochs <= warm:
            raise SystemExit(f"{strategy}: --ray-epochs must exceed {warm} to leave a steady-state epoch")
        history = s["history"][warm:]
        steady = [h["samples_per_s"] for h in history]
        out[strategy] = sum(steady) / len(steady)
        out[f"{strategy}_input_wait_s_per_epoch"] = sum(h["input_wait_seconds"] for h in history) / len(
            steady
        )
        print(f"  Ray path {strategy}: {out[strategy]:.1f} samples/s ({s['backend']})", flush=True)
    ray.shutdown()
    return out, backend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10, help="steps per timed round (online: a third)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ray-images", type=int, default=1536)
    ap.add_argument("--ray-epochs", type=int, default=3)
    ap.add_argument("--skip-ray", action="store_true", help="in-memory only (e.g. on a machine without Ray)")
    ap.add_argument(
        "--ray-variants",
        default="",
        help=f"Ray-path CA-MKD variants, comma-separated: {', '.join(RAY_VARIANTS)}",
    )
    ap.add_argument(
        "--profile-dir",
        default=None,
        help="torch.profiler tables + traces of 20 steps of epoch 2 of every Ray-path run, written here",
    )
    ap.add_argument("--modes", default="ce,cached,online", help="in-memory setups to time (comma-separated)")
    ap.add_argument(
        "--opts",
        default="",
        help="in-memory step options, comma-separated: channels_last (GPU), compile (the whole step as one "
        "torch.compile graph, as train.compile), cudagraphs (the same with mode='reduce-overhead': CUDA graphs)",
    )
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    opts = frozenset(o for o in args.opts.split(",") if o)
    unknown = [m for m in modes if m not in ("ce", "cached", "online")] + sorted(
        opts - {"channels_last", "compile", "cudagraphs"}
    )
    variants = tuple(v for v in args.ray_variants.split(",") if v)
    unknown += [v for v in variants if v not in RAY_VARIANTS]
    if not args.skip_ray and not {"ce", "cached"} <= set(modes):
        unknown.append("(the Ray path needs --modes with ce and cached, or --skip-ray)")
    if unknown or not modes:
        ap.error(
            f"unknown or missing entries {unknown or ['--modes is empty']}; --modes: ce,cached,online; "
            f"--opts: channels_last,compile,cudagraphs; --ray-variants: {','.join(RAY_VARIANTS)}"
        )
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = amp_dtype(args.amp, device)
    torch.manual_seed(0)
    teachers = [models.create(TEACHER, CLASSES, 3).to(device).eval() for _ in range(K)]
    n = args.batch * 8
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, CLASSES, (n,), device=device)
    with torch.no_grad():
        x = normalize(images, MEAN, STD)
        fm = [t.forward_features(x) for t in teachers]
        cached = (
            torch.stack([t.forward_head(f) for t, f in zip(teachers, fm)]).half(),
            [f.half() for f in fm],
        )
    rates = in_memory_rates(
        images, labels, teachers, cached, args.batch, args.steps, args.rounds, device, dtype, modes, opts
    )
    result = {
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {args.threads} threads)",
        "amp": args.amp,
        "opts": sorted(opts),
        "batch": args.batch,
        "steps_x_rounds": [args.steps, args.rounds],
        "in_memory_samples_per_s": {k: round(v, 1) for k, v in rates.items()},
    }
    if "cached" in rates and "ce" in rates:
        result["cached_over_ce"] = round(rates["cached"] / rates["ce"], 3)
    if "cached" in rates and "online" in rates:
        result["cached_over_online"] = round(rates["cached"] / rates["online"], 2)
    label = f"in-memory ({result['device']}, amp {args.amp}{', ' + ', '.join(sorted(opts)) if opts else ''})"
    print(f"{label:<52} samples/s")
    for k, v in rates.items():
        print(f"  {k:<50} {v:10.1f}")
    if not args.skip_ray:
        ray_rates, result["ray_backend"] = ray_path(
            args.ray_images,
            args.ray_epochs,
            args.threads,
            args.batch,
            args.device,
            args.amp,
            variants,
            args.profile_dir,
        )
        result["ray_samples_per_s"] = {k: round(v, 1) for k, v in ray_rates.items()}
        result["ray_over_in_memory_cached"] = round(ray_rates["camkd"] / rates["cached"], 3)
        result["ray_over_in_memory_ce"] = round(ray_rates["ce"] / rates["ce"], 3)
        print(
            f"Ray Train + Ray Data (steady state: epochs 2.., with torch.compile 3..; process group: {result['ray_backend']})"
        )
        for k in ["ce", "camkd"] + [f"camkd+{v}" for v in variants]:
            print(
                f"  {k:<50} {ray_rates[k]:10.1f}   (input wait {ray_rates[k + '_input_wait_s_per_epoch']:.2f} s/epoch)"
            )
    print("ratios (goal)")
    if "cached_over_ce" in result:
        print(f"  cached CA-MKD ÷ CE-only            {result['cached_over_ce']:.3f}   (≥ 0.90)")
    if "cached_over_online" in result:
        print(f"  cached CA-MKD ÷ online CA-MKD      {result['cached_over_online']:.2f}    (≥ 5)")
    if "ray_over_in_memory_cached" in result:
        print(
            f"  Ray path ÷ in-memory (CA-MKD)      {result['ray_over_in_memory_cached']:.3f}   (≥ 0.90 CPU, ≥ 0.8 GPU)"
        )
        print(f"  Ray path ÷ in-memory (CE)          {result['ray_over_in_memory_ce']:.3f}")
        for v in variants:
            print(
                f"  Ray CA-MKD+{v} ÷ Ray CA-MKD{'':<{22 - len(v)}} {ray_rates[f'camkd+{v}'] / ray_rates['camkd']:.3f}"
            )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
