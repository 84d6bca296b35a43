"""Ray runtime glue shared by the stages: start or attach to Ray once, quiet Ray Data, check cluster resources.

`python pipeline/run.py ...` starts Ray locally; under `ray job submit` (RAY_ADDRESS set) or with `ray.address`
it attaches to the cluster. Stages never call `ray.init` themselves.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from dataclasses import dataclass

from pipeline.config import Config


class ClusterError(RuntimeError):
    """The Ray cluster cannot run what was asked (unreachable, or lacks the resources), phrased for the user."""


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes, when nothing listens at a cluster address (ray.init would retry for long)."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(
            f"Ray address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379 or ray://head:10001)"
        )
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ClusterError(
            f"nothing answers at Ray address {address!r} ({e.strerror or e}); check the address "
            "(ray.address / --address / RAY_ADDRESS) and that the cluster is up (`ray status` on the head)"
        ) from None


def ensure_ray(cfg: Config | None = None, log=print) -> None:
    import ray

    if not ray.is_initialized():
        address = (cfg.ray.address if cfg else None) or os.environ.get("RAY_ADDRESS")
        if address:
            check_reachable(address)
        try:
            if address:
                ray.init(address=address, log_to_driver=True)
            else:
                ray.init(
                    **local_ray_options(cfg.ray.num_cpus if cfg else None, cfg.ray.num_gpus if cfg else None)
                )
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = address or "a new local instance"
            raise ClusterError(
                f"could not start or reach Ray at {where}: {e}. Check the address (ray.address / RAY_ADDRESS), "
                "that the cluster is up (`ray status`), and RAY_AUTH_MODE=token for token-protected clusters"
            ) from None
        cwd = os.getcwd()
        if cfg is not None and "runtime_resources" in cwd and cfg.root.startswith(cwd + os.sep):
            log(
                f"[ray] warning: root {cfg.root} lies inside this job's temporary copy of the working dir "
                f"({cwd}), which Ray deletes; pass an absolute shared path or a URL such as s3://... as root"
            )
        res = ray.cluster_resources()
        log(
            f"[ray] {'attached to ' + address if address else 'started locally'}: "
            f"{res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU, {len(ray.nodes())} node(s)"
        )
    quiet_ray_data()
    quiet_console()


# Ray's own error-level lines that say nothing to a user and are printed on the driver's console from every Ray
# Train controller: the worker-health actor it starts is given its arguments through the object store, which the C++
# core worker reports at level E. They stay in the session's log files (/tmp/ray/session_*/logs).
RAY_CONSOLE_NOISE = (
    re.compile(
        r"core_worker\.cc:\d+: Actor with class name: '\w+' .*constructor arguments in the object store"
    ),
)


def quiet_console(patterns=RAY_CONSOLE_NOISE, dispatcher=None) -> bool:
    """Drop worker log lines matching `patterns` from this driver's console (not from Ray's log files).

    Wraps the handlers Ray's log forwarding calls (`ray.init(log_to_driver=True)` adds them; call this after it);
    False where this Ray has no such dispatcher (then nothing changes)."""
    if dispatcher is None:
        try:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:
            return False
    handlers = getattr(dispatcher, "handlers", None)
    lock = getattr(dispatcher, "_lock", None)
    if not isinstance(handlers, list) or lock is None:
        return False

    def filtered(handle):
        if getattr(handle, "_camkd_filtered", False):
            return handle

        def emit(data):
            lines = [x for x in data.get("lines", []) if not any(p.search(x) for p in patterns)]
            if lines:
                handle({**data, "lines": lines})

        emit._camkd_filtered = True
        return emit

    with lock:
        dispatcher.handlers = [(name, filtered(h)) for name, h in handlers]
    return True


def local_ray_options(num_cpus: int | None = None, num_gpus: int | None = None) -> dict:
    """`ray.init` arguments of a Ray started on this machine (`run.py` without an address, and the benchmarks).

    Ray keeps an idle worker process only while a whole CPU is free; our stages run fractional-CPU tasks beside
    actors that hold most CPUs (precompute's render/write tasks beside the teacher pool, read tasks beside Train
    workers), so each of their tasks would start a new process (Python, Ray and pyarrow imports: ~2.5 s of CPU
    here, taken from the actor). Keeping up to one idle process per CPU removes that churn."""
    cpus = num_cpus or os.cpu_count() or 1
    return {
        "address": "local",
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "_system_config": {"num_workers_soft_limit": max(2, int(cpus))},
    }


def quiet_ray_data(preserve_order: bool | None = None) -> None:
    """Our own progress lines and summaries replace Ray Data's per-operator logging (in this process: the driver,
    or a Train worker that runs its own readers). `preserve_order` sets the execution's row order."""
    import ray.data

    for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Ray Data's tuning hints (memory per operator) are for its own defaults; our read tasks ask for their memory.
    ctx.issue_detectors_config.detectors = []
    if preserve_order is not None:
        ctx.execution_options.preserve_order = preserve_order


@dataclass(frozen=True)
class NodeView:
    node_id: str
    ip: str
    cpus: float
    gpus: float


def _nodes() -> list[NodeView]:
    import ray

    return [
        NodeView(
            n["NodeID"],
            n.get("NodeManagerAddress", "?"),
            n["Resources"].get("CPU", 0),
            n["Resources"].get("GPU", 0),
        )
        for n in ray.nodes()
        if n.get("Alive")
    ]


def worker_slots(node: NodeView, cpus: float, gpus: float) -> int:
    """How many Train workers (each with its reader) fit on a node."""
    by_cpu = int(node.cpus // cpus) if cpus else 10**9
    by_gpu = int(node.gpus // gpus) if gpus else 10**9
    return min(by_cpu, by_gpu)


def check_resources(cfg: Config, trials: int | None = None) -> None:
    """Fail fast (instead of waiting forever) when the cluster cannot host what the run asks for: every Train
    worker with at least one Ray Data read task beside it on its node (reads prefer the worker's node; the threads
    reader runs on the worker's own CPUs), the GPUs asked
    for, concurrent trials and their drivers, and a placement strategy that can be met."""
    if not cfg.scaling.check_resources:
        return
    s = cfg.scaling
    nodes = _nodes()
    total_gpu = sum(n.gpus for n in nodes)
    total_cpu = sum(n.cpus for n in nodes)
    workers = s.num_workers * (trials or 1)
    need_gpu = s.gpus_per_worker if s.use_gpu else 0.0
    # Ray Data read tasks reserve their own CPUs (at least one beside each worker); reader threads use the worker's.
    need_cpu = s.cpus_per_worker + (s.read_cpus if s.reader == "ray_data" else 0.0)
    hint = "or set scaling.check_resources=false on an autoscaling cluster that will add nodes"
    if need_gpu and total_gpu < s.num_workers * need_gpu:
        raise ClusterError(
            f"scaling.use_gpu is true and {s.num_workers} worker(s) × {s.gpus_per_worker:g} GPU are requested, "
            f"but the cluster has {total_gpu:g} GPU(s). Set scaling.use_gpu=false, lower scaling.num_workers, "
            f"add GPU nodes, {hint}"
        )
    drivers = trials * cfg.tune.trial_cpus if trials else 0.0  # each concurrent Tune trial's own driver
    if total_cpu < workers * need_cpu + drivers:
        raise ClusterError(
            f"{workers} worker(s) need {need_cpu:g} CPU each (scaling.cpus_per_worker {s.cpus_per_worker:g}"
            + (f" + one read task at scaling.read_cpus {s.read_cpus:g}" if s.reader == "ray_data" else "")
            + f"){f' plus {drivers:g} for trial drivers' if drivers else ''}, "
            f"but the cluster has {total_cpu:g} CPU(s); lower scaling.num_workers / scaling.cpus_per_worker / "
            f"tune.max_concurrent_trials, {hint}"
        )
    slots = {n.node_id: worker_slots(n, need_cpu, need_gpu) for n in nodes}
    if s.placement_strategy == "STRICT_SPREAD":
        usable = sum(1 for v in slots.values() if v >= 1)
        ok = usable >= s.num_workers
        why = f"STRICT_SPREAD puts each worker on its own node, and {usable} node(s) can host one"
    elif s.placement_strategy == "STRICT_PACK":
        ok = max(slots.values(), default=0) >= s.num_workers
        why = f"STRICT_PACK puts every worker on one node, and the largest hosts {max(slots.values(), default=0)}"
    else:
        ok = sum(slots.values()) >= workers
        why = f"the nodes can host {sum(slots.values())} in all"
    if not ok:
        table = ", ".join(f"{n.ip} ({n.cpus:g} CPU, {n.gpus:g} GPU): {slots[n.node_id]}" for n in nodes)
        raise ClusterError(
            f"{workers} Train worker(s), each needing {need_cpu:g} CPU{f' and {need_gpu:g} GPU' if need_gpu else ''} "
            f"on one node, do not fit: {why} [{table}]. Lower scaling.cpus_per_worker / read_cpus, change "
            f"scaling.placement_strategy, {hint}"
        )


def check_root_shared(root: str, timeout: float = 120.0) -> None:
    """On a cluster of several nodes: a task on every other node writes a file under `root` and the driver reads
    it back. A local path that is not one shared volume (or an object store those nodes cannot write) is an error
    naming the node, before any work starts."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.store import storage

    here = ray.get_runtime_context().get_node_id()
    others = [n for n in _nodes() if n.node_id != here]
    if not others:
        return
    probe_dir = storage.join(root, ".preflight")
    token = uuid.uuid4().hex[:8]

    @ray.remote(num_cpus=0, max_retries=0)
    def write(url: str, text: str) -> str | None:
        try:
            storage.write_bytes_atomic(url, text.encode())
            return None
        except Exception as e:
            return f"{type(e).__name__}: {e}"

    refs = {}
    for n in others:
        url = storage.join(probe_dir, f"{n.node_id[:12]}-{token}")
        strategy = NodeAffinitySchedulingStrategy(n.node_id, soft=False)
        refs[n] = (url, write.options(scheduling_strategy=strategy).remote(url, n.node_id))
    try:
        for n, (url, ref) in refs.items():
            error = ray.get(ref, timeout=timeout)
            if error is not None:
                raise ClusterError(
                    f"node {n.ip} cannot write to root {root} ({error}); every node needs write access to root: "
                    "mount the same shared volume at the same path on every node, or use an object store URL "
                    "(s3://..., gs://...) with credentials on every node"
                )
            if not storage.exists(url) or storage.read_bytes(url).decode() != n.node_id:
                raise ClusterError(
                    f"root {root} is not shared: node {n.ip} wrote {url}, and this driver does not see it. Every "
                    "node must see root under the same name: a shared volume mounted at the same path on every node, "
                    "or an object store URL (s3://..., gs://...)"
                )
    finally:
        for url, _ in refs.values():
            with contextlib.suppress(Exception):
                storage.remove(url)
