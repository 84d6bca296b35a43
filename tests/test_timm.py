"""timm models (`timm:<name>`) behind the zoo's contract, and per-model input preprocessing: each teacher's own
normalisation and size applied on the teacher actor and part of its cache's identity, the student's in training.

Real tiny timm models (timm's own `test_*` architectures, random weights), real files, the session's Ray."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import make_teacher_file, tiny_config

import camkd.models as M
from camkd.training import Normalizer
from pipeline.cache import layout, precompute
from pipeline.config import ConfigError, validate
from pipeline.data.ingest import ingest, open_image_part, read_image_rows
from pipeline.data.views import make_view_spec, render_train_view
from pipeline.store import storage, tables
from pipeline.teachers import checkpoints
from pipeline.teachers import stage as teacher_stage
from pipeline.train import driver

timm = pytest.importorskip("timm")

DATASET_MEAN, DATASET_STD = [0.5], [0.25]  # tiny_config's synthetic source
TEACHER_MEAN, TEACHER_STD = [0.40, 0.45, 0.50], [0.20, 0.22, 0.24]
STUDENT_MEAN, STUDENT_STD = [0.45, 0.45, 0.45], [0.30, 0.30, 0.30]


@pytest.fixture
def no_hub(monkeypatch):
    """timm's one entry point for pretrained weights: the adapter must never reach it."""

    def refuse(*args, **kwargs):
        raise AssertionError("camkd.models must never load pretrained weights from a hub")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", refuse)


@pytest.mark.parametrize(
    "name,in_chans,size,fmap",
    [
        ("test_resnet", 1, 28, (96, 1, 1)),  # BasicBlock ResNet: head = global_pool + fc
        ("test_convnext", 3, 64, (64, 2, 2)),  # its head is a child named `head` (norm + fc)
        ("test_mambaout", 3, 64, (64, 2, 2)),  # timm gives NHWC maps: the adapter hands out NCHW
    ],
)
def test_timm_adapter_keeps_the_zoo_contract(name, in_chans, size, fmap, no_hub) -> None:
    torch.manual_seed(0)
    model = M.create(f"timm:{name}", 10, in_chans).eval()
    assert isinstance(model, M.FeatureClassifier) and model.arch == f"timm:{name}"
    assert (model.num_classes, model.in_chans) == (10, in_chans)
    assert model.num_features == model.feature_channels == model.timm_model.num_features == fmap[0]
    assert model.feature_info and model.feature_info[-1]["num_chs"] == fmap[0]
    x = torch.randn(2, in_chans, size, size)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
        assert tuple(features.shape) == (2, *fmap)
        torch.testing.assert_close(model.forward_head(features), logits, rtol=0, atol=0)
        torch.testing.assert_close(model.head(features), logits, rtol=0, atol=0)
        # timm's own names and timm's own forward: a timm state_dict loads as it is
        ref = timm.create_model(name, pretrained=False, num_classes=10, in_chans=in_chans).eval()
        ref.load_state_dict(model.state_dict(), strict=True)
        torch.testing.assert_close(ref(x), logits)
        # the head alone (what precompute ships as head.pt) into a fresh, differently initialised instance
        torch.manual_seed(1)
        fresh = M.create(f"timm:{name}", 10, in_chans).eval()
        assert not torch.equal(fresh.head(features), logits)
        fresh.head.load_state_dict(model.head.state_dict())
        torch.testing.assert_close(fresh.head(features), logits, rtol=0, atol=0)
    assert set(model.head.state_dict()) < set(model.state_dict())
    if name == "test_resnet":
        assert set(model.head.state_dict()) == {"fc.weight", "fc.bias"}
        assert model.default_preprocessing == {
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "input_size": (3, 160, 160),
        }
        assert M.pretrained_preprocessing("timm:test_resnet") == model.default_preprocessing
        # the student's export path: torch.export sees every parameter under timm's names
        program = torch.export.export(model, (x,))
        assert set(program.state_dict) == set(dict(model.named_parameters())) | set(
            n for n, _ in model.named_buffers()
        )
        torch.testing.assert_close(program.module()(x), logits)


def test_timm_names_are_checked_with_close_matches_and_the_fix(monkeypatch) -> None:
    with pytest.raises(ValueError, match=r"unknown timm model 'resnet10x'.*Did you mean timm:resnet10t"):
        M.create("timm:resnet10x", 10)
    with pytest.raises(
        ValueError, match=r"unknown timm model 'hf-hub:timm/resnet18.a1_in1k'.*never from a hub"
    ):
        M.create("timm:hf-hub:timm/resnet18.a1_in1k", 10)
    with pytest.raises(ValueError, match=r"timm:test_vit is a vision transformer.*convolutional"):
        M.create("timm:test_vit", 10)
    with pytest.raises(
        ConfigError,
        match=r"student\.arch = 'timm:mobilenetv3_smal_050'.*Did you mean timm:mobilenetv3_small_050",
    ):
        validate({"student": {"arch": "timm:mobilenetv3_smal_050"}})
    assert validate({"student": {"arch": "timm:resnet18.a1_in1k"}}).student.arch == "timm:resnet18.a1_in1k"
    monkeypatch.setitem(sys.modules, "timm", None)  # as where timm is not installed
    with pytest.raises(ConfigError, match=r"timm:resnet18 needs timm: pip install 'camkd-ray\[timm\]'"):
        validate({"student": {"arch": "timm:resnet18"}})
    with pytest.raises(ImportError, match=r"pip install 'camkd-ray\[timm\]'"):
        M.create("timm:resnet18", 10)


def test_preprocessing_is_in_the_store_identity_only_when_it_is_not_the_default(tmp_path) -> None:
    path = make_teacher_file(tmp_path / "t.pt", "resnet8")

    def ref(**own):
        cfg = tiny_config(
            tmp_path / "root", teachers=[{"name": "t", "arch": "resnet8", "checkpoint": str(path), **own}]
        )
        return cfg, checkpoints.resolve(cfg, cfg.teachers[0], 10, 3)

    cfg, default = ref()
    assert default.id == f"resnet8-{default.sha256[:12]}", "existing configs keep their cache"
    assert checkpoints.TeacherRef.from_dict(default.to_dict()) == default
    same = ref(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])[1]  # the dataset's, spelled out per channel
    assert same.id == default.id and same.mean is None
    own = ref(mean=TEACHER_MEAN, std=TEACHER_STD)[1]
    sized = ref(mean=TEACHER_MEAN, std=TEACHER_STD, input_size=48)[1]
    assert own.id.startswith(default.id + "-p") and own.mean == tuple(TEACHER_MEAN)
    assert len({default.id, own.id, sized.id}) == 3 and sized.input_size == (48, 48)
    assert checkpoints.TeacherRef.from_dict(sized.to_dict()) == sized  # through JSON lists and back
    store = lambda r: storage.teacher_dir(cfg.root, "fp", r.id)
    assert store(own) != store(default)
    with pytest.raises(checkpoints.TeacherError, match=r"teachers\[t\]\.mean has 1 value.*3 channel"):
        ref(mean=[0.4], std=[0.2])
    with pytest.raises(ConfigError, match=r"set both mean and std"):
        tiny_config(tmp_path, student={"arch": "resnet8", "mean": [0.4, 0.4, 0.4]})


def test_preprocessing_pretrained_takes_the_architectures_own_values(tmp_path) -> None:
    def teacher(arch: str, **own):
        t = {"name": "t", "arch": arch, "checkpoint": str(tmp_path / "t.pt"), "preprocessing": "pretrained"}
        return validate({"teachers": [{**t, **own}]}).teachers[0]

    timm_cfg = teacher("timm:resnet18.a1_in1k")  # timm's pretrained_cfg: ImageNet mean/std at 224 px
    assert (timm_cfg.mean, timm_cfg.std) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert timm_cfg.input_size == (224, 224)
    tv = teacher("torchvision:resnet18", mean=[0.5] * 3, std=[0.2] * 3)  # explicit values win
    assert (tv.mean, tv.std, tv.input_size) == ([0.5] * 3, [0.2] * 3, (224, 224))
    with pytest.raises(ConfigError, match=r"resnet8 has no pretrained config.*set mean/std here"):
        teacher("resnet8")


def test_a_timm_teacher_with_its_own_normalisation_through_ingest_teachers_precompute_train(
    ray_cluster, tmp_path
) -> None:
    """A timm teacher (random weights in a local file, timm's own key names) with its own mean/std and input
    size: the actor normalises and resizes with them (the cached logits are the model's on exactly those inputs,
    not on the dataset's), beside a zoo teacher on the dataset's; a timm student then trains from both caches
    (CA-MKD: their feature maps and frozen heads) with its own normalisation."""
    torch.manual_seed(3)
    raw = timm.create_model("test_resnet", pretrained=False, num_classes=10, in_chans=3)
    weights = tmp_path / "test_resnet.pth"
    torch.save(raw.state_dict(), weights)
    cfg = tiny_config(
        tmp_path / "root",
        teachers=[
            {
                "name": "tm",
                "arch": "timm:test_resnet",
                "checkpoint": str(weights),
                "mean": TEACHER_MEAN,
                "std": TEACHER_STD,
                "input_size": 48,
            },
            {
                "name": "zoo",
                "arch": "resnet8",
                "checkpoint": str(make_teacher_file(tmp_path / "zoo.pt", "resnet8")),
            },
        ],
        views={"count": 1, "pad": 2},
        student={"arch": "timm:test_efficientnet", "mean": STUDENT_MEAN, "std": STUDENT_STD},
        strategy={"name": "camkd", "beta": 5.0, "inter_warmup_epochs": 0},
        train={"epochs": 1, "batch_size": 32, "milestones": [], "shuffle_buffer": 0, "export": False},
    )
    meta = ingest(cfg)
    row, zoo = teacher_stage.run_stage(cfg)
    assert row["id"].startswith("timm-test_resnet-") and "-p" in row["id"]
    assert zoo["id"] == f"resnet8-{zoo['sha256'][:12]}", (
        "a teacher on the dataset's normalisation keeps its id"
    )
    summary = precompute.run_stage(cfg)
    t = summary["teachers"][0]
    ref = checkpoints.TeacherRef.from_dict(row)
    assert t["id"] == ref.id and ref.id in t["store"]

    manifest = layout.load_manifest(t["store"], "tm")
    assert manifest.feature_shape == [96, 2, 2], "features at the teacher's 48 px, not the data's 32"
    part = meta.split("train").parts[0]
    url = storage.join(layout.view_dir(t["store"], 0), part.name)
    stored = tables.open_table(url, layout.META_KEY).read(None, ["idx", "logits", "feat"])
    cached = layout.decode_outputs(stored, layout.StoreRef.of(manifest), logits=True, features=True)
    rows = read_image_rows(
        open_image_part(storage.dataset_dir(cfg.root, meta.name, meta.fingerprint), "train", part.name), None
    )
    assert stored["idx"].to_numpy().tolist() == rows["idx"].to_numpy().tolist()
    spec = make_view_spec(cfg, meta.encoding)
    pixels = torch.from_numpy(
        render_train_view(
            rows["image"].combine_chunks(), rows["idx"].to_numpy(), 0, spec, tuple(meta.image_shape)
        )
    )
    model = checkpoints.build_model(ref)
    with torch.no_grad():
        own = model(Normalizer(TEACHER_MEAN, TEACHER_STD, (48, 48))(pixels)).numpy()
        dataset = model(Normalizer(DATASET_MEAN, DATASET_STD, (48, 48))(pixels)).numpy()
    logits = cached["logits"].astype(np.float32)
    np.testing.assert_allclose(logits, own, rtol=2e-3, atol=2e-3)
    assert np.abs(logits - dataset).max() > 50 * np.abs(logits - own).max(), "the dataset's normalisation"

    result = driver.fit(cfg, meta, str(tmp_path / "runs"), "timm")
    assert result.status == "finished" and result.teachers == ["tm", "zoo"]
    student_file = torch.load(result.exports["state_dict"], weights_only=True)
    assert student_file["arch"] == "timm:test_efficientnet"
    assert student_file["normalization"] == {"mean": STUDENT_MEAN, "std": STUDENT_STD}


def test_after_the_torchscript_fallback_the_log_names_what_was_written(tmp_path) -> None:
    """timm's test_convnext cannot be traced by torch.export (its head's children are shared with the model), so
    export falls back to TorchScript; the ONNX export, which needs torch.export too, then fails. The log and the
    summary's exports say what is on disk: student.pt and student.torchscript.pt, never student.pt2."""
    cfg = tiny_config(
        tmp_path / "root",
        student={"arch": "timm:test_convnext"},
        strategy={"name": "ce"},
        train={"epochs": 1, "batch_size": 32, "milestones": [], "shuffle_buffer": 0, "export": True},
    )
    meta = ingest(cfg, log=lambda *_: None)
    run_dir = str(tmp_path / "run")
    plan = driver.make_plan(cfg, meta, run_dir, log=lambda *_: None)
    state = M.create("timm:test_convnext", 10, 3).state_dict()
    logs: list[str] = []
    exports = driver.export_student(cfg, plan, state, run_dir, log=logs.append)
    written = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert "torch_export" not in exports and exports["torchscript"].endswith("student.torchscript.pt"), (
        exports
    )
    assert "student.pt2" not in written and "student.torchscript.pt" in written, written
    assert not any("student.pt2 are written" in line or "student.pt2 is written" in line for line in logs), (
        logs
    )
    assert any("student.pt and student.torchscript.pt are written" in line for line in logs), logs
