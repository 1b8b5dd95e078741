"""Received data sets: structural check, header read, Part 10 file meta (PS3.5 §7, PS3.10 §7).

A C-STORE data set reaches the spool as a Part 10 file: 128-byte preamble, "DICM", the file
meta group built by `build_file_meta`, then the data set bytes exactly as received in the
negotiated transfer syntax. Before the instance is stored:

- `check_structure` walks every element header from the start of the data set to the end of
  the file, skipping over values, and raises `DataSetError` unless the data set is complete:
  no element, item, sequence or fragment runs past its container or the end of the file, every
  undefined length is closed by its delimiter, nesting stays within `max_depth`, and the walk
  ends exactly at the end of the file.
- `read_header` returns the elements before the pixel data as a pydicom Dataset, for the
  index, without reading pixel data or any other large value into memory.

Both share one walker, which reads the file through a 64 KiB window (or, for the deflated
transfer syntaxes, through a streaming inflater), so a length is never used to size a read
before it has been checked against its container and the end of the data.

What the walker accepts beyond the letter of PS3.5, because real senders and pydicom do:
odd value lengths; an item delimiter closing a defined-length item, or a sequence delimiter
closing a defined-length sequence, when it ends exactly at the container's end; items of an
explicit VR sequence that are encoded in implicit VR (detected from the first element of each
item, as pydicom does) and, inside such items, single elements whose VR bytes are not letters
(read as implicit VR); a VR made of two letters that PS3.5 does not define (read with a 2-byte
length, as pydicom does); group 0002 elements in the data set; (FFFC,FFFC) Data Set Trailing
Padding; one pad byte after the end of a deflate stream. At the top level the transfer syntax
is trusted: a data set whose first-level VRs are not letters in an explicit VR syntax is an
error, as are group 0000 (command) elements anywhere in a data set - that is also what stray
zero bytes decode to.

A data set cut off exactly between two top-level elements is structurally complete and passes
`check_structure`; whether its required attributes are present is for the caller to check.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.datadict import DicomDictionary
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import RawDataElement, empty_value_for_VR
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.values import convert_string

__all__ = [
    "DataSetError",
    "check_structure",
    "read_header",
    "build_file_meta",
    "DataSetReader",
    "IMPLICIT_VR_LITTLE_ENDIAN",
    "EXPLICIT_VR_LITTLE_ENDIAN",
    "EXPLICIT_VR_BIG_ENDIAN",
    "DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN",
    "DEFLATED_TRANSFER_SYNTAXES",
    "MAX_HEADER_VALUE",
]

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

# Values longer than this are left out of read_header's Dataset (never read into memory).
MAX_HEADER_VALUE = 64 * 1024
# read_header refuses a header whose kept bytes exceed this (many values just under the cap).
MAX_HEADER_BYTES = 64 * 1024 * 1024

_WINDOW = 64 * 1024            # file read size for the walker's window
_INFLATE_IN = 1024 * 1024      # compressed bytes fed to the inflater per read
_INFLATE_OUT = 64 * 1024       # most inflated bytes produced per decompress() call
MAX_INFLATED = 4 * 1024 ** 3   # a deflated data set may not inflate beyond this ...
_DEFLATE_MAX_RATIO = 1032      # ... nor beyond what deflate can encode (about 1032:1)

_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})

# Explicit VR: these VRs have 2 reserved bytes and a 4-byte length (PS3.5 Table 7.1-1).
_LONG_VRS = frozenset(
    vr.encode() for vr in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV")
)
# Explicit VR values of undefined length that hold fragments rather than items of data sets.
_FRAGMENT_VRS = frozenset(vr.encode() for vr in ("OB", "OD", "OF", "OL", "OV", "OW"))
# Implicit VR: a defined-length element is walked as a sequence when the dictionary says SQ.
_SQ_TAGS = frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ")
_SQ_REPEATER_MASK, _SQ_REPEATER = 0xFF00FFFF, 0x50002600   # (50xx,2600), retired curves

_MODE_EXACT = 0       # a defined-length container: ends exactly at its limit
_MODE_DELIMITED = 1   # an undefined-length container: ends at its delimiter
_MODE_STREAM = 2      # the top level of a deflated data set: ends where the stream ends


class DataSetError(Exception):
    """The received data set is not structurally a complete DICOM data set."""


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _describe(where: str | tuple) -> str:
    """Containers are named lazily: a string, (sequence tag,) or (sequence tag, item number)."""
    if isinstance(where, str):
        return where
    if len(where) == 1:
        return f"sequence {_tag(where[0])}"
    return f"item {where[1]} of sequence {_tag(where[0])}"


class _Encoding:
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


_IMPLICIT_LE = _Encoding(True, True)
_IMPLICIT_BE = _Encoding(True, False)   # only reached through pydicom-style item detection
_EXPLICIT_LE = _Encoding(False, True)
_EXPLICIT_BE = _Encoding(False, False)
_BY_FLAGS = {
    (True, True): _IMPLICIT_LE,
    (True, False): _IMPLICIT_BE,
    (False, True): _EXPLICIT_LE,
    (False, False): _EXPLICIT_BE,
}


def _encoding_for(transfer_syntax: str) -> tuple[_Encoding, bool]:
    """(encoding, deflated) for a transfer syntax UID; unknown ones are explicit VR LE."""
    uid = transfer_syntax.rstrip("\0 ")
    if uid == IMPLICIT_VR_LITTLE_ENDIAN:
        return _IMPLICIT_LE, False
    if uid == EXPLICIT_VR_BIG_ENDIAN:
        return _EXPLICIT_BE, False
    return _EXPLICIT_LE, uid in DEFLATED_TRANSFER_SYNTAXES


# ---------------------------------------------------------------------------------------------
# Byte sources: a window over the data set, addressed by absolute position.
# `buf` holds the data from position `base`; need(pos, n) makes the window start at or before
# pos and hold up to n bytes from it (fewer only where the data ends) and returns pos's index.


class _FileSource:
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


class _InflateSource:
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
        _, deflated = _encoding_for(transfer_syntax)
        if deflated:
            self._src = _InflateSource(f, start, end, max_inflated)
            self.start, self.end = 0, None
        else:
            self._src = _FileSource(f, start, end, window)
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


# ---------------------------------------------------------------------------------------------
# The walker


class _Walker:
    """Walks element headers; in header mode also copies the elements worth keeping.

    Header mode stops at the first top-level pixel data element and builds `out`, a copy of
    the data set before it without values over `max_value` bytes. A sequence or item that
    lost an element on the way is re-encoded with undefined length (and its delimiter), so
    the copy stays a well-formed data set that pydicom reads exactly as it would the original.
    """

    def __init__(self, src, max_depth: int, header: bool = False,
                 max_value: int = MAX_HEADER_VALUE, max_header: int = MAX_HEADER_BYTES,
                 check_rest: bool = False) -> None:
        self.src = src
        # Header mode: after the pixel data element, walk on to the end as check_structure does.
        self.check_rest = check_rest
        self.copied: list[bytes] | None = None
        self.max_depth = max_depth
        self.out: list[bytes] | None = [] if header else None
        # Header mode: top-level elements other than sequences, as pydicom's raw elements
        # (pydicom would otherwise parse the copy of them again).
        self.raw: list[RawDataElement] | None = [] if header else None
        self.max_value = max_value
        self.max_header = max_header
        self.kept = 0
        self.dropped = 0
        self.pixel_offset: int | None = None
        self.pos = 0

    # -- errors ------------------------------------------------------------------------------

    def _ends(self, pos: int, where) -> DataSetError:
        return DataSetError(f"data set ends at {self.src.where(pos)} inside {_describe(where)}")

    def _short(self, pos: int, have: int, limit: int | None, exact: bool, where, what: str) -> DataSetError:
        """Fewer bytes than `what` needs: the container's end (exact), an outer one, or the data's."""
        at = self.src.where(pos)
        if limit is not None and have == limit - pos:
            if where == "the data set":
                return DataSetError(
                    f"{have} trailing bytes at {at} after the last element are too short for {what}"
                )
            if exact:
                return DataSetError(
                    f"{have} bytes left at {at} at the end of {_describe(where)} are too short for {what}"
                )
            if self.src.end is not None and limit < self.src.end:
                return DataSetError(
                    f"{_describe(where)} reaches the end of its container at {self.src.where(limit)} "
                    f"without its delimiter"
                )
        if have == 0:
            return self._ends(pos, where)
        return DataSetError(f"data set ends at {at} inside {what} in {_describe(where)}")

    def _command(self, tag: int, pos: int, where) -> DataSetError:
        return DataSetError(
            f"command element {_tag(tag)} at {self.src.where(pos)} inside {_describe(where)} "
            f"(group 0000 has no place in a data set; zero padding?)"
        )

    def _past(self, what: str, length: int, pos: int, limit: int | None, where) -> DataSetError:
        where = _describe(where)
        if limit is None or (self.src.end is not None and limit >= self.src.end) or where == "the data set":
            if limit is None:
                limit = self.src.produced   # deflated: the stream has just ended there
            return DataSetError(
                f"{what} length {length} at {self.src.where(pos)} runs past the end of the data set "
                f"at {self.src.where(limit)}"
            )
        return DataSetError(
            f"{what} length {length} at {self.src.where(pos)} runs past the end of {where} "
            f"at {self.src.where(limit)}"
        )

    # -- copying (header mode) ------------------------------------------------------------------

    def _raw(self, pos: int, hdr: int, length: int, tag: int, vr: bytes | None, enc: _Encoding,
             limit: int | None, where) -> None:
        src = self.src
        n = hdr + length
        i = src.need(pos, n)
        if len(src.buf) - i < n:
            raise self._past(f"element {_tag(tag)}", length, pos, limit, where)
        self._count(n)
        name = None if vr is None else vr.decode("latin-1")
        value = bytes(src.buf[i + hdr:i + n]) if length else empty_value_for_VR(name, raw=True)
        self.raw.append(RawDataElement(BaseTag(tag), name, length, value, pos + hdr, enc.implicit, enc.little))

    def _keep(self, chunk: bytes) -> None:
        self.out.append(chunk)
        self._count(len(chunk))

    def _count(self, n: int) -> None:
        self.kept += n
        if self.kept > self.max_header:
            raise DataSetError(
                f"the elements before the pixel data exceed {self.max_header} bytes"
            )

    def _copy(self, pos: int, n: int, what: str, length: int, limit: int | None, where) -> None:
        src = self.src
        i = src.need(pos, n)
        if len(src.buf) - i < n:
            raise self._past(what, length, pos, limit, where)
        self._keep(src.buf[i:i + n])

    # -- structure ------------------------------------------------------------------------------

    def _item_encoding(self, pos: int, limit: int | None, enc: _Encoding) -> _Encoding:
        """pydicom's rule for items in explicit VR: implicit unless the first VR is letters."""
        src = self.src
        i = src.need(pos, 6)
        if len(src.buf) - i >= 6 and (limit is None or limit - pos >= 6):
            a, b = src.buf[i + 4], src.buf[i + 5]
            return _BY_FLAGS[(not (65 <= a <= 90 and 65 <= b <= 90), enc.little)]
        return enc

    def dataset(self, enc: _Encoding, limit: int | None, mode: int, depth: int, where) -> bool:
        """Walk the elements of a data set or item from self.pos.

        Returns True if the container ended with an item delimiter (consumed, and copied in
        header mode), False otherwise.
        """
        src = self.src
        out = self.out
        top = depth == 0
        switch = depth > 0 and not enc.implicit
        unpack = enc.element.unpack_from
        unpack_ul = enc.ul.unpack_from
        implicit = enc.implicit
        while True:
            pos = self.pos
            if mode == _MODE_EXACT and pos == limit:
                return False
            i = src.need(pos, 12)
            buf = src.buf
            have = len(buf) - i
            if limit is not None and limit - pos < have:
                have = limit - pos
            if have < 8:
                if have == 0 and mode == _MODE_STREAM:
                    return False
                raise self._short(pos, have, limit, mode == _MODE_EXACT, where, "an element header")
            element_enc = enc
            if implicit:
                group, elem, length = unpack(buf, i)
                vr = None
                hdr = 8
            else:
                group, elem, vr, length = unpack(buf, i)
                if group == 0xFFFE:
                    length = unpack_ul(buf, i + 4)[0]
                    vr = None
                    hdr = 8
                elif vr in _LONG_VRS:
                    if have < 12:
                        raise self._short(pos, have, limit, mode == _MODE_EXACT, where,
                                          f"the header of element {_tag(group << 16 | elem)}")
                    length = unpack_ul(buf, i + 8)[0]
                    hdr = 12
                elif 65 <= vr[0] <= 90 and 65 <= vr[1] <= 90:
                    hdr = 8
                elif switch:
                    group, elem, length = enc.implicit_element.unpack_from(buf, i)
                    vr = None
                    hdr = 8
                    element_enc = _BY_FLAGS[(True, enc.little)]
                elif group == 0:
                    raise self._command(group << 16 | elem, pos, where)
                else:
                    raise DataSetError(
                        f"element {_tag(group << 16 | elem)} at {src.where(pos)} has VR bytes {vr!r}, "
                        f"which are not a VR (is the data set really in explicit VR?)"
                    )
            tag = group << 16 | elem

            if group == 0xFFFE:
                if tag == _ITEM_DELIMITER and (
                    mode == _MODE_DELIMITED or (mode == _MODE_EXACT and not top and pos + 8 == limit)
                ):
                    if out is not None:
                        self._keep(buf[i:i + 8])
                    self.pos = pos + 8
                    return True
                name = {
                    _ITEM: "an item tag",
                    _ITEM_DELIMITER: "an item delimiter",
                    _SEQUENCE_DELIMITER: "a sequence delimiter",
                }.get(tag, "a tag of group FFFE")
                raise DataSetError(
                    f"{name} {_tag(tag)} at {src.where(pos)} where {_describe(where)} needs a data element"
                )
            if group == 0:
                raise self._command(tag, pos, where)
            if top and out is not None and tag in _PIXEL_TAGS:
                self.pixel_offset = pos
                if not self.check_rest:
                    return False
                # The header is complete: the rest of the walk only checks the structure.
                self.copied, self.out, out = self.out, None, None

            start = pos + hdr
            if length == _UNDEFINED:
                if tag in _PIXEL_TAGS or vr in _FRAGMENT_VRS:
                    self.pos = start
                    self.fragments(element_enc, limit, tag, pos, hdr, where)
                elif vr is None or vr == b"SQ" or vr == b"UN":
                    if out is not None:
                        self._keep(buf[i:i + hdr])
                    self.pos = start
                    if vr == b"UN":
                        # PS3.5 6.2.2: the value is a sequence in implicit VR little endian
                        # (items are still checked for explicit VR, as pydicom does).
                        self.sequence(_IMPLICIT_LE, None, _MODE_DELIMITED, limit, depth + 1, tag, True)
                    else:
                        self.sequence(element_enc, None, _MODE_DELIMITED, limit, depth + 1, tag,
                                      not element_enc.implicit)
                else:
                    raise DataSetError(
                        f"element {_tag(tag)} at {src.where(pos)} has undefined length, "
                        f"which VR {vr.decode('latin-1')} does not allow"
                    )
                continue

            end = start + length
            if limit is not None and end > limit:
                raise self._past(f"element {_tag(tag)}", length, pos, limit, where)
            if vr == b"SQ" or (vr is None and (tag in _SQ_TAGS or tag & _SQ_REPEATER_MASK == _SQ_REPEATER)):
                if out is not None:
                    hidx = len(out)
                    self._keep(buf[i:i + hdr])
                    before = self.dropped
                self.pos = start
                delimited = False
                if length:
                    delimited = self.sequence(element_enc, end, _MODE_EXACT, limit, depth + 1, tag,
                                              not element_enc.implicit)
                if out is not None and self.dropped != before:
                    out[hidx] = bytes(out[hidx][:hdr - 4]) + b"\xff\xff\xff\xff"
                    if not delimited:
                        self._keep(element_enc.header(_SEQUENCE_DELIMITER, 0))
                continue

            if out is not None:
                if length > self.max_value:
                    self.dropped += 1
                elif top:
                    self._raw(pos, hdr, length, tag, vr, element_enc, limit, where)
                else:
                    self._copy(pos, hdr + length, f"element {_tag(tag)}", length, limit, where)
            if end > src.base + len(src.buf) and not src.skip_to(end):
                raise self._past(f"element {_tag(tag)}", length, pos, limit, where)
            self.pos = end

    def sequence(self, enc: _Encoding, limit: int | None, mode: int, outer: int | None,
                 depth: int, seq_tag: int, detect: bool) -> bool:
        """Walk the items of a sequence from self.pos; True if it ended with its delimiter.

        `limit` is the sequence's own end when it has a defined length (mode exact);
        for an undefined length, `outer` bounds it.
        """
        src = self.src
        out = self.out
        where = (seq_tag,)
        if depth > self.max_depth:
            raise DataSetError(
                f"sequence {_tag(seq_tag)} at {src.where(self.pos)} is nested {depth} sequences deep, "
                f"more than the limit of {self.max_depth}"
            )
        bound = limit if mode == _MODE_EXACT else outer
        unpack = enc.item.unpack_from
        number = 0
        while True:
            pos = self.pos
            if mode == _MODE_EXACT and pos == limit:
                return False
            i = src.need(pos, 8)
            buf = src.buf
            have = len(buf) - i
            if bound is not None and bound - pos < have:
                have = bound - pos
            if have < 8:
                if bound is not None and have == bound - pos and mode == _MODE_EXACT:
                    raise DataSetError(
                        f"{have} bytes left at {src.where(pos)} at the end of sequence {_tag(seq_tag)} "
                        f"are too short for an item"
                    )
                raise self._ends(pos, where)
            group, elem, length = unpack(buf, i)
            tag = group << 16 | elem
            if tag == _ITEM:
                number += 1
                item_where = (seq_tag, number)
                start = pos + 8
                if out is not None:
                    hidx = len(out)
                    self._keep(buf[i:i + 8])
                    before = self.dropped
                self.pos = start
                if length == _UNDEFINED:
                    item_enc = self._item_encoding(start, bound, enc) if detect else enc
                    delimited = self.dataset(item_enc, bound, _MODE_DELIMITED, depth, item_where)
                else:
                    end = start + length
                    if bound is not None and end > bound:
                        raise self._past(_describe(item_where), length, pos, bound,
                                         where if mode == _MODE_EXACT else "its container")
                    item_enc = self._item_encoding(start, end, enc) if detect else enc
                    delimited = self.dataset(item_enc, end, _MODE_EXACT, depth, item_where)
                if out is not None and self.dropped != before:
                    out[hidx] = enc.header(_ITEM, _UNDEFINED)
                    if not delimited:
                        self._keep(enc.header(_ITEM_DELIMITER, 0))
            elif tag == _SEQUENCE_DELIMITER and (mode == _MODE_DELIMITED or pos + 8 == limit):
                if out is not None:
                    self._keep(buf[i:i + 8])
                self.pos = pos + 8
                return True
            elif tag == _SEQUENCE_DELIMITER:
                raise DataSetError(
                    f"sequence delimiter at {src.where(pos)} inside the defined-length sequence {_tag(seq_tag)}"
                )
            else:
                raise DataSetError(
                    f"sequence {_tag(seq_tag)} has {_tag(tag)} at {src.where(pos)} where an item (FFFE,E000) "
                    f"or its sequence delimiter (FFFE,E0DD) should be"
                )

    def fragments(self, enc: _Encoding, limit: int | None, tag: int, pos0: int, hdr: int,
                  container) -> None:
        """Walk an encapsulated value: defined-length items up to the sequence delimiter."""
        src = self.src
        where = f"the encapsulated value of {_tag(tag)}"
        parts: list[bytes] | None = None
        size = 0
        if self.out is not None:
            i = src.need(pos0, hdr)
            parts = [src.buf[i:i + hdr]]
            size = hdr
        unpack = enc.item.unpack_from
        number = 0
        while True:
            pos = self.pos
            i = src.need(pos, 8)
            buf = src.buf
            have = len(buf) - i
            if limit is not None and limit - pos < have:
                have = limit - pos
            if have < 8:
                raise self._ends(pos, where)
            group, elem, length = unpack(buf, i)
            item = group << 16 | elem
            if item == _ITEM:
                number += 1
                if length == _UNDEFINED:
                    raise DataSetError(
                        f"fragment {number} of {where} at {src.where(pos)} has undefined length"
                    )
                end = pos + 8 + length
                what = f"fragment {number} of {_tag(tag)}"
                if limit is not None and end > limit:
                    raise self._past(what, length, pos, limit, container)
                if parts is not None:
                    size += 8 + length
                    if size > self.max_value:
                        parts = None
                        self.dropped += 1
                    else:
                        i = src.need(pos, 8 + length)
                        if len(src.buf) - i < 8 + length:
                            raise self._past(what, length, pos, limit, container)
                        parts.append(src.buf[i:i + 8 + length])
                if end > src.base + len(src.buf) and not src.skip_to(end):
                    raise self._past(what, length, pos, limit, container)
                self.pos = end
            elif item == _SEQUENCE_DELIMITER:
                if parts is not None:
                    parts.append(buf[i:i + 8])
                    for part in parts:
                        self._keep(part)
                self.pos = pos + 8
                return
            else:
                raise DataSetError(
                    f"{where} has {_tag(item)} at {src.where(pos)} where a fragment item (FFFE,E000) "
                    f"or the sequence delimiter (FFFE,E0DD) should be"
                )


# ---------------------------------------------------------------------------------------------
# Public API


def check_structure(f: BinaryIO, start: int, end: int, transfer_syntax: str,
                    max_depth: int = 16, *, max_inflated: int = MAX_INFLATED) -> None:
    """Check that the data set in f[start:end] is structurally complete; raise DataSetError if not.

    `end` is the size of the file: the data set must end exactly there. No value is read into
    memory: values are seeked over (for deflated syntaxes, inflated in 64 KiB pieces and
    dropped). `max_depth` limits sequence nesting; `max_inflated` caps a deflated data set's
    inflated size (deflate's own ~1032:1 ratio caps it further).
    """
    if not 0 <= start <= end:
        raise ValueError(f"bad data set range {start}..{end}")
    enc, deflated = _encoding_for(transfer_syntax)
    if deflated:
        src = _InflateSource(f, start, end, max_inflated)
        walker = _Walker(src, max_depth)
        walker.pos = 0
        walker.dataset(enc, None, _MODE_STREAM, 0, "the data set")
        src.check_trailer()
    else:
        src = _FileSource(f, start, end)
        walker = _Walker(src, max_depth)
        walker.pos = start
        walker.dataset(enc, end, _MODE_EXACT, 0, "the data set")


def read_header(path: Path | BinaryIO, offset: int, transfer_syntax: str, *,
                max_value: int = MAX_HEADER_VALUE, max_header: int = MAX_HEADER_BYTES,
                max_depth: int = 16, whole: bool = False) -> tuple[pydicom.Dataset, int | None]:
    """The data set's elements before the pixel data, and where the pixel data element starts.

    Reads the data set that starts at byte `offset` of the file at `path` up to, not
    including, the first top-level (7FE0,0010) Pixel Data, (7FE0,0008) Float Pixel Data or
    (7FE0,0009) Double Float Pixel Data. Returns a pydicom Dataset holding every element before
    it, in sequences too, EXCEPT those whose value is longer than `max_value` bytes (64 KiB):
    those are left out of the Dataset altogether and never read (a big private OB, overlay or
    waveform data, an encapsulated icon). Sequences are walked, so only the big values inside
    them go; an element whose VR the walker cannot know is one value (in implicit VR, a private
    element of defined length, which pydicom may later read as a sequence). A sequence or item
    that lost an element is handed to pydicom re-encoded with undefined length. The Dataset
    needs no file behind it afterwards.
    Values decode as pydicom decodes them: VRs from pydicom's dictionary for implicit VR,
    text through (0008,0005) Specific Character Set when accessed.

    The second value is the position of the pixel data element's tag: a byte offset in the
    file, except for deflated syntaxes, where it is `offset` plus the tag's position in the
    inflated data set (the file cannot be seeked to it). None when there is no pixel data.

    Raises DataSetError when the structure before the pixel data is broken, or when the kept
    elements exceed `max_header` bytes. For a deflated data set only as much is inflated as
    the walk needs. With `whole`, the walk goes on to the end of the data and checks all of
    it as `check_structure` does, in the same pass (the ingest path's one walk).
    """
    enc, deflated = _encoding_for(transfer_syntax)
    # `path` may also be an open binary file (the ingest passes the bytes it still holds).
    with (open(path, "rb") if isinstance(path, (str, os.PathLike)) else contextlib.nullcontext(path)) as f:
        size = f.seek(0, os.SEEK_END)
        if not 0 <= offset <= size:
            raise DataSetError(f"data set offset {offset} is outside the {size}-byte file")
        if deflated:
            src = _InflateSource(f, offset, size, MAX_INFLATED)
            walker = _Walker(src, max_depth, header=True, max_value=max_value, max_header=max_header,
                             check_rest=whole)
            walker.pos = 0
            walker.dataset(enc, None, _MODE_STREAM, 0, "the data set")
            if whole:
                src.check_trailer()
            pixel = None if walker.pixel_offset is None else offset + walker.pixel_offset
        else:
            src = _FileSource(f, offset, size)
            walker = _Walker(src, max_depth, header=True, max_value=max_value, max_header=max_header,
                             check_rest=whole)
            walker.pos = offset
            walker.dataset(enc, size, _MODE_EXACT, 0, "the data set")
            pixel = walker.pixel_offset
    return _header_dataset(walker, enc), pixel


def _header_dataset(walker: _Walker, enc: _Encoding) -> pydicom.Dataset:
    """The walker's top-level raw elements, with its copy of the sequences parsed by pydicom
    (in the data set's character set, which their items inherit), as one Dataset."""
    if walker.copied is not None:
        walker.out = walker.copied
    elements = {element.tag: element for element in walker.raw}
    encoding: str | list[str] = default_encoding
    charset = elements.get(0x00080005)
    if charset is not None:
        encoding = convert_encodings(convert_string(charset.value or b"", enc.little))
    if walker.out:
        sequences = read_dataset(io.BytesIO(b"".join(walker.out)), enc.implicit, enc.little,
                                 parent_encoding=encoding)
        elements.update((tag, sequences.get_item(tag)) for tag in sequences.keys())
    walker.out = walker.raw = None
    ds = pydicom.Dataset(dict(sorted(elements.items())))
    ds.set_original_encoding(enc.implicit, enc.little, encoding)
    return ds


# ---------------------------------------------------------------------------------------------
# File meta

_PREAMBLE = b"\x00" * 128 + b"DICM"
_UID_RE = re.compile(r"[0-9.]{1,64}")
_SHORT = struct.Struct("<HH2sH")
_LONG = struct.Struct("<HH2s2xL")


def _uid(name: str, value: str) -> bytes:
    if not isinstance(value, str) or not _UID_RE.fullmatch(value):
        raise ValueError(f"{name} {value!r} is not a UID (digits and dots, at most 64)")
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) & 1 else raw


def _text(name: str, value: str, limit: int) -> bytes:
    try:
        raw = value.encode("ascii")
    except (UnicodeEncodeError, AttributeError):
        raise ValueError(f"{name} {value!r} is not ASCII text") from None
    if len(raw) > limit or b"\\" in raw or any(c < 0x20 or c == 0x7F for c in raw):
        raise ValueError(f"{name} {value!r} is not a valid value (at most {limit} printable characters)")
    return raw + b" " if len(raw) & 1 else raw


def build_file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
                    source_ae: str, implementation_class_uid: str,
                    implementation_version: str) -> bytes:
    """Preamble, "DICM" and the File Meta Information group (PS3.10 §7.1), explicit VR LE.

    Writes (0002,0000), (0002,0001) = 00 01, (0002,0002), (0002,0003), (0002,0010),
    (0002,0012), then (0002,0013) Implementation Version Name and (0002,0016) Source
    Application Entity Title unless they are empty (both are Type 3). UIDs are padded with
    NUL, text with a space, to even length. Raises ValueError for a value that is not a UID,
    or not ASCII text within its VR's length (SH and AE: 16).
    """
    body = [
        _LONG.pack(2, 0x0001, b"OB", 2) + b"\x00\x01",
    ]
    for elem, name, value in (
        (0x0002, "Media Storage SOP Class UID", sop_class_uid),
        (0x0003, "Media Storage SOP Instance UID", sop_instance_uid),
        (0x0010, "Transfer Syntax UID", transfer_syntax),
        (0x0012, "Implementation Class UID", implementation_class_uid),
    ):
        raw = _uid(name, value)
        body.append(_SHORT.pack(2, elem, b"UI", len(raw)) + raw)
    if implementation_version:
        raw = _text("Implementation Version Name", implementation_version, 16)
        body.append(_SHORT.pack(2, 0x0013, b"SH", len(raw)) + raw)
    if source_ae:
        raw = _text("Source Application Entity Title", source_ae, 16)
        body.append(_SHORT.pack(2, 0x0016, b"AE", len(raw)) + raw)
    group = b"".join(body)
    return _PREAMBLE + _SHORT.pack(2, 0x0000, b"UL", 4) + struct.pack("<L", len(group)) + group
