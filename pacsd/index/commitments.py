"""Storage Commitment transactions in the index (`commitment_transactions`): written before
the N-ACTION-RSP, claimed per delivery attempt, finished as delivered or expired. The SCP
that drives them is pacsd/services/commitment.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable

import sqlalchemy as sa
import structlog
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from pacsd.index.schema import commitment_transactions as ct

log = structlog.get_logger("pacsd.commitment")

PENDING, DELIVERED, EXPIRED = "pending", "delivered", "expired"


def now() -> datetime:
    return datetime.now(timezone.utc)


def aware(value: datetime) -> datetime:
    """SQLite hands DateTime columns back without a zone; pacsd writes them in UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


@dataclass
class Transaction:
    pk: int
    transaction_uid: str
    calling_ae: str
    requested: list[tuple[str, str]]
    result: dict[str, list] | None
    attempts: int  # the row's generation: every attempt's outcome adds one
    created_at: datetime
    next_attempt_at: Any = None  # as read (compared when claiming the row)

    @classmethod
    def of(cls, row) -> "Transaction":
        return cls(row.pk, row.transaction_uid, row.calling_ae,
                   [tuple(r) for r in json.loads(row.requested)],
                   json.loads(row.result) if row.result else None,
                   row.attempts, aware(row.created_at), row.next_attempt_at)


async def record(engine: AsyncEngine, transaction_uid: str, calling_ae: str,
                 refs: list[tuple[str, str]], lease: float) -> Transaction | None:
    """Write a new pending transaction and commit it; None if that UID is already pending.

    Its first attempt is the caller's: the row is claimed for `lease` seconds (it is due
    then, should this process die before the attempt ends and nothing else pick it up).

    The insert comes first in its transaction (no read before it), so on SQLite it waits
    for the write lock instead of failing on a stale read snapshot.
    """
    at = now()
    values = {
        "calling_ae": calling_ae[:16], "requested": json.dumps(refs), "result": None,
        "state": PENDING, "attempts": 0, "next_attempt_at": at + timedelta(seconds=lease),
        "last_error": "", "created_at": at, "updated_at": at,
    }
    try:
        async with engine.begin() as conn:
            pk = (await conn.execute(
                sa.insert(ct).values(transaction_uid=transaction_uid, **values).returning(ct.c.pk)
            )).scalar_one()
    except IntegrityError:
        # Known UID: take it over only if its transaction is finished (reported or expired).
        async with engine.begin() as conn:
            done = await conn.execute(
                sa.update(ct).where(ct.c.transaction_uid == transaction_uid, ct.c.state != PENDING)
                .values(**values).returning(ct.c.pk)
            )
            pk = done.scalar_one_or_none()
        if pk is None:
            return None
        log.warning("commitment.transaction_reused", transaction_uid=transaction_uid,
                    calling_ae=calling_ae)
    return Transaction(pk, transaction_uid, calling_ae, list(refs), None, 0, at)


async def update(engine: AsyncEngine, tx: Transaction, **values: Any) -> bool:
    """Change the row if it is still pending at the generation `tx` has; False otherwise."""
    async with engine.begin() as conn:
        done = await conn.execute(
            sa.update(ct).where(ct.c.pk == tx.pk, ct.c.state == PENDING, ct.c.attempts == tx.attempts)
            .values(updated_at=now(), **values)
        )
    return done.rowcount > 0


async def claim(engine: AsyncEngine, tx: Transaction, lease: float) -> bool:
    """Take a due row for one attempt: only if nobody changed it since it was read (a stale
    read, or another pacsd on the same index), pushing its next attempt `lease` seconds out."""
    async with engine.begin() as conn:
        done = await conn.execute(
            sa.update(ct).where(ct.c.pk == tx.pk, ct.c.state == PENDING, ct.c.attempts == tx.attempts,
                                ct.c.next_attempt_at == tx.next_attempt_at)
            .values(next_attempt_at=now() + timedelta(seconds=lease), updated_at=now())
        )
    return done.rowcount > 0


async def resume(engine: AsyncEngine) -> int:
    """At start: every report a previous run left pending is due now (also those whose
    attempt it was in the middle of); returns how many there are."""
    async with engine.begin() as conn:
        done = await conn.execute(
            sa.update(ct).where(ct.c.state == PENDING).values(next_attempt_at=now()))
    return done.rowcount


async def due(engine: AsyncEngine, until: datetime, limit: int) -> list[Transaction]:
    """Pending transactions whose next attempt is due by `until`, earliest first."""
    query = (sa.select(ct).where(ct.c.state == PENDING, ct.c.next_attempt_at <= until)
             .order_by(ct.c.next_attempt_at).limit(limit))
    async with engine.connect() as conn:
        return [Transaction.of(row) for row in await conn.execute(query)]


async def next_due(engine: AsyncEngine) -> datetime | None:
    async with engine.connect() as conn:
        value = (await conn.execute(
            sa.select(sa.func.min(ct.c.next_attempt_at)).where(ct.c.state == PENDING)
        )).scalar()
    return aware(value) if value is not None else None


async def has_pending_commitment(engine: AsyncEngine, sop_instance_uids: Iterable[str]) -> set[str]:
    """Which of these SOP Instance UIDs a pending commitment transaction names: those must
    not be deleted (pacsd has promised, or is about to promise, to keep them)."""
    wanted = set(sop_instance_uids)
    found: set[str] = set()
    if not wanted:
        return found
    async with engine.connect() as conn:
        rows = await conn.execute(sa.select(ct.c.requested).where(ct.c.state == PENDING))
        for (requested,) in rows:
            found.update(uid for _, uid in json.loads(requested) if uid in wanted)
    return found
