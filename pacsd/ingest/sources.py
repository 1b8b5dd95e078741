"""A stored or received data set's bytes by position: transfer syntaxes and their encodings,
a 64 KiB window over a file, a streaming inflater for the deflated syntaxes, and
DataSetReader for walkers outside this package (pacsd.web). ingest/dataset.py walks data
sets through these."""

from __future__ import annotations

import struct
import zlib
from typing import BinaryIO

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
# PS3.5 A.5 and A.7: the data set after the file meta is one raw deflate stream (RFC 1951),
# explicit VR little endian inside. JPIP Referenced Deflate and its HTJ2K variant do the same.
DEFLATED_TRANSFER_SYNTAXES = frozenset({
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    "1.2.840.10008.1.2.4.95",
    "1.2.840.10008.1.2.4.205",
})

_WINDOW = 64 * 1024            # file read size for the walker's window
_INFLATE_IN = 1024 * 1024      # compressed bytes fed to the inflater per read
_INFLATE_OUT = 64 * 1024       # most inflated bytes produced per decompress() call
MAX_INFLATED = 4 * 1024 ** 3   # a deflated data set may not inflate beyond this ...
_DEFLATE_MAX_RATIO = 1032      # ... nor beyond what deflate can encode (about 1032:1)


class DataSetError(Exception):
    """The received data set is not structurally a complete DICOM data set."""


class Encoding:
    """Structs for one (VR, byte order) combination."""

    __slots__ = ("implicit", "little", "element", "implicit_element", "ul", "item", "order")

    def __init__(self, implicit: bool, little: bool) -> None:
        order = "<" if little else ">"
        self.implicit = implicit
        self.little = little
        self.order = order
        self.element = struct.Struct(order + ("HHL" if implicit else "HH2sH"))
        self.implicit_element = struct.Struct(order + "HHL")
        self.ul = struct.Struct(order + "L")
        self.item = struct.Struct(order + "HHL")

    def header(self, tag: int, length: int) -> bytes:
        return self.item.pack(tag >> 16, tag & 0xFFFF, length)


IMPLICIT_LE = Encoding(True, True)
IMPLICIT_BE = Encoding(True, False)   # only reached through pydicom-style item detection
EXPLICIT_LE = Encoding(False, True)
EXPLICIT_BE = Encoding(False, False)
BY_FLAGS = {
    (True, True): IMPLICIT_LE,
    (True, False): IMPLICIT_BE,
    (False, True): EXPLICIT_LE,
    (False, False): EXPLICIT_BE,
}


def encoding_for(transfer_syntax: str) -> tuple[Encoding, bool]:
    """(encoding, deflated) for a transfer syntax UID; unknown ones are explicit VR LE."""
    uid = transfer_syntax.rstrip("\0 ")
    if uid == IMPLICIT_VR_LITTLE_ENDIAN:
        return IMPLICIT_LE, False
    if uid == EXPLICIT_VR_BIG_ENDIAN:
        return EXPLICIT_BE, False
    return EXPLICIT_LE, uid in DEFLATED_TRANSFER_SYNTAXES


# ---------------------------------------------------------------------------------------------
# Byte sources: a window over the data set, addressed by absolute position.
# `buf` holds the data from position `base`; need(pos, n) makes the window start at or before
# pos and hold up to n bytes from it (fewer only where the data ends) and returns pos's index.


class FileSource:
    __slots__ = ("f", "end", "buf", "base", "window")

    deflated = False

    def __init__(self, f: BinaryIO, start: int, end: int, window: int = _WINDOW) -> None:
        self.f = f
        self.end = end
        self.buf = b""
        self.base = start
        self.window = window

    def need(self, pos: int, n: int) -> int:
        i = pos - self.base
        if i >= 0 and i + n <= len(self.buf):
            return i
        size = min(max(self.window, n), self.end - pos)
        if size <= 0:
            self.buf, self.base = b"", pos
            return 0
        self.f.seek(pos)
        data = self.f.read(size)
        if len(data) != size:
            raise DataSetError(
                f"the file ends at byte {pos + len(data)}, before the {self.end} bytes it had"
            )
        self.buf, self.base = data, pos
        return 0

    def skip_to(self, pos: int) -> bool:
        return pos <= self.end

    @staticmethod
    def where(pos: int) -> str:
        return f"byte {pos}"


class InflateSource:
    """The inflated data set, produced on demand; positions count inflated bytes from 0."""

    __slots__ = ("f", "z", "left_in", "compressed", "cap", "produced", "flushed", "buf", "base", "crc")

    deflated = True
    end = None   # unknown until the stream has ended

    def __init__(self, f: BinaryIO, start: int, end: int, max_inflated: int) -> None:
        self.f = f
        f.seek(start)
        self.z = zlib.decompressobj(-zlib.MAX_WBITS)
        self.left_in = end - start
        self.compressed = end - start
        self.cap = min(max_inflated, _DEFLATE_MAX_RATIO * self.compressed + _INFLATE_OUT)
        self.produced = 0
        self.crc = 0
        self.flushed = False
        self.buf = b""
        self.base = 0

    def _more(self) -> bytes:
        """The next inflated bytes (at most _INFLATE_OUT), or b"" once the stream has ended."""
        z = self.z
        while not z.eof:
            data = z.unconsumed_tail
            if not data:
                if self.left_in > 0:
                    data = self.f.read(min(_INFLATE_IN, self.left_in))
                    if not data:
                        raise DataSetError(
                            f"the file ends {self.left_in} bytes before the end of the deflated data set"
                        )
                    self.left_in -= len(data)
                elif not self.flushed:
                    # All input consumed: collect what zlib still holds (at most a match).
                    self.flushed = True
                    try:
                        out = z.flush()
                    except zlib.error as exc:
                        raise DataSetError(f"the deflate stream is corrupt: {exc}") from None
                    if out:
                        return self._count(out)
                    continue
                else:
                    raise DataSetError(
                        f"the deflate stream is truncated: its {self.compressed} bytes end without "
                        f"the final block, after {self.produced} inflated bytes"
                    )
            try:
                out = z.decompress(data, _INFLATE_OUT)
            except zlib.error as exc:
                raise DataSetError(
                    f"the deflate stream is corrupt after {self.produced} inflated bytes: {exc}"
                ) from None
            if out:
                return self._count(out)
        return b""

    def _count(self, out: bytes) -> bytes:
        self.produced += len(out)
        self.crc = zlib.crc32(out, self.crc)
        if self.produced > self.cap:
            raise DataSetError(
                f"the deflated data set inflates beyond {self.cap} bytes "
                f"({self.compressed} compressed bytes)"
            )
        return out

    def need(self, pos: int, n: int) -> int:
        i = pos - self.base
        if i + n <= len(self.buf):
            return i
        if i > len(self.buf) and not self.skip_to(pos):
            self.buf, self.base = b"", pos
            return 0
        buf = self.buf[pos - self.base:]
        while len(buf) < n:
            more = self._more()
            if not more:
                break
            buf += more
        self.buf, self.base = buf, pos
        return 0

    def skip_to(self, pos: int) -> bool:
        """Inflate and drop bytes up to pos; False if the stream ends before it."""
        while self.base + len(self.buf) < pos:
            self.base += len(self.buf)
            self.buf = b""
            more = self._more()
            if not more:
                return False
            self.buf = more
        return True

    def check_trailer(self) -> None:
        """After the end of the stream: allow one pad byte, or a gzip trailer that matches.

        Some writers deflate with gzip and strip only its header, leaving the 8-byte trailer
        (CRC-32 and size of the inflated data) after the deflate stream; pydicom's
        image_dfl.dcm is one. Anything else after the stream is an error.
        """
        count = len(self.z.unused_data) + self.left_in
        if count <= 1:
            return
        if count in (8, 9):
            tail = self.z.unused_data[:8]
            if len(tail) < 8:
                tail += self.f.read(8 - len(tail))
            if len(tail) == 8 and struct.unpack("<LL", tail) == (self.crc, self.produced & 0xFFFFFFFF):
                return
        raise DataSetError(
            f"{count} bytes follow the end of the deflate stream after {self.produced} inflated bytes "
            f"(allowed: one pad byte, or a gzip trailer matching the inflated data)"
        )

    @staticmethod
    def where(pos: int) -> str:
        return f"inflated byte {pos}"


class DataSetReader:
    """The bytes of a stored data set by position, for walkers of their own (pacsd.web).

    Positions are file offsets; for the deflated transfer syntaxes they count inflated bytes
    from 0 (`start`), and reading goes forward only. `end` is the end of the data set, None
    for a deflated one (known when the stream ends). Raises DataSetError where the walker
    here would: a corrupt or truncated deflate stream, one that inflates beyond its cap.
    """

    def __init__(self, f: BinaryIO, start: int, end: int, transfer_syntax: str, *,
                 window: int = _WINDOW, max_inflated: int = MAX_INFLATED) -> None:
        _, deflated = encoding_for(transfer_syntax)
        if deflated:
            self._src = InflateSource(f, start, end, max_inflated)
            self.start, self.end = 0, None
        else:
            self._src = FileSource(f, start, end, window)
            self.start, self.end = start, end

    def read(self, pos: int, n: int) -> bytes:
        """Up to n bytes at pos: fewer only where the data set ends."""
        src = self._src
        if not src.deflated:
            i = src.need(pos, n)
            return src.buf[i:i + n]
        if pos < src.base:
            raise DataSetError(f"cannot go back to {src.where(pos)} (the inflater is at {src.base})")
        if n <= _INFLATE_OUT:
            i = src.need(pos, n)
            return src.buf[i:i + n]
        # Large reads in inflater-sized pieces: need() grows its window by concatenation.
        parts = []
        while n > 0:
            part = self.read(pos, min(n, _INFLATE_OUT))
            if not part:
                break
            parts.append(part)
            pos += len(part)
            n -= len(part)
        return b"".join(parts)
