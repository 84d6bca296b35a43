"""Pretrained teachers as users have them: RepDistiller and mdistiller checkpoints, tar members, safetensors."""

import argparse
import io
import tarfile

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import save_file

from camkd import models
from pipeline.data.ingest import ingest
from pipeline.store import storage
from pipeline.teachers import checkpoints
from pipeline.teachers import stage as teacher_stage


def _trained_state(arch: str, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return models.create(arch, 10, 3).state_dict()


def _optimizer_state(state):
    params = [torch.nn.Parameter(v.float()) for v in state.values() if v.is_floating_point()][:3]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    return opt.state_dict()


def test_repdistiller_mdistiller_and_safetensors_teachers_are_imported(tmp_path):
    sd = {n: _trained_state("resnet8", i) for i, n in enumerate(("last", "best", "tar", "st"))}
    # RepDistiller's train_teacher.py: `{'opt': opt, 'model': ...}` for <model>_last.pth (opt is its argparse
    # Namespace) and `{'epoch', 'model', 'best_acc', 'optimizer'}` for ckpt_epoch_*.pth / <model>_best.pth.
    opt = argparse.Namespace(
        model="resnet8", dataset="cifar100", learning_rate=0.05, lr_decay_epochs=[150, 180, 210]
    )
    torch.save({"opt": opt, "model": sd["last"]}, tmp_path / "resnet8_last.pth")
    torch.save(
        {
            "epoch": 240,
            "model": sd["best"],
            "best_acc": torch.tensor(71.3),
            "optimizer": _optimizer_state(sd["best"]),
        },
        tmp_path / "resnet8_best.pth",
    )
    # mdistiller's cifar_teachers.tar: <arch>_vanilla/ckpt_epoch_240.pth, each {"model": ..., ...}
    member = io.BytesIO()
    torch.save(
        {"model": sd["tar"], "epoch": 240, "best_acc": 70.9, "optimizer": _optimizer_state(sd["tar"])}, member
    )
    with tarfile.open(tmp_path / "cifar_teachers.tar", "w") as tar:
        for name, data in (
            ("resnet8_vanilla/ckpt_epoch_240.pth", member.getvalue()),
            ("README", b"teachers"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    save_file(sd["st"], str(tmp_path / "resnet8.safetensors"))
    cfg = tiny_config(
        tmp_path / "root",
        teachers=[
            {"name": "last", "arch": "resnet8", "checkpoint": str(tmp_path / "resnet8_last.pth")},
            {"name": "best", "arch": "resnet8", "checkpoint": str(tmp_path / "resnet8_best.pth")},
            {
                "name": "tar",
                "arch": "resnet8",
                "checkpoint": str(tmp_path / "cifar_teachers.tar"),
                "member": "resnet8_vanilla/ckpt_epoch_240.pth",
            },
            {"name": "st", "arch": "resnet8", "checkpoint": str(tmp_path / "resnet8.safetensors")},
        ],
    )
    ingest(cfg)
    rows = teacher_stage.run_stage(cfg)
    assert [r["name"] for r in rows] == ["last", "best", "tar", "st"]
    for r in rows:
        ref = checkpoints.TeacherRef.from_dict(r)
        assert ref.checkpoint.startswith(str(tmp_path / "root" / "teachers")), "copied into root"
        model = checkpoints.build_model(ref)
        for key, value in sd[r["name"]].items():
            assert torch.equal(model.state_dict()[key], value), (r["name"], key)
    # a member that is not in the archive: the error lists what is
    bad = cfg.teachers[2].model_copy(update={"member": "resnet32x4_vanilla/ckpt_epoch_240.pth"})
    with pytest.raises(
        checkpoints.TeacherError, match=r"has no member 'resnet32x4_vanilla.*it holds \['resnet8_vanilla"
    ):
        checkpoints.resolve(cfg.model_copy(update={"root": str(tmp_path / "other")}), bad, 10, 3)


def test_an_imported_teacher_needs_neither_its_file_nor_a_rehash_once_copied(tmp_path):
    """A Tune trial driver on another node has no /data/teachers: the copy in root and its index serve it."""
    path = tmp_path / "elsewhere" / "t.pth"
    path.parent.mkdir()
    torch.save({"model": _trained_state("resnet8", 0)}, path)
    cfg = tiny_config(tmp_path / "root", teachers=[{"name": "t", "arch": "resnet8", "checkpoint": str(path)}])
    first = checkpoints.resolve(cfg, cfg.teachers[0], 10, 3)
    index = storage.read_json(str(tmp_path / "root" / "teachers" / "imported.json"))
    assert index[str(path)]["sha256"] == first.sha256
    path.unlink()  # as on a node that never had the file
    again = checkpoints.resolve(cfg, cfg.teachers[0], 10, 3)
    assert again == first and again.checkpoint.endswith("/model.pt")
    checkpoints.build_model(again)


def test_a_teacher_input_size_equal_to_the_datas_keeps_the_cache_identity(tmp_path):
    """`input_size: 32` on 32-px data resizes nothing: the teacher keeps the id (and so the cache) it has without
    it; another size is another store."""
    path = tmp_path / "t.pt"
    torch.save(_trained_state("resnet8", 0), path)

    def teacher_id(**own) -> str:
        cfg = tiny_config(
            tmp_path / "root", teachers=[{"name": "t", "arch": "resnet8", "checkpoint": str(path), **own}]
        )
        ingest(cfg, log=lambda *_: None)
        return teacher_stage.run_stage(cfg, log=lambda *_: None)[0]["id"]

    plain = teacher_id()
    assert teacher_id(input_size=32) == teacher_id(input_size=[32, 32]) == plain
    assert teacher_id(input_size=48) != plain
