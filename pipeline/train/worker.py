"""The Ray Train worker side of student training: set-up, the epoch loop, and the checks every rank makes together.

Runs inside each Train worker (`train_loop_per_worker`) on a `TrainPlan` (`pipeline/train/plan.py`) resolved on the
driver (`pipeline/train/driver.py`); it never resolves configs, teachers or caches itself. The step
(`pipeline/train/step.py`) makes no host sync: loss terms, hits and per-class weights accumulate in tensors on the
training device, which are all-reduced once per epoch (`pipeline/train/epoch_totals.py`); the non-finite-loss check is
one small all-reduce every `train.nan_check_every` steps. Every collective goes through
`pipeline/train/collectives.py`. Each epoch reads its own share of the training rows in an order drawn from (seed,
epoch) (`pipeline/train/reader.py`), through a Ray Data reader whose budget is this worker's share of its node, not
the cluster; the validation rows are read once and kept in memory when they fit. Scoring (`pipeline/train/scoring.py`)
uses rank 0's BatchNorm statistics on every rank, so every rank scores, keeps and exports one model. After the last
epoch the best-validation weights are scored once on the test split.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import torch

from camkd.compiled import can_compile_whole
from pipeline.data.views import view_for_epoch
from pipeline.store import storage
from pipeline.train.batches import apply_reader_budget, budget_line, data_error
from pipeline.train.checkpoint import RunState
from pipeline.train.collectives import Collectives
from pipeline.train.epoch_totals import EpochTotals
from pipeline.train.epochs import EpochStream, share_reader_budget
from pipeline.train.model import StudentTraining
from pipeline.train.order import resume_lanes, resume_note
from pipeline.train.plan import TrainPlan
from pipeline.train.progress import Progress, StepProfiler, say
from pipeline.train.reader import Slice
from pipeline.train.reporting import Reporter
from pipeline.train.scoring import Scorer
from pipeline.train.step import (
    NO_BAD_STEP,
    CachedTeachers,
    DummyBatch,
    EpochStats,
    EvalStats,
    OnlineTeachers,
    StudentStep,
)

FAILURE_FILE = "failure.json"
RUN_FILE = "run.json"


class WorkerRun:
    """One worker's run: set up from the plan and the last checkpoint, then train epoch by epoch. Its pieces: the
    model and its training (`StudentTraining`), scoring (`Scorer`), the epoch's reduction (`EpochTotals`) and
    reports (`Reporter`); this class keeps the loop, the checks every rank makes together, and the best epoch."""

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
        self.model = StudentTraining.build(plan, cfg, device)
        self.start_epoch, self.history, self.best, self.best_epoch, self.resumes = 0, [], -1.0, 0, 0
        self.best_student: dict[str, torch.Tensor] | None = None
        self.lanes = resume_lanes(cfg.train.lanes, None, self.world)
        self._restore(ray.train.get_checkpoint())
        prepared = ray.train.torch.prepare_model(self.model.distiller, move_to_device=False)
        self.model.step_fn.model = prepared
        if cfg.train.compile:
            self._compile(prepared)
        self.placement = self.coll.gather_objects(
            {"ip": ray.util.get_node_ip_address(), "node_id": self.node_id}
        )
        self.opts = plan.reader_options()
        self.reader_budget = self._set_reader_budget()
        self.student_step = self._student_step()
        self.stream = None
        self.fatal: str | None = None
        h, w = plan.image_hw
        self.dummy = DummyBatch(plan.channels, h, w, self.train_read, self.per_worker_batch, device)
        where = (self.rank, self.world, self.node_id)
        self.scorer = Scorer(
            plan,
            cfg,
            self.coll,
            where,
            self.opts,
            self.normalizer,
            self.model.amp_dtype,
            self._record_data_error,
        )
        self.reporter = Reporter(plan, self.rank)
        self.val = self.scorer.eval_set(plan.val_split, [Slice(**s) for s in plan.val_slices], keep=True)

    def _compile(self, model: torch.nn.Module) -> None:
        """train.compile: the whole step (forward, loss, backward, optimizer) as one graph (`camkd.compiled`);
        where it cannot be (DDP, fp16), the model alone, as before."""
        why = can_compile_whole(model, self.model.optimizer, self.model.amp_dtype)
        if why is None:
            self.model.step_fn.compile_whole()
            return
        if self.rank == 0:
            say(f"[train] train.compile: the model alone ({why})")
        self.model.step_fn.model = torch.compile(model)

    def _student_step(self) -> StudentStep:
        """The step over a batch: teacher outputs from the batch (cached) or from the teachers run here (online)."""
        plan, online = self.plan, self.model.online_teachers
        teachers_in_batch = (
            CachedTeachers(self.train_read, plan.num_classes)
            if online is None
            else OnlineTeachers(
                online,
                plan.needs_features,
                [plan.teacher_preprocessing(k).normalizer() for k in range(self.k)],
            )
        )
        channels_last = self.cfg.train.channels_last and self.device.type == "cuda"
        return StudentStep(self.model.step_fn, self.normalizer, teachers_in_batch, channels_last)

    def _set_reader_budget(self) -> dict[str, Any]:
        """This worker's share of its node for its Ray Data reader (`pipeline/train/batches.py: apply_reader_budget`);
        returns what was set (in the first epoch's record)."""
        from pipeline.ops.runtime import quiet_ray_data

        quiet_ray_data()  # the training readers keep their order themselves (EpochStream)
        s = self.cfg.scaling
        here = sum(1 for p in self.placement if p["node_id"] == self.node_id)
        budget = apply_reader_budget(s, self.opts, self.node_id, here)
        if s.read_budget == "worker":
            self.opts = replace(self.opts, budget_bytes=budget["object_store_bytes"])
            share_reader_budget(budget, self.lanes // self.world)
        if self.rank == 0 and s.reader == "ray_data":
            say(budget_line(budget))
        return budget

    def _restore(self, checkpoint) -> None:
        if checkpoint is None:
            return
        with checkpoint.as_directory() as d:
            state = RunState.load(d, map_location=self.device)
        self.model.restore(state)
        torch.set_rng_state(state.rng.cpu())
        self.start_epoch, self.history = state.epoch + 1, state.history
        self.best, self.best_epoch = state.best, state.best_epoch
        self.best_student = {k: v.cpu() for k, v in state.best_student.items()}
        self.resumes = state.resumes + 1
        was = state.world or self.world
        recorded = state.lanes or was
        self.lanes = resume_lanes(self.cfg.train.lanes, recorded, self.world)
        if self.rank == 0:
            say(f"[train] resuming from the checkpoint of epoch {self.start_epoch} (resume #{self.resumes})")
            if was != self.world:
                batch = self.cfg.train.batch_size
                say(resume_note(self.world, was, self.lanes, recorded, batch, self.start_epoch))

    # ------------------------------------------------------------------------------------------ training
    def _training_stream(self) -> EpochStream:
        """This worker's reader for every epoch the run has left (`pipeline/train/epochs.py`)."""
        return EpochStream(
            self.cfg,
            self.train_read,
            self.units,
            self.opts,
            self.world,
            self.rank,
            self.start_epoch,
            self.device,
            self.node_id,
            self.pin_memory,
            self.lanes,
        )

    def train_epoch(self, epoch: int) -> tuple[EpochStats, str | None]:
        """One epoch over this worker's share; returns its stats and, if a loss went non-finite, why it stopped."""
        if self.stream is None:
            self.stream = self._training_stream()
        steps = self.stream.steps[epoch]
        stats = EpochStats(self.device, self.k, self.plan.num_classes)
        self.model.step_fn.model.train()
        progress = Progress(self, epoch, steps)
        profiler = StepProfiler(self, epoch, steps)
        try:
            return self._train_steps(self.stream.epoch(epoch), epoch, steps, stats, progress, profiler)
        finally:
            profiler.close()

    def _train_steps(
        self, batches, epoch: int, steps: int, stats: EpochStats, progress: Progress, profiler: StepProfiler
    ) -> tuple[EpochStats, str | None]:
        every = self.cfg.train.nan_check_every
        for step in range(steps):
            t0 = time.perf_counter()
            batch = self._next_batch(batches)
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
        student = self.model.distiller.student
        val, digest = self.scorer.score(student, self.val)
        if self._check(None, epoch) is not None:
            return None
        reduced = self._reduce(stats, val)
        val_top1 = reduced["val_top1"]
        if val_top1 > self.best:
            self.best, self.best_epoch = val_top1, epoch + 1
            self.best_student = {k: v.detach().to("cpu", copy=True) for k, v in student.state_dict().items()}
        epoch_lr = self.model.scheduler.get_last_lr()[0]
        self.model.scheduler.step()
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
            test = self.scorer.test_best(student, self.best_student, self.best_epoch)
            if self._check(None, epoch) is not None:
                return None
            record.update(test)
        return record

    def _reduce(self, stats: EpochStats, val: EvalStats) -> dict[str, Any]:
        """Every rank's epoch numbers summed in one all-reduce, then copied to the host once."""
        totals = EpochTotals.reduce(stats, val, self.coll)
        return totals.record(stats.names, self.plan.teacher_names, self.world)

    def report(self, epoch: int, record: dict[str, Any]) -> None:
        """Keep the epoch's record and report it (rank 0: with the run's checkpoint)."""
        self.history.append(record)
        self.reporter.report(epoch, record, self.best, lambda: self._state(epoch))

    def _state(self, epoch: int) -> RunState:
        return RunState(
            epoch=epoch,
            history=self.history,
            best=self.best,
            best_epoch=self.best_epoch,
            best_student=self.best_student,
            resumes=self.resumes,
            world=self.world,
            lanes=self.lanes,
            rng=torch.get_rng_state(),
            **self.model.state(),
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
    run.reporter.close()
