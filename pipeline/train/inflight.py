"""How many items (row groups) a reader keeps in flight: enough to hide the storage latency it measures at the
rate its consumer takes items (Little's law: in flight = read time × items per second), never fewer than
`scaling.read_ahead` asks for, never more than the reader's memory bound (`scaling.read_ahead_mb`).

The read time planned for is the shortest of the last WINDOW reads, HEADROOM times over: a read's time includes
its decoding, which slows down as more reads share the cores, so an average would grow with the depth it sets
and push it to the bound on a busy machine for no gain; the shortest is the store's latency plus an unhurried
decode, and the headroom leaves room for the store's slower answers. Bookkeeping on timestamps only: it reads
nothing and never waits. What a reader learned is kept per process and reader run (`scope`), so the next read
task of the same run in this process starts at the depth the last one found.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

# reads one process keeps in flight at most (its I/O threads; they wait, they do not compute)
MOST_READS = 256
WINDOW = 32  # the reads whose shortest time is taken
HEADROOM = 2.0  # the read time planned for, × the shortest
SMOOTHING = 0.2  # weight of the newest item in the consumer's running average
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
        self.reads: deque[float] = deque(maxlen=WINDOW)  # the last items' read times
        self.item_s: float | None = (
            None  # the consumer's time per item (running average), read waits left out
        )

    @property
    def read_s(self) -> float | None:
        """The read time planned for (module docstring); None before the first read."""
        return HEADROOM * min(self.reads) if self.reads else None

    def depth(self) -> int:
        read_s = self.read_s
        if read_s is None or self.item_s is None:
            return self.least
        need = math.ceil(read_s / max(self.item_s, FASTEST_ITEM_S)) + 1
        return min(self.most, max(self.least, need))

    def taken(self, spans: Spans, since: float, waited_from: float, now: float) -> None:
        """One item consumed: the consumer's turn for it began at `since`, it waited for the item's data from
        `waited_from`, and its turn ended at `now`. The part of the wait spent on reads does not count as the
        consumer's time."""
        stalled = max(0.0, min(spans.ready_at, now) - waited_from)
        self.reads.append(spans.seconds)
        item_s = max(0.0, now - since - stalled)
        self.item_s = item_s if self.item_s is None else (1 - SMOOTHING) * self.item_s + SMOOTHING * item_s


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
