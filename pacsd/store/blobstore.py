"""The blob store interface: where instance files (Part 10) live, addressed by server keys.

A key is a string the store itself generates (`new_key`); it never comes from a UID or any
other received string, so no peer can choose where bytes land on disk.

Every method here blocks (file IO, fsync). Callers run them in the bounded executor, never on
the event loop.

Durability protocol for one group-commit of the index:

    for each instance:  size = store.put_from_spool(spool_path, key)   # placed, not yet durable
                   or:  size = store.put_bytes(key, data)
    store.sync(keys_of_the_group)        # the blobs' data and directory entries durable
    commit the index rows                # only now answer success

The index writer starts `sync` for each blob as it receives it (store/syncer.py) and runs the
group's statements meanwhile; only the commit has to wait for it.
"""

from __future__ import annotations

import abc
import hashlib
import io
import os
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

HASH_CHUNK = 1 << 20  # sha256() reads in 1 MiB pieces


def sha256_of(f: BinaryIO) -> str:
    """Hex SHA-256 of what `f` holds from where it stands, read in HASH_CHUNK pieces."""
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK)
    view = memoryview(buffer)
    while n := f.readinto(buffer):
        digest.update(view[:n])
    return digest.hexdigest()


def write_all(write: Callable[[memoryview], int], data: bytes | bytearray | memoryview) -> None:
    """Hand all of `data` to `write` (os.write, or an unbuffered file's write), which may take
    less than it is given."""
    view = memoryview(data)
    while view:
        view = view[write(view):]


class BlobStore(abc.ABC):
    """Where instance files live. Keys are server-generated strings (see new_key)."""

    @abc.abstractmethod
    def new_key(self) -> str:
        """A fresh key no other blob has or will have."""

    @abc.abstractmethod
    def put_from_spool(self, spool_path: Path, key: str) -> int:
        """Move a finished spool file into the store under `key`; return its size in bytes.

        The file is placed under its final name (parent directories created as needed), but
        neither its data nor its directory entry is durable yet: call `sync(keys)` for the
        whole group before committing the index, so one directory fsync serves many blobs
        and the fsyncs overlap the index statements.
        Raises FileExistsError, leaving the stored blob untouched, if `key` is already taken.
        On any error the spool file stays where it was (the caller discards it).
        """

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes | bytearray | memoryview) -> int:
        """Write `data` as the blob `key` (a small instance still in memory); return its size.

        Same promises as `put_from_spool`: not durable until `sync`, FileExistsError if `key`
        is taken, nothing left behind on any error.
        """

    @abc.abstractmethod
    def sync(self, keys: Iterable[str]) -> None:
        """Make these blobs durable: the data of each one placed since the last sync, and
        the directory entries (each distinct directory fsynced once)."""

    @abc.abstractmethod
    def open(self, key: str, start: int = 0, end: int | None = None) -> BinaryIO | RangeReader:
        """Read the blob, or only the bytes [start, end): EOF comes at `end` (or the file end)."""

    @abc.abstractmethod
    def delete(self, key: str) -> bool:
        """Remove the blob durably; True if it existed."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether a blob is stored under `key`."""

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """Size of the blob in bytes (FileNotFoundError if there is none)."""

    @abc.abstractmethod
    def iter_keys(self) -> Iterator[str]:
        """Every stored key, in no particular order, produced lazily (for `pacsd verify`)."""

    def sha256(self, key: str) -> str:
        """Hex SHA-256 of the blob, read in 1 MiB pieces so memory stays flat."""
        with self.open(key) as f:
            return sha256_of(f)


class RangeReader(io.RawIOBase):
    """A read-only view of the bytes [start, end) of an open binary file.

    Positions (tell, seek) are relative to `start`; reading stops at `end` as if the file ended
    there. `length` is the number of bytes in the range that the file actually holds, which is
    what an HTTP Content-Length for the range should say. Closing the reader closes the file.
    """

    def __init__(self, f: BinaryIO, start: int, end: int | None, file_size: int | None = None):
        super().__init__()
        if start < 0:
            raise ValueError(f"range start {start} is negative")
        if end is not None and end < start:
            raise ValueError(f"range end {end} is before start {start}")
        if file_size is None:
            file_size = os.fstat(f.fileno()).st_size
        stop = file_size if end is None else min(end, file_size)
        self._file = f
        self._start = start
        self._stop = max(stop, start)  # a range wholly past the file end is empty
        self._pos = 0  # relative to start
        self.length = self._stop - self._start
        f.seek(start)

    # -- reading -------------------------------------------------------------------------

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _remaining(self) -> int:
        return max(self.length - self._pos, 0)

    def read(self, n: int | None = -1) -> bytes:
        self._checkClosed()
        remaining = self._remaining()
        if n is None or n < 0 or n > remaining:
            n = remaining
        if n == 0:
            return b""
        data = self._file.read(n)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer) -> int:
        self._checkClosed()
        view = memoryview(buffer).cast("B")
        n = min(len(view), self._remaining())
        if n == 0:
            return 0
        got = self._file.readinto(view[:n])
        got = got or 0
        self._pos += got
        return got

    # -- position ------------------------------------------------------------------------

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._checkClosed()
        if whence == os.SEEK_SET:
            target = offset
        elif whence == os.SEEK_CUR:
            target = self._pos + offset
        elif whence == os.SEEK_END:
            target = self.length + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if target < 0:
            raise ValueError(f"negative seek position {target}")
        self._pos = target
        # Past the range end reads return b"" (see _remaining); keep the file where it can be.
        self._file.seek(self._start + min(target, self.length))
        return self._pos

    # -- lifetime ------------------------------------------------------------------------

    def fileno(self) -> int:
        return self._file.fileno()

    @property
    def name(self):
        return getattr(self._file, "name", None)

    def close(self) -> None:
        if not self.closed:
            try:
                self._file.close()
            finally:
                super().close()

    def __enter__(self) -> RangeReader:
        self._checkClosed()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
