"""Choosing what to deploy: what each student costs (parameters, MACs per image, file size and latency measured in
one quiet pass, never while trials train), the Pareto front of accuracy against cost, and the best student within
a budget. Reads stored results and student files; trains nothing and never imports Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from camkd import models
from camkd.costs import latency, macs_per_image, parameter_count
from pipeline.data import preprocessing
from pipeline.store import storage
from pipeline.teachers import checkpoints

LATENCY_COLUMNS = ["latency_ms_b1_p50", "latency_ms_b1_p90", "throughput_bN"]
COST_COLUMNS = ["student", "params", "macs", "export_bytes", *LATENCY_COLUMNS]
GPU_COLUMNS = ["gpu_latency_ms_b1_p50", "gpu_throughput_bN"]


@dataclass(frozen=True)
class Bench:
    """How the quiet pass measures: intra-op CPU threads, batch-1 repeats and the throughput batch."""

    threads: int = 1
    repeats: int = 50
    batch: int = 64
    gpu: bool = True  # also on the GPU when this process has one

    def describe(self) -> str:
        return (
            f"CPU, {self.threads} thread(s): batch-1 p50/p90 over {self.repeats} forwards, throughput at batch "
            f"{self.batch}"
        )


def input_shape(cfg, meta) -> tuple[int, int, int]:
    """(C, H, W) the student of this config takes: `student.input_size`, else the data's own size (the images'
    size, or `data.image_size` for image folders): what `train` counts its MACs at and records in student.pt."""
    h, w = cfg.student.input_size or preprocessing.data_hw(cfg, meta)
    return meta.channels, int(h), int(w)


def load_student(url: str) -> tuple[models.FeatureClassifier, dict[str, Any]]:
    """A student.pt (or any model file this project writes) → (model in eval mode, the file's metadata)."""
    state, meta = checkpoints.load_state_dict(storage.read_bytes(url), url)
    if "arch" not in meta:
        raise checkpoints.TeacherError(
            f"{url} is not a camkd model file (no `arch` in it): pass a student.pt that `train` wrote"
        )
    model = models.create(meta["arch"], meta["num_classes"], meta["in_chans"])
    model.load_state_dict(state, strict=True)
    return model.eval(), meta


def measure(model: torch.nn.Module, shape: tuple[int, int, int], bench: Bench) -> dict[str, Any]:
    """Parameters, MACs per image and latency of one model: CPU always, the GPU too when there is one."""
    c, h, w = shape
    model = model.cpu().eval()
    out: dict[str, Any] = {"params": parameter_count(model), "macs": macs_per_image(model, c, h, w)}
    out |= latency(model, c, h, w, batch=bench.batch, repeats=bench.repeats, threads=bench.threads)
    if bench.gpu and torch.cuda.is_available():
        gpu = latency(model.cuda(), c, h, w, batch=bench.batch, repeats=bench.repeats)
        model.cpu()
        out |= {
            "gpu_latency_ms_b1_p50": gpu["latency_ms_b1_p50"],
            "gpu_throughput_bN": gpu["throughput_bN"],
            "gpu": gpu["device"],
        }
    return out


def bench_file(url: str, bench: Bench, shape: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """`camkd bench-student FILE`: a student file's cost on the machine this runs on."""
    model, meta = load_student(url)
    shape = shape or tuple(meta.get("input_shape") or ())
    if len(shape) != 3:
        raise checkpoints.TeacherError(
            f"{url} does not record its input size (written before input_shape was stored): pass --size C,H,W"
        )
    sizes = storage.list_sizes(url.rsplit("/", 1)[0])
    return {
        "file": url,
        "arch": meta["arch"],
        "input_shape": list(shape),
        "export_bytes": sizes.get(url.rsplit("/", 1)[-1], 0),
        **measure(model, shape, bench),
        "measured": bench.describe(),
    }


# ------------------------------------------------------------------------------------------------ the quiet pass
def add_costs(
    rows: list[dict[str, Any]],
    run_dirs: dict[int, str | None],
    shapes: dict[int, tuple[int, int, int]],
    num_classes: int,
    bench: Bench,
    log=print,
    measured: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Fill every row's cost columns in place. `run_dirs[i]`: row i's run folder (None: never trained to the end);
    `shapes[i]`: the (C, H, W) its student takes, as its run trained it. `measured`: measurements already made
    this way (the `measurements` this returns), reused so one report gives one figure per architecture and input.

    Parameters, MACs and latency depend on the architecture and the input shape, so each (architecture, shape) is
    measured once, on the first finished run's student.pt when there is one (the exported file itself), else on a
    fresh model of it; `export_bytes` is each run's own student.pt (blank where none was written)."""
    known = {(m["arch"], tuple(m["input_shape"])): m for m in measured or []}
    first_file: dict[tuple[str, tuple[int, ...]], str] = {}
    files: dict[int, str] = {}
    keys = {i: (row["student"], tuple(shapes[i])) for i, row in enumerate(rows)}
    for i in range(len(rows)):
        run_dir = run_dirs.get(i)
        if run_dir and storage.exists(storage.join(run_dir, "student.pt")):
            files[i] = storage.join(run_dir, "student.pt")
            first_file.setdefault(keys[i], files[i])
    todo = sorted(set(keys.values()) - set(known))
    if todo:
        log(
            f"[report] measuring {len(todo)} student(s) (architecture, input) one at a time: {bench.describe()}"
        )
    for arch, shape in todo:
        if (arch, shape) in first_file:
            model, _ = load_student(first_file[arch, shape])
        else:
            model = models.create(arch, num_classes, shape[0])
        known[arch, shape] = {"arch": arch, "input_shape": list(shape)} | measure(model, shape, bench)
        known[arch, shape]["measured_on"] = first_file.get((arch, shape), "a fresh model")
    for i, row in enumerate(rows):
        cost = known[keys[i]]
        row.update({k: v for k, v in cost.items() if k in COST_COLUMNS or k in GPU_COLUMNS})
        row["export_bytes"] = _file_size(files[i]) if i in files else ""
    return {"bench": bench.describe(), "measurements": [known[k] for k in sorted(set(keys.values()))]}


def _file_size(url: str) -> int:
    parent, name = url.rsplit("/", 1)
    return storage.list_sizes(parent).get(name, 0)


# ------------------------------------------------------------------------------------------------ choosing
def pareto_front(rows: list[dict[str, Any]], cost: str, metric: str = "best_top1") -> list[int]:
    """Indices of the rows no other row dominates (cost no higher and metric no lower, one of them strictly),
    among the rows that exported a student (`status` finished) and have both numbers; sorted by cost."""
    cands = [
        i
        for i, r in enumerate(rows)
        if r.get("status") == "finished" and _num(r.get(cost)) and _num(r[metric])
    ]
    front = []
    for i in cands:
        ci, mi = rows[i][cost], rows[i][metric]
        dominated = any(
            rows[j][cost] <= ci and rows[j][metric] >= mi and (rows[j][cost] < ci or rows[j][metric] > mi)
            for j in cands
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: rows[i][cost])


def best_within(
    rows: list[dict[str, Any]], budget_ms: float | None = None, budget_params: int | None = None
) -> dict[str, Any] | None:
    """The best finished student (validation top-1) whose batch-1 p50 CPU latency and parameter count fit the
    budgets; None when none fits. Ties: the cheaper (latency, then parameters)."""
    fits = [
        r
        for r in rows
        if r.get("status") == "finished"
        and _num(r.get("best_top1"))
        and (budget_ms is None or (_num(r.get("latency_ms_b1_p50")) and r["latency_ms_b1_p50"] <= budget_ms))
        and (budget_params is None or (_num(r.get("params")) and r["params"] <= budget_params))
    ]
    if not fits:
        return None
    return max(fits, key=lambda r: (r["best_top1"], -r.get("latency_ms_b1_p50", 0), -r.get("params", 0)))


def budget_line(rows: list[dict[str, Any]], budget_ms: float | None, budget_params: int | None) -> str:
    """One sentence: the best student within the budget, or why none fits (with the cheapest there is)."""
    parts = ([f"≤ {budget_ms:g} ms batch-1 p50"] if budget_ms is not None else []) + (
        [f"≤ {budget_params:,} parameters"] if budget_params is not None else []
    )
    best = best_within(rows, budget_ms, budget_params)
    if best is None:
        finished = [r for r in rows if r.get("status") == "finished" and _num(r.get("latency_ms_b1_p50"))]
        if not finished:
            return f"budget {' and '.join(parts)}: no finished student to choose from"
        cheap = min(finished, key=lambda r: (r["latency_ms_b1_p50"], r.get("params", 0)))
        return (
            f"budget {' and '.join(parts)}: no finished student fits; the cheapest is #{cheap['rank']} "
            f"{cheap['student']} ({cheap['latency_ms_b1_p50']:.2f} ms, {cheap['params']:,} parameters)"
        )
    return (
        f"budget {' and '.join(parts)}: #{best['rank']} {best['student']} {best['strategy']} "
        f"[{best['teachers']}] val top-1 {best['best_top1']:.4f}, {best['latency_ms_b1_p50']:.2f} ms, "
        f"{best['params']:,} parameters ({best.get('student_file') or 'no file'})"
    )


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def label(row: dict[str, Any]) -> str:
    return f"#{row['rank']} {row['student']} {row['strategy']}[{row['teachers']}]"


def plot_pareto(rows: list[dict[str, Any]], url: str, title: str, plt) -> str:
    """Validation top-1 against CPU latency (left) and parameters (right): every run a labelled point, the front
    joined by a line, dominated runs hollow, runs without an exported student (ASHA-stopped, failed) as crosses."""
    import io

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, cost, xlabel in (
        (axes[0], "latency_ms_b1_p50", "CPU latency, batch 1, p50 (ms)"),
        (axes[1], "params", "parameters"),
    ):
        front = set(pareto_front(rows, cost))
        for i, r in enumerate(rows):
            if not (_num(r.get(cost)) and _num(r["best_top1"])):
                continue
            x, y = r[cost], r["best_top1"]
            if r.get("status") != "finished":
                ax.scatter([x], [y], marker="x", color="grey")
            elif i in front:
                ax.scatter([x], [y], color="tab:red", zorder=3)
            else:
                ax.scatter([x], [y], facecolors="none", edgecolors="tab:blue")
            ax.annotate(label(r), (x, y), fontsize=6.5, xytext=(3, 3), textcoords="offset points")
        line = sorted(front, key=lambda i: rows[i][cost])
        if line:
            ax.plot(
                [rows[i][cost] for i in line], [rows[i]["best_top1"] for i in line], color="tab:red", lw=1
            )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("best val top-1")
        if cost == "params":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_title("filled red: Pareto front; hollow: dominated; ×: no exported student", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes_atomic(url, buf.getvalue())
    return url
