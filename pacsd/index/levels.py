"""Which attributes belong to which level, and the index row of each level for one data set.

Patient, study and series attributes are kept once per entity (from the first instance
that brings them); every other attribute stays with the instance. A C-FIND at any level can
then answer any key by merging the JSON of the levels above it.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import structlog
from pydicom import Dataset

from pacsd.index.dicomjson import to_json_dict

log = structlog.get_logger("pacsd.index")

# Values larger than this stay in the blob only (pixel data never reaches here).
INLINE_LIMIT = 8 * 1024
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}

# Patient Study module (PS3.3 C.7.2.2) attributes live in group 0010 but vary per study.
_PATIENT_STUDY = {0x00101010, 0x00101020, 0x00101030, 0x00102180, 0x001021B0, 0x00102000,
                  0x001021A0, 0x001021C0, 0x00101021, 0x00101022, 0x00101023, 0x00101024}

STUDY_TAGS = {
    0x0020000D, 0x00080020, 0x00080030, 0x00080050, 0x00080051, 0x00200010, 0x00080090,
    0x00080096, 0x00081030, 0x00081032, 0x00081060, 0x00081048, 0x00081049, 0x00081062,
    0x00081080, 0x00081084, 0x00081110, 0x00201070, 0x00324000, 0x00321060, 0x00321064,
    0x00401012, 0x00401002, 0x00401001, 0x0032000A, 0x00321032, 0x00321033, 0x00080056,
} | _PATIENT_STUDY

SERIES_TAGS = {
    0x0020000E, 0x00080060, 0x00200011, 0x0008103E, 0x0008103F, 0x00080021, 0x00080031,
    0x00180015, 0x00200060, 0x00181030, 0x00081070, 0x00081072, 0x00081050, 0x00081052,
    0x00400244, 0x00400245, 0x00400253, 0x00400254, 0x00400260, 0x00400275, 0x00081111,
    0x00200052, 0x00201040, 0x00080070, 0x00080080, 0x00080081, 0x00081010, 0x00081040,
    0x00081090, 0x00181000, 0x00181020, 0x00185100, 0x00280108, 0x00280109, 0x00102210,
}


def level_of(tag: int) -> str:
    if tag in STUDY_TAGS:
        return "study"
    if tag in SERIES_TAGS:
        return "series"
    if (tag >> 16) == 0x0010:
        return "patient"
    return "instance"


@dataclass
class LevelRows:
    """Column values per level. The instance row carries its DICOM JSON in `attrs`; the
    patient, study and series JSON stay unserialised in `parts` until the writer inserts
    that entity (`attrs(level)`): most instances belong to a series it already has."""

    patient: dict[str, Any]
    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]
    parts: dict[str, dict[str, Any] | str] = field(default_factory=dict, repr=False)

    def attrs(self, level: str) -> str:
        part = self.parts[level]
        return part if isinstance(part, str) else _serialise(part)

    def serialise_parts(self) -> None:
        """Each level's JSON as text now. An ingest process does it before it sends the
        rows to the daemon, which then unpickles three strings instead of rebuilding
        hundreds of small objects, and serialises nothing for a new patient, study or
        series."""
        self.parts = {level: self.attrs(level) for level in ("patient", "study", "series")}


def _value_text(value: Any) -> str:
    if isinstance(value, dict):  # PN: component groups, trailing empty ones dropped
        groups = [value.get(k, "") for k in ("Alphabetic", "Ideographic", "Phonetic")]
        while groups and not groups[-1]:
            groups.pop()
        return "=".join(groups)
    return "" if value is None else str(value)


def _text(whole: dict, tag: int, limit: int) -> str:
    """A column's text from the instance's DICOM JSON (values joined by backslashes)."""
    entry = whole.get(f"{tag:08X}")
    if not entry or "Value" not in entry:
        return ""
    values = entry["Value"]
    if len(values) == 1 and type(values[0]) is str:  # most columns: no join, no generator
        return values[0][:limit]
    return "\\".join(_value_text(v) for v in values)[:limit]


def _int(whole: dict, tag: int) -> int | None:
    entry = whole.get(f"{tag:08X}")
    if not entry or not entry.get("Value"):
        return None
    try:
        number = int(entry["Value"][0])
    except (TypeError, ValueError):
        return None
    return number if -(2**31) <= number < 2**31 else None


def whole_json(ds: Dataset) -> dict[str, Any]:
    """The header as one DICOM JSON object (PS3.18 F.2), without large binary values."""
    return to_json_dict(ds, INLINE_LIMIT, _drop_bulk)


def level_parts(whole: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """That object split by level (serialise a part with `_serialise`).

    One conversion of the whole header, split by tag afterwards: converting per level costs
    twice as much on the ingest path.
    """
    split: dict[str, dict] = {"patient": {}, "study": {}, "series": {}, "instance": {}}
    charset = whole.get("00080005")
    for key, value in whole.items():
        if "BulkDataURI" in value or key == "00080005":  # large binary values stay in the blob
            continue
        tag = int(key, 16)
        if tag >> 16 != 0x0002:
            split[level_of(tag)][key] = value
    if charset is not None:
        for part in split.values():
            # Keep the character set at every level: the values are decoded already, but
            # a C-FIND response must say which set its strings are in.
            part["00080005"] = charset
    return split


def _serialise(part: dict[str, Any]) -> str:
    return json.dumps(dict(sorted(part.items())), separators=(",", ":"), ensure_ascii=False)


def _drop_bulk(element) -> str:
    return ""


def _drop_unreadable(ds: Dataset) -> list[str]:
    """Remove the elements whose value pydicom cannot convert; return their tags.

    Modalities do send an IS of "1A" or a DS of "1,5". The blob keeps them as received; the
    index leaves them out rather than refuse the whole instance for one value.
    """
    dropped: list[str] = []
    for tag in list(ds.keys()):
        try:
            element = ds[tag]
            if element.VR == "SQ":
                for item in element.value or []:
                    dropped += _drop_unreadable(item)
            else:
                element.to_json_dict(INLINE_LIMIT, lambda el: "")
        except Exception:
            del ds[tag]
            dropped.append(str(tag))
    return dropped


def rows(ds: Dataset) -> LevelRows:
    """Column values for each level's row; `attrs` holds that level's DICOM JSON."""
    try:
        whole = whole_json(ds)
    except Exception:
        dropped = _drop_unreadable(ds)
        if not dropped:
            raise
        log.warning("index.unreadable_values_left_out", tags=dropped,
                    sop_instance_uid=str(ds.get("SOPInstanceUID", "")))
        whole = whole_json(ds)
    parts = level_parts(whole)
    patient = {
        "patient_id": _text(whole, 0x00100020, 64),
        "issuer_of_patient_id": _text(whole, 0x00100021, 64),
        "patient_name": _text(whole, 0x00100010, 324),
        "patient_birth_date": _text(whole, 0x00100030, 8),
        "patient_birth_time": _text(whole, 0x00100032, 16),
        "patient_sex": _text(whole, 0x00100040, 16),
    }
    study = {
        "study_instance_uid": _text(whole, 0x0020000D, 64),
        "study_date": _text(whole, 0x00080020, 8),
        "study_time": _text(whole, 0x00080030, 16),
        "accession_number": _text(whole, 0x00080050, 16),
        "study_id": _text(whole, 0x00200010, 16),
        "referring_physician_name": _text(whole, 0x00080090, 324),
        "study_description": _text(whole, 0x00081030, 64),
    }
    series = {
        "series_instance_uid": _text(whole, 0x0020000E, 64),
        "modality": _text(whole, 0x00080060, 16),
        "series_number": _int(whole, 0x00200011),
        "series_description": _text(whole, 0x0008103E, 64),
        "series_date": _text(whole, 0x00080021, 8),
        "series_time": _text(whole, 0x00080031, 16),
        "body_part_examined": _text(whole, 0x00180015, 16),
        "performed_procedure_step_start_date": _text(whole, 0x00400244, 8),
        "performed_procedure_step_start_time": _text(whole, 0x00400245, 16),
    }
    instance = {
        "sop_instance_uid": _text(whole, 0x00080018, 64),
        "sop_class_uid": _text(whole, 0x00080016, 64),
        "instance_number": _int(whole, 0x00200013),
        "content_date": _text(whole, 0x00080023, 8),
        "content_time": _text(whole, 0x00080033, 16),
        "number_of_frames": _int(whole, 0x00280008),
        "attrs": _serialise(parts["instance"]),
    }
    return LevelRows(patient, study, series, instance, parts)


@dataclass
class IndexRecord:
    """One instance for the index writer: its rows, and where its blob is. Here, not in
    index/writer.py, so that an ingest process builds one without importing SQLAlchemy."""

    rows: LevelRows
    blob_key: str
    size: int
    sha256: str
    dataset_offset: int
    transfer_syntax_uid: str
    calling_ae: str
    future: asyncio.Future = field(default=None, repr=False)  # type: ignore[assignment]
    # The blob's fsyncs (a Future of store/syncer.py BlobSyncer), started as the blob is
    # placed (or, if not, when the writer receives the record); the commit waits for it.
    synced: Any = field(default=None, repr=False)


class IndexNotWritten(Exception):
    """IndexWriter.prepare_and_commit: the record was prepared (its blob placed) but its
    group did not commit; `cause` says why."""

    def __init__(self, record: IndexRecord, cause: Exception) -> None:
        super().__init__(repr(cause))
        self.record = record
        self.cause = cause
