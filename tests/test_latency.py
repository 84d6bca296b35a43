"""Reading over storage latency (`delay://`, no Ray): reads of one open part run at once, as S3's do, and the
reader keeps as many reads in flight as the latency it meets needs, up to its memory bound."""

import threading
import time

from pipeline.config import validate
from pipeline.data import ingest
from pipeline.store import delay, storage, tables


def _synthetic(tmp_path, rows=256, part_rows=64, group_rows=8):
    cfg = validate(
        {
            "root": str(tmp_path / "root"),
            "data": {
                "source": "synthetic",
                "rows_per_part": part_rows,
                "row_group_rows": group_rows,
                "synthetic": {"train": rows, "test": 16, "num_classes": 4, "size": 8},
            },
        }
    )
    return cfg, ingest.ingest(cfg, log=lambda *_: None)


def _delayed(url: str, ms: float) -> str:
    return f"{delay.SCHEME}{ms:g}{storage.normalize_url(url)}"


def test_concurrent_reads_of_one_open_delayed_part_overlap(tmp_path):
    """Four threads read four row groups of one open part at 300 ms per request: the four reads are in flight at
    once (S3 answers ranged GETs of one object in parallel) and take about one round trip, with no further open
    request. Before: Arrow's lock around a Python file's ReadAt held the layer's sleep, 1 read at a time, ~1.2 s."""
    cfg, meta = _synthetic(tmp_path)
    part = meta.split("train").parts[0]
    url = _delayed(
        storage.join(storage.dataset_dir(cfg.root, meta.name, meta.fingerprint), "train", part.name), 300
    )
    table = tables.open_table(url)
    assert table.num_row_groups >= 4
    counters = delay.counters()
    counters.reset()
    start = threading.Barrier(4)

    def read(g):
        start.wait()
        table.read([g], ["idx"])

    threads = [threading.Thread(target=read, args=(g,)) for g in range(4)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    seen = counters.snapshot()
    assert seen["reads"] == 4 and seen["opens"] == 0, seen
    assert seen["peak_reads"] == 4, f"reads of one open part in flight at once: {seen['peak_reads']} of 4"
    assert elapsed < 2 * 0.3, f"4 concurrent reads took {elapsed:.2f} s at 0.3 s per request"


def _in_flight_peak(read, ms: float, consumer_s: float) -> int:
    """The most reads in flight at once while `read()`'s batches are taken at `consumer_s` each, at `ms` per
    request."""
    counters = delay.counters()
    counters.reset()
    for _ in read(ms):
        time.sleep(consumer_s)
    return counters.snapshot()["peak_reads"]


def test_reads_in_flight_grow_with_latency_up_to_the_memory_bound(tmp_path):
    """Both readers' bodies (a Ray Data read task's `read_slices`, the threads reader's `local_batches`), images
    only (one read per row group), a consumer taking 10 ms per row group: at 3 ms per request a row group or two
    in flight cover the latency; at 150 ms 16 would be needed (Little's law), and the reader goes up to its memory
    bound of 8 row groups, never beyond. Before: a fixed depth (read_ahead + 1 items in a read task,
    2 × threads + read_ahead in the threads reader) whatever the latency."""
    from dataclasses import replace

    import numpy as np

    from pipeline.train.reader import image_plan, items, local_batches, read_slices, row_group_slices

    cfg, meta = _synthetic(tmp_path, rows=256, part_rows=64, group_rows=8)
    units = row_group_slices(meta, "train", 0, meta.split("train").rows)
    base = image_plan(cfg, meta)
    bound = 8

    def plan_at(ms):
        return replace(
            base,
            dataset_dir=_delayed(base.dataset_dir, ms),
            read_ahead=0,
            read_ahead_bytes=bound * base.group_bytes(),
        )

    def task(ms):
        rows = items(units, 0)
        batch = {
            k: np.array([r[k] for r in rows], dtype=object if k == "part" else np.int64) for k in rows[0]
        }
        return read_slices(batch, plan_at(ms))

    def threads(ms):
        return local_batches(plan_at(ms), items(units, 0), base.group_rows, threads=1)

    for name, read in (("read task", task), ("threads reader", threads)):
        low = _in_flight_peak(read, 3, 0.03)
        high = _in_flight_peak(read, 150, 0.01)
        assert high <= bound, f"{name}: {high} row groups in flight, over the memory bound of {bound}"
        assert high >= bound - 2, f"{name}: {high} row groups in flight at 150 ms (bound {bound}, 16 needed)"
        assert low <= 3 < high, f"{name}: {low} in flight at 3 ms, {high} at 150 ms"
