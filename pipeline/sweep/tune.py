"""Ray Tune sweeps over teacher subsets, strategies and hyper-parameters, with ASHA early stopping.

Each trial is a Ray Train run (a Tune function trainable that builds and fits a TorchTrainer whose reports reach
Tune through TuneReportCallback) that reads only its own teachers' columns from the one shared cache. An
interrupted sweep resumes with `Tuner.restore` without re-running finished trials. With `tune.keep_best_subsets`
the teacher subsets are first ranked from the cache (`pipeline/sweep/rank.py`) and only the best ones are swept.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from camkd import strategy_class
from pipeline.config import Config, Domain, bind_config, validate, with_updates
from pipeline.data.ingest import DatasetMeta, require_dataset
from pipeline.report.leaderboard import error_summary, write_sweep_report
from pipeline.store import storage
from pipeline.sweep import rank
from pipeline.train.driver import TrainingError
from pipeline.train.reporting import NON_METRIC_KEYS

TRIAL_TRAINABLE = "camkd_trial"
SWEEP_FILE = "sweep.json"
# Fields a sweep may resume under changed: where Ray runs, how many trials run at once, how rows are read.
SWEEP_NEUTRAL = (
    "ray",
    "tracking",
    "train.max_failures",
    "scaling.check_resources",
    "train.export",
    "tune.max_concurrent_trials",
    "scaling.reader",
    "scaling.read_threads",
    "scaling.read_cpus",
    "scaling.read_tasks",
    "scaling.read_ahead",
    "scaling.read_ahead_mb",
    "scaling.read_budget",
    "scaling.read_object_store_mb",
    "storage",
)


def sweep_dir(cfg: Config) -> str:
    return storage.join(storage.runs_dir(cfg.root, cfg.experiment), "sweep")


def arms(cfg: Config, subsets: list[list[str]] | None = None) -> list[dict[str, Any]]:
    """(strategy, teacher set) pairs to try; combinations a strategy cannot take (kd with 3 teachers) are skipped.
    With `subsets`, only the arms whose teacher set is one of them (and the arms without teachers)."""
    names = [t.name for t in cfg.teachers]
    t = cfg.tune
    if t.teacher_sets:
        sets = [list(s) for s in t.teacher_sets]
    elif t.teacher_set_sizes:
        sets = [list(c) for size in t.teacher_set_sizes for c in itertools.combinations(names, size)]
    else:
        sets = [names]
    out = []
    for strategy in t.strategies:
        cls = strategy_class(strategy)
        if cls.max_teachers == 0:
            out.append({"strategy": strategy, "teachers": []})
            continue
        for s in sets:
            try:
                cls.check_teachers(s)
            except ValueError:
                continue
            out.append({"strategy": strategy, "teachers": s})
    if subsets is not None:
        allowed = {tuple(s) for s in subsets}
        out = [a for a in out if not a["teachers"] or tuple(a["teachers"]) in allowed]
    if not out:
        raise ValueError(
            f"tune: no valid (strategy, teacher set) combination among strategies {t.strategies} and teacher "
            f"sets {sets}; e.g. camkd needs at least 2 teachers, kd exactly 1"
        )
    return out


def sweep_subsets(cfg: Config) -> list[list[str]]:
    """The distinct teacher subsets the sweep's arms train from, in arm order (ce's empty set is none)."""
    seen: dict[tuple[str, ...], list[str]] = {}
    for a in arms(cfg):
        if a["teachers"]:
            seen.setdefault(tuple(a["teachers"]), list(a["teachers"]))
    return list(seen.values())


def ranking_subsets(cfg: Config) -> list[list[str]]:
    """What the `rank` stage ranks: the sweep's subsets when tune.teacher_sets / teacher_set_sizes say which,
    else every non-empty subset of the configured teachers."""
    if cfg.tune.teacher_sets or cfg.tune.teacher_set_sizes:
        return sweep_subsets(cfg)
    return rank.all_subsets([t.name for t in cfg.teachers])


def rank_only(cfg: Config, log=print) -> dict[str, Any]:
    """`tune --rank-only`: rank the subsets this sweep would train, from the cache; write rank.json/rank.md into
    the sweep folder; train nothing (no Ray)."""
    meta = rank.require_cached_dataset(cfg)
    result = rank.rank_stage(cfg, meta, sweep_subsets(cfg), sweep_dir(cfg), log=log)
    if cfg.tune.keep_best_subsets is not None:
        log_kept(cfg, result, log, "would sweep")
    return result


def log_kept(cfg: Config, result: dict[str, Any], log, verb: str) -> list[list[str]]:
    """The subsets tune.keep_best_subsets keeps from a ranking, logged with the ones it drops."""
    kept, dropped = rank.keep_best(result["subsets"], cfg.tune.keep_best_subsets)

    def names(sets: list[list[str]]) -> str:
        return ", ".join("+".join(s) for s in sets) or "none"

    log(
        f"[tune] tune.keep_best_subsets {cfg.tune.keep_best_subsets}: {verb} {len(kept)} of "
        f"{len(result['subsets'])} teacher subset(s) ranked from the cache; kept {names(kept)}; dropped "
        f"{names(dropped)}"
    )
    return kept


def _domain(value: Domain | list[Any], search: str):
    from ray import tune

    if isinstance(value, list):
        return tune.grid_search(value) if search == "grid" else tune.choice(value)
    if value.grid is not None:
        return tune.grid_search(value.grid)
    if value.choice is not None:
        return tune.choice(value.choice)
    if value.uniform is not None:
        return tune.uniform(*value.uniform)
    if value.loguniform is not None:
        return tune.loguniform(*value.loguniform)
    return tune.randint(value.randint[0], value.randint[1] + 1)


def param_space(cfg: Config, subsets: list[list[str]] | None = None) -> dict[str, Any]:
    from ray import tune

    all_arms = arms(cfg, subsets)
    space: dict[str, Any] = {
        "arm": tune.grid_search(all_arms) if cfg.tune.search == "grid" else tune.choice(all_arms)
    }
    for key, value in cfg.tune.space.items():
        space[key] = _domain(value, cfg.tune.search)
    return space


def trial_config(base: Config, trial: dict[str, Any]) -> Config:
    """The full config of one trial: the base config with the trial's arm and sampled values."""
    arm = trial["arm"]
    updates = {"strategy.name": arm["strategy"], "strategy.teachers": arm["teachers"] or None}
    updates.update({k: v for k, v in trial.items() if k != "arm"})
    return with_updates(base, updates)


def run_trial(trial: dict[str, Any], base: dict[str, Any], meta: dict[str, Any], train_root: str) -> None:
    """Tune function trainable: one Ray Train run, its per-epoch reports forwarded to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.train.checkpoint import checkpointed_epochs
    from pipeline.train.driver import fit

    cfg = trial_config(validate(base, "sweep base config"), trial)
    trial_id = ray.tune.get_context().get_trial_id()
    done_before = checkpointed_epochs(storage.join(train_root, trial_id))
    summary = fit(
        cfg,
        DatasetMeta.model_validate(meta),
        train_root,
        trial_id,
        callbacks=[TuneReportCallback()],
        preflight=False,
    )
    if summary.epochs <= done_before:
        # The run had trained every epoch before this attempt (the driver died between the last epoch and Tune
        # recording it): nothing was reported this time, so hand Tune the last epoch's metrics from the record.
        last = {k: v for k, v in summary.history[-1].items() if k not in NON_METRIC_KEYS}
        ray.tune.report(last)


def check_same_sweep(out: str, cfg: Config) -> None:
    """A sweep folder is bound to its config: resuming it under another one would mix two sweeps silently."""
    bind_config(
        storage.join(out, SWEEP_FILE),
        cfg,
        SWEEP_NEUTRAL,
        f"the sweep at {out}",
        f"Use another `experiment` name for the new sweep, or delete {out} to start it over",
    )


def run_stage(cfg: Config, log=print, verbose: int = 1) -> dict[str, Any]:
    """The `tune` stage: run (or resume) the sweep, then write the leaderboard and plots. `verbose` is Tune's
    console output (0: none — our own lines and the leaderboard only, as the quickstart prints; 1: its status
    tables and each trial's result when it ends)."""
    from ray import tune

    from pipeline.ops.runtime import check_resources, check_root_shared, ensure_ray

    meta = require_dataset(cfg, log=log)
    ensure_ray(cfg, log=log)
    check_resources(cfg, trials=cfg.tune.max_concurrent_trials)
    out = sweep_dir(cfg)
    storage.check_writable(out)
    check_root_shared(cfg.root)
    check_same_sweep(out, cfg)
    fs, path = storage.pyarrow_fs(storage.join(out, "tune"))
    base = cfg.model_dump(mode="json")
    base["tune"] = {}
    trainable = tune.with_parameters(
        run_trial, base=base, meta=meta.model_dump(), train_root=storage.join(out, "train")
    )
    trainable = tune.with_resources(trainable, {"cpu": cfg.tune.trial_cpus})
    started = time.time()
    if tune.Tuner.can_restore(path + "/" + TRIAL_TRAINABLE, storage_filesystem=fs):
        log(
            f"[tune] resuming the sweep at {storage.join(out, 'tune', TRIAL_TRAINABLE)} (finished trials are kept)"
        )
        tuner = tune.Tuner.restore(
            path + "/" + TRIAL_TRAINABLE, trainable, resume_errored=True, storage_filesystem=fs
        )
    else:
        tuner = new_tuner(cfg, meta, trainable, out, (fs, path), verbose, log)
    grid = tuner.fit()
    errors = [r for r in grid if r.error is not None]
    log(f"[tune] {len(grid)} trial(s) done in {time.time() - started:.0f} s ({len(errors)} errored)")
    report = write_sweep_report(cfg, out, log=log)
    report["seconds"] = round(time.time() - started, 1)
    storage.write_json(storage.join(out, "summary.json"), report)
    if errors:
        raise SweepError(failure_message(out, len(grid), errors, report["leaderboard"]))
    return report


def new_tuner(cfg: Config, meta: DatasetMeta, trainable, out: str, fs_path, verbose: int, log):
    """A new sweep: its ASHA scheduler, the teacher subsets it keeps (ranked first, with `tune.keep_best_subsets`)
    and its search space."""
    from ray import tune

    from pipeline.sweep.asha import ResumableASHA

    t = cfg.tune
    scheduler = (
        ResumableASHA(
            storage.join(out, "train"),
            time_attr="epoch",
            max_t=cfg.train.epochs,
            grace_period=min(t.asha.grace_period, cfg.train.epochs),
            reduction_factor=t.asha.reduction_factor,
            stop_last_trials=False,  # a trial at its last epoch finishes itself: summary + export get written
        )
        if t.asha.enabled
        else None
    )
    kept = None
    if t.keep_best_subsets is not None:
        ranking = rank.rank_stage(cfg, meta, sweep_subsets(cfg), out, log=log)
        kept = log_kept(cfg, ranking, log, "sweeping")
    log(
        f"[tune] sweep of {len(arms(cfg, kept))} (strategy, teacher set) arm(s) × space {list(t.space)}; "
        f"search {t.search}, ASHA {'on' if scheduler else 'off'}, {t.max_concurrent_trials} concurrent → "
        f"{storage.join(out, 'tune', TRIAL_TRAINABLE)}"
    )
    fs, path = fs_path
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg, kept),
        tune_config=tune.TuneConfig(
            metric=t.metric,
            mode="max",
            scheduler=scheduler,
            num_samples=t.num_samples,
            max_concurrent_trials=t.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=TRIAL_TRAINABLE, storage_path=path, storage_filesystem=fs, verbose=verbose
        ),
    )


class SweepError(TrainingError):
    """Trials of a sweep failed; the message names each one and why, one line per trial."""


def failure_message(out: str, total: int, errors: list, board: list[dict[str, Any]]) -> str:
    """One line per failed trial (trial, arm, parameters, the exception line), then where to look and the fix."""
    by_trial = {r["trial"]: r for r in board if r["status"] == "error"}
    lines = []
    for result in errors:
        name = (result.path or "").rstrip("/").rsplit("/", 1)[-1]
        row = next((r for t, r in by_trial.items() if t in name), None)
        why = row["error"] if row and row["error"] else error_summary(str(result.error))
        arm = f"{row['strategy']}, teachers {row['teachers']}" if row else "?"
        params = f", {row['settings']}" if row and row["settings"] else ""
        lines.append(f"  - trial {row['trial'] if row else name} ({arm}{params}): {why}")
    return (
        f"the sweep at {out}: {len(errors)} of {total} trial(s) failed:\n"
        + "\n".join(lines)
        + f"\nThe leaderboard ({storage.join(out, 'report', 'leaderboard.md')}) lists every trial. Fix the cause "
        "and run `tune` again: finished trials are kept, failed ones run again."
    )
