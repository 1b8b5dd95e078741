"""pacsd.ingest.dataset: structural check, header read and file meta.

Checked against every data set in pydicom's own test data that pydicom can read (each one
re-framed behind our file meta, as the spool would hold it), against cut-off copies of
representative ones, and against hand-built broken data sets.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import tracemalloc
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_charset_files, get_palette_files, get_testdata_files
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info

from pacsd.ingest.dataset import MAX_HEADER_VALUE, DataSetError, check_structure, read_header
from pacsd.ingest.filemeta import build_file_meta

IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
BIG = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
JPEG2000 = "1.2.840.10008.1.2.4.91"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPL_UID = "2.25.256714617126215983971869433010905249540"
UNDEF = 0xFFFFFFFF
PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"

# pydicom test files that are themselves malformed, and what check_structure says about them.
MALFORMED = {
    # Pixel data cut short: (7FE0,0010) says 8192 bytes, the file holds fewer.
    "MR_truncated.dcm": r"element \(7FE0,0010\) length 8192 at byte \d+ runs past the end of the data set",
    # An RT plan cut off inside a sequence.
    "rtplan_truncated.dcm": r"element \(300A,00B0\) length 976 .* runs past the end",
    # Transfer syntax JPEG Baseline (explicit VR), data set encoded in implicit VR.
    "SC_rgb_jpeg.dcm": r"element \(0008,0008\) .* has VR bytes .* not a VR",
    # The offset elements were removed and the sequence length fixed, but not the item's.
    "dicomdirtests/DICOMDIR-nooffset": r"item 52 of sequence \(0004,1220\) length 248",
}


# ---------------------------------------------------------------------------------------------
# The corpus


@dataclass
class Sample:
    name: str
    path: Path
    data: bytes           # the data set bytes exactly as in the file
    start: int            # where they start in the original file
    ts: str
    forced: bool          # no preamble/"DICM": pydicom needs force=True
    sop_class: str
    sop_instance: str


def _corpus() -> list[Path]:
    found = get_testdata_files() + get_charset_files() + get_palette_files()
    return sorted({Path(p) for p in found if os.path.isfile(p)})


def _name(path: Path) -> str:
    for base in (TEST_FILES, TEST_FILES.parent):
        try:
            return path.relative_to(base).as_posix()
        except ValueError:
            pass
    return path.name


def _meta_end(raw: bytes) -> int:
    """End of any group 0002 at the start (after preamble and "DICM" if present), walked by hand."""
    pos = 132 if raw[128:132] == b"DICM" else 0
    while pos + 8 <= len(raw) and struct.unpack_from("<H", raw, pos)[0] == 2:
        vr = raw[pos + 4:pos + 6].decode("latin-1")
        if vr in LONG_VRS:
            pos += 12 + struct.unpack_from("<L", raw, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", raw, pos + 6)[0]
    return pos


def _valid_uid(value) -> bool:
    value = str(value or "")
    return 0 < len(value) <= 64 and all(c in "0123456789." for c in value)


@functools.lru_cache(maxsize=None)
def _sample(path: Path) -> Sample | None:
    """The file as a Sample, or None when pydicom cannot read it as DICOM."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
        forced = False
    except pydicom.errors.InvalidDicomError:
        # No preamble: pydicom reads anything with force=True, so ask more of it —
        # at least two elements, and every one decodes without a warning.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                ds = pydicom.dcmread(path, force=True)
                if len(ds) < 2:
                    return None
                for elem in ds.iterall():
                    str(elem.value)
        except Exception:
            return None
        forced = True
    except Exception:
        return None
    raw = path.read_bytes()
    start = _meta_end(raw)
    ts = ds.file_meta.get("TransferSyntaxUID") if ds.file_meta else None
    if ts is None:
        implicit, little = ds.original_encoding
        ts = IMPLICIT if implicit else (EXPLICIT if little else BIG)
    meta = ds.file_meta or {}
    sop_class = meta.get("MediaStorageSOPClassUID") or ds.get("SOPClassUID")
    sop_instance = meta.get("MediaStorageSOPInstanceUID") or ds.get("SOPInstanceUID")
    return Sample(
        name=_name(path), path=path, data=raw[start:], start=start, ts=str(ts), forced=forced,
        sop_class=str(sop_class) if _valid_uid(sop_class) else "1.2.3.4",
        sop_instance=str(sop_instance) if _valid_uid(sop_instance) else "1.2.3.4.5",
    )


def _need(path: Path) -> Sample:
    sample = _sample(path)
    if sample is None:
        pytest.skip("pydicom cannot read it as DICOM")
    return sample


def _by_name(name: str) -> Sample:
    return _need(TEST_FILES / name)


CORPUS = _corpus()
CORPUS_IDS = [_name(p) for p in CORPUS]


def _spool(tmp_path: Path, sample: Sample, data: bytes | None = None,
           ts: str | None = None) -> tuple[Path, int]:
    """The data set behind our file meta, as pacsd's spool holds it: (path, data set offset)."""
    meta = build_file_meta(sample.sop_class, sample.sop_instance, ts or sample.ts, "STORESCU",
                           IMPL_UID, "PACSD_0.1.0")
    path = tmp_path / "spool.dcm"
    path.write_bytes(meta + (sample.data if data is None else data))
    return path, len(meta)


def _check_file(path: Path, offset: int, ts: str, **kw) -> None:
    with open(path, "rb") as f:
        check_structure(f, offset, os.path.getsize(path), ts, **kw)


def _check_bytes(data: bytes, ts: str, **kw) -> None:
    check_structure(io.BytesIO(data), 0, len(data), ts, **kw)


# ---------------------------------------------------------------------------------------------
# Comparing read_header's Dataset with pydicom's reading of the original


def _encoded_size(raw) -> int | None:
    if isinstance(raw, RawDataElement):
        return raw.length if raw.length != UNDEF else len(raw.value or b"")
    return None   # already a DataElement: an undefined-length sequence


def _same_value(a, b) -> bool:
    return a == b or repr(a) == repr(b)   # repr: NaN in FL/FD values


def assert_same(orig: pydicom.Dataset, mine: pydicom.Dataset, where: str = "") -> list[str]:
    """Elements equal (tag, VR, value, recursively); returns the tags read_header left out."""
    extra = set(mine.keys()) - set(orig.keys())
    assert not extra, f"{where}: read_header has elements pydicom has not: {sorted(extra)}"
    dropped = []
    for tag in list(orig.keys()):
        size = _encoded_size(orig.get_item(tag))
        label = f"{where}{tag}"
        if tag not in mine:
            assert size is not None and size > MAX_HEADER_VALUE, (
                f"{label} ({size} bytes) is missing from read_header's Dataset"
            )
            dropped.append(label)
            continue
        a, b = orig[tag], mine[tag]
        assert a.VR == b.VR, f"{label}: VR {b.VR}, pydicom says {a.VR}"
        if a.VR == "SQ":
            assert len(a.value) == len(b.value), f"{label}: {len(b.value)} items, pydicom has {len(a.value)}"
            for n, (x, y) in enumerate(zip(a.value, b.value)):
                dropped += assert_same(x, y, f"{label}[{n}].")
        else:
            assert size is None or size <= MAX_HEADER_VALUE, f"{label}: a {size}-byte value was kept"
            assert _same_value(a.value, b.value), f"{label}: {b.value!r:.80} != pydicom's {a.value!r:.80}"
    return dropped


def _pixel_tag_position(sample: Sample) -> int | None:
    """Where pydicom found the pixel data tag, relative to the start of the (inflated) data set."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = pydicom.dcmread(sample.path, force=sample.forced)
    for tag in PIXEL_TAGS:
        if tag in full:
            raw = full.get_item(tag)
            implicit = full.original_encoding[0]
            header = 8 if implicit or raw.VR not in LONG_VRS else 12
            if sample.ts == DEFLATED:
                return raw.value_tell - header          # pydicom inflates into a buffer of its own
            return raw.value_tell - header - sample.start
    return None


def _tag_bytes(tag: int, little: bool) -> bytes:
    return struct.pack("<HH" if little else ">HH", tag >> 16, tag & 0xFFFF)


# ---------------------------------------------------------------------------------------------
# Every readable file in pydicom's test data


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
@pytest.mark.parametrize("path", CORPUS, ids=CORPUS_IDS)
def test_corpus_file(path: Path, tmp_path: Path) -> None:
    sample = _need(path)
    spool, offset = _spool(tmp_path, sample)

    if sample.name in MALFORMED:
        with pytest.raises(DataSetError, match=MALFORMED[sample.name]):
            _check_file(spool, offset, sample.ts)
        with pytest.raises(DataSetError, match=MALFORMED[sample.name]):
            read_header(spool, offset, sample.ts, whole=True)  # the ingest's one walk
        return

    _check_file(spool, offset, sample.ts)

    mine, pixel = read_header(spool, offset, sample.ts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        orig = pydicom.dcmread(path, stop_before_pixels=True, force=sample.forced)
    assert_same(orig, mine)
    assert mine.original_character_set == orig.original_character_set
    whole, whole_pixel = read_header(spool, offset, sample.ts, whole=True)
    assert_same(orig, whole)
    assert whole_pixel == pixel

    expected = _pixel_tag_position(sample)
    if expected is None:
        assert pixel is None
        return
    assert pixel == offset + expected
    if sample.ts == DEFLATED:
        inflated = zlib.decompressobj(-15).decompress(sample.data)
        assert inflated[pixel - offset:pixel - offset + 4] in (_tag_bytes(t, True) for t in PIXEL_TAGS)
    else:
        with open(spool, "rb") as f:
            f.seek(pixel)
            assert f.read(4) in (_tag_bytes(t, sample.ts != BIG) for t in PIXEL_TAGS)


def _explicit_le_samples() -> list[Path]:
    return [p for p in CORPUS if (s := _sample(p)) is not None and s.ts == EXPLICIT
            and s.name not in MALFORMED]


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
@pytest.mark.parametrize("path", _explicit_le_samples(), ids=lambda p: _name(p))
def test_corpus_file_deflated(path: Path, tmp_path: Path) -> None:
    """Each explicit VR LE data set, deflated as a Deflated Explicit VR LE sender would."""
    sample = _need(path)
    z = zlib.compressobj(6, zlib.DEFLATED, -15)
    spool, offset = _spool(tmp_path, sample, z.compress(sample.data) + z.flush(), DEFLATED)

    _check_file(spool, offset, DEFLATED)
    mine, pixel = read_header(spool, offset, DEFLATED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        orig = pydicom.dcmread(path, stop_before_pixels=True, force=sample.forced)
    assert_same(orig, mine)
    assert_same(orig, read_header(spool, offset, DEFLATED, whole=True)[0])
    with open(spool, "ab") as f:  # the one walk checks the deflate stream's end too
        f.write(b"\x00" * 9)
    with pytest.raises(DataSetError):
        read_header(spool, offset, DEFLATED, whole=True)
    expected = _pixel_tag_position(sample)
    assert pixel == (None if expected is None else offset + expected)


def test_corpus_covers_every_transfer_syntax_family() -> None:
    readable = [s for p in CORPUS if (s := _sample(p)) is not None]
    syntaxes = {s.ts for s in readable}
    for ts, what in [
        (IMPLICIT, "implicit VR LE"), (EXPLICIT, "explicit VR LE"), (BIG, "explicit VR BE"),
        (DEFLATED, "deflated"), ("1.2.840.10008.1.2.4.50", "JPEG baseline"),
        ("1.2.840.10008.1.2.4.70", "JPEG lossless"), ("1.2.840.10008.1.2.4.80", "JPEG-LS lossless"),
        ("1.2.840.10008.1.2.4.81", "JPEG-LS near-lossless"), ("1.2.840.10008.1.2.4.90", "J2K lossless"),
        (JPEG2000, "J2K"), ("1.2.840.10008.1.2.5", "RLE"),
    ]:
        assert ts in syntaxes, f"no {what} file in pydicom's test data"
    names = {s.name for s in readable}
    for name in ["CT_small.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm", "JPEG2000.dcm",
                 "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "UN_sequence.dcm",
                 "waveform_ecg.dcm", "examples_overlay.dcm"]:
        assert name in names
    assert set(MALFORMED) <= names


def test_big_values_are_left_out(tmp_path: Path) -> None:
    """Waveform data (over 64 KiB) inside sequence items is dropped, the rest kept."""
    overlay = _by_name("examples_overlay.dcm")          # 18 KiB of overlay data: kept
    spool, offset = _spool(tmp_path, overlay)
    mine, _ = read_header(spool, offset, overlay.ts)
    orig = pydicom.dcmread(overlay.path, stop_before_pixels=True)
    assert assert_same(orig, mine) == []
    assert mine[0x60003000].value == orig[0x60003000].value

    ecg = _by_name("waveform_ecg.dcm")
    spool, offset = _spool(tmp_path, ecg)
    mine, pixel = read_header(spool, offset, ecg.ts)
    orig = pydicom.dcmread(ecg.path, stop_before_pixels=True)
    dropped = assert_same(orig, mine)
    assert dropped and all(d.endswith("(5400,1010)") for d in dropped)
    assert pixel is None
    kept = 0
    for ours, theirs in zip(mine.WaveformSequence, orig.WaveformSequence):
        size = len(theirs.WaveformData)
        assert ("WaveformData" in ours) == (size <= MAX_HEADER_VALUE)
        kept += "WaveformData" in ours
        assert ours.NumberOfWaveformSamples == theirs.NumberOfWaveformSamples
        assert ours.ChannelDefinitionSequence[0].ChannelSourceSequence
    assert 0 < kept < len(mine.WaveformSequence)


def test_specific_character_set_decodes(tmp_path: Path) -> None:
    charsets = Path(get_charset_files("chrX1.dcm")[0]).parent
    for name, expected in [
        ("chrX1.dcm", "Wang^XiaoDong=王^小東"),
        ("chrH31.dcm", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
        ("chrRuss.dcm", "Люкceмбypг"),
    ]:
        sample = _need(charsets / name)
        spool, offset = _spool(tmp_path, sample)
        mine, _ = read_header(spool, offset, sample.ts)
        assert str(mine.PatientName) == expected


# ---------------------------------------------------------------------------------------------
# Cut-off data sets


def _top_level_starts(sample: Sample) -> set[int]:
    """Offsets (in the data set) where each top-level element starts, from pydicom's reading."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = pydicom.dcmread(sample.path, force=sample.forced)
    implicit = full.original_encoding[0]
    starts = set()
    for tag in full.keys():
        elem = full.get_item(tag)
        if isinstance(elem, RawDataElement):
            tell, vr = elem.value_tell, elem.VR
        else:
            tell, vr = elem.file_tell, elem.VR
        header = 8 if implicit or vr not in LONG_VRS else 12
        starts.add(tell - header - sample.start)
    return starts


def _undefined_regions(sample: Sample, starts: set[int]) -> list[range]:
    """Byte ranges of top-level elements with undefined length (sequences, encapsulated data)."""
    bounds = sorted(starts | {len(sample.data)})
    regions = []
    for a, b in zip(bounds, bounds[1:]):
        head = sample.data[a:a + 12]
        little = sample.ts != BIG
        implicit = sample.ts == IMPLICIT
        length_at = 4 if implicit else (8 if head[4:6].decode("latin-1") in LONG_VRS else None)
        if length_at is not None and struct.unpack_from("<L" if little else ">L", head, length_at)[0] == UNDEF:
            regions.append(range(a, b))
    return regions


TRUNCATION_FILES = [
    "CT_small.dcm",                # explicit VR LE, defined lengths, native pixel data
    "MR_small_implicit.dcm",       # implicit VR LE
    "MR_small_bigendian.dcm",      # explicit VR BE
    "JPEG2000.dcm",                # undefined-length sequences and items, encapsulated J2K
    "SC_rgb_rle_2frame.dcm",       # RLE, offset table and two fragments
    "UN_sequence.dcm",             # a private UN of undefined length holding a sequence
    "nested_priv_SQ.dcm",          # implicit VR private sequences of undefined length
    "liver_1frame.dcm",            # many undefined-length items
]


@pytest.mark.parametrize("name", TRUNCATION_FILES)
def test_truncated_data_sets_fail(name: str, tmp_path: Path) -> None:
    sample = _by_name(name)
    data = sample.data
    starts = _top_level_starts(sample)
    complete = starts | {0, len(data)}
    regions = _undefined_regions(sample, starts)
    pixel = _pixel_tag_position(sample)

    cuts = set(range(min(2048, len(data))))
    for region in regions:                                   # inside undefined-length values
        cuts.update(r for r in region if r < region.start + 4096)
    if pixel is not None:                                    # inside pixel data / fragments
        cuts.update(range(pixel, min(len(data), pixel + 512)))
        cuts.update(range(pixel, len(data), 37))
    cuts.update(range(0, len(data), 53))
    cuts.update(range(max(0, len(data) - 64), len(data) + 1))
    assert cuts & complete and cuts - complete
    assert regions or name in ("CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm")

    meta = build_file_meta(sample.sop_class, sample.sop_instance, sample.ts, "STORESCU",
                           IMPL_UID, "PACSD_0.1.0")
    failed_wrongly, passed_wrongly = [], []
    for n, cut in enumerate(sorted(cuts)):
        spooled = meta + data[:cut]
        try:
            check_structure(io.BytesIO(spooled), len(meta), len(spooled), sample.ts)
        except DataSetError:
            if cut in complete:
                failed_wrongly.append(cut)
        else:
            if cut not in complete:
                passed_wrongly.append(cut)
        if n % 5 == 0:  # the ingest's one walk (header and structure) judges every cut the same
            try:
                read_header(io.BytesIO(spooled), len(meta), sample.ts, whole=True)
            except DataSetError:
                if cut in complete:
                    failed_wrongly.append(("whole", cut))
            else:
                if cut not in complete:
                    passed_wrongly.append(("whole", cut))
    assert not passed_wrongly, f"cut-off data sets accepted at {passed_wrongly[:20]}"
    assert not failed_wrongly, f"complete data sets (top-level boundaries) rejected at {failed_wrongly[:20]}"

    # read_header on real cut files: before the pixel data it fails the same way; a cut
    # after the pixel data element's header does not concern it (inside that header: either).
    header_end = pixel if pixel is not None else len(data)
    for cut in sorted(cuts)[::7]:
        path, offset = _spool(tmp_path, sample, data[:cut])
        if cut in complete or cut >= header_end + 12:
            read_header(path, offset, sample.ts)
        elif cut < header_end:
            with pytest.raises(DataSetError):
                read_header(path, offset, sample.ts)


def test_truncated_deflate_stream_fails() -> None:
    sample = _by_name("image_dfl.dcm")
    compressed = sample.data
    z = zlib.decompressobj(-15)
    z.decompress(compressed)
    stream_end = len(compressed) - len(z.unused_data)
    assert len(compressed) - stream_end == 8    # the file carries a gzip trailer

    cuts = set(range(0, 1024)) | set(range(0, stream_end, 13)) | set(range(stream_end - 32, len(compressed) + 1))
    for cut in sorted(cuts):
        data = compressed[:cut]
        if cut in (stream_end, stream_end + 1, len(compressed)):
            _check_bytes(data, DEFLATED)      # stream complete; nothing, a pad byte, or the trailer
        else:
            with pytest.raises(DataSetError):
                _check_bytes(data, DEFLATED)


# ---------------------------------------------------------------------------------------------
# Hand-built data sets


def ex(tag: int, vr: str, value: bytes = b"", length: int | None = None, order: str = "<") -> bytes:
    """An explicit VR element."""
    n = len(value) if length is None else length
    if vr in LONG_VRS:
        return struct.pack(order + "HH2s2xL", tag >> 16, tag & 0xFFFF, vr.encode(), n) + value
    return struct.pack(order + "HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), n) + value


def im(tag: int, value: bytes = b"", length: int | None = None) -> bytes:
    """An implicit VR LE element."""
    n = len(value) if length is None else length
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, n) + value


def item(body: bytes, defined: bool = True, order: str = "<") -> bytes:
    if defined:
        return struct.pack(order + "HHL", 0xFFFE, 0xE000, len(body)) + body
    return (struct.pack(order + "HHL", 0xFFFE, 0xE000, UNDEF) + body
            + struct.pack(order + "HHL", 0xFFFE, 0xE00D, 0))


SEQ_DELIM = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)


def sq(tag: int, items: list[bytes], defined: bool = True, implicit: bool = False) -> bytes:
    body = b"".join(items)
    make = (lambda v, n=None: im(tag, v, n)) if implicit else (lambda v, n=None: ex(tag, "SQ", v, n))
    return make(body) if defined else make(body + SEQ_DELIM, UNDEF)


def frags(tag: int, fragments: list[bytes], vr: str = "OB") -> bytes:
    body = b"".join(item(f) for f in fragments)
    return ex(tag, vr, body + SEQ_DELIM, UNDEF)


NAME = ex(0x00100010, "PN", b"Doe^John")
PID = ex(0x00100020, "LO", b"12345 ")
MODALITY = ex(0x00080060, "CS", b"CT")
PIXELS = ex(0x7FE00010, "OW", b"\x01\x02" * 8)


def _read(data: bytes, ts: str, tmp_path: Path, **kw) -> tuple[pydicom.Dataset, int | None]:
    path = tmp_path / "h.dcm"
    path.write_bytes(data)
    return read_header(path, 0, ts, **kw)


def test_hand_built_data_sets_pass() -> None:
    _check_bytes(b"", EXPLICIT)                       # an empty data set is complete
    _check_bytes(MODALITY + NAME + PID + PIXELS, EXPLICIT)
    _check_bytes(MODALITY + NAME + ex(0x00091011, "OB", b"\x01", 1) + PIXELS, EXPLICIT)   # odd length
    # (FFFC,FFFC) Data Set Trailing Padding, after the pixel data
    _check_bytes(MODALITY + PIXELS + ex(0xFFFCFFFC, "OB", b"\x00" * 64), EXPLICIT)
    # group 0002 in the data set: not expected, tolerated
    _check_bytes(ex(0x00020016, "AE", b"OTHER ") + MODALITY, EXPLICIT)
    # nested sequences of every length form
    inner = sq(0x00081199, [item(ex(0x00081150, "UI", b"1.2\x00")), item(b"", defined=False)], defined=False)
    _check_bytes(sq(0x00081115, [item(inner), item(inner, defined=False), item(b"")]) + NAME, EXPLICIT)
    _check_bytes(sq(0x00081115, [], defined=False) + sq(0x00081140, []) + NAME, EXPLICIT)
    # encapsulated pixel data: empty offset table, two fragments, one odd
    _check_bytes(MODALITY + frags(0x7FE00010, [b"", b"\xff\xd8\xff", b"\x00" * 10]), JPEG2000)
    # implicit VR: undefined length means a sequence; a defined-length public SQ is walked too
    _check_bytes(im(0x00080060, b"CT") + sq(0x00081115, [item(im(0x00081150, b"1.2\x00"))], implicit=True)
                 + sq(0x00091010, [item(im(0x00091011, b"ab"), defined=False)], defined=False, implicit=True),
                 IMPLICIT)
    # explicit VR big endian
    be_item = struct.pack(">HHL", 0xFFFE, 0xE000, 8 + 4) + ex(0x00081150, "UI", b"1.2\x00", order=">")
    _check_bytes(ex(0x00080060, "CS", b"CT", order=">") + ex(0x00081115, "SQ", be_item, order=">"), BIG)
    # a two-letter VR PS3.5 does not define: 2-byte length, as pydicom reads it
    _check_bytes(ex(0x00091001, "XX", b"abcd") + NAME, EXPLICIT)


def test_delimiters_tolerated_at_the_end_of_defined_lengths() -> None:
    # An item delimiter closing a defined-length item, a sequence delimiter closing a
    # defined-length sequence: pydicom reads both; accepted when they end exactly there.
    body = ex(0x00081150, "UI", b"1.2\x00") + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    _check_bytes(sq(0x00081115, [item(body)]) + NAME, EXPLICIT)
    _check_bytes(ex(0x00081115, "SQ", item(b"") + SEQ_DELIM) + NAME, EXPLICIT)
    # ... but not in the middle
    body = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + ex(0x00081150, "UI", b"1.2\x00")
    with pytest.raises(DataSetError, match="item delimiter"):
        _check_bytes(sq(0x00081115, [item(body)]) + NAME, EXPLICIT)
    with pytest.raises(DataSetError, match="sequence delimiter .* inside the defined-length"):
        _check_bytes(ex(0x00081115, "SQ", SEQ_DELIM + item(b"")) + NAME, EXPLICIT)


def test_implicit_items_inside_explicit_sequences(tmp_path: Path) -> None:
    """Some writers encode sequence items in implicit VR; pydicom reads them, so do we."""
    body = im(0x00081150, b"1.2.3\x00") + im(0x00081155, b"4.5\x00")
    data = MODALITY + sq(0x00081140, [item(body)]) + NAME
    _check_bytes(data, EXPLICIT)
    ds, _ = _read(data, EXPLICIT, tmp_path)
    assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == "4.5"
    # at the top level the transfer syntax is trusted
    with pytest.raises(DataSetError, match=r"\(0008,0060\) .* not a VR"):
        _check_bytes(im(0x00080060, b"CT") + NAME, EXPLICIT)


@pytest.mark.parametrize("extra, message", [
    (b"\x00", r"1 trailing bytes .* too short for an element header"),
    (b"\x10\x00\x10\x00PN", r"6 trailing bytes"),
    (b"\x00" * 8, r"command element \(0000,0000\)"),
    (b"\x00" * 32, r"command element \(0000,0000\)"),
    (struct.pack("<HH2s2x", 0x0009, 0x1010, b"OB") + b"\x01\x00", r"10 trailing bytes|header of element"),
    (SEQ_DELIM, r"sequence delimiter \(FFFE,E0DD\) .* needs a data element"),
    (struct.pack("<HHL", 0xFFFE, 0xE000, 0), r"item tag \(FFFE,E000\)"),
])
def test_trailing_garbage_fails(extra: bytes, message: str) -> None:
    with pytest.raises(DataSetError, match=message):
        _check_bytes(MODALITY + NAME + extra, EXPLICIT)


def test_trailing_zeros_fail_in_implicit_vr() -> None:
    # Eight zero bytes are a well-formed implicit VR element (0000,0000) of length 0.
    data = im(0x00080060, b"CT") + im(0x00100010, b"Doe^John")
    _check_bytes(data, IMPLICIT)
    with pytest.raises(DataSetError, match=r"command element \(0000,0000\) at byte 26"):
        _check_bytes(data + b"\x00" * 8, IMPLICIT)
    with pytest.raises(DataSetError, match=r"command element \(0000,0000\)"):
        _check_bytes(im(0x00080060, b"CT") + sq(0x00081115, [item(b"\x00" * 8)], implicit=True), IMPLICIT)


@pytest.mark.parametrize("data, ts, message", [
    # a value running past its item, its sequence, the data set
    (sq(0x00081115, [item(ex(0x00081150, "UI", b"1.2\x00", length=40))]) + NAME, EXPLICIT,
     r"element \(0008,1150\) length 40 .* runs past the end of item 1 of sequence \(0008,1115\)"),
    (ex(0x00081115, "SQ", item(ex(0x00081150, "UI", b"1.2\x00")), length=10) + NAME, EXPLICIT,
     r"item 1 of sequence \(0008,1115\) length 12 .* runs past the end of sequence \(0008,1115\)"),
    (MODALITY + ex(0x00100010, "PN", b"Doe", length=200), EXPLICIT,
     r"element \(0010,0010\) length 200 at byte 10 runs past the end of the data set at byte 21"),
    # undefined lengths that never end
    (MODALITY + ex(0x00081115, "SQ", item(NAME), length=UNDEF), EXPLICIT,
     r"data set ends at byte \d+ inside sequence \(0008,1115\)"),
    (MODALITY + ex(0x00081115, "SQ", struct.pack("<HHL", 0xFFFE, 0xE000, UNDEF) + NAME, length=UNDEF),
     EXPLICIT, r"data set ends at byte 46 inside item 1 of sequence \(0008,1115\)"),
    (MODALITY + sq(0x00081115, [item(struct.pack("<HHL", 0xFFFE, 0xE000, UNDEF) + NAME)]) + NAME, EXPLICIT,
     r"an item tag \(FFFE,E000\) at byte 30 where item 1 of sequence \(0008,1115\) needs a data element"),
    (MODALITY + sq(0x00081115, [item(sq(0x00081140, [struct.pack("<HHL", 0xFFFE, 0xE000, UNDEF) + NAME],
                                        defined=False)[:-8])]) + NAME, EXPLICIT,
     r"item 1 of sequence \(0008,1140\) reaches the end of its container at byte 66 without its delimiter"),
    (MODALITY + ex(0x7FE00010, "OB", item(b"") + item(b"\x01\x02"), length=UNDEF), JPEG2000,
     r"data set ends at byte \d+ inside the encapsulated value of \(7FE0,0010\)"),
    # things in the wrong place
    (MODALITY + ex(0x00081115, "SQ", NAME, length=UNDEF), EXPLICIT,
     r"sequence \(0008,1115\) has \(0010,0010\) .* where an item"),
    (MODALITY + ex(0x7FE00010, "OB", item(b"") + NAME, length=UNDEF), JPEG2000,
     r"encapsulated value of \(7FE0,0010\) has \(0010,0010\)"),
    (MODALITY + ex(0x7FE00010, "OB", struct.pack("<HHL", 0xFFFE, 0xE000, UNDEF) + SEQ_DELIM, length=UNDEF),
     JPEG2000, r"fragment 1 .* has undefined length"),
    (MODALITY + ex(0x00100010, "UT", SEQ_DELIM, length=UNDEF), EXPLICIT,
     r"\(0010,0010\) .* undefined length, which VR UT does not allow"),
    (MODALITY + ex(0x00081115, "SQ", item(b"", defined=False) + item(NAME)[:4] + b"\x00" * 2, length=UNDEF),
     EXPLICIT, r"data set ends at byte \d+ inside sequence"),
])
def test_structural_errors(data: bytes, ts: str, message: str) -> None:
    with pytest.raises(DataSetError, match=message):
        _check_bytes(data, ts)


# ---------------------------------------------------------------------------------------------
# Lengths that must not be believed


class SpyFile(io.BytesIO):
    """Records read sizes; a read without a size would load the rest of the file."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.largest = 0
        self.total = 0

    def read(self, size: int | None = -1) -> bytes:
        assert size is not None and size >= 0, "read() without a size"
        self.largest = max(self.largest, size)
        out = super().read(size)
        self.total += len(out)
        return out


HUGE = 0xFFFFFFF0


@pytest.mark.parametrize("data, ts", [
    (MODALITY + ex(0x00091010, "OB", b"\x00" * 100, length=HUGE), EXPLICIT),
    (MODALITY + ex(0x00100010, "UT", b"\x00" * 100, length=HUGE), EXPLICIT),
    (im(0x00080060, b"CT") + im(0x00100010, b"\x00" * 100, length=HUGE), IMPLICIT),
    (ex(0x00080060, "CS", b"CT", order=">") + ex(0x00091010, "OB", b"\x00" * 100, length=HUGE, order=">"), BIG),
    (MODALITY + sq(0x00081115, [item(ex(0x00091010, "OB", b"\x00" * 10, length=HUGE))]), EXPLICIT),
    (MODALITY + sq(0x00081115, [struct.pack("<HHL", 0xFFFE, 0xE000, HUGE) + NAME]), EXPLICIT),
    (MODALITY + ex(0x00081115, "SQ", struct.pack("<HHL", 0xFFFE, 0xE000, HUGE) + NAME, length=UNDEF),
     EXPLICIT),
    (MODALITY + ex(0x7FE00010, "OW", b"\x00" * 100, length=HUGE), EXPLICIT),
    (MODALITY + ex(0x7FE00010, "OB", item(b"") + struct.pack("<HHL", 0xFFFE, 0xE000, HUGE), length=UNDEF),
     JPEG2000),
])
def test_huge_length_fails_without_allocating(data: bytes, ts: str, tmp_path: Path) -> None:
    data = data + b"\x00" * 4096
    spy = SpyFile(data)
    with pytest.raises(DataSetError, match=r"length 4294967280 .* runs past the end"):
        check_structure(spy, 0, len(data), ts)
    assert spy.largest <= 64 * 1024

    tracemalloc.start()
    try:
        if b"\xe0\x7f\x10\x00" in data:
            # read_header stops at the pixel data tag and never reads its length
            ds, pixel = _read(data, ts, tmp_path)
            assert ds.Modality == "CT" and pixel == len(MODALITY)
        else:
            with pytest.raises(DataSetError, match=r"length 4294967280"):
                _read(data, ts, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * 1024 * 1024


def test_huge_length_in_a_deflated_data_set(tmp_path: Path) -> None:
    z = zlib.compressobj(6, zlib.DEFLATED, -15)
    data = z.compress(MODALITY + ex(0x00091010, "OB", b"\x00" * 3_000_000, length=HUGE)) + z.flush()
    tracemalloc.start()
    try:
        spy = SpyFile(data)
        with pytest.raises(DataSetError, match=r"length 4294967280 at inflated byte 10 runs past the end"):
            check_structure(spy, 0, len(data), DEFLATED)
        with pytest.raises(DataSetError, match=r"length 4294967280"):
            _read(data, DEFLATED, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert spy.largest <= 1024 * 1024
    assert peak < 4 * 1024 * 1024


# ---------------------------------------------------------------------------------------------
# Nesting


def _nested(depth: int, defined: bool, implicit: bool = False) -> bytes:
    body = im(0x00100010, b"Doe^John") if implicit else NAME
    for _ in range(depth):
        body = sq(0x0040A730, [item(body, defined)], defined, implicit)
    return body


@pytest.mark.parametrize("defined", [True, False])
@pytest.mark.parametrize("implicit", [True, False])
def test_nesting_depth_limit(defined: bool, implicit: bool) -> None:
    ts = IMPLICIT if implicit else EXPLICIT
    _check_bytes(_nested(16, defined, implicit), ts)
    with pytest.raises(DataSetError, match=r"sequence \(0040,A730\) .* nested 17 sequences deep"):
        _check_bytes(_nested(17, defined, implicit), ts)
    _check_bytes(_nested(3, defined, implicit), ts, max_depth=3)
    with pytest.raises(DataSetError, match="nested 4 sequences deep"):
        _check_bytes(_nested(4, defined, implicit), ts, max_depth=3)


def test_very_deep_nesting_is_an_error_not_a_crash(tmp_path: Path) -> None:
    data = _nested(5000, defined=False)
    with pytest.raises(DataSetError, match="nested 17 sequences deep"):
        _check_bytes(data, EXPLICIT)
    with pytest.raises(DataSetError, match="nested 17 sequences deep"):
        _read(data, EXPLICIT, tmp_path)


# ---------------------------------------------------------------------------------------------
# Deflate streams


def _deflate(data: bytes) -> bytes:
    z = zlib.compressobj(6, zlib.DEFLATED, -15)
    return z.compress(data) + z.flush()


def test_corrupt_deflate_stream_fails() -> None:
    compressed = _by_name("image_dfl.dcm").data
    _check_bytes(compressed, DEFLATED)
    for pos in range(0, int(len(compressed) * 0.9), 17):
        damaged = bytearray(compressed)
        damaged[pos] ^= 0x5A
        with pytest.raises(DataSetError):
            _check_bytes(bytes(damaged), DEFLATED)
    with pytest.raises(DataSetError, match="deflate stream is corrupt"):
        _check_bytes(bytes(range(256)) * 8, DEFLATED)
    with pytest.raises(DataSetError, match="deflate stream is corrupt"):
        _check_bytes(zlib.compress(MODALITY + NAME), DEFLATED)   # zlib wrapper, not raw deflate
    with pytest.raises(DataSetError, match="deflate stream is truncated"):
        _check_bytes(b"", DEFLATED)


def test_deflate_trailer_rules() -> None:
    stream = _deflate(MODALITY + NAME + PIXELS)
    _check_bytes(stream, DEFLATED)
    _check_bytes(stream + b"\x00", DEFLATED)                                  # pad byte
    inflated = MODALITY + NAME + PIXELS
    gzip_trailer = struct.pack("<LL", zlib.crc32(inflated), len(inflated))
    _check_bytes(stream + gzip_trailer, DEFLATED)
    with pytest.raises(DataSetError, match="2 bytes follow the end of the deflate stream"):
        _check_bytes(stream + b"\x00\x00", DEFLATED)
    with pytest.raises(DataSetError, match="8 bytes follow"):
        _check_bytes(stream + struct.pack("<LL", zlib.crc32(inflated) ^ 1, len(inflated)), DEFLATED)
    with pytest.raises(DataSetError, match="bytes follow"):
        _check_bytes(stream + _deflate(NAME), DEFLATED)
    # a deflate stream holding a broken data set is still a broken data set
    with pytest.raises(DataSetError, match=r"1 trailing bytes at inflated byte \d+|inflated byte"):
        _check_bytes(_deflate(MODALITY + b"\x00"), DEFLATED)


def test_deflate_inflated_size_is_capped() -> None:
    bomb = _deflate(MODALITY + ex(0x7FE00010, "OB", b"\x00" * (8 * 1024 * 1024)))
    assert len(bomb) < 16 * 1024
    _check_bytes(bomb, DEFLATED)
    with pytest.raises(DataSetError, match="inflates beyond 1048576 bytes"):
        _check_bytes(bomb, DEFLATED, max_inflated=1024 * 1024)


def test_read_header_inflates_only_as_far_as_needed(tmp_path: Path) -> None:
    """Garbage after the first MiB of pixel data: read_header never gets there."""
    z = zlib.compressobj(6, zlib.DEFLATED, -15)
    head = MODALITY + NAME + ex(0x7FE00010, "OB", length=100 * 1024 * 1024)
    data = z.compress(head + b"\x00" * (1024 * 1024)) + z.flush(zlib.Z_FULL_FLUSH) + os.urandom(4096)
    ds, pixel = _read(data, DEFLATED, tmp_path)
    assert ds.Modality == "CT" and str(ds.PatientName) == "Doe^John"
    assert pixel == len(MODALITY + NAME)
    with pytest.raises(DataSetError):
        _check_bytes(data, DEFLATED)


# ---------------------------------------------------------------------------------------------
# read_header: what is kept, what is not


def test_read_header_leaves_big_values_out(tmp_path: Path) -> None:
    small_private = ex(0x00091010, "OB", b"\x07" * 100)
    big_private = ex(0x00091011, "OB", b"\x08" * (MAX_HEADER_VALUE + 2))
    big_icon = frags(0x7FE00010, [b"", b"\x09" * (MAX_HEADER_VALUE + 1)])
    small_icon = frags(0x7FE00010, [b"", b"\x0a" * 64])
    refs = sq(0x00081140, [
        item(ex(0x00081150, "UI", b"1.2\x00") + big_private + ex(0x00081155, "UI", b"3.4\x00")),
        item(ex(0x00081150, "UI", b"5.6\x00")),
        item(ex(0x00081150, "UI", b"7.8\x00") + big_private, defined=False),
    ])
    icons = sq(0x00880200, [item(ex(0x00280010, "US", b"\x40\x00") + big_icon),
                            item(ex(0x00280010, "US", b"\x08\x00") + small_icon)], defined=False)
    data = (MODALITY + small_private + ex(0x00091011, "OB", b"\x01" * (MAX_HEADER_VALUE + 1))
            + refs + icons + NAME + PIXELS)
    _check_bytes(data, EXPLICIT)
    ds, pixel = _read(data, EXPLICIT, tmp_path)
    full = pydicom.dcmread(DicomBytesIO(data), force=True, stop_before_pixels=True)
    assert sorted(assert_same(full, ds)) == sorted([
        "(0009,1011)", "(0008,1140)[0].(0009,1011)", "(0008,1140)[2].(0009,1011)",
        "(0088,0200)[0].(7FE0,0010)",
    ])
    assert (0x0009, 0x1010) in ds and (0x0009, 0x1011) not in ds
    assert [i.ReferencedSOPClassUID for i in ds.ReferencedImageSequence] == ["1.2", "5.6", "7.8"]
    assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == "3.4"
    assert all((0x0009, 0x1011) not in i for i in ds.ReferencedImageSequence)
    assert "PixelData" not in ds.IconImageSequence[0] and ds.IconImageSequence[0].Rows == 64
    assert ds.IconImageSequence[1].PixelData.endswith(b"\x0a" * 64)
    assert str(ds.PatientName) == "Doe^John" and "PixelData" not in ds
    assert pixel == len(data) - len(PIXELS)


def test_read_header_dropped_elements_match_pydicom(tmp_path: Path) -> None:
    big = ex(0x00091011, "OB", b"\x08" * (MAX_HEADER_VALUE + 2))
    data = (MODALITY + sq(0x00081140, [item(ex(0x00081150, "UI", b"1.2\x00") + big),
                                       item(ex(0x00081150, "UI", b"5.6\x00"))]) + NAME)
    ds, _ = _read(data, EXPLICIT, tmp_path)
    full = pydicom.dcmread(DicomBytesIO(data), force=True)
    assert assert_same(full, ds) == ["(0008,1140)[0].(0009,1011)"]
    # the sequence and the item that lost an element were re-encoded with undefined length
    assert ds["ReferencedImageSequence"].is_undefined_length
    assert ds.ReferencedImageSequence[0].is_undefined_length_sequence_item
    assert not ds.ReferencedImageSequence[1].is_undefined_length_sequence_item


def test_read_header_memory_stays_small(tmp_path: Path) -> None:
    size = 32 * 1024 * 1024
    path = tmp_path / "big.dcm"
    with open(path, "wb") as f:
        f.write(MODALITY + NAME + struct.pack("<HH2s2xL", 0x0009, 0x1010, b"OB", size))
        f.truncate(f.tell() + size)
        f.seek(0, 2)
        f.write(PID + struct.pack("<HH2s2xL", 0x7FE0, 0x0010, b"OW", size))
        f.truncate(f.tell() + size)
    tracemalloc.start()
    try:
        ds, pixel = read_header(path, 0, EXPLICIT)
        with open(path, "rb") as f:
            check_structure(f, 0, os.path.getsize(path), EXPLICIT)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * 1024 * 1024
    assert ds.PatientID == "12345" and (0x0009, 0x1010) not in ds
    assert pixel == len(MODALITY + NAME) + 12 + size + len(PID)


def test_read_header_total_cap(tmp_path: Path) -> None:
    data = MODALITY + b"".join(ex(0x00090000 | (0x1000 + n), "OB", b"\x00" * 60000) for n in range(20))
    _read(data, EXPLICIT, tmp_path)
    with pytest.raises(DataSetError, match="exceed 500000 bytes"):
        _read(data, EXPLICIT, tmp_path, max_header=500_000)


# ---------------------------------------------------------------------------------------------
# File meta


def _pydicom_meta(sop_class, sop_instance, ts, ae, impl_uid, version) -> bytes:
    meta = FileMetaDataset()
    meta.FileMetaInformationGroupLength = 0
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = impl_uid
    meta.ImplementationVersionName = version
    if ae:
        meta.SourceApplicationEntityTitle = ae
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_file_meta_info(fp, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + fp.getvalue()


@pytest.mark.parametrize("args", [
    (CT_IMAGE, "1.2.3.4.5", EXPLICIT, "STORESCU", IMPL_UID, "PACSD_0.1.0"),
    (CT_IMAGE, "1.2.3.4", IMPLICIT, "MODALITY1", IMPL_UID, "PACSD_0.1"),
    ("1.2.840.10008.5.1.4.1.1.4", "2.25." + "9" * 59, DEFLATED, "A", "1.2", "V"),
    ("1.2.840.10008.5.1.4.1.1.7", "1.2.3", JPEG2000, "SIXTEEN_CHARS_AE", IMPL_UID, "SIXTEEN_CHARS_VN"),
])
def test_file_meta_matches_pydicom(args: tuple) -> None:
    assert build_file_meta(*args) == _pydicom_meta(*args)


def test_file_meta_omits_empty_type_3_elements(tmp_path: Path) -> None:
    args = (CT_IMAGE, "1.2.3.4.5", EXPLICIT, "", IMPL_UID, "PACSD_0.1.0")
    assert build_file_meta(*args) == _pydicom_meta(*args)
    built = build_file_meta(CT_IMAGE, "1.2.3.4.5", EXPLICIT, "", IMPL_UID, "")
    path = tmp_path / "meta.dcm"
    path.write_bytes(built)
    parsed = pydicom.filereader.read_file_meta_info(path)
    assert [int(t) for t in parsed.keys()] == [0x00020000, 0x00020001, 0x00020002, 0x00020003,
                                               0x00020010, 0x00020012]
    assert parsed.FileMetaInformationGroupLength == len(built) - 132 - 12
    assert parsed.MediaStorageSOPInstanceUID == "1.2.3.4.5"


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm",
                                  "MR_small_implicit.dcm", "JPEG2000.dcm"])
def test_file_meta_plus_data_set_reads_in_pydicom(name: str, tmp_path: Path) -> None:
    sample = _by_name(name)
    spool, _ = _spool(tmp_path, sample)
    ours = pydicom.dcmread(spool)
    orig = pydicom.dcmread(sample.path)
    assert ours.file_meta.TransferSyntaxUID == sample.ts
    assert ours.file_meta.MediaStorageSOPInstanceUID == orig.SOPInstanceUID
    assert ours.file_meta.SourceApplicationEntityTitle == "STORESCU"
    assert ours.file_meta.ImplementationClassUID == IMPL_UID
    assert ours == orig


@pytest.mark.parametrize("kwargs, message", [
    ({"sop_instance_uid": "1.2.3.x"}, "Media Storage SOP Instance UID"),
    ({"sop_instance_uid": "1." + "2" * 64}, "at most 64"),
    ({"sop_class_uid": ""}, "Media Storage SOP Class UID"),
    ({"transfer_syntax": "1.2.840.10008.1.2\x00"}, "Transfer Syntax UID"),
    ({"source_ae": "SEVENTEEN_CHARS_A"}, "Source Application Entity Title"),
    ({"source_ae": "BAD\\AE"}, "Source Application Entity Title"),
    ({"implementation_version": "VERSIÖN"}, "not ASCII"),
])
def test_file_meta_rejects_bad_values(kwargs: dict, message: str) -> None:
    args = {"sop_class_uid": CT_IMAGE, "sop_instance_uid": "1.2.3", "transfer_syntax": EXPLICIT,
            "source_ae": "AE", "implementation_class_uid": IMPL_UID, "implementation_version": "V1"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        build_file_meta(**args)
