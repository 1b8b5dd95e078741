"""The ingest hot path's file-system calls per instance, counted (not timed).

A small C-STORE arrives in memory. The pipeline writes it straight to its blob, with no
spool file, link or unlink, starts the blob's writeback (sync_file_range, on Linux) and
fsyncs nothing itself. The index writer fsyncs the group's blobs and their directory
beside its statements, before the commit. Each of these calls costs the sender time on
every instance, so a change that adds one should fail here, on any machine, not show up as
a few percent in bench/.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from pacsd.app import Archive
from pacsd.config import Settings, StorageSettings
from pacsd.dimse.status import Status
from pacsd.ingest.pipeline import Incoming
from pacsd.ingest.processes import TRANSFER_LIMIT
from pacsd.store import filetree
from pacsd.store.aio import AioFsync
from tests.unit.test_index import make_dataset, part10


@pytest.fixture
def calls(monkeypatch):
    """(call, path) for every os.open that creates a file, fsync, link, unlink and the
    writeback the blob store starts; the real calls still run."""
    seen: list[tuple[str, str]] = []
    real_open, real_fsync, real_link, real_unlink = os.open, os.fsync, os.link, os.unlink
    real_writeback = filetree._SYNC_FILE_RANGE
    real_aio = AioFsync.fsync

    def writeback(fd, offset, nbytes, flags):
        seen.append(("writeback", os.readlink(f"/proc/self/fd/{fd}")))
        return real_writeback(fd, offset, nbytes, flags)

    def opening(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            seen.append(("create", str(path)))
        return real_open(path, flags, *args, **kwargs)

    def fsync(fd):
        seen.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def link(src, dst, *args, **kwargs):
        seen.append(("link", str(dst)))
        return real_link(src, dst, *args, **kwargs)

    def unlink(path, *args, **kwargs):
        seen.append(("unlink", str(path)))
        return real_unlink(path, *args, **kwargs)

    def fsync_in_kernel(self, fds, **kwargs):
        seen.extend(("fsync", os.readlink(f"/proc/self/fd/{fd}")) for fd in fds)
        return real_aio(self, fds, **kwargs)

    monkeypatch.setattr(os, "open", opening)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(AioFsync, "fsync", fsync_in_kernel)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "unlink", unlink)
    if real_writeback is not None:
        monkeypatch.setattr(filetree, "_SYNC_FILE_RANGE", writeback)
    return seen


# Where the blob store can start a writeback without waiting (Linux), it does for each blob.
WRITEBACK = filetree._SYNC_FILE_RANGE is not None


def incoming(instance: int, pixel_bytes: int = 0) -> Incoming:
    ds = make_dataset(instance=instance)
    if pixel_bytes:
        ds.add_new(0x7FE00010, "OB", bytes(pixel_bytes))
    data, offset = part10(ds)
    return Incoming(path=None, dataset_offset=offset, transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                    calling_ae="MODALITY", sop_class_uid=str(ds.SOPClassUID),
                    sop_instance_uid=str(ds.SOPInstanceUID), buffer=bytearray(data))


@pytest.mark.parametrize("processes", [0, 1], ids=["no-ingest-processes", "one-ingest-process"])
async def test_a_small_instance_costs_one_create_and_two_fsyncs(tmp_path: Path, calls, processes: int):
    archive = Archive(Settings(storage=StorageSettings(data_dir=tmp_path / "var", ingest_processes=processes)))
    await archive.open()
    try:
        # The first instance creates the patient, study, series and the day/minute directories.
        assert (await archive.ingest.ingest(incoming(0))).status == Status.SUCCESS
        blobs = str(tmp_path / "var" / "blobs")
        for n in range(1, 6):
            calls.clear()
            sent = incoming(n)
            data = bytes(sent.buffer)
            outcome = await archive.ingest.ingest(sent)
            assert outcome.status == Status.SUCCESS and outcome.stored
            blob = str(archive.store.path(outcome.blob_key))
            # Files: the blob itself, written in place (one at a time, even with ingest
            # processes, an instance is parsed and written by the daemon's thread), its data
            # sent on its way to the disk at once. The database's own files are opened once
            # per connection, not per instance.
            expected = [("create", blob)] + [("writeback", blob)] * WRITEBACK
            assert [c for c in calls if c[0] != "fsync"] == expected, calls
            with open(blob, "rb") as f:
                assert f.read() == data
            fsyncs = [path for kind, path in calls if kind == "fsync"]
            # Its data, then its directory entry (the minute directory is known durable).
            assert fsyncs == [blob, os.path.dirname(blob)], fsyncs
            assert all(path.startswith(blobs) for path in fsyncs)
    finally:
        await archive.close()


async def test_a_refused_instance_leaves_no_blob(tmp_path: Path, calls):
    """A small instance is written before it is parsed (its writeback then runs during the
    parse); one the parse refuses is removed again, and nothing is indexed."""
    archive = Archive(Settings(storage=StorageSettings(data_dir=tmp_path / "var", ingest_processes=0)))
    await archive.open()
    try:
        assert (await archive.ingest.ingest(incoming(0))).status == Status.SUCCESS
        calls.clear()
        sent = incoming(1)
        del sent.buffer[-3:]  # the data set now ends inside its last element's value
        outcome = await archive.ingest.ingest(sent)
        assert outcome.status == Status.CANNOT_UNDERSTAND and not outcome.stored, outcome
        assert outcome.comment.startswith("data set cannot be parsed"), outcome.comment
        [created] = [path for kind, path in calls if kind == "create"]
        assert ("unlink", created) in calls and not os.path.exists(created), calls
        assert len(list(archive.store.iter_keys())) == 1  # the first instance's
    finally:
        await archive.close()


async def test_an_instance_too_large_to_carry_to_a_process_is_written_by_the_daemon(tmp_path: Path, calls):
    """Side by side with another, a small instance goes to an ingest process (the daemon
    creates no file for it); above TRANSFER_LIMIT, one held in memory is not copied through
    a socket: a thread of the daemon parses it and creates its blob."""
    archive = Archive(Settings(storage=StorageSettings(data_dir=tmp_path / "var", ingest_processes=1)))
    await archive.open()
    await archive.processes.start()
    try:
        assert (await archive.ingest.ingest(incoming(0))).status == Status.SUCCESS
        for n, size, here in [(1, 1000, False), (3, TRANSFER_LIMIT, True), (5, 1000, False)]:
            calls.clear()
            # The first of each pair is alone when it arrives; the second is not.
            first, second = await asyncio.gather(archive.ingest.ingest(incoming(n + 1)),
                                                 archive.ingest.ingest(incoming(n, pixel_bytes=size)))
            assert first.stored and second.stored
            blob = str(archive.store.path(second.blob_key))
            assert (("create", blob) in calls) == here, (n, calls)
    finally:
        await archive.close()


def count_jobs(monkeypatch, executor) -> list[str]:
    """The name of every function handed to `executor` from now on."""
    jobs: list[str] = []
    real_submit = executor.submit

    def submit(fn, *args, **kwargs):
        named = getattr(fn, "func", fn)  # a functools.partial's function
        jobs.append(getattr(named, "__name__", repr(named)))
        return real_submit(fn, *args, **kwargs)

    monkeypatch.setattr(executor, "submit", submit)
    return jobs


async def test_an_instance_alone_is_parsed_and_committed_in_one_job(tmp_path: Path, monkeypatch):
    """One instance at a time (one modality sending): its parse and its commit are one job
    of the index writer's thread, no worker thread in between, which would add two thread
    hops to every exchange. Side by side, instances are parsed in worker threads again."""
    archive = Archive(Settings(storage=StorageSettings(data_dir=tmp_path / "var", ingest_processes=0)))
    await archive.open()
    try:
        assert (await archive.ingest.ingest(incoming(0))).stored  # opens the database thread
        database = count_jobs(monkeypatch, archive.writer._database_thread())
        workers = count_jobs(monkeypatch, archive.executor)
        for n in range(1, 4):
            assert (await archive.ingest.ingest(incoming(n))).stored
        assert database == ["_prepare_and_commit_in_thread"] * 3 and workers == [], (database, workers)
        database.clear()
        outcomes = await asyncio.gather(*(archive.ingest.ingest(incoming(n)) for n in range(4, 7)))
        assert all(outcome.stored for outcome in outcomes)
        # The first was alone when it arrived; the two that came while it was in flight
        # were parsed in worker threads, and committed by the writer.
        assert workers == ["prepare"] * 2, workers
        assert database.count("_prepare_and_commit_in_thread") == 1, database
        # Right after instances came side by side, the next one alone still takes the
        # worker thread: more are likely on their way.
        workers.clear()
        assert (await archive.ingest.ingest(incoming(7))).stored
        assert workers == ["prepare"], workers
    finally:
        await archive.close()


async def test_a_failed_commit_of_an_instance_alone_leaves_no_blob(tmp_path: Path):
    """Parsed and committed in one job, an instance whose commit fails is answered A700
    (never a success) and its blob, placed before the commit, is removed."""
    archive = Archive(Settings(storage=StorageSettings(data_dir=tmp_path / "var", ingest_processes=0)))
    await archive.open()
    try:
        assert (await archive.ingest.ingest(incoming(0))).stored

        def failing(conn, study_uids, now):
            raise RuntimeError("the transaction fails here")

        archive.writer.in_transaction = failing
        outcome = await archive.ingest.ingest(incoming(1))
        assert outcome.status == Status.OUT_OF_RESOURCES and not outcome.stored, outcome
        assert outcome.comment == "index write failed: RuntimeError", outcome.comment
        assert len(list(archive.store.iter_keys())) == 1  # the first instance's
        archive.writer.in_transaction = None
        again = await archive.ingest.ingest(incoming(1))
        assert again.stored and len(list(archive.store.iter_keys())) == 2
    finally:
        await archive.close()
