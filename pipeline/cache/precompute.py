"""Precompute: every teacher once over every training image and view, into the cache; resumable.

One Ray Data pipeline of three stages, one item per (image part, view) that any teacher still lacks:

1. render (CPU tasks): read the image part, decode and augment view v once, whatever the number of teachers;
2. infer (an autoscaling pool of actors, one GPU each when GPUs are used): run every teacher that needs this
   item on the rendered pixels, in `cache.precision`;
3. write (CPU tasks): quantise / encode each teacher's outputs, write its part and then its receipt.

Test-split items go through stages 1-2 only, for each teacher's test accuracy. A resumed run trusts every part
whose receipt and size agree (one listing per view folder, one small receipt per part): finished parts are not
read or hashed again. Adding a teacher or growing `views.count` computes only what is new. Training and sweeps
never run teachers again.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from camkd import __version__
from pipeline.cache.layout import (
    CACHE_FORMAT,
    META_KEY,
    CacheError,
    CachePart,
    Manifest,
    OutputFormat,
    ViewRecord,
    check_manifest_dataset,
    check_parts_present,
    check_rendering,
    head_url,
    load_manifest,
    manifest_url,
    output_format,
    receipt_url,
    store_dir,
    view_dir,
)
from pipeline.cache.stages import TEST, PrecomputeSpec, TeacherPool, render_item, write_item
from pipeline.config import Config
from pipeline.data import preprocessing
from pipeline.data.ingest import DatasetMeta, require_dataset
from pipeline.data.render_probe import render_digest
from pipeline.data.views import ViewSpec, make_view_spec
from pipeline.store import storage, tables
from pipeline.teachers import checkpoints


# ------------------------------------------------------------------------------------------------ planning
@dataclass
class TeacherPlan:
    """One teacher's store before the pipeline runs: what is done (by view), what to compute."""

    ref: checkpoints.TeacherRef
    teacher_dir: str
    store: str
    done: dict[int, dict[str, CachePart]]  # view → part → record
    todo: list[tuple[str, int]]  # (part, view)
    previous: Manifest | None = None
    needs_test: bool = False
    test: list[int] = field(default_factory=lambda: [0, 0])  # rows, correct
    complete: dict[str, Any] | None = None  # the summary row when the store is already up to date
    render_probe: str | None = None  # the rendering its views come from (None: unknown, from an older store)


def _receipts(urls: list[str]) -> list[dict[str, Any] | None]:
    """Read many small receipts at once (object stores answer each GET in tens of ms)."""

    def one(url: str) -> dict[str, Any] | None:
        try:
            return storage.read_json(url)
        except (FileNotFoundError, ValueError):
            return None

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(one, urls))


def _plan_teacher(
    cfg: Config,
    ref: checkpoints.TeacherRef,
    meta: DatasetMeta,
    spec: ViewSpec,
    fmt: OutputFormat,
    overwrite: bool,
    log,
    probe: str = "",
) -> TeacherPlan:
    """What one teacher's store already holds (parts with a matching receipt) and what it still lacks. `probe`:
    the digest of the rendering this process runs (`render_probe.render_digest`)."""
    tdir = storage.teacher_dir(cfg.root, meta.fingerprint, ref.id)
    store = store_dir(tdir, spec, fmt)
    parts = meta.split("train").parts
    previous = _previous_manifest(ref, meta, spec, tdir, store, probe)
    done = {r.view: {p.name: p for p in r.parts} for r in previous.views} if previous else {}
    identity = {
        "teacher_id": ref.id,
        "dataset_fp": meta.fingerprint,
        "family": spec.family,
        "output": fmt.key,
        "format": CACHE_FORMAT,
    }
    todo: list[tuple[str, int]] = []
    for view in range(spec.count):
        if view in done and len(done[view]) == len(parts):
            continue
        done[view] = _receipted_parts(view_dir(store, view), parts, identity, view, overwrite, ref.name, log)
        todo += [(p.name, view) for p in parts if p.name not in done[view]]
    needs_test = cfg.cache.eval_test and (previous is None or previous.test_accuracy is None)
    n_done = sum(len(v) for view, v in done.items() if view < spec.count)
    if (
        not todo
        and not needs_test
        and previous is not None
        and previous.view_numbers == list(range(spec.count))
    ):
        log(f"[precompute] {ref.name} ({ref.id}): cache up to date at {store}")
        return TeacherPlan(
            ref, tdir, store, done, [], previous, complete=_summary_row(ref, previous, store, 0)
        )
    log(
        f"[precompute] {ref.name} ({ref.id}): {len(todo)} (part, view) item(s) to compute, {n_done} reused; "
        f"{spec.count} view(s), format {fmt.key} → {store}"
    )
    known = previous is None or previous.render_probe is not None
    return TeacherPlan(
        ref, tdir, store, done, todo, previous, needs_test=needs_test, render_probe=probe if known else None
    )


def _previous_manifest(
    ref: checkpoints.TeacherRef, meta: DatasetMeta, spec: ViewSpec, tdir: str, store: str, probe: str
) -> Manifest | None:
    """The store's manifest, checked against the dataset, the rendering and its parts; None for a new store."""
    if storage.exists(manifest_url(store)):
        previous = load_manifest(store, ref.name)
        check_manifest_dataset(previous, store, meta)
        if probe:
            check_rendering(previous, store, probe)
        check_parts_present(previous, store, [r.view for r in previous.views if r.view < spec.count])
        return previous
    if storage.exists(manifest_url(tdir)):
        raise CacheError(
            f"the cache at {tdir} of teacher {ref.name!r} was written by an older camkd-ray (cache format 1); "
            f"rebuild it: delete {tdir} and re-run precompute"
        )
    return None


def _receipted_parts(
    vdir: str, parts: list, identity: dict, view: int, overwrite: bool, name: str, log
) -> dict[str, CachePart]:
    """The parts of one view whose receipt matches this teacher, dataset, view spec and format, and their size;
    half-written parts are dropped (never read), parts without a matching receipt are checked."""
    sizes = storage.list_sizes(vdir)
    for tmp in [n for n in sizes if storage.TMP_MARK in n]:
        storage.remove(storage.join(vdir, tmp))
    present = [p for p in parts if p.name in sizes]
    receipts = _receipts([receipt_url(storage.join(vdir, p.name)) for p in present])
    got: dict[str, CachePart] = {}
    for p, receipt in zip(present, receipts):
        if (
            receipt is not None
            and all(receipt.get(k) == v for k, v in identity.items())
            and receipt.get("view") == view
            and receipt.get("rows") == p.rows
            and receipt.get("bytes") == sizes[p.name]
        ):
            got[p.name] = CachePart.model_validate(receipt)
            continue
        _check_unreceipted(storage.join(vdir, p.name), identity, view, p.name, overwrite, name, log)
    return got


def _check_unreceipted(
    url: str, identity: dict, view: int, part: str, overwrite: bool, name: str, log
) -> None:
    """A part without a matching receipt: our own unfinished write is recomputed; a part written for another
    teacher, dataset, view spec or format is never overwritten silently."""
    try:
        kv = tables.open_table(url, META_KEY).metadata
    except (tables.CorruptTable, OSError):
        log(f"[precompute] {name}: {url} is unreadable and has no receipt; recomputing it")
        return
    mine = all(kv.get(k) == v for k, v in identity.items() if k != "format") and kv.get("view") == view
    if mine and kv.get("part") == part:
        log(f"[precompute] {name}: {url} has no receipt (interrupted run); recomputing it")
        return
    if not overwrite:
        raise CacheError(
            f"refusing to overwrite a foreign cache part: {url} was written for {kv.get('teacher_id')!r}, view "
            f"{kv.get('view')} of {kv.get('part')}, format {kv.get('output')!r}. Remove it, or pass --overwrite"
        )
    log(f"[precompute] {name}: replacing foreign {url} (--overwrite)")


def _summary_row(
    ref: checkpoints.TeacherRef, manifest: Manifest, store: str, computed: int
) -> dict[str, Any]:
    return {
        "teacher": ref.name,
        "id": ref.id,
        "computed_parts": computed,
        "reused_parts": sum(len(r.parts) for r in manifest.views) - computed,
        "views": manifest.view_numbers,
        "accuracy": manifest.accuracy,
        "test_accuracy": manifest.test_accuracy,
        "bytes_per_sample": manifest.bytes_per_sample,
        "total_bytes": manifest.total_bytes,
        "store": store,
        "seconds": manifest.seconds,
    }


@lru_cache(maxsize=64)
def _probe(
    ref: checkpoints.TeacherRef, channels: int, height: int, width: int
) -> tuple[tuple[int, ...], int]:
    """(C, H, W of the feature map, bytes of weights and buffers) of one teacher."""
    import torch

    model = checkpoints.build_model(ref)
    nbytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    with torch.no_grad():
        return tuple(model.forward_features(torch.zeros(1, channels, height, width)).shape[1:]), nbytes


def _probe_of(ref: checkpoints.TeacherRef, meta: DatasetMeta, spec: ViewSpec) -> tuple[tuple[int, ...], int]:
    """The probe at the size the teacher sees: its own input_size, else the views'."""
    h, w = ref.input_size or _data_hw(meta, spec)
    return _probe(ref, meta.channels, h, w)


def _data_hw(meta: DatasetMeta, spec: ViewSpec) -> tuple[int, int]:
    return (meta.image_shape[0], meta.image_shape[1]) if meta.image_shape else (spec.size, spec.size)


def feature_shape(ref: checkpoints.TeacherRef, meta: DatasetMeta, spec: ViewSpec) -> list[int]:
    """C, H, W of the teacher's feature map on this dataset's views (one probe forward per teacher and run)."""
    return list(_probe_of(ref, meta, spec)[0])


def _write_head(ref: checkpoints.TeacherRef, tdir: str) -> dict[str, Any]:
    """`<teacher dir>/head.pt`: the frozen head the feature term applies to connected student maps."""
    import torch

    model = checkpoints.build_model(ref)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.head.state_dict().items()}, buf)
    data = buf.getvalue()
    url = head_url(tdir)
    if not storage.exists(url):
        storage.write_bytes_atomic(url, data)
    return {"file": "../head.pt", "sha256": storage.sha256_bytes(data)}


def _finish_teacher(
    tp: TeacherPlan, meta: DatasetMeta, spec: ViewSpec, fmt: OutputFormat, seconds: float, log
) -> dict[str, Any]:
    """Write head.pt and, last, the store's manifest.json once every part of every view is present."""
    ref = tp.ref
    parts = meta.split("train").parts
    views = [ViewRecord(view=v, parts=[tp.done[v][p.name] for p in parts]) for v in sorted(tp.done)]
    rows = sum(p.rows for p in parts)
    total = sum(p.bytes for r in views for p in r.parts)
    shape = feature_shape(ref, meta, spec) if fmt.features != "none" else None
    logits_bytes = 2 * meta.num_classes if fmt.logits == "fp16" else fmt.topk * (2 + 2) + 4
    feat_values = int(np.prod(shape)) if shape else 0
    feat_bytes = feat_values * (2 if fmt.features == "fp16" else 1) + (
        2 * shape[0] if fmt.features == "int8" else 0
    )
    test_rows, test_correct = tp.test
    if test_rows:
        test_accuracy = test_correct / test_rows
    else:
        test_accuracy = tp.previous.test_accuracy if tp.previous is not None else None
    manifest = Manifest(
        teacher=ref.to_dict(),
        dataset={"name": meta.name, "fingerprint": meta.fingerprint},
        view_spec=spec.with_count(len(views)).to_dict(),
        family=spec.family,
        output=fmt.describe() | {"num_classes": meta.num_classes, "feature_shape": shape},
        views=views,
        rows=rows,
        bytes_per_sample={
            "logits": logits_bytes,
            "features": feat_bytes,
            "on_disk": round(total / max(rows * len(views), 1), 1),
        },
        total_bytes=total,
        accuracy=sum(r.correct for r in views) / max(rows * len(views), 1),
        test_accuracy=test_accuracy,
        head=_write_head(ref, tp.teacher_dir),
        seconds=round(seconds + (tp.previous.seconds if tp.previous else 0.0), 2),
        created=time.time(),
        package_version=__version__,
        render_probe=tp.render_probe,
    )
    storage.write_json(manifest_url(tp.store), manifest.model_dump())
    log(
        f"[precompute] {ref.name}: {rows} rows × {len(views)} views, {total / 2**20:.1f} MiB "
        f"({total / max(rows * len(views), 1) / 1024:.1f} KiB/image/view), cached-view top-1 {manifest.accuracy:.4f}"
        f"{'' if manifest.test_accuracy is None else f', test top-1 {manifest.test_accuracy:.4f}'} → {tp.store}"
    )
    return _summary_row(ref, manifest, tp.store, computed=len(tp.todo))


# ------------------------------------------------------------------------------------------------ running
# GPUs one pool may grow to when no autoscaling maximum can be read (a node's worth)
DEFAULT_MAX_GPU_ACTORS = 8


def autoscaling_maximum() -> dict[str, int] | None:
    """The most of each resource the cluster's autoscaler may provide (its node groups' max counts × resources,
    from the autoscaler config Ray keeps in its GCS; KubeRay and the cluster launcher write it), or None where no
    autoscaler config can be read (a static cluster, a local Ray)."""
    try:
        from ray._private.state import state

        found = state.get_max_resources_from_cluster_config()
    except Exception:  # private API of Ray 2.60; absent or changed elsewhere: no autoscaling information
        return None
    return {k: int(v) for k, v in found.items()} if found else None


@dataclass(frozen=True)
class PoolPlan:
    """Where the teachers run and how far their pool may grow, with the reason (printed, and in --dry-run)."""

    use_gpu: bool
    low: int
    high: int
    why: str

    def line(self, teachers: int) -> str:
        where = "on GPUs (1 each)" if self.use_gpu else "on CPUs"
        return (
            f"teacher pool: {self.low}-{self.high} replica(s) {where}, each running all {teachers} teacher(s); "
            f"{self.why}; the pool grows as nodes join"
        )


def pool_plan(
    cfg: Config, items: int, resources: dict[str, float], maximum: dict[str, int] | None, nodes: int = 1
) -> PoolPlan:
    """Decide GPU or CPU inference and the pool's bounds from the config, the resources up now and the
    autoscaler's maximum: `cache.use_gpu: auto` uses GPUs when the cluster has or can get some (not only those up
    at plan time); `cache.actors` fixes the pool's maximum, else `cache.max_actors`, else the autoscaling maximum,
    else the GPUs up now or DEFAULT_MAX_GPU_ACTORS, whichever is more (CPU: one replica per cache.cpus_per_actor
    CPUs; on more than one node a render and a write task's CPUs kept free). Ray Data grows the pool up to it as resources appear. `cache.use_gpu: true` that no GPU can ever meet
    fails at once."""
    gpus_now = int(resources.get("GPU", 0))
    gpus_max = int((maximum or {}).get("GPU", 0))
    can_get = max(gpus_now, gpus_max)
    c = cfg.cache
    if c.use_gpu == "auto":
        use_gpu = can_get > 0
        why = (
            f"cache.use_gpu auto: {gpus_now} GPU(s) up"
            + (f", up to {gpus_max} with the autoscaler" if gpus_max else "")
            if use_gpu
            else "cache.use_gpu auto: the cluster has no GPU and its autoscaler adds none"
        )
    else:
        use_gpu = bool(c.use_gpu)
        if use_gpu and can_get == 0 and not c.wait_for_gpus:
            raise CacheError(
                "cache.use_gpu is true but the cluster has no GPU and no autoscaler config that adds any. Set "
                "cache.use_gpu: auto (GPUs when present) or false, add GPU nodes, or set cache.wait_for_gpus: true "
                "when an autoscaler Ray cannot see will add them"
            )
        why = f"cache.use_gpu {use_gpu}"
    if c.actors != "auto":
        most, bound = int(c.actors), "cache.actors"
    elif c.max_actors is not None:
        most, bound = c.max_actors, "cache.max_actors"
    elif use_gpu:
        if gpus_max:
            most, bound = gpus_max, f"the autoscaling maximum of {gpus_max} GPU(s)"
        else:
            most = max(gpus_now, DEFAULT_MAX_GPU_ACTORS)
            bound = f"no autoscaling maximum readable: up to {most} (the GPUs up, at least {DEFAULT_MAX_GPU_ACTORS})"
    else:
        # On a multi-node cluster leave a render and a write task room beside the replicas: with every CPU held by
        # an actor, a lost node's rendered items can never be rebuilt (Ray's lineage reconstruction needs a CPU)
        # and the run hangs (measured). One machine has no node to lose: its replicas may take every CPU.
        cpus = max(resources.get("CPU", 1), (maximum or {}).get("CPU", 0))
        spare = c.render_cpus + c.write_cpus if nodes > 1 or maximum else 0.0
        most = int(max(cpus - spare, c.cpus_per_actor) // c.cpus_per_actor)
        bound = f"{cpus:g} CPU(s)" + (f" less {spare:g} for a render and a write task" if spare else "")
        bound += f" ÷ cache.cpus_per_actor {c.cpus_per_actor:g}"
    most = max(1, min(most, items))
    return PoolPlan(use_gpu, min(c.min_actors, most), most, f"{why}; at most {most} ({bound})")


def _memory_requests(ps: PrecomputeSpec, meta: DatasetMeta) -> dict[str, int]:
    """Heap each stage holds for one item (the largest image part), asked of Ray so that the items in flight
    fit: rendered pixels, the teachers' weights, fp32 logits + fp16 maps of every teacher, and their encoded
    copies. Requests that
    differ also keep Ray Data from fusing the stages into one process."""
    rows = max(p.rows for p in meta.split("train").parts)
    spec = ViewSpec.from_dict(ps.spec)
    pixels = int(np.prod(meta.image_shape)) if meta.image_shape else 3 * spec.size * spec.size
    outputs = weights = resized = 0
    for t in ps.teachers:
        ref = checkpoints.TeacherRef.from_dict(t)
        shape, nbytes = _probe_of(ref, meta, spec)
        maps = 2 * int(np.prod(shape)) if ps.fmt.features != "none" else 0
        outputs += rows * (4 * meta.num_classes + maps)
        weights += nbytes
        if ref.input_size:  # float32 pixels at the teacher's own size, one teacher at a time
            resized = max(resized, 4 * rows * meta.channels * ref.input_size[0] * ref.input_size[1])
    task, actor = (
        192 * 2**20,
        768 * 2**20,
    )  # a Ray worker process; one that has imported torch and the teachers
    return {
        "render": task + 3 * rows * pixels,
        # weights: the file and the model
        "infer": actor + 2 * weights + 2 * rows * pixels + resized + 2 * outputs,
        "write": task + 3 * outputs + 1,
    }


def stages(
    items: list[dict[str, Any]],
    ps: PrecomputeSpec,
    cfg: Config,
    use_gpu: bool,
    replicas: tuple[int, int],
    memory: dict[str, int],
):
    """The lazy Ray Dataset of the three stages: render (CPU tasks) → TeacherPool (an autoscaling actor pool, one
    GPU each with `use_gpu`) → write (CPU tasks). One row per (part, view) item throughout, so every stage takes
    `batch_size=1` (Ray Data refuses `batch_size=None` on a GPU stage)."""
    import ray

    return (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(
            render_item,
            fn_kwargs={"ps": ps},
            batch_size=1,
            num_cpus=cfg.cache.render_cpus,
            memory=memory["render"],
        )
        .map_batches(
            TeacherPool,
            fn_constructor_kwargs={"ps": ps, "precision": cfg.cache.precision},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(min_size=replicas[0], max_size=replicas[1]),
            num_cpus=cfg.cache.cpus_per_actor,
            num_gpus=1 if use_gpu else 0,
            memory=memory["infer"],
        )
        .map_batches(
            write_item,
            fn_kwargs={"ps": ps},
            batch_size=1,
            num_cpus=cfg.cache.write_cpus,
            memory=memory["write"],
        )
    )


def _records(ds) -> Iterator[dict[str, Any]]:
    """The write stage's record rows, each item's as soon as it is written (`iter_rows` holds a block back until
    the next one arrives: the progress bar would lag one item, ~25 s on this CPU)."""
    for block in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
        for values in zip(*block.values()):
            yield dict(zip(block, values))


def precompute_teachers(
    cfg: Config, refs: list[checkpoints.TeacherRef], meta: DatasetMeta, overwrite: bool = False, log=print
) -> list[dict[str, Any]]:
    """Bring the teachers' stores up to date in one Ray Data pipeline; one summary row per teacher (what was
    computed, what the cache costs), plus `renders`: images decoded and augmented, once per (image, view)."""
    spec = make_view_spec(cfg, meta.encoding)
    fmt = output_format(cfg, meta)
    started = time.time()
    probe = render_digest(spec, meta.image_shape)
    plans = [_plan_teacher(cfg, ref, meta, spec, fmt, overwrite, log, probe) for ref in refs]
    items = _work_items(plans, meta)
    tally = _Tally()
    if items:
        ps = precompute_spec(cfg, meta, spec, fmt, [tp.ref for tp in plans], [tp.store for tp in plans])
        _run_pipeline(cfg, meta, plans, items, ps, tally, log)
    seconds = time.time() - started
    rows = [tp.complete or _finish_teacher(tp, meta, spec, fmt, seconds, log) for tp in plans]
    for row in rows:
        row |= tally.summary()
    return rows


def _work_items(plans: list[TeacherPlan], meta: DatasetMeta) -> list[dict[str, Any]]:
    """One item per (part, view) that any teacher still lacks, with a bit mask of the teachers that lack it."""
    masks: dict[tuple[str, int], int] = {}
    for k, tp in enumerate(plans):
        for item in tp.todo:
            masks[item] = masks.get(item, 0) | (1 << k)
        if tp.needs_test:
            for p in meta.split("test").parts:
                masks[(p.name, TEST)] = masks.get((p.name, TEST), 0) | (1 << k)
    return [
        {"part": p, "view": v, "mask": m}
        for (p, v), m in sorted(masks.items(), key=lambda x: (x[0][1], x[0][0]))
    ]


def precompute_spec(
    cfg: Config,
    meta: DatasetMeta,
    spec: ViewSpec,
    fmt: OutputFormat,
    refs: list[checkpoints.TeacherRef],
    stores: list[str],
) -> PrecomputeSpec:
    """What every render task, teacher actor and write task needs, resolved on the driver (also what
    `precompute --verify` runs the teachers with)."""
    return PrecomputeSpec(
        dataset_dir=storage.dataset_dir(cfg.root, meta.name, meta.fingerprint),
        dataset_fp=meta.fingerprint,
        image_shape=tuple(meta.image_shape) if meta.image_shape else None,
        spec=spec.to_dict(),
        fmt=fmt,
        teachers=tuple(ref.to_dict() for ref in refs),
        stores=tuple(stores),
        group_rows=meta.row_group_rows,
        batch_size=cfg.cache.batch_size,
        threads=max(1, math.ceil(cfg.cache.cpus_per_actor)),
        compression=cfg.cache.compression,
        channels_last=cfg.cache.channels_last,
    )


@dataclass
class _Tally:
    """What the pipeline's records add up to: renders, object-store bytes, stored rows and the stages' CPU use."""

    first_item_seconds: float | None = None
    renders: int = 0
    payload: int = 0
    stored_rows: int = 0
    use: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            ("render_cpu", "render_seconds", "write_cpu", "write_seconds"), 0.0
        )
    )

    def add(self, row: dict[str, Any], plans: list[TeacherPlan]) -> None:
        """One written (teacher, part, view) record: into its teacher's plan and into the totals."""
        k, part, view = int(row["teacher"]), str(row["part"]), int(row["view"])
        self.renders += int(row["renders"])
        self.payload += int(row["payload_bytes"])
        for key in self.use:
            self.use[key] += float(row[key])
        if view == TEST:
            plans[k].test[0] += int(row["rows"])
            plans[k].test[1] += int(row["correct"])
            return
        plans[k].done.setdefault(view, {})[part] = CachePart(
            name=part,
            rows=int(row["rows"]),
            bytes=int(row["bytes"]),
            digest=str(row["digest"]),
            correct=int(row["correct"]),
        )
        self.stored_rows += int(row["rows"])

    def summary(self) -> dict[str, Any]:
        return {
            "first_item_seconds": self.first_item_seconds,
            "renders": self.renders,
            # What crossed Ray's object store from the actors to the writers, per (image, view) of every teacher's
            # part written: the actors send the stored encodings, so this equals the stored bytes less Parquet's
            # framing.
            "object_store_bytes_per_sample": round(self.payload / self.stored_rows, 1)
            if self.stored_rows
            else None,
            # CPUs a render / write task kept busy while it ran (CPU-seconds of all its threads ÷ its seconds): what
            # cache.render_cpus / cache.write_cpus should ask for
            "cpu_use": {
                stage: round(self.use[f"{stage}_cpu"] / self.use[f"{stage}_seconds"], 2)
                if self.use[f"{stage}_seconds"]
                else None
                for stage in ("render", "write")
            },
        }


def _run_pipeline(
    cfg: Config,
    meta: DatasetMeta,
    plans: list[TeacherPlan],
    items: list[dict],
    ps: PrecomputeSpec,
    tally,
    log,
) -> None:
    """Render → teachers → write over `items`, each record tallied as it arrives, with a progress bar."""
    import ray
    from tqdm.auto import tqdm

    alive = sum(1 for n in ray.nodes() if n["Alive"])
    pool = pool_plan(cfg, len(items), ray.cluster_resources(), autoscaling_maximum(), alive)
    log(f"[precompute] {len(items)} (part, view) item(s); {pool.line(len(plans))}")
    memory = _memory_requests(ps, meta)
    ctx = ray.data.DataContext.get_current()
    block_limit, ctx.target_max_block_size = ctx.target_max_block_size, None  # an item is one block
    try:
        ds = stages(items, ps, cfg, pool.use_gpu, (pool.low, pool.high), memory)
        bar = tqdm(total=len(items), desc="precompute", unit="item")
        loop_start = time.time()
        seen_items: set[tuple[str, int]] = set()
        for row in _records(ds):
            if tally.first_item_seconds is None:
                tally.first_item_seconds = time.time() - loop_start
            tally.add(row, plans)
            key = (str(row["part"]), int(row["view"]))
            if key not in seen_items:
                seen_items.add(key)
                bar.update(1)
        bar.close()
    finally:
        ctx.target_max_block_size = block_limit


def run_stage(cfg: Config, overwrite: bool = False, log=print) -> dict[str, Any]:
    """Precompute every configured teacher (a no-op for those already cached). Writes summary.json."""
    meta = require_dataset(cfg, log=log)
    refs = checkpoints.resolve_all(
        cfg, meta.num_classes, meta.channels, data_hw=preprocessing.data_hw(cfg, meta)
    )
    if not refs:
        raise CacheError("no teachers are configured; add a `teachers:` list to the config")
    rows = precompute_teachers(cfg, refs, meta, overwrite=overwrite, log=log)
    summary = {"dataset": f"{meta.name}-{meta.fingerprint}", "teachers": rows, "renders": rows[0]["renders"]}
    url = storage.join(cfg.root, "cache", meta.fingerprint, "summary.json")
    storage.write_json(url, summary)
    log(f"[precompute] summary: {url}")
    return summary


def dry_run_pool(cfg: Config) -> str:
    """The pool decision for --dry-run: from the cluster Ray is attached to, else from this machine (where a
    local Ray would start)."""
    import os

    import ray

    where = "precompute"
    try:
        if ray.is_initialized():
            alive = sum(1 for n in ray.nodes() if n["Alive"])
            plan = pool_plan(cfg, 10**9, ray.cluster_resources(), autoscaling_maximum(), alive)
            return f"{where} {plan.line(len(cfg.teachers))}"
        import torch

        where = "precompute (a local Ray on this machine)"
        here = {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
        return f"{where} {pool_plan(cfg, 10**9, here, None).line(len(cfg.teachers))}"
    except CacheError as e:
        return f"{where}: {e}"


def plan_stage(cfg: Config) -> list[str]:
    """Human-readable plan for --dry-run: per teacher, cached / missing views / parts to compute."""
    from pipeline.data.ingest import find_dataset

    meta = find_dataset(cfg)
    if meta is None:
        return [f"dataset {cfg.data.dataset_name}: not ingested yet (ingest runs first)"]
    spec = make_view_spec(cfg, meta.encoding)
    fmt = output_format(cfg, meta)
    lines = []
    for t in cfg.teachers:
        try:
            ref = checkpoints.resolve(
                cfg, t, meta.num_classes, meta.channels, copy=False, data_hw=preprocessing.data_hw(cfg, meta)
            )
        except checkpoints.TeacherError as e:
            lines.append(f"teacher {t.name}: {e}")
            continue
        store = store_dir(storage.teacher_dir(cfg.root, meta.fingerprint, ref.id), spec, fmt)
        if storage.exists(manifest_url(store)):
            try:
                have = load_manifest(store, t.name).view_numbers
            except CacheError as e:
                lines.append(f"teacher {t.name}: {e}")
                continue
            missing = [v for v in range(spec.count) if v not in have]
            lines.append(
                f"teacher {t.name}: cached at {store} (views {have})"
                + (f"; views {missing} to compute" if missing else "")
            )
        else:
            lines.append(
                f"teacher {t.name}: {spec.count} view(s) × {len(meta.split('train').parts)} part(s) to compute → {store}"
            )
    return lines
