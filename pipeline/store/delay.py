"""A storage layer that adds object-store latency to a local folder and counts what crosses it.

`delay://<ms>/<absolute path>` is a local folder seen as if every open and every read were a request to an object
store answering after `ms` milliseconds: the delay is a sleep (it costs no CPU and releases the GIL), so a reader
measured over it shows how well it hides latency, not how fast a server parses requests. Every open and read is
counted per process (`counters()`), with the time intervals during which at least one request was outstanding, so
a benchmark can report requests per sample, the round trips a read waited for in series and the most reads in
flight at once. Arrow serialises the reads of one handle of a Python-implemented file (a lock around each read,
which holds the sleep), where S3 serves the ranged reads of one object at once: readers take a handle per
concurrent read (`handles.Handles`), and a further handle of a file already open costs no request here, as none
is needed on S3 for an object whose size is known. Used by
`benchmarks/input_pipeline.py --latency-ms` and by the `doctor` stage's tests; any stage accepts such a root.
Nothing here knows about teachers or training.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs

SCHEME = "delay://"


@dataclass
class Counters:
    """Requests seen by this process's delaying filesystems (all of them together)."""

    opens: int = 0
    reads: int = 0
    bytes: int = 0
    infos: int = 0  # metadata requests (a HEAD or a listing)
    busy_seconds: float = 0.0  # time with at least one request outstanding
    peak_reads: int = 0  # the most reads outstanding at once (reads in flight)
    _outstanding: int = 0
    _reads_out: int = 0
    _busy_since: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def requests(self) -> int:
        return self.opens + self.reads + self.infos

    def begin(self, kind: str, nbytes: int = 0) -> None:
        with self._lock:
            setattr(self, kind, getattr(self, kind) + 1)
            self.bytes += nbytes
            if self._outstanding == 0:
                self._busy_since = time.perf_counter()
            self._outstanding += 1
            if kind == "reads":
                self._reads_out += 1
                self.peak_reads = max(self.peak_reads, self._reads_out)

    def end(self, kind: str) -> None:
        with self._lock:
            self._outstanding -= 1
            if kind == "reads":
                self._reads_out -= 1
            if self._outstanding == 0:
                self.busy_seconds += time.perf_counter() - self._busy_since

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {
                "opens": self.opens,
                "reads": self.reads,
                "infos": self.infos,
                "requests": self.requests,
                "bytes": self.bytes,
                "busy_seconds": self.busy_seconds,
                "peak_reads": self.peak_reads,
            }

    def reset(self) -> None:
        with self._lock:
            self.opens = self.reads = self.bytes = self.infos = 0
            self.busy_seconds = 0.0
            self.peak_reads = self._reads_out


_COUNTERS = Counters()


def counters() -> Counters:
    """This process's request counters (shared by every delaying filesystem in it)."""
    return _COUNTERS


def parse(url: str) -> tuple[float, str]:
    """`delay://25/data/root` → (0.025 s, "/data/root")."""
    rest = url[len(SCHEME) :]
    ms, sep, path = rest.partition("/")
    try:
        seconds = float(ms) / 1000.0
    except ValueError:
        seconds = -1.0
    if not sep or seconds < 0:
        raise ValueError(
            f"{url!r}: a delayed root is delay://<milliseconds>/<absolute local path>, e.g. delay://25/data/root"
        )
    return seconds, "/" + path.lstrip("/")


class _DelayedFile:
    """A local file whose every read waits `delay` first (one request per read, as a ranged GET). The read
    position is kept per thread and every read is a positioned read of the file underneath, so threads that share
    one open file (as they share an object-store file handle) never move each other's position."""

    def __init__(self, inner, delay: float, counter: Counters) -> None:
        self.inner, self.delay, self.counter = inner, delay, counter
        self.length = inner.size()
        self.position = threading.local()
        self.closed = False

    def _wait(self, nbytes: int) -> None:
        self.counter.begin("reads", nbytes)
        try:
            time.sleep(self.delay)
        finally:
            self.counter.end("reads")

    def _pos(self) -> int:
        return getattr(self.position, "value", 0)

    def read(self, nbytes: int = -1) -> bytes:
        start = self._pos()
        n = self.length - start if nbytes is None or nbytes < 0 else min(nbytes, max(self.length - start, 0))
        data = bytes(self.inner.read_at(n, start)) if n > 0 else b""
        self.position.value = start + len(data)
        self._wait(len(data))
        return data

    def read_at(self, nbytes: int, offset: int) -> bytes:
        data = bytes(self.inner.read_at(nbytes, offset))
        self._wait(len(data))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos(), 2: self.length}[whence]
        self.position.value = base + offset
        return self.position.value

    def tell(self) -> int:
        return self._pos()

    def size(self) -> int:
        return self.length

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True
        self.inner.close()


class DelayedHandler(pafs.FileSystemHandler):
    """pyarrow FileSystemHandler over the local filesystem: opens, reads and metadata calls each wait `delay`."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.local = pafs.LocalFileSystem()
        self.counter = _COUNTERS

    def _request(self, kind: str) -> None:
        self.counter.begin(kind)
        try:
            time.sleep(self.delay)
        finally:
            self.counter.end(kind)

    def __eq__(self, other) -> bool:
        return isinstance(other, DelayedHandler) and other.delay == self.delay

    def __ne__(self, other) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return f"delay-{self.delay * 1000:g}ms"

    def normalize_path(self, path: str) -> str:
        return path

    def get_file_info(self, paths):
        self._request("infos")
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        self._request("infos")
        return self.local.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.local.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("refusing to delete the contents of the root of a delayed filesystem")

    def delete_file(self, path):
        self.local.delete_file(path)

    def move(self, src, dest):
        self.local.move(src, dest)

    def copy_file(self, src, dest):
        self.local.copy_file(src, dest)

    def open_input_stream(self, path):
        self._request("opens")
        return pa.PythonFile(
            _DelayedFile(self.local.open_input_file(path), self.delay, self.counter), mode="r"
        )

    def open_input_file(self, path):
        self._request("opens")
        return self.open_again(path)

    def open_again(self, path):
        """Another handle of a file the caller has open already, without a request (module docstring)."""
        return pa.PythonFile(
            _DelayedFile(self.local.open_input_file(path), self.delay, self.counter), mode="r"
        )

    def open_output_stream(self, path, metadata):
        return self.local.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.local.open_append_stream(path, metadata=metadata)


def filesystem(delay: float) -> pafs.FileSystem:
    return pafs.PyFileSystem(DelayedHandler(delay))
