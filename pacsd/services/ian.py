"""Instance Availability Notification (PS3.4 Annex R, PS3.3 C.4.23; IHE RAD-49), both roles.

As SCU, pacsd tells every [[peers]] entry with `ian = true` (a RIS, another archive) that a
study is available once the study has had no new instance for `[ian] study_quiet_seconds`:
an N-CREATE-RQ of the IAN SOP class whose data set lists every instance of the study the
index holds, per series, each ONLINE and retrievable from pacsd's AE title.

The owed notifications live in the `ian_outbox` table, one row per (study, peer):

- The row is written by the index writer, inside the transaction that commits the instances
  (`OutboxRecorder`, one executemany per group): state "pending", due `study_quiet_seconds`
  after the group. A crash right after a commit therefore cannot lose the IAN that commit
  owes, and nothing of the outbox runs on the C-STORE path outside that one statement.
  A later instance of the study puts the row back to "pending" with a new due time (upsert),
  so the peer later gets an updated IAN listing old and new instances; a row that is still
  pending keeps its back-off (it is the peer's, not the study's).
- `IanSender` (one task) sends due rows, one association per peer and pass, several peers at
  once. Status 0000 (or a warning) makes the row "delivered". A failure status, a refused or
  broken association makes it wait `retry_seconds`, doubled per failed attempt up to
  `max_retry_seconds`; a row still undelivered `expire_seconds` after it fell due becomes
  "expired" (logged). Rows persist, so pending ones are picked up again after a restart.
- The due time doubles as the row's generation: the sender marks a row delivered (or
  expired) only if its due time is still the one it read, so an instance arriving while an
  IAN is on the wire leaves the row pending and the updated IAN follows.

As SCP, pacsd accepts IANs (chains of archives), checks that a Study Instance UID is there,
logs what was announced (event ian.received) and answers 0000.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable

import sqlalchemy as sa
import structlog
from pydicom import Dataset

from pacsd.dimse.assembler import Message
from pacsd.dimse.command import CommandField
from pacsd.dimse.identifier import IdentifierError, decode_identifier, encode_identifier
from pacsd.dimse.status import Status, category, describe
from pacsd.dul.negotiation import ProposedContext
from pacsd.index.schema import ian_outbox, instances, series, studies
from pacsd.net.association import Association, AssociationError, AssociationRejected
from pacsd.net.requestor import UNCOMPRESSED, associate
from pacsd.services.registry import ServiceRegistry
from pacsd.uid import is_valid_uid, uid_problem

log = structlog.get_logger("pacsd.ian")

IAN_SOP_CLASS = "1.2.840.10008.5.1.4.33"

PENDING, DELIVERED, EXPIRED = "pending", "delivered", "expired"

# Rows sent per pass (all peers together); a full batch starts the next pass at once.
BATCH = 100
# Longest sleep between passes with nothing due: rows another process wrote are seen then.
IDLE_POLL = 30.0
# Received IANs larger than this are decoded in a worker thread.
_DECODE_INLINE = 64 * 1024


def ian_peers(settings) -> list:
    return [peer for peer in settings.peers if peer.ian]


def new_uid() -> str:
    """A fresh UID for one notification (PS3.5 B.2: 2.25 + a UUID as a decimal integer)."""
    return f"2.25.{uuid.uuid4().int}"


def _utc(value: datetime) -> datetime:
    """SQLite gives back naive datetimes; every time pacsd stores is UTC."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


# --- the outbox rows, written in the index writer's transaction ------------------------------


class OutboxRecorder:
    """The index writer's in-transaction hook: studies that got instances owe an IAN to each
    IAN peer, due once the study has been quiet for `quiet` seconds."""

    def __init__(self, peer_aes: Iterable[str], quiet: float) -> None:
        self.peer_aes = list(peer_aes)
        self.quiet = timedelta(seconds=quiet)

    def __call__(self, conn: sa.Connection, study_uids: set[str], now: datetime) -> None:
        due = now + self.quiet
        rows = [
            {"study_instance_uid": uid, "peer_ae": peer, "state": PENDING, "due_at": due,
             "attempts": 0, "next_attempt_at": due, "last_error": "", "created_at": now,
             "updated_at": now}
            for uid in sorted(study_uids) for peer in self.peer_aes
        ]
        if rows:
            upsert_outbox(conn, rows)


def _upsert_values(excluded) -> dict[str, Any]:
    """What a new instance does to an existing row: pending again, due after a new quiet period.

    A row that is still pending keeps its attempts, back-off and last error: they describe
    the peer, and a study that keeps growing must not make pacsd hammer an unreachable peer.
    A delivered or expired row starts over.
    """
    t = ian_outbox.c
    still_pending = t.state == PENDING
    return {
        "state": excluded.state,
        "due_at": excluded.due_at,
        "updated_at": excluded.updated_at,
        "next_attempt_at": sa.case(
            (sa.and_(still_pending, t.next_attempt_at > excluded.next_attempt_at), t.next_attempt_at),
            else_=excluded.next_attempt_at),
        "attempts": sa.case((still_pending, t.attempts), else_=0),
        "last_error": sa.case((still_pending, t.last_error), else_=""),
    }


_UPSERTS: dict[str, Any] = {}


def upsert_outbox(conn: sa.Connection, rows: list[dict[str, Any]]) -> None:
    """Insert the rows, or make the existing (study, peer) rows pending again (_upsert_values)."""
    dialect = conn.dialect.name
    if dialect in ("sqlite", "postgresql"):
        stmt = _UPSERTS.get(dialect)
        if stmt is None:
            # Built once: constructing it costs ten times what executing it does.
            if dialect == "sqlite":
                from sqlalchemy.dialects.sqlite import insert
            else:
                from sqlalchemy.dialects.postgresql import insert
            stmt = insert(ian_outbox)
            stmt = _UPSERTS[dialect] = stmt.on_conflict_do_update(
                index_elements=[ian_outbox.c.study_instance_uid, ian_outbox.c.peer_ae],
                set_=_upsert_values(stmt.excluded))
        conn.execute(stmt, rows)
        return
    # Any other database: the same rule, row by row.
    for row in rows:
        t = ian_outbox.c
        old = conn.execute(sa.select(t.pk, t.state, t.attempts, t.next_attempt_at, t.last_error)
                           .where(t.study_instance_uid == row["study_instance_uid"],
                                  t.peer_ae == row["peer_ae"])).first()
        if old is None:
            conn.execute(ian_outbox.insert().values(row))
            continue
        values = {name: row[name] for name in ("state", "due_at", "updated_at", "next_attempt_at",
                                                "attempts", "last_error")}
        if old.state == PENDING:
            values.update(attempts=old.attempts, last_error=old.last_error,
                          next_attempt_at=max(_utc(old.next_attempt_at), row["next_attempt_at"]))
        conn.execute(ian_outbox.update().where(t.pk == old.pk).values(values))


def retry_delay(attempts: int, retry_seconds: float, max_retry_seconds: float) -> float:
    """Seconds before the next try after `attempts` failed ones: retry_seconds, doubled per
    further failure, at most max_retry_seconds."""
    return min(retry_seconds * 2 ** min(max(attempts - 1, 0), 40), max_retry_seconds)


# --- the notification's data set -----------------------------------------------------------


@dataclass
class StudyContent:
    study_instance_uid: str
    # series UID -> [(SOP Class UID, SOP Instance UID)], in index order
    series: dict[str, list[tuple[str, str]]]
    # [(SOP Class UID, SOP Instance UID)] of the performed procedure steps the series name
    pps: list[tuple[str, str]]

    @property
    def instance_count(self) -> int:
        return sum(len(refs) for refs in self.series.values())


def pps_references(attrs_text: str) -> list[tuple[str, str]]:
    """Referenced Performed Procedure Step Sequence (0008,1111) items of a series' DICOM JSON."""
    try:
        entry = json.loads(attrs_text).get("00081111") or {}
    except (ValueError, AttributeError):
        return []
    out = []
    for item in entry.get("Value") or []:
        if not isinstance(item, dict):
            continue
        values = [((item.get(tag) or {}).get("Value") or [""])[0] for tag in ("00081150", "00081155")]
        if all(is_valid_uid(v) for v in values):
            out.append((values[0], values[1]))
    return out


async def study_content(engine, study_uid: str) -> StudyContent | None:
    """Every instance of the study the index holds, by series; None if it holds none."""
    async with engine.connect() as conn:
        series_rows = (await conn.execute(
            sa.select(series.c.series_instance_uid, series.c.attrs)
            .select_from(series.join(studies, series.c.study_pk == studies.c.pk))
            .where(studies.c.study_instance_uid == study_uid)
            .order_by(series.c.series_number, series.c.pk))).all()
        instance_rows = (await conn.execute(
            sa.select(series.c.series_instance_uid, instances.c.sop_class_uid,
                      instances.c.sop_instance_uid)
            .select_from(instances.join(series, instances.c.series_pk == series.c.pk)
                         .join(studies, series.c.study_pk == studies.c.pk))
            .where(studies.c.study_instance_uid == study_uid)
            .order_by(series.c.pk, instances.c.instance_number, instances.c.pk))).all()
    if not instance_rows:
        return None
    by_series: dict[str, list[tuple[str, str]]] = {row.series_instance_uid: [] for row in series_rows}
    for row in instance_rows:
        by_series.setdefault(row.series_instance_uid, []).append((row.sop_class_uid, row.sop_instance_uid))
    pps: list[tuple[str, str]] = []
    for row in series_rows:
        for ref in pps_references(row.attrs):
            if ref not in pps:
                pps.append(ref)
    return StudyContent(study_uid, {uid: refs for uid, refs in by_series.items() if refs}, pps)


def build_ian(content: StudyContent, retrieve_ae: str) -> Dataset:
    """The N-CREATE attribute list: the IAN module (PS3.3 C.4.23.1) for the whole study."""
    ds = Dataset()
    pps_items = []
    for sop_class, sop_instance in content.pps:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        item.PerformedWorkitemCodeSequence = []  # type 2
        pps_items.append(item)
    ds.ReferencedPerformedProcedureStepSequence = pps_items  # type 2: empty when unknown
    series_items = []
    for series_uid, refs in content.series.items():
        series_item = Dataset()
        sop_items = []
        for sop_class, sop_instance in refs:
            ref = Dataset()
            ref.RetrieveAETitle = retrieve_ae
            ref.InstanceAvailability = "ONLINE"
            ref.ReferencedSOPClassUID = sop_class
            ref.ReferencedSOPInstanceUID = sop_instance
            sop_items.append(ref)
        series_item.ReferencedSOPSequence = sop_items
        series_item.SeriesInstanceUID = series_uid
        series_items.append(series_item)
    ds.ReferencedSeriesSequence = series_items
    ds.StudyInstanceUID = content.study_instance_uid
    return ds


# --- the sender -----------------------------------------------------------------------------


class _PeerFailed(Exception):
    """Nothing more can go to this peer in this pass; the message says why."""


class IanSender:
    """Sends the outbox's due rows; see the module docstring."""

    def __init__(self, archive, settings) -> None:
        self.archive = archive
        self.engine = archive.engine
        self.settings = settings
        self.ian = settings.ian
        self.peers = {peer.ae_title: peer for peer in ian_peers(settings)}
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._next_at = float("inf")  # monotonic time of the next pass

    def attach(self, writer) -> None:
        """Have the index writer record owed IANs in its transactions and wake us after them."""
        writer.in_transaction = OutboxRecorder(self.peers, self.ian.study_quiet_seconds)
        writer.on_committed = self.committed

    def committed(self, study_uids: set[str]) -> None:
        """After a commit: those studies' rows fall due study_quiet_seconds from now."""
        due = time.monotonic() + self.ian.study_quiet_seconds
        if due < self._next_at:
            self._next_at = due
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ian-sender")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        log.info("ian.sender_started", peers=sorted(self.peers),
                 quiet_seconds=self.ian.study_quiet_seconds)
        while True:
            # While a pass runs, a commit sets _next_at to its study's due time.
            self._next_at = float("inf")
            try:
                delay = await self.run_pass()
            except Exception as exc:
                log.error("ian.pass_failed", error=repr(exc))
                delay = self.ian.retry_seconds
            self._next_at = min(self._next_at, time.monotonic() + delay)
            # Sleep until the next row falls due; a commit can only move that earlier.
            while (wait := self._next_at - time.monotonic()) > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except asyncio.TimeoutError:
                    pass

    async def run_pass(self) -> float:
        """Send what is due; return the seconds until the next row falls due."""
        now = datetime.now(timezone.utc)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(
                sa.select(ian_outbox)
                .where(ian_outbox.c.state == PENDING,
                       ian_outbox.c.peer_ae.in_(list(self.peers)),
                       ian_outbox.c.next_attempt_at <= now)
                .order_by(ian_outbox.c.next_attempt_at)
                .limit(BATCH))).all()
        if rows:
            by_peer: dict[str, list] = {}
            for row in rows:
                by_peer.setdefault(row.peer_ae, []).append(row)
            results = await asyncio.gather(*(self._deliver_to(self.peers[ae], batch)
                                             for ae, batch in by_peer.items()),
                                           return_exceptions=True)
            for ae, result in zip(by_peer, results):
                if isinstance(result, Exception):
                    log.error("ian.peer_pass_failed", peer_ae=ae, error=repr(result))
            if len(rows) == BATCH:
                return 0.0
        async with self.engine.connect() as conn:
            upcoming = (await conn.execute(
                sa.select(sa.func.min(ian_outbox.c.next_attempt_at))
                .where(ian_outbox.c.state == PENDING,
                       ian_outbox.c.peer_ae.in_(list(self.peers))))).scalar()
        if upcoming is None:
            return IDLE_POLL
        seconds = (_utc(upcoming) - datetime.now(timezone.utc)).total_seconds()
        return min(max(seconds, 0.0), IDLE_POLL)

    async def _deliver_to(self, peer, rows: list) -> None:
        """One association to the peer for all its due rows."""
        dicom = self.settings.dicom
        done = 0
        try:
            async with associate(peer.host, peer.port, calling_ae=dicom.ae_title,
                                 called_ae=peer.ae_title,
                                 contexts=[ProposedContext(IAN_SOP_CLASS, list(UNCOMPRESSED))],
                                 settings=dicom, spool_dir=self.settings.storage.spool_dir) as assoc:
                context = assoc.context_for(IAN_SOP_CLASS)
                if context is None:
                    raise _PeerFailed(f"{peer.ae_title} did not accept the IAN SOP class")
                for row in rows:
                    await self._send(assoc, context, peer, row)
                    done += 1
        except _PeerFailed as exc:
            why = str(exc)
        except AssociationRejected as exc:
            from pacsd.net.storescu import describe_reject

            why = f"{peer.ae_title}: {describe_reject(exc.reject)}"
        except (AssociationError, OSError, asyncio.TimeoutError) as exc:
            why = f"{peer.ae_title} at {peer.host}:{peer.port}: {exc or type(exc).__name__}"
        else:
            return
        for row in rows[done:]:
            await self._failed(row, why)

    async def _send(self, assoc: Association, context, peer, row) -> None:
        content = await study_content(self.engine, row.study_instance_uid)
        if content is None:
            await self._finish(row, EXPIRED, "the index holds no instance of the study")
            log.warning("ian.expired", study_instance_uid=row.study_instance_uid,
                        peer_ae=peer.ae_title, reason="the index holds no instance of the study")
            return
        retrieve_ae = self.settings.dicom.ae_title

        def encode() -> bytes:
            return encode_identifier(build_ian(content, retrieve_ae), context.transfer_syntax)

        data = await asyncio.get_running_loop().run_in_executor(self.archive.executor, encode)
        notification_uid = new_uid()
        response = await assoc.request_one(context.context_id, {
            "CommandField": CommandField.N_CREATE_RQ,
            "AffectedSOPClassUID": IAN_SOP_CLASS,
            "AffectedSOPInstanceUID": notification_uid,
        }, data)
        status = response.command.get("Status", -1)
        if category(status) in ("success", "warning"):
            current = await self._finish(row, DELIVERED, "", attempts=row.attempts + 1)
            if not current:
                # Superseded by a new instance: the row stays pending for the updated IAN,
                # and the peer, reachable after all, owes no back-off.
                await self._update(row, {"attempts": 0, "last_error": "",
                                         "next_attempt_at": ian_outbox.c.due_at,
                                         "updated_at": datetime.now(timezone.utc)}, same_due=False)
            log.info("ian.delivered", study_instance_uid=row.study_instance_uid,
                     peer_ae=peer.ae_title, series=len(content.series),
                     instances=content.instance_count, sop_instance_uid=notification_uid,
                     status=describe(status), attempts=row.attempts + 1,
                     superseded=None if current else True)
            return
        comment = str(response.command.get("ErrorComment", "") or "").strip()
        await self._failed(row, f"{peer.ae_title} answered {describe(status)}"
                                + (f": {comment}" if comment else ""))

    async def _finish(self, row, state: str, error: str, attempts: int | None = None) -> bool:
        """Set the row's state unless a new instance made it pending again meanwhile (its due
        time changed); returns whether it was set."""
        values: dict[str, Any] = {"state": state, "last_error": error,
                                  "updated_at": datetime.now(timezone.utc)}
        if attempts is not None:
            values["attempts"] = attempts
        return await self._update(row, values)

    async def _failed(self, row, why: str) -> None:
        """A try failed: retry later with back-off, or give up once the row is too old."""
        now = datetime.now(timezone.utc)
        attempts = row.attempts + 1
        if now >= _utc(row.due_at) + timedelta(seconds=self.ian.expire_seconds):
            # Unless a new instance made the row due afresh meanwhile.
            if await self._update(row, {"state": EXPIRED, "attempts": attempts, "last_error": why,
                                        "updated_at": now}):
                log.warning("ian.expired", study_instance_uid=row.study_instance_uid,
                            peer_ae=row.peer_ae, attempts=attempts, error=why)
                return
        # The back-off is the peer's: it holds even if a new instance came in meanwhile.
        delay = retry_delay(attempts, self.ian.retry_seconds, self.ian.max_retry_seconds)
        await self._update(row, {"attempts": ian_outbox.c.attempts + 1, "last_error": why,
                                 "updated_at": now, "next_attempt_at": now + timedelta(seconds=delay)},
                           same_due=False)
        log.warning("ian.delivery_failed", study_instance_uid=row.study_instance_uid,
                    peer_ae=row.peer_ae, attempts=attempts, retry_in=round(delay, 3), error=why)

    async def _update(self, row, values: dict[str, Any], same_due: bool = True) -> bool:
        """Update a pending row; with same_due, only if its due time is still the one read
        (no new instance since). Returns whether a row was updated."""
        where = [ian_outbox.c.pk == row.pk, ian_outbox.c.state == PENDING]
        if same_due:
            where.append(ian_outbox.c.due_at == row.due_at)
        async with self.engine.begin() as conn:
            result = await conn.execute(ian_outbox.update().where(*where).values(values))
        return result.rowcount == 1


def attach(archive, settings) -> IanSender | None:
    """The sender for `serve`, hooked into the archive's index writer; None without IAN peers."""
    if not ian_peers(settings):
        return None
    sender = IanSender(archive, settings)
    sender.attach(archive.writer)
    return sender


# --- the SCP --------------------------------------------------------------------------------


class IanSCP:
    def __init__(self, executor=None) -> None:
        self.executor = executor

    async def handle_n_create(self, assoc, message: Message) -> None:
        command = message.command
        instance_uid = command.get("AffectedSOPInstanceUID") or new_uid()
        extra = {} if command.get("AffectedSOPInstanceUID") else {"AffectedSOPInstanceUID": instance_uid}
        try:
            ds = await self._attribute_list(assoc, message)
            summary = _summarise(ds)
        except IdentifierError as exc:
            log.warning("ian.refused", peer=assoc.protocol.peer_str, calling_ae=assoc.calling_ae,
                        message_id=command.get("MessageID"), status=describe(exc.status),
                        error=exc.comment)
            await assoc.respond(message, exc.status, ErrorComment=exc.comment[:64], **extra)
            return
        log.info("ian.received", peer=assoc.protocol.peer_str, calling_ae=assoc.calling_ae,
                 message_id=command.get("MessageID"), sop_instance_uid=instance_uid, **summary)
        await assoc.respond(message, Status.SUCCESS, **extra)

    async def _attribute_list(self, assoc, message: Message) -> Dataset:
        spool = message.dataset
        if spool is None:
            raise IdentifierError(Status.MISSING_ATTRIBUTE, "N-CREATE-RQ without an attribute list")
        if spool.error is not None:
            raise IdentifierError(Status.RESOURCE_LIMITATION,
                                  f"attribute list not received: {spool.error.strerror or spool.error}")
        ts = assoc.contexts[message.context_id].transfer_syntax

        def work() -> Dataset:
            try:
                return decode_identifier(spool.read(), ts)
            except IdentifierError as exc:
                # C000 and A700 are C-service statuses: answer their N-CREATE counterparts.
                status = {Status.CANNOT_UNDERSTAND: Status.PROCESSING_FAILURE,
                          Status.OUT_OF_RESOURCES: Status.RESOURCE_LIMITATION}.get(exc.status, exc.status)
                raise IdentifierError(status, exc.comment) from None

        if spool.size > _DECODE_INLINE and self.executor is not None:
            return await asyncio.get_running_loop().run_in_executor(self.executor, work)
        return work()


def _summarise(ds: Dataset) -> dict[str, Any]:
    """What ian.received logs; refuses an attribute list without a usable Study Instance UID."""
    if "StudyInstanceUID" not in ds:
        raise IdentifierError(Status.MISSING_ATTRIBUTE, "Study Instance UID (0020,000D) is missing", 0x0020000D)
    study_uid = ds.StudyInstanceUID
    if study_uid is None or str(study_uid) == "":
        raise IdentifierError(Status.MISSING_ATTRIBUTE_VALUE, "Study Instance UID (0020,000D) is empty", 0x0020000D)
    if problem := uid_problem("Study Instance UID", study_uid):
        raise IdentifierError(Status.INVALID_ATTRIBUTE_VALUE, problem, 0x0020000D)
    availability: Counter[str] = Counter()
    series_count = instance_count = 0
    for series_item in ds.get("ReferencedSeriesSequence") or []:
        series_count += 1
        for ref in series_item.get("ReferencedSOPSequence") or []:
            instance_count += 1
            availability[str(ref.get("InstanceAvailability", "") or "")] += 1
    return {"study_instance_uid": str(study_uid), "series": series_count,
            "instances": instance_count, "availability": dict(sorted(availability.items())),
            "pps": len(ds.get("ReferencedPerformedProcedureStepSequence") or [])}


def register(registry: ServiceRegistry, settings, executor=None) -> None:
    scp = IanSCP(executor)
    registry.add(IAN_SOP_CLASS, settings.dicom.transfer_syntaxes, CommandField.N_CREATE_RQ,
                 scp.handle_n_create)
