"""The teacher cache: round trip against a direct teacher forward, compression bounds, growth, resume, and every
bad-cache case."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, make_teacher_file, teacher_entries, tiny_config

from camkd.training import normalize
from pipeline.cache import layout, precompute
from pipeline.cache.layout import CacheError, find_store, output_format
from pipeline.config import with_updates
from pipeline.data.ingest import ingest, open_image_part, read_image_rows
from pipeline.data.views import make_view_spec, render_train_view
from pipeline.store import storage
from pipeline.teachers import checkpoints
from pipeline.train.reader import ReadPlan, Slice, TeacherSource, items, read_slices


def _stores(cfg, meta, names):
    """(refs, stores, manifests) of the named teachers for this config's views and format."""
    spec = make_view_spec(cfg, meta.encoding)
    fmt = output_format(cfg, meta)
    refs = checkpoints.resolve_all(cfg, meta.num_classes, meta.channels, names)
    found = [
        find_store(storage.teacher_dir(cfg.root, meta.fingerprint, r.id), r.to_dict(), spec, fmt, [0])
        for r in refs
    ]
    return refs, [s for s, _ in found], [m for _, m in found]


def _rows(cfg, meta, names, part_index, view, logits=True, features=True):
    """Every row of one image part through the training read task (all its row groups, concatenated)."""
    refs, stores, manifests = _stores(cfg, meta, names)
    p = meta.split("train").parts[part_index]
    plan = ReadPlan(
        storage.dataset_dir(cfg.root, meta.name, meta.fingerprint),
        "train",
        tuple(meta.image_shape),
        make_view_spec(cfg, meta.encoding).to_dict(),
        meta.row_group_rows,
        meta.num_classes,
        tuple(TeacherSource.from_manifest(r.name, s, m) for r, s, m in zip(refs, stores, manifests)),
        logits,
        features,
    )
    s = Slice(p.name, p.first_idx, p.rows, p.first_idx, p.first_idx + p.rows)
    batch = {k: np.array([v]) for k, v in items([s], view)[0].items()}
    blocks = list(read_slices(batch, plan))
    return refs, stores, manifests, {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


def _direct(ref, cfg, meta, part, view):
    """The teacher run directly on the same view of the same rows: the ground truth of the cache."""
    spec = make_view_spec(cfg, meta.encoding)
    rows = read_image_rows(
        open_image_part(storage.dataset_dir(cfg.root, meta.name, meta.fingerprint), "train", part), None
    )
    pixels = render_train_view(
        rows["image"].combine_chunks(), rows["idx"].to_numpy(), view, spec, tuple(meta.image_shape)
    )
    model = checkpoints.build_model(ref)
    with torch.no_grad():
        fmap = model.forward_features(normalize(torch.from_numpy(pixels), spec.mean, spec.std))
        return model.forward_head(fmap).numpy(), fmap.numpy()


def test_round_trip_fp16_matches_direct_forward(cached):
    cfg, _, meta, summary, _ = cached
    assert [t["computed_parts"] for t in summary["teachers"]] == [8, 8]  # 4 parts × 2 views
    refs, stores, manifests, rows = _rows(cfg, meta, ["t1", "t2"], 2, view=1)
    assert rows["idx"].tolist() == list(range(128, 192))
    for k, ref in enumerate(refs):
        logits, fmap = _direct(ref, cfg, meta, "part-00002.parquet", 1)
        # fp16 storage: |x − x̂| ≤ 2^-11·|x| (+ float16's subnormal step for tiny values)
        np.testing.assert_allclose(rows[f"t{k}_logits"].astype(np.float32), logits, rtol=2**-11, atol=1e-7)
        np.testing.assert_allclose(rows[f"t{k}_feat"].astype(np.float32), fmap, rtol=2**-11, atol=6e-8)
    manifest = manifests[0]
    assert manifest.feature_shape == [64, 8, 8] and manifest.rows == 256
    assert manifest.view_numbers == [0, 1] and all(len(v.parts) == 4 for v in manifest.views)
    assert manifest.bytes_per_sample["features"] == 64 * 8 * 8 * 2  # one view: C·H·W × 2 bytes
    assert 0.0 <= manifest.accuracy <= 1.0 and manifest.test_accuracy is not None
    head = torch.load(os.path.join(os.path.dirname(stores[0]), "head.pt"), weights_only=True)
    assert set(head) == {"classifier.weight", "classifier.bias"}
    # every part is followed by its receipt, which a resumed run trusts instead of re-reading the part
    part = os.path.join(stores[0], "view-0001", "part-00002.parquet")
    receipt = json.load(open(part + layout.RECEIPT_SUFFIX))
    assert receipt["bytes"] == os.path.getsize(part) and receipt["rows"] == 64 and receipt["view"] == 1


def test_int8_features_and_topk_logits_within_stated_bounds(cached):
    _, cfg_q, meta, _, summary_q = cached
    refs, stores, manifests, rows = _rows(cfg_q, meta, ["t3"], 1, view=0)
    logits, fmap = _direct(refs[0], cfg_q, meta, "part-00001.parquet", 0)
    # int8 with a per-sample, per-channel scale s = max|x_c|/127: |x − x̂| ≤ s/2 (plus the fp16 scale rounding),
    # plus 2^-11·|x| because teacher maps travel from the inference actors to the writers in float16
    q, scale = rows["t0_feat"], rows["t0_feat_scale"].astype(np.float32)
    assert q.dtype == np.int8 and scale.shape == (64, fmap.shape[1])
    deq = layout.dequantize_int8(q, scale)
    bound = np.abs(fmap).reshape(64, fmap.shape[1], -1).max(-1) / 127 * 0.5 * (1 + 2**-8)
    assert (np.abs(deq - fmap) <= bound[:, :, None, None] + 2**-11 * np.abs(fmap) + 1e-7).all()
    # top-k logits travel raw (decoded on the training device); the k largest are exact (fp16), the tail keeps
    # its probability mass
    values, index, fill = rows["t0_topk_values"], rows["t0_topk_index"], rows["t0_tail_logit"]
    assert values.shape == (64, 3) and index.shape == (64, 3) and fill.shape == (64,)
    dense = layout.topk_decode(values, index, fill, 10)
    top = np.argsort(-logits, 1)[:, :3]
    np.testing.assert_allclose(
        np.take_along_axis(dense, top, 1), np.take_along_axis(logits, top, 1), rtol=2**-10, atol=1e-3
    )
    p_full = torch.softmax(torch.from_numpy(logits), 1).numpy()
    p_rec = torch.softmax(torch.from_numpy(dense), 1).numpy()
    mask = np.ones_like(p_full, dtype=bool)
    np.put_along_axis(mask, top, False, 1)
    np.testing.assert_allclose((p_rec * mask).sum(1), (p_full * mask).sum(1), atol=2e-3)
    m = manifests[0]
    assert m.output["logits"] == "topk" and m.output["topk"] == 3 and m.output["features"] == "int8"
    assert m.bytes_per_sample["features"] < 0.6 * 2 * 64 * 8 * 8
    assert stores[0].endswith("-topk3-int8")


def test_int8_quantisation_reads_float16_maps_as_their_float32_copy_and_refuses_overflow():
    """The writers quantise the float16 maps the actors send without widening them first: the same bytes as
    quantising their float32 copy (zero channels, negative peaks, subnormals included). Maps that overflowed
    float16 are refused in both storage formats instead of being written as garbage."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((16, 8, 4, 4)) * rng.uniform(0, 30, (16, 8, 1, 1))).astype(np.float16)
    x[0, 0] = 0
    x[1, 1] = -(x[1, 1] ** 2)
    x[2, 2] = np.float16(1e-6)
    q16, s16 = layout.quantize_int8(x)
    q32, s32 = layout.quantize_int8(x.astype(np.float32))
    assert q16.dtype == np.int8 and np.array_equal(q16, q32) and np.array_equal(s16, s32)
    assert np.abs(q16).max() == 127 and (q16[0, 0] == 0).all()
    x[3, 4, 1, 2] = np.inf
    for features in ("int8", "fp16"):
        fmt = layout.OutputFormat("fp16", 10, features, 5)
        with pytest.raises(ValueError, match="teacher features hold"):
            layout.encode_outputs(np.arange(16), np.zeros((16, 5), np.float32), x, fmt)


def test_second_run_added_teacher_and_more_views_compute_only_whats_missing(cached, tmp_path):
    cfg, _, meta, *_ = cached
    again = precompute.run_stage(cfg)
    assert [t["computed_parts"] for t in again["teachers"]] == [0, 0] and again["renders"] == 0
    root = tmp_path / "root"
    shutil.copytree(cfg.root, root)
    new = make_teacher_file(tmp_path / "t4.pt", "resnet8", seed=9)
    added = with_updates(
        cfg,
        {
            "root": str(root),
            "teachers": [
                *(t.model_dump() for t in cfg.teachers),
                {"name": "t4", "arch": "resnet8", "checkpoint": str(new)},
            ],
        },
    )
    rows = precompute.run_stage(added)["teachers"]
    assert [(t["teacher"], t["computed_parts"], t["reused_parts"]) for t in rows] == [
        ("t1", 0, 8),
        ("t2", 0, 8),
        ("t4", 8, 0),
    ]
    # Growing V from 2 to 3: view v is a pure function of (seed, idx, v), so only view 2 is computed, and the
    # store stays readable for runs with V = 2.
    grown = precompute.run_stage(with_updates(added, {"views.count": 3}))
    assert [(t["computed_parts"], t["views"]) for t in grown["teachers"]] == [(4, [0, 1, 2])] * 3
    assert grown["renders"] == 256, "one render per (image, view) for all three teachers together"
    refs, stores, manifests = _stores(added, meta, ["t1"])
    assert manifests[0].view_numbers == [0, 1, 2] and stores[0] == _stores(added, meta, ["t1"])[1][0]


def test_one_render_per_image_and_view_whatever_the_number_of_teachers(ray_cluster, teacher_files, tmp_path):
    counts = []
    for names in (("t1",), ("t1", "t2", "t3")):
        cfg = tiny_config(
            tmp_path / "-".join(names),
            teachers=teacher_entries(teacher_files, names),
            cache={"eval_test": False},
        )
        ingest(cfg)
        counts.append(precompute.run_stage(cfg)["renders"])
    assert counts == [256 * 2, 256 * 2]


def _copy(cfg, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(cfg.root, root)
    return with_updates(cfg, {"root": str(root)})


def flip_bytes_in_data_pages(path: str, column_start: int = 4096, count: int = 64) -> None:
    """Corrupt a part the way a bad disk or a broken copy does: bytes inside its data pages change, the file
    keeps its size and stays valid Parquet."""
    data = bytearray(open(path, "rb").read())
    mid = min(column_start, len(data) // 2)
    data[mid : mid + count] = bytes(b ^ 0x5A for b in data[mid : mid + count])
    open(path, "wb").write(bytes(data))


@pytest.mark.fault
def test_bad_parts_are_refused_with_the_file_and_the_fix(cached, tmp_path):
    cfg, _, meta, *_ = cached
    cfg = _copy(cfg, tmp_path)
    refs, stores, manifests = _stores(cfg, meta, ["t1", "t2"])
    s1, m1 = stores[0], manifests[0]
    v0 = os.path.join(s1, "view-0000")

    ref = layout.StoreRef.of(m1)

    def read(part, expected_idx):
        opened = layout.open_cache_part(os.path.join(v0, part), ref, 0, part)
        table = layout.read_cache_rows(opened, ref, [0], ["idx", "logits", "feat"])
        layout.check_aligned(table, opened.url, ref, expected_idx)
        return table

    # bytes flipped inside a data page, size unchanged: the column checksums catch it
    flip_bytes_in_data_pages(os.path.join(v0, "part-00000.parquet"))
    layout.check_parts_present(m1, s1, [0])  # same size: the cheap pre-flight cannot see it ...
    with pytest.raises(
        CacheError,
        match=r"part-00000\.parquet of teacher 't1' is corrupt \(column 'feat', row group 0 .*re-run",
    ):
        read("part-00000.parquet", np.arange(64))  # ... the reader does, before training uses a byte of it
    # truncated part: the pre-flight size check and the reader both name it
    part = os.path.join(v0, "part-00001.parquet")
    data = open(part, "rb").read()
    open(part, "wb").write(data[: len(data) // 2])
    with pytest.raises(
        CacheError, match=r"part-00001\.parquet of teacher 't1' has \d+ bytes.*truncated.*precompute"
    ):
        layout.check_parts_present(m1, s1, [0])
    with pytest.raises(
        CacheError, match=r"part-00001\.parquet of teacher 't1' is corrupt.*re-run precompute"
    ):
        read("part-00001.parquet", np.arange(64, 128))
    truncated = data[: len(data) // 2]
    open(part, "wb").write(data)  # restored for now: the pre-flight stops at the first bad part
    # missing part
    os.remove(os.path.join(v0, "part-00002.parquet"))
    with pytest.raises(
        CacheError, match=r"part-00002\.parquet of teacher 't1' is missing; re-run precompute"
    ):
        layout.check_parts_present(m1, s1, [0])
    with pytest.raises(
        CacheError, match=r"part-00002\.parquet of teacher 't1' is missing; re-run precompute"
    ):
        read("part-00002.parquet", np.arange(128, 192))
    # misplaced part (the rows of another image part)
    shutil.copy(os.path.join(s1, "view-0001", "part-00003.parquet"), os.path.join(v0, "part-00003.parquet"))
    with pytest.raises(
        CacheError, match=r"part-00003\.parquet .* holds view 1 of part-00003.parquet, not view 0"
    ):
        read("part-00003.parquet", np.arange(192, 256))
    # a part of another teacher
    shutil.copy(
        os.path.join(stores[1], "view-0000", "part-00003.parquet"), os.path.join(v0, "part-00003.parquet")
    )
    with pytest.raises(
        CacheError, match=r"was written for teacher 'resnet14-.*not 'resnet8-.*copied from another"
    ):
        read("part-00003.parquet", np.arange(192, 256))
    # precompute refuses to overwrite the foreign part silently, and repairs everything with --overwrite
    open(part, "wb").write(truncated)
    os.remove(os.path.join(v0, "part-00003.parquet" + layout.RECEIPT_SUFFIX))
    storage.remove(os.path.join(s1, "manifest.json"))
    with pytest.raises(CacheError, match="refusing to overwrite a foreign cache part"):
        precompute.run_stage(cfg)
    fixed = precompute.run_stage(cfg, overwrite=True)
    # part 1 (truncated: receipt size differs), 2 (missing), 3 (foreign); part 0 keeps its receipt and size, and
    # a resumed precompute does not re-read finished parts: the corruption is the reader's to catch (above)
    assert fixed["teachers"][0]["computed_parts"] == 3


@pytest.mark.fault
def test_other_views_format_checkpoint_or_an_old_layout_are_refused_saying_what_to_do(
    cached, tmp_path, teacher_files
):
    cfg, _, meta, *_ = cached
    spec = make_view_spec(cfg, meta.encoding)
    fmt = output_format(cfg, meta)
    t1 = checkpoints.resolve(cfg, cfg.teachers[0], meta.num_classes, meta.channels)
    tdir = storage.teacher_dir(cfg.root, meta.fingerprint, t1.id)
    # another view spec lives beside the existing one: not found, naming what this teacher has
    other = make_view_spec(with_updates(cfg, {"views.seed": 5}), meta.encoding)
    with pytest.raises(
        CacheError, match=r"no cache for view family .* this teacher has: .*-fp16-fp16 \(views 0, 1\)"
    ):
        find_store(tdir, t1.to_dict(), other, fmt, [0])
    with pytest.raises(
        CacheError, match=r"holds views \[0, 1\], the run needs \[2, 3\].*computes only the missing"
    ):
        find_store(tdir, t1.to_dict(), spec.with_count(4), fmt, [0, 1, 2, 3])
    # a store made from another checkpoint under the same name
    retrained = t1.to_dict() | {"sha256": "f" * 64}
    with pytest.raises(CacheError, match=r"made from checkpoint sha256 .* teacher 't1' is now ffffffffffff"):
        find_store(tdir, retrained, spec, fmt, [0])
    # a cache written by camkd-ray's first format: a clear "rebuild"
    old = tmp_path / "old-teacher"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"format": 1, "parts": []}))
    with pytest.raises(CacheError, match=r"older camkd-ray \(cache format 1\); rebuild it: delete"):
        find_store(str(old), t1.to_dict(), spec, fmt, [0])
    with pytest.raises(CacheError, match=r"cache format 1, this version reads 2\); rebuild it"):
        layout.load_manifest(str(old), "t1")


@pytest.mark.slow
@pytest.mark.fault
def test_killed_precompute_resumes_with_missing_parts_only(ray_cluster, teacher_files, tmp_path):
    """A real interrupted process: SIGKILL the precompute driver mid-run, re-run, compare with a clean run."""
    import ray

    slow = {"name": "big", "arch": "resnet32x4", "checkpoint": str(tmp_path / "big.pt")}
    make_teacher_file(tmp_path / "big.pt", "resnet32x4", seed=7)
    data = {"rows_per_part": 16, "synthetic": {"train": 192, "test": 16, "num_classes": 10, "size": 32}}
    cache_cfg = {"actors": 1, "cpus_per_actor": 1, "batch_size": 16, "eval_test": False}
    cfg = tiny_config(tmp_path / "a", data=data, teachers=[slow], cache=cache_cfg, views={"count": 1})
    ingest(cfg)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "pipeline/run.py"), "precompute", "--config", str(cfg_file)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    meta = ingest(cfg)
    ref = checkpoints.resolve(cfg, cfg.teachers[0], 10, 3)
    store = layout.store_dir(
        storage.teacher_dir(cfg.root, meta.fingerprint, ref.id),
        make_view_spec(cfg, meta.encoding),
        output_format(cfg, meta),
    )
    vdir = os.path.join(store, "view-0000")
    deadline = time.time() + 180
    while time.time() < deadline:
        done = [n for n in storage.listdir(vdir) if n.endswith(layout.RECEIPT_SUFFIX)]
        if len(done) >= 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = sorted(n for n in storage.listdir(vdir) if n.endswith(layout.RECEIPT_SUFFIX))
    assert 2 <= len(before) < 12, f"kill came too late/early: {before}"
    assert not storage.exists(os.path.join(store, "manifest.json"))
    resumed = precompute.run_stage(cfg)["teachers"][0]
    assert resumed["computed_parts"] == 12 - len(before) and resumed["reused_parts"] == len(before)
    clean_cfg = with_updates(cfg, {"root": str(tmp_path / "b")})
    ingest(clean_cfg)
    precompute.run_stage(clean_cfg)
    a = layout.load_manifest(store)
    b = layout.load_manifest(store.replace(str(tmp_path / "a"), str(tmp_path / "b")))
    assert [p.digest for p in a.views[0].parts] == [p.digest for p in b.views[0].parts], "resumed = clean run"
    assert not [n for n in storage.listdir(vdir) if storage.TMP_MARK in n]


@pytest.mark.fault
def test_asking_for_gpus_the_cluster_lacks_is_a_clear_error(cached, tmp_path):
    cfg, _, meta, *_ = cached
    gpu = with_updates(_copy(cfg, tmp_path), {"cache.use_gpu": True, "views.count": 3})
    with pytest.raises(
        CacheError, match=r"cache.use_gpu is true but the cluster has no GPU.*cache.wait_for_gpus"
    ):
        precompute.run_stage(gpu)


def test_the_pool_plan_follows_the_autoscalers_gpus_not_only_those_up(tmp_path):
    """`cache.use_gpu: auto` uses GPUs when the autoscaler can add them, though none is up at plan time; the pool's
    maximum is the autoscaling maximum, else cache.max_actors / cache.actors, else the GPUs up or 8; a CPU pool
    on several nodes leaves a render and a write task room; `use_gpu: true` that nothing can meet fails at once."""
    cfg = tiny_config(tmp_path, cache={"actors": "auto"})
    no_gpu, four_gpus = {"CPU": 8.0}, {"CPU": 64.0, "GPU": 4.0}
    grows = precompute.pool_plan(cfg, 1000, no_gpu, {"CPU": 256, "GPU": 32})
    assert (grows.use_gpu, grows.low, grows.high) == (True, 1, 32)
    assert "up to 32 with the autoscaler" in grows.line(2)
    static = precompute.pool_plan(cfg, 1000, four_gpus, None)
    assert (static.use_gpu, static.high) == (True, precompute.DEFAULT_MAX_GPU_ACTORS)
    assert precompute.pool_plan(cfg, 3, four_gpus, None).high == 3, "never more replicas than items"
    capped = with_updates(cfg, {"cache.max_actors": 2})
    assert precompute.pool_plan(capped, 1000, no_gpu, {"GPU": 32}).high == 2
    cpu = precompute.pool_plan(
        cfg, 1000, no_gpu, None, nodes=2
    )  # 8 CPUs - (0.5 render + 0.5 write), 0.5 each
    assert (cpu.use_gpu, cpu.high) == (False, 14)
    assert precompute.pool_plan(cfg, 1000, no_gpu, None, nodes=1).high == 16, "one machine: no node to lose"
    with pytest.raises(CacheError, match="no GPU and no autoscaler config"):
        precompute.pool_plan(with_updates(cfg, {"cache.use_gpu": True}), 10, no_gpu, {"CPU": 99})
    assert precompute.pool_plan(with_updates(cfg, {"cache.use_gpu": True}), 10, no_gpu, {"GPU": 1}).use_gpu


def test_the_gpu_pipeline_is_one_ray_accepts(cached):
    """Ray Data refuses some stage arguments only when a stage asks for GPUs (batch_size=None did): build the
    GPU pipeline (lazily: this cluster has no GPU to run it) and see Ray accept every stage."""
    cfg, *_ = cached
    item = {"part": "part-00000.parquet", "view": 0, "mask": 1}
    memory = {"render": 2**28, "infer": 2**29, "write": 2**28}
    ds = precompute.stages([item], ps=None, cfg=cfg, use_gpu=True, replicas=(1, 2), memory=memory)
    assert "TeacherPool" in str(ds)


def test_device_encoders_store_the_bytes_of_the_numpy_encoders():
    """The actors encode on their device (torch): int8 maps bit-identical to quantize_int8 of the same float16
    maps (zero, tiny, huge and negative channels), top-k the same index set with equal values and the same
    tail logit as topk_encode, fp16 logits and maps as the NumPy cast; the stored tables are equal byte for byte."""
    import torch

    from pipeline.cache import encode

    rng = np.random.default_rng(7)
    scales = rng.choice([1e-4, 0.3, 7.0, 900.0], size=(48, 16, 1, 1))
    maps = (rng.standard_normal((48, 16, 5, 5)) * scales).astype(np.float32)
    maps[2, 3] = 0.0
    maps[5] = -np.abs(maps[5])
    logits = (rng.standard_normal((48, 100)) * 5).astype(np.float32)
    idx = np.arange(48)
    for fmt in (
        layout.OutputFormat("fp16", 0, "fp16", 100),
        layout.OutputFormat("fp16", 0, "int8", 100),
        layout.OutputFormat("topk", 12, "int8", 100),
    ):
        cols = encode.encode_logits(torch.from_numpy(logits), fmt) | encode.encode_features(
            torch.from_numpy(maps), fmt
        )
        cols = {k: v.numpy() for k, v in cols.items()}
        assert not bool(encode.not_finite(*(torch.from_numpy(v) for v in cols.values())))
        reference = layout.encode_outputs(idx, logits, maps.astype(np.float16), fmt)
        if fmt.logits == "fp16":
            assert layout.stored_table(idx, cols, fmt).equals(reference), fmt.key
            continue
        values, index, fill = layout.topk_encode(logits, fmt.topk)
        assert [set(a) for a in index] == [set(b) for b in cols["topk_index"]]
        order = np.argsort(index, 1), np.argsort(cols["topk_index"], 1)
        np.testing.assert_array_equal(
            np.take_along_axis(values, order[0], 1), np.take_along_axis(cols["topk_values"], order[1], 1)
        )
        np.testing.assert_array_equal(fill, cols["tail_logit"])
        q, s = layout.quantize_int8(maps.astype(np.float16))
        np.testing.assert_array_equal(cols["feat"], q)
        np.testing.assert_array_equal(cols["feat_scale"], s)
    bad = maps.copy()
    bad[0, 0, 0, 0] = 1e6  # beyond float16: inf as stored
    cols = encode.encode_features(torch.from_numpy(bad), layout.OutputFormat("fp16", 0, "int8", 100))
    assert bool(encode.not_finite(*cols.values()))


def test_a_part_is_encoded_and_written_holding_one_copy_of_its_bytes(tmp_path):
    """The write stage keeps one copy of a part in memory: Parquet writes into one buffer sized up front (not a
    buffer that grows by doubling), and the file goes to storage from that buffer (no second copy as `bytes`).
    Arrow's peak allocation plus the Python heap's peak while a part is encoded and written ≤ 1.25 × the file."""
    import tracemalloc

    import pyarrow as pa

    from pipeline.store import tables

    rng = np.random.default_rng(0)
    rows, fmt = 512, layout.OutputFormat("fp16", 0, "fp16", 100)
    cols = {
        "logits": rng.standard_normal((rows, 100)).astype(np.float16),
        "feat": rng.standard_normal((rows, 16, 16, 16)).astype(np.float16),
    }
    table = layout.stored_table(np.arange(rows), cols, fmt)
    previous, pool = pa.default_memory_pool(), pa.proxy_memory_pool(pa.default_memory_pool())
    pa.set_memory_pool(pool)
    tracemalloc.start()
    try:
        encoded = tables.encode_table(table, 256, {b"camkd": b"{}"})
        tables.write_table(str(tmp_path / "part.parquet"), encoded)
        python_peak = tracemalloc.get_traced_memory()[1]
        encoded_size = encoded.size
        del encoded  # its buffer may come from `pool`: freed while the pool is alive
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(previous)
    size = (tmp_path / "part.parquet").stat().st_size
    assert size == encoded_size
    assert pool.max_memory() + python_peak <= 1.25 * size, (pool.max_memory(), python_peak, size)


def test_a_part_beyond_its_size_bound_is_encoded_the_same(monkeypatch):
    """When the Parquet file outgrows the buffer sized for it up front, it is written again into a growing buffer:
    the same bytes and digest, nothing cut off."""
    from pipeline.store import tables

    table = layout.stored_table(
        np.arange(300), {"logits": np.ones((300, 10), np.float16)}, layout.OutputFormat("fp16", 0, "none", 10)
    )
    fitting = tables.encode_table(table, 64, {b"camkd": b"{}"})
    monkeypatch.setattr(tables, "_size_bound", lambda *_: 100)
    grown = tables.encode_table(table, 64, {b"camkd": b"{}"})
    assert grown.data.to_pybytes() == fitting.data.to_pybytes() and grown.digest == fitting.digest
    assert fitting.size > 100


def test_the_finiteness_check_reads_the_outputs_without_copying_them():
    """The actor flags inf/NaN in every stored float column (float16 overflows beyond 65504) with one reduction
    per column and no temporary the size of the outputs (today's `isfinite().all()` made 3 bool copies)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from pipeline.cache import encode

    class Allocations(TorchDispatchMode):
        """Bytes of the new tensors every aten op makes."""

        bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            given = {t.data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.data_ptr() not in given:
                    self.bytes += t.nbytes
            return out

    maps = torch.randn(64, 32, 8, 8).clamp(-6e4, 6e4).half()
    logits, tail, quantised = torch.randn(64, 100).half(), torch.randn(64), maps.to(torch.int8)
    with Allocations() as seen:
        assert not bool(encode.not_finite(maps, logits, tail, quantised))
    assert seen.bytes <= 64, seen.bytes  # a few scalars
    maps[0, 0, 0, 0] = 65504  # float16's largest: finite
    assert not bool(encode.not_finite(maps))
    for bad in (float("inf"), float("-inf"), float("nan")):
        for t in (maps, tail):
            broken = t.clone()
            broken.view(-1)[7] = bad
            assert bool(encode.not_finite(logits, broken)), (bad, t.dtype)


def test_the_actor_copies_the_next_batch_in_before_this_batchs_outputs_out(tmp_path):
    """On a GPU the actor queues its copies in issue order: the pixels of batch i+1 go to the device before batch
    i's outputs come back (which wait for batch i's compute), so neither copy waits behind the other and both
    overlap compute (the trace is `benchmarks/actor_trace.py`, a step of `benchmarks/gpu_session.sh`). On the CPU
    the copies are no-ops in the same order, and the outputs are the same."""
    from pipeline.cache.layout import OutputFormat
    from pipeline.cache.stages import PrecomputeSpec, TeacherPool

    make_teacher_file(tmp_path / "t.pt", "resnet8")
    cfg = tiny_config(
        tmp_path, teachers=[{"name": "t", "arch": "resnet8", "checkpoint": str(tmp_path / "t.pt")}]
    )
    ref = checkpoints.resolve_all(cfg, 10, 3)[0]
    spec = make_view_spec(cfg, "raw")
    ps = PrecomputeSpec(
        "",
        "fp",
        (32, 32, 3),
        spec.to_dict(),
        OutputFormat("fp16", 0, "fp16", 10),
        (ref.to_dict(),),
        ("",),
        64,
        16,
        1,
        "none",
    )
    pool = TeacherPool(ps, "fp32")
    calls = []
    to_device, to_host = pool._to_device, pool._to_host
    pool._to_device = lambda *a: calls.append("in") or to_device(*a)
    pool._to_host = lambda *a: calls.append("out") or to_host(*a)
    pixels = np.random.default_rng(0).integers(0, 255, (40, 3, 32, 32), dtype=np.uint8)
    labels = np.arange(40) % 10
    result = pool.infer(0, pixels, labels, True)
    assert calls == ["in", "in", "out", "in", "out", "out"]  # 3 batches of 16, 16, 8
    model = checkpoints.build_model(ref)
    with torch.no_grad():
        fmap = model.forward_features(normalize(torch.from_numpy(pixels), spec.mean, spec.std))
        logits = model.forward_head(fmap)
    np.testing.assert_array_equal(result["columns"]["feat"], fmap.half().numpy())
    np.testing.assert_array_equal(result["columns"]["logits"], logits.half().numpy())
    assert result["correct"] == int((logits.argmax(1).numpy() == labels).sum())


def test_the_dry_run_sizes_precompute_cpu_stages_per_gpu(tmp_path):
    """`--dry-run` prints what precompute's render and write tasks cost per image of this config and the CPUs they
    take per GPU, from the measured per-image costs: the write grows with the bytes stored, so int8 maps cost less
    than fp16 maps and logits only least."""
    import re

    from pipeline import run
    from pipeline.ops import capacity

    teachers = [{"name": f"t{k}", "arch": "resnet8", "checkpoint": str(tmp_path / "t.pt")} for k in range(3)]
    cpus = {}
    for features in ("fp16", "int8", "none"):
        cfg = tiny_config(tmp_path, teachers=teachers, cache={"features": features})
        line = [x for x in run.capacity_lines(cfg, None, None) if x.startswith("precompute CPU stages")]
        assert len(line) == 1, line
        render, write, kib, need = (
            float(v.replace(",", "")) for v in re.findall(r"([\d.,]+) (?:µs|KiB|CPUs)", line[0])
        )
        assert render == capacity.PRECOMPUTE_RENDER_US
        fixed, per_kib = capacity.PRECOMPUTE_WRITE_US
        assert abs(write - (fixed + per_kib * kib)) < 0.5 and need == round((render + write) / 100, 2)
        cpus[features] = need
    assert cpus["fp16"] > cpus["int8"] > cpus["none"]


def test_the_dry_run_sizes_the_training_process_per_gpu(tmp_path):
    """`--dry-run` on GPUs prints what the training process spends per sample on its input outside the step, from
    the measured cost (a fixed part and a part per KB the sample carries: fp16 maps cost more than int8, logits
    only least), and the cores a GPU worker keeps busy: its reads, that, and the step's own thread."""
    import re

    from pipeline import run
    from pipeline.ops import capacity

    teachers = [{"name": f"t{k}", "arch": "resnet8", "checkpoint": str(tmp_path / "t.pt")} for k in range(3)]
    costs = {}
    for features in ("fp16", "int8", "none"):
        cfg = tiny_config(tmp_path, teachers=teachers, cache={"features": features}, scaling={"use_gpu": True})
        line = [x for x in run.capacity_lines(cfg, None, None) if x.startswith("training process")]
        assert len(line) == 1, line
        us, cores, per_gpu = (float(v) for v in re.findall(r"([\d.]+) (?:µs|cores)", line[0]))
        e = capacity.estimate(cfg, None, None, capacity.probe_shapes(cfg))
        fixed, per_kb = capacity.TRAIN_PROCESS_US
        assert abs(us - (fixed + per_kb * e.reader_bytes / 1024)) < 0.05
        assert abs(per_gpu - (e.read_cpus_per_worker + cores + 1)) < 0.11
        costs[features] = us
    assert costs["fp16"] > costs["int8"] > costs["none"] > 0
