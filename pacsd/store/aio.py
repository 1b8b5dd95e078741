"""fsync without a thread: Linux native AIO (IOCB_CMD_FSYNC, Linux 4.18 and later).

A blob's fsyncs should run while the thread that placed it goes on parsing it. A Python
thread cannot start them then: it needs the interpreter lock, which a parsing thread holds
until it next blocks (after the parse). io_submit hands the fsyncs to the kernel, which runs
them in its own workers, from the thread that placed the blob, at the cost of one system
call; a reaper thread (blocked in io_getevents without the lock) learns of their end.

libc has no wrappers for these calls (libaio has), so they are made through syscall(2). Only
on little-endian x86_64 and aarch64, whose struct iocb layout and call numbers are below;
`AioFsync.open` returns None anywhere else, or where the kernel refuses (an old kernel, a
seccomp filter, a filesystem without fsync through AIO), and the caller uses threads.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys
import threading
from concurrent.futures import Future

import structlog

log = structlog.get_logger("pacsd.store")

# io_setup, io_destroy, io_submit, io_getevents
_CALLS = {"x86_64": (206, 207, 209, 208), "aarch64": (0, 1, 2, 4)}
_IOCB_CMD_FSYNC = 2
_MAX_EVENTS = 256  # per context; the system allows 65536 in all (fs.aio-max-nr)


class _IoCb(ctypes.Structure):
    # include/uapi/linux/aio_abi.h, little-endian order of aio_key and aio_rw_flags.
    _fields_ = [
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_int32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    ]


class _IoEvent(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


class _Batch:
    """The fsyncs of one `fsync` call: done when the last of them is."""

    __slots__ = ("future", "fds", "left", "error", "iocbs")

    def __init__(self, fds: list[int]) -> None:
        self.future: Future = Future()
        self.fds = fds
        self.left = len(fds)
        self.error: OSError | None = None
        self.iocbs: ctypes.Array | None = None  # kept alive until the kernel is done with them


class AioFsync:
    def __init__(self, syscall, numbers: tuple[int, int, int, int], context: int) -> None:
        self._syscall = syscall
        self._setup, self._destroy, self._submit, self._getevents = numbers
        self._context = context
        self._lock = threading.Lock()
        self._batches: dict[int, _Batch] = {}
        self._next = 1
        self._closing = False
        # Set if the reaper stopped on its own: nothing would complete a batch any more.
        self._broken: OSError | None = None
        self._reaper = threading.Thread(target=self._reap, name="pacsd-aio-reaper", daemon=True)
        self._reaper.start()

    @classmethod
    def open(cls, probe_dir: str) -> AioFsync | None:
        """A working AioFsync, tried once on `probe_dir`, or None (use threads)."""
        numbers = _CALLS.get(platform.machine())
        if numbers is None or sys.byteorder != "little" or not sys.platform.startswith("linux"):
            return None
        syscall = ctypes.CDLL(None, use_errno=True).syscall
        syscall.restype = ctypes.c_long
        context = ctypes.c_ulong(0)
        if syscall(ctypes.c_long(numbers[0]), ctypes.c_long(_MAX_EVENTS), ctypes.byref(context)) != 0:
            log.info("store.aio_unavailable", error=os.strerror(ctypes.get_errno()))
            return None
        aio = cls(syscall, numbers, context.value)
        try:
            aio.fsync([os.open(probe_dir, os.O_RDONLY | os.O_DIRECTORY)], here_too=False).result()
        except OSError as exc:
            log.info("store.aio_unavailable", error=str(exc))
            aio.close()
            return None
        return aio

    def fsync(self, fds: list[int], here_too: bool = True) -> Future:
        """fsync each of `fds` in the kernel's workers; the Future's result is None once all
        are done, or the first error. The fds are closed then, whatever the outcome. What the
        kernel does not take (a full context) is fsynced in this thread, unless `here_too`
        is False: then its refusal is the error."""
        batch = _Batch(fds)
        if not fds:
            batch.future.set_result(None)
            return batch.future
        iocbs = (_IoCb * len(fds))()
        with self._lock:
            token = self._next
            self._next += 1
            self._batches[token] = batch
        for iocb, fd in zip(iocbs, fds):
            iocb.aio_data = token
            iocb.aio_lio_opcode = _IOCB_CMD_FSYNC
            iocb.aio_fildes = fd
        batch.iocbs = iocbs
        pointers = (ctypes.c_void_p * len(fds))(*(ctypes.addressof(iocb) for iocb in iocbs))
        submitted = 0
        if self._broken is not None:
            submitted = len(fds)
            for fd in fds:
                self._done(token, self._fsync_here(fd))
        while submitted < len(fds):
            n = self._syscall(ctypes.c_long(self._submit), ctypes.c_ulong(self._context),
                              ctypes.c_long(len(fds) - submitted),
                              ctypes.byref(pointers, submitted * ctypes.sizeof(ctypes.c_void_p)))
            if n <= 0:
                # Not taken (EAGAIN: the context is full): done here and now instead.
                refused = -(ctypes.get_errno() or errno.EIO)
                for fd in fds[submitted:]:
                    self._done(token, self._fsync_here(fd) if here_too else refused)
                break
            submitted += n
        return batch.future

    @staticmethod
    def _fsync_here(fd: int) -> int:
        try:
            os.fsync(fd)
        except OSError as exc:
            return -(exc.errno or 5)
        return 0

    def _done(self, token: int, res: int) -> None:
        with self._lock:
            batch = self._batches[token]
            batch.left -= 1
            if res < 0 and batch.error is None:
                batch.error = OSError(-res, os.strerror(-res))
            if batch.left:
                return
            del self._batches[token]
        for fd in batch.fds:
            os.close(fd)
        batch.iocbs = None
        if batch.error is not None:
            batch.future.set_exception(batch.error)
        else:
            batch.future.set_result(None)

    def _reap(self) -> None:
        events = (_IoEvent * 64)()
        while True:
            n = self._syscall(ctypes.c_long(self._getevents), ctypes.c_ulong(self._context),
                              ctypes.c_long(1), ctypes.c_long(len(events)), events, None)
            if n < 0:
                error = ctypes.get_errno()
                if error == errno.EINTR:
                    continue
                if not self._closing:
                    # Not close's io_destroy: fail what waits rather than leave it waiting
                    # for ever, and fsync in the callers' threads from now on.
                    self._broken = OSError(error, f"AIO completions lost: {os.strerror(error)}")
                    log.error("store.aio_reaper_failed", error=os.strerror(error))
                    with self._lock:
                        lost, self._batches = list(self._batches.values()), {}
                    for batch in lost:
                        for fd in batch.fds:
                            os.close(fd)
                        batch.future.set_exception(self._broken)
                return
            for event in events[:n]:
                self._done(event.data, event.res)

    def close(self) -> None:
        """Wait for the fsyncs under way, then end the context and its reaper."""
        # io_destroy waits for outstanding requests; their events are lost with the
        # context, so wait for the reaper to see them first.
        for future in self._pending_futures():
            future.exception()
        self._closing = True
        self._syscall(ctypes.c_long(self._destroy), ctypes.c_ulong(self._context))
        self._reaper.join(5)

    def _pending_futures(self) -> list[Future]:
        with self._lock:
            return [batch.future for batch in self._batches.values()]
