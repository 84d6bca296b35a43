"""The training reader: which rows each worker reads in each epoch, the Ray Data read task, device decoding.

Rows are addressed by `idx`, their position in the stored (class-stratified, random) order: the training rows
are idx [0, train_end), the validation hold-out idx [train_end, rows) of the training split. Every epoch the
row groups of the training range are put in a new order drawn from (seed, epoch) — not from Ray's own reseeding,
which restarts on resume — and the sequence is cut into equal lanes, a worker reading one or more of them
(`pipeline/train/order.py`; a lane may start or end inside a row group), so every worker takes the same number of
steps. A read task takes a run of such items and,
one row group at a time, reads the image part and each teacher's cache part for that view (column projection,
checksums verified, idx checked row for row), renders the view and yields it; its memory (a few row groups and
what Ray Data buffers into a block) is requested from Ray. Top-k logits and int8 features travel as stored and
are expanded on the training device.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.cache.layout import (
    Manifest,
    StoreRef,
    check_aligned,
    decode_outputs,
    open_cache_part,
    read_cache_rows,
    view_dir,
)
from pipeline.data.ingest import DatasetMeta, open_image_part, read_image_rows
from pipeline.data.views import ViewSpec, render_eval, render_train, uniforms
from pipeline.store import storage
from pipeline.train import inflight
from pipeline.train.blocks import BlockWriter, block_rows, ray_block_target
from pipeline.train.order import lane_shares, row_order

NOISE_SALT = 7919


@dataclass(frozen=True)
class Slice:
    """Rows idx [lo, hi) of one image part (part `name` holds idx [first_idx, first_idx + rows))."""

    part: str
    first_idx: int
    rows: int
    lo: int
    hi: int

    @property
    def size(self) -> int:
        return max(0, min(self.hi, self.first_idx + self.rows) - max(self.lo, self.first_idx))

    def row_groups(self, group_rows: int) -> list[int]:
        start = max(self.lo, self.first_idx) - self.first_idx
        stop = min(self.hi, self.first_idx + self.rows) - self.first_idx
        if stop <= start:
            return []
        return list(range(start // group_rows, (stop - 1) // group_rows + 1))

    def cut(self, lo: int, hi: int) -> Slice:
        return Slice(self.part, self.first_idx, self.rows, max(self.lo, lo), min(self.hi, hi))


@dataclass(frozen=True)
class Ranges:
    """The row ranges of a run: training rows idx [0, train_end), validation idx [val_lo, val_hi) of `val_split`."""

    train_end: int
    val_split: str
    val_lo: int
    val_hi: int
    test_rows: int

    @property
    def val_on_test(self) -> bool:
        return self.val_split == "test"


def split_ranges(meta: DatasetMeta, val_fraction: float, limit_train: int | None) -> Ranges:
    """Training and validation rows for `data.val_fraction` and `train.limit_train` (a prefix of the rest)."""
    n = meta.split("train").rows
    test_rows = meta.split("test").rows
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n_val == 0:
        n_val = 1
    train_end = n - n_val
    if limit_train is not None:
        train_end = min(train_end, limit_train)
    if n_val:
        return Ranges(train_end, "train", n - n_val, n, test_rows)
    return Ranges(train_end, "test", 0, test_rows, test_rows)


def row_group_slices(meta: DatasetMeta, split: str, lo: int, hi: int) -> list[Slice]:
    """One slice per row group of `split` within idx [lo, hi), in stored order."""
    g = meta.row_group_rows
    out = []
    for p in meta.split(split).parts:
        for start in range(p.first_idx, p.first_idx + p.rows, g):
            s = Slice(p.name, p.first_idx, p.rows, max(lo, start), min(hi, start + g))
            if s.size:
                out.append(s)
    return out


def epoch_shares(
    units: list[Slice], seed: int, epoch: int, world: int, per_worker_batch: int
) -> list[list[Slice]]:
    """The training rows of one epoch for each of `world` workers of a run with one lane per worker
    (`pipeline/train/order.py`): the row-group units in an order drawn from (seed, epoch), with locality, then cut
    into `world` contiguous shares of exactly `steps × per_worker_batch` rows each (the remainder, fewer than
    world × per_worker_batch rows, sits this epoch out). A pure function: every worker computes every share, and
    a resumed run computes the same ones."""
    return lane_shares(units, seed, epoch, world, per_worker_batch)


def contiguous_shares(slices: list[Slice], world: int) -> list[list[Slice]]:
    """Evaluation rows for each worker: contiguous shares as equal as rows allow, nothing dropped."""
    total = sum(s.size for s in slices)
    bounds = [round(total * w / world) for w in range(world + 1)]
    shares: list[list[Slice]] = [[] for _ in range(world)]
    pos = 0
    for s in slices:
        lo, hi = max(s.lo, s.first_idx), min(s.hi, s.first_idx + s.rows)
        for w in range(world):
            a, b = max(lo, lo + bounds[w] - pos), min(hi, lo + bounds[w + 1] - pos)
            if a < b:
                shares[w].append(s.cut(a, b))
        pos += hi - lo
    return shares


@dataclass(frozen=True)
class TeacherSource:
    """One teacher's cache store, as the read task needs it: its folder and its manifest's reading facts
    (picklable and small; the manifest is validated once, on the driver)."""

    name: str
    store: str
    ref: StoreRef

    @classmethod
    def from_manifest(cls, name: str, store: str, manifest: Manifest | dict[str, Any]) -> TeacherSource:
        m = manifest if isinstance(manifest, Manifest) else Manifest.model_validate(manifest)
        return cls(name, store, StoreRef.of(m))


@dataclass(frozen=True)
class ReadPlan:
    """Everything a read task needs to build the rows of a slice (picklable, sent to Ray tasks)."""

    dataset_dir: str
    split: str
    image_shape: tuple[int, ...] | None
    spec: dict[str, Any]
    group_rows: int
    num_classes: int
    teachers: tuple[TeacherSource, ...] = ()
    logits: bool = False
    features: bool = False
    label_noise: float = 0.0
    noise_seed: int = 0
    label_swaps: tuple[tuple[int, int], ...] = ()
    shuffle_seed: int = 0
    read_ahead: int = 2  # row groups fetched at least while one is rendered and decoded (scaling.read_ahead)
    # what the row groups in flight of one reader may hold, at most (scaling.read_ahead_mb; `inflight`)
    read_ahead_bytes: int = 256 * 2**20
    retry_seconds: float = 60.0  # storage.retry_seconds
    scope: str | None = None  # one reader's run: open files are remembered within it (tables.open_cached)

    def row_bytes(self) -> int:
        """Bytes one delivered row takes (pixels + teacher outputs): sizes read tasks' memory requests."""
        spec = ViewSpec.from_dict(self.spec)
        if self.image_shape:
            pixels = int(np.prod(self.image_shape))
        else:
            pixels = 3 * spec.size * spec.size
        return pixels + 16 + sum(int(t.ref.bytes_per_sample) for t in self.teachers)

    def group_bytes(self) -> int:
        """Bytes one full row group of delivered rows takes: the unit of a read task's memory."""
        return self.row_bytes() * self.group_rows

    def most_in_flight(self, least: int) -> int:
        """The most row groups one reader keeps in flight (`inflight.most_items`): `read_ahead_bytes` of them."""
        return inflight.most_items(least, self.read_ahead_bytes, self.group_bytes(), 1 + len(self.teachers))


def image_plan(cfg, meta: DatasetMeta, split: str = "train") -> ReadPlan:
    """A ReadPlan for images and labels only (no teacher outputs) of an ingested dataset."""
    from pipeline.data.views import make_view_spec
    from pipeline.store import storage

    return ReadPlan(
        storage.dataset_dir(cfg.root, meta.name, meta.fingerprint),
        split,
        tuple(meta.image_shape) if meta.image_shape else None,
        make_view_spec(cfg, meta.encoding).to_dict(),
        meta.row_group_rows,
        meta.num_classes,
    )


def noisy_labels(
    labels: np.ndarray, idx: np.ndarray, noise: float, seed: int, num_classes: int
) -> np.ndarray:
    """Replace a `noise` fraction of labels by random classes, a pure function of (seed, idx)."""
    u = uniforms(seed + NOISE_SALT, idx, 0, 2)
    random_labels = np.minimum((u[:, 1] * num_classes).astype(np.int64), num_classes - 1)
    return np.where(u[:, 0] < noise, random_labels, labels)


def swapped_labels(labels: np.ndarray, swaps: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Exchange the labels of each class pair (a teacher trained so is confidently wrong on those classes)."""
    out = labels.copy()
    for a, b in swaps:
        out[labels == a] = b
        out[labels == b] = a
    return out


EVAL_VIEW = -1  # the `view` of an item read in the deterministic evaluation view, without teacher outputs


def items(slices: list[Slice], view: int, epoch: int = -1) -> list[dict[str, Any]]:
    """Read items: the slices, each with the view to render (EVAL_VIEW: the evaluation view) and the epoch whose
    row order it takes (-1: stored order)."""
    return [asdict(s) | {"view": view, "epoch": epoch} for s in slices]


# per process: storage reads in flight (they wait on the network, not on a core)
IO_THREADS = inflight.MOST_READS
_io_pool: ThreadPoolExecutor | None = None
_io_lock = threading.Lock()


def _io() -> ThreadPoolExecutor:
    """This process's pool for part reads. Its tasks never wait on the pool themselves, so the reader's own
    threads (scaling.reader: threads) can wait on it without a deadlock. Arrow's own I/O pool, which performs
    the ranged reads (8 threads by default), is widened to match: at 25 ms per request 8 threads cap a process
    at ~320 requests/s, which for logits-only rows is ~80k rows/s whatever the cores. Both start threads only as
    reads need them (`inflight` sizes how many are in flight)."""
    global _io_pool
    with _io_lock:
        if _io_pool is None:
            import pyarrow as pa

            pa.set_io_thread_count(max(pa.io_thread_count(), IO_THREADS))
            _io_pool = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="camkd-io")
        return _io_pool


@dataclass
class _Fetch:
    """The reads of one item in flight: its image rows and each teacher's cache rows, all at once."""

    slice: Slice
    view: int | None  # None: the evaluation view, without teacher outputs
    epoch: int
    image: Future
    teachers: list[tuple[str, Future]]
    spans: inflight.Spans  # when its reads ran

    def done(self) -> bool:
        return self.image.done() and all(f.done() for _, f in self.teachers)


def _read_image(s: Slice, plan: ReadPlan, retry: storage.RetryPolicy):
    part = open_image_part(plan.dataset_dir, plan.split, s.part, retry, plan.scope)
    return read_image_rows(part, s.row_groups(plan.group_rows), retry=retry)


def _fetch(s: Slice, view: int | None, epoch: int, plan: ReadPlan, retry: storage.RetryPolicy) -> _Fetch:
    """Start every read of one item: the image part's row group and each teacher's, concurrently, each part
    opened once per reader run (the footer remembered), each row group one coalesced request."""
    pool = _io()
    spans = inflight.Spans()
    image = pool.submit(spans.timed, _read_image, s, plan, retry)
    teachers = []
    if view is not None:
        groups = s.row_groups(plan.group_rows)
        for src in plan.teachers:
            url = f"{view_dir(src.store, view)}/{s.part}"
            columns = src.ref.fmt.columns(plan.logits, plan.features)
            teachers.append(
                (
                    url,
                    pool.submit(
                        spans.timed, _teacher_rows, url, src, view, s.part, groups, columns, plan, retry
                    ),
                )
            )
    return _Fetch(s, view, epoch, image, teachers, spans)


def _teacher_rows(url, src: TeacherSource, view, part_name, groups, columns, plan: ReadPlan, retry):
    part = open_cache_part(url, src.ref, view, part_name, retry, plan.scope)
    return read_cache_rows(part, src.ref, groups, columns, retry)


def _item_args(fields) -> tuple[Slice, int | None, int]:
    """(slice, view or None for the evaluation view, epoch) of one read item's fields."""
    part, first_idx, rows, lo, hi, view, epoch = fields
    view = int(view)
    return (
        Slice(str(part), int(first_idx), int(rows), int(lo), int(hi)),
        None if view == EVAL_VIEW else view,
        int(epoch),
    )


ITEM_FIELDS = ("part", "first_idx", "rows", "lo", "hi", "view", "epoch")


def _cancel(fetches) -> None:
    """Reads not yet started are dropped (a consumer that stopped early)."""
    for f in fetches:
        f.image.cancel()
        for _, t in f.teachers:
            t.cancel()


def read_slices(
    batch: dict[str, np.ndarray], plan: ReadPlan, batch_rows: int | None = None, rows: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data `map_batches` body (a generator): the rows of the batch's items as blocks of `idx`, `image`
    (uint8 [N,C,H,W] of the item's view, or the evaluation view), `label` (int64) and per teacher k the raw
    cache columns `t{k}_logits` or `t{k}_topk_values/_topk_index/_tail_logit`, and `t{k}_feat`
    (+ `t{k}_feat_scale`); training rows in their epoch order (`order.row_order`). With `batch_rows` (and items
    that carry their `start` in the lane) the rows are gathered into blocks of `rows` rows cut at the lane's batch
    boundaries (`blocks.BlockWriter`); else each item is one block. While one item is rendered and decoded, the
    reads of the next items are in flight (the image part and every teacher's part concurrently; on an object
    store a row group costs about one round trip, not one per part and column): at least `plan.read_ahead`, and as
    many more as the read time this task measures and the pace its yields are taken at need, up to
    `plan.read_ahead_bytes` (`inflight`)."""
    spec = ViewSpec.from_dict(plan.spec)
    retry = storage.retry_policy(plan.retry_seconds)
    work = [_item_args(fields) for fields in zip(*(batch[k] for k in ITEM_FIELDS))]
    writer = None
    if batch_rows and "start" in batch and len(batch["start"]):
        writer = BlockWriter(batch_rows, rows or batch_rows, int(batch["start"][0]))
    least = plan.read_ahead + 1  # the item being decoded and those read ahead
    depth = inflight.for_reader(_reader_key(plan, work, "task"), least, plan.most_in_flight(least))
    pending: deque[_Fetch] = deque()
    nxt, since = 0, time.perf_counter()
    try:
        while nxt < len(work) or pending:
            while nxt < len(work) and len(pending) < depth.depth():
                pending.append(_fetch(*work[nxt], plan, retry))
                nxt += 1
            fetched, waited_from = pending.popleft(), time.perf_counter()
            if writer is None:
                yield from _blocks(fetched, plan, spec)
            else:
                block = _assemble(fetched, plan, spec)
                yield from writer.add(block, _order(fetched, plan, block))
            now = time.perf_counter()
            depth.taken(fetched.spans, since, waited_from, now)
            since = now
        if writer is not None:
            yield from writer.finish()
    finally:
        _cancel(pending)


def _reader_key(plan: ReadPlan, work: list[tuple[Slice, int | None, int]], kind: str) -> tuple | None:
    """What an `inflight` depth is learned for in a process: one reader run (its scope), reader kind, and
    training or evaluation items (they differ in reads per item). None without a scope."""
    if plan.scope is None:
        return None
    return (plan.scope, kind, bool(work) and work[0][1] is None)


def _blocks(fetched: _Fetch, plan: ReadPlan, spec: ViewSpec) -> list[dict[str, np.ndarray]]:
    """An item's rows as the one block a reader yields for it: in training, in their epoch order."""
    block = _assemble(fetched, plan, spec)
    order = _order(fetched, plan, block)
    return [block if order is None else {k: v[order] for k, v in block.items()}]


def _order(fetched: _Fetch, plan: ReadPlan, block: dict[str, np.ndarray]) -> np.ndarray | None:
    """The order of a training item's rows this epoch (`order.row_order`); None: as stored (evaluation)."""
    n = len(block["idx"])
    if fetched.epoch < 0 or n < 2:
        return None
    return row_order(plan.shuffle_seed, fetched.epoch, int(block["idx"][0]), n)


def _assemble(fetched: _Fetch, plan: ReadPlan, spec: ViewSpec) -> dict[str, np.ndarray]:
    """One item's rows from its reads: the view rendered, labels (swapped / noisy for teacher training), and each
    teacher's outputs checked row for row against the image rows."""
    s = fetched.slice
    rows = fetched.image.result()
    group_idx = rows["idx"].to_numpy()
    keep = (group_idx >= s.lo) & (group_idx < s.hi)
    whole = bool(keep.all())
    if not whole:
        rows = rows.filter(keep)
    idx = rows["idx"].to_numpy()
    column = rows["image"]
    if plan.image_shape:  # raw pixels: a view of the fixed-width column (one chunk as read: no copy)
        images = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    else:
        images = column.to_pylist()
    rendered = (
        render_eval(images, spec, plan.image_shape)
        if fetched.view is None
        else render_train(images, idx, fetched.view, spec, plan.image_shape)
    )
    labels = rows["label"].to_numpy().astype(np.int64)
    if plan.label_swaps:
        labels = swapped_labels(labels, plan.label_swaps)
    if plan.label_noise > 0:
        labels = noisy_labels(labels, idx, plan.label_noise, plan.noise_seed, plan.num_classes)
    out: dict[str, np.ndarray] = {"idx": idx, "image": rendered.pixels, "label": labels}
    for k, (src, (url, future)) in enumerate(zip(plan.teachers, fetched.teachers)):
        table = future.result()
        check_aligned(table, url, src.ref, group_idx)
        if not whole:
            table = table.filter(keep)
        for key, value in decode_outputs(table, src.ref, plan.logits, plan.features).items():
            out[f"t{k}_{key}"] = value
    return out


ITEMS_PER_CALL = None  # build_dataset hands read_slices a read task's items in one call (batch_size=None)
TASK_OUTPUT_BYTES = 64 * 2**20  # what one read task aims to yield: fewer, longer tasks for small rows
OUTPUT_BUFFER_BYTES = 128 * 2**20  # Ray Data gathers a task's yields into blocks of up to this size


def items_per_task(plan: ReadPlan, budget_bytes: int | None = None) -> int:
    """Read items (row groups) one read task takes: enough for ~64 MiB of output, 8 to 32, and, with a reader
    budget, at most a quarter of it (a running task yields its whole output whatever the budget says, so a task
    must be small next to the budget; at least 1). Fewer, longer tasks for small rows: a Ray Data task takes tens
    of milliseconds to start (docs/performance.md, "Input pipeline")."""
    n = int(min(32, max(8, TASK_OUTPUT_BYTES // max(1, plan.group_bytes()))))
    if budget_bytes:
        n = min(n, max(1, budget_bytes // (4 * max(1, plan.group_bytes()))))
    return n


def read_memory_bytes(plan: ReadPlan) -> int:
    """Heap a read task asks Ray for: the process (~190 MB with pyarrow and numpy), one row group four times
    over (as read, as rendered/decoded, as an Arrow block, serialised), the most row groups whose reads it keeps
    in flight besides (`ReadPlan.most_in_flight`: `read_ahead` or more, up to `read_ahead_bytes`), and the output
    it holds until Ray Data takes it as a block (up to 128 MiB or the task's whole output; a training task's
    blocks are smaller, `blocks.BLOCK_BYTES`). Measured peaks against this bound: docs/performance.md, "Input
    pipeline"."""
    group = plan.group_bytes()
    held = min(items_per_task(plan) * group, OUTPUT_BUFFER_BYTES)
    return int((3 + plan.most_in_flight(plan.read_ahead + 1)) * group + held + 192 * 2**20)


def build_dataset(
    plan: ReadPlan,
    read_items: list[dict[str, Any]],
    read_cpus: float,
    read_tasks: int | None = None,
    node_id: str | None = None,
    budget_bytes: int | None = None,
    batch_rows: int | None = None,
):
    """A Ray Dataset streaming `read_items` through `read_slices`, in order: each read task takes
    `items_per_task` items in one call (so it can read ahead across them) and yields one row group at a time, or,
    with `batch_rows`, blocks of whole batches of that many rows (`blocks.BlockWriter`, ~`blocks.BLOCK_BYTES`
    each), so its memory is bounded whatever the part size (`read_memory_bytes`). One dataset can span many epochs
    (the worker's whole run): no executor start-up between epochs. With `node_id` the read tasks prefer that node
    (soft affinity): a worker's data is read next to it."""
    import ray.data

    remote_args: dict[str, Any] = {}
    if node_id is not None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # soft alone waits for a busy but feasible node; spilling lets a read run elsewhere when it is full
        strategy = NodeAffinitySchedulingStrategy(node_id, soft=True, _spill_on_unavailable=True)
        remote_args["ray_remote_args_fn"] = lambda: {"scheduling_strategy": strategy}
    rows = block_rows(batch_rows, plan.row_bytes()) if batch_rows else None
    if batch_rows:
        read_items = with_starts(read_items)
    blocks = max(1, -(-len(read_items) // items_per_task(plan, budget_bytes)))
    ds = ray.data.from_items(read_items, override_num_blocks=blocks)
    with warnings.catch_warnings():
        # Ray 2.60 deprecates ray_remote_args_fn; its named replacement (label_selector + fallback_strategy) has
        # no soft node affinity yet, and a hard one would stall a worker whose node is busy.
        warnings.filterwarnings("ignore", message=".*ray_remote_args_fn.* is deprecated")
        ds = ds.map_batches(
            read_slices,
            fn_kwargs={"plan": plan, "batch_rows": batch_rows, "rows": rows},
            batch_size=None,  # a block's items in one call: read_slices reads ahead across them
            batch_format="numpy",
            num_cpus=read_cpus,
            memory=read_memory_bytes(plan),
            concurrency=read_tasks,
            **remote_args,
        )
    if rows:
        ds.context.target_max_block_size = ray_block_target(rows, plan.row_bytes())  # each yield one block
    return ds


def with_starts(read_items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The items, each with `start`: the rows of the items before it (where its rows begin in the lane)."""
    out, start = [], 0
    for item in read_items:
        out.append(item | {"start": start})
        start += min(item["hi"], item["first_idx"] + item["rows"]) - max(item["lo"], item["first_idx"])
    return out


def row_group_items(read_items: list[dict[str, Any]], group_rows: int) -> list[dict[str, Any]]:
    """The read items cut at row-group boundaries: `read_slices` yields the same blocks for them, one each."""
    out = []
    for item in read_items:
        s = Slice(item["part"], item["first_idx"], item["rows"], item["lo"], item["hi"])
        for g in s.row_groups(group_rows):
            lo = s.first_idx + g * group_rows
            out.append(item | asdict(s.cut(lo, lo + group_rows)))
    return out


READ_TASK_RETRIES = 2  # a read that still fails after storage.retry_seconds is tried again this often


def _item_blocks(args, plan: ReadPlan, spec: ViewSpec, retry) -> list[dict[str, np.ndarray]]:
    """One item read again from the start, as a Ray Data read task is retried, when storage stayed unavailable
    (`storage.StorageUnavailable`); corrupt data is never retried."""
    for attempt in range(READ_TASK_RETRIES):
        try:
            return _blocks(_fetch(*args, plan, retry), plan, spec)
        except storage.StorageUnavailable:
            if attempt + 1 == READ_TASK_RETRIES:
                raise
    raise AssertionError("unreachable")


class ShuffleBuffer:
    """Rows gathered into batches of `batch_size` drawn at random from the last `size` + `batch_size` rows
    (`size` 0: in order). Rows are copied into a preallocated pool once, out of it once (into the batch), and
    at most once more inside it (the pool's tail fills the holes a batch leaves)."""

    def __init__(self, batch_size: int, size: int = 0, seed: int | None = None) -> None:
        self.b, self.size = batch_size, size
        self.rng = np.random.default_rng(seed)
        self.pool: dict[str, np.ndarray] = {}
        self.filled = 0
        self.pending: list[dict[str, np.ndarray]] = []  # in-order mode: blocks not yet batched
        self.pending_rows = 0

    def add(self, block: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        n = len(block["idx"])
        if self.size == 0:
            self.pending.append(block)
            self.pending_rows += n
            while self.pending_rows >= self.b:
                yield self._in_order(self.b)
            return
        need = self.filled + n
        if not self.pool or need > len(self.pool["idx"]):
            cap = max(need, self.size + self.b + n)
            grown = {k: np.empty((cap, *v.shape[1:]), v.dtype) for k, v in block.items()}
            for k, v in self.pool.items():
                grown[k][: self.filled] = v[: self.filled]
            self.pool = grown
        for k, v in block.items():
            self.pool[k][self.filled : need] = v
        self.filled = need
        while self.filled >= self.size + self.b:
            yield self._draw(self.b)

    def finish(self, drop_last: bool) -> Iterator[dict[str, np.ndarray]]:
        if self.size == 0:
            while self.pending_rows >= self.b or (not drop_last and self.pending_rows):
                yield self._in_order(min(self.b, self.pending_rows))
            return
        while self.filled >= self.b or (not drop_last and self.filled):
            yield self._draw(min(self.b, self.filled))

    def _in_order(self, n: int) -> dict[str, np.ndarray]:
        first = self.pending[0]
        if len(first["idx"]) >= n:  # the batch lies inside one block: views, no copy (most batches)
            self.pending_rows -= n
            if len(first["idx"]) == n:
                self.pending.pop(0)
            else:
                self.pending[0] = {k: v[n:] for k, v in first.items()}
            return {k: v[:n] for k, v in first.items()}
        pieces, taken = [], 0
        while taken < n:
            block = self.pending[0]
            rows = len(block["idx"])
            take = min(rows, n - taken)
            pieces.append({k: v[:take] for k, v in block.items()})
            if take == rows:
                self.pending.pop(0)
            else:
                self.pending[0] = {k: v[take:] for k, v in block.items()}
            taken += take
        self.pending_rows -= n
        return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}

    def _draw(self, n: int) -> dict[str, np.ndarray]:
        sel = self.rng.choice(self.filled, size=n, replace=False)
        batch = {k: v[sel] for k, v in self.pool.items()}
        end = self.filled - n
        taken = np.zeros(n, dtype=bool)
        taken[sel[sel >= end] - end] = True
        holes = np.sort(sel[sel < end])
        movers = end + np.flatnonzero(~taken)
        for v in self.pool.values():
            v[holes] = v[movers]
        self.filled = end
        return batch


def local_batches(
    plan: ReadPlan,
    read_items: list[dict[str, Any]],
    batch_size: int,
    threads: int,
    drop_last: bool = True,
    shuffle_buffer: int = 0,
    shuffle_seed: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """The `threads` reader: the items' row groups read in this process, in order, and gathered into batches of
    `batch_size` rows (through a local shuffle buffer of `shuffle_buffer` rows when > 0). The reads of the next
    items are in flight on the I/O pool while `threads` threads render and decode (Parquet decoding and the numpy
    gathers release the GIL): at least `2 × threads + read_ahead`, more as the measured read time and the pace
    batches are taken at need, up to `plan.read_ahead_bytes` (`inflight`). Batches never enter Ray's object store:
    no serialisation, no shared-memory copy, no task to schedule; the work shares the training process's CPUs. An
    exception of a read (a corrupt part) is raised here, in the batch's turn; storage that stayed unavailable is
    read again, item by item, as a Ray Data read task would be retried."""
    from concurrent.futures import ThreadPoolExecutor

    spec = ViewSpec.from_dict(plan.spec)
    retry = storage.retry_policy(plan.retry_seconds)
    work = [
        _item_args(tuple(item[k] for k in ITEM_FIELDS))
        for item in row_group_items(read_items, plan.group_rows)
    ]
    buffer = ShuffleBuffer(batch_size, shuffle_buffer, shuffle_seed)
    cpu = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="camkd-read")
    fetching: deque[tuple[Any, _Fetch]] = deque()  # (item, its reads in flight), in order
    assembling: deque[tuple[Any, _Fetch, Future]] = deque()  # (item, its reads, its blocks being built)
    least = 2 * threads + plan.read_ahead
    depth = inflight.for_reader(_reader_key(plan, work, "threads"), least, plan.most_in_flight(least))
    try:
        nxt, since = 0, time.perf_counter()
        while nxt < len(work) or fetching or assembling:
            while nxt < len(work) and len(fetching) + len(assembling) < depth.depth():
                fetching.append((work[nxt], _fetch(*work[nxt], plan, retry)))
                nxt += 1
            # An item goes to a CPU thread once its reads are in (or when nothing else is being built), so the
            # threads render and decode instead of waiting on storage.
            while fetching and len(assembling) < 2 * threads and (not assembling or fetching[0][1].done()):
                args, fetched = fetching.popleft()
                assembling.append((args, fetched, cpu.submit(_blocks, fetched, plan, spec)))
            args, fetched, future = assembling.popleft()
            waited_from = time.perf_counter()
            try:
                blocks = future.result()
            except storage.StorageUnavailable:
                blocks = _item_blocks(args, plan, spec, retry)
            for block in blocks:
                yield from buffer.add(block)
            now = time.perf_counter()
            depth.taken(fetched.spans, since, waited_from, now)
            since = now
        yield from buffer.finish(drop_last)
    finally:
        _cancel(f for _, f in fetching)
        for _, _, future in assembling:
            future.cancel()
        cpu.shutdown(wait=False, cancel_futures=True)


def teacher_outputs_from_batch(
    batch: dict, num_teachers: int, logits: bool, features: bool, num_classes: int
):
    """Batch tensors of `read_slices` (already on the training device) → camkd.TeacherOutputs: top-k logits
    scattered into dense logits and int8 features dequantised, on the device, without a host sync."""
    import torch

    from camkd import TeacherOutputs

    t_logits = None
    dense_logits = [batch.get(f"t{k}_logits") for k in range(num_teachers)]
    if logits and all(t is not None and t.dtype == dense_logits[0].dtype for t in dense_logits):
        t_logits = torch.stack(dense_logits).float()  # two ops whatever the number of teachers
    elif logits:
        dense = []
        for k in range(num_teachers):
            if f"t{k}_logits" in batch:
                dense.append(batch[f"t{k}_logits"].float())
                continue
            values = batch[f"t{k}_topk_values"].float()
            index = batch[f"t{k}_topk_index"].long()
            fill = batch[f"t{k}_tail_logit"].float()
            full = fill[:, None].expand(-1, num_classes).clone()
            dense.append(full.scatter_(1, index, values))
        t_logits = torch.stack(dense)
    t_feats = None
    if features:
        t_feats = []
        for k in range(num_teachers):
            f = batch[f"t{k}_feat"]
            if f.dtype == torch.int8:
                f = f.float() * batch[f"t{k}_feat_scale"].float()[:, :, None, None]
            t_feats.append(f)
    return TeacherOutputs(t_logits, t_feats)
