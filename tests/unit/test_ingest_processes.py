"""Ingest processes (pacsd/ingest/processes.py): used while instances arrive side by side,
never for one alone; the index holds the same whichever way an instance was parsed; a burst
starts one process, not several; a process that dies costs the sender the instance it held
(A700, never a success) and nothing else; the processes end with the archive."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import socket
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pacsd.app import Archive
from pacsd.config import Settings, StorageSettings
from pacsd.dimse.status import Status
from pacsd.store import filetree
from pacsd.store.filetree import FileTreeBlobStore
from pacsd.store.syncer import DURABLE
from tests.dicomdata import blob_files, query
from tests.unit.test_ingest_syscalls import incoming


def _ingest_processes() -> list[int]:
    """This process's children that are ingest processes."""
    pids = []
    for children in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        for pid in children.read_text().split():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if b"pacsd.ingest.worker" in cmdline:
                pids.append(int(pid))
    return pids


def _archive(data_dir: Path, processes: int) -> Archive:
    return Archive(Settings(storage=StorageSettings(data_dir=data_dir, ingest_processes=processes)))


async def test_one_instance_at_a_time_never_starts_a_process(tmp_path):
    archive = _archive(tmp_path / "var", 1)
    await archive.open()
    try:
        for n in range(5):
            assert (await archive.ingest.ingest(incoming(n))).stored
        assert _ingest_processes() == []
        # Side by side, they do.
        outcomes = await asyncio.gather(*(archive.ingest.ingest(incoming(n)) for n in range(5, 10)))
        assert all(o.stored for o in outcomes)
        await archive.processes.start()
        assert len(_ingest_processes()) == 1
    finally:
        await archive.close()
    assert _ingest_processes() == []


async def test_the_index_holds_the_same_whichever_way_an_instance_was_parsed(tmp_path):
    """An ingest process sends each level's DICOM JSON as text (LevelRows.serialise_parts);
    C-FIND and QIDO-RS must find exactly what a thread's parse would have stored."""
    tables = {}
    for processes in (0, 1):
        data_dir = tmp_path / f"p{processes}"
        archive = _archive(data_dir, processes)
        await archive.open()
        try:
            if processes:
                await archive.processes.start()
            # Side by side: with a process, all but the first go through it.
            outcomes = await asyncio.gather(*(archive.ingest.ingest(incoming(n)) for n in range(4)))
            assert all(o.stored for o in outcomes)
        finally:
            await archive.close()
        db = data_dir / "index.db"
        tables[processes] = {
            level: query(db, f"SELECT attrs FROM {level} ORDER BY attrs")
            for level in ("patients", "studies", "series", "instances")}
    assert tables[0] == tables[1]
    assert all(tables[1].values())


async def test_a_burst_of_instances_while_the_process_starts_starts_it_once(tmp_path):
    archive = _archive(tmp_path / "var", 1)
    await archive.open()
    try:
        # Forty at once, before any process is ready: all are stored (by threads meanwhile) ...
        outcomes = await asyncio.gather(*(archive.ingest.ingest(incoming(n)) for n in range(40)))
        assert all(o.stored for o in outcomes)
        await archive.processes.start()
        outcomes = await asyncio.gather(*(archive.ingest.ingest(incoming(n)) for n in range(40, 60)))
        assert all(o.stored for o in outcomes)
        # ... and one process was started, not one per instance that found none ready.
        assert len(_ingest_processes()) == 1
    finally:
        await archive.close()
    assert _ingest_processes() == []


async def test_a_lost_ingest_process_costs_the_instance_it_held_and_nothing_else(tmp_path):
    data_dir = tmp_path / "var"
    archive = _archive(data_dir, 1)
    await archive.open()
    try:
        await archive.processes.start()
        [first] = _ingest_processes()
        # Stopped, the process cannot take a job off its socket; killed, it never will.
        os.kill(first, signal.SIGSTOP)
        alone, held = incoming(1), incoming(2)
        held_uid = held.sop_instance_uid
        kept_task = asyncio.ensure_future(archive.ingest.ingest(alone))    # parsed in a thread
        held_task = asyncio.ensure_future(archive.ingest.ingest(held))     # side by side: the process
        assert (await kept_task).stored
        await asyncio.sleep(0.5)
        assert not held_task.done(), "answered while its ingest process was stopped"
        os.kill(first, signal.SIGKILL)
        outcome = await asyncio.wait_for(held_task, 30)
        assert outcome.status == Status.OUT_OF_RESOURCES and not outcome.stored
        assert "ingest process" in outcome.comment
        # The sender tries again, as a modality does, and it is stored.
        assert (await archive.ingest.ingest(incoming(2))).stored
        # Side by side again: a new process is started for them.
        outcomes = await asyncio.gather(*(archive.ingest.ingest(incoming(n)) for n in range(3, 6)))
        assert all(o.stored for o in outcomes)
        await archive.processes.start()
        [second] = _ingest_processes()
        assert second != first
    finally:
        await archive.close()
    assert _ingest_processes() == []
    rows = query(data_dir / "index.db", "SELECT sop_instance_uid FROM instances")
    assert len(rows) == 5 and held_uid in {r["sop_instance_uid"] for r in rows}
    assert len(blob_files(data_dir)) == 5  # nothing left behind by the lost job


def test_a_process_replies_once_the_blob_and_its_directory_are_fsynced(tmp_path, fsynced):
    """The process fsyncs the blob it placed beside its parse, and its reply says it is
    durable, so that the daemon neither starts nor waits for those fsyncs."""
    from pacsd.ingest import worker

    root = tmp_path / "blobs"
    daemon_store = FileTreeBlobStore(root)
    key = daemon_store.new_key()
    daemon_store.make_dirs(key)  # as the daemon does before it sends the job
    ours, theirs = socket.socketpair()
    serving = threading.Thread(target=worker.serve, args=(theirs, root), daemon=True)
    serving.start()
    replies = ours.makefile("rb")

    def reply():
        length = worker.LENGTH.unpack(replies.read(worker.LENGTH.size))[0]
        return pickle.loads(replies.read(length))

    try:
        assert reply()[1] == worker.READY
        ours.sendall(worker.frame((7, incoming(1), key)))
        job_id, kind, record, _created = reply()
        blob = str(daemon_store.path(key))
        assert (job_id, kind, record.blob_key) == (7, worker.OK, key)
        assert {blob, os.path.dirname(blob)} <= set(fsynced), fsynced
        with open(blob, "rb") as f:
            assert f.read()  # the instance, in place
    finally:
        replies.close()
        ours.close()  # the process's end of the daemon: it returns
        serving.join(10)
        theirs.close()
    assert not serving.is_alive()


async def test_a_process_blob_in_a_new_directory_waits_for_its_parents_fsync(tmp_path, monkeypatch, request):
    """The daemon makes a key's directories; the first blob a process places in a new one
    is durable only once the new directories' entries are: the index writer fsyncs their
    parents before the commit. The blobs after it come back durable as they are."""
    archive = _archive(tmp_path / "var", 1)
    await archive.open()
    try:
        await archive.processes.start()
        tomorrow = datetime.now(timezone.utc) + timedelta(days=1)  # a day directory of its own
        monkeypatch.setattr(filetree, "_now", lambda: tomorrow)
        fsynced = request.getfixturevalue("fsynced")
        first = await archive.processes.prepare(incoming(1))
        assert first.synced is None  # the writer's to start
        assert (await archive.writer.submit(first)).stored
        root = str(tmp_path / "var" / "blobs")
        day = os.path.join(root, tomorrow.strftime("%Y%m%d"))
        assert {root, day} <= set(fsynced), fsynced
        second = await archive.processes.prepare(incoming(2))
        assert second.synced is DURABLE
        assert (await archive.writer.submit(second)).stored
    finally:
        await archive.close()
