"""One worker's training batches, epoch by epoch: which rows each epoch reads (`pipeline/train/reader.py`) through
the configured reader, as exactly `steps[epoch]` batches per epoch.

Runs inside a Ray Train worker. It never resolves configs or plans; it reads what the worker hands it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from pipeline.config import Config
from pipeline.data.views import view_for_epoch
from pipeline.train.batches import ReaderOptions, torch_batches
from pipeline.train.reader import ReadPlan, Slice, epoch_shares, items


class EpochStream:
    """One reader for every epoch this run has left: each epoch's share (row groups in an order drawn from
    (seed, epoch), rows reordered inside each row group), read in that order, epoch after epoch, so no epoch
    waits for a reader to start. Every share is a multiple of the batch, so epoch e is exactly its
    `steps[e]` batches (the local shuffle buffer, when on, mixes rows across an epoch boundary)."""

    def __init__(
        self,
        cfg: Config,
        read_plan: ReadPlan,
        units: list[Slice],
        opts: ReaderOptions,
        world: int,
        rank: int,
        start_epoch: int,
        device: torch.device,
        node_id: str | None,
        pin_memory: bool = False,
    ) -> None:
        b = cfg.train.batch_size // world
        read_items: list[dict[str, Any]] = []
        self.steps: dict[int, int] = {}
        for epoch in range(start_epoch, cfg.train.epochs):
            share = epoch_shares(units, cfg.train.seed, epoch, world, b)[rank]
            self.steps[epoch] = sum(s.size for s in share) // b
            read_items += items(share, view_for_epoch(epoch, cfg.views.count), epoch)
        shuffle = cfg.train.shuffle_buffer if not cfg.train.deterministic else 0
        self._batches = iter(
            torch_batches(
                read_plan,
                read_items,
                opts,
                b,
                device,
                node_id,
                drop_last=True,
                prefetch_batches=cfg.train.prefetch_batches,
                pin_memory=pin_memory,
                shuffle_buffer=shuffle,
                shuffle_seed=cfg.train.seed * 100_003 + start_epoch if shuffle else None,
            )
        )

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of `epoch`: exactly `steps[epoch]` of them."""
        for _ in range(self.steps[epoch]):
            yield next(self._batches)
