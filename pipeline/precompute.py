"""Precompute: run each teacher once over every training image and view; write shard-aligned cache parts.

Ray Data streams the missing parts through an actor pool of teacher replicas (one per GPU, or per CPU slot). Each
part is written to a temporary name and renamed; the manifest is written last. An interrupted run resumes with the
missing parts only; adding a teacher computes only that teacher. Training and sweeps never run teachers again.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from camkd.training import normalize
from pipeline import storage, teachers
from pipeline.cache import (
    CACHE_FORMAT,
    META_KEY,
    CacheError,
    CachePart,
    Manifest,
    OutputFormat,
    check_manifest,
    check_parts_present,
    encode_view,
    load_manifest,
    manifest_url,
    part_metadata,
)
from pipeline.config import Config
from pipeline.ingest import DatasetMeta, read_image_part, require_dataset
from pipeline.views import ViewSpec, make_view_spec, render_eval_view, render_train_view


@dataclass(frozen=True)
class WriterSpec:
    """What a teacher replica needs (picklable): the teachers, the data, the views, the output format."""

    teachers: tuple[dict[str, Any], ...]  # TeacherRef.to_dict() per teacher index
    cache_dirs: tuple[str, ...]
    dataset_dir: str
    dataset_fp: str
    image_shape: tuple[int, ...] | None
    spec: dict[str, Any]
    fmt: OutputFormat
    batch_size: int
    compression: str
    threads: int


class TeacherReplica:
    """A Ray Data actor serving every teacher of one precompute run: turns (teacher, part) into a written cache
    part (or test-split hits). Items arrive grouped by teacher; the last two models used stay loaded."""

    def __init__(self, ws: WriterSpec) -> None:
        torch.set_num_threads(max(1, ws.threads))
        self.ws = ws
        self.spec = ViewSpec.from_dict(ws.spec)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.models: dict[int, torch.nn.Module] = {}

    def model(self, k: int) -> torch.nn.Module:
        if k not in self.models:
            if len(self.models) >= 2:
                self.models.pop(next(iter(self.models)))
            ref = teachers.TeacherRef.from_dict(self.ws.teachers[k])
            self.models[k] = teachers.build_model(ref).to(self.device)
        return self.models[k]

    @torch.no_grad()
    def infer(self, k: int, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        logits, feats = [], []
        model = self.model(k)
        want_feats = self.ws.fmt.features != "none"
        for start in range(0, len(pixels), self.ws.batch_size):
            x = torch.from_numpy(pixels[start : start + self.ws.batch_size]).to(self.device)
            fmap = model.forward_features(normalize(x, self.spec.mean, self.spec.std))
            logits.append(model.forward_head(fmap).float().cpu().numpy())
            if want_feats:
                feats.append(fmap.float().cpu().numpy())
        return np.concatenate(logits), (np.concatenate(feats) if want_feats else None)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = ("teacher", "task", "part", "rows", "bytes", "sha256", "correct", "seconds")
        out: dict[str, list] = {key: [] for key in keys}
        for k, task, part in zip(batch["teacher"], batch["task"], batch["part"]):
            start = time.time()
            k, task, part = int(k), str(task), str(part)
            if task == "eval":
                rows, correct, size, digest = self._eval(k, part)
            else:
                rows, correct, size, digest = self._write(k, part)
            for key, value in zip(keys, (k, task, part, rows, size, digest, correct, time.time() - start)):
                out[key].append(value)
        return {key: np.asarray(v) for key, v in out.items()}

    def _eval(self, k: int, part: str) -> tuple[int, int, int, str]:
        table = read_image_part(self.ws.dataset_dir, "test", part)
        pixels = render_eval_view(table["image"].to_pylist(), self.spec, self.ws.image_shape)
        logits, _ = self.infer(k, pixels)
        correct = int((logits.argmax(1) == table["label"].to_numpy()).sum())
        return len(pixels), correct, 0, ""

    def _write(self, k: int, part: str) -> tuple[int, int, int, str]:
        ws = self.ws
        teacher = ws.teachers[k]
        table = read_image_part(ws.dataset_dir, "train", part)
        idx = table["idx"].to_numpy()
        labels = table["label"].to_numpy()
        raw = table["image"].to_pylist()
        columns: dict[str, pa.Array] = {"idx": pa.array(idx, pa.int64())}
        correct = 0
        for view in range(self.spec.count):
            pixels = render_train_view(raw, idx, view, self.spec, ws.image_shape)
            logits, feats = self.infer(k, pixels)
            if not np.isfinite(logits).all():
                raise CacheError(
                    f"teacher {teacher['name']!r} produced non-finite logits on {part}, view {view}"
                )
            correct += int((logits.argmax(1) == labels).sum())
            columns.update(encode_view(view, logits, feats, ws.fmt))
        meta = part_metadata(teacher["id"], ws.dataset_fp, self.spec.digest, ws.fmt, part, len(idx), correct)
        out_table = pa.table(columns).replace_schema_metadata(meta)
        buf = pa.BufferOutputStream()
        pq.write_table(
            out_table, buf, compression=ws.compression, use_dictionary=False, row_group_size=len(idx) or 1
        )
        data = buf.getvalue().to_pybytes()
        storage.write_bytes_atomic(storage.join(ws.cache_dirs[k], part), data)
        return len(idx), correct, len(data), storage.sha256_bytes(data)


# ------------------------------------------------------------------------------------------------ driver side
def _existing_part(
    cache_dir: str, part: str, rows: int, teacher_id: str, dataset_fp: str, digest: str, fmt: OutputFormat
) -> tuple[str, CachePart | str | None]:
    """Classify what sits at a part's final name from an earlier (interrupted) run:
    ("absent", None), ("reuse", CachePart), ("recompute", why) for our own unusable output, or
    ("foreign", why) for a part of another teacher / dataset / view spec / format (never overwritten silently)."""
    url = storage.join(cache_dir, part)
    if not storage.exists(url):
        return "absent", None
    fs, path = storage.pyarrow_fs(url)
    try:
        md = pq.read_metadata(path, filesystem=fs)
        kv = json.loads((md.metadata or {}).get(META_KEY, b"{}"))
    except (OSError, pa.ArrowException, ValueError) as e:
        return "recompute", f"unreadable ({type(e).__name__})"
    mine = (
        kv.get("teacher_id") == teacher_id
        and kv.get("dataset_fp") == dataset_fp
        and kv.get("view_digest") == digest
        and kv.get("output") == fmt.describe()
        and kv.get("format") == CACHE_FORMAT
    )
    if not mine:
        return "foreign", (
            f"{url} was written for {kv.get('teacher_id')!r}, view spec {kv.get('view_digest')!r}, {kv.get('output')}"
        )
    if kv.get("part") != part:
        return "recompute", f"it holds the rows of {kv.get('part')} (misaligned)"
    if md.num_rows != rows or kv.get("rows") != rows:
        return "recompute", f"{md.num_rows} rows instead of {rows}"
    data = storage.read_bytes(url)
    return "reuse", CachePart(
        name=part, rows=rows, bytes=len(data), sha256=storage.sha256_bytes(data), correct=kv["correct"]
    )


def _auto_actors(cfg: Config, use_gpu: bool, todo: int) -> int:
    import ray

    if cfg.cache.actors != "auto":
        return max(1, min(int(cfg.cache.actors), todo))
    res = ray.available_resources()
    slots = int(res.get("GPU", 0)) if use_gpu else int(res.get("CPU", 1) // cfg.cache.cpus_per_actor)
    return max(1, min(slots, todo))


def feature_shape(ref: teachers.TeacherRef, meta: DatasetMeta, spec: ViewSpec) -> list[int]:
    model = teachers.build_model(ref)
    h, w = (meta.image_shape[0], meta.image_shape[1]) if meta.image_shape else (spec.size, spec.size)
    with torch.no_grad():
        return list(model.forward_features(torch.zeros(1, meta.channels, h, w)).shape[1:])


@dataclass
class TeacherPlan:
    """One teacher's state before the pipeline runs: reusable parts, parts to compute, or already complete."""

    ref: teachers.TeacherRef
    cache_dir: str
    done: dict[str, CachePart]
    todo: list[str]
    complete: dict[str, Any] | None = None  # the summary row when the cache is already up to date


def _output_format(cfg: Config, meta: DatasetMeta) -> OutputFormat:
    k = min(cfg.cache.topk, meta.num_classes - 1)
    return OutputFormat(cfg.cache.logits, k, cfg.feature_dtype(), meta.num_classes)


def _plan_teacher(
    cfg: Config,
    ref: teachers.TeacherRef,
    meta: DatasetMeta,
    spec: ViewSpec,
    fmt: OutputFormat,
    overwrite: bool,
    log,
) -> TeacherPlan:
    cache_dir = storage.teacher_cache_dir(cfg.root, meta.fingerprint, ref.id)
    train_parts = meta.split("train").parts
    if storage.exists(manifest_url(cache_dir)):
        manifest = load_manifest(cache_dir, ref.name)
        try:
            check_manifest(manifest, cache_dir, ref.to_dict(), meta, spec)
            stored = {
                "logits": manifest.logits["format"],
                "topk": manifest.logits.get("k"),
                "features": manifest.features["dtype"],
            }
            if stored != fmt.describe():
                raise CacheError(
                    f"stale cache for teacher {ref.name!r} at {cache_dir}: stored as {stored}, config asks "
                    f"{fmt.describe()}. Re-run precompute with --overwrite to replace it"
                )
            check_parts_present(manifest, cache_dir)
            log(f"[precompute] {ref.name} ({ref.id}): cache up to date at {cache_dir}")
            row = _summary_row(ref, manifest, cache_dir, computed=0)
            return TeacherPlan(ref, cache_dir, {}, [], complete=row)
        except CacheError:
            if not overwrite:
                raise
            log(f"[precompute] {ref.name}: replacing the stale cache at {cache_dir} (--overwrite)")
            storage.remove(cache_dir)
    storage.makedirs(cache_dir)
    for name in storage.listdir(cache_dir):
        if storage.TMP_MARK in name:  # half-written parts of an interrupted run: never read, safe to drop
            storage.remove(storage.join(cache_dir, name))
    done: dict[str, CachePart] = {}
    for part in train_parts:
        status, found = _existing_part(
            cache_dir, part.name, part.rows, ref.id, meta.fingerprint, spec.digest, fmt
        )
        if status == "foreign":
            if not overwrite:
                raise CacheError(
                    f"refusing to overwrite a foreign cache part: {found}. Remove it, or pass --overwrite"
                )
            log(f"[precompute] {ref.name}: replacing foreign {part.name} (--overwrite)")
        elif status == "recompute":
            log(f"[precompute] {ref.name}: {part.name} is {found}; recomputing it")
        elif status == "reuse":
            done[part.name] = found
    todo = [p.name for p in train_parts if p.name not in done]
    log(
        f"[precompute] {ref.name} ({ref.id}): {len(todo)} part(s) to compute, {len(done)} reused, "
        f"{spec.count} view(s), features {fmt.features}, logits {fmt.logits}"
    )
    return TeacherPlan(ref, cache_dir, done, todo)


def _summary_row(
    ref: teachers.TeacherRef, manifest: Manifest, cache_dir: str, computed: int
) -> dict[str, Any]:
    return {
        "teacher": ref.name,
        "id": ref.id,
        "computed_parts": computed,
        "reused_parts": len(manifest.parts) - computed,
        "accuracy": manifest.accuracy,
        "test_accuracy": manifest.test_accuracy,
        "bytes_per_sample": manifest.bytes_per_sample,
        "total_bytes": manifest.total_bytes,
        "cache_dir": cache_dir,
        "seconds": manifest.seconds,
    }


def _finish_teacher(
    tp: TeacherPlan,
    meta: DatasetMeta,
    spec: ViewSpec,
    fmt: OutputFormat,
    test: tuple[int, int],
    seconds: float,
    log,
) -> dict[str, Any]:
    """Write head.pt and, last, manifest.json for a teacher whose parts are all present."""
    ref, cache_dir = tp.ref, tp.cache_dir
    parts = [tp.done[p.name] for p in meta.split("train").parts]
    model = teachers.build_model(ref)
    head_buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.head.state_dict().items()}, head_buf)
    storage.write_bytes_atomic(storage.join(cache_dir, "head.pt"), head_buf.getvalue())
    rows = sum(p.rows for p in parts)
    total = sum(p.bytes for p in parts)
    shape = feature_shape(ref, meta, spec) if fmt.features != "none" else None
    logits_bytes = spec.count * (2 * meta.num_classes if fmt.logits == "fp16" else fmt.topk * (2 + 2) + 4)
    feat_values = int(np.prod(shape)) if shape else 0
    feat_bytes = spec.count * (
        feat_values * (2 if fmt.features == "fp16" else 1) + (2 * shape[0] if fmt.features == "int8" else 0)
    )
    test_rows, test_correct = test
    manifest = Manifest(
        teacher=ref.to_dict(),
        dataset={"name": meta.name, "fingerprint": meta.fingerprint},
        view_spec=spec.to_dict(),
        view_digest=spec.digest,
        logits={
            "format": fmt.logits,
            "k": fmt.topk if fmt.logits == "topk" else None,
            "num_classes": meta.num_classes,
        },
        features={"dtype": fmt.features, "shape": shape},
        rows=rows,
        parts=parts,
        bytes_per_sample={
            "logits": logits_bytes,
            "features": feat_bytes,
            "on_disk": round(total / max(rows, 1), 1),
        },
        total_bytes=total,
        accuracy=sum(p.correct for p in parts) / max(rows * spec.count, 1),
        test_accuracy=(test_correct / test_rows) if test_rows else None,
        head={"file": "head.pt", "sha256": storage.sha256_bytes(head_buf.getvalue())},
        seconds=round(seconds, 2),
        created=time.time(),
    )
    storage.write_json(manifest_url(cache_dir), manifest.model_dump())
    log(
        f"[precompute] {ref.name}: {rows} rows × {spec.count} views, {total / 2**20:.1f} MiB "
        f"({total / max(rows, 1) / 1024:.1f} KiB/image), cached-view top-1 {manifest.accuracy:.4f}"
        f"{'' if manifest.test_accuracy is None else f', test top-1 {manifest.test_accuracy:.4f}'} → {cache_dir}"
    )
    return _summary_row(ref, manifest, cache_dir, computed=len(tp.todo))


def precompute_teachers(
    cfg: Config, refs: list[teachers.TeacherRef], meta: DatasetMeta, overwrite: bool = False, log=print
) -> list[dict[str, Any]]:
    """Bring the teachers' caches up to date in one Ray Data pipeline (one actor pool serves every teacher);
    returns one summary row per teacher (what was computed, what the cache costs)."""
    import ray
    from tqdm.auto import tqdm

    spec = make_view_spec(cfg, meta.encoding)
    fmt = _output_format(cfg, meta)
    started = time.time()
    plans = [_plan_teacher(cfg, ref, meta, spec, fmt, overwrite, log) for ref in refs]
    items = []
    for k, tp in enumerate(plans):
        if tp.complete is None:
            items += [{"teacher": k, "task": "write", "part": p} for p in tp.todo]
            if cfg.cache.eval_test:
                items += [{"teacher": k, "task": "eval", "part": p.name} for p in meta.split("test").parts]
    test = {k: [0, 0] for k in range(len(plans))}
    first_part_seconds = None  # start-up latency: Ray Data plan + actor start + model load + first part
    if items:
        use_gpu = (
            cfg.cache.use_gpu if cfg.cache.use_gpu != "auto" else ray.cluster_resources().get("GPU", 0) > 0
        )
        actors = _auto_actors(cfg, use_gpu, len(items))
        ws = WriterSpec(
            teachers=tuple(tp.ref.to_dict() for tp in plans),
            cache_dirs=tuple(tp.cache_dir for tp in plans),
            dataset_dir=storage.dataset_dir(cfg.root, meta.name, meta.fingerprint),
            dataset_fp=meta.fingerprint,
            image_shape=tuple(meta.image_shape) if meta.image_shape else None,
            spec=spec.to_dict(),
            fmt=fmt,
            batch_size=cfg.cache.batch_size,
            compression=cfg.cache.compression,
            threads=max(1, math.floor(cfg.cache.cpus_per_actor)),
        )
        log(
            f"[precompute] running {len(items)} item(s) on {actors} teacher replica(s){' (GPU)' if use_gpu else ''}"
        )
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            TeacherReplica,
            fn_constructor_kwargs={"ws": ws},
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cfg.cache.cpus_per_actor,
            num_gpus=1 if use_gpu else 0,
        )
        bar = tqdm(total=len(items), desc="precompute", unit="part")
        loop_start = time.time()
        for row in ds.iter_rows():
            if first_part_seconds is None:
                first_part_seconds = time.time() - loop_start
            k = int(row["teacher"])
            if row["task"] == "write":
                plans[k].done[row["part"]] = CachePart(
                    name=row["part"],
                    rows=int(row["rows"]),
                    bytes=int(row["bytes"]),
                    sha256=str(row["sha256"]),
                    correct=int(row["correct"]),
                )
            else:
                test[k][0] += int(row["rows"])
                test[k][1] += int(row["correct"])
            bar.update(1)
        bar.close()
    seconds = time.time() - started
    rows = [
        tp.complete or _finish_teacher(tp, meta, spec, fmt, tuple(test[k]), seconds, log)
        for k, tp in enumerate(plans)
    ]
    for row in rows:
        row["first_part_seconds"] = first_part_seconds
    return rows


def run_stage(cfg: Config, overwrite: bool = False, log=print) -> dict[str, Any]:
    """Precompute every configured teacher (a no-op for those already cached). Writes summary.json."""
    meta = require_dataset(cfg, log=log)
    refs = teachers.resolve_all(cfg, meta.num_classes, meta.channels)
    if not refs:
        raise CacheError("no teachers are configured; add a `teachers:` list to the config")
    rows = precompute_teachers(cfg, refs, meta, overwrite=overwrite, log=log)
    summary = {"dataset": f"{meta.name}-{meta.fingerprint}", "teachers": rows}
    url = storage.join(cfg.root, "cache", meta.fingerprint, "summary.json")
    storage.write_json(url, summary)
    log(f"[precompute] summary: {url}")
    return summary


def plan_stage(cfg: Config) -> list[str]:
    """Human-readable plan for --dry-run: per teacher, cached / stale / parts to compute."""
    from pipeline.ingest import find_dataset

    meta = find_dataset(cfg)
    if meta is None:
        return [f"dataset {cfg.data.dataset_name}: not ingested yet (ingest runs first)"]
    spec = make_view_spec(cfg, meta.encoding)
    lines = []
    for t in cfg.teachers:
        try:
            ref = teachers.resolve(cfg, t, meta.num_classes, meta.channels)
        except teachers.TeacherError as e:
            lines.append(f"teacher {t.name}: {e}")
            continue
        cdir = storage.teacher_cache_dir(cfg.root, meta.fingerprint, ref.id)
        if storage.exists(manifest_url(cdir)):
            try:
                check_manifest(load_manifest(cdir, t.name), cdir, ref.to_dict(), meta, spec)
                lines.append(f"teacher {t.name}: cached at {cdir}")
            except CacheError as e:
                lines.append(f"teacher {t.name}: STALE — {e}")
        else:
            have = sum(1 for p in meta.split("train").parts if storage.exists(storage.join(cdir, p.name)))
            lines.append(
                f"teacher {t.name}: {len(meta.split('train').parts) - have} part(s) to compute ({have} present)"
            )
    return lines
