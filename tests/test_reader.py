"""The training reader: rows per worker and epoch, the epoch order, class mixing, and the collectives helper."""

from itertools import pairwise

import numpy as np
import pytest
import torch
from test_ingest import make_image_folder

from pipeline.config import validate
from pipeline.data import ingest
from pipeline.store import storage
from pipeline.train.collectives import CollectiveDeviceError, Collectives
from pipeline.train.order import batch_rows
from pipeline.train.reader import (
    ShuffleBuffer,
    Slice,
    build_dataset,
    contiguous_shares,
    epoch_shares,
    image_plan,
    items,
    local_batches,
    row_group_slices,
    split_ranges,
)


def _units(parts=5, rows=100, group=32, last=60):
    out = []
    for p in range(parts):
        n = last if p == parts - 1 else rows
        first = p * rows
        out += [
            Slice(f"part-{p:05d}.parquet", first, n, s, min(s + group, first + n))
            for s in range(first, first + n, group)
        ]
    return out


def _rows(share):
    return [i for s in share for i in range(max(s.lo, s.first_idx), min(s.hi, s.first_idx + s.rows))]


def test_epoch_shares_are_equal_disjoint_new_every_epoch_and_reproducible():
    units = _units()  # 460 rows in 20 row-group units, the last part short
    for world, batch in ((1, 16), (3, 16), (4, 10)):
        shares = epoch_shares(units, seed=7, epoch=0, world=world, per_worker_batch=batch)
        sizes = [sum(s.size for s in sh) for sh in shares]
        assert len(set(sizes)) == 1 and sizes[0] % batch == 0, "every worker takes the same number of steps"
        assert 460 - sum(sizes) < world * batch, "only a remainder smaller than one global batch sits out"
        rows = [r for sh in shares for r in _rows(sh)]
        assert len(rows) == len(set(rows)), "no row twice in an epoch"
    a = epoch_shares(units, 7, 0, 2, 16)
    assert a == epoch_shares(units, 7, 0, 2, 16), (
        "a pure function of (seed, epoch): a resumed run sees it again"
    )
    b = epoch_shares(units, 7, 1, 2, 16)
    assert [s.lo for s in a[0]] != [s.lo for s in b[0]], "a new order every epoch"
    assert [s.lo for s in a[0]] != [s.lo for s in epoch_shares(units, 8, 0, 2, 16)[0]], "and per seed"


def test_global_batches_do_not_depend_on_the_worker_count():
    """A run of 4 lanes (4 workers, or train.lanes 4) resumed on 2 or 1 workers trains on the same global batches
    (every worker's k-th batch together, as sets) and leaves out the same rows: the plan depends on the lanes, not
    on the worker count. 4,096 rows in 128-row groups, global batch 64 (the issue's check)."""
    units = _units(parts=8, rows=512, group=128, last=512)
    for epoch in (0, 1):
        seen = {}
        for world in (4, 2, 1):
            ranks = [batch_rows(units, 5, epoch, 64, 4, world, r) for r in range(world)]
            assert {len(r) for r in ranks} == {64} and all(len(b) == 64 // world for r in ranks for b in r)
            seen[world] = [frozenset(i for r in ranks for i in r[k]) for k in range(64)]
        assert seen[2] == seen[4] and seen[1] == seen[4], epoch
        assert all(len(b) == 64 for b in seen[4]) and len(set().union(*seen[4])) == 4096
    with pytest.raises(ValueError, match="3 worker"):
        batch_rows(units, 5, 0, 64, 4, 3, 0)


def _lru_reads(lanes: list[list[Slice]], files_per_part: int, capacity: int) -> tuple[float, float]:
    """(file opens, serial round trips) per row group when one process reads `lanes` round-robin, one row group at a
    time, keeping its last `capacity` open files (tables.open_cached): a row group whose files are all open
    costs its read (1 round trip); one that opens any pays open, footer, read in series (3)."""
    from collections import OrderedDict

    cache: OrderedDict = OrderedDict()
    opens = serial = groups = 0
    for step in range(max(len(lane) for lane in lanes)):
        for lane in lanes:
            if step >= len(lane):
                continue
            missed = False
            for f in range(files_per_part):
                key = (lane[step].part, f)
                if key in cache:
                    cache.move_to_end(key)
                    continue
                opens, missed = opens + 1, True
                cache[key] = True
                if len(cache) > capacity:
                    cache.popitem(last=False)
            serial += 3 if missed else 1
            groups += 1
    return opens / groups, serial / groups


def test_a_reader_opens_each_file_about_once_per_epoch_at_imagenet_scale():
    """The ImageNet config's layout (1,251 parts of four 256-row groups; image + 2 teachers = 3 files a part,
    3,753 per view) with 8 lanes: one process that serves all 8 lanes' reads and keeps the last OPEN_FILES (256)
    files open opens a file for at most one row group in three and waits for ~1.5 round trips per row group, not
    ~3 (the row groups of all parts uniformly mixed: ~2.8 opens and ~3 round trips per row group)."""
    from pipeline.store.tables import OPEN_FILES

    units = _units(parts=1251, rows=1024, group=256, last=1024)
    for epoch in (0, 1):
        lanes = epoch_shares(units, 0, epoch, 8, 32)
        opens, serial = _lru_reads(lanes, 3, OPEN_FILES)
        assert opens <= 1.0 and serial <= 1.7, (epoch, opens, serial)
        single = _lru_reads(lanes[:1], 3, OPEN_FILES)
        assert single[0] <= 1.0 and single[1] <= 1.7, (epoch, single)


def test_contiguous_shares_cover_every_evaluation_row_once():
    units = _units(parts=2, rows=50, group=16, last=33)
    for world in (1, 2, 3, 7):
        shares = contiguous_shares(units, world)
        rows = [r for sh in shares for r in _rows(sh)]
        assert rows == list(range(83)), world
        sizes = [len(_rows(sh)) for sh in shares]
        assert max(sizes) - min(sizes) <= 1


def _ingested_sorted_folder(tmp_path, **data):
    src = make_image_folder(tmp_path / "imgs", classes=("a", "b", "c", "d"), per_class=32)
    cfg = validate(
        {
            "root": str(tmp_path / "root"),
            "data": {
                "source": "imagefolder",
                "path": str(src),
                "image_size": 16,
                "rows_per_part": 32,
                **data,
            },
        }
    )
    return cfg, ingest.ingest(cfg)


def test_validation_hold_out_is_the_class_balanced_tail(tmp_path):
    cfg, meta = _ingested_sorted_folder(tmp_path, row_group_rows=8)
    r = split_ranges(meta, 0.25, None)
    assert (r.train_end, r.val_split, r.val_lo, r.val_hi) == (96, "train", 96, 128)
    val = row_group_slices(meta, "train", r.val_lo, r.val_hi)
    ddir = storage.dataset_dir(cfg.root, meta.name, meta.fingerprint)
    labels = []
    for s in val:
        part = ingest.open_image_part(ddir, "train", s.part)
        t = ingest.read_image_rows(part, s.row_groups(meta.row_group_rows), ["idx", "label"])
        keep = (t["idx"].to_numpy() >= s.lo) & (t["idx"].to_numpy() < s.hi)
        labels += t["label"].to_numpy()[keep].tolist()
    assert np.bincount(labels, minlength=4).tolist() == [8, 8, 8, 8]
    assert split_ranges(meta, 0.0, None).val_split == "test"
    assert split_ranges(meta, 0.25, 40).train_end == 40, "train.limit_train takes a prefix of the rest"


def test_training_batches_of_a_class_sorted_folder_are_class_mixed(tmp_path, ray_cluster):
    """Read through the real Ray Data reader, shuffle buffer off, in order: every batch of 16 from a folder read
    class by class holds at least 3 of its 4 classes (class-sorted storage would give 1), and two epochs see
    different batches."""
    from pipeline.ops.runtime import quiet_ray_data

    cfg, meta = _ingested_sorted_folder(tmp_path, row_group_rows=8)
    quiet_ray_data(preserve_order=True)
    try:
        units = row_group_slices(meta, "train", 0, meta.split("train").rows)
        plan = image_plan(cfg, meta)
        seen = []
        for epoch in (0, 1):
            share = epoch_shares(units, 0, epoch, 1, 16)[0]
            batches = list(
                build_dataset(plan, items(share, 0, epoch), 0.5).iter_batches(batch_size=16, drop_last=True)
            )
            assert len(batches) == 8
            for b in batches:
                assert len(np.unique(b["label"])) >= 3, b["label"]
            seen.append([tuple(b["idx"]) for b in batches])
        assert seen[0] != seen[1] and sorted(i for b in seen[0] for i in b) == list(range(128))
    finally:
        quiet_ray_data(preserve_order=False)


def test_the_threads_reader_gives_the_ray_data_readers_batches(tmp_path, ray_cluster):
    """Both readers, in order: the same batches, row for row and pixel for pixel, for training shares that start
    and end inside row groups (3 workers) with every row group permuted anew each epoch, and for evaluation slices
    (last batch short). The training path of the Ray Data reader (`host_batches`) takes the read tasks' blocks,
    cut at batch boundaries, whole: its batches are the plan's rows (`order.lane_rows`), as views of the blocks
    (one batch ends where the next begins in memory), also where tasks of one item each cut batches in two; every
    block's columns are one array each (Ray Data copies a block of several to hand it out)."""
    from pipeline.ops.runtime import quiet_ray_data
    from pipeline.train.batches import ReaderOptions, host_batches
    from pipeline.train.order import lane_rows
    from pipeline.train.reader import EVAL_VIEW

    cfg, meta = _ingested_sorted_folder(tmp_path, row_group_rows=8)
    plan = image_plan(cfg, meta)
    units = row_group_slices(meta, "train", 0, meta.split("train").rows)
    shares = [epoch_shares(units, 0, e, 3, 5)[1] for e in (0, 1)]
    cases = [(items(shares[e], 0, e), True) for e in (0, 1)]
    cases.append((items(contiguous_shares(units, 3)[2], EVAL_VIEW), False))
    quiet_ray_data(preserve_order=True)
    try:
        for read_items, drop_last in cases:
            ray_batches = list(
                build_dataset(plan, read_items, 0.5).iter_batches(
                    batch_size=5, drop_last=drop_last, batch_format="numpy"
                )
            )
            mine = list(local_batches(plan, read_items, 5, threads=3, drop_last=drop_last))
            assert len(mine) == len(ray_batches) > 3
            _assert_same(mine, ray_batches)
        for e, (read_items, _) in enumerate(cases[:2]):
            rows = lane_rows(shares[e], 0, e)
            want = [rows[k : k + 5] for k in range(0, len(rows) // 5 * 5, 5)]
            threads = list(local_batches(plan, read_items, 5, threads=3))
            for budget in (None, plan.group_bytes()):  # whole shares in a task; one row group per task
                opts = ReaderOptions("ray_data", 0.5, 2, 2, budget_bytes=budget)
                blocks = list(host_batches(plan, read_items, opts, 5, None))
                assert [b["idx"].tolist() for b in blocks] == want, budget
                _assert_same(threads, blocks)
                ds = build_dataset(plan, read_items, 0.5, 2, None, budget, batch_rows=5)
                tables = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
                assert sum(t.num_rows for t in tables) == len(rows)
                assert {t.column(c).num_chunks for t in tables for c in t.column_names} == {1}, (
                    "one array each"
                )
                if budget is None:
                    views = sum(
                        a["image"].ctypes.data + a["image"].nbytes == b["image"].ctypes.data
                        for a, b in pairwise(blocks)
                    )
                    assert views == len(blocks) - 1, "each batch a view of the task's one block"
    finally:
        quiet_ray_data(preserve_order=False)


def _assert_same(a_batches, b_batches):
    assert len(a_batches) == len(b_batches)
    for a, b in zip(a_batches, b_batches):
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _epoch_stream(cfg, meta, world, rank, reader="ray_data", lanes=None, **train):
    """A worker's training stream (`EpochStream`) over the ingested folder from epoch 0: through the Ray Data
    reader with two read tasks of two row groups each (a budget that small), or two reader threads."""
    from pipeline.config import with_updates
    from pipeline.train.batches import ReaderOptions
    from pipeline.train.epochs import EpochStream

    cfg = with_updates(cfg, {f"train.{k}": v for k, v in train.items()})
    plan = image_plan(cfg, meta)
    units = row_group_slices(meta, "train", 0, meta.split("train").rows)
    opts = ReaderOptions(reader, 0.5, 2, 2, budget_bytes=8 * plan.group_bytes())
    args = (cfg, plan, units, opts, world, rank, 0, torch.device("cpu"), None)
    return EpochStream(*args, **({"lanes": lanes} if lanes else {})), units


def test_each_epoch_trains_on_exactly_its_own_share(tmp_path, ray_cluster):
    """train.deterministic false (Ray Data's completion order, with and without the shuffle buffer), two read
    tasks: the rows each epoch trains on are exactly that epoch's share, no row of the next epoch early and none
    of this one late (a resumed run would see the early ones again and never the late ones)."""
    cfg, meta = _ingested_sorted_folder(tmp_path, row_group_rows=8)
    for shuffle in (16, 0):
        stream, units = _epoch_stream(
            cfg, meta, 2, 0, epochs=3, batch_size=16, deterministic=False, shuffle_buffer=shuffle, seed=3
        )
        for epoch in range(3):
            got = sorted(int(i) for b in stream.epoch(epoch) for i in b["idx"])
            want = sorted(_rows(epoch_shares(units, 3, epoch, 2, 8)[0]))
            assert len(want) == 64 and got == want, (shuffle, epoch)


def test_one_worker_reading_two_lanes_trains_on_the_batches_of_two_workers(tmp_path):
    """The threads reader, no Ray: a run of 2 lanes resumed on 1 worker trains at every step on what its 2 workers
    trained on together, with the shuffle buffer (mixing each lane within its epoch) and without it (then batch
    for batch the plan's rows, `order.batch_rows`)."""
    cfg, meta = _ingested_sorted_folder(tmp_path, row_group_rows=8)
    for deterministic, shuffle in ((True, 0), (False, 32)):
        train = {"epochs": 2, "batch_size": 16, "deterministic": deterministic, "shuffle_buffer": shuffle}
        one, units = _epoch_stream(cfg, meta, 1, 0, "threads", lanes=2, **train)
        two = [_epoch_stream(cfg, meta, 2, r, "threads", lanes=2, **train)[0] for r in (0, 1)]
        for epoch in (0, 1):
            alone = [b["idx"].tolist() for b in one.epoch(epoch)]
            pair = [x["idx"].tolist() + y["idx"].tolist() for x, y in zip(*(s.epoch(epoch) for s in two))]
            assert len(alone) == len(pair) == 8 and [set(b) for b in alone] == [set(b) for b in pair]
            plan = batch_rows(units, 0, epoch, 16, 2, 1, 0)
            if deterministic:
                assert alone == plan
            else:
                assert alone != plan, "the shuffle buffer mixes"
                assert sorted(i for b in alone for i in b) == sorted(i for b in plan for i in b)


def test_the_shuffle_buffer_mixes_rows_across_blocks_and_loses_none():
    blocks = [
        {"idx": np.arange(s, s + 16), "x": np.arange(s, s + 16)[:, None] * [1, 2]} for s in range(0, 160, 16)
    ]

    def run(size, seed, drop_last):
        buf = ShuffleBuffer(8, size, seed)
        out = [b for block in blocks for b in buf.add(block)]
        return out + list(buf.finish(drop_last))

    in_order = run(0, None, True)
    assert [b["idx"].tolist() for b in in_order] == [list(range(s, s + 8)) for s in range(0, 160, 8)]
    shuffled = run(32, 7, False)
    rows = np.concatenate([b["idx"] for b in shuffled])
    assert sorted(rows.tolist()) == list(range(160)) and all(len(b["idx"]) == 8 for b in shuffled)
    assert all((b["x"] == b["idx"][:, None] * [1, 2]).all() for b in shuffled), "columns stay row-aligned"
    spans = [int(b["idx"].max() - b["idx"].min()) for b in shuffled]
    assert np.median(spans) > 16, "a batch draws from more than one 16-row block"
    assert [b["idx"].tolist() for b in run(32, 7, False)] == [b["idx"].tolist() for b in shuffled]
    assert [b["idx"].tolist() for b in run(32, 8, False)] != [b["idx"].tolist() for b in shuffled]
    buf = ShuffleBuffer(8, 32, 0)
    left = [b for block in blocks[:1] for b in buf.add({k: v[:13] for k, v in block.items()})]
    assert left == [] and [len(b["idx"]) for b in buf.finish(True)] == [8], "drop_last drops the short batch"


def test_collectives_take_only_tensors_of_the_training_device():
    """NCCL takes CUDA tensors only: the helper refuses a tensor on another device before the backend sees it,
    on every backend and world size (here: a worker that trains on cuda, handed a CPU tensor)."""
    coll = Collectives(torch.device("cuda", 0))
    with pytest.raises(
        CollectiveDeviceError, match=r"sum: the tensor is on cpu, but this worker trains on cuda:0"
    ):
        coll.sum(torch.zeros(3))
    with pytest.raises(CollectiveDeviceError, match=r"min: the tensor is on cpu"):
        coll.min(torch.zeros(1))
    cpu = Collectives("cpu")
    assert cpu.sum(torch.ones(2)).tolist() == [1.0, 1.0]  # no process group here: the identity
    assert cpu.gather_objects({"a": 1}) == [{"a": 1}]


def test_staging_puts_a_batch_in_one_reused_buffer():
    """A lane's staging (the GPU's host side, asked for on the CPU): every column of a batch copied into one buffer
    (one copy to the device there) at 64-byte-aligned offsets, values, dtypes and shapes kept, also of a column
    that is not contiguous; the slots are reused in turn, and a larger batch gets a larger buffer."""
    from pipeline.train.staging import Staging

    rng = np.random.default_rng(0)

    def batch(n):
        feats = rng.normal(size=(n, 4, 3, 3)).astype(np.float16)
        return {
            "idx": np.arange(n),
            "image": rng.integers(0, 255, (n, 3, 5, 5), dtype=np.uint8),
            "t0_feat": feats,
            "t0_logits": rng.normal(size=(n, 10)).astype(np.float16)[:, ::2],  # a strided view
        }

    staging = Staging(torch.device("cpu"), pin=False, slots=2, copy=True)
    buffers = []
    for n in (6, 6, 6, 9):
        host = batch(n)
        got = staging(host).ready()
        for k, v in host.items():
            assert got[k].dtype == torch.from_numpy(v[:0]).dtype and tuple(got[k].shape) == v.shape
            np.testing.assert_array_equal(got[k].numpy(), v, err_msg=k)
        storages = {t.untyped_storage().data_ptr() for t in got.values()}
        assert len(storages) == 1, "one buffer per batch"
        assert all(t.data_ptr() % 64 == 0 for t in got.values())
        buffers.append(storages.pop())
    assert buffers[2] == buffers[0] and buffers[1] != buffers[0], "two slots, reused in turn"
    assert buffers[3] != buffers[1], "a larger batch, a larger buffer"
    plain = Staging(torch.device("cpu"), pin=False, slots=2)(batch(4)).ready()
    assert len({t.untyped_storage().data_ptr() for t in plain.values()}) == 4, (
        "on a CPU: the arrays as they lie"
    )
