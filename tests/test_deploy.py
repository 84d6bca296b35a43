"""Choosing what to deploy: the latency pass, the Pareto front and the budget choice on hand-made leaderboards,
and `camkd bench-student` on a real student file."""

import json

import pytest
import torch

from camkd import models
from camkd.costs import latency
from pipeline import run
from pipeline.report import deploy
from pipeline.teachers import checkpoints


def row(rank, student, top1, ms, params, status="finished"):
    return {
        "rank": rank,
        "student": student,
        "strategy": "camkd",
        "teachers": "a+b",
        "best_top1": top1,
        "latency_ms_b1_p50": ms,
        "params": params,
        "status": status,
        "student_file": f"/runs/{rank}/student.pt",
    }


BOARD = [
    row(1, "big", 0.90, 9.0, 900_000),
    row(2, "stopped-fast", 0.89, 1.0, 50_000, status="stopped"),  # cheap and good, but no exported student
    row(3, "mid", 0.88, 4.0, 300_000),
    row(4, "mid-worse", 0.87, 5.0, 300_000),  # dominated by #3 (slower and worse)
    row(5, "small", 0.85, 2.0, 80_000),
    row(6, "same-small", 0.85, 2.0, 80_000),  # ties #5: neither dominates the other
]


def test_the_pareto_front_keeps_only_undominated_exported_students():
    front = [BOARD[i]["rank"] for i in deploy.pareto_front(BOARD, "latency_ms_b1_p50")]
    assert front == [5, 6, 3, 1]
    assert [BOARD[i]["rank"] for i in deploy.pareto_front(BOARD, "params")] == [5, 6, 3, 1]


def test_the_best_student_within_a_budget():
    assert deploy.best_within(BOARD)["rank"] == 1
    assert deploy.best_within(BOARD, budget_ms=5.0)["rank"] == 3
    assert deploy.best_within(BOARD, budget_ms=3.0)["rank"] == 5  # not the stopped #2, which has no file
    assert deploy.best_within(BOARD, budget_ms=10, budget_params=100_000)["rank"] == 5
    assert deploy.best_within(BOARD, budget_ms=0.5) is None
    line = deploy.budget_line(BOARD, 0.5, None)
    assert "no finished student fits; the cheapest is #5 small (2.00 ms, 80,000 parameters)" in line, line
    assert deploy.budget_line(BOARD, 5.0, None).startswith("budget ≤ 5 ms batch-1 p50: #3 mid camkd [a+b]")


def test_latency_reports_ordered_percentiles_and_restores_the_model():
    model = models.create("resnet8", 10, 1).train()
    threads = torch.get_num_threads()
    out = latency(model, 1, 28, batch=8, repeats=12, threads=1)
    assert 0 < out["latency_ms_b1_p50"] <= out["latency_ms_b1_p90"]
    assert out["throughput_bN"] > 0 and (out["batch_n"], out["repeats"], out["threads"]) == (8, 12, 1)
    assert model.training and torch.get_num_threads() == threads


def test_bench_student_measures_a_student_file(tmp_path, capsys):
    model = models.create("resnet8", 10, 1)
    path = tmp_path / "student.pt"
    checkpoints.save_model_file(str(path), model, {"input_shape": [1, 28, 28]})
    assert run.main(["bench-student", str(path), "--repeats", "10", "--batch", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["arch"], out["input_shape"], out["params"]) == ("resnet8", [1, 28, 28], 77_754)
    assert out["macs"] == 9_345_920 and out["export_bytes"] == path.stat().st_size
    assert 0 < out["latency_ms_b1_p50"] <= out["latency_ms_b1_p90"] and out["threads"] == 1


def test_bench_student_refuses_what_it_cannot_measure(tmp_path, capsys):
    path = tmp_path / "old.pt"
    checkpoints.save_model_file(str(path), models.create("resnet8", 10, 1))  # no input_shape recorded
    assert run.main(["bench-student", str(path)]) == 2
    assert "does not record its input size" in capsys.readouterr().err
    assert run.main(["bench-student", str(path), "--size", "28,28"]) == 2
    assert "--size '28,28': give channels,height,width" in capsys.readouterr().err
    torch.save({"w": torch.zeros(1)}, tmp_path / "plain.pt")
    assert run.main(["bench-student", str(tmp_path / "plain.pt"), "--size", "1,28,28"]) == 2
    assert "is not a camkd model file" in capsys.readouterr().err


def test_each_run_is_costed_at_its_own_students_input_size(tmp_path):
    """A resnet8 trained at `student.input_size: 64` on 32-px data is costed at 64 px (the MACs its run summary
    and `bench-student` give: its student.pt records that input), beside a resnet8 run at the data's size that is
    costed at 32 px: one measurement per (architecture, input shape), not one per architecture."""
    from conftest import tiny_config

    from camkd.costs import macs_per_image
    from pipeline.data.ingest import ingest
    from pipeline.report import leaderboard

    cfg = tiny_config(tmp_path / "root")
    ingest(cfg, log=lambda *_: None)
    run_dir = tmp_path / "runs" / "at-64"
    run_dir.mkdir(parents=True)
    model = models.create("resnet8", 10, 3)
    checkpoints.save_model_file(str(run_dir / "student.pt"), model, {"input_shape": [3, 64, 64]})
    rows = [
        row(1, "resnet8", 0.9, None, None) | {"updates": {"student.input_size": 64}},
        row(2, "resnet8", 0.8, None, None, status="stopped"),
    ]
    bench = deploy.Bench(repeats=2, batch=2)
    info = leaderboard.add_deploy_costs(cfg, rows, [str(run_dir), None], bench, log=lambda *_: None)
    at_64 = deploy.bench_file(str(run_dir / "student.pt"), bench)
    assert rows[0]["macs"] == at_64["macs"] == macs_per_image(model, 3, 64, 64), rows[0]
    assert rows[1]["macs"] == macs_per_image(model, 3, 32, 32) < rows[0]["macs"], rows[1]
    assert sorted(m["input_shape"] for m in info["measurements"]) == [[3, 32, 32], [3, 64, 64]]


@pytest.mark.parametrize("flag", ["--threads", "--repeats", "--batch"])
def test_bench_settings_must_be_positive(tmp_path, capsys, flag):
    assert run.main(["bench-student", str(tmp_path / "x.pt"), flag, "0"]) == 2
    assert f"{flag} must be at least 1" in capsys.readouterr().err


def test_quiet_console_drops_only_rays_object_store_noise():
    from ray._private.ray_logging import WorkerStandardStreamDispatcher

    from pipeline.ops.runtime import quiet_console

    seen = []
    dispatcher = WorkerStandardStreamDispatcher()
    dispatcher.add_handler("ray_print_logs", lambda data: seen.append(list(data["lines"])))
    noise = (
        "[2026-12-03 06:13:26,179 E 23011 23052] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
        "and ID: 'a6a1' has constructor arguments in the object store and max_restarts > 0"
    )
    assert quiet_console(dispatcher=dispatcher) and quiet_console(
        dispatcher=dispatcher
    )  # twice: wrapped once
    dispatcher.emit({"lines": [noise, "[train] epoch 1", "core_worker.cc:10: a real error"], "pid": 1})
    dispatcher.emit({"lines": [noise], "pid": 1})  # nothing left: the handler is not called
    assert seen == [["[train] epoch 1", "core_worker.cc:10: a real error"]]
