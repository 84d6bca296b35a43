"""The blocks a training read task yields: each row group's rows in their epoch order (`order.row_order`),
gathered straight into blocks whose boundaries fall on the lane's batch boundaries.

Runs inside Ray Data read tasks. The gather that puts the rows in their epoch order is also the copy that makes
each column one contiguous array, so the training process receives blocks it cuts into batches as views: no
shuffle buffer, no concatenation but where a batch spans two read tasks.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

BLOCK_BYTES = 32 * 2**20  # what a training read task's block holds, about


def block_rows(batch_rows: int, row_bytes: int) -> int:
    """Rows of one full block: the whole batches closest to BLOCK_BYTES (at least one)."""
    return batch_rows * max(1, round(BLOCK_BYTES / max(1, batch_rows * row_bytes)))


def ray_block_target(rows: int, row_bytes: int) -> int:
    """The target block size to give Ray Data for blocks of `rows` rows: Ray Data merges yields smaller than its
    target and slices (without a copy) those over 1.5 × it, so at 1/1.25 of a block each yield stays a block of its
    own even where `row_bytes` (an estimate) is 20 % off, or the block carries part of a batch more."""
    return int(rows * row_bytes / 1.25)


class BlockWriter:
    """Rows in, blocks out: each block is one new array per column of `rows` rows (the first one also carries the
    rows that complete the batch the previous read task began: its items start `start` rows into the lane), and
    the last one whatever is left."""

    def __init__(self, batch_rows: int, rows: int, start: int) -> None:
        self.rows = rows
        self.size = rows + (-start) % batch_rows  # the first block's rows
        self.out: dict[str, np.ndarray] | None = None
        self.filled = 0

    def add(self, block: dict[str, np.ndarray], order: np.ndarray | None) -> Iterator[dict[str, np.ndarray]]:
        """Write `block`'s rows (in `order`, when given) after those written so far; yield each block filled."""
        n, taken = len(block["idx"]), 0
        while taken < n:
            if self.out is None:
                self.out = {k: np.empty((self.size, *v.shape[1:]), v.dtype) for k, v in block.items()}
            m = min(n - taken, self.size - self.filled)
            rows = slice(self.filled, self.filled + m)
            for k, v in block.items():
                if order is None:
                    self.out[k][rows] = v[taken : taken + m]
                else:  # mode="clip" writes into `out` directly ("raise" would buffer the gather first)
                    np.take(v, order[taken : taken + m], axis=0, out=self.out[k][rows], mode="clip")
            taken += m
            self.filled += m
            if self.filled == self.size:
                yield self.out
                self.out, self.filled, self.size = None, 0, self.rows

    def finish(self) -> Iterator[dict[str, np.ndarray]]:
        """The last, partly filled block (if any)."""
        if self.out is not None and self.filled:
            yield {k: v[: self.filled] for k, v in self.out.items()}
        self.out, self.filled = None, 0
