"""The pipeline on S3, against a real S3-compatible server (moto's server mode) behind a fault-injecting proxy."""

import json
import os
import subprocess
import sys
import time

import pytest
import yaml
from conftest import ROOT, make_teacher_file, tiny_config
from s3server import S3Server

from pipeline.store import storage, tables

pytestmark = pytest.mark.fault


@pytest.fixture(scope="module")
def s3():
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3, monkeypatch):
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    s3.proxy.counter.every = 0
    yield s3
    s3.proxy.counter.every = 0


def test_storage_retries_throttling_and_dropped_connections(s3_env):
    import numpy as np
    import pyarrow as pa

    s3 = s3_env
    s3.proxy.counter.every = 4  # every 4th request: a 503 SlowDown or a connection closed without an answer
    before = s3.proxy.counter.requests
    data = os.urandom(300_000)
    storage.write_bytes_atomic("s3://camkd/unit/blob.bin", data)
    assert storage.read_bytes("s3://camkd/unit/blob.bin") == data
    encoded = tables.encode_table(pa.table({"x": np.arange(5000)}), 1024, {b"camkd": b"{}"})
    tables.write_table("s3://camkd/unit/t.parquet", encoded)
    assert tables.open_table("s3://camkd/unit/t.parquet", b"camkd").read([2], ["x"])["x"][0].as_py() == 2048
    assert storage.list_sizes("s3://camkd/unit") == {"blob.bin": 300_000, "t.parquet": encoded.size}
    assert storage.exists("s3://camkd/unit/t.parquet") and not storage.exists("s3://camkd/unit/none")
    c = s3.proxy.counter
    assert c.requests - before >= 8 and c.slow_down >= 1 and c.dropped >= 1, c


def test_a_row_group_costs_one_request_whatever_the_number_of_columns(s3_env):
    """Through the counting proxy: a part is opened with 2 requests (its size, its footer), then every row group
    of it is 1 ranged GET of all the columns asked for, for 2 columns as for 13 (pyarrow's pre-buffering coalesces
    adjacent column chunks), and a reader run remembers an open part: a second row group needs no new open."""
    import numpy as np
    import pyarrow as pa

    counter = s3_env.proxy.counter
    n, rows = 4096, 1024
    cols = {"idx": pa.array(np.arange(n))}
    for k in range(12):
        cols[f"c{k}"] = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(256), n, [None, pa.py_buffer(np.random.default_rng(k).bytes(256 * n))]
        )
    tables.write_table(
        "s3://camkd/unit/wide.parquet", tables.encode_table(pa.table(cols), rows, {b"camkd": b"{}"})
    )
    per_read = {}
    for columns in (["idx", "c0"], ["idx", *(f"c{k}" for k in range(12))]):
        scope = f"columns-{len(columns)}"
        before = counter.requests
        part = tables.open_cached("s3://camkd/unit/wide.parquet", b"camkd", scope=scope)
        opened = counter.requests - before
        reads = []
        for g in range(4):
            before = counter.requests
            again = tables.open_cached("s3://camkd/unit/wide.parquet", b"camkd", scope=scope)
            table = again.read([g], columns)
            reads.append(counter.requests - before)
            assert again is part and table.num_rows == rows and table["idx"][0].as_py() == g * rows
        per_read[len(columns)] = (opened, reads)
    assert per_read == {2: (2, [1, 1, 1, 1]), 13: (2, [1, 1, 1, 1])}, per_read


def test_an_unreachable_store_is_not_reported_as_corruption(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr(storage, "RETRY_BASE_SECONDS", 0.01)
    started = time.time()
    with pytest.raises(
        storage.StorageUnavailable, match=r"did not answer for s3://camkd/x after 6 attempts.*not data"
    ):
        storage.read_bytes("s3://camkd/x")
    assert time.time() - started < 60


def test_a_store_that_refuses_access_is_not_reported_as_corruption(s3_env):
    """The store refuses one image part (403 AccessDenied, then 400 ExpiredToken): opening it, and reading a part
    opened before the refusal, raise an access error naming the object, the credentials in use (key id and
    endpoint, never the secret) and the fix, at once (no retries of ours); never "corrupt", never "delete". It is
    the error that stops training (`data_error`) with that message, not a restart."""
    import numpy as np
    import pyarrow as pa

    from pipeline.data import ingest
    from pipeline.train.batches import data_error

    counter = s3_env.proxy.counter
    url = "s3://camkd/refused/train/part-00000.parquet"
    table = pa.table({"idx": np.arange(64), "label": np.zeros(64, dtype=np.int32)})
    tables.write_table(url, tables.encode_table(table, 16, {ingest.META_KEY: b"{}"}))
    opened = ingest.open_image_part("s3://camkd/refused", "train", "part-00000.parquet")
    for status, code, hint in ((403, "AccessDenied", "allowed"), (400, "ExpiredToken", "expired")):
        counter.denied, counter.denials = {"/refused/train/part-00000.parquet": (status, code)}, 0
        for attempt in (
            lambda: ingest.open_image_part("s3://camkd/refused", "train", "part-00000.parquet"),
            lambda: ingest.read_image_rows(opened, [1], ["idx", "label"]),
        ):
            with pytest.raises(storage.StorageAccessDenied) as e:
                attempt()
            message = str(e.value)
            assert f"access to {url} was denied" in message and hint in message, message
            assert "key id testing" in message and s3_env.proxy.endpoint in message, message
            assert "corrupt" not in message and "delete" not in message.lower(), message
            assert data_error(e.value) == message
        assert counter.denials == 2, "one request each: an access error is not retried"
    counter.denied = {}
    assert ingest.read_image_rows(opened, [1], ["idx"])["idx"][0].as_py() == 16, "the data was never at fault"


@pytest.mark.slow
def test_the_whole_pipeline_on_s3_through_faults_and_a_corrupt_object(s3, tmp_path):
    """ingest → teachers (a local checkpoint, copied into root) → precompute → train → tune with root=s3://...,
    the endpoint given the standard AWS way, every 9th request throttled or dropped by the proxy, and 30 SlowDown
    answers in a row when training first reads a cache part (throttling that outlasts the SDK's retries): the run
    finishes, and the training run never restarted its worker group. Then a cache object's bytes are flipped on
    the server: training refuses it, naming it."""
    teacher = make_teacher_file(tmp_path / "t1.pt", "resnet8", seed=1)
    other = make_teacher_file(tmp_path / "t2.pt", "resnet14", seed=2)
    cfg = tiny_config(
        tmp_path,
        teachers=[
            {"name": "t1", "arch": "resnet8", "checkpoint": str(teacher)},
            {"name": "t2", "arch": "resnet14", "checkpoint": str(other)},
        ],
        strategy={"name": "camkd", "beta": 5.0},
        train={"epochs": 1, "batch_size": 32, "milestones": [], "export": False, "max_failures": 0},
        tune={"teacher_sets": [["t1", "t2"]], "strategies": ["aver"]},
        ray={"num_cpus": 4},
    )
    raw = cfg.model_dump(mode="json") | {"root": "s3://camkd/run"}
    config = tmp_path / "s3.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = (
        {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        | s3.env()
        | {"RAY_USAGE_STATS_ENABLED": "0"}
    )
    s3.proxy.counter.every = 9
    s3.proxy.counter.armed = (
        30,
        "GET",
        ".parquet",
    )  # training's first read of a part (precompute reads none)
    bursts = s3.proxy.counter.bursts_started
    cli = [sys.executable, str(ROOT / "pipeline" / "run.py")]
    done = subprocess.run(
        [*cli, "all", "--config", str(config)], env=env, capture_output=True, text=True, timeout=900
    )
    faults = (s3.proxy.counter.slow_down, s3.proxy.counter.dropped)
    s3.proxy.counter.every, s3.proxy.counter.armed = 0, None
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert faults[0] >= 31 and faults[1] >= 1, faults
    assert s3.proxy.counter.bursts_started == bursts + 1, "the burst of 30 SlowDown answers was served"
    client = s3.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="camkd", Prefix="run/")["Contents"]]
    assert any(k.startswith("run/teachers/resnet8-") and k.endswith("/model.pt") for k in keys), (
        "copied into root"
    )
    run_summary = next(k for k in keys if k.endswith("/runs/default/resnet8-camkd-t1+t2/summary.json"))
    trained = json.loads(client.get_object(Bucket="camkd", Key=run_summary)["Body"].read())
    assert trained["status"] == "finished" and trained["resumes"] == 0, "no worker-group restart"
    assert any(k.endswith("sweep/summary.json") for k in keys)
    part = next(
        k
        for k in sorted(keys)
        if "/cache/" in k and "view-0000/part-00001.parquet" in k and k.endswith("parquet")
    )
    body = bytearray(client.get_object(Bucket="camkd", Key=part)["Body"].read())
    body[4096:4160] = bytes(b ^ 0x5A for b in body[4096:4160])
    client.put_object(Bucket="camkd", Key=part, Body=bytes(body))
    again = subprocess.run(
        [*cli, "train", "--config", str(config), "--name", "after-corruption"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 2, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"cache part s3://camkd/{part} of teacher" in again.stderr and "is corrupt" in again.stderr, (
        again.stderr[-2000:]
    )
    summary = json.loads(
        client.get_object(
            Bucket="camkd", Key="run/cache/" + part.split("/cache/")[1].split("/")[0] + "/summary.json"
        )["Body"].read()
    )
    assert [t["teacher"] for t in summary["teachers"]] == ["t1", "t2"]
