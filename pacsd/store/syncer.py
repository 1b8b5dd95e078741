"""Blob durability started the moment a blob reaches the index writer.

A stored instance waits for three fsyncs before its success status: the blob's data, its
directory entry, and the index commit (DESIGN §4). Only the commit has to come after the
other two; the blob and its directory do not depend on each other. So each blob handed to
the writer is fsynced at once in one thread while its directory is fsynced in another, and
both usually finish while the previous group is still committing. Waiting for them in the
group, one after the other, made three fsyncs in a row the length of every group; with four
associations, groups of one or two instances, that chain set the rate.

Directory requests that queue up while a directory fsync runs are served together by the
next one: an entry created before an fsync of its directory begins is durable when it ends.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait

from pacsd.store.blobstore import BlobStore


class Synced:
    """The two fsyncs of some blobs: their data, and their directory entries."""

    def __init__(self, data: Future, entries: Future) -> None:
        self._futures = (data, entries)

    def result(self) -> None:
        """Block until both are done; raise the error of either (the data's first)."""
        for future in self._futures:
            future.result()

    def settle(self) -> None:
        """Block until both are done, whatever their outcome: a failed group must not
        leave an fsync running on a blob the caller is about to remove."""
        futures_wait(self._futures)

    async def wait(self) -> None:
        """`result` for a coroutine."""
        for future in self._futures:
            await asyncio.wrap_future(future)

    async def settled(self) -> None:
        """`settle` for a coroutine."""
        await asyncio.wait([asyncio.wrap_future(future) for future in self._futures])


class BlobSyncer:
    def __init__(self, store: BlobStore) -> None:
        self.store = store
        self._data = ThreadPoolExecutor(1, thread_name_prefix="pacsd-blobsync")
        self._entries = ThreadPoolExecutor(1, thread_name_prefix="pacsd-dirsync")
        self._lock = threading.Lock()
        # Directory requests not yet taken by an fsync pass.
        self._waiting: list[tuple[list[str], Future]] = []

    def start(self, keys: list[str]) -> Synced:
        """Begin making the blobs under `keys` (placed already) durable; safe from any thread."""
        data = self._data.submit(self.store.sync_blobs, keys)
        entries: Future = Future()
        with self._lock:
            self._waiting.append((keys, entries))
            first = len(self._waiting) == 1
        if first:
            # The others join the pass this schedules, or, if it already took the list,
            # find it empty and schedule the next.
            self._entries.submit(self._sync_waiting_directories)
        return Synced(data, entries)

    def _sync_waiting_directories(self) -> None:
        with self._lock:
            taken, self._waiting = self._waiting, []
        try:
            self.store.sync_directories([key for keys, _ in taken for key in keys])
        except BaseException as exc:
            for _, entries in taken:
                entries.set_exception(exc)
        else:
            for _, entries in taken:
                entries.set_result(None)

    def close(self) -> None:
        self._data.shutdown(wait=True)
        self._entries.shutdown(wait=True)
