"""The three stages of precompute as Ray Data functions: render (CPU), infer (actor pool), write (CPU).

Imported by Ray task and actor processes: the module itself imports no torch (a render or write task process stays
~100 MB instead of ~400 MB); the teacher actors import it when they start. The driver side is
`pipeline/cache/precompute.py`.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.cache.layout import (
    CACHE_FORMAT,
    CacheError,
    CachePart,
    OutputFormat,
    part_metadata,
    receipt_url,
    stored_table,
    view_dir,
)
from pipeline.data.ingest import open_image_part, read_image_rows
from pipeline.data.views import ViewSpec, render_eval, render_train
from pipeline.store import storage, tables

TEST = -1  # the `view` of a test-split item (evaluation view, no cache part written)


@dataclass(frozen=True)
class PrecomputeSpec:
    """What every stage needs (picklable): data, views, teachers, stores and the output format."""

    dataset_dir: str
    dataset_fp: str
    image_shape: tuple[int, ...] | None
    spec: dict[str, Any]
    fmt: OutputFormat
    teachers: tuple[dict[str, Any], ...]  # TeacherRef.to_dict() per teacher index
    stores: tuple[str, ...]
    group_rows: int
    batch_size: int
    threads: int
    compression: str
    channels_last: str = "auto"  # "auto" (measured on a GPU at start-up) | "on" | "off"


# ------------------------------------------------------------------------------------------------ stage 1
def render_item(batch: dict[str, np.ndarray], ps: PrecomputeSpec) -> dict[str, np.ndarray]:
    """(part, view) → the rendered pixels of every row, decoded once for all the item's teachers."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    part, view, mask = str(batch["part"][0]), int(batch["view"][0]), int(batch["mask"][0])
    spec = ViewSpec.from_dict(ps.spec)
    split = "test" if view == TEST else "train"
    rows = read_image_rows(open_image_part(ps.dataset_dir, split, part), None)
    idx = rows["idx"].to_numpy()
    images = rows["image"].combine_chunks() if ps.image_shape else rows["image"].to_pylist()
    if view == TEST:
        rendered = render_eval(images, spec, ps.image_shape)
    else:
        rendered = render_train(images, idx, view, spec, ps.image_shape)
    # One row per item (its arrays as tensor cells): every stage takes `batch_size=1`, which Ray Data requires of
    # a GPU stage, and an item is never split across batches nor merged with another.
    return {
        "idx": idx[None],
        "label": rows["label"].to_numpy().astype(np.int64)[None],
        "pixels": rendered.pixels[None],
        "part": np.array([part], dtype=object),
        "view": np.array([view], dtype=np.int64),
        "mask": np.array([mask], dtype=np.int64),
        "renders": np.array([len(idx)], dtype=np.int64),  # images decoded and augmented for this item
        # the task's CPU-seconds (all its threads) and seconds: what a render task uses of its CPU request
        "render_use": np.array([[time.process_time() - cpu0, time.perf_counter() - wall0]]),
    }


# ------------------------------------------------------------------------------------------------ stage 2
class TeacherPool:
    """A Ray Data actor holding every teacher of the run (on its GPU when it has one): runs the teachers an item
    needs on its rendered pixels and encodes their outputs there, in the stored form (fp16 or top-k logits, fp16
    or int8 maps: `pipeline/cache/encode.py`), so that what crosses the object store is what is stored.

    On a GPU the work of a batch is queued, never waited for: pixels are copied from pinned memory on a copy-in
    stream while the batch before runs, normalised with constants made once per device, run (channels_last when it
    measured faster at start-up), encoded, and copied back into pinned host buffers on a copy-out stream while the
    next batch runs: the copies overlap compute, one wait per item. Hits are counted and non-finite outputs flagged
    on the device."""

    def __init__(self, ps: PrecomputeSpec, precision: str) -> None:
        import torch

        from pipeline.data import preprocessing
        from pipeline.teachers import checkpoints

        torch.set_num_threads(max(1, ps.threads))
        self.ps = ps
        self.spec = ViewSpec.from_dict(ps.spec)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        refs = [checkpoints.TeacherRef.from_dict(t) for t in ps.teachers]
        self.models = {k: checkpoints.build_model(ref).to(self.device) for k, ref in enumerate(refs)}
        # each teacher's own preprocessing (`teachers[].mean/std/input_size`), else the views' mean/std
        self.normalizers = {
            k: preprocessing.of_teacher(ref, self.spec).normalizer() for k, ref in enumerate(refs)
        }
        # side streams of the copies to (pixels) and from (outputs) the GPU: one per direction, so that neither
        # copy queues behind the other (`infer`)
        cuda = self.device.type == "cuda"
        self.copies_in = torch.cuda.Stream() if cuda else None
        self.copies_out = torch.cuda.Stream() if cuda else None
        self.channels_last = {k: False for k in self.models}
        if self.device.type == "cuda" and ps.channels_last != "off":
            for k in self.models:
                self.channels_last[k] = ps.channels_last == "on" or self._faster_channels_last(k)

    def _faster_channels_last(self, k: int) -> bool:
        """Time the teacher on a batch of zeros in both memory formats (after a warm-up) and keep the faster."""
        import time

        import torch

        c = self.models[k].in_chans
        h, w = self.normalizers[k].size or (
            self.ps.image_shape[:2] if self.ps.image_shape else (self.spec.size, self.spec.size)
        )
        x = torch.zeros(self.ps.batch_size, c, h, w, device=self.device)
        times = {}
        for fmt in (torch.contiguous_format, torch.channels_last):
            model = self.models[k].to(memory_format=fmt)
            xf = x.contiguous(memory_format=fmt)
            with torch.no_grad(), self._autocast():
                for rep in range(4):
                    if rep == 1:
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                    model.forward_head(model.forward_features(xf))
            torch.cuda.synchronize()
            times[fmt] = time.perf_counter() - t0
        faster = times[torch.channels_last] < times[torch.contiguous_format]
        self.models[k] = self.models[k].to(
            memory_format=torch.channels_last if faster else torch.contiguous_format
        )
        return faster

    def _autocast(self):
        import torch

        return torch.autocast(
            self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None
        )

    def infer(self, k: int, pixels: np.ndarray, labels: np.ndarray, features: bool) -> dict[str, Any]:
        """Teacher k over an item's pixels → {column: stored array}, `correct` (hits) and `bad` (non-finite).

        On a GPU the copies of batch i+1 in and of batch i out are queued on two side streams, each before the
        compute it must not wait for: the pixels of batch i+1 are on their way while batch i runs, batch i's
        outputs come back while batch i+1 runs, and a batch's compute waits only for its own pixels."""
        import torch

        from pipeline.cache import encode

        dev = self.device
        fmt, n, b = self.ps.fmt, len(pixels), self.ps.batch_size
        cuda = dev.type == "cuda"
        with warnings.catch_warnings():  # Ray hands read-only arrays; nothing writes to these
            warnings.simplefilter("ignore", UserWarning)
            pixels_t = torch.from_numpy(np.ascontiguousarray(pixels))
            labels_t = torch.from_numpy(labels).to(dev, non_blocking=cuda)
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        bad = torch.zeros((), dtype=torch.bool, device=dev)
        out: dict[str, torch.Tensor] = {}
        main = torch.cuda.current_stream() if cuda else None
        batches = [slice(start, min(start + b, n)) for start in range(0, n, b)]
        incoming = self._to_device(pixels_t[batches[0]]) if batches else None
        for i, sl in enumerate(batches):
            x = self._arrived(incoming, main)
            if i + 1 < len(batches):  # the next batch's copy in, queued ahead of this batch's copy out
                incoming = self._to_device(pixels_t[batches[i + 1]])
            fmap, logits = self._forward(k, x)
            cols = encode.encode_logits(logits, fmt)
            if features:
                cols |= encode.encode_features(fmap, fmt)
            correct += (logits.argmax(1) == labels_t[sl]).sum()
            bad |= encode.not_finite(*cols.values())
            if not out:  # the item's host buffers, pinned on a GPU: each batch lands in its slice
                out = {
                    name: torch.empty((n, *t.shape[1:]), dtype=t.dtype, pin_memory=cuda)
                    for name, t in cols.items()
                }
            self._to_host(cols, out, sl, main)
        flags = torch.stack([correct, bad.to(torch.int64)]).to("cpu", non_blocking=cuda)
        if cuda:
            self.copies_out.synchronize()  # the item's one wait: its outputs and counts are on the host
            main.synchronize()
        correct_n, bad_n = (int(v) for v in flags.tolist())
        return {
            "columns": {name: t.numpy() for name, t in out.items()},
            "correct": correct_n,
            "bad": bool(bad_n),
        }

    def _forward(self, k: int, pixels):
        """Teacher k on a batch of uint8 pixels on its device → (feature map, float32 logits): normalised with the
        teacher's own mean/std (and input_size), else the views', in its memory format and precision."""
        import torch

        model = self.models[k]
        x = self.normalizers[k](pixels)
        if self.channels_last[k]:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), self._autocast():
            fmap = model.forward_features(x)
            logits = model.forward_head(fmap).float()
        return fmap, logits

    def outputs(self, k: int, pixels: np.ndarray, features: bool) -> dict[str, np.ndarray]:
        """Teacher k over `pixels` as `infer` runs it (the same batches of `batch_size`, the same `_forward`), but
        before encoding: `logits` float32 [N,C] and, with `features`, `feat` float32 [N,C',H,W], the values the
        stored ones must match within their format's bound (`pipeline/cache/verify.py`). Waits for the device."""
        import torch

        out: dict[str, list] = {"logits": [], "feat": []}
        for start in range(0, len(pixels), self.ps.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(pixels[start : start + self.ps.batch_size]))
            fmap, logits = self._forward(k, x.to(self.device))
            out["logits"].append(logits.cpu().numpy())
            if features:
                out["feat"].append(fmap.float().cpu().numpy())
        return {name: np.concatenate(v) for name, v in out.items() if v}

    def _to_device(self, pixels):
        """Queue a batch of pixels to the teacher's device: on a GPU, from pinned memory on the copy-in stream,
        with an event the batch's compute waits for (see `_arrived`). On the CPU: the pixels as they are."""
        import torch

        if self.copies_in is None:
            return pixels, None
        with torch.cuda.stream(self.copies_in):
            x = pixels.pin_memory().to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.copies_in)
        return x, done

    def _arrived(self, incoming, main):
        """A batch queued by `_to_device`, for the compute stream: it waits for that copy only (not for copies
        queued after it), and the allocator keeps the batch's memory until the compute that reads it is done."""
        x, done = incoming
        if done is not None:
            main.wait_event(done)
            x.record_stream(main)
        return x

    def _to_host(self, cols: dict, out: dict, sl: slice, main) -> None:
        """A batch's encoded columns into their slice of the item's host buffers (on a GPU: on the copy-out
        stream, after the batch's compute and encoding, while the next batch runs)."""
        import torch

        if main is None:
            for name, t in cols.items():
                out[name][sl] = t
            return
        self.copies_out.wait_stream(main)
        with torch.cuda.stream(self.copies_out):
            for name, t in cols.items():
                t.record_stream(self.copies_out)
                out[name][sl].copy_(t, non_blocking=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One item (one row, see render_item) → the same row with each teacher's stored columns as tensor cells
        (`t{k}__{column}`), its hits (`t{k}_correct`) and the bytes it sends through the object store."""
        part, view, mask = str(batch["part"][0]), int(batch["view"][0]), int(batch["mask"][0])
        pixels = batch.pop("pixels")[0]
        labels = batch.pop("label")[0]  # hits are counted here: the writers need no labels
        features = view != TEST and self.ps.fmt.features != "none"
        out = dict(batch)
        for k, teacher in enumerate(self.ps.teachers):
            if not mask >> k & 1:
                continue
            result = self.infer(k, pixels, labels, features)
            if result["bad"]:
                raise CacheError(
                    f"teacher {teacher['name']!r} produced non-finite outputs on {part}, view {view} (inf or NaN "
                    "as stored; float16 overflows beyond 65504); check the teacher's checkpoint and inputs"
                )
            out[f"t{k}_correct"] = np.array([result["correct"]], dtype=np.int64)
            if view != TEST:  # a test item only counts hits: nothing of it is stored or sent
                for name, values in result["columns"].items():
                    out[f"t{k}__{name}"] = values[None]
        # Everything this row carries through the object store to its writer (the stored columns, the rows' idx,
        # the item's keys and counts), so that the benchmark compares it with the bytes stored.
        out["payload_bytes"] = np.array([0], dtype=np.int64)
        out["payload_bytes"][0] = sum(np.asarray(v).nbytes for v in out.values())
        return out


# ------------------------------------------------------------------------------------------------ stage 3
RECORD_KEYS = (
    "teacher",
    "part",
    "view",
    "rows",
    "bytes",
    "digest",
    "correct",
    "renders",
    "payload_bytes",
    "render_cpu",
    "render_seconds",
    "write_cpu",
    "write_seconds",
)


def write_item(batch: dict[str, np.ndarray], ps: PrecomputeSpec) -> dict[str, np.ndarray]:
    """Each teacher's stored columns of one item → its cache part (then its receipt); one record row per
    teacher. The columns arrive encoded (the actor did it on its device): this writes Parquet, checksums and the
    receipt."""
    part, view, mask = str(batch["part"][0]), int(batch["view"][0]), int(batch["mask"][0])
    idx = batch["idx"][0]
    out: dict[str, list] = {key: [] for key in RECORD_KEYS}
    cpu0, wall0 = time.process_time(), time.perf_counter()
    renders = int(batch["renders"][0])
    payload = int(batch["payload_bytes"][0])
    render_cpu, render_seconds = (float(v) for v in batch["render_use"][0])
    for k in range(len(ps.teachers)):
        if not mask >> k & 1:
            continue
        correct = int(batch[f"t{k}_correct"][0])
        size, digest = 0, ""
        if view != TEST:
            prefix = f"t{k}__"
            columns = {key[len(prefix) :]: v[0] for key, v in batch.items() if key.startswith(prefix)}
            receipt = write_part(ps, k, part, view, idx, columns, correct)
            size, digest = receipt.bytes, receipt.digest
        values = (
            k,
            part,
            view,
            len(idx),
            size,
            digest,
            correct,
            renders,
            payload,
            render_cpu,
            render_seconds,
        )
        for key, value in zip(RECORD_KEYS, values):
            out[key].append(value)
        # count an item's renders, bytes and render time once, whatever the number of its teachers
        renders = payload = render_cpu = render_seconds = 0
    # the write task's use of its CPU request, on the item's first record
    out["write_cpu"] = [time.process_time() - cpu0] + [0.0] * (len(out["teacher"]) - 1)
    out["write_seconds"] = [time.perf_counter() - wall0] + [0.0] * (len(out["teacher"]) - 1)
    return {key: np.asarray(v) for key, v in out.items()}


def write_part(
    ps: PrecomputeSpec,
    k: int,
    part: str,
    view: int,
    idx: np.ndarray,
    columns: dict[str, np.ndarray],
    correct: int,
) -> CachePart:
    """Teacher k's stored columns of one (part, view) → its Parquet part (checksummed row groups, self-identifying
    metadata), then its receipt; the receipt's record."""
    teacher_id = ps.teachers[k]["id"]
    spec = ViewSpec.from_dict(ps.spec)
    table = stored_table(idx, columns, ps.fmt)
    meta = part_metadata(teacher_id, ps.dataset_fp, spec, ps.fmt, view, part, len(idx))
    encoded = tables.encode_table(table, ps.group_rows, meta, ps.compression)
    url = storage.join(view_dir(ps.stores[k], view), part)
    tables.write_table(url, encoded)
    receipt = CachePart(name=part, rows=len(idx), bytes=encoded.size, digest=encoded.digest, correct=correct)
    storage.write_json(receipt_url(url), receipt.model_dump() | _identity(teacher_id, ps, spec, view))
    return receipt


def _identity(teacher_id: str, ps: PrecomputeSpec, spec: ViewSpec, view: int) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "teacher_id": teacher_id,
        "dataset_fp": ps.dataset_fp,
        "family": spec.family,
        "output": ps.fmt.key,
        "view": view,
    }
