"""Scoring on every rank: this worker's share of an evaluation split, evaluated with rank 0's BatchNorm statistics
(so every rank scores the one model that is snapshotted and exported), and the test split scored once with the
weights of the best validation epoch. A corrupt or missing file is handed to the run (its next check stops every
rank); nothing here raises for it."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from pipeline.config import Config
from pipeline.train.batches import EvalSet, ReaderOptions, data_error
from pipeline.train.collectives import Collectives
from pipeline.train.plan import TrainPlan
from pipeline.train.reader import Slice, contiguous_shares
from pipeline.train.step import EvalStats, evaluate, share_buffers, state_digest


class Scorer:
    """Evaluation for one worker of a run (`rank` of `world`), on its training device."""

    def __init__(
        self,
        plan: TrainPlan,
        cfg: Config,
        coll: Collectives,
        where: tuple[int, int, str],
        opts: ReaderOptions,
        normalizer,
        amp_dtype: torch.dtype | None,
        on_data_error: Callable[[str], None],
    ) -> None:
        self.plan, self.cfg, self.coll, self.opts = plan, cfg, coll, opts
        self.rank, self.world, self.node_id = where
        self.device = coll.device
        self.normalizer, self.amp_dtype, self.on_data_error = normalizer, amp_dtype, on_data_error
        self.batch = cfg.train.batch_size // self.world

    def eval_set(self, split: str, slices: list[Slice], keep: bool, batch: int | None = None) -> EvalSet:
        """This worker's share of an evaluation split (kept in memory with `keep` when it fits); after a corrupt or
        missing file the share is left empty."""
        mine = contiguous_shares(slices, self.world)[self.rank]
        read = self.plan.read_plan(split, with_teachers=False)
        size = batch or max(self.batch, 256)
        memory = self.cfg.train.eval_memory_mb * 2**20
        try:
            return EvalSet(read, mine, self.opts, self.device, size, self.node_id, memory, keep)
        except Exception as e:
            message = data_error(e)
            if message is None:
                raise
            self.on_data_error(message)
            return EvalSet(read, [], self.opts, self.device, size, self.node_id, memory, keep)

    def score(self, student: torch.nn.Module, data: EvalSet) -> tuple[EvalStats, str]:
        """An evaluation pass with rank 0's BatchNorm statistics on every rank, and the digest of the model scored."""
        share_buffers(student, self.coll)
        digest = state_digest(student.state_dict())
        try:
            backend = "inductor" if self.cfg.train.compile else None
            stats = evaluate(student, data.batches(), self.normalizer, self.amp_dtype, self.device, backend)
        except Exception as e:
            message = data_error(e)
            if message is None:
                raise
            self.on_data_error(message)
            stats = EvalStats(self.device)
        return stats, digest

    def test_best(
        self, student: torch.nn.Module, best_student: dict | None, best_epoch: int
    ) -> dict[str, Any]:
        """The test split, scored once with the weights of the best validation epoch (the exported student)."""
        student = copy.deepcopy(student)
        if best_student is not None:
            student.load_state_dict(best_student)
        data = self.eval_set("test", [Slice(**s) for s in self.plan.test_slices], keep=False)
        stats, digest = self.score(student, data)
        top1, top5, loss_sum, count = self.coll.sum(stats.values).cpu().tolist()
        return {
            "test_top1": top1 / max(count, 1),
            "test_top5": top5 / max(count, 1),
            "test_loss": loss_sum / max(count, 1),
            "test_epoch": best_epoch,
            "student_digests": self.coll.gather_objects(digest),  # one per rank: all equal
        }
