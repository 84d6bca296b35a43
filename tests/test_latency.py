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
