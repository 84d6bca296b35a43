"""Ray runtime glue shared by the stages: start or attach to Ray once, quiet Ray Data, check cluster resources.

`python pipeline/run.py ...` starts Ray locally; under `ray job submit` (RAY_ADDRESS set) or with `ray.address`
it attaches to the cluster. Stages never call `ray.init` themselves.
"""

from __future__ import annotations

import logging
import os
import socket

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
                    address="local",
                    num_cpus=cfg.ray.num_cpus if cfg else None,
                    num_gpus=cfg.ray.num_gpus if cfg else None,
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


def quiet_ray_data(preserve_order: bool | None = None) -> None:
    """Our own progress lines and summaries replace Ray Data's per-operator logging (in this process: the driver,
    or a Train worker that runs its own readers). `preserve_order` sets the execution's row order."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if preserve_order is not None:
        ctx.execution_options.preserve_order = preserve_order
    for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.WARNING)


def check_resources(cfg: Config) -> None:
    """Fail fast (instead of waiting forever) when the cluster cannot host the requested Train workers."""
    import ray

    if not cfg.scaling.check_resources:
        return
    s = cfg.scaling
    total = ray.cluster_resources()
    need_gpu = s.num_workers * s.gpus_per_worker if s.use_gpu else 0
    need_cpu = s.num_workers * s.cpus_per_worker
    if need_gpu and total.get("GPU", 0) < need_gpu:
        raise ClusterError(
            f"scaling.use_gpu is true and {s.num_workers} worker(s) × {s.gpus_per_worker:g} GPU are requested, "
            f"but the cluster has {total.get('GPU', 0):g} GPU(s). Set scaling.use_gpu=false, lower "
            "scaling.num_workers, add GPU nodes, or set scaling.check_resources=false on an autoscaling cluster"
        )
    if total.get("CPU", 0) < need_cpu:
        raise ClusterError(
            f"{s.num_workers} worker(s) × {s.cpus_per_worker:g} CPU are requested but the cluster has "
            f"{total.get('CPU', 0):g} CPU(s); lower scaling.num_workers / scaling.cpus_per_worker, or "
            "set scaling.check_resources=false on an autoscaling cluster"
        )
