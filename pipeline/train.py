"""Ray Train student training with the confidence-aware loss (and every baseline strategy).

Workers read the cached teacher outputs of view v(epoch) through `get_dataset_shard`, train student + connectors
with DDP (gloo on CPU, NCCL on GPU, AMP on GPU), evaluate on the test split, and checkpoint every epoch. A killed
worker restarts the group from the last checkpoint; re-running the same command resumes, and a finished run is
not trained again. `online` mode runs the teachers in the loop on the same views instead of reading the cache.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from camkd import Distiller, StrategyParams, TeacherOutputs, create_strategy, models, strategy_class
from camkd.metrics import per_class_mean, topk_correct
from camkd.training import TrainStep, normalize
from camkd.training import amp_dtype as amp_dtype_for
from pipeline import storage, teachers
from pipeline.cache import (
    ReadPlan,
    TeacherSource,
    build_datasets,
    check_manifest,
    check_parts_present,
    load_manifest,
    teacher_outputs_from_batch,
)
from pipeline.config import Config, TeacherConfig, validate, with_updates
from pipeline.ingest import DatasetMeta, require_dataset
from pipeline.views import ViewSpec, make_view_spec, uniforms, view_for_epoch

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
CHECKPOINT_PREFIX = "checkpoint_epoch_"
FAILURE_FILE = "failure.json"
RUN_FILE = "run.json"


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must act on (non-finite loss, failed workers, bad setup)."""


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
    train_parts: list[str]
    test_parts: list[str]
    teacher_names: list[str] = field(default_factory=list)
    teacher_refs: list[dict[str, Any]] = field(default_factory=list)
    teacher_caches: list[str] = field(default_factory=list)
    manifests: list[dict[str, Any]] = field(default_factory=list)
    needs_logits: bool = False
    needs_features: bool = False

    @property
    def online(self) -> bool:
        return Config.model_validate(self.cfg).strategy.mode == "online"


# ============================================================================================== worker side
def _noisy_labels(
    labels: torch.Tensor, idx: torch.Tensor, noise: float, seed: int, num_classes: int
) -> torch.Tensor:
    """Replace a `noise` fraction of labels by random classes, a pure function of (seed, idx)."""
    u = torch.from_numpy(uniforms(seed + 7919, idx.cpu().numpy(), 0, 2)).to(labels.device)
    random_labels = (u[:, 1] * num_classes).long().clamp_max(num_classes - 1)
    return torch.where(u[:, 0] < noise, random_labels, labels)


def _load_head(plan: TrainPlan, k: int) -> torch.nn.Module:
    ref = plan.teacher_refs[k]
    head = models.create(ref["arch"], ref["num_classes"], ref["in_chans"]).head
    state = torch.load(
        io.BytesIO(storage.read_bytes(storage.join(plan.teacher_caches[k], "head.pt"))),
        map_location="cpu",
        weights_only=True,
    )
    head.load_state_dict(state)
    return head


def build_distiller(plan: TrainPlan, cfg: Config, online_teachers: list | None = None) -> Distiller:
    """Student + strategy (connectors, frozen teacher heads) for this plan, on CPU."""
    torch.manual_seed(cfg.train.seed)
    student = models.create(cfg.student.arch, plan.num_classes, plan.channels)
    s = cfg.strategy
    params = StrategyParams(
        temperature=s.temperature,
        gamma=s.gamma,
        alpha=s.alpha,
        beta=s.beta,
        normalize=s.normalize,
        inter_warmup_epochs=s.inter_warmup_epochs,
        dkd_alpha=s.dkd_alpha,
        dkd_beta=s.dkd_beta,
        dkd_warmup_epochs=s.dkd_warmup_epochs,
    )
    kwargs: dict[str, Any] = {}
    if plan.needs_features:
        if online_teachers is not None:
            h, w = plan.image_shape[:2] if plan.image_shape else (plan.spec["size"], plan.spec["size"])
            with torch.no_grad():
                probe = torch.zeros(1, plan.channels, h, w)
                shapes = [list(t.forward_features(probe).shape[1:]) for t in online_teachers]
            heads = [t.head for t in online_teachers]
        else:
            shapes = [m["features"]["shape"] for m in plan.manifests]
            heads = [_load_head(plan, k) for k in range(len(plan.teacher_names))]
        kwargs = {
            "student_channels": student.feature_channels,
            "teacher_feature_shapes": shapes,
            "teacher_heads": heads,
        }
    strategy = create_strategy(s.name, plan.teacher_names, params, **kwargs)
    return Distiller(student, strategy)


def _first_nonfinite(terms: dict[str, torch.Tensor]) -> str:
    """The first loss term (other than the total) that is NaN/Inf, as `name=value`."""
    for name, value in terms.items():
        if name != "loss" and not torch.isfinite(value).all():
            return f"{name}={value.item()}"
    return f"loss={terms['loss'].item()}" if "loss" in terms else "loss"


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    plan = TrainPlan(**config["plan"])
    cfg = validate(plan.cfg, "train plan")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.scaling.torch_threads or max(1, int(cfg.scaling.cpus_per_worker)))
    device = ray.train.torch.get_device()
    spec = ViewSpec.from_dict(plan.spec)

    online_teachers = None
    if plan.online and plan.teacher_refs:
        online_teachers = [teachers.build_model(teachers.TeacherRef.from_dict(r)) for r in plan.teacher_refs]
    distiller = build_distiller(plan, cfg, online_teachers).to(device)
    if online_teachers is not None:
        online_teachers = [t.to(device).eval() for t in online_teachers]
    lr = cfg.train.resolved_lr(cfg.student.arch)
    optimizer = torch.optim.SGD(
        [p for p in distiller.parameters() if p.requires_grad],
        lr=lr,
        momentum=cfg.train.momentum,
        nesterov=cfg.train.nesterov and cfg.train.momentum > 0,
        weight_decay=cfg.train.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, cfg.train.milestones, gamma=cfg.train.lr_decay
    )
    amp_dtype = amp_dtype_for(cfg.train.amp, device)

    start_epoch, history, best, resumes = 0, [], 0.0, 0
    checkpoint = ray.train.get_checkpoint()
    step_fn = TrainStep(distiller, distiller, optimizer, device, amp_dtype)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location=device, weights_only=True)
        distiller.load_state_dict(state["distiller"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step_fn.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        start_epoch, history, best = state["epoch"] + 1, state["history"], state["best"]
        resumes = state.get("resumes", 0) + 1
        if rank == 0:
            print(f"[train] resuming from the checkpoint of epoch {start_epoch} (resume #{resumes})")
    model = ray.train.torch.prepare_model(distiller, move_to_device=False)
    step_fn.model = model

    placement = {"ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id()}
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, placement)
    else:
        gathered = [placement]
    per_worker_batch = cfg.train.batch_size // world
    k = len(plan.teacher_names)
    mean, std = spec.mean, spec.std
    test_shard = ray.train.get_dataset_shard("test")

    for epoch in range(start_epoch, cfg.train.epochs):
        view = view_for_epoch(epoch, spec.count)
        shard = ray.train.get_dataset_shard(f"train_v{view}")
        model.train()
        t0 = time.time()
        sums: dict[str, torch.Tensor] = {}
        seen = torch.zeros((), dtype=torch.float64)
        correct = torch.zeros((), dtype=torch.float64)
        class_w = torch.zeros(max(k, 1), plan.num_classes, dtype=torch.float64)
        class_n = torch.zeros(plan.num_classes, dtype=torch.float64)
        stop_reason = None
        batches = shard.iter_torch_batches(
            batch_size=per_worker_batch,
            drop_last=True,
            device=device,
            local_shuffle_buffer_size=cfg.train.shuffle_buffer or None,
            local_shuffle_seed=cfg.train.seed * 1000 + epoch if cfg.train.shuffle_buffer else None,
        )
        wait = 0.0  # seconds spent waiting for input batches (input-bound when close to the epoch time)
        t_wait = time.time()
        for step, batch in enumerate(batches):
            wait += time.time() - t_wait
            images = normalize(batch["image"], mean, std)
            labels = batch["label"]
            if cfg.train.label_noise > 0:
                labels = _noisy_labels(
                    labels, batch["idx"], cfg.train.label_noise, cfg.train.seed, plan.num_classes
                )
            if online_teachers is not None:
                with torch.no_grad():
                    fmaps = [t.forward_features(images) for t in online_teachers]
                    t_logits = torch.stack(
                        [t.forward_head(f) for t, f in zip(online_teachers, fmaps)]
                    ).float()
                outputs = TeacherOutputs(
                    t_logits, [f.float() for f in fmaps] if plan.needs_features else None
                )
            else:
                outputs = teacher_outputs_from_batch(batch, k, plan.needs_logits, plan.needs_features, device)
            loss, logits, terms, weights = step_fn.forward(images, labels, outputs, epoch)
            # The lowest rank whose loss is NaN/Inf (world if none); every rank stops at the same step.
            bad = torch.tensor([world if torch.isfinite(loss) else rank])
            if world > 1:
                dist.all_reduce(bad, op=dist.ReduceOp.MIN)
            if bad.item() < world:
                stop_reason = f"non-finite loss at epoch {epoch + 1}, step {step + 1}"
                if bad.item() == rank:
                    stop_reason += (
                        f" (rank {rank}, first bad term {_first_nonfinite(terms)}; "
                        f"terms {{{', '.join(f'{n}={v.item():.4g}' for n, v in terms.items())}}})"
                    )
                    storage.write_json(storage.join(plan.run_dir, FAILURE_FILE), {"reason": stop_reason})
                break
            step_fn.backward_and_step(loss, epoch)
            n = labels.shape[0]
            for name, value in terms.items():
                sums[name] = (
                    sums.get(name, torch.zeros((), dtype=torch.float64)) + value.detach().double().cpu() * n
                )
            seen += n
            correct += topk_correct(logits.detach(), labels, (1,))[0]
            if weights is not None:
                s_w, s_n = per_class_mean(weights.detach().cpu(), labels.cpu(), plan.num_classes)
                class_w[: s_w.shape[0]] += s_w
                class_n += s_n
            t_wait = time.time()
        if stop_reason is not None:
            print(f"[train] rank {rank} stopping: {stop_reason}")
            return
        epoch_lr = scheduler.get_last_lr()[0]
        scheduler.step()
        train_seconds = time.time() - t0

        # Evaluation on the test split: each worker scores its share; the sums are all-reduced below.
        model.eval()
        ev = torch.zeros(4, dtype=torch.float64)  # top1, top5, loss sum, count
        with torch.no_grad():
            for batch in test_shard.iter_torch_batches(batch_size=max(per_worker_batch, 256), device=device):
                images = normalize(batch["image"], mean, std)
                labels = batch["label"]
                with torch.autocast(
                    device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
                ):
                    logits = distiller.student(images)
                top1, top5 = topk_correct(logits.float(), labels, (1, 5))
                ev += torch.tensor(
                    [
                        top1,
                        top5,
                        F.cross_entropy(logits.float(), labels, reduction="sum").item(),
                        len(labels),
                    ],
                    dtype=torch.float64,
                )
        reduced = torch.cat(
            [
                torch.stack([seen, correct]),
                torch.stack(list(sums.values())) if sums else torch.zeros(0, dtype=torch.float64),
                ev,
                class_w.flatten(),
                class_n,
            ]
        )
        if world > 1:
            dist.all_reduce(reduced)
        seen_all, correct_all = reduced[0].item(), reduced[1].item()
        term_sums = reduced[2 : 2 + len(sums)]
        ev = reduced[2 + len(sums) : 6 + len(sums)]
        rest = reduced[6 + len(sums) :]
        class_w = rest[: class_w.numel()].view_as(class_w)
        class_n = rest[class_w.numel() :]
        val_top1 = ev[0].item() / max(ev[3].item(), 1)
        best = max(best, val_top1)
        epoch_seconds = time.time() - t0
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "view": view,
            "lr": epoch_lr,
            "train_top1": correct_all / max(seen_all, 1),
            "val_top1": val_top1,
            "val_top5": ev[1].item() / max(ev[3].item(), 1),
            "val_loss": ev[2].item() / max(ev[3].item(), 1),
            "best_val_top1": best,
            "samples_per_s": seen_all / max(train_seconds, 1e-9),
            "epoch_seconds": epoch_seconds,
            "input_wait_seconds": wait,
            "resumes": resumes,
        }
        if epoch == start_epoch:
            metrics["workers"] = [f"{g['ip']}/{g['node_id'][:8]}" for g in gathered]
        for (name, _), total in zip(sums.items(), term_sums):
            metrics[name if "/" in name else f"train_{name}"] = total.item() / max(seen_all, 1)
        record = dict(metrics)
        if k and class_n.sum() > 0:
            per_class = (class_w[:k] / class_n.clamp_min(1)).tolist()
            record["class_weight"] = {name: per_class[i] for i, name in enumerate(plan.teacher_names)}
        history.append(record)
        if rank == 0:
            terms = ", ".join(
                f"{n} {v:.3f}" for n, v in metrics.items() if n.startswith("train_") and n != "train_top1"
            )
            print(
                f"[train] epoch {epoch + 1}/{cfg.train.epochs}: {terms}; top-1 train {metrics['train_top1']:.4f} "
                f"val {val_top1:.4f} (best {best:.4f}); {metrics['samples_per_s']:.0f} samples/s, {epoch_seconds:.1f} s",
                flush=True,
            )
            with tempfile.TemporaryDirectory() as tmp:
                torch.save(
                    {
                        "distiller": distiller.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": step_fn.scaler.state_dict(),
                        "rng": torch.get_rng_state(),
                        "epoch": epoch,
                        "history": history,
                        "best": best,
                        "resumes": resumes,
                    },
                    os.path.join(tmp, STATE_FILE),
                )
                with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
                    json.dump(plan.cfg, f, indent=1)
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{epoch + 1:04d}",
                )
        else:
            ray.train.report(metrics)


# ============================================================================================== driver side
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


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} → {b!r}")
    return out


RESUME_NEUTRAL = ("ray", "tune", "train.max_failures", "scaling.check_resources", "train.export")


def bind_config(url: str, cfg: Config, neutral: tuple[str, ...], what: str, fix: str) -> None:
    """Bind a folder to the config that started it (the JSON file at `url`): resuming it under a different
    config would mix two experiments, so that is refused, listing the differences (fields under `neutral` may
    change)."""
    new = cfg.model_dump(mode="json")
    if storage.exists(url):
        diff = [d for d in config_diff(storage.read_json(url)["config"], new) if not d.startswith(neutral)]
        if diff:
            raise TrainingError(f"{what} was started with a different config ({'; '.join(diff[:6])}). {fix}")
    else:
        storage.write_json(url, {"config": new, "created": time.time()})


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


def teacher_config(cfg: Config, teacher: TeacherConfig) -> Config:
    """The config that trains `teacher` with strategy ce (the same trainer as students)."""
    t = teacher.train
    assert t is not None
    return with_updates(
        cfg,
        {
            "student.arch": teacher.arch,
            "strategy.name": "ce",
            "strategy.mode": "cached",
            "strategy.teachers": None,
            "train.epochs": t.epochs,
            "train.lr": t.lr,
            "train.batch_size": t.batch_size,
            "train.label_noise": t.label_noise,
            "train.limit_train": t.limit_train,
            "train.seed": t.seed,
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
    state = torch.load(io.BytesIO(storage.read_bytes(summary["exports"]["state_dict"])), weights_only=True)
    student = models.create(teacher.arch, meta.num_classes, meta.channels)
    student.load_state_dict(state["state_dict"])
    url = teachers.trained_checkpoint_url(cfg, teacher)
    sha = teachers.save_model_file(
        url, student, {"trained_by": "camkd-ray", "test_top1": summary["final_val_top1"]}
    )
    info = {
        "name": teacher.name,
        "arch": teacher.arch,
        "sha256": sha,
        "test_top1": summary["final_val_top1"],
        "best_val_top1": summary["best_val_top1"],
        "epochs": summary["epochs"],
        "train": teacher.train.model_dump(),
        "checkpoint": url,
    }
    storage.write_json(storage.join(tdir, "teacher.json"), info)
    return info
