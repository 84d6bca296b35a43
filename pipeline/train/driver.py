"""Ray Train student training, the driver side: plan a run, build the TorchTrainer, fit, export.

`make_plan` resolves and checks everything (dataset, teachers, caches) before any worker starts; the workers run
`pipeline.train.worker.train_loop_per_worker` on that plan. A killed worker restarts the group from the last
checkpoint; re-running the same command resumes, and a finished run is not trained again. `online` mode runs the
teachers in the loop on the same views instead of reading the cache.
"""

from __future__ import annotations

import io
import re
import time
import uuid
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from camkd import models, strategy_class
from pipeline.cache.layout import (
    check_manifest_dataset,
    check_parts_present,
    check_rendering,
    find_store,
    output_format,
)
from pipeline.config import Config, ConfigError, bind_config
from pipeline.data import preprocessing
from pipeline.data.ingest import DatasetMeta, require_dataset
from pipeline.data.preprocessing import data_hw
from pipeline.data.render_probe import render_digest
from pipeline.data.views import make_view_spec, view_for_epoch
from pipeline.ops import capacity
from pipeline.store import storage
from pipeline.teachers import checkpoints
from pipeline.train.checkpoint import RunState
from pipeline.train.plan import TrainPlan
from pipeline.train.reader import Slice, row_group_slices, split_ranges
from pipeline.train.summary import RunSummary
from pipeline.train.worker import FAILURE_FILE, RUN_FILE, train_loop_per_worker


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must act on (non-finite loss, failed workers, bad setup)."""


# A run is a folder (local or object store) and a Ray Train run name: ASCII, no separators (default names look
# like "resnet8-camkd-good-a+good-b", "torchvision:resnet18-ce").
RUN_NAME_RE = r"[A-Za-z0-9_+:=-][A-Za-z0-9_.+:=-]{0,127}"


def run_name_for(cfg: Config) -> str:
    s = cfg.strategy
    names = "+".join(t.name for t in cfg.chosen_teachers()) if strategy_class(s.name).min_teachers else ""
    return "-".join(x for x in (cfg.student.arch, s.name, names, "online" if s.mode == "online" else "") if x)


def make_plan(cfg: Config, meta: DatasetMeta, run_dir: str, log=print) -> TrainPlan:
    """Resolve and validate everything before any worker starts (stale caches, missing parts, bad teachers)."""
    cls = strategy_class(cfg.strategy.name)
    spec = make_view_spec(cfg, meta.encoding)
    ranges = split_ranges(meta, cfg.data.val_fraction, cfg.train.limit_train)
    if ranges.train_end < cfg.train.batch_size:
        raise TrainingError(
            f"only {ranges.train_end} training rows (data.val_fraction={cfg.data.val_fraction}, "
            f"train.limit_train={cfg.train.limit_train}) for a global batch of {cfg.train.batch_size}; lower "
            "train.batch_size or hold out less"
        )
    plan = TrainPlan(
        cfg=cfg.model_dump(mode="json"),
        run_dir=run_dir,
        dataset_dir=storage.dataset_dir(cfg.root, meta.name, meta.fingerprint),
        num_classes=meta.num_classes,
        channels=meta.channels,
        image_shape=meta.image_shape,
        spec=spec.to_dict(),
        group_rows=meta.row_group_rows,
        train_units=[asdict(s) for s in row_group_slices(meta, "train", 0, ranges.train_end)],
        val_split=ranges.val_split,
        val_slices=[
            asdict(s) for s in row_group_slices(meta, ranges.val_split, ranges.val_lo, ranges.val_hi)
        ],
        test_slices=[asdict(s) for s in row_group_slices(meta, "test", 0, ranges.test_rows)],
        needs_logits=cls.needs_logits,
        needs_features=cls.needs_features,
    )
    plan.read_scope = uuid.uuid4().hex
    try:
        plan.preprocess = preprocessing.of_student(cfg, spec, meta.channels).to_dict()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cls.max_teachers == 0:
        _size_reader(cfg, plan, meta)
        return plan
    names = [t.name for t in cfg.chosen_teachers()]
    if not names:
        raise TrainingError(f"strategy {cls.name!r} needs teachers but none are configured (teachers: [...])")
    refs = checkpoints.resolve_all(cfg, meta.num_classes, meta.channels, names, data_hw(cfg, meta))
    plan.teacher_names = [r.name for r in refs]
    plan.teacher_refs = [r.to_dict() for r in refs]
    plan.teacher_dirs = [storage.teacher_dir(cfg.root, meta.fingerprint, r.id) for r in refs]
    try:
        cls.check_teachers(plan.teacher_names)
    except ValueError as e:
        raise TrainingError(f"{e} (strategy.teachers selects them)") from None
    if cfg.strategy.mode == "cached":
        _add_stores(cfg, meta, plan, refs, output_format(cfg, meta, needs_features=cls.needs_features))
    _size_reader(cfg, plan, meta)
    return plan


def _add_stores(cfg: Config, meta: DatasetMeta, plan: TrainPlan, refs: list, fmt) -> None:
    """Each teacher's cache store for the views this run reads, checked (this dataset, the rendering this run's
    students see, every part present), into the plan."""
    spec = make_view_spec(cfg, meta.encoding)
    views = sorted({view_for_epoch(e, cfg.views.count) for e in range(cfg.train.epochs)})
    probe = render_digest(spec, meta.image_shape)
    for ref, tdir in zip(refs, plan.teacher_dirs):
        store, manifest = find_store(tdir, ref.to_dict(), spec, fmt, views)
        check_manifest_dataset(manifest, store, meta)
        check_rendering(manifest, store, probe)
        check_parts_present(manifest, store, views)
        plan.teacher_stores.append(store)
        plan.manifests.append(manifest.model_dump())


def _size_reader(cfg: Config, plan: TrainPlan, meta: DatasetMeta) -> None:
    """The read tasks per worker: scaling.read_tasks, else the capacity model's for this run's rows."""
    row_bytes = plan.read_plan("train", with_teachers=True).row_bytes()
    plan.read_tasks = capacity.plan_read_tasks(cfg, row_bytes, meta.image_shape is None, meta.row_group_rows)


def build_trainer(cfg: Config, plan: TrainPlan, storage_path: str, name: str, callbacks: list | None = None):
    """A TorchTrainer for this plan. Workers build their own per-epoch readers (`pipeline/train/reader.py`), so no
    datasets are handed to the trainer: each epoch's row order comes from (seed, epoch), not from Ray."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    fs, path = storage.pyarrow_fs(storage_path)
    backend = None if s.backend == "auto" else TorchConfig(backend=s.backend)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": asdict(plan)},
        torch_config=backend,
        scaling_config=ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker=resources,
            placement_strategy=s.placement_strategy,
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
    )


# Fields a run may resume under changed: where and how fast it runs. The worker count is one of them, so a run that
# lost a node can go on with fewer workers: the global batch size and each epoch's rows come from (seed, epoch); the
# global batches stay the same when the new count divides the run's lanes (train.lanes), else they are cut anew
# from the resumed epoch on (pipeline/train/order.py; the resumed run says which).
RESUME_NEUTRAL = (
    "ray",
    "tune",
    "tracking",
    "storage",
    "scaling.num_workers",
    "scaling.backend",
    "scaling.read_ahead",
    "scaling.read_ahead_mb",
    "scaling.read_object_store_mb",
    "scaling.read_budget",
    "train.max_failures",
    "train.export",
    "train.nan_check_every",
    "train.prefetch_batches",
    "train.pin_memory",
    "train.eval_memory_mb",
    "scaling.check_resources",
    "scaling.read_tasks",
    "scaling.read_cpus",
    "scaling.reader",
    "scaling.read_threads",
)


def _check_same_run(run_dir: str, cfg: Config) -> None:
    bind_config(
        storage.join(run_dir, RUN_FILE),
        cfg,
        RESUME_NEUTRAL,
        f"run {run_dir}",
        "Pass another --name (or experiment), or delete that folder to start over",
    )


def fit(
    cfg: Config,
    meta: DatasetMeta,
    storage_path: str,
    name: str,
    callbacks: list | None = None,
    log=print,
    preflight: bool = True,
) -> RunSummary:
    """Train (or resume, or skip if finished) one run at `<storage_path>/<name>`; returns its summary.

    `preflight` checks the cluster first (resources, a root every node shares); a sweep's trials skip it, the
    sweep checked once for all of them."""
    check_run_name(name)
    run_dir = storage.join(storage_path, name)
    done = RunSummary.finished(run_dir)
    if done is not None:
        _check_same_run(run_dir, cfg)  # a finished run of another config is not this run's result
        log(
            f"[train] {name}: already finished (best val top-1 {done.best_val_top1:.4f}); summary at "
            f"{storage.join(run_dir, 'summary.json')}. Delete {run_dir} to train it again"
        )
        return done
    plan = _prepare(cfg, meta, run_dir, preflight, log)
    log(
        f"[train] {name}: {cfg.strategy.name} ({cfg.strategy.mode}) {cfg.student.arch} ← "
        f"{plan.teacher_names or 'no teachers'}; {cfg.train.epochs} epochs, {cfg.scaling.num_workers} worker(s) "
        f"→ {run_dir}"
    )
    started = time.time()
    checkpoint = _train(cfg, plan, storage_path, name, callbacks)
    with checkpoint.as_directory() as d:
        state = RunState.load(d)
    summary = _summary(cfg, plan, name, run_dir, state, checkpoint.path, time.time() - started)
    summary.exports = export_student(cfg, plan, state.best_student, run_dir, log=log)
    cost = student_cost(cfg, plan, state.best_student, summary.exports, run_dir)
    summary.params, summary.macs, summary.export_bytes = cost["params"], cost["macs"], cost["export_bytes"]
    url = summary.write()
    log(
        f"[train] {name}: best val top-1 {summary.best_val_top1:.4f} after {summary.epochs} epochs "
        f"({summary.wall_seconds:.0f} s); summary at {url}"
    )
    return summary


def check_run_name(name: str) -> None:
    if not re.fullmatch(RUN_NAME_RE, name):
        raise ConfigError(
            f"run name {name!r}: use ASCII letters, digits and _ . - + : = (at most 128, not starting with a dot, no spaces or slashes); "
            "Ray Train tags its metrics with the name and takes ASCII only"
        )


def _prepare(cfg: Config, meta: DatasetMeta, run_dir: str, preflight: bool, log) -> TrainPlan:
    """Ray up, the cluster and the run folder checked, the folder bound to this config, and the plan resolved."""
    from pipeline.ops.runtime import check_resources, check_root_shared, ensure_ray

    ensure_ray(cfg, log=log)
    if preflight:
        check_resources(cfg)
    storage.check_writable(run_dir)
    if preflight:
        check_root_shared(cfg.root)
    _check_same_run(run_dir, cfg)
    return make_plan(cfg, meta, run_dir, log=log)


def _train(cfg: Config, plan: TrainPlan, storage_path: str, name: str, callbacks):
    """Fit the TorchTrainer; its last checkpoint, or a `TrainingError` saying why there is none to use."""
    from ray.train import TrainingFailedError

    failure_url = storage.join(plan.run_dir, FAILURE_FILE)
    storage.remove(failure_url)
    try:
        result = build_trainer(cfg, plan, storage_path, name, callbacks).fit()
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
    return result.checkpoint


def _summary(
    cfg: Config, plan: TrainPlan, name: str, run_dir: str, state: RunState, checkpoint: str, seconds: float
) -> RunSummary:
    history = state.history
    last = history[-1]
    return RunSummary(
        name=name,
        run_dir=run_dir,
        strategy=cfg.strategy.name,
        mode=cfg.strategy.mode,
        student=cfg.student.arch,
        teachers=plan.teacher_names,
        seed=cfg.train.seed,
        epochs=len(history),
        best_val_top1=max(h["val_top1"] for h in history),
        best_epoch=state.best_epoch,
        final_val_top1=last["val_top1"],
        final_val_top5=last["val_top5"],
        test_top1=last.get("test_top1"),
        test_top5=last.get("test_top5"),
        validation={
            "split": "test (data.val_fraction is 0: selection saw test data)"
            if plan.val_split == "test"
            else f"hold-out of the training split ({cfg.data.val_fraction:g})",
            "rows": sum(Slice(**s).size for s in plan.val_slices),
        },
        mean_samples_per_s=float(np.mean([h["samples_per_s"] for h in history])),
        wall_seconds=round(seconds, 1),
        checkpoint=checkpoint,
        workers=next((h["workers"] for h in reversed(history) if "workers" in h), []),
        backend=next((h["backend"] for h in reversed(history) if "backend" in h), "none"),
        resumes=last.get("resumes", 0),
        history=history,
    )


def export_student(
    cfg: Config, plan: TrainPlan, student_state: dict, run_dir: str, log=print
) -> dict[str, Any]:
    """student.pt (state_dict + config, importable as a teacher), always; with `train.export` also student.pt2
    (torch.export, for serving) and, when the `[onnx]` extra is installed, student.onnx with its logits checked
    against the model's by onnxruntime (`onnx_max_abs_diff`). All from the weights of the best validation epoch;
    a few seconds per run."""
    student = models.create(cfg.student.arch, plan.num_classes, plan.channels)
    student.load_state_dict(student_state)
    student.eval()
    pre = plan.student_preprocessing()
    h, w = pre.input_hw(plan.image_hw)
    extra = {
        "normalization": {"mean": list(pre.mean), "std": list(pre.std)},
        "input_shape": [plan.channels, h, w],  # what `camkd bench-student` measures it at (after any resize)
        # how the student was made, not where: the `ray` section (the cluster's address) would make the same
        # weights a different file on every cluster
        "config": {k: v for k, v in plan.cfg.items() if k != "ray"},
    }
    pt_url = storage.join(run_dir, "student.pt")
    checkpoints.save_model_file(pt_url, student, extra)
    out: dict[str, Any] = {"state_dict": pt_url}
    if not cfg.train.export:
        return out
    example = torch.zeros(2, plan.channels, h, w)
    program = None
    try:
        batch = torch.export.Dim("batch", min=1, max=65536)
        program = torch.export.export(student, (example,), dynamic_shapes=({0: batch},))
        buf = io.BytesIO()
        torch.export.save(program, buf)
        url = storage.join(run_dir, "student.pt2")
        storage.write_bytes_atomic(url, buf.getvalue())
        out["torch_export"] = url
    except Exception as e:  # an architecture torch.export cannot trace: fall back to TorchScript
        log(
            f"[train] torch.export failed ({type(e).__name__}: {e}): no student.pt2; writing "
            "student.torchscript.pt (TorchScript) instead"
        )
        buf = io.BytesIO()
        torch.jit.save(torch.jit.trace(student, example), buf)
        url = storage.join(run_dir, "student.torchscript.pt")
        storage.write_bytes_atomic(url, buf.getvalue())
        out["torchscript"] = url
    written = " and ".join(url.rsplit("/", 1)[-1] for url in out.values())
    out |= export_onnx(student, example, program, run_dir, written, log)
    return out


def export_onnx(
    student, example: torch.Tensor, program, run_dir: str, written: str, log=print
) -> dict[str, Any]:
    """student.onnx and its parity (max |onnxruntime − torch| over 8 random images), or {} with one line saying
    what is missing. An export that fails is logged, never fatal: `written` (the files already exported, e.g.
    "student.pt and student.pt2") are kept, and the line names them."""
    from camkd import export as onnx_export

    absent = onnx_export.missing()
    if absent:
        log(f"[train] no student.onnx: {', '.join(absent)} not installed ({onnx_export.ONNX_EXTRA})")
        return {}
    try:
        data = onnx_export.to_onnx(student, example, program)
    except Exception as e:
        log(f"[train] ONNX export failed ({type(e).__name__}: {str(e)[:300]}); {written} are written")
        return {}
    url = storage.join(run_dir, "student.onnx")
    storage.write_bytes_atomic(url, data)
    gen = torch.Generator().manual_seed(0)
    diff = onnx_export.parity(data, student, torch.randn(8, *example.shape[1:], generator=gen))
    if diff > 1e-4:
        log(f"[train] warning: student.onnx's logits differ from the model's by up to {diff:.2e} (> 1e-4)")
    return {"onnx": url, "onnx_max_abs_diff": diff}


def student_cost(
    cfg: Config, plan: TrainPlan, student_state: dict, exports: dict[str, str], run_dir: str
) -> dict[str, int]:
    """What the exported student costs to deploy: `params`, `macs` per image at the training resolution
    (`camkd.costs`), and `export_bytes`, the size of student.pt (the file every run writes)."""
    from camkd.costs import macs_per_image, parameter_count

    student = models.create(cfg.student.arch, plan.num_classes, plan.channels)
    student.load_state_dict(student_state)
    h, w = plan.student_preprocessing().input_hw(plan.image_hw)
    sizes = storage.list_sizes(run_dir)
    return {
        "params": parameter_count(student),
        "macs": macs_per_image(student, plan.channels, h, w),
        "export_bytes": sizes.get(exports["state_dict"].rsplit("/", 1)[-1], 0),
    }


def run_stage(cfg: Config, name: str | None = None, log=print) -> RunSummary:
    """The `train` stage: one student run under `<root>/runs/<experiment>/<name>`."""
    meta = require_dataset(cfg, log=log)
    return fit(cfg, meta, storage.runs_dir(cfg.root, cfg.experiment), name or run_name_for(cfg), log=log)
