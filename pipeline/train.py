"""Ray Train student training, the driver side: plan a run, build the TorchTrainer, fit, export.

`make_plan` resolves and checks everything (dataset, teachers, caches) before any worker starts; the workers run
`pipeline.worker.train_loop_per_worker` on that plan. A killed worker restarts the group from the last
checkpoint; re-running the same command resumes, and a finished run is not trained again. `online` mode runs the
teachers in the loop on the same views instead of reading the cache.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from camkd import models, strategy_class
from pipeline import storage, teachers
from pipeline.cache import (
    ReadPlan,
    TeacherSource,
    build_datasets,
    check_manifest,
    check_parts_present,
    load_manifest,
)
from pipeline.config import Config, bind_config
from pipeline.ingest import DatasetMeta, require_dataset
from pipeline.views import make_view_spec, view_for_epoch
from pipeline.worker import (
    CHECKPOINT_PREFIX,
    FAILURE_FILE,
    RUN_FILE,
    STATE_FILE,
    SUMMARY_FILE,
    TrainPlan,
    train_loop_per_worker,
)


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must act on (non-finite loss, failed workers, bad setup)."""


def run_name_for(cfg: Config) -> str:
    s = cfg.strategy
    names = "+".join(t.name for t in cfg.chosen_teachers()) if strategy_class(s.name).min_teachers else ""
    return "-".join(x for x in (cfg.student.arch, s.name, names, "online" if s.mode == "online" else "") if x)


def make_plan(cfg: Config, meta: DatasetMeta, run_dir: str, log=print) -> TrainPlan:
    """Resolve and validate everything before any worker starts (stale caches, missing parts, bad teachers)."""
    cls = strategy_class(cfg.strategy.name)
    spec = make_view_spec(cfg, meta.encoding)
    dataset_dir = storage.dataset_dir(cfg.root, meta.name, meta.fingerprint)
    train_parts = [p.name for p in meta.split("train").parts]
    if cfg.train.limit_train is not None:
        keep, total = [], 0
        for p in meta.split("train").parts:
            if total >= cfg.train.limit_train:
                break
            keep.append(p.name)
            total += p.rows
        train_parts = keep
    plan = TrainPlan(
        cfg=cfg.model_dump(mode="json"),
        run_dir=run_dir,
        dataset_dir=dataset_dir,
        num_classes=meta.num_classes,
        channels=meta.channels,
        image_shape=meta.image_shape,
        spec=spec.to_dict(),
        train_parts=train_parts,
        test_parts=[p.name for p in meta.split("test").parts],
        needs_logits=cls.needs_logits,
        needs_features=cls.needs_features,
    )
    if cls.max_teachers == 0:
        return plan
    chosen = cfg.chosen_teachers()
    if not chosen:
        raise TrainingError(f"strategy {cls.name!r} needs teachers but none are configured (teachers: [...])")
    refs = teachers.resolve_all(cfg, meta.num_classes, meta.channels, [t.name for t in chosen])
    plan.teacher_names = [r.name for r in refs]
    plan.teacher_refs = [r.to_dict() for r in refs]
    plan.teacher_caches = [storage.teacher_cache_dir(cfg.root, meta.fingerprint, r.id) for r in refs]
    if cfg.strategy.mode == "cached":
        for ref, cdir in zip(refs, plan.teacher_caches):
            manifest = load_manifest(cdir, ref.name)
            check_manifest(manifest, cdir, ref.to_dict(), meta, spec, needs_features=cls.needs_features)
            check_parts_present(manifest, cdir)
            plan.manifests.append(manifest.model_dump())
    try:
        cls.check_teachers(plan.teacher_names)
    except ValueError as e:
        raise TrainingError(f"{e} (strategy.teachers selects them)") from None
    return plan


def build_trainer(cfg: Config, plan: TrainPlan, storage_path: str, name: str, callbacks: list | None = None):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    read = ReadPlan(
        dataset_dir=plan.dataset_dir,
        split="train",
        image_shape=tuple(plan.image_shape) if plan.image_shape else None,
        spec=plan.spec,
        teachers=tuple(
            TeacherSource(n, c, m) for n, c, m in zip(plan.teacher_names, plan.teacher_caches, plan.manifests)
        )
        if cfg.strategy.mode == "cached"
        else (),
        logits=plan.needs_logits and cfg.strategy.mode == "cached",
        features=plan.needs_features and cfg.strategy.mode == "cached",
    )
    views = sorted({view_for_epoch(e, cfg.views.count) for e in range(cfg.train.epochs)})
    datasets = build_datasets(read, plan.train_parts, views, s.read_cpus)
    test_read = ReadPlan(read.dataset_dir, "test", read.image_shape, read.spec)
    datasets.update(build_datasets(test_read, plan.test_parts, None, s.read_cpus))
    fs, path = storage.pyarrow_fs(storage_path)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": asdict(plan)},
        scaling_config=ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=callbacks,
            logging_config=LoggingConfig(log_level="WARNING"),  # our per-epoch line replaces its report dumps
        ),
        datasets=datasets,
        dataset_config=_data_config(cfg.train.deterministic),
    )


def _data_config(deterministic: bool):
    from ray.train import DataConfig

    class ExactEvalDataConfig(DataConfig):
        """Training views are split equally (DDP needs the same step count on every worker); the test split is
        split without dropping rows, so evaluation sees every test image exactly once across the workers.
        `deterministic` keeps Ray Data's row order, so a run (and a resumed run) sees the same batches."""

        def _resolve_execution_options(self, dataset_name):
            options = super()._resolve_execution_options(dataset_name)
            options.preserve_order = deterministic
            return options

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            train_sets = {k: v for k, v in datasets.items() if k != "test"}
            output = super().configure(train_sets, world_size, worker_handles, worker_node_ids, **kwargs)
            if "test" in datasets:
                test = datasets["test"]
                if test.name is None:
                    test.set_name("test")
                test = test.copy(test)
                test.context.execution_options = self._resolve_execution_options("test")
                hints = worker_node_ids if self._enable_shard_locality else None
                for i, split in enumerate(
                    test.streaming_split(world_size, equal=False, locality_hints=hints)
                ):
                    output[i]["test"] = split
            return output

    return ExactEvalDataConfig()


RESUME_NEUTRAL = ("ray", "tune", "train.max_failures", "scaling.check_resources", "train.export")


def _check_same_run(run_dir: str, cfg: Config) -> None:
    bind_config(
        storage.join(run_dir, RUN_FILE),
        cfg,
        RESUME_NEUTRAL,
        f"run {run_dir}",
        "Pass another --name (or experiment), or delete that folder to start over",
    )


def checkpointed_epochs(run_dir: str) -> int:
    """The last epoch that has a checkpoint under `run_dir` (0 when none): where a resumed run starts."""
    epochs = [
        int(d[len(CHECKPOINT_PREFIX) :])
        for d in storage.listdir(run_dir)
        if d.startswith(CHECKPOINT_PREFIX) and d[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return max(epochs, default=0)


def fit(
    cfg: Config, meta: DatasetMeta, storage_path: str, name: str, callbacks: list | None = None, log=print
) -> dict[str, Any]:
    """Train (or resume, or skip if finished) one run at `<storage_path>/<name>`; returns its summary."""
    from ray.train import TrainingFailedError

    from pipeline.runtime import check_resources, ensure_ray

    run_dir = storage.join(storage_path, name)
    summary_url = storage.join(run_dir, SUMMARY_FILE)
    if storage.exists(summary_url):
        summary = storage.read_json(summary_url)
        if summary.get("status") == "finished":
            log(
                f"[train] {name}: already finished (best val top-1 {summary['best_val_top1']:.4f}); "
                f"summary at {summary_url}. Delete {run_dir} to train it again"
            )
            return summary
    ensure_ray(cfg, log=log)
    check_resources(cfg)
    storage.check_writable(run_dir)
    _check_same_run(run_dir, cfg)
    plan = make_plan(cfg, meta, run_dir, log=log)
    failure_url = storage.join(run_dir, FAILURE_FILE)
    storage.remove(failure_url)
    trainer = build_trainer(cfg, plan, storage_path, name, callbacks)
    log(
        f"[train] {name}: {cfg.strategy.name} ({cfg.strategy.mode}) {cfg.student.arch} ← "
        f"{plan.teacher_names or 'no teachers'}; {cfg.train.epochs} epochs, {cfg.scaling.num_workers} worker(s) "
        f"→ {run_dir}"
    )
    started = time.time()
    try:
        result = trainer.fit()
    except TrainingFailedError as e:
        raise TrainingError(
            f"training {name} failed after {cfg.train.max_failures} restart(s): {e}"
        ) from None
    if storage.exists(failure_url):
        reason = storage.read_json(failure_url)["reason"]
        last = result.checkpoint.path if result.checkpoint else "none"
        raise TrainingError(f"training {name} stopped: {reason}. The last good checkpoint is kept: {last}")
    if result.checkpoint is None:
        raise TrainingError(f"training {name} ended without a checkpoint; see the Ray logs above")
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    history = state["history"]
    summary = {
        "status": "finished",
        "name": name,
        "run_dir": run_dir,
        "strategy": cfg.strategy.name,
        "mode": cfg.strategy.mode,
        "student": cfg.student.arch,
        "teachers": plan.teacher_names,
        "seed": cfg.train.seed,
        "epochs": len(history),
        "best_val_top1": max(h["val_top1"] for h in history),
        "final_val_top1": history[-1]["val_top1"],
        "final_val_top5": history[-1]["val_top5"],
        "mean_samples_per_s": float(np.mean([h["samples_per_s"] for h in history])),
        "wall_seconds": round(time.time() - started, 1),
        "checkpoint": result.checkpoint.path,
        "workers": next((h["workers"] for h in reversed(history) if "workers" in h), []),
        "resumes": history[-1].get("resumes", 0),
        "history": history,
    }
    if cfg.train.export:
        summary["exports"] = export_student(cfg, plan, state["distiller"], run_dir, log=log)
    storage.write_json(summary_url, summary)
    log(
        f"[train] {name}: best val top-1 {summary['best_val_top1']:.4f} after {summary['epochs']} epochs "
        f"({summary['wall_seconds']:.0f} s); summary at {summary_url}"
    )
    return summary


def export_student(
    cfg: Config, plan: TrainPlan, distiller_state: dict, run_dir: str, log=print
) -> dict[str, str]:
    """student.pt (state_dict + config, importable as a teacher) and student.pt2 (torch.export, for serving)."""
    student = models.create(cfg.student.arch, plan.num_classes, plan.channels)
    student.load_state_dict(
        {k[len("student.") :]: v for k, v in distiller_state.items() if k.startswith("student.")}
    )
    student.eval()
    extra = {"normalization": {"mean": plan.spec["mean"], "std": plan.spec["std"]}, "config": plan.cfg}
    pt_url = storage.join(run_dir, "student.pt")
    teachers.save_model_file(pt_url, student, extra)
    out = {"state_dict": pt_url}
    h, w = plan.image_shape[:2] if plan.image_shape else (plan.spec["size"], plan.spec["size"])
    example = torch.zeros(2, plan.channels, h, w)
    try:
        batch = torch.export.Dim("batch", min=1, max=65536)
        program = torch.export.export(student, (example,), dynamic_shapes=({0: batch},))
        buf = io.BytesIO()
        torch.export.save(program, buf)
        url = storage.join(run_dir, "student.pt2")
        storage.write_bytes_atomic(url, buf.getvalue())
        out["torch_export"] = url
    except Exception as e:  # an architecture torch.export cannot trace: fall back to TorchScript
        log(f"[train] torch.export failed ({type(e).__name__}: {e}); writing TorchScript instead")
        buf = io.BytesIO()
        torch.jit.save(torch.jit.trace(student, example), buf)
        url = storage.join(run_dir, "student.torchscript.pt")
        storage.write_bytes_atomic(url, buf.getvalue())
        out["torchscript"] = url
    return out


def run_stage(cfg: Config, name: str | None = None, log=print) -> dict[str, Any]:
    """The `train` stage: one student run under `<root>/runs/<experiment>/<name>`."""
    meta = require_dataset(cfg, log=log)
    return fit(cfg, meta, storage.runs_dir(cfg.root, cfg.experiment), name or run_name_for(cfg), log=log)
