"""The student's step and its scoring make no host sync: every op between two non-finite checks is recorded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CAMKD_RUN
from torch.utils._python_dispatch import TorchDispatchMode

from camkd.optim import build_optimizer
from camkd.training import Normalizer, TrainStep
from pipeline.config import with_updates
from pipeline.train import driver, model
from pipeline.train.reader import EVAL_VIEW, Slice, items, local_batches
from pipeline.train.step import CachedTeachers, EpochStats, StudentStep, evaluate

# Ops that wait for the device (a value read on the host, or an output shape that depends on values) or that copy
# host data to the device (a tensor made from Python data dispatches lift_fresh first).
SYNCING = {
    "aten._local_scalar_dense",
    "aten.item",
    "aten.is_nonzero",
    "aten.equal",
    "aten.nonzero",
    "aten.masked_select",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.lift_fresh",
    "aten.lift_fresh_copy",
}


class SyncRecorder(TorchDispatchMode):
    """Every aten op dispatched inside; `found` lists those that would make a GPU step wait for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name().split(".")[0].replace("::", ".")
        self.ops.append(name)
        if name in SYNCING:
            self.found.append(str(func))
        elif name in ("aten.index", "aten.index_put", "aten.index_put_"):
            indices = args[1] if len(args) > 1 else []
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or []):
                self.found.append(f"{func} with a boolean mask (its output shape depends on values)")
        elif name == "aten.repeat_interleave" and kwargs.get("output_size") is None and len(args) == 1:
            self.found.append(f"{func} without output_size")
        return func(*args, **kwargs)


def _batches(read, units, view: int, epoch: int, batch: int, n: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for b in local_batches(read, items(units, view, epoch), batch, threads=1):
        out.append({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in b.items()})
        if len(out) == n:
            break
    return out


def _camkd_step(cached, dtype):
    """A real cached CA-MKD step (logit and feature terms, the authors' undetached weights) as the worker builds it
    (its optimizer from camkd.training.build_optimizer), the plan, the read plan and a fresh EpochStats."""
    cfg = with_updates(cached[0], CAMKD_RUN)
    meta = cached[2]
    plan = driver.make_plan(cfg, meta, "/nonexistent")
    read = plan.read_plan("train", with_teachers=True)
    distiller = model.build_distiller(plan, cfg)
    optimizer = build_optimizer(distiller.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    device = torch.device("cpu")
    step_fn = TrainStep(distiller, distiller, optimizer, device, dtype)
    normalizer = Normalizer(plan.spec["mean"], plan.spec["std"])
    step = StudentStep(step_fn, normalizer, CachedTeachers(read, meta.num_classes), channels_last=False)
    return step, plan, read, EpochStats(device, 2, meta.num_classes)


def test_cached_camkd_steps_and_scoring_make_no_host_sync(cached):
    """Real cached CA-MKD steps on real batches from the cache, between two `nan_check_every` checks: no op in
    them waits for the device or copies host data to it; nor does scoring a batch. The first step runs before the
    window (it builds each device's constants once, as the first step after a check does on a GPU). Fails with
    constants built from Python lists on every call."""
    step, plan, read, stats = _camkd_step(cached, None)
    distiller, normalizer = step.step_fn.distiller, step.normalizer
    device = torch.device("cpu")
    units = [Slice(**u) for u in plan.train_units]
    batches = _batches(read, units, view=1, epoch=1, batch=32, n=4)
    step(batches[0], 1, stats)  # epoch 1: the feature term is on (it sits out epoch 0)
    with SyncRecorder() as recorder:
        for batch in batches[1:]:
            step(batch, 1, stats)
    assert len(recorder.ops) > 300, "the recorder saw the steps"
    assert "aten.convolution_backward" in recorder.ops
    assert recorder.found == [], f"host syncs on the step path: {sorted(set(recorder.found))}"
    eval_read = plan.read_plan("test", with_teachers=False)
    test_slices = [Slice(**s) for s in plan.test_slices]
    eval_batches = [
        (b["image"], b["label"]) for b in _batches(eval_read, test_slices, EVAL_VIEW, -1, 32, n=2)
    ]
    evaluate(distiller.student, eval_batches[:1], normalizer, None, device)
    with SyncRecorder() as recorder:
        evaluate(distiller.student, eval_batches, normalizer, None, device)
    assert recorder.found == [], f"host syncs while scoring: {sorted(set(recorder.found))}"
    assert stats.steps == 4 and float(stats.seen) == 128.0


def test_the_epoch_totals_are_named_fields_of_one_reduction():
    """`EpochTotals.reduce` sums one flat tensor and hands back each number under its name: the record an epoch
    reports equals what the step accumulated, term by term, teacher by teacher and class by class."""
    from pipeline.train.collectives import Collectives
    from pipeline.train.epoch_totals import EpochTotals
    from pipeline.train.step import EvalStats

    dev = torch.device("cpu")
    stats = EpochStats(dev, num_teachers=2, num_classes=3)
    labels = torch.tensor([0, 1, 2, 2])
    logits = torch.eye(3)[torch.tensor([0, 1, 0, 2])] * 5  # 3 of 4 right
    weights = torch.tensor([[0.25, 0.5, 1.0, 1.0], [0.75, 0.5, 0.0, 0.0]])
    terms = {"loss": torch.tensor(2.0), "ce": torch.tensor(1.5), "weight/a": torch.tensor(0.6)}
    stats.add(terms, torch.tensor(2.0), logits, labels, weights)
    stats.input_wait = 3.0
    val = EvalStats(dev)
    val.add(logits[:2], labels[:2])
    totals = EpochTotals.reduce(stats, val, Collectives(dev))
    rec = totals.record(stats.names, ["a", "b"], world=2)
    assert (totals.seen, totals.correct, totals.val_count) == (4, 3, 2)
    assert rec["train_top1"] == 0.75 and rec["val_top1"] == 1.0 and rec["input_wait"] == 1.5
    assert rec["terms"] == {"train_loss": 2.0, "train_ce": 1.5, "weight/a": pytest.approx(0.6)}
    assert rec["class_weight"] == {"a": [0.25, 0.5, 1.0], "b": [0.75, 0.5, 0.0]}


def test_fp16_steps_keep_the_grad_scaler_on_the_device(cached):
    """`train.amp: fp16` (V100, T4): the GradScaler is on (here on CPU, where autocast and the scaler also run in
    float16) and its bookkeeping stays on the device: the fused optimizer skips a step with non-finite gradients
    itself, so no step reads `found_inf` on the host (torch's per-parameter SGD makes the scaler do, every
    step). Its scale still moves: a step with an infinite loss halves it."""
    step, plan, read, stats = _camkd_step(cached, torch.float16)
    scaler = step.step_fn.scaler
    assert scaler.is_enabled(), "the fp16 path runs with its GradScaler"
    batches = _batches(read, [Slice(**u) for u in plan.train_units], view=1, epoch=1, batch=16, n=3)
    step(batches[0], 1, stats)
    with SyncRecorder() as recorder:
        for batch in batches[1:]:
            step(batch, 1, stats)
    assert "aten._amp_update_scale_" in recorder.ops
    assert recorder.found == [], f"host syncs on the fp16 step path: {sorted(set(recorder.found))}"
    scale = float(scaler.get_scale())
    with torch.no_grad():  # a weight gone infinite: a non-finite loss and gradients
        step.step_fn.distiller.student.fc.weight[0, 0] = float("inf")
    step(batches[1], 1, stats)
    assert float(scaler.get_scale()) == scale / 2, "the non-finite step halved the scale"
