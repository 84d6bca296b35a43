"""Ingest: a dataset source → Parquet image parts per split (`idx, source_idx, image, label`).

Sources: MNIST/Fashion-MNIST idx(.gz) files, CIFAR-10/100 "python version" batches, a class-per-subfolder image
folder, and a synthetic generator for tests. Rows are stored in a seeded, class-stratified random order, so every
part, every prefix and the tail of a split hold the classes in proportion (a class-sorted source never gives
class-sorted parts), and `idx` is the row's position in that order. The validation hold-out is the tail of the
training split (`data.val_fraction`), so it needs no second copy of the data. Parts are written in row groups of
`data.row_group_rows` rows with checksums (`pipeline/store/tables.py`). The fingerprint hashes the source content and
the layout, so re-ingesting the same data is a no-op. This stage never runs a model.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
import struct
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import BaseModel

from pipeline.store import storage, tables

if TYPE_CHECKING:  # the read path (Ray Data tasks) imports this module; keep torch out of it
    from pipeline.config import Config, DataConfig

FORMAT_VERSION = 2  # 2: stratified row order, idx = position, source_idx, row groups, column checksums
META_KEY = b"camkd"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


class IngestError(RuntimeError):
    """A source that cannot be read, phrased for the user (what, where, how to fix)."""


class PartInfo(BaseModel):
    name: str
    rows: int
    first_idx: int  # the part holds idx first_idx .. first_idx + rows - 1


class SplitInfo(BaseModel):
    rows: int
    parts: list[PartInfo]
    class_counts: list[int]


class DatasetMeta(BaseModel):
    """dataset.json: what an ingested dataset is. Written last; its presence means the ingest completed."""

    format: int = FORMAT_VERSION
    name: str
    fingerprint: str
    source: dict[str, Any]
    num_classes: int
    classes: list[str]
    channels: int
    encoding: str  # "raw": H×W×C uint8 bytes of `image_shape`; "encoded": PNG/JPEG file bytes
    image_shape: list[int] | None
    rows_per_part: int
    row_group_rows: int
    order_seed: int
    splits: dict[str, SplitInfo]
    created: float = 0.0

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise IngestError(
                f"dataset {self.name}-{self.fingerprint} has no split {name!r} (has {list(self.splits)})"
            )
        return self.splits[name]


@dataclass
class RawSplit:
    images: np.ndarray | list  # uint8 [N,H,W,C] (raw), or per row a file Path / bytes / EncodedRef (encoded)
    labels: np.ndarray


@dataclass(frozen=True)
class TarMember:
    """An image inside a WebDataset shard, read by offset when its part is written (never all held at once)."""

    tar: Path
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.tar, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


@dataclass(frozen=True)
class ArrowBytes:
    """Row `row` of a (memory-mapped) Arrow column of encoded images, e.g. a Hugging Face `Image` feature."""

    column: Any
    row: int

    def read(self) -> bytes:
        value = self.column[self.row].as_py()
        if isinstance(value, dict):  # datasets.Image: {"bytes": ..., "path": ...}
            if value.get("bytes"):
                return value["bytes"]
            return Path(value["path"]).read_bytes()
        return value


def encoded_bytes(item) -> bytes:
    return (
        Path(item).read_bytes()
        if isinstance(item, (str, Path))
        else item
        if isinstance(item, bytes)
        else item.read()
    )


# ------------------------------------------------------------------------------------------------ sources
def _open_maybe_gz(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _find(folder: Path, stems: list[str]) -> Path:
    for stem in stems:
        for cand in (folder / stem, folder / f"{stem}.gz"):
            if cand.is_file():
                return cand
    raise IngestError(
        f"none of {stems} (optionally .gz) is in {str(folder)!r}; point data.path at the folder holding the idx files"
    )


def read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST format: big-endian magic, dims, then uint8 data)."""
    data = _open_maybe_gz(path)
    if len(data) < 8:
        raise IngestError(f"{str(path)!r} is too short to be an idx file")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise IngestError(f"{str(path)!r} is not a uint8 idx file (magic {data[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise IngestError(
            f"{str(path)!r} holds {body.size} bytes, its header says {dims}: the file is truncated"
        )
    return body.reshape(dims)


def _idx_split(folder: Path, prefix: str) -> tuple[RawSplit, list[Path]]:
    img_path = _find(folder, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"])
    lbl_path = _find(folder, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"])
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.shape[0] != labels.shape[0]:
        raise IngestError(
            f"{img_path.name} has {images.shape[0]} images but {lbl_path.name} has {labels.shape[0]} labels"
        )
    return RawSplit(images[..., None], labels.astype(np.int64)), [img_path, lbl_path]


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only what they contain (numpy arrays, builtins), never arbitrary code."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def _load_cifar_batch(path: Path) -> dict:
    if not path.is_file():
        raise IngestError(
            f"CIFAR batch {str(path)!r} is missing; point data.path at the extracted python-version folder"
        )
    try:
        return _CifarUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except Exception as e:
        raise IngestError(f"{str(path)!r} is not a CIFAR python-version batch: {e}") from e


def _cifar_split(folder: Path, files: list[str], label_key: bytes) -> tuple[RawSplit, list[Path]]:
    images, labels, paths = [], [], []
    for name in files:
        path = folder / name
        batch = _load_cifar_batch(path)
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        images.append(data)
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
        paths.append(path)
    return RawSplit(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)), paths


def _cifar_meta_classes(folder: Path, kind: str) -> list[str]:
    meta_file, key = ("batches.meta", b"label_names") if kind == "cifar10" else ("meta", b"fine_label_names")
    path = folder / meta_file
    if path.is_file():
        return [n.decode() for n in _load_cifar_batch(path)[key]]
    return [str(i) for i in range(10 if kind == "cifar10" else 100)]


def _imagefolder_split(folder: Path, classes: list[str]) -> tuple[RawSplit, list[Path]]:
    images, labels, paths = [], [], []
    for label, cls in enumerate(classes):
        cls_dir = folder / cls
        if not cls_dir.is_dir():
            continue
        for path in sorted(p for p in cls_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            images.append(path)
            labels.append(label)
            paths.append(path)
    if not images:
        raise IngestError(f"no images ({sorted(IMAGE_SUFFIXES)}) under {str(folder)!r}/<class>/")
    return RawSplit(images, np.asarray(labels, dtype=np.int64)), paths


def _webdataset_split(folder: Path) -> tuple[RawSplit, list[Path]]:
    """WebDataset shards (`*.tar`): each sample is `<key>.<jpg|png|...>` + `<key>.cls` (its class index as text).
    Only the tar headers and the small `.cls` members are read here; images are read by offset when written."""
    shards = sorted(folder.glob("*.tar"))
    if not shards:
        raise IngestError(f"no WebDataset shards (*.tar) in {str(folder)!r}")
    images, labels = [], []
    for shard in shards:
        pending: dict[str, dict[str, Any]] = {}
        with tarfile.open(shard, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _, ext = info.name.rpartition(".")
                entry = pending.setdefault(key, {})
                if "." + ext.lower() in IMAGE_SUFFIXES:
                    entry["image"] = TarMember(shard, info.offset_data, info.size)
                elif ext == "cls":
                    entry["label"] = int(tar.extractfile(info).read().decode().strip())
        for key, entry in pending.items():
            if "image" not in entry or "label" not in entry:
                raise IngestError(
                    f"WebDataset sample {key!r} in {shard.name} has {sorted(entry)}; each sample needs an image "
                    "(.jpg/.png/...) and a .cls label"
                )
            images.append(entry["image"])
            labels.append(entry["label"])
    return RawSplit(images, np.asarray(labels, dtype=np.int64)), shards


def _huggingface_splits(cfg: DataConfig) -> tuple[dict[str, RawSplit], list[str], list[Path]]:
    """A Hugging Face dataset saved with `save_to_disk` (a DatasetDict with train and test/validation splits):
    encoded images from `data.image_column`, class indices from `data.label_column`, read from the memory-mapped
    Arrow files without decoding."""
    try:
        import datasets
    except ImportError:
        raise IngestError(
            'data.source huggingface needs the `datasets` package: pip install -e ".[hf]"'
        ) from None
    folder = Path(cfg.source_path or "")
    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:
        raise IngestError(
            f"{str(folder)!r} is not a dataset saved with datasets' save_to_disk ({e})"
        ) from None
    if not isinstance(ds, datasets.DatasetDict):
        raise IngestError(
            f"{str(folder)!r} holds one split; save a DatasetDict with 'train' and 'test' splits"
        )
    test_name = next((n for n in ("test", "validation", "val") if n in ds), None)
    if "train" not in ds or test_name is None:
        raise IngestError(
            f"{str(folder)!r} has splits {list(ds)}; camkd-ray needs 'train' and 'test' (or 'validation')"
        )
    out = {}
    for ours, theirs in (("train", "train"), ("test", test_name)):
        split = ds[theirs]
        for col in (cfg.image_column, cfg.label_column):
            if col not in split.column_names:
                raise IngestError(
                    f"split {theirs!r} of {str(folder)!r} has no column {col!r} (columns: {split.column_names}); "
                    "set data.image_column / data.label_column"
                )
        table = split.data.table
        column = table.column(cfg.image_column).combine_chunks()
        labels = np.asarray(table.column(cfg.label_column).to_numpy(), dtype=np.int64)
        out[ours] = RawSplit([ArrowBytes(column, i) for i in range(len(labels))], labels)
    feature = ds["train"].features.get(cfg.label_column)
    n = int(max(out["train"].labels.max(), out["test"].labels.max())) + 1
    classes = list(feature.names) if hasattr(feature, "names") else [str(i) for i in range(n)]
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return out, classes, files


def _synthetic_split(cfg: DataConfig, split: str) -> RawSplit:
    """Class = a smooth, left-right symmetric prototype (4×4 blocks upsampled) plus pixel noise: crops and flips
    keep the class, so augmented views stay learnable, as with real images."""
    s = cfg.synthetic
    n = s.train if split == "train" else s.test
    rng = np.random.default_rng(s.seed)
    coarse = rng.uniform(0, 255, size=(s.num_classes, 4, 2, s.channels))
    coarse = np.concatenate([coarse, coarse[:, :, ::-1]], axis=2)  # symmetric under horizontal flips
    block = -(-s.size // 4)
    prototypes = np.repeat(np.repeat(coarse, block, axis=1), block, axis=2)[:, : s.size, : s.size]
    rng = np.random.default_rng([s.seed, 0 if split == "train" else 1])
    labels = np.arange(n) % s.num_classes
    rng.shuffle(labels)
    noise = rng.normal(0, 255 * s.noise / 2, size=(n, s.size, s.size, s.channels))
    images = np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8)
    return RawSplit(images, labels.astype(np.int64))


def _download_torchvision(cfg: DataConfig, target: Path) -> None:
    import torchvision.datasets as tvd

    cls = {"fashion-mnist": tvd.FashionMNIST, "mnist": tvd.MNIST}.get(cfg.source)
    if cls is None:
        raise IngestError(f"data.download supports fashion-mnist and mnist, not {cfg.source!r}")
    try:
        for train in (True, False):
            cls(str(target), train=train, download=True)
    except Exception as e:
        raise IngestError(
            f"{cfg.source} is not at {cfg.source_path!r} and the download failed ({e}). Install it with "
            f"`apt-get install dataset-{cfg.source}` (Debian) or copy the idx files into data.path"
        ) from e


def load_source(cfg: DataConfig) -> tuple[dict[str, RawSplit], list[str], str, list[Path]]:
    """Read every split of a source: (splits, class names, encoding, files read)."""
    kind = cfg.source
    if kind == "synthetic":
        splits = {sp: _synthetic_split(cfg, sp) for sp in ("train", "test")}
        return splits, [f"class{i}" for i in range(cfg.synthetic.num_classes)], "raw", []
    folder = Path(cfg.source_path or "")
    if kind in ("fashion-mnist", "mnist", "idx"):
        if not folder.is_dir() or not any(folder.iterdir()):
            if cfg.download:
                folder = Path.home() / ".cache" / "camkd" / kind
                _download_torchvision(cfg, folder)
                folder = next(p for p in folder.rglob("raw") if p.is_dir())
            else:
                pkg = f"`apt-get install dataset-{kind}`" if kind != "idx" else "copying the idx files there"
                raise IngestError(
                    f"{kind} files are not in {str(folder)!r}; fix it by {pkg}, by setting data.path, "
                    "or with data.download: true on a machine with internet access"
                )
        train, f1 = _idx_split(folder, "train")
        test, f2 = _idx_split(folder, "t10k")
        n_cls = int(max(train.labels.max(), test.labels.max())) + 1
        names = FASHION_CLASSES if kind == "fashion-mnist" else [str(i) for i in range(n_cls)]
        return {"train": train, "test": test}, names, "raw", f1 + f2
    if kind in ("cifar10", "cifar100"):
        if kind == "cifar10":
            train, f1 = _cifar_split(folder, [f"data_batch_{i}" for i in range(1, 6)], b"labels")
            test, f2 = _cifar_split(folder, ["test_batch"], b"labels")
        else:
            train, f1 = _cifar_split(folder, ["train"], b"fine_labels")
            test, f2 = _cifar_split(folder, ["test"], b"fine_labels")
        return {"train": train, "test": test}, _cifar_meta_classes(folder, kind), "raw", f1 + f2
    if kind == "webdataset":
        train_dir = folder / "train"
        test_dir = next((folder / d for d in ("test", "val") if (folder / d).is_dir()), None)
        if not train_dir.is_dir() or test_dir is None:
            raise IngestError(f"WebDataset folder {str(folder)!r} needs train/*.tar and test/*.tar (or val/)")
        train, f1 = _webdataset_split(train_dir)
        test, f2 = _webdataset_split(test_dir)
        names_file = folder / "classes.txt"
        n = int(max(train.labels.max(), test.labels.max())) + 1
        classes = names_file.read_text().split() if names_file.is_file() else [str(i) for i in range(n)]
        return {"train": train, "test": test}, classes, "encoded", f1 + f2
    if kind == "huggingface":
        splits, classes, files = _huggingface_splits(cfg)
        return splits, classes, "encoded", files
    if kind == "imagefolder":
        train_dir = folder / "train"
        test_dir = next((folder / d for d in ("test", "val") if (folder / d).is_dir()), None)
        if not train_dir.is_dir() or test_dir is None:
            raise IngestError(
                f"image folder {str(folder)!r} needs train/<class>/*.jpg and test/ (or val/) subfolders"
            )
        classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
        train, f1 = _imagefolder_split(train_dir, classes)
        test, f2 = _imagefolder_split(test_dir, classes)
        return {"train": train, "test": test}, classes, "encoded", f1 + f2
    raise IngestError(f"unknown data.source {kind!r}")


FASHION_CLASSES = [
    "T-shirt",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Boot",
]


# ------------------------------------------------------------------------------------------------ subset & fp
def balanced_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of a class-balanced subset of n rows (round-robin over classes in a seeded order), sorted."""
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    by_class = [order[labels[order] == c] for c in np.unique(labels)]
    picked: list[int] = []
    depth = 0
    while len(picked) < n:
        for members in by_class:
            if depth < len(members) and len(picked) < n:
                picked.append(int(members[depth]))
        depth += 1
    return np.sort(np.asarray(picked))


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A seeded permutation of the rows in which every prefix (and so every part and the tail) holds each class
    in proportion to its frequency, ±1 row: within each class the rows are shuffled, and the r-th row of a class
    of n rows is placed at fractional position (r + u)/n, u uniform in [0, 1)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 0x5EED])
    keys = np.empty(len(labels), dtype=np.float64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rank = rng.permutation(len(members))
        keys[members] = (rank + rng.random(len(members))) / len(members)
    return np.argsort(keys, kind="stable")


def fingerprint(cfg: DataConfig, files: list[Path]) -> str:
    h = hashlib.sha256()
    spec = {
        "format": FORMAT_VERSION,
        "source": cfg.source,
        "rows_per_part": cfg.rows_per_part,
        "row_group_rows": cfg.row_group_rows,
        "order_seed": cfg.order_seed,
        "limit_train": cfg.limit_train,
        "limit_test": cfg.limit_test,
        "subset_seed": cfg.subset_seed,
        "synthetic": cfg.synthetic.model_dump() if cfg.source == "synthetic" else None,
        "columns": [cfg.image_column, cfg.label_column] if cfg.source == "huggingface" else None,
    }
    h.update(json.dumps(spec, sort_keys=True).encode())
    base = Path(cfg.source_path) if cfg.source_path else None
    for path in sorted(files):
        rel = str(path.relative_to(base)) if base and path.is_relative_to(base) else path.name
        h.update(rel.encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()[:12]


# ------------------------------------------------------------------------------------------------ ingest
def _write_split(
    out_dir: str,
    split: RawSplit,
    rows_per_part: int,
    row_group_rows: int,
    encoding: str,
    seed: int,
    compression: str,
) -> SplitInfo:
    """Write a split in its stratified order: part p holds positions [p·rows_per_part, ...), idx = position."""
    n = len(split.labels)
    order = stratified_order(split.labels, seed)
    parts = []
    for p, start in enumerate(range(0, n, rows_per_part)):
        stop = min(start + rows_per_part, n)
        rows = order[start:stop]
        if encoding == "raw":  # H×W×C uint8 pixels as fixed-width values: read back as one memcpy
            block = np.ascontiguousarray(split.images[rows])
            width = block[0].nbytes
            images = pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(width), len(block), [None, pa.py_buffer(block)]
            )
        else:
            images = pa.array([encoded_bytes(split.images[i]) for i in rows], type=pa.binary())
        table = pa.table(
            {
                "idx": pa.array(np.arange(start, stop), pa.int64()),
                "source_idx": pa.array(rows, pa.int64()),
                "image": images,
                "label": pa.array(split.labels[rows], pa.int32()),
            }
        )
        meta = {META_KEY: json.dumps({"format": FORMAT_VERSION, "part": storage.part_name(p)}).encode()}
        encoded = tables.encode_table(table, row_group_rows, meta, compression)
        tables.write_table(storage.join(out_dir, storage.part_name(p)), encoded)
        parts.append(PartInfo(name=storage.part_name(p), rows=stop - start, first_idx=start))
    counts = np.bincount(split.labels, minlength=int(split.labels.max()) + 1 if n else 0)
    return SplitInfo(rows=n, parts=parts, class_counts=counts.tolist())


def find_dataset(cfg: Config) -> DatasetMeta | None:
    """The ingested dataset for this config, if an ingest of the same source/layout completed before."""
    name = cfg.data.dataset_name
    root = storage.join(cfg.root, "datasets")
    found = []
    for entry in storage.listdir(root):
        if entry.startswith(f"{name}-"):
            meta_url = storage.join(root, entry, "dataset.json")
            if storage.exists(meta_url):
                raw = storage.read_json(meta_url)
                if raw.get("format") != FORMAT_VERSION:
                    continue  # an older layout: a new ingest writes the current one beside it (another fingerprint)
                meta = DatasetMeta.model_validate(raw)
                if meta.source == _source_spec(cfg.data):
                    found.append(meta)
    # Several matches mean the source files changed between ingests: the newest ingest wins.
    return max(found, key=lambda m: m.created) if found else None


def _source_spec(cfg: DataConfig) -> dict[str, Any]:
    return {
        "kind": cfg.source,
        "path": cfg.source_path,
        "rows_per_part": cfg.rows_per_part,
        "row_group_rows": cfg.row_group_rows,
        "order_seed": cfg.order_seed,
        "limit_train": cfg.limit_train,
        "limit_test": cfg.limit_test,
        "subset_seed": cfg.subset_seed,
        "synthetic": cfg.synthetic.model_dump() if cfg.source == "synthetic" else None,
        "columns": [cfg.image_column, cfg.label_column] if cfg.source == "huggingface" else None,
    }


def _stamps(files: list[Path], base: Path | None) -> list[list[Any]]:
    out = []
    for path in sorted(files):
        st = path.stat()
        out.append(
            [
                str(path.relative_to(base)) if base and path.is_relative_to(base) else str(path),
                st.st_size,
                st.st_mtime_ns,
            ]
        )
    return out


def known_fingerprint(cfg: Config, files: list[Path], verify: bool, log=print) -> str:
    """The dataset fingerprint: the sha256 of the source content and layout, recomputed only when a source file's
    (path, size, mtime) changed since the last ingest (`<root>/datasets/.index/`), or with `verify`. An ImageNet
    folder is ~150 GB: it is hashed once, not at every run. What this misses: a file rewritten with the same
    size and its old mtime restored (`--verify` re-hashes everything)."""
    data = cfg.data
    base = Path(data.source_path) if data.source_path else None
    spec = json.dumps(_source_spec(data), sort_keys=True)
    key = hashlib.sha256(spec.encode()).hexdigest()[:16]
    url = storage.join(cfg.root, "datasets", ".index", f"{data.dataset_name}-{key}.json")
    stamps = _stamps(files, base)
    if not verify and storage.exists(url):
        index = storage.read_json(url)
        if index.get("stamps") == stamps and index.get("format") == FORMAT_VERSION:
            return index["fingerprint"]
    fp = fingerprint(data, files)
    if verify and storage.exists(url):
        before = storage.read_json(url).get("fingerprint")
        log(
            f"[ingest] --verify: source content {'unchanged' if before == fp else f'CHANGED ({before} → {fp})'}"
        )
    storage.write_json(url, {"format": FORMAT_VERSION, "spec": spec, "stamps": stamps, "fingerprint": fp})
    return fp


def ingest(cfg: Config, log=print, verify: bool = False) -> DatasetMeta:
    """Ingest the configured source under `<root>/datasets/<name>-<fp>/`; a no-op if it is already there
    (decided from the files' sizes and mtimes; `verify` re-hashes their content)."""
    data = cfg.data
    splits, classes, encoding, files = load_source(data)
    fp = known_fingerprint(cfg, files, verify, log)
    out = storage.dataset_dir(cfg.root, data.dataset_name, fp)
    meta_url = storage.join(out, "dataset.json")
    if storage.exists(meta_url):
        meta = DatasetMeta.model_validate(storage.read_json(meta_url))
        log(f"[ingest] {data.dataset_name}-{fp} is already ingested at {out} (no-op)")
        return meta
    started = time.time()
    infos = _write_splits(data, splits, encoding, out, log)
    first = splits["train"].images
    image_shape = list(first.shape[1:]) if encoding == "raw" else None
    channels = image_shape[2] if image_shape else 3
    meta = DatasetMeta(
        name=data.dataset_name,
        fingerprint=fp,
        source=_source_spec(data),
        num_classes=len(classes),
        classes=classes,
        channels=channels,
        encoding=encoding,
        image_shape=image_shape,
        rows_per_part=data.rows_per_part,
        row_group_rows=data.row_group_rows,
        order_seed=data.order_seed,
        splits=infos,
        created=time.time(),
    )
    storage.write_json(meta_url, meta.model_dump())
    summary = {
        "dataset": f"{meta.name}-{fp}",
        "dir": out,
        "num_classes": meta.num_classes,
        "rows": {k: v.rows for k, v in infos.items()},
        "parts": {k: len(v.parts) for k, v in infos.items()},
        "seconds": round(time.time() - started, 1),
    }
    storage.write_json(storage.join(out, "summary.json"), summary)
    log(f"[ingest] wrote {out} (summary.json)")
    return meta


def _write_splits(data, splits: dict[str, RawSplit], encoding: str, out: str, log) -> dict[str, SplitInfo]:
    """Each split (its class-balanced subset where `data.limit_*` asks for one) as Parquet parts under `out`."""
    limits = {"train": data.limit_train, "test": data.limit_test}
    infos = {}
    for split_name, split in splits.items():
        if limits[split_name] is not None:
            keep = balanced_subset(split.labels, limits[split_name], data.subset_seed)
            images = (
                split.images[keep]
                if isinstance(split.images, np.ndarray)
                else [split.images[i] for i in keep]
            )
            split = RawSplit(images, split.labels[keep])
        infos[split_name] = _write_split(
            storage.join(out, split_name),
            split,
            data.rows_per_part,
            data.row_group_rows,
            encoding,
            data.order_seed,
            data.compression,
        )
        log(f"[ingest] {split_name}: {infos[split_name].rows} rows in {len(infos[split_name].parts)} part(s)")
    return infos


def require_dataset(cfg: Config, log=print) -> DatasetMeta:
    """The ingested dataset; ingests it first when needed (ingest is idempotent)."""
    return find_dataset(cfg) or ingest(cfg, log=log)


def image_part_url(dataset_dir: str, split: str, part: str) -> str:
    return storage.join(dataset_dir, split, part)


def open_image_part(
    dataset_dir: str, split: str, part: str, retry=None, scope: str | None = None
) -> tables.OpenTable:
    """An image part opened for row-group reads (with a `scope`, once per process and scope:
    `tables.open_cached`); a missing or corrupt part is an IngestError with the fix."""
    url = image_part_url(dataset_dir, split, part)
    try:
        return tables.open_cached(url, META_KEY, retry, scope)
    except FileNotFoundError:
        raise IngestError(f"image part {url} is missing; delete {dataset_dir} and re-run `ingest`") from None
    except tables.CorruptTable as e:
        raise IngestError(f"image part {e}; delete {dataset_dir} and re-run `ingest`") from None


def read_image_rows(
    part: tables.OpenTable, row_groups: list[int] | None, columns: list[str] | None = None, retry=None
) -> pa.Table:
    try:
        return part.read(row_groups, columns or ["idx", "image", "label"], retry)
    except tables.CorruptTable as e:
        tables.forget(part.url)
        raise IngestError(f"image part {e}; delete the dataset folder and re-run `ingest`") from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: python pipeline/run.py ingest --config FILE")
