"""Running on a cluster: simulated multi-node placement, a real two-host cluster in network namespaces, `ray job submit`
against a real local head with token authentication, and static checks of the shipped cluster files (cluster/).

Every Ray cluster here is started by the test itself (its own ports, temp dir and process session) and stopped by
the test, by process id / session / network namespace. Never with a bare `ray stop`, which would kill every Ray
process on the machine, including other sessions' clusters.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
CLUSTER = REPO / "cluster"
VENV_BIN = Path(sys.executable).parent
RAY_BIN = str(VENV_BIN / "ray") if (VENV_BIN / "ray").exists() else (shutil.which("ray") or "ray")


# ------------------------------------------------------------------------------------------------------ helpers
def tiny_raw(root: Path, **scaling) -> dict:
    """A synthetic 10-class dataset and a teacher-free CE student: the smallest real 2-worker training run."""
    return {
        "root": str(root),
        "experiment": "cluster",
        "data": {
            "source": "synthetic",
            "rows_per_part": 64,
            "synthetic": {"train": 256, "test": 64, "num_classes": 10, "size": 32, "channels": 3},
        },
        "views": {"count": 1, "pad": 2},
        "student": {"arch": "resnet8"},
        "strategy": {"name": "ce"},
        "train": {
            "epochs": 1,
            "batch_size": 32,
            "milestones": [],
            "shuffle_buffer": 0,
            "max_failures": 0,
            "export": False,
        },
        "scaling": {"num_workers": 2, "cpus_per_worker": 1, "read_cpus": 0.25, **scaling},
    }


def spread_scaling() -> dict:
    """Two workers that must land on two different nodes (each node has 2 CPUs).

    `scaling.placement_strategy: STRICT_SPREAD` forces it when the config has that field. Without it, 1.5 CPU per
    worker makes two workers unable to share a 2-CPU node, so Ray's default PACK still has to spread them.
    """
    from pipeline.config import ScalingSettings

    if "placement_strategy" in ScalingSettings.model_fields:
        return {"placement_strategy": "STRICT_SPREAD", "cpus_per_worker": 1}
    return {"cpus_per_worker": 1.5}


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def ray_env(**extra) -> dict:
    """Environment for `ray` CLIs and drivers we start: token auth on, this venv first on PATH, no usage stats."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(
        RAY_AUTH_MODE="token",
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(REPO),
    )
    env.update(extra)
    return env


def ensure_token() -> None:
    subprocess.run([RAY_BIN, "get-auth-token", "--generate"], env=ray_env(), capture_output=True, check=True)


def session_pids(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    return [int(p) for p, s in (line.split() for line in out.splitlines()) if int(s) == sid]


def kill_session(sid: int, grace: float = 5.0) -> None:
    """Stop every process of one session (all Ray processes of one node started with `setsid ray start`)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in session_pids(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + wait
        while time.time() < deadline and session_pids(sid):
            time.sleep(0.2)
        if not session_pids(sid):
            return


def run_cli(args: list[str], timeout: float, env=None, prefix: list[str] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, sys.executable, str(REPO / "pipeline" / "run.py"), *args],
        cwd=REPO,
        env=env or ray_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def node_ids(summary: dict) -> list[str]:
    return [w.split("/", 1)[1] for w in summary["workers"]]


def run_driver(script: str, *args: str, cwd: Path, timeout: float) -> dict:
    """Run one of the driver scripts below in its own Python (a Ray cluster of its own), require exit 0 (else fail
    with the tail of its output), and return what it printed on its `RESULT <json>` line."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=cwd,
        env=ray_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return json.loads(
        next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT ") :]
    )


# ============================================================================ a. simulated multi-node placement
SIMULATED = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    raw = json.loads(sys.argv[2])

    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        from pipeline.store import storage
        from pipeline.train import driver as train
        from pipeline.config import validate
        from pipeline.data.ingest import ingest

        cfg = validate(raw)
        meta = ingest(cfg, log=lambda *a: None)
        summary = train.fit(cfg, meta, storage.runs_dir(cfg.root, cfg.experiment), "spread", log=print).model_dump()
        alive = {n["NodeID"]: n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]}
        print("RESULT " + json.dumps({"summary": summary, "nodes": alive}))
    finally:
        ray.shutdown()
        cluster.shutdown()
    """
)


@pytest.mark.slow
def test_simulated_multinode_workers_on_different_nodes(tmp_path):
    """Head without CPUs + two 2-CPU nodes: the two Train workers run on two nodes and share one storage root."""
    raw = tiny_raw(tmp_path / "root", **spread_scaling())
    started = time.time()
    result = run_driver(SIMULATED, str(REPO), json.dumps(raw), cwd=tmp_path, timeout=240)
    summary, nodes = result["summary"], result["nodes"]
    ids = node_ids(summary)
    assert len(ids) == 2 and ids[0] != ids[1], f"both workers on one node: {summary['workers']}"
    worker_nodes = {nid for nid, cpus in nodes.items() if cpus == 2}
    assert set(ids) == {n[:8] for n in worker_nodes}, (summary["workers"], nodes)
    # One storage root for all nodes: the checkpoint rank 0 wrote and the summary the driver wrote are both there.
    run_dir = tmp_path / "root" / "runs" / "cluster" / "spread"
    assert summary["status"] == "finished" and summary["epochs"] == 1
    assert Path(summary["checkpoint"]).is_relative_to(run_dir) and Path(summary["checkpoint"]).is_dir()
    assert json.loads((run_dir / "summary.json").read_text())["workers"] == summary["workers"]
    print(f"simulated multi-node run: {time.time() - started:.1f} s, workers {summary['workers']}")


# ========================================================= a2. per-worker reader budgets on a simulated 2-node cluster
BUDGETS = textwrap.dedent(
    """
    import json, re, subprocess, sys, time
    sys.path.insert(0, sys.argv[1])
    raw = json.loads(sys.argv[2])
    child_code = sys.argv[3]

    import ray
    from ray._private import internal_api
    from ray.cluster_utils import Cluster
    from ray.util.state import list_tasks

    import socket
    MiB = 2**20
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dashboard_port = sock.getsockname()[1]
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": True,
            "dashboard_port": dashboard_port,
            "object_store_memory": 80 * MiB,
        },
    )
    for _ in range(2):
        cluster.add_node(num_cpus=4, object_store_memory=80 * MiB)
    cluster.wait_for_nodes()
    out = {}
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        from pipeline.config import validate
        from pipeline.data.ingest import ingest

        ingest(validate(raw), log=lambda *a: None)

        def spilled():
            text = internal_api.memory_summary(cluster.address, stats_only=True)
            m = re.search(r"Spilled (\\d+) MiB", text)
            return int(m.group(1)) if m else 0

        for budget in ("worker", "cluster"):
            cfg = dict(raw, scaling=dict(raw["scaling"], read_budget=budget))
            before = spilled()
            log = open(sys.argv[4] + f"-{budget}.log", "w")
            child = subprocess.Popen(
                [sys.executable, "-c", child_code, cluster.address, json.dumps(cfg), budget],
                stdout=log, stderr=subprocess.STDOUT,
            )
            peak, started, reading = {}, time.time(), None
            while time.time() - started < 150 and child.poll() is None:
                time.sleep(1)
                try:
                    tasks = list_tasks(address=cluster.address, filters=[("state", "=", "RUNNING")], limit=2000, detail=True)
                except Exception:
                    continue
                reads = [t for t in tasks if "read_slices" in (t.name or "")]
                if reads and reading is None:
                    reading = time.time()
                peak["all"] = max(peak.get("all", 0), len(reads))
                if reading is not None and time.time() - reading > 25:
                    break
            child.kill()
            child.wait()
            time.sleep(3)
            out[budget] = {"spilled_mib": spilled() - before, "peak_running_read_tasks": peak.get("all", 0)}
        print("RESULT " + json.dumps(out))
    finally:
        ray.shutdown()
        cluster.shutdown()
    """
)
BUDGET_CHILD = textwrap.dedent(
    """
    import json, sys
    import ray
    ray.init(address=sys.argv[1], log_to_driver=True)
    from pipeline.store import storage
    from pipeline.train import driver as train
    from pipeline.config import validate
    from pipeline.data.ingest import ingest
    cfg = validate(json.loads(sys.argv[2]))
    meta = ingest(cfg, log=lambda *a: None)
    train.fit(cfg, meta, storage.runs_dir(cfg.root, cfg.experiment), "budget-" + sys.argv[3], log=print)
    """
)


@pytest.mark.slow
def test_each_workers_reader_keeps_to_its_share_of_its_node(tmp_path):
    """Two nodes with 80 MiB object stores, two Train workers on each, each worker with its own Ray Data reader
    over 64-px rows (12 KB) that it cannot consume as fast as it reads. With Ray Data's default every reader is
    sized to the whole cluster (120 MiB of store each, all the CPUs): the nodes spill. With the per-worker budget
    (half a node's store ÷ its 2 workers, read_tasks × read_cpus CPUs) nothing spills, and Ray's state API never
    sees more than `read_tasks` read tasks per worker running at once (8 for the 4 workers)."""
    raw = tiny_raw(tmp_path / "root", cpus_per_worker=1.5, read_cpus=0.25, read_tasks=2, torch_threads=1)
    raw["experiment"] = "budgets"
    raw["data"] = {
        "source": "synthetic",
        "rows_per_part": 1024,
        "row_group_rows": 128,
        "synthetic": {"train": 12288, "test": 64, "num_classes": 10, "size": 64, "channels": 3},
    }
    raw["train"] |= {"epochs": 3}
    raw["scaling"] |= {"num_workers": 4, "check_resources": False}
    raw["tracking"] = {"tensorboard": False}
    driver = str(tmp_path / "driver")
    result = run_driver(BUDGETS, str(REPO), json.dumps(raw), BUDGET_CHILD, driver, cwd=tmp_path, timeout=600)
    logs = {b: (tmp_path / f"driver-{b}.log").read_text()[-3000:] for b in ("cluster", "worker")}
    assert result["cluster"]["spilled_mib"] > 0, (result, logs["cluster"])
    assert result["worker"]["spilled_mib"] == 0, (result, logs["worker"])
    # Every worker's executor runs at most scaling.read_tasks (2) read tasks: 4 workers, at most 8 at any time.
    assert 1 <= result["worker"]["peak_running_read_tasks"] <= 8, (result, logs["worker"])
    print(f"reader budgets: {result}")


# ============================================================================ a3. doctor on a simulated cluster
DOCTOR = textwrap.dedent(
    """
    import json, subprocess, sys
    sys.path.insert(0, sys.argv[1])
    raw = json.loads(sys.argv[2])
    config = sys.argv[3]

    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    try:
        from pipeline.config import validate
        from pipeline.data.ingest import ingest

        ingest(validate(raw), log=lambda *a: None)
        outs = {}
        # The delayed reader keeps a fixed depth (scaling.read_ahead_mb 0): at 1 s a request it cannot keep up
        # (the adaptive depth hides that latency, so storage would not be the bottleneck it is given here).
        cases = (("local", raw["root"], []), ("delayed", "delay://1000" + raw["root"], ["--set", "scaling.read_ahead_mb=0"]))
        for name, root, extra in cases:
            done = subprocess.run(
                [sys.executable, sys.argv[1] + "/pipeline/run.py", "doctor", "--config", config,
                 "--set", "root=" + root, "--address", cluster.address, "--seconds", "4", *extra],
                capture_output=True, text=True, timeout=300,
            )
            outs[name] = {"rc": done.returncode, "out": done.stdout[-4000:], "err": done.stderr[-3000:]}
        print("RESULT " + json.dumps(outs))
    finally:
        cluster.shutdown()
    """
)


@pytest.mark.slow
def test_doctor_names_the_bottleneck_it_was_given(tmp_path):
    """`doctor` on a simulated 2-node cluster, over the same dataset twice: from a local root the student's step
    is the bottleneck; from the same folder behind a storage layer that answers each request after 1 s, read at a
    fixed depth (`scaling.read_ahead_mb: 0`), it names storage latency as the bottleneck (measured from both nodes)
    and what to change."""
    raw = tiny_raw(tmp_path / "root", num_workers=1)
    raw["data"]["row_group_rows"] = 32
    config = tmp_path / "doctor.yaml"
    config.write_text(yaml.safe_dump(raw))
    outs = run_driver(DOCTOR, str(REPO), json.dumps(raw), str(config), cwd=tmp_path, timeout=700)
    local, delayed = outs["local"], outs["delayed"]
    assert local["rc"] == 0 and delayed["rc"] == 0, outs
    assert "bottleneck: the student's step" in local["out"], local["out"]
    assert re.search(r"bottleneck: input: storage latency \(~1\d\d\d ms per request", delayed["out"]), (
        delayed["out"]
    )
    assert "scaling.read_ahead" in delayed["out"] and delayed["out"].count("ms per request,") == 2, delayed[
        "out"
    ]
    summary = json.loads((tmp_path / "root" / "doctor" / "summary.json").read_text())
    assert summary["bottleneck"].startswith("input: storage latency") and len(summary["nodes"]) == 2


# ================================================================= a4. precompute as GPU nodes join and nodes leave
# One driver script for both tests: a teacher file with random weights, a synthetic dataset, precompute run in a
# thread (Ray's Cluster adds and removes nodes from the main thread only) while the main thread watches the
# teacher actors through the GCS (no dashboard needed) and changes the cluster.
POOL = textwrap.dedent(
    """
    import glob, json, sys, threading, time
    sys.path.insert(0, sys.argv[1])
    root, mode = sys.argv[2], sys.argv[3]

    import ray
    from ray._private import state
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    # grow: one node with one (declared) GPU, a second joins once the first teacher actor runs.
    # lose: CPU inference on two nodes, the non-head one removed once 6 parts are written.
    node = cluster.add_node(num_cpus=2, num_gpus=1 if mode == "grow" else 0)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    import torch
    from camkd import models
    from pipeline.cache import layout as cache
    from pipeline.cache import precompute
    from pipeline.teachers import checkpoints as teachers
    from pipeline.config import validate
    from pipeline.data.ingest import ingest

    torch.manual_seed(0)
    teachers.save_model_file(root + "/t.pt", models.create("resnet20", 10, 3).eval())

    def config(sub, rows, cache_section):
        return validate({
            "root": f"{root}/{sub}",
            "data": {"source": "synthetic", "rows_per_part": 128,
                     "synthetic": {"train": rows, "test": 128, "num_classes": 10, "size": 32, "channels": 3}},
            "views": {"count": 2, "pad": 2},
            "teachers": [{"name": "t", "arch": "resnet20", "checkpoint": root + "/t.pt"}],
            "cache": {"batch_size": 128, **cache_section},
            "student": {"arch": "resnet8"}, "strategy": {"name": "kd", "teachers": ["t"]},
        })

    def teacher_actors():  # the pool's actors, started or starting (an actor placed on a new node needs seconds)
        return sum(1 for a in state.actors().values()
                   if a["State"] != "DEAD" and "TeacherPool" in a["ActorClassName"])

    def run(cfg, on_tick):
        ingest(cfg, log=lambda *a: None)
        done, res = threading.Event(), {}
        def work():
            try:
                res["summary"] = precompute.run_stage(cfg, log=print)
            except BaseException as e:
                res["error"] = repr(e)
            done.set()
        threading.Thread(target=work, daemon=True).start()
        while not done.wait(0.25):
            on_tick()
        return res

    out = {}
    if mode == "grow":
        seen = []
        def tick():
            seen.append(teacher_actors())
            if seen[-1] and "added" not in out:
                out["added"] = seen[-1]
                cluster.add_node(num_cpus=2, num_gpus=1)
        cfg = config("grow", 6144, {"features": "none", "use_gpu": True, "cpus_per_actor": 1})
        out["dry_run"] = precompute.dry_run_pool(cfg)
        out |= run(cfg, tick)
        out["actors_seen"] = sorted(set(seen))
    else:
        section = {"features": "int8", "use_gpu": False, "actors": 2, "cpus_per_actor": 0.5}
        out["plain"] = run(config("plain", 2048, section), lambda: None)
        def tick():
            if "removed_after" not in out and len(glob.glob(root + "/lost/cache/**/*.parquet", recursive=True)) >= 6:
                cluster.remove_node(node)
                out["removed_after"] = 6
        out["lost"] = run(config("lost", 2048, section), tick)
        out["digests"] = {
            name: [p.digest for v in cache.load_manifest(out[name]["summary"]["teachers"][0]["store"]).views
                   for p in v.parts]
            for name in ("plain", "lost")
        }
    print("RESULT " + json.dumps(out, default=str))
    ray.shutdown()
    cluster.shutdown()
    """
)


@pytest.mark.slow
def test_the_teacher_pool_grows_when_a_gpu_node_joins(tmp_path):
    """A cluster with one (declared) GPU node: the pool starts with one teacher actor; a second GPU node joins
    mid-run and the pool grows to two (`cache.use_gpu: true`, `actors: auto`; no CUDA call is made: the actors
    run on CPU here, Ray only counts the GPUs)."""
    out = run_driver(POOL, str(REPO), str(tmp_path), "grow", cwd=tmp_path, timeout=600)
    assert out.get("error") is None, out
    assert out["added"] == 1, f"the first actors seen before the node joined: {out}"
    assert max(out["actors_seen"]) == 2, out["actors_seen"]
    assert "on GPUs (1 each)" in out["dry_run"] and "at most 8" in out["dry_run"], out["dry_run"]


@pytest.mark.slow
@pytest.mark.fault
def test_precompute_survives_losing_a_node_with_the_same_digests(tmp_path):
    """Precompute on two nodes (two teacher actors, int8 maps); the non-head node is removed once six parts are
    written: Ray restarts the lost actor on the head, retries its tasks and rebuilds the rendered items that lived
    in the lost node's object store. The run finishes and every part's digest equals an undisturbed run's."""
    out = run_driver(POOL, str(REPO), str(tmp_path), "lose", cwd=tmp_path, timeout=600)
    assert out["plain"].get("error") is None and out["lost"].get("error") is None, out
    assert out["removed_after"] == 6, out
    plain, lost = out["digests"]["plain"], out["digests"]["lost"]
    assert len(plain) == 32 and lost == plain


# ======================================================================= a5. training loses a worker's node
LOSE_TRAINING = textwrap.dedent(
    """
    import json, os, signal, sys, threading, time
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, sys.argv[1] + "/tests")
    raw = json.loads(sys.argv[2])

    # root on S3 behind the fault proxy (every 13th request throttled or dropped), the endpoint in every node's
    # environment: the nodes started below inherit it.
    from s3server import S3Server
    s3 = S3Server().start()
    os.environ.update(s3.env())
    s3.proxy.counter.every = 13
    raw["root"] = "s3://camkd/nodes"

    import ray
    from ray._private import state
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    from pipeline.store import storage
    from pipeline.train import driver as train
    from pipeline.config import validate
    from pipeline.data.ingest import ingest

    cfg = validate(raw)
    meta = ingest(cfg, log=lambda *a: None)
    runs = storage.runs_dir(cfg.root, cfg.experiment)

    direct = s3.client()  # past the proxy: no fault may delay seeing the checkpoint (epoch 2 must not end first)

    def registered(name, checkpoint):
        key = f"{runs}/{name}/checkpoint_manager_snapshot.json".split(f"s3://{s3.bucket}/", 1)[1]
        try:
            snapshot = json.loads(direct.get_object(Bucket=s3.bucket, Key=key)["Body"].read())
            return checkpoint in [c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]]
        except Exception:  # not written yet: ask again
            return False

    def train_workers():
        return {a["Pid"]: a["Address"]["NodeID"] for a in state.actors().values()
                if a["State"] == "ALIVE" and a["ActorClassName"] == "RayTrainWorker"}

    out = {}
    for name in ("undisturbed", "lost"):
        done, res = threading.Event(), {}
        def work():
            try:
                res["summary"] = train.fit(cfg, meta, runs, name, log=print).model_dump()
            except BaseException as e:
                res["error"] = repr(e)
            done.set()
        threading.Thread(target=work, daemon=True).start()
        while not done.wait(0.1):
            if name == "lost":
                out.setdefault("seen", set()).update(train_workers())
            if name == "lost" and "removed" not in out and registered(name, "checkpoint_epoch_0001"):
                time.sleep(0.3)  # into epoch 2
                workers = train_workers()
                victim = next(n for n in nodes if n.node_id in workers.values())  # a worker's node, not the head
                cluster.remove_node(victim)
                out["removed"], out["first_group"] = victim.node_id, sorted(workers)
            elif "removed" in out and "killed" not in out:
                # the restarted group (two new workers on the nodes left): one of them killed as it starts
                workers = [p for p in train_workers() if p not in out["first_group"]]
                if len(workers) == 2:
                    os.kill(workers[0], signal.SIGKILL)
                    out["killed"] = workers[0]
        out[name] = res
    c = s3.proxy.counter
    out["s3_faults"], out["seen"] = [c.slow_down, c.dropped], len(out.get("seen", ()))
    print("RESULT " + json.dumps(out, default=str))
    ray.shutdown()
    cluster.shutdown()
    s3.stop()
    """
)


@pytest.mark.slow
@pytest.mark.fault
def test_training_survives_losing_a_workers_node_and_ends_as_if_undisturbed(tmp_path):
    """The suite's chaos scenario (benchmarks/chaos.py runs the whole pipeline so): two workers under STRICT_SPREAD
    on a 3-node cluster, root on S3 behind the fault proxy (every 13th request throttled or dropped, throughout).
    In epoch 2 the node of one worker is removed: Ray Train restarts the worker group on the two nodes left; as
    that group starts, one of its workers is killed: it restarts again (train.max_failures: 2), a third group. The
    run resumes from the epoch-1 checkpoint each time and ends with the undisturbed run's metrics, epoch for epoch
    (deterministic training; 2 epochs)."""
    raw = tiny_raw(tmp_path / "root", placement_strategy="STRICT_SPREAD")
    raw["experiment"] = "nodes"
    raw["data"]["synthetic"] |= {"train": 512, "noise": 0.3}
    raw["train"] |= {"epochs": 2, "max_failures": 2, "deterministic": True}
    raw["tracking"] = {"tensorboard": False}
    out = run_driver(LOSE_TRAINING, str(REPO), json.dumps(raw), cwd=tmp_path, timeout=700)
    assert "removed" in out and not out["undisturbed"].get("error") and not out["lost"].get("error"), out
    assert "killed" in out, f"no worker of the restarted group was killed: {out}"
    assert min(out["s3_faults"]) >= 1, f"the proxy throttled and dropped nothing: {out['s3_faults']}"
    # three worker groups of two: the first, the one after the node left, the one after the kill
    assert out["seen"] >= 6, f"only {out['seen']} Train worker processes seen: {out}"
    a, b = out["undisturbed"]["summary"], out["lost"]["summary"]
    # resumes counts the restores in the restored checkpoint's line: both restarts restored epoch 1's, so 1
    epochs = [(h["epoch"], h.get("resumes"), h.get("workers")) for h in b["history"]]
    assert (a["resumes"], b["resumes"]) == (0, 1), (a["resumes"], b["resumes"], epochs, out["removed"][:8])
    assert out["removed"][:8] not in {w.split("/")[1] for w in b["workers"]}, "the lost node ran the end"
    assert [(h["epoch"], h["train_loss"], h["val_top1"]) for h in b["history"]] == [
        (h["epoch"], h["train_loss"], h["val_top1"]) for h in a["history"]
    ]
    assert (b["final_val_top1"], b["test_top1"]) == (a["final_val_top1"], a["test_top1"])


# ====================================================================== b. two hosts: network namespaces + veth
def _netns_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root (uid 0) for network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`)"
    name = f"camkdprobe{uuid.uuid4().hex[:6]}"
    rc = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if rc.returncode != 0:
        return f"`ip netns add` does not work here: {rc.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


class TwoHosts:
    """Namespaces A and B joined by a veth pair: A = 198.18.0.1/24, B = 198.18.0.2/24 (RFC 2544 benchmark range)."""

    def __init__(self, tag: str):
        self.ns = {"A": f"camkdA{tag}", "B": f"camkdB{tag}"}
        self.veth = {"A": f"ckA{tag}", "B": f"ckB{tag}"}  # interface names: at most 15 characters
        self.ip = {"A": "198.18.0.1", "B": "198.18.0.2"}
        self.made: list[tuple[str, str]] = []
        # Ray temp dirs: short, since Ray's unix socket paths below them must fit in 107 bytes.
        self.tmp = Path(f"/tmp/ck{tag}")

    def sh(self, *args: str) -> None:
        subprocess.run(list(args), check=True, capture_output=True, text=True)

    def exec_prefix(self, side: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[side]]

    def up(self) -> None:
        for side in "AB":
            self.sh("ip", "netns", "add", self.ns[side])
            self.made.append(("netns", self.ns[side]))
        self.sh("ip", "link", "add", self.veth["A"], "type", "veth", "peer", "name", self.veth["B"])
        self.made.append(("link", self.veth["A"]))
        for side in "AB":
            self.sh("ip", "link", "set", self.veth[side], "netns", self.ns[side])
            ex = self.exec_prefix(side)
            self.sh(*ex, "ip", "addr", "add", f"{self.ip[side]}/24", "dev", self.veth[side])
            self.sh(*ex, "ip", "link", "set", self.veth[side], "up")
            self.sh(*ex, "ip", "link", "set", "lo", "up")
        # B answers across the veth: a TCP connect to a closed port is refused (not timed out). No `ping` needed.
        probe = (
            "import socket, sys\n"
            "try:\n    socket.create_connection((sys.argv[1], 9), timeout=3)\n"
            "except ConnectionRefusedError:\n    sys.exit(0)\n"
            "sys.exit(1)\n"
        )
        for _ in range(20):  # the link needs a moment after `up`
            if (
                subprocess.run([*self.exec_prefix("A"), sys.executable, "-c", probe, self.ip["B"]]).returncode
                == 0
            ):
                return
            time.sleep(0.25)
        raise RuntimeError(f"{self.ip['B']} is not reachable from namespace {self.ns['A']}")

    def pids(self, side: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.ns[side]], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def down(self) -> None:
        """Kill everything running in both namespaces, then delete the namespaces (which deletes the veth pair)."""
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            for side in "AB":
                for pid in self.pids(side):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
            deadline = time.time() + wait
            while time.time() < deadline and (self.pids("A") or self.pids("B")):
                time.sleep(0.2)
        shutil.rmtree(self.tmp, ignore_errors=True)
        for kind, name in reversed(self.made):
            if kind == "netns":
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
            else:  # gone with its namespace; only left behind if moving it into a namespace failed
                subprocess.run(["ip", "link", "del", name], capture_output=True)


@pytest.fixture
def two_hosts():
    why = _netns_available()
    if why:
        pytest.skip(why)
    hosts = TwoHosts(uuid.uuid4().hex[:6])
    try:
        hosts.up()
        yield hosts
    finally:
        hosts.down()
        for side in "AB":
            assert not Path(f"/run/netns/{hosts.ns[side]}").exists(), (
                f"namespace {hosts.ns[side]} left behind"
            )


@pytest.mark.slow
@pytest.mark.root
def test_two_host_cluster_over_veth(two_hosts, tmp_path):
    """A Ray head in namespace A, a worker node in namespace B: one Train worker on each (STRICT_SPREAD, see
    spread_scaling), so the DDP (gloo) traffic and Ray's own traffic cross the veth between 198.18.0.1 and .2."""
    started = time.time()
    ensure_token()
    gcs_port, dash_port = 6380, 8266  # each namespace has its own port space: fixed ports cannot collide
    h = two_hosts
    # gloo picks its interface from the hostname, which resolves to an address outside the namespaces; name it.
    env = {s: ray_env(GLOO_SOCKET_IFNAME=h.veth[s]) for s in "AB"}
    common = [
        "--num-cpus",
        "2",
        "--num-gpus",
        "0",
        "--object-store-memory",
        str(200 * 1024**2),
        "--disable-usage-stats",
    ]

    def ray_start(host: str, *args: str) -> None:
        done = subprocess.run(
            [
                *h.exec_prefix(host),
                "setsid",
                RAY_BIN,
                "start",
                "--node-ip-address",
                h.ip[host],
                *args,
                *common,
            ],
            env=env[host],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"ray start on host {host}: " + done.stdout[-3000:] + done.stderr[-3000:]

    ray_start(
        "A",
        "--head",
        f"--port={gcs_port}",
        f"--dashboard-port={dash_port}",
        "--include-dashboard=true",
        f"--temp-dir={h.tmp / 'a'}",
    )
    ray_start("B", f"--address={h.ip['A']}:{gcs_port}", f"--temp-dir={h.tmp / 'b'}")
    assert h.pids("A") and h.pids("B")

    root = tmp_path / "root"
    raw = tiny_raw(root, **spread_scaling())
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    ingest = run_cli(["ingest", "--config", str(cfg_file)], timeout=120)
    assert ingest.returncode == 0, ingest.stderr[-3000:]
    train = run_cli(
        ["train", "--config", str(cfg_file), "--address", f"{h.ip['A']}:{gcs_port}", "--name", "twohost"],
        timeout=240,
        env=env["A"],
        prefix=h.exec_prefix("A"),
    )
    out = train.stdout + train.stderr
    assert train.returncode == 0, out[-6000:]
    assert "2 node(s)" in out, out[-3000:]
    summary = json.loads((root / "runs" / "cluster" / "twohost" / "summary.json").read_text())
    ips = sorted(w.split("/", 1)[0] for w in summary["workers"])
    assert ips == ["198.18.0.1", "198.18.0.2"], summary["workers"]
    assert summary["status"] == "finished"
    print(f"two-host run: {time.time() - started:.1f} s, workers {summary['workers']}")


# ================================================================= c. ray job submit against a real local cluster
def submit_and_check(url: str, tmp_path: Path) -> None:
    """`ray job submit --working-dir` of a real training run against the job server at `url` (token auth on)."""
    started = time.time()
    # An absolute path on this machine: the job driver (on the head) and the workers see the same files.
    root = tmp_path / "root"
    sets = [
        "--set",
        f"root={root}",
        "--set",
        "experiment=jobs",
        "--set",
        "data.source=synthetic",
        "--set",
        "data.rows_per_part=64",
        "--set",
        "data.synthetic.train=256",
        "--set",
        "data.synthetic.test=64",
        "--set",
        "views.count=1",
        "--set",
        "student.arch=resnet8",
        "--set",
        "strategy.name=ce",
        "--set",
        "train.epochs=1",
        "--set",
        "train.batch_size=32",
        "--set",
        "train.milestones=[]",
        "--set",
        "train.export=false",
        "--set",
        "scaling.num_workers=1",
        "--set",
        "scaling.read_cpus=0.25",
    ]
    ingest = run_cli(["ingest", *sets], timeout=120)
    assert ingest.returncode == 0, ingest.stderr[-3000:]

    # Without the token the job server refuses the submission.
    denied = subprocess.run(
        [RAY_BIN, "job", "submit", "--address", url, "--", "echo", "hi"],
        env=ray_env(RAY_AUTH_MODE="disabled"),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert denied.returncode != 0, denied.stdout[-2000:]
    assert "Unauthorized" in denied.stdout + denied.stderr, denied.stdout[-2000:] + denied.stderr[-2000:]

    sub_id = f"camkd-test-{uuid.uuid4().hex[:8]}"
    submit = subprocess.run(
        [
            RAY_BIN,
            "job",
            "submit",
            "--address",
            url,
            "--submission-id",
            sub_id,
            "--working-dir",
            str(REPO),
            "--",
            "python",
            "pipeline/run.py",
            "train",
            *sets,
            "--name",
            "via-job",
        ],
        cwd=REPO,
        env=ray_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = submit.stdout + submit.stderr
    assert submit.returncode == 0, out[-6000:]
    status = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from ray.job_submission import JobSubmissionClient as C; "
            "print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)",
            url,
            sub_id,
        ],
        env=ray_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.stdout.strip().splitlines()[-1] == "SUCCEEDED", status.stdout + status.stderr
    summary = json.loads((root / "runs" / "jobs" / "via-job" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs"] == 1
    assert "[ray] attached to" in out, "the job must attach to the cluster, not start its own Ray"
    print(f"ray job submit run: {time.time() - started:.1f} s")


@pytest.mark.fault
@pytest.mark.slow
def test_ray_job_submit_wrong_address_fails_fast(tmp_path):
    (port,) = free_ports(1)  # nothing listens there
    started = time.time()
    proc = subprocess.run(
        [RAY_BIN, "job", "submit", "--address", f"http://127.0.0.1:{port}", "--", "echo", "hi"],
        env=ray_env(),
        capture_output=True,
        text=True,
        timeout=90,
        cwd=tmp_path,
    )
    took = time.time() - started
    assert proc.returncode != 0
    assert "Failed to connect" in proc.stdout + proc.stderr or "ConnectionError" in proc.stdout + proc.stderr
    assert took < 60, f"took {took:.0f} s"


# ============================================================================ d. static checks of cluster files
def _yaml_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _walk(node, path=()):
    """Yield (path, key, value) for every mapping entry in a YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path, k, v
            yield from _walk(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, (*path, i))


def _env_lists(node):
    for _, k, v in _walk(node):
        if k == "env" and isinstance(v, list):
            yield v


CLUSTER_YAMLS = sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml"))


@pytest.mark.fault
def test_cluster_files_exist_and_parse():
    names = {p.relative_to(CLUSTER).as_posix() for p in CLUSTER_YAMLS}
    assert {
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/pvc.yaml",
        "launcher/aws.yaml",
    } <= names
    assert (CLUSTER / "Dockerfile").is_file() and (CLUSTER / "README.md").is_file()
    assert os.access(CLUSTER / "local-cluster.sh", os.X_OK)
    for p in CLUSTER_YAMLS:
        assert _yaml_docs(p), f"{p} is empty"
    sh = subprocess.run(["bash", "-n", str(CLUSTER / "local-cluster.sh")], capture_output=True, text=True)
    assert sh.returncode == 0, sh.stderr


@pytest.mark.fault
def test_no_public_exposure_of_ray_ports():
    for p in CLUSTER_YAMLS:
        for doc in _yaml_docs(p):
            kind = doc.get("kind") if isinstance(doc, dict) else None
            assert kind != "Ingress", f"{p}: no Ingress; use kubectl port-forward"
            for path, k, v in _walk(doc):
                if k in ("type", "serviceType") and v in ("LoadBalancer", "NodePort"):
                    raise AssertionError(
                        f"{p}: {'.'.join(map(str, path))}.{k} = {v}; only ClusterIP is allowed"
                    )
                if k == "enableIngress":
                    assert v is False, f"{p}: enableIngress must be false"
    launcher = yaml.safe_load((CLUSTER / "launcher" / "aws.yaml").read_text())
    public_dashboard = re.compile(r"dashboard-host[\s=]+[\"']?(0\.0\.0\.0|::)")
    for _, k, v in _walk(launcher):  # every command and option the launcher runs (comments are not data)
        for s in (
            [v] if isinstance(v, str) else [x for x in v if isinstance(x, str)] if isinstance(v, list) else []
        ):
            assert not public_dashboard.search(s), f"aws.yaml: {k}: {s!r} exposes the dashboard"
        if k == "head_start_ray_commands":
            assert any("ray start --head" in c for c in v) and not any("dashboard-host" in c for c in v)
    for _, k, v in _walk(launcher):
        if k in ("CidrIp", "CidrIpv6") or k == "IpRanges":
            cidrs = [v] if isinstance(v, str) else [r.get("CidrIp") for r in v]
            for cidr in cidrs:
                assert cidr not in ("0.0.0.0/0", "::/0"), (
                    "the security group must not open ports to the world"
                )


@pytest.mark.fault
def test_token_auth_enabled_everywhere():
    for p in [*CLUSTER_YAMLS, CLUSTER / "local-cluster.sh", CLUSTER / "Dockerfile", CLUSTER / "README.md"]:
        text = p.read_text()
        assert "RAY_AUTH_MODE=disabled" not in text.replace(" ", ""), f"{p} disables token auth"
        if p.suffix in (".yaml", ".yml"):
            for doc in _yaml_docs(p):
                for env in _env_lists(doc):
                    for var in env:
                        if isinstance(var, dict) and var.get("name") == "RAY_AUTH_MODE":
                            assert var.get("value") == "token", f"{p}: RAY_AUTH_MODE={var.get('value')}"
                for _, k, v in _walk(doc):
                    if k == "authOptions":
                        assert v.get("mode") == "token", f"{p}: authOptions.mode must be token"
    # Where the format allows it, token auth is switched on explicitly.
    cluster = _yaml_docs(CLUSTER / "kuberay" / "raycluster.yaml")
    rc = next(d for d in cluster if d.get("kind") == "RayCluster")
    assert rc["spec"]["authOptions"]["mode"] == "token"
    job = next(d for d in _yaml_docs(CLUSTER / "kuberay" / "rayjob.yaml") if d.get("kind") == "RayJob")
    assert job["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token"
    aws = (CLUSTER / "launcher" / "aws.yaml").read_text()
    assert "RAY_AUTH_MODE=token" in aws
    assert "RAY_AUTH_MODE=token" in (CLUSTER / "local-cluster.sh").read_text()


@pytest.mark.fault
def test_kuberay_manifests_shape():
    rc = next(d for d in _yaml_docs(CLUSTER / "kuberay" / "raycluster.yaml") if d.get("kind") == "RayCluster")
    job = next(d for d in _yaml_docs(CLUSTER / "kuberay" / "rayjob.yaml") if d.get("kind") == "RayJob")
    pvc = next(
        d for d in _yaml_docs(CLUSTER / "kuberay" / "pvc.yaml") if d.get("kind") == "PersistentVolumeClaim"
    )
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for spec in (rc["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
        head = spec["headGroupSpec"]["template"]["spec"]
        assert "nvidia.com/gpu" not in json.dumps(head["containers"][0].get("resources", {}))
        assert str(spec["headGroupSpec"]["rayStartParams"].get("num-gpus", "0")) == "0"
        gpu = [g for g in spec["workerGroupSpecs"] if "nvidia.com/gpu" in json.dumps(g["template"])]
        assert gpu, "a GPU worker group"
        for g in gpu:
            limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) == 1
            assert 0 <= g["minReplicas"] <= g["maxReplicas"]
        for pod in [head] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]:
            mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0].get("volumeMounts", [])}
            assert "/data" in mounts, "shared storage mounted at /data on every pod"
            vol = next(v for v in pod["volumes"] if v["name"] == mounts["/data"])
            assert vol["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    entry = job["spec"]["entrypoint"]
    assert "pipeline/run.py all" in entry and "root=/data/camkd" in entry
    cfg_path = entry.split("--config", 1)[1].split()[0]  # the repo lives at /home/ray/camkd-ray in the image
    in_repo = REPO / cfg_path.removeprefix("/home/ray/camkd-ray/")
    assert in_repo.is_file(), f"the RayJob's config {cfg_path} is not in the repository"
    assert "/home/ray/camkd-ray" in (CLUSTER / "Dockerfile").read_text()


@pytest.mark.fault
def test_readme_commands_match_the_cli():
    readme = (CLUSTER / "README.md").read_text()
    assert "kubectl port-forward" in readme
    assert "RAY_AUTH_MODE=token ray job submit" in readme
    assert "cluster/local-cluster.sh start" in readme and "cluster/local-cluster.sh stop" in readme
    # Every `pipeline/run.py <stage>` in the README is a real stage and its flags exist.
    sys.path.insert(0, str(REPO))
    from pipeline.run import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    seen = set()
    # `pipeline/run.py <stage> <flags>` up to the end of the line, a quote, `&&` or a comment.
    for m in re.finditer(r"pipeline/run\.py ([a-z]+)([^\n`\"&|;#]*)", readme):
        stage, rest = m.group(1), m.group(2)
        assert stage in sub.choices, f"README uses unknown stage {stage!r}"
        flags = {f for a in sub.choices[stage]._actions for f in a.option_strings}
        for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", rest):
            assert flag in flags, f"README: `{stage} {flag}` is not a flag of that stage"
        seen.add(stage)
    assert {"all", "quickstart"} <= seen
    # Every file the README tells people to apply exists.
    for path in re.findall(r"cluster/[\w./-]+\.(?:yaml|sh)", readme):
        assert (REPO / path).is_file(), f"README names {path}, which does not exist"


# ============================================================================== the local multi-node script
@pytest.mark.slow
def test_local_cluster_script_and_ray_job_submit(tmp_path):
    """cluster/local-cluster.sh starts a head + 1 worker node (2 nodes registered); a training run submitted with
    `ray job submit --working-dir .` (token auth) succeeds there; `stop` leaves nothing behind."""
    state = Path(f"/tmp/cklc{uuid.uuid4().hex[:6]}")
    env = ray_env(CAMKD_CLUSTER_DIR=str(state), RAY=RAY_BIN, WORKER_CPUS="2")
    script = str(CLUSTER / "local-cluster.sh")
    sessions: list[int] = []
    try:
        start = subprocess.run([script, "start", "1"], env=env, capture_output=True, text=True, timeout=180)
        assert start.returncode == 0, start.stdout[-3000:] + start.stderr[-3000:]
        m = re.search(
            r"RAY_AUTH_MODE=token ray job submit --address (http://127\.0\.0\.1:\d+) --working-dir \.",
            start.stdout,
        )
        assert m, start.stdout
        sessions = [
            int(x)
            for x in re.search(r'SESSIONS="([^"]*)"', (state / "cluster.env").read_text()).group(1).split()
        ]
        assert len(sessions) == 2 and all(session_pids(s) for s in sessions)
        nodes = subprocess.run(
            [
                RAY_BIN,
                "list",
                "nodes",
                "--address",
                m.group(1),
                "--filter",
                "state=ALIVE",
                "--format",
                "json",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert len(json.loads(nodes.stdout)) == 2, nodes.stdout + nodes.stderr
        status = subprocess.run([script, "status"], env=env, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "w1: session" in status.stdout, status.stdout + status.stderr
        submit_and_check(m.group(1), tmp_path)
        again = subprocess.run([script, "start", "1"], env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode != 0 and "is running" in again.stderr
        stop = subprocess.run([script, "stop"], env=env, capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stderr
        assert not any(session_pids(s) for s in sessions), "stop left processes behind"
        assert not (state / "cluster.env").exists()
    finally:
        for sid in sessions:
            kill_session(sid)
        shutil.rmtree(state, ignore_errors=True)


# ====================================================================== shipped cluster configs vs training configs
def _bytes(value) -> float:
    """A Kubernetes quantity or a plain byte count → bytes."""
    text = str(value)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "g": 2**30}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def _kuberay_gpu_groups(spec: dict) -> list[dict]:
    """(CPUs, GPUs, max replicas, object store bytes, /dev/shm bytes) of each GPU worker group."""
    out = []
    for g in spec["workerGroupSpecs"]:
        pod = g["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        if "nvidia.com/gpu" not in limits:
            continue
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"]
        out.append(
            {
                "cpus": float(limits["cpu"]),
                "gpus": float(limits["nvidia.com/gpu"]),
                "max_replicas": g["maxReplicas"],
                "object_store": _bytes(g["rayStartParams"]["object-store-memory"]),
                "shm": _bytes(shm),
            }
        )
    return out


def _launcher_gpu_nodes(doc: dict) -> list[dict]:
    shm = next(o for o in doc["docker"]["run_options"] if o.startswith("--shm-size="))
    store = re.search(r"--object-store-memory=(\d+)", " ".join(doc["worker_start_ray_commands"]))
    out = []
    for node in doc["available_node_types"].values():
        res = node.get("resources", {})
        if res.get("GPU"):
            out.append(
                {
                    "cpus": float(res["CPU"]),
                    "gpus": float(res["GPU"]),
                    "max_replicas": node["max_workers"],
                    "object_store": float(store.group(1)),
                    "shm": _bytes(shm.split("=", 1)[1]),
                }
            )
    return out


GPU_CONFIGS = [p for p in sorted((REPO / "configs").glob("*.yaml")) if "use_gpu: true" in p.read_text()]


@pytest.mark.parametrize("config", GPU_CONFIGS, ids=lambda p: p.name)
def test_shipped_cluster_configs_fit_the_training_configs_they_serve(config):
    """Every GPU training config on every shipped cluster shape: a GPU node holds a Train worker plus the read CPUs
    the capacity model gives it, enough GPU nodes exist for the workers, the object store fits in /dev/shm, and
    Ray Data has CPUs to run on (the KubeRay head has none)."""
    from pipeline.config import load_config
    from pipeline.ops import capacity

    cfg = load_config(config)
    need = capacity.estimate(cfg, None, None, capacity.probe_shapes(cfg)).read_cpus_per_worker
    rc = next(d for d in _yaml_docs(CLUSTER / "kuberay" / "raycluster.yaml") if d.get("kind") == "RayCluster")
    clusters = {"kuberay/raycluster.yaml": _kuberay_gpu_groups(rc["spec"])}
    job = next(d for d in _yaml_docs(CLUSTER / "kuberay" / "rayjob.yaml") if d.get("kind") == "RayJob")
    if config.name in job["spec"]["entrypoint"]:
        clusters["kuberay/rayjob.yaml"] = _kuberay_gpu_groups(job["spec"]["rayClusterSpec"])
    clusters["launcher/aws.yaml"] = _launcher_gpu_nodes(
        yaml.safe_load((CLUSTER / "launcher" / "aws.yaml").read_text())
    )
    s = cfg.scaling
    for name, groups in clusters.items():
        assert groups, f"{name}: no GPU worker group"
        for g in groups:
            where = f"{name} for {config.name}"
            assert g["gpus"] >= s.gpus_per_worker, where
            assert g["cpus"] >= s.cpus_per_worker + need, (
                f"{where}: a GPU node has {g['cpus']:g} CPUs; the worker needs {s.cpus_per_worker:g} + "
                f"{need:.1f} read CPUs (capacity model)"
            )
            assert g["max_replicas"] * (g["gpus"] // s.gpus_per_worker) >= s.num_workers, where
            assert g["object_store"] < g["shm"], f"{where}: object store does not fit in /dev/shm"
