"""Engine creation and schema migration for the index (SQLite by default, PostgreSQL too)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def _sqlite_pragmas(dbapi_connection) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers run beside the writer; synchronous=FULL makes every commit durable
    # (fsync of the WAL), which group commit keeps affordable.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def sync_engine_for(engine: AsyncEngine) -> sa.Engine | None:
    """For an SQLite index: a synchronous engine on the same file, for the index writer.

    The writer runs a whole group in one worker thread with it (one thread hop per group).
    Its transactions start with BEGIN IMMEDIATE, so the lookups of a group happen under the
    write lock that its inserts need, even with a second process (pacsd import) writing.
    """
    url = engine.url
    if url.get_backend_name() != "sqlite":
        return None
    sync = sa.create_engine(url.set(drivername="sqlite"), poolclass=sa.pool.SingletonThreadPool)

    @event.listens_for(sync, "connect")
    def _connect(dbapi_connection, _record) -> None:
        _sqlite_pragmas(dbapi_connection)
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves

    @event.listens_for(sync, "begin")
    def _begin(conn) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return sync


def sqlite_read_engine(url: sa.URL, connections: int) -> sa.Engine:
    """For an SQLite index: a synchronous engine for reads in pacsd's reader threads
    (index/reader.py), up to `connections` at once beside the writer (WAL)."""
    # check_same_thread off: a streaming search may fetch its batches on different threads
    # of the pool, one after the other, never two at once.
    engine = sa.create_engine(url.set(drivername="sqlite"), pool_size=connections, max_overflow=connections,
                              connect_args={"check_same_thread": False})
    event.listen(engine, "connect", lambda dbapi_connection, _record: _sqlite_pragmas(dbapi_connection))
    return engine


def create_engine(url: str) -> AsyncEngine:
    """An async engine with the SQLite settings durability needs."""
    if url.startswith("sqlite"):
        path = sa.engine.make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_connection, _record) -> None:
            _sqlite_pragmas(dbapi_connection)

        return engine
    return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)


def _alembic_config(url: str):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["database_url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to `revision` (blocking; runs its own event loop)."""
    from alembic import command

    command.upgrade(_alembic_config(url), revision)


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config("")).get_current_head()


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at; None for a database without pacsd's schema."""

    def read(connection) -> str | None:
        from alembic.runtime.migration import MigrationContext

        return MigrationContext.configure(connection).get_current_revision()

    async with engine.connect() as conn:
        return await conn.run_sync(read)


class SchemaOutOfDate(Exception):
    pass


async def ensure_schema(engine: AsyncEngine, url: str) -> str:
    """Upgrade an empty database; refuse one at another revision (`pacsd db upgrade`)."""
    current = await current_revision(engine)
    head = head_revision()
    if current == head:
        return "current"
    if current is None:
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
        if tables:
            raise SchemaOutOfDate(
                f"the database has tables ({', '.join(sorted(tables)[:5])}) but no pacsd "
                "schema version; point database.url at an empty database or at a pacsd index"
            )
        # Alembic runs its own event loop: give it a thread.
        await asyncio.get_running_loop().run_in_executor(None, upgrade, url)
        return "created"
    raise SchemaOutOfDate(
        f"the index schema is at revision {current}, this pacsd needs {head}: "
        "run `pacsd db upgrade` first"
    )
