"""DICOM JSON (PS3.18 F.2) straight from the raw elements pydicom read, for the ingest path.

pydicom's Dataset.to_json_dict first converts every raw element into a Python value
(DSfloat, PersonName, MultiValue...) and then into JSON: most of the index's CPU cost per
instance. Here the common cases go from bytes to JSON values directly; anything unusual
(a character set other than ASCII, Latin-1 or UTF-8, big endian, an ambiguous VR, a value
that does not parse) is handed to pydicom element by element, so the output is what
pydicom would give.
"""

from __future__ import annotations

import base64
import struct
from typing import Any, Callable

from pydicom import Dataset
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement

_ENCODINGS = {None: "latin-1", "": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1",
              "ISO_IR 192": "utf-8"}
_TEXT_MULTI = {"AE", "AS", "CS", "DA", "DT", "LO", "SH", "TM", "UC", "UI"}
_TEXT_SINGLE = {"LT", "ST", "UT", "UR"}
_BINARY = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
_NUMBERS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d", "UV": "Q", "SV": "q"}

BulkHandler = Callable[[DataElement], str]


class _Fallback(Exception):
    pass


def to_json_dict(ds: Dataset, inline_limit: int, bulk_handler: BulkHandler) -> dict[str, Any]:
    """Like Dataset.to_json_dict(inline_limit, bulk_handler), faster on raw elements."""
    charset = ds.get("SpecificCharacterSet")
    if isinstance(charset, (list, tuple)) or type(charset).__name__ == "MultiValue":
        encoding = None  # ISO 2022 code extensions: pydicom's decoder
    else:
        encoding = _ENCODINGS.get(charset)
    out: dict[str, Any] = {}
    for tag, element in ds._dict.items():
        key = "%08X" % tag
        if (encoding is not None and isinstance(element, RawDataElement)
                and element.is_little_endian):
            try:
                value = _raw(element, encoding, inline_limit)
            except _Fallback:
                value = _pydicom(ds, tag, inline_limit, bulk_handler)
        elif not isinstance(element, RawDataElement) and element.VR == "SQ":
            value = {"vr": "SQ", "Value": [to_json_dict(item, inline_limit, bulk_handler)
                                           for item in element.value or []]}
        else:
            value = _pydicom(ds, tag, inline_limit, bulk_handler)
        if value is not None:
            out[key] = value
    return out


def _pydicom(ds: Dataset, tag, inline_limit: int, bulk_handler: BulkHandler) -> dict[str, Any]:
    element = ds[tag]
    return element.to_json_dict(bulk_handler, inline_limit)


def _raw(element: RawDataElement, encoding: str, inline_limit: int) -> dict[str, Any] | None:
    vr = element.VR
    if vr is None:  # implicit VR: the dictionary's, and only where it is unambiguous
        try:
            vr = dictionary_VR(element.tag)
        except KeyError:
            vr = "UN"
    if vr in ("SQ", "UN") or " or " in vr:
        # UN: pydicom replaces it with the dictionary's VR where the tag is known
        raise _Fallback
    raw = element.value
    if not raw:
        return {"vr": vr}
    if vr in _BINARY:
        if len(raw) > inline_limit:
            raise _Fallback  # pydicom's handler decides (BulkDataURI)
        return {"vr": vr, "InlineBinary": base64.b64encode(raw).decode("ascii")}
    if vr in _NUMBERS:
        code = _NUMBERS[vr]
        size = struct.calcsize(code)
        if len(raw) % size:
            raise _Fallback
        return {"vr": vr, "Value": list(struct.unpack(f"<{len(raw) // size}{code}", raw))}
    if vr == "AT":
        if len(raw) % 4:
            raise _Fallback
        pairs = struct.unpack(f"<{len(raw) // 2}H", raw)
        return {"vr": vr, "Value": [f"{pairs[i]:04X}{pairs[i + 1]:04X}" for i in range(0, len(pairs), 2)]}
    text = raw.decode(encoding)
    if vr in _TEXT_SINGLE:
        text = text.rstrip(" \x00")
        return {"vr": vr, "Value": [text]} if text else {"vr": vr}
    parts = text.rstrip(" \x00").split("\\")
    if vr in _TEXT_MULTI:
        # As pydicom gives them: only the value's trailing padding goes (PS3.5 6.2).
        values = parts
    elif vr == "PN":
        values = [_person_name(p) for p in parts]
    elif vr == "DS":
        values = [_number(p, float) for p in parts]
    elif vr == "IS":
        values = [_number(p, int) for p in parts]
    else:
        raise _Fallback
    if all(v is None or v == "" for v in values):
        return {"vr": vr}
    return {"vr": vr, "Value": values}


def _person_name(text: str) -> dict[str, str] | None:
    text = text.strip(" ")
    if not text:
        return None
    groups = text.split("=")
    name = {}
    for label, group in zip(("Alphabetic", "Ideographic", "Phonetic"), groups):
        if group:
            name[label] = group
    return name or None


def _number(text: str, kind) -> int | float | None:
    text = text.strip(" ")
    if not text:
        return None
    try:
        value = kind(text)
    except ValueError:
        raise _Fallback from None
    if kind is float and (value != value or value in (float("inf"), float("-inf"))):
        raise _Fallback
    return value
