"""`precompute --verify`: the cache checked against its teachers (issue 38). It passes on a fresh cache and fails,
naming the teacher, part, view and rows, on a cache recomputed with another normalisation, on a view rendering
changed after the cache was written, and on flipped values written with valid checksums. Each test works on a copy
of the session's cache (`cached`), never on its files.
"""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from pipeline import run
from pipeline.cache import encode, layout, precompute, stages
from pipeline.cache import verify as cache_verify
from pipeline.config import with_updates
from pipeline.data import views
from pipeline.data.ingest import open_image_part, read_image_rows
from pipeline.store import storage, tables
from pipeline.teachers import checkpoints
from pipeline.train import driver


def _copy(cached, tmp_path):
    """The session's cache root copied: (cfg of t1 + t2, cfg of t3 (top-3 logits, int8 maps), meta)."""
    cfg, cfg_q, meta, *_ = cached
    root = tmp_path / "root"
    shutil.copytree(cfg.root, root)
    return with_updates(cfg, {"root": str(root)}), with_updates(cfg_q, {"root": str(root)}), meta


def _store(cfg, meta, name):
    """(k, ref, store, manifest, PrecomputeSpec) of teacher `name`, as precompute resolves them."""
    spec, fmt = views.make_view_spec(cfg, meta.encoding), layout.output_format(cfg, meta)
    refs = checkpoints.resolve_all(cfg, meta.num_classes, meta.channels)
    stores = [
        layout.store_dir(storage.teacher_dir(cfg.root, meta.fingerprint, r.id), spec, fmt) for r in refs
    ]
    k = [r.name for r in refs].index(name)
    ps = precompute.precompute_spec(cfg, meta, spec, fmt, refs, stores)
    return k, refs[k], stores[k], layout.load_manifest(stores[k]), ps


def _rewrite(cfg, meta, name, view, part, change) -> None:
    """Teacher `name`'s (part, view) rewritten through precompute's own writer (`stages.write_part`: checksummed
    row groups, self-identifying metadata, receipt) with `change(columns, idx)` applied to its stored columns, and
    the manifest's record of the part updated: every check of the bytes still passes."""
    k, _ref, store, manifest, ps = _store(cfg, meta, name)
    url = storage.join(layout.view_dir(store, view), part)
    opened = tables.open_table(url, layout.META_KEY)
    table = opened.read(None, opened.schema.names)
    stored = layout.decode_outputs(table, layout.StoreRef.of(manifest), True, manifest.has_features)
    columns = {key: np.array(v) for key, v in stored.items()}
    idx = table["idx"].to_numpy()
    change(columns, idx)
    record = next(p for r in manifest.views if r.view == view for p in r.parts if p.name == part)
    receipt = stages.write_part(ps, k, part, view, idx, columns, record.correct)
    record.bytes, record.digest = receipt.bytes, receipt.digest
    storage.write_json(layout.manifest_url(store), manifest.model_dump())


def test_verify_passes_on_a_fresh_cache_and_calls_an_older_manifest_unknown(cached, tmp_path):
    cfg, cfg_q, meta = _copy(cached, tmp_path)
    logs: list[str] = []
    summary = cache_verify.verify_cache(cfg, log=logs.append)
    assert summary["ok"] and [t["teacher"] for t in summary["teachers"]] == ["t1", "t2"]
    for t in summary["teachers"]:
        assert t["checked"] == 256 and t["failing_rows"] == 0 and t["top1_differs"] == 0, t
        assert t["rendering"] == "matches" and t["made_by"] is not None, t
        assert 0 < max(t["max_error_over_bound"].values()) <= 1, t
    quantized = cache_verify.verify_cache(cfg_q, samples=64)["teachers"][0]
    assert set(quantized["max_error_over_bound"]) == {
        "top-k values",
        "top-k indices",
        "tail mass",
        "features",
    }
    assert quantized["checked"] == 64 and quantized["failing_rows"] == 0, quantized
    # A manifest written before the probe and version were recorded: unknown, a note, not an error, here and at
    # training's plan.
    _k, _ref, store, _m, _ps = _store(cfg, meta, "t1")
    raw = storage.read_json(layout.manifest_url(store))
    del raw["package_version"], raw["render_probe"]
    storage.write_json(layout.manifest_url(store), raw)
    logs.clear()
    again = cache_verify.verify_cache(cfg, samples=32, log=logs.append)
    assert [t["rendering"] for t in again["teachers"]] == ["unknown", "matches"] and again["ok"]
    assert any("records no rendering probe" in line and "'t1'" in line for line in logs), logs
    driver.make_plan(with_updates(cfg, {"strategy.name": "aver"}), meta, str(tmp_path / "run"))


@pytest.mark.fault
def test_verify_names_the_rows_of_logits_recomputed_with_another_normalisation(cached, tmp_path):
    """t2's cache rewritten with logits and maps of its teacher on views normalised as x/255 (mean 0, std 1)
    instead of the dataset's mean/std: the classic forgotten normalisation."""
    cfg, _, meta = _copy(cached, tmp_path)
    _k, ref, _store_url, manifest, ps = _store(cfg, meta, "t2")
    model = checkpoints.build_model(ref).eval()
    spec = views.make_view_spec(cfg, meta.encoding)
    dataset_dir = storage.dataset_dir(cfg.root, meta.name, meta.fingerprint)

    def renormalised(view, part):
        def change(columns, idx):
            images = read_image_rows(open_image_part(dataset_dir, "train", part), None)["image"]
            pixels = views.render_train(images.combine_chunks(), idx, view, spec, meta.image_shape).pixels
            with torch.no_grad():
                fmap = model.forward_features(torch.from_numpy(pixels).float() / 255)
                logits = model.forward_head(fmap).float()
            stored = encode.encode_logits(logits, ps.fmt) | encode.encode_features(fmap, ps.fmt)
            columns.update({key: t.numpy() for key, t in stored.items()})

        return change

    for record in manifest.views:
        for part in record.parts:
            _rewrite(cfg, meta, "t2", record.view, part.name, renormalised(record.view, part.name))
    with pytest.raises(cache_verify.CacheMismatch) as e:
        cache_verify.verify_cache(cfg, samples=64)
    message = str(e.value)
    assert "teacher 't2', part-0000" in message and " view " in message and "rows [" in message, message
    assert "logits max error" in message and "top-1 differs on" in message, message
    assert "another preprocessing (normalisation" in message and "delete" in message, message
    assert "'t1'" not in message, "t1's cache is untouched and must pass"


@pytest.mark.fault
def test_verify_and_training_name_a_view_rendering_changed_after_the_cache_was_written(
    cached, tmp_path, monkeypatch
):
    cfg, _, meta = _copy(cached, tmp_path)
    rendered = views.render_train

    def mirrored(*args, **kwargs):  # the rendering now mirrors every training view once more
        out = rendered(*args, **kwargs)
        return views.Rendered(np.ascontiguousarray(out.pixels[..., ::-1]), out.decodes)

    monkeypatch.setattr(views, "render_train", mirrored)
    with pytest.raises(cache_verify.CacheMismatch) as e:
        cache_verify.verify_cache(cfg, samples=32)
    message = str(e.value)
    for name in ("t1", "t2"):
        assert (
            f"the cache of teacher {name!r}" in message and "view rendering that has since changed" in message
        )
        assert f"teacher {name!r}, part-0000" in message and "rows [" in message, message
    with pytest.raises(layout.CacheError, match="view rendering that has since changed.*Delete .* re-run"):
        driver.make_plan(with_updates(cfg, {"strategy.name": "aver"}), meta, str(tmp_path / "run"))
    with pytest.raises(layout.CacheError, match="view rendering that has since changed"):
        precompute.run_stage(cfg, log=lambda *_: None)


@pytest.mark.fault
def test_verify_finds_flipped_values_that_keep_every_checksum_valid(cached, tmp_path, capsys):
    """t3's (top-3 logits, int8 maps) part-00001, view 1: in one row its two largest logits swapped, in another
    one channel of its int8 map negated, written with valid checksums, receipt and manifest: only --verify sees
    it, through the CLI (exit 2)."""
    _, cfg_q, meta = _copy(cached, tmp_path)
    rows = {}

    def flip(columns, idx):
        values = columns["topk_values"].astype(np.float32)
        top2 = np.sort(values, 1)[:, -2:]
        r = rows["logits"] = int(np.argmax(top2[:, 1] - top2[:, 0]))  # the clearest top-1 of the part
        a, b = np.argsort(values[r])[-2:]
        columns["topk_values"][r, [a, b]] = columns["topk_values"][r, [b, a]]
        r = rows["features"] = (r + 7) % len(idx)
        channel = int(
            np.abs(columns["feat"][r].astype(np.int32)).reshape(len(columns["feat"][r]), -1).max(1).argmax()
        )
        columns["feat"][r, channel] = -columns["feat"][r, channel]

    _rewrite(cfg_q, meta, "t3", 1, "part-00001.parquet", flip)
    config = tmp_path / "t3.yaml"
    config.write_text(yaml.safe_dump(cfg_q.model_dump(mode="json")))
    assert run.main(["precompute", "--config", str(config), "--verify", "10000"]) == 2
    err = capsys.readouterr().err
    shown = sorted(rows.values())
    assert f"teacher 't3', part-00001.parquet view 1: rows {shown}" in err, err
    assert "top-1 differs on 1 of 64" in err and "features max error" in err, err
    assert "2 of 512 sampled rows differ while the rest agree" in err and "corrupt" not in err, err
    verified = json.loads((tmp_path / "root" / "cache" / meta.fingerprint / "verify.json").read_text())
    assert not verified["ok"] and verified["teachers"][0]["failing_rows"] == 2
