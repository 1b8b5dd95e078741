"""Query/Retrieve C-MOVE and C-GET as SCP (PS3.4 Annex C.4.2, C.4.3), Patient and Study Root.

Both resolve the identifier to instances through the index (pacsd/index/retrieve.py) and send
each one with a C-STORE sub-operation, its data set streamed from the blob exactly as stored,
in its stored transfer syntax (no transcoding yet):

- C-MOVE opens a new association to the Move Destination, a configured peer, with pacsd's AE
  title as calling AE. It proposes, per SOP class, one context per stored transfer syntax
  and one of the uncompressed syntaxes; an instance goes only on a context accepted in its
  own syntax, otherwise its sub-operation fails. Each C-STORE-RQ names the Move Originator.
- C-GET sends the C-STORE-RQs back on the requesting association, on contexts where the
  requestor gave pacsd the SCU role through SCP/SCU role selection.

While sub-operations run, pending responses report the counts: after a sub-operation (at most
one per PENDING_MIN_GAP seconds) and, while one takes long, every PENDING_KEEPALIVE seconds.
A C-CANCEL-RQ is honoured between sub-operations. Final status: 0000 all completed; B000
some failed or warned (Failed SOP Instance UID List in the identifier); A702 all failed;
FE00 cancelled.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import structlog

from pacsd.dimse.assembler import Message
from pacsd.dimse.command import CommandField, Priority
from pacsd.dimse.status import Status, category, describe
from pacsd.dul.machine import State
from pacsd.dul.negotiation import ProposedContext
from pacsd.dimse.identifier import IdentifierError, decode_identifier
from pacsd.index.retrieve import PATIENT_ROOT, STUDY_ROOT, InstanceRef, RetrieveRequest, parse_identifier, resolve
from pacsd.net.association import Association, AssociationError, AssociationRejected, _Part
from pacsd.net.requestor import associate
from pacsd.services.registry import ServiceRegistry
from pacsd.services.storage import DEFLATED, storage_sop_classes

log = structlog.get_logger("pacsd.retrieve")

PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
MODELS = {
    PATIENT_ROOT_MOVE: PATIENT_ROOT,
    PATIENT_ROOT_GET: PATIENT_ROOT,
    STUDY_ROOT_MOVE: STUDY_ROOT,
    STUDY_ROOT_GET: STUDY_ROOT,
}

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
UNCOMPRESSED = [EXPLICIT_LE, IMPLICIT_LE]

# Longest silence between pending responses while sub-operations run (a slow destination).
PENDING_KEEPALIVE = 0.5
# Shortest gap between the pending responses sent as sub-operations complete.
PENDING_MIN_GAP = 0.2
MAX_CONTEXTS = 128
# Identifiers larger than this are decoded in a worker thread.
_DECODE_INLINE = 64 * 1024
_US_MAX = 0xFFFF


# How the final statuses read in the log.
_FINAL_NAMES = {
    Status.SUCCESS: "success",
    Status.CANCEL: "cancelled",
    Status.WARNING_COERCION: "sub-operations complete, one or more failures or warnings",
    Status.OUT_OF_RESOURCES_SUBOPERATIONS: "unable to perform sub-operations",
}


def _describe_final(status: int) -> str:
    name = _FINAL_NAMES.get(status)
    return f"0x{status:04X} ({name})" if name else describe(status)


class _NotSendable(Exception):
    """This instance cannot be sent (blob missing or changed, odd length); the message says why."""


# --- counts and responses -------------------------------------------------------------------


class Progress:
    """The sub-operation counts of one C-MOVE/C-GET and the responses that report them."""

    def __init__(self, assoc: Association, request: Message, total: int) -> None:
        self.assoc = assoc
        self.request = request
        self.message_id = request.command["MessageID"]
        self.total = total
        self.remaining = total
        self.completed = 0
        self.failed = 0
        self.warning = 0
        self.failed_uids: list[str] = []
        self.requester_gone = False
        self._last_pending = float("-inf")
        self._keepalive: asyncio.Task | None = None

    @property
    def cancelled(self) -> bool:
        return self.message_id in self.assoc.cancelled

    @property
    def stop(self) -> bool:
        """Cancelled, or the requesting association is gone: start no further sub-operation."""
        return self.cancelled or self.requester_gone or self.assoc.ended.done()

    def done(self, ref: InstanceRef, outcome: str) -> None:
        """Count one finished sub-operation: 'success', 'warning' or anything else (failed)."""
        self.remaining -= 1
        if outcome == "success":
            self.completed += 1
        elif outcome == "warning":
            self.warning += 1
        else:
            self.failed += 1
            self.failed_uids.append(ref.sop_instance_uid)

    def counts(self, remaining: bool) -> dict[str, int]:
        # The counts are US: a retrieve of more than 65535 instances reports 65535.
        out = {
            "NumberOfCompletedSuboperations": min(self.completed, _US_MAX),
            "NumberOfFailedSuboperations": min(self.failed, _US_MAX),
            "NumberOfWarningSuboperations": min(self.warning, _US_MAX),
        }
        if remaining:
            out["NumberOfRemainingSuboperations"] = min(self.remaining, _US_MAX)
        return out

    async def report(self) -> None:
        """A pending response after a sub-operation, unless one went out very recently."""
        if self.remaining > 0 and time.monotonic() - self._last_pending >= PENDING_MIN_GAP:
            await self._pending()

    async def _pending(self) -> None:
        if self.requester_gone:
            return
        self._last_pending = time.monotonic()
        try:
            await self.assoc.respond(self.request, Status.PENDING, **self.counts(remaining=True))
        except AssociationError:
            self.requester_gone = True

    def start(self) -> None:
        self._keepalive = asyncio.get_running_loop().create_task(self._keep_alive())

    async def _keep_alive(self) -> None:
        while not self.requester_gone:
            wait = self._last_pending + PENDING_KEEPALIVE - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            if self.remaining > 0:
                await self._pending()
            else:
                self._last_pending = time.monotonic()

    async def close(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            try:
                await self._keepalive
            except asyncio.CancelledError:
                pass
            self._keepalive = None

    def final_status(self) -> int:
        if self.cancelled and self.remaining > 0:
            return Status.CANCEL
        if self.failed == 0 and self.warning == 0:
            return Status.SUCCESS
        if self.completed == 0 and self.warning == 0:
            return Status.OUT_OF_RESOURCES_SUBOPERATIONS  # every sub-operation failed
        return Status.WARNING_COERCION  # B000: sub-operations complete, failures or warnings

    async def finish(self) -> int:
        """The final response; returns its status (nothing is sent if the requestor left)."""
        await self.close()
        status = self.final_status()
        if self.requester_gone or self.assoc.ended.done():
            return status
        identifier = None
        extra: dict[str, Any] = self.counts(remaining=status == Status.CANCEL)
        if status != Status.SUCCESS:
            ts = self.assoc.contexts[self.request.context_id].transfer_syntax
            identifier, shown = encode_failed_list(self.failed_uids, ts)
            if shown < len(self.failed_uids):
                extra["ErrorComment"] = f"{len(self.failed_uids)} failed; the list shows {shown}"
        try:
            await self.assoc.respond(self.request, status, identifier, **extra)
        except AssociationError:
            self.requester_gone = True
        return status


_FAILED_LIST_TAG = (0x0008, 0x0058)
_EXPLICIT_MAX = 0xFFFE  # a UI value's largest even length with a 2-byte length field


def encode_failed_list(uids: list[str], transfer_syntax: str) -> tuple[bytes, int]:
    """An identifier holding only Failed SOP Instance UID List (0008,0058), encoded in
    `transfer_syntax`; returns it with the number of UIDs it holds.

    In an explicit VR syntax a UI value is at most 65534 bytes long (about 1000 UIDs), so a
    longer list is cut to what fits; implicit VR has no such limit.
    """
    implicit = transfer_syntax == IMPLICIT_LE
    kept = list(uids)
    value = "\\".join(kept).encode("ascii")
    if not implicit:
        while len(value) > _EXPLICIT_MAX:
            # Drop from the end; each UID is at most 64 characters plus the separator.
            excess = len(value) - _EXPLICIT_MAX
            drop = max(1, excess // 65)
            kept = kept[:-drop]
            value = "\\".join(kept).encode("ascii")
    if len(value) % 2:
        value += b"\0"
    group, element = _FAILED_LIST_TAG
    if implicit:
        data = struct.pack("<HHL", group, element, len(value)) + value
    elif transfer_syntax == EXPLICIT_BE:
        data = struct.pack(">HH2sH", group, element, b"UI", len(value)) + value
    else:
        data = struct.pack("<HH2sH", group, element, b"UI", len(value)) + value
        if transfer_syntax == DEFLATED:
            deflater = zlib.compressobj(wbits=-zlib.MAX_WBITS)
            data = deflater.compress(data) + deflater.flush()
            if len(data) % 2:
                data += b"\0"
    return data, len(kept)


# --- presentation contexts for the C-MOVE association ----------------------------------------


def plan_contexts(refs: list[InstanceRef]) -> list[tuple[list[ProposedContext], list[InstanceRef]]]:
    """Associations to open for these instances: (contexts to propose, instances to send).

    Per SOP class: a context for each stored transfer syntax on its own, so that the
    destination cannot choose another one, and a context with the uncompressed syntaxes.
    At most 128 contexts per association; more SOP classes than fit go on further ones.
    """
    stored: dict[str, list[str]] = {}
    for ref in refs:
        syntaxes = stored.setdefault(ref.sop_class_uid, [])
        if ref.transfer_syntax_uid not in syntaxes:
            syntaxes.append(ref.transfer_syntax_uid)
    groups: list[list[str]] = [[]]
    used = 0
    for sop_class, syntaxes in stored.items():
        needed = len(syntaxes) + 1
        if used + needed > MAX_CONTEXTS and groups[-1]:
            groups.append([])
            used = 0
        groups[-1].append(sop_class)
        used += needed
    plans = []
    for classes in groups:
        proposed = []
        for sop_class in classes:
            proposed += [ProposedContext(sop_class, [ts]) for ts in stored[sop_class]]
            proposed.append(ProposedContext(sop_class, list(UNCOMPRESSED)))
        wanted = set(classes)
        plans.append((proposed, [r for r in refs if r.sop_class_uid in wanted]))
    return plans


def _uid_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return uid if name == uid else name


def _no_context_reason(who: str, ref: InstanceRef, accepted: list[str], role: str = "") -> str:
    """Why an instance has no context to go on, e.g. "DEST accepted CT Image Storage only in
    Explicit VR Little Endian, not in its stored JPEG Baseline (1) (pacsd does not transcode)"."""
    sop, ts = _uid_name(ref.sop_class_uid), _uid_name(ref.transfer_syntax_uid)
    if accepted:
        return (f"{who} accepted {sop}{role} only in {', '.join(map(_uid_name, accepted))}, not "
                f"in its stored {ts} (pacsd does not transcode)")
    return f"{who} accepted no presentation context for {sop}{role}"


# --- the service --------------------------------------------------------------------------


class RetrieveSCP:
    def __init__(self, archive, settings) -> None:
        self.archive = archive
        self.settings = settings

    # -- shared steps --

    async def _identifier(self, assoc: Association, message: Message, model: str) -> RetrieveRequest:
        spool = message.dataset
        name = "C-MOVE-RQ" if message.command_field == CommandField.C_MOVE_RQ else "C-GET-RQ"
        if spool is None:
            raise IdentifierError(Status.CANNOT_UNDERSTAND, f"{name} without an identifier")
        if spool.error is not None:
            raise IdentifierError(Status.OUT_OF_RESOURCES,
                                  f"identifier not received: {spool.error.strerror or spool.error}")
        ts = assoc.contexts[message.context_id].transfer_syntax

        def work() -> RetrieveRequest:
            return parse_identifier(decode_identifier(spool.read(), ts), model)

        if spool.size > _DECODE_INLINE:
            return await asyncio.get_running_loop().run_in_executor(self.archive.executor, work)
        return work()

    async def _source(self, ref: InstanceRef) -> _Part | bytes:
        """What Association.send streams for this instance: its data set, from the blob."""
        path = self.archive.store.path(ref.blob_key)
        try:
            size = os.stat(path).st_size
        except OSError as exc:
            raise _NotSendable(f"blob {ref.blob_key} cannot be read: {exc.strerror or exc}") from None
        if size != ref.size:
            raise _NotSendable(f"blob {ref.blob_key} is {size} bytes, the index says {ref.size}")
        if ref.dataset_size % 2 == 0:
            return _Part(path, ref.dataset_offset)
        if ref.transfer_syntax_uid != DEFLATED:
            raise _NotSendable(f"data set of odd length {ref.dataset_size} in "
                               f"{_uid_name(ref.transfer_syntax_uid)}")
        # PS3.5 A.5: an odd deflated stream is sent with one trailing NUL.
        return await asyncio.get_running_loop().run_in_executor(
            self.archive.executor, _read_padded, path, ref.dataset_offset, ref.dataset_size)

    def _log_failed(self, op: str, assoc: Association, message: Message, ref: InstanceRef,
                    why: str) -> None:
        log.warning("retrieve.suboperation_failed", op=op, peer=assoc.protocol.peer_str,
                    calling_ae=assoc.calling_ae, message_id=message.command.get("MessageID"),
                    sop_instance_uid=ref.sop_instance_uid, error=why)

    async def _refuse(self, op: str, assoc: Association, message: Message, status: int,
                      comment: str) -> None:
        log.warning("retrieve.refused", op=op, peer=assoc.protocol.peer_str,
                    calling_ae=assoc.calling_ae, message_id=message.command.get("MessageID"),
                    status=describe(status), error=comment)
        await assoc.respond(message, status, ErrorComment=comment[:64])

    def _finished(self, op: str, assoc: Association, message: Message, progress: Progress,
                  status: int, started: float, **extra: Any) -> None:
        log.info("retrieve.finished", op=op, peer=assoc.protocol.peer_str,
                 calling_ae=assoc.calling_ae, message_id=message.command.get("MessageID"),
                 status=_describe_final(status), matched=progress.total, completed=progress.completed,
                 failed=progress.failed, warning=progress.warning, remaining=progress.remaining,
                 requester_gone=progress.requester_gone or None,
                 seconds=round(time.monotonic() - started, 3), **extra)

    # -- C-MOVE --

    async def handle_c_move(self, assoc: Association, message: Message) -> None:
        started = time.monotonic()
        command = message.command
        model = MODELS[assoc.contexts[message.context_id].abstract_syntax]
        destination = str(command.get("MoveDestination", "")).strip()
        peer = self.settings.peer(destination) if destination else None
        if peer is None:
            await self._refuse("move", assoc, message, Status.MOVE_DESTINATION_UNKNOWN,
                               f"Move Destination {destination!r} unknown")
            return
        try:
            request = await self._identifier(assoc, message, model)
        except IdentifierError as exc:
            await self._refuse("move", assoc, message, exc.status, exc.comment)
            return
        refs = await resolve(self.archive.engine, request)
        log.info("retrieve.started", op="move", peer=assoc.protocol.peer_str,
                 calling_ae=assoc.calling_ae, message_id=command.get("MessageID"),
                 level=request.level, matched=len(refs), destination=destination)
        progress = Progress(assoc, message, len(refs))
        if refs:
            progress.start()
            try:
                await self._move(assoc, message, peer, refs, progress)
            finally:
                await progress.close()
        status = await progress.finish()
        self._finished("move", assoc, message, progress, status, started, destination=destination)

    async def _move(self, assoc: Association, message: Message, peer, refs: list[InstanceRef],
                    progress: Progress) -> None:
        dicom = self.settings.dicom
        command = message.command
        fatal: str | None = None
        for proposed, batch in plan_contexts(refs):
            if progress.stop:
                return
            index = 0  # batch[:index] have their outcome
            established = False
            try:
                if fatal is not None:
                    raise _BatchFailed(fatal)
                async with associate(peer.host, peer.port, calling_ae=dicom.ae_title,
                                     called_ae=peer.ae_title, contexts=proposed, settings=dicom,
                                     spool_dir=self.settings.storage.spool_dir) as out:
                    established = True
                    offered: dict[str, list[str]] = {}
                    for cx in out.contexts.values():
                        offered.setdefault(cx.abstract_syntax, []).append(cx.transfer_syntax)
                    while index < len(batch):
                        if progress.stop:
                            return  # the association is released on the way out
                        ref = batch[index]
                        context = out.context_for(ref.sop_class_uid, ref.transfer_syntax_uid)
                        try:
                            if context is None:
                                raise _NotSendable(_no_context_reason(
                                    peer.ae_title, ref, offered.get(ref.sop_class_uid, [])))
                            source = await self._source(ref)
                        except _NotSendable as exc:
                            self._log_failed("move", assoc, message, ref, str(exc))
                            index += 1
                            progress.done(ref, "failure")
                            await progress.report()
                            continue
                        store = {
                            "CommandField": CommandField.C_STORE_RQ,
                            "Priority": command.get("Priority", Priority.MEDIUM),
                            "AffectedSOPClassUID": ref.sop_class_uid,
                            "AffectedSOPInstanceUID": ref.sop_instance_uid,
                            "MoveOriginatorApplicationEntityTitle": assoc.calling_ae,
                            "MoveOriginatorMessageID": command["MessageID"],
                        }
                        response = await out.request_one(context.context_id, store, source)
                        index += 1
                        status = response.command.get("Status", -1)
                        outcome = category(status)
                        if outcome not in ("success", "warning"):
                            comment = str(response.command.get("ErrorComment", "") or "").strip()
                            self._log_failed("move", assoc, message, ref,
                                             f"{peer.ae_title} answered {describe(status)}"
                                             + (f": {comment}" if comment else ""))
                        progress.done(ref, outcome)
                        await progress.report()
            except _BatchFailed as exc:
                self._fail_rest(assoc, message, batch, progress, str(exc), quiet=True)
            except AssociationRejected as exc:
                from pacsd.net.storescu import describe_reject

                fatal = f"{peer.ae_title}: {describe_reject(exc.reject)}"
                self._fail_rest(assoc, message, batch[index:], progress, fatal)
            except TimeoutError:
                if not established:
                    fatal = f"{peer.ae_title} at {peer.host}:{peer.port}: timed out"
                    self._fail_rest(assoc, message, batch[index:], progress, fatal)
                # else the A-RELEASE went unanswered: the sub-operations were all done (or
                # the move was cancelled and the rest stays remaining)
            except (AssociationError, OSError) as exc:
                why = f"{peer.ae_title} at {peer.host}:{peer.port}: {exc}"
                if not established:
                    fatal = why  # no association at all: do not try the next batches either
                self._fail_rest(assoc, message, batch[index:], progress, why)
            await progress.report()

    def _fail_rest(self, assoc: Association, message: Message, rest: list[InstanceRef],
                   progress: Progress, why: str, quiet: bool = False) -> None:
        if rest and not quiet:
            log.warning("retrieve.suboperations_failed", op="move", peer=assoc.protocol.peer_str,
                        calling_ae=assoc.calling_ae, message_id=message.command.get("MessageID"),
                        count=len(rest), error=why)
        for ref in rest:
            progress.done(ref, "failure")

    # -- C-GET --

    async def handle_c_get(self, assoc: Association, message: Message) -> None:
        started = time.monotonic()
        model = MODELS[assoc.contexts[message.context_id].abstract_syntax]
        try:
            request = await self._identifier(assoc, message, model)
        except IdentifierError as exc:
            await self._refuse("get", assoc, message, exc.status, exc.comment)
            return
        refs = await resolve(self.archive.engine, request)
        log.info("retrieve.started", op="get", peer=assoc.protocol.peer_str,
                 calling_ae=assoc.calling_ae, message_id=message.command.get("MessageID"),
                 level=request.level, matched=len(refs))
        progress = Progress(assoc, message, len(refs))
        if refs:
            progress.start()
            try:
                await self._get(assoc, message, refs, progress)
            finally:
                await progress.close()
        status = await progress.finish()
        self._finished("get", assoc, message, progress, status, started)

    async def _get(self, assoc: Association, message: Message, refs: list[InstanceRef],
                   progress: Progress) -> None:
        # Contexts on which pacsd may send C-STORE-RQs: the requestor gave it the SCU role.
        usable: dict[tuple[str, str], int] = {}
        offered: dict[str, list[str]] = {}
        for cx in assoc.contexts.values():
            if cx.as_scu:
                usable.setdefault((cx.abstract_syntax, cx.transfer_syntax), cx.context_id)
                offered.setdefault(cx.abstract_syntax, []).append(cx.transfer_syntax)
        who = assoc.calling_ae or "the requestor"
        for ref in refs:
            if progress.stop:
                return
            context_id = usable.get((ref.sop_class_uid, ref.transfer_syntax_uid))
            try:
                if context_id is None:
                    raise _NotSendable(_no_context_reason(
                        who, ref, offered.get(ref.sop_class_uid, []), " with pacsd as SCU"))
                source = await self._source(ref)
            except _NotSendable as exc:
                self._log_failed("get", assoc, message, ref, str(exc))
                progress.done(ref, "failure")
                await progress.report()
                continue
            store = {
                "CommandField": CommandField.C_STORE_RQ,
                "Priority": message.command.get("Priority", Priority.MEDIUM),
                "AffectedSOPClassUID": ref.sop_class_uid,
                "AffectedSOPInstanceUID": ref.sop_instance_uid,
            }
            try:
                response = await assoc.request_one(context_id, store, source)
            except (AssociationError, OSError) as exc:
                # The association ended, timed out, or the blob failed while part of the
                # C-STORE-RQ was out: nothing more can go on it (an abort if it is still up).
                log.warning("retrieve.get_interrupted", peer=assoc.protocol.peer_str,
                            calling_ae=assoc.calling_ae, message_id=message.command.get("MessageID"),
                            sop_instance_uid=ref.sop_instance_uid, error=str(exc))
                progress.requester_gone = True
                if assoc.protocol.state in (State.STA6, State.STA8):
                    assoc.abort()
                return
            status = response.command.get("Status", -1)
            outcome = category(status)
            if outcome not in ("success", "warning"):
                comment = str(response.command.get("ErrorComment", "") or "").strip()
                self._log_failed("get", assoc, message, ref, f"{who} answered {describe(status)}"
                                 + (f": {comment}" if comment else ""))
            progress.done(ref, outcome)
            await progress.report()


class _BatchFailed(Exception):
    pass


def _read_padded(path: Path, offset: int, size: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    except OSError as exc:
        raise _NotSendable(f"blob cannot be read: {exc.strerror or exc}") from None
    if len(data) != size:
        raise _NotSendable(f"{path.name} shrank while being read")
    return data + b"\0"


def register(registry: ServiceRegistry, archive, settings) -> None:
    scp = RetrieveSCP(archive, settings)
    syntaxes = settings.dicom.transfer_syntaxes
    for sop_class in (PATIENT_ROOT_MOVE, STUDY_ROOT_MOVE):
        registry.add(sop_class, syntaxes, CommandField.C_MOVE_RQ, scp.handle_c_move)
    for sop_class in (PATIENT_ROOT_GET, STUDY_ROOT_GET):
        registry.add(sop_class, syntaxes, CommandField.C_GET_RQ, scp.handle_c_get)
    # C-GET: pacsd agrees to either role on the storage classes, so a requestor that asks
    # to be the Storage SCP gets pacsd as SCU on those contexts.
    for sop_class in storage_sop_classes(settings.storage.extra_sop_classes):
        registry.roles[sop_class] = (True, True)
