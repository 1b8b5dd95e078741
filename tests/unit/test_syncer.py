"""BlobSyncer: each blob's fsyncs begin when it is handed over; blobs that wait while a pass
runs share the next pass (one directory fsync for all of them)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from pacsd.store.filetree import FileTreeBlobStore
from pacsd.store.syncer import BlobSyncer


class HeldStore:
    """Records each pass; the first waits until the test lets it end."""

    def __init__(self) -> None:
        self.passes: list[list[str]] = []
        self.first_pass_running = threading.Event()
        self.let_first_pass_end = threading.Event()
        self.failing: set[str] = set()

    def sync(self, keys) -> None:
        self.passes.append(list(keys))
        if len(self.passes) == 1:
            self.first_pass_running.set()
            assert self.let_first_pass_end.wait(10)
        if self.failing.intersection(keys):
            raise OSError(5, "Input/output error")


@pytest.fixture
def held():
    store = HeldStore()
    syncer = BlobSyncer(store)
    yield store, syncer
    store.let_first_pass_end.set()
    syncer.close()


def test_blobs_that_wait_during_a_pass_share_the_next_pass(held):
    store, syncer = held
    first = syncer.start(["a"])
    assert store.first_pass_running.wait(10)
    later = [syncer.start([key]) for key in ("b", "c", "d")]
    store.let_first_pass_end.set()
    for synced in [first, *later]:
        synced.result()
    assert store.passes == [["a"], ["b", "c", "d"]]


def test_a_blob_is_not_durable_before_its_pass_ends(held):
    store, syncer = held
    synced = syncer.start(["a"])
    assert store.first_pass_running.wait(10)
    waiter = threading.Thread(target=synced.result)
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()
    store.let_first_pass_end.set()
    waiter.join(10)
    assert not waiter.is_alive()


def test_a_failed_pass_is_raised_by_result_and_not_by_settle(held):
    store, syncer = held
    store.let_first_pass_end.set()
    syncer.start(["good"]).result()
    store.failing.add("bad")
    bad = syncer.start(["bad"])
    bad.exception()
    with pytest.raises(OSError, match="Input/output error"):
        bad.result()


@pytest.mark.parametrize("in_kernel", [True, False], ids=["aio", "thread"])
def test_a_pass_fsyncs_each_blob_then_its_directory(tmp_path: Path, request, in_kernel: bool):
    store = FileTreeBlobStore(tmp_path / "blobs")
    keys = [store.new_key() for _ in range(3)]
    for key in keys:
        store.put_bytes(key, b"x" * 100)
    minutes = {os.path.dirname(str(store.path(key))) for key in keys}
    store.sync(keys[:1])  # the day and minute directories' own entries are now durable
    syncer = BlobSyncer(store, in_kernel=in_kernel)
    syncer.start([]).result()  # AIO is tried (with an fsync of the store's root) before this
    fsynced = request.getfixturevalue("fsynced")  # from here on
    try:
        for synced in [syncer.start([key]) for key in keys[1:]]:
            synced.result()
    finally:
        syncer.close()
    blobs = [str(store.path(key)) for key in keys[1:]]
    # Each blob's data, then its directory (the day's and the root's entries are durable).
    assert set(fsynced) == set(blobs) | minutes
    for blob in blobs:
        assert fsynced.index(blob) < max(i for i, p in enumerate(fsynced) if p == os.path.dirname(blob))
