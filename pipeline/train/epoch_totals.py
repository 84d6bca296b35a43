"""An epoch's numbers summed over every rank: one all-reduce of one flat tensor on the training device, one copy to
the host, then named fields (no offsets into the flat tensor outside `EpochTotals.reduce`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipeline.train.collectives import Collectives
from pipeline.train.step import EpochStats, EvalStats


@dataclass
class EpochTotals:
    """Every rank's epoch summed: samples seen and hit in training, loss-term sums, the validation pass (top-1 and
    top-5 hits, loss sum, count), per-teacher weight sums and counts per class, and the input wait."""

    seen: float
    correct: float
    term_sums: list[float]
    val_top1: float
    val_top5: float
    val_loss: float
    val_count: float
    class_weight: torch.Tensor  # [max(K, 1), C], summed weights
    class_count: torch.Tensor  # [C]
    input_wait: float  # seconds, summed over ranks

    @classmethod
    def reduce(cls, stats: EpochStats, val: EvalStats, coll: Collectives) -> EpochTotals:
        """One all-reduce (sum) of every rank's numbers, and the epoch's one device→host copy."""
        dev = val.values.device
        terms = (
            stats.term_sums
            if stats.term_sums is not None
            else torch.zeros(0, dtype=torch.float64, device=dev)
        )
        fields = [
            torch.stack([stats.seen, stats.correct]),
            terms,
            val.values,
            stats.class_weight.flatten(),
            stats.class_count,
            torch.tensor([stats.input_wait], dtype=torch.float64, device=dev),
        ]
        summed = coll.sum(torch.cat(fields)).cpu()
        counts, terms, v, cw, cc, wait = torch.split(summed, [f.numel() for f in fields])
        return cls(
            seen=counts[0].item(),
            correct=counts[1].item(),
            term_sums=terms.tolist(),
            val_top1=v[0].item(),
            val_top5=v[1].item(),
            val_loss=v[2].item(),
            val_count=v[3].item(),
            class_weight=cw.view(stats.class_weight.shape),
            class_count=cc,
            input_wait=wait[0].item(),
        )

    def record(self, names: list[str], teacher_names: list[str], world: int) -> dict[str, Any]:
        """The epoch's numbers as its record has them: rates, means per sample, mean weight per teacher and class."""
        per_class = None
        k = len(teacher_names)
        if k and self.class_count.sum() > 0:
            values = (self.class_weight[:k] / self.class_count.clamp_min(1)).tolist()
            per_class = {n: values[i] for i, n in enumerate(teacher_names)}
        count = max(self.val_count, 1)
        return {
            "seen": self.seen,
            "train_top1": self.correct / max(self.seen, 1),
            "val_top1": self.val_top1 / count,
            "val_top5": self.val_top5 / count,
            "val_loss": self.val_loss / count,
            "input_wait": self.input_wait / world,
            "terms": {
                (name if "/" in name else f"train_{name}"): total / max(self.seen, 1)
                for name, total in zip(names, self.term_sums)
            },
            "class_weight": per_class,
        }
