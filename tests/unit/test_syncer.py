"""BlobSyncer: a blob's data and its directory entry fsynced side by side, directory
requests that queue up during a pass served by the next pass together."""

from __future__ import annotations

import threading

import pytest

from pacsd.store.syncer import BlobSyncer


class RecordingStore:
    """Records each call; the first directory pass waits until the test lets it go."""

    def __init__(self) -> None:
        self.blob_calls: list[list[str]] = []
        self.directory_calls: list[list[str]] = []
        self.first_pass_running = threading.Event()
        self.let_first_pass_end = threading.Event()
        self.fail_blobs: set[str] = set()

    def sync_blobs(self, keys) -> None:
        self.blob_calls.append(list(keys))
        if self.fail_blobs.intersection(keys):
            raise OSError(5, "Input/output error")

    def sync_directories(self, keys) -> None:
        self.directory_calls.append(list(keys))
        if len(self.directory_calls) == 1:
            self.first_pass_running.set()
            assert self.let_first_pass_end.wait(10)


@pytest.fixture
def store_and_syncer():
    store = RecordingStore()
    syncer = BlobSyncer(store)
    yield store, syncer
    store.let_first_pass_end.set()
    syncer.close()


def test_directory_requests_made_during_a_pass_share_the_next_pass(store_and_syncer):
    store, syncer = store_and_syncer
    first = syncer.start(["a"])
    assert store.first_pass_running.wait(10)
    later = [syncer.start([key]) for key in ("b", "c", "d")]
    store.let_first_pass_end.set()
    for synced in [first, *later]:
        synced.result()
    # Each blob's data on its own; the three directory requests that waited, in one pass.
    assert sorted(store.blob_calls) == [["a"], ["b"], ["c"], ["d"]]
    assert store.directory_calls == [["a"], ["b", "c", "d"]]


def test_a_failed_blob_fsync_is_raised_by_result_and_not_by_settle(store_and_syncer):
    store, syncer = store_and_syncer
    store.let_first_pass_end.set()
    store.fail_blobs.add("bad")
    good, bad = syncer.start(["good"]), syncer.start(["bad"])
    good.result()
    bad.settle()
    with pytest.raises(OSError, match="Input/output error"):
        bad.result()


def test_a_blob_waits_for_its_directory_pass(store_and_syncer):
    store, syncer = store_and_syncer
    synced = syncer.start(["a"])
    assert store.first_pass_running.wait(10)
    # The data is fsynced, but the directory entry not yet: not durable.
    waiter = threading.Thread(target=synced.result)
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()
    store.let_first_pass_end.set()
    waiter.join(10)
    assert not waiter.is_alive()
