"""Idle network timeout, DIMSE timeout, and the SIGTERM shutdown sequence."""

from __future__ import annotations

import asyncio
import signal
import socket
import time

import pytest
from pynetdicom import AE

from pacsd.config import DicomSettings
from pacsd.dul.negotiation import ProposedContext, build_request
from pacsd.net.association import DIMSETimeout
from pacsd.net.requestor import associate
from pacsd.services.verification import VERIFICATION_SOP_CLASS, c_echo
from tests.conftest import recv_pdu
from tests.protocol.test_release import build_ac, read_pdu

ECHO = [ProposedContext(VERIFICATION_SOP_CLASS, ["1.2.840.10008.1.2"])]


def test_idle_association_is_aborted_after_network_timeout(start_daemon):
    daemon = start_daemon(DICOM__NETWORK_TIMEOUT="1")
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
    rq, _ = build_request("IDLER", "PACSD", ECHO, 16384)
    sock.sendall(rq)
    assert recv_pdu(sock)[0] == 0x02
    started = time.monotonic()
    kind, body = recv_pdu(sock)
    waited = time.monotonic() - started
    assert kind == 0x07  # A-ABORT
    assert 0.5 < waited < 5
    sock.close()
    [event] = daemon.wait_for_event("association.network_timeout")
    assert event["idle_seconds"] >= 1
    [ended] = daemon.wait_for_event("association.ended", calling_ae="IDLER")
    assert ended["outcome"] == "aborted"


async def test_requestor_gives_up_after_dimse_timeout(tmp_path):
    received: list[int] = []

    async def silent_acceptor(reader, writer):
        await read_pdu(reader)
        writer.write(build_ac())
        kind, _ = await read_pdu(reader)  # the C-ECHO-RQ, never answered
        received.append(kind)
        kind, body = await read_pdu(reader)  # then pacsd's A-ABORT
        received.append(kind)
        writer.close()

    srv = await asyncio.start_server(silent_acceptor, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    settings = DicomSettings(dimse_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(DIMSETimeout):
        async with associate("127.0.0.1", port, calling_ae="PACSD", called_ae="PEER",
                             contexts=ECHO, settings=settings, spool_dir=tmp_path) as assoc:
            await c_echo(assoc)
    assert 0.4 < time.monotonic() - started < 5
    await asyncio.sleep(0.2)
    assert received == [0x04, 0x07]
    srv.close()


def test_sigterm_lets_open_association_finish_then_aborts_it(start_daemon):
    daemon = start_daemon(DICOM__SHUTDOWN_GRACE="2")
    ae = AE(ae_title="LATE")
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="PACSD")
    assert assoc.is_established
    signalled = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.wait_for_event("dicom.draining")
    # No new connections once draining ...
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", daemon.port), timeout=1).close()
    # ... but the open association is still served during the grace period.
    assert assoc.send_c_echo().Status == 0
    assert daemon.proc.wait(15) == 0
    elapsed = time.monotonic() - signalled
    assert 1.5 < elapsed < 10
    assert daemon.events("association.aborted_at_shutdown")
    for _ in range(50):
        if assoc.is_aborted:
            break
        time.sleep(0.1)
    assert assoc.is_aborted
    assert daemon.events("pacsd.stopped")


def test_sigterm_waits_only_as_long_as_associations_need(start_daemon):
    daemon = start_daemon(DICOM__SHUTDOWN_GRACE="30")
    ae = AE(ae_title="QUICK")
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="PACSD")
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.wait_for_event("dicom.draining")
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    signalled = time.monotonic()
    assert daemon.proc.wait(15) == 0
    assert time.monotonic() - signalled < 5
    [ended] = daemon.wait_for_event("association.ended", calling_ae="QUICK")
    assert ended["outcome"] == "released"
    assert not daemon.events("association.aborted_at_shutdown")


def test_sigint_with_nothing_open_exits_at_once(daemon):
    started = time.monotonic()
    assert daemon.stop(signal.SIGINT) == 0
    assert time.monotonic() - started < 5
    assert daemon.events("pacsd.stopped")
