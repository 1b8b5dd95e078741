"""An Association: the DIMSE side of one upper-layer connection, in either role.

It reassembles messages from P-DATA, fragments outgoing ones to the peer's maximum PDU,
matches responses to requests (requestor) and runs requests one at a time through the
service handlers (acceptor). Services see this object, never the socket.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import structlog

from pacsd.dimse import command as cmd
from pacsd.dimse.assembler import Assembler, Message
from pacsd.dimse.spool import Spool
from pacsd.dimse.status import Status, category
from pacsd.dul import pdu
from pacsd.dul.negotiation import AcceptedContext
from pacsd.dul.protocol import UpperLayerProtocol
from pacsd.dul.machine import State

log = structlog.get_logger("pacsd.association")

# Used when the peer advertises 0 (no limit): large enough to keep syscalls few.
UNLIMITED_PDU_CAP = 1 << 20
_READ_CHUNK = 1 << 20
# Data set bytes read, framed and written at once when sending from a file.
_SEND_BATCH = 256 * 1024


def _framed(context_id: int, base: int, data: memoryview, size: int, last: bool) -> bytes:
    """`data` as consecutive P-DATA-TF PDUs of one PDV of at most `size` bytes each, ready
    for one write; the final PDV carries the last-fragment bit when `last`."""
    pdus = []
    for start in range(0, len(data), size):
        piece = data[start:start + size]
        final = last and start + size >= len(data)
        pdus += (pdu.pdata_header(context_id, base | (pdu.MCH_LAST if final else 0), len(piece)), piece)
    return b"".join(pdus)


class AssociationError(Exception):
    """The association could not be set up or ended before the operation completed."""


class AssociationRejected(AssociationError):
    def __init__(self, reject: pdu.Reject):
        self.reject = reject
        super().__init__(
            f"association rejected: result {reject.result}, source {reject.source}, "
            f"reason {reject.reason}"
        )


class AssociationAborted(AssociationError):
    pass


class DIMSETimeout(AssociationError):
    pass


Handler = Callable[["Association", Message], Awaitable[None]]


class Association:
    def __init__(
        self,
        *,
        is_requestor: bool,
        local_ae: str,
        max_pdu_length: int,
        artim_timeout: float,
        network_timeout: float,
        dimse_timeout: float,
        spool_dir: Path,
    ) -> None:
        self.is_requestor = is_requestor
        self.local_ae = local_ae
        self.max_pdu_length = max_pdu_length
        self.dimse_timeout = dimse_timeout
        self.spool_dir = spool_dir
        self.protocol = UpperLayerProtocol(
            self,
            is_requestor=is_requestor,
            max_pdata_length=max_pdu_length,
            artim_timeout=artim_timeout,
            network_timeout=network_timeout,
        )
        self.loop = asyncio.get_running_loop()
        self.calling_ae = ""
        self.called_ae = ""
        self.contexts: dict[int, AcceptedContext] = {}
        self.peer_max_pdu = 0
        self.assembler: Assembler | None = None
        self.started = time.monotonic()
        self.outcome = "open"
        self.abort_detail: dict[str, Any] = {}
        self.established: asyncio.Future[None] = self.loop.create_future()
        self.ended: asyncio.Future[None] = self.loop.create_future()
        self._message_ids = itertools.cycle(range(1, 65536))
        # requestor: responses per message ID; acceptor: cancel flags per message ID
        self._waiters: dict[int, asyncio.Queue[Message | None]] = {}
        self.cancelled: set[int] = set()
        # acceptor: Message IDs of the requests queued or being served (what a C-CANCEL may name)
        self._open_requests: set[int] = set()
        self._send_lock = asyncio.Lock()
        # acceptor side
        self._requests: asyncio.Queue[Message | None] = asyncio.Queue()
        self._worker: asyncio.Task | None = None
        self._busy = False
        self._release_pending = False
        self.dispatch: Handler | None = None
        self.on_associate: Callable[[Any], None] | None = None
        self.on_end: Callable[[Association], None] | None = None
        self.messages_received = 0

    # --- AssociationUser: called by the upper layer -------------------------------------

    def associate_indication(self, rq) -> None:
        assert self.on_associate is not None
        self.on_associate(rq)

    def associate_confirmation(self, ac) -> None:
        if self.on_associate is not None:
            self.on_associate(ac)

    def associate_rejected(self, rj: pdu.Reject) -> None:
        self.outcome = "rejected"
        if not self.established.done():
            self.established.set_exception(AssociationRejected(rj))

    def pdata_indication(self, body: memoryview) -> None:
        pdv = self.assembler.pdv
        for context_id, control, fragment in pdu.iter_pdvs(body):
            pdv(context_id, control, fragment)

    def release_indication(self) -> None:
        state = self.protocol.state
        if state is State.STA9:
            # Release collision, requestor side: answer at once (AR-9), then await RP.
            self.protocol.release_response()
        elif state is State.STA8:
            self._release_pending = True
            self._maybe_release()
        # STA10 (collision, acceptor side): wait for the peer's A-RELEASE-RP.

    def release_confirmation(self) -> None:
        if self.protocol.state is State.STA12:
            self.protocol.release_response()  # AR-4: acceptor side of a collision
        if self.outcome == "open":
            self.outcome = "released"

    def abort_indication(self, abort: pdu.Abort | None, by_peer: bool) -> None:
        self.outcome = "aborted"
        if abort is not None:
            self.abort_detail = {"abort_source": abort.source, "abort_reason": abort.reason,
                                 "aborted_by": "peer" if by_peer else "provider"}
        self._fail_pending(AssociationAborted("association aborted"))

    def transport_closed(self) -> None:
        if self.assembler is not None:
            self.assembler.discard()
        if self.outcome == "open":
            self.outcome = "aborted" if self.established.done() else "closed"
        if self.outcome == "aborted" and not self.abort_detail:
            self.abort_detail = {"aborted_by": "connection closed"}
        self._fail_pending(AssociationAborted("connection closed"))
        self._requests.put_nowait(None)
        if not self.ended.done():
            self.ended.set_result(None)
        if self.on_end is not None:
            self.on_end(self)

    def _fail_pending(self, exc: Exception) -> None:
        if not self.established.done():
            self.established.set_exception(exc)
            self.established.exception()  # mark retrieved: callers may have gone
        for queue in self._waiters.values():
            queue.put_nowait(None)

    # --- set-up after negotiation -----------------------------------------------------

    def start(self, contexts: list[AcceptedContext], peer_max_pdu: int) -> None:
        self.contexts = {cx.context_id: cx for cx in contexts}
        self.peer_max_pdu = peer_max_pdu
        self.assembler = Assembler(self._deliver, self.spool_dir, set(self.contexts))
        if not self.is_requestor:
            self._worker = self.loop.create_task(self._serve())
        if not self.established.done():
            self.established.set_result(None)

    def set_spool_factory(self, factory: Callable[[int, dict[str, Any]], Spool]) -> None:
        self.assembler.spool_factory = factory

    # --- inbound messages -----------------------------------------------------------------

    def _deliver(self, message: Message) -> None:
        self.messages_received += 1
        field = message.command_field
        if cmd.is_request(field):
            if field == cmd.CommandField.C_CANCEL_RQ:
                # Only for a request still queued or running: a C-CANCEL that crosses the
                # final response must not cancel a later request reusing the Message ID.
                target = message.command.get("MessageIDBeingRespondedTo", -1)
                if target in self._open_requests:
                    self.cancelled.add(target)
                return
            if self.is_requestor and self.dispatch is None:
                # A request on an association we opened (e.g. N-EVENT-REPORT) with no
                # handler: answer that we do not know the operation.
                message.discard()
                self.loop.create_task(self.respond(message, Status.UNRECOGNIZED_OPERATION))
                return
            self._open_requests.add(message.command.get("MessageID", -1))
            self._requests.put_nowait(message)
            if self._requests.qsize() > 4:
                # The peer ignores the 1/1 operations window: stop reading until we catch up.
                self.protocol.transport.pause_reading()
            if self._worker is None:
                self._worker = self.loop.create_task(self._serve())
            return
        queue = self._waiters.get(message.command.get("MessageIDBeingRespondedTo", -1))
        if queue is None:
            log.warning("dimse.unexpected_response", peer=self.protocol.peer_str,
                        command=hex(field), message_id=message.command.get("MessageIDBeingRespondedTo"))
            message.discard()
            return
        queue.put_nowait(message)

    async def _serve(self) -> None:
        transport = self.protocol.transport
        while True:
            message = await self._requests.get()
            if message is None:
                return
            if self._requests.qsize() < 2 and transport is not None and not transport.is_closing():
                transport.resume_reading()
            self._busy = True
            try:
                await self._handle(message)
            except Exception:
                log.exception("dimse.handler_failed", peer=self.protocol.peer_str,
                              command=hex(message.command_field),
                              message_id=message.command.get("MessageID"))
                if self.protocol.state in (State.STA6, State.STA8):
                    try:
                        await self.respond(message, Status.PROCESSING_FAILURE,
                                           ErrorComment="internal error while processing the request")
                    except Exception:  # the association went away meanwhile: nothing to tell
                        pass
            finally:
                message.discard()
                self.cancelled.discard(message.command.get("MessageID", -1))
                self._open_requests.discard(message.command.get("MessageID", -1))
                self._busy = False
            self._maybe_release()

    async def _handle(self, message: Message) -> None:
        missing = cmd.missing_elements(message.command)
        if "MessageID" in missing:
            log.warning("dimse.no_message_id", peer=self.protocol.peer_str)
            self.abort(pdu.ABORT_SOURCE_PROVIDER, pdu.ABORT_REASON_INVALID_PARAMETER)
            return
        if missing:
            await self.respond(message, Status.MISTYPED_ARGUMENT,
                               ErrorComment=f"missing {', '.join(missing)}")
            return
        context = self.contexts[message.context_id]
        sop_class = message.command.get("AffectedSOPClassUID") or message.command.get("RequestedSOPClassUID")
        if sop_class and sop_class != context.abstract_syntax:
            await self.respond(message, Status.REFUSED_SOP_CLASS_NOT_SUPPORTED,
                               ErrorComment=f"SOP class {sop_class} sent on the context for "
                                            f"{context.abstract_syntax}")
            return
        assert self.dispatch is not None
        await self.dispatch(self, message)

    def _maybe_release(self) -> None:
        if self._release_pending and not self._busy and self._requests.empty():
            self._release_pending = False
            if self.protocol.state is State.STA8:
                self.outcome = "released"
                self.protocol.release_response()

    # --- outbound messages ----------------------------------------------------------------

    def next_message_id(self) -> int:
        return next(self._message_ids)

    @property
    def pdv_size(self) -> int:
        limit = self.peer_max_pdu or UNLIMITED_PDU_CAP
        return max(limit, 64) - 6

    async def send(
        self,
        context_id: int,
        command: dict[str, Any],
        dataset: bytes | memoryview | Path | Spool | None = None,
    ) -> None:
        """Send one DIMSE message, fragmented to the peer's maximum PDU length.

        Messages go out whole, one after the other: a message sent while a data set is
        still streaming (a pending C-GET response between C-STORE sub-operations) waits
        for it, so fragments of two messages never interleave on the association.
        """
        async with self._send_lock:
            await self._send(context_id, command, dataset)

    async def _send(
        self,
        context_id: int,
        command: dict[str, Any],
        dataset: bytes | memoryview | Path | Spool | None,
    ) -> None:
        protocol = self.protocol
        if protocol.state not in (State.STA6, State.STA8):
            raise AssociationAborted(f"cannot send in {protocol.state.name}")
        if dataset is None:
            command.setdefault("CommandDataSetType", cmd.NO_DATASET)
        elif command.get("CommandDataSetType", cmd.NO_DATASET) == cmd.NO_DATASET:
            command["CommandDataSetType"] = cmd.DATASET_PRESENT
        raw = cmd.encode(command)
        size = self.pdv_size
        if isinstance(dataset, (bytes, bytearray, memoryview)) and 0 < len(dataset) <= _SEND_BATCH:
            # Command and data set in one write: a C-FIND pending response with its identifier
            # goes out as one segment, not two, and each write costs a system call (on
            # loopback the receiver's side of the TCP stack runs inside it too).
            self.protocol.send_pdata(_framed(context_id, pdu.MCH_COMMAND, memoryview(raw), size, last=True)
                                     + _framed(context_id, 0, memoryview(dataset), size, last=True))
            await protocol.drain()
            return
        self._send_fragments(context_id, pdu.MCH_COMMAND, memoryview(raw), size)
        if dataset is None:
            return
        if isinstance(dataset, Spool):
            if dataset.in_memory:
                dataset = dataset.read()
            else:
                dataset = _Part(dataset.path, dataset.prefix_length)
        if isinstance(dataset, (Path, _Part)):
            await self._send_file(context_id, dataset, size)
        else:
            self._send_fragments(context_id, 0, memoryview(dataset), size)
            await protocol.drain()

    def _send_fragments(self, context_id: int, base: int, data: memoryview, size: int) -> None:
        total = len(data)
        if total == 0:
            self.protocol.send_pdata(pdu.encode_pdata(context_id, base | pdu.MCH_LAST, b""))
            return
        batch = max(size, _SEND_BATCH // size * size)
        for start in range(0, total, batch):
            self.protocol.send_pdata(_framed(context_id, base, data[start:start + batch], size,
                                             last=start + batch >= total))

    async def _send_file(self, context_id: int, source: "Path | _Part", size: int) -> None:
        path, offset = (source.path, source.offset) if isinstance(source, _Part) else (source, 0)
        # Many PDUs per read and per write: a peer's maximum PDU is often 16 KiB, and one
        # read, header and write for each would cost more than the bytes themselves.
        batch = max(size, _SEND_BATCH // size * size)
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            remaining = path.stat().st_size - offset
            if remaining == 0:
                self._send_fragments(context_id, 0, memoryview(b""), size)
            while remaining > 0:
                chunk = f.read(min(batch, remaining))
                if not chunk:
                    raise AssociationError(f"{path} shrank while being sent")
                remaining -= len(chunk)
                self.protocol.send_pdata(_framed(context_id, 0, memoryview(chunk), size, last=remaining == 0))
                await self.protocol.drain()
                if self.protocol.state not in (State.STA6, State.STA8):
                    raise AssociationAborted("association ended while sending")

    async def respond(self, request: Message, status: int, dataset: bytes | None = None, **extra: Any) -> None:
        command = cmd.response(request.command, status, **extra)
        await self.send(request.context_id, command, dataset)

    async def request(
        self,
        context_id: int,
        command: dict[str, Any],
        dataset: bytes | Path | None = None,
    ) -> AsyncIterator[Message]:
        """Send a request; yield each response until the final (non-pending) one."""
        if "MessageID" not in command:
            command["MessageID"] = self.next_message_id()
        message_id = command["MessageID"]
        queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self._waiters[message_id] = queue
        try:
            await self.send(context_id, command, dataset)
            while True:
                try:
                    response = await asyncio.wait_for(queue.get(), self.dimse_timeout)
                except asyncio.TimeoutError:
                    log.warning("dimse.timeout", peer=self.protocol.peer_str,
                                message_id=message_id, seconds=self.dimse_timeout)
                    self.abort()
                    raise DIMSETimeout(f"no response within {self.dimse_timeout} s") from None
                if response is None:
                    raise AssociationAborted("association ended before the response")
                yield response
                if category(response.command.get("Status", 0)) != "pending":
                    return
        finally:
            del self._waiters[message_id]

    async def request_one(self, context_id: int, command: dict[str, Any], dataset=None) -> Message:
        final = None
        async for response in self.request(context_id, command, dataset):
            final = response
        assert final is not None
        return final

    def context_for(self, abstract_syntax: str, transfer_syntax: str | None = None) -> AcceptedContext | None:
        for cx in self.contexts.values():
            if cx.abstract_syntax == abstract_syntax and (
                transfer_syntax is None or cx.transfer_syntax == transfer_syntax
            ):
                return cx
        return None

    # --- ending ------------------------------------------------------------------------

    async def release(self) -> None:
        """A-RELEASE (requestor); returns once the release completed or the link closed."""
        if self.protocol.state is State.STA6:
            self.protocol.release()
        await asyncio.wait_for(asyncio.shield(self.ended), self.protocol.artim_timeout + self.dimse_timeout)

    def abort(self, source: int = pdu.ABORT_SOURCE_USER, reason: int = 0) -> None:
        if self.outcome == "open":
            self.outcome = "aborted"
            self.abort_detail = {"aborted_by": "local", "abort_source": source, "abort_reason": reason}
        self.protocol.abort(source, reason)

    @property
    def duration(self) -> float:
        return time.monotonic() - self.started


class _Part:
    """A file to send from an offset (a spooled data set behind its Part 10 header)."""

    __slots__ = ("path", "offset")

    def __init__(self, path: Path, offset: int) -> None:
        self.path, self.offset = path, offset
