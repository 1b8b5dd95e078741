"""The matching engine (pacsd/index/query.py) on SQLite and PostgreSQL, and the C-FIND
identifier handling around it (pacsd/services/qr_find.py): every matching type of PS3.4
C.2.2.2 with the exact expected result sets, escaping, computed keys, character sets, one
response per entity, and streaming in bounded memory.

The index is filled through the IndexWriter as the storage service fills it. Every test runs
once per backend (tests/dbfixtures.py); PostgreSQL needs PACSD_TEST_PG_URL.
"""

from __future__ import annotations

import asyncio
import gc
import json
import tracemalloc
import uuid
from concurrent.futures import ThreadPoolExecutor

import pydicom
import pytest
import sqlalchemy as sa
from pydicom import Dataset

from pacsd.dimse.status import Status
from pacsd.index.levels import IndexRecord, rows
from pacsd.index.reader import reader_for
from pacsd.index.query import Key, Query, QueryError, find, keys_from_dataset, parse_range, set_character_set
from pacsd.index.writer import IndexWriter
from pacsd.services.qr_find import (PATIENT_ROOT_FIND, STUDY_ROOT_FIND, IdentifierError, decode_identifier,
                                    encode_identifier, parse_request, unique_keys)
from tests.dbfixtures import engine, index_url  # noqa: F401  (pytest fixtures)

ROOT = "1.2.826.0.1.3680043.8.498.4710"
CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
US, SR = "1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.88.11"
SOP_CLASS = {"CT": CT, "MR": MR, "US": US, "SR": SR}
IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"


def _japanese() -> tuple[str, list[str]]:
    """The name and character set of pydicom's chrH31.dcm (ISO 2022 IR 87)."""
    from pydicom.data import get_charset_files

    found = get_charset_files("chrH31.dcm")
    if not found:
        pytest.skip("pydicom's chrH31.dcm is not available offline")
    ds = pydicom.dcmread(found[0], force=True)
    return str(ds.PatientName), list(ds.SpecificCharacterSet)


JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"

PATIENTS = {
    "P1": ("Doe^John", "PID1", "19700101", "ISO_IR 100"),
    "P2": ("Müller^Hans", "PID2", "19800202", "ISO_IR 100"),
    "P3": (JAPANESE, "PID3", "19900303", ["", "ISO 2022 IR 87"]),
    "P4": ("doe^jane", "PID4", "", None),
}
# name, patient, date, time, description, referring physician, accession, procedure codes,
# series as (modality, instances)
STUDIES = [
    ("S1", "P1", "20240110", "090000", "CHEST CT", "Ref^Doc", "ACC1", ["CTCHEST"], [("CT", 2)]),
    ("S2", "P1", "20240111", "230000", "100% done", "ref^doc", "ACC2", ["CTHEAD", "MRHEAD"], [("CT", 1), ("MR", 3)]),
    ("S3", "P2", "20240112", "000000", "100_ done", "UnderXScore^Doc", "ACC3", [], [("MR", 1)]),
    ("S4", "P2", "20240115", "120000", "100x done", "Under_Score^Doc", "ACC4", [], [("US", 1)]),
    ("S5", "P3", "20231231", "235959", "wow! done", "", "", [], [("CT", 1)]),
    ("S6", "P4", "", "", "[a] b", "", "", [], [("SR", 1)]),
]
STUDY_NAMES = [s[0] for s in STUDIES]


def uid(*parts) -> str:
    return ".".join([ROOT, *(str(p) for p in parts)])


def study_uid(name: str) -> str:
    return uid(1, STUDY_NAMES.index(name) + 1)


def series_uid(study: str, n: int) -> str:
    return uid(2, STUDY_NAMES.index(study) + 1, n + 1)


def instance_uid(study: str, series_no: int, n: int) -> str:
    return uid(3, STUDY_NAMES.index(study) + 1, series_no + 1, n + 1)


def datasets(japanese: tuple[str, list[str]] | None = None) -> list[Dataset]:
    out = []
    for name, patient, date, time, description, referring, accession, codes, series_list in STUDIES:
        patient_name, patient_id, birth, charset = PATIENTS[patient]
        if patient == "P3" and japanese:
            patient_name, charset = japanese
        for series_no, (modality, count) in enumerate(series_list):
            for n in range(count):
                ds = Dataset()
                if charset:
                    ds.SpecificCharacterSet = charset
                ds.PatientName = patient_name
                ds.PatientID = patient_id
                if birth:
                    ds.PatientBirthDate = birth
                ds.PatientSex = "O"
                ds.StudyInstanceUID = study_uid(name)
                ds.StudyDate, ds.StudyTime = date, time
                ds.StudyDescription = description
                ds.ReferringPhysicianName = referring
                ds.AccessionNumber = accession
                ds.StudyID = name
                ds.PatientAge = f"0{STUDY_NAMES.index(name) + 40}Y"
                if codes:
                    items = []
                    for code in codes:
                        item = Dataset()
                        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, "99PACSD", code.lower()
                        items.append(item)
                    ds.ProcedureCodeSequence = items
                ds.SeriesInstanceUID = series_uid(name, series_no)
                ds.Modality = modality
                ds.SeriesNumber = series_no + 1
                ds.SeriesDate, ds.SeriesTime = date, time
                ds.ProtocolName = f"{modality} protocol {name}"
                ds.SOPClassUID = SOP_CLASS[modality]
                ds.SOPInstanceUID = instance_uid(name, series_no, n)
                ds.InstanceNumber = n + 1
                ds.AcquisitionDate = date or "20200101"
                ds.AcquisitionTime = f"{10 + n:02d}0000"
                ds.ImageType = ["ORIGINAL", "PRIMARY"] if n == 0 else ["DERIVED", "SECONDARY"]
                out.append(ds)
    return out


class NoBlobs:
    """The writer fsyncs blob directories before a commit; these records have no blobs."""

    def sync(self, keys) -> None:
        pass


def record_of(level_rows) -> IndexRecord:
    return IndexRecord(rows=level_rows, blob_key=f"test/{uuid.uuid4().hex}", size=1, sha256="0" * 64,
                       dataset_offset=0, transfer_syntax_uid=EXPLICIT_LE, calling_ae="TEST")


async def fill(engine, level_rows: list) -> None:
    executor = ThreadPoolExecutor(2)
    writer = IndexWriter(engine, NoBlobs(), executor, "keep")
    writer.start()
    try:
        outcomes = await asyncio.gather(*(writer.submit(record_of(r)) for r in level_rows))
        assert all(o.stored for o in outcomes)
    finally:
        await writer.close()
        executor.shutdown()


@pytest.fixture
async def index(engine):
    await fill(engine, [rows(ds) for ds in datasets(_japanese())])
    return engine


def key(name: str, value: str = "", vr: str | None = None) -> Key:
    return Key.of(name, value, vr)


async def run(engine, level: str, *keys: Key, ci: bool = False, **options) -> list[Dataset]:
    query = Query(level, keys, pn_case_insensitive=ci, **options)
    return [query.response(m) async for m in find(engine, query)]


async def studies_matching(engine, *keys: Key, ci: bool = False) -> set[str]:
    found = await run(engine, "STUDY", key("StudyInstanceUID"), *keys, ci=ci)
    names = [STUDY_NAMES[int(str(ds.StudyInstanceUID).rsplit(".", 1)[1]) - 1] for ds in found]
    assert len(names) == len(set(names)), "a study answered twice"
    return set(names)


# -- 1. matching types -----------------------------------------------------------------------


async def test_universal_matching_returns_every_study_with_its_values(index):
    found = await run(index, "STUDY", key("StudyInstanceUID"), key("StudyDate"), key("PatientName"),
                      key("AccessionNumber"), key("StudyDescription"))
    assert len(found) == 6
    by_uid = {str(ds.StudyInstanceUID): ds for ds in found}
    s2 = by_uid[study_uid("S2")]
    assert (s2.StudyDate, str(s2.PatientName), s2.AccessionNumber, s2.StudyDescription) == (
        "20240111", "Doe^John", "ACC2", "100% done")
    assert s2.QueryRetrieveLevel == "STUDY"
    s6 = by_uid[study_uid("S6")]
    assert s6.StudyDate in ("", None) and "StudyDate" in s6  # requested, empty: still there
    # exactly the requested keys and the level, nothing else
    assert {e.keyword for e in s2} == {"QueryRetrieveLevel", "StudyInstanceUID", "StudyDate", "PatientName",
                                       "AccessionNumber", "StudyDescription"}
    # a lone '*' is universal matching too (C.2.2.2.4), empty values included
    assert await studies_matching(index, key("StudyDescription", "*")) == set(STUDY_NAMES)
    assert await studies_matching(index, key("StudyDate", "*")) == set(STUDY_NAMES)


async def test_single_value_matching(index):
    assert await studies_matching(index, key("AccessionNumber", "ACC2")) == {"S2"}
    assert await studies_matching(index, key("AccessionNumber", "acc2")) == set()  # case-sensitive
    assert await studies_matching(index, key("StudyDescription", "100% done")) == {"S2"}
    assert await studies_matching(index, key("PatientID", "PID2")) == {"S3", "S4"}
    assert await studies_matching(index, key("StudyDate", "20240112")) == {"S3"}
    assert await studies_matching(index, key("StudyTime", "0900")) == {"S1"}  # precision of the value
    series = await run(index, "SERIES", key("StudyInstanceUID", study_uid("S2")), key("SeriesInstanceUID"),
                       key("Modality", "MR"))
    assert [str(s.SeriesInstanceUID) for s in series] == [series_uid("S2", 1)]
    numbered = await run(index, "SERIES", key("StudyInstanceUID", study_uid("S2")), key("SeriesNumber", "2"))
    assert [s.SeriesNumber for s in numbered] == [2]
    images = await run(index, "IMAGE", key("SeriesInstanceUID", series_uid("S2", 1)), key("InstanceNumber", "3"),
                       key("SOPInstanceUID"))
    assert [str(i.SOPInstanceUID) for i in images] == [instance_uid("S2", 1, 2)]


async def test_several_values_match_when_any_matches(index):
    assert await studies_matching(index, key("AccessionNumber", "ACC1\\ACC4\\NONE")) == {"S1", "S4"}
    series = await run(index, "SERIES", key("StudyInstanceUID", study_uid("S2")), key("Modality", "CT\\MR"))
    assert len(series) == 2


async def test_list_of_uid_matching(index):
    value = f"{study_uid('S1')}\\{study_uid('S3')}\\{uid(9, 9)}"
    assert await studies_matching(index, key("StudyInstanceUID", value)) == {"S1", "S3"}
    images = await run(index, "IMAGE", key("SOPInstanceUID", f"{instance_uid('S2', 1, 0)}\\{instance_uid('S2', 1, 2)}"))
    assert {str(i.SOPInstanceUID) for i in images} == {instance_uid("S2", 1, 0), instance_uid("S2", 1, 2)}


async def test_wild_card_matching(index):
    assert await studies_matching(index, key("StudyDescription", "100*")) == {"S2", "S3", "S4"}
    assert await studies_matching(index, key("StudyDescription", "100? done")) == {"S2", "S3", "S4"}
    assert await studies_matching(index, key("StudyDescription", "*done")) == {"S2", "S3", "S4", "S5"}
    assert await studies_matching(index, key("StudyDescription", "?HEST*")) == {"S1"}
    assert await studies_matching(index, key("StudyDescription", "chest*")) == set()  # case-sensitive
    assert await studies_matching(index, key("AccessionNumber", "ACC?")) == {"S1", "S2", "S3", "S4"}
    assert await studies_matching(index, key("AccessionNumber", "*")) == set(STUDY_NAMES)


async def test_sql_like_metacharacters_in_values_are_literal(index):
    # %, _ and the escape character ! are LIKE's; [ is GLOB's: each must match only itself.
    assert await studies_matching(index, key("StudyDescription", "100%*")) == {"S2"}
    assert await studies_matching(index, key("StudyDescription", "100_*")) == {"S3"}
    assert await studies_matching(index, key("StudyDescription", "wow!*")) == {"S5"}
    assert await studies_matching(index, key("StudyDescription", "[a]*")) == {"S6"}
    assert await studies_matching(index, key("StudyDescription", "*%*")) == {"S2"}
    # the LIKE path of case-insensitive PN matching escapes them too
    assert await studies_matching(index, key("ReferringPhysicianName", "under_score^doc"), ci=True) == {"S4"}
    assert await studies_matching(index, key("ReferringPhysicianName", "under_*"), ci=True) == {"S4"}


async def test_range_matching(index):
    assert await studies_matching(index, key("StudyDate", "20240110-20240112")) == {"S1", "S2", "S3"}
    assert await studies_matching(index, key("StudyDate", "-20240111")) == {"S1", "S2", "S5"}
    assert await studies_matching(index, key("StudyDate", "20240112-")) == {"S3", "S4"}
    assert await studies_matching(index, key("StudyDate", "20250101-")) == set()
    assert await studies_matching(index, key("StudyTime", "2300-")) == {"S2", "S5"}
    assert await studies_matching(index, key("StudyTime", "-0900")) == {"S1", "S3"}  # 09:00 covers 09:00:xx
    assert await studies_matching(index, key("StudyTime", "11:00-12:00")) == {"S4"}  # ACR-NEMA colons
    assert await studies_matching(index, key("PatientBirthDate", "19750101-19850101")) == {"S3", "S4"}
    # S6 has no date: it never matches a range, only universal matching
    assert "S6" not in await studies_matching(index, key("StudyDate", "-20991231"))


async def test_combined_date_time_range(index):
    # 10th 10:00 to 12th 01:00 as one range (C.2.2.2.5): not 10:00-01:00 on each day.
    assert await studies_matching(index, key("StudyDate", "20240110-20240112"),
                                  key("StudyTime", "1000-0100")) == {"S2", "S3"}
    assert await studies_matching(index, key("StudyDate", "20240111-"), key("StudyTime", "2200-")) == {"S2", "S3", "S4"}
    assert await studies_matching(index, key("StudyDate", "-20240111"), key("StudyTime", "-2200")) == {"S1", "S5"}
    # a single date with a time range stays two separate conditions
    assert await studies_matching(index, key("StudyDate", "20240111"), key("StudyTime", "2200-")) == {"S2"}
    # the same on keys kept only in the JSON (Acquisition Date/Time of the instances)
    images = await run(index, "IMAGE", key("SeriesInstanceUID", series_uid("S2", 1)), key("InstanceNumber"),
                       key("AcquisitionDate", "20240111-20240112"), key("AcquisitionTime", "1100-"))
    assert sorted(i.InstanceNumber for i in images) == [2, 3]


async def test_pn_matching_case_insensitive_when_asked(index):
    async def patients(value: str, ci: bool) -> set[str]:
        found = await run(index, "PATIENT", key("PatientID"), key("PatientName", value), ci=ci)
        return {p.PatientID for p in found}

    assert await patients("doe*", ci=True) == {"PID1", "PID4"}
    assert await patients("doe*", ci=False) == {"PID4"}
    assert await patients("DOE^JOHN", ci=True) == {"PID1"}
    assert await patients("DOE^JOHN", ci=False) == set()
    # beyond ASCII: SQL narrows, Python confirms with Unicode case folding
    assert await patients("müller*", ci=True) == {"PID2"}
    assert await patients("MÜLLER^HANS", ci=True) == {"PID2"}
    assert await patients("MÜLLER^HANS", ci=False) == set()
    assert await patients("MXLLER^HANS", ci=True) == set()
    assert await patients("Müller^Hans", ci=False) == {"PID2"}
    # component groups: a value without '=' also matches the alphabetic group
    assert await patients("Yamada^Tarou", ci=False) == {"PID3"}
    assert await patients("yamada*", ci=True) == {"PID3"}
    assert await patients(JAPANESE, ci=False) == {"PID3"}
    assert await patients("*山田*", ci=True) == {"PID3"}
    assert await patients("Yamada^Tarou=山田^太郎", ci=False) == {"PID3"}  # leading groups
    assert await patients("Yamada^Tarou=山田^次郎", ci=False) == set()
    assert await patients("*Tarou", ci=False) == {"PID3"}
    assert await patients("Tarou", ci=False) == set()
    # other PN keys follow the same switch
    assert await studies_matching(index, key("ReferringPhysicianName", "REF^DOC"), ci=True) == {"S1", "S2"}
    assert await studies_matching(index, key("ReferringPhysicianName", "Ref^Doc"), ci=False) == {"S1"}


# -- 2. computed keys, keys in the JSON, sequences ------------------------------------------


async def test_computed_keys(index):
    [p1] = await run(index, "PATIENT", key("PatientID", "PID1"), key("NumberOfPatientRelatedStudies"),
                     key("NumberOfPatientRelatedSeries"), key("NumberOfPatientRelatedInstances"))
    assert (p1.NumberOfPatientRelatedStudies, p1.NumberOfPatientRelatedSeries,
            p1.NumberOfPatientRelatedInstances) == (2, 3, 6)
    found = await run(index, "STUDY", key("StudyInstanceUID", study_uid("S2")), key("ModalitiesInStudy"),
                      key("SOPClassesInStudy"), key("NumberOfStudyRelatedSeries"),
                      key("NumberOfStudyRelatedInstances"), key("NumberOfPatientRelatedStudies"))
    [s2] = found
    assert list(s2.ModalitiesInStudy) == ["CT", "MR"]
    assert sorted(s2.SOPClassesInStudy) == sorted([CT, MR])
    assert (s2.NumberOfStudyRelatedSeries, s2.NumberOfStudyRelatedInstances) == (2, 4)
    assert s2.NumberOfPatientRelatedStudies == 2  # patient keys are study keys in Study Root
    [s1] = await run(index, "STUDY", key("StudyInstanceUID", study_uid("S1")), key("ModalitiesInStudy"))
    assert s1.ModalitiesInStudy == "CT"
    series = await run(index, "SERIES", key("StudyInstanceUID", study_uid("S2")), key("Modality"),
                       key("NumberOfSeriesRelatedInstances"))
    assert {(s.Modality, s.NumberOfSeriesRelatedInstances) for s in series} == {("CT", 1), ("MR", 3)}


async def test_matching_on_computed_keys(index):
    assert await studies_matching(index, key("ModalitiesInStudy", "MR")) == {"S2", "S3"}
    assert await studies_matching(index, key("ModalitiesInStudy", "CT\\US")) == {"S1", "S2", "S4", "S5"}
    assert await studies_matching(index, key("ModalitiesInStudy", "M?")) == {"S2", "S3"}
    assert await studies_matching(index, key("ModalitiesInStudy", "*T")) == {"S1", "S2", "S5"}
    assert await studies_matching(index, key("ModalitiesInStudy", "C*R")) == set()  # not across "CT\MR"
    assert await studies_matching(index, key("SOPClassesInStudy", MR)) == {"S2", "S3"}
    assert await studies_matching(index, key("NumberOfStudyRelatedSeries", "2")) == {"S2"}
    assert await studies_matching(index, key("NumberOfStudyRelatedInstances", "1")) == {"S3", "S4", "S5", "S6"}


async def test_keys_only_in_the_json_are_matched_in_python(index):
    query = Query("STUDY", [key("StudyInstanceUID"), key("PatientAge", "04?Y"), key("StudyDate", "20240111-")])
    assert query.python_matched == {0x00101010}  # the date is a column: SQL
    assert len([m async for m in find(index, query)]) == 3  # S2, S3, S4
    assert await studies_matching(index, key("PatientAge", "042Y")) == {"S3"}
    series = await run(index, "SERIES", key("StudyInstanceUID", study_uid("S2")), key("ProtocolName", "MR*"))
    assert [s.ProtocolName for s in series] == ["MR protocol S2"]
    images = await run(index, "IMAGE", key("SeriesInstanceUID", series_uid("S2", 1)), key("ImageType", "DERIVED"))
    assert len(images) == 2 and all(list(i.ImageType) == ["DERIVED", "SECONDARY"] for i in images)


async def test_sequence_matching(index):
    # universal: the stored sequence comes back whole
    [s2] = await run(index, "STUDY", key("StudyInstanceUID", study_uid("S2")), key("ProcedureCodeSequence"))
    assert [(i.CodeValue, i.CodingSchemeDesignator, i.CodeMeaning) for i in s2.ProcedureCodeSequence] == [
        ("CTHEAD", "99PACSD", "cthead"), ("MRHEAD", "99PACSD", "mrhead")]
    # one item with keys: the items that match, with the requested item keys only
    item = [key("CodeValue", "MR*"), key("CodeMeaning")]
    sequence = Key.of("ProcedureCodeSequence")
    sequence.items = [item]
    found = await run(index, "STUDY", key("StudyInstanceUID"), sequence)
    assert [str(ds.StudyInstanceUID) for ds in found] == [study_uid("S2")]
    [only] = found[0].ProcedureCodeSequence
    assert (only.CodeValue, only.CodeMeaning) == ("MRHEAD", "mrhead") and "CodingSchemeDesignator" not in only
    sequence.items = [[key("CodeValue", "CTCHEST")]]
    assert await studies_matching(index, sequence) == {"S1"}
    sequence.items = [[key("CodeValue")]]  # an item of universal keys: universal matching
    assert await studies_matching(index, sequence) == set(STUDY_NAMES)


async def test_one_response_per_entity(index):
    # studies with several series and instances: joins only go up the hierarchy
    assert len(await run(index, "STUDY", key("StudyInstanceUID"))) == 6
    assert len(await run(index, "PATIENT", key("PatientID"))) == 4
    series = await run(index, "SERIES", key("StudyInstanceUID", study_uid("S2")), key("SeriesInstanceUID"),
                       key("PatientName"))
    assert len(series) == 2 and len({str(s.SeriesInstanceUID) for s in series}) == 2
    images = await run(index, "IMAGE", key("StudyInstanceUID", study_uid("S2")), key("SOPInstanceUID"),
                       key("SeriesInstanceUID", series_uid("S2", 1)))
    assert sorted(str(i.SOPInstanceUID) for i in images) == sorted(instance_uid("S2", 1, n) for n in range(3))


async def test_keys_of_lower_levels_are_unsupported_and_returned_empty(index):
    query = Query("STUDY", [key("StudyInstanceUID"), key("Modality", "MR"), key("SOPInstanceUID")])
    assert query.unsupported == [0x00080060, 0x00080018]
    found = [query.response(m) async for m in find(index, query)]
    assert len(found) == 6  # not matched
    assert all(ds.Modality in ("", None) and "Modality" in ds for ds in found)


async def test_always_returned_and_retrieve_ae_title(index):
    found = await run(index, "SERIES", key("StudyInstanceUID", study_uid("S1")), key("RetrieveAETitle"),
                      key("InstanceAvailability"), retrieve_ae_title="PACSD",
                      always_return=unique_keys(STUDY_ROOT_FIND, "SERIES"))
    [series] = found
    assert (str(series.StudyInstanceUID), str(series.SeriesInstanceUID)) == (study_uid("S1"), series_uid("S1", 0))
    assert (series.RetrieveAETitle, series.InstanceAvailability) == ("PACSD", "ONLINE")
    [patient_rooted] = await run(index, "STUDY", key("PatientID", "PID2"), key("AccessionNumber", "ACC3"),
                                 always_return=unique_keys(PATIENT_ROOT_FIND, "STUDY"))
    assert (patient_rooted.PatientID, str(patient_rooted.StudyInstanceUID)) == ("PID2", study_uid("S3"))


# -- 3. values the engine refuses ------------------------------------------------------------


@pytest.mark.parametrize("name, value, kind", [
    ("StudyDate", "yesterday", "value"),
    ("StudyDate", "2024-01-01", "value"),
    ("StudyDate", "20241301", "value"),
    ("StudyDate", "20240101-20240102-20240103", "value"),
    ("StudyDate", "20240101\\20240102", "value"),
    ("StudyTime", "2500", "value"),
    ("SeriesNumber", "1-5", "value"),
    ("NumberOfStudyRelatedSeries", "many", "value"),
    ("StudyInstanceUID", "1.2.*", "identifier"),
    ("StudyInstanceUID", "*", "identifier"),
    ("StudyInstanceUID", "1.2.3-1.2.4", "identifier"),
    ("SOPClassesInStudy", "abc", "identifier"),
])
def test_invalid_values_are_refused(name, value, kind):
    with pytest.raises(QueryError) as caught:
        Query("SERIES", [key(name, value)])
    assert caught.value.kind == kind
    assert caught.value.tag == Key.of(name).tag
    assert name in caught.value.comment and len(caught.value.comment) <= 64


def test_a_sequence_key_has_one_item():
    sequence = Key.of("ProcedureCodeSequence")
    sequence.items = [[key("CodeValue", "A")], [key("CodeValue", "B")]]
    with pytest.raises(QueryError) as caught:
        Query("STUDY", [sequence])
    assert caught.value.kind == "identifier" and "one item" in caught.value.comment


def test_range_parsing():
    assert parse_range("DA", "20240101-20240131", 0) == ("20240101", "20240131", True)
    assert parse_range("DA", "-20240131", 0) == (None, "20240131", True)
    assert parse_range("DA", "20240101", 0) == ("20240101", "20240101", False)
    assert parse_range("TM", "10:15-", 0) == ("1015", None, True)
    assert parse_range("DT", "20240101120000-0500", 0) == ("20240101120000", "20240101120000", False)
    assert parse_range("DT", "20240101-0500-20240102", 0) == ("20240101", "20240102", True)
    assert parse_range("DT", "2024-2025", 0) == ("2024", "2025", True)
    with pytest.raises(QueryError):
        parse_range("DA", "-", 0)


# -- 4. the C-FIND identifier: hierarchy, decoding, character sets ----------------------------


def identifier(**values) -> Dataset:
    ds = Dataset()
    for name, value in values.items():
        setattr(ds, name, value)
    return ds


@pytest.mark.parametrize("model, values, fragment", [
    (STUDY_ROOT_FIND, {"PatientName": "X"}, "QueryRetrieveLevel (0008,0052) is missing"),
    (STUDY_ROOT_FIND, {"QueryRetrieveLevel": "FRAME"}, "is not PATIENT/STUDY/SERIES/IMAGE"),
    (STUDY_ROOT_FIND, {"QueryRetrieveLevel": "PATIENT"}, "not in the Study Root model"),
    (STUDY_ROOT_FIND, {"QueryRetrieveLevel": "SERIES"}, "needs one StudyInstanceUID"),
    (STUDY_ROOT_FIND, {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": "1.2\\1.3"}, "must be a single value"),
    (STUDY_ROOT_FIND, {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": "1.2"}, "needs one SeriesInstanceUID"),
    (PATIENT_ROOT_FIND, {"QueryRetrieveLevel": "STUDY"}, "needs one PatientID"),
    (PATIENT_ROOT_FIND, {"QueryRetrieveLevel": "STUDY", "PatientID": "PID*"}, "PatientID must be a single value"),
    (PATIENT_ROOT_FIND, {"QueryRetrieveLevel": "SERIES", "PatientID": "PID1"}, "needs one StudyInstanceUID"),
])
def test_identifiers_that_break_the_model(model, values, fragment):
    with pytest.raises(QueryError) as caught:
        parse_request(identifier(**values), model)
    assert caught.value.kind == "identifier" and fragment in caught.value.comment


def test_hierarchical_identifiers_that_are_fine():
    level, keys = parse_request(identifier(QueryRetrieveLevel="IMAGE", StudyInstanceUID="1.2", SeriesInstanceUID="1.3",
                                           SOPInstanceUID=""), STUDY_ROOT_FIND)
    assert level == "IMAGE" and [k.tag for k in keys] == [0x00080018, 0x0020000D, 0x0020000E]
    level, _ = parse_request(identifier(QueryRetrieveLevel="PATIENT", PatientName="A*"), PATIENT_ROOT_FIND)
    assert level == "PATIENT"


def encode(ds: Dataset, transfer_syntax: str) -> bytes:
    return encode_identifier(ds, transfer_syntax)


@pytest.mark.parametrize("transfer_syntax", [IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE])
def test_identifier_round_trip(transfer_syntax):
    ds = identifier(SpecificCharacterSet="ISO_IR 100", QueryRetrieveLevel="STUDY", PatientName="Müller*",
                    StudyDate="20240101-", NumberOfStudyRelatedSeries=None)
    back = decode_identifier(encode(ds, transfer_syntax), transfer_syntax)
    assert str(back.PatientName) == "Müller*" and back.StudyDate == "20240101-"
    keys = {k.tag: k for k in keys_from_dataset(back)}
    assert keys[0x00100010].value == "Müller*" and keys[0x00201206].value == ""
    assert 0x00080052 not in keys and 0x00080005 not in keys


@pytest.mark.parametrize("data", [b"\x08\x00\x52\x00\x10\x00\x00\x00STU", b"\x08\x00\x52\x00"])
def test_undecodable_identifier(data):
    with pytest.raises(IdentifierError) as caught:
        decode_identifier(data, EXPLICIT_LE)
    assert caught.value.status == Status.CANNOT_UNDERSTAND and "cannot be decoded" in caught.value.comment


async def test_query_in_iso_2022_finds_the_japanese_name(index):
    name, charset = _japanese()
    ds = identifier(SpecificCharacterSet=charset, QueryRetrieveLevel="PATIENT", PatientName="*=山田^太郎=*",
                    PatientID="")
    raw = encode(ds, IMPLICIT_LE)
    assert "山田".encode("iso2022_jp") [3:-3] in raw  # JIS X 0208 on the wire
    level, keys = parse_request(decode_identifier(raw, IMPLICIT_LE), PATIENT_ROOT_FIND)
    query = Query(level, keys, pn_case_insensitive=True)
    [match] = [m async for m in find(index, query)]
    response = set_character_set(query.response(match), charset)
    assert response.SpecificCharacterSet == "ISO_IR 192"  # ISO 2022 requests get UTF-8 back
    back = decode_identifier(encode(response, IMPLICIT_LE), IMPLICIT_LE)
    assert str(back.PatientName) == name and back.PatientID == "PID3"


def test_response_character_set():
    def named(name: str) -> Dataset:
        return identifier(PatientName=name, QueryRetrieveLevel="PATIENT")

    assert "SpecificCharacterSet" not in set_character_set(named("Doe^John"), None)
    assert set_character_set(named("Doe^John"), "ISO_IR 100").SpecificCharacterSet == "ISO_IR 100"
    assert set_character_set(named("Müller^Hans"), None).SpecificCharacterSet == "ISO_IR 192"
    assert set_character_set(named("Müller^Hans"), "ISO_IR 100").SpecificCharacterSet == "ISO_IR 100"
    assert set_character_set(named(JAPANESE), "ISO_IR 100").SpecificCharacterSet == "ISO_IR 192"
    assert set_character_set(named("Διονυσιος"), "ISO_IR 126").SpecificCharacterSet == "ISO_IR 126"
    latin1 = set_character_set(named("Müller^Hans"), "ISO_IR 100")
    raw = encode(latin1, EXPLICIT_LE)
    assert "Müller".encode("latin-1") in raw
    # text inside sequences counts too
    outer = identifier(QueryRetrieveLevel="STUDY")
    item = identifier(CodeMeaning="Schädel")
    outer.ProcedureCodeSequence = [item]
    assert set_character_set(outer, None).SpecificCharacterSet == "ISO_IR 192"


# -- 5. SQL, indexes and streaming -------------------------------------------------------------


async def test_column_keys_are_matched_in_sql_with_the_indexes(index):
    query = Query("STUDY", [key("StudyInstanceUID"), key("PatientName", "Doe*"), key("StudyDate", "20240101-20240131"),
                            key("PatientID")], pn_case_insensitive=True)
    assert query.python_matched == set()  # every condition is in the SQL
    assert len([m async for m in find(index, query)]) == 2  # S1, S2
    if index.dialect.name == "sqlite":
        async with index.connect() as conn:
            compiled = query.statement("sqlite").compile(index.sync_engine, compile_kwargs={"literal_binds": True})
            plan = " ".join(str(r[-1]) for r in (await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}")).all())
        assert "ix_studies_study_date" in plan, plan
    # case-sensitive PN wild cards use GLOB on SQLite, which can use the patient name index
    strict = Query("PATIENT", [key("PatientName", "Doe*")])
    if index.dialect.name == "sqlite":
        sql = str(strict.statement("sqlite").compile(index.sync_engine))
        assert "GLOB" in sql
        async with index.connect() as conn:
            compiled = strict.statement("sqlite").compile(index.sync_engine, compile_kwargs={"literal_binds": True})
            plan = " ".join(str(r[-1]) for r in (await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}")).all())
        assert "ix_patients_patient_name" in plan, plan


STREAM_STUDIES = 10_000


def many_studies(count: int) -> list:
    """`count` studies (one series, one instance each) over 100 patients, as level rows made
    from one real data set by substitution (fast enough for 10,000)."""
    template_ds = datasets()[0]
    template = rows(template_ds)
    marks = {"study": str(template_ds.StudyInstanceUID), "series": str(template_ds.SeriesInstanceUID),
             "instance": str(template_ds.SOPInstanceUID), "pid": "PID1", "date": "20240110"}
    out = []
    for n in range(count):
        date = f"2023{1 + n % 12:02d}{1 + n % 28:02d}"
        subs = {marks["study"]: uid(5, n), marks["series"]: uid(6, n), marks["instance"]: uid(7, n),
                marks["pid"]: f"BULK{n % 100:03d}", marks["date"]: date}
        parts = {}
        for level, part in template.parts.items():  # the levels' JSON, not serialised yet
            text = json.dumps(part)
            for old, new in subs.items():
                text = text.replace(old, new)
            parts[level] = json.loads(text)
        level_rows = type(template)(**{name: dict(getattr(template, name))
                                       for name in ("patient", "study", "series", "instance")}, parts=parts)
        for part in (level_rows.patient, level_rows.study, level_rows.series, level_rows.instance):
            for column, value in part.items():
                if isinstance(value, str):
                    for old, new in subs.items():
                        value = value.replace(old, new)
                    part[column] = value
        out.append(level_rows)
    return out


async def test_streaming_10000_studies_in_bounded_memory(engine):
    await fill(engine, many_studies(STREAM_STUDIES))
    query = Query("STUDY", [key("StudyInstanceUID"), key("PatientName", "doe*"), key("StudyDate"),
                            key("ModalitiesInStudy"), key("NumberOfStudyRelatedInstances"), key("PatientID")],
                  pn_case_insensitive=True)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        uids = set()
        async for match in find(engine, query, batch=200):
            ds = query.response(match)
            uids.add(hash(str(ds.StudyInstanceUID)))  # a few bytes per study are kept
        streamed_peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        kept = [match async for match in find(engine, query, batch=200)]  # what a list would hold
        listed_peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert len(uids) == STREAM_STUDIES == len(kept)
    del kept
    # The streamed pass never holds more than a batch of rows; a list of them all is far larger.
    assert streamed_peak < 6 * 1024 * 1024, streamed_peak
    assert streamed_peak * 4 < listed_peak, (streamed_peak, listed_peak)


async def test_an_sqlite_search_is_one_trip_to_the_reader_threads_per_batch(index, monkeypatch):
    """Each trip to a thread and back costs system calls and wake-ups, several times what
    SQLite takes to run a small search: a search that fits in one batch takes one trip
    (connection, statement, rows, release), a longer one a trip per batch."""
    reader = reader_for(index)
    if reader is None:
        pytest.skip("PostgreSQL reads through the async engine")
    trips = []
    submit = reader.threads.submit

    def counting(fn, *args):
        trips.append(fn)
        return submit(fn, *args)

    monkeypatch.setattr(reader.threads, "submit", counting)
    found = await run(index, "STUDY", key("StudyInstanceUID"))
    assert 1 < len(found) < 256
    assert len(trips) == 1
    trips.clear()
    images = await run(index, "IMAGE", key("SOPInstanceUID"))
    assert len(images) % 2 == 0 and len(images) > 4
    trips.clear()
    query = Query("IMAGE", [key("SOPInstanceUID")])
    assert len([m async for m in find(index, query, batch=2)]) == len(images)
    # A full last batch cannot tell that nothing follows: one more trip finds the end.
    assert len(trips) == len(images) // 2 + 1


async def test_closing_the_iterator_early_releases_the_connection(index):
    from contextlib import aclosing

    query = Query("IMAGE", [key("SOPInstanceUID")])
    for _ in range(30):  # more than the pool's connections: each early stop gave its back
        async with aclosing(find(index, query, batch=2)) as matches:
            async for _match in matches:
                break
    async with index.connect() as conn:
        assert (await conn.execute(sa.text("SELECT 1"))).scalar() == 1
    reader = reader_for(index)
    if reader is not None:  # SQLite: the reader threads give each connection back
        for _ in range(100):
            if reader.engine.pool.checkedout() == 0:
                break
            await asyncio.sleep(0.02)
        assert reader.engine.pool.checkedout() == 0
