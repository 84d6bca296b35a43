"""The teacher knowledge cache: manifest, part encoding, validation, and the shard-aligned training reader.

Layout: `<root>/cache/<dataset-fp>/<teacher-id>/part-NNNNN.parquet` holds, row for row with image part NNNNN,
`idx` and one column group per view (`logits_v{v}`, `feat_v{v}`, ...), so an epoch (one view) reads only that
view's columns. `manifest.json` is written last and says what made the cache. A stale, missing, corrupt or
misaligned part is never read silently: every such case raises `CacheError` naming the file and the fix.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from pipeline import storage
from pipeline.ingest import DatasetMeta, read_image_part
from pipeline.views import ViewSpec, render_eval_view, render_train_view

CACHE_FORMAT = 1
META_KEY = b"camkd"
# Stated error bounds of the compressed encodings (checked by tests against a direct teacher forward):
#   fp16 (logits, features): |x − x̂| ≤ 2^-11·|x| for |x| ≥ 6.1e-5 (float16 rounding; smaller values ≤ 3e-8).
#   int8 features, per-sample per-channel scale s_c = max|x_c|/127: |x − x̂| ≤ s_c/2 ≈ max|x_c|/254.
FP16_REL_ERROR = 2.0**-11
INT8_MAX = 127


class CacheError(RuntimeError):
    """A cache that must not be read as it is; the message names the file and the fix."""


class CachePart(BaseModel):
    name: str
    rows: int
    bytes: int
    sha256: str
    correct: int  # teacher top-1 hits over this part's rows × views


class Manifest(BaseModel):
    format: int = CACHE_FORMAT
    teacher: dict[str, Any]  # TeacherRef.to_dict()
    dataset: dict[str, Any]  # name, fingerprint
    split: str = "train"
    view_spec: dict[str, Any]
    view_digest: str
    logits: dict[str, Any]  # {"format": "fp16"|"topk", "k": int|None, "num_classes": C}
    features: dict[str, Any]  # {"dtype": "fp16"|"int8"|"none", "shape": [C,H,W]|None}
    rows: int
    parts: list[CachePart]
    bytes_per_sample: dict[str, float]
    total_bytes: int
    accuracy: float  # teacher top-1 over all cached training views
    test_accuracy: float | None = None
    head: dict[str, Any]  # {"file": "head.pt", "sha256": ...}
    seconds: float = 0.0
    created: float = 0.0

    @property
    def teacher_id(self) -> str:
        return self.teacher["id"]

    @property
    def has_features(self) -> bool:
        return self.features["dtype"] != "none"


@dataclass(frozen=True)
class OutputFormat:
    """How a teacher's outputs are stored: logits fp16 or top-k, features fp16 / int8 / none."""

    logits: str  # "fp16" | "topk"
    topk: int
    features: str  # "fp16" | "int8" | "none"
    num_classes: int

    def describe(self) -> dict[str, Any]:
        return {
            "logits": self.logits,
            "topk": self.topk if self.logits == "topk" else None,
            "features": self.features,
        }


def part_metadata(
    teacher_id: str, dataset_fp: str, view_digest: str, fmt: OutputFormat, part: str, rows: int, correct: int
):
    """Parquet key-value metadata that makes a part self-identifying (teacher, dataset, views, which part)."""
    return {
        META_KEY: json.dumps(
            {
                "format": CACHE_FORMAT,
                "teacher_id": teacher_id,
                "dataset_fp": dataset_fp,
                "view_digest": view_digest,
                "output": fmt.describe(),
                "part": part,
                "rows": rows,
                "correct": correct,
            }
        ).encode()
    }


# --------------------------------------------------------------------------------------------- encoding
def _tensor_column(values: np.ndarray) -> pa.FixedSizeBinaryArray:
    """Rows of a C-contiguous array as fixed-width binary: Parquet stores them as FIXED_LEN_BYTE_ARRAY, which
    reads back as one memcpy (30× faster than a list column of float16 values); dtype and shape live in the
    manifest."""
    values = np.ascontiguousarray(values)
    width = values.nbytes // max(len(values), 1)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(values), [None, pa.py_buffer(values)])


def _tensor_numpy(column: pa.ChunkedArray | pa.Array, shape: tuple[int, ...], dtype) -> np.ndarray:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = arr.type.byte_width
    data = np.frombuffer(arr.buffers()[1], dtype=np.uint8, count=len(arr) * width, offset=arr.offset * width)
    return data.view(dtype).reshape(len(arr), *shape)


def quantize_int8(feat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [N,C,H,W] → (int8 [N,C,H,W], fp16 scale [N,C]) with a per-sample, per-channel scale."""
    n, c = feat.shape[:2]
    peak = np.abs(feat.reshape(n, c, -1)).max(-1).astype(np.float32)
    # Round the scale up to the next float16 so x/scale never exceeds 127 after fp16 rounding.
    scale = (peak / INT8_MAX * (1 + 2.0**-9)).astype(np.float16)
    scale[scale == 0] = np.float16(1.0)
    q = np.clip(np.rint(feat / scale.astype(np.float32)[:, :, None, None]), -INT8_MAX, INT8_MAX).astype(
        np.int8
    )
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale.astype(np.float32)[:, :, None, None]


def topk_encode(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits [N,C] → (top-k values fp16 [N,k], indices [N,k], tail fill logit float32 [N]).

    The fill logit gives every non-top-k class the average of the tail probability mass (at τ = 1), so the
    reconstructed distribution keeps the teacher's exact top-k logits and its exact tail mass.
    """
    z = logits.astype(np.float64)
    _n, c = z.shape
    k = min(k, c - 1)
    index = np.argpartition(-z, k, axis=1)[:, :k]
    values = np.take_along_axis(z, index, axis=1)
    m = z.max(1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(1))
    top_mass = np.exp(values - lse[:, None]).sum(1)
    tail_mass = np.clip(1.0 - top_mass, 1e-30, None)
    fill = np.log(tail_mass / (c - k)) + lse
    return values.astype(np.float16), index.astype(topk_index_dtype(c)), fill.astype(np.float32)


def topk_index_dtype(num_classes: int):
    return np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32


def topk_decode(values: np.ndarray, index: np.ndarray, fill: np.ndarray, num_classes: int) -> np.ndarray:
    dense = np.repeat(fill.astype(np.float32)[:, None], num_classes, axis=1)
    np.put_along_axis(dense, index.astype(np.int64), values.astype(np.float32), axis=1)
    return dense


def encode_view(
    view: int, logits: np.ndarray, feats: np.ndarray | None, fmt: OutputFormat
) -> dict[str, pa.Array]:
    """The Arrow columns of one view of a part."""
    cols: dict[str, pa.Array] = {}
    if fmt.logits == "fp16":
        cols[f"logits_v{view}"] = _tensor_column(_fp16(logits, "logits"))
    else:
        values, index, fill = topk_encode(logits, fmt.topk)
        cols[f"topk_values_v{view}"] = _tensor_column(values)
        cols[f"topk_index_v{view}"] = _tensor_column(index)
        cols[f"tail_logit_v{view}"] = pa.array(fill)
    if fmt.features != "none":
        if feats is None:
            raise ValueError("features requested but not computed")
        if fmt.features == "fp16":
            cols[f"feat_v{view}"] = _tensor_column(_fp16(feats, "features"))
        else:
            q, scale = quantize_int8(feats)
            cols[f"feat_v{view}"] = _tensor_column(q)
            cols[f"feat_scale_v{view}"] = _tensor_column(scale)
    return cols


def _fp16(x: np.ndarray, what: str) -> np.ndarray:
    out = x.astype(np.float16)
    if not np.isfinite(out).all():
        raise ValueError(
            f"teacher {what} hold values beyond float16 range (max |x| = {np.abs(x).max():.3g}); "
            "use cache.features: int8 or check the teacher"
        )
    return out


def view_columns(manifest: Manifest, view: int, logits: bool, features: bool) -> list[str]:
    cols = ["idx"]
    if logits:
        if manifest.logits["format"] == "fp16":
            cols.append(f"logits_v{view}")
        else:
            cols += [f"topk_values_v{view}", f"topk_index_v{view}", f"tail_logit_v{view}"]
    if features:
        cols.append(f"feat_v{view}")
        if manifest.features["dtype"] == "int8":
            cols.append(f"feat_scale_v{view}")
    return cols


def decode_view(
    table: pa.Table, manifest: Manifest, view: int, logits: bool, features: bool
) -> dict[str, np.ndarray]:
    """Arrow columns of one view → {'logits': float16/float32 [N,C], 'feat': fp16|int8 [N,C,H,W], 'feat_scale'}."""
    out: dict[str, np.ndarray] = {}
    c = manifest.logits["num_classes"]
    if logits:
        if manifest.logits["format"] == "fp16":
            out["logits"] = _tensor_numpy(table[f"logits_v{view}"], (c,), np.float16)
        else:
            k = manifest.logits["k"]
            values = _tensor_numpy(table[f"topk_values_v{view}"], (k,), np.float16)
            index = _tensor_numpy(table[f"topk_index_v{view}"], (k,), topk_index_dtype(c))
            fill = table[f"tail_logit_v{view}"].to_numpy()
            out["logits"] = topk_decode(values, index, fill, c)
    if features:
        shape = tuple(manifest.features["shape"])
        if manifest.features["dtype"] == "fp16":
            out["feat"] = _tensor_numpy(table[f"feat_v{view}"], shape, np.float16)
        else:
            out["feat"] = _tensor_numpy(table[f"feat_v{view}"], shape, np.int8)
            out["feat_scale"] = _tensor_numpy(table[f"feat_scale_v{view}"], (shape[0],), np.float16)
    return out


# --------------------------------------------------------------------------------------------- manifests
def manifest_url(cache_dir: str) -> str:
    return storage.join(cache_dir, "manifest.json")


def load_manifest(cache_dir: str, teacher_name: str = "?") -> Manifest:
    url = manifest_url(cache_dir)
    if not storage.exists(url):
        raise CacheError(
            f"teacher {teacher_name!r} has no cache at {cache_dir} (no manifest.json); "
            "run `python pipeline/run.py precompute --config ...` first"
        )
    try:
        return Manifest.model_validate(storage.read_json(url))
    except Exception as e:
        raise CacheError(
            f"{url} is not a valid cache manifest ({e}); delete it and re-run precompute"
        ) from None


def check_manifest(
    manifest: Manifest,
    cache_dir: str,
    teacher_ref: dict[str, Any],
    meta: DatasetMeta,
    spec: ViewSpec,
    needs_features: bool = False,
) -> None:
    """Refuse a stale cache: another checkpoint, dataset or view spec, or features missing for the strategy."""
    problems = []
    if (
        manifest.teacher.get("sha256") != teacher_ref["sha256"]
        or manifest.teacher.get("arch") != teacher_ref["arch"]
    ):
        problems.append(
            f"checkpoint: cache made from {manifest.teacher.get('arch')} sha256 {manifest.teacher.get('sha256', '')[:12]}, "
            f"config has {teacher_ref['arch']} sha256 {teacher_ref['sha256'][:12]}"
        )
    if manifest.dataset.get("fingerprint") != meta.fingerprint:
        problems.append(
            f"dataset: cache of {manifest.dataset.get('fingerprint')}, config uses {meta.fingerprint}"
        )
    if manifest.view_digest != spec.digest:
        diff = ViewSpec.from_dict(manifest.view_spec).diff(spec)
        problems.append("view spec: " + "; ".join(diff or [f"{manifest.view_digest} vs {spec.digest}"]))
    expected_parts = [p.name for p in meta.split("train").parts]
    if [p.name for p in manifest.parts] != expected_parts:
        problems.append(f"parts: cache has {len(manifest.parts)} parts, dataset has {len(expected_parts)}")
    if problems:
        raise CacheError(
            f"stale cache for teacher {teacher_ref['name']!r} at {cache_dir}: "
            + " | ".join(problems)
            + ". Re-run precompute with the current config (add --overwrite to replace this cache), "
            "or change the config back"
        )
    if needs_features and not manifest.has_features:
        raise CacheError(
            f"cache of teacher {teacher_ref['name']!r} at {cache_dir} holds no feature maps, but the strategy needs "
            "them; re-run precompute with cache.features: fp16 (or int8) and --overwrite"
        )


def check_parts_present(manifest: Manifest, cache_dir: str) -> None:
    """Cheap pre-flight: every part exists with the size the manifest recorded (catches missing/truncated)."""
    fs, _base = storage.get_fs(cache_dir)
    for part in manifest.parts:
        url = storage.join(cache_dir, part.name)
        _, path = storage.get_fs(url)
        if not fs.exists(path):
            raise CacheError(
                f"cache part {url} of teacher {manifest.teacher['name']!r} is missing; re-run precompute "
                "(it recomputes only missing parts)"
            )
        size = fs.size(path)
        if size != part.bytes:
            raise CacheError(
                f"cache part {url} of teacher {manifest.teacher['name']!r} has {size} bytes, the manifest recorded "
                f"{part.bytes}: it is truncated or was replaced. Delete it and re-run precompute"
            )


def read_cache_part(
    cache_dir: str, manifest: Manifest, part: str, columns: list[str], expected_idx: np.ndarray
) -> pa.Table:
    """Read a cache part's columns and check it belongs to this teacher/dataset and aligns with the image part."""
    url = storage.join(cache_dir, part)
    who = f"cache part {url} of teacher {manifest.teacher['name']!r}"
    fs, path = storage.pyarrow_fs(url)
    try:
        pf = pq.ParquetFile(path, filesystem=fs)
        kv = json.loads((pf.schema_arrow.metadata or {}).get(META_KEY, b"{}"))
        table = pf.read(columns=columns)
    except FileNotFoundError:
        raise CacheError(f"{who} is missing; re-run precompute (it recomputes only missing parts)") from None
    except (OSError, pa.ArrowException, ValueError) as e:
        raise CacheError(
            f"{who} is corrupt ({e}); delete it and re-run precompute (only that part is recomputed)"
        ) from None
    if kv.get("teacher_id") != manifest.teacher_id or kv.get("dataset_fp") != manifest.dataset["fingerprint"]:
        raise CacheError(
            f"{who} was written for teacher {kv.get('teacher_id')!r} / dataset {kv.get('dataset_fp')!r}, not "
            f"{manifest.teacher_id!r} / {manifest.dataset['fingerprint']!r}; it was copied from another cache. "
            "Delete it and re-run precompute"
        )
    idx = table["idx"].to_numpy()
    if len(idx) != len(expected_idx) or not np.array_equal(idx, expected_idx):
        row = int(np.argmax(idx[: len(expected_idx)] != expected_idx[: len(idx)])) if len(idx) else 0
        raise CacheError(
            f"{who} does not match its image part ({len(idx)} vs {len(expected_idx)} rows, idx differs at row {row}); "
            "delete it and re-run precompute"
        )
    return table


# --------------------------------------------------------------------------------------------- training reader
@dataclass(frozen=True)
class TeacherSource:
    """What the reader needs to know about one teacher's cache (picklable, sent to Ray tasks)."""

    name: str
    cache_dir: str
    manifest: dict[str, Any]


@dataclass(frozen=True)
class ReadPlan:
    """Everything a read task needs to build training rows of one part: image part + chosen teachers' columns."""

    dataset_dir: str
    split: str
    image_shape: tuple[int, ...] | None
    spec: dict[str, Any]
    teachers: tuple[TeacherSource, ...] = ()
    logits: bool = False
    features: bool = False


def read_training_rows(
    batch: dict[str, np.ndarray], plan: ReadPlan, view: int | None
) -> dict[str, np.ndarray]:
    """Ray Data `map_batches` body: part names → joined rows (image of view `view`, label, teacher outputs).

    `view=None` renders the deterministic evaluation view and reads no teacher columns.
    """
    spec = ViewSpec.from_dict(plan.spec)
    manifests = [Manifest.model_validate(t.manifest) for t in plan.teachers]
    outs: list[dict[str, np.ndarray]] = []
    for part in batch["part"]:
        part = str(part)
        images = read_image_part(plan.dataset_dir, plan.split, part)
        idx = images["idx"].to_numpy()
        raw = images["image"].to_pylist()
        if view is None:
            pixels = render_eval_view(raw, spec, plan.image_shape)
        else:
            pixels = render_train_view(raw, idx, view, spec, plan.image_shape)
        row: dict[str, np.ndarray] = {
            "idx": idx,
            "image": pixels,
            "label": images["label"].to_numpy().astype(np.int64),
        }
        if view is not None:
            for k, (src, manifest) in enumerate(zip(plan.teachers, manifests)):
                cols = view_columns(manifest, view, plan.logits, plan.features)
                table = read_cache_part(src.cache_dir, manifest, part, cols, idx)
                for key, value in decode_view(table, manifest, view, plan.logits, plan.features).items():
                    row[f"t{k}_{key}"] = value
        outs.append(row)
    return {key: np.concatenate([o[key] for o in outs]) for key in outs[0]}


def build_datasets(
    plan: ReadPlan, parts: list[str], views: list[int] | None, read_cpus: float
) -> dict[str, Any]:
    """Ray Datasets keyed `train_v{v}` (one per view) or `test` (views=None): a dataset of part names mapped
    through `read_training_rows`, so parts are read in parallel, streamed, and never fully materialised."""
    import ray.data

    def one(view: int | None):
        ds = ray.data.from_items([{"part": p} for p in parts], override_num_blocks=len(parts))
        return ds.map_batches(
            read_training_rows,
            fn_kwargs={"plan": plan, "view": view},
            batch_size=1,
            batch_format="numpy",
            num_cpus=read_cpus,
        )

    if views is None:
        return {"test": one(None)}
    return {f"train_v{v}": one(v) for v in views}


def teacher_outputs_from_batch(batch: dict, num_teachers: int, logits: bool, features: bool, device):
    """Batch tensors of `read_training_rows` → camkd.TeacherOutputs on `device` (int8 features dequantised)."""
    import torch

    from camkd import TeacherOutputs

    t_logits = None
    if logits:
        t_logits = torch.stack(
            [batch[f"t{k}_logits"].to(device, non_blocking=True).float() for k in range(num_teachers)]
        )
    t_feats = None
    if features:
        t_feats = []
        for k in range(num_teachers):
            f = batch[f"t{k}_feat"].to(device, non_blocking=True)
            if f.dtype == torch.int8:
                scale = batch[f"t{k}_feat_scale"].to(device, non_blocking=True).float()
                f = f.float() * scale[:, :, None, None]
            t_feats.append(f.float())
    return TeacherOutputs(t_logits, t_feats)


def now() -> float:
    return time.time()
