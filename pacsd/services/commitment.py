"""Storage Commitment Push Model SOP Class as SCP (PS3.4 Annex J.3).

A modality asks pacsd to take responsibility for instances it sent (N-ACTION, Action Type 1:
Transaction UID and a Referenced SOP Sequence); pacsd answers at once whether it took the
request, checks the instances afterwards and reports the outcome with an N-EVENT-REPORT.

The order of things, which is what makes the answer trustworthy:

1. The N-ACTION-RQ is validated (statuses below). The transaction is written to the index
   (`commitment_transactions`, state "pending") and committed BEFORE the N-ACTION-RSP 0000
   goes out, so a success response always means the request survives a crash.
2. After the response, each referenced instance is checked: its index row exists (else
   Failure Reason 0112 no such object instance), the requested SOP class is the stored one
   (else 0119 class/instance conflict), the blob exists with the size and SHA-256 the index
   recorded (else 0110 processing failure; hashing runs in the executor). An instance that
   pacsd does not hold and whose SOP class it does not store at all gets 0122 (referenced SOP
   class not supported) instead of 0112 (PS3.3 C.14.1.1). The outcome is saved in the row.
3. The N-EVENT-REPORT-RQ (Event Type 1 all committed, 2 failures exist; PS3.4 J.3.3.1.2)
   goes on the requesting association while it is still established (pacsd is the acceptor
   there and sends it as the SCP of the SOP class); otherwise on a new association to the
   requester's [[peers]] entry (found by the N-ACTION's calling AE title), on which pacsd
   proposes the SCP role through SCP/SCU Role Selection (PS3.4 J.3.3.1.3 note: the SCU
   accepts an association where the Storage Commitment SCP proposes the SCP role).
4. A report that could not be delivered (no peer entry, refused or broken association, no
   or a failure N-EVENT-REPORT-RSP) is retried after `commitment.retry_seconds`, doubled per
   attempt up to `max_retry_seconds`, by a background task that reads the pending rows from
   the index, so it survives restarts (at start every pending row is tried at once). A row
   still undelivered `expire_seconds` after the request becomes "expired" (logged).
   Each attempt first claims its row (a conditional update on the attempt count and due
   time), so a stale read or a second pacsd on the same index cannot start a second one.
   Delivery is at least once: a report whose response got lost is sent again, and the
   requester matches it by its Transaction UID (PS3.4 J.3.2.1.2).

N-ACTION failure statuses (PS3.7 C.5, among those PS3.7 10.1.4.1.10 allows for N-ACTION):

- 0112 No such SOP Instance: the Requested SOP Instance UID is not the well-known one
  (PS3.4 J.3.2.1.2 requires 1.2.840.10008.1.20.1.1).
- 0123 No such action: Action Type ID other than 1 (PS3.4 Table J.3-1 defines only 1).
- 0115 Invalid argument value: the Action Information is absent, undecodable, or lacks or
  malforms Transaction UID / Referenced SOP Sequence / an item's UIDs. N-ACTION carries an
  argument, not an attribute list, so the attribute-level codes of N-CREATE/N-SET (0120
  missing attribute, 0106 invalid attribute value) are not N-ACTION statuses.
- 0110 Processing failure: the Transaction UID is already pending here ("transaction UID
  already pending"). PS3.3 C.14.1.1 names this case (0131 duplicate transaction UID) only as
  a Failure Reason inside a report; as a DIMSE status only the general failure fits.
  A Transaction UID whose earlier transaction was already reported or expired is taken as a
  new transaction (logged), since its old one is finished.

Instances named by a pending transaction must not be deleted: `has_pending_commitment`
(pacsd/index/commitments.py, with the rest of the transactions' reads and writes).
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
import structlog
from pydicom import Dataset

from pacsd.dimse.assembler import Message
from pacsd.dimse.command import CommandField
from pacsd.dimse.identifier import IdentifierError, decode_identifier, encode_identifier
from pacsd.dimse.status import Status, category, describe
from pacsd.dul.machine import State
from pacsd.dul.negotiation import ProposedContext
from pacsd.index.commitments import (
    DELIVERED,
    EXPIRED,
    Transaction,
    claim,
    due,
    next_due,
    record,
    resume,
    update,
)
from pacsd.index.commitments import now as _now
from pacsd.index.schema import instances
from pacsd.net.association import Association, AssociationError, AssociationRejected
from pacsd.net.commitscu import (  # noqa: F401 (re-exported: the SOP class's constants)
    ACTION_REQUEST,
    EVENT_FAILURES,
    EVENT_SUCCESS,
    FAILURE_REASONS,
    SOP_CLASS,
    SOP_INSTANCE,
    reference,
)
from pacsd.net.requestor import associate
from pacsd.services.registry import ServiceRegistry
from pacsd.services.storage import storage_sop_classes
from pacsd.uid import uid_problem

log = structlog.get_logger("pacsd.commitment")

# Reports being delivered at once by the retry task.
MAX_CONCURRENT = 8
# Longest sleep of the retry task: rows written by another process are seen then.
IDLE_POLL = 30.0
# Instances looked up per SELECT (SQLite's bound-parameter limit is far above).
_LOOKUP_CHUNK = 500
# Action Information larger than this is decoded in a worker thread.
_DECODE_INLINE = 64 * 1024


class ActionError(Exception):
    """An N-ACTION-RQ pacsd refuses; `status` and `comment` go into the N-ACTION-RSP."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status, self.comment = status, comment


class _Superseded(Exception):
    """The row changed under this attempt (finished or taken by another): leave it alone."""


class Undelivered(Exception):
    """The report did not reach the requester this time (the message says why)."""


# --- the request ----------------------------------------------------------------------


def parse_action(ds: Dataset) -> tuple[str, list[tuple[str, str]]]:
    """Transaction UID and [(SOP Class UID, SOP Instance UID)] of a Storage Commitment
    Request (PS3.4 Table J.3-1), or ActionError(0115) saying what is wrong."""
    transaction = ds.get("TransactionUID")
    transaction = str(transaction) if transaction is not None else None
    if problem := uid_problem("Transaction UID (0008,1195)", transaction):
        raise ActionError(Status.INVALID_ARGUMENT_VALUE, problem)
    sequence = ds.get("ReferencedSOPSequence")
    if not sequence:
        raise ActionError(Status.INVALID_ARGUMENT_VALUE, "Referenced SOP Sequence (0008,1199) missing or empty")
    refs: list[tuple[str, str]] = []
    for number, item in enumerate(sequence, 1):
        sop_class = item.get("ReferencedSOPClassUID")
        sop_instance = item.get("ReferencedSOPInstanceUID")
        for name, value in (("Referenced SOP Class UID", sop_class),
                            ("Referenced SOP Instance UID", sop_instance)):
            if problem := uid_problem(name, str(value) if value is not None else None):
                raise ActionError(Status.INVALID_ARGUMENT_VALUE, f"item {number}: {problem}")
        refs.append((str(sop_class), str(sop_instance)))
    return transaction, refs


# --- the check ----------------------------------------------------------------------------


def _blob_problem(store, key: str, size: int, sha256: str) -> str | None:
    """Why the stored blob cannot be committed to, or None (runs in the executor)."""
    try:
        actual = store.size(key)
        if actual != size:
            return f"blob is {actual} bytes, the index says {size}"
        digest = store.sha256(key)
    except FileNotFoundError:
        return "blob missing"
    except (OSError, ValueError) as exc:
        return f"blob unreadable: {exc}"
    if digest != sha256:
        return f"blob SHA-256 {digest[:16]}... differs from the index's {sha256[:16]}..."
    return None


async def check(archive, refs: list[tuple[str, str]], supported: set[str],
                transaction_uid: str = "") -> dict[str, list]:
    """{"success": [[class, instance]], "failed": [[class, instance, reason]]} for `refs`."""
    stored: dict[str, Any] = {}
    uids = sorted({uid for _, uid in refs})
    async with archive.engine.connect() as conn:
        for start in range(0, len(uids), _LOOKUP_CHUNK):
            rows = await conn.execute(
                sa.select(instances.c.sop_instance_uid, instances.c.sop_class_uid, instances.c.blob_key,
                          instances.c.size, instances.c.sha256)
                .where(instances.c.sop_instance_uid.in_(uids[start:start + _LOOKUP_CHUNK])))
            stored.update((row.sop_instance_uid, row) for row in rows)
    loop = asyncio.get_running_loop()
    verified: dict[str, str | None] = {}
    success: list[list[str]] = []
    failed: list[list[Any]] = []
    for sop_class, uid in refs:
        row = stored.get(uid)
        why = None
        if row is None:
            reason = Status.NO_SUCH_OBJECT_INSTANCE if sop_class in supported else Status.REFUSED_SOP_CLASS_NOT_SUPPORTED
        elif row.sop_class_uid != sop_class:
            reason = Status.CLASS_INSTANCE_CONFLICT
            why = f"stored as {row.sop_class_uid}"
        else:
            if uid not in verified:
                verified[uid] = await loop.run_in_executor(
                    archive.executor, _blob_problem, archive.store, row.blob_key, row.size, row.sha256)
            why = verified[uid]
            reason = Status.PROCESSING_FAILURE if why else None
        if reason is None:
            success.append([sop_class, uid])
        else:
            failed.append([sop_class, uid, reason])
            log.warning("commitment.instance_failed", transaction_uid=transaction_uid,
                        sop_instance_uid=uid, sop_class_uid=sop_class,
                        reason=f"0x{reason:04X} ({FAILURE_REASONS[reason]})", detail=why)
    return {"success": success, "failed": failed}


def build_report(transaction_uid: str, result: dict[str, list], retrieve_ae: str) -> tuple[int, Dataset]:
    """Event Type ID and the Event Information of the report (PS3.4 Table J.3-2)."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    if result["success"]:
        ds.ReferencedSOPSequence = [reference(c, uid, RetrieveAETitle=retrieve_ae)
                                    for c, uid in result["success"]]
    if result["failed"]:
        ds.FailedSOPSequence = [reference(c, uid, FailureReason=reason)
                                for c, uid, reason in result["failed"]]
    return (EVENT_FAILURES if result["failed"] else EVENT_SUCCESS), ds


async def send_report(assoc: Association, context_id: int, event_type: int, ds: Dataset) -> int:
    """One N-EVENT-REPORT-RQ on `assoc`; returns the N-EVENT-REPORT-RSP status."""
    data = encode_identifier(ds, assoc.contexts[context_id].transfer_syntax)
    command = {
        "CommandField": CommandField.N_EVENT_REPORT_RQ,
        "AffectedSOPClassUID": SOP_CLASS,
        "AffectedSOPInstanceUID": SOP_INSTANCE,
        "EventTypeID": event_type,
    }
    response = await assoc.request_one(context_id, command, data)
    response.discard()
    return response.command.get("Status", -1)


# --- the service ----------------------------------------------------------------------------


class CommitmentSCP:
    def __init__(self, archive, settings) -> None:
        self.archive = archive
        self.settings = settings
        self.config = settings.commitment
        self.supported = set(storage_sop_classes(settings.storage.extra_sop_classes))
        self._busy: set[str] = set()  # Transaction UIDs being worked on in this process
        self._tasks: set[asyncio.Task] = set()
        self._runner: asyncio.Task | None = None
        self._wake = asyncio.Event()
        # How long one attempt may hold its row: connecting, negotiating, the report's
        # response and the release, with room to spare (hashing the instances comes first).
        dicom = settings.dicom
        self.lease = 10.0 + dicom.artim_timeout * 2 + dicom.dimse_timeout + 60.0

    # -- N-ACTION --

    async def handle_n_action(self, assoc: Association, message: Message) -> None:
        command = message.command
        try:
            if command["RequestedSOPInstanceUID"] != SOP_INSTANCE:
                raise ActionError(Status.NO_SUCH_OBJECT_INSTANCE,
                                  f"Requested SOP Instance UID is not {SOP_INSTANCE}")
            if command["ActionTypeID"] != ACTION_REQUEST:
                raise ActionError(Status.NO_SUCH_ACTION, f"Action Type ID {command['ActionTypeID']} "
                                                  "(only 1, request storage commitment)")
            transaction_uid, refs = parse_action(await self._action_information(assoc, message))
        except ActionError as exc:
            await self._refuse(assoc, message, exc.status, exc.comment)
            return
        tx = await record(self.archive.engine, transaction_uid, assoc.calling_ae, refs, self.lease)
        if tx is None:
            await self._refuse(assoc, message, Status.PROCESSING_FAILURE, "transaction UID already pending",
                               transaction_uid=transaction_uid)
            return
        log.info("commitment.requested", peer=assoc.protocol.peer_str, calling_ae=assoc.calling_ae,
                 message_id=command.get("MessageID"), transaction_uid=transaction_uid,
                 instances=len(refs))
        self._busy.add(transaction_uid)
        try:
            await assoc.respond(message, 0x0000, ActionTypeID=ACTION_REQUEST)
        except AssociationError:
            pass  # recorded all the same: the report goes out on a new association
        finally:
            self._spawn(self._deliver(tx, assoc, message.context_id))

    async def _action_information(self, assoc: Association, message: Message) -> Dataset:
        spool = message.dataset
        if spool is None:
            raise ActionError(Status.INVALID_ARGUMENT_VALUE, "N-ACTION-RQ without Action Information")
        if spool.error is not None:
            raise ActionError(Status.PROCESSING_FAILURE, "Action Information not received: "
                                                  f"{spool.error.strerror or spool.error}")
        ts = assoc.contexts[message.context_id].transfer_syntax

        def work() -> Dataset:
            return decode_identifier(spool.read(), ts)

        try:
            if spool.size > _DECODE_INLINE:
                return await asyncio.get_running_loop().run_in_executor(self.archive.executor, work)
            return work()
        except IdentifierError as exc:
            raise ActionError(Status.INVALID_ARGUMENT_VALUE, exc.comment) from None

    async def _refuse(self, assoc: Association, message: Message, status: int, comment: str,
                      **extra: Any) -> None:
        log.warning("commitment.refused", peer=assoc.protocol.peer_str, calling_ae=assoc.calling_ae,
                    message_id=message.command.get("MessageID"), status=f"0x{status:04X}",
                    error=comment, **extra)
        await assoc.respond(message, status, ErrorComment=comment[:64])

    # -- after the response --

    async def _deliver(self, tx: Transaction, assoc: Association | None = None,
                       context_id: int | None = None) -> None:
        """Check the instances, then report: first on the requesting association if it is
        still there (`assoc`), on retries (no `assoc`) on a new one, waking the retry task after."""
        try:
            await self._ensure_result(tx)
            await self._attempt(tx, assoc, context_id)
        except _Superseded:
            log.info("commitment.superseded", transaction_uid=tx.transaction_uid)
        except Exception:
            log.exception("commitment.internal_error", transaction_uid=tx.transaction_uid)
        finally:
            self._busy.discard(tx.transaction_uid)
            if assoc is None:
                self._wake.set()

    async def _ensure_result(self, tx: Transaction) -> None:
        if tx.result is not None:
            return
        result = await check(self.archive, tx.requested, self.supported, tx.transaction_uid)
        if not await update(self.archive.engine, tx, result=json.dumps(result)):
            raise _Superseded()
        tx.result = result
        log.info("commitment.checked", transaction_uid=tx.transaction_uid, calling_ae=tx.calling_ae,
                 committed=len(result["success"]), failed=len(result["failed"]))

    async def _attempt(self, tx: Transaction, assoc: Association | None = None,
                       context_id: int | None = None) -> None:
        """One delivery attempt; the row ends delivered, or pending with its next attempt set."""
        now = _now()
        if now >= tx.created_at + timedelta(seconds=self.config.expire_seconds):
            if await update(self.archive.engine, tx, state=EXPIRED):
                log.error("commitment.expired", transaction_uid=tx.transaction_uid,
                          calling_ae=tx.calling_ae, attempts=tx.attempts,
                          created_at=tx.created_at.isoformat())
            return
        assert tx.result is not None
        event_type, ds = build_report(tx.transaction_uid, tx.result, self.settings.dicom.ae_title)
        attempt = tx.attempts + 1
        fields = dict(transaction_uid=tx.transaction_uid, calling_ae=tx.calling_ae,
                      event_type=event_type, attempt=attempt)
        errors: list[str] = []
        via = None
        if assoc is not None and context_id is not None:
            try:
                via = await self._on_requesting(assoc, context_id, event_type, ds, tx.transaction_uid)
            except Undelivered as exc:
                errors.append(f"requesting association: {exc}")
        if via is None:
            try:
                via = await self._on_new(tx.calling_ae, event_type, ds)
            except Undelivered as exc:
                errors.append(str(exc))
        if via is not None:
            await update(self.archive.engine, tx, state=DELIVERED, attempts=attempt, last_error="")
            tx.attempts = attempt
            log.info("commitment.report_sent", via=via, committed=len(tx.result["success"]),
                     failed=len(tx.result["failed"]), **fields)
            return
        delay = min(self.config.retry_seconds * 2 ** (attempt - 1), self.config.max_retry_seconds)
        failed_at = _now()
        next_at = min(failed_at + timedelta(seconds=delay),
                      tx.created_at + timedelta(seconds=self.config.expire_seconds))
        error = "; ".join(errors)
        await update(self.archive.engine, tx, attempts=attempt, next_attempt_at=next_at,
                      last_error=error[:2000])
        tx.attempts = attempt
        log.warning("commitment.report_failed", error=error,
                    retry_in=round(max((next_at - failed_at).total_seconds(), 0), 3), **fields)
        self._wake.set()

    async def _on_requesting(self, assoc: Association, context_id: int, event_type: int,
                             ds: Dataset, transaction_uid: str) -> str | None:
        """Report on the association the N-ACTION came on, if it is still established."""
        context = assoc.contexts.get(context_id)
        if assoc.protocol.state is not State.STA6 or context is None or not context.as_scp:
            return None  # released or going: a new association
        try:
            status = await send_report(assoc, context_id, event_type, ds)
        except AssociationError as exc:
            log.info("commitment.requesting_association_lost", transaction_uid=transaction_uid,
                     peer=assoc.protocol.peer_str, error=str(exc))
            return None  # it ended meanwhile: try a new association at once
        if category(status) in ("success", "warning"):
            return "requesting association"
        raise Undelivered(f"N-EVENT-REPORT-RSP {describe(status)}")

    async def _on_new(self, calling_ae: str, event_type: int, ds: Dataset) -> str:
        """Report on a new association to the requester's [[peers]] entry, as SCP."""
        peer = self.settings.peer(calling_ae) if calling_ae else None
        if peer is None:
            raise Undelivered(f"no [[peers]] entry for AE title {calling_ae!r}")
        where = f"{peer.ae_title} at {peer.host}:{peer.port}"
        dicom = self.settings.dicom
        contexts = [ProposedContext(SOP_CLASS, list(dicom.transfer_syntaxes), roles=(False, True))]
        status: int | None = None
        try:
            async with associate(peer.host, peer.port, calling_ae=dicom.ae_title,
                                 called_ae=peer.ae_title, contexts=contexts, settings=dicom,
                                 spool_dir=self.settings.storage.spool_dir,
                                 connect_timeout=min(dicom.artim_timeout, 10.0)) as out:
                context = out.context_for(SOP_CLASS)
                if context is None:
                    raise Undelivered(f"{where} did not accept the Storage Commitment Push Model")
                if not context.as_scp:
                    # It accepted the context but not pacsd as SCP (no role selection): the
                    # report is its only use on this association, so send it all the same.
                    log.info("commitment.no_scp_role", peer=where)
                status = await send_report(out, context.context_id, event_type, ds)
        except AssociationRejected as exc:
            from pacsd.net.storescu import describe_reject

            raise Undelivered(f"{where}: {describe_reject(exc.reject)}") from None
        except (AssociationError, OSError, asyncio.TimeoutError) as exc:
            if status is None:
                raise Undelivered(f"{where}: {exc or type(exc).__name__}") from None
            # The report was answered; only the release went wrong.
        if category(status) in ("success", "warning"):
            return f"new association to {where}"
        raise Undelivered(f"{where} answered N-EVENT-REPORT-RSP {describe(status)}")

    # -- retries --

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run(self) -> None:
        """Deliver due reports until cancelled."""
        engine = self.archive.engine
        try:
            resumed = await resume(engine)
            if resumed:
                log.info("commitment.resuming", pending=resumed)
        except Exception:
            log.exception("commitment.scan_failed")
        while True:
            try:
                self._wake.clear()
                running = len(self._busy)
                rows = await due(engine, _now(), MAX_CONCURRENT + running)
                for tx in rows:
                    if tx.transaction_uid in self._busy or running >= MAX_CONCURRENT:
                        continue
                    self._busy.add(tx.transaction_uid)
                    if not await claim(engine, tx, self.lease):
                        self._busy.discard(tx.transaction_uid)  # changed since read
                        continue
                    running += 1
                    self._spawn(self._deliver(tx))
                wait = IDLE_POLL
                upcoming = await next_due(engine)
                if upcoming is not None:
                    wait = min(max((upcoming - _now()).total_seconds(), 0.05), IDLE_POLL)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("commitment.scan_failed")
                wait = min(self.config.retry_seconds, IDLE_POLL)
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except asyncio.TimeoutError:
                pass

    async def start(self) -> None:
        self._runner = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop delivering; what is still pending stays in the index for the next start."""
        tasks = list(self._tasks) + ([self._runner] if self._runner is not None else [])
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("commitment.task_failed")
        self._runner = None


def register(registry: ServiceRegistry, archive, settings) -> CommitmentSCP:
    """Serve N-ACTION of the Push Model; `archive.commitment` is the service (serve()
    starts and stops its delivery task)."""
    scp = CommitmentSCP(archive, settings)
    registry.add(SOP_CLASS, settings.dicom.transfer_syntaxes, CommandField.N_ACTION_RQ, scp.handle_n_action)
    # Role selection (PS3.4 J.2.1 makes it mandatory): a requester may be the SCU; pacsd
    # serves as SCP only, so a proposal to be the SCP of this class is not taken.
    registry.roles[SOP_CLASS] = (True, False)
    archive.commitment = scp
    return scp
