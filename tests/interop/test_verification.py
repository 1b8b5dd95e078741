"""C-ECHO against real peers: DCMTK's echoscu and storescp, pynetdicom, pacsd's own client."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pynetdicom import AE, build_role
from pynetdicom.pdu_primitives import (
    AsynchronousOperationsWindowNegotiation,
    UserIdentityNegotiation,
)

from tests.conftest import dcmtk, free_port, wait_for_port

VERIFICATION = "1.2.840.10008.1.1"
pytestmark = pytest.mark.interop


def test_dcmtk_echoscu_succeeds_and_is_logged(daemon):
    result = subprocess.run(
        [dcmtk("echoscu"), "-v", "-aet", "MODALITY1", "-aec", "PACSD", "127.0.0.1", str(daemon.port)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "Received Echo Response (Success)" in result.stderr
    [accepted] = daemon.wait_for_event("association.accepted", calling_ae="MODALITY1")
    assert accepted["called_ae"] == "PACSD"
    assert accepted["peer"].startswith("127.0.0.1:")
    assert any(c.startswith("1:1.2.840.10008.1.1:") for c in accepted["accepted"])
    [ended] = daemon.wait_for_event("association.ended", calling_ae="MODALITY1")
    assert ended["outcome"] == "released"
    assert ended["messages"] == 1
    assert ended["duration"] >= 0


def test_dcmtk_echoscu_explicit_vr_proposal_gets_acceptors_preference(daemon):
    # -pts 3 proposes implicit LE first, then explicit LE and BE: pacsd's preference
    # (explicit VR LE first) must win.
    result = subprocess.run(
        [dcmtk("echoscu"), "-d", "-pts", "3", "-aec", "PACSD", "127.0.0.1", str(daemon.port)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    [accepted] = daemon.wait_for_event("association.accepted")
    assert accepted["accepted"] == ["1:1.2.840.10008.1.1:1.2.840.10008.1.2.1"]


def test_pynetdicom_associates_echoes_releases(daemon):
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="PACSD")
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 262144
    assert assoc.acceptor.implementation_class_uid.startswith("2.25.")
    for _ in range(3):
        status = assoc.send_c_echo()
        assert status.Status == 0x0000
    assoc.release()
    assert assoc.is_released
    [ended] = daemon.wait_for_event("association.ended", calling_ae="PYNETDICOM")
    assert ended["outcome"] == "released"
    assert ended["messages"] == 3


def test_unsupported_abstract_syntax_is_rejected_per_context(daemon):
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(VERIFICATION)
    ae.add_requested_context("1.2.840.10008.5.1.4.31")  # Modality Worklist FIND: not served yet
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="PACSD")
    assert assoc.is_established
    results = {cx.abstract_syntax: cx.result for cx in assoc.rejected_contexts}
    assert results == {"1.2.840.10008.5.1.4.31": 0x03}
    assoc.release()
    [accepted] = daemon.wait_for_event("association.accepted")
    assert accepted["rejected"] == ["3:1.2.840.10008.5.1.4.31:abstract-syntax-not-supported"]


def test_asynchronous_window_answered_one_one_and_user_identity(start_daemon):
    daemon = start_daemon(DICOM__USER_IDENTITY="accept")
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(VERIFICATION)
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 5
    window.maximum_number_operations_performed = 5
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 1
    identity.primary_field = b"radiographer"
    identity.positive_response_requested = True
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="PACSD", ext_neg=[window, identity])
    assert assoc.is_established
    assert assoc.acceptor.asynchronous_operations == (1, 1)
    assert assoc.acceptor.user_identity is not None
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_user_identity_ignored_by_default(daemon):
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(VERIFICATION)
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 1
    identity.primary_field = b"radiographer"
    identity.positive_response_requested = True
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="PACSD", ext_neg=[identity])
    assert assoc.is_established
    assert assoc.acceptor.user_identity is None
    assoc.release()


def test_role_selection_for_unsupported_role_is_answered(daemon):
    # A requestor asking pacsd to take the SCU role for Verification: pacsd offers no
    # roles for it, so the context is accepted with default roles (requestor is SCU).
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(VERIFICATION)
    role = build_role(VERIFICATION, scu_role=True, scp_role=False)
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="PACSD", ext_neg=[role])
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


PYNETDICOM_CLIENT = """
import os, sys, time
from pynetdicom import AE
port, name, go = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ae = AE(ae_title=name)
ae.add_requested_context("1.2.840.10008.1.1")
assoc = ae.associate("127.0.0.1", port, ae_title="PACSD")
if not assoc.is_established:
    sys.exit("not established")
# pynetdicom's reactor thread can take a response off the queue before send_c_echo()
# reads it (pynetdicom issues #435, #875; a fast peer makes it likely). This client never
# serves requests, so hand anything the reactor takes straight back to the queue.
assoc._serve_request = lambda msg, context_id: assoc.dimse.msg_queue.put((context_id, msg))
while not os.path.exists(go):  # every client holds its association open before any echoes
    time.sleep(0.01)
statuses = [assoc.send_c_echo().get("Status", -1) for _ in range(50)]
assoc.release()
print(",".join(str(s) for s in statuses))
"""


def test_twenty_concurrent_associations_fifty_echoes_each(daemon, tmp_path):
    # One pynetdicom AE per process, so twenty clients do not share one GIL.
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", PYNETDICOM_CLIENT, str(daemon.port), f"CLIENT{n:02d}",
                          str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in range(20)
    ]
    # All twenty associations are open at once before the echoes start.
    assert len(daemon.wait_for_event("association.accepted", count=20, timeout=60)) == 20
    assert not daemon.events("association.ended")
    go.touch()
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 20, [err[-500:] for _, err in outputs]
    statuses = [int(s) for out, _ in outputs for s in out.strip().split(",")]
    assert statuses == [0] * 1000
    ended = daemon.wait_for_event("association.ended", count=20, outcome="released")
    assert len(ended) == 20
    assert {e["messages"] for e in ended} == {50}


def test_twenty_concurrent_dcmtk_echoscu_with_repeats(daemon):
    procs = [
        subprocess.Popen(
            [dcmtk("echoscu"), "--repeat", "50", "-aet", f"SCU{n}", "-aec", "PACSD",
             "127.0.0.1", str(daemon.port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for n in range(20)
    ]
    codes = [p.wait(120) for p in procs]
    assert codes == [0] * 20
    # echoscu --repeat sends its echoes on one association
    ended = daemon.wait_for_event("association.ended", count=20, outcome="released", timeout=20)
    assert len(ended) == 20
    assert {e["messages"] for e in ended} == {50}
    assert {e["calling_ae"] for e in ended} == {f"SCU{n}" for n in range(20)}


def test_pacsd_client_echoes_dcmtk_storescp(tmp_path):
    port = free_port()
    scp = subprocess.Popen(
        [dcmtk("storescp"), "-aet", "STORESCP", "--output-directory", str(tmp_path), str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        wait_for_port(port, scp)
        result = subprocess.run(
            [sys.executable, "-m", "pacsd", "echo", "127.0.0.1", str(port), "--aec", "STORESCP",
             "--count", "3"],
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stderr
        lines = [l for l in result.stdout.splitlines() if l.startswith("C-ECHO")]
        assert len(lines) == 3
        assert all("status 0x0000 (success)" in l and "round trip" in l for l in lines)
    finally:
        scp.terminate()
        scp.wait(10)


def test_pacsd_client_echoes_pacsd(daemon):
    result = subprocess.run(
        [sys.executable, "-m", "pacsd", "echo", "127.0.0.1", str(daemon.port)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "C-ECHO 1: status 0x0000 (success)" in result.stdout


def test_pacsd_client_reports_rejection_and_refused_connection(daemon):
    result = subprocess.run(
        [sys.executable, "-m", "pacsd", "echo", "127.0.0.1", str(daemon.port), "--aec", "NOTUS"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "rejected: result 1, source 1, reason 7" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "pacsd", "echo", "127.0.0.1", str(free_port())],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "cannot connect" in result.stderr
