"""The student's step and its scoring on the training device: accumulators, one training step, evaluation, the
buffers every rank scores with, and a digest of the model scored.

Nothing on the step's path waits for the device: no `.item()`, no tensor made from Python data, no shape that
depends on values; constants are built once per device and counts are kept as device tensors. The one host sync
of the step loop is the worker's check every `train.nan_check_every` steps (`pipeline/train/worker.py`). Imports no Ray.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F

from camkd import TeacherOutputs
from camkd.training import Normalizer, TrainStep
from pipeline.train.collectives import Collectives
from pipeline.train.reader import ReadPlan, teacher_outputs_from_batch

NO_BAD_STEP = 2**62


class EpochStats:
    """What one worker saw in one epoch, as tensors on the training device (no host sync per step): loss-term
    sums, hits, per-class teacher weights, and the first step (and its terms) whose loss was not finite."""

    def __init__(self, device: torch.device, num_teachers: int, num_classes: int) -> None:
        self.device = device
        self.names: list[str] = []
        self.term_sums: torch.Tensor | None = None
        self.seen = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.float64, device=device)
        self.class_weight = torch.zeros(max(num_teachers, 1), num_classes, dtype=torch.float64, device=device)
        self.class_count = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.step = torch.zeros((), dtype=torch.int64, device=device)
        self.first_bad = torch.full((), NO_BAD_STEP, dtype=torch.int64, device=device)
        self.bad_terms: torch.Tensor | None = None
        self.steps = 0
        self.input_wait = 0.0

    def add(self, terms: dict[str, torch.Tensor], loss: torch.Tensor, logits, labels, weights) -> None:
        if not self.names:
            self.names = list(terms)
            self.term_sums = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
            self.bad_terms = torch.zeros(len(self.names), dtype=torch.float32, device=self.device)
        values = torch.stack([terms[n] for n in self.names]).float()  # detached already (StrategyOutput)
        n = labels.shape[0]
        self.term_sums += values.double() * n
        self.seen += n
        self.correct += (logits.detach().argmax(1) == labels).sum()
        if weights is not None:
            w = weights.detach().double()
            self.class_weight[: w.shape[0]].index_add_(1, labels, w)
            self.class_count.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        newly = (~torch.isfinite(loss.detach())) & (self.first_bad == NO_BAD_STEP)
        self.first_bad = torch.where(newly, self.step, self.first_bad)
        self.bad_terms = torch.where(newly, values, self.bad_terms)
        self.step += 1
        self.steps += 1

    def bad_step_code(self, rank: int, world: int) -> torch.Tensor:
        """first bad step × world + rank (NO_BAD_STEP if none): its all-reduced minimum names the earliest step
        and the lowest rank that saw it."""
        return torch.where(self.first_bad == NO_BAD_STEP, self.first_bad, self.first_bad * world + rank)

    def describe_bad(self) -> str:
        values = self.bad_terms.tolist()
        terms = dict(zip(self.names, values))
        first = next(
            (f"{n}={v}" for n, v in terms.items() if n != "loss" and not math.isfinite(v)),
            f"loss={terms.get('loss')}",
        )
        return f"first bad term {first}; terms {{{', '.join(f'{n}={v:.4g}' for n, v in terms.items())}}}"


class EvalStats:
    """Hits, loss sum and count over an evaluation pass (tensors on the training device)."""

    def __init__(self, device: torch.device) -> None:
        self.values = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, loss sum, count

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.add_sums(eval_sums(logits, labels), labels.shape[0])

    def add_sums(self, sums: torch.Tensor, count: int) -> None:
        """sums: one batch's `eval_sums`; count: its rows."""
        self.values[:3] += sums
        self.values[3] += count  # a Python number into a device tensor: no copy, no sync


def eval_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One batch's [top-1 hits, top-5 hits, cross-entropy sum], float64 on the device."""
    logits = logits.float()
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(labels[:, None])
    ce = F.cross_entropy(logits, labels, reduction="sum")
    return torch.stack([top[:, 0].sum().double(), top.any(1).sum().double(), ce.double()])


class CachedTeachers:
    """Teacher outputs from the batch (the cache's columns, expanded on the device)."""

    def __init__(self, read: ReadPlan, num_classes: int) -> None:
        self.k, self.logits, self.features = len(read.teachers), read.logits, read.features
        self.num_classes = num_classes

    def __call__(self, batch: dict, images: torch.Tensor) -> TeacherOutputs:
        return teacher_outputs_from_batch(batch, self.k, self.logits, self.features, self.num_classes)


class OnlineTeachers:
    """Teacher outputs computed in the loop, on the same views the student sees, each teacher's preprocessed as
    in precompute (its own mean/std/input_size, else the dataset's; `normalizers`, one per teacher). Teachers
    that share a preprocessing share one normalised batch; without `normalizers` they get the student's."""

    def __init__(
        self, teachers: list, needs_features: bool, normalizers: list[Normalizer] | None = None
    ) -> None:
        self.teachers, self.needs_features = teachers, needs_features
        self.normalizers = normalizers

    def _inputs(self, batch: dict, images: torch.Tensor) -> list[torch.Tensor]:
        if self.normalizers is None:
            return [images] * len(self.teachers)
        channels_last = not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last)
        made: dict[tuple, torch.Tensor] = {}
        for n in self.normalizers:
            key = (n.mean, n.std, n.size)
            if key not in made:
                x = n(batch["image"])
                made[key] = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        return [made[(n.mean, n.std, n.size)] for n in self.normalizers]

    @torch.no_grad()
    def __call__(self, batch: dict, images: torch.Tensor) -> TeacherOutputs:
        fmaps = [t.forward_features(x) for t, x in zip(self.teachers, self._inputs(batch, images))]
        logits = torch.stack([t.forward_head(f) for t, f in zip(self.teachers, fmaps)]).float()
        return TeacherOutputs(logits, fmaps if self.needs_features else None)


class StudentStep:
    """One training step on a batch already on the device: normalise, the teachers' outputs, forward, add to the
    epoch's stats, backward and optimizer step. Queues work on the device and returns; never waits for it."""

    def __init__(self, step_fn: TrainStep, normalizer: Normalizer, teachers, channels_last: bool) -> None:
        self.step_fn, self.normalizer, self.teachers = step_fn, normalizer, teachers
        self.channels_last = channels_last

    def __call__(self, batch: dict, epoch: int, stats: EpochStats) -> None:
        images = self.normalizer(batch["image"])
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = batch["label"]
        loss, logits, terms, weights = self.step_fn.run(images, labels, self.teachers(batch, images), epoch)
        stats.add(terms, loss, logits, labels, weights)


@torch.no_grad()
def evaluate(
    student: torch.nn.Module, batches, normalizer: Normalizer, amp_dtype, device, backend: str | None = None
) -> EvalStats:
    """Top-1/top-5 hits, loss sum and count of `student` over (images, labels) batches, on the device. With a
    `backend` (train.compile: "inductor") each batch — normalisation, forward and sums — is one compiled graph
    (`fullgraph=True`; a last, smaller batch adds one graph with a dynamic batch size)."""
    stats = EvalStats(device)
    was_training = student.training
    student.eval()
    run = _eval_batch if backend is None else _compiled_eval(backend)
    for images, labels in batches:
        stats.add_sums(run(student, normalizer, images, labels, amp_dtype), labels.shape[0])
    student.train(was_training)
    return stats


def _eval_batch(student, normalizer: Normalizer, images, labels, amp_dtype) -> torch.Tensor:
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = student(normalizer(images))
    return eval_sums(logits, labels)


_COMPILED_EVAL: dict[str, object] = {}


def _compiled_eval(backend: str):
    """`_eval_batch` compiled once per process and backend (the student is an argument: one graph for any
    student of one architecture, the best epoch's copy included)."""
    if backend not in _COMPILED_EVAL:
        _COMPILED_EVAL[backend] = torch.compile(_eval_batch, fullgraph=True, backend=backend)
    return _COMPILED_EVAL[backend]


@torch.no_grad()
def share_buffers(model: torch.nn.Module, coll: Collectives, src: int = 0) -> None:
    """Rank `src`'s buffers (BatchNorm running statistics) on every rank: one broadcast per buffer dtype. DDP
    keeps parameters equal, but each rank's running statistics follow its own last batches; after this every
    rank scores, snapshots and exports the same model."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in model.buffers():
        by_dtype.setdefault(b.dtype, []).append(b)
    for buffers in by_dtype.values():
        flat = torch.cat([b.reshape(-1) for b in buffers])
        coll.broadcast(flat, src)
        offset = 0
        for b in buffers:
            n = b.numel()
            b.copy_(flat[offset : offset + n].view_as(b))
            offset += n


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes (one device→host copy; once per scoring)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class DummyBatch:
    """A batch of zeros with the shapes and dtypes of a real one: a worker whose reader hit a corrupt file keeps
    stepping with it (DDP needs every rank in every step) until the next check stops every rank together."""

    def __init__(self, channels: int, height: int, width: int, read: ReadPlan, batch: int, device) -> None:
        self.batch = {
            "idx": torch.zeros(batch, dtype=torch.int64, device=device),
            "image": torch.zeros(batch, channels, height, width, dtype=torch.uint8, device=device),
            "label": torch.zeros(batch, dtype=torch.int64, device=device),
        }
        for k, src in enumerate(read.teachers):
            fmt, c = src.ref.fmt, src.ref.num_classes
            if read.logits and fmt.logits == "fp16":
                self.batch[f"t{k}_logits"] = torch.zeros(batch, c, dtype=torch.float16, device=device)
            elif read.logits:
                self.batch[f"t{k}_topk_values"] = torch.zeros(
                    batch, fmt.topk, dtype=torch.float16, device=device
                )
                self.batch[f"t{k}_topk_index"] = torch.zeros(
                    batch, fmt.topk, dtype=torch.int64, device=device
                )
                self.batch[f"t{k}_tail_logit"] = torch.zeros(batch, dtype=torch.float32, device=device)
            if read.features:
                shape = src.ref.feature_shape
                dtype = torch.int8 if fmt.features == "int8" else torch.float16
                self.batch[f"t{k}_feat"] = torch.zeros(batch, *shape, dtype=dtype, device=device)
                if fmt.features == "int8":
                    self.batch[f"t{k}_feat_scale"] = torch.ones(
                        batch, shape[0], dtype=torch.float16, device=device
                    )
