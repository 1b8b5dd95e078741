"""Blob durability started the moment a blob is placed.

A stored instance waits for three fsyncs before its success status: the blob's data, its
directory entry, and the index commit (DESIGN §4). Only the commit needs the group; the
other two can be done for each blob as soon as it is placed (ingest/pipeline.py prepare,
for a blob written before its parse) or reaches the index writer, while the group before
it still commits. Waiting for them in the group made three fsyncs in a row the length of
every group; with four associations, groups of one or two instances, that chain set the rate.

Where the kernel takes them (store/aio.py), the fsyncs of one `start` are handed to it in
one system call from the calling thread, and run while that thread goes on parsing. A thread
of ours could not start them then: it would need the interpreter lock, which the parsing
thread keeps until the parse is done. (The wait for them after a lone instance's statements:
~0.3 ms → 0, bench/README.md session 8.)

Elsewhere one thread does them, in passes: a pass takes every blob waiting, fsyncs each
one's data, then each distinct directory once (the data first: on ext4 the fsync of a new
file also writes its directory entry, and a directory fsync run beside it waits for that
write).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from pacsd.store.aio import AioFsync
from pacsd.store.blobstore import BlobStore

_UNTRIED = object()

# The fsyncs of blobs made durable already (by the ingest process that placed them).
DURABLE: Future = Future()
DURABLE.set_result(None)


class BlobSyncer:
    def __init__(self, store: BlobStore, in_kernel: bool = True) -> None:
        self.store = store
        # The fsyncs go to the kernel's own workers (store/aio.py) where the store can say
        # which files and directories they are, and the kernel takes them; else to a thread.
        self._aio = _UNTRIED if in_kernel and hasattr(store, "sync_plan") else None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="pacsd-blobsync")
        self._lock = threading.Lock()
        self._waiting: list[tuple[list[str], Future]] = []  # not yet taken by a pass

    def start(self, keys: list[str]) -> Future:
        """Begin making the blobs under `keys` (placed already) durable; safe from any thread.
        The Future's result is None once they are, or the fsync's error; `exception()` waits
        for it whatever the outcome (before a blob is removed, no fsync may still use it)."""
        aio = self._in_kernel()
        if aio is not None:
            return self._start_in_kernel(aio, keys)
        future: Future = Future()
        with self._lock:
            self._waiting.append((keys, future))
            first = len(self._waiting) == 1
        if first:
            # The others join the pass this schedules, or, if it already took the list,
            # find it empty and schedule the next.
            self._thread.submit(self._sync_waiting)
        return future

    def _in_kernel(self) -> AioFsync | None:
        if self._aio is _UNTRIED:
            with self._lock:
                if self._aio is _UNTRIED:
                    self._aio = AioFsync.open(os.fspath(self.store.root))
        return self._aio

    def _start_in_kernel(self, aio: AioFsync, keys: list[str]) -> Future:
        plan = self.store.sync_plan(keys)
        fds: list[int] = []
        try:
            for path in plan.files:
                fds.append(os.open(path, os.O_RDONLY))
            for directory in plan.dirs:
                fds.append(os.open(directory, os.O_RDONLY | os.O_DIRECTORY))
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            future: Future = Future()
            future.set_exception(exc)
            return future
        future = aio.fsync(fds)
        future.add_done_callback(lambda done: done.exception() is None and self.store.synced(plan))
        return future

    def _sync_waiting(self) -> None:
        with self._lock:
            taken, self._waiting = self._waiting, []
        try:
            self.store.sync([key for keys, _ in taken for key in keys])
        except BaseException as exc:
            for _, future in taken:
                future.set_exception(exc)
        else:
            for _, future in taken:
                future.set_result(None)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        if isinstance(self._aio, AioFsync):
            self._aio.close()
        self._aio = None
