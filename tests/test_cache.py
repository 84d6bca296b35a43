"""The teacher cache: round trip against a direct teacher forward, compression bounds, and every bad-cache case."""

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
from conftest import ROOT, make_teacher_file, tiny_config

from camkd.training import normalize
from pipeline import cache, precompute, storage, teachers
from pipeline.cache import CacheError, Manifest, ReadPlan, TeacherSource, read_training_rows
from pipeline.config import with_updates
from pipeline.ingest import ingest, read_image_part
from pipeline.views import ViewSpec, make_view_spec, render_train_view


def _plan(cfg, meta, names, logits=True, features=True):
    refs = teachers.resolve_all(cfg, meta.num_classes, meta.channels, names)
    sources = []
    for r in refs:
        d = storage.teacher_cache_dir(cfg.root, meta.fingerprint, r.id)
        sources.append(TeacherSource(r.name, d, cache.load_manifest(d).model_dump()))
    spec = make_view_spec(cfg, meta.encoding)
    dataset_dir = storage.dataset_dir(cfg.root, meta.name, meta.fingerprint)
    return refs, ReadPlan(
        dataset_dir, "train", tuple(meta.image_shape), spec.to_dict(), tuple(sources), logits, features
    )


def _direct(ref, cfg, meta, part, view):
    """The teacher run directly on the same view of the same rows: the ground truth of the cache."""
    spec = make_view_spec(cfg, meta.encoding)
    table = read_image_part(storage.dataset_dir(cfg.root, meta.name, meta.fingerprint), "train", part)
    pixels = render_train_view(
        table["image"].to_pylist(), table["idx"].to_numpy(), view, spec, tuple(meta.image_shape)
    )
    model = teachers.build_model(ref)
    with torch.no_grad():
        fmap = model.forward_features(normalize(torch.from_numpy(pixels), spec.mean, spec.std))
        return model.forward_head(fmap).numpy(), fmap.numpy()


def test_round_trip_fp16_matches_direct_forward(cached):
    cfg, _, meta, summary, _ = cached
    assert [t["computed_parts"] for t in summary["teachers"]] == [4, 4]
    refs, plan = _plan(cfg, meta, ["t1", "t2"])
    rows = read_training_rows({"part": np.array(["part-00002.parquet"])}, plan, view=1)
    assert rows["idx"].tolist() == list(range(128, 192))
    for k, ref in enumerate(refs):
        logits, fmap = _direct(ref, cfg, meta, "part-00002.parquet", 1)
        # fp16 storage: |x − x̂| ≤ 2^-11·|x| (+ float16's subnormal step for tiny values)
        np.testing.assert_allclose(rows[f"t{k}_logits"].astype(np.float32), logits, rtol=2**-11, atol=1e-7)
        np.testing.assert_allclose(rows[f"t{k}_feat"].astype(np.float32), fmap, rtol=2**-11, atol=6e-8)
    manifest = cache.load_manifest(plan.teachers[0].cache_dir)
    assert manifest.features["shape"] == [64, 8, 8] and manifest.rows == 256 and len(manifest.parts) == 4
    assert manifest.bytes_per_sample["features"] == 2 * 64 * 8 * 8 * 2  # V=2 views × C·H·W × 2 bytes
    assert 0.0 <= manifest.accuracy <= 1.0 and manifest.test_accuracy is not None
    head = torch.load(os.path.join(plan.teachers[0].cache_dir, "head.pt"), weights_only=True)
    assert set(head) == {"classifier.weight", "classifier.bias"}


def test_int8_features_and_topk_logits_within_stated_bounds(cached):
    _, cfg_q, meta, _, summary_q = cached
    refs, plan = _plan(cfg_q, meta, ["t3"])
    rows = read_training_rows({"part": np.array(["part-00001.parquet"])}, plan, view=0)
    logits, fmap = _direct(refs[0], cfg_q, meta, "part-00001.parquet", 0)
    # int8 with a per-sample, per-channel scale s = max|x_c|/127: |x − x̂| ≤ s/2 (plus the fp16 scale rounding)
    q, scale = rows["t0_feat"], rows["t0_feat_scale"].astype(np.float32)
    assert q.dtype == np.int8 and scale.shape == (64, fmap.shape[1])
    deq = q.astype(np.float32) * scale[:, :, None, None]
    bound = np.abs(fmap).reshape(64, fmap.shape[1], -1).max(-1) / 127 * 0.5 * (1 + 2**-8)
    assert (np.abs(deq - fmap) <= bound[:, :, None, None] + 1e-7).all()
    # top-k logits: the k largest are exact (fp16), the tail keeps its probability mass
    dense = rows["t0_logits"]
    top = np.argsort(-logits, 1)[:, :3]
    np.testing.assert_allclose(
        np.take_along_axis(dense, top, 1), np.take_along_axis(logits, top, 1), rtol=2**-10
    )
    p_full, p_rec = torch.softmax(torch.tensor(logits), 1), torch.softmax(torch.tensor(dense), 1)
    np.testing.assert_allclose(p_rec.numpy().sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(
        np.take_along_axis(p_rec.numpy(), top, 1), np.take_along_axis(p_full.numpy(), top, 1), atol=2e-3
    )
    # The tail keeps its total mass at τ = 1 (spread evenly over the tail classes); its shape is lost, which
    # changes KL at τ > 1 — the docs give measured numbers.
    tail_full = 1 - np.take_along_axis(p_full.numpy(), top, 1).sum(1)
    tail_rec = 1 - np.take_along_axis(p_rec.numpy(), top, 1).sum(1)
    np.testing.assert_allclose(tail_rec, tail_full, atol=2e-3)
    m = Manifest.model_validate(storage.read_json(os.path.join(plan.teachers[0].cache_dir, "manifest.json")))
    assert m.logits == {"format": "topk", "k": 3, "num_classes": 10} and m.features["dtype"] == "int8"
    assert m.bytes_per_sample["features"] < 0.6 * 2 * 2 * 64 * 8 * 8


def test_second_run_and_added_teacher_compute_only_whats_missing(cached, tmp_path):
    cfg, *_ = cached
    again = precompute.run_stage(cfg)
    assert [t["computed_parts"] for t in again["teachers"]] == [0, 0]
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
        ("t1", 0, 4),
        ("t2", 0, 4),
        ("t4", 4, 0),
    ]


def _copy_cache(cfg, meta, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(cfg.root, root)
    return with_updates(cfg, {"root": str(root)})


@pytest.mark.fault
def test_bad_parts_are_refused_with_the_file_and_the_fix(cached, tmp_path):
    cfg, _, meta, *_ = cached
    cfg = _copy_cache(cfg, meta, tmp_path)
    refs, plan = _plan(cfg, meta, ["t1", "t2"])
    d1, d2 = plan.teachers[0].cache_dir, plan.teachers[1].cache_dir
    m1 = cache.load_manifest(d1)
    idx0 = np.arange(64)
    cols = ["idx", "logits_v0"]
    # truncated part: the pre-flight size check and the reader both name it
    part = os.path.join(d1, "part-00001.parquet")
    data = open(part, "rb").read()
    open(part, "wb").write(data[: len(data) // 2])
    with pytest.raises(
        CacheError, match=r"part-00001\.parquet of teacher 't1' has \d+ bytes.*truncated.*re-run precompute"
    ):
        cache.check_parts_present(m1, d1)
    with pytest.raises(
        CacheError, match=r"part-00001\.parquet of teacher 't1' is corrupt.*re-run precompute"
    ):
        cache.read_cache_part(d1, m1, "part-00001.parquet", cols, np.arange(64, 128))
    # missing part
    os.remove(os.path.join(d1, "part-00002.parquet"))
    with pytest.raises(
        CacheError, match=r"part-00002\.parquet of teacher 't1' is missing; re-run precompute"
    ):
        cache.read_cache_part(d1, m1, "part-00002.parquet", cols, np.arange(128, 192))
    # misaligned part (rows of another image part)
    shutil.copy(os.path.join(d1, "part-00000.parquet"), os.path.join(d1, "part-00003.parquet"))
    with pytest.raises(
        CacheError, match=r"part-00003\.parquet .* does not match its image part .*idx differs at row 0"
    ):
        cache.read_cache_part(d1, m1, "part-00003.parquet", cols, np.arange(192, 256))
    # a part from another teacher
    shutil.copy(os.path.join(d2, "part-00000.parquet"), os.path.join(d1, "part-00000.parquet"))
    with pytest.raises(
        CacheError, match=r"was written for teacher 'resnet14-.*not 'resnet8-.*copied from another cache"
    ):
        cache.read_cache_part(d1, m1, "part-00000.parquet", cols, idx0)
    # precompute refuses to overwrite the foreign part silently, and repairs the rest with --overwrite
    with pytest.raises(CacheError, match="refusing to overwrite a foreign cache part"):
        storage.remove(os.path.join(d1, "manifest.json"))
        precompute.run_stage(cfg)
    fixed = precompute.run_stage(cfg, overwrite=True)
    assert (
        fixed["teachers"][0]["computed_parts"] == 4
    )  # 0 (foreign), 1 (truncated), 2 (missing), 3 (misaligned)


@pytest.mark.fault
def test_stale_manifest_is_refused_saying_what_differs(cached, tmp_path, teacher_files):
    cfg, _, meta, *_ = cached
    other_views = with_updates(cfg, {"views.seed": 5})
    with pytest.raises(
        CacheError, match=r"stale cache for teacher 't1'.*view spec: seed: 0 vs 5.*--overwrite"
    ):
        precompute.run_stage(other_views)
    spec = make_view_spec(cfg, meta.encoding)
    t1 = teachers.resolve(cfg, cfg.teachers[0], meta.num_classes, meta.channels)
    manifest = cache.load_manifest(storage.teacher_cache_dir(cfg.root, meta.fingerprint, t1.id))
    # a manifest checked against another checkpoint (a retrained teacher under the same name)
    retrained = teachers.resolve(
        cfg,
        cfg.teachers[0].model_copy(update={"checkpoint": str(teacher_files["t3"]), "arch": "wrn_16_1"}),
        10,
        3,
    )
    with pytest.raises(
        CacheError, match=r"checkpoint: cache made from resnet8 sha256 .* config has wrn_16_1"
    ):
        cache.check_manifest(manifest, "dir", retrained.to_dict(), meta, spec)
    # ... and against another dataset
    other = meta.model_copy(update={"fingerprint": "0123456789ab"})
    with pytest.raises(CacheError, match=r"dataset: cache of .*, config uses 0123456789ab"):
        cache.check_manifest(manifest, "dir", t1.to_dict(), other, spec)


@pytest.mark.fault
def test_killed_precompute_resumes_with_missing_parts_only(ray_cluster, teacher_files, tmp_path):
    """A real interrupted process: SIGKILL the precompute driver mid-run, re-run, compare with a clean run."""
    import ray

    slow = {"name": "big", "arch": "resnet32x4", "checkpoint": str(tmp_path / "big.pt")}
    make_teacher_file(tmp_path / "big.pt", "resnet32x4", seed=7)
    data = {"rows_per_part": 16, "synthetic": {"train": 192, "test": 16, "num_classes": 10, "size": 32}}
    cache_cfg = {"actors": 1, "cpus_per_actor": 1, "batch_size": 16, "eval_test": False}
    cfg = tiny_config(tmp_path / "a", data=data, teachers=[slow], cache=cache_cfg)
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
    ref = teachers.resolve(cfg, cfg.teachers[0], 10, 3)
    cdir = storage.teacher_cache_dir(cfg.root, meta.fingerprint, ref.id)
    deadline = time.time() + 120
    while time.time() < deadline:
        done = [n for n in storage.listdir(cdir) if n.endswith(".parquet")]
        if len(done) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = sorted(n for n in storage.listdir(cdir) if n.endswith(".parquet"))
    assert 2 <= len(before) < 12, f"kill came too late/early: {before}"
    assert not storage.exists(os.path.join(cdir, "manifest.json"))
    resumed = precompute.run_stage(cfg)["teachers"][0]
    assert resumed["computed_parts"] == 12 - len(before) and resumed["reused_parts"] == len(before)
    clean_cfg = with_updates(cfg, {"root": str(tmp_path / "b")})
    ingest(clean_cfg)
    precompute.run_stage(clean_cfg)
    clean_dir = storage.teacher_cache_dir(clean_cfg.root, meta.fingerprint, ref.id)
    a, b = cache.load_manifest(cdir), cache.load_manifest(clean_dir)
    assert [p.sha256 for p in a.parts] == [p.sha256 for p in b.parts], "resumed cache must equal a clean run"
    assert not [n for n in storage.listdir(cdir) if storage.TMP_MARK in n]
    assert ViewSpec.from_dict(a.view_spec).digest == a.view_digest
