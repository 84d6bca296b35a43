"""What the training process spends on its input, outside the step: CPU-seconds per 1,000 samples delivered by a
worker's `EpochStream` (the reader, the lane threads, the batches handed to the training thread), split into the
main (training) thread and every other thread of the process, read from `/proc/self/task/*/stat`.

The consumer takes each batch and does nothing else (no step), so every CPU-second counted is input work that a
launch-bound step would share its process with. Read tasks of the `ray_data` reader run in other processes and are
not counted; the `threads` reader's reading and decoding run in this process and are (as other threads).

Scenarios (`benchmarks/input_pipeline.py`): (a) CIFAR rows + 3 teachers' fp16 logits and fp16 maps 256×8×8,
(c) the same, logits only. For each reader and `train.shuffle_buffer` (0 and 4096) one run of `--epochs` epochs,
counted from the first batch taken (start-up excluded) to the last. With `--stage`, batches are also copied into
the lane's reused staging buffers as on a GPU (pinned there; here plain memory, the same copy), which a CPU device
skips; with `--device cuda`, as a GPU worker does (pinned buffers, one copy to the GPU per batch).

    python benchmarks/host_cost.py [--rows 12288] [--epochs 3] [--scenarios ac] [--readers ray_data,threads]
        [--shuffle 0,4096] [--stage] [--device cuda]

The last line is one JSON object: per scenario, reader and shuffle, `main`, `other` and `process` CPU-s per 1,000
samples, and `read_tasks`: CPU-s per 1,000 samples of the run's Ray worker processes, start-up included (the
`ray_data` reader's read tasks: where the work moved out of the training process goes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from input_pipeline import setup

from pipeline.train.batches import ReaderOptions
from pipeline.train.epochs import EpochStream

TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu() -> dict[int, float]:
    """CPU-seconds (user + system) of every live thread of this process, by thread id."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # ended between the listing and the read
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def read_task_cpu() -> float:
    """CPU-seconds of the Ray worker processes this process's local cluster started (the `ray_data` reader's read
    tasks run there: processes titled `ray::...`; Ray reuses them, so the difference between two snapshots is
    what ran in between)."""
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read(5)
        except OSError:  # ended meanwhile
            continue
        parent[int(pid)] = int(fields[1])
        if title == b"ray::":
            cpu[int(pid)] = (int(fields[11]) + int(fields[12])) / TICK
    me = os.getpid()

    def mine(pid: int) -> bool:
        while pid > 1:
            pid = parent.get(pid, 0)
            if pid == me:
                return True
        return False

    return sum(c for pid, c in cpu.items() if mine(pid))


def spent(before: dict[int, float], after: dict[int, float], ended: float) -> tuple[float, float]:
    """(main thread, other threads) CPU-seconds between two snapshots; `ended`: CPU of threads that ended between
    them (the process's total less the live threads' sum)."""
    main = threading.main_thread().native_id
    used = {tid: cpu - before.get(tid, 0.0) for tid, cpu in after.items()}
    return used.pop(main, 0.0), sum(used.values()) + ended


def consume(cfg, plan, units, opts: ReaderOptions, epochs: int, stage: bool, device: str) -> dict[str, float]:
    """One worker's stream over `epochs` epochs, taken batch by batch: CPU per 1,000 samples from the first batch
    to the last (all the work for the samples counted is done in that window but for the few batches prefetched
    before the first was taken)."""
    staged = {"stage": True} if stage else {}  # (the code before staging buffers has no such argument)
    on = torch.device(device)
    stream = EpochStream(cfg, plan, units, opts, 1, 0, 0, on, None, pin_memory=on.type == "cuda", **staged)
    samples, snap, everything, tasks = 0, None, 0, read_task_cpu()  # read tasks: counted from the start
    try:
        for epoch in range(epochs):
            for batch in stream.epoch(epoch):
                everything += len(batch["label"])
                if snap is None:  # the process: start-up (the executor, the first reads) is not counted
                    snap, proc, wall = thread_cpu(), time.process_time(), time.perf_counter()
                    continue
                samples += len(batch["label"])
        after, proc_after, wall = thread_cpu(), time.process_time(), time.perf_counter() - wall
        tasks = read_task_cpu() - tasks
    finally:
        stream.close()
    live = sum(after.values()) - sum(snap.get(t, 0.0) for t in after)
    main, other = spent(snap, after, max(0.0, (proc_after - proc) - live))
    per = 1000 / max(samples, 1)
    return {
        "main": round(main * per, 4),
        "other": round(other * per, 4),
        "process": round((main + other) * per, 4),
        "read_tasks": round(tasks * 1000 / max(everything, 1), 4),
        "samples": samples,
        "samples_per_s": round(samples / wall),
    }


def with_train(cfg, **train):
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=train)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=12288)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--scenarios", default="ac")
    ap.add_argument("--readers", default="ray_data,threads")
    ap.add_argument("--shuffle", default="0,4096")
    ap.add_argument("--group-rows", type=int, default=1024)
    ap.add_argument("--stage", action="store_true", help="copy every batch into reused staging buffers")
    ap.add_argument(
        "--device", default="cpu", help="cuda: batches pinned and copied to the GPU, as a GPU worker"
    )
    args = ap.parse_args()

    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    cores = os.cpu_count() or 1
    results: dict[str, dict] = {}
    print(
        "scenario  reader    shuffle  main CPU-s/1k  other CPU-s/1k  process CPU-s/1k  read tasks CPU-s/1k  samples/s"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.scenarios:
            cfg, meta, plan, units = setup(name, args.rows, Path(tmp), group_rows=args.group_rows)
            if not results:  # warm-up: Ray's worker processes start (and import) before anything is counted
                warm = ReaderOptions("ray_data", read_cpus=1.0, read_tasks=cores, read_threads=cores)
                consume(with_train(cfg, epochs=1), plan, units[:cores], warm, 1, False, args.device)
            for reader in args.readers.split(","):
                opts = ReaderOptions(reader, read_cpus=1.0, read_tasks=cores, read_threads=cores)
                for shuffle in (int(s) for s in args.shuffle.split(",")):
                    run_cfg = with_train(
                        cfg, shuffle_buffer=shuffle, batch_size=args.batch, epochs=args.epochs
                    )
                    r = consume(run_cfg, plan, units, opts, args.epochs, args.stage, args.device)
                    results[f"{name}/{reader}/shuffle{shuffle}"] = r
                    print(
                        f"{name:<9} {reader:<9} {shuffle:>7}  {r['main']:>13.4f}  {r['other']:>14.4f}  "
                        f"{r['process']:>16.4f}  {r['read_tasks']:>19.4f}  {r['samples_per_s']:>9,}",
                        flush=True,
                    )
    ray.shutdown()
    print(json.dumps({"stage": args.stage, "device": args.device, "batch": args.batch, "results": results}))


if __name__ == "__main__":
    main()
