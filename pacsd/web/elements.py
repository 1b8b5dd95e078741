"""Where each value lies in a stored data set: element headers walked, values skipped.

WADO-RS serves values the index does not hold (Pixel Data, and the large values that
index/levels.py and ingest/dataset.py read_header leave out) straight from the blob, so it
needs their positions. `walk` yields every element that is not a sequence, with the path
that names it (tag, item index, tag, ...) and where its value starts; it never reads a value.

The blob passed ingest/dataset.py check_structure before it was stored, so this walker is the
small, trusting sibling of that one: it follows the same encoding rules (implicit VR items
inside explicit VR sequences as pydicom detects them, UN of undefined length holding implicit
VR little endian items, fragments for undefined-length pixel data and OB/OW values) and raises
ElementError rather than guess when a length does not fit its container.

The bytes come through ingest/dataset.py's DataSetReader (the window and inflater that walker
uses). Positions are offsets in the file, except for the deflated transfer syntaxes, where they
count inflated bytes of the data set (the file cannot be seeked to them); `read_ranges` knows
both.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from pydicom.datadict import DicomDictionary, dictionary_VR

from pacsd.ingest.dataset import DataSetError
from pacsd.ingest.sources import (
    DEFLATED_TRANSFER_SYNTAXES,
    EXPLICIT_VR_BIG_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    DataSetReader,
)

PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float, Double Float

# Header walks touch element headers only; 16 KiB usually covers a whole image header in one
# read and keeps the read per far-apart fragment header small.
_WINDOW = 16 * 1024
_CHUNK = 1024 * 1024  # what read_ranges yields at most at a time
_MAX_DEPTH = 16

_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_FRAGMENT_VRS = frozenset(("OB", "OD", "OF", "OL", "OV", "OW"))
_SQ_TAGS = frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ")


class ElementError(Exception):
    """The stored data set does not have the structure the walk expects."""


@dataclass(frozen=True, slots=True)
class Element:
    """One non-sequence element of the data set and where its value is."""

    path: tuple[int, ...]  # tag; for nested elements: sequence tag, item index (0-based), ..., tag
    vr: str
    start: int  # first byte of the value
    length: int  # of the value; for an encapsulated value, up to and including its delimiter
    # (start, length) of each fragment's bytes, Basic Offset Table first; None when not encapsulated
    fragments: tuple[tuple[int, int], ...] | None = None

    @property
    def tag(self) -> int:
        return self.path[-1]

    def ranges(self) -> list[tuple[int, int]]:
        """The value's bytes as (start, length) ranges: for an encapsulated value, its fragments
        after the Basic Offset Table, so that a single-fragment frame arrives as its bitstream."""
        if self.fragments is None:
            return [(self.start, self.length)] if self.length else []
        return [f for f in self.fragments[1:] if f[1]]


def path_text(path: tuple[int, ...]) -> str:
    """The path as it appears in a bulkdata URL: 8-hex tags and decimal item indices, by /."""
    return "/".join(f"{p:08X}" if i % 2 == 0 else str(p) for i, p in enumerate(path))


def parse_path(text: str) -> tuple[int, ...] | None:
    """The inverse of path_text; None if `text` is not such a path."""
    parts = text.strip("/").split("/")
    if len(parts) % 2 != 1:
        return None
    out = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            if len(part) != 8 or any(c not in "0123456789abcdefABCDEF" for c in part):
                return None
            out.append(int(part, 16))
        else:
            if not part.isdigit() or len(part) > 9:
                return None
            out.append(int(part))
    return tuple(out)


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _vr_of(tag: int) -> str:
    """The VR of an implicit VR element: the dictionary's, one choice for the ambiguous ones."""
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    if " or " in vr:
        choices = vr.split(" or ")
        return "OW" if "OW" in choices else choices[0]
    return vr


# ---------------------------------------------------------------------------------------------
# The walk


class _Walker:
    def __init__(self, src, little: bool, stop_at_pixel_data: bool) -> None:
        self.src = src
        self.o = "<" if little else ">"
        self.stop = stop_at_pixel_data
        self.pos = 0
        self.done = False

    def _head(self, pos: int, n: int, limit: int | None) -> bytes:
        head = self.src.read(pos, n)
        if limit is not None:
            head = head[:max(0, limit - pos)]
        return head

    def _looks_implicit(self, pos: int, limit: int | None) -> bool:
        """pydicom's rule for an item of an explicit VR sequence: implicit VR unless the bytes
        where the first element's VR would be are two capital letters."""
        head = self._head(pos, 6, limit)
        return len(head) == 6 and not (65 <= head[4] <= 90 and 65 <= head[5] <= 90)

    def dataset(self, implicit: bool, limit: int | None, prefix: tuple[int, ...],
                depth: int) -> Iterator[Element]:
        """The elements of the data set or item from self.pos up to `limit` or its delimiter."""
        o, top = self.o, depth == 0
        while not self.done:
            pos = self.pos
            if limit is not None and pos >= limit:
                if pos > limit:
                    raise ElementError(f"an element runs past its container at byte {limit}")
                return
            head = self._head(pos, 12, limit)
            if len(head) < 8:
                if not head and limit is None and top:
                    return  # the end of a deflated data set
                raise ElementError(f"the data set ends inside an element header at byte {pos}")
            group, elem = struct.unpack_from(o + "HH", head)
            tag = group << 16 | elem
            vr_bytes = head[4:6]
            if implicit or group == 0xFFFE:
                vr, length, hdr = None, struct.unpack_from(o + "L", head, 4)[0], 8
            elif vr_bytes in _LONG_VRS:
                if len(head) < 12:
                    raise ElementError(f"the data set ends inside an element header at byte {pos}")
                vr, length, hdr = vr_bytes.decode(), struct.unpack_from(o + "L", head, 8)[0], 12
            else:
                vr, length, hdr = vr_bytes.decode("latin-1"), struct.unpack_from(o + "H", head, 6)[0], 8
            if tag == _ITEM_DELIMITER:
                self.pos = pos + 8
                return
            if group == 0xFFFE:
                raise ElementError(f"({group:04X},{elem:04X}) at byte {pos} where an element should be")
            path = prefix + (tag,)
            start = pos + hdr
            if length == _UNDEFINED:
                if tag in PIXEL_TAGS or (vr or _vr_of(tag)) in _FRAGMENT_VRS:
                    fragments, end = self.fragments(start, limit)
                    yield Element(path, vr or "OB", start, end - start, fragments)
                    self.pos = end
                else:
                    self.pos = start
                    item_implicit = implicit or vr == "UN"
                    yield from self.sequence(item_implicit, None, limit, path, depth + 1)
            else:
                end = start + length
                if limit is not None and end > limit:
                    raise ElementError(f"element ({group:04X},{elem:04X}) at byte {pos} runs past its container")
                if vr == "SQ" or (vr is None and tag in _SQ_TAGS):
                    self.pos = start
                    yield from self.sequence(implicit, end, end, path, depth + 1)
                    self.pos = end
                else:
                    if tag in PIXEL_TAGS and vr is None:
                        vr = "OW"  # implicit VR little endian always encodes native pixel data as OW
                    yield Element(path, vr or _vr_of(tag), start, length)
                    self.pos = end
            if top and self.stop and tag in PIXEL_TAGS:
                self.done = True

    def _item_header(self, pos: int, limit: int | None, inside: str) -> tuple[int, int]:
        """(tag, length) of the 8-byte item, delimiter or fragment header at pos."""
        head = self._head(pos, 8, limit)
        if len(head) < 8:
            raise ElementError(f"the data set ends inside {inside} at byte {pos}")
        group, elem, length = struct.unpack_from(self.o + "HHL", head)
        return group << 16 | elem, length

    def sequence(self, implicit: bool, limit: int | None, bound: int | None,
                 prefix: tuple[int, ...], depth: int) -> Iterator[Element]:
        if depth > _MAX_DEPTH:
            raise ElementError(f"sequences nested more than {_MAX_DEPTH} deep")
        index = 0
        while True:
            pos = self.pos
            if limit is not None and pos >= limit:
                return
            tag, length = self._item_header(pos, bound, "a sequence")
            if tag == _SEQUENCE_DELIMITER:
                self.pos = pos + 8
                return
            if tag != _ITEM:
                raise ElementError(f"{_tag(tag)} at byte {pos} where an item should be")
            start = pos + 8
            end = None if length == _UNDEFINED else start + length
            item_implicit = implicit or self._looks_implicit(start, end if end is not None else bound)
            self.pos = start
            yield from self.dataset(item_implicit, end if end is not None else bound,
                                    prefix + (index,), depth)
            if end is not None:
                self.pos = end
            index += 1

    def fragments(self, pos: int, limit: int | None) -> tuple[tuple[tuple[int, int], ...], int]:
        out = []
        while True:
            tag, length = self._item_header(pos, limit, "an encapsulated value")
            if tag == _SEQUENCE_DELIMITER:
                return tuple(out), pos + 8
            if tag != _ITEM or length == _UNDEFINED:
                raise ElementError(f"{_tag(tag)} at byte {pos} where a fragment should be")
            out.append((pos + 8, length))
            pos += 8 + length


def _walker(f: BinaryIO, offset: int, transfer_syntax: str, stop_at_pixel_data: bool) -> _Walker:
    size = f.seek(0, 2)
    walker = _Walker(DataSetReader(f, offset, size, transfer_syntax, window=_WINDOW),
                     transfer_syntax != EXPLICIT_VR_BIG_ENDIAN, stop_at_pixel_data)
    walker.pos = walker.src.start
    return walker


def _elements(walker: _Walker, transfer_syntax: str) -> Iterator[Element]:
    try:
        yield from walker.dataset(transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN, walker.src.end, (), 0)
    except DataSetError as exc:  # from the byte source: a broken deflate stream
        raise ElementError(str(exc)) from None


def walk(path: Path, offset: int, transfer_syntax: str, *,
         stop_at_pixel_data: bool = False) -> Iterator[Element]:
    """Every non-sequence element of the data set at byte `offset` of the file, in order.

    With `stop_at_pixel_data`, the walk ends after the first top-level pixel data element
    (what comes after it is trailing padding or signatures, and its fragments would take a
    read each to list)."""
    with open(path, "rb") as f:
        yield from _elements(_walker(f, offset, transfer_syntax, stop_at_pixel_data), transfer_syntax)


def element_at(f: BinaryIO, pos: int, transfer_syntax: str) -> Element:
    """The top-level element whose tag is at byte `pos` of the open file `f`, when it is not a
    sequence (pixel data, as ingest/dataset.py read_header finds it). Not for the deflated
    syntaxes: their positions are not file offsets."""
    if transfer_syntax in DEFLATED_TRANSFER_SYNTAXES:
        raise ValueError(f"no file offsets in a deflated data set ({transfer_syntax})")
    for element in _elements(_walker(f, pos, transfer_syntax, True), transfer_syntax):
        return element
    raise ElementError(f"no element at byte {pos}")


def find(path: Path, offset: int, transfer_syntax: str, wanted: tuple[int, ...]) -> Element | None:
    """The element at `wanted` (a path as parse_path gives it), or None."""
    stop = len(wanted) == 1 and wanted[0] in PIXEL_TAGS
    for element in walk(path, offset, transfer_syntax, stop_at_pixel_data=stop):
        if element.path == wanted:
            return element
    return None


def pixel_data(path: Path, offset: int, transfer_syntax: str) -> Element | None:
    """The first top-level pixel data element (Pixel Data, Float or Double Float Pixel Data)."""
    found = None
    for element in walk(path, offset, transfer_syntax, stop_at_pixel_data=True):
        if len(element.path) == 1 and element.tag in PIXEL_TAGS:
            found = element
    return found


def read_ranges(path: Path, offset: int, transfer_syntax: str,
                ranges: list[tuple[int, int]], chunk: int = _CHUNK) -> Iterator[bytes]:
    """The bytes of `ranges` (positions as `walk` gives them, in increasing order), in chunks
    of at most `chunk` bytes; blocking: iterate it in a worker thread."""
    with open(path, "rb") as f:
        src = DataSetReader(f, offset, f.seek(0, 2), transfer_syntax)
        try:
            for start, length in ranges:
                done = 0
                while done < length:
                    data = src.read(start + done, min(chunk, length - done))
                    if not data:
                        raise ElementError(f"the stored data set ends {length - done} bytes early")
                    done += len(data)
                    yield data
        except DataSetError as exc:
            raise ElementError(str(exc)) from None
