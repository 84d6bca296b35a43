"""Ray Train student training on real Ray, real Parquet and tiny real models."""

import io
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import CAMKD_RUN, tiny_config

from camkd import TeacherOutputs, models
from camkd.training import Normalizer, normalize
from pipeline.config import BindingError, with_updates
from pipeline.data.ingest import ingest
from pipeline.store import storage
from pipeline.teachers import checkpoints
from pipeline.teachers import stage as teacher_stage
from pipeline.train import driver, model, progress
from pipeline.train.reader import (
    EVAL_VIEW,
    Slice,
    contiguous_shares,
    items,
    local_batches,
    read_slices,
    teacher_outputs_from_batch,
)
from pipeline.train.step import evaluate


def camkd_config(cached, **updates):
    """The session's reference CA-MKD run config (see conftest.CAMKD_RUN), with updates."""
    return with_updates(cached[0], {**CAMKD_RUN, **updates})


@pytest.fixture(scope="module")
def one_worker(undisturbed):
    return undisturbed


def test_one_worker_learns_and_reports_every_term(one_worker):
    _, _, summary = one_worker
    h = summary.history
    assert [e["epoch"] for e in h] == [1, 2, 3] and summary.status == "finished"
    assert summary.backend == "gloo", "one worker still runs a process group: every collective is exercised"
    assert h[-1]["train_ce"] < h[0]["train_ce"], "loss must go down"
    assert h[-1]["train_top1"] > 0.5
    # the exported student's cost (tests/test_costs.py counts resnet8 by hand at 32 × 32)
    assert (summary.params, summary.macs) == (78_042, 12_501_632), summary
    assert summary.export_bytes > 4 * 78_042, "student.pt holds every float32 parameter"
    assert summary.best_val_top1 > 0.3, "10 classes: chance is 0.1"  # 64 test images: 3σ above chance ≈ 0.21
    for key in (
        "train_kd",
        "train_inter",
        "weight/t1",
        "weight/t2",
        "feat_weight/t1",
        "val_top5",
        "samples_per_s",
    ):
        assert key in h[-1], key
    assert h[-1]["weight/t1"] + h[-1]["weight/t2"] == pytest.approx(1.0, abs=1e-5)
    assert len(h[-1]["class_weight"]["t1"]) == 10


def rescore_alone(summary, cfg, meta, world: int) -> float:
    """Test top-1 of the run's student.pt, loaded and scored in this process (no Ray), over the same per-rank
    shares and batches the run scored."""
    state = torch.load(io.BytesIO(storage.read_bytes(summary.exports["state_dict"])), weights_only=True)
    student = models.create(state["arch"], state["num_classes"], state["in_chans"])
    student.load_state_dict(state["state_dict"])
    plan = driver.make_plan(cfg, meta, summary.run_dir)
    read = plan.read_plan("test", with_teachers=False)
    normalizer = Normalizer(plan.spec["mean"], plan.spec["std"])
    hits = count = 0.0
    for share in contiguous_shares([Slice(**s) for s in plan.test_slices], world):
        batches = [
            (torch.from_numpy(np.ascontiguousarray(b["image"])), torch.from_numpy(b["label"]))
            for b in local_batches(read, items(share, EVAL_VIEW), 256, threads=1, drop_last=False)
        ]
        values = evaluate(student, batches, normalizer, None, torch.device("cpu")).values
        hits, count = hits + float(values[0]), count + float(values[3])
    return hits / count


def test_two_worker_ddp_matches_one_worker_and_every_rank_scores_the_exported_student(
    one_worker, cached, tmp_path
):
    cfg, _, one = one_worker
    cfg2 = with_updates(cfg, {"scaling.num_workers": 2, "scaling.cpus_per_worker": 1})
    two = driver.fit(cfg2, cached[2], str(tmp_path), "w2")
    assert two.history[-1]["train_ce"] < two.history[0]["train_ce"]
    assert two.best_val_top1 > 0.3
    # Same data, same global batch (2 × 16 vs 1 × 32), gradients averaged by DDP: the runs agree on what the model
    # learned. Not exactly: BatchNorm normalises per worker (16 vs 32 samples), and 64 test images make val noisy.
    assert abs(two.history[-1]["train_top1"] - one.history[-1]["train_top1"]) <= 0.15
    assert abs(two.history[-1]["train_ce"] - one.history[-1]["train_ce"]) <= 0.35
    assert two.best_val_top1 > 0.3 and one.best_val_top1 > 0.3
    # Every rank scored one model (rank 0's BatchNorm statistics on both), the one student.pt holds.
    digests = two.history[-1]["student_digests"]
    assert len(digests) == 2 and digests[0] == digests[1], digests
    assert all(h["student_digest"] for h in two.history)
    assert rescore_alone(two, cfg2, cached[2], world=2) == two.test_top1


def test_doctor_probes_every_reader_training_would_place_on_a_node(cached):
    """scaling.num_workers 2 on this one-node cluster: training places both workers here, so the doctor runs two
    readers at once, each under one worker's budget of the node (half its object store ÷ 2, what
    `apply_reader_budget` gives each of training's workers), not one reader with the node to itself."""
    import ray

    from pipeline.ops import doctor
    from pipeline.train.batches import READER_STORE_FRACTION

    cfg = with_updates(
        cached[0], {"scaling.num_workers": 2, "scaling.cpus_per_worker": 1, "scaling.read_tasks": 1}
    )
    reader = doctor.run_stage(cfg, seconds=2, log=lambda *_: None)["reader"]
    node = next(n for n in ray.nodes() if n["Alive"])
    share = int(READER_STORE_FRACTION * node["Resources"]["object_store_memory"] // 2)
    assert reader["workers_on_node"] == 2 and len(reader["workers"]) == 2, reader
    for probe in reader["workers"]:
        assert probe["budget"]["object_store_bytes"] == share, probe
        assert probe["budget"]["workers_on_node"] == 2 and probe["node"] == node["NodeID"], probe
    first, second = reader["workers"]
    assert max(first["started"], second["started"]) < min(first["ended"], second["ended"]), "concurrent"
    assert reader["samples_per_s"] == min(p["samples_per_s"] for p in reader["workers"]) > 0


def test_the_threads_reader_trains_the_same_run(one_worker, cached, tmp_path):
    """scaling.reader threads: the deterministic reference run (Ray Data reader), read by two threads inside the
    worker instead, is the same run: the same batches in the same order, so the same losses epoch for epoch."""
    cfg, _, reference = one_worker
    cfg_threads = with_updates(cfg, {"scaling.reader": "threads", "scaling.read_threads": 2})
    got = driver.fit(cfg_threads, cached[2], str(tmp_path), "threads")
    assert [h["epoch"] for h in got.history] == [1, 2, 3]
    for a, b in zip(got.history, reference.history):
        assert (a["train_loss"], a["train_top1"], a["val_top1"]) == (
            b["train_loss"],
            b["train_top1"],
            b["val_top1"],
        )


def test_finished_run_is_not_trained_again_and_exports_load(one_worker, cached):
    cfg, out, summary = one_worker
    logs = []
    again = driver.fit(cfg, cached[2], str(out), "w1", log=logs.append)
    assert again == summary and "already finished" in logs[-1]
    state = torch.load(io.BytesIO(storage.read_bytes(summary.exports["state_dict"])), weights_only=True)
    student = models.create(state["arch"], state["num_classes"], state["in_chans"])
    student.load_state_dict(state["state_dict"])
    exported = torch.export.load(summary.exports["torch_export"])
    x = torch.randn(5, 3, 32, 32)
    torch.testing.assert_close(exported.module()(x), student.eval()(x), rtol=1e-4, atol=1e-5)
    # student.onnx (the [onnx] extra, in dev): onnxruntime's logits match the student's to 1e-4, at a batch size
    # the export never saw
    from camkd import export as onnx_export

    onnx_bytes = storage.read_bytes(summary.exports["onnx"])
    np.testing.assert_allclose(
        onnx_export.run_onnx(onnx_bytes, x), student(x).detach().numpy(), atol=1e-4, rtol=0
    )
    assert summary.exports["onnx_max_abs_diff"] < 1e-4


@pytest.mark.fault
def test_same_run_name_with_another_config_is_refused(one_worker, cached):
    cfg, out, _ = one_worker
    other = with_updates(cfg, {"strategy.beta": 10.0})
    with pytest.raises(
        BindingError, match=r"started with a different config \(strategy\.beta: 5\.0 → 10\.0\)"
    ):
        driver._check_same_run(os.path.join(out, "w1"), other)
    # w1 has finished: its summary is not handed back as the result of another config either
    with pytest.raises(BindingError, match=r"strategy\.beta: 5\.0 → 10\.0"):
        driver.fit(other, cached[2], str(out), "w1")


def test_cached_and_online_first_step_agree(cached):
    """Identical views: the loss terms computed from the cache equal those of teachers run in the loop."""
    cfg = camkd_config(cached)
    meta = cached[2]
    plan = driver.make_plan(cfg, meta, "/nonexistent")
    read = plan.read_plan("train", with_teachers=True)
    p = meta.split("train").parts[0]
    s = Slice(p.name, p.first_idx, p.rows, p.first_idx, p.first_idx + p.rows)
    block = next(read_slices({k: np.array([v]) for k, v in items([s], 1)[0].items()}, read))
    batch = {k: torch.from_numpy(np.ascontiguousarray(v[:32])) for k, v in block.items()}
    images = normalize(batch["image"], plan.spec["mean"], plan.spec["std"])
    cached_out = teacher_outputs_from_batch(batch, 2, True, True, meta.num_classes)
    online_models = [checkpoints.build_model(checkpoints.TeacherRef.from_dict(r)) for r in plan.teacher_refs]
    with torch.no_grad():
        fmaps = [t.forward_features(images) for t in online_models]
        online_out = TeacherOutputs(
            torch.stack([t.forward_head(f) for t, f in zip(online_models, fmaps)]), fmaps
        )
    results = []
    for outputs in (cached_out, online_out):
        distiller = model.build_distiller(plan, cfg)
        distiller.train()
        _, _, terms, _ = distiller(images, batch["label"], outputs, epoch=1)
        results.append({k: v.item() for k, v in terms.items()})
    for name in results[0]:
        assert results[0][name] == pytest.approx(results[1][name], rel=2e-3, abs=1e-4), name


def test_online_mode_trains(cached, tmp_path):
    cfg = with_updates(
        camkd_config(cached), {"strategy.mode": "online", "train.epochs": 1, "train.export": False}
    )
    summary = driver.fit(cfg, cached[2], str(tmp_path), "online")
    assert summary.epochs == 1 and summary.mode == "online" and "weight/t2" in summary.history[0]


def test_teacher_trained_here_is_imported_by_precompute(ray_cluster, tmp_path):
    cfg = tiny_config(
        tmp_path,
        teachers=[{"name": "mine", "arch": "resnet8", "train": {"epochs": 1, "batch_size": 32}}],
        train={"export": True},
    )
    ingest(cfg)
    rows = teacher_stage.run_stage(cfg)
    assert rows[0]["name"] == "mine" and rows[0]["test_top1"] is not None
    ref = checkpoints.resolve(cfg, cfg.teachers[0], 10, 3)
    model = checkpoints.build_model(ref)  # weights_only load of the file the trainer wrote
    assert isinstance(model, models.FeatureClassifier)
    assert teacher_stage.run_stage(cfg)[0]["id"] == ref.id, "a second `teachers` run must not retrain"


def test_runs_write_tensorboard_events_and_an_mlflow_store(cached, tmp_path):
    """Tracking: TensorBoard event files (read back with TensorBoard's own reader) and a real MLflow store
    (sqlite) hold the run's per-epoch metrics, the same values as its summary."""
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = with_updates(
        cached[0],
        {
            "strategy.name": "aver",
            "strategy.teachers": ["t1", "t2"],
            "train.epochs": 2,
            "train.export": False,
            "tracking.mlflow": {"uri": store, "experiment": "camkd-test"},
        },
    )
    summary = driver.fit(cfg, cached[2], str(tmp_path / "runs"), "tracked")
    events = EventAccumulator(str(tmp_path / "runs" / "tracked" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"val_top1", "train_kd", "weight/t1", "lr", "samples_per_s", "test_top1"} <= set(tags), tags
    val = [(e.step, e.value) for e in events.Scalars("val_top1")]
    assert val == [(h["epoch"], pytest.approx(h["val_top1"], abs=1e-6)) for h in summary.history]
    mlflow.set_tracking_uri(store)
    run = mlflow.search_runs(experiment_names=["camkd-test"], output_format="list")[0]
    history = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "val_top1")
    assert [(m.step, m.value) for m in history] == [(h["epoch"], h["val_top1"]) for h in summary.history]
    assert run.info.run_name == "tracked" and run.data.params["strategy.name"] == "aver"


def test_the_python_api_returns_typed_results(cached):
    from pipeline import api

    cfg, _, meta, *_ = cached
    again = api.load(None, {"root": cfg.root, "data": cfg.data.model_dump(mode="json"), "train.epochs": 2})
    assert again.train.epochs == 2 and again.root == cfg.root
    assert api.ingest(again).fingerprint == meta.fingerprint
    result = api.precompute(cfg)
    assert isinstance(result, api.PrecomputeResult) and result.renders == 0
    assert [t["computed_parts"] for t in result.teachers] == [0, 0]


def test_step_profiler_writes_a_table_of_the_second_epoch_only_when_asked(tmp_path, monkeypatch):
    run = SimpleNamespace(
        start_epoch=0, rank=0, device=torch.device("cpu"), plan=SimpleNamespace(run_dir="/r/runs/camkd-x")
    )
    steps = 30
    monkeypatch.delenv(progress.PROFILE_ENV, raising=False)
    assert progress.StepProfiler(run, 1, steps).prof is None
    monkeypatch.setenv(progress.PROFILE_ENV, str(tmp_path))
    assert progress.StepProfiler(run, 0, steps).prof is None, "epoch 1 holds the reader's start: not profiled"
    assert progress.StepProfiler(run, 1, 10).prof is None, "too few steps for the schedule"
    profiler = progress.StepProfiler(run, 1, steps)
    x = torch.randn(64, 64)
    for _ in range(steps):
        x = torch.tanh(x @ x)
        profiler.step()
    profiler.close()
    table = (tmp_path / "camkd-x-rank0-epoch2.txt").read_text()
    assert table.startswith("20 steps") and "aten::mm" in table
    assert (tmp_path / "camkd-x-rank0-epoch2.trace.json.gz").stat().st_size > 0
