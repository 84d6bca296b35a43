"""Batches of tensors on the training device, from either reader (Ray Data read tasks, or threads in the training
process), and the evaluation splits a worker keeps in memory.

Runs inside Ray Train workers. Both readers give the same batches in the same order without a shuffle buffer. A
corrupt, missing or misaligned stored file, or one the store refuses to this worker's credentials, is recognised
here (`data_error`) so that the worker stops every rank at once instead of restarting the group over a file that
retrying cannot fix.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.cache.layout import CacheError
from pipeline.data.ingest import IngestError
from pipeline.store.storage import StorageAccessDenied, StorageUnavailable
from pipeline.train.reader import (
    EVAL_VIEW,
    READ_TASK_RETRIES,
    ReadPlan,
    ShuffleBuffer,
    Slice,
    build_dataset,
    items,
    local_batches,
)


@dataclass(frozen=True)
class ReaderOptions:
    """How a worker reads (`scaling.reader` and its knobs), with the read-task count already resolved."""

    reader: str  # "ray_data" | "threads"
    read_cpus: float
    read_tasks: int
    read_threads: int
    budget_bytes: int | None = (
        None  # the object store this worker's Ray Data reader may fill (None: no limit)
    )


READER_STORE_FRACTION = 0.5  # of a node's object store, shared by the readers of the workers on that node


def apply_reader_budget(scaling, opts: ReaderOptions, node_id: str, workers_on_node: int) -> dict[str, Any]:
    """Limit this process's Ray Data executor to one worker's share of its node: read tasks × read CPUs, and half
    the node's object store ÷ the workers on it (or `scaling.read_object_store_mb`). Ray Data's default gives every
    executor the whole cluster's CPUs and half the cluster's object store, so 8 workers of a node, each with its
    own reader, would each buffer for the cluster on that one node; the other half of the node's store stays for
    blocks in transit, as in Ray Data's own default. With `scaling.read_budget: cluster` the
    default is kept. Either way a read that failed after `storage.retry_seconds` is retried as a read task
    (Ray Data's retried_map_errors) before the error reaches the worker. Returns what was set."""
    import ray
    import ray.data

    if scaling.read_object_store_mb is not None:
        store = scaling.read_object_store_mb * 2**20
    else:
        node = next((n for n in ray.nodes() if n.get("NodeID") == node_id), {})
        total = node.get("Resources", {}).get("object_store_memory", 0)
        store = int(READER_STORE_FRACTION * total // max(workers_on_node, 1))
    budget = {
        "reader": scaling.reader,
        "scope": scaling.read_budget,
        "read_tasks": opts.read_tasks,
        "cpus": opts.read_tasks * opts.read_cpus,
        "object_store_bytes": store or None,
        "workers_on_node": workers_on_node,
    }
    ctx = ray.data.DataContext.get_current()
    if scaling.read_budget == "worker":
        ctx.execution_options.resource_limits = ray.data.ExecutionResources(
            cpu=budget["cpus"], object_store_memory=store or None
        )
    ctx.retried_map_errors = ["storage did not answer"]
    ctx.max_map_retries = READ_TASK_RETRIES
    return budget


def budget_line(budget: dict[str, Any]) -> str:
    """The console line that says what a worker's reader may use."""
    if budget["scope"] == "cluster":
        return (
            "[train] reader budget: Ray Data's cluster-wide default (scaling.read_budget: cluster), at most "
            f"{budget['read_tasks']} read task(s) per worker"
        )
    store = budget["object_store_bytes"] or 0
    return (
        f"[train] reader budget per worker: {budget['read_tasks']} read task(s), {budget['cpus']:g} CPU, object "
        f"store {store / 2**20:,.0f} MiB ({budget['workers_on_node']} worker(s) on this node)"
    )


# Most batches are views of a block as read (no copy), often read-only Arrow memory, as in Ray's own
# iter_torch_batches: nothing in training writes into a batch in place. Filtered once for the process, not per
# tensor (catch_warnings on the step's path would swap the filter list twice per tensor).
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def torch_batches(
    read_plan: ReadPlan,
    read_items: list[dict[str, Any]],
    opts: ReaderOptions,
    batch_size: int,
    device: torch.device,
    node_id: str | None,
    drop_last: bool = False,
    prefetch_batches: int = 1,
    pin_memory: bool = False,
    shuffle_buffer: int = 0,
    shuffle_seed: int | None = None,
):
    """Batches of tensors on `device` from `opts.reader`: Ray Data read tasks, or threads in this process."""
    if opts.reader == "ray_data":
        ds = build_dataset(read_plan, read_items, opts.read_cpus, opts.read_tasks, node_id, opts.budget_bytes)
        yield from ds.iter_torch_batches(
            batch_size=batch_size,
            drop_last=drop_last,
            device=device,
            prefetch_batches=prefetch_batches,
            pin_memory=pin_memory,
            local_shuffle_buffer_size=shuffle_buffer or None,
            local_shuffle_seed=shuffle_seed,
        )
        return
    batches = local_batches(
        read_plan, read_items, batch_size, opts.read_threads, drop_last, shuffle_buffer, shuffle_seed
    )
    for batch in batches:
        yield device_batch(batch, device, pin_memory)


def device_batch(
    batch: dict[str, np.ndarray], device: torch.device, pin_memory: bool
) -> dict[str, torch.Tensor]:
    """A host batch as tensors on `device`: one pinned copy (with `pin_memory`) and one asynchronous copy."""
    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(v)
        if pin_memory:
            t = t.pin_memory()
        out[k] = t.to(device, non_blocking=pin_memory)
    return out


def host_batches(
    read_plan: ReadPlan,
    read_items: list[dict[str, Any]],
    opts: ReaderOptions,
    batch_size: int,
    node_id: str | None,
    prefetch_batches: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Full batches of host arrays from `opts.reader`, in the items' order (Ray Data keeps this dataset's order
    whatever the process's settings; the threads reader always does). The Ray Data reader's blocks come cut at
    batch boundaries (`blocks.BlockWriter`) and are taken whole: a batch is a view of its block, copied only
    where it spans two read tasks (Ray Data's own batching would copy every batch)."""
    if opts.reader == "ray_data":
        ds = build_dataset(
            read_plan, read_items, opts.read_cpus, opts.read_tasks, node_id, opts.budget_bytes, batch_size
        )
        ds.context.execution_options.preserve_order = True
        blocks = ds.iter_batches(
            batch_size=None, batch_format="numpy", prefetch_batches=max(1, min(2, prefetch_batches))
        )
        in_order = ShuffleBuffer(batch_size)
        for block in blocks:
            yield from in_order.add(block)
        yield from in_order.finish(drop_last=True)
        return
    yield from local_batches(read_plan, read_items, batch_size, opts.read_threads, drop_last=True)


class EvalSet:
    """One worker's share of an evaluation split: read once and kept on the device when it fits in
    `memory_bytes`, else re-read at every pass."""

    def __init__(
        self,
        read_plan: ReadPlan,
        slices: list[Slice],
        opts: ReaderOptions,
        device,
        batch_size: int,
        node_id,
        memory_bytes: int,
        keep: bool = True,
    ) -> None:
        self.read_plan, self.opts = read_plan, opts
        self.slices, self.device, self.batch_size, self.node_id = slices, device, batch_size, node_id
        self.rows = sum(s.size for s in slices)
        fits = self.rows * read_plan.row_bytes() <= memory_bytes
        self.cached: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if keep and fits and self.rows:
            self.cached = list(self._stream())

    def _stream(self):
        if not self.slices:
            return
        read_items = items(self.slices, EVAL_VIEW)
        for batch in torch_batches(
            self.read_plan, read_items, self.opts, self.batch_size, self.device, self.node_id
        ):
            yield batch["image"], batch["label"]

    def batches(self):
        return iter(self.cached) if self.cached is not None else self._stream()


def data_error(e: BaseException) -> str | None:
    """The message of the corrupt, missing or misaligned stored file behind `e` (a CacheError or IngestError
    raised in a read task, however Ray wrapped it), or of a file the store refuses (StorageAccessDenied: its
    message says whose credentials and the fix, never "delete"), else None. Retrying cannot fix such a file."""
    seen: set[int] = set()
    found = None
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        data = isinstance(e, (CacheError, IngestError)) and not isinstance(e, StorageUnavailable)
        if data or isinstance(e, StorageAccessDenied):
            found = e
        e = getattr(e, "cause", None) or e.__cause__
    if found is None:
        return None
    return str(found).split("\nFailed to apply UDF")[0].strip()
