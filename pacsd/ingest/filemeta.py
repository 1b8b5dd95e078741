"""The Part 10 header pacsd writes in front of a received data set: preamble, "DICM" and
the File Meta Information group (PS3.10 §7.1), built from the command and the presentation
context before the data set arrives."""

from __future__ import annotations

import re
import struct

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
