"""Teacher subsets ranked from the cache: exact numbers on hand-made logits, the order and its ties, keep_best, and
the reading of a real cache (the session's `cached` fixture) with its errors."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import teacher_entries

from camkd.losses import confidence_weights
from pipeline import run
from pipeline.cache.layout import CacheError
from pipeline.config import with_updates
from pipeline.store import storage
from pipeline.sweep import rank, tune

# Three teachers, four rows, three classes. Argmax per row: A [0, 1, 0, 1], B [1, 1, 2, 0], C [2, 0, 2, 2].
LABELS = np.array([0, 1, 2, 0])
LOGITS = {
    "A": np.array([[3, 0, 0], [0, 2, 0], [1, 0, 0], [0, 1, 0]], np.float32),  # right on rows 0, 1
    "B": np.array([[0, 4, 0], [0, 1, 0], [0, 0, 3], [2, 0, 0]], np.float32),  # right on rows 1, 2, 3
    "C": np.array([[0, 0, 1], [5, 0, 0], [0, 0, 2], [0, 0, 3]], np.float32),  # right on row 2
}
ALL = [["A"], ["B"], ["C"], ["A", "B"], ["A", "C"], ["B", "C"], ["A", "B", "C"]]


def stack(*names):
    return np.stack([LOGITS[n] for n in names])


def numpy_weights(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """CA-MKD's weights written out: w_k = (1 − softmax_k(CE_k)) / (K − 1), CE of each teacher on each row."""
    z = logits.astype(np.float64)
    m = z.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]
    ce = lse - np.take_along_axis(z, labels[None, :, None], -1)[..., 0]
    soft = np.exp(ce) / np.exp(ce).sum(0)
    return (1 - soft) / (len(logits) - 1)


def test_subset_numbers_by_hand():
    assert rank.teacher_top1(stack("A", "B", "C"), LABELS).tolist() == [0.5, 0.75, 0.25]
    # A + B summed: [3,4,0] → 1 ✗, [0,3,0] → 1 ✓, [1,0,3] → 2 ✓, [2,1,0] → 0 ✓; any of A, B right: every row.
    assert rank.ensemble_top1(stack("A", "B"), LABELS) == 0.75
    assert rank.oracle_top1(stack("A", "B"), LABELS) == 1.0  # averaging and the oracle differ
    # A + B + C: [3,4,1] ✗, [5,3,0] ✗, [1,0,5] ✓, [2,1,3] ✗: averaging in C costs B's rows 1 and 3.
    assert rank.ensemble_top1(stack("A", "B", "C"), LABELS) == 0.25
    assert rank.oracle_top1(stack("A", "B", "C"), LABELS) == 1.0
    # A + C: [3,0,1] ✓, [5,2,0] ✗, [1,0,2] ✓, [0,1,3] ✗; oracle: rows 0, 1 (A), 2 (C).
    assert rank.ensemble_top1(stack("A", "C"), LABELS) == 0.5
    assert rank.oracle_top1(stack("A", "C"), LABELS) == 0.75
    # Disagreement: A≠B on rows 0, 2, 3; A≠C on all four; B≠C on rows 0, 1, 3.
    assert rank.mean_disagreement(stack("A", "B")) == 0.75
    assert rank.mean_disagreement(stack("A", "C")) == 1.0
    assert rank.mean_disagreement(stack("A", "B", "C")) == pytest.approx((0.75 + 1.0 + 0.75) / 3)
    assert rank.mean_disagreement(stack("B")) == 0.0

    for names in (("A", "B"), ("A", "C"), ("B", "C"), ("A", "B", "C")):
        w = rank.camkd_weights(stack(*names), LABELS)
        same = confidence_weights(torch.from_numpy(stack(*names)), torch.from_numpy(LABELS)).numpy()
        np.testing.assert_array_equal(w, same)  # the function training uses, not a copy of it
        np.testing.assert_allclose(w, numpy_weights(stack(*names), LABELS), rtol=1e-5)
        np.testing.assert_allclose(w.sum(0), 1.0, rtol=1e-6)
    # A + B weights [[.981, .577, .189, .212], [.019, .423, .811, .788]]: each row follows its confident right
    # teacher, so the weighted ensemble gets every row (plain averaging: 0.75).
    w_ab = rank.camkd_weights(stack("A", "B"), LABELS)
    assert rank.weighted_top1(stack("A", "B"), LABELS, w_ab) == 1.0
    # A + C: row 3 mixes A's [0,1,0]·.824 with C's [0,0,3]·.176 → class 1, wrong; the rest right.
    w_ac = rank.camkd_weights(stack("A", "C"), LABELS)
    assert rank.weighted_top1(stack("A", "C"), LABELS, w_ac) == 0.75
    np.testing.assert_array_equal(rank.camkd_weights(stack("B"), LABELS), np.ones((1, 4)))

    row = rank.score_subset(stack("A", "B"), LABELS)
    assert row["ensemble_top1"] == 0.75 and row["oracle_top1"] == 1.0 and row["disagreement"] == 0.75
    assert row["camkd_weighted_top1_upper_bound"] == 1.0
    assert row["camkd_mean_weight"] == pytest.approx(numpy_weights(stack("A", "B"), LABELS).mean(1), rel=1e-5)
    alone = rank.score_subset(stack("B"), LABELS)
    assert alone == {
        "ensemble_top1": 0.75,
        "oracle_top1": 0.75,
        "disagreement": 0.0,
        "camkd_mean_weight": [1.0],
        "camkd_weighted_top1_upper_bound": 0.75,
    }

    with pytest.raises(ValueError, match=r"same N, got \[2, 4, 3\] and \[3\]"):
        rank.ensemble_top1(stack("A", "B"), LABELS[:3])
    with pytest.raises(ValueError, match=r"weights must be \[T,N\] = \[2, 4\], got \[4, 2\]"):
        rank.weighted_top1(stack("A", "B"), LABELS, w_ab.T)


def test_rank_order_ties_and_keep_best():
    rows = rank.rank_subsets(LOGITS, LABELS, ALL)
    # (ensemble, oracle): AB (.75, 1), B (.75, .75), AC (.5, .75), A (.5, .5), ABC (.25, 1), BC (.25, .75), C.
    assert [r["teachers"] for r in rows] == [
        ["A", "B"],
        ["B"],
        ["A", "C"],
        ["A"],
        ["A", "B", "C"],
        ["B", "C"],
        ["C"],
    ]
    assert [r["rank"] for r in rows] == list(range(1, 8))
    # Ties: B2 is B's copy. Same ensemble and oracle top-1: fewer teachers first; a full tie keeps the given order.
    with_copy = {**LOGITS, "B2": LOGITS["B"].copy()}
    rows = rank.rank_subsets(with_copy, LABELS, [["B", "B2"], ["B2"], ["B"]])
    assert [r["teachers"] for r in rows] == [["B2"], ["B"], ["B", "B2"]]
    assert rows[2]["disagreement"] == 0.0 and rows[2]["camkd_mean_weight"] == [0.5, 0.5]
    with pytest.raises(ValueError, match=r"no logits for \['D'\]"):
        rank.rank_subsets(LOGITS, LABELS, [["A", "D"]])

    best = rank.rank_subsets(LOGITS, LABELS, ALL)
    kept, dropped = rank.keep_best(best, 2)
    assert kept == [["A", "B"], ["B"]] and dropped == [["A", "C"], ["A"], ["A", "B", "C"], ["B", "C"], ["C"]]
    assert rank.keep_best(best, 10) == ([r["teachers"] for r in best], [])
    assert rank.all_subsets(["A", "B", "C"]) == ALL


def test_keep_best_filters_the_sweeps_arms(cached):
    cfg = with_updates(
        cached[0],
        {
            "teachers": teacher_entries(
                {t.name: t.checkpoint for t in cached[0].teachers + cached[1].teachers}
            ),
            "tune": {
                "teacher_set_sizes": [1, 2],
                "strategies": ["ce", "kd", "camkd"],
                "keep_best_subsets": 2,
            },
        },
    )
    assert tune.sweep_subsets(cfg) == [["t1"], ["t2"], ["t3"], ["t1", "t2"], ["t1", "t3"], ["t2", "t3"]]
    kept = [["t2", "t3"], ["t1"]]
    got = [(a["strategy"], "+".join(a["teachers"])) for a in tune.arms(cfg, kept)]
    assert got == [("ce", ""), ("kd", "t1"), ("camkd", "t2+t3")]  # ce has no subset: it stays
    logs = []
    ranking = {"subsets": [{"teachers": s} for s in [["t2", "t3"], ["t1"], ["t1", "t2"], ["t3"]]]}
    assert tune.log_kept(cfg, ranking, logs.append, "sweeping") == kept
    assert logs == [
        "[tune] tune.keep_best_subsets 2: sweeping 2 of 4 teacher subset(s) ranked from the cache; kept t2+t3, t1; "
        "dropped t1+t2, t3"
    ]
    with pytest.raises(Exception, match="keep_best_subsets"):
        with_updates(cfg, {"tune.keep_best_subsets": 0})


def test_a_real_cache_ranked_from_its_validation_rows(cached, tmp_path):
    cfg, cfg_q, meta, *_ = cached
    val = rank.read_validation_logits(cfg, meta, ["t1", "t2"])
    n = meta.split("train").rows
    lo = n - round(n * cfg.data.val_fraction)
    assert (val.idx_lo, val.idx_hi, val.rows) == (lo, n, n - lo)
    # The same rows read straight from the Parquet files: labels from the image parts, logits from view 0's store.
    dataset = storage.dataset_dir(cfg.root, meta.name, meta.fingerprint)
    images = [
        pq.read_table(os.path.join(dataset, "train", p.name)).to_pydict() for p in meta.split("train").parts
    ]
    label_of = {i: lab for t in images for i, lab in zip(t["idx"], t["label"])}
    assert val.labels.tolist() == [label_of[i] for i in range(lo, n)]
    for name, store in val.stores.items():
        parts = [pq.read_table(os.path.join(store, "view-0000", p.name)) for p in meta.split("train").parts]
        idx = np.concatenate([t["idx"].to_numpy() for t in parts])
        raw = b"".join(b"".join(t["logits"].to_pylist()) for t in parts)
        logits = np.frombuffer(raw, np.float16).reshape(len(idx), meta.num_classes)
        np.testing.assert_array_equal(val.logits[name], logits[(idx >= lo) & (idx < n)].astype(np.float32))
    assert val.augmented and "augmented" in val.describe(cfg.data.val_fraction)
    # Top-k logits (t3's store) come back dense, their top-3 classes first.
    t3 = rank.read_validation_logits(cfg_q, meta, ["t3"]).logits["t3"]
    assert t3.shape == (n - lo, meta.num_classes) and np.isfinite(t3).all()

    subsets = [["t1"], ["t2"], ["t1", "t2"]]
    result = rank.rank_stage(cfg, meta, subsets, str(tmp_path), log=lambda *_: None)
    written = json.loads((tmp_path / rank.RANK_JSON).read_text())
    assert written["rows"] == n - lo and written["idx"] == [lo, n] and written["views_cached"] == 2
    expected = rank.rank_subsets(val.logits, val.labels, subsets)
    assert written["subsets"] == expected == result["subsets"]
    assert written["teacher_top1"] == {
        n_: float(v)
        for n_, v in zip(["t1", "t2"], rank.teacher_top1(np.stack(list(val.logits.values())), val.labels))
    }
    md = (tmp_path / rank.RANK_MD).read_text()
    assert md.startswith("# Teacher subsets ranked from the cache") and md.count("\n| ") == 2 + 3


def test_rank_errors_name_the_setting_the_teacher_and_the_stage(cached, tmp_path, capsys):
    cfg, _, meta, *_ = cached
    with pytest.raises(CacheError, match=r"data\.val_fraction is 0.*--set data\.val_fraction=0\.1"):
        rank.read_validation_logits(with_updates(cfg, {"data.val_fraction": 0}), meta, ["t1"])
    three = with_updates(
        cfg, {"teachers": teacher_entries({t.name: t.checkpoint for t in cfg.teachers + cached[1].teachers})}
    )
    with pytest.raises(
        CacheError, match=r"teacher 't3' has no cache .*Run `python pipeline/run\.py precompute`"
    ):
        rank.read_validation_logits(three, meta, ["t1", "t3"])
    with pytest.raises(CacheError, match=r"teachers \['t9'\] are not configured"):
        rank.read_validation_logits(cfg, meta, ["t1", "t9"])

    # The command line: exit 2 with the fix, no traceback; a root without a dataset names the stages to run.
    cfg_file = tmp_path / "rank.yaml"
    cfg_file.write_text(
        yaml.safe_dump(with_updates(cfg, {"experiment": "rank-test"}).model_dump(mode="json"))
    )
    assert run.main(["rank", "--config", str(cfg_file), "--root", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "is not ingested" in err and "`ingest`, `teachers` and `precompute`" in err, err
    assert run.main(["tune", "--config", str(cfg_file), "--rank-only", "--set", "data.val_fraction=0"]) == 2
    assert "data.val_fraction is 0" in capsys.readouterr().err


def test_rank_and_tune_rank_only_commands(cached, tmp_path, capsys):
    cfg = cached[0]
    exp = {
        "experiment": "rank-cli-test",
        "tune": {"teacher_set_sizes": [1, 2], "strategies": ["kd", "camkd"]},
    }
    cfg_file = str(tmp_path / "rank-cli-test.yaml")
    with open(cfg_file, "w") as f:
        yaml.safe_dump(with_updates(cfg, exp).model_dump(mode="json"), f)
    assert run.main(["rank", "--config", cfg_file]) == 0
    out = capsys.readouterr().out
    rank_dir = os.path.join(cfg.root, "runs", "rank-cli-test", "rank")
    assert f"wrote {rank_dir}/rank.json and {rank_dir}/rank.md" in out and "| rank | teachers |" in out
    assert len(json.load(open(os.path.join(rank_dir, "rank.json")))["subsets"]) == 3
    assert run.main(["tune", "--config", cfg_file, "--rank-only", "--set", "tune.keep_best_subsets=1"]) == 0
    out = capsys.readouterr().out
    sweep = os.path.join(cfg.root, "runs", "rank-cli-test", "sweep")
    assert f"wrote {sweep}/rank.json" in out and "would sweep 1 of 3 teacher subset(s)" in out, out
    assert not os.path.exists(os.path.join(sweep, "tune")), "rank-only trained something"


@pytest.mark.slow
def test_a_sweep_with_keep_best_subsets_trains_only_the_best_ranked(cached):
    """The wiring in `tune.run_stage`: a real one-trial sweep (~45 s on 2 CPUs, most of it Tune and the report)."""
    cfg = with_updates(
        cached[0],
        {
            "experiment": "keep-best-test",
            "train.epochs": 1,
            "train.export": False,
            "tune": {
                "teacher_set_sizes": [1],
                "strategies": ["kd"],
                "keep_best_subsets": 1,
                "asha": {"enabled": False},
            },
        },
    )
    logs = []
    result = tune.run_stage(cfg, log=logs.append)
    ranking = json.load(open(os.path.join(tune.sweep_dir(cfg), rank.RANK_JSON)))
    best, other = (r["teachers"] for r in ranking["subsets"])
    assert [r["teachers"] for r in result["leaderboard"]] == ["+".join(best)]
    assert f"kept {best[0]}; dropped {other[0]}" in "\n".join(logs), logs
