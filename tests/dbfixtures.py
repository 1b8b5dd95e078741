"""Index database fixtures: every test that takes `index_url` or `engine` runs twice.

    sqlite      a fresh file in the test's tmp_path (sqlite+aiosqlite:///<tmp>/index.db)
    postgresql  the server named by PACSD_TEST_PG_URL (.ci/run exports it); the test is
                skipped when the variable is unset. pacsd's tables and alembic_version are
                dropped before each test, so every test starts from an empty database.

Tests sharing one PostgreSQL database must not reset it under each other (a second pytest
run, or another suite using these fixtures): each test holds a session-level advisory lock
from the reset to its end, so such tests take turns.

Use them by importing the fixtures into a test module:

    from tests.dbfixtures import engine, index_url  # noqa: F401  (pytest fixtures)
"""

from __future__ import annotations

import asyncio
import os

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from pacsd.index.reader import close_reader
from pacsd.index.db import create_engine, upgrade
from pacsd.index.schema import metadata

PG_URL_ENV = "PACSD_TEST_PG_URL"

# A table that is not pacsd's, for tests of "this database holds something else"; the reset
# drops it too.
FOREIGN_TABLE = "pacsd_test_foreign"

# Key of the advisory lock that serialises tests on the shared PostgreSQL database.
_PG_LOCK_KEY = 0x70616373  # "pacs"


def pg_url() -> str | None:
    return os.environ.get(PG_URL_ENV) or None


def sqlite_url(directory) -> str:
    return f"sqlite+aiosqlite:///{directory}/index.db"


def _tables_to_drop() -> list[str]:
    # Children before parents; CASCADE also takes anything that still refers to them.
    return [t.name for t in reversed(metadata.sorted_tables)] + ["alembic_version", FOREIGN_TABLE]


async def reset_postgresql(conn) -> None:
    """Drop pacsd's tables, alembic_version and the test's foreign table (in one transaction)."""
    for name in _tables_to_drop():
        await conn.execute(sa.text(f'DROP TABLE IF EXISTS "{name}" CASCADE'))


@pytest.fixture(params=["sqlite", "postgresql"])
async def index_url(request, tmp_path):
    """The database URL of an empty index database, once per backend."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
        return
    url = pg_url()
    if url is None:
        pytest.skip(f"{PG_URL_ENV} is not set (e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/test); "
                    "the PostgreSQL variant needs a server")
    admin = create_async_engine(url, poolclass=NullPool)
    try:
        conn = await admin.connect()
        try:
            await conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": _PG_LOCK_KEY})
            await conn.commit()  # the lock is the session's, not the transaction's
            await reset_postgresql(conn)
            await conn.commit()
            yield url
        finally:
            await conn.rollback()
            await conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": _PG_LOCK_KEY})
            await conn.commit()
            await conn.close()
    finally:
        await admin.dispose()


@pytest.fixture
async def engine(index_url):
    """pacsd's engine on a database upgraded to the head revision."""
    # Alembic runs its own event loop (asyncio.run): it needs a thread of its own.
    await asyncio.get_running_loop().run_in_executor(None, upgrade, index_url)
    eng = create_engine(index_url)
    try:
        yield eng
    finally:
        await asyncio.get_running_loop().run_in_executor(None, close_reader, eng)
        await eng.dispose()
