"""Chaos run of the whole pipeline: faults at random times drawn from a seed, then a comparison with an undisturbed run.

On a simulated cluster (`ray.cluster_utils.Cluster`: a head and two worker nodes) started here, with `root` on an
S3 server behind the fault proxy (tests/s3server.py: throttling and dropped connections at a set rate throughout),
`pipeline/run.py all` (ingest → teachers → precompute → a 2-worker training run → a 3-trial sweep) runs as a
subprocess attached to the cluster by its address, while this driver kills Ray Train workers, teacher actors, read
tasks' workers, a whole non-head node (a fresh one joins later) and once the pipeline's driver itself (then re-runs
the same command). It then compares with an undisturbed run of the same config (run first, its results kept under
`--root` and reused): every cache part's digest, the training run's per-epoch metrics and student.pt digest, every
sweep trial finished, nothing half-written under root. Exits 1 naming each difference. Never part of the test suite.

    python benchmarks/chaos.py --seed 1 [--root chaos-runs] [--faults 6] [--budget-s 1500] [--fault-every 13]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

os.environ["RAY_AUTH_MODE"] = (
    "token"  # before Ray is imported: the clusters here use token auth, as `ray start`'s
)
MiB = 2**20
BUCKET = "camkd"
ROOT_URL = f"s3://{BUCKET}/run"  # the same root for both runs: a run's config (in student.pt) names its root
NODE = {"num_cpus": 2, "object_store_memory": 80 * MiB}
PHASES = (
    "precompute",
    "train",
    "tune",
)  # the stages the faults are aimed at, in the order the pipeline runs them
KINDS = ("teacher_actor", "read_task", "train_worker", "node", "driver")
# Which phases a fault of each kind may be aimed at (its targets exist only then).
AIM = {
    "teacher_actor": ("precompute",),
    "read_task": ("precompute", "train", "tune"),
    "train_worker": ("train", "tune"),
    "node": ("precompute", "train", "tune"),
    "driver": ("precompute", "train", "tune"),
}
# How long after its phase began a fault may come (seconds): precompute and training last seconds here, the sweep ~1 min.
DELAY = {"precompute": (0.2, 3.0), "train": (0.5, 6.0), "tune": (1.0, 30.0)}
# What Ray and Arrow print when they recover (counted in the pipeline's output), and the pipeline's own resume lines.
LOG_RECOVERIES = {
    "Ray tasks retried after their worker died": ("so the task will be retried",),
    "Train worker group failures (the group restarted)": (
        "Graceful shutdown of backend failed",
        "Error in control loop iteration",
    ),
    "S3 uploads retried by Arrow after SlowDown": ("retry = ",),
}
RESUME_LINES = (
    "[train] resuming",
    "reused;",
    "cache up to date",
    "already finished",
    "[tune] resuming",
    "no receipt (interrupted",
)


def pipeline_config(teachers: Path) -> dict:
    """Tiny: 256 synthetic 32-px images, two untrained teachers, 2 deterministic epochs, a sweep of 3 trials."""
    return {
        "root": ROOT_URL,
        "experiment": "chaos",
        "data": {
            "source": "synthetic",
            "rows_per_part": 64,
            "synthetic": {
                "train": 256,
                "test": 64,
                "num_classes": 10,
                "size": 32,
                "channels": 3,
                "noise": 0.3,
            },
        },
        "views": {"count": 2, "pad": 2},
        "teachers": [
            {"name": "t1", "arch": "resnet8", "checkpoint": str(teachers / "t1.pt")},
            {"name": "t2", "arch": "resnet14", "checkpoint": str(teachers / "t2.pt")},
        ],
        "cache": {"features": "fp16", "batch_size": 64, "actors": 2, "cpus_per_actor": 0.5},
        "student": {"arch": "resnet8"},
        "strategy": {"name": "camkd", "teachers": ["t1", "t2"], "beta": 5.0},
        "train": {
            "epochs": 2,
            "batch_size": 32,
            "milestones": [],
            "shuffle_buffer": 0,
            "max_failures": 8,
            "deterministic": True,
            "export": False,
        },
        "scaling": {"num_workers": 2, "cpus_per_worker": 1, "read_cpus": 0.25},
        "tune": {
            "teacher_sets": [["t1", "t2"]],
            "strategies": ["aver"],
            "space": {"strategy.temperature": [2.0, 4.0, 8.0]},
            "asha": {"enabled": False},
        },
        "tracking": {"tensorboard": False},
    }


def make_teachers(folder: Path) -> Path:
    """Two untrained teacher checkpoints with seeded weights (the same files every time)."""
    import torch

    from camkd import models
    from pipeline.teachers import checkpoints

    folder.mkdir(parents=True, exist_ok=True)
    for seed, (name, arch) in enumerate((("t1", "resnet8"), ("t2", "resnet14")), start=1):
        if not (folder / f"{name}.pt").exists():
            torch.manual_seed(seed)
            checkpoints.save_model_file(str(folder / f"{name}.pt"), models.create(arch, 10, 3).eval())
    return folder


# ------------------------------------------------------------------------------------------ the world it runs in
def ray_env(extra: dict[str, str]) -> dict[str, str]:
    """The pipeline's environment: token auth (as tests/test_cluster.py), this checkout first, unbuffered output."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {
        "RAY_AUTH_MODE": "token",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DEDUP_LOGS": "1",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    return env | extra


def start_cluster(s3, workers: int = 2):
    """A head (1 CPU, the dashboard: Tune needs the State API) and `workers` nodes of NODE's size, whose processes
    have the S3 endpoint and credentials in their environment (as a real cluster's nodes would)."""
    from ray.cluster_utils import Cluster
    from s3server import free_port

    os.environ.update(ray_env(s3.env()))

    head = {
        "num_cpus": 1,
        "include_dashboard": True,
        "dashboard_port": free_port(),
        "object_store_memory": 80 * MiB,
    }
    cluster = Cluster(initialize_head=True, head_node_args=head)
    for _ in range(workers):
        cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    return cluster


def objects(s3) -> dict[str, bytes | int]:
    """Every object under the root: key → size."""
    client, out, token = s3.client(), {}, None
    while True:
        extra = {"ContinuationToken": token} if token else {}
        page = client.list_objects_v2(Bucket=BUCKET, Prefix="run/", **extra)
        out |= {o["Key"]: o["Size"] for o in page.get("Contents", [])}
        if not page.get("IsTruncated"):
            return out
        token = page["NextContinuationToken"]


def read(s3, key: str) -> bytes:
    return s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()


def wipe(s3) -> None:
    client = s3.client()
    for key in objects(s3):
        client.delete_object(Bucket=BUCKET, Key=key)


# ------------------------------------------------------------------------------------- what a finished run holds
VOLATILE = (
    "second",
    "per_s",
    "samples_s",
    "time",
    "wall",
    "throughput",
    "workers",
    "bytes",
    "stall",
    "wait",
    "resumes",
)


def epoch_metrics(history: list[dict]) -> list[dict]:
    """Each epoch's numbers that a deterministic run must reproduce (not its timings or where it ran)."""
    keep = []
    for h in history:
        keep.append(
            {k: v for k, v in h.items() if isinstance(v, int | float) and not any(w in k for w in VOLATILE)}
        )
    return keep


def collect(s3, cfg: dict, keep: Path) -> dict:
    """The comparable results under root: cache part digests, the training run (its student.pt copied to `keep`),
    the sweep's trials, the root's hygiene (half-written objects, parts without receipts)."""
    from pipeline.config import validate
    from pipeline.train.driver import run_name_for

    keys = objects(s3)
    cache = {}
    for key in sorted(k for k in keys if "/cache/" in k and k.endswith("/manifest.json")):
        manifest = json.loads(read(s3, key))
        for v, view in enumerate(manifest["views"]):
            for part in view["parts"]:
                cache[f"{key.rsplit('/', 1)[0]}/view-{v:04d}/{part['name']}"] = part["digest"]
    run = f"run/runs/{cfg['experiment']}/{run_name_for(validate(cfg))}"
    train = json.loads(read(s3, f"{run}/summary.json")) if f"{run}/summary.json" in keys else {}
    student = f"{run}/student.pt"
    sweep_key = f"run/runs/{cfg['experiment']}/sweep/summary.json"
    sweep = json.loads(read(s3, sweep_key)) if sweep_key in keys else {}
    trial_runs = [k for k in keys if "/sweep/train/" in k and k.endswith("/summary.json")]
    return {
        "cache": cache,
        "epochs": epoch_metrics(train.get("history", [])),
        "train_resumes": train.get("resumes"),
        "student_sha256": keep_file(read(s3, student), keep) if student in keys else None,
        "student_file": str(keep),
        "trials": [
            {k: t.get(k) for k in ("trial", "trial_id", "status", "epochs")}
            for t in sweep.get("leaderboard", [])
        ],
        "trial_resumes": sum(json.loads(read(s3, k)).get("resumes", 0) for k in trial_runs),
        "half_written": sorted(k for k in keys if ".tmp-" in k),
        "without_receipt": sorted(
            k for k in keys if "/cache/" in k and k.endswith(".parquet") and k + ".receipt.json" not in keys
        ),
    }


def keep_file(data: bytes, path: Path) -> str:
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def student_diff(a: str, b: str) -> str:
    """What differs between two student.pt files: weights (by name), other fields, config fields (dotted)."""
    import torch

    x, y = (torch.load(p, weights_only=True) for p in (a, b))
    out = [
        f"weight {k}" for k in x["state_dict"] if not torch.equal(x["state_dict"][k], y["state_dict"].get(k))
    ]
    out += [
        f"field {k}"
        for k in sorted(set(x) | set(y))
        if k not in ("state_dict", "config") and x.get(k) != y.get(k)
    ]

    def flat(d, pre=""):
        return {f"{pre}{k}": v for k, v in d.items() if not isinstance(v, dict)} | {
            kk: vv for k, v in d.items() if isinstance(v, dict) for kk, vv in flat(v, f"{pre}{k}.").items()
        }

    fx, fy = flat(x.get("config", {})), flat(y.get("config", {}))
    out += [
        f"config {k}: {fy.get(k)!r} (undisturbed {fx.get(k)!r})"
        for k in sorted(set(fx) | set(fy))
        if fx.get(k) != fy.get(k)
    ]
    return "; ".join(out) or "the same contents, other bytes"


def differences(base: dict, got: dict, trials: int) -> list[str]:
    """Every way the chaos run's results differ from the undisturbed run's, named."""
    out = []
    for part in sorted(set(base["cache"]) | set(got["cache"])):
        if base["cache"].get(part) != got["cache"].get(part):
            out.append(
                f"cache part {part}: digest {got['cache'].get(part)} != undisturbed {base['cache'].get(part)}"
            )
    if got["epochs"] != base["epochs"]:
        out.append(
            f"training's per-epoch metrics differ:\n  chaos {got['epochs']}\n  undisturbed {base['epochs']}"
        )
    if got["student_sha256"] != base["student_sha256"]:
        what = student_diff(base["student_file"], got["student_file"]) if got["student_sha256"] else "missing"
        out.append(
            f"student.pt digest {got['student_sha256']} != undisturbed {base['student_sha256']}: {what}"
        )
    if len(got["trials"]) < trials:
        out.append(f"the sweep reported {len(got['trials'])} trial(s), not {trials}: {got['trials']}")
    out += [
        f"sweep trial not finished: {t}" for t in got["trials"] if t.get("status") not in ("finished", None)
    ]
    out += [f"half-written object left under root: {k}" for k in got["half_written"]]
    out += [f"cache part without its receipt: {k}" for k in got["without_receipt"]]
    return out


# -------------------------------------------------------------------------------------------------- the faults
@dataclass
class Fault:
    kind: str
    phase: str
    delay: float  # seconds after its phase began
    due: float | None = None
    note: str = ""


def plan_faults(rng: random.Random, count: int) -> list[Fault]:
    """`count` faults: every kind once (the driver exactly once), then more of the others; each aimed at a phase
    its targets live in and a delay into it, all drawn from `rng`; in the order the pipeline reaches them."""
    kinds = list(KINDS[: max(1, count)])
    others = [k for k in KINDS if k != "driver"]
    kinds += [rng.choice(others) for _ in range(count - len(kinds))]
    faults = []
    for kind in kinds:
        phase = rng.choice(AIM[kind])
        faults.append(Fault(kind, phase, round(rng.uniform(*DELAY[phase]), 1)))
    return sorted(faults, key=lambda f: (PHASES.index(f.phase), f.delay))


def phase_of(log: str) -> str | None:
    """The stage the pipeline's driver is in, from its own output lines."""
    marks = {"tune": "[tune] sweep of", "train": "[train] resnet8-camkd", "precompute": "[precompute] "}
    return next((p for p, mark in marks.items() if mark in log), None)


class Targets:
    """Processes of the cluster that a fault may hit, from Ray's State API (against this cluster's address)."""

    def __init__(self, address: str) -> None:
        self.address = address

    def actors(self, cls: str) -> list[tuple[int, str]]:
        from ray.util.state import list_actors

        alive = list_actors(address=self.address, filters=[("state", "=", "ALIVE")], limit=10000)
        return [(a.pid, a.node_id) for a in alive if cls in (a.class_name or "")]

    def read_tasks(self) -> list[tuple[int, str]]:
        from ray.util.state import list_tasks

        running = list_tasks(address=self.address, filters=[("state", "=", "RUNNING")], limit=10000)
        names = ("read_slices", "render_item", "ReadParquet")
        return [
            (t.worker_pid, t.node_id)
            for t in running
            if t.worker_pid and any(n in (t.name or "") for n in names)
        ]

    def of(self, kind: str) -> list[tuple[int, str]]:
        try:
            if kind == "teacher_actor":
                return self.actors("TeacherPool")
            if kind == "train_worker":
                return self.actors("RayTrainWorker")
            if kind == "read_task":
                return self.read_tasks()
        except Exception:  # the State API answers late or not at all while nodes come and go: try again later
            return []
        return []


class Chaos:
    """Runs the pipeline command, injects the planned faults as the run reaches their phases, re-runs the command
    after the driver is killed, and keeps a log of every fault."""

    def __init__(self, cluster, cmd: list[str], env: dict, logs: Path, seed: int, budget_s: float) -> None:
        self.cluster, self.cmd, self.env, self.logs = cluster, cmd, env, logs
        self.rng = random.Random(seed * 7919 + 1)  # which target, when a node comes back
        self.targets = Targets(cluster.gcs_address)
        self.budget_s, self.started = budget_s, time.time()
        self.events: list[str] = []
        self.attempts: list[Path] = []
        self.rejoin_at: float | None = None
        self.proc: subprocess.Popen | None = None

    def say(self, line: str) -> None:
        line = f"[chaos +{time.time() - self.started:6.1f} s] {line}"
        self.events.append(line)
        print(line, flush=True)

    def launch(self) -> None:
        path = self.logs / f"attempt-{len(self.attempts) + 1}.log"
        self.attempts.append(path)
        self.proc = subprocess.Popen(
            self.cmd, env=self.env, cwd=REPO, stdout=path.open("w"), stderr=subprocess.STDOUT
        )
        self.say(
            f"pipeline attempt {len(self.attempts)} started (pid {self.proc.pid}): {' '.join(self.cmd[1:4])} ..."
        )

    def run(self, faults: list[Fault]) -> int:
        """Until the pipeline ends by itself (its exit status), or the budget is spent (-1)."""
        self.launch()
        while True:
            rc = self.proc.poll()
            if rc is not None:
                self.say(f"pipeline attempt {len(self.attempts)} exited with status {rc}")
                self.rejoin(force=True)
                return rc
            if time.time() - self.started > self.budget_s:
                self.proc.kill()
                self.proc.wait()
                self.say(f"budget of {self.budget_s:.0f} s spent: pipeline stopped")
                return -1
            self.rejoin()
            if faults:
                faults = self.step(faults)
            time.sleep(0.5)

    def step(self, faults: list[Fault]) -> list[Fault]:
        """Inject the next fault when its phase has run its delay and it has a target; skip it if its phase passed."""
        fault, now = faults[0], time.time()
        phase = phase_of(self.attempts[-1].read_text(errors="replace"))
        if phase is None or PHASES.index(phase) < PHASES.index(fault.phase):
            return faults
        if PHASES.index(phase) > PHASES.index(fault.phase) or (fault.due and now > fault.due + 90):
            self.say(f"skipped {fault.kind} aimed at {fault.phase}: no target while it ran")
            return faults[1:]
        if fault.due is None:
            fault.due = now + fault.delay
        if now < fault.due or not self.inject(fault):
            return faults
        return faults[1:]

    def inject(self, fault: Fault) -> bool:
        if fault.kind == "driver":
            pid = self.proc.pid
            self.proc.kill()
            self.proc.wait()
            self.say(
                f"FAULT driver: SIGKILL to the pipeline's driver (pid {pid}) in {fault.phase}; re-running"
            )
            time.sleep(2)
            self.launch()
            return True
        if fault.kind == "node":
            return self.remove_node(fault)
        found = sorted(self.targets.of(fault.kind))
        if not found:
            return False
        pid, node = self.rng.choice(found)
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            return False
        self.say(f"FAULT {fault.kind}: SIGKILL to pid {pid} on node {(node or '?')[:8]} in {fault.phase}")
        return True

    def remove_node(self, fault: Fault) -> bool:
        """A non-head node (one running a Train worker or teacher actor, if one does within 20 s) removed; a fresh
        one of the same size joins 5-15 s later."""
        if self.rejoin_at is not None:
            return False
        nodes = {n.node_id: n for n in self.cluster.worker_nodes}
        busy = {nid for _, nid in self.targets.of("train_worker") + self.targets.of("teacher_actor")}
        choice = sorted(nid for nid in nodes if nid in busy)
        if not choice and time.time() < fault.due + 20:
            return False  # its workers or actors may still be starting: a busy node is the fault worth having
        choice = choice or sorted(nodes)
        victim = self.rng.choice(choice)
        self.cluster.remove_node(nodes[victim])
        self.rejoin_at = time.time() + self.rng.uniform(5, 15)
        self.say(f"FAULT node: removed node {victim[:8]} in {fault.phase} (busy: {victim in busy})")
        return True

    def rejoin(self, force: bool = False) -> None:
        if self.rejoin_at is not None and (force or time.time() >= self.rejoin_at):
            node = self.cluster.add_node(**NODE)
            self.rejoin_at = None
            self.say(f"a fresh node {node.node_id[:8]} joined")


# ------------------------------------------------------------------------------------------------------- driver
def recoveries(chaos: Chaos, got: dict, proxy) -> list[str]:
    """How the pipeline recovered, from its own output and files (and the proxy's count of what it survived)."""
    text = "\n".join(p.read_text(errors="replace").replace("\r", "\n") for p in chaos.attempts)
    lines = [
        f"driver re-runs (the same command): {len(chaos.attempts) - 1}",
        f"training run resumes from a checkpoint (summary.json): {got['train_resumes']}",
        f"sweep trial resumes from a checkpoint (their summary.json): {got['trial_resumes']}",
        f"S3 faults served and survived: {proxy.slow_down} SlowDown, {proxy.dropped} dropped connections "
        f"of {proxy.requests} requests",
    ]
    for label, needles in LOG_RECOVERIES.items():
        lines.append(f"{label}: {sum(text.count(n) for n in needles)}")
    lines += [ln.strip()[:200] for ln in text.splitlines() if any(m in ln for m in RESUME_LINES)]
    return lines


def run_pipeline(cluster, s3, config: Path, logs: Path, seed: int, budget_s: float, faults: list[Fault]):
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / "pipeline" / "run.py"), "all", "--config", str(config)]
    cmd += ["--address", cluster.address]
    chaos = Chaos(cluster, cmd, ray_env(s3.env()), logs, seed, budget_s)
    try:
        rc = chaos.run(faults)
    finally:  # never leave the pipeline running (this driver failed, or was interrupted)
        if chaos.proc is not None and chaos.proc.poll() is None:
            chaos.proc.kill()
            chaos.proc.wait()
    return chaos, rc


def baseline(args, cfg: dict, config: Path, key: str) -> dict:
    """The undisturbed run's results: read from `--root` when a run of this config left them, else run now."""
    from s3server import S3Server

    saved = Path(args.root) / f"undisturbed-{key}.json"
    if saved.exists():
        print(f"[chaos] undisturbed results reused from {saved}")
        return json.loads(saved.read_text())
    s3 = S3Server().start()
    try:
        cluster = start_cluster(s3)
        try:
            chaos, rc = run_pipeline(
                cluster, s3, config, Path(args.root) / "undisturbed", 0, args.budget_s, []
            )
        finally:
            cluster.shutdown()
        if rc != 0:
            sys.exit(f"the undisturbed run failed (status {rc}); see {chaos.attempts[-1]}")
        result = collect(s3, cfg, Path(args.root) / f"undisturbed-{key}-student.pt") | {
            "wall_s": round(time.time() - chaos.started, 1)
        }
    finally:
        s3.stop()
    saved.write_text(json.dumps(result, indent=1))
    print(f"[chaos] undisturbed run: {result['wall_s']} s, results in {saved}")
    return result


def config_key(cfg: dict, teachers: Path) -> str:
    """The config, the teacher files and the product's code: an undisturbed run's results hold for these only."""
    files = (
        sorted(teachers.glob("*.pt"))
        + sorted((REPO / "pipeline").rglob("*.py"))
        + sorted((REPO / "camkd").rglob("*.py"))
    )
    digests = {
        str(p.relative_to(REPO) if p.is_relative_to(REPO) else p.name): hashlib.sha256(
            p.read_bytes()
        ).hexdigest()
        for p in files
    }
    return hashlib.sha256(json.dumps([cfg, digests], sort_keys=True).encode()).hexdigest()[:12]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, required=True, help="draws the faults, their phases and times")
    p.add_argument("--root", default=str(REPO / "chaos-runs"), help="local folder: teachers, logs, results")
    p.add_argument("--faults", type=int, default=6, help="faults to inject (every kind once from 5 on)")
    p.add_argument(
        "--budget-s", type=float, default=1500, help="the chaos run is stopped (and fails) after this"
    )
    p.add_argument(
        "--fault-every", type=int, default=13, help="the proxy throttles or drops every N-th request"
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    ray_bin = Path(sys.executable).parent / "ray"
    subprocess.run(
        [str(ray_bin), "get-auth-token", "--generate"], env=ray_env({}), capture_output=True, check=True
    )
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server: one line per request otherwise
    from s3server import S3Server

    root = Path(args.root).resolve()
    args.root = str(root)
    teachers = make_teachers(root / "teachers")
    cfg = pipeline_config(teachers)
    key = config_key(cfg, teachers)
    config = root / f"config-{key}.json"
    config.write_text(json.dumps(cfg, indent=1))
    base = baseline(args, cfg, config, key)
    faults = plan_faults(random.Random(args.seed), args.faults)
    print(
        f"[chaos] seed {args.seed}: {len(faults)} fault(s) planned: "
        + ", ".join(f"{f.kind}@{f.phase}+{f.delay}s" for f in faults),
        flush=True,
    )
    s3 = S3Server().start()
    wipe(s3)  # moto keeps one store per process: the undisturbed run's objects would still be there
    s3.proxy.counter.every = args.fault_every
    logs = root / f"seed-{args.seed}"
    shutil.rmtree(logs, ignore_errors=True)
    try:
        cluster = start_cluster(s3)
        try:
            chaos, rc = run_pipeline(cluster, s3, config, logs, args.seed, args.budget_s, faults)
        finally:
            cluster.shutdown()
        s3.proxy.counter.every = 0
        got = collect(s3, cfg, logs / "student.pt")
    finally:
        s3.stop()
    return report(
        args, chaos, rc, base, got, s3.proxy.counter, len(cfg["tune"]["space"]["strategy.temperature"])
    )


def report(args, chaos: Chaos, rc: int, base: dict, got: dict, proxy, trials: int) -> int:
    wall = round(time.time() - chaos.started, 1)
    faults = [e for e in chaos.events if "FAULT" in e]
    found = differences(base, got, trials)
    if rc != 0:
        found.insert(0, f"the pipeline ended with status {rc} (see {chaos.attempts[-1]})")
    print(f"\n[chaos] seed {args.seed}: {len(faults)} fault(s) injected in {wall} s")
    for line in faults:
        print("  " + line)
    print("[chaos] recoveries:")
    recovered = recoveries(chaos, got, proxy)
    for line in recovered:
        print("  " + line)
    result = {
        "seed": args.seed,
        "wall_s": wall,
        "faults": faults,
        "events": chaos.events,
        "recoveries": recovered,
        "differences": found,
        "status": rc,
    }
    (Path(args.root) / f"seed-{args.seed}" / "result.json").write_text(json.dumps(result, indent=1))
    if found:
        print(f"[chaos] FAILED: {len(found)} difference(s) from the undisturbed run:")
        for line in found:
            print("  - " + line)
        return 1
    print(
        "[chaos] passed: the same cache digests, epoch metrics and student.pt; every trial finished; root clean"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
