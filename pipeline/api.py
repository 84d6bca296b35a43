"""The Python API, for notebooks and scripts: each stage is a function that takes a validated config and returns a
typed result. The CLI (`camkd`, `python pipeline/run.py`) calls the same stages.

    from pipeline import api
    cfg = api.load("configs/quickstart.yaml", {"train.epochs": 3})
    meta = api.ingest(cfg)
    api.train_teachers(cfg)
    api.precompute(cfg)
    run = api.train(cfg)
    print(run.best_val_top1, run.test_top1, run.history[-1]["weight/good-a"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from pipeline.config import Config, load_config
from pipeline.data.ingest import DatasetMeta
from pipeline.train.summary import RunSummary


class Result(BaseModel):
    """A stage's summary as a typed object; every field of its summary.json is an attribute."""

    model_config = ConfigDict(extra="allow")


class TeacherResult(Result):
    name: str
    arch: str
    id: str
    checkpoint: str
    sha256: str
    test_top1: float | None = None


class PrecomputeResult(Result):
    dataset: str
    teachers: list[dict[str, Any]]
    renders: int


class SweepResult(Result):
    leaderboard: list[dict[str, Any]]
    report_dir: str
    plots: dict[str, str]


def load(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """A config from a YAML file (or the defaults) with dotted-path overrides, validated once."""
    return load_config(path, [f"{k}={_yaml(v)}" for k, v in (overrides or {}).items()])


def _yaml(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def ingest(cfg: Config, verify: bool = False) -> DatasetMeta:
    """Read the data source into Parquet image parts (a no-op when done; `verify` re-hashes every source file)."""
    from pipeline.data.ingest import ingest as run

    return run(cfg, verify=verify)


def train_teachers(cfg: Config) -> list[TeacherResult]:
    from pipeline.ops.runtime import ensure_ray
    from pipeline.teachers import stage as teacher_stage

    ensure_ray(cfg)
    return [TeacherResult.model_validate(r) for r in teacher_stage.run_stage(cfg)]


def precompute(cfg: Config, overwrite: bool = False, verify: int | None = None) -> PrecomputeResult:
    """Bring every teacher's cache up to date; with `verify` = N, then check it on N sampled (image, view) pairs per
    teacher (`verify_cache`)."""
    from pipeline.cache import precompute as stage
    from pipeline.ops.runtime import ensure_ray

    ensure_ray(cfg)
    summary = stage.run_stage(cfg, overwrite=overwrite)
    if verify is not None:
        summary["verify"] = verify_cache(cfg, verify)
    return PrecomputeResult.model_validate(summary)


def verify_cache(cfg: Config, samples: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Check the cache against its teachers: `samples` (image, view) pairs per teacher (default 256, seeded) rendered
    as training renders them, run through the teachers as precompute runs them, compared within each stored
    format's bound. Raises `CacheMismatch` (a CacheError) naming the teacher, part, view and rows."""
    from pipeline.cache.verify import DEFAULT_SAMPLES
    from pipeline.cache.verify import verify_cache as run
    from pipeline.config import ConfigError
    from pipeline.ops.runtime import ensure_ray

    samples = DEFAULT_SAMPLES if samples is None else samples
    if samples < 1:
        raise ConfigError(
            f"--verify {samples}: give the number of (image, view) pairs to check per teacher, at least 1 "
            f"(default {DEFAULT_SAMPLES})"
        )
    ensure_ray(cfg)
    return run(cfg, samples, seed)


def train(cfg: Config, name: str | None = None) -> RunSummary:
    from pipeline.train import driver as stage

    return stage.run_stage(cfg, name=name)


def tune(cfg: Config) -> SweepResult:
    from pipeline.sweep import tune as stage

    return SweepResult.model_validate(stage.run_stage(cfg))


def rank(cfg: Config) -> dict[str, Any]:
    """Rank teacher subsets from the cache alone (the sweep's subsets, else every non-empty one); no Ray."""
    from pipeline.sweep import rank, tune

    return rank.run_stage(cfg, tune.ranking_subsets(cfg))


def rank_sweep(cfg: Config) -> dict[str, Any]:
    """Rank the teacher subsets this sweep would train, into the sweep's folder; trains nothing."""
    from pipeline.sweep.tune import rank_only

    return rank_only(cfg)


def report(cfg: Config, bench=None, budget_ms: float | None = None, budget_params: int | None = None) -> dict:
    """Regenerate the sweep's leaderboard and plots and the quickstart report from stored results."""
    from pipeline.config import ConfigError
    from pipeline.report.leaderboard import write_sweep_report
    from pipeline.report.quickstart import regenerate_report
    from pipeline.store import storage
    from pipeline.sweep.tune import sweep_dir

    done = {}
    if storage.exists(storage.join(sweep_dir(cfg), "tune")):
        done["sweep"] = write_sweep_report(
            cfg, sweep_dir(cfg), bench=bench, budget_ms=budget_ms, budget_params=budget_params
        )
    quick = regenerate_report(cfg)
    if quick is not None:
        done["quickstart"] = quick
    if not done:
        raise ConfigError(
            f"nothing to report under {cfg.root}/runs/{cfg.experiment}: run `tune` or `quickstart` first "
            "(or pass the same --config/--set root=... they used)"
        )
    return done


def doctor(cfg: Config, seconds: float = 40.0, verify: int | None = None) -> dict[str, Any]:
    """Measure storage, the reader and the step where training runs; name the bottleneck. With `verify` = N, first
    check the cache against its teachers on N sampled (image, view) pairs per teacher (`verify_cache`)."""
    from pipeline.ops.doctor import run_stage

    checked = verify_cache(cfg, verify) if verify is not None else None
    summary = run_stage(cfg, seconds=seconds)
    if checked is not None:
        summary["verify"] = checked
    return summary


def quickstart(cfg: Config, overwrite: bool = False) -> dict[str, Any]:
    """The whole pipeline on Fashion-MNIST and its report (`cfg` from `quickstart_config`)."""
    from pipeline.report.quickstart import run_quickstart

    return run_quickstart(cfg, overwrite=overwrite)


def run_all(cfg: Config, overwrite: bool = False) -> dict[str, Any]:
    """ingest → teachers → precompute → train, then the sweep and its report when `tune` is configured."""
    ingest(cfg)
    if cfg.teachers:
        train_teachers(cfg)
        precompute(cfg, overwrite=overwrite)
    result: dict[str, Any] = {"train": train(cfg)}
    if cfg.tune.teacher_sets or cfg.tune.teacher_set_sizes:
        result["tune"] = tune(cfg)
    return result
