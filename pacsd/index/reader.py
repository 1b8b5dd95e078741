"""Reads of an SQLite index in a few threads of its own, a batch of rows per thread hop.

Through aiosqlite every step of a query (check out a connection, execute, each fetch, close
the result, give the connection back) is a round trip to its thread and back to the event
loop. A C-FIND or QIDO-RS search that finds a handful of studies paid for a dozen of them
in futex and eventfd calls, more than SQLite took to run it. Here the first hop checks out
a connection, runs the statement and fetches the first batch; a result that fits in one
batch is closed in that same hop. Longer results go on a batch per hop, so memory stays flat.

WAL mode lets these readers run beside the index writer, as aiosqlite's did. PostgreSQL
keeps the async engine: asyncpg has no thread to hop to.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import AsyncIterator, Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from pacsd.index.db import sqlite_read_engine

# Searches at once; more wait for a thread (each holds its connection while it streams).
READER_THREADS = 4


class SQLiteReader:
    def __init__(self, url: sa.URL) -> None:
        self.engine = sqlite_read_engine(url, READER_THREADS)
        self.threads = ThreadPoolExecutor(READER_THREADS, thread_name_prefix="pacsd-read")

    async def batches(self, stmt, batch: int) -> AsyncIterator[Sequence[sa.Row]]:
        """The rows of `stmt`, `batch` at a time. Close the iterator (contextlib.aclosing)
        to stop early: the result and connection are released in the reader threads."""
        opened: list = []  # [connection, result] while more rows may come
        pending: Future | None = None

        def first() -> Sequence[sa.Row]:
            conn = self.engine.connect()
            try:
                result = conn.execute(stmt.execution_options(yield_per=batch))
                rows = result.fetchmany(batch)
                if len(rows) < batch:
                    result.close()
                    conn.close()
                else:
                    opened[:] = [conn, result]
                return rows
            except BaseException:
                conn.close()
                raise

        def more() -> Sequence[sa.Row]:
            rows = opened[1].fetchmany(batch)
            if len(rows) < batch:
                _close(opened)
            return rows

        try:
            step = first
            while True:
                pending = self.threads.submit(step)
                rows = await asyncio.wrap_future(pending)
                pending = None
                if rows:
                    yield rows
                if not opened:
                    return
                step = more
        finally:
            if pending is not None or opened:
                # After the fetch still running (a cancelled search), never beside it: a
                # connection is used by one thread at a time.
                try:
                    self.threads.submit(_close_after, pending, opened)
                except RuntimeError:  # the threads were stopped (shutdown): close it here
                    _close_after(pending, opened)

    def close(self) -> None:
        self.threads.shutdown(wait=True)
        self.engine.dispose()


def _close(opened: list) -> None:
    conn, result = opened
    opened.clear()
    try:
        result.close()
    finally:
        conn.close()


def _close_after(pending: Future | None, opened: list) -> None:
    if pending is not None:
        futures_wait([pending])
    if opened:
        _close(opened)


_readers: "weakref.WeakKeyDictionary[sa.Engine, SQLiteReader]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def reader_for(engine: AsyncEngine) -> SQLiteReader | None:
    """The reader of an SQLite index's engine (made on first use), or None for PostgreSQL."""
    if engine.url.get_backend_name() != "sqlite":
        return None
    key = engine.sync_engine
    with _lock:
        reader = _readers.get(key)
        if reader is None:
            reader = _readers[key] = SQLiteReader(engine.url)
            # An engine dropped without close_reader (a test's) takes its threads with it.
            weakref.finalize(key, reader.threads.shutdown, wait=False)
    return reader


def close_reader(engine: AsyncEngine) -> None:
    """Stop the engine's reader threads and close their connections (at shutdown)."""
    with _lock:
        reader = _readers.pop(engine.sync_engine, None)
    if reader is not None:
        reader.close()
