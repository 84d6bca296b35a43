"""Fault injection and bad inputs (`pytest -m fault`): nothing is lost, every failure says what to do.

The rows of docs/reliability.md point at these tests.
"""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml
from conftest import CAMKD_RUN, ROOT

from pipeline.cache import layout
from pipeline.config import with_updates
from pipeline.data.views import make_view_spec
from pipeline.ops import runtime
from pipeline.store import storage, tables
from pipeline.store.storage import StorageError
from pipeline.teachers import checkpoints
from pipeline.train import driver
from pipeline.train.summary import RunSummary

pytestmark = pytest.mark.fault


def _alive_train_worker_pids():
    import ray
    from ray.util.state import list_actors

    # The test cluster's address, explicitly: auto-detection follows whatever address file an earlier, dead
    # `ray start` left on the machine (it once timed out here waiting for a GCS that was gone).
    actors = list_actors(
        address=ray.get_runtime_context().gcs_address,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    return [a.pid for a in actors]


def _wait_for(path: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if time.time() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.1)


def _wait_for_registered(run_dir: Path, checkpoint: str, timeout: float = 180) -> None:
    """Until Ray Train has registered `checkpoint` (listed in the run's snapshot): only then is it the one a
    restarted run resumes from. A directory that merely exists may still be uploading."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            names = [c["checkpoint_dir_name"] for c in json.loads(snapshot.read_text())["checkpoint_results"]]
            if checkpoint in names:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{checkpoint} was not registered in {snapshot}")


def _close(a: RunSummary, b: RunSummary) -> None:
    assert [h["epoch"] for h in a.history] == [h["epoch"] for h in b.history]
    assert a.final_val_top1 == pytest.approx(b.final_val_top1, abs=0.02)
    assert a.history[-1]["train_loss"] == pytest.approx(b.history[-1]["train_loss"], rel=0.02)


@pytest.mark.slow
def test_worker_sigkill_mid_epoch_resumes_from_last_checkpoint(undisturbed, cached, tmp_path):
    cfg, _, reference = undisturbed
    run_dir = tmp_path / "killed"
    killed = []

    def killer():
        _wait_for_registered(run_dir, "checkpoint_epoch_0001")
        time.sleep(0.3)  # into epoch 2
        for pid in _alive_train_worker_pids():
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    summary = driver.fit(cfg, cached[2], str(tmp_path), "killed")
    thread.join(timeout=5)
    assert killed, "no Train worker was killed"
    assert summary.epochs == 3 and [h["epoch"] for h in summary.history] == [1, 2, 3]
    assert summary.resumes == 1 and reference.resumes == 0
    _close(summary, reference)


@pytest.mark.slow
def test_driver_sigkill_then_same_command_resumes(undisturbed, cached, tmp_path, ray_cluster):
    import ray

    cfg, _, reference = undisturbed
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    cmd = [
        sys.executable,
        str(ROOT / "pipeline/run.py"),
        "train",
        "--config",
        str(cfg_file),
        "--name",
        f"driver-{tmp_path.name}",
    ]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    run_dir = Path(storage.runs_dir(cfg.root, cfg.experiment)) / f"driver-{tmp_path.name}"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_registered(run_dir, "checkpoint_epoch_0001")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "summary.json").exists()
    time.sleep(2)  # Ray reaps the dead driver's actors
    # The same command with one more worker (a run that lost a node may go on with fewer, one that gained GPUs with
    # more): it resumes from the checkpoint and says so. 2 workers do not divide the run's 1 lane (train.lanes), so
    # the rows are cut anew from the resumed epoch; counts that divide the lanes keep the same global batches.
    more = [*cmd, "--set", "scaling.num_workers=2"]
    done = subprocess.run(more, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = storage.read_json(str(run_dir / "summary.json"))
    assert summary["resumes"] == 1, "the re-run must restore the checkpoint, not start over"
    assert "resuming with 2 worker(s); the checkpoint was written with 1" in done.stdout + done.stderr
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]
    first, ref = summary["history"][0], reference.history[0]
    assert (first["train_loss"], first["val_top1"]) == (ref["train_loss"], ref["val_top1"]), (
        "epoch 1 was kept"
    )
    assert summary["workers"] and len(summary["history"][1]["workers"]) == 2
    # Epochs 2-3 ran on 2 workers (16 samples per BatchNorm instead of 32): close to the 1-worker run, not equal.
    assert summary["history"][-1]["train_loss"] == pytest.approx(
        reference.history[-1]["train_loss"], rel=0.15
    )


def test_nonfinite_loss_stops_naming_step_and_term_and_keeps_last_checkpoint(cached, tmp_path):
    """A corrupted cache value (NaN logits in view 1 only) reaches the loss in epoch 2."""
    root = tmp_path / "root"
    shutil.copytree(cached[0].root, root)
    cfg = with_updates(
        cached[0],
        {
            "root": str(root),
            "strategy.name": "aver",
            "strategy.teachers": ["t1", "t2"],
            "train.epochs": 3,
            "train.export": False,
        },
    )
    meta = cached[2]
    store, manifest = _store(cfg, meta, "t1")
    # Rewrite view 1 with NaN logits as valid, checksummed files (the values are bad here, not the files).
    vdir = os.path.join(store, "view-0001")
    for part in manifest.views[1].parts:
        path = os.path.join(vdir, part.name)
        opened = tables.open_table(path, layout.META_KEY)
        table = opened.read(None, opened.schema.names)
        bad = np.full((table.num_rows, 10), np.nan, dtype=np.float16)
        col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(20), table.num_rows, [None, pa.py_buffer(bad)])
        table = table.set_column(table.schema.get_field_index("logits"), "logits", col)
        kv = {layout.META_KEY: json.dumps(opened.metadata).encode()}
        tables.write_table(path, tables.encode_table(table, meta.row_group_rows, kv))
        part.bytes = os.path.getsize(path)  # keep the pre-flight size check quiet
    storage.write_json(layout.manifest_url(store), manifest.model_dump())
    with pytest.raises(
        driver.TrainingError, match=r"non-finite loss at epoch 2, step 1 \(rank 0, first bad term kd=nan"
    ) as e:
        driver.fit(cfg, meta, str(tmp_path / "runs"), "nan")
    assert "last good checkpoint is kept" in str(e.value)
    kept = tmp_path / "runs" / "nan" / "checkpoint_epoch_0001" / "state.pt"
    state = torch.load(kept, weights_only=True)
    assert state["epoch"] == 0 and all(
        torch.isfinite(v).all() for v in state["distiller"].values() if v.is_floating_point()
    )
    assert not (tmp_path / "runs" / "nan" / "checkpoint_epoch_0002").exists()


def _store(cfg, meta, name):
    ref = checkpoints.resolve(cfg, next(t for t in cfg.teachers if t.name == name), 10, 3)
    tdir = storage.teacher_dir(cfg.root, meta.fingerprint, ref.id)
    return layout.find_store(
        tdir, ref.to_dict(), make_view_spec(cfg, meta.encoding), layout.output_format(cfg, meta), [0, 1]
    )


def test_a_corrupt_cache_part_stops_training_at_once_naming_it(cached, tmp_path):
    """Bytes flipped inside a data page (size unchanged, still valid Parquet): the reader's checksums refuse the
    part before training uses it, and the run stops at once, with no worker-group restarts, naming the part,
    the teacher and the fix."""
    from test_cache import flip_bytes_in_data_pages

    root = tmp_path / "root"
    shutil.copytree(cached[0].root, root)
    cfg = with_updates(
        cached[0],
        {"root": str(root), **CAMKD_RUN, "train.epochs": 2, "train.export": False, "train.max_failures": 3},
    )
    meta = cached[2]
    store, _ = _store(cfg, meta, "t2")
    part = os.path.join(store, "view-0001", "part-00002.parquet")
    flip_bytes_in_data_pages(part)
    logs: list[str] = []
    with pytest.raises(driver.TrainingError) as e:
        driver.fit(cfg, meta, str(tmp_path / "runs"), "corrupt", log=logs.append)
    message = str(e.value)
    assert f"cache part {part} of teacher 't2' is corrupt" in message, message
    assert "delete it and re-run precompute" in message and "restart" not in message, message
    run_dir = tmp_path / "runs" / "corrupt"
    # The reader runs ahead of training (it streams every epoch's rows), so it may meet view 1's corrupt part while
    # epoch 1 still trains: the run stops there, without a checkpoint of the epoch that could not finish.
    assert not (run_dir / "checkpoint_epoch_0002").exists()
    assert json.loads((run_dir / "failure.json").read_text())["data"] is True


def test_storage_not_writable_fails_before_training(cached):
    cfg = with_updates(cached[0], {"strategy.name": "ce", "strategy.teachers": None})
    started = time.time()
    with pytest.raises(StorageError, match=r"cannot create folder '/proc/camkd-runs/ce'|not writable"):
        driver.fit(cfg, cached[2], "/proc/camkd-runs", "ce")
    assert time.time() - started < 30


# Runs where a file's permissions bind: as root, without the capabilities that let root read any file.
DENIED_READ = """
import json, sys
sys.path.insert(0, sys.argv[1])
from pipeline.data import ingest
from pipeline.train.batches import data_error
try:
    ingest.open_image_part(sys.argv[2], "train", "part-00000.parquet")
    print(json.dumps(None))
except Exception as e:
    print(json.dumps({"type": type(e).__name__, "message": str(e), "data_error": data_error(e)}))
"""


def test_a_part_the_filesystem_refuses_is_an_access_error_not_corruption(tmp_path):
    """One image part made unreadable (chmod 000), opened by a process the permission binds (as root: without
    CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, through setpriv): an access error naming the file, the user and the
    fix; not "corrupt", never "delete the dataset"; and the error that stops training with that message."""
    dataset = tmp_path / "ds"
    part = dataset / "train" / "part-00000.parquet"
    part.parent.mkdir(parents=True)
    table = pa.table({"idx": np.arange(64), "label": np.zeros(64, dtype=np.int32)})
    tables.write_table(str(part), tables.encode_table(table, 16, {b"camkd": b"{}"}))
    part.chmod(0)
    drop = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: no way to make a file permission bind")
        drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all", "--"]
    done = subprocess.run(
        [*drop, sys.executable, "-c", DENIED_READ, str(ROOT), str(dataset)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen is not None and seen["type"] == "StorageAccessDenied", seen
    message = seen["message"]
    assert f"access to {part} was denied" in message and "permission" in message.lower(), message
    assert "user root (uid 0)" in message or f"uid {os.geteuid()}" in message, message
    assert "corrupt" not in message and "delete" not in message.lower(), message
    assert seen["data_error"] == message


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    rc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if rc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {rc.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(path: Path) -> None:
    with open(path / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def test_full_storage_fails_with_a_clear_message_and_keeps_checkpoints(cached, tiny_disk):
    cfg = with_updates(
        cached[0],
        {
            "strategy.name": "ce",
            "strategy.teachers": None,
            "train.epochs": 3,
            "train.export": False,
            "train.max_failures": 0,
        },
    )
    _fill(tiny_disk)
    with pytest.raises(StorageError, match="disk is full"):
        driver.fit(cfg, cached[2], str(tiny_disk), "full-before")
    os.remove(tiny_disk / "filler")
    run_dir = tiny_disk / "full-during"

    def fill_after_first_checkpoint():
        _wait_for(run_dir / "checkpoint_epoch_0001" / "state.pt")
        time.sleep(0.5)
        _fill(tiny_disk)

    threading.Thread(target=fill_after_first_checkpoint, daemon=True).start()
    with pytest.raises(driver.TrainingError, match=r"No space left on device|disk is full"):
        driver.fit(cfg, cached[2], str(tiny_disk), "full-during")
    state = torch.load(run_dir / "checkpoint_epoch_0001" / "state.pt", weights_only=True)
    assert state["epoch"] == 0


def test_gpu_requested_on_a_cpu_cluster_is_a_clear_error(cached):
    cfg = with_updates(cached[0], {"strategy.name": "ce", "strategy.teachers": None, "scaling.use_gpu": True})
    started = time.time()
    with pytest.raises(runtime.ClusterError, match=r"use_gpu is true .* the cluster has 0 GPU\(s\)"):
        driver.fit(cfg, cached[2], "/tmp/unused-gpu-run", "gpu")
    assert time.time() - started < 30


def test_unreachable_cluster_address_is_a_clear_error_not_a_hang():
    started = time.time()
    with pytest.raises(runtime.ClusterError, match=r"nothing answers at Ray address '127\.0\.0\.1:1'"):
        runtime.check_reachable("127.0.0.1:1")
    assert time.time() - started < 10
    rc = subprocess.run(
        [sys.executable, str(ROOT / "pipeline/run.py"), "train", "--address", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert rc.returncode == 2 and "error: nothing answers at Ray address" in rc.stderr


def test_pickled_teacher_checkpoint_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > /tmp/camkd-pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Payload()}, path)
    with pytest.raises(
        checkpoints.TeacherError,
        match="refusing to load .*pickled Python objects.*torch.save\\(model.state_dict",
    ):
        checkpoints.load_state_dict(path.read_bytes(), str(path))
    assert not os.path.exists("/tmp/camkd-pwned")
    buf = io.BytesIO()
    torch.save({"model": {"conv.weight": torch.zeros(2)}}, buf)  # RepDistiller's format is accepted
    assert set(checkpoints.load_state_dict(buf.getvalue(), "x")[0]) == {"conv.weight"}


def test_student_pt_is_the_same_file_whichever_cluster_trained_it(tmp_path):
    """Found by benchmarks/chaos.py: the same deterministic run, trained on two clusters, wrote two different
    student.pt files, because `--address` becomes `ray.address` and student.pt recorded the whole config. Where a
    run ran (the `ray` section) is not part of the student: the same weights give the same file."""
    import hashlib

    from conftest import tiny_config

    from camkd import models
    from pipeline.data.ingest import ingest

    cfg = tiny_config(tmp_path / "root", strategy={"name": "ce"}, train={"epochs": 1, "export": False})
    meta = ingest(cfg, log=lambda *_: None)
    torch.manual_seed(0)
    state = models.create("resnet8", 10, 3).state_dict()
    digests = set()
    for address in ("10.0.0.7:6379", "10.0.0.8:6379"):
        run_cfg = with_updates(cfg, {"ray.address": address})
        run_dir = str(tmp_path / address.replace(":", "-"))
        plan = driver.make_plan(run_cfg, meta, run_dir, log=lambda *_: None)
        driver.export_student(run_cfg, plan, state, run_dir)
        digests.add(hashlib.sha256(Path(run_dir, "student.pt").read_bytes()).hexdigest())
    assert len(digests) == 1, "student.pt depends on the cluster address"
