"""Ray Tune sweeps: a real sweep with ASHA, its leaderboard and plots, a killed-and-resumed sweep."""

import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import ROOT, teacher_entries

from pipeline import run
from pipeline.config import BindingError, with_updates
from pipeline.report import leaderboard
from pipeline.store import storage
from pipeline.sweep import tune


def sweep_config(cached, root, **tune_section):
    cfg = with_updates(cached[0], {"root": str(root)})
    teachers = teacher_entries({t.name: t.checkpoint for t in cached[0].teachers + cached[1].teachers})
    return with_updates(
        cfg,
        {
            "teachers": teachers,
            "strategy.beta": 5.0,  # see conftest.CAMKD_RUN
            "train.epochs": 2,
            "train.export": False,
            "train.deterministic": False,
            "tune": tune_section,
        },
    )


def copy_root(cached, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(cached[0].root, root)
    return root


@pytest.mark.fault
@pytest.mark.slow
def test_sweep_asha_leaderboard_kill_resume_and_only_its_teachers(cached, tmp_path, ray_cluster, capsys):
    """One real sweep exercises it all: 4 trials (2 strategies × 2 learning rates), ASHA stops the useless learning
    rate, the driver is SIGKILLed after the first trial finished and the re-run resumes without repeating it, and
    teacher t3 (configured, in no trial) has no cache at all, so reading it would fail. Tune does not keep ASHA's
    rungs across the kill: the finished trial's results must be put back, or the later trials are compared only
    with each other and whether the useless rate is stopped depends on where the kill fell."""
    import ray

    root = copy_root(cached, tmp_path)
    cfg = sweep_config(
        cached,
        root,
        teacher_sets=[["t1", "t2"]],
        strategies=["camkd", "aver"],
        space={"train.lr": [0.05, 1e-6]},  # 1e-6 cannot learn in 2 epochs: ASHA should stop it
        asha={"grace_period": 1, "reduction_factor": 2},
        max_concurrent_trials=1,
    )
    fp = cached[2].fingerprint
    t3_dirs = [d for d in storage.listdir(os.path.join(root, "cache", fp)) if d.startswith("wrn_16_1")]
    assert t3_dirs
    shutil.rmtree(os.path.join(root, "cache", fp, t3_dirs[0]))
    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    cmd = [sys.executable, str(ROOT / "pipeline/run.py"), "tune", "--config", str(cfg_file)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    train_root = os.path.join(tune.sweep_dir(cfg), "train")
    deadline = time.time() + 300
    finished_before: list[str] = []
    while time.time() < deadline and not finished_before and proc.poll() is None:
        finished_before = [
            d
            for d in storage.listdir(train_root)
            if storage.exists(os.path.join(train_root, d, "summary.json"))
        ]
        time.sleep(0.05)  # kill as soon as it lands, often before Tune records the trial as finished
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(finished_before) == 1, f"expected exactly one finished trial at kill time: {finished_before}"
    stamp = os.path.getmtime(os.path.join(train_root, finished_before[0], "summary.json"))
    time.sleep(2)  # let Ray reap the killed driver's actors before resuming
    logs: list[str] = []
    result = tune.run_stage(cfg, log=logs.append)
    assert any("resuming the sweep" in line for line in logs)
    assert (
        f"[tune] ASHA: trial {finished_before[0]} comes back with its results of epoch 1–2"
        in capsys.readouterr().out
    )
    assert os.path.getmtime(os.path.join(train_root, finished_before[0], "summary.json")) == stamp, (
        "re-ran a finished trial"
    )

    board = result["leaderboard"]
    assert len(board) == 4 and [r["rank"] for r in board] == [1, 2, 3, 4]
    assert [r["best_top1"] for r in board] == sorted((r["best_top1"] for r in board), reverse=True)
    assert {(r["strategy"], r["settings"]) for r in board} == {
        (s, f"train.lr={lr}") for s in ("camkd", "aver") for lr in ("0.05", "1e-06")
    }
    assert all(r["teachers"] == "t1+t2" for r in board)
    stopped = [r for r in board if r["stopped_early"]]
    assert stopped, f"ASHA stopped no trial: {board}"
    assert all(r["epochs"] < 2 and r["status"] == "stopped" for r in stopped)
    assert any("1e-06" in r["settings"] for r in stopped), "the useless learning rate was never stopped"
    assert all(r["epochs"] == 2 for r in board if r["status"] == "finished")
    assert not os.path.exists(os.path.join(root, "cache", fp, t3_dirs[0]))

    out = result["report_dir"]
    with open(os.path.join(out, "leaderboard.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == [r["trial"] for r in board]
    md = open(os.path.join(out, "leaderboard.md")).read()
    assert md.startswith("| rank | trial | student | teachers |") and md.count("\n") == 6
    # Every row's cost: the architecture's (measured once), and its own student.pt where one was exported.
    student = cfg.student.arch
    assert all(r["student"] == student and r["params"] > 0 and r["macs"] > 0 for r in board), board
    assert all(0 < r["latency_ms_b1_p50"] <= r["latency_ms_b1_p90"] and r["throughput_bN"] > 0 for r in board)
    for r in board:
        exported = os.path.join(train_root, r["trial"], "student.pt")
        assert r["export_bytes"] == (os.path.getsize(exported) if r["status"] == "finished" else ""), r
    assert rows[0]["params"] == str(board[0]["params"]) and rows[0]["latency_ms_b1_p50"]
    top = max(r["best_top1"] for r in board if r["status"] == "finished")
    assert [r["pareto"] for r in board] == [
        r["status"] == "finished" and r["best_top1"] == top for r in board
    ]
    for name in ("best_per_teacher_set.png", "top_trials_curves.png", "camkd_weights.png", "pareto.png"):
        assert open(os.path.join(out, name), "rb").read(8) == b"\x89PNG\r\n\x1a\n", name
    # `report` regenerates the same leaderboard from the stored results alone.
    again = leaderboard.write_sweep_report(cfg, tune.sweep_dir(cfg))
    assert [r["trial"] for r in again["leaderboard"]] == [r["trial"] for r in board]


@pytest.mark.fault
def test_a_sweep_whose_trials_fail_exits_non_zero_naming_each(cached, tmp_path, capsys):
    root = copy_root(cached, tmp_path)
    cfg = sweep_config(cached, root, teacher_sets=[["t1", "t2"]])
    cfg = with_updates(cfg, {"train.epochs": 1})
    fp = cached[2].fingerprint
    t1_dir = next(d for d in os.listdir(os.path.join(root, "cache", fp)) if d.startswith("resnet8-"))
    shutil.rmtree(os.path.join(root, "cache", fp, t1_dir))
    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert run.main(["tune", "--config", str(cfg_file)]) == 2
    err = capsys.readouterr().err
    assert "1 of 1 trial(s) failed" in err, err
    assert "(camkd, teachers t1+t2): CacheError: teacher 't1' has no cache" in err, err
    board = (root / "runs" / cfg.experiment / "sweep" / "report" / "leaderboard.md").read_text()
    assert "| error | " in board and "CacheError" in board


def test_arms_skip_combinations_a_strategy_cannot_take(cached):
    cfg = sweep_config(cached, "/tmp/unused", teacher_set_sizes=[1, 2], strategies=["kd", "camkd", "ce"])
    got = [(a["strategy"], "+".join(a["teachers"])) for a in tune.arms(cfg)]
    assert got == [
        ("kd", "t1"),
        ("kd", "t2"),
        ("kd", "t3"),
        ("camkd", "t1+t2"),
        ("camkd", "t1+t3"),
        ("camkd", "t2+t3"),
        ("ce", ""),
    ]


@pytest.mark.fault
def test_a_sweep_folder_is_bound_to_its_config(cached, tmp_path):
    """Re-running `tune` after editing the sweep must not silently resume the old sweep under the new config."""
    cfg = sweep_config(cached, tmp_path / "root", teacher_sets=[["t1", "t2"]], space={"train.lr": [0.05]})
    out = tune.sweep_dir(cfg)
    tune.check_same_sweep(out, cfg)  # first time: binds the folder
    assert os.path.exists(os.path.join(out, tune.SWEEP_FILE))
    tune.check_same_sweep(out, with_updates(cfg, {"tune.max_concurrent_trials": 2}))  # scheduling only: fine
    edited = with_updates(cfg, {"tune.space": {"train.lr": [0.05, 0.1]}, "train.epochs": 3})
    with pytest.raises(BindingError, match=r"different config \(train\.epochs: 2 → 3; tune\.space") as e:
        tune.check_same_sweep(out, edited)
    assert "another `experiment` name" in str(e.value) and out in str(e.value)
