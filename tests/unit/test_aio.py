"""store/aio.py: fsyncs handed to the kernel (Linux native AIO), and the blob syncer's use
of them."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys
from pathlib import Path

import pytest

from pacsd.store.aio import AioFsync
from pacsd.store.filetree import FileTreeBlobStore
from pacsd.store.syncer import BlobSyncer

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "aarch64"),
    reason="native AIO fsync is used on Linux x86_64 and aarch64 only")


@pytest.fixture
def aio(tmp_path: Path):
    opened = AioFsync.open(str(tmp_path))
    assert opened is not None, "this Linux refuses IOCB_CMD_FSYNC (needs 4.18 or later)"
    yield opened
    opened.close()


def closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False


def files(tmp_path: Path, n: int) -> list[int]:
    fds = []
    for i in range(n):
        path = tmp_path / f"f{i}"
        path.write_bytes(b"x" * 4096)
        fds.append(os.open(path, os.O_RDONLY))
    return fds


def test_files_and_a_directory_are_fsynced_and_their_descriptors_closed(aio, tmp_path: Path):
    fds = files(tmp_path, 3) + [os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)]
    assert aio.fsync(fds).result(10) is None
    assert all(closed(fd) for fd in fds)


def test_an_fsync_the_kernel_refuses_fails_the_batch_with_its_error(aio, tmp_path: Path):
    good = files(tmp_path, 2)
    read_end, write_end = os.pipe()  # a pipe cannot be fsynced
    try:
        with pytest.raises(OSError) as raised:
            aio.fsync([good[0], read_end, good[1]]).result(10)
        assert raised.value.errno == errno.EINVAL
        assert closed(read_end) and all(closed(fd) for fd in good)
    finally:
        os.close(write_end)


def test_the_kernels_refusal_is_the_error_where_nothing_may_be_done_in_this_thread(aio):
    # How AioFsync.open tells a kernel that takes no fsync through AIO.
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(OSError) as raised:
            aio.fsync([read_end], here_too=False).result(10)
        assert raised.value.errno == errno.EINVAL
        assert closed(read_end)
    finally:
        os.close(write_end)


def test_more_fsyncs_than_the_context_holds_are_all_done(aio, tmp_path: Path):
    # The context takes 256 at a time; the rest are fsynced by the caller.
    fds = files(tmp_path, 600)
    assert aio.fsync(fds).result(30) is None
    assert all(closed(fd) for fd in fds)


def test_batches_end_independently(aio, tmp_path: Path):
    futures = []
    for i in range(20):
        (tmp_path / str(i)).mkdir()
        futures.append(aio.fsync(files(tmp_path / str(i), 2)))
    assert [future.result(10) for future in futures] == [None] * 20


def test_the_syncer_forgets_what_the_kernel_made_durable(tmp_path: Path, fsynced):
    store = FileTreeBlobStore(tmp_path / "blobs")
    keys = [store.new_key() for _ in range(3)]
    for key in keys:
        store.put_bytes(key, b"x" * 100)
    before = store.sync_plan(keys)
    assert len(before.files) == 3 and before.created  # new blobs in new day and minute directories
    syncer = BlobSyncer(store)
    try:
        syncer.start(keys).result(10)
        assert {str(store.path(key)) for key in keys} <= set(fsynced)
        after = store.sync_plan(keys)
        assert after.files == [] and after.created == set()
    finally:
        syncer.close()


def test_a_blob_gone_before_its_fsync_is_an_error_not_a_success(tmp_path: Path):
    store = FileTreeBlobStore(tmp_path / "blobs")
    key = store.new_key()
    store.put_bytes(key, b"x" * 100)
    os.unlink(store.path(key))  # behind the store's back: it still counts the blob unsynced
    syncer = BlobSyncer(store)
    try:
        with pytest.raises(FileNotFoundError):
            syncer.start([key]).result(10)
    finally:
        syncer.close()


def test_without_aio_the_syncer_fsyncs_in_its_thread(tmp_path: Path, monkeypatch, request):
    monkeypatch.setattr(AioFsync, "open", classmethod(lambda cls, probe_dir: None))
    store = FileTreeBlobStore(tmp_path / "blobs")
    key = store.new_key()
    store.put_bytes(key, b"x" * 100)
    fsynced = request.getfixturevalue("fsynced")  # from here on
    syncer = BlobSyncer(store)
    try:
        syncer.start([key]).result(10)
    finally:
        syncer.close()
    blob = str(store.path(key))
    assert fsynced[0] == blob and os.path.dirname(blob) in fsynced[1:], fsynced


def test_if_the_kernel_context_ends_under_it_nothing_waits_for_ever(tmp_path: Path):
    """The context gone (here: destroyed behind the object's back): an fsync in flight ends,
    with its result or with an error, and later fsyncs are done in the caller's thread."""
    aio = AioFsync.open(str(tmp_path))
    assert aio is not None
    in_flight = aio.fsync(files(tmp_path, 3))
    aio._syscall(ctypes.c_long(aio._destroy), ctypes.c_ulong(aio._context))
    aio._reaper.join(10)
    assert not aio._reaper.is_alive()
    assert in_flight.done()  # succeeded if reaped before the context ended, else failed
    (tmp_path / "later").mkdir()
    later = files(tmp_path / "later", 2)
    assert aio.fsync(later).result(10) is None
    assert all(closed(fd) for fd in later)
