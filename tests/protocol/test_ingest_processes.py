"""Ingest processes (pacsd/ingest/processes.py) against a live daemon: one that dies costs
the sender the instance it held (A700, never a success) and nothing else; the daemon starts
another, and stops its processes with itself."""

from __future__ import annotations

import os
import signal
import threading
import time

from tests.dicomdata import CT_IMAGE_STORAGE, EXPLICIT_LE, RawAssociation, blob_files, encode, image, instance_rows, uid


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
