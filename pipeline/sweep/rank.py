"""Rank teacher subsets from the cache alone, in seconds, before any sweep trains a student.

The numbers are pure functions of teacher logits [T, N, C] and labels [N] (NumPy; the CA-MKD weights are
`camkd.losses.confidence_weights` itself). The reading takes the validation hold-out rows of one cached view from
the store a trial would read. Nothing here starts Ray, ingests, runs a teacher or trains anything; which subsets
to rank is the caller's (`pipeline/sweep/tune.py` enumerates a sweep's, `all_subsets` every non-empty one).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.cache.layout import (
    CacheError,
    StoreRef,
    check_aligned,
    check_manifest_dataset,
    decode_outputs,
    find_store,
    open_cache_part,
    output_format,
    read_cache_rows,
    topk_decode,
    view_dir,
)
from pipeline.data import preprocessing
from pipeline.data.ingest import DatasetMeta, find_dataset, open_image_part, read_image_rows
from pipeline.data.views import ViewSpec, make_view_spec
from pipeline.store import storage
from pipeline.teachers import checkpoints
from pipeline.train.reader import row_group_slices, split_ranges

RANK_JSON = "rank.json"
RANK_MD = "rank.md"
VIEW = 0  # the cache holds training views only; view 0 is the one every run's first epoch reads
UPPER_BOUND = "upper bound: its weights see the labels"


# --------------------------------------------------------------------------------------------- the math
def _check(teacher_logits: np.ndarray, labels: np.ndarray) -> None:
    if teacher_logits.ndim != 3 or labels.ndim != 1 or teacher_logits.shape[1] != labels.shape[0]:
        raise ValueError(
            f"expected teacher_logits [T,N,C] and labels [N] with the same N, got {list(teacher_logits.shape)} "
            f"and {list(labels.shape)}"
        )
    if teacher_logits.shape[0] == 0 or labels.shape[0] == 0:
        raise ValueError(
            f"need at least one teacher and one row, got teacher_logits {list(teacher_logits.shape)}"
        )


def teacher_top1(teacher_logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Top-1 of each teacher alone. [T,N,C], [N] → [T]."""
    _check(teacher_logits, labels)
    return (teacher_logits.argmax(-1) == labels[None]).mean(1)


def ensemble_top1(teacher_logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 of the teachers' averaged logits."""
    _check(teacher_logits, labels)
    return float((teacher_logits.astype(np.float32).mean(0).argmax(-1) == labels).mean())


def oracle_top1(teacher_logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows that at least one teacher gets right."""
    _check(teacher_logits, labels)
    return float((teacher_logits.argmax(-1) == labels[None]).any(0).mean())


def mean_disagreement(teacher_logits: np.ndarray) -> float:
    """Fraction of rows where two teachers' argmax differ, averaged over all pairs; 0 for one teacher."""
    top = teacher_logits.argmax(-1)
    pairs = list(itertools.combinations(range(top.shape[0]), 2))
    if not pairs:
        return 0.0
    return float(np.mean([(top[i] != top[j]).mean() for i, j in pairs]))


def camkd_weights(teacher_logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """CA-MKD's per-row teacher weights [T,N]: `camkd.losses.confidence_weights`, the function training uses.
    One teacher gets weight 1 on every row (the weights of a row sum to 1; CA-MKD itself needs two)."""
    _check(teacher_logits, labels)
    if teacher_logits.shape[0] == 1:
        return np.ones(teacher_logits.shape[:2], dtype=np.float32)
    import torch

    from camkd.losses import confidence_weights

    logits = torch.from_numpy(np.ascontiguousarray(teacher_logits, dtype=np.float32))
    return confidence_weights(logits, torch.from_numpy(labels.astype(np.int64))).numpy()


def weighted_top1(teacher_logits: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    """Top-1 of Σ_t w[t,n]·logits[t,n]: the ensemble with per-row weights (CA-MKD's: an upper bound)."""
    _check(teacher_logits, labels)
    if weights.shape != teacher_logits.shape[:2]:
        raise ValueError(
            f"weights must be [T,N] = {list(teacher_logits.shape[:2])}, got {list(weights.shape)}"
        )
    mixed = (weights[..., None].astype(np.float32) * teacher_logits.astype(np.float32)).sum(0)
    return float((mixed.argmax(-1) == labels).mean())


def score_subset(teacher_logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Every number of one subset's row in the ranking (its teachers in the order of `teacher_logits`)."""
    w = camkd_weights(teacher_logits, labels)
    return {
        "ensemble_top1": ensemble_top1(teacher_logits, labels),
        "oracle_top1": oracle_top1(teacher_logits, labels),
        "disagreement": mean_disagreement(teacher_logits),
        "camkd_mean_weight": [float(x) for x in w.mean(1)],
        "camkd_weighted_top1_upper_bound": weighted_top1(teacher_logits, labels, w),
    }


def rank_key(row: dict[str, Any]) -> tuple[float, float, int]:
    """Best first: ensemble top-1, then oracle top-1, then fewer teachers."""
    return (-row["ensemble_top1"], -row["oracle_top1"], len(row["teachers"]))


def rank_subsets(
    logits_by_teacher: dict[str, np.ndarray], labels: np.ndarray, subsets: Sequence[Sequence[str]]
) -> list[dict[str, Any]]:
    """One scored row per subset ([N,C] logits per teacher name), best first (`rank_key`; stable otherwise)."""
    rows = []
    for subset in subsets:
        missing = [n for n in subset if n not in logits_by_teacher]
        if missing:
            raise ValueError(
                f"subset {list(subset)}: no logits for {missing} (have {sorted(logits_by_teacher)})"
            )
        stacked = np.stack([logits_by_teacher[n] for n in subset])
        rows.append({"teachers": list(subset), **score_subset(stacked, labels)})
    rows.sort(key=rank_key)
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    return rows


def keep_best(rows: list[dict[str, Any]], n: int) -> tuple[list[list[str]], list[list[str]]]:
    """(the n best subsets, the rest) of a ranking already sorted best first."""
    if n < 1:
        raise ValueError(f"keep at least one subset, got n={n}")
    return [r["teachers"] for r in rows[:n]], [r["teachers"] for r in rows[n:]]


MAX_ALL_SUBSETS_TEACHERS = 12  # 4095 subsets: still seconds of NumPy on a hold-out of a few thousand rows


def all_subsets(names: Sequence[str]) -> list[list[str]]:
    """Every non-empty subset of `names`, smallest first, each in the configured order."""
    if len(names) > MAX_ALL_SUBSETS_TEACHERS:
        raise CacheError(
            f"{len(names)} teachers make {2 ** len(names) - 1} subsets; rank fewer: set tune.teacher_set_sizes "
            "(e.g. [2, 3]) or tune.teacher_sets"
        )
    return [list(c) for size in range(1, len(names) + 1) for c in itertools.combinations(names, size)]


# --------------------------------------------------------------------------------------------- the reading
@dataclass
class ValidationLogits:
    """The cached logits of the validation hold-out: one view, every teacher asked for, row for row."""

    logits: dict[str, np.ndarray]  # teacher name → float32 [N, C]
    labels: np.ndarray  # int64 [N]
    idx_lo: int
    idx_hi: int
    view: int
    views_cached: int
    augmented: bool
    stores: dict[str, str]

    @property
    def rows(self) -> int:
        return int(self.labels.shape[0])

    def describe(self, val_fraction: float) -> str:
        view = f"view {self.view} of the {self.views_cached} cached view(s): " + (
            "the cache holds augmented training views only (no un-augmented outputs), so these are the "
            "teachers' outputs on augmented pixels"
            if self.augmented
            else "un-augmented (views.pad 0, no flip)"
        )
        return (
            f"{self.rows} rows: the validation hold-out of the training split, idx [{self.idx_lo}, {self.idx_hi}) "
            f"(data.val_fraction {val_fraction:g}); {view}"
        )


def _store_of(cfg, meta: DatasetMeta, ref, tdir: str, spec: ViewSpec) -> tuple[str, StoreRef, int]:
    """(store, its reading facts, views it holds) of the teacher's store trials would read (the config's format),
    else of the same views in the other feature setting: the logits are the same either way."""
    fmts = dict.fromkeys([output_format(cfg, meta), output_format(cfg, meta, needs_features=True)])
    errors: list[CacheError] = []
    for fmt in fmts:
        try:
            store, manifest = find_store(tdir, ref.to_dict(), spec, fmt, [VIEW])
        except CacheError as e:
            errors.append(e)
            continue
        check_manifest_dataset(manifest, store, meta)
        return store, StoreRef.of(manifest), len(manifest.views)
    raise errors[0]


def require_cached_dataset(cfg) -> DatasetMeta:
    """The ingested dataset (ranking never ingests: without one there is no cache to rank from)."""
    meta = find_dataset(cfg)
    if meta is None:
        raise CacheError(
            f"dataset {cfg.data.dataset_name} is not ingested under {cfg.root}, so there is no cache to rank "
            "from: run the `ingest`, `teachers` and `precompute` stages with this config first (`python "
            "pipeline/run.py precompute --config ...` after the other two), or pass the --config/--set root=... "
            "they used"
        )
    return meta


def _dense_logits(decoded: dict[str, np.ndarray], ref: StoreRef) -> np.ndarray:
    if "logits" in decoded:
        return decoded["logits"].astype(np.float32)
    return topk_decode(decoded["topk_values"], decoded["topk_index"], decoded["tail_logit"], ref.num_classes)


def read_validation_logits(cfg, meta: DatasetMeta, names: Sequence[str]) -> ValidationLogits:
    """The validation rows' labels and each named teacher's cached logits (view 0), checksums and idx checked."""
    ranges = split_ranges(meta, cfg.data.val_fraction, cfg.train.limit_train)
    if ranges.val_on_test:
        raise CacheError(
            "data.val_fraction is 0, so validation is the test split, and the cache holds teacher outputs for the "
            "training split only: ranking needs a hold-out of the training split. Set data.val_fraction > 0 "
            "(e.g. --set data.val_fraction=0.1); the cache already covers those rows, nothing is recomputed"
        )
    spec = make_view_spec(cfg, meta.encoding)
    by_name = {t.name: t for t in cfg.teachers}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise CacheError(
            f"teachers {unknown} are not configured (teachers: {list(by_name)}); fix the subsets"
        )
    dataset_dir = storage.dataset_dir(cfg.root, meta.name, meta.fingerprint)
    sources, views_cached = {}, []
    for name in names:
        ref = checkpoints.resolve(
            cfg, by_name[name], meta.num_classes, meta.channels, data_hw=preprocessing.data_hw(cfg, meta)
        )
        tdir = storage.teacher_dir(cfg.root, meta.fingerprint, ref.id)
        store, sref, n_views = _store_of(cfg, meta, ref, tdir, spec)
        sources[name] = (store, sref)
        views_cached.append(n_views)
    g = meta.row_group_rows
    by_part: dict[str, list] = {}
    for s in row_group_slices(meta, "train", ranges.val_lo, ranges.val_hi):
        by_part.setdefault(s.part, []).append(s)
    labels, logits = [], {n: [] for n in names}
    for part, slices in by_part.items():
        groups = sorted({rg for s in slices for rg in s.row_groups(g)})
        image = read_image_rows(open_image_part(dataset_dir, "train", part), groups, ["idx", "label"])
        idx = image["idx"].to_numpy()
        keep = (idx >= ranges.val_lo) & (idx < ranges.val_hi)
        labels.append(image["label"].to_numpy().astype(np.int64)[keep])
        for name, (store, sref) in sources.items():
            url = storage.join(view_dir(store, VIEW), part)
            table = read_cache_rows(
                open_cache_part(url, sref, VIEW, part), sref, groups, sref.fmt.columns(True, False)
            )
            check_aligned(table, url, sref, idx)
            logits[name].append(_dense_logits(decode_outputs(table, sref, True, False), sref)[keep])
    return ValidationLogits(
        logits={n: np.concatenate(v) for n, v in logits.items()},
        labels=np.concatenate(labels),
        idx_lo=ranges.val_lo,
        idx_hi=ranges.val_hi,
        view=VIEW,
        views_cached=min(views_cached),
        augmented=not (spec.kind == "crop_flip" and spec.pad == 0 and not spec.flip),
        stores={n: s for n, (s, _) in sources.items()},
    )


# --------------------------------------------------------------------------------------------- the output
def markdown(rows: list[dict[str, Any]], rows_note: str, teacher_top1s: dict[str, float]) -> str:
    lines = [
        "# Teacher subsets ranked from the cache (no student trained)",
        "",
        f"Rows: {rows_note}.",
        "",
        "Teachers alone: " + ", ".join(f"{n} {v:.4f}" for n, v in teacher_top1s.items()) + ".",
        "",
        "| rank | teachers | ensemble top-1 | oracle top-1 | disagreement | CA-MKD-weighted top-1 "
        f"({UPPER_BOUND}) | mean CA-MKD weight per teacher |",
        "| ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        weights = " / ".join(f"{n} {w:.3f}" for n, w in zip(r["teachers"], r["camkd_mean_weight"]))
        lines.append(
            f"| {r['rank']} | {' + '.join(r['teachers'])} | {r['ensemble_top1']:.4f} | {r['oracle_top1']:.4f} | "
            f"{r['disagreement']:.4f} | {r['camkd_weighted_top1_upper_bound']:.4f} | {weights} |"
        )
    lines += [
        "",
        "Sorted by ensemble top-1 (the averaged logits), then oracle top-1 (any teacher right), then fewer teachers. "
        "Disagreement: the fraction of rows where two teachers' top-1 differ, averaged over pairs. The CA-MKD "
        "weights are camkd.losses.confidence_weights (1 for a lone teacher), mean over the rows. The "
        "CA-MKD-weighted ensemble (Σ weight × logits per row) is an upper bound, not a prediction: its weights "
        "are computed from each teacher's cross-entropy against the true label.",
    ]
    return "\n".join(lines) + "\n"


def rank_stage(
    cfg, meta: DatasetMeta, subsets: Sequence[Sequence[str]], out: str, log=print
) -> dict[str, Any]:
    """Rank `subsets` from the cache, print the table, write `<out>/rank.json` and `<out>/rank.md`."""
    started = time.time()
    if not subsets:
        raise CacheError(
            "nothing to rank: no teacher subsets (set tune.teacher_set_sizes or tune.teacher_sets, and teachers)"
        )
    names = list(dict.fromkeys(n for s in subsets for n in s))
    val = read_validation_logits(cfg, meta, names)
    rows = rank_subsets(val.logits, val.labels, subsets)
    alone = np.stack([val.logits[n] for n in names])
    top1s = {n: float(v) for n, v in zip(names, teacher_top1(alone, val.labels))}
    note = val.describe(cfg.data.val_fraction)
    result = {
        "rows": val.rows,
        "split": "train",
        "idx": [val.idx_lo, val.idx_hi],
        "view": val.view,
        "views_cached": val.views_cached,
        "augmented": val.augmented,
        "rows_note": note,
        "order": "ensemble_top1 desc, oracle_top1 desc, fewer teachers",
        "camkd_weighted_top1_upper_bound": UPPER_BOUND,
        "teacher_top1": top1s,
        "stores": val.stores,
        "subsets": rows,
        "seconds": round(time.time() - started, 2),
    }
    storage.makedirs(out)
    storage.write_json(storage.join(out, RANK_JSON), result)
    table = markdown(rows, note, top1s)
    storage.write_bytes_atomic(storage.join(out, RANK_MD), table.encode())
    log(table.rstrip())
    log(
        f"[rank] {len(rows)} subset(s) ranked from the cache in {result['seconds']:.1f} s; wrote "
        f"{storage.join(out, RANK_JSON)} and {storage.join(out, RANK_MD)}"
    )
    return result


def rank_dir(cfg) -> str:
    """Where the `rank` stage writes: <root>/runs/<experiment>/rank (a sweep writes its own into its folder)."""
    return storage.join(storage.runs_dir(cfg.root, cfg.experiment), "rank")


def run_stage(cfg, subsets: Sequence[Sequence[str]], log=print) -> dict[str, Any]:
    """The `rank` stage: rank `subsets` from the cache into `rank_dir(cfg)`; never ingests, starts Ray or trains."""
    return rank_stage(cfg, require_cached_dataset(cfg), subsets, rank_dir(cfg), log=log)
