"""The handles through which reads of one open file run, several at once where the store allows it.

Arrow holds a lock around every read of a file implemented in Python (a `PyFileSystem`: `delay://`, fsspec
stores), so two reads of one such handle wait for each other, where S3's or a local file's native handle serves
them at once. Reads of a Python-implemented file therefore each take a handle of their own, opened when all are
busy and kept for the next read (up to KEPT idle ones per file); a native handle is shared. Never holds data:
a handle and its position only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow.fs as pafs

from pipeline.store import delay

KEPT = 4  # idle handles kept per file (each a file descriptor on a local or delayed store)


def _open_again(fs: pafs.FileSystem, path: str) -> Any:
    """Another handle of a file this process has open: on `delay://` without a request (an object store needs
    no second round trip to read an object whose size is known), elsewhere an ordinary open."""
    handler = getattr(fs, "handler", None)
    if isinstance(handler, delay.DelayedHandler):
        return handler.open_again(path)
    return fs.open_input_file(path)


class Handles:
    """The handles of one open file: `borrow()` lends one for the length of a read."""

    def __init__(self, first: Any, reopen: Callable[[], Any] | None) -> None:
        self.first, self.reopen = first, reopen  # reopen None: the first handle serves every read at once
        self.free: list[Any] = [first]
        self.lock = threading.Lock()

    @classmethod
    def of(cls, fs: pafs.FileSystem, path: str, first: Any) -> Handles:
        serialised = fs.type_name.startswith("py::")  # Arrow's PyFileSystem: one read at a time per handle
        return cls(first, (lambda: _open_again(fs, path)) if serialised else None)

    @contextmanager
    def borrow(self) -> Iterator[Any]:
        if self.reopen is None:
            yield self.first
            return
        with self.lock:
            handle = self.free.pop() if self.free else None
        if handle is None:
            handle = self.reopen()
        try:
            yield handle
        finally:
            with self.lock:
                keep = handle is self.first or len(self.free) < KEPT
                if keep:
                    self.free.append(handle)
            if not keep:
                handle.close()
