"""Teachers: import a checkpoint file or train one here; identify it by architecture + sha256 of the file.

Checkpoints are loaded with `torch.load(..., weights_only=True)` only: a file that holds pickled Python objects
is refused. A teacher trained by this project (`pipeline/teachers/stage.py`) is written as a checkpoint that
precompute imports directly. This module never trains and never imports Ray: workers and actors load teachers here.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import pickle
import tarfile
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow.fs as pafs
import torch

from camkd import models
from pipeline.config import Config, TeacherConfig
from pipeline.data import preprocessing
from pipeline.store import storage

MODEL_FORMAT = "camkd-model/1"


class TeacherError(RuntimeError):
    """A teacher checkpoint that cannot be used, phrased for the user."""


@dataclass(frozen=True)
class TeacherRef:
    """A resolved teacher: which file, which architecture, its own input preprocessing (None: the dataset's), and
    its content id."""

    name: str
    arch: str
    checkpoint: str  # URL or absolute path
    sha256: str
    num_classes: int
    in_chans: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    input_size: tuple[int, int] | None = None

    @property
    def id(self) -> str:
        """`<arch>-<sha256[:12]>`, plus `-p<digest>` of its own preprocessing when it has any: outputs cached
        under another normalisation or size are another store; the default keeps the id it always had."""
        base = f"{self.arch.replace(':', '-')}-{self.sha256[:12]}"
        own = {
            k: list(v)
            for k, v in (("mean", self.mean), ("std", self.std), ("input_size", self.input_size))
            if v
        }
        if not own:
            return base
        return f"{base}-p{hashlib.sha256(json.dumps(own, sort_keys=True).encode()).hexdigest()[:8]}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"id": self.id}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TeacherRef:
        own = {k: tuple(d[k]) for k in ("mean", "std", "input_size") if d.get(k)}
        return cls(
            **{k: d[k] for k in ("name", "arch", "checkpoint", "sha256", "num_classes", "in_chans")}, **own
        )


SAFETENSORS_MAGIC_MAX_HEADER = 100_000_000
# The one non-tensor class a weights-only load may build: RepDistiller's `*_last.pth` files pickle the training
# options (`'opt'`, an argparse.Namespace of strings and numbers) next to the weights.
SAFE_CLASSES = [argparse.Namespace]


def _is_safetensors(data: bytes) -> bool:
    """safetensors files start with an 8-byte little-endian header length and a JSON header."""
    if len(data) < 10:
        return False
    n = int.from_bytes(data[:8], "little")
    return 0 < n < min(len(data), SAFETENSORS_MAGIC_MAX_HEADER) and data[8:9] == b"{"


def load_state_dict(data: bytes, where: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Parse checkpoint bytes (weights only) → (state_dict, metadata).

    Accepts this project's model files, `{"state_dict": ...}`, RepDistiller's and mdistiller's `{"model": ...}`
    (RepDistiller's `*_last.pth` also pickle `'opt'`, an argparse.Namespace: the one class allowed besides
    tensors), `.safetensors` files and plain state dicts; strips a DDP `module.` prefix.
    """
    if _is_safetensors(data):
        from safetensors.torch import load as load_safetensors

        try:
            return _strip_module(load_safetensors(data)), {}
        except Exception as e:
            raise TeacherError(f"{where} is not a readable safetensors file: {e}") from None
    try:
        with torch.serialization.safe_globals(SAFE_CLASSES):
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise TeacherError(
            f"refusing to load {where}: it contains pickled Python objects, not just tensors "
            f"(torch.load(weights_only=True) said: {str(e).splitlines()[0]}). Re-save it as a plain state_dict: "
            "torch.save(model.state_dict(), path)"
        ) from None
    except Exception as e:
        raise TeacherError(f"{where} is not a readable PyTorch checkpoint: {e}") from None
    meta: dict[str, Any] = {}
    if isinstance(obj, dict) and obj.get("format") == MODEL_FORMAT:
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TeacherError(f"{where} does not hold a state_dict (a mapping of parameter names to tensors)")
    return _strip_module(obj), meta


def _strip_module(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def save_model_file(url: str, model: models.FeatureClassifier, extra: dict[str, Any] | None = None) -> str:
    """Write a model file precompute can import (`weights_only`-loadable); returns its sha256."""
    payload = {
        "format": MODEL_FORMAT,
        "arch": model.arch,
        "num_classes": model.num_classes,
        "in_chans": model.in_chans,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **(extra or {}),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    storage.write_bytes_atomic(url, data)
    return storage.sha256_bytes(data)


def build_model(ref: TeacherRef, data: bytes | None = None) -> models.FeatureClassifier:
    """Instantiate the teacher's architecture and load its weights (strict), in eval mode."""
    if data is None:
        data = read_checkpoint(ref.checkpoint, ref.name)
    state, _ = load_state_dict(data, ref.checkpoint)
    model = models.create(ref.arch, ref.num_classes, ref.in_chans)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        missing, unexpected = _key_diff(model.state_dict(), state)
        raise TeacherError(
            f"checkpoint {ref.checkpoint} does not fit architecture {ref.arch!r} with {ref.num_classes} classes and "
            f"{ref.in_chans} input channels (missing keys: {missing[:5]}, unexpected keys: {unexpected[:5]}, "
            f"{_shape_hint(e)}); check teachers[].arch and the dataset"
        ) from None
    return model.eval()


def _key_diff(expected: dict, got: dict) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(got)), sorted(set(got) - set(expected))


def _shape_hint(e: RuntimeError) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
    return lines[0] if lines else "shapes differ"


def read_checkpoint(url: str, name: str, member: str | None = None) -> bytes:
    """A checkpoint file's bytes; with `member`, one file inside a tar archive (mdistiller's
    `cifar_teachers.tar` holds `<arch>_vanilla/ckpt_epoch_240.pth` for each teacher), read without extracting
    the rest."""
    if not storage.exists(url):
        raise TeacherError(f"teacher {name!r}: checkpoint {url!r} does not exist; fix teachers[].checkpoint")
    if member is None:
        return storage.read_bytes(url)
    fs, path = storage.pyarrow_fs(url)
    try:
        with fs.open_input_file(path) as f, tarfile.open(fileobj=f, mode="r:*") as tar:
            try:
                info = tar.getmember(member)
            except KeyError:
                names = [m.name for m in tar.getmembers() if m.name.endswith((".pth", ".pt", ".safetensors"))]
                raise TeacherError(
                    f"teacher {name!r}: {url} has no member {member!r}; it holds {names[:12]}"
                    f"{' ...' if len(names) > 12 else ''}; fix teachers[].member"
                ) from None
            extracted = tar.extractfile(info)
            if extracted is None:
                raise TeacherError(f"teacher {name!r}: {member!r} in {url} is not a regular file")
            return extracted.read()
    except tarfile.TarError as e:
        raise TeacherError(
            f"teacher {name!r}: {url} is not a readable tar archive ({e}); fix teachers[].checkpoint"
        ) from None


def trained_checkpoint_url(cfg: Config, teacher: TeacherConfig) -> str:
    return storage.join(storage.teachers_dir(cfg.root, teacher.name), "model.pt")


def imported_checkpoint_url(root: str, arch: str, sha256: str) -> str:
    """Where an imported checkpoint lives inside root: content-addressed, so one copy serves every config."""
    return storage.join(root, "teachers", f"{arch.replace(':', '-')}-{sha256[:12]}", "model.pt")


def _import_index_url(root: str) -> str:
    return storage.join(root, "teachers", "imported.json")


def _source_stamp(url: str) -> dict[str, Any] | None:
    """(size, mtime) of a checkpoint file, or None where it is not reachable from this machine."""
    fs, path = storage.pyarrow_fs(url)
    try:
        info = fs.get_file_info(path)
    except OSError:
        return None
    if info.type == pafs.FileType.NotFound:
        return None
    return {"size": info.size, "mtime": info.mtime_ns}


def _import(cfg: Config, teacher: TeacherConfig, url: str, copy: bool) -> tuple[str, bytes | None, str]:
    """An imported checkpoint → (its URL inside root, its bytes when read here, its sha256).

    The first time, the file is read on the driver and copied to `<root>/teachers/<arch>-<sha[:12]>/model.pt`;
    `<root>/teachers/imported.json` remembers (path, size, mtime) → sha256, so later stages neither re-read and
    re-hash the original nor need it at all: a Tune trial driver on another node finds the copy through the index.
    """
    root = storage.normalize_url(cfg.root)
    index_url = _import_index_url(root)
    index = storage.read_json(index_url) if storage.exists(index_url) else {}
    key = url if teacher.member is None else f"{url}::{teacher.member}"
    known = index.get(key)
    stamp = _source_stamp(url)
    if known and (stamp is None or all(known.get(k) == v for k, v in stamp.items())):
        inside = imported_checkpoint_url(root, teacher.arch, known["sha256"])
        if storage.exists(inside):
            return inside, None, known["sha256"]
    if stamp is None:
        raise TeacherError(
            f"teacher {teacher.name!r}: checkpoint {url!r} does not exist here and was never imported into "
            f"{root}; fix teachers[].checkpoint, or run `python pipeline/run.py teachers` where the file exists"
        )
    data = read_checkpoint(url, teacher.name, teacher.member)
    sha = storage.sha256_bytes(data)
    inside = imported_checkpoint_url(root, teacher.arch, sha)
    if copy:
        if not storage.exists(inside):
            storage.write_bytes_atomic(inside, data)
        index[key] = {"sha256": sha, "arch": teacher.arch, **stamp}
        storage.write_json(index_url, index)
    return inside, data, sha


def resolve(
    cfg: Config,
    teacher: TeacherConfig,
    num_classes: int,
    in_chans: int,
    copy: bool = True,
    data_hw: tuple[int, int] | None = None,
) -> TeacherRef:
    """The TeacherRef of a configured teacher (imported file, or the checkpoint the `teachers` stage trained).
    `data_hw`: the data's [H, W] (`preprocessing.data_hw`); an `input_size` equal to it resizes nothing, so it is
    not part of the id (every stage passes it; without it such a size counts as the teacher's own).

    A checkpoint given by a path outside `root` is copied once into root (see `_import`): every actor, worker and
    trial then reads it from root, so no other node needs the original path. `copy=False` (dry runs) writes
    nothing.
    """
    root = storage.normalize_url(cfg.root).rstrip("/") + "/"
    own = own_preprocessing(cfg, teacher, in_chans, data_hw)
    data = None
    if teacher.checkpoint is not None and not storage.normalize_url(teacher.checkpoint).startswith(root):
        url, data, sha = _import(cfg, teacher, storage.normalize_url(teacher.checkpoint), copy)
        if data is None:  # imported before, under this architecture: checked then, nothing to read now
            return TeacherRef(teacher.name, teacher.arch, url, sha, num_classes, in_chans, *own)
    elif teacher.checkpoint is not None:
        url = storage.normalize_url(teacher.checkpoint)
        data = read_checkpoint(url, teacher.name, teacher.member)
    else:
        url = trained_checkpoint_url(cfg, teacher)
        if not storage.exists(url):
            raise TeacherError(
                f"teacher {teacher.name!r} has not been trained yet ({url} is missing); "
                "run `python pipeline/run.py teachers --config ...` first"
            )
    if data is None:
        data = read_checkpoint(url, teacher.name)
    _, meta = load_state_dict(data, url)
    if meta and (meta.get("arch") != teacher.arch or meta.get("num_classes") != num_classes):
        raise TeacherError(
            f"teacher {teacher.name!r}: {url} holds a {meta.get('arch')} with {meta.get('num_classes')} classes, "
            f"but the config says {teacher.arch} on a {num_classes}-class dataset; fix teachers[].arch or the file"
        )
    return TeacherRef(
        teacher.name, teacher.arch, url, storage.sha256_bytes(data), num_classes, in_chans, *own
    )


def own_preprocessing(
    cfg: Config, teacher: TeacherConfig, in_chans: int, data_hw: tuple[int, int] | None = None
) -> tuple:
    """The teacher's own (mean, std, input_size) for TeacherRef (None where it uses the dataset's)."""
    try:
        return preprocessing.own_values(
            f"teachers[{teacher.name}]",
            teacher.mean,
            teacher.std,
            teacher.input_size,
            in_chans,
            cfg.data.normalization,
            data_hw,
        )
    except ValueError as e:
        raise TeacherError(str(e)) from None


def resolve_all(
    cfg: Config,
    num_classes: int,
    in_chans: int,
    names: list[str] | None = None,
    data_hw: tuple[int, int] | None = None,
) -> list[TeacherRef]:
    chosen = cfg.teachers if names is None else [t for t in cfg.teachers if t.name in names]
    return [resolve(cfg, t, num_classes, in_chans, data_hw=data_hw) for t in chosen]


def teacher_info(cfg: Config, teacher: TeacherConfig) -> dict[str, Any]:
    """What the `teachers` stage recorded about a trained teacher (empty for imported ones)."""
    url = storage.join(storage.teachers_dir(cfg.root, teacher.name), "teacher.json")
    return storage.read_json(url) if storage.exists(url) else {}
