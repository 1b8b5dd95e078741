"""Malformed, unexpected and non-DICOM input on the DICOM port, against a live daemon.

For every bad input the daemon must answer with an A-ABORT from the service provider
(source 2) whose reason fits PS3.8 Table 9-26, close the connection within the ARTIM
time, log an association.protocol_error line, stay up, and serve the next client (DCMTK's
echoscu) normally.

One daemon serves the whole module (ARTIM 1 s, Maximum Length 16384). After an A-ABORT
the daemon waits in Sta13 for the peer to close, up to ARTIM; so that the file does not
spend one ARTIM per case, the exchanges of CASES all run at once, each on its own
connection, in a module fixture (`exchanges`). The tests then check each recorded
exchange and the log lines tied to it by the connection's address, and run echoscu.
"""

from __future__ import annotations

import itertools
import random
import socket
import struct
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from pacsd.dimse import command as dimse_command
from pacsd.dul.negotiation import ProposedContext, build_request
from tests.conftest import Daemon, dcmtk, launch_daemon, recv_exactly, recv_pdu

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"

ARTIM = 1.0
MAX_PDU = 16384  # the Maximum Length the daemon is configured to advertise
CLOSE_SLACK = 0.75  # scheduling margin on top of ARTIM for "closed within ARTIM"

# PS3.8 Table 9-26, source 2 (service provider)
UNRECOGNIZED_PDU = 1
UNEXPECTED_PDU = 2
UNRECOGNIZED_PARAMETER = 4
UNEXPECTED_PARAMETER = 5
INVALID_PARAMETER = 6

_echo_numbers = itertools.count(1)


# --- the daemon -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pacs(tmp_path_factory) -> Daemon:
    daemon = launch_daemon(tmp_path_factory.mktemp("bad-input"), "data",
                           DICOM__ARTIM_TIMEOUT=str(ARTIM), DICOM__MAX_PDU_LENGTH=str(MAX_PDU))
    try:
        yield daemon
    finally:
        daemon.stop()


# --- raw PDU building -------------------------------------------------------------------


def header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BxI", pdu_type, length)


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">IBB", len(data) + 2, context_id, control) + data


def pdata(*items: bytes) -> bytes:
    body = b"".join(items)
    return header(0x04, len(body)) + body


def provider_abort(reason: int) -> bytes:
    """A-ABORT PDU: type 7, length 4, two reserved bytes, source 2, reason."""
    return bytes([0x07, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x02, reason])


PEER_ABORT = bytes([0x07, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00])
# A-ASSOCIATE-RJ: result 1 (permanent), source 2 (ACSE provider), reason 2 (protocol version)
VERSION_REJECT = bytes([0x03, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x01, 0x02, 0x02])


def associate_rq() -> bytes:
    raw, _ = build_request("RAW", "PACSD", [ProposedContext(VERIFICATION, [IMPLICIT_LE])], 16384)
    return raw


def split_items(data: bytes) -> list[bytes]:
    """Whole items (4-byte header included) of an A-ASSOCIATE variable part."""
    out, pos = [], 0
    while pos < len(data):
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        out.append(data[pos : pos + 4 + length])
        pos += 4 + length
    assert pos == len(data)
    return out


def rq_parts() -> tuple[bytes, bytes, bytes, bytes]:
    """(68 fixed bytes after the PDU header, application context, presentation context,
    user information) of a valid A-ASSOCIATE-RQ."""
    raw = associate_rq()
    assert raw[0] == 0x01 and int.from_bytes(raw[2:6], "big") == len(raw) - 6
    items = split_items(raw[74:])
    assert [item[0] for item in items] == [0x10, 0x20, 0x50]
    return raw[6:74], *items


def build_rq(fixed: bytes, *items: bytes) -> bytes:
    body = fixed + b"".join(items)
    return header(0x01, len(body)) + body


def echo_command(**extra) -> bytes:
    """C-ECHO-RQ command set; CommandDataSetType 0x0000 announces a data set."""
    return dimse_command.encode({
        "CommandField": 0x0030,
        "MessageID": 1,
        "AffectedSOPClassUID": VERIFICATION,
        "CommandDataSetType": 0x0000,
        **extra,
    })


def random_bytes() -> bytes:
    data = random.Random(20240611).randbytes(4096)
    # The first byte must not be a PDU type (0x01-0x07): that would be another test.
    assert not 0x01 <= data[0] <= 0x07, hex(data[0])
    return data


def tls_client_hello() -> bytes:
    """A plausible TLS record carrying a ClientHello offering TLS 1.3 and 1.2."""
    rng = random.Random(1303)
    ciphers = bytes.fromhex("130113021303c02bc02fc02cc030")
    name = b"pacs.example.org"
    server_name = struct.pack(">HBH", len(name) + 3, 0, len(name)) + name
    versions = b"\x04" + bytes.fromhex("03040303")
    groups = b"\x00\x04" + bytes.fromhex("001d0017")
    extensions = b"".join(
        struct.pack(">HH", ext_type, len(data)) + data
        for ext_type, data in ((0x0000, server_name), (0x002B, versions), (0x000A, groups))
    )
    hello = (
        b"\x03\x03" + rng.randbytes(32)  # legacy_version TLS 1.2, random
        + b"\x20" + rng.randbytes(32)  # legacy_session_id
        + struct.pack(">H", len(ciphers)) + ciphers
        + b"\x01\x00"  # compression: null only
        + struct.pack(">H", len(extensions)) + extensions
    )
    handshake = b"\x01" + len(hello).to_bytes(3, "big") + hello  # ClientHello
    return b"\x16\x03\x01" + struct.pack(">H", len(handshake)) + handshake


# --- talking to the daemon --------------------------------------------------------------


# Peer addresses (host:port) each daemon has seen from these tests (by the daemon's port).
_USED_PEERS: dict[int, set[str]] = {}
# Source addresses for connect(): loopback, but never 127.0.0.1, where echoscu comes from.
_SOURCES = itertools.cycle([f"127.0.0.{n}" for n in range(2, 255)])


def connect(pacs: Daemon) -> socket.socket:
    """A connection from a peer address this daemon has not seen before: tests find their
    log events by peer address, and the kernel does hand out a port again after a few
    hundred connections (a second association.ended from "the same" peer). So each comes
    from a port not used before from its source address, and from another source address
    than the echoscu of assert_still_serving, whose port no test chooses."""
    used = _USED_PEERS.setdefault(pacs.port, set())
    for _ in range(50):
        sock = socket.create_connection(("127.0.0.1", pacs.port), timeout=5, source_address=(next(_SOURCES), 0))
        peer = peer_of(sock)
        if peer not in used:
            used.add(peer)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        sock.close()
    raise AssertionError("the kernel kept handing out local ports this daemon has seen")


def peer_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def associate(sock: socket.socket) -> tuple[int, int]:
    """Send a valid A-ASSOCIATE-RQ; return (accepted context ID, the AC's Maximum Length)."""
    sock.sendall(associate_rq())
    pdu_type, body = recv_pdu(sock)
    assert pdu_type == 0x02, f"expected A-ASSOCIATE-AC, got PDU type {pdu_type:#04x}"
    context_id = max_length = None
    for item in split_items(body[68:]):
        if item[0] == 0x21:  # presentation context (AC): ID, -, result, -
            assert item[6] == 0, f"presentation context {item[4]} not accepted: {item[6]}"
            context_id = item[4]
        elif item[0] == 0x50:
            for sub in split_items(item[4:]):
                if sub[0] == 0x51:  # Maximum Length
                    max_length = int.from_bytes(sub[4:8], "big")
    assert context_id == 1
    assert max_length == MAX_PDU
    return context_id, max_length


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[float, bytes]:
    """(seconds until the daemon closed the connection, bytes received meanwhile)."""
    started = time.monotonic()
    sock.settimeout(timeout)
    rest = b""
    try:
        while chunk := sock.recv(65536):
            rest += chunk
    except socket.timeout:
        raise AssertionError(f"connection still open after {timeout} s") from None
    except ConnectionResetError:
        pass
    return time.monotonic() - started, rest


def spool_files(pacs: Daemon) -> list[Path]:
    spool = pacs.data_dir / "spool"
    return sorted(spool.glob("*.spool")) if spool.is_dir() else []


def poll(predicate, timeout: float, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def assert_still_serving(pacs: Daemon) -> None:
    assert pacs.alive, "pacsd exited"
    calling = f"AFTER{next(_echo_numbers)}"
    result = subprocess.run(
        [dcmtk("echoscu"), "-aet", calling, "-aec", "PACSD", "-to", "5", "127.0.0.1", str(pacs.port)],
        capture_output=True, text=True, timeout=20,
    )
    assert result.returncode == 0, result.stderr
    [ended] = pacs.wait_for_event("association.ended", timeout=3, calling_ae=calling)
    assert ended["outcome"] == "released"
    assert ended["messages"] == 1
    assert pacs.alive


# --- the cases, run concurrently ------------------------------------------------------


@dataclass(frozen=True)
class Case:
    payload: bytes  # what the peer sends once it is in `state`
    answer: bytes  # the exact bytes the daemon must answer with (b"": none)
    state: str = "STA2"  # "STA6": a valid association is set up first
    error: str = ""  # text the association.protocol_error line must contain


def _cases() -> dict[str, Case]:
    fixed, app, pc, user = rq_parts()
    abstract = pc[8:]
    assert abstract[0] == 0x30 and user[4] == 0x51
    cmd = echo_command()
    cases = {
        # 1. non-DICOM traffic
        "http-get": Case(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", provider_abort(UNRECOGNIZED_PDU),
                         error="unknown PDU type 0x47"),
        "random-4KiB": Case(random_bytes(), provider_abort(UNRECOGNIZED_PDU),
                            error="unknown PDU type 0x25"),
        "tls-client-hello": Case(tls_client_hello(), provider_abort(UNRECOGNIZED_PDU),
                                 error="unknown PDU type 0x16"),
        # 3. P-DATA-TF longer than the Maximum Length: the 6-byte header alone
        "pdata-max+1": Case(header(0x04, MAX_PDU + 1), provider_abort(INVALID_PARAMETER), "STA6",
                            error=f"{MAX_PDU + 1} bytes exceeds the negotiated maximum of {MAX_PDU}"),
        "pdata-4GiB": Case(header(0x04, 0xFFFFFFFF), provider_abort(INVALID_PARAMETER), "STA6",
                           error=f"{0xFFFFFFFF} bytes exceeds"),
        # 4. PDV items inconsistent with their P-DATA-TF
        "pdv-past-pdu-end": Case(pdata(struct.pack(">IBB", len(cmd) + 12, 1, 0x03) + cmd),
                                 provider_abort(INVALID_PARAMETER), "STA6",
                                 error=f"PDV item length {len(cmd) + 12} inconsistent"),
        "pdv-length-0": Case(pdata(struct.pack(">IBB", 0, 1, 0x03) + cmd),
                             provider_abort(INVALID_PARAMETER), "STA6",
                             error="PDV item length 0 inconsistent"),
        "pdv-length-1": Case(pdata(struct.pack(">IBB", 1, 1, 0x03)),
                             provider_abort(INVALID_PARAMETER), "STA6",
                             error="PDV item length 1 inconsistent"),
        "pdv-length-4GiB": Case(pdata(struct.pack(">IBB", 0xFFFFFFFF, 1, 0x03) + cmd),
                                provider_abort(INVALID_PARAMETER), "STA6",
                                error=f"PDV item length {0xFFFFFFFF} inconsistent"),
        "pdv-trailing-3-bytes": Case(pdata(pdv(1, 0x03, cmd), b"\x00\x00\x00"),
                                     provider_abort(INVALID_PARAMETER), "STA6",
                                     error="truncated PDV item header"),
        "pdata-without-pdv": Case(header(0x04, 0), provider_abort(INVALID_PARAMETER), "STA6",
                                  error="without a PDV item"),
        # 5. malformed A-ASSOCIATE-RQ
        "rq-user-info-before-pc": Case(build_rq(fixed, app, user, pc),
                                       provider_abort(UNEXPECTED_PARAMETER),
                                       error="item 0x20 out of order"),
        "rq-unknown-item-0x33": Case(build_rq(fixed, app, pc, b"\x33\x00\x00\x02ab", user),
                                     provider_abort(UNRECOGNIZED_PARAMETER),
                                     error="unexpected item type 0x33"),
        "rq-pc-past-pdu-end": Case(build_rq(fixed, app, pc[:2] + b"\xff\xff" + pc[4:]),
                                   provider_abort(INVALID_PARAMETER),
                                   error="item 0x20 of 65535 bytes runs past the end"),
        "rq-abstract-past-pc": Case(build_rq(fixed, app, pc[:8] + abstract[:2] + b"\x7f\xff"
                                             + abstract[4:], user),
                                    provider_abort(INVALID_PARAMETER),
                                    error="item 0x30 of 32767 bytes runs past the end"),
        "rq-max-length-past-user-info": Case(build_rq(fixed, app, pc, user[:6] + b"\x10\x00" + user[8:]),
                                             provider_abort(INVALID_PARAMETER),
                                             error="item 0x51 of 4096 bytes runs past the end"),
        "rq-length-2GiB": Case(header(0x01, 1 << 31), provider_abort(INVALID_PARAMETER),
                               error=f"A-ASSOCIATE PDU length {1 << 31} out of range"),
        "rq-length-10": Case(header(0x01, 10) + bytes(10), provider_abort(INVALID_PARAMETER),
                             error="A-ASSOCIATE PDU length 10 out of range"),
        "rq-version-2": Case(build_rq(b"\x00\x02" + fixed[2:], app, pc, user), VERSION_REJECT),
        # 6. fixed-length PDUs with another length
        "release-rq-length-10": Case(header(0x05, 10) + bytes(10), provider_abort(INVALID_PARAMETER),
                                     "STA6", error="PDU type 0x05 has length 10, expected 4"),
        "release-rq-length-10-sta2": Case(header(0x05, 10) + bytes(10),
                                          provider_abort(INVALID_PARAMETER),
                                          error="PDU type 0x05 has length 10, expected 4"),
        "release-rp-length-0": Case(header(0x06, 0), provider_abort(INVALID_PARAMETER), "STA6",
                                    error="PDU type 0x06 has length 0, expected 4"),
        "abort-length-3": Case(header(0x07, 3) + bytes(3), provider_abort(INVALID_PARAMETER), "STA6",
                               error="PDU type 0x07 has length 3, expected 4"),
        # 7. PDUs the state does not expect
        "pdata-in-sta2": Case(pdata(pdv(1, 0x03, cmd)), provider_abort(UNEXPECTED_PDU),
                              error="unexpected P-DATA-TF PDU"),
        "release-rq-in-sta2": Case(header(0x05, 4) + bytes(4), provider_abort(UNEXPECTED_PDU),
                                   error="unexpected A-RELEASE-RQ PDU"),
        "release-rp-in-sta6": Case(header(0x06, 4) + bytes(4), provider_abort(UNEXPECTED_PDU), "STA6",
                                   error="unexpected A-RELEASE-RP PDU"),
        "second-associate-rq": Case(associate_rq(), provider_abort(UNEXPECTED_PDU), "STA6",
                                    error="unexpected A-ASSOCIATE-RQ PDU"),
        # 8. ARTIM: nothing, or half a PDU header, then silence
        "artim-silent": Case(b"", b""),
        "artim-half-header": Case(b"\x01\x00\x00", b""),
        # 11. DIMSE garbage inside well-formed P-DATA
        "command-element-outside-group-0": Case(
            pdata(pdv(1, 0x03, cmd + struct.pack("<HHI", 0x0008, 0x0016, 2) + b"1\x00")),
            provider_abort(INVALID_PARAMETER), "STA6", error="(0008,0016) outside the command group"),
        "command-element-past-end": Case(
            pdata(pdv(1, 0x03, cmd + struct.pack("<HHI", 0x0000, 0x0700, 100) + b"\x00\x00")),
            provider_abort(INVALID_PARAMETER), "STA6", error="(0000,0700) length 100 runs past"),
        "command-truncated-element": Case(pdata(pdv(1, 0x03, cmd + b"\x00\x00\x00")),
                                          provider_abort(INVALID_PARAMETER), "STA6",
                                          error="truncated element header"),
        "command-without-command-field": Case(
            pdata(pdv(1, 0x03, dimse_command.encode({"MessageID": 1}))),
            provider_abort(INVALID_PARAMETER), "STA6", error="no Command Field"),
        "pdv-on-unaccepted-context": Case(pdata(pdv(3, 0x03, cmd)), provider_abort(UNEXPECTED_PARAMETER),
                                          "STA6", error="context 3, which was not accepted"),
        "pdv-reserved-control-bits": Case(pdata(pdv(1, 0x07, cmd)), provider_abort(INVALID_PARAMETER),
                                          "STA6", error="reserved bits"),
        "dataset-without-command": Case(pdata(pdv(1, 0x02, b"\x08\x00\x16\x00\x00\x00\x00\x00")),
                                        provider_abort(INVALID_PARAMETER), "STA6",
                                        error="data set fragment without a command"),
    }
    for pdu_type in (0x00, 0x08, 0xFF):  # 2. unknown PDU types on an association
        cases[f"unknown-type-{pdu_type:02x}"] = Case(
            header(pdu_type, 4) + bytes(4), provider_abort(UNRECOGNIZED_PDU), "STA6",
            error=f"unknown PDU type 0x{pdu_type:02x}")
    return cases


CASES = _cases()


@dataclass
class Exchange:
    peer: str = ""
    answer: bytes = b""
    answer_after: float = 0.0  # seconds from sending the payload to the whole answer
    closed_after: float = 0.0  # seconds from the answer to the daemon closing
    rest: bytes = b""  # anything received after the answer
    failure: BaseException | None = None


def _exchange(pacs: Daemon, case: Case) -> Exchange:
    out = Exchange()
    try:
        sock = connect(pacs)
        with sock:
            out.peer = peer_of(sock)
            if case.state == "STA6":
                associate(sock)
            started = time.monotonic()
            if case.payload:
                sock.sendall(case.payload)
            if case.answer:
                sock.settimeout(ARTIM + 2)
                out.answer = recv_exactly(sock, len(case.answer))
            out.answer_after = time.monotonic() - started
            out.closed_after, out.rest = read_until_closed(sock, ARTIM + 3)
    except BaseException as exc:  # reported by the test of this case
        out.failure = exc
    return out


@pytest.fixture(scope="module")
def exchanges(pacs) -> dict[str, Exchange]:
    with ThreadPoolExecutor(max_workers=len(CASES)) as pool:
        futures = {name: pool.submit(_exchange, pacs, case) for name, case in CASES.items()}
        return {name: future.result() for name, future in futures.items()}


def check_exchange(pacs: Daemon, exchanges: dict[str, Exchange], name: str) -> Exchange:
    """The common checks: the answer's bytes, the close within ARTIM, the log lines."""
    case, ex = CASES[name], exchanges[name]
    if ex.failure is not None:
        raise ex.failure
    assert ex.answer.hex(" ") == case.answer.hex(" ")
    assert ex.answer_after < ARTIM / 2, f"answer took {ex.answer_after:.2f} s"
    assert ex.closed_after <= ARTIM + CLOSE_SLACK, f"closed after {ex.closed_after:.2f} s"
    if ex.rest:
        # An input split over several reads: each further read is another invalid PDU in
        # Sta13, answered by another A-ABORT (Table 9-10, AA-7). Nothing else may follow.
        assert case.state == "STA2" and len(case.payload) > 1000, ex.rest.hex(" ")
        assert ex.rest == case.answer * (len(ex.rest) // len(case.answer)), ex.rest.hex(" ")
    # The daemon closed the connection itself, when ARTIM (started in Sta13) expired.
    [expired] = pacs.wait_for_event("association.artim_expired", timeout=3, peer=ex.peer)
    assert expired["state"] == "STA13"
    if case.error:
        found = pacs.wait_for_event("association.protocol_error", timeout=3, peer=ex.peer)
        assert found, f"no association.protocol_error for {ex.peer}"
        assert found[0]["state"] == case.state
        assert found[0]["abort_reason"] == case.answer[-1]
        assert case.error in found[0]["error"]
    return ex


def _names(*prefixes: str) -> list[str]:
    names = [n for n in CASES if n.startswith(prefixes)]
    assert names
    return names


# --- 1. non-DICOM traffic ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["http-get", "random-4KiB", "tls-client-hello"])
def test_non_dicom_traffic_gets_unrecognized_pdu_abort(pacs, exchanges, name):
    ex = check_exchange(pacs, exchanges, name)
    [closed] = pacs.wait_for_event("connection.closed", timeout=3, peer=ex.peer)
    assert closed["bytes_received"] == len(CASES[name].payload)
    assert not pacs.wait_for_event("association.accepted", timeout=0, peer=ex.peer)
    assert_still_serving(pacs)


# --- 2. unknown PDU types on an established association ---------------------------------


@pytest.mark.parametrize("name", _names("unknown-type-"))
def test_unknown_pdu_type_after_association(pacs, exchanges, name):
    ex = check_exchange(pacs, exchanges, name)
    [ended] = pacs.wait_for_event("association.ended", timeout=3, peer=ex.peer)
    assert ended["outcome"] == "aborted"
    assert ended["aborted_by"] == "provider"
    assert (ended["abort_source"], ended["abort_reason"]) == (2, UNRECOGNIZED_PDU)
    assert_still_serving(pacs)


# --- 3. P-DATA-TF above the advertised maximum, header only ----------------------------


@pytest.mark.parametrize("name", ["pdata-max+1", "pdata-4GiB"])
def test_oversize_pdata_aborted_on_header_alone(pacs, exchanges, name):
    # Only the 6-byte header went out: the A-ABORT proves the length was judged on its
    # own, not used to size a buffer that the daemon then waited to fill.
    assert len(CASES[name].payload) == 6
    check_exchange(pacs, exchanges, name)
    assert_still_serving(pacs)


def test_pdata_of_exactly_max_length_is_accepted(pacs):
    """The boundary of the test above: a P-DATA-TF of exactly Maximum Length is fine."""
    sock = connect(pacs)
    peer = peer_of(sock)
    context_id, max_length = associate(sock)
    sock.sendall(pdata(pdv(context_id, 0x03, echo_command())))
    pdu_bytes = pdata(pdv(context_id, 0x00, bytes(max_length - 6)))
    assert int.from_bytes(pdu_bytes[2:6], "big") == max_length
    sock.sendall(pdu_bytes + PEER_ABORT)
    elapsed, rest = read_until_closed(sock, 3)
    sock.close()
    assert rest == b""  # no A-ABORT from the daemon: it took the PDU, then our abort
    [ended] = pacs.wait_for_event("association.ended", timeout=3, peer=peer)
    assert ended["aborted_by"] == "peer"
    assert not pacs.wait_for_event("association.protocol_error", timeout=0, peer=peer)


# --- 4. PDV items inconsistent with their P-DATA-TF -------------------------------------


@pytest.mark.parametrize("name", _names("pdv-past", "pdv-length", "pdv-trailing", "pdata-without"))
def test_pdv_item_inconsistent_with_pdu(pacs, exchanges, name):
    ex = check_exchange(pacs, exchanges, name)
    [ended] = pacs.wait_for_event("association.ended", timeout=3, peer=ex.peer)
    assert ended["messages"] == 0
    assert (ended["abort_source"], ended["abort_reason"]) == (2, INVALID_PARAMETER)
    assert_still_serving(pacs)


# --- 5. malformed A-ASSOCIATE-RQ --------------------------------------------------------


@pytest.mark.parametrize("name", _names("rq-user", "rq-unknown", "rq-pc", "rq-abstract", "rq-max",
                                        "rq-length-10"))
def test_malformed_associate_rq(pacs, exchanges, name):
    ex = check_exchange(pacs, exchanges, name)
    assert not pacs.wait_for_event("association.accepted", timeout=0, peer=ex.peer)
    assert_still_serving(pacs)


def test_associate_rq_header_of_2gib_aborted_on_header_alone(pacs, exchanges):
    assert len(CASES["rq-length-2GiB"].payload) == 6
    ex = check_exchange(pacs, exchanges, "rq-length-2GiB")
    # In Sta2 an expiring ARTIM closes silently; the A-ABORT came from the header check.
    assert ex.answer_after < ARTIM / 2
    assert_still_serving(pacs)


def test_associate_rq_unsupported_protocol_version_rejected(pacs, exchanges):
    assert CASES["rq-version-2"].payload[6:8] == b"\x00\x02"
    ex = check_exchange(pacs, exchanges, "rq-version-2")
    [rejected] = pacs.wait_for_event("association.rejected", timeout=3, peer=ex.peer)
    assert rejected["protocol_version"] == 2
    assert not pacs.wait_for_event("association.accepted", timeout=0, peer=ex.peer)
    assert not pacs.wait_for_event("association.protocol_error", timeout=0, peer=ex.peer)
    assert_still_serving(pacs)


# --- 6. fixed-length PDUs with another length -------------------------------------------


@pytest.mark.parametrize("name", _names("release-rq-length", "release-rp-length", "abort-length"))
def test_fixed_length_pdu_with_wrong_length(pacs, exchanges, name):
    check_exchange(pacs, exchanges, name)
    assert_still_serving(pacs)


# --- 7. PDUs the state does not expect --------------------------------------------------


@pytest.mark.parametrize("name", ["pdata-in-sta2", "release-rq-in-sta2"])
def test_unexpected_pdu_before_associate_rq(pacs, exchanges, name):
    ex = check_exchange(pacs, exchanges, name)
    [closed] = pacs.wait_for_event("connection.closed", timeout=3, peer=ex.peer)
    assert closed["bytes_received"] == len(CASES[name].payload)
    assert_still_serving(pacs)


@pytest.mark.parametrize("name", ["second-associate-rq", "release-rp-in-sta6"])
def test_unexpected_pdu_on_established_association(pacs, exchanges, name):
    ex = check_exchange(pacs, exchanges, name)
    [ended] = pacs.wait_for_event("association.ended", timeout=3, peer=ex.peer)
    assert ended["outcome"] == "aborted"
    assert ended["aborted_by"] == "provider"
    assert (ended["abort_source"], ended["abort_reason"]) == (2, UNEXPECTED_PDU)
    assert_still_serving(pacs)


# --- 8. ARTIM ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["artim-silent", "artim-half-header"])
def test_artim_closes_connection_without_associate_rq(pacs, exchanges, name):
    ex = exchanges[name]
    if ex.failure is not None:
        raise ex.failure
    assert 0.5 <= ex.closed_after <= 4, ex.closed_after
    assert ex.rest == b""  # ARTIM expiring in Sta2 closes without an A-ABORT (AA-2)
    [expired] = pacs.wait_for_event("association.artim_expired", timeout=3, peer=ex.peer)
    assert expired["state"] == "STA2"
    [closed] = pacs.wait_for_event("connection.closed", timeout=3, peer=ex.peer)
    assert closed["bytes_received"] == len(CASES[name].payload)
    assert not pacs.wait_for_event("association.protocol_error", timeout=0, peer=ex.peer)
    assert_still_serving(pacs)


def test_artim_not_restarted_by_a_trickled_associate_rq(pacs):
    """A peer dribbling an A-ASSOCIATE-RQ a byte at a time is still cut off at ARTIM."""
    rq = associate_rq()
    sock = connect(pacs)
    peer = peer_of(sock)
    sock.settimeout(0.1)
    started = time.monotonic()
    sent, closed = 0, False
    while not closed and time.monotonic() - started < ARTIM + 3:
        try:
            sock.sendall(rq[sent : sent + 1])
            sent += 1
            closed = sock.recv(1) == b""
        except socket.timeout:
            pass
        except (BrokenPipeError, ConnectionResetError):
            closed = True
    elapsed = time.monotonic() - started
    sock.close()
    assert closed, "still open"
    assert 0 < sent < len(rq)
    assert 0.5 <= elapsed <= ARTIM + CLOSE_SLACK, elapsed
    [expired] = pacs.wait_for_event("association.artim_expired", timeout=3, peer=peer)
    assert expired["state"] == "STA2"
    assert_still_serving(pacs)


# --- 9./10. the peer goes away in the middle of a spooled data set ---------------------


def _start_big_dataset(pacs: Daemon) -> tuple[socket.socket, str]:
    """Associate, announce a data set, send 600 KiB of it (none last): it spills to a file."""
    assert spool_files(pacs) == []
    sock = connect(pacs)
    peer = peer_of(sock)
    context_id, max_length = associate(sock)
    sock.sendall(pdata(pdv(context_id, 0x03, echo_command())))
    rng = random.Random(9)
    remaining = 600 * 1024
    while remaining:
        n = min(max_length - 6, remaining)
        sock.sendall(pdata(pdv(context_id, 0x00, rng.randbytes(n))))
        remaining -= n
    files = poll(lambda: spool_files(pacs), timeout=5)
    assert len(files) == 1, "600 KiB of data set never reached a spool file"
    return sock, peer


def test_peer_abort_mid_dataset_removes_spool_file(pacs):
    sock, peer = _start_big_dataset(pacs)
    sock.sendall(PEER_ABORT)
    sock.close()
    assert poll(lambda: not spool_files(pacs), timeout=5), spool_files(pacs)
    [ended] = pacs.wait_for_event("association.ended", timeout=3, peer=peer)
    assert ended["outcome"] == "aborted"
    assert ended["aborted_by"] == "peer"
    assert (ended["abort_source"], ended["abort_reason"]) == (0, 0)
    assert ended["messages"] == 0
    assert not pacs.wait_for_event("association.protocol_error", timeout=0, peer=peer)
    assert_still_serving(pacs)


def test_peer_closes_tcp_mid_dataset_removes_spool_file(pacs):
    sock, peer = _start_big_dataset(pacs)
    sock.close()
    assert poll(lambda: not spool_files(pacs), timeout=5), spool_files(pacs)
    [ended] = pacs.wait_for_event("association.ended", timeout=3, peer=peer)
    assert ended["outcome"] == "aborted"
    assert ended["messages"] == 0
    assert not pacs.wait_for_event("association.protocol_error", timeout=0, peer=peer)
    assert_still_serving(pacs)


def test_peer_closing_tcp_is_logged_as_such(pacs):
    sock = connect(pacs)
    peer = peer_of(sock)
    associate(sock)
    sock.close()
    [ended] = pacs.wait_for_event("association.ended", timeout=3, peer=peer)
    assert ended["outcome"] == "aborted"
    assert ended.get("aborted_by") == "connection closed", ended


def test_protocol_error_mid_dataset_removes_spool_file(pacs):
    sock, peer = _start_big_dataset(pacs)
    sock.sendall(header(0x09, 4) + bytes(4))
    sock.settimeout(3)
    assert recv_exactly(sock, 10) == provider_abort(UNRECOGNIZED_PDU)
    assert poll(lambda: not spool_files(pacs), timeout=5), spool_files(pacs)
    elapsed, rest = read_until_closed(sock, ARTIM + 3)
    sock.close()
    assert rest == b""
    assert elapsed <= ARTIM + CLOSE_SLACK
    [event] = pacs.wait_for_event("association.protocol_error", timeout=3, peer=peer)
    assert (event["state"], event["abort_reason"]) == ("STA6", UNRECOGNIZED_PDU)
    assert_still_serving(pacs)


# --- 11. DIMSE-level garbage inside well-formed P-DATA ----------------------------------


@pytest.mark.parametrize("name", _names("command-", "pdv-on-", "pdv-reserved", "dataset-without"))
def test_bad_dimse_content(pacs, exchanges, name):
    ex = check_exchange(pacs, exchanges, name)
    [ended] = pacs.wait_for_event("association.ended", timeout=3, peer=ex.peer)
    assert ended["messages"] == 0
    assert ended["abort_source"] == 2
    assert_still_serving(pacs)
