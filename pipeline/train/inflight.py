"""How many items (row groups) a reader keeps in flight: enough to hide the storage latency it measures at the
rate its consumer takes items (Little's law: in flight = read time × items per second), never fewer than
`scaling.read_ahead` asks for, never more than the reader's memory bound (`scaling.read_ahead_mb`).

Bookkeeping on timestamps only: it reads nothing and never waits. What a reader learned is kept per process and
reader run (`scope`), so the next read task of the same run in this process starts at the depth the last one found.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

MOST_READS = (
    256  # reads one process keeps in flight at most (its I/O threads; they wait, they do not compute)
)
SMOOTHING = 0.2  # weight of the newest measurement in the running averages
FASTEST_ITEM_S = 1e-4  # a consumer faster than this per item is taken as this fast (the depth stays finite)


def most_items(least: int, budget_bytes: int, item_bytes: int, reads_per_item: int) -> int:
    """The most items a reader may keep in flight: what `budget_bytes` holds of items of `item_bytes` and what
    the process's I/O threads can read at once, never fewer than `least`."""
    return max(least, min(budget_bytes // max(1, item_bytes), MOST_READS // max(1, reads_per_item)))


class Spans:
    """When the reads of one item ran: each read appends (start, end) from its own thread."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []

    def timed(self, fn: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.spans.append((start, time.perf_counter()))  # list.append is atomic

    @property
    def ready_at(self) -> float:
        """When the last read ended (meaningful once every read has)."""
        return max((end for _, end in self.spans), default=0.0)

    @property
    def seconds(self) -> float:
        """From the first read's start to the last one's end: the item's read time, queueing before it left out."""
        if not self.spans:
            return 0.0
        return self.ready_at - min(start for start, _ in self.spans)


class InFlight:
    """The depth for one reader: `least` until it has measured, then ⌈read time ÷ time per item⌉ + 1 within
    [least, most]."""

    def __init__(self, least: int, most: int) -> None:
        self.least, self.most = max(1, least), max(1, least, most)
        self.read_s: float | None = None  # running average of an item's read time
        self.item_s: float | None = (
            None  # running average of the consumer's time per item, waits for reads left out
        )

    def depth(self) -> int:
        if self.read_s is None or self.item_s is None:
            return self.least
        need = math.ceil(self.read_s / max(self.item_s, FASTEST_ITEM_S)) + 1
        return min(self.most, max(self.least, need))

    def taken(self, spans: Spans, since: float, waited_from: float, now: float) -> None:
        """One item consumed: the consumer's turn for it began at `since`, it waited for the item's data from
        `waited_from`, and its turn ended at `now`. The part of the wait spent on reads does not count as the
        consumer's time."""
        stalled = max(0.0, min(spans.ready_at, now) - waited_from)
        self.read_s = _average(self.read_s, spans.seconds)
        self.item_s = _average(self.item_s, max(0.0, now - since - stalled))


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new


RUNS_KEPT = 8
_learned: OrderedDict[tuple[Any, ...], InFlight] = OrderedDict()
_learned_lock = threading.Lock()


def for_reader(key: tuple[Any, ...] | None, least: int, most: int) -> InFlight:
    """The depth of the reader `key` (its run and what it reads) in this process: the one learned by an earlier
    call with that key and the same bounds, else a new one (key None: always new)."""
    if key is None:
        return InFlight(least, most)
    full = (*key, least, most)
    with _learned_lock:
        found = _learned.get(full)
        if found is None:
            found = _learned[full] = InFlight(least, most)
        _learned.move_to_end(full)
        while len(_learned) > RUNS_KEPT:
            _learned.popitem(last=False)
        return found
