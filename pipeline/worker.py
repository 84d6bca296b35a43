"""The Ray Train worker side of student training: the epoch loop, the step, evaluation and checkpoints.

Runs inside each Train worker (`train_loop_per_worker`); everything it needs arrives as a `TrainPlan` resolved on
the driver (`pipeline/train.py`). It never resolves configs, teachers or caches itself.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from camkd import Distiller, StrategyParams, TeacherOutputs, create_strategy, models
from camkd.metrics import per_class_mean, topk_correct
from camkd.training import TrainStep, normalize
from camkd.training import amp_dtype as amp_dtype_for
from pipeline import storage, teachers
from pipeline.cache import teacher_outputs_from_batch
from pipeline.config import Config, validate
from pipeline.views import ViewSpec, uniforms, view_for_epoch

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
CHECKPOINT_PREFIX = "checkpoint_epoch_"
FAILURE_FILE = "failure.json"
RUN_FILE = "run.json"


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
