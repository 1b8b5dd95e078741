"""Called/calling AE checks and the association limit: exact A-ASSOCIATE-RJ bytes, logged."""

from __future__ import annotations

import socket
import subprocess

from pacsd.dul.negotiation import ProposedContext, build_request
from tests.conftest import dcmtk, recv_pdu

ECHO = [ProposedContext("1.2.840.10008.1.1", ["1.2.840.10008.1.2"])]


def associate_raw(port: int, calling: str, called: str) -> tuple[int, bytes, socket.socket]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    rq, _ = build_request(calling, called, ECHO, 16384)
    sock.sendall(rq)
    kind, body = recv_pdu(sock)
    return kind, body, sock


def test_wrong_called_ae_rejected_reason_7_and_logged(daemon):
    kind, body, sock = associate_raw(daemon.port, "MODALITY", "NOT-PACSD")
    sock.close()
    # A-ASSOCIATE-RJ: reserved, result 1 (permanent), source 1 (service user), reason 7
    assert (kind, body) == (0x03, bytes([0, 1, 1, 7]))
    [event] = daemon.wait_for_event("association.rejected", calling_ae="MODALITY")
    assert (event["result"], event["source"], event["reason"]) == (1, 1, 7)
    assert event["called_ae"] == "NOT-PACSD"
    assert "NOT-PACSD" in event["why"]


def test_dcmtk_sees_called_ae_not_recognized(daemon):
    result = subprocess.run([dcmtk("echoscu"), "-aec", "SOMEONE", "127.0.0.1", str(daemon.port)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stderr


def test_called_ae_not_checked_when_disabled(start_daemon):
    daemon = start_daemon(DICOM__CHECK_CALLED_AE="false")
    kind, _, sock = associate_raw(daemon.port, "MODALITY", "ANYTHING")
    sock.close()
    assert kind == 0x02


def test_unknown_caller_rejected_reason_3_when_required(start_daemon):
    daemon = start_daemon(
        DICOM__REQUIRE_KNOWN_CALLERS="true",
        PEERS='[{"ae_title": "CT1", "host": "127.0.0.1", "port": 104}]',
    )
    kind, body, sock = associate_raw(daemon.port, "STRANGER", "PACSD")
    sock.close()
    assert (kind, body) == (0x03, bytes([0, 1, 1, 3]))
    [event] = daemon.wait_for_event("association.rejected", calling_ae="STRANGER")
    assert event["reason"] == 3
    kind, _, sock = associate_raw(daemon.port, "CT1", "PACSD")
    sock.close()
    assert kind == 0x02
    result = subprocess.run([dcmtk("echoscu"), "-aet", "STRANGER", "-aec", "PACSD", "127.0.0.1",
                             str(daemon.port)], capture_output=True, text=True, timeout=30)
    assert "Calling AE Title Not Recognized" in result.stderr


def test_association_limit_rejects_transiently(start_daemon):
    daemon = start_daemon(DICOM__MAX_ASSOCIATIONS="2")
    open_socks = []
    for n in range(2):
        kind, _, sock = associate_raw(daemon.port, f"SCU{n}", "PACSD")
        assert kind == 0x02
        open_socks.append(sock)
    kind, body, sock = associate_raw(daemon.port, "SCU2", "PACSD")
    # result 2 (transient), source 3 (presentation), reason 2 (local limit exceeded)
    assert (kind, body) == (0x03, bytes([0, 2, 3, 2]))
    for s in open_socks + [sock]:
        s.close()


def test_a_repeated_request_is_answered_as_the_first_time_and_per_caller(start_daemon):
    """pacsd reuses the decoding and the answer of a request it has just seen (a modality
    sends the same one on every association): the answer stays byte for byte the same, and
    a caller it refuses is refused even after the same request from a known caller."""
    daemon = start_daemon(
        DICOM__REQUIRE_KNOWN_CALLERS="true",
        PEERS='[{"ae_title": "CT1", "host": "127.0.0.1", "port": 104}]',
    )
    answers = []
    for calling in ("CT1", "CT1", "STRANGER", "CT1"):
        kind, body, sock = associate_raw(daemon.port, calling, "PACSD")
        sock.close()
        answers.append((kind, body))
    assert answers[0][0] == 0x02
    assert answers[1] == answers[0] and answers[3] == answers[0]
    assert answers[2] == (0x03, bytes([0, 1, 1, 3]))
