"""Where a received data set goes while it arrives: memory while small, then a file.

The file lives in the spool directory under a random name (never a received string), so
a crash leaves at worst an orphan spool file that the startup sweep removes.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

from pacsd.store.blobstore import write_all

# Data sets below this stay in memory: C-FIND identifiers, N-ACTION lists, small SRs.
# Above it the bytes stream to disk, so memory stays flat whatever the object size.
MEMORY_THRESHOLD = 256 * 1024


class Spool:
    """Append-only sink for one data set, optionally prefixed (e.g. by a Part 10 header)."""

    def __init__(self, directory: Path, prefix: bytes = b"", threshold: int = MEMORY_THRESHOLD):
        self.directory = directory
        self.threshold = threshold
        self.prefix_length = len(prefix)
        self._memory: bytearray | None = bytearray(prefix)
        # SHA-256 of the prefix and every fragment, taken as they arrive: while the sender is
        # still sending, not as a pass over the whole file after the last byte. Every byte
        # hashed must land in the file too, hence write_all.
        self._digest = hashlib.sha256(prefix)
        self._file = None
        self.path: Path | None = None
        self.size = 0  # data set bytes, without the prefix
        # A write that failed (disk full): the rest of the data set is received and dropped,
        # so the association stays in step and the request can be answered A700.
        self.error: OSError | None = None
        # A request the service refused before its data set arrived (status, comment): the
        # data set is received and dropped the same way.
        self.refusal: tuple[int, str] | None = None

    def refuse(self, status: int, comment: str) -> None:
        self.refusal = (status, comment)
        self.error = OSError(0, comment)
        self.discard()

    def write(self, fragment: memoryview | bytes) -> None:
        self.size += len(fragment)
        if self.error is not None:
            return
        self._digest.update(fragment)
        try:
            if self._memory is not None:
                self._memory += fragment
                if len(self._memory) > self.threshold:
                    self._spill()
            else:
                write_all(self._file.write, fragment)
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        # Without its traceback: the frames it holds hold the fragment, a memoryview of the
        # PDU framer's buffer, which then cannot be resized (BufferError on the next read).
        self.error = exc.with_traceback(None)
        self.discard()

    def _spill(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / f"{uuid.uuid4().hex}.spool"
        self._file = open(self.path, "wb", buffering=0)  # fragments are large: no copy into a buffer
        memory, self._memory = self._memory, None
        write_all(self._file.write, memory)

    def finish(self, to_file: bool = False) -> None:
        """No more fragments: flush what is buffered (fsync is the storage layer's job).

        `to_file` puts even a small data set into a file (the storage pipeline renames it).
        """
        if self.error is not None:
            return
        try:
            if to_file and self._memory is not None:
                self._spill()
            if self._file is not None:
                self._file.close()
        except OSError as exc:
            self._fail(exc)

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of everything written (prefix included)."""
        return self._digest.hexdigest()

    @property
    def in_memory(self) -> bool:
        return self._memory is not None

    def take_buffer(self) -> bytearray:
        """Hand over the in-memory bytes (prefix included); the spool is empty afterwards."""
        assert self._memory is not None
        memory, self._memory = self._memory, None
        return memory

    def read(self) -> bytes:
        """The data set bytes (without prefix). Only for small data sets or tests."""
        if self._memory is not None:
            return bytes(self._memory[self.prefix_length :])
        with open(self.path, "rb") as f:
            f.seek(self.prefix_length)
            return f.read()

    def discard(self) -> None:
        if self._file is not None and not self._file.closed:
            try:
                self._file.close()
            except OSError:
                pass  # flushing the buffer hit the same full disk; the file goes anyway
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self._memory = None
        self.path = None


def sweep(directory: Path) -> int:
    """Remove spool files a previous run left behind; returns how many."""
    removed = 0
    if directory.is_dir():
        for entry in directory.iterdir():
            if entry.suffix == ".spool" and entry.is_file():
                entry.unlink(missing_ok=True)
                removed += 1
    return removed
