"""A-RELEASE, including release collision (PS3.8 §7.2 and Sta9–Sta12), on real sockets."""

from __future__ import annotations

import asyncio

import pytest

from pacsd.app import build_registry
from pacsd.config import Settings
from pacsd.dul import pdu
from pacsd.dul.machine import State
from pacsd.dul.negotiation import ProposedContext, build_request
from pacsd.net.acceptor import DicomServer
from pacsd.net.requestor import associate
from pacsd.services.verification import VERIFICATION_SOP_CLASS, c_echo

ECHO_CONTEXT = [ProposedContext(VERIFICATION_SOP_CLASS, ["1.2.840.10008.1.2"])]
RELEASE_RQ = bytes.fromhex("05000000000400000000")
RELEASE_RP = bytes.fromhex("06000000000400000000")


@pytest.fixture
async def server(tmp_path):
    settings = Settings(
        dicom={"port": 0, "bind": "127.0.0.1", "artim_timeout": 2},
        storage={"data_dir": tmp_path},
    )
    srv = DicomServer(settings, build_registry(settings))
    await srv.start()
    yield srv
    await srv.close(1)


async def read_pdu(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    header = await asyncio.wait_for(reader.readexactly(6), 5)
    body = await asyncio.wait_for(reader.readexactly(int.from_bytes(header[2:6], "big")), 5)
    return header[0], body


async def raw_associate(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    rq, _ = build_request("RAWSCU", "PACSD", ECHO_CONTEXT, 16384)
    writer.write(rq)
    kind, _ = await read_pdu(reader)
    assert kind == pdu.A_ASSOCIATE_AC_TYPE
    return reader, writer


async def test_normal_release_by_requestor(server):
    async with associate("127.0.0.1", server.port, calling_ae="SCU", called_ae="PACSD",
                         contexts=ECHO_CONTEXT) as assoc:
        assert await c_echo(assoc) == 0
    assert assoc.outcome == "released"
    assert assoc.protocol.state is State.STA1


async def test_release_collision_acceptor_side(server):
    """pacsd (acceptor) and the peer send A-RELEASE-RQ at once: Sta7→Sta10→Sta12→Sta13."""
    reader, writer = await raw_associate(server.port)
    [assoc] = list(server.associations)
    await asyncio.sleep(0.05)
    assoc.protocol.release()  # pacsd's A-RELEASE-RQ: Sta6 -> Sta7
    writer.write(RELEASE_RQ)  # the peer's, crossing it
    kind, _ = await read_pdu(reader)
    assert kind == pdu.A_RELEASE_RQ_TYPE
    await asyncio.sleep(0.05)
    assert assoc.protocol.state is State.STA10  # collision, acceptor side
    # As the association requestor, the peer answers first (its AR-9) ...
    writer.write(RELEASE_RP)
    # ... and then pacsd answers (AR-10, AR-4).
    kind, _ = await read_pdu(reader)
    assert kind == pdu.A_RELEASE_RP_TYPE
    writer.close()
    await asyncio.wait_for(assoc.ended, 5)
    assert assoc.outcome == "released"


async def test_release_collision_requestor_side(tmp_path):
    """pacsd (requestor) and the acceptor send A-RELEASE-RQ at once: Sta7→Sta9→Sta11→Sta1."""
    seen: list[int] = []

    async def acceptor(reader, writer):
        kind, _ = await read_pdu(reader)
        assert kind == pdu.A_ASSOCIATE_RQ_TYPE
        ac = build_ac()
        writer.write(ac)
        kind, _ = await read_pdu(reader)
        seen.append(kind)  # pacsd's A-RELEASE-RQ
        writer.write(RELEASE_RQ)  # collision
        kind, _ = await read_pdu(reader)
        seen.append(kind)  # pacsd must answer with A-RELEASE-RP (AR-9)
        writer.write(RELEASE_RP)
        try:
            await asyncio.wait_for(reader.read(), 5)  # pacsd closes (AR-3)
        finally:
            writer.close()

    srv = await asyncio.start_server(acceptor, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        async with associate("127.0.0.1", port, calling_ae="PACSD", called_ae="PEER",
                             contexts=ECHO_CONTEXT, spool_dir=tmp_path) as assoc:
            pass
        assert seen == [pdu.A_RELEASE_RQ_TYPE, pdu.A_RELEASE_RP_TYPE]
        assert assoc.outcome == "released"
        assert assoc.protocol.state is State.STA1
    finally:
        srv.close()


async def test_both_pacsd_ends_release_at_once(server):
    async with associate("127.0.0.1", server.port, calling_ae="SCU", called_ae="PACSD",
                         contexts=ECHO_CONTEXT) as assoc:
        [accepted] = list(server.associations)
        accepted.protocol.release()
        assoc.protocol.release()
        await asyncio.wait_for(asyncio.gather(assoc.ended, accepted.ended), 5)
    assert assoc.outcome == accepted.outcome == "released"


def build_ac() -> bytes:
    """An A-ASSOCIATE-AC accepting context 1 (Verification, implicit VR LE)."""
    from pynetdicom.pdu import A_ASSOCIATE_AC
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import PresentationContext

    cx = PresentationContext()
    cx.context_id = 1
    cx.abstract_syntax = VERIFICATION_SOP_CLASS
    cx.add_transfer_syntax("1.2.840.10008.1.2")
    cx.result = 0
    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title = "PACSD"
    prim.called_ae_title = "PEER"
    prim.result = 0
    prim.presentation_context_definition_results_list = [cx]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    prim.user_information = [max_length]
    return A_ASSOCIATE_AC(prim).encode()
