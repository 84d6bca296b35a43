"""Parquet files that can tell a corrupt byte from a good one, written and read in row groups.

Every table the pipeline stores (image parts, cache parts) goes through `encode_table` / `read_row_groups`. On
write: Parquet page CRCs (for other tools) plus an xxh3-64 digest of every column of every row group, kept in the
file's key-value metadata. On read: the digests are recomputed over the decoded columns and compared (xxh3 is
several times faster than pyarrow's page-CRC verification, so it is the hot-path check; docs/performance.md has
the figures). A mismatch, an undecodable page or footer raises `CorruptTable`; a storage error that may
pass (throttling, a dropped connection) raises `storage.StorageUnavailable` after retries; a refused request
(permissions, credentials) raises `storage.StorageAccessDenied` at once: neither is corruption. Nothing here knows
about teachers or images.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from pipeline.store import storage
from pipeline.store.handles import Handles

CHECKSUM_KEY = b"camkd.checksums"


class CorruptTable(RuntimeError):
    """A stored table whose bytes are not what was written (or not Parquet at all); `url` names the file."""

    def __init__(self, url: str, detail: str) -> None:
        super().__init__(f"{url}: {detail}")
        self.url, self.detail = url, detail


def column_digest(array: pa.Array | pa.ChunkedArray) -> str:
    """xxh3-64 over a column's value buffers (and offsets for variable-width types), independent of how the
    array is chunked or sliced."""
    if isinstance(array, pa.ChunkedArray):  # one chunk (a row group as read): no copy
        array = array.chunk(0) if array.num_chunks == 1 else array.combine_chunks()
    if array.offset != 0:
        array = pa.concat_arrays([array])  # a sliced view: copy so the buffers start at row 0
    h = xxhash.xxh3_64()
    n = len(array)
    t = array.type
    buffers = array.buffers()
    if pa.types.is_fixed_size_binary(t):
        h.update(memoryview(buffers[1])[: n * t.byte_width])
    elif pa.types.is_binary(t) or pa.types.is_string(t) or pa.types.is_large_binary(t):
        offsets = np.frombuffer(buffers[1], dtype=np.int64 if pa.types.is_large_binary(t) else np.int32)[
            : n + 1
        ]
        h.update(offsets - offsets[0])
        if n and buffers[2] is not None:
            h.update(memoryview(buffers[2])[int(offsets[0]) : int(offsets[-1])])
    elif pa.types.is_primitive(t):
        h.update(memoryview(buffers[1])[: n * t.bit_width // 8])
    else:
        raise TypeError(f"column_digest does not handle {t}; store tensors as fixed-size binary columns")
    return h.hexdigest()


@dataclass(frozen=True)
class Encoded:
    """A table encoded as Parquet bytes (in Arrow memory: written to storage as they are, never copied into a
    Python `bytes`), with what a receipt records about it."""

    data: pa.Buffer
    rows: int
    row_groups: int
    digest: str  # xxh3-128 of the whole file

    @property
    def size(self) -> int:
        return self.data.size


def encode_table(
    table: pa.Table,
    row_group_rows: int,
    metadata: dict[bytes, bytes] | None = None,
    compression: str = "none",
) -> Encoded:
    """Parquet bytes with `row_group_rows` rows per row group, page CRCs, and per-row-group column digests."""
    row_group_rows = max(1, int(row_group_rows))
    digests: dict[str, list[str]] = {name: [] for name in table.column_names}
    for start in range(0, max(table.num_rows, 1), row_group_rows):
        rg = table.slice(start, row_group_rows)
        for name in table.column_names:
            digests[name].append(column_digest(rg.column(name)))
    kv = dict(metadata or {})
    kv[CHECKSUM_KEY] = json.dumps({"rows": row_group_rows, "columns": digests}).encode()
    table = table.replace_schema_metadata(kv)
    data = _parquet_bytes(
        table, row_group_rows, compression, _size_bound(table, row_group_rows, kv, compression)
    )
    meta_rows = table.num_rows
    return Encoded(data, meta_rows, -(-meta_rows // row_group_rows), xxhash.xxh3_128_hexdigest(data))


def _parquet_bytes(table: pa.Table, row_group_rows: int, compression: str, bound: int) -> pa.Buffer:
    """The Parquet file of `table`, written into one buffer of `bound` bytes (a buffer that grows copies what it
    holds each time it doubles), or into a growing one when the file turns out larger than the bound."""
    options = dict(
        row_group_size=row_group_rows,
        compression=compression,
        use_dictionary=False,
        write_page_checksum=True,
        write_statistics=False,
    )
    buf = pa.allocate_buffer(bound)
    sink = pa.FixedSizeBufferWriter(buf)
    try:
        pq.write_table(table, sink, **options)
        return buf.slice(0, sink.tell())
    except OSError:  # "Write out of bounds": more framing than the bound allows for
        growing = pa.BufferOutputStream()
        pq.write_table(table, growing, **options)
        return growing.getvalue()


def _size_bound(table: pa.Table, row_group_rows: int, kv: dict[bytes, bytes], compression: str) -> int:
    """An upper bound of the Parquet file of `table` (no dictionary, no statistics): its values (snappy may grow
    incompressible data by 1/6, the other codecs by far less), a bit per value for definition levels, page
    headers (pages are ~1 MB, or a whole batch of large values: 1/64 of the data is plenty), ~1 KB of footer per
    column chunk, and the key-value metadata three times (ours, and Arrow's base64 copy of the schema)."""
    data = sum(
        b.size for col in table.columns for chunk in col.chunks for b in chunk.buffers() if b is not None
    )
    chunks = -(-max(table.num_rows, 1) // row_group_rows) * table.num_columns
    meta = sum(len(k) + len(v) for k, v in kv.items())
    framing = data // (6 if compression == "snappy" else 64) + table.num_rows * table.num_columns // 8
    return data + framing + 1024 * chunks + 3 * meta + 65536


def write_table(url: str, encoded: Encoded) -> None:
    storage.write_bytes_atomic(url, memoryview(encoded.data))


@dataclass
class OpenTable:
    """An opened Parquet file: its handle, footer, our key-value metadata and its per-row-group digests.

    The handle and footer are read once (`open_table`; `open_cached` keeps them per process); each `read` then
    fetches a row group's column chunks with pyarrow's pre-buffering, which coalesces them into one ranged read
    per run of adjacent columns: the requests per row group do not grow with the number of columns. A read makes
    its own short-lived reader on a handle of the file (`handles`: the shared one, or one per concurrent read where
    Arrow would serialise them), so reads of one file may run in several threads at once and no buffer outlives
    its read."""

    url: str
    handle: Any  # pyarrow NativeFile (random access)
    footer: pq.FileMetaData
    schema: pa.Schema
    metadata: dict[str, Any]  # the JSON under `key` (e.g. b"camkd") given to open_table
    digests: dict[str, list[str]]
    row_group_rows: int
    handles: Handles | None = None  # the handles concurrent reads take (None: `handle` for every read)

    @property
    def num_rows(self) -> int:
        return self.footer.num_rows

    @property
    def num_row_groups(self) -> int:
        return self.footer.num_row_groups

    def read(
        self, row_groups: list[int] | None, columns: list[str], retry: storage.RetryPolicy | None = None
    ) -> pa.Table:
        """The given row groups (all when None) of `columns`, each column's digest checked per row group."""
        groups = list(range(self.num_row_groups)) if row_groups is None else list(row_groups)
        try:
            missing = [c for c in columns if c not in self.schema.names]
            if missing:
                raise CorruptTable(self.url, f"has no column(s) {missing} (it holds {self.schema.names})")
            for g in groups:
                for name in columns:
                    want = self.digests.get(name)
                    if want is None or g >= len(want):
                        raise CorruptTable(self.url, f"has no checksum for column {name!r}, row group {g}")
            if not groups:
                return self.schema.empty_table().select(columns)

            def fetch() -> pa.Table:
                with self.handles.borrow() if self.handles else nullcontext(self.handle) as handle:
                    reader = pq.ParquetFile(handle, metadata=self.footer, pre_buffer=True)
                    return reader.read_row_groups(groups, columns=columns)

            table = storage.retrying(fetch, self.url, policy=retry)
            start = 0
            for g in groups:
                n = self.footer.row_group(g).num_rows
                for name in columns:
                    if column_digest(table.column(name).slice(start, n)) != self.digests[name][g]:
                        raise CorruptTable(
                            self.url, f"column {name!r}, row group {g} does not match its checksum"
                        )
                start += n
        except (pa.ArrowInvalid, pa.ArrowException) as e:
            raise CorruptTable(self.url, f"cannot be decoded ({e})") from None
        except OSError as e:
            if storage.is_access_denied(e):
                raise storage.access_denied(self.url, e) from None
            if storage.is_transient(e):
                raise
            raise CorruptTable(self.url, f"cannot be decoded ({e})") from None
        return table


def open_table(url: str, key: bytes | None = None, retry: storage.RetryPolicy | None = None) -> OpenTable:
    """Open a stored table for row-group reads (one open and one footer read). Raises FileNotFoundError,
    CorruptTable, StorageUnavailable or StorageAccessDenied."""
    fs, path = storage.pyarrow_fs(url)

    def opened():
        handle = fs.open_input_file(path)
        try:
            return handle, pq.read_metadata(handle)
        except BaseException:
            handle.close()
            raise

    try:
        handle, footer = storage.retrying(opened, url, policy=retry)
        schema = footer.schema.to_arrow_schema()
        kv = schema.metadata or {}
        sums = json.loads(kv[CHECKSUM_KEY]) if CHECKSUM_KEY in kv else None
        meta = json.loads(kv.get(key, b"{}")) if key else {}
    except FileNotFoundError:
        raise
    except (pa.ArrowInvalid, pa.ArrowException, ValueError, UnicodeDecodeError) as e:
        raise CorruptTable(url, f"is not a readable Parquet file ({e})") from None
    except OSError as e:
        if storage.is_access_denied(e):
            raise storage.access_denied(url, e) from None
        if storage.is_transient(e) or isinstance(e, FileNotFoundError):
            raise
        raise CorruptTable(url, f"is not a readable Parquet file ({e})") from None
    if sums is None:
        handle.close()
        raise CorruptTable(url, "carries no camkd checksums (written by another tool or an older camkd-ray)")
    handles = Handles.of(fs, path, handle)
    return OpenTable(url, handle, footer, schema, meta, sums["columns"], int(sums["rows"]), handles)


OPEN_FILES = 256  # open tables kept per process: a footer and a file handle each (no data buffers)
_open: OrderedDict[tuple[str, bytes | None, str], OpenTable] = OrderedDict()
_opening: dict[tuple[str, bytes | None, str], threading.Event] = {}
_open_lock = threading.Lock()


def open_cached(
    url: str, key: bytes | None = None, retry: storage.RetryPolicy | None = None, scope: str | None = None
) -> OpenTable:
    """`open_table`, remembered per process within `scope` (the last OPEN_FILES tables): a read task or reader
    thread that meets a part again reads only its row groups, without a new open and footer read; threads that
    want a part another thread is opening wait for that open instead of making their own. A scope is one
    reader's run (a training run's workers, a precompute run): stored parts do not change while it reads them,
    and a later run, in a Ray worker process that served an earlier one, opens every file afresh. No scope: no
    remembering (a plain `open_table`)."""
    if scope is None:
        return open_table(url, key, retry)
    k = (url, key, scope)
    while True:
        with _open_lock:
            table = _open.get(k)
            if table is not None:
                _open.move_to_end(k)
                return table
            pending = _opening.get(k)
            if pending is None:
                _opening[k] = threading.Event()
                break
        pending.wait()  # another thread is opening it; if that open failed, try ourselves
    try:
        table = open_table(url, key, retry)
        with _open_lock:
            _open[k] = table
            _open.move_to_end(k)
            while len(_open) > OPEN_FILES:  # a dropped handle closes once no read holds it any more
                _open.popitem(last=False)
        return table
    finally:
        with _open_lock:
            _opening.pop(k).set()


def forget(url: str) -> None:
    """Drop every remembered open table of `url` (after it was found corrupt, foreign or misplaced)."""
    with _open_lock:
        for k in [k for k in _open if k[0] == url]:
            _open.pop(k)
