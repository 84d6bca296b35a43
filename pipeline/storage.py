"""Storage on any fsspec filesystem (local path, s3://, gs://, memory://): layout, atomic writes, JSON, hashes.

Every file the pipeline writes goes through here: written to a temporary name and renamed, so a reader never sees
half a file. Nothing here knows about teachers or training.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid
from functools import lru_cache
from typing import Any

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

TMP_MARK = ".tmp-"


class StorageError(RuntimeError):
    """A storage location that cannot be used (not writable, full, missing), phrased for the user."""


def normalize_url(url: str) -> str:
    """Local paths become absolute (workers may run elsewhere); URLs are kept, without a trailing slash."""
    if "://" not in url:
        return os.path.abspath(os.path.expanduser(url))
    return url.rstrip("/")


@lru_cache(maxsize=32)
def _fs_for(protocol_key: str) -> fsspec.AbstractFileSystem:
    return fsspec.filesystem(protocol_key) if protocol_key != "file" else LocalFileSystem()


def get_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URL or local path."""
    url = normalize_url(url)
    if "://" not in url:
        return _fs_for("file"), url
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def join(url: str, *parts: str) -> str:
    url = normalize_url(url)
    if "://" in url:
        proto, rest = url.split("://", 1)
        return f"{proto}://" + posixpath.join(rest, *parts)
    return os.path.join(url, *parts)


def pyarrow_fs(url: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem + path, for Ray Train's storage and pyarrow readers."""
    url = normalize_url(url)
    if "://" not in url:
        return pafs.LocalFileSystem(), url
    fs, path = get_fs(url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def exists(url: str) -> bool:
    fs, path = get_fs(url)
    return fs.exists(path)


def makedirs(url: str) -> None:
    fs, path = get_fs(url)
    try:
        fs.makedirs(path, exist_ok=True)
    except OSError as e:
        raise StorageError(
            f"cannot create folder {url!r}: {e.strerror or e}; check the path and its permissions"
        ) from e


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write to `<url>.tmp-<uuid>` then rename over `url` (a reader sees the old file or the new, never half)."""
    fs, path = get_fs(url)
    parent = posixpath.dirname(path) if "://" in normalize_url(url) else os.path.dirname(path)
    tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    try:
        fs.makedirs(parent, exist_ok=True)
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    except OSError as e:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        except OSError:
            pass
        reason = "the disk is full" if getattr(e, "errno", None) == 28 else (e.strerror or str(e))
        raise StorageError(f"could not write {url!r}: {reason}; free space or choose another `root`") from e


def read_bytes(url: str) -> bytes:
    fs, path = get_fs(url)
    with fs.open(path, "rb") as f:
        return f.read()


def write_json(url: str, obj: Any) -> None:
    write_bytes_atomic(url, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(url: str, chunk: int = 1 << 22) -> str:
    fs, path = get_fs(url)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def listdir(url: str) -> list[str]:
    """Base names in a folder ([] if it does not exist)."""
    fs, path = get_fs(url)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def remove(url: str) -> None:
    fs, path = get_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def check_writable(url: str) -> None:
    """Fail early, with a clear message, if `url` cannot take files (read-only, missing permissions, full)."""
    makedirs(url)
    probe = join(url, f".write-probe{TMP_MARK}{uuid.uuid4().hex[:8]}")
    fs, path = get_fs(probe)
    try:
        with fs.open(path, "wb") as f:
            f.write(b"ok" * 1024)
        fs.rm(path)
    except OSError as e:
        reason = "the disk is full" if getattr(e, "errno", None) == 28 else (e.strerror or str(e))
        raise StorageError(
            f"storage {url!r} is not writable ({reason}); fix its permissions/space or set `root` elsewhere"
        ) from e


# ------------------------------------------------------------------------------------------------- layout
def dataset_dir(root: str, name: str, fingerprint: str) -> str:
    return join(root, "datasets", f"{name}-{fingerprint}")


def teacher_cache_dir(root: str, dataset_fp: str, teacher_id: str) -> str:
    return join(root, "cache", dataset_fp, teacher_id)


def teachers_dir(root: str, name: str) -> str:
    return join(root, "teachers", name)


def runs_dir(root: str, experiment: str) -> str:
    return join(root, "runs", experiment)


def part_name(i: int) -> str:
    return f"part-{i:05d}.parquet"
