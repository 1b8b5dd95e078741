"""Which stored instances a C-MOVE or C-GET identifier names (PS3.4 C.4.2.2.1, C.4.3.2.1).

A retrieve identifier holds the Query/Retrieve Level and unique keys only: Patient ID at the
PATIENT level (Patient Root), Study, Series and SOP Instance UIDs at the levels below. The key
of the retrieve level may be a list of UIDs (backslash-separated); keys of the levels above
it, when given, are single values that narrow the match. No wildcards, no other keys.

`parse_identifier` checks an identifier and turns it into a `RetrieveRequest` or raises
`IdentifierError` (status A900 or C000 with an Error Comment); `resolve` runs it as SQL over
the index and returns the instances to send, in study/series/instance order, with what the
sender needs: the blob, where its data set starts, and the stored transfer syntax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import sqlalchemy as sa
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from sqlalchemy.ext.asyncio import AsyncEngine

from pacsd.dimse.identifier import IdentifierError
from pacsd.dimse.status import Status
from pacsd.index.schema import instances, patients, series, studies
from pacsd.uid import is_valid_uid

PATIENT_ROOT = "PATIENT_ROOT"
STUDY_ROOT = "STUDY_ROOT"

# Information model -> its levels, top down.
LEVELS = {
    PATIENT_ROOT: ("PATIENT", "STUDY", "SERIES", "IMAGE"),
    STUDY_ROOT: ("STUDY", "SERIES", "IMAGE"),
}

# The unique key of each level.
UNIQUE_KEYS = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
_KEY_LEVEL = {keyword: level for level, keyword in UNIQUE_KEYS.items()}
_ORDER = ("PATIENT", "STUDY", "SERIES", "IMAGE")

# Attributes an identifier may carry besides the level and the unique keys; their values
# do not change what is retrieved.
_NEUTRAL_TAGS = frozenset({
    Tag(0x0008, 0x0005),  # Specific Character Set
    Tag(0x0008, 0x0053),  # Query/Retrieve View (needs extended negotiation; ignored)
    Tag(0x0008, 0x0201),  # Timezone Offset From UTC
})
_LEVEL_TAG = Tag(0x0008, 0x0052)
_ISSUER_TAG = Tag(0x0010, 0x0021)
_KEY_TAGS = {
    Tag(0x0010, 0x0020): "PatientID",
    Tag(0x0020, 0x000D): "StudyInstanceUID",
    Tag(0x0020, 0x000E): "SeriesInstanceUID",
    Tag(0x0008, 0x0018): "SOPInstanceUID",
}

# UIDs per IN (...) clause: SQLite allows 32766 bound parameters (999 before 3.32).
_CHUNK = 500


@dataclass(frozen=True)
class RetrieveRequest:
    """A checked identifier: the level, and the keys given at and above it."""

    model: str
    level: str
    patient_id: str | None = None
    issuer_of_patient_id: str | None = None
    study_uids: tuple[str, ...] = ()
    series_uids: tuple[str, ...] = ()
    sop_instance_uids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class InstanceRef:
    """One instance to send: its identity, its stored encoding and where its bytes are."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    blob_key: str
    dataset_offset: int  # where the data set starts in the blob
    size: int  # of the whole blob file

    @property
    def dataset_size(self) -> int:
        return self.size - self.dataset_offset


# --- the identifier ------------------------------------------------------------------------


def _values(element) -> list[str]:
    """An element's values as stripped strings; [] when it has no value."""
    value = element.value
    if value is None:
        return []
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        items = value.split("\\")
    else:
        try:
            items = [str(v) for v in value]
        except TypeError:
            items = [str(value)]
    items = [item.strip(" \0") for item in items]
    if items == [""]:
        return []
    return items


def _name(keyword: str) -> str:
    return {"PatientID": "Patient ID", "StudyInstanceUID": "Study Instance UID",
            "SeriesInstanceUID": "Series Instance UID",
            "SOPInstanceUID": "SOP Instance UID"}.get(keyword, keyword)


def parse_identifier(ds: Dataset, model: str) -> RetrieveRequest:
    """Check a retrieve identifier against `model` (PATIENT_ROOT or STUDY_ROOT).

    Rules (PS3.4 C.4.2.2.1 and C.4.3.2.1, hierarchical retrieve):
    - Query/Retrieve Level is required and must be a level of the model.
    - The unique key of that level is required; for a UID level it may be a list of UIDs.
    - Unique keys of higher levels may be given (single values; they narrow the match) or
      left out. Patient ID is accepted above the PATIENT level in both models, and Issuer
      of Patient ID along with a Patient ID.
    - Keys of lower levels and any other attribute must have no value.
    - No wildcards; every UID well formed.
    Errors raise IdentifierError with status A900 (identifier does not match the SOP class).
    """
    def fail(comment: str):
        raise IdentifierError(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, comment)

    levels = LEVELS[model]
    level_element = ds.get(_LEVEL_TAG)
    level_values = _values(level_element) if level_element is not None else []
    if not level_values:
        fail("no Query/Retrieve Level (0008,0052) in the identifier")
    if len(level_values) > 1:
        fail("Query/Retrieve Level (0008,0052) has more than one value")
    level = level_values[0].upper()
    if level not in levels:
        root = "Patient Root" if model == PATIENT_ROOT else "Study Root"
        fail(f"Query/Retrieve Level {level_values[0]!r} is not one of {'/'.join(levels)} ({root})")
    depth = _ORDER.index(level)

    keys: dict[str, list[str]] = {}
    issuer: list[str] = []
    for element in ds:
        tag = element.tag
        if tag == _LEVEL_TAG or tag in _NEUTRAL_TAGS or tag.element == 0x0000:
            continue
        values = _values(element) if element.VR != "SQ" else (["item"] if element.value else [])
        if not values:
            continue  # an empty attribute asks for nothing
        keyword = _KEY_TAGS.get(tag)
        if tag == _ISSUER_TAG:
            issuer = values
            continue
        if keyword is None:
            name = element.keyword or str(tag)
            fail(f"{name} {tag} is not a unique key; a retrieve identifier holds "
                 "only the level and unique keys")
        key_depth = _ORDER.index(_KEY_LEVEL[keyword])
        if key_depth > depth:
            fail(f"{_name(keyword)} given at the {level} level (a key of a lower level)")
        keys[keyword] = values

    unique = UNIQUE_KEYS[level]
    if unique not in keys:
        fail(f"{_name(unique)} is required at the {level} level")

    for keyword, values in keys.items():
        at_level = keyword == unique
        if keyword == "PatientID":
            if len(values) > 1:
                fail("Patient ID must be a single value")
            if any(c in values[0] for c in "*?"):
                fail(f"wildcard in Patient ID {values[0]!r}: a retrieve names instances exactly")
            continue
        if len(values) > 1 and not at_level:
            fail(f"{_name(keyword)} above the retrieve level must be a single UID")
        for value in values:
            if any(c in value for c in "*?"):
                fail(f"wildcard in {_name(keyword)} {value[:40]!r}")
            if not is_valid_uid(value):
                shown = value if len(value) <= 40 else value[:37] + "..."
                fail(f"{_name(keyword)} {shown!r} is not a valid UID")

    if issuer:
        if "PatientID" not in keys:
            fail("Issuer of Patient ID without a Patient ID")
        if len(issuer) > 1:
            fail("Issuer of Patient ID must be a single value")

    def uids(keyword: str) -> tuple[str, ...]:
        return tuple(dict.fromkeys(keys.get(keyword, ())))

    patient = keys.get("PatientID")
    return RetrieveRequest(
        model=model,
        level=level,
        patient_id=patient[0] if patient else None,
        issuer_of_patient_id=issuer[0] if issuer else None,
        study_uids=uids("StudyInstanceUID"),
        series_uids=uids("SeriesInstanceUID"),
        sop_instance_uids=uids("SOPInstanceUID"),
    )


# --- the index -----------------------------------------------------------------------------

_COLUMNS = (
    instances.c.sop_class_uid,
    instances.c.sop_instance_uid,
    instances.c.transfer_syntax_uid,
    instances.c.blob_key,
    instances.c.dataset_offset,
    instances.c.size,
)
_JOINED = (
    instances.join(series, instances.c.series_pk == series.c.pk)
    .join(studies, series.c.study_pk == studies.c.pk)
    .join(patients, studies.c.patient_pk == patients.c.pk)
)
_ORDER_BY = (studies.c.pk, series.c.series_number, series.c.pk, instances.c.instance_number,
             instances.c.pk)
_LEVEL_COLUMN = {
    "STUDY": studies.c.study_instance_uid,
    "SERIES": series.c.series_instance_uid,
    "IMAGE": instances.c.sop_instance_uid,
}


def statements(request: RetrieveRequest) -> Iterable[sa.Select]:
    """The SELECTs whose rows, concatenated, are the instances `request` names."""
    conditions = []
    if request.patient_id is not None:
        conditions.append(patients.c.patient_id == request.patient_id)
    if request.issuer_of_patient_id is not None:
        conditions.append(patients.c.issuer_of_patient_id == request.issuer_of_patient_id)
    lists = {"STUDY": request.study_uids, "SERIES": request.series_uids,
             "IMAGE": request.sop_instance_uids}
    at_level: tuple[str, ...] = ()
    for level, uids in lists.items():
        if not uids:
            continue
        if level == request.level:
            at_level = uids
        else:
            conditions.append(_LEVEL_COLUMN[level] == uids[0])
    base = sa.select(*_COLUMNS).select_from(_JOINED).where(*conditions).order_by(*_ORDER_BY)
    if request.level == "PATIENT":
        yield base
        return
    column = _LEVEL_COLUMN[request.level]
    for start in range(0, len(at_level), _CHUNK):
        yield base.where(column.in_(at_level[start:start + _CHUNK]))


async def resolve(engine: AsyncEngine, request: RetrieveRequest) -> list[InstanceRef]:
    """The instances `request` names, in study, series and instance order."""
    refs: list[InstanceRef] = []
    async with engine.connect() as conn:
        for stmt in statements(request):
            result = await conn.execute(stmt)
            refs.extend(InstanceRef(*row) for row in result)
    return refs
