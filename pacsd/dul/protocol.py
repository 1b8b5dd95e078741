"""asyncio glue for the upper-layer Machine: bytes in, events through the table, effects out.

One UpperLayerProtocol per TCP connection, in either role. It knows PDUs, timers and the
socket; what an association *means* (negotiation, DIMSE, services) belongs to the
AssociationUser it reports to.
"""

from __future__ import annotations

import asyncio
import socket
from collections import OrderedDict
from typing import Protocol as TypingProtocol

import structlog
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE

from pacsd.dul import pdu
from pacsd.dul.negotiation import CACHEABLE_REQUEST_BYTES, RECENT_REQUESTS
from pacsd.dul.machine import (
    CloseTransport,
    ConnectTransport,
    Event,
    Indicate,
    Machine,
    Payload,
    Primitive,
    Send,
    StartArtim,
    State,
    StopArtim,
)

log = structlog.get_logger("pacsd.dul")

_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)

# A-ASSOCIATE-RQs decoded recently, by their bytes (those up to CACHEABLE_REQUEST_BYTES). A
# modality sends the same request on every association, and pynetdicom's decode of one with
# ~128 presentation contexts costs ~7 ms; the primitive is only read afterwards, so one
# object serves every copy (and lets negotiate() reuse its answer).
_DECODED_REQUESTS: OrderedDict[bytes, A_ASSOCIATE] = OrderedDict()


class AssociationUser(TypingProtocol):
    """What the upper layer reports to (the DIMSE/association side)."""

    def associate_indication(self, rq) -> None: ...
    def associate_confirmation(self, ac) -> None: ...
    def associate_rejected(self, rj: pdu.Reject) -> None: ...
    def pdata_indication(self, body: memoryview) -> None: ...
    def release_indication(self) -> None: ...
    def release_confirmation(self) -> None: ...
    def abort_indication(self, abort: pdu.Abort | None, by_peer: bool) -> None: ...
    def transport_closed(self) -> None: ...


def _unexpected(data=None) -> Payload:
    """Payload for a received PDU: if the state does not expect it, the A-ABORT that
    answers it comes from the service provider with reason "unexpected PDU"."""
    return Payload(data=data, abort_source=pdu.ABORT_SOURCE_PROVIDER,
                   abort_reason=pdu.ABORT_REASON_UNEXPECTED_PDU)


# Received-PDU events and the actions Table 9-10 takes for a PDU the state did not expect.
_PDU_NAMES = {
    Event.EVT3: "A-ASSOCIATE-AC", Event.EVT4: "A-ASSOCIATE-RJ", Event.EVT6: "A-ASSOCIATE-RQ",
    Event.EVT10: "P-DATA-TF", Event.EVT12: "A-RELEASE-RQ", Event.EVT13: "A-RELEASE-RP",
}  # fmt: skip
_ABORTING_ACTIONS = frozenset({"AA-1", "AA-8"})


class UpperLayerProtocol(asyncio.Protocol):
    def __init__(
        self,
        user: AssociationUser,
        *,
        is_requestor: bool,
        max_pdata_length: int,
        artim_timeout: float,
        network_timeout: float,
    ) -> None:
        self.user = user
        self.machine = Machine(is_requestor=is_requestor)
        self.framer = pdu.Framer(max_pdata_length)
        self.artim_timeout = artim_timeout
        self.network_timeout = network_timeout
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[str, int] | None = None
        self._loop = asyncio.get_running_loop()
        self._artim: asyncio.TimerHandle | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._last_read = 0.0
        self._writable = asyncio.Event()
        self._writable.set()
        self._sock: socket.socket | None = None
        self.closed = self._loop.create_future()
        self.bytes_received = 0
        self._corked: list[bytes] | None = None  # P-DATA held back by cork()

    # --- transport callbacks ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            self._sock = sock if _TCP_QUICKACK is not None else None
        self._last_read = self._loop.time()
        self._arm_idle(self.network_timeout)
        # Acceptor: Evt5 (transport indication). Requestor: Evt2 (connect confirmation).
        event = Event.EVT2 if self.machine.is_requestor else Event.EVT5
        self._event(event)

    def data_received(self, data: bytes) -> None:
        self._last_read = self._loop.time()
        self.bytes_received += len(data)
        if self._sock is not None:
            # Without this Linux may delay our ACK ~40 ms; a sender with Nagle on (DCMTK
            # tools by default) then stalls once per message.
            try:
                self._sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
            except OSError:
                self._sock = None
        try:
            self.framer.feed(data, self._pdu_received)
        except pdu.PDUError as exc:
            self._protocol_error(exc)
        except Exception:
            # A bug of ours met by what this peer sent: this association ends, the
            # listener and every other association go on.
            log.exception("association.internal_error", peer=self.peer_str,
                          state=self.machine.state.name)
            self._protocol_error(pdu.PDUError("internal error", pdu.ABORT_REASON_NOT_SPECIFIED))

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        self._writable.set()
        self._event(Event.EVT17)
        self.user.transport_closed()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def drain(self) -> None:
        await self._writable.wait()

    # --- received PDUs -> events ------------------------------------------------------

    def _pdu_received(self, pdu_type: int, body: memoryview) -> None:
        if pdu_type == pdu.P_DATA_TF_TYPE:
            if self.machine.state is State.STA6:
                self._event(Event.EVT10, Payload(data=body))
            else:
                self._peer_pdu(Event.EVT10, _unexpected(body))
        elif pdu_type == pdu.A_ASSOCIATE_RQ_TYPE:
            self._associate_rq(body)
        elif pdu_type == pdu.A_ASSOCIATE_AC_TYPE:
            pdu.check_associate_items(body, pdu_type)
            ac = A_ASSOCIATE_AC()
            try:
                ac.decode(b"\x02\x00" + len(body).to_bytes(4, "big") + bytes(body))
                primitive = ac.to_primitive()
            except Exception as exc:  # pynetdicom raises many kinds on bad content
                raise pdu.PDUError(f"undecodable A-ASSOCIATE-AC: {exc}") from exc
            self._peer_pdu(Event.EVT3, _unexpected(primitive))
        elif pdu_type == pdu.A_ASSOCIATE_RJ_TYPE:
            self._peer_pdu(Event.EVT4, _unexpected(pdu.Reject(*pdu.decode_fixed4(body))))
        elif pdu_type == pdu.A_RELEASE_RQ_TYPE:
            self._peer_pdu(Event.EVT12, _unexpected())
        elif pdu_type == pdu.A_RELEASE_RP_TYPE:
            self._peer_pdu(Event.EVT13, _unexpected())
        elif pdu_type == pdu.A_ABORT_TYPE:
            _, source, reason = pdu.decode_fixed4(body)
            self._event(Event.EVT16, Payload(data=pdu.Abort(source, reason)))

    def _associate_rq(self, body: memoryview) -> None:
        pdu.check_associate_items(body, pdu.A_ASSOCIATE_RQ_TYPE)
        version = (body[0] << 8) | body[1]
        raw = bytes(body)
        primitive = _DECODED_REQUESTS.get(raw)
        if primitive is None:
            rq = A_ASSOCIATE_RQ()
            try:
                rq.decode(b"\x01\x00" + len(body).to_bytes(4, "big") + raw)
                primitive = rq.to_primitive()
            except Exception as exc:
                raise pdu.PDUError(f"undecodable A-ASSOCIATE-RQ: {exc}") from exc
            if len(raw) <= CACHEABLE_REQUEST_BYTES:
                _DECODED_REQUESTS[raw] = primitive
                while len(_DECODED_REQUESTS) > RECENT_REQUESTS:
                    _DECODED_REQUESTS.popitem(last=False)
        else:
            _DECODED_REQUESTS.move_to_end(raw)
        # PS3.8 9.3.2: bit 0 of the protocol version is version 1, the only one defined.
        acceptable = bool(version & 0x0001)
        reject = pdu.encode_reject(pdu.RJ_PERMANENT, pdu.RJ_SOURCE_ACSE, pdu.RJ_ACSE_PROTOCOL_VERSION)
        if not acceptable and self.machine.state is State.STA2:
            log.warning("association.rejected", peer=self.peer_str, reason="protocol version",
                        protocol_version=version)
        self._peer_pdu(Event.EVT6, Payload(data=primitive, acceptable=acceptable, reject_pdu=reject,
                                           abort_source=pdu.ABORT_SOURCE_PROVIDER,
                                           abort_reason=pdu.ABORT_REASON_UNEXPECTED_PDU))

    def _peer_pdu(self, event: Event, payload: Payload) -> None:
        """Hand a received PDU to the machine, logging it first if the state did not
        expect it (the machine then aborts: AA-1 in Sta2, AA-8 elsewhere)."""
        if self.machine.action_for(event) in _ABORTING_ACTIONS:
            log.warning(
                "association.protocol_error",
                peer=self.peer_str,
                state=self.machine.state.name,
                error=f"unexpected {_PDU_NAMES[event]} PDU",
                abort_reason=payload.abort_reason,
            )
        self._event(event, payload)

    def _protocol_error(self, exc: pdu.PDUError) -> None:
        log.warning(
            "association.protocol_error",
            peer=self.peer_str,
            state=self.machine.state.name,
            error=str(exc),
            abort_reason=exc.reason,
        )
        self.framer.reset()
        self._event(
            Event.EVT19,
            Payload(abort_source=pdu.ABORT_SOURCE_PROVIDER, abort_reason=exc.reason),
        )

    # --- local primitives ---------------------------------------------------------------

    def request_association(self, rq_pdu: bytes) -> None:
        """Evt1 (requestor): the caller then opens the transport (ConnectTransport)."""
        self._event(Event.EVT1, Payload(data=rq_pdu))

    def accept(self, ac_pdu: bytes) -> None:
        self._event(Event.EVT7, Payload(data=ac_pdu))

    def reject(self, rj_pdu: bytes) -> None:
        self._event(Event.EVT8, Payload(data=rj_pdu))

    def send_pdata(self, data: bytes) -> None:
        """P-DATA request: `data` is one or more encoded P-DATA-TF PDUs, written at once
        (or held until uncork)."""
        if self._corked is not None:
            self._corked.append(data)
            return
        self._event(Event.EVT9, Payload(data=data))

    def cork(self) -> None:
        """Hold P-DATA back until `uncork`, so that many small messages (C-FIND pending
        responses) go out in one write: each write is a system call and a TCP segment."""
        if self._corked is None:
            self._corked = []

    def uncork(self) -> None:
        """Send what `cork` held back, in one write, and stop holding."""
        held, self._corked = self._corked, None
        if held and self.machine.state in (State.STA6, State.STA8):
            self._event(Event.EVT9, Payload(data=b"".join(held)))

    def flush(self) -> None:
        """Send what is held back and go on holding."""
        if self._corked:
            self.uncork()
            self.cork()

    def release(self) -> None:
        self._event(Event.EVT11)

    def release_response(self) -> None:
        self._event(Event.EVT14)

    def abort(self, source: int = pdu.ABORT_SOURCE_USER, reason: int = 0) -> None:
        """A-ABORT request; a no-op where Table 9-10 has nothing to abort."""
        if self.machine.action_for(Event.EVT15) is None:
            if self.transport is not None and self.machine.state is State.STA2:
                self.transport.close()
            return
        self._event(Event.EVT15, Payload(abort_source=source, abort_reason=reason))

    @property
    def state(self) -> State:
        return self.machine.state

    @property
    def peer_str(self) -> str:
        return f"{self.peer[0]}:{self.peer[1]}" if self.peer else "?"

    # --- effects ---------------------------------------------------------------------

    def _event(self, event: Event, payload: Payload | None = None) -> None:
        for effect in self.machine.handle(event, payload):
            kind = type(effect)
            if kind is Send:
                if self.transport is not None and not self.transport.is_closing():
                    self.transport.write(effect.data)
            elif kind is Indicate:
                self._indicate(effect)
            elif kind is StartArtim:
                self._cancel_artim()
                self._artim = self._loop.call_later(self.artim_timeout, self._artim_expired)
            elif kind is StopArtim:
                self._cancel_artim()
            elif kind is CloseTransport:
                self._cancel_timers()
                if self.transport is not None:
                    self.transport.close()
            elif kind is ConnectTransport:
                pass  # the requestor opens the connection itself, with this protocol

    def _indicate(self, effect: Indicate) -> None:
        prim = effect.primitive
        user = self.user
        if prim is Primitive.P_DATA_INDICATION:
            user.pdata_indication(effect.payload)
        elif prim is Primitive.ASSOCIATE_INDICATION:
            user.associate_indication(effect.payload)
        elif prim is Primitive.ASSOCIATE_ACCEPTED:
            user.associate_confirmation(effect.payload)
        elif prim is Primitive.ASSOCIATE_REJECTED:
            user.associate_rejected(effect.payload)
        elif prim is Primitive.RELEASE_INDICATION:
            user.release_indication()
        elif prim is Primitive.RELEASE_CONFIRMATION:
            user.release_confirmation()
        elif prim is Primitive.ABORT_INDICATION:
            user.abort_indication(effect.payload, by_peer=True)
        elif prim is Primitive.P_ABORT_INDICATION:
            user.abort_indication(effect.payload, by_peer=False)

    # --- timers ----------------------------------------------------------------------

    def _artim_expired(self) -> None:
        self._artim = None
        log.info("association.artim_expired", peer=self.peer_str, state=self.machine.state.name)
        self._event(Event.EVT18)

    def _arm_idle(self, delay: float) -> None:
        self._idle = self._loop.call_later(delay, self._idle_check)

    def _idle_check(self) -> None:
        # One timer re-armed for the remaining time, instead of one per read.
        idle_for = self._loop.time() - self._last_read
        if idle_for < self.network_timeout:
            self._arm_idle(self.network_timeout - idle_for)
            return
        self._idle = None
        if self.machine.state in (State.STA1, State.STA13, State.STA2):
            if self.transport is not None:
                self.transport.close()
            return
        log.warning("association.network_timeout", peer=self.peer_str,
                    idle_seconds=round(idle_for, 1), state=self.machine.state.name)
        self.abort(pdu.ABORT_SOURCE_USER, 0)

    def _cancel_artim(self) -> None:
        if self._artim is not None:
            self._artim.cancel()
            self._artim = None

    def _cancel_timers(self) -> None:
        self._cancel_artim()
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
