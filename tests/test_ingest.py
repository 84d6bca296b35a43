"""Ingest from every source format (small files generated in the real formats) onto local and memory:// storage."""

import gzip
import os
import pickle
import struct

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import validate
from pipeline.data import ingest
from pipeline.store import storage


def write_idx(path, array, compress=True):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


def make_idx_folder(d, n_train=50, n_test=20, size=28):
    rng = np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, size, size)))
        write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return d


def make_cifar_folder(d, kind="cifar10", n=30):
    rng = np.random.default_rng(1)
    d.mkdir(parents=True, exist_ok=True)
    key = b"labels" if kind == "cifar10" else b"fine_labels"
    classes = 10 if kind == "cifar10" else 100
    files = (
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if kind == "cifar10" else ["train", "test"]
    )
    for name in files:
        batch = {b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), key: list(np.arange(n) % classes)}
        pickle.dump(batch, open(d / name, "wb"))
    meta_name, meta_key = (
        ("batches.meta", b"label_names") if kind == "cifar10" else ("meta", b"fine_label_names")
    )
    pickle.dump({meta_key: [f"c{i}".encode() for i in range(classes)]}, open(d / meta_name, "wb"))
    return d


def make_image_folder(d, classes=("cat", "dog"), per_class=3):
    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for c in classes:
            (d / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8))
                img.save(d / split / c / f"{i}.{'png' if i % 2 else 'jpg'}")
    return d


def read_all(url):
    fs, path = storage.pyarrow_fs(url)
    return pq.read_table(path, filesystem=fs)


def test_idx_gz_fashion_mnist_layout(tmp_path):
    src = make_idx_folder(tmp_path / "fm")
    cfg = validate(
        {
            "root": str(tmp_path / "root"),
            "data": {"source": "fashion-mnist", "path": str(src), "rows_per_part": 16},
        }
    )
    logs = []
    meta = ingest.ingest(cfg, log=logs.append)
    assert meta.num_classes == 10 and meta.channels == 1 and meta.image_shape == [28, 28, 1]
    assert meta.split("train").rows == 50 and [p.rows for p in meta.split("train").parts] == [16, 16, 16, 2]
    ddir = storage.dataset_dir(cfg.root, "fashion-mnist", meta.fingerprint)
    t = read_all(storage.join(ddir, "train", "part-00001.parquet"))
    assert t.schema.names == ["idx", "source_idx", "image", "label"]
    assert t["idx"].to_pylist() == list(range(16, 32)), "idx is the position in the stored order"
    raw = ingest.read_idx(src / "train-images-idx3-ubyte.gz")
    labels = ingest.read_idx(src / "train-labels-idx1-ubyte.gz")
    source = t["source_idx"].to_numpy()
    assert t["image"][0].as_py() == raw[source[0]].tobytes()
    assert t["label"].to_pylist() == labels[source].tolist()
    everything = np.concatenate(
        [
            read_all(storage.join(ddir, "train", p.name))["source_idx"].to_numpy()
            for p in meta.split("train").parts
        ]
    )
    assert sorted(everything.tolist()) == list(range(50)), "every source row stored exactly once"
    # Re-ingesting the same data is a no-op (same fingerprint, nothing rewritten).
    stamp = os.path.getmtime(storage.join(ddir, "dataset.json"))
    again = ingest.ingest(cfg, log=logs.append)
    assert (
        again.fingerprint == meta.fingerprint
        and os.path.getmtime(storage.join(ddir, "dataset.json")) == stamp
    )
    assert "no-op" in logs[-1]
    # The parts' codec (data.compression, lz4 by default) is not part of the dataset's identity.
    assert (
        pq.ParquetFile(ddir + "/train/part-00001.parquet").metadata.row_group(0).column(2).compression
        == "LZ4"
    )
    zstd = validate(
        {**cfg.model_dump(mode="json"), "data": {**cfg.data.model_dump(mode="json"), "compression": "zstd"}}
    )
    assert ingest.fingerprint(zstd.data, []) == ingest.fingerprint(cfg.data, [])
    # Changing the content changes the fingerprint.
    write_idx(src / "t10k-labels-idx1-ubyte.gz", (np.arange(20) + 1) % 10)
    assert ingest.ingest(cfg, log=logs.append).fingerprint != meta.fingerprint


def uncompressed_idx_source(src, seed: int, train: int, test: int):
    """A folder of uncompressed MNIST-style idx files: random 28×28 images, labels cycling through 10 classes."""
    src.mkdir()
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", train), ("t10k", test)):
        write_idx(src / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)), compress=False)
        write_idx(src / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, compress=False)
    return src


def test_uncompressed_idx_and_memory_filesystem(tmp_path):
    src = uncompressed_idx_source(tmp_path / "mnist", seed=3, train=12, test=5)
    cfg = validate(
        {"root": "memory://camkd-test", "data": {"source": "mnist", "path": str(src), "rows_per_part": 5}}
    )
    meta = ingest.ingest(cfg)
    url = storage.join(
        storage.dataset_dir("memory://camkd-test", "mnist", meta.fingerprint), "test", "part-00000.parquet"
    )
    assert url.startswith("memory://") and read_all(url).num_rows == 5
    assert ingest.find_dataset(cfg).fingerprint == meta.fingerprint


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_python_batches(tmp_path, kind):
    src = make_cifar_folder(tmp_path / kind, kind)
    cfg = validate(
        {"root": str(tmp_path / "root"), "data": {"source": kind, "path": str(src), "rows_per_part": 64}}
    )
    meta = ingest.ingest(cfg)
    assert meta.image_shape == [32, 32, 3] and meta.classes[:2] == ["c0", "c1"]
    assert meta.split("train").rows == (150 if kind == "cifar10" else 30)
    first = read_all(
        storage.join(storage.dataset_dir(cfg.root, kind, meta.fingerprint), "train", "part-00000.parquet")
    )
    row = first["source_idx"][0].as_py()  # the source row stored first; 30 rows per batch file
    name = f"data_batch_{row // 30 + 1}" if kind == "cifar10" else "train"
    batch = pickle.load(open(src / name, "rb"), encoding="bytes")
    expected = np.asarray(batch[b"data"][row % 30]).reshape(3, 32, 32).transpose(1, 2, 0)
    assert first["image"][0].as_py() == expected.tobytes()


@pytest.mark.fault
def test_cifar_batch_with_code_is_refused(tmp_path):
    src = make_cifar_folder(tmp_path / "evil", "cifar100")

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    pickle.dump({b"data": Payload(), b"fine_labels": [0]}, open(src / "train", "wb"))
    cfg = validate({"root": str(tmp_path / "root"), "data": {"source": "cifar100", "path": str(src)}})
    with pytest.raises(ingest.IngestError, match="refusing to load posix.system"):
        ingest.ingest(cfg)


def test_image_folder(tmp_path):
    src = make_image_folder(tmp_path / "imgs")
    cfg = validate(
        {
            "root": str(tmp_path / "root"),
            "data": {"source": "imagefolder", "path": str(src), "image_size": 16},
        }
    )
    meta = ingest.ingest(cfg)
    assert meta.encoding == "encoded" and meta.classes == ["cat", "dog"] and meta.split("test").rows == 6
    t = read_all(
        storage.join(
            storage.dataset_dir(cfg.root, "imagefolder", meta.fingerprint), "train", "part-00000.parquet"
        )
    )
    assert sorted(t["label"].to_pylist()) == [0, 0, 0, 1, 1, 1]
    files = sorted(
        (src / "train" / c / f).read_bytes() for c in ("cat", "dog") for f in ("0.jpg", "1.png", "2.jpg")
    )
    assert sorted(t["image"].to_pylist()) == files


def test_missing_source_is_a_clear_error(tmp_path):
    cfg = validate(
        {"root": str(tmp_path), "data": {"source": "fashion-mnist", "path": str(tmp_path / "nope")}}
    )
    with pytest.raises(ingest.IngestError, match="apt-get install dataset-fashion-mnist"):
        ingest.ingest(cfg)
    src = make_idx_folder(tmp_path / "trunc")
    data = gzip.open(src / "train-images-idx3-ubyte.gz").read()
    gzip.open(src / "train-images-idx3-ubyte.gz", "wb").write(data[:-100])
    cfg = validate({"root": str(tmp_path), "data": {"source": "idx", "path": str(src)}})
    with pytest.raises(ingest.IngestError, match="truncated"):
        ingest.ingest(cfg)


def test_balanced_subset():
    labels = np.array([0] * 70 + [1] * 20 + [2] * 10)
    keep = ingest.balanced_subset(labels, 30, seed=0)
    assert len(keep) == 30 and np.all(np.diff(keep) > 0)
    assert np.bincount(labels[keep]).tolist() == [10, 10, 10]
    assert np.array_equal(keep, ingest.balanced_subset(labels, 30, seed=0))


def test_class_sorted_source_is_stored_class_mixed(tmp_path):
    """An image folder is read class by class; its parts, every prefix and the validation tail must not be."""
    src = make_image_folder(tmp_path / "imgs", classes=("a", "b", "c", "d"), per_class=24)
    cfg = validate(
        {
            "root": str(tmp_path / "root"),
            "data": {"source": "imagefolder", "path": str(src), "image_size": 16, "rows_per_part": 16},
        }
    )
    meta = ingest.ingest(cfg)
    ddir = storage.dataset_dir(cfg.root, "imagefolder", meta.fingerprint)
    labels = np.concatenate(
        [read_all(storage.join(ddir, "train", p.name))["label"].to_numpy() for p in meta.split("train").parts]
    )
    # Stratified: within every part of 16 rows each of the 4 classes holds 4 ± 1 rows (a class-sorted layout
    # would put one class per part).
    for start in range(0, 96, 16):
        counts = np.bincount(labels[start : start + 16], minlength=4)
        assert counts.min() >= 3 and counts.max() <= 5, (start, counts)
    assert np.bincount(labels[-10:], minlength=4).min() >= 2, "the validation tail holds every class"
    assert meta.split("train").class_counts == [24, 24, 24, 24]


def test_stratified_order_keeps_proportions_in_every_prefix():
    labels = np.array([0] * 600 + [1] * 300 + [2] * 100)
    order = ingest.stratified_order(labels, seed=3)
    assert sorted(order.tolist()) == list(range(1000))
    for n in (50, 100, 333, 1000):
        counts = np.bincount(labels[order[:n]], minlength=3)
        assert np.all(np.abs(counts - n * np.array([0.6, 0.3, 0.1])) <= 1.0), (n, counts)
    assert not np.array_equal(order, ingest.stratified_order(labels, seed=4))
    assert np.array_equal(order, ingest.stratified_order(labels, seed=3))


def make_webdataset(d, n_train=24, n_test=8, classes=3):
    """WebDataset shards as `webdataset` writes them: per sample `<key>.png` + `<key>.cls`."""
    import io
    import tarfile

    rng = np.random.default_rng(4)
    files = {}
    for split, n, shards in (("train", n_train, 2), ("test", n_test, 1)):
        (d / split).mkdir(parents=True, exist_ok=True)
        for s in range(shards):
            with tarfile.open(d / split / f"shard-{s:06d}.tar", "w") as tar:
                for i in range(s, n, shards):
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
                    for name, data in (
                        (f"{split}{i:04d}.png", buf.getvalue()),
                        (f"{split}{i:04d}.cls", str(i % classes).encode()),
                    ):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
                    files[(split, i)] = buf.getvalue()
    return d, files


def test_webdataset_shards(tmp_path):
    src, files = make_webdataset(tmp_path / "wds")
    cfg = validate(
        {
            "root": str(tmp_path / "root"),
            "data": {"source": "webdataset", "path": str(src), "image_size": 16, "rows_per_part": 10},
        }
    )
    meta = ingest.ingest(cfg)
    assert meta.encoding == "encoded" and meta.num_classes == 3 and meta.split("train").rows == 24
    assert meta.split("train").class_counts == [8, 8, 8]
    ddir = storage.dataset_dir(cfg.root, "webdataset", meta.fingerprint)
    stored = sorted(
        b
        for p in meta.split("train").parts
        for b in read_all(storage.join(ddir, "train", p.name))["image"].to_pylist()
    )
    assert stored == sorted(v for (split, _), v in files.items() if split == "train")
    _views_render(cfg, meta)


def test_huggingface_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(5)

    def split(n):
        return datasets.Dataset.from_dict(
            {
                "img": [Image.fromarray(rng.integers(0, 255, (18, 18, 3), dtype=np.uint8)) for _ in range(n)],
                "y": [i % 4 for i in range(n)],
            },
            features=datasets.Features(
                {"img": datasets.Image(), "y": datasets.ClassLabel(names=["a", "b", "c", "d"])}
            ),
        )

    datasets.DatasetDict({"train": split(32), "validation": split(8)}).save_to_disk(str(tmp_path / "hf"))
    cfg = validate(
        {
            "root": str(tmp_path / "root"),
            "data": {
                "source": "huggingface",
                "path": str(tmp_path / "hf"),
                "image_column": "img",
                "label_column": "y",
                "image_size": 16,
            },
        }
    )
    meta = ingest.ingest(cfg)
    assert (
        meta.classes == ["a", "b", "c", "d"]
        and meta.split("train").rows == 32
        and meta.split("test").rows == 8
    )
    _views_render(cfg, meta)
    bad = validate(
        {**cfg.model_dump(mode="json"), "data": {**cfg.data.model_dump(mode="json"), "label_column": "label"}}
    )
    with pytest.raises(
        ingest.IngestError, match=r"has no column 'label' .*set data.image_column / data.label_column"
    ):
        ingest.ingest(bad)


def _views_render(cfg, meta):
    """The ingested parts serve the training read path: a training view of every row renders."""
    from pipeline.train.reader import image_plan, items, read_slices, row_group_slices

    plan = image_plan(cfg, meta)
    rows = 0
    for s in row_group_slices(meta, "train", 0, meta.split("train").rows):
        for block in read_slices({k: np.array([v]) for k, v in items([s], 0)[0].items()}, plan):
            assert block["image"].shape[1:] == (3, 16, 16)
            rows += len(block["idx"])
    assert rows == meta.split("train").rows


def test_ingest_decides_done_from_size_and_mtime_and_verify_rehashes(tmp_path):
    """An unchanged source is not re-read: the fingerprint comes from the stored (path, size, mtime) index. The
    documented blind spot: same size and the old mtime restored; --verify re-hashes and sees it."""
    src = uncompressed_idx_source(tmp_path / "fm", seed=6, train=40, test=10)
    cfg = validate({"root": str(tmp_path / "root"), "data": {"source": "idx", "path": str(src)}})
    first = ingest.ingest(cfg)
    labels = src / "train-labels-idx1-ubyte"
    stat = labels.stat()
    data = bytearray(labels.read_bytes())
    data[-1] = (data[-1] + 1) % 10  # one label changes; the size cannot
    labels.write_bytes(bytes(data))
    os.utime(labels, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert labels.stat().st_size == stat.st_size
    assert ingest.ingest(cfg).fingerprint == first.fingerprint, "same size and mtime: taken as unchanged"
    logs = []
    verified = ingest.ingest(cfg, verify=True, log=logs.append)
    assert verified.fingerprint != first.fingerprint and any("CHANGED" in line for line in logs)
