"""Blob durability started the moment a blob reaches the index writer.

A stored instance waits for three fsyncs before its success status: the blob's data, its
directory entry, and the index commit (DESIGN §4). Only the commit needs the group; the
other two can be done for each blob as soon as it reaches the writer, while the group before
it still commits. Waiting for them in the group made three fsyncs in a row the length of
every group; with four associations, groups of one or two instances, that chain set the rate.

One thread does them, in passes: a pass takes every blob waiting, fsyncs each one's data,
then each distinct directory once (the data first: on ext4 the fsync of a new file also
writes its directory entry, and a directory fsync run beside it waits for that write).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from pacsd.store.blobstore import BlobStore


class Synced:
    """The fsyncs of some blobs: their data and their directory entries."""

    def __init__(self, future: Future) -> None:
        self._future = future

    def result(self) -> None:
        """Block until they are done; raise their error."""
        self._future.result()

    def settle(self) -> None:
        """Block until they are done, whatever the outcome: a failed group must not leave
        an fsync running on a blob the caller is about to remove."""
        self._future.exception()

    async def wait(self) -> None:
        """`result` for a coroutine."""
        await asyncio.wrap_future(self._future)

    async def settled(self) -> None:
        """`settle` for a coroutine."""
        await asyncio.wait([asyncio.wrap_future(self._future)])


class BlobSyncer:
    def __init__(self, store: BlobStore) -> None:
        self.store = store
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="pacsd-blobsync")
        self._lock = threading.Lock()
        self._waiting: list[tuple[list[str], Future]] = []  # not yet taken by a pass

    def start(self, keys: list[str]) -> Synced:
        """Begin making the blobs under `keys` (placed already) durable; safe from any thread."""
        future: Future = Future()
        with self._lock:
            self._waiting.append((keys, future))
            first = len(self._waiting) == 1
        if first:
            # The others join the pass this schedules, or, if it already took the list,
            # find it empty and schedule the next.
            self._thread.submit(self._sync_waiting)
        return Synced(future)

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
