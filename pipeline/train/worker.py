"""The Ray Train worker side of student training: the epoch loop, evaluation and checkpoints.

Runs inside each Train worker (`train_loop_per_worker`) on a `TrainPlan` resolved on the driver
(`pipeline/train/driver.py`); it never resolves configs, teachers or caches itself. The step (`pipeline/train/step.py`) makes
no host sync: loss terms, hits and per-class weights accumulate in tensors on the training device, which are
all-reduced once per epoch; the non-finite-loss check is one small all-reduce every `train.nan_check_every` steps.
Every collective goes through `pipeline/train/collectives.py`. Each epoch reads its own share of the training rows in
an order drawn from (seed, epoch) (`pipeline/train/reader.py`), through a Ray Data reader whose budget is this worker's
share of its node, not the cluster; the validation rows are read once and kept in memory when they fit. Before
every scoring all ranks take rank 0's BatchNorm statistics, so every rank scores, keeps and exports one model.
After the last epoch the best-validation weights are scored once on the test split.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from camkd import Distiller, StrategyParams, create_strategy, models
from camkd.compiled import can_compile_whole
from camkd.optim import build_optimizer, load_optimizer_state
from camkd.training import TrainStep
from camkd.training import amp_dtype as amp_dtype_for
from pipeline.config import Config, validate
from pipeline.data import preprocessing
from pipeline.data.preprocessing import Preprocessing
from pipeline.data.views import ViewSpec, view_for_epoch
from pipeline.store import storage
from pipeline.teachers import checkpoints
from pipeline.train.batches import (
    EvalSet,
    ReaderOptions,
    apply_reader_budget,
    budget_line,
    data_error,
    torch_batches,
)
from pipeline.train.collectives import Collectives
from pipeline.train.reader import (
    ReadPlan,
    Slice,
    TeacherSource,
    contiguous_shares,
    epoch_shares,
    items,
)
from pipeline.train.step import (
    NO_BAD_STEP,
    CachedTeachers,
    DummyBatch,
    EpochStats,
    EvalStats,
    OnlineTeachers,
    StudentStep,
    evaluate,
    share_buffers,
    state_digest,
)

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
CHECKPOINT_PREFIX = "checkpoint_epoch_"
FAILURE_FILE = "failure.json"
RUN_FILE = "run.json"


def say(line: str) -> None:
    """One progress line to the driver's console. Ray Train (2.60) patches `print` in its workers to go through
    logging, and the driver then shows every printed line twice; a write to stdout shows it once."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


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


# ============================================================================================== model
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


def strategy_params(cfg: Config) -> StrategyParams:
    s = cfg.strategy
    return StrategyParams(
        temperature=s.temperature,
        gamma=s.gamma,
        alpha=s.alpha,
        beta=s.beta,
        normalize=s.normalize,
        feature_weights=s.feature_weights,
        inter_warmup_epochs=s.inter_warmup_epochs,
        dkd_alpha=s.dkd_alpha,
        dkd_beta=s.dkd_beta,
        dkd_warmup_epochs=s.dkd_warmup_epochs,
    )


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
    strategy = create_strategy(cfg.strategy.name, plan.teacher_names, strategy_params(cfg), **kwargs)
    return Distiller(student, strategy)


# ============================================================================================== the loop
PROFILE_ENV = "CAMKD_PROFILE_DIR"
# Epoch-record entries that are not numbers: kept in the history, never reported to Ray Train / Tune as metrics.
NON_METRIC_KEYS = (
    "class_weight",
    "workers",
    "backend",
    "reader_budget",
    "student_digest",
    "student_digests",
)


class StepProfiler:
    """With $CAMKD_PROFILE_DIR set (a local folder on every worker's node), profiles steps 6–25 of the run's
    second epoch (steps 4–5 warm the profiler up) with torch.profiler (CPU, and CUDA on GPUs) and writes each
    rank's operator table and Chrome trace there: how a slow step spends its time (kernels, host syncs, copies,
    the reader's threads). Off, it costs nothing."""

    WAIT, WARMUP, ACTIVE = 3, 2, 20

    def __init__(self, run: WorkerRun, epoch: int, steps: int) -> None:
        folder = os.environ.get(PROFILE_ENV, "")
        self.prof = None
        if not folder or epoch != run.start_epoch + 1 or steps < self.WAIT + self.WARMUP + self.ACTIVE:
            return
        from torch.profiler import ProfilerActivity, profile, schedule

        name = run.plan.run_dir.rstrip("/").rsplit("/", 1)[-1]
        self.path = os.path.join(folder, f"{name}-rank{run.rank}-epoch{epoch + 1}")
        os.makedirs(folder, exist_ok=True)
        activities = [ProfilerActivity.CPU]
        if run.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self.sort = "self_cuda_time_total" if run.device.type == "cuda" else "self_cpu_time_total"
        self.prof = profile(
            activities=activities,
            schedule=schedule(wait=self.WAIT, warmup=self.WARMUP, active=self.ACTIVE, repeat=1),
            on_trace_ready=self._write,
        )
        self.prof.__enter__()

    def _write(self, prof) -> None:
        with open(self.path + ".txt", "w") as f:
            f.write(f"{self.ACTIVE} steps\n")
            f.write(prof.key_averages().table(sort_by=self.sort, row_limit=40))
        prof.export_chrome_trace(self.path + ".trace.json.gz")

    def step(self) -> None:
        if self.prof is not None:
            self.prof.step()

    def close(self) -> None:
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.prof = None


class Progress:
    """Rank 0's progress line inside an epoch, from host timers only (no device sync): step, samples/s, ETA."""

    def __init__(self, run: WorkerRun, epoch: int, steps: int) -> None:
        self.every = run.cfg.tracking.progress_seconds if run.rank == 0 else 0
        self.run, self.epoch, self.steps = run, epoch, steps
        self.start = self.last = time.perf_counter()

    def tick(self, step: int, input_wait: float) -> None:
        if not self.every or step == 0:
            return
        now = time.perf_counter()
        if now - self.last < self.every:
            return
        self.last = now
        rate = step * self.run.cfg.train.batch_size / (now - self.start)
        eta = (self.steps - step) * (now - self.start) / step
        say(
            f"[train] epoch {self.epoch + 1}/{self.run.cfg.train.epochs}: step {step}/{self.steps} "
            f"({100 * step / self.steps:.0f} %), {rate:.0f} samples/s, ETA {eta:.0f} s, input wait {input_wait:.1f} s"
        )


class WorkerRun:
    """One worker's run: set up from the plan and the last checkpoint, then train epoch by epoch."""

    def __init__(self, config: dict[str, Any]) -> None:
        import ray
        import ray.train
        import ray.train.torch

        self.plan = plan = TrainPlan(**config["plan"])
        self.cfg = cfg = plan.config
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(cfg.scaling.torch_threads or max(1, int(cfg.scaling.cpus_per_worker)))
        self.device = device = ray.train.torch.get_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.coll = Collectives(device)
        self.k = len(plan.teacher_names)
        self.per_worker_batch = cfg.train.batch_size // self.world
        self.train_read = plan.read_plan("train", with_teachers=True)
        self.units = [Slice(**u) for u in plan.train_units]
        self.pin_memory = (
            device.type == "cuda" if cfg.train.pin_memory == "auto" else bool(cfg.train.pin_memory)
        )
        # the student's inputs: student.mean/std/input_size, else the dataset's
        self.normalizer = plan.student_preprocessing().normalizer()
        self._build_model()
        self.start_epoch, self.history, self.best, self.best_epoch, self.resumes = 0, [], -1.0, 0, 0
        self.best_student: dict[str, torch.Tensor] | None = None
        self._restore(ray.train.get_checkpoint())
        model = ray.train.torch.prepare_model(self.distiller, move_to_device=False)
        self.step_fn.model = model
        if cfg.train.compile:
            self._compile(model)
        placement = {"ip": ray.util.get_node_ip_address(), "node_id": self.node_id}
        self.placement = self.coll.gather_objects(placement)
        self.opts = plan.reader_options()
        self.reader_budget = self._set_reader_budget()
        teachers_in_batch = (
            CachedTeachers(self.train_read, plan.num_classes)
            if self.online_teachers is None
            else OnlineTeachers(
                self.online_teachers,
                plan.needs_features,
                [plan.teacher_preprocessing(k).normalizer() for k in range(self.k)],
            )
        )
        channels_last = cfg.train.channels_last and device.type == "cuda"
        self.student_step = StudentStep(self.step_fn, self.normalizer, teachers_in_batch, channels_last)
        self.stream = None
        self.tracker = None
        self.fatal: str | None = None
        h, w = plan.image_hw
        self.dummy = DummyBatch(plan.channels, h, w, self.train_read, self.per_worker_batch, device)
        self.val = self._eval_set(plan.val_split, [Slice(**s) for s in plan.val_slices], keep=True)

    def _build_model(self) -> None:
        plan, cfg, device = self.plan, self.cfg, self.device
        self.online_teachers = None
        if cfg.strategy.mode == "online" and plan.teacher_refs:
            self.online_teachers = [
                checkpoints.build_model(checkpoints.TeacherRef.from_dict(r)) for r in plan.teacher_refs
            ]
        distiller = build_distiller(plan, cfg, self.online_teachers)
        if self.online_teachers is not None:
            self.online_teachers = [t.to(device).eval() for t in self.online_teachers]
        if cfg.train.sync_batchnorm:
            distiller = torch.nn.SyncBatchNorm.convert_sync_batchnorm(distiller)
        distiller = distiller.to(device)
        if cfg.train.channels_last and device.type == "cuda":
            distiller = distiller.to(memory_format=torch.channels_last)
        self.distiller = distiller
        self.optimizer = build_optimizer(
            distiller.parameters(),
            lr=cfg.train.resolved_lr(cfg.student.arch),
            momentum=cfg.train.momentum,
            nesterov=cfg.train.nesterov and cfg.train.momentum > 0,
            weight_decay=cfg.train.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, cfg.train.milestones, gamma=cfg.train.lr_decay
        )
        self.amp_dtype = amp_dtype_for(cfg.train.amp, device)
        self.step_fn = TrainStep(distiller, distiller, self.optimizer, device, self.amp_dtype)

    def _compile(self, model: torch.nn.Module) -> None:
        """train.compile: the whole step (forward, loss, backward, optimizer) as one graph (`camkd.compiled`);
        where it cannot be (DDP, fp16), the model alone, as before."""
        why = can_compile_whole(model, self.optimizer, self.amp_dtype)
        if why is None:
            self.step_fn.compile_whole()
            return
        if self.rank == 0:
            say(f"[train] train.compile: the model alone ({why})")
        self.step_fn.model = torch.compile(model)

    def _set_reader_budget(self) -> dict[str, Any]:
        """This worker's share of its node for its Ray Data reader (`pipeline/train/batches.py: apply_reader_budget`);
        returns what was set (in the first epoch's record)."""
        from pipeline.ops.runtime import quiet_ray_data

        quiet_ray_data(preserve_order=self.cfg.train.deterministic)
        s = self.cfg.scaling
        here = sum(1 for p in self.placement if p["node_id"] == self.node_id)
        budget = apply_reader_budget(s, self.opts, self.node_id, here)
        if s.read_budget == "worker":
            self.opts = replace(self.opts, budget_bytes=budget["object_store_bytes"])
        if self.rank == 0 and s.reader == "ray_data":
            say(budget_line(budget))
        return budget

    def _eval_set(self, split: str, slices: list[Slice], keep: bool, batch: int | None = None) -> EvalSet:
        """This worker's share of an evaluation split; a corrupt or missing file is recorded (the next check
        stops every rank) and the share is left empty."""
        mine = contiguous_shares(slices, self.world)[self.rank]
        read = self.plan.read_plan(split, with_teachers=False)
        size = batch or max(self.per_worker_batch, 256)
        memory = self.cfg.train.eval_memory_mb * 2**20
        try:
            return EvalSet(read, mine, self.opts, self.device, size, self.node_id, memory, keep)
        except Exception as e:
            message = data_error(e)
            if message is None:
                raise
            self._record_data_error(message)
            return EvalSet(read, [], self.opts, self.device, size, self.node_id, memory, keep)

    def _restore(self, checkpoint) -> None:
        if checkpoint is None:
            return
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location=self.device, weights_only=True)
        self.distiller.load_state_dict(state["distiller"])
        load_optimizer_state(self.optimizer, state["optimizer"], self.distiller)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_fn.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"].cpu())
        self.start_epoch, self.history = state["epoch"] + 1, state["history"]
        self.best, self.best_epoch = state["best"], state.get("best_epoch", 0)
        self.best_student = {k: v.cpu() for k, v in state["best_student"].items()}
        self.resumes = state.get("resumes", 0) + 1
        if self.rank == 0:
            say(f"[train] resuming from the checkpoint of epoch {self.start_epoch} (resume #{self.resumes})")
            was = state.get("world", self.world)
            if was != self.world:
                say(
                    f"[train] resuming with {self.world} worker(s); the checkpoint was written with {was}. The "
                    f"global batch stays {self.cfg.train.batch_size} ({self.per_worker_batch} per worker now) and "
                    "each epoch's rows and their order come from (seed, epoch), not from the worker count"
                )

    # ------------------------------------------------------------------------------------------ training
    def _training_stream(self):
        """One reader for every epoch this run has left: each epoch's share (row groups in an order drawn from
        (seed, epoch), rows reordered inside each row group), read in that order, epoch after epoch, so no epoch
        waits for a reader to start. Every share is a multiple of the batch, so epoch e is exactly its
        `steps[e]` batches (the local shuffle buffer, when on, mixes rows across an epoch boundary)."""
        cfg, b = self.cfg, self.per_worker_batch
        read_items: list[dict[str, Any]] = []
        self.steps: dict[int, int] = {}
        for epoch in range(self.start_epoch, cfg.train.epochs):
            share = epoch_shares(self.units, cfg.train.seed, epoch, self.world, b)[self.rank]
            self.steps[epoch] = sum(s.size for s in share) // b
            read_items += items(share, view_for_epoch(epoch, cfg.views.count), epoch)
        shuffle = cfg.train.shuffle_buffer if not cfg.train.deterministic else 0
        return iter(
            torch_batches(
                self.train_read,
                read_items,
                self.opts,
                b,
                self.device,
                self.node_id,
                drop_last=True,
                prefetch_batches=cfg.train.prefetch_batches,
                pin_memory=self.pin_memory,
                shuffle_buffer=shuffle,
                shuffle_seed=cfg.train.seed * 100_003 + self.start_epoch if shuffle else None,
            )
        )

    def train_epoch(self, epoch: int) -> tuple[EpochStats, str | None]:
        """One epoch over this worker's share; returns its stats and, if a loss went non-finite, why it stopped."""
        if self.stream is None:
            self.stream = self._training_stream()
        steps = self.steps[epoch]
        stats = EpochStats(self.device, self.k, self.plan.num_classes)
        self.step_fn.model.train()
        progress = Progress(self, epoch, steps)
        profiler = StepProfiler(self, epoch, steps)
        try:
            return self._train_steps(epoch, steps, stats, progress, profiler)
        finally:
            profiler.close()

    def _train_steps(
        self, epoch: int, steps: int, stats: EpochStats, progress: Progress, profiler: StepProfiler
    ) -> tuple[EpochStats, str | None]:
        every = self.cfg.train.nan_check_every
        for step in range(steps):
            t0 = time.perf_counter()
            batch = self._next_batch(self.stream)
            stats.input_wait += time.perf_counter() - t0
            progress.tick(step, stats.input_wait)
            self.student_step(batch, epoch, stats)
            profiler.step()
            if (step + 1) % every == 0 or step + 1 == steps:
                reason = self._check(stats, epoch)
                if reason is not None:
                    return stats, reason
        if steps == 0:  # still take part in the check every other rank makes
            reason = self._check(stats, epoch)
            if reason is not None:
                return stats, reason
        return stats, None

    def _record_data_error(self, message: str) -> None:
        self.fatal = message
        storage.write_json(
            storage.join(self.plan.run_dir, FAILURE_FILE),
            {"reason": message, "rank": self.rank, "data": True},
        )

    def _next_batch(self, batches) -> dict:
        """The next batch; after a corrupt or missing file, a batch of zeros (see DummyBatch) and no more reads."""
        if self.fatal is not None:
            return self.dummy.batch
        try:
            return next(batches)
        except Exception as e:
            message = data_error(e)
            if message is None:
                raise  # anything else (a lost node, storage that stays unreachable): Ray Train restarts the group
            self._record_data_error(message)
            return self.dummy.batch

    def _check(self, stats: EpochStats | None, epoch: int) -> str | None:
        """One all-reduce (the one host sync of the step loop): did any rank see a non-finite loss, or a corrupt
        or missing file? The rank that saw it writes why to failure.json; every rank stops at the same check."""
        no = torch.tensor(NO_BAD_STEP, device=self.device)
        nan_code = stats.bad_step_code(self.rank, self.world) if stats is not None else no
        fatal_code = no if self.fatal is None else torch.tensor(self.rank, device=self.device)
        nan, fatal = (int(v) for v in self.coll.min(torch.stack([nan_code, fatal_code])).tolist())
        if fatal != NO_BAD_STEP:
            return f"rank {fatal} could not use a stored file" + (
                f": {self.fatal}" if fatal == self.rank else ""
            )
        if nan == NO_BAD_STEP:
            return None
        step, rank = divmod(nan, self.world)
        reason = f"non-finite loss at epoch {epoch + 1}, step {step + 1}"
        if rank == self.rank:
            reason += f" (rank {rank}, {stats.describe_bad()})"
            storage.write_json(storage.join(self.plan.run_dir, FAILURE_FILE), {"reason": reason})
        return reason

    # ------------------------------------------------------------------------------------------ epoch end
    def finish_epoch(
        self, epoch: int, stats: EpochStats, t0: float, train_seconds: float
    ) -> dict[str, Any] | None:
        """Validate, reduce everything once across workers, and return this epoch's record (None: a stored file
        could not be read, every rank stops)."""
        student = self.distiller.student
        val, digest = self._score(student, self.val)
        if self._check(None, epoch) is not None:
            return None
        reduced = self._reduce(stats, val)
        val_top1 = reduced["val_top1"]
        if val_top1 > self.best:
            self.best, self.best_epoch = val_top1, epoch + 1
            self.best_student = {k: v.detach().to("cpu", copy=True) for k, v in student.state_dict().items()}
        epoch_lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "view": view_for_epoch(epoch, self.cfg.views.count),
            "lr": epoch_lr,
            "train_top1": reduced["train_top1"],
            "val_top1": val_top1,
            "val_top5": reduced["val_top5"],
            "val_loss": reduced["val_loss"],
            "best_val_top1": self.best,
            "best_epoch": self.best_epoch,
            "samples_per_s": reduced["seen"] / max(train_seconds, 1e-9),
            "epoch_seconds": time.time() - t0,
            "input_wait_seconds": reduced["input_wait"],
            "resumes": self.resumes,
            "student_digest": digest,
        }
        if epoch == self.start_epoch:
            record["workers"] = [f"{g['ip']}/{g['node_id'][:8]}" for g in self.placement]
            record["backend"] = self.coll.backend
            record["reader_budget"] = self.reader_budget
        record.update(reduced["terms"])
        if reduced["class_weight"] is not None:
            record["class_weight"] = reduced["class_weight"]
        if epoch + 1 == self.cfg.train.epochs:
            test = self.test_best()
            if self._check(None, epoch) is not None:
                return None
            record.update(test)
        return record

    def _reduce(self, stats: EpochStats, val: EvalStats) -> dict[str, Any]:
        """Every rank's epoch numbers summed in one all-reduce, then copied to the host once."""
        names = stats.names
        n_terms = len(names)
        flat = torch.cat(
            [
                torch.stack([stats.seen, stats.correct]),
                stats.term_sums
                if stats.term_sums is not None
                else torch.zeros(0, dtype=torch.float64, device=self.device),
                val.values,
                stats.class_weight.flatten(),
                stats.class_count,
                torch.tensor([stats.input_wait], dtype=torch.float64, device=self.device),
            ]
        )
        reduced = self.coll.sum(flat).cpu()  # the epoch's one device→host copy
        seen, correct = reduced[0].item(), reduced[1].item()
        term_sums = reduced[2 : 2 + n_terms].tolist()
        top1, top5, loss_sum, count = reduced[2 + n_terms : 6 + n_terms].tolist()
        rest = reduced[6 + n_terms :]
        cw_n = stats.class_weight.numel()
        class_weight = rest[:cw_n].view(stats.class_weight.shape)
        class_count = rest[cw_n : cw_n + stats.class_count.numel()]
        per_class = None
        if self.k and class_count.sum() > 0:
            values = (class_weight[: self.k] / class_count.clamp_min(1)).tolist()
            per_class = {n: values[i] for i, n in enumerate(self.plan.teacher_names)}
        return {
            "seen": seen,
            "train_top1": correct / max(seen, 1),
            "val_top1": top1 / max(count, 1),
            "val_top5": top5 / max(count, 1),
            "val_loss": loss_sum / max(count, 1),
            "input_wait": rest[-1].item() / self.world,
            "terms": {
                (name if "/" in name else f"train_{name}"): total / max(seen, 1)
                for name, total in zip(names, term_sums)
            },
            "class_weight": per_class,
        }

    def _score(self, student, data: EvalSet) -> tuple[EvalStats, str]:
        """An evaluation pass with rank 0's BatchNorm statistics on every rank (so every rank scores the same
        model, the one that is snapshotted and exported), and that model's digest. A corrupt or missing file is
        recorded (the next check stops every rank)."""
        share_buffers(student, self.coll)
        digest = state_digest(student.state_dict())
        try:
            stats = evaluate(student, data.batches(), self.normalizer, self.amp_dtype, self.device)
        except Exception as e:
            message = data_error(e)
            if message is None:
                raise
            self._record_data_error(message)
            stats = EvalStats(self.device)
        return stats, digest

    def test_best(self) -> dict[str, Any]:
        """The test split, scored once with the weights of the best validation epoch (the exported student)."""
        student = copy.deepcopy(self.distiller.student)
        if self.best_student is not None:
            student.load_state_dict(self.best_student)
        data = self._eval_set("test", [Slice(**s) for s in self.plan.test_slices], keep=False)
        stats, digest = self._score(student, data)
        top1, top5, loss_sum, count = self.coll.sum(stats.values).cpu().tolist()
        return {
            "test_top1": top1 / max(count, 1),
            "test_top5": top5 / max(count, 1),
            "test_loss": loss_sum / max(count, 1),
            "test_epoch": self.best_epoch,
            "student_digests": self.coll.gather_objects(digest),  # one per rank: all equal
        }

    def report(self, epoch: int, record: dict[str, Any]) -> None:
        import ray.train

        self.history.append(record)
        metrics = {k: v for k, v in record.items() if k not in NON_METRIC_KEYS}  # numbers only
        if self.rank != 0:
            ray.train.report(metrics)
            return
        if self.tracker is None:
            from pipeline.train.tracking import Tracker

            name = self.plan.run_dir.rstrip("/").rsplit("/", 1)[-1]
            self.tracker = Tracker(self.cfg.tracking, self.plan.run_dir, name, self.plan.cfg)
        self.tracker.log(record, epoch + 1)
        say(epoch_line(record, self.cfg.train.epochs, self.best))
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(
                {
                    "distiller": self.distiller.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.step_fn.scaler.state_dict(),
                    "rng": torch.get_rng_state(),
                    "epoch": epoch,
                    "history": self.history,
                    "best": self.best,
                    "best_epoch": self.best_epoch,
                    "best_student": self.best_student,
                    "resumes": self.resumes,
                    "world": self.world,
                },
                os.path.join(tmp, STATE_FILE),
            )
            with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
                json.dump(self.plan.cfg, f, indent=1)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{epoch + 1:04d}",
            )


def epoch_line(record: dict[str, Any], epochs: int, best: float) -> str:
    """The one console line of an epoch: loss terms, top-1, rate and time."""
    terms = ", ".join(
        f"{n} {v:.3f}" for n, v in record.items() if n.startswith("train_") and n != "train_top1"
    )
    test = (
        f"; test top-1 {record['test_top1']:.4f} (epoch {record['test_epoch']})"
        if "test_top1" in record
        else ""
    )
    return (
        f"[train] epoch {record['epoch']}/{epochs}: {terms}; top-1 train {record['train_top1']:.4f} "
        f"val {record['val_top1']:.4f} (best {best:.4f}){test}; {record['samples_per_s']:.0f} samples/s, "
        f"{record['epoch_seconds']:.1f} s"
    )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    # Ray Train (2.60) logs each report at INFO through a logger named after its file, under the root logger, so
    # the LoggingConfig level does not reach it ("Reporting training result …", the whole metrics dict); the
    # epoch line says the same in one line. Warnings and errors still show.
    logging.getLogger().setLevel(logging.WARNING)
    run = WorkerRun(config)
    for epoch in range(run.start_epoch, run.cfg.train.epochs):
        t0 = time.time()
        stats, stop_reason = run.train_epoch(epoch)
        if stop_reason is not None:
            say(f"[train] rank {run.rank} stopping: {stop_reason}")
            return
        train_seconds = time.time() - t0
        record = run.finish_epoch(epoch, stats, t0, train_seconds)
        if record is None:
            say(f"[train] rank {run.rank} stopping: a stored file could not be used")
            return
        run.report(epoch, record)
    if run.tracker is not None:
        run.tracker.close()
