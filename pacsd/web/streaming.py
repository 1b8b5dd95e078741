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
from typing import AsyncIterator, Iterator

CHUNK = 1024 * 1024

_END = object()


async def in_thread(executor: Executor, blocking: Iterator[bytes]) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    try:
        while True:
            chunk = await loop.run_in_executor(executor, next, blocking, _END)
            if chunk is _END:
                return
            yield chunk
    finally:
        close = getattr(blocking, "close", None)
        if close is not None:
            try:
                close()  # closes the file at once when the client went away
            except ValueError:
                pass  # still running in its thread (cancelled mid-read): closed when collected


def file_chunks(path: Path, start: int = 0, length: int | None = None,
                chunk: int = CHUNK) -> Iterator[bytes]:
    """`length` bytes of the file from `start` (to its end when None), in chunks; raises
    OSError if the file is shorter than promised, so a response is cut off rather than padded."""
    with open(path, "rb") as f:
        f.seek(start)
        left = length
        while left is None or left > 0:
            data = f.read(chunk if left is None else min(chunk, left))
            if not data:
                if left:
                    raise OSError(f"{path} ended {left} bytes early")
                return
            if left is not None:
                left -= len(data)
            yield data
