"""The quickstart: every stage on real Fashion-MNIST, then a comparison report a newcomer can read.

Trains two good teachers and a confidently wrong one (trained with T-shirt↔Shirt and Sandal↔Sneaker exchanged) on
every training row, precomputes their outputs once, distills the same student with CE / AVER / EBKD / CA-MKD (same
seed and budget, on a smaller part of the rows: `train.limit_train`), ranks the teacher pairs from the cache and
distills the best pair into three student architectures, and writes summary.json, report.md and plots: validation
top-1 (the hold-out, used for selection) and test top-1 (scored once) per student, each student's cost (parameters,
MACs, CPU latency, file size) with the Pareto front, and the weight each strategy gives the wrong teacher on the
swapped classes. A second run reuses everything that is already done.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipeline.cache import precompute
from pipeline.config import Config, load_config, with_updates
from pipeline.data.ingest import ingest
from pipeline.report import deploy, leaderboard
from pipeline.store import storage
from pipeline.sweep import tune
from pipeline.teachers import stage as teacher_stage
from pipeline.train import driver

QUICKSTART_YAML = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
STUDENT_STRATEGIES = ["ce", "aver", "ebkd", "camkd"]
FULL_UPDATES = {
    "data.limit_train": None,
    "data.limit_test": None,
    "data.rows_per_part": 4096,
    "views.count": 4,
    "train.epochs": 15,
    "train.milestones": [10, 13],
    "train.limit_train": 20000,  # the strong-teacher study's regime (i): teachers on 54k rows, students on 20k
}


def quickstart_config(
    path: str | None, overrides: list[str], root: str | None = None, full: bool = False
) -> Config:
    cfg = load_config(path or QUICKSTART_YAML, overrides)
    updates: dict[str, Any] = dict(FULL_UPDATES) if full else {}
    if full:
        for i, t in enumerate(cfg.teachers):
            if t.train is not None and not t.train.label_swaps:
                updates[f"teachers.{i}.train.epochs"] = 15
        updates["experiment"] = cfg.experiment + "-full"
    if root:
        updates["root"] = root
    return with_updates(cfg, updates) if updates else cfg


def _step(i: int, n: int, what: str, log) -> None:
    log(f"\n=== [{i}/{n}] {what} ===")


def run_quickstart(cfg: Config, overwrite: bool = False, log=print) -> dict[str, Any]:
    from pipeline.ops.runtime import ensure_ray

    started = time.time()
    n = 6
    _step(1, n, "start Ray, ingest Fashion-MNIST", log)
    ensure_ray(cfg, log=log)
    meta = ingest(cfg, log=log)
    _step(2, n, "train 3 teachers (two good, one confidently wrong on two class pairs)", log)
    teacher_rows = teacher_stage.run_stage(cfg, log=log)
    _step(3, n, "precompute teacher logits + feature maps once", log)
    cache = precompute.run_stage(cfg, overwrite=overwrite, log=log)
    _step(4, n, f"distill the same student with {', '.join(STUDENT_STRATEGIES)}", log)
    runs_root = storage.runs_dir(cfg.root, cfg.experiment)
    students = []
    for s in STUDENT_STRATEGIES:
        scfg = with_updates(cfg, {"strategy.name": s, "strategy.teachers": None})
        students.append(driver.fit(scfg, meta, runs_root, f"student-{s}", log=log).model_dump())
    _step(
        5, n, "rank teacher subsets from the cache; Ray Tune sweep of the best (student architectures)", log
    )
    # Tune's status tables and per-trial result boxes stay off the console; the trials' own lines still print.
    sweep = tune.run_stage(cfg, log=log, verbose=0)
    _step(6, n, "report", log)
    summary = write_quickstart_report(cfg, meta, teacher_rows, cache, students, sweep, log=log)
    summary["wall_seconds"] = round(time.time() - started, 1)
    # Keep every invocation's wall time: a second run reuses everything, and its few seconds must not hide what
    # the first run cost.
    url = storage.join(runs_root, "report", "summary.json")
    earlier = storage.read_json(url).get("invocations", []) if storage.exists(url) else []
    summary["invocations"] = [*earlier, {"started": round(started), "wall_seconds": summary["wall_seconds"]}]
    storage.write_json(url, summary)
    log(
        f"\nquickstart finished in {summary['wall_seconds']:.0f} s; report: {storage.join(runs_root, 'report')}"
    )
    return summary


def regenerate_report(cfg: Config, log=print) -> dict[str, Any] | None:
    """Rebuild the quickstart report from the stored summaries (None when this experiment has no student runs)."""
    from pipeline.data.ingest import find_dataset

    runs_root = storage.runs_dir(cfg.root, cfg.experiment)
    urls = [storage.join(runs_root, f"student-{s}", "summary.json") for s in STUDENT_STRATEGIES]
    meta = find_dataset(cfg)
    if meta is None or not all(storage.exists(u) for u in urls):
        return None
    students = [storage.read_json(u) for u in urls]
    teacher_rows = storage.read_json(storage.join(cfg.root, "teachers", "summary.json"))["teachers"]
    cache = storage.read_json(storage.join(cfg.root, "cache", meta.fingerprint, "summary.json"))
    sweep_url = storage.join(tune.sweep_dir(cfg), "summary.json")
    sweep = storage.read_json(sweep_url) if storage.exists(sweep_url) else {"leaderboard": []}
    return write_quickstart_report(cfg, meta, teacher_rows, cache, students, sweep, log=log)


def write_quickstart_report(cfg, meta, teacher_rows, cache, students, sweep, log=print) -> dict[str, Any]:
    out = storage.join(storage.runs_dir(cfg.root, cfg.experiment), "report")
    storage.makedirs(out)
    t_rows = teacher_table_rows(teacher_rows, cache)
    s_rows, mean_weights, class_weights = student_table_rows(students)
    costs = student_costs(cfg, s_rows, students, sweep.get("costs"))
    plots = report_plots(cfg, meta.classes, students, class_weights, out)
    plots["pareto"] = pareto_plot(s_rows, sweep["leaderboard"], storage.join(out, "pareto.png"))
    wrong = wrong_teacher_table(class_weights, swapped_classes(cfg), meta.classes)
    tables = report_tables(t_rows, s_rows, wrong, sweep["leaderboard"], students)
    text = report_text(cfg, meta, t_rows, s_rows, tables, plots)
    storage.write_bytes_atomic(storage.join(out, "report.md"), text.encode())
    log(
        "\nTeachers\n"
        + tables["teachers"]
        + "\n\nStudents\n"
        + tables["students"]
        + "\n\nThe confidently wrong teacher\n"
        + tables["wrong"]
        + "\n\nSweep leaderboard\n"
        + tables["leaderboard"]
    )
    return {
        "teachers": t_rows,
        "students": s_rows,
        "camkd_mean_weight": mean_weights.get("camkd", {}),
        "camkd_class_weight": class_weights.get("camkd", {}),
        "class_weight": class_weights,
        "wrong_teacher": wrong,
        "leaderboard": sweep["leaderboard"],
        "costs": costs,
        "plots": plots,
        "report": storage.join(out, "report.md"),
    }


def teacher_table_rows(teacher_rows: list[dict], cache: dict) -> list[dict[str, Any]]:
    """One row per teacher: its test top-1, its top-1 on the cached views, and its cache's size."""
    cached = {row["teacher"]: row for row in cache["teachers"]}
    return [
        {
            "teacher": r["name"],
            "arch": r["arch"],
            "id": r["id"],
            "test_top1": cached.get(r["name"], {}).get("test_accuracy") or r.get("test_top1"),
            "cached_view_top1": cached.get(r["name"], {}).get("accuracy"),
            "cache_MiB": round(cached.get(r["name"], {}).get("total_bytes", 0) / 2**20, 1),
        }
        for r in teacher_rows
    ]


def student_table_rows(students: list[dict]) -> tuple[list[dict], dict[str, dict], dict[str, dict]]:
    """One row per student run, and each strategy's mean weight per teacher and per class (last epoch)."""
    s_rows = []
    mean_weights: dict[str, dict[str, float]] = {}
    class_weights: dict[str, dict[str, list[float]]] = {}
    for s in students:
        last = s["history"][-1]
        row = {
            "strategy": s["strategy"],
            "student": s["student"],
            "seed": s["seed"],
            "epochs": s["epochs"],
            "val_top1": s["best_val_top1"],
            "best_epoch": s.get("best_epoch"),
            "test_top1": s.get("test_top1"),
            "samples_per_s": round(s["mean_samples_per_s"], 1),
        }
        weights = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("weight/")}
        mean_weights[s["strategy"]] = weights
        class_weights[s["strategy"]] = last.get("class_weight", {})
        row["mean_weights"] = ", ".join(f"{t}={w:.3f}" for t, w in weights.items()) or "-"
        s_rows.append(row)
    return s_rows, mean_weights, class_weights


def report_plots(cfg, classes, students: list[dict], class_weights: dict, out: str) -> dict[str, str]:
    """Accuracy per strategy, CA-MKD's weights over epochs, and the per-class weights of CA-MKD and EBKD."""
    plots = {
        "accuracy_per_strategy": leaderboard.plot_curves(
            [(s["strategy"], s["history"]) for s in students],
            storage.join(out, "accuracy_per_strategy.png"),
            f"student {cfg.student.arch}: val top-1 per strategy",
        )
    }
    camkd_runs = [s for s in students if s["strategy"] == "camkd"]
    if camkd_runs:
        plots["weights_over_epochs"] = leaderboard.plot_weights_over_epochs(
            [("CA-MKD, all teachers", camkd_runs[0]["history"])],
            storage.join(out, "confidence_weight_over_epochs.png"),
            "mean CA-MKD confidence weight per teacher",
        )
    titles = {
        "camkd": ("per_class_weights", "per_class_weight.png", "CA-MKD mean confidence weight per class"),
        "ebkd": (
            "per_class_weights_ebkd",
            "per_class_weight_ebkd.png",
            "EBKD (label-free, entropy) weight per class",
        ),
    }
    for strategy, (key, file, title) in titles.items():
        if class_weights.get(strategy):
            plots[key] = leaderboard.plot_class_weights(
                class_weights[strategy], classes, storage.join(out, file), f"{title} (last epoch)"
            )
    return plots


def report_tables(t_rows, s_rows, wrong, lb, students) -> dict[str, str]:
    """The report's Markdown tables: teachers, students, the wrong teacher's weights and the sweep's leaderboard."""
    student_columns = ["strategy", "student", "seed", "epochs", "val_top1", "best_epoch", "test_top1"]
    student_columns += ["samples_per_s", "params", "latency_ms_b1_p50", "mean_weights"]
    lb_columns = ["rank", "student", "teachers", "strategy", "best_top1", "epochs", "status"]
    lb_columns += ["params", "latency_ms_b1_p50", "pareto", "wall_s"]
    lb_md = leaderboard.markdown_table(lb, lb_columns)
    camkd_runs = [s for s in students if s["strategy"] == "camkd"]
    all_names = "+".join(r["teacher"] for r in t_rows)
    if camkd_runs and lb and all(r["teachers"] != all_names for r in lb):
        lb_md += (
            f"\n\nAll three teachers ({all_names}) with CA-MKD is the `camkd` student above "
            f"(same config): best top-1 {camkd_runs[0]['best_val_top1']:.4f}."
        )
    wrong_columns = ["strategy", "teacher", "swapped_classes", "other_classes", "ratio"]
    return {
        "teachers": leaderboard.markdown_table(
            t_rows, ["teacher", "arch", "test_top1", "cached_view_top1", "cache_MiB"]
        ),
        "students": leaderboard.markdown_table(s_rows, student_columns),
        "wrong": leaderboard.markdown_table(wrong, wrong_columns)
        if wrong
        else "(no teacher was trained with label_swaps)",
        "leaderboard": lb_md,
    }


def report_text(cfg, meta, t_rows, s_rows, tables: dict[str, str], plots: dict[str, str]) -> str:
    """report.md: the tables with what each column means, and the plots."""
    return (
        "# camkd-ray quickstart report\n\n"
        f"{data_note(cfg, meta, t_rows, s_rows)}\n\n## Teachers\n\n{tables['teachers']}\n\n"
        f"## Students ({cfg.student.arch}, same seed and budget)\n\nval_top1: best top-1 on the validation hold-out "
        f"({cfg.data.val_fraction:g} of the training rows; it picks the epoch); test_top1: the test split, scored "
        f"once with that epoch's weights. {defaults_note(cfg)}\n\n{tables['students']}\n\n"
        f"## The confidently wrong teacher\n\nMean weight each strategy gives a teacher trained with swapped labels, "
        f"on the swapped classes and on the others (last epoch). EBKD's weights are label-free (they trust a "
        f"confident teacher); CA-MKD's come from each teacher's cross-entropy against the true label.\n\n"
        f"{tables['wrong']}\n\n"
        f"{rank_section(cfg)}"
        f"## Sweep ({', '.join(cfg.tune.strategies)}; "
        f"{'ASHA' if cfg.tune.asha.enabled else 'every trial trained to the end'})\n\n"
        "Each student's cost is measured in one quiet pass after training (`pipeline/report/deploy.py`): parameters, MACs "
        f"per image, student.pt's bytes, CPU latency at batch 1 (p50 / p90) and throughput. pareto: on the front of "
        f"validation top-1 against latency (report/pareto.png, with the students above).\n\n{tables['leaderboard']}\n\n"
        "## Plots\n\n" + "\n".join(f"![{k}]({Path(v).name})" for k, v in plots.items()) + "\n"
    )


STUDY = Path(__file__).resolve().parents[2] / "docs" / "study" / "strong-teachers.json"


def study_row() -> str:
    """The study row behind the quickstart's CA-MKD defaults, its figures read from the study's stored results."""
    where = "docs/study/strong-teachers.md, regime ii, row `camkd β=0.5`"
    try:
        arms = {a["arm"]: a for a in json.loads(STUDY.read_text())["arms"] if a["group"] == "ii"}
        row, authors = arms["camkd β=0.5"], arms["camkd β=50 (authors)"]
    except (OSError, KeyError, ValueError):
        return where
    return (
        f"{where}: {row['test_top1_mean']:.4f} ± {row['test_top1_std']:.4f} test top-1 over {row['seeds']} seeds, "
        f"{row['delta_vs_aver']:+.4f} over AVER and within noise of the authors' β = 50 "
        f"({authors['test_top1_mean']:.4f}); docs/study/study.md shows the same choice with weaker teachers"
    )


def rank_section(cfg: Config) -> str:
    """The teacher-subset ranking the sweep chose from (`tune.keep_best_subsets`), when it ran."""
    url = storage.join(tune.sweep_dir(cfg), "rank.md")
    if not storage.exists(url):
        return ""
    table = storage.read_bytes(url).decode().split("\n", 1)[1].strip()
    return f"## Teacher subsets ranked from the cache (before any student trained)\n\n{table}\n\n"


def data_note(cfg: Config, meta, t_rows: list[dict[str, Any]], s_rows: list[dict[str, Any]]) -> str:
    """Which rows the teachers and the students trained on, and how far the teachers are ahead."""
    from pipeline.train.reader import split_ranges

    ranges = split_ranges(meta, cfg.data.val_fraction, None)
    student_rows = split_ranges(meta, cfg.data.val_fraction, cfg.train.limit_train).train_end
    limits = {t.name: t.train.limit_train for t in cfg.teachers if t.train is not None}
    teacher_rows = ", ".join(
        f"{n} {limits[n]}" for n in limits if limits[n] is not None and limits[n] < ranges.train_end
    )
    text = (
        f"Data: {cfg.data.dataset_name}, {meta.split('train').rows} training images ({ranges.train_end} to train "
        f"on, {ranges.val_hi - ranges.val_lo} held out for validation) and {meta.split('test').rows} test images; "
        f"{cfg.views.count} cached views per image. The teachers trained on "
        + (
            f"their own prefixes where set ({teacher_rows}), the others all {ranges.train_end} training rows"
            if teacher_rows
            else f"all {ranges.train_end} training rows"
        )
        + f"; every student on the first {student_rows} (class-stratified, `train.limit_train`)."
    )
    good = [t["test_top1"] for t in t_rows if t["teacher"] not in swapped_classes(cfg) and t.get("test_top1")]
    alone = [r["test_top1"] for r in s_rows if r["strategy"] == "ce" and r.get("test_top1") is not None]
    if good and alone:
        text += (
            f" The best teacher's test top-1 is {max(good):.4f}, the student trained alone reaches "
            f"{alone[0]:.4f}: {100 * (max(good) - alone[0]):+.1f} points to distil."
        )
    return text


def defaults_note(cfg: Config) -> str:
    """Where the CA-MKD settings come from: the study row behind the quickstart's defaults, or that they differ."""
    s = cfg.strategy
    if s.beta == 0.5 and s.feature_weights == "official":
        return f"CA-MKD: β = 0.5 with the authors' feature weights, as in {study_row()}."
    return (
        f"CA-MKD: β = {s.beta:g}, feature weights `{s.feature_weights}` (changed from the quickstart's defaults, "
        f"β = 0.5 with the authors' weights, which {study_row().split(':')[0]} supports)."
    )


def student_costs(
    cfg: Config, s_rows: list[dict[str, Any]], students: list[dict[str, Any]], measured: dict | None = None
) -> dict[str, Any]:
    """Each student's cost (`pipeline/report/deploy.py`) on its row: params, MACs, latency, throughput, student.pt's size;
    an architecture and input the sweep's report measured (`measured`) keep that figure, so the report has one per
    architecture and input."""
    for r, s in zip(s_rows, students):
        r |= {
            "rank": f"student-{s['strategy']}",
            "teachers": "+".join(s["teachers"]) or "-",
            "status": "finished",
        }
        r["best_top1"] = r["val_top1"]
    return leaderboard.add_deploy_costs(
        cfg, s_rows, [s["run_dir"] for s in students], deploy.Bench(), log=lambda *_: None, measured=measured
    )


def pareto_plot(s_rows: list[dict[str, Any]], board: list[dict[str, Any]], url: str) -> str:
    """The four students and the sweep's trials on one accuracy-against-cost plot (report/pareto.png)."""
    rows = [dict(r) for r in s_rows] + [dict(r) for r in board if "latency_ms_b1_p50" in r]
    return deploy.plot_pareto(
        rows, url, "quickstart students and sweep trials: accuracy against cost", leaderboard._plt()
    )


def swapped_classes(cfg: Config) -> dict[str, list[int]]:
    """Teacher name → the classes whose labels its training exchanged (teachers[].train.label_swaps)."""
    return {
        t.name: sorted({c for pair in t.train.label_swaps for c in pair})
        for t in cfg.teachers
        if t.train is not None and t.train.label_swaps
    }


def wrong_teacher_table(
    class_weights: dict[str, dict[str, list[float]]], swaps: dict[str, list[int]], classes: list[str]
) -> list[dict[str, Any]]:
    """Per strategy with per-class weights: the wrong teacher's mean weight on its swapped classes vs the rest."""
    rows = []
    for strategy, per_teacher in class_weights.items():
        for teacher, swapped in swaps.items():
            w = per_teacher.get(teacher)
            if not w:
                continue
            on = sum(w[c] for c in swapped) / len(swapped)
            others = [w[c] for c in range(len(w)) if c not in swapped]
            off = sum(others) / max(len(others), 1)
            rows.append(
                {
                    "strategy": strategy,
                    "teacher": teacher,
                    "swapped_classes": round(on, 3),
                    "other_classes": round(off, 3),
                    "ratio": round(on / off, 3) if off else float("nan"),
                    "classes": [classes[c] for c in swapped],
                }
            )
    return rows
