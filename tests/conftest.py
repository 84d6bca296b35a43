"""Shared fixtures: one session-scoped local Ray cluster, tiny real datasets and teacher checkpoints on disk."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from camkd import models  # noqa: E402
from pipeline.config import Config, validate  # noqa: E402
from pipeline.teachers import checkpoints  # noqa: E402

RAY_CPUS = 4  # logical CPUs for the test cluster (this machine has 2 cores; tasks are small)
# CA-MKD from t1 + t2 for 3 deterministic epochs on the tiny synthetic dataset. β is 5, not the paper's 50: with
# 8 steps per epoch the feature term at β = 50 moves the student faster than BatchNorm's running statistics can
# follow, so test accuracy collapses while training accuracy rises. These tests check the machinery; real data runs
# use β = 50.
CAMKD_RUN = {
    "strategy.name": "camkd",
    "strategy.teachers": ["t1", "t2"],
    "strategy.beta": 5.0,
    "train.epochs": 3,
    "train.deterministic": True,
}


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for the whole session; tests that need Ray take this fixture."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Ray Train's controller polls its workers every 2 s by default; polling faster only shortens the tail of the
    # many tiny runs in this suite (about 3 s each). Set before Ray starts so drivers and workers inherit it.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    from pipeline.ops.runtime import local_ray_options, quiet_ray_data

    # Started as run.py starts a local Ray (its worker-pool setting), with the dashboard.
    if not ray.is_initialized():
        ray.init(**local_ray_options(RAY_CPUS), include_dashboard=True, log_to_driver=False)

    quiet_ray_data()
    yield ray
    ray.shutdown()


def tiny_config(root: Path, **sections) -> Config:
    """A synthetic 10-class dataset of 32×32×3 images, small enough for seconds-long tests."""
    raw = {
        "root": str(root),
        "data": {
            "source": "synthetic",
            "rows_per_part": 64,
            "synthetic": {
                "train": 256,
                "test": 64,
                "num_classes": 10,
                "size": 32,
                "channels": 3,
                "noise": 0.3,
            },
        },
        "views": {"count": 2, "pad": 2},
        "cache": {"features": "fp16", "batch_size": 64, "actors": 1, "cpus_per_actor": 0.5},
        "student": {"arch": "resnet8"},
        "train": {"epochs": 2, "batch_size": 32, "milestones": [], "shuffle_buffer": 0, "max_failures": 1},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return validate(raw)


def make_teacher_file(
    path: Path, arch: str, num_classes: int = 10, in_chans: int = 3, seed: int = 0, epochs: int = 0
) -> Path:
    """A teacher checkpoint; with `epochs`, first trained with plain PyTorch on tiny_config's training split."""
    torch.manual_seed(seed)
    model = models.create(arch, num_classes, in_chans)
    if epochs:
        from camkd.training import normalize
        from pipeline.data.ingest import _synthetic_split

        split = _synthetic_split(tiny_config(path.parent).data, "train")
        x = torch.from_numpy(split.images).permute(0, 3, 1, 2).contiguous()
        y = torch.from_numpy(split.labels)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model.train()
        for _ in range(epochs):
            for i in range(0, len(y), 32):
                loss = torch.nn.functional.cross_entropy(
                    model(normalize(x[i : i + 32], [0.5], [0.25])), y[i : i + 32]
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
    checkpoints.save_model_file(str(path), model.eval())
    return path


@pytest.fixture(scope="session")
def teacher_files(tmp_path_factory) -> dict[str, Path]:
    """Three small teachers trained for a few epochs on the tiny dataset (t3 the weakest), as real files."""
    d = tmp_path_factory.mktemp("teachers")
    return {
        "t1": make_teacher_file(d / "t1.pt", "resnet8", seed=1, epochs=5),
        "t2": make_teacher_file(d / "t2.pt", "resnet14", seed=2, epochs=5),
        "t3": make_teacher_file(d / "t3.pt", "wrn_16_1", seed=3, epochs=1),
    }


def teacher_entries(files: dict[str, Path], names=("t1", "t2", "t3")) -> list[dict]:
    arch = {"t1": "resnet8", "t2": "resnet14", "t3": "wrn_16_1"}
    return [{"name": n, "arch": arch[n], "checkpoint": str(files[n])} for n in names]


@pytest.fixture(scope="session")
def cached(ray_cluster, teacher_files, tmp_path_factory):
    """A tiny ingested dataset with t1, t2 cached (fp16 features) and t3 cached (int8 features, top-3 logits).

    Returns (cfg for t1+t2, cfg for t3, dataset meta, precompute summary, precompute summary of t3).
    """
    from pipeline.cache import precompute
    from pipeline.data.ingest import ingest

    root = tmp_path_factory.mktemp("cache-root")
    cfg = tiny_config(root, teachers=teacher_entries(teacher_files, ("t1", "t2")))
    meta = ingest(cfg)
    summary = precompute.run_stage(cfg)
    cfg_q = tiny_config(
        root,
        teachers=teacher_entries(teacher_files, ("t3",)),
        cache={"features": "int8", "logits": "topk", "topk": 3, "actors": 1, "cpus_per_actor": 0.5},
    )
    summary_q = precompute.run_stage(cfg_q)
    return cfg, cfg_q, meta, summary, summary_q


@pytest.fixture(scope="session")
def undisturbed(cached, tmp_path_factory):
    """A deterministic 3-epoch CA-MKD run (t1 + t2 → resnet8), the reference for resume tests.

    The session's teachers have random weights, so β is lowered from 50 to keep their feature term from
    drowning the labels in 24 steps: the point here is the machinery, not the teachers' quality."""
    from pipeline.config import with_updates
    from pipeline.train import driver

    cfg = with_updates(
        cached[0],
        CAMKD_RUN,
    )
    out = tmp_path_factory.mktemp("runs")
    return cfg, out, driver.fit(cfg, cached[2], str(out), "w1")
