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


class RunSummary(Result):
    name: str
    run_dir: str
    strategy: str
    student: str
    teachers: list[str]
    epochs: int
    best_val_top1: float
    best_epoch: int
    test_top1: float | None = None
    params: int | None = None  # the exported student's cost: parameters, MACs per image, student.pt's bytes
    macs: int | None = None
    export_bytes: int | None = None
    history: list[dict[str, Any]]


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


def ingest(cfg: Config) -> DatasetMeta:
    from pipeline.data.ingest import ingest as run

    return run(cfg)


def train_teachers(cfg: Config) -> list[TeacherResult]:
    from pipeline.ops.runtime import ensure_ray
    from pipeline.teachers import stage as teacher_stage

    ensure_ray(cfg)
    return [TeacherResult.model_validate(r) for r in teacher_stage.run_stage(cfg)]


def precompute(cfg: Config, overwrite: bool = False) -> PrecomputeResult:
    from pipeline.cache import precompute as stage
    from pipeline.ops.runtime import ensure_ray

    ensure_ray(cfg)
    return PrecomputeResult.model_validate(stage.run_stage(cfg, overwrite=overwrite))


def train(cfg: Config, name: str | None = None) -> RunSummary:
    from pipeline.train import driver as stage

    return RunSummary.model_validate(stage.run_stage(cfg, name=name))


def tune(cfg: Config) -> SweepResult:
    from pipeline.sweep import tune as stage

    return SweepResult.model_validate(stage.run_stage(cfg))
