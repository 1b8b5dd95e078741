"""Received data sets: structural check and header read (PS3.5 §7).

A C-STORE data set reaches the spool as a Part 10 file: 128-byte preamble, "DICM", the file
meta group built by `filemeta.build_file_meta`, then the data set bytes exactly as received in the
negotiated transfer syntax. Before the instance is stored:

- `check_structure` walks every element header from the start of the data set to the end of
  the file, skipping over values, and raises `DataSetError` unless the data set is complete:
  no element, item, sequence or fragment runs past its container or the end of the file, every
  undefined length is closed by its delimiter, nesting stays within `max_depth`, and the walk
  ends exactly at the end of the file.
- `read_header` returns the elements before the pixel data as a pydicom Dataset, for the
  index, without reading pixel data or any other large value into memory.

Both share one walker, which reads the file through a 64 KiB window (or, for the deflated
transfer syntaxes, through a streaming inflater; both in sources.py), so a length is never
used to size a read before it has been checked against its container and the end of the data.

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
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.datadict import DicomDictionary
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import RawDataElement, empty_value_for_VR
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.values import convert_string

from pacsd.ingest.sources import (
    BY_FLAGS,
    IMPLICIT_LE,
    MAX_INFLATED,
    DataSetError,
    Encoding,
    FileSource,
    InflateSource,
    encoding_for,
)

__all__ = [
    "DataSetError",
    "check_structure",
    "read_header",
    "MAX_HEADER_VALUE",
]

# Values longer than this are left out of read_header's Dataset (never read into memory).
MAX_HEADER_VALUE = 64 * 1024
# read_header refuses a header whose kept bytes exceed this (many values just under the cap).
MAX_HEADER_BYTES = 64 * 1024 * 1024

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


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _describe(where: str | tuple) -> str:
    """Containers are named lazily: a string, (sequence tag,) or (sequence tag, item number)."""
    if isinstance(where, str):
        return where
    if len(where) == 1:
        return f"sequence {_tag(where[0])}"
    return f"item {where[1]} of sequence {_tag(where[0])}"


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

    def _raw(self, pos: int, hdr: int, length: int, tag: int, vr: bytes | None, enc: Encoding,
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

    def _item_encoding(self, pos: int, limit: int | None, enc: Encoding) -> Encoding:
        """pydicom's rule for items in explicit VR: implicit unless the first VR is letters."""
        src = self.src
        i = src.need(pos, 6)
        if len(src.buf) - i >= 6 and (limit is None or limit - pos >= 6):
            a, b = src.buf[i + 4], src.buf[i + 5]
            return BY_FLAGS[(not (65 <= a <= 90 and 65 <= b <= 90), enc.little)]
        return enc

    def dataset(self, enc: Encoding, limit: int | None, mode: int, depth: int, where) -> bool:
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
                    element_enc = BY_FLAGS[(True, enc.little)]
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
                        self.sequence(IMPLICIT_LE, None, _MODE_DELIMITED, limit, depth + 1, tag, True)
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

    def sequence(self, enc: Encoding, limit: int | None, mode: int, outer: int | None,
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

    def fragments(self, enc: Encoding, limit: int | None, tag: int, pos0: int, hdr: int,
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
    enc, deflated = encoding_for(transfer_syntax)
    if deflated:
        src = InflateSource(f, start, end, max_inflated)
        walker = _Walker(src, max_depth)
        walker.pos = 0
        walker.dataset(enc, None, _MODE_STREAM, 0, "the data set")
        src.check_trailer()
    else:
        src = FileSource(f, start, end)
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
    enc, deflated = encoding_for(transfer_syntax)
    # `path` may also be an open binary file (the ingest passes the bytes it still holds).
    with (open(path, "rb") if isinstance(path, (str, os.PathLike)) else contextlib.nullcontext(path)) as f:
        size = f.seek(0, os.SEEK_END)
        if not 0 <= offset <= size:
            raise DataSetError(f"data set offset {offset} is outside the {size}-byte file")
        if deflated:
            src = InflateSource(f, offset, size, MAX_INFLATED)
            walker = _Walker(src, max_depth, header=True, max_value=max_value, max_header=max_header,
                             check_rest=whole)
            walker.pos = 0
            walker.dataset(enc, None, _MODE_STREAM, 0, "the data set")
            if whole:
                src.check_trailer()
            pixel = None if walker.pixel_offset is None else offset + walker.pixel_offset
        else:
            src = FileSource(f, offset, size)
            walker = _Walker(src, max_depth, header=True, max_value=max_value, max_header=max_header,
                             check_rest=whole)
            walker.pos = offset
            walker.dataset(enc, size, _MODE_EXACT, 0, "the data set")
            pixel = walker.pixel_offset
    return _header_dataset(walker, enc), pixel


def _as_int(item: tuple) -> int:
    return int(item[0])


def _header_dataset(walker: _Walker, enc: Encoding) -> pydicom.Dataset:
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
    # Sorted by plain ints: BaseTag's own comparisons are Python methods, ~10 µs of the
    # ingest's parse of a small instance.
    ds = pydicom.Dataset(dict(sorted(elements.items(), key=_as_int)))
    ds.set_original_encoding(enc.implicit, enc.little, encoding)
    return ds


