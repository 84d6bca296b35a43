"""The teacher knowledge cache: layout, output encodings, manifests, receipts and checks.

Layout (format 2):

    <root>/cache/<dataset-fp>/<teacher-id>/head.pt                          the teacher's frozen head
    <root>/cache/<dataset-fp>/<teacher-id>/<family>-<format>/manifest.json  one store per (view family, format)
    <root>/cache/<dataset-fp>/<teacher-id>/<family>-<format>/view-0003/part-00007.parquet
    <root>/cache/<dataset-fp>/<teacher-id>/<family>-<format>/view-0003/part-00007.receipt.json

A store holds one folder per view; its part i holds, row for row (same row groups), what image part i holds:
`idx`, then `logits` (fp16 [C]) or `topk_values`/`topk_index`/`tail_logit`, then `feat` (fp16 or int8 [C·H·W])
and `feat_scale` (int8 only). Stores of other view specs or formats of one teacher live side by side; since view
v is a pure function of (seed, idx, v), growing V adds view folders and recomputes nothing. Each part is followed
by its receipt (rows, bytes, xxh3-128 of the file, hits): a resumed precompute trusts a part whose receipt and
size agree, without reading it again. `manifest.json` is written last and lists every complete view. A stale,
missing, corrupt or misaligned part is never read silently: each such case raises `CacheError` naming the file,
the teacher and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel

from pipeline.data.ingest import DatasetMeta
from pipeline.data.views import ViewSpec
from pipeline.store import storage, tables

CACHE_FORMAT = 2
META_KEY = b"camkd"
RECEIPT_SUFFIX = ".receipt.json"
# Stated error bounds of the compressed encodings (checked by tests against a direct teacher forward):
#   fp16 (logits, features): |x − x̂| ≤ 2^-11·|x| for |x| ≥ 6.1e-5 (float16 rounding; smaller values ≤ 3e-8).
#   int8 features, per-sample per-channel scale s_c = max|x_c|/127: |x − x̂| ≤ s_c/2 ≈ max|x_c|/254, plus
#   2^-11·|x| because feature maps travel from the inference actors to the writers as float16.
FP16_REL_ERROR = 2.0**-11
INT8_MAX = 127


class CacheError(RuntimeError):
    """A cache that must not be read as it is; the message names the file and the fix."""


@dataclass(frozen=True)
class OutputFormat:
    """How a teacher's outputs are stored: logits fp16 or top-k, features fp16 / int8 / none, and the precision
    the teacher ran in. All of it is part of a store's identity."""

    logits: str  # "fp16" | "topk"
    topk: int
    features: str  # "fp16" | "int8" | "none"
    num_classes: int
    precision: str = "fp32"  # "fp32" | "bf16" | "fp16"

    @property
    def key(self) -> str:
        """`fp16-int8`, `topk200-int8-bf16`, ...: the format half of a store's folder name."""
        logits = "fp16" if self.logits == "fp16" else f"topk{self.topk}"
        return f"{logits}-{self.features}" + ("" if self.precision == "fp32" else f"-{self.precision}")

    def describe(self) -> dict[str, Any]:
        return {
            "logits": self.logits,
            "topk": self.topk if self.logits == "topk" else None,
            "features": self.features,
            "precision": self.precision,
        }

    def columns(self, logits: bool, features: bool) -> list[str]:
        """The columns a reader needs for logits and/or features."""
        cols = ["idx"]
        if logits:
            cols += ["logits"] if self.logits == "fp16" else ["topk_values", "topk_index", "tail_logit"]
        if features:
            cols += ["feat"] + (["feat_scale"] if self.features == "int8" else [])
        return cols


def output_format(cfg, meta: DatasetMeta, needs_features: bool = False) -> OutputFormat:
    """The cache format a `Config` reads and writes (features on when a strategy in use needs them)."""
    features = cfg.feature_dtype()
    if features == "none" and needs_features:
        features = "fp16"
    k = min(cfg.cache.topk, meta.num_classes - 1)
    return OutputFormat(cfg.cache.logits, k, features, meta.num_classes, cfg.cache.precision)


# --------------------------------------------------------------------------------------------- layout
def store_name(spec: ViewSpec, fmt: OutputFormat) -> str:
    return f"{spec.family}-{fmt.key}"


def store_dir(teacher_dir: str, spec: ViewSpec, fmt: OutputFormat) -> str:
    return storage.join(teacher_dir, store_name(spec, fmt))


def view_dir(store: str, view: int) -> str:
    return storage.join(store, f"view-{view:04d}")


def head_url(teacher_dir: str) -> str:
    return storage.join(teacher_dir, "head.pt")


def manifest_url(store: str) -> str:
    return storage.join(store, "manifest.json")


def receipt_url(part_url: str) -> str:
    return part_url + RECEIPT_SUFFIX


# --------------------------------------------------------------------------------------------- records
class CachePart(BaseModel):
    name: str
    rows: int
    bytes: int
    digest: str  # xxh3-128 of the file
    correct: int  # teacher top-1 hits over this part's rows (this view)


class ViewRecord(BaseModel):
    view: int
    parts: list[CachePart]

    @property
    def correct(self) -> int:
        return sum(p.correct for p in self.parts)


class Manifest(BaseModel):
    format: int = CACHE_FORMAT
    teacher: dict[str, Any]  # TeacherRef.to_dict()
    dataset: dict[str, Any]  # name, fingerprint
    view_spec: dict[str, Any]  # the family's spec; its `count` is the number of views stored
    family: str
    output: dict[str, Any]  # OutputFormat.describe() + num_classes + feature_shape
    views: list[ViewRecord]
    rows: int
    bytes_per_sample: dict[str, float]  # per view
    total_bytes: int
    accuracy: float  # teacher top-1 over all cached training views
    test_accuracy: float | None = None
    head: dict[str, Any]  # {"file": "../head.pt", "sha256": ...}
    seconds: float = 0.0
    created: float = 0.0
    # The camkd-ray that wrote this manifest, and `render_probe.render_digest` of the rendering every stored view
    # came from; None in manifests written before these were recorded (unknown, not an error).
    package_version: str | None = None
    render_probe: str | None = None

    @property
    def teacher_id(self) -> str:
        return self.teacher["id"]

    @property
    def view_numbers(self) -> list[int]:
        return [v.view for v in self.views]

    @property
    def has_features(self) -> bool:
        return self.output["features"] != "none"

    @property
    def feature_shape(self) -> list[int] | None:
        return self.output.get("feature_shape")

    @property
    def num_classes(self) -> int:
        return int(self.output["num_classes"])

    def fmt(self) -> OutputFormat:
        o = self.output
        return OutputFormat(o["logits"], o.get("topk") or 0, o["features"], o["num_classes"], o["precision"])


@dataclass(frozen=True)
class StoreRef:
    """What reading one teacher's store needs, taken once from its manifest on the driver: small and picklable,
    so read tasks get this instead of validating the manifest for every row group."""

    teacher: str  # the teacher's name, for messages
    teacher_id: str
    dataset_fp: str
    family: str
    fmt: OutputFormat
    feature_shape: tuple[int, ...] | None
    bytes_per_sample: float  # on disk, per view

    @classmethod
    def of(cls, manifest: Manifest) -> StoreRef:
        shape = manifest.feature_shape
        return cls(
            teacher=manifest.teacher["name"],
            teacher_id=manifest.teacher_id,
            dataset_fp=manifest.dataset["fingerprint"],
            family=manifest.family,
            fmt=manifest.fmt(),
            feature_shape=tuple(shape) if shape else None,
            bytes_per_sample=float(manifest.bytes_per_sample.get("on_disk", 0)),
        )

    @property
    def num_classes(self) -> int:
        return self.fmt.num_classes


def part_metadata(
    teacher_id: str, dataset_fp: str, spec: ViewSpec, fmt: OutputFormat, view: int, part: str, rows: int
) -> dict[bytes, bytes]:
    """Parquet key-value metadata that makes a part self-identifying (teacher, dataset, views, which part)."""
    return {
        META_KEY: json.dumps(
            {
                "format": CACHE_FORMAT,
                "teacher_id": teacher_id,
                "dataset_fp": dataset_fp,
                "family": spec.family,
                "output": fmt.key,
                "view": view,
                "part": part,
                "rows": rows,
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


def tensor_numpy(column: pa.ChunkedArray | pa.Array, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A fixed-width binary column → [N, *shape] array of `dtype`, without copying when it is one chunk."""
    arr = column
    if isinstance(column, pa.ChunkedArray):  # one chunk (a row group as read): no copy
        arr = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    width = arr.type.byte_width
    data = np.frombuffer(arr.buffers()[1], dtype=np.uint8, count=len(arr) * width, offset=arr.offset * width)
    return data.view(dtype).reshape(len(arr), *shape)


def quantize_int8(feat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [N,C,H,W] → (int8 [N,C,H,W], fp16 scale [N,C]) with a per-sample, per-channel scale.

    float16 input (what the teacher actors send) is read as is: its per-channel peaks come from the bits (|x| is
    x without its sign bit, and for non-negative halves the bit order is the value order), and the division
    widens to float32 as it goes, without a float32 copy of the maps first (1.9× faster, the same bytes)."""
    n, c = feat.shape[:2]
    flat = feat.reshape(n, c, -1)
    if feat.dtype == np.float16:
        peak = (flat.view(np.uint16) & 0x7FFF).max(-1).view(np.float16).astype(np.float32)
    else:
        peak = np.abs(flat).max(-1).astype(np.float32)
    if not np.isfinite(peak).all():
        raise ValueError(
            "teacher features hold non-finite values (inf or NaN; float16 overflows beyond 65504); "
            "check the teacher's checkpoint and inputs"
        )
    # Round the scale up to the next float16 so x/scale never exceeds 127 after fp16 rounding.
    scale = (peak / INT8_MAX * (1 + 2.0**-9)).astype(np.float16)
    scale[scale == 0] = np.float16(1.0)
    q = np.divide(feat, scale.astype(np.float32)[:, :, None, None], dtype=np.float32)
    np.rint(q, out=q)
    np.clip(q, -INT8_MAX, INT8_MAX, out=q)
    return q.astype(np.int8), scale


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
    """The dense logits of `topk_encode` (NumPy; training decodes on the device, `pipeline/train/reader.py`)."""
    dense = np.repeat(fill.astype(np.float32)[:, None], num_classes, axis=1)
    np.put_along_axis(dense, index.astype(np.int64), values.astype(np.float32), axis=1)
    return dense


def encode_outputs(
    idx: np.ndarray, logits: np.ndarray, feats: np.ndarray | None, fmt: OutputFormat
) -> pa.Table:
    """One view of one part as an Arrow table in the store's format, encoded here with NumPy (the teacher actors
    encode on their device instead: `pipeline/cache/encode.py`, the same bytes)."""
    cols: dict[str, np.ndarray] = {}
    if fmt.logits == "fp16":
        cols["logits"] = _fp16(logits, "logits")
    else:
        cols["topk_values"], cols["topk_index"], cols["tail_logit"] = topk_encode(logits, fmt.topk)
    if fmt.features != "none":
        if feats is None:
            raise ValueError("features requested but not computed")
        if fmt.features == "fp16":
            cols["feat"] = _fp16(feats, "features")
        else:
            cols["feat"], cols["feat_scale"] = quantize_int8(feats)
    return stored_table(idx, cols, fmt)


def stored_table(idx: np.ndarray, columns: dict[str, np.ndarray], fmt: OutputFormat) -> pa.Table:
    """The part's Arrow table from columns already in their stored form (tensors as fixed-width binary rows,
    the tail logit as a float32 column), in the store's column order."""
    want = fmt.columns(True, fmt.features != "none")[1:]
    missing = sorted(set(want) - set(columns))
    if missing:
        raise ValueError(f"stored columns {missing} are missing (format {fmt.key}; got {sorted(columns)})")
    cols: dict[str, pa.Array] = {"idx": pa.array(idx, pa.int64())}
    for name in want:
        values = columns[name]
        cols[name] = pa.array(values) if name == "tail_logit" else _tensor_column(values)
    return pa.table(cols)


def _fp16(x: np.ndarray, what: str) -> np.ndarray:
    out = np.asarray(x, dtype=np.float16)  # feature maps arrive as float16: no copy
    # Finite ⇔ the exponent bits are not all ones; on the bits this is ~3× faster than np.isfinite on float16.
    if ((out.view(np.uint16) & 0x7C00) == 0x7C00).any():
        raise ValueError(
            f"teacher {what} hold values beyond float16 range (max |x| = {np.abs(x).max():.3g}); "
            "check the teacher's checkpoint and inputs"
        )
    return out


def decode_outputs(table: pa.Table, ref: StoreRef, logits: bool, features: bool) -> dict[str, np.ndarray]:
    """A view part's columns → raw arrays, as stored: `logits` fp16 [N,C], or `topk_values` fp16 [N,k],
    `topk_index` int16/32 [N,k], `tail_logit` f32 [N]; `feat` fp16|int8 [N,C,H,W] and `feat_scale` fp16 [N,C].
    Top-k logits and int8 features are expanded on the training device (`pipeline/train/reader.py`)."""
    out: dict[str, np.ndarray] = {}
    c = ref.num_classes
    fmt = ref.fmt
    if logits:
        if fmt.logits == "fp16":
            out["logits"] = tensor_numpy(table["logits"], (c,), np.float16)
        else:
            out["topk_values"] = tensor_numpy(table["topk_values"], (fmt.topk,), np.float16)
            out["topk_index"] = tensor_numpy(table["topk_index"], (fmt.topk,), topk_index_dtype(c))
            out["tail_logit"] = table["tail_logit"].to_numpy()
    if features:
        shape = tuple(ref.feature_shape)
        if fmt.features == "fp16":
            out["feat"] = tensor_numpy(table["feat"], shape, np.float16)
        else:
            out["feat"] = tensor_numpy(table["feat"], shape, np.int8)
            out["feat_scale"] = tensor_numpy(table["feat_scale"], (shape[0],), np.float16)
    return out


# --------------------------------------------------------------------------------------------- manifests
def load_manifest(store: str, teacher_name: str = "?") -> Manifest:
    url = manifest_url(store)
    try:
        raw = storage.read_json(url)
    except FileNotFoundError:
        raise CacheError(
            f"teacher {teacher_name!r} has no cache at {store} (no manifest.json); "
            "run `python pipeline/run.py precompute --config ...` first"
        ) from None
    except ValueError as e:
        raise CacheError(
            f"{url} is not a valid cache manifest ({e}); delete it and re-run precompute"
        ) from None
    if raw.get("format") != CACHE_FORMAT:
        raise CacheError(
            f"the cache at {store} of teacher {teacher_name!r} was written by an older camkd-ray (cache format "
            f"{raw.get('format')}, this version reads {CACHE_FORMAT}); rebuild it: delete {store} and re-run "
            "precompute"
        )
    try:
        return Manifest.model_validate(raw)
    except Exception as e:
        raise CacheError(
            f"{url} is not a valid cache manifest ({e}); delete it and re-run precompute"
        ) from None


def describe_stores(teacher_dir: str) -> list[str]:
    """`<store> (views 0-3)` for every store of a teacher, for 'not found' messages."""
    out = []
    for name in storage.listdir(teacher_dir):
        if name == "head.pt" or name.startswith("."):
            continue
        url = manifest_url(storage.join(teacher_dir, name))
        try:
            views = storage.read_json(url).get("views", [])
            out.append(f"{name} (views {', '.join(str(v['view']) for v in views) or 'none'})")
        except (OSError, ValueError):
            out.append(f"{name} (incomplete: no manifest)")
    return out


def find_store(
    teacher_dir: str, teacher_ref: dict[str, Any], spec: ViewSpec, fmt: OutputFormat, views: list[int]
) -> tuple[str, Manifest]:
    """The store of this teacher holding `views` of this view family and format, checked; else a CacheError
    saying which stores exist and what to run."""
    store = store_dir(teacher_dir, spec, fmt)
    name = teacher_ref["name"]
    if not storage.exists(manifest_url(store)):
        if storage.exists(manifest_url(teacher_dir)):
            raise CacheError(
                f"the cache at {teacher_dir} of teacher {name!r} was written by an older camkd-ray (cache format "
                f"1); rebuild it: delete {teacher_dir} and re-run precompute"
            )
        others = describe_stores(teacher_dir)
        raise CacheError(
            f"teacher {name!r} has no cache for view family {spec.family} (views.count={spec.count}, seed "
            f"{spec.seed}) in format {fmt.key} at {store}"
            + (f"; this teacher has: {', '.join(others)}" if others else "")
            + ". Run `python pipeline/run.py precompute` with this config"
        )
    manifest = load_manifest(store, name)
    missing = sorted(set(views) - set(manifest.view_numbers))
    if missing:
        raise CacheError(
            f"the cache of teacher {name!r} at {store} holds views {manifest.view_numbers}, the run needs "
            f"{missing} too (views.count={spec.count}). Run precompute: it computes only the missing views"
        )
    if manifest.teacher.get("sha256") != teacher_ref["sha256"]:
        raise CacheError(
            f"the cache at {store} was made from checkpoint sha256 {manifest.teacher.get('sha256', '')[:12]}, "
            f"teacher {name!r} is now {teacher_ref['sha256'][:12]}; delete {store} and re-run precompute"
        )
    return store, manifest


def check_manifest_dataset(manifest: Manifest, store: str, meta: DatasetMeta) -> None:
    """The store was made from this dataset, part for part."""
    problems = []
    if manifest.dataset.get("fingerprint") != meta.fingerprint:
        problems.append(
            f"dataset: cache of {manifest.dataset.get('fingerprint')}, config uses {meta.fingerprint}"
        )
    expected = [(p.name, p.rows) for p in meta.split("train").parts]
    for record in manifest.views:
        if [(p.name, p.rows) for p in record.parts] != expected:
            problems.append(f"view {record.view}: {len(record.parts)} parts, the dataset has {len(expected)}")
            break
    if problems:
        raise CacheError(
            f"stale cache of teacher {manifest.teacher['name']!r} at {store}: {' | '.join(problems)}. Delete it "
            "and re-run precompute"
        )


def check_rendering(manifest: Manifest, store: str, digest: str) -> None:
    """The store's views were rendered by the rendering this process runs (its probe digest, `digest`); a manifest
    that does not record one (older camkd-ray) passes: `precompute --verify` says it is unknown."""
    made = manifest.render_probe
    if made is None or made == digest:
        return
    raise CacheError(
        f"the cache of teacher {manifest.teacher['name']!r} at {store} was made by a view rendering that has since "
        f"changed (the probe image renders to {made} in its manifest, written by camkd-ray "
        f"{manifest.package_version or '?'}, and to {digest} now): the student would train on other pixels than "
        f"the teacher saw. Delete {store} and re-run precompute (or go back to the code that made it)"
    )


def check_parts_present(manifest: Manifest, store: str, views: list[int]) -> None:
    """Cheap pre-flight, one listing per view: every part exists with the size its receipt recorded."""
    records = {r.view: r for r in manifest.views}
    for view in views:
        vdir = view_dir(store, view)
        sizes = storage.list_sizes(vdir)
        for part in records[view].parts:
            url = storage.join(vdir, part.name)
            if part.name not in sizes:
                raise CacheError(
                    f"cache part {url} of teacher {manifest.teacher['name']!r} is missing; re-run precompute "
                    "(it recomputes only missing parts)"
                )
            if sizes[part.name] != part.bytes:
                raise CacheError(
                    f"cache part {url} of teacher {manifest.teacher['name']!r} has {sizes[part.name]} bytes, the "
                    f"manifest recorded {part.bytes}: it is truncated or was replaced. Delete it and re-run "
                    "precompute"
                )


def open_cache_part(
    url: str, ref: StoreRef, view: int, part: str, retry=None, scope: str | None = None
) -> tables.OpenTable:
    """A cache part opened for row-group reads (with a `scope`, once per process and scope:
    `tables.open_cached`), checked to belong to this teacher, dataset, view and part."""
    who = f"cache part {url} of teacher {ref.teacher!r}"
    try:
        table = tables.open_cached(url, META_KEY, retry, scope)
    except FileNotFoundError:
        raise CacheError(f"{who} is missing; re-run precompute (it recomputes only missing parts)") from None
    except tables.CorruptTable as e:
        raise CacheError(corrupt_message(who, e.detail)) from None
    kv = table.metadata
    mine = (
        kv.get("teacher_id") == ref.teacher_id
        and kv.get("dataset_fp") == ref.dataset_fp
        and kv.get("family") == ref.family
        and kv.get("output") == ref.fmt.key
    )
    if not mine:
        tables.forget(url)
        raise CacheError(
            f"{who} was written for teacher {kv.get('teacher_id')!r} / dataset {kv.get('dataset_fp')!r} / views "
            f"{kv.get('family')!r} / format {kv.get('output')!r}, not {ref.teacher_id!r} / "
            f"{ref.dataset_fp!r} / {ref.family!r} / {ref.fmt.key!r}: it was copied "
            "from another cache. Delete it and re-run precompute"
        )
    if kv.get("view") != view or kv.get("part") != part:
        tables.forget(url)
        raise CacheError(
            f"{who} holds view {kv.get('view')} of {kv.get('part')}, not view {view} of {part} (misplaced); "
            "delete it and re-run precompute"
        )
    return table


def corrupt_message(who: str, detail: str) -> str:
    return (
        f"{who} is corrupt ({detail}); delete it and re-run precompute (only that part is recomputed). The data "
        "on storage changed after it was written: check the disk or the object store"
    )


def read_cache_rows(
    part: tables.OpenTable, ref: StoreRef, row_groups: list[int], columns: list[str], retry=None
) -> pa.Table:
    """Row groups of a cache part, checksums verified (`check_aligned` then checks it row for row against the
    image rows)."""
    try:
        return part.read(row_groups, columns, retry)
    except tables.CorruptTable as e:
        tables.forget(part.url)
        raise CacheError(
            corrupt_message(f"cache part {part.url} of teacher {ref.teacher!r}", e.detail)
        ) from None


def check_aligned(table: pa.Table, part_url: str, ref: StoreRef, expected_idx: np.ndarray) -> None:
    """A cache part's rows are the image rows `expected_idx`, in the same order."""
    idx = table["idx"].to_numpy()
    if len(idx) != len(expected_idx) or not np.array_equal(idx, expected_idx):
        row = int(np.argmax(idx[: len(expected_idx)] != expected_idx[: len(idx)])) if len(idx) else 0
        raise CacheError(
            f"cache part {part_url} of teacher {ref.teacher!r} does not match its image part ({len(idx)} vs "
            f"{len(expected_idx)} rows, idx differs at row {row}); delete it and re-run precompute"
        )
