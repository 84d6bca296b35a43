"""The configuration schema: one typed tree for every stage, its defaults, and the checks each field must pass.

Loaded once at the edge (`pipeline/config/loading.py`: YAML file + `--set` overrides); stages receive validated
`Config` objects and never read the environment or raw dicts themselves.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any, Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from camkd.models import available as available_models
from camkd.models import check_timm_name
from camkd.strategies import STRATEGIES, StrategyParams
from pipeline.data.preprocessing import check_own, square_size

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
StrategyName = Literal[tuple(STRATEGIES)]
SourceKind = Literal[
    "fashion-mnist",
    "mnist",
    "idx",
    "cifar10",
    "cifar100",
    "imagefolder",
    "webdataset",
    "huggingface",
    "synthetic",
]

# Per-dataset normalisation (mean, std) and default locations; the user's config may override all of them.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "fashion-mnist": {"mean": [0.2860], "std": [0.3530], "path": "/usr/share/datasets/fashion-mnist"},
    "mnist": {"mean": [0.1307], "std": [0.3081], "path": "/usr/share/datasets/mnist"},
    "idx": {"mean": [0.5], "std": [0.25], "path": None},
    "cifar10": {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616], "path": None},
    "cifar100": {"mean": [0.5071, 0.4865, 0.4409], "std": [0.2673, 0.2564, 0.2762], "path": None},
    "imagefolder": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "path": None},
    "webdataset": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "path": None},
    "huggingface": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "path": None},
    "synthetic": {"mean": [0.5], "std": [0.25], "path": None},
}
SMALL_LR_ARCHS = ("MobileNetV2", "MobileNetV2_conv2", "ShuffleV1", "ShuffleV2")


class ConfigError(ValueError):
    """A configuration problem, already phrased for the user (field path, bad value, what is allowed)."""


def absolute_location(value: str) -> str:
    """A local path made absolute against the current working directory (`~` expanded); a URL kept as it is.

    Config fields that name files or folders are resolved this way when the config is validated, which happens
    first on the driver: Ray runs trials, jobs and workers in other working directories, so a relative path
    that reached them would point somewhere else (a sweep's trials once looked for `./camkd-runs` inside their
    own Tune trial folders).
    """
    if "://" in value:
        return value.rstrip("/")
    return os.path.abspath(os.path.expanduser(value))


class BindingError(ConfigError):
    """A run or sweep folder was started with another config; resuming it would mix two experiments."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticData(Strict):
    """Random images whose class is a fixed pattern plus noise: learnable, for tests and benchmarks."""

    num_classes: int = Field(10, ge=2, description="classes (one fixed pattern each)")
    train: int = Field(512, ge=1, description="training images")
    test: int = Field(128, ge=1, description="test images")
    size: int = Field(32, ge=8, description="side of the square images")
    channels: Literal[1, 3] = Field(3, description="1 (grey) or 3 (RGB)")
    noise: float = Field(0.5, ge=0, description="standard deviation of the noise added to the pattern")
    seed: int = Field(0, description="seed of the patterns and the noise")


class DataConfig(Strict):
    """The image source and how ingest stores it: Parquet image parts in a seeded, class-stratified order."""

    source: SourceKind = Field(
        "fashion-mnist", description="where the images come from (the format of data.path)"
    )
    path: str | None = Field(None, description="folder holding the source files; default per source")
    name: str | None = Field(
        None, pattern=NAME_RE, description="dataset name in storage; default: the source"
    )
    download: bool = Field(
        False, description="fetch with torchvision when the files are absent (needs internet)"
    )
    rows_per_part: int = Field(
        2048, ge=1, le=1_000_000, description="rows per stored image part (and per teacher cache part)"
    )
    row_group_rows: int = Field(
        1024,
        ge=1,
        le=1_000_000,
        description="rows per Parquet row group: the unit a read task reads and yields (its memory); smaller for "
        "large rows (224-px images: 256)",
    )
    compression: Literal["none", "snappy", "zstd", "lz4"] = Field(
        "lz4",
        description="codec of the stored image parts; not part of the dataset's identity (a dataset already "
        "ingested keeps its codec). Default lz4: the cheapest of these to decode, which is what a read task of "
        "raw-pixel images spends most on (docs/performance.md)",
    )
    order_seed: int = Field(0, description="seed of the stored, class-stratified random row order")
    val_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="tail of the (stratified) training split held out for validation; 0: validate on the test "
        "split (then model selection sees test data)",
    )
    limit_train: int | None = Field(None, ge=1, description="keep a class-balanced subset of this many rows")
    limit_test: int | None = Field(
        None, ge=1, description="keep a class-balanced subset of this many test rows"
    )
    subset_seed: int = Field(0, description="seed of the class-balanced subsets (limit_train, limit_test)")
    image_size: int = Field(
        224, ge=8, description="imagefolder: output side of the training crop / eval crop"
    )
    eval_resize: int = Field(256, ge=8, description="imagefolder: shorter side before the eval center crop")
    image_column: str = Field("image", description="huggingface: the column of encoded images")
    label_column: str = Field("label", description="huggingface: the column of class indices")
    mean: list[float] | None = Field(
        None, description="input normalisation, one value per channel (with std); default: the source's"
    )
    std: list[float] | None = Field(None, description="see mean")
    synthetic: SyntheticData = SyntheticData()

    @field_validator("path")
    @classmethod
    def _absolute_path(cls, v: str | None) -> str | None:
        return None if v is None else absolute_location(v)

    @property
    def dataset_name(self) -> str:
        return self.name or self.source

    @property
    def source_path(self) -> str | None:
        return self.path or DATASET_DEFAULTS[self.source]["path"]

    @property
    def normalization(self) -> tuple[list[float], list[float]]:
        d = DATASET_DEFAULTS[self.source]
        return list(self.mean or d["mean"]), list(self.std or d["std"])

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if (self.mean is None) != (self.std is None):
            raise ValueError("set both data.mean and data.std, or neither (per-source defaults are used)")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"data.std must be positive, got {self.std}")
        if (
            self.source in ("idx", "cifar10", "cifar100", "imagefolder", "webdataset", "huggingface")
            and not self.path
        ):
            raise ValueError(
                f"data.path is required for source {self.source!r}: the folder holding its files"
            )
        return self


class ViewConfig(Strict):
    """Augmentation replay: V views per training image, each a pure function of (seed, idx, view)."""

    count: int = Field(4, ge=1, le=1024, description="V: views cached per training image")
    seed: int = Field(0, description="seed of every view's crop and flip")
    pad: int = Field(4, ge=0, le=64, description="padded random crop (fixed-size sources); 0 disables")
    flip: bool = Field(True, description="random horizontal flip")
    scale: tuple[float, float] = Field(
        (0.08, 1.0), description="encoded images: RandomResizedCrop's range of the crop's area (fraction)"
    )
    ratio: tuple[float, float] = Field(
        (3 / 4, 4 / 3), description="encoded images: its range of aspect ratios"
    )
    decode: Literal["full", "draft"] = Field(
        "full",
        description="encoded images: full-size decode, or JPEG draft mode (DCT-scaled to the size the crop needs; "
        "faster, slightly different pixels)",
    )

    @model_validator(mode="after")
    def _check(self) -> ViewConfig:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"views.scale must satisfy 0 < lo <= hi <= 1, got {list(self.scale)}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"views.ratio must satisfy 0 < lo <= hi, got {list(self.ratio)}")
        return self


class TeacherTraining(Strict):
    """How the `teachers` stage trains a teacher that has no checkpoint (CE on the ingested training split)."""

    epochs: int = Field(10, ge=1, description="training epochs")
    lr: float | None = Field(None, gt=0, description="default: as train.lr's default for the teacher's arch")
    batch_size: int = Field(64, ge=1, description="global batch size")
    label_noise: float = Field(0.0, ge=0, le=1, description="fraction of training labels replaced at random")
    limit_train: int | None = Field(
        None, ge=1, description="train on the first N rows only (a weaker teacher)"
    )
    label_swaps: list[tuple[int, int]] = Field(
        default_factory=list,
        description="class pairs whose labels are exchanged for training: a confidently wrong teacher",
    )
    seed: int = Field(0, description="seed of the initialisation and the data order")


class Network(Strict):
    """What a teacher and the student both are: an architecture (`arch`) and its inputs' size (`input_size`),
    checked the same way for both."""

    @field_validator("arch", check_fields=False)
    @classmethod
    def _arch(cls, v: str) -> str:
        return _check_arch(v)

    @field_validator("input_size", mode="before", check_fields=False)
    @classmethod
    def _size(cls, v: Any) -> Any:
        return square_size(v)


class TeacherConfig(Network):
    """One teacher: a checkpoint to import, or `train` to train it here."""

    name: str = Field(
        pattern=NAME_RE,
        description="unique; strategy.teachers, tune.teacher_sets and the logged weights use it",
    )
    arch: str = Field(description="a camkd.models name, torchvision:<name> or timm:<name>")
    checkpoint: str | None = Field(
        None,
        description="checkpoint to import (weights_only=True): this project's model files, RepDistiller / mdistiller "
        "checkpoints ({'model': ...}, incl. *_last.pth), plain state dicts, .safetensors, or a tar archive with `member`",
    )
    member: str | None = Field(
        None,
        description="the file inside a tar `checkpoint`, e.g. resnet32x4_vanilla/ckpt_epoch_240.pth (mdistiller)",
    )
    train: TeacherTraining | None = None
    mean: list[float] | None = Field(
        None,
        description="the teacher's input normalisation, one value per channel (with std), applied on the teacher "
        "actor; default: the dataset's. Part of the cache's identity when set (timm's pretrained_cfg or "
        "torchvision's weights meta say what pretrained weights expect)",
    )
    std: list[float] | None = Field(None, description="see mean")
    input_size: tuple[int, int] | None = Field(
        None, description="[H, W] (or one side) the teacher's inputs are resized to; default: the data's size"
    )
    preprocessing: Literal["data", "pretrained"] = Field(
        "data",
        description="where mean/std/input_size come from when not set here: `data` (the dataset's) or "
        "`pretrained` (timm's pretrained_cfg or torchvision's weights meta for `arch`: for a checkpoint holding "
        "those pretrained weights)",
    )

    @model_validator(mode="before")
    @classmethod
    def _pretrained(cls, data: Any) -> Any:
        """`preprocessing: pretrained`: mean/std/input_size not set here come from the architecture's pretrained
        config (explicit values win; an unknown architecture is left to the `arch` check)."""
        if not isinstance(data, dict) or data.get("preprocessing") != "pretrained":
            return data
        from camkd.models import pretrained_preprocessing

        try:
            pre = pretrained_preprocessing(str(data.get("arch", "")))
        except (ImportError, ValueError, RuntimeError, KeyError):
            pre = None
        if not pre or not pre.get("mean"):
            return data
        data = dict(data)
        if data.get("mean") is None and data.get("std") is None:
            data["mean"], data["std"] = [float(m) for m in pre["mean"]], [float(x) for x in pre["std"]]
        size = tuple(pre.get("input_size") or ())[-2:]
        if data.get("input_size") is None and len(size) == 2:
            data["input_size"] = [int(size[0]), int(size[1])]
        return data

    @field_validator("checkpoint")
    @classmethod
    def _absolute_checkpoint(cls, v: str | None) -> str | None:
        return None if v is None else absolute_location(v)

    @model_validator(mode="after")
    def _one_source(self) -> TeacherConfig:
        if (self.checkpoint is None) == (self.train is None):
            raise ValueError(
                f"teacher {self.name!r}: give exactly one of `checkpoint` (import a file) or `train` (train it here)"
            )
        if self.member is not None and self.checkpoint is None:
            raise ValueError(
                f"teacher {self.name!r}: `member` names a file inside the tar archive `checkpoint`"
            )
        if self.preprocessing == "pretrained" and self.mean is None:
            raise ValueError(
                f"teacher {self.name!r}: preprocessing: pretrained, but {self.arch} has no pretrained config "
                "(only timm: and torchvision: architectures have one); set mean/std here or use preprocessing: data"
            )
        check_own(f"teachers[{self.name}]", self.mean, self.std, self.input_size)
        return self


class CacheConfig(Strict):
    """What precompute stores per teacher and view, and the Ray resources its stages ask for."""

    logits: Literal["fp16", "topk"] = Field(
        "fp16", description="fp16: every logit; topk: the topk largest plus one value for the tail's mass"
    )
    topk: int = Field(10, ge=1, description="kept logits per view when logits: topk")
    features: Literal["auto", "fp16", "int8", "none"] = Field(
        "auto", description="auto: fp16 when a configured strategy needs features, else none"
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="teacher inference precision (bf16/fp16: autocast on GPU); part of the cache's identity",
    )
    batch_size: int = Field(256, ge=1, description="teacher inference batch size")
    actors: int | Literal["auto"] = Field(
        "auto", description="teacher replicas (each runs every teacher); auto: one per GPU or per CPU slot"
    )
    max_actors: int | None = Field(
        None,
        ge=1,
        description="the most replicas the pool grows to (with actors: auto); default: the autoscaler's maximum "
        "of GPUs when Ray can read it, else the GPUs up or 8, whichever is more",
    )
    min_actors: int = Field(1, ge=1, description="autoscaling pool: replicas kept while work remains")
    channels_last: Literal["auto", "on", "off"] = Field(
        "auto",
        description="teachers in channels_last on GPUs: auto = timed at actor start-up, the faster kept",
    )
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved by each teacher replica")
    render_cpus: float = Field(
        0.5,
        gt=0,
        description="CPUs per view-rendering task (decode + augment); precompute's summary reports what the tasks "
        "used (cpu_use). 0.5 suits small machines, 1 nodes with cores to spare",
    )
    write_cpus: float = Field(
        0.5, gt=0, description="CPUs per Parquet write task (encode, checksum, receipt); as render_cpus"
    )
    use_gpu: bool | Literal["auto"] = Field(
        "auto", description="teachers on GPUs; auto: when the cluster has GPUs or its autoscaler can add some"
    )
    wait_for_gpus: bool = Field(
        False,
        description="with use_gpu true and no GPU in the cluster: wait for an autoscaler instead of failing",
    )
    eval_test: bool = Field(True, description="also measure each teacher's top-1 on the test split")
    compression: Literal["none", "snappy", "zstd", "lz4"] = Field(
        "none", description="codec of the cache parts (teacher outputs)"
    )


class StudentConfig(Network):
    """The student network and its input preprocessing."""

    arch: str = Field("resnet8x4", description="a camkd.models name, torchvision:<name> or timm:<name>")
    mean: list[float] | None = Field(
        None,
        description="the student's input normalisation, one value per channel (with std); default: the dataset's",
    )
    std: list[float] | None = Field(None, description="see mean")
    input_size: tuple[int, int] | None = Field(
        None, description="[H, W] (or one side) the student's inputs are resized to; default: the data's size"
    )

    @model_validator(mode="after")
    def _norm(self) -> StudentConfig:
        check_own("student", self.mean, self.std, self.input_size)
        return self


def _strategy_params_fields() -> dict[str, Any]:
    """The pydantic fields of `camkd.StrategyParams`: its defaults, bounds and descriptions, defined there once."""
    hints = get_type_hints(StrategyParams, include_extras=True)
    out = {}
    for f in dataclasses.fields(StrategyParams):
        meta = dict(f.metadata)
        out[f.name] = (hints[f.name], Field(f.default, description=meta.pop("doc", None), **meta))
    return out


class StrategyChoice(Strict):
    """Which strategy (a name in `camkd.STRATEGIES`) and where its teachers come from; `StrategyConfig` adds the
    fields of `camkd.StrategyParams`, defined there once."""

    name: StrategyName = "camkd"
    mode: Literal["cached", "online"] = Field("cached", description="online: run the teachers in the loop")
    teachers: list[str] | None = Field(None, description="names of the teachers to distill from; default all")

    def params(self) -> StrategyParams:
        """The loss hyper-parameters `camkd` takes."""
        return StrategyParams(**{f.name: getattr(self, f.name) for f in dataclasses.fields(StrategyParams)})


StrategyConfig = create_model("StrategyConfig", __base__=StrategyChoice, **_strategy_params_fields())


class TrainConfig(Strict):
    """The paper recipe by default. `batch_size` is global: each of N workers gets batch_size / N."""

    epochs: int = Field(240, ge=1, description="training epochs")
    batch_size: int = Field(64, ge=1, description="global batch size: each of N workers gets batch_size / N")
    lr: float | None = Field(None, gt=0, description="default: 0.05, or 0.01 for MobileNetV2/ShuffleV1/V2")
    lr_scaling: Literal["none", "linear"] = Field(
        "none", description="linear: multiply lr by batch_size/64 (the recipe's reference batch)"
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(True, description="Nesterov momentum")
    weight_decay: float = Field(5e-4, ge=0, description="SGD weight decay")
    milestones: list[int] = Field(
        default_factory=lambda: [150, 180, 210], description="epochs at which lr is multiplied by lr_decay"
    )
    lr_decay: float = Field(0.1, gt=0, le=1, description="the factor applied at each milestone")
    amp: Literal["auto", "off", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it"
    )
    seed: int = Field(0, description="seed of the initialisation and the data order")
    label_noise: float = Field(
        0.0, ge=0, le=1, description="fraction of training labels replaced at random (teacher training)"
    )
    label_swaps: list[tuple[int, int]] = Field(
        default_factory=list, description="class pairs whose training labels are exchanged (teacher training)"
    )
    limit_train: int | None = Field(
        None, ge=1, description="train on the first N training rows only (a class-stratified prefix)"
    )
    shuffle_buffer: int = Field(
        0,
        ge=0,
        description="rows each lane mixes further within an epoch, in a thread of the training process (0: none; "
        "the read tasks already deliver every row group in a new order each epoch, the row groups in a new order)",
    )
    deterministic: bool = Field(
        False,
        description="no shuffle buffer: every batch is a run of the epoch's rows in the read tasks' order (either "
        "way the batches are the same on every run and after a resume)",
    )
    lanes: int | None = Field(
        None,
        ge=1,
        description="streams each epoch's rows are cut into; global batch k is the k-th batch_size/lanes rows of "
        "every lane, so a run resumed on any worker count that divides the lanes trains on the same batches "
        "(default: the first attempt's scaling.num_workers)",
    )
    nan_check_every: int = Field(
        50, ge=1, description="steps between checks for a non-finite loss (each check is one host sync)"
    )
    prefetch_batches: int = Field(4, ge=0, description="batches each worker's reader prepares ahead")
    pin_memory: bool | Literal["auto"] = Field("auto", description="pinned host batches; auto: on with GPUs")
    eval_memory_mb: int = Field(
        2048,
        ge=0,
        description="per worker: keep the evaluation split in memory when it fits, else re-read it",
    )
    sync_batchnorm: bool = Field(
        False, description="SyncBatchNorm across GPU workers (torch has no CPU SyncBatchNorm)"
    )
    channels_last: bool = Field(
        False, description="GPU: channels_last memory format for student + connectors"
    )
    compile: bool = Field(
        False,
        description="torch.compile the whole training step (forward, loss, backward, optimizer) as one graph; "
        "with several workers (DDP) or fp16, the student + strategy only",
    )
    max_failures: int = Field(
        3, ge=-1, description="worker-group restarts from the last checkpoint; -1: always"
    )
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept per run (the newest)")
    export: bool = Field(
        True,
        description="also write student.pt2 (torch.export) and, with the [onnx] extra, student.onnx (its logits checked by "
        "onnxruntime) at the end; student.pt is always written",
    )

    @field_validator("milestones")
    @classmethod
    def _milestones(cls, v: list[int]) -> list[int]:
        if v != sorted(set(v)) or any(m < 1 for m in v):
            raise ValueError(f"milestones must be positive and strictly increasing, got {v}")
        return v

    def resolved_lr(self, arch: str) -> float:
        base = self.lr if self.lr is not None else (0.01 if arch in SMALL_LR_ARCHS else 0.05)
        return base * (self.batch_size / 64 if self.lr_scaling == "linear" else 1.0)


class ScalingSettings(Strict):
    """Ray Train workers and how each reads its share of the rows."""

    num_workers: int = Field(
        1, ge=1, description="Ray Train workers (DDP ranks); a run may resume with another"
    )
    use_gpu: bool = Field(False, description="train on GPUs, one per worker")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved by each training worker")
    gpus_per_worker: float = Field(
        1.0, gt=0, description="GPUs per worker: 1 with NCCL; a fraction only with backend: gloo"
    )
    torch_threads: int | None = Field(
        None, ge=1, description="intra-op threads per worker; default: cpus_per_worker"
    )
    reader: Literal["ray_data", "threads"] = Field(
        "ray_data",
        description="ray_data: Ray Data read tasks (any node's CPUs, blocks through the object store); threads: "
        "read_threads threads inside each training worker (its own CPUs: count them in cpus_per_worker)",
    )
    read_threads: int = Field(2, ge=1, description="reader threads per worker with reader: threads")
    read_cpus: float = Field(0.5, gt=0, description="CPUs reserved by each Ray Data read task")
    read_tasks: int | None = Field(
        None,
        ge=1,
        description="concurrent Ray Data read tasks per worker; default: what the capacity model says the "
        "worker's rate needs (CPU and storage latency), at least 1 (`--dry-run` prints it)",
    )
    read_ahead: int = Field(
        2,
        ge=0,
        le=64,
        description="row groups each read task (or reader thread pool) fetches at least while it decodes one; "
        "more as the storage latency it measures needs, up to read_ahead_mb",
    )
    read_ahead_mb: int = Field(
        256,
        ge=0,
        description="memory the row groups in flight of one reader (a read task, or a worker's reader threads) "
        "may take: the reads in flight grow with the latency the reader measures × the rate its rows are taken, "
        "up to this (0: read_ahead only); a read task asks Ray for it",
    )
    read_object_store_mb: int | None = Field(
        None,
        ge=16,
        description="object store each worker's Ray Data reader may fill; default: half its node's store ÷ the "
        "workers on that node",
    )
    read_budget: Literal["worker", "cluster"] = Field(
        "worker",
        description="worker: each worker's Ray Data reader is limited to its share (read_tasks × read_cpus CPUs, "
        "its node's object store ÷ the workers there); cluster: Ray Data's own default, every reader sized to the "
        "whole cluster (for a few workers fed by CPU-only nodes; several readers per node then spill)",
    )
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto",
        description="process-group backend: auto = nccl with GPUs, gloo on CPU; gloo with GPUs allows "
        "fractional gpus_per_worker (several ranks on one GPU, for checks only)",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="where Train workers go: STRICT_SPREAD puts each on its own node"
    )
    check_resources: bool = Field(
        True, description="fail fast when the cluster lacks the requested CPUs/GPUs"
    )


class StorageSettings(Strict):
    """How storage errors that may pass (throttling, timeouts, dropped connections) are handled."""

    retry_seconds: float = Field(
        60.0,
        ge=0,
        description="a transient storage error is retried (with backoff) for at least this long before the read "
        "fails; a failed read is then retried as a read task, and only then does the worker group restart",
    )


class Domain(Strict):
    """A searchable value: exactly one of grid, choice, uniform, loguniform, randint."""

    grid: list[Any] | None = Field(None, description="every value, in every combination")
    choice: list[Any] | None = Field(None, description="one value drawn per sample")
    uniform: tuple[float, float] | None = Field(None, description="[lo, hi): drawn uniformly")
    loguniform: tuple[float, float] | None = Field(None, description="[lo, hi): drawn uniformly in log space")
    randint: tuple[int, int] | None = Field(None, description="[lo, hi): an integer drawn uniformly")

    @model_validator(mode="after")
    def _one(self) -> Domain:
        given = [
            k for k in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                f"a search domain takes exactly one of grid/choice/uniform/loguniform/randint, got {given}"
            )
        for k in ("uniform", "loguniform", "randint"):
            lo_hi = getattr(self, k)
            if lo_hi is not None and not lo_hi[0] < lo_hi[1]:
                raise ValueError(f"{k} needs lo < hi, got {list(lo_hi)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform needs lo > 0, got {list(self.loguniform)}")
        if (self.grid is not None and not self.grid) or (self.choice is not None and not self.choice):
            raise ValueError("grid/choice need at least one value")
        return self


class AshaConfig(Strict):
    """ASHA early stopping of sweep trials, by epoch."""

    enabled: bool = Field(
        True, description="stop trials early with ASHA; false: every trial trains to the end"
    )
    grace_period: int = Field(1, ge=1, description="epochs every trial trains before it may be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="1 in this many trials goes on at each rung")


class TuneSettings(Strict):
    """The sweep: teacher subsets × strategies × `space`, one Ray Train run per trial."""

    teacher_sets: list[list[str]] | None = Field(None, description="explicit teacher subsets to try")
    teacher_set_sizes: list[int] | None = Field(
        None, description="all subsets of these sizes of the teachers"
    )
    strategies: list[StrategyName] = Field(default_factory=lambda: ["camkd"], description="strategies swept")
    space: dict[str, Domain | list[Any]] = Field(
        default_factory=dict, description="dotted config path → values (a list is a grid) or a domain"
    )
    search: Literal["grid", "random"] = Field(
        "grid", description="grid: every combination; random: num_samples draws (lists become choices)"
    )
    num_samples: int = Field(1, ge=1, description="random search: samples (grid: repeats of the grid)")
    metric: Literal["val_top1", "val_top5"] = Field(
        "val_top1", description="what ASHA and the leaderboard rank trials by"
    )
    asha: AshaConfig = AshaConfig()
    max_concurrent_trials: int = Field(1, ge=1, description="trials training at once")
    trial_cpus: float = Field(0.5, ge=0, description="CPUs held by each trial's driver")
    keep_best_subsets: int | None = Field(
        None,
        ge=1,
        description="rank the sweep's teacher subsets from the cache first (ensemble top-1 of the averaged "
        "logits on the validation hold-out; `tune --rank-only` shows the ranking) and sweep only the N best; "
        "arms without teachers (ce) still run. Needs data.val_fraction > 0",
    )

    @field_validator("teacher_set_sizes")
    @classmethod
    def _sizes(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(s < 1 for s in v)):
            raise ValueError(f"teacher_set_sizes must be positive, got {v}")
        return v

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key, domain in v.items():
            if key.split(".")[0] not in TUNABLE_SECTIONS:
                raise ValueError(
                    f"tune.space key {key!r} must start with one of {sorted(TUNABLE_SECTIONS)} (e.g. strategy.beta)"
                )
            if isinstance(domain, list) and not domain:
                raise ValueError(f"tune.space.{key}: a grid needs at least one value")
        return v


class RaySettings(Strict):
    """Which Ray to use: a cluster to attach to, or the resources of a local one."""

    address: str | None = Field(
        None, description="cluster to attach to; default: RAY_ADDRESS, else start locally"
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started Ray")
    num_gpus: int | None = Field(
        None, ge=0, description="GPUs of a locally started Ray; default: those found"
    )


class MLflowSettings(Strict):
    """Per-epoch metrics to MLflow."""

    uri: str = Field(description="tracking URI: sqlite:///path/mlflow.db, http://host:5000, ...")
    experiment: str | None = Field(None, description="MLflow experiment; default: the config's experiment")


class WandbSettings(Strict):
    """Per-epoch metrics to Weights & Biases."""

    project: str = Field("camkd-ray", description="W&B project")
    mode: Literal["offline", "online"] = Field(
        "offline", description="offline: local files, `wandb sync` later"
    )


class TrackingConfig(Strict):
    """Where per-epoch metrics go besides summary.json (rank 0 of every run and trial)."""

    tensorboard: bool = Field(True, description="event files under <run>/tensorboard")
    mlflow: MLflowSettings | None = Field(None, description="needs `pip install -e .[mlflow]`")
    wandb: WandbSettings | None = Field(None, description="needs `pip install wandb`")
    progress_seconds: float = Field(
        30.0, ge=0, description="a progress line (step, samples/s, ETA) this often inside an epoch; 0: off"
    )


TUNABLE_SECTIONS = {"strategy", "train", "student", "views", "scaling"}


class Config(Strict):
    root: str = Field(
        "./camkd-runs", description="storage root: a local path or an fsspec URL (s3://, gs://)"
    )
    experiment: str = Field(
        "default", pattern=NAME_RE, description="the folder under <root>/runs/ that holds its runs and sweeps"
    )
    data: DataConfig = DataConfig()
    views: ViewConfig = ViewConfig()
    teachers: list[TeacherConfig] = Field(default_factory=list)
    cache: CacheConfig = CacheConfig()
    student: StudentConfig = StudentConfig()
    strategy: StrategyConfig = StrategyConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingSettings = ScalingSettings()
    storage: StorageSettings = StorageSettings()
    tune: TuneSettings = TuneSettings()
    tracking: TrackingConfig = TrackingConfig()
    ray: RaySettings = RaySettings()

    @field_validator("root")
    @classmethod
    def _absolute_root(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("root must name a folder or a URL (s3://bucket/prefix, gs://...)")
        return absolute_location(v)

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        names = [t.name for t in self.teachers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"teacher names must be unique; repeated: {dupes}")
        for where, chosen in [("strategy.teachers", self.strategy.teachers)] + [
            (f"tune.teacher_sets[{i}]", s) for i, s in enumerate(self.tune.teacher_sets or [])
        ]:
            unknown = sorted(set(chosen or []) - set(names))
            if unknown:
                raise ValueError(f"{where} names unknown teachers {unknown}; configured teachers: {names}")
        if self.train.batch_size % self.scaling.num_workers:
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) is global and must divide evenly across "
                f"scaling.num_workers ({self.scaling.num_workers})"
            )
        self._check_lanes()
        if self.cache.logits == "topk" and self.cache.topk < 2:
            raise ValueError("cache.topk must be at least 2 when cache.logits is 'topk'")
        s = self.scaling
        if s.use_gpu and s.backend != "gloo" and s.gpus_per_worker != 1:
            raise ValueError(
                f"scaling.gpus_per_worker = {s.gpus_per_worker:g}: each NCCL rank trains on exactly one GPU, so "
                "give it 1 (a fraction puts two NCCL ranks on one GPU, which NCCL refuses at init: 'Duplicate "
                "GPU'; more than 1 leaves the extra GPUs idle). To share one GPU between ranks for a check, set "
                "scaling.backend: gloo"
            )
        if s.use_gpu and s.backend == "gloo" and s.gpus_per_worker > 1:
            raise ValueError(
                f"scaling.gpus_per_worker = {s.gpus_per_worker:g}: a rank trains on one GPU; give it 1 or a "
                "fraction (gloo ranks may share a GPU)"
            )
        if s.backend == "nccl" and not s.use_gpu:
            raise ValueError(
                "scaling.backend: nccl needs GPU workers (NCCL has no CPU transport); set scaling.use_gpu: true "
                "or scaling.backend: auto (gloo on CPU)"
            )
        if self.train.sync_batchnorm and s.backend == "gloo":
            raise ValueError(
                "train.sync_batchnorm needs NCCL (gloo has no CUDA all_gather); leave scaling.backend: auto"
            )
        if self.train.sync_batchnorm and not self.scaling.use_gpu:
            raise ValueError(
                "train.sync_batchnorm needs GPU workers (torch's SyncBatchNorm has no CPU kernels); set "
                "scaling.use_gpu: true, or leave train.sync_batchnorm: false (each CPU worker then normalises "
                "its own share of the batch)"
            )
        if self.cache.max_actors is not None and self.cache.min_actors > self.cache.max_actors:
            raise ValueError(
                f"cache.min_actors ({self.cache.min_actors}) exceeds cache.max_actors ({self.cache.max_actors})"
            )
        if self.cache.min_actors > (self.cache.actors if isinstance(self.cache.actors, int) else 10**9):
            raise ValueError(
                f"cache.min_actors ({self.cache.min_actors}) exceeds cache.actors ({self.cache.actors})"
            )
        return self

    # Derived views of the config, used by several stages.
    def chosen_teachers(self) -> list[TeacherConfig]:
        if self.strategy.teachers is None:
            return list(self.teachers)
        by_name = {t.name: t for t in self.teachers}
        return [by_name[n] for n in self.strategy.teachers]

    def strategies_in_use(self) -> set[str]:
        used = {self.strategy.name}
        if self.tune.strategies:
            used |= set(self.tune.strategies)
        return used

    def feature_dtype(self) -> str:
        if self.cache.features != "auto":
            return self.cache.features
        return "fp16" if any(STRATEGIES[s].needs_features for s in self.strategies_in_use()) else "none"

    def _check_lanes(self) -> None:
        lanes, workers, batch = self.train.lanes, self.scaling.num_workers, self.train.batch_size
        if lanes is not None and (lanes % workers or batch % lanes):
            raise ValueError(
                f"train.lanes ({lanes}) must be a multiple of scaling.num_workers ({workers}) and divide "
                f"train.batch_size ({batch}); e.g. train.lanes: {workers}, or leave it unset (one lane per worker "
                "of the run's first attempt)"
            )


def _check_arch(v: str) -> str:
    if v.startswith("torchvision:"):
        return v
    if v.startswith("timm:"):  # imports timm (only for timm: names); ImportError says how to install it
        try:
            check_timm_name(v[len("timm:") :])
        except ImportError as e:
            raise ValueError(str(e)) from None
        return v
    names = available_models()
    if v not in names:
        close = difflib.get_close_matches(v, names, n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(
            f"unknown architecture {v!r}{hint} Available: {names}, torchvision:<name> or timm:<name>"
        )
    return v
