"""The student and everything that trains with it: the distiller (the student plus the strategy's connectors and
frozen teacher heads), its optimizer, learning-rate schedule, AMP scaler and step; built on a worker from the plan.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import torch

from camkd import Distiller, create_strategy, models
from camkd.optim import build_optimizer, load_optimizer_state
from camkd.training import TrainStep
from camkd.training import amp_dtype as amp_dtype_for
from pipeline.config import Config
from pipeline.store import storage
from pipeline.teachers import checkpoints
from pipeline.train.checkpoint import RunState
from pipeline.train.plan import TrainPlan


def _load_head(plan: TrainPlan, k: int) -> torch.nn.Module:
    ref = plan.teacher_refs[k]
    head = models.create(ref["arch"], ref["num_classes"], ref["in_chans"]).head
    state = torch.load(
        io.BytesIO(storage.read_bytes(storage.join(plan.teacher_dirs[k], "head.pt"))),
        map_location="cpu",
        weights_only=True,
    )
    head.load_state_dict(state)
    return head


def build_distiller(plan: TrainPlan, cfg: Config, online_teachers: list | None = None) -> Distiller:
    """Student + strategy (connectors, frozen teacher heads) for this plan, on CPU."""
    torch.manual_seed(cfg.train.seed)
    student = models.create(cfg.student.arch, plan.num_classes, plan.channels)
    kwargs: dict[str, Any] = {}
    if plan.needs_features:
        if online_teachers is not None:
            sizes = [
                plan.teacher_preprocessing(k).input_hw(plan.image_hw) for k in range(len(online_teachers))
            ]
            with torch.no_grad():  # each teacher at the size it sees
                probes = [torch.zeros(1, plan.channels, *hw) for hw in sizes]
                shapes = [list(t.forward_features(x).shape[1:]) for t, x in zip(online_teachers, probes)]
            heads = [t.head for t in online_teachers]
        else:
            shapes = [m["output"]["feature_shape"] for m in plan.manifests]
            heads = [_load_head(plan, k) for k in range(len(plan.teacher_names))]
        kwargs = {
            "student_channels": student.feature_channels,
            "teacher_feature_shapes": shapes,
            "teacher_heads": heads,
        }
    strategy = create_strategy(cfg.strategy.name, plan.teacher_names, cfg.strategy.params(), **kwargs)
    return Distiller(student, strategy)


@dataclass
class StudentTraining:
    """The distiller on the training device and what updates it: optimizer, lr schedule, the step (AMP scaler
    included); the online teachers when the strategy runs them in the loop."""

    distiller: Distiller
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    amp_dtype: torch.dtype | None
    step_fn: TrainStep
    online_teachers: list[torch.nn.Module] | None

    @classmethod
    def build(cls, plan: TrainPlan, cfg: Config, device: torch.device) -> StudentTraining:
        online = None
        if cfg.strategy.mode == "online" and plan.teacher_refs:
            online = [checkpoints.build_model(checkpoints.TeacherRef.from_dict(r)) for r in plan.teacher_refs]
        distiller = build_distiller(plan, cfg, online)
        if online is not None:
            online = [t.to(device).eval() for t in online]
        if cfg.train.sync_batchnorm:
            distiller = torch.nn.SyncBatchNorm.convert_sync_batchnorm(distiller)
        distiller = distiller.to(device)
        if cfg.train.channels_last and device.type == "cuda":
            distiller = distiller.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(
            distiller.parameters(),
            lr=cfg.train.resolved_lr(cfg.student.arch),
            momentum=cfg.train.momentum,
            nesterov=cfg.train.nesterov and cfg.train.momentum > 0,
            weight_decay=cfg.train.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, cfg.train.milestones, gamma=cfg.train.lr_decay
        )
        amp_dtype = amp_dtype_for(cfg.train.amp, device)
        step_fn = TrainStep(distiller, distiller, optimizer, device, amp_dtype)
        return cls(distiller, optimizer, scheduler, amp_dtype, step_fn, online)

    def restore(self, state: RunState) -> None:
        """The distiller, optimizer, schedule and scaler as a checkpoint saved them."""
        self.distiller.load_state_dict(state.distiller)
        load_optimizer_state(self.optimizer, state.optimizer, self.distiller)
        self.scheduler.load_state_dict(state.scheduler)
        self.step_fn.scaler.load_state_dict(state.scaler)

    def state(self) -> dict[str, Any]:
        """What `restore` takes back: the `RunState` fields of the model and its training."""
        return {
            "distiller": self.distiller.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.step_fn.scaler.state_dict(),
        }
