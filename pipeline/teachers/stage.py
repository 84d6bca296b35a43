"""The `teachers` stage: train the teachers that have `train:` (CE, with the student trainer) and check that
imported checkpoints load.

It sits above both `pipeline/train/driver.py` (the trainer it uses) and `pipeline/teachers/checkpoints.py` (checkpoint files and
teacher identity), so neither of those imports the other's stage.
"""

from __future__ import annotations

import io
import time
from typing import Any

import torch

from camkd import models
from pipeline.config import Config, TeacherConfig, with_updates
from pipeline.data import preprocessing
from pipeline.data.ingest import DatasetMeta, require_dataset
from pipeline.store import storage
from pipeline.teachers import checkpoints
from pipeline.train.driver import fit


def run_stage(cfg: Config, log=print) -> list[dict[str, Any]]:
    """Train the teachers that have `train:` and no checkpoint yet; check the imported ones load. Returns rows."""
    meta = require_dataset(cfg, log=log)
    rows = []
    for teacher in cfg.teachers:
        start = time.time()
        hint = preprocessing.pretrained_hint(teacher, meta.channels, cfg.data.normalization)
        if hint:
            log(f"[teachers] note: {hint}")
        if teacher.train is not None and not storage.exists(checkpoints.trained_checkpoint_url(cfg, teacher)):
            log(f"[teachers] training {teacher.name} ({teacher.arch}, {teacher.train.epochs} epochs)")
            train_teacher(cfg, teacher, meta, log=log)
        ref = checkpoints.resolve(
            cfg, teacher, meta.num_classes, meta.channels, data_hw=preprocessing.data_hw(cfg, meta)
        )
        checkpoints.build_model(
            ref
        )  # fails here, not in precompute, if the file does not fit the architecture
        info = checkpoints.teacher_info(cfg, teacher)
        rows.append(
            ref.to_dict() | {"test_top1": info.get("test_top1"), "seconds": round(time.time() - start, 1)}
        )
        log(f"[teachers] {teacher.name}: {ref.id} test_top1={info.get('test_top1')}")
    summary_url = storage.join(cfg.root, "teachers", "summary.json")
    storage.write_json(summary_url, {"teachers": rows})
    log(f"[teachers] summary: {summary_url}")
    return rows


def teacher_config(cfg: Config, teacher: TeacherConfig) -> Config:
    """The config that trains `teacher` with strategy ce (the same trainer as students), on inputs preprocessed as
    the teacher's always are (its own mean/std/input_size, else the dataset's)."""
    t = teacher.train
    assert t is not None
    return with_updates(
        cfg,
        {
            "student.arch": teacher.arch,
            "student.mean": teacher.mean,
            "student.std": teacher.std,
            "student.input_size": list(teacher.input_size) if teacher.input_size else None,
            "strategy.name": "ce",
            "strategy.mode": "cached",
            "strategy.teachers": None,
            "train.epochs": t.epochs,
            "train.lr": t.lr,
            "train.batch_size": t.batch_size,
            "train.label_noise": t.label_noise,
            "train.label_swaps": [list(p) for p in t.label_swaps],
            "train.limit_train": t.limit_train,
            "train.seed": t.seed,
            "train.export": False,  # the teacher file is student.pt; no torch.export artifact needed
            "train.milestones": [m for m in (int(t.epochs * 0.5), int(t.epochs * 0.75)) if 0 < m < t.epochs]
            if t.epochs >= 4
            else [],
            "tune": {},
        },
    )


def train_teacher(cfg: Config, teacher: TeacherConfig, meta: DatasetMeta, log=print) -> dict[str, Any]:
    """Train a teacher with CE and write `<root>/teachers/<name>/model.pt`, which precompute imports directly."""
    tcfg = teacher_config(cfg, teacher)
    tdir = storage.teachers_dir(cfg.root, teacher.name)
    summary = fit(tcfg, meta, tdir, "run", log=log)
    state = torch.load(io.BytesIO(storage.read_bytes(summary.exports["state_dict"])), weights_only=True)
    student = models.create(teacher.arch, meta.num_classes, meta.channels)
    student.load_state_dict(state["state_dict"])
    url = checkpoints.trained_checkpoint_url(cfg, teacher)
    sha = checkpoints.save_model_file(
        url, student, {"trained_by": "camkd-ray", "test_top1": summary.test_top1}
    )
    info = {
        "name": teacher.name,
        "arch": teacher.arch,
        "sha256": sha,
        "test_top1": summary.test_top1,
        "best_val_top1": summary.best_val_top1,
        "epochs": summary.epochs,
        "train": teacher.train.model_dump(),
        "checkpoint": url,
    }
    storage.write_json(storage.join(tdir, "teacher.json"), info)
    return info
