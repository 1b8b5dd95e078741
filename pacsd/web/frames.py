"""Where each frame of a stored instance lies in its blob (PS3.5 8.2 native, A.4 encapsulated).

`locate` reads the header up to the pixel data with ingest/dataset.py's walker (values are
skipped, never loaded), then reads the Pixel Data element's header (and, when encapsulated,
its item headers) with elements.py `element_at`:

- native (defined length): frame i is the i-th slice of Rows x Columns x SamplesPerPixel x
  BitsAllocated bits, found by arithmetic alone;
- encapsulated (undefined length): only the item headers are read. Frames come from the
  Extended Offset Table when the header has one, else one frame per fragment when there are
  as many fragments as frames (the usual case, and the only one RLE allows), else the Basic
  Offset Table, else the fragments that open with a codestream's start marker.

The result is a `FrameMap`: per frame, the (file offset, length) pieces to read. `read_frame`
and `iter_frame` read one frame and nothing else; they block, so callers run them in a thread.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pydicom

from pacsd.ingest.dataset import DataSetError, read_header
from pacsd.ingest.sources import (
    DEFLATED_TRANSFER_SYNTAXES,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
)
from pacsd.web.elements import ElementError, element_at

__all__ = ["PixelError", "FrameError", "ImagePixel", "FrameMap", "locate", "read_frame", "iter_frame",
           "NATIVE_SYNTAXES"]

NATIVE_SYNTAXES = frozenset({IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN,
                             EXPLICIT_VR_BIG_ENDIAN, *DEFLATED_TRANSFER_SYNTAXES}) - {
    "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.205"}  # JPIP referenced: no pixel data here

_PIXEL_DATA = 0x7FE00010
_FLOAT_PIXEL_DATA = {0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}
# MPEG-2, MPEG-4 AVC/H.264 and HEVC/H.265 (1.2.840.10008.1.2.4.100 to .108).
_VIDEO = "1.2.840.10008.1.2.4.10"
_CHUNK = 1024 * 1024  # multiple of 8: byte swapping never splits an element

# The first bytes of a frame's first fragment, per codestream family (for the fragment walk).
_JPEG_SOI = b"\xff\xd8"                    # JPEG (10918), JPEG-LS (14495)
_J2K_SOC = b"\xff\x4f\xff\x51"             # JPEG 2000 and HTJ2K codestreams
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  "   # JPEG 2000 file format (JP2 box)
_JXL = (b"\xff\x0a", b"\x00\x00\x00\x0cJXL ")


class PixelError(Exception):
    """The pixels cannot be served as asked; `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class FrameError(PixelError):
    """Frames cannot be cut out of this instance."""


@dataclass(frozen=True, slots=True)
class ImagePixel:
    """The Image Pixel module values that say how a frame is laid out (PS3.3 C.7.6.3)."""

    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    photometric_interpretation: str
    planar_configuration: int
    number_of_frames: int
    pixel_keyword: str = "PixelData"  # or FloatPixelData, DoubleFloatPixelData

    def decode_options(self) -> dict:
        """Keyword options for pydicom's decoders, for one frame."""
        return dict(rows=self.rows, columns=self.columns, samples_per_pixel=self.samples_per_pixel,
                    bits_allocated=self.bits_allocated, bits_stored=self.bits_stored,
                    pixel_representation=self.pixel_representation,
                    photometric_interpretation=self.photometric_interpretation,
                    planar_configuration=self.planar_configuration, number_of_frames=1,
                    pixel_keyword=self.pixel_keyword)


@dataclass(frozen=True, slots=True)
class FrameMap:
    transfer_syntax: str
    encapsulated: bool
    pixel: ImagePixel
    # Per frame, the (file offset, length) pieces that make it up, in order.
    frames: tuple[tuple[tuple[int, int], ...], ...]
    # Native big endian OW data: bytes per word to swap for a little endian frame (0: none).
    swap: int = 0

    @property
    def number_of_frames(self) -> int:
        return len(self.frames)

    def frame_length(self, index: int) -> int:
        return sum(length for _, length in self.frames[index])


def _int(ds: pydicom.Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        if default is None:
            raise FrameError(406, f"the instance has no {keyword}, so its frames cannot be found")
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise FrameError(406, f"the instance's {keyword} {value!r} is not a number") from None


def image_pixel(ds: pydicom.Dataset) -> ImagePixel:
    pixel = ImagePixel(
        rows=_int(ds, "Rows"), columns=_int(ds, "Columns"),
        samples_per_pixel=_int(ds, "SamplesPerPixel", 1), bits_allocated=_int(ds, "BitsAllocated"),
        bits_stored=_int(ds, "BitsStored", 0) or _int(ds, "BitsAllocated"),
        pixel_representation=_int(ds, "PixelRepresentation", 0),
        photometric_interpretation=str(ds.get("PhotometricInterpretation", "") or "MONOCHROME2").strip(),
        planar_configuration=_int(ds, "PlanarConfiguration", 0),
        number_of_frames=max(1, _int(ds, "NumberOfFrames", 1)))
    if pixel.rows <= 0 or pixel.columns <= 0 or pixel.samples_per_pixel <= 0 or pixel.bits_allocated <= 0:
        raise FrameError(406, f"the instance's image is {pixel.rows} x {pixel.columns} pixels of "
                              f"{pixel.samples_per_pixel} samples, {pixel.bits_allocated} bits: no frame to cut")
    return pixel


def native_frame_bits(pixel: ImagePixel) -> int:
    bits = pixel.rows * pixel.columns * pixel.samples_per_pixel * pixel.bits_allocated
    if pixel.photometric_interpretation == "YBR_FULL_422":
        bits = bits * 2 // 3  # two chroma samples per two pixels (PS3.3 C.7.6.3.1.2)
    return bits


def locate(path: Path, dataset_offset: int, transfer_syntax: str) -> tuple[pydicom.Dataset, FrameMap | None]:
    """The header (elements before the pixel data) and the frame map; None when the
    instance has no pixel data. Raises FrameError when the frames cannot be found."""
    transfer_syntax = transfer_syntax.rstrip("\0 ")
    try:
        ds, pixel_at = read_header(path, dataset_offset, transfer_syntax)
    except DataSetError as exc:
        raise FrameError(500, f"the stored header cannot be read: {exc}") from None
    if pixel_at is None:
        return ds, None
    if transfer_syntax.startswith(_VIDEO):
        raise FrameError(406, f"the pixel data is one video stream (transfer syntax {transfer_syntax}), "
                              f"not separable frames; retrieve the instance or its bulk data instead")
    if transfer_syntax in DEFLATED_TRANSFER_SYNTAXES:
        # pixel_at is a position in the inflated stream: the file cannot be seeked to it.
        raise FrameError(406, f"pacsd cannot cut frames out of a deflated data set "
                              f"(transfer syntax {transfer_syntax})")
    pixel = image_pixel(ds)
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        try:
            element = element_at(f, pixel_at, transfer_syntax)
        except ElementError as exc:
            raise FrameError(500, f"the stored pixel data element cannot be read: {exc}") from None
        if element.fragments is not None:
            if element.tag != _PIXEL_DATA:
                raise FrameError(500, f"float pixel data {_tag(element.tag)} cannot be encapsulated")
            frames = _encapsulated_frames(f, element.fragments, pixel, ds, transfer_syntax)
            return ds, FrameMap(transfer_syntax, True, pixel, frames)
    if transfer_syntax not in NATIVE_SYNTAXES:
        raise FrameError(500, f"transfer syntax {transfer_syntax} is a compressed one, "
                              f"but the stored pixel data is not encapsulated")
    if element.tag != _PIXEL_DATA:
        pixel = replace(pixel, pixel_keyword=_FLOAT_PIXEL_DATA[element.tag])
    value_at, length = element.start, element.length
    frames = _native_frames(value_at, length, min(size, value_at + length), pixel)
    swap = 0
    big = transfer_syntax == EXPLICIT_VR_BIG_ENDIAN
    if big and element.vr != "OB" and pixel.bits_allocated > 8:
        swap = pixel.bits_allocated // 8 if pixel.bits_allocated in (16, 32, 64) else 2
    elif big and element.vr == "OW":
        swap = 2  # 8-bit samples in OW words: each word's two bytes are swapped
    return ds, FrameMap(transfer_syntax, False, pixel, frames, swap)


def _native_frames(value_at: int, length: int, end: int, pixel: ImagePixel) -> tuple:
    bits = native_frame_bits(pixel)
    if bits % 8:
        raise FrameError(406, f"frames of {pixel.rows} x {pixel.columns} one-bit pixels do not start on a "
                              f"byte boundary; pacsd cannot cut them out")
    frame = bits // 8
    need = frame * pixel.number_of_frames
    if length < need or end - value_at < need:
        raise FrameError(500, f"the stored pixel data holds {min(length, end - value_at)} bytes, "
                              f"{pixel.number_of_frames} frames of {frame} bytes need {need}")
    return tuple(((value_at + i * frame, frame),) for i in range(pixel.number_of_frames))


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _frame_starts(f, fragments: list[tuple[int, int]], transfer_syntax: str) -> list[int]:
    """Indices of the fragments that open a frame, by the codestream's start marker."""
    if transfer_syntax.startswith("1.2.840.10008.1.2.4.11"):
        markers = _JXL
    elif transfer_syntax.startswith(("1.2.840.10008.1.2.4.9", "1.2.840.10008.1.2.4.20")):
        markers = (_J2K_SOC, _JP2_SIGNATURE)
    elif transfer_syntax.startswith(("1.2.840.10008.1.2.4.5", "1.2.840.10008.1.2.4.6",
                                     "1.2.840.10008.1.2.4.7", "1.2.840.10008.1.2.4.8")):
        markers = (_JPEG_SOI,)
    else:
        return []
    starts = []
    for index, (at, length) in enumerate(fragments):
        f.seek(at + 8)
        if f.read(min(length, 8)).startswith(markers):
            starts.append(index)
    return starts


def _encapsulated_frames(f, items: tuple[tuple[int, int], ...], pixel: ImagePixel, ds: pydicom.Dataset,
                         transfer_syntax: str) -> tuple:
    """`items`: (value start, length) of each item, the Basic Offset Table first."""
    count = pixel.number_of_frames
    if not items:
        raise FrameError(500, "the encapsulated pixel data has no Basic Offset Table item")
    bot_at, bot_length = items[0]
    f.seek(bot_at)
    bot = f.read(bot_length) if bot_length <= 8 * 1024 * 1024 else b""
    # Fragments by their item tag's position: offset tables count from the first one's.
    fragments = [(start - 8, length) for start, length in items[1:]]
    if not fragments:
        raise FrameError(500, "the encapsulated pixel data has no fragments")
    first = fragments[0][0]

    def pieces(items) -> tuple[tuple[int, int], ...]:
        return tuple((at + 8, length) for at, length in items)

    eot, eot_lengths = ds.get("ExtendedOffsetTable"), ds.get("ExtendedOffsetTableLengths")
    if eot is not None and eot_lengths is not None and eot.value and eot_lengths.value:
        offsets = struct.unpack(f"<{len(eot.value) // 8}Q", eot.value[: len(eot.value) // 8 * 8])
        lengths = struct.unpack(f"<{len(eot_lengths.value) // 8}Q",
                                eot_lengths.value[: len(eot_lengths.value) // 8 * 8])
        by_position = dict(fragments)
        if len(offsets) == len(lengths) == count and all(
                first + o in by_position and n <= by_position[first + o] for o, n in zip(offsets, lengths)):
            return tuple(((first + o + 8, n),) for o, n in zip(offsets, lengths))
        # A table that does not fit the fragments is ignored, as PS3.5 A.4 lets a reader do.
    if count == 1:
        return (pieces(fragments),)
    if len(fragments) == count:
        return tuple(pieces([item]) for item in fragments)
    starts: list[int] = []
    if len(bot) >= 4 * count:
        offsets = struct.unpack(f"<{count}L", bot[: 4 * count])
        index_of = {at - first: i for i, (at, _) in enumerate(fragments)}
        if offsets[0] == 0 and all(o in index_of for o in offsets) and list(offsets) == sorted(offsets):
            starts = [index_of[o] for o in offsets]
    if not starts:
        starts = _frame_starts(f, fragments, transfer_syntax)
        if len(starts) != count or (starts and starts[0] != 0):
            raise FrameError(500, f"the {len(fragments)} fragments of the encapsulated pixel data cannot be "
                                  f"told apart into {count} frames (no usable offset table)")
    bounds = starts + [len(fragments)]
    return tuple(pieces(fragments[bounds[i]:bounds[i + 1]]) for i in range(count))


def _swap(data: bytes, unit: int) -> bytes:
    if not unit:
        return data
    out = bytearray(data)
    for k in range(unit):
        out[k::unit] = data[unit - 1 - k::unit]
    return bytes(out)


def iter_frame(f, frame_map: FrameMap, index: int, chunk: int = _CHUNK) -> Iterator[bytes]:
    """The bytes of frame `index` (0-based) from the open blob `f`, in pieces of at most
    `chunk` bytes; native big endian frames come out little endian."""
    for at, length in frame_map.frames[index]:
        done = 0
        while done < length:
            f.seek(at + done)
            data = f.read(min(chunk, length - done))
            if not data:
                raise FrameError(500, f"the stored file ends inside frame {index + 1}")
            done += len(data)
            yield _swap(data, frame_map.swap)


def read_frame(path: Path, frame_map: FrameMap, index: int) -> bytes:
    with open(path, "rb") as f:
        return b"".join(iter_frame(f, frame_map, index))
