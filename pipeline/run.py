"""camkd-ray's one command line: `python pipeline/run.py <stage> --config FILE [--set a.b=value ...]`.

Runs the same locally (starts Ray) and under `ray job submit -- python pipeline/run.py ...` (attaches to the
cluster). The config is validated here, once; stages receive typed objects. Errors a user can fix are printed as
one paragraph (no traceback) and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (
    None,
    "",
):  # `python pipeline/run.py` (also from a Ray job's working dir): import the repo, and
    # not this folder, whose stage packages (data, train, ...) would otherwise shadow top-level names
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import yaml

from pipeline import api
from pipeline.config import Config, ConfigError, load_config


@dataclass(frozen=True)
class Stage:
    """One stage of the CLI: its help, the API call it makes, and the flags of its own (beyond the common ones)."""

    help: str
    run: Callable[[Config, argparse.Namespace], object]
    flags: tuple[Callable[[argparse.ArgumentParser], None], ...] = ()


def _overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace a stale cache instead of refusing")


def _name(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", help="run name under <root>/runs/<experiment>/ (default: from the config)")


def _seconds(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--seconds", type=float, default=40.0, help="how long the reader is measured (the step: half of it)"
    )


def _verify(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--verify",
        action="store_true",
        help="re-hash every source file (normally an unchanged size and mtime means unchanged content)",
    )


def _verify_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--verify",
        nargs="?",
        type=int,
        const=True,  # a bare --verify: the default N
        metavar="N",
        help="check the cache against its teachers: N sampled (image, view) pairs per teacher (default 256) "
        "rendered as training renders them, run through the teachers as precompute runs them and compared within "
        "each stored format's bound; exits 2 naming the teacher, part, view and rows that differ",
    )


def _samples(a: argparse.Namespace) -> int | None:
    """--verify's N: None without the flag, the default for a bare --verify."""
    from pipeline.cache.verify import DEFAULT_SAMPLES

    return DEFAULT_SAMPLES if a.verify is True else a.verify


def _budgets(p: argparse.ArgumentParser) -> None:
    add_bench_arguments(p)
    p.add_argument(
        "--budget-ms",
        type=float,
        metavar="MS",
        help="name the best finished student whose CPU batch-1 p50 latency is at most MS",
    )
    p.add_argument(
        "--budget-params",
        type=int,
        metavar="N",
        help="name the best finished student with at most N parameters",
    )


def _cache_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", help="the root the cache was built under (default: the config's root)")


def _rank_only(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rank-only",
        action="store_true",
        help="rank the teacher subsets this sweep would train, from the cache; write rank.json and rank.md into "
        "the sweep folder; train nothing",
    )


def _quickstart_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", help="output folder (default ./camkd-runs)")
    p.add_argument("--full", action="store_true", help="the whole dataset and more epochs (much longer)")


def _report(cfg: Config, a: argparse.Namespace) -> object:
    return api.report(cfg, bench_settings(a), budget_ms=a.budget_ms, budget_params=a.budget_params)


STAGES: dict[str, Stage] = {
    "ingest": Stage(
        "read the data source into Parquet image parts under <root>/datasets (a no-op when done)",
        lambda cfg, a: api.ingest(cfg, verify=a.verify),
        (_verify,),
    ),
    "teachers": Stage(
        "train the teachers that have `train:` and check that imported checkpoints load",
        lambda cfg, a: api.train_teachers(cfg),
    ),
    "precompute": Stage(
        "run each teacher once over all training views into the Parquet cache (resumable)",
        lambda cfg, a: api.precompute(cfg, overwrite=a.overwrite, verify=_samples(a)),
        (_overwrite, _verify_cache),
    ),
    "train": Stage(
        "train one student with strategy.name from the cache (Ray Train; resumes; skips finished runs)",
        lambda cfg, a: api.train(cfg, name=a.name),
        (_name,),
    ),
    "rank": Stage(
        "rank teacher subsets from the cache alone, in seconds (ensemble / oracle top-1 on the validation "
        "hold-out, disagreement, CA-MKD weights): tune's subsets, else every non-empty one; trains nothing",
        lambda cfg, a: api.rank(cfg),
        (_cache_root,),
    ),
    "tune": Stage(
        "sweep teacher subsets / strategies / hyper-parameters with Ray Tune + ASHA (resumable)",
        lambda cfg, a: api.rank_sweep(cfg) if a.rank_only else api.tune(cfg),
        (_rank_only,),
    ),
    "report": Stage(
        "regenerate the sweep leaderboard and plots (and the quickstart report) from stored results",
        _report,
        (_budgets,),
    ),
    "doctor": Stage(
        "measure storage from every node, the reader and the student step like one worker; name the "
        "bottleneck and what to change (~2 minutes; run it first on a new cluster)",
        lambda cfg, a: api.doctor(cfg, seconds=a.seconds, verify=_samples(a)),
        (_seconds, _verify_cache),
    ),
    "quickstart": Stage(
        "the whole pipeline on Fashion-MNIST in minutes: 3 teachers, 4 students, a sweep, a report",
        lambda cfg, a: api.quickstart(cfg, overwrite=a.overwrite),
        (_overwrite, _quickstart_flags),
    ),
    "all": Stage(
        "ingest → teachers → precompute → train → tune and its report (when tune is configured)",
        lambda cfg, a: api.run_all(cfg, overwrite=a.overwrite),
        (_overwrite,),
    ),
}


def program_name() -> str:
    """`camkd` when run as the installed console script, else `python pipeline/run.py` (the same CLI)."""
    return "camkd" if Path(sys.argv[0]).name == "camkd" else "python pipeline/run.py"


def _common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", "-c", metavar="FILE", help="YAML config (see configs/); defaults apply without"
    )
    p.add_argument(
        "--set",
        "-s",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field by dotted path, e.g. --set train.epochs=5 (repeatable; VALUE is YAML)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and the plan; run nothing"
    )
    p.add_argument(
        "--rate",
        type=float,
        metavar="SAMPLES_PER_S",
        help="--dry-run: student samples/s per worker the read CPUs must sustain (default: the capacity model's "
        "rate for the config's device and data, docs/performance.md 'Capacity model')",
    )
    p.add_argument(
        "--address", help="Ray cluster address to attach to (default: RAY_ADDRESS, else start locally)"
    )


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    prog = prog or program_name()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="camkd-ray: precompute teacher knowledge once, then distill students (CA-MKD) on Ray. "
        "The same CLI is installed as the `camkd` command and runs as `python pipeline/run.py`.",
        epilog=f"Examples:\n  {prog} quickstart\n"
        f"  {prog} train --config configs/cifar100-resnet32x4x3-resnet8x4.yaml --set train.epochs=10\n"
        "  RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- "
        "python pipeline/run.py all --config configs/quickstart.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, stage in STAGES.items():
        p = sub.add_parser(name, help=stage.help, description=stage.help)
        _common_flags(p)
        for add in stage.flags:
            add(p)
    bench = sub.add_parser(
        "bench-student",
        help="measure a student file on this machine: parameters, MACs, CPU (and GPU) latency, throughput",
        description="Measure a student.pt that `train` wrote, on the machine this runs on: parameters, MACs per "
        "image, batch-1 p50/p90 latency and batch-N throughput on the CPU (and on the GPU when there is one).",
    )
    bench.add_argument("file", help="a student.pt (local path or URL, e.g. s3://bucket/runs/x/student.pt)")
    add_bench_arguments(bench)
    bench.add_argument(
        "--size", metavar="C,H,W", help="input size, for files that do not record theirs (e.g. 3,32,32)"
    )
    return parser


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads", type=int, default=1, help="CPU threads for the latency measurement (default 1)"
    )
    p.add_argument("--repeats", type=int, default=50, help="timed batch-1 forwards (default 50)")
    p.add_argument("--batch", type=int, default=64, help="batch size of the throughput figure (default 64)")


def bench_settings(args: argparse.Namespace):
    from pipeline.report.deploy import Bench

    for name in ("threads", "repeats", "batch"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    return Bench(threads=args.threads, repeats=args.repeats, batch=args.batch)


def bench_student(args: argparse.Namespace) -> dict:
    import json

    from pipeline.report.deploy import bench_file
    from pipeline.store import storage

    shape = None
    if args.size:
        try:
            shape = tuple(int(v) for v in args.size.split(","))
        except ValueError:
            shape = ()
        if len(shape) != 3 or min(shape) < 1:
            raise ConfigError(f"--size {args.size!r}: give channels,height,width, e.g. --size 3,32,32")
    result = bench_file(storage.normalize_url(args.file), bench_settings(args), shape)
    print(json.dumps(result, indent=1))
    return result


def resolve_config(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"ray.address={args.address}")
    if args.stage == "quickstart":
        from pipeline.report.quickstart import quickstart_config

        return quickstart_config(args.config, overrides, root=args.root, full=args.full)
    cfg = load_config(args.config, overrides)
    if getattr(args, "root", None):
        from pipeline.config import with_updates

        cfg = with_updates(cfg, {"root": args.root})
    return cfg


def dry_run(cfg: Config, stage: str, rate: float | None = None) -> None:
    from pipeline.store import storage

    print("# resolved config")
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip())
    print("\n# plan")
    meta = None
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):  # a cluster to describe: attach (cheap), run nothing
        from pipeline.ops.runtime import ensure_ray

        ensure_ray(cfg, log=lambda *_: None)
    try:
        with storage.one_attempt():
            meta = _plan_lines(cfg, stage)
    except Exception as e:  # the config is valid; storage may just not be reachable from this machine
        print(f"storage {cfg.root}: not reachable from here ({type(e).__name__}: {e}); the plan needs it")
    if stage in ("precompute", "all", "quickstart") and cfg.teachers:
        from pipeline.cache.precompute import dry_run_pool

        print(dry_run_pool(cfg))
    print("\n# capacity (model fed by benchmarks/input_pipeline.py; docs/performance.md 'Capacity model')")
    for line in capacity_lines(cfg, meta, rate):
        print(line)


def _plan_lines(cfg: Config, stage: str):
    from pipeline.cache import precompute
    from pipeline.data.ingest import find_dataset
    from pipeline.train.driver import run_name_for

    meta = find_dataset(cfg)
    print(
        f"dataset {cfg.data.dataset_name}: "
        + (f"ingested ({meta.name}-{meta.fingerprint})" if meta else "to ingest")
    )
    for t in cfg.teachers:
        kind = f"import {t.checkpoint}" if t.checkpoint else f"train ({t.train.epochs} epochs)"
        print(f"teacher {t.name} [{t.arch}]: {kind}")
    if stage in ("precompute", "train", "tune", "all", "quickstart") and cfg.teachers:
        for line in precompute.plan_stage(cfg):
            print(line)
    if stage in ("train", "all"):
        print(f"train: run {run_name_for(cfg)} → {cfg.root}/runs/{cfg.experiment}/")
    if stage in ("tune", "all", "quickstart") and (cfg.tune.teacher_sets or cfg.tune.teacher_set_sizes):
        from pipeline.sweep.tune import arms

        print(
            f"tune: {len(arms(cfg))} arm(s): "
            + ", ".join(f"{a['strategy']}[{'+'.join(a['teachers'])}]" for a in arms(cfg))
        )
        if cfg.tune.keep_best_subsets is not None:
            print(
                f"tune: tune.keep_best_subsets {cfg.tune.keep_best_subsets}: only the best-ranked teacher subsets "
                "are swept (ranked from the cache first; `tune --rank-only` shows the ranking)"
            )
    if stage == "rank":
        from pipeline.sweep.rank import rank_dir
        from pipeline.sweep.tune import ranking_subsets

        subsets = ranking_subsets(cfg)
        print(f"rank: {len(subsets)} teacher subset(s) from the cache → {rank_dir(cfg)}")
    return meta


def capacity_lines(cfg: Config, meta, rate: float | None) -> list[str]:
    from pipeline.ops import capacity

    e = capacity.estimate(cfg, meta, rate, capacity.probe_shapes(cfg, meta))
    return e.lines(cfg) + (capacity.precompute_lines(e) if cfg.teachers else [])


def run(args: argparse.Namespace) -> object:
    if args.stage == "bench-student":
        return bench_student(args)
    cfg = resolve_config(args)
    if args.dry_run:
        dry_run(cfg, args.stage, args.rate)
        return None
    return STAGES[args.stage].run(cfg, args)


def user_errors() -> tuple[type[BaseException], ...]:
    from pipeline.cache.layout import CacheError
    from pipeline.data.ingest import IngestError
    from pipeline.ops.runtime import ClusterError
    from pipeline.store.storage import StorageError
    from pipeline.teachers.checkpoints import TeacherError
    from pipeline.train.driver import TrainingError

    return (ConfigError, IngestError, TeacherError, CacheError, TrainingError, ClusterError, StorageError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
