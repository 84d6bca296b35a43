"""`precompute --verify`: the cache checked against its teachers, not only against its checksums.

A seeded sample of (image, view) pairs per teacher is rendered again here by `pipeline.data.views` (what training
renders), run through the teachers by precompute's own actor code (`TeacherPool`: each teacher's preprocessing,
precision and device, in a Ray task with the pool's resources), and compared with the stored values within each
format's error bound (`pipeline/cache/layout.py`), and top-1 for top-1. A mismatch raises `CacheMismatch` naming the
teacher, part, view and rows, what differs and the fix. Reads the cache and writes only `verify.json` beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.cache.layout import (
    FP16_REL_ERROR,
    CacheError,
    Manifest,
    StoreRef,
    check_aligned,
    check_manifest_dataset,
    check_parts_present,
    check_rendering,
    decode_outputs,
    find_store,
    open_cache_part,
    output_format,
    read_cache_rows,
    view_dir,
)
from pipeline.config import Config
from pipeline.data import views
from pipeline.data.ingest import find_dataset, open_image_part, read_image_rows
from pipeline.data.preprocessing import data_hw
from pipeline.data.render_probe import render_digest
from pipeline.store import storage
from pipeline.teachers import checkpoints

DEFAULT_SAMPLES = 256  # (image, view) pairs per teacher
FP16_TINY = 2.0**-24  # float16's smallest step (subnormals): the rounding bound of values near zero
# How far two runs of one teacher on one input may differ besides the stored format's rounding (other batch
# compositions pick other kernels and summation orders), relative to the largest |value| of the sample's row:
# fp32 on a CPU; fp32 on a GPU, where cuDNN convolutions run in TF32 (10-bit mantissa); autocast bf16 (8-bit)
# and fp16 (11-bit) on either.
COMPUTE_ALLOWANCE = {"cpu-fp32": 2.0**-14, "cuda-fp32": 2.0**-8, "bf16": 2.0**-5, "fp16": 2.0**-7}
SHOWN_ROWS = 12  # rows named per (part, view) in a message


class CacheMismatch(CacheError):
    """Stored values that the teacher does not give on the view training renders (or a changed rendering)."""


@dataclass
class Target:
    """One teacher's store to verify and its sample: (part, view) → sorted row positions within the part."""

    k: int
    ref: checkpoints.TeacherRef
    store: str
    manifest: Manifest
    sample: dict[tuple[str, int], np.ndarray]
    rendering: str = "matches"  # "matches" | "changed" | "unknown"
    problems: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


def allowance(device: str, precision: str) -> float:
    """COMPUTE_ALLOWANCE of a teacher run on `device` ("cpu", "cuda") in `precision` ("fp32", "bf16", "fp16")."""
    return COMPUTE_ALLOWANCE[f"{device}-{precision}" if precision == "fp32" else precision]


# ------------------------------------------------------------------------------------------------ sampling
def sample_rows(manifest: Manifest, n: int, seed: int) -> dict[tuple[str, int], np.ndarray]:
    """n (image, view) pairs drawn without replacement from every stored view's rows (all of them when the store
    holds fewer), seeded: (part, view) → sorted positions of the rows within the part."""
    parts = manifest.views[0].parts
    starts = np.cumsum([0] + [p.rows for p in parts])
    numbers = manifest.view_numbers
    total = int(starts[-1]) * len(numbers)
    flat = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    view_i, row = np.divmod(flat, starts[-1])
    part_i = np.searchsorted(starts, row, side="right") - 1
    out: dict[tuple[str, int], np.ndarray] = {}
    for v, p in sorted(set(zip(view_i.tolist(), part_i.tolist()))):
        mine = (view_i == v) & (part_i == p)
        out[(parts[p].name, numbers[v])] = np.sort(row[mine] - starts[p])
    return out


def _targets(cfg: Config, meta, n: int, seed: int, probe: str, log) -> list[Target]:
    """Every configured teacher's store, checked (present, this dataset, every part there) and sampled; the
    rendering each was made by, compared with the probe rendered now."""
    spec = views.make_view_spec(cfg, meta.encoding)
    fmt = output_format(cfg, meta)
    refs = checkpoints.resolve_all(cfg, meta.num_classes, meta.channels, data_hw=data_hw(cfg, meta))
    if not refs:
        raise CacheError("no teachers are configured; add a `teachers:` list to the config")
    targets = []
    for k, ref in enumerate(refs):
        tdir = storage.teacher_dir(cfg.root, meta.fingerprint, ref.id)
        store, manifest = find_store(tdir, ref.to_dict(), spec, fmt, [])
        check_manifest_dataset(manifest, store, meta)
        check_parts_present(manifest, store, manifest.view_numbers)
        target = Target(k, ref, store, manifest, sample_rows(manifest, n, seed))
        if manifest.render_probe is None:
            target.rendering = "unknown"
            log(
                f"[verify] note: the manifest of {ref.name!r} at {store} records no rendering probe or package "
                "version (written by an older camkd-ray): whether the view rendering changed since is unknown; "
                "the sample below is the check"
            )
        else:
            try:
                check_rendering(manifest, store, probe)
            except CacheError as e:
                target.rendering = "changed"
                target.problems.append(str(e))
        targets.append(target)
    return targets


# ------------------------------------------------------------------------------------------------ reading
def _take(opened, positions: np.ndarray, read):
    """Rows `positions` of an opened part: only their row groups are read (`read(groups)`), then taken."""
    size = opened.row_group_rows
    groups = np.unique(positions // size)
    table = read(groups.tolist())
    local = np.searchsorted(groups, positions // size) * size + positions % size
    return table.take(local)


def _render(dataset_dir: str, spec: views.ViewSpec, image_shape, wanted: dict) -> dict:
    """(part, view) → (idx, uint8 pixels [N,C,H,W]) of the wanted rows, rendered by `views.render_train`: each
    image part's row groups read once for all its views and teachers."""
    by_part: dict[str, set[int]] = {}
    for (part, _view), positions in wanted.items():
        by_part.setdefault(part, set()).update(positions.tolist())
    rendered = {}
    for part, rows in by_part.items():
        every = np.array(sorted(rows), dtype=np.int64)
        opened = open_image_part(dataset_dir, "train", part)
        table = _take(opened, every, lambda groups, o=opened: read_image_rows(o, groups))
        for (p, view), positions in wanted.items():
            if p != part:
                continue
            sub = table.take(np.searchsorted(every, positions))
            idx = sub["idx"].to_numpy()
            images = sub["image"].combine_chunks() if image_shape else sub["image"].to_pylist()
            rendered[(part, view)] = (idx, views.render_train(images, idx, view, spec, image_shape).pixels)
    return rendered


def _stored(target: Target, part: str, view: int, positions: np.ndarray, idx: np.ndarray) -> dict:
    """The stored columns of the sampled rows of one (part, view), checksums verified, aligned with `idx`."""
    ref = StoreRef.of(target.manifest)
    url = storage.join(view_dir(target.store, view), part)
    opened = open_cache_part(url, ref, view, part)
    columns = ref.fmt.columns(True, target.manifest.has_features)
    table = _take(opened, positions, lambda groups: read_cache_rows(opened, ref, groups, columns))
    check_aligned(table, url, ref, idx)
    return decode_outputs(table, ref, True, target.manifest.has_features)


# ------------------------------------------------------------------------------------------------ teachers
def _teacher_outputs(ps, precision: str, work: list[tuple[int, np.ndarray]], features: bool):
    """Runs where precompute's actors run: (device type, each (teacher k, pixels)'s float outputs)."""
    from pipeline.cache.stages import TeacherPool

    pool = TeacherPool(ps, precision)
    return pool.device.type, [pool.outputs(k, pixels, features) for k, pixels in work]


def _run_teachers(cfg: Config, meta, targets: list[Target], rendered: dict):
    """Each teacher over its sample's pixels in one Ray task with the resources of one teacher-pool replica (a
    GPU when precompute's pool would use one): (device type, per target its float outputs in sample order)."""
    import ray

    from pipeline.cache import precompute

    spec = views.make_view_spec(cfg, meta.encoding)
    fmt = output_format(cfg, meta)
    refs = [t.ref for t in targets]
    ps = precompute.precompute_spec(cfg, meta, spec, fmt, refs, [t.store for t in targets])
    alive = sum(1 for n in ray.nodes() if n["Alive"])
    pool = precompute.pool_plan(cfg, 1, ray.cluster_resources(), precompute.autoscaling_maximum(), alive)
    work = [
        (t.k, np.concatenate([_rows(rendered[item], pos)[1] for item, pos in t.sample.items()]))
        for t in targets
    ]
    task = ray.remote(num_cpus=cfg.cache.cpus_per_actor, num_gpus=1 if pool.use_gpu else 0)(_teacher_outputs)
    return ray.get(task.remote(ps, cfg.cache.precision, work, fmt.features != "none"))


# ------------------------------------------------------------------------------------------------ comparing
@dataclass
class Checked:
    """Per sampled row: each check's largest error as a multiple of its bound (above 1 fails) and in its own
    units, and whether the stored top-1 is not the teacher's (beyond a tie within the bounds)."""

    ratio: dict[str, np.ndarray]
    error: dict[str, np.ndarray]
    top1: np.ndarray

    def failing(self) -> np.ndarray:
        return np.logical_or.reduce([r > 1 for r in self.ratio.values()] + [self.top1])


def _rounding(x: np.ndarray, slack: np.ndarray) -> np.ndarray:
    """The bound of float16 rounding of `x`, plus the compute's run-to-run `slack`."""
    return FP16_REL_ERROR * np.abs(x) + FP16_TINY + slack


def _top1_differs(z: np.ndarray, stored_top1: np.ndarray, slack: np.ndarray) -> np.ndarray:
    """The teacher's top-1 is another class than the stored one, by more than a tie within the bounds."""
    rows = np.arange(len(z))
    best = z.argmax(1)
    margin = z[rows, best] - z[rows, stored_top1]
    return (best != stored_top1) & (margin > 2 * _rounding(z[rows, best], slack[:, 0]))


def _fp16_logits(stored: dict, z: np.ndarray, slack: np.ndarray) -> Checked:
    s = stored["logits"].astype(np.float32)
    err = np.abs(s - z)
    ratio = (err / _rounding(z, slack)).max(1)
    return Checked({"logits": ratio}, {"logits": err.max(1)}, _top1_differs(z, s.argmax(1), slack))


def _topk_logits(stored: dict, z: np.ndarray, slack: np.ndarray) -> Checked:
    """Top-k: the stored values are the teacher's at the stored indices; no other class beats the smallest of
    them (the same index set, up to ties); the tail mass the fill logit encodes is the teacher's."""
    rows = np.arange(len(z))
    index = stored["topk_index"].astype(np.int64)
    values = stored["topk_values"].astype(np.float32)
    zk = np.take_along_axis(z, index, 1)
    value_err = np.abs(values - zk)
    outside = z.astype(np.float64)
    np.put_along_axis(outside, index, -np.inf, 1)
    smallest = zk.min(1)
    index_err = np.maximum(outside.max(1) - smallest, 0.0)
    m = z.max(1, keepdims=True).astype(np.float64)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(1))
    tail_true = np.exp(outside - lse[:, None]).sum(1)
    tail_stored = (z.shape[1] - index.shape[1]) * np.exp(stored["tail_logit"].astype(np.float64) - lse)
    tail_err = np.abs(tail_stored - tail_true)
    ratio = {
        "top-k values": (value_err / _rounding(zk, slack)).max(1),
        "top-k indices": index_err / (2 * _rounding(smallest, slack[:, 0])),
        "tail mass": tail_err / (2.0**-20 + 2 * slack[:, 0]),
    }
    error = {"top-k values": value_err.max(1), "top-k indices": index_err, "tail mass": tail_err}
    return Checked(ratio, error, _top1_differs(z, index[rows, values.argmax(1)], slack))


def _features(stored: dict, x: np.ndarray, kind: str, allow: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the largest |stored − teacher| of the feature map over its bound (fp16 rounding; int8: half the
    channel's scale on top), and that error."""
    n = len(x)
    slack = allow * np.abs(x).reshape(n, -1).max(1)[:, None, None, None]
    bound = _rounding(x, slack)
    if kind == "int8":
        scale = stored["feat_scale"].astype(np.float32)[:, :, None, None]
        got = stored["feat"].astype(np.float32) * scale
        bound = bound + scale / 2
    else:
        got = stored["feat"].astype(np.float32)
    err = np.abs(got - x)
    return (err / bound).reshape(n, -1).max(1), err.reshape(n, -1).max(1)


def compare(stored: dict, outputs: dict, fmt, allow: float) -> Checked:
    """Stored columns (`decode_outputs`) of some rows against the teacher's float outputs on them
    (`TeacherPool.outputs`), within the format's bounds plus `allow` × the row's largest |value|."""
    z = outputs["logits"]
    slack = allow * np.abs(z).max(1, keepdims=True)
    checked = _fp16_logits(stored, z, slack) if fmt.logits == "fp16" else _topk_logits(stored, z, slack)
    if fmt.features != "none":
        if stored["feat"].shape[1:] != outputs["feat"].shape[1:]:
            raise CacheMismatch(
                f"the cache stores feature maps of shape {list(stored['feat'].shape[1:])}, the teacher now gives "
                f"{list(outputs['feat'].shape[1:])}: the cache was made by another model. Delete it and re-run "
                "precompute"
            )
        ratio, error = _features(stored, outputs["feat"], fmt.features, allow)
        checked.ratio["features"], checked.error["features"] = ratio, error
    return checked


# ------------------------------------------------------------------------------------------------ reporting
def _rows(rendered_item: tuple, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(idx, pixels) of `positions` from a rendered (part, view): (its positions, idx, pixels)."""
    every, idx, pixels = rendered_item
    at = np.searchsorted(every, positions)
    return idx[at], pixels[at]


def _shown(values: np.ndarray) -> str:
    listed = ", ".join(str(v) for v in values[:SHOWN_ROWS].tolist())
    return f"[{listed}{f', … {len(values) - SHOWN_ROWS} more' if len(values) > SHOWN_ROWS else ''}]"


def _describe(target: Target, part: str, view: int, positions, idx, checked: Checked) -> str:
    """One line per (part, view) that differs: its rows (and idx), each check's largest error, top-1."""
    bad = checked.failing()
    what = [
        f"{name} max error {checked.error[name][bad].max():.4g} ({checked.ratio[name][bad].max():.3g}× its bound)"
        for name in checked.ratio
        if (checked.ratio[name][bad] > 1).any()
    ]
    what.append(f"top-1 differs on {int(checked.top1.sum())} of {len(positions)}")
    return (
        f"teacher {target.ref.name!r}, {part} view {view}: rows {_shown(positions[bad])} (idx {_shown(idx[bad])}) "
        f"of the {len(positions)} sampled differ: {'; '.join(what)}"
    )


def _check_target(target: Target, outputs: dict, rendered: dict, allow: float) -> None:
    """Compare one teacher's sampled rows, item by item; its problems and stats go on the target."""
    fmt = target.manifest.fmt()
    offset = failing = top1 = 0
    worst: dict[str, float] = {}
    for (part, view), positions in target.sample.items():
        idx, _pixels = _rows(rendered[(part, view)], positions)
        mine = {name: v[offset : offset + len(positions)] for name, v in outputs.items()}
        offset += len(positions)
        checked = compare(_stored(target, part, view, positions, idx), mine, fmt, allow)
        bad = checked.failing()
        failing += int(bad.sum())
        top1 += int(checked.top1.sum())
        for name, ratio in checked.ratio.items():
            worst[name] = max(worst.get(name, 0.0), float(ratio.max()))
        if bad.any():
            target.problems.append(_describe(target, part, view, positions, idx, checked))
    target.stats = {"failing_rows": failing, "top1_differs": top1, "max_error_over_bound": worst}


def _diagnosis(target: Target, samples: int) -> str:
    """What a failing store's pattern says, and the fix."""
    failing = target.stats.get("failing_rows", 0)
    if target.rendering == "changed" and not failing:
        why = "the sampled rows still agree, but other images may not"
    elif target.rendering == "changed":
        why = "the rendering changed (above)"
    elif failing >= samples / 2:
        why = (
            f"{failing} of {samples} sampled rows differ: the cache was made with another preprocessing "
            "(normalisation, input size), rendering or teacher than this code runs for it"
        )
    else:
        why = (
            f"{failing} of {samples} sampled rows differ while the rest agree: values changed after the teacher "
            "computed them (an encoder or writer bug, or an edit that kept the checksums valid)"
        )
    return (
        f"teacher {target.ref.name!r} ({target.ref.id}): {why}. Fix: delete {target.store} and re-run "
        "precompute (it recomputes that store only)"
    )


def verify_cache(cfg: Config, samples: int = DEFAULT_SAMPLES, seed: int = 0, log=print) -> dict[str, Any]:
    """Check every configured teacher's cache on a seeded sample of `samples` (image, view) pairs; writes
    `<root>/cache/<dataset-fp>/verify.json`; raises CacheMismatch naming what differs."""
    meta = find_dataset(cfg)
    if meta is None:
        raise CacheError(
            f"dataset {cfg.data.dataset_name!r} is not ingested under {cfg.root}: there is no cache to verify; "
            "run ingest and precompute first"
        )
    spec = views.make_view_spec(cfg, meta.encoding)
    probe = render_digest(spec, meta.image_shape)
    targets = _targets(cfg, meta, samples, seed, probe, log)
    wanted: dict[tuple[str, int], np.ndarray] = {}
    for t in targets:
        for item, positions in t.sample.items():
            wanted[item] = np.union1d(wanted.get(item, positions), positions)
    dataset_dir = storage.dataset_dir(cfg.root, meta.name, meta.fingerprint)
    rendered = {
        item: (wanted[item], *pair)
        for item, pair in _render(dataset_dir, spec, meta.image_shape, wanted).items()
    }
    log(f"[verify] {len(targets)} teacher(s), up to {samples} (image, view) pair(s) each, seed {seed}")
    device, outputs = _run_teachers(cfg, meta, targets, rendered)
    allow = allowance(device, cfg.cache.precision)
    for target, out in zip(targets, outputs):
        _check_target(target, out, rendered, allow)
    summary = _summary(targets, samples, seed, device, allow, probe)
    url = storage.join(cfg.root, "cache", meta.fingerprint, "verify.json")
    storage.write_json(url, summary)
    _report(targets, log)
    log(f"[verify] summary: {url}")
    failed = [t for t in targets if t.problems]
    if failed:
        lines = [p for t in failed for p in t.problems]
        lines += [_diagnosis(t, sum(len(p) for p in t.sample.values())) for t in failed]
        raise CacheMismatch("the cache does not hold what its teachers give:\n  " + "\n  ".join(lines))
    return summary


def _summary(targets: list[Target], samples: int, seed: int, device: str, allow: float, probe: str) -> dict:
    return {
        "samples": samples,
        "seed": seed,
        "device": device,
        "compute_allowance": allow,
        "render_probe": probe,
        "ok": not any(t.problems for t in targets),
        "teachers": [
            {
                "teacher": t.ref.name,
                "id": t.ref.id,
                "store": t.store,
                "checked": sum(len(p) for p in t.sample.values()),
                "items": len(t.sample),
                "rendering": t.rendering,
                "made_by": t.manifest.package_version,
                **t.stats,
                "problems": t.problems,
            }
            for t in targets
        ],
    }


def _report(targets: list[Target], log) -> None:
    for t in targets:
        worst = ", ".join(f"{k} {v:.2g}×" for k, v in t.stats.get("max_error_over_bound", {}).items())
        checked = sum(len(p) for p in t.sample.values())
        log(
            f"[verify] {t.ref.name}: {checked} pair(s) over {len(t.sample)} (part, view) item(s); largest error "
            f"over its bound: {worst}; top-1 differs on {t.stats.get('top1_differs', 0)}; rendering {t.rendering}"
            + (f" (made by camkd-ray {t.manifest.package_version})" if t.manifest.package_version else "")
        )
