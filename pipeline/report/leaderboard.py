"""Reports from stored results: the sweep leaderboard (CSV + Markdown) and plots (PNG).

Everything here reads files that the train and tune stages wrote (Tune's per-trial params.json/result.json and
our summary.json files), so `pipeline/run.py report` regenerates tables and plots without re-running anything.
"""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Any

from pipeline.config import Config, with_updates
from pipeline.report import deploy
from pipeline.store import storage

LEADERBOARD_COLUMNS = [
    "rank",
    "trial",
    "student",
    "teachers",
    "strategy",
    "settings",
    "best_top1",
    "final_top1",
    "epochs",
    "stopped_early",
    "status",
    *deploy.COST_COLUMNS[1:],
    "pareto",
    "wall_s",
    "error",
]

# Left out of the console's table (kept in leaderboard.csv/.md): what a reader at a terminal does not need.
CONSOLE_HIDDEN = {"trial", "settings", "final_top1", "stopped_early", "macs", "latency_ms_b1_p90"}


# ------------------------------------------------------------------------------------------------ reading
def error_summary(text: str) -> str:
    """The one line of a traceback a user needs: `CacheError: teacher 't1' has no cache at ...` (the module
    path dropped), or the last non-empty line when no exception line is found."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        m = re.match(
            r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception|Interrupt|Failure)): (.*)$", line
        )
        if m:
            return f"{m.group(1)}: {m.group(2)}"
    return lines[-1] if lines else "unknown error"


def _read_lines_json(url: str) -> list[dict[str, Any]]:
    if not storage.exists(url):
        return []
    out = []
    for line in storage.read_bytes(url).decode().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a killed process: keep what came before it
    return out


def load_trials(sweep: str) -> list[dict[str, Any]]:
    """One record per trial: its config (params.json), per-epoch results (result.json), and error state."""
    exp = storage.join(sweep, "tune", "camkd_trial")
    trials = []
    for entry in storage.listdir(exp):
        tdir = storage.join(exp, entry)
        params_url = storage.join(tdir, "params.json")
        if not storage.exists(params_url):
            continue
        params = storage.read_json(params_url)
        results = [r for r in _read_lines_json(storage.join(tdir, "result.json")) if "val_top1" in r]
        error = None
        if storage.exists(storage.join(tdir, "error.txt")):
            error = error_summary(
                storage.read_bytes(storage.join(tdir, "error.txt")).decode(errors="replace")
            )
        elif storage.exists(storage.join(tdir, "error.pkl")):
            error = "the trial failed (see error.pkl in its folder)"
        trials.append({"dir": tdir, "params": params, "results": results, "error": error})
    return trials


def _trial_id(trial_dir: str) -> str:
    """Tune's trial id from a trial folder name (`run_trial_e07ca_00000_0_arm=...` → `e07ca_00000`)."""
    name = trial_dir.rstrip("/").rsplit("/", 1)[-1]
    m = re.search(r"_([0-9a-f]{5}_\d{5})_", name)
    return m.group(1) if m else name[:24]


def leaderboard(cfg: Config, sweep: str) -> list[dict[str, Any]]:
    rows = []
    for t in load_trials(sweep):
        arm = t["params"].get("arm", {})
        others = {k: v for k, v in t["params"].items() if k != "arm"}
        # One result per epoch, the first reported: a trial re-run after its sweep was interrupted may report its
        # last epoch again, with Tune's clock started over.
        first: dict[int, dict[str, Any]] = {}
        for r in t["results"]:
            first.setdefault(r["epoch"], r)
        res = [first[e] for e in sorted(first)]
        epochs = max((r["epoch"] for r in res), default=0)
        best = max((r["val_top1"] for r in res), default=float("nan"))
        # A trial that errored and then finished on a resumed sweep keeps Tune's old error.txt: finished wins.
        status = "finished" if epochs >= cfg.train.epochs else ("error" if t["error"] else "stopped")
        rows.append(
            {
                "trial": res[-1]["trial_id"] if res and "trial_id" in res[-1] else _trial_id(t["dir"]),
                "student": t["params"].get("student.arch", cfg.student.arch),
                "teachers": "+".join(arm.get("teachers") or []) or "-",
                "strategy": arm.get("strategy", "?"),
                "settings": ", ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in others.items()
                ),
                "best_top1": best,
                "final_top1": res[-1]["val_top1"] if res else float("nan"),
                "epochs": epochs,
                "stopped_early": status == "stopped",
                "status": status,
                "wall_s": round(res[-1].get("time_total_s", 0.0), 1) if res else 0.0,
                "error": t["error"] or "",
                "history": res,
                "updates": others,  # the trial's sampled values: its config is the sweep's with these
            }
        )
    rows.sort(key=lambda r: (-(r["best_top1"] if r["best_top1"] == r["best_top1"] else -1), r["trial"]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


# ------------------------------------------------------------------------------------------------ writing
def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v != v:
                return "–"
            return f"{v:.1f}" if abs(v) >= 10 else f"{v:.4f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _save_png(fig, url: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    storage.write_bytes_atomic(url, buf.getvalue())
    return url


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_best_per_arm(rows: list[dict[str, Any]], url: str, title: str) -> str:
    plt = _plt()
    best: dict[tuple[str, str], float] = {}
    stopped: dict[tuple[str, str], int] = {}
    for r in rows:
        if r["best_top1"] == r["best_top1"]:
            key = (r["teachers"], r["strategy"])
            if r["best_top1"] > best.get(key, -1.0):
                best[key] = r["best_top1"]
                stopped[key] = r["epochs"] if r["stopped_early"] else 0
    sets = sorted({k[0] for k in best})
    strategies = sorted({k[1] for k in best})
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(sets) * max(1, len(strategies)) ** 0.5 + 2), 3.8))
    width = 0.8 / max(len(strategies), 1)
    for j, s in enumerate(strategies):
        xs = [i + j * width for i in range(len(sets))]
        ys = [best.get((t, s), 0.0) for t in sets]
        ax.bar(xs, ys, width, label=s)
        for x, y, t in zip(xs, ys, sets):
            if y:
                note = f"\nstopped@{stopped[(t, s)]}" if stopped.get((t, s)) else ""
                ax.text(x, y, f"{y:.3f}{note}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(
        [i + width * (len(strategies) - 1) / 2 for i in range(len(sets))], sets, rotation=20, ha="right"
    )
    ax.set_ylabel("best val top-1")
    lo = min([v for v in best.values()] or [0])
    ax.set_ylim(max(0.0, lo - 0.05), min(1.0, max(best.values() or [1]) + 0.03))
    ax.set_title(title + " (ASHA-stopped trials marked)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    url = _save_png(fig, url)
    plt.close(fig)
    return url


def plot_curves(runs: list[tuple[str, list[dict[str, Any]]]], url: str, title: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, history in runs:
        ax.plot(
            [h["epoch"] for h in history], [h["val_top1"] for h in history], marker="o", ms=3, label=label
        )
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("val top-1")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    url = _save_png(fig, url)
    plt.close(fig)
    return url


def plot_weights_over_epochs(runs: list[tuple[str, list[dict[str, Any]]]], url: str, title: str) -> str:
    """Mean confidence weight per teacher (weight/<teacher> metrics) against epoch, one panel per run."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), squeeze=False)
    for ax, (label, history) in zip(axes[0], runs):
        teachers = sorted({k.split("/", 1)[1] for h in history for k in h if k.startswith("weight/")})
        for t in teachers:
            ax.plot(
                [h["epoch"] for h in history],
                [h.get(f"weight/{t}") for h in history],
                marker="o",
                ms=3,
                label=t,
            )
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("mean confidence weight")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    url = _save_png(fig, url)
    plt.close(fig)
    return url


def plot_class_weights(class_weight: dict[str, list[float]], classes: list[str], url: str, title: str) -> str:
    """Per-class mean confidence weight per teacher (grouped bars)."""
    plt = _plt()
    teachers = list(class_weight)
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(classes) + 2), 3.6))
    width = 0.8 / max(len(teachers), 1)
    for j, t in enumerate(teachers):
        ax.bar([i + j * width for i in range(len(classes))], class_weight[t], width, label=t)
    ax.set_xticks(
        [i + width * (len(teachers) - 1) / 2 for i in range(len(classes))], classes, rotation=30, ha="right"
    )
    ax.set_ylabel("mean confidence weight")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    url = _save_png(fig, url)
    plt.close(fig)
    return url


def add_deploy_costs(
    cfg: Config,
    rows: list[dict[str, Any]],
    run_dirs: list[str | None],
    bench: deploy.Bench,
    log=print,
    measured: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Each row's student cost (`pipeline/report/deploy.py`, one quiet pass) at the input its run trained on (the
    config with the row's `updates`: a trial's sampled values), and its place on the latency front. `measured`:
    an earlier pass's costs (what this returns); its measurements are reused when it measured the same way."""
    from pipeline.data.ingest import require_dataset

    meta = require_dataset(cfg, log=lambda *_: None)
    shapes = {
        i: deploy.input_shape(with_updates(cfg, r["updates"]) if r.get("updates") else cfg, meta)
        for i, r in enumerate(rows)
    }
    same = measured and measured.get("bench") == bench.describe()
    info = deploy.add_costs(
        rows,
        dict(enumerate(run_dirs)),
        shapes,
        meta.num_classes,
        bench,
        log=log,
        measured=measured.get("measurements") if same else None,
    )
    front = set(deploy.pareto_front(rows, "latency_ms_b1_p50"))
    for i, (r, run_dir) in enumerate(zip(rows, run_dirs)):
        r["pareto"] = i in front
        r["student_file"] = storage.join(run_dir, "student.pt") if r["export_bytes"] != "" else ""
    return info


def write_sweep_report(
    cfg: Config,
    sweep: str,
    log=print,
    bench: deploy.Bench | None = None,
    budget_ms: float | None = None,
    budget_params: int | None = None,
) -> dict[str, Any]:
    """Leaderboard CSV/Markdown (with each student's cost), the Pareto plot and the other plots under
    `<sweep>/report/`, and the best student within a budget when one is given; returns a JSON-able summary."""
    rows = leaderboard(cfg, sweep)
    out = storage.join(sweep, "report")
    storage.makedirs(out)
    costs = add_deploy_costs(
        cfg, rows, [storage.join(sweep, "train", r["trial"]) for r in rows], bench or deploy.Bench(), log=log
    )
    columns = LEADERBOARD_COLUMNS + [c for c in deploy.GPU_COLUMNS if any(c in r for r in rows)]
    storage.write_bytes_atomic(storage.join(out, "leaderboard.csv"), _csv(rows, columns).encode())
    md = markdown_table(rows, columns)
    storage.write_bytes_atomic(storage.join(out, "leaderboard.md"), (md + "\n").encode())
    plots = sweep_plots(rows, out)
    choice = budget_choice(rows, columns, budget_ms, budget_params)
    console = markdown_table(rows, [c for c in columns if c not in CONSOLE_HIDDEN])
    log(f"[report] leaderboard ({len(rows)} trials; cost: {costs['bench']}):\n{console}")
    if choice:
        log(f"[report] {choice['line']}")
    log(f"[report] written to {out}")
    return {
        "leaderboard": [{k: r.get(k) for k in [*columns, "student_file"]} for r in rows],
        "costs": costs,
        "choice": choice,
        "report_dir": out,
        "plots": plots,
    }


def sweep_plots(rows: list[dict[str, Any]], out: str) -> dict[str, str]:
    """Best accuracy per arm, the top trials' curves, the Pareto plot and CA-MKD's weights over epochs."""
    if not rows:
        return {}
    plots = {
        "best_per_arm": plot_best_per_arm(
            rows, storage.join(out, "best_per_teacher_set.png"), "best accuracy per teacher set and strategy"
        )
    }
    top = [r for r in rows if r["history"]][:5]
    plots["curves"] = plot_curves(
        [(f"#{r['rank']} {r['strategy']} {r['teachers']}", r["history"]) for r in top],
        storage.join(out, "top_trials_curves.png"),
        "top trials",
    )
    plots["pareto"] = deploy.plot_pareto(
        rows, storage.join(out, "pareto.png"), "students: accuracy against cost", _plt()
    )
    ca = [r for r in rows if r["strategy"].startswith("camkd") and r["history"]][:4]
    if ca:
        plots["weights"] = plot_weights_over_epochs(
            [(f"#{r['rank']} {r['teachers']}", r["history"]) for r in ca],
            storage.join(out, "camkd_weights.png"),
            "CA-MKD mean confidence weight per teacher",
        )
    return plots


def budget_choice(
    rows: list[dict[str, Any]], columns: list[str], budget_ms: float | None, budget_params: int | None
) -> dict[str, Any] | None:
    """The best finished student within the budget (`--budget-ms`, `--budget-params`), when one is given."""
    if budget_ms is None and budget_params is None:
        return None
    choice = {
        "budget_ms": budget_ms,
        "budget_params": budget_params,
        "best": deploy.best_within(rows, budget_ms, budget_params),
        "line": deploy.budget_line(rows, budget_ms, budget_params),
    }
    if choice["best"] is not None:
        choice["best"] = {k: choice["best"][k] for k in [*columns, "student_file"]}
    return choice
