"""Which attributes belong to which level, and the index row of each level for one data set.

Patient, study and series attributes are kept once per entity (from the first instance
that brings them); every other attribute stays with the instance. A C-FIND at any level can
then answer any key by merging the JSON of the levels above it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import structlog
from pydicom import Dataset

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
    patient: dict[str, Any]
    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    return text[:limit]


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value in (None, ""):
        return None
    try:
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0]
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if -(2**31) <= number < 2**31 else None


def level_json(ds: Dataset) -> dict[str, str]:
    """DICOM JSON (PS3.18 F.2) per level, without large binary values.

    One conversion of the whole header, split by tag afterwards: converting per level costs
    twice as much on the ingest path.
    """
    whole = ds.to_json_dict(INLINE_LIMIT, _drop_bulk)
    split: dict[str, dict] = {"patient": {}, "study": {}, "series": {}, "instance": {}}
    charset = whole.pop("00080005", None)
    for key, value in whole.items():
        if "BulkDataURI" in value:  # a large binary value: it stays in the blob only
            continue
        tag = int(key, 16)
        if tag >> 16 != 0x0002:
            split[level_of(tag)][key] = value
    out = {}
    for name, part in split.items():
        if charset is not None:
            # Keep the character set at every level: the values are decoded already, but
            # a C-FIND response must say which set its strings are in.
            part["00080005"] = charset
        out[name] = json.dumps(dict(sorted(part.items())), separators=(",", ":"), ensure_ascii=False)
    return out


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
        attrs = level_json(ds)
    except Exception:
        dropped = _drop_unreadable(ds)
        if not dropped:
            raise
        log.warning("index.unreadable_values_left_out", tags=dropped,
                    sop_instance_uid=str(ds.get("SOPInstanceUID", "")))
        attrs = level_json(ds)
    patient = {
        "patient_id": _text(ds, "PatientID", 64),
        "issuer_of_patient_id": _text(ds, "IssuerOfPatientID", 64),
        "patient_name": _text(ds, "PatientName", 324),
        "patient_birth_date": _text(ds, "PatientBirthDate", 8),
        "patient_birth_time": _text(ds, "PatientBirthTime", 16),
        "patient_sex": _text(ds, "PatientSex", 16),
        "attrs": attrs["patient"],
    }
    study = {
        "study_instance_uid": _text(ds, "StudyInstanceUID", 64),
        "study_date": _text(ds, "StudyDate", 8),
        "study_time": _text(ds, "StudyTime", 16),
        "accession_number": _text(ds, "AccessionNumber", 16),
        "study_id": _text(ds, "StudyID", 16),
        "referring_physician_name": _text(ds, "ReferringPhysicianName", 324),
        "study_description": _text(ds, "StudyDescription", 64),
        "attrs": attrs["study"],
    }
    series = {
        "series_instance_uid": _text(ds, "SeriesInstanceUID", 64),
        "modality": _text(ds, "Modality", 16),
        "series_number": _int(ds, "SeriesNumber"),
        "series_description": _text(ds, "SeriesDescription", 64),
        "series_date": _text(ds, "SeriesDate", 8),
        "series_time": _text(ds, "SeriesTime", 16),
        "body_part_examined": _text(ds, "BodyPartExamined", 16),
        "performed_procedure_step_start_date": _text(ds, "PerformedProcedureStepStartDate", 8),
        "performed_procedure_step_start_time": _text(ds, "PerformedProcedureStepStartTime", 16),
        "attrs": attrs["series"],
    }
    instance = {
        "sop_instance_uid": _text(ds, "SOPInstanceUID", 64),
        "sop_class_uid": _text(ds, "SOPClassUID", 64),
        "instance_number": _int(ds, "InstanceNumber"),
        "content_date": _text(ds, "ContentDate", 8),
        "content_time": _text(ds, "ContentTime", 16),
        "number_of_frames": _int(ds, "NumberOfFrames"),
        "attrs": attrs["instance"],
    }
    return LevelRows(patient, study, series, instance)

