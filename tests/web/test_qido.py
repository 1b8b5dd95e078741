"""QIDO-RS (PS3.18 10.6) against a live daemon, with httpx and with dicomweb-client.

One daemon serves the module; its archive, sent over DICOM once:

    PAT-A Doe^John      S1 20240110 "CHEST CT"   CT #1 (2 instances, Request Attributes), MR #2 (1)
                        S2 20240320 "BRAIN MR"   MR #1 (2)
    PAT-B Smith^Jane    S3 20231201 "PET CT"     PT #1 (1), CT #2 (2)
    PAT-C Müller^Anna   S4 20240601 "ABDOMEN"    CT #1 (1)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from tests.conftest import launch_daemon
from tests.dicomdata import image, uid, write_part10
from tests.web.conftest import store_files

DICOM_JSON = "application/dicom+json"
MORE = "The number of results exceeded the maximum supported by the server. Additional results can be requested."

S1, S2, S3, S4 = (uid("qido", "study", n) for n in range(1, 5))
SE = {name: uid("qido", "series", name) for name in ("S1-CT", "S1-MR", "S2-MR", "S3-PT", "S3-CT", "S4-CT")}
PATIENTS = {"A": ("PAT-A", "Doe^John"), "B": ("PAT-B", "Smith^Jane"), "C": ("PAT-C", "Müller^Anna")}
STUDIES = {  # study -> (patient, date, time, description)
    S1: ("A", "20240110", "093000", "CHEST CT"),
    S2: ("A", "20240320", "141500", "BRAIN MR"),
    S3: ("B", "20231201", "080000", "PET CT"),
    S4: ("C", "20240601", "120000", "ABDOMEN"),
}
SERIES = {  # series -> (study, modality, number, instances)
    SE["S1-CT"]: (S1, "CT", 1, 2), SE["S1-MR"]: (S1, "MR", 2, 1), SE["S2-MR"]: (S2, "MR", 1, 2),
    SE["S3-PT"]: (S3, "PT", 1, 1), SE["S3-CT"]: (S3, "CT", 2, 2), SE["S4-CT"]: (S4, "CT", 1, 1),
}


def sop(series: str, n: int) -> str:
    return uid("qido", "sop", series, n)


@dataclass
class Archive:
    daemon: object
    http: httpx.Client
    client: DICOMwebClient

    @property
    def url(self) -> str:
        return self.daemon.dicomweb_url


def _write(directory: Path) -> list[Path]:
    paths = []
    for series, (study, modality, number, count) in SERIES.items():
        patient, date, time, description = STUDIES[study]
        patient_id, name = PATIENTS[patient]
        extra = {}
        if series == SE["S1-CT"]:
            item = Dataset()
            item.RequestedProcedureID = "RP1"
            item.ScheduledProcedureStepID = "SPS1"
            extra = {"RequestAttributesSequence": [item], "BodyPartExamined": "CHEST"}
        if study == S1:
            extra["PhysiciansOfRecord"] = "House^Gregory"
        for n in range(1, count + 1):
            ds = image(sop(series, n), series, study, modality=modality, patient_id=patient_id, patient_name=name,
                       instance_number=n, series_number=number, rows=8, columns=8, StudyDate=date,
                       StudyTime=time, StudyDescription=description, SeriesDescription=f"{modality} series {number}",
                       AccessionNumber=f"ACC{list(STUDIES).index(study) + 1}", **extra)
            path = directory / f"{series}-{n}.dcm"
            write_part10(path, ds)
            paths.append(path)
    return paths


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    base = tmp_path_factory.mktemp("qido")
    daemon = launch_daemon(base, "pacsd")
    try:
        directory = base / "files"
        directory.mkdir()
        store_files(daemon, _write(directory))
        with httpx.Client(base_url=daemon.dicomweb_url, timeout=60) as http:
            yield Archive(daemon, http, DICOMwebClient(url=daemon.dicomweb_url))
    finally:
        daemon.stop()


def search(archive: Archive, path: str, params=None, headers=None) -> list[dict]:
    r = archive.http.get(path, params=params, headers=headers)
    if r.status_code == 204:
        assert r.content == b""
        return []
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == DICOM_JSON
    return r.json()


def value(js: dict, tag: str):
    values = js.get(tag, {}).get("Value")
    return values[0] if values else None


def uids(results: list[dict], tag: str) -> list[str]:
    return [value(js, tag) for js in results]


def error(archive: Archive, path: str, params=None, headers=None, status: int = 400) -> str:
    r = archive.http.get(path, params=params, headers=headers)
    assert r.status_code == status, r.text
    return r.json()["message"]


# --- the six resources ------------------------------------------------------------------------


def test_all_studies_carry_the_study_attributes(archive):
    results = search(archive, "/studies")
    assert sorted(uids(results, "0020000D")) == sorted(STUDIES)
    by_uid = {value(js, "0020000D"): js for js in results}
    s1 = by_uid[S1]
    assert list(s1) == sorted(s1), "attributes are in tag order (F.2.2)"
    for tag in ("00080020", "00080030", "00080050", "00080056", "00080061", "00080090", "00081190",
                "00100010", "00100020", "00100030", "00100040", "0020000D", "00200010", "00201206", "00201208"):
        assert tag in s1, tag
    assert s1["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}]}
    assert s1["00080090"] == {"vr": "PN"}, "empty value: no Value key"
    assert s1["00201206"] == {"vr": "IS", "Value": [2]}  # numbers, not strings
    assert s1["00201208"] == {"vr": "IS", "Value": [3]}
    assert sorted(s1["00080061"]["Value"]) == ["CT", "MR"]
    assert value(s1, "00080020") == "20240110" and value(s1, "00081030") == "CHEST CT"
    assert value(s1, "00080056") == "ONLINE"
    assert value(s1, "00081190") == f"{archive.url}/studies/{S1}"
    assert "00080060" not in s1 and "0020000E" not in s1, "no series attributes at study level"
    assert "00080005" not in s1, "ASCII only: no Specific Character Set"
    assert value(by_uid[S4], "00080005") == "ISO_IR 192"
    assert by_uid[S4]["00100010"]["Value"] == [{"Alphabetic": "Müller^Anna"}]


def test_series_of_a_study(archive):
    results = search(archive, f"/studies/{S1}/series")
    assert sorted(uids(results, "0020000E")) == sorted([SE["S1-CT"], SE["S1-MR"]])
    ct = next(js for js in results if value(js, "0020000E") == SE["S1-CT"])
    mr = next(js for js in results if value(js, "0020000E") == SE["S1-MR"])
    assert value(ct, "0020000D") == S1
    assert value(ct, "00080060") == "CT" and value(ct, "00200011") == 1
    assert value(ct, "00201209") == 2 and value(mr, "00201209") == 1
    assert value(ct, "0008103E") == "CT series 1"
    assert value(ct, "00081190") == f"{archive.url}/studies/{S1}/series/{SE['S1-CT']}"
    assert "00400244" in ct and "00400245" in ct
    assert ct["00400275"]["Value"][0]["00401001"]["Value"] == ["RP1"]
    assert "00400275" not in mr, "conditional attribute left out when not stored"
    assert "00201206" not in ct and "00100010" not in ct, "the study is fixed by the path"


def test_all_series_carry_their_study(archive):
    results = search(archive, "/series", {"Modality": "CT"})
    assert sorted(uids(results, "0020000E")) == sorted([SE["S1-CT"], SE["S3-CT"], SE["S4-CT"]])
    by_uid = {value(js, "0020000E"): js for js in results}
    s3 = by_uid[SE["S3-CT"]]
    assert value(s3, "0020000D") == S3 and value(s3, "00100020") == "PAT-B"
    assert value(s3, "00080020") == "20231201" and value(s3, "00201208") == 3
    assert sorted(s3["00080061"]["Value"]) == ["CT", "PT"]


def test_instances_of_a_series(archive):
    results = search(archive, f"/studies/{S1}/series/{SE['S1-CT']}/instances")
    assert sorted(uids(results, "00080018")) == sorted([sop(SE["S1-CT"], 1), sop(SE["S1-CT"], 2)])
    first = next(js for js in results if value(js, "00080018") == sop(SE["S1-CT"], 1))
    assert value(first, "00080016") == "1.2.840.10008.5.1.4.1.1.2"
    assert value(first, "00200013") == 1
    assert value(first, "00280010") == 8 and value(first, "00280011") == 8 and value(first, "00280100") == 16
    assert "00280008" not in first, "Number of Frames only if known"
    assert value(first, "00081190") == (f"{archive.url}/studies/{S1}/series/{SE['S1-CT']}"
                                        f"/instances/{sop(SE['S1-CT'], 1)}")
    assert value(first, "0020000D") == S1 and value(first, "0020000E") == SE["S1-CT"]
    assert "00080060" not in first, "the series is fixed by the path"


def test_instances_of_a_study_carry_their_series(archive):
    results = search(archive, f"/studies/{S1}/instances")
    assert len(results) == 3
    assert sorted(value(js, "00080060") for js in results) == ["CT", "CT", "MR"]
    assert all(value(js, "0020000D") == S1 for js in results)
    assert "00201208" not in results[0]


def test_all_instances(archive):
    results = search(archive, "/instances", {"PatientID": "PAT-B"})
    assert sorted(uids(results, "00080018")) == sorted(
        [sop(SE["S3-PT"], 1), sop(SE["S3-CT"], 1), sop(SE["S3-CT"], 2)])
    assert all(value(js, "00100010") == {"Alphabetic": "Smith^Jane"} for js in results)
    assert {value(js, "00080060") for js in results} == {"CT", "PT"}
    assert len(search(archive, "/instances")) == sum(n for *_, n in SERIES.values())


def test_a_study_that_is_not_there_has_no_series(archive):
    r = archive.http.get(f"/studies/{uid('qido', 'absent')}/series")
    assert r.status_code == 204 and r.content == b""


# --- matching ---------------------------------------------------------------------------------


def test_wildcards(archive):
    # PN case-insensitively (as C-FIND), other text case-sensitively
    assert sorted(uids(search(archive, "/studies", {"PatientName": "doe*"}), "0020000D")) == sorted([S1, S2])
    assert uids(search(archive, "/studies", {"PatientName": "*ÜLLER*"}), "0020000D") == [S4]
    assert sorted(uids(search(archive, "/studies", {"StudyDescription": "*CT"}), "0020000D")) == sorted([S1, S3])
    assert search(archive, "/studies", {"StudyDescription": "*ct"}) == []
    assert sorted(uids(search(archive, "/studies", {"AccessionNumber": "ACC?"}), "0020000D")) == sorted(STUDIES)
    # OHIF wraps every typed value in *...*, and sends * percent-encoded via some clients
    r = archive.http.get("/studies?PatientName=%2Asmith%2A")
    assert uids(r.json(), "0020000D") == [S3]


def test_date_ranges(archive):
    def studies(date: str) -> list[str]:
        return sorted(uids(search(archive, "/studies", {"StudyDate": date}), "0020000D"))

    assert studies("20240101-20240331") == sorted([S1, S2])
    assert studies("20240301-") == sorted([S2, S4])
    assert studies("-20231231") == [S3]
    assert studies("20240110") == [S1]
    # a date and a time range together are one date-time range (PS3.4 C.2.2.2.5)
    found = search(archive, "/studies", {"StudyDate": "20240110-20240320", "StudyTime": "100000-"})
    assert sorted(uids(found, "0020000D")) == [S2]


def test_uid_lists_with_either_separator(archive):
    for joined in (f"{S1},{S3}", f"{S1}\\{S3}"):
        assert sorted(uids(search(archive, "/studies", {"StudyInstanceUID": joined}), "0020000D")) == sorted([S1, S3])
    series = search(archive, f"/studies/{S3}/series", {"SeriesInstanceUID": f"{SE['S3-CT']},{SE['S1-CT']}"})
    assert uids(series, "0020000E") == [SE["S3-CT"]], "the path's study still applies"
    # a repeated parameter is a list too
    found = search(archive, "/studies", [("StudyInstanceUID", S2), ("StudyInstanceUID", S4)])
    assert sorted(uids(found, "0020000D")) == sorted([S2, S4])


def test_tags_instead_of_keywords(archive):
    assert sorted(uids(search(archive, "/studies", {"00100020": "PAT-A"}), "0020000D")) == sorted([S1, S2])
    assert sorted(uids(search(archive, "/studies", {"00080061": "MR"}), "0020000D")) == sorted([S1, S2])
    # OHIF's modality filter: a comma list
    found = search(archive, "/studies", {"ModalitiesInStudy": "PT,MR"})
    assert sorted(uids(found, "0020000D")) == sorted([S1, S2, S3])
    assert uids(search(archive, "/series", {"0008103e": "MR series 2"}), "0020000E") == [SE["S1-MR"]]


def test_sequence_attribute_paths(archive):
    found = search(archive, "/series", {"RequestAttributesSequence.RequestedProcedureID": "RP1"})
    assert uids(found, "0020000E") == [SE["S1-CT"]]
    item = found[0]["00400275"]["Value"][0]
    assert item == {"00401001": {"vr": "SH", "Value": ["RP1"]}}, "the requested item keys only"
    assert search(archive, "/series", {"RequestAttributesSequence.RequestedProcedureID": "RP2"}) == []


def test_matching_keys_are_returned(archive):
    found = search(archive, "/series", {"BodyPartExamined": "CHEST"})
    assert uids(found, "0020000E") == [SE["S1-CT"]]
    assert value(found[0], "00180015") == "CHEST"


def test_fuzzymatching(archive):
    assert search(archive, "/studies", {"PatientName": "doe", "fuzzymatching": "false"}) == []
    found = search(archive, "/studies", {"PatientName": "doe", "fuzzymatching": "true"})
    assert sorted(uids(found, "0020000D")) == sorted([S1, S2])
    assert "fuzzymatching" in error(archive, "/studies", {"fuzzymatching": "maybe"})


# --- includefield -----------------------------------------------------------------------------


def test_includefield_by_keyword_tag_and_list(archive):
    for params in ({"includefield": "PhysiciansOfRecord"}, {"includefield": "00081048"},
                   {"includefield": "00080060,00081048"}, [("includefield", "00080060"), ("includefield", "PhysiciansOfRecord")]):
        by_uid = {value(js, "0020000D"): js for js in search(archive, "/studies", params)}
        assert by_uid[S1]["00081048"] == {"vr": "PN", "Value": [{"Alphabetic": "House^Gregory"}]}, params
        assert by_uid[S2]["00081048"] == {"vr": "PN"}, "asked for: returned empty"
        # OHIF asks for Modality at study level: not an error, not returned (10.6.3.3.1)
        assert "00080060" not in by_uid[S1]
    series = search(archive, f"/studies/{S1}/series", [("includefield", "BodyPartExamined"),
                                                        ("includefield", "00081048")])
    ct = next(js for js in series if value(js, "0020000E") == SE["S1-CT"])
    assert value(ct, "00180015") == "CHEST"
    assert value(ct, "00081048") == {"Alphabetic": "House^Gregory"}, "study attributes may be included"


def test_includefield_all(archive):
    by_uid = {value(js, "0020000D"): js for js in search(archive, "/studies", {"includefield": "all"})}
    s1 = by_uid[S1]
    assert value(s1, "00081048") == {"Alphabetic": "House^Gregory"}
    assert value(s1, "00081030") == "CHEST CT"
    assert value(s1, "00201208") == 3 and value(s1, "00081190") == f"{archive.url}/studies/{S1}"
    assert "00080060" not in s1 and "00280010" not in s1, "only study and patient attributes"
    assert list(s1) == sorted(s1)
    [instance] = search(archive, f"/studies/{S4}/series/{SE['S4-CT']}/instances", {"includefield": "all"})
    assert value(instance, "00280004") == "MONOCHROME2" and value(instance, "00280101") == 12
    assert "7FE00010" not in instance


# --- paging ---------------------------------------------------------------------------------


def test_limit_and_offset_page_through_one_list(archive):
    everything = uids(search(archive, "/studies"), "0020000D")
    pages, warnings = [], []
    for offset in range(0, 6, 2):
        r = archive.http.get("/studies", params={"limit": 2, "offset": offset})
        warnings.append(r.headers.get("warning"))
        pages.append(uids(r.json(), "0020000D") if r.status_code == 200 else [])
        assert r.status_code == (200 if offset < 4 else 204)
    assert pages[0] + pages[1] == everything and pages[2] == []
    assert warnings[0] is not None and MORE in warnings[0] and warnings[0].startswith("299 127.0.0.1:")
    assert warnings[1] is None, "the last page: nothing more"
    assert warnings[2] is None
    # a wildcard on Modalities in Study is confirmed outside SQL: paging counts there
    matched = uids(search(archive, "/studies", {"ModalitiesInStudy": "*T"}), "0020000D")
    assert sorted(matched) == sorted([S1, S3, S4])
    r = archive.http.get("/studies", params={"ModalitiesInStudy": "*T", "limit": 1, "offset": 1})
    assert uids(r.json(), "0020000D") == matched[1:2] and MORE in r.headers["warning"]
    r = archive.http.get("/studies", params={"ModalitiesInStudy": "*T", "limit": 5, "offset": 1})
    assert uids(r.json(), "0020000D") == matched[1:] and "warning" not in r.headers


def test_unsupported_matching_options_are_reported(archive):
    r = archive.http.get("/studies", params={"PatientID": "PAT-C", "emptyvaluematching": "true"})
    assert r.status_code == 200 and "emptyvaluematching parameter is not supported" in r.headers["warning"]
    r = archive.http.get("/studies", params={"PatientID": "PAT-C", "multiplevaluematching": "false"})
    assert r.status_code == 200 and "warning" not in r.headers


@pytest.mark.parametrize("params", [{"limit": "-1"}, {"limit": "ten"}, {"offset": "1.5"}, {"offset": "-3"},
                                    [("limit", "1"), ("limit", "2")]])
def test_bad_limit_or_offset(archive, params):
    message = error(archive, "/studies", params)
    assert "limit" in message or "offset" in message


# --- errors -----------------------------------------------------------------------------------


def test_bad_queries_name_what_is_wrong(archive):
    assert "PatientNmae" in error(archive, "/studies", {"PatientNmae": "x"})
    assert "StudyDate" in error(archive, "/studies", {"StudyDate": "yesterday"})
    assert "Modality" in error(archive, "/studies", {"Modality": "CT"}), "a series key at study level"
    assert "SOPInstanceUID" in error(archive, "/series", {"SOPInstanceUID": "1.2.3"})
    assert "StudyInstanceUID" in error(archive, "/studies", {"StudyInstanceUID": "1.2.*"})
    assert "00091010" in error(archive, "/studies", {"00091010": "x"})
    assert "SeriesNumber" in error(archive, "/series", {"SeriesNumber": "one"})
    assert "StudyInstanceUID" in error(archive, "/studies/not-a-uid/series")
    assert "sequence" in error(archive, "/series", {"Modality.CodeValue": "x"})


def test_accept(archive):
    r = archive.http.get("/studies", headers={"Accept": "image/png"})
    assert r.status_code == 406 and "application/dicom+json" in r.json()["message"]
    assert archive.http.get("/studies", headers={"Accept": "multipart/related; type=application/dicom"}).status_code == 406
    for accept in ("application/dicom+json", "*/*", "application/*",
                   "application/dicom+json, multipart/related; type=application/octet-stream; transfer-syntax=*"):
        r = archive.http.get("/studies", headers={"Accept": accept})
        assert r.status_code == 200 and r.headers["content-type"] == DICOM_JSON, accept
        assert len(r.json()) == 4
    r = archive.http.get("/studies", headers={"Accept": "application/json"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"


def test_only_get(archive):
    assert archive.http.delete("/series").status_code == 405


# --- dicomweb-client --------------------------------------------------------------------------


def test_dicomweb_client_gets_the_same_results(archive):
    client = archive.client
    studies = client.search_for_studies(search_filters={"PatientName": "doe*"}, fields=["PhysiciansOfRecord"])
    assert studies == search(archive, "/studies", {"PatientName": "doe*", "includefield": "PhysiciansOfRecord"})
    assert sorted(uids(studies, "0020000D")) == sorted([S1, S2])
    assert value(studies[0], "00081190").startswith(archive.url), "Host without port: the port still right"

    series = client.search_for_series(study_instance_uid=S3)
    assert series == search(archive, f"/studies/{S3}/series")
    ct_series = client.search_for_series(search_filters={"Modality": "CT"}, fields=["BodyPartExamined"])
    assert ct_series == search(archive, "/series", {"Modality": "CT", "includefield": "BodyPartExamined"})

    instances = client.search_for_instances(study_instance_uid=S1, series_instance_uid=SE["S1-CT"])
    assert instances == search(archive, f"/studies/{S1}/series/{SE['S1-CT']}/instances")
    assert len(client.search_for_instances(study_instance_uid=S3)) == 3
    assert len(client.search_for_instances()) == sum(n for *_, n in SERIES.values())

    dated = client.search_for_studies(search_filters={"StudyDate": "20240301-"}, fuzzymatching=True)
    assert sorted(uids(dated, "0020000D")) == sorted([S2, S4])
    assert client.search_for_studies(search_filters={"PatientID": "NOBODY"}) == []


def test_dicomweb_client_pages(archive):
    client = archive.client
    page = client.search_for_studies(limit=3, offset=1)
    everything = search(archive, "/studies")
    assert page == everything[1:4]
    assert client.search_for_studies(limit=1, get_remaining=True) == everything
    assert client.search_for_instances(limit=4, get_remaining=True) == search(archive, "/instances")
