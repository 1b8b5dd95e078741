"""Blocking byte producers (file reads, JSON building) driven from the event loop.

A response body is an async iterator whose every step runs one `next()` of a blocking
iterator in the archive's thread pool: one chunk (at most 1 MiB) is in memory at a time per
response, uvicorn's flow control holds the next step back while the client is slow, and the
loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from pathlib import Path
from typing import AsyncIterator, Iterable, Iterator

CHUNK = 1024 * 1024

_END = object()


async def in_thread(executor: Executor, blocking: Iterator[bytes]) -> AsyncIterator[bytes]:
    """The chunks of `blocking`, each produced in a thread; the next one is read while the
    current one is being sent (two chunks at most in memory), so the disk and the socket
    overlap instead of taking turns."""
    loop = asyncio.get_running_loop()
    ahead = loop.run_in_executor(executor, next, blocking, _END)
    try:
        while True:
            chunk = await ahead
            if chunk is _END:
                return
            ahead = loop.run_in_executor(executor, next, blocking, _END)
            yield chunk
    finally:
        if not ahead.done():
            # The client went away during a read: its result (or error) is of no use now.
            ahead.add_done_callback(lambda f: f.cancelled() or f.exception())
        close = getattr(blocking, "close", None)
        if close is not None:
            try:
                close()  # closes the file at once when the client went away
            except ValueError:
                pass  # still running in its thread (cancelled mid-read): closed when collected


def file_chunks(path: Path, start: int = 0, length: int | None = None,
                chunk: int = CHUNK) -> Iterator[memoryview]:
    """`length` bytes of the file from `start` (to its end when None), in chunks; raises
    OSError if the file is shorter than promised, so a response is cut off rather than padded."""
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        left = length
        while left is None or left > 0:
            buffer = bytearray(chunk if left is None else min(chunk, left))
            got = f.readinto(buffer)
            if not got:
                if left:
                    raise OSError(f"{path} ended {left} bytes early")
                return
            if left is not None:
                left -= got
            yield memoryview(buffer)[:got]


def multipart_files(parts: Iterable[tuple[bytes, Path, int]], tail: bytes,
                    chunk: int = CHUNK) -> Iterator[memoryview]:
    """A multipart body of whole files: each (part header, file, size) in turn, then `tail`.

    Headers and file data are read straight into chunk-size buffers, several small files to a
    buffer: one thread hop and one send per megabyte rather than two per file, and no copy
    beyond the read itself. Raises OSError if a file is shorter than its size."""
    buffer, fill = bytearray(chunk), 0
    for head, path, size in parts:
        if len(buffer) - fill < len(head):
            if fill:
                yield memoryview(buffer)[:fill]
            buffer, fill = bytearray(max(chunk, len(head))), 0
        buffer[fill:fill + len(head)] = head
        fill += len(head)
        with open(path, "rb", buffering=0) as f:
            left = size
            while left:
                if fill == len(buffer):
                    yield memoryview(buffer)
                    buffer, fill = bytearray(chunk), 0
                got = f.readinto(memoryview(buffer)[fill:fill + min(len(buffer) - fill, left)])
                if not got:
                    raise OSError(f"{path} ended {left} bytes early")
                fill += got
                left -= got
    if len(buffer) - fill < len(tail):
        if fill:
            yield memoryview(buffer)[:fill]
        buffer, fill = bytearray(len(tail)), 0
    buffer[fill:fill + len(tail)] = tail
    yield memoryview(buffer)[:fill + len(tail)]
