"""What the workers of a training run need, resolved and validated on the driver (`pipeline/train/driver.py:
make_plan`) and handed to every worker: the data's layout, the rows of each split, the teachers and their caches.
Picklable; never imports Ray, never resolves configs, teachers or caches itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.config import Config, validate
from pipeline.data import preprocessing
from pipeline.data.preprocessing import Preprocessing
from pipeline.data.views import ViewSpec
from pipeline.teachers import checkpoints
from pipeline.train.batches import ReaderOptions
from pipeline.train.reader import ReadPlan, TeacherSource


@dataclass
class TrainPlan:
    """Everything a worker needs, resolved and validated on the driver (picklable)."""

    cfg: dict[str, Any]
    run_dir: str
    dataset_dir: str
    num_classes: int
    channels: int
    image_shape: list[int] | None
    spec: dict[str, Any]
    group_rows: int
    train_units: list[dict[str, Any]]  # row-group Slices of the training rows
    val_split: str  # "train" (the hold-out) or "test" (data.val_fraction 0)
    val_slices: list[dict[str, Any]]
    test_slices: list[dict[str, Any]]
    teacher_names: list[str] = field(default_factory=list)
    teacher_refs: list[dict[str, Any]] = field(default_factory=list)
    teacher_dirs: list[str] = field(default_factory=list)  # where head.pt lives
    teacher_stores: list[str] = field(default_factory=list)
    manifests: list[dict[str, Any]] = field(default_factory=list)
    needs_logits: bool = False
    needs_features: bool = False
    read_tasks: int = 1  # Ray Data read tasks per worker: scaling.read_tasks, else the capacity model's
    read_scope: str = ""  # this run's reader scope: open files are remembered within it
    preprocess: dict[str, Any] = field(default_factory=dict)  # the student's Preprocessing; {}: the views'

    @property
    def config(self) -> Config:
        return validate(self.cfg, "train plan")

    def student_preprocessing(self) -> Preprocessing:
        if self.preprocess:
            return Preprocessing.from_dict(self.preprocess)
        return Preprocessing(tuple(self.spec["mean"]), tuple(self.spec["std"]))

    def teacher_preprocessing(self, k: int) -> Preprocessing:
        return preprocessing.of_teacher(
            checkpoints.TeacherRef.from_dict(self.teacher_refs[k]), ViewSpec.from_dict(self.spec)
        )

    def read_plan(self, split: str, with_teachers: bool) -> ReadPlan:
        cfg = self.config
        cached = with_teachers and cfg.strategy.mode == "cached"
        return ReadPlan(
            dataset_dir=self.dataset_dir,
            split=split,
            image_shape=tuple(self.image_shape) if self.image_shape else None,
            spec=self.spec,
            group_rows=self.group_rows,
            num_classes=self.num_classes,
            teachers=tuple(
                TeacherSource.from_manifest(n, s, m)
                for n, s, m in zip(self.teacher_names, self.teacher_stores, self.manifests)
            )
            if cached
            else (),
            logits=cached and self.needs_logits,
            features=cached and self.needs_features,
            label_noise=cfg.train.label_noise if with_teachers else 0.0,
            noise_seed=cfg.train.seed,
            label_swaps=tuple(tuple(p) for p in cfg.train.label_swaps) if with_teachers else (),
            shuffle_seed=cfg.train.seed,
            read_ahead=cfg.scaling.read_ahead,
            read_ahead_bytes=cfg.scaling.read_ahead_mb * 2**20,
            retry_seconds=cfg.storage.retry_seconds,
            scope=self.read_scope or None,
        )

    def reader_options(self) -> ReaderOptions:
        s = self.config.scaling
        return ReaderOptions(s.reader, s.read_cpus, self.read_tasks, s.read_threads)

    @property
    def image_hw(self) -> tuple[int, int]:
        if self.image_shape:
            return int(self.image_shape[0]), int(self.image_shape[1])
        return int(self.spec["size"]), int(self.spec["size"])
