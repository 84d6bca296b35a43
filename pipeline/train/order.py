"""The order of an epoch's training rows: which rows each lane reads and in what order, and which lanes make up a
worker's batch. Pure functions of (seed, epoch, lanes): every worker computes every lane, a resumed run computes
the same ones; nothing here reads a file or knows the worker's reader.

Lanes. The epoch's row sequence is cut into `lanes` contiguous shares of equal length, a multiple of the lane
batch (batch_size / lanes); step k's global batch is the k-th lane batch of every lane. Worker `rank` of `world`
reads lanes [rank·m, (rank+1)·m), m = lanes / world, and its batch is their k-th lane batches side by side. So the
global batches, and the rows left out of an epoch, depend on the lanes, not on the worker count: a run resumed on
any worker count that divides its lanes trains on the same global batches. Each lane is read by one worker: no
row group is read twice.

Locality. The sequence is two-level: the parts in an order drawn from (seed, epoch), then the row groups of each
window of consecutive parts (at least WINDOW_ROW_GROUPS row groups) in an order drawn from the same. A reader meets
a part's row groups close together, so it opens each file (image part, every teacher's part) about once per
epoch and keeps few open at once, instead of opening one per row group when the row groups of thousands of parts
come uniformly mixed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pipeline.train.reader import Slice

SHUFFLE_SALT = 0x5A17  # keeps the epoch order's stream apart from other draws keyed on the same seed
WINDOW_ROW_GROUPS = 16  # row groups whose order is mixed together: a window of parts holds at least this many


def epoch_sequence(units: list[Slice], seed: int, epoch: int) -> list[Slice]:
    """The row-group units of one epoch in their reading order: parts permuted, then the row groups of each window
    of parts permuted (a window spans at least WINDOW_ROW_GROUPS row groups)."""
    rng = np.random.default_rng([seed, epoch, SHUFFLE_SALT])
    by_part: dict[str, list[Slice]] = {}
    for u in units:
        by_part.setdefault(u.part, []).append(u)
    parts = list(by_part.values())
    per_part = max(1, len(units) // max(1, len(parts)))
    window = -(-WINDOW_ROW_GROUPS // per_part)
    order = rng.permutation(len(parts))
    out: list[Slice] = []
    for w in range(0, len(order), window):
        group = [u for p in order[w : w + window] for u in parts[int(p)]]
        out += [group[int(i)] for i in rng.permutation(len(group))]
    return out


def lane_shares(units: list[Slice], seed: int, epoch: int, lanes: int, lane_batch: int) -> list[list[Slice]]:
    """The rows of one epoch for each of `lanes` lanes: `epoch_sequence` cut into `lanes` contiguous shares of
    exactly `steps × lane_batch` rows each (the remainder, fewer than lanes × lane_batch rows, sits this epoch
    out). A share may start or end inside a row group."""
    total = sum(u.size for u in units)
    share = (total // (lanes * lane_batch)) * lane_batch
    shares: list[list[Slice]] = [[] for _ in range(lanes)]
    if share == 0:
        return shares
    w, filled = 0, 0
    for u in epoch_sequence(units, seed, epoch):
        lo = max(u.lo, u.first_idx)
        hi = min(u.hi, u.first_idx + u.rows)
        while lo < hi and w < lanes:
            take = min(hi - lo, share - filled)
            shares[w].append(u.cut(lo, lo + take))
            lo += take
            filled += take
            if filled == share:
                w, filled = w + 1, 0
        if w == lanes:
            break
    return shares


def lanes_of(rank: int, world: int, lanes: int) -> range:
    """The lanes worker `rank` of `world` reads: a contiguous run of lanes / world."""
    if world < 1 or lanes % world:
        raise ValueError(
            f"{world} worker(s) cannot share {lanes} lane(s): the worker count must divide the lanes"
        )
    m = lanes // world
    return range(rank * m, (rank + 1) * m)


def resume_lanes(configured: int | None, recorded: int | None, world: int) -> int:
    """The lanes of a run: `train.lanes` when set; else those the checkpoint was written with when `world` divides
    them (the same global batches); else one per worker (a fresh run, or a worker count that cannot share the
    recorded lanes: the batches from here on differ from the recorded plan's)."""
    if configured:
        return configured
    if recorded and recorded % world == 0:
        return recorded
    return world


def row_order(seed: int, epoch: int, first_idx: int, rows: int) -> np.ndarray:
    """The order a slice of `rows` rows starting at `first_idx` is delivered in during `epoch`: a permutation
    drawn from (seed, epoch, first_idx), new every epoch, the same on every run and reader."""
    return np.random.default_rng([seed, epoch, first_idx]).permutation(rows)


def lane_rows(share: list[Slice], seed: int, epoch: int) -> list[int]:
    """The idx of a lane's rows in the order its reader delivers them (each slice permuted, see `row_order`)."""
    out: list[int] = []
    for s in share:
        first = max(s.lo, s.first_idx)
        rows = min(s.hi, s.first_idx + s.rows) - first
        out += (first + row_order(seed, epoch, first, rows)).tolist() if rows >= 2 else [first] * rows
    return out


def batch_rows(
    units: list[Slice], seed: int, epoch: int, batch_size: int, lanes: int, world: int, rank: int
) -> list[list[int]]:
    """The idx of worker `rank`'s batch at every step of `epoch` (no shuffle buffer): its lanes' k-th lane
    batches side by side, each lane in the order its reader delivers it."""
    c = batch_size // lanes
    shares = lane_shares(units, seed, epoch, lanes, c)
    mine = [lane_rows(shares[j], seed, epoch) for j in lanes_of(rank, world, lanes)]
    steps = len(mine[0]) // c
    return [[i for rows in mine for i in rows[k * c : (k + 1) * c]] for k in range(steps)]


def resume_note(world: int, was: int, lanes: int, recorded: int, batch_size: int, start_epoch: int) -> str:
    """The console line of a run resumed on `world` workers from a checkpoint written with `was`: what it keeps
    (always the global batch size and each epoch's rows; the global batches when `world` divides the lanes)."""
    head = (
        f"[train] resuming with {world} worker(s); the checkpoint was written with {was}. The global batch stays "
        f"{batch_size} ({batch_size // world} per worker now)"
    )
    if lanes == recorded:
        return (
            f"{head} and so do the global batches: each epoch's rows are cut into the run's {lanes} lanes "
            f"({lanes // world} per worker now), whatever the worker count"
        )
    return (
        f"{head} and each epoch still reads every row once, but {world} worker(s) cannot share the run's "
        f"{recorded} lanes: from epoch {start_epoch + 1} on the rows are cut into {lanes}, so the batches differ "
        "from the ones the run would have trained on (train.lanes set to a multiple of every worker count the run "
        "may resume on keeps them)"
    )
