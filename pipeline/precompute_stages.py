"""The three stages of precompute as Ray Data functions: render (CPU), infer (actor pool), write (CPU).

Imported by Ray task and actor processes: the module itself imports no torch (a render or write task process stays
~100 MB instead of ~400 MB); the teacher actors import it when they start. The driver side is
`pipeline/precompute.py`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import storage, tables
from pipeline.cache import (
    CACHE_FORMAT,
    CacheError,
    CachePart,
    OutputFormat,
    encode_outputs,
    part_metadata,
    receipt_url,
    view_dir,
)
from pipeline.ingest import open_image_part, read_image_rows
from pipeline.views import ViewSpec, render_eval, render_train

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


# ------------------------------------------------------------------------------------------------ stage 1
def render_item(batch: dict[str, np.ndarray], ps: PrecomputeSpec) -> dict[str, np.ndarray]:
    """(part, view) → the rendered pixels of every row, decoded once for all the item's teachers."""
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
    }


# ------------------------------------------------------------------------------------------------ stage 2
class TeacherPool:
    """A Ray Data actor holding every teacher of the run (on its GPU when it has one): runs the teachers an item
    needs on its rendered pixels. Logits come back as float32, feature maps as float16."""

    def __init__(self, ps: PrecomputeSpec, precision: str) -> None:
        import torch

        from pipeline import teachers

        torch.set_num_threads(max(1, ps.threads))
        self.ps = ps
        self.spec = ViewSpec.from_dict(ps.spec)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.models = {
            k: teachers.build_model(teachers.TeacherRef.from_dict(t)).to(self.device)
            for k, t in enumerate(ps.teachers)
        }

    def infer(self, k: int, pixels: np.ndarray, features: bool) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        from camkd.training import normalize

        logits, feats = [], []
        model = self.models[k]
        for start in range(0, len(pixels), self.ps.batch_size):
            with warnings.catch_warnings():  # Ray hands read-only arrays; nothing writes to this one
                warnings.simplefilter("ignore", UserWarning)
                x = torch.from_numpy(pixels[start : start + self.ps.batch_size])
            x = x.to(self.device, non_blocking=True)
            x = normalize(x, self.spec.mean, self.spec.std)
            with (
                torch.no_grad(),
                torch.autocast(
                    self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None
                ),
            ):
                fmap = model.forward_features(x)
                out = model.forward_head(fmap)
            logits.append(out.float().cpu().numpy())
            if features:
                feats.append(fmap.to(torch.float16).cpu().numpy())
        return np.concatenate(logits), (np.concatenate(feats) if features else None)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One item (one row, see render_item) → the same row with each teacher's outputs as tensor cells."""
        view, mask = int(batch["view"][0]), int(batch["mask"][0])
        pixels = batch.pop("pixels")[0]
        features = view != TEST and self.ps.fmt.features != "none"
        out = dict(batch)
        for k in range(len(self.ps.teachers)):
            if mask >> k & 1:
                logits, feats = self.infer(k, pixels, features)
                out[f"t{k}_logits"] = logits[None]
                if feats is not None:
                    out[f"t{k}_feat"] = feats[None]
        return out


# ------------------------------------------------------------------------------------------------ stage 3
RECORD_KEYS = ("teacher", "part", "view", "rows", "bytes", "digest", "correct", "renders")


def write_item(batch: dict[str, np.ndarray], ps: PrecomputeSpec) -> dict[str, np.ndarray]:
    """Each teacher's outputs of one item → its cache part (then its receipt); one record row per teacher."""
    part, view, mask = str(batch["part"][0]), int(batch["view"][0]), int(batch["mask"][0])
    idx, labels = batch["idx"][0], batch["label"][0]
    spec = ViewSpec.from_dict(ps.spec)
    out: dict[str, list] = {key: [] for key in RECORD_KEYS}
    renders = int(batch["renders"][0])
    for k, teacher in enumerate(ps.teachers):
        if not mask >> k & 1:
            continue
        logits = batch[f"t{k}_logits"][0]
        if not np.isfinite(logits).all():
            raise CacheError(f"teacher {teacher['name']!r} produced non-finite logits on {part}, view {view}")
        correct = int((logits.argmax(1) == labels).sum())
        size, digest = 0, ""
        if view != TEST:
            feats = batch[f"t{k}_feat"][0] if f"t{k}_feat" in batch else None
            try:
                table = encode_outputs(idx, logits, feats, ps.fmt)
            except ValueError as e:
                raise CacheError(f"teacher {teacher['name']!r} on {part}, view {view}: {e}") from None
            meta = part_metadata(teacher["id"], ps.dataset_fp, spec, ps.fmt, view, part, len(idx))
            encoded = tables.encode_table(table, ps.group_rows, meta, ps.compression)
            url = storage.join(view_dir(ps.stores[k], view), part)
            tables.write_table(url, encoded)
            receipt = CachePart(
                name=part, rows=len(idx), bytes=encoded.size, digest=encoded.digest, correct=correct
            )
            storage.write_json(
                receipt_url(url), receipt.model_dump() | _identity(teacher["id"], ps, spec, view)
            )
            size, digest = encoded.size, encoded.digest
        for key, value in zip(RECORD_KEYS, (k, part, view, len(idx), size, digest, correct, renders)):
            out[key].append(value)
        renders = 0  # count an item's renders once, whatever the number of its teachers
    return {key: np.asarray(v) for key, v in out.items()}


def _identity(teacher_id: str, ps: PrecomputeSpec, spec: ViewSpec, view: int) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "teacher_id": teacher_id,
        "dataset_fp": ps.dataset_fp,
        "family": spec.family,
        "output": ps.fmt.key,
        "view": view,
    }
