"""Ingest processes (pacsd/ingest/processes.py) against a live daemon: one that dies costs
the sender the instance it held (A700, never a success) and nothing else; the daemon starts
another, and stops its processes with itself."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

from tests.dicomdata import (CT_IMAGE_STORAGE, EXPLICIT_LE, RawAssociation, blob_files, encode, image, instance_rows,
                             query, uid)


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_a_lost_ingest_process_costs_the_instance_it_held_and_nothing_else(start_daemon):
    daemon = start_daemon(STORAGE__INGEST_PROCESSES="1")
    study, series = uid("lost", "study"), uid("lost", "series")
    kept = image(uid("lost", 1), series, study, instance_number=1)
    held = image(uid("lost", 2), series, study, instance_number=2)
    with RawAssociation(daemon.port, [(CT_IMAGE_STORAGE, [EXPLICIT_LE])]) as raw:
        # The first ingest starts the process (a daemon that only serves queries has none).
        assert not daemon.events("ingest.process_started")
        assert raw.c_store(encode(kept), CT_IMAGE_STORAGE, kept.SOPInstanceUID)["Status"] == 0x0000
        [started] = daemon.wait_for_event("ingest.process_started")
        first = started["pid"]
        # Stopped, the process cannot take the next job off its socket; killed, it never will.
        os.kill(first, signal.SIGSTOP)
        answer: dict = {}
        sender = threading.Thread(target=lambda: answer.update(
            raw.c_store(encode(held), CT_IMAGE_STORAGE, held.SOPInstanceUID)))
        sender.start()
        time.sleep(1.0)  # the daemon hands a 9 KB instance over in milliseconds
        assert not answer, "answered while its ingest process was stopped"
        os.kill(first, signal.SIGKILL)
        sender.join(30)
        assert answer["Status"] == 0xA700
        assert "ingest process" in answer["ErrorComment"]
        # The sender tries again, as a modality does: stored, by the daemon's threads until a
        # new process is ready.
        assert raw.c_store(encode(held), CT_IMAGE_STORAGE, held.SOPInstanceUID)["Status"] == 0x0000
        raw.release()
    assert daemon.wait_for_event("ingest.process_lost", pid=first)
    [second] = [e for e in daemon.wait_for_event("ingest.process_started", count=2) if e["pid"] != first]
    rows = instance_rows(daemon.data_dir / "index.db")
    assert sorted(r["sop_instance_uid"] for r in rows) == sorted([kept.SOPInstanceUID, held.SOPInstanceUID])
    assert len(blob_files(daemon.data_dir)) == 2  # nothing left behind by the lost job
    assert daemon.alive
    # The daemon's processes end with it.
    assert daemon.stop() == 0
    assert _gone(second["pid"])


async def test_the_index_holds_the_same_whichever_way_an_instance_was_parsed(tmp_path):
    """An ingest process sends each level's DICOM JSON as text (LevelRows.serialise_parts);
    C-FIND and QIDO-RS must find exactly what a thread's parse would have stored."""
    from pacsd.app import Archive
    from pacsd.config import Settings, StorageSettings
    from tests.unit.test_ingest_syscalls import incoming

    tables = {}
    for processes in (0, 1):
        data_dir = tmp_path / f"p{processes}"
        archive = Archive(Settings(storage=StorageSettings(data_dir=data_dir, ingest_processes=processes)))
        await archive.open()
        try:
            if processes:
                await archive.processes.start()
            for n in range(3):
                assert (await archive.ingest.ingest(incoming(n))).stored
        finally:
            await archive.close()
        db = data_dir / "index.db"
        tables[processes] = {
            level: query(db, f"SELECT attrs FROM {level} ORDER BY attrs")
            for level in ("patients", "studies", "series", "instances")}
    assert tables[0] == tables[1]
    assert all(tables[1].values())


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


async def test_a_burst_of_instances_while_the_process_starts_starts_it_once(tmp_path):
    from pacsd.app import Archive
    from pacsd.config import Settings, StorageSettings
    from tests.unit.test_ingest_syscalls import incoming

    archive = Archive(Settings(storage=StorageSettings(data_dir=tmp_path / "var", ingest_processes=1)))
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
