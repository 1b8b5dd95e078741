"""C-FIND against real peers: DCMTK's findscu and pynetdicom query a live pacsd.

A daemon is filled once with a known set (3 patients, 6 studies, names in Latin-1 and in
ISO 2022 Japanese) through `pacsd store`; findscu queries it at every level of both models
with each matching type, its responses extracted to files (-X) and read back with pydicom,
and compared with the exact expected result sets. A second daemon holds 10,000 studies
(written through the IndexWriter before it starts) for C-CANCEL and for memory under a
query that matches them all. Bad identifiers must come back A900 or C000 with an Error
Comment that says why, and be logged.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from pacsd.index.db import create_engine, upgrade
from tests.conftest import Daemon, dcmtk, launch_daemon
from tests.unit.test_query import JAPANESE, fill, many_studies

pytestmark = pytest.mark.interop

PATIENT_ROOT = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT = "1.2.840.10008.5.1.4.1.2.2.1"
ROOT = "1.2.826.0.1.3680043.8.498.4720"
SOP = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4", "OT": "1.2.840.10008.5.1.4.1.1.7"}
BIG = 10_000

PATIENTS = {
    "P1": ("Doe^John", "FIND-P1", "19650412", "M", None),
    "P2": ("Müller^Jürgen", "FIND-P2", "19700101", "M", "ISO_IR 100"),
    "P3": (JAPANESE, "FIND-P3", "19851120", "F", ["", "ISO 2022 IR 87"]),
}
# study: patient, date, time, description, accession, series as [(modality, instances)]
STUDIES = {
    "A": ("P1", "20240105", "083000", "CT CHEST", "A1001", [("CT", 2)]),
    "B": ("P1", "20240220", "141500", "MR BRAIN", "A1002", [("MR", 2), ("MR", 1)]),
    "C": ("P2", "20240220", "230000", "CT ABDOMEN", "A2001", [("CT", 1)]),
    "D": ("P2", "20240301", "000500", "Schädel", "A2002", [("MR", 1)]),
    "E": ("P3", "20231115", "120000", "CT THORAX", "A3001", [("CT", 1)]),
    "F": ("P3", "20240105", "235959", "FOLLOW_UP 100%", "A3002", [("OT", 1)]),
}


def study_uid(s: str) -> str:
    return f"{ROOT}.1.{ord(s)}"


def series_uid(s: str, n: int) -> str:
    return f"{ROOT}.2.{ord(s)}.{n + 1}"


def instance_uid(s: str, n: int, i: int) -> str:
    return f"{ROOT}.3.{ord(s)}.{n + 1}.{i + 1}"


STUDY_OF_UID = {study_uid(s): s for s in STUDIES}


def write_corpus(directory: Path) -> int:
    directory.mkdir(parents=True)
    count = 0
    for s, (patient, date, time_, description, accession, series_list) in STUDIES.items():
        name, pid, birth, sex, charset = PATIENTS[patient]
        for n, (modality, instances) in enumerate(series_list):
            for i in range(instances):
                ds = Dataset()
                if charset or s == "D":
                    ds.SpecificCharacterSet = charset or "ISO_IR 100"
                ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = name, pid, birth, sex
                ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study_uid(s), date, time_
                ds.StudyDescription, ds.AccessionNumber, ds.StudyID = description, accession, s
                ds.ReferringPhysicianName = "Referrer^Rita"
                ds.SeriesInstanceUID, ds.Modality, ds.SeriesNumber = series_uid(s, n), modality, n + 1
                ds.SOPClassUID, ds.SOPInstanceUID, ds.InstanceNumber = SOP[modality], instance_uid(s, n, i), i + 1
                ds.file_meta = FileMetaDataset()
                ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                pydicom.dcmwrite(directory / f"{s}{n}{i}.dcm", ds, enforce_file_format=True)
                count += 1
    return count


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("find")
    total = write_corpus(root / "files")
    daemon = launch_daemon(root, "data")
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PACSD_")}
        stored = subprocess.run([sys.executable, "-m", "pacsd", "store", "127.0.0.1", str(daemon.port),
                                 str(root / "files")], capture_output=True, text=True, timeout=120, env=env)
        assert stored.returncode == 0, stored.stdout + stored.stderr
        assert f"{total} succeeded" in stored.stdout
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def big_archive(tmp_path_factory):
    """10,000 studies written straight into the index before the daemon starts."""
    root = tmp_path_factory.mktemp("findbig")
    url = f"sqlite+aiosqlite:///{root}/data/index.db"
    (root / "data").mkdir()
    upgrade(url)

    async def write() -> None:
        engine = create_engine(url)
        try:
            await fill(engine, many_studies(BIG))
        finally:
            await engine.dispose()

    asyncio.run(write())
    daemon = launch_daemon(root, "data")
    try:
        yield daemon
    finally:
        daemon.stop()


# -- findscu -------------------------------------------------------------------------------


def findscu(daemon: Daemon, tmp_path: Path, model: str, *keys: str | bytes) -> list[Dataset]:
    """Run DCMTK's findscu (-P or -S) with -k keys; the responses it extracted (-X)."""
    out = tmp_path / uuid.uuid4().hex
    out.mkdir()
    args: list = [dcmtk("findscu"), model, "-aec", "PACSD", "-X", "-od", str(out)]
    for k in keys:
        args += ["-k", k]
    run = subprocess.run(args + ["127.0.0.1", str(daemon.port)], capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    return [pydicom.dcmread(p, force=True) for p in sorted(out.glob("rsp*.dcm"))]


def studies(responses: list[Dataset]) -> list[str]:
    found = sorted(STUDY_OF_UID[str(r.StudyInstanceUID)] for r in responses)
    assert len(found) == len(set(found)), f"a study answered twice: {found}"
    return found


def study_query(daemon, tmp_path, *keys) -> list[str]:
    return studies(findscu(daemon, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "StudyInstanceUID", *keys))


def test_patient_level_in_patient_root(archive, tmp_path):
    found = findscu(archive, tmp_path, "-P", "QueryRetrieveLevel=PATIENT", "PatientID", "PatientName",
                    "PatientBirthDate", "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                    "NumberOfPatientRelatedInstances")
    got = {r.PatientID: (str(r.PatientName), r.PatientBirthDate, r.NumberOfPatientRelatedStudies,
                         r.NumberOfPatientRelatedSeries, r.NumberOfPatientRelatedInstances) for r in found}
    assert got == {
        "FIND-P1": ("Doe^John", "19650412", 2, 3, 5),
        "FIND-P2": ("Müller^Jürgen", "19700101", 2, 2, 2),
        "FIND-P3": (JAPANESE, "19851120", 2, 2, 2),
    }
    assert len(found) == 3 and all(r.QueryRetrieveLevel == "PATIENT" for r in found)
    by_id = {r.PatientID: r for r in found}
    assert "SpecificCharacterSet" not in by_id["FIND-P1"]  # plain ASCII, none asked for
    assert by_id["FIND-P2"].SpecificCharacterSet == "ISO_IR 192"  # beyond ASCII: UTF-8
    # a wild card, matched without regard to case (PN)
    found = findscu(archive, tmp_path, "-P", "QueryRetrieveLevel=PATIENT", "PatientID", "PatientName=doe*")
    assert [r.PatientID for r in found] == ["FIND-P1"]
    found = findscu(archive, tmp_path, "-P", "QueryRetrieveLevel=PATIENT", "PatientID", "PatientSex=F")
    assert [r.PatientID for r in found] == ["FIND-P3"]


def test_names_beyond_ascii_in_the_requested_character_set(archive, tmp_path):
    # UTF-8 request, UTF-8 answer
    [r] = findscu(archive, tmp_path, "-P", "SpecificCharacterSet=ISO_IR 192", "QueryRetrieveLevel=PATIENT",
                  "PatientID", "PatientName=MÜLLER*")
    assert (r.PatientID, str(r.PatientName), r.SpecificCharacterSet) == ("FIND-P2", "Müller^Jürgen", "ISO_IR 192")
    # Latin-1 request (the value's bytes as Latin-1 on the command line), Latin-1 answer
    [r] = findscu(archive, tmp_path, "-P", "SpecificCharacterSet=ISO_IR 100", "QueryRetrieveLevel=PATIENT",
                  "PatientID", "PatientName=müller*".encode("latin-1"))
    assert (r.PatientID, str(r.PatientName), r.SpecificCharacterSet) == ("FIND-P2", "Müller^Jürgen", "ISO_IR 100")
    # the Japanese name: Latin-1 cannot hold it, so the answer is UTF-8
    [r] = findscu(archive, tmp_path, "-P", "SpecificCharacterSet=ISO_IR 100", "QueryRetrieveLevel=PATIENT",
                  "PatientID", "PatientName=yamada*")
    assert (r.PatientID, str(r.PatientName), r.SpecificCharacterSet) == ("FIND-P3", JAPANESE, "ISO_IR 192")
    [r] = findscu(archive, tmp_path, "-P", "SpecificCharacterSet=ISO_IR 192", "QueryRetrieveLevel=PATIENT",
                  "PatientID", "PatientName=*山田*")
    assert r.PatientID == "FIND-P3"


def test_findscu_prints_the_names(archive):
    run = subprocess.run([dcmtk("findscu"), "-S", "-aec", "PACSD", "-k", "QueryRetrieveLevel=STUDY",
                          "-k", "PatientName", "-k", "StudyDescription", "127.0.0.1", str(archive.port)],
                         capture_output=True, timeout=60)
    printed = (run.stdout + run.stderr).decode("utf-8")
    assert "Müller^Jürgen" in printed and "山田^太郎" in printed and "Schädel" in printed


def test_study_level_matching(archive, tmp_path):
    q = lambda *keys: study_query(archive, tmp_path, *keys)  # noqa: E731
    assert q() == list("ABCDEF")  # universal
    assert q("AccessionNumber=A2001") == ["C"]  # single value
    assert q("StudyDescription=CT*") == ["A", "C", "E"]  # wild card
    assert q("StudyDescription=*100%") == ["F"]  # % is a character, not SQL's wild card
    assert q("StudyDescription=FOLLOW?UP*") == ["F"]
    assert q("StudyDescription=FOLLOWXUP*") == []  # _ is a character too
    assert q("StudyDate=20240201-") == ["B", "C", "D"]  # ranges
    assert q("StudyDate=-20240105") == ["A", "E", "F"]
    assert q("StudyDate=20240105-20240220") == ["A", "B", "C", "F"]
    # one date-time range: from Jan 5 12:00 to Feb 20 15:00
    assert q("StudyDate=20240105-20240220", "StudyTime=1200-1500") == ["B", "F"]
    assert q(f"StudyInstanceUID={study_uid('A')}\\{study_uid('D')}") == ["A", "D"]  # list of UIDs
    assert q("PatientName=müller*", "SpecificCharacterSet=ISO_IR 192") == ["C", "D"]  # patient keys
    assert q("PatientID=FIND-P3") == ["E", "F"]
    assert q("ModalitiesInStudy=MR") == ["B", "D"]
    assert q("ModalitiesInStudy=CT\\OT") == ["A", "C", "E", "F"]
    assert q("StudyDescription=Schädel", "SpecificCharacterSet=ISO_IR 192") == ["D"]


def test_study_level_returns_values_and_computed_keys(archive, tmp_path):
    found = findscu(archive, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "AccessionNumber", "ModalitiesInStudy", "SOPClassesInStudy",
                    "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "PatientName",
                    "RetrieveAETitle", "StudyDate=20240220")
    got = {STUDY_OF_UID[str(r.StudyInstanceUID)]: (r.StudyTime, r.AccessionNumber, r.ModalitiesInStudy,
                                                    r.SOPClassesInStudy, r.NumberOfStudyRelatedSeries,
                                                    r.NumberOfStudyRelatedInstances, r.RetrieveAETitle)
           for r in found}
    assert got == {"B": ("141500", "A1002", "MR", SOP["MR"], 2, 3, "PACSD"),
                   "C": ("230000", "A2001", "CT", SOP["CT"], 1, 1, "PACSD")}


def test_patient_root_study_level(archive, tmp_path):
    found = findscu(archive, tmp_path, "-P", "QueryRetrieveLevel=STUDY", "PatientID=FIND-P2", "StudyInstanceUID",
                    "StudyDescription")
    assert studies(found) == ["C", "D"]
    assert {r.PatientID for r in found} == {"FIND-P2"}  # the unique key of the level above
    assert {r.StudyDescription for r in found} == {"CT ABDOMEN", "Schädel"}


def test_series_level(archive, tmp_path):
    found = findscu(archive, tmp_path, "-S", "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study_uid('B')}",
                    "SeriesInstanceUID", "Modality", "SeriesNumber", "NumberOfSeriesRelatedInstances")
    assert sorted((str(r.SeriesInstanceUID), r.Modality, r.SeriesNumber, r.NumberOfSeriesRelatedInstances)
                  for r in found) == [(series_uid("B", 0), "MR", 1, 2), (series_uid("B", 1), "MR", 2, 1)]
    assert {str(r.StudyInstanceUID) for r in found} == {study_uid("B")}
    found = findscu(archive, tmp_path, "-S", "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study_uid('B')}",
                    "SeriesInstanceUID", "SeriesNumber=2")
    assert [str(r.SeriesInstanceUID) for r in found] == [series_uid("B", 1)]
    found = findscu(archive, tmp_path, "-P", "QueryRetrieveLevel=SERIES", "PatientID=FIND-P1",
                    f"StudyInstanceUID={study_uid('A')}", "SeriesInstanceUID", "Modality=C?")
    assert [(str(r.SeriesInstanceUID), r.PatientID) for r in found] == [(series_uid("A", 0), "FIND-P1")]


def test_image_level(archive, tmp_path):
    keys = ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study_uid('B')}", f"SeriesInstanceUID={series_uid('B', 0)}"]
    found = findscu(archive, tmp_path, "-S", *keys, "SOPInstanceUID", "InstanceNumber", "SOPClassUID")
    assert sorted((str(r.SOPInstanceUID), r.InstanceNumber, str(r.SOPClassUID)) for r in found) == [
        (instance_uid("B", 0, 0), 1, SOP["MR"]), (instance_uid("B", 0, 1), 2, SOP["MR"])]
    found = findscu(archive, tmp_path, "-S", *keys, "InstanceNumber=2")
    assert [str(r.SOPInstanceUID) for r in found] == [instance_uid("B", 0, 1)]
    two = f"{instance_uid('B', 0, 0)}\\{instance_uid('A', 0, 0)}"
    found = findscu(archive, tmp_path, "-S", *keys, f"SOPInstanceUID={two}")
    assert [str(r.SOPInstanceUID) for r in found] == [instance_uid("B", 0, 0)]  # only under that series
    found = findscu(archive, tmp_path, "-P", "QueryRetrieveLevel=IMAGE", "PatientID=FIND-P1", *keys[1:],
                    "SOPInstanceUID")
    assert len(found) == 2 and {r.PatientID for r in found} == {"FIND-P1"}


def test_findscu_sees_the_failure_status(archive):
    run = subprocess.run([dcmtk("findscu"), "-d", "-S", "-aec", "PACSD", "-k", "QueryRetrieveLevel=SERIES",
                          "-k", "SeriesInstanceUID", "127.0.0.1", str(archive.port)], capture_output=True, timeout=60)
    printed = (run.stdout + run.stderr).decode()
    assert "0xa900: Error: Data Set does not match SOP Class" in printed
    assert "(0000,0901) AT (0020,000d)" in printed  # Offending Element: StudyInstanceUID
    assert "SERIES level needs one StudyInstanceUID (hierarchical search)" in printed


# -- pynetdicom: statuses, Error Comments, C-CANCEL ------------------------------------------


def associate(daemon: Daemon, model: str = STUDY_ROOT, name: str = "PYNETDICOM"):
    ae = AE(ae_title=name)
    ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = 60
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="PACSD")
    assert assoc.is_established
    # pynetdicom's reactor thread can take a response off the queue before send_c_find()
    # reads it; this client serves no requests, so hand anything it takes back to the queue.
    assoc._serve_request = lambda msg, context_id: assoc.dimse.msg_queue.put((context_id, msg))
    return assoc


def c_find(daemon: Daemon, model: str, **values) -> tuple[list[tuple[int, Dataset]], Dataset]:
    ds = Dataset()
    for name, value in values.items():
        if isinstance(value, bytes):  # a value pydicom would refuse to hold: as raw bytes
            tag = Tag(name)
            ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)
        else:
            setattr(ds, name, value)
    assoc = associate(daemon, model)
    try:
        responses = list(assoc.send_c_find(ds, model))
    finally:
        assoc.release()
    pending = [(s.Status, i) for s, i in responses if s.Status in (0xFF00, 0xFF01)]
    final = responses[-1][0]
    return pending, final


@pytest.mark.parametrize("model, values, status, comment", [
    (STUDY_ROOT, {"PatientName": "X*", "StudyInstanceUID": ""}, 0xA900,
     "QueryRetrieveLevel (0008,0052) is missing"),
    (STUDY_ROOT, {"QueryRetrieveLevel": "FRAME"}, 0xA900, "is not PATIENT/STUDY/SERIES/IMAGE"),
    (STUDY_ROOT, {"QueryRetrieveLevel": "PATIENT", "PatientID": ""}, 0xA900,
     "level PATIENT is not in the Study Root model"),
    (STUDY_ROOT, {"QueryRetrieveLevel": "SERIES", "Modality": "CT"}, 0xA900, "SERIES level needs one StudyInstanceUID"),
    (STUDY_ROOT, {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": "1.2*"}, 0xA900,
     "StudyInstanceUID must be a single value"),
    (PATIENT_ROOT, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""}, 0xA900, "STUDY level needs one PatientID"),
    (STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.*"}, 0xA900, "no wildcards in UID keys"),
    (STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "StudyDate": "yesterday"}, 0xC000, "'yesterday' is not a DA value"),
    (STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "StudyTime": "9am-5pm"}, 0xC000, "is not a TM value or range"),
    (STUDY_ROOT, {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": "1.2", "SeriesNumber": b"1-5 "}, 0xC000,
     "SeriesNumber: '1-5' is not a valid IS"),
])
@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom, about the values sent on purpose
def test_bad_identifiers_fail_with_a_reason(archive, model, values, status, comment):
    pending, final = c_find(archive, model, **values)
    assert pending == []
    assert final.Status == status
    assert comment in final.ErrorComment
    events = archive.wait_for_event("find.failed", error=final.ErrorComment)
    assert events and events[-1]["status"].startswith(f"0x{status:04X}")


def test_undecodable_identifier_is_c000(archive):
    from pacsd.config import DicomSettings
    from pacsd.dimse.command import CommandField
    from pacsd.dul.negotiation import ProposedContext
    from pacsd.net.requestor import associate as pacsd_associate

    async def send() -> dict:
        contexts = [ProposedContext(STUDY_ROOT, ["1.2.840.10008.1.2.1"])]
        async with pacsd_associate("127.0.0.1", archive.port, calling_ae="RAWSCU", called_ae="PACSD",
                                   contexts=contexts, settings=DicomSettings()) as assoc:
            context = assoc.context_for(STUDY_ROOT)
            # (0008,0052) CS says 64 bytes follow; 5 do.
            raw = b"\x08\x00\x52\x00CS\x40\x00STUDY"
            response = await assoc.request_one(context.context_id, {
                "CommandField": CommandField.C_FIND_RQ, "AffectedSOPClassUID": STUDY_ROOT, "Priority": 0}, raw)
            return response.command

    command = asyncio.run(send())
    assert command["Status"] == 0xC000
    assert command["ErrorComment"].startswith("identifier cannot be decoded")


def test_keys_below_the_level_give_ff01(archive):
    pending, final = c_find(archive, STUDY_ROOT, QueryRetrieveLevel="STUDY", StudyInstanceUID=study_uid("A"),
                            SOPInstanceUID="")
    assert final.Status == 0x0000
    assert [(s, str(i.StudyInstanceUID)) for s, i in pending] == [(0xFF01, study_uid("A"))]


def test_cancel_during_a_long_find(big_archive):
    assoc = associate(big_archive, name="CANCELSCU")
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    ds.PatientName = ""
    pending = 0
    final = None
    try:
        for status, _identifier in assoc.send_c_find(ds, STUDY_ROOT, msg_id=77):
            if status.Status in (0xFF00, 0xFF01):
                pending += 1
                if pending == 10:
                    assoc.send_c_cancel(77, query_model=STUDY_ROOT)
            else:
                final = status.Status
    finally:
        assoc.release()
    assert final == 0xFE00
    assert 10 <= pending < BIG
    [event] = big_archive.wait_for_event("find.cancelled")
    assert event["matches"] == pending


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.timeout(300)
def test_find_matching_10000_studies_in_flat_memory(big_archive, tmp_path):
    args = [dcmtk("findscu"), "-S", "-aec", "PACSD", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
            "-k", "PatientName=DOE*", "-k", "StudyDate", "-k", "PatientID", "-k", "ModalitiesInStudy",
            "-k", "NumberOfStudyRelatedInstances", "127.0.0.1", str(big_archive.port)]
    warm = subprocess.run(args[:-2] + ["-k", "AccessionNumber=none", "127.0.0.1", str(big_archive.port)],
                          capture_output=True, timeout=60)
    assert warm.returncode == 0
    pid = big_archive.proc.pid
    before = _rss_kib(pid)
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_kib(pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    output = tmp_path / "findscu.out"
    try:
        with open(output, "wb") as out:
            run = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, timeout=240)
    finally:
        done.set()
        sampler.join()
    assert run.returncode == 0
    text = output.read_bytes()
    assert text.count(b"(Pending)") == BIG
    [event] = big_archive.wait_for_event("find.completed", matches=BIG)  # final status 0000
    growth_mib = (peak - before) / 1024
    print(f"daemon RSS {before} KiB before, {peak} KiB at peak: +{growth_mib:.1f} MiB")
    assert growth_mib < 50, f"RSS grew by {growth_mib:.1f} MiB ({before} -> {peak} KiB)"
