"""One worker's training batches, epoch by epoch: each epoch trains on exactly its own rows, in the plan's order.

Runs inside a Ray Train worker; it never resolves configs or plans. The worker reads its lanes of every epoch
(`pipeline/train/order.py`), each lane through one reader for all the epochs the run has left, in order (Ray Data
keeps this dataset's block order): the next epoch's rows are read ahead while this one trains, and since every
lane's share is a whole number of lane batches, epoch e is exactly the next `steps[e]` batches of each lane, never a
row of another epoch. The rows come in their epoch order from the reader (each row group permuted anew every
epoch, `order.row_order`). A thread per lane takes the reader's host batches, mixes each epoch's rows further in a
shuffle buffer of their own only when asked (`train.shuffle_buffer` rows, off under `train.deterministic`; seeded
by (seed, epoch, lane), emptied at the epoch's end), and puts them on the device (`staging`: one copy into a
reused pinned buffer, one copy to the device), so the training thread only takes batches; the batches stay those
of the lanes whatever the worker count.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from pipeline.config import Config
from pipeline.data.views import view_for_epoch
from pipeline.train.batches import ReaderOptions, host_batches
from pipeline.train.order import lane_shares, lanes_of
from pipeline.train.reader import ReadPlan, ShuffleBuffer, Slice, items
from pipeline.train.staging import Staging

POOL_SALT = 0x9E37  # keeps the shuffle buffer's draws apart from other draws keyed on the same seed


def lane_options(opts: ReaderOptions, lanes: int) -> ReaderOptions:
    """One lane's reader when a worker reads `lanes` lanes: an equal part of the worker's read tasks, threads
    and object store (at least one task and one thread)."""
    if lanes <= 1:
        return opts
    return replace(
        opts,
        read_tasks=max(1, opts.read_tasks // lanes),
        read_threads=max(1, opts.read_threads // lanes),
        budget_bytes=opts.budget_bytes // lanes if opts.budget_bytes else None,
    )


def epoch_batches(
    batches: Iterator[dict[str, np.ndarray]], steps: int, buffer: ShuffleBuffer
) -> Iterator[dict[str, np.ndarray]]:
    """The next `steps` batches of `batches` through `buffer`, emptied at the end: each of their rows comes out
    once, and no other row."""
    for _ in range(steps):
        yield from buffer.add(next(batches))
    yield from buffer.finish(drop_last=True)


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class LaneFeeder:
    """One lane's batches for the epochs in `steps` (in order), prepared in a thread: read, mixed within each
    epoch (with a shuffle buffer), put on the device (`staging`); up to `depth` wait in a queue. A reader's error
    is raised in its batch's turn."""

    def __init__(
        self,
        batches: Iterator[dict[str, np.ndarray]],
        steps: dict[int, int],
        buffer,
        staging: Staging,
        depth: int,
    ) -> None:
        self.batches, self.steps, self.buffer, self.staging = batches, steps, buffer, staging
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="camkd-lane", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for epoch, steps in self.steps.items():
                for batch in epoch_batches(self.batches, steps, self.buffer(epoch)):
                    self._put(self.staging(batch))
        except BaseException as e:
            self._put(_Failed(e))

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def next(self) -> dict[str, torch.Tensor]:
        item = self.queue.get()
        if isinstance(item, _Failed):
            raise item.error
        return item.ready()

    def close(self) -> None:
        self.stop.set()


class EpochStream:
    """A worker's readers, one per lane it reads, over every epoch the run has left; `epoch(e)` yields that
    epoch's `steps[e]` batches (the lanes' batches side by side)."""

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
        lanes: int | None = None,
        stage: bool = False,
    ) -> None:
        t = cfg.train
        self.lanes = list(lanes_of(rank, world, lanes or world))
        c = t.batch_size // (lanes or world)
        self.steps: dict[int, int] = {}
        lane_items: list[list[dict[str, Any]]] = [[] for _ in self.lanes]
        for epoch in range(start_epoch, t.epochs):
            shares = lane_shares(units, t.seed, epoch, lanes or world, c)
            self.steps[epoch] = sum(s.size for s in shares[0]) // c
            view = view_for_epoch(epoch, cfg.views.count)
            for mine, lane in zip(lane_items, self.lanes):
                mine += items(shares[lane], view, epoch)
        pool = 0 if t.deterministic else t.shuffle_buffer
        each = lane_options(opts, len(self.lanes))
        self.feeders = []
        for mine, lane in zip(lane_items, self.lanes):
            batches = iter(host_batches(read_plan, mine, each, c, node_id, t.prefetch_batches))

            def buffer(epoch: int, lane: int = lane) -> ShuffleBuffer:
                seed = np.random.SeedSequence([t.seed, epoch, lane, POOL_SALT]).generate_state(1)[0]
                return ShuffleBuffer(c, pool, int(seed))

            # a slot for every batch queued, the one being filled, the one the step holds, and one to spare
            staging = Staging(device, pin_memory, t.prefetch_batches + 3, copy=stage)
            feeder = LaneFeeder(batches, self.steps, buffer, staging, t.prefetch_batches)
            self.feeders.append(feeder)

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of `epoch`: exactly `steps[epoch]` of them, each the lanes' batches side by side."""
        for _ in range(self.steps[epoch]):
            parts = [f.next() for f in self.feeders]
            yield parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def close(self) -> None:
        """Stop the lanes' threads (a run that stops early)."""
        for f in self.feeders:
            f.close()


def share_reader_budget(budget: dict[str, Any], lanes: int) -> None:
    """A worker that reads `lanes` lanes runs one Ray Data executor per lane: each gets an equal part of the
    worker's CPUs and object store (Ray Data copies this process's limits into every executor it starts)."""
    if lanes <= 1:
        return
    import ray.data

    store = budget["object_store_bytes"]
    ray.data.DataContext.get_current().execution_options.resource_limits = ray.data.ExecutionResources(
        cpu=budget["cpus"] / lanes, object_store_memory=store // lanes if store else None
    )
