"""Ingest processes: the CPU-heavy part of ingest (parse, validate, index rows, write the
blob) run outside the daemon's process, so that it does not share one interpreter lock with
the event loop, the index writer and every association. With several associations storing
at once the daemon then uses more than one core. pipeline.Ingest sends an instance here
only while another one is being ingested too: alone, it is parsed faster in a thread.

    daemon (event loop)                         ingest process (ingest/worker.py)
      key = store.new_key(), its directories
      made here (in a thread, once a minute)
      ── (job id, Incoming, key) ──────────────►  prepare(): blob written under `key`, its
                                                  fsyncs started (blob, directory), header
                                                  walk, UID checks, level rows, SHA-256;
                                                  the fsyncs waited for
      ◄── (job id, IndexRecord | error, dirs) ──
      the record is durable: the index writer
      commits it without fsyncs of its own

The daemon makes a key's directories itself, so that this process's store knows every
directory that is new, and fsyncs their parents (through the index writer) before the
first record in them commits; a directory a process had to create all the same comes back
with the reply. If a process dies, its jobs fail with an OSError (A700 for the sender,
which never got a success), the blob it may have placed under the key is removed, and a
new process is started; until it is ready, instances are parsed in the daemon's threads.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import pickle
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Executor

import structlog

from pacsd.index.levels import IndexRecord
from pacsd.ingest.pipeline import Rejected, prepare
from pacsd.ingest.worker import FAILED, LENGTH, OK, OS_ERROR, READY, REJECTED, frame
from pacsd.store.filetree import FileTreeBlobStore
from pacsd.store.syncer import DURABLE

log = structlog.get_logger("pacsd.ingest")

# An instance held in memory travels to the process through its socket, copied on the way
# in small pieces (a Unix socket buffers ~200 KiB). Worth it for small instances, whose
# parsing is most of their cost; a 512 KiB CT image cost more to carry than it saved (one
# association, 200 CT 512x512: ~260 -> ~180/s), so larger ones are parsed in a thread. A
# spooled instance travels as its path.
TRANSFER_LIMIT = 64 * 1024


class _Process(asyncio.Protocol):
    """The daemon's end of one ingest process: its jobs in flight, by id."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, asyncio.Future] = {}
        self.alive = True
        # Set once the process has imported what it needs and said so.
        self.ready = asyncio.get_running_loop().create_future()
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while len(buffer) - start >= LENGTH.size:
            (size,) = LENGTH.unpack_from(buffer, start)
            end = start + LENGTH.size + size
            if len(buffer) < end:
                break
            job_id, kind, payload, created = pickle.loads(memoryview(buffer)[start + LENGTH.size:end])
            start = end
            if kind == READY:
                log.info("ingest.process_started", pid=self.proc.pid)
                if not self.ready.done():
                    self.ready.set_result(None)
                continue
            future = self.pending.pop(job_id, None)
            if future is not None and not future.done():
                future.set_result((kind, payload, created))
        del buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        # The process is exiting (or closed its end on its way out): reap it off the loop.
        threading.Thread(target=_reap, args=(self.proc,), name="pacsd-reap", daemon=True).start()
        lost = OSError(errno.EIO, "the ingest process exited")
        if not self.ready.done():
            self.ready.set_exception(lost)
            self.ready.exception()  # retrieved: nobody need be waiting for it
        for future in self.pending.values():
            if not future.done():
                future.set_exception(lost)
        self.pending.clear()

    @property
    def usable(self) -> bool:
        return self.alive and self.ready.done() and self.ready.exception() is None

    def submit(self, job_id: int, message: bytes) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.pending[job_id] = future
        self.transport.write(message)
        return future


class IngestProcesses:
    """Started the first time instances arrive side by side, not with the daemon: a daemon
    that takes one instance at a time, or only answers queries, keeps no parser processes in
    memory. Until a process is ready (and while a lost one is replaced) instances are parsed
    in the daemon's threads, as with ingest_processes = 0."""

    # After a process failed to start, the next attempt waits this long (seconds).
    RETRY_AFTER = 10.0

    def __init__(self, store: FileTreeBlobStore, executor: Executor, count: int,
                 log_level: str = "info", log_format: str = "auto") -> None:
        self.store = store
        self.executor = executor
        self.count = count
        self._args = [str(store.root), log_level, log_format]
        self._processes: list[_Process] = []
        self._ids = itertools.count(1)
        self._filling: asyncio.Task | None = None
        self._retry_at = 0.0
        self._closed = False

    @staticmethod
    def takes(incoming) -> bool:
        """Whether `incoming` is worth sending to a process (see TRANSFER_LIMIT)."""
        return incoming.buffer is None or len(incoming.buffer) <= TRANSFER_LIMIT

    async def start(self) -> None:
        """Start the processes and wait until each is ready."""
        self._fill_soon(now=True)
        if self._filling is not None:
            await asyncio.shield(self._filling)
        for process in self._processes:
            await process.ready

    async def prepare(self, incoming) -> IndexRecord:
        """`pipeline.prepare` in an ingest process (in a thread while none is ready): the
        IndexRecord, or the same Rejected or OSError it would raise."""
        loop = asyncio.get_running_loop()
        store = self.store
        key = store.new_key()
        if not store.has_dirs(key):
            await loop.run_in_executor(self.executor, store.make_dirs, key)
        process = self._least_busy()
        if process is None:
            return await loop.run_in_executor(self.executor, prepare, incoming, store, key)
        job_id = next(self._ids)
        try:
            kind, payload, created = await process.submit(job_id, frame((job_id, incoming, key)))
        except OSError:
            log.error("ingest.process_lost", pid=process.proc.pid, sop_instance_uid=incoming.sop_instance_uid)
            # It may have placed the blob before it died; nothing will index it.
            await loop.run_in_executor(self.executor, store.delete, key)
            raise
        if kind == OK:
            # The process made the blob and its directory entry durable; the directories
            # the daemon created for the key may still need their parents fsynced (the
            # index writer does that when `synced` is None).
            store.take_over(None, created)
            if not store.dirs_pending(key):
                payload.synced = DURABLE
            return payload
        store.take_over(None, created)
        if kind == REJECTED:
            raise Rejected(*payload)
        if kind == OS_ERROR:
            raise OSError(*payload)
        assert kind == FAILED
        raise RuntimeError(payload)

    def _least_busy(self) -> _Process | None:
        self._processes[:] = [p for p in self._processes if p.alive]
        self._fill_soon()
        usable = [p for p in self._processes if p.usable]
        return min(usable, key=lambda p: len(p.pending)) if usable else None

    def _fill_soon(self, now: bool = False) -> None:
        if self._closed or self._filling is not None or len(self._processes) >= self.count:
            return
        if not now and time.monotonic() < self._retry_at:
            return
        self._filling = asyncio.get_running_loop().create_task(self._fill())

    async def _fill(self) -> None:
        try:
            while not self._closed and len([p for p in self._processes if p.alive]) < self.count:
                process = await self._start()
                # Not `self._processes.append(await ...)`, which binds the list before the await.
                self._processes.append(process)
        except Exception as exc:
            self._retry_at = time.monotonic() + self.RETRY_AFTER
            log.error("ingest.process_start_failed", error=repr(exc), retry_in_seconds=self.RETRY_AFTER)
        finally:
            self._filling = None

    async def _start(self) -> _Process:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            args = [sys.executable, "-m", "pacsd.ingest.worker", str(theirs.fileno()), *self._args]
            proc = await loop.run_in_executor(self.executor, lambda: subprocess.Popen(
                args, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        _, process = await loop.create_unix_connection(lambda: _Process(proc), sock=ours)
        return process

    async def close(self, timeout: float = 30) -> None:
        """Close every process's socket (it exits at the end of its job) and wait for it."""
        self._closed = True
        if self._filling is not None:
            self._filling.cancel()
            await asyncio.gather(self._filling, return_exceptions=True)
        processes, self._processes = self._processes, []
        for process in processes:
            if process.transport is not None:
                process.transport.close()
        loop = asyncio.get_running_loop()
        for process in processes:
            try:
                await asyncio.wait_for(loop.run_in_executor(None, process.proc.wait), timeout)
            except asyncio.TimeoutError:
                log.warning("ingest.process_killed", pid=process.proc.pid)
                process.proc.kill()


def _reap(proc: subprocess.Popen) -> None:
    code = proc.wait()
    if code != 0:
        log.error("ingest.process_exited", pid=proc.pid, returncode=code)
