"""C-MOVE and C-GET SCP against real peers: DCMTK movescu/getscu/storescp and pynetdicom.

One pacsd serves every test here. Its archive:

    PAT-RET-1  study A  series A1: 3 CT (explicit VR LE)   series A2: 2 MR (implicit VR LE)
               study D  series D1: 2 CT (explicit VR LE)
    PAT-RET-2  study B  series B1: 300 CT, 16x16 (explicit VR LE)
    PAT-RET-3  study C  series C1: 1 JPEG Baseline secondary capture, 1 CT (explicit VR LE)

Its peers (C-MOVE destinations) are ports reserved when it starts; each test starts the
destination it needs on its port. What arrives is compared byte for byte with the blob pacsd
stored (the data set after its file meta).
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from pacsd.index.retrieve import (
    PATIENT_ROOT,
    STUDY_ROOT,
    IdentifierError,
    parse_identifier,
)
from pacsd.services.qr_retrieve import encode_failed_list, plan_contexts
from tests.conftest import dcmtk, free_port, wait_for_port
from tests.dicomdata import (
    EXPLICIT_LE,
    IMPLICIT_LE,
    RawAssociation,
    dataset_bytes,
    image,
    launch_daemon,
    query,
    stored_dataset,
    uid,
    write_part10,
)

pytestmark = pytest.mark.interop

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
C_MOVE_RQ = 0x0021
C_GET_RQ = 0x0010
FAILED_LIST = 0x00080058

DESTINATIONS = ("DEST", "DEST2", "SLOW", "SLOW2", "REFUSER")

STUDY_A = uid("retrieve", "study", "A")
STUDY_B = uid("retrieve", "study", "B")
STUDY_C = uid("retrieve", "study", "C")
STUDY_D = uid("retrieve", "study", "D")
SERIES_A1 = uid("retrieve", "series", "A1")
SERIES_A2 = uid("retrieve", "series", "A2")
SERIES_B1 = uid("retrieve", "series", "B1")
SERIES_C1 = uid("retrieve", "series", "C1")
SERIES_D1 = uid("retrieve", "series", "D1")
B_COUNT = 300


@dataclass
class Archive:
    daemon: object
    ports: dict[str, int]
    # study UID -> SOP instance UIDs; series UID -> SOP instance UIDs
    studies: dict[str, list[str]] = field(default_factory=dict)
    series: dict[str, list[str]] = field(default_factory=dict)
    jpeg_uid: str = ""

    @property
    def port(self) -> int:
        return self.daemon.port

    def stored(self) -> dict[str, tuple[str, bytes]]:
        """SOP Instance UID -> (stored transfer syntax, stored data set bytes)."""
        rows = query(self.daemon.data_dir / "index.db", "SELECT * FROM instances")
        return {r["sop_instance_uid"]: (r["transfer_syntax_uid"], stored_dataset(self.daemon.data_dir, r))
                for r in rows}


def _write_archive(directory: Path) -> tuple[dict, dict, str]:
    studies: dict[str, list[str]] = {}
    series: dict[str, list[str]] = {}

    def add(study, ser, sop, ds):
        write_part10(directory / f"{len(list(directory.iterdir())):04d}.dcm", ds)
        studies.setdefault(study, []).append(sop)
        series.setdefault(ser, []).append(sop)

    for n in range(3):
        sop = uid("retrieve", "A1", n)
        add(STUDY_A, SERIES_A1, sop, image(sop, SERIES_A1, STUDY_A, patient_id="PAT-RET-1",
                                           instance_number=n + 1))
    for n in range(2):
        sop = uid("retrieve", "A2", n)
        add(STUDY_A, SERIES_A2, sop, image(sop, SERIES_A2, STUDY_A, modality="MR", patient_id="PAT-RET-1",
                                           series_number=2, instance_number=n + 1,
                                           transfer_syntax=IMPLICIT_LE))
    for n in range(2):
        sop = uid("retrieve", "D1", n)
        add(STUDY_D, SERIES_D1, sop, image(sop, SERIES_D1, STUDY_D, patient_id="PAT-RET-1",
                                           instance_number=n + 1))
    for n in range(B_COUNT):
        sop = uid("retrieve", "B1", n)
        add(STUDY_B, SERIES_B1, sop, image(sop, SERIES_B1, STUDY_B, patient_id="PAT-RET-2",
                                           instance_number=n + 1, rows=16, columns=16))
    # A JPEG Baseline instance (pydicom's test file) moved into study C.
    jpeg = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    jpeg_uid = uid("retrieve", "C1", "jpeg")
    jpeg.SOPInstanceUID = jpeg.file_meta.MediaStorageSOPInstanceUID = jpeg_uid
    jpeg.StudyInstanceUID, jpeg.SeriesInstanceUID = STUDY_C, SERIES_C1
    jpeg.PatientID = "PAT-RET-3"
    assert jpeg.file_meta.TransferSyntaxUID == JPEG_BASELINE
    add(STUDY_C, SERIES_C1, jpeg_uid, jpeg)
    sop = uid("retrieve", "C1", "ct")
    add(STUDY_C, SERIES_C1, sop, image(sop, SERIES_C1, STUDY_C, patient_id="PAT-RET-3",
                                       instance_number=2))
    return studies, series, jpeg_uid


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Archive:
    base = tmp_path_factory.mktemp("retrieve")
    ports = {name: free_port() for name in DESTINATIONS}
    ports["NOBODY"] = free_port()  # nothing ever listens here
    peers = [{"ae_title": name, "host": "127.0.0.1", "port": port} for name, port in ports.items()]
    daemon = launch_daemon(base, "pacsd", PEERS=json.dumps(peers))
    try:
        files = base / "files"
        files.mkdir()
        studies, series, jpeg_uid = _write_archive(files)
        env = {k: v for k, v in daemon.env.items() if not k.startswith("PACSD_")}
        result = subprocess.run([sys.executable, "-m", "pacsd", "store", "127.0.0.1", str(daemon.port),
                                 str(files)],
                                capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        yield Archive(daemon, ports, studies, series, jpeg_uid)
    finally:
        daemon.stop()


# --- destinations ---------------------------------------------------------------------------


class StoreSCP:
    """DCMTK storescp in bit-preserving mode: each data set is written exactly as received."""

    def __init__(self, directory: Path, port: int, aet: str, *extra: str) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "-aet", aet, "+B", "-od", str(directory), *extra, str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        wait_for_port(port, self.proc)

    def received(self) -> dict[str, tuple[str, bytes]]:
        """SOP Instance UID -> (transfer syntax, data set bytes) of every file received."""
        out = {}
        for path in self.directory.iterdir():
            meta = pydicom.filereader.read_file_meta_info(path)
            out[str(meta.MediaStorageSOPInstanceUID)] = (str(meta.TransferSyntaxUID), dataset_bytes(path))
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def storescp(tmp_path):
    started: list[StoreSCP] = []

    def start(port: int, aet: str, *extra: str) -> StoreSCP:
        scp = StoreSCP(tmp_path / f"{aet}-{len(started)}", port, aet, *extra)
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


@dataclass
class Received:
    sop_instance_uid: str
    at: float
    originator_ae: str | None
    originator_message_id: int | None
    transfer_syntax: str
    data: bytes


class PynetdicomSCP:
    """A pynetdicom storage SCP that takes `delay` seconds per instance."""

    def __init__(self, port: int, aet: str, delay: float = 0.0, require_called_aet: bool = False):
        self.received: list[Received] = []
        self.delay = delay
        self.ae = AE(ae_title=aet)
        self.ae.require_called_aet = require_called_aet
        self.ae.dimse_timeout = self.ae.network_timeout = 60
        for sop_class in (CTImageStorage, MRImageStorage, SECONDARY_CAPTURE):
            self.ae.add_supported_context(sop_class, [EXPLICIT_LE, IMPLICIT_LE, JPEG_BASELINE])
        self.server = self.ae.start_server(("127.0.0.1", port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event) -> int:
        if self.delay:
            time.sleep(self.delay)
        rq = event.request
        self.received.append(Received(
            str(rq.AffectedSOPInstanceUID), time.monotonic(),
            (rq.MoveOriginatorApplicationEntityTitle or None),
            rq.MoveOriginatorMessageID,
            str(event.context.transfer_syntax),
            rq.DataSet.getvalue(),
        ))
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def pynetdicom_scp():
    started: list[PynetdicomSCP] = []

    def start(port: int, aet: str, **kwargs) -> PynetdicomSCP:
        scp = PynetdicomSCP(port, aet, **kwargs)
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


# --- requestors -----------------------------------------------------------------------------


def movescu(archive: Archive, destination: str, *keys: str, model: str = "-S",
            timeout: float = 120) -> subprocess.CompletedProcess:
    args = [dcmtk("movescu"), "-v", model, "-aet", "MOVESCU", "-aec", "PACSD", "-aem", destination]
    for key in keys:
        args += ["-k", key]
    args += ["127.0.0.1", str(archive.port)]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def scu(archive: Archive, *contexts, roles=(), aet: str = "PYSCU"):
    ae = AE(ae_title=aet)
    ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = 60
    for context in contexts:
        if isinstance(context, tuple):
            ae.add_requested_context(*context)
        else:
            ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", archive.port, ae_title="PACSD", ext_neg=list(roles) or None)
    assert assoc.is_established
    return assoc


def identifier(level: str, **keys) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


@dataclass
class Response:
    status: int
    at: float
    remaining: int | None
    completed: int | None
    failed: int | None
    warning: int | None
    comment: str | None
    failed_list: list[str] | None


def _response(status: Dataset, ident: Dataset | None) -> Response:
    failed_list = None
    if ident is not None and "FailedSOPInstanceUIDList" in ident:
        value = ident.FailedSOPInstanceUIDList
        failed_list = [] if value in (None, "") else ([str(value)] if isinstance(value, str) else
                                                     [str(v) for v in value])
    return Response(
        int(status.Status), time.monotonic(),
        status.get("NumberOfRemainingSuboperations"), status.get("NumberOfCompletedSuboperations"),
        status.get("NumberOfFailedSuboperations"), status.get("NumberOfWarningSuboperations"),
        status.get("ErrorComment"), failed_list,
    )


def pynetdicom_move(archive: Archive, destination: str, ds: Dataset, *, model=StudyRootQueryRetrieveInformationModelMove,
                    cancel_after=None, msg_id: int = 7) -> list[Response]:
    """C-MOVE with pynetdicom; every response in order. `cancel_after(response)` True sends C-CANCEL."""
    assoc = scu(archive, model)
    responses = []
    sent_cancel = False
    try:
        for status, ident in assoc.send_c_move(ds, destination, model, msg_id=msg_id):
            assert status is not None and "Status" in status, "no response (timeout or abort)"
            responses.append(_response(status, ident))
            if cancel_after and not sent_cancel and cancel_after(responses[-1]):
                assoc.send_c_cancel(msg_id, query_model=model)
                sent_cancel = True
    finally:
        assoc.release()
    return responses


def check_pending_counts(responses: list[Response], total: int) -> None:
    for r in responses[:-1]:
        assert r.status == 0xFF00
        assert r.remaining + r.completed + r.failed + r.warning == total, r
    assert responses[-1].status != 0xFF00


def assert_same_bytes(archive: Archive, received: dict[str, tuple[str, bytes]], uids: list[str]) -> None:
    stored = archive.stored()
    assert set(received) == set(uids)
    for sop in uids:
        assert received[sop][0] == stored[sop][0], f"{sop} arrived in another transfer syntax"
        assert received[sop][1] == stored[sop][1], f"{sop}: data set bytes differ from the blob"


# --- the identifier, without the network -----------------------------------------------------


@pytest.mark.parametrize("keys, model, expected", [
    ({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.3\\1.2.4"}, STUDY_ROOT,
     {"level": "STUDY", "study_uids": ("1.2.3", "1.2.4")}),
    ({"QueryRetrieveLevel": "PATIENT", "PatientID": "P1"}, PATIENT_ROOT,
     {"level": "PATIENT", "patient_id": "P1"}),
    ({"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": "1.2", "SeriesInstanceUID": "1.2.3",
      "SOPInstanceUID": ["1.2.3.4", "1.2.3.5", "1.2.3.4"], "PatientName": ""}, STUDY_ROOT,
     {"level": "IMAGE", "study_uids": ("1.2",), "series_uids": ("1.2.3",),
      "sop_instance_uids": ("1.2.3.4", "1.2.3.5")}),
    ({"QueryRetrieveLevel": "SERIES", "SeriesInstanceUID": "1.2.3"}, PATIENT_ROOT,
     {"level": "SERIES", "series_uids": ("1.2.3",)}),
])
def test_identifier_accepted(keys, model, expected):
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    request = parse_identifier(ds, model)
    for name, value in expected.items():
        assert getattr(request, name) == value


@pytest.mark.parametrize("keys, model, words", [
    ({"StudyInstanceUID": "1.2.3"}, STUDY_ROOT, "no Query/Retrieve Level"),
    ({"QueryRetrieveLevel": "PATIENT", "PatientID": "P1"}, STUDY_ROOT, "is not one of"),
    ({"QueryRetrieveLevel": "STUDY"}, STUDY_ROOT, "Study Instance UID is required"),
    ({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.*"}, STUDY_ROOT, "wildcard"),
    ({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.abc"}, STUDY_ROOT, "not a valid UID"),
    ({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2", "PatientName": "X*"}, STUDY_ROOT,
     "not a unique key"),
    ({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2", "SeriesInstanceUID": "1.2.3"},
     STUDY_ROOT, "lower level"),
    ({"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": "1.2\\1.3", "SeriesInstanceUID": "1.2.3"},
     STUDY_ROOT, "single UID"),
    ({"QueryRetrieveLevel": "PATIENT", "PatientID": "P*"}, PATIENT_ROOT, "wildcard"),
])
def test_identifier_refused(keys, model, words):
    ds = Dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for keyword, value in keys.items():
            setattr(ds, keyword, value)
    with pytest.raises(IdentifierError) as caught:
        parse_identifier(ds, model)
    assert caught.value.status == 0xA900
    assert words in caught.value.comment


def test_failed_list_encodings_and_context_plan():
    uids = [uid("failed", n) for n in range(3)]
    for ts in (EXPLICIT_LE, IMPLICIT_LE, "1.2.840.10008.1.2.2"):
        data, shown = encode_failed_list(uids, ts)
        ds = pydicom.filereader.read_dataset(io.BytesIO(data), ts == IMPLICIT_LE,
                                             ts != "1.2.840.10008.1.2.2")
        assert list(ds.FailedSOPInstanceUIDList) == uids and shown == 3
    # Explicit VR: a UI value is at most 65534 bytes, so a long list is cut to fit.
    many = [uid("failed", n) for n in range(2000)]
    data, shown = encode_failed_list(many, EXPLICIT_LE)
    assert 900 < shown < 2000 and len(data) <= 8 + 0xFFFE
    data, shown = encode_failed_list(many, IMPLICIT_LE)
    assert shown == 2000

    from pacsd.index.retrieve import InstanceRef

    refs = [InstanceRef(f"1.2.{n % 200}", f"9.{n}", ts, "k", 0, 0)
            for n in range(400) for ts in [EXPLICIT_LE]]
    plans = plan_contexts(refs)
    assert all(len(contexts) <= 128 for contexts, _ in plans)
    assert sum(len(batch) for _, batch in plans) == 400
    contexts, _ = plans[0]
    assert [c.transfer_syntaxes for c in contexts[:2]] == [[EXPLICIT_LE], [EXPLICIT_LE, IMPLICIT_LE]]


# --- C-MOVE with DCMTK ------------------------------------------------------------------------


def final_move_status(output: str) -> str:
    found = re.findall(r"Received Final Move Response \(([^)]*)\)", output)
    assert found, output
    return found[-1]


@pytest.mark.parametrize("level", ["STUDY", "SERIES", "IMAGE", "STUDY-LIST"])
def test_movescu_to_storescp_preserves_every_data_set_byte(archive, storescp, level):
    scp = storescp(archive.ports["DEST"], "DEST")
    if level == "STUDY":
        keys, expected = [f"StudyInstanceUID={STUDY_A}"], archive.studies[STUDY_A]
    elif level == "STUDY-LIST":
        keys = [f"StudyInstanceUID={STUDY_A}\\{STUDY_D}"]
        expected = archive.studies[STUDY_A] + archive.studies[STUDY_D]
        level = "STUDY"
    elif level == "SERIES":
        keys, expected = [f"StudyInstanceUID={STUDY_A}", f"SeriesInstanceUID={SERIES_A2}"], \
            archive.series[SERIES_A2]
    else:
        expected = [archive.series[SERIES_A1][0], archive.series[SERIES_A2][1], archive.studies[STUDY_D][0]]
        keys = ["SOPInstanceUID=" + "\\".join(expected)]
    result = movescu(archive, "DEST", f"QueryRetrieveLevel={level}", *keys)
    assert result.returncode == 0, result.stdout + result.stderr
    assert final_move_status(result.stdout + result.stderr) == "Success"
    assert_same_bytes(archive, scp.received(), expected)


def test_movescu_patient_root_patient_level(archive, storescp):
    scp = storescp(archive.ports["DEST"], "DEST")
    result = movescu(archive, "DEST", "QueryRetrieveLevel=PATIENT", "PatientID=PAT-RET-1", model="-P")
    assert result.returncode == 0, result.stdout + result.stderr
    assert final_move_status(result.stdout + result.stderr) == "Success"
    assert_same_bytes(archive, scp.received(), archive.studies[STUDY_A] + archive.studies[STUDY_D])


def test_compressed_instance_goes_only_in_its_stored_syntax(archive, storescp):
    # storescp's default accepts only uncompressed syntaxes: the JPEG instance cannot go.
    plain = storescp(archive.ports["DEST"], "DEST")
    responses = pynetdicom_move(archive, "DEST", identifier("STUDY", StudyInstanceUID=STUDY_C))
    final = responses[-1]
    assert final.status == 0xB000
    assert (final.completed, final.failed, final.warning) == (1, 1, 0)
    assert final.failed_list == [archive.jpeg_uid]
    ct = [u for u in archive.studies[STUDY_C] if u != archive.jpeg_uid]
    assert_same_bytes(archive, plain.received(), ct)
    # movescu reads the final response's identifier (the failed list) and releases cleanly.
    result = movescu(archive, "DEST", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={STUDY_C}")
    output = result.stdout + result.stderr
    assert final_move_status(output).startswith("Warning"), output
    assert "Releasing Association" in output and "Release Failed" not in output, output
    plain.stop()

    # With every syntax accepted, the JPEG data set arrives as stored, still JPEG Baseline.
    everything = storescp(archive.ports["DEST"], "DEST", "+xa")
    responses = pynetdicom_move(archive, "DEST", identifier("STUDY", StudyInstanceUID=STUDY_C))
    assert responses[-1].status == 0x0000 and responses[-1].completed == 2
    received = everything.received()
    assert received[archive.jpeg_uid][0] == JPEG_BASELINE
    assert_same_bytes(archive, received, archive.studies[STUDY_C])


def test_move_to_unknown_destination(archive):
    responses = pynetdicom_move(archive, "NOWHERE", identifier("STUDY", StudyInstanceUID=STUDY_A))
    assert [r.status for r in responses] == [0xA801]
    assert "NOWHERE" in responses[0].comment and "unknown" in responses[0].comment

    result = movescu(archive, "NOWHERE", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={STUDY_A}")
    assert final_move_status(result.stdout + result.stderr) == "Refused: MoveDestinationUnknown"


def test_move_to_a_destination_that_rejects_the_association(archive, pynetdicom_scp):
    # REFUSER is configured at its port, but the AE there is OTHER and checks its called AE.
    scp = pynetdicom_scp(archive.ports["REFUSER"], "OTHER", require_called_aet=True)
    responses = pynetdicom_move(archive, "REFUSER", identifier("STUDY", StudyInstanceUID=STUDY_A))
    final = responses[-1]
    assert final.status == 0xA702
    assert (final.completed, final.failed, final.warning) == (0, 5, 0)
    assert sorted(final.failed_list) == sorted(archive.studies[STUDY_A])
    assert scp.received == []
    events = archive.daemon.wait_for_event("retrieve.suboperations_failed")
    assert any("called AE title not recognized" in e["error"] for e in events), events


def test_move_to_a_destination_that_is_not_listening(archive):
    responses = pynetdicom_move(archive, "NOBODY", identifier("SERIES", SeriesInstanceUID=SERIES_A1))
    final = responses[-1]
    assert final.status == 0xA702
    assert sorted(final.failed_list) == sorted(archive.series[SERIES_A1])


def test_move_without_matches_succeeds_with_zero_counts(archive, pynetdicom_scp):
    scp = pynetdicom_scp(archive.ports["DEST"], "DEST")
    responses = pynetdicom_move(archive, "DEST", identifier("STUDY", StudyInstanceUID=uid("retrieve", "none")))
    assert len(responses) == 1
    r = responses[0]
    assert (r.status, r.completed, r.failed, r.warning) == (0x0000, 0, 0, 0)
    assert scp.received == []


def test_higher_level_keys_narrow_the_match(archive, pynetdicom_scp):
    scp = pynetdicom_scp(archive.ports["DEST"], "DEST")
    model = PatientRootQueryRetrieveInformationModelMove
    # Study A belongs to PAT-RET-1: with another Patient ID nothing matches.
    responses = pynetdicom_move(archive, "DEST", identifier("STUDY", PatientID="PAT-RET-2",
                                                           StudyInstanceUID=STUDY_A), model=model)
    assert [(r.status, r.completed) for r in responses] == [(0x0000, 0)]
    # With its own Patient ID and a series of another study, neither.
    responses = pynetdicom_move(archive, "DEST", identifier("SERIES", PatientID="PAT-RET-1",
                                                           StudyInstanceUID=STUDY_D,
                                                           SeriesInstanceUID=SERIES_A1), model=model)
    assert responses[-1].completed == 0
    responses = pynetdicom_move(archive, "DEST", identifier("SERIES", PatientID="PAT-RET-1",
                                                           StudyInstanceUID=STUDY_A,
                                                           SeriesInstanceUID=f"{SERIES_A1}\\{SERIES_A2}"),
                                model=model)
    assert (responses[-1].status, responses[-1].completed) == (0x0000, 5)
    assert sorted(r.sop_instance_uid for r in scp.received) == sorted(archive.studies[STUDY_A])


@pytest.mark.parametrize("build, comment", [
    (lambda: identifier("STUDY"), "Study Instance UID is required"),
    (lambda: identifier("PATIENT", PatientID="PAT-RET-1"), "is not one of"),
    (lambda: identifier("STUDY", StudyInstanceUID=STUDY_A, PatientName="Test^Patient"), "not a unique key"),
])
def test_move_with_an_invalid_identifier(archive, build, comment):
    responses = pynetdicom_move(archive, "DEST", build())
    assert [r.status for r in responses] == [0xA900]
    assert comment in responses[0].comment


@pytest.mark.parametrize("raw, status, comment", [
    # Exactly these bytes on the wire: pydicom would not write them.
    (b"\x08\x00\x52\x00CS\x06\x00STUDY \x20\x00\x0d\x00UI\x08\x001.2.3.*\x00", 0xA900, "wildcard"),
    (b"\x08\x00\x52\x00CS\x06\x00STUDY \x20\x00\x0d\x00UI\x08\x001.2.ab\x00\x00", 0xA900, "not a valid UID"),
    (b"\x08\x00\x52\x00CS\x06\x00STUD", 0xC000, "cannot be decoded"),
])
def test_move_with_a_malformed_identifier(archive, raw, status, comment):
    move = StudyRootQueryRetrieveInformationModelMove
    with RawAssociation(archive.port, [(move, [EXPLICIT_LE])]) as raw_assoc:
        raw_assoc.send(raw_assoc.context_for(move), {
            "CommandField": C_MOVE_RQ, "MessageID": 5, "AffectedSOPClassUID": move, "Priority": 0,
            "CommandDataSetType": 0, "MoveDestination": "DEST",
        }, raw)
        response = raw_assoc.receive_command()
        raw_assoc.release()
    assert response["Status"] == status
    assert comment in response["ErrorComment"]


# --- C-MOVE: originator, pending responses, cancel, concurrency --------------------------------


def test_pending_responses_count_up_and_come_every_second(archive, pynetdicom_scp):
    # 1.2 s per instance: longer than a second, so pending responses must come while the
    # destination is still busy, not only after each sub-operation.
    scp = pynetdicom_scp(archive.ports["SLOW"], "SLOW", delay=1.2)
    uids = archive.series[SERIES_A1]
    started = time.monotonic()
    responses = pynetdicom_move(archive, "SLOW", identifier("IMAGE", SOPInstanceUID=uids), msg_id=42)
    check_pending_counts(responses, len(uids))
    final = responses[-1]
    assert (final.status, final.completed, final.failed, final.warning) == (0x0000, 3, 0, 0)
    times = [started] + [r.at for r in responses]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps) < 1.0, gaps
    assert len(responses) >= 6  # more than one per sub-operation
    completed = [r.completed for r in responses]
    assert completed == sorted(completed)
    # Each C-STORE-RQ named the Move Originator.
    assert [r.sop_instance_uid for r in scp.received] == uids
    assert {(r.originator_ae, r.originator_message_id) for r in scp.received} == {("PYSCU", 42)}


def test_pending_responses_during_a_fast_move_are_rate_limited(archive, pynetdicom_scp):
    scp = pynetdicom_scp(archive.ports["SLOW"], "SLOW", delay=0.005)
    responses = pynetdicom_move(archive, "SLOW", identifier("STUDY", StudyInstanceUID=STUDY_B))
    check_pending_counts(responses, B_COUNT)
    final = responses[-1]
    assert (final.status, final.completed) == (0x0000, B_COUNT)
    assert 1 <= len(responses) - 1 < B_COUNT / 3  # far fewer pending responses than instances
    assert len(scp.received) == B_COUNT


def test_cancel_during_a_move(archive, pynetdicom_scp):
    scp = pynetdicom_scp(archive.ports["SLOW"], "SLOW", delay=0.02)
    responses = pynetdicom_move(archive, "SLOW", identifier("STUDY", StudyInstanceUID=STUDY_B),
                                cancel_after=lambda r: r.status == 0xFF00 and r.completed >= 10)
    final = responses[-1]
    assert final.status == 0xFE00, responses[-3:]
    assert 10 <= final.completed < B_COUNT
    assert final.remaining == B_COUNT - final.completed - final.failed - final.warning > 0
    check_pending_counts(responses, B_COUNT)
    time.sleep(0.5)
    assert len(scp.received) == final.completed  # nothing was sent after the cancel
    [finished] = archive.daemon.wait_for_event("retrieve.finished", op="move",
                                               status="0xFE00 (cancelled)")[-1:]
    assert finished["completed"] == final.completed


def test_a_cancel_after_the_final_response_does_not_cancel_the_next_move(archive, pynetdicom_scp):
    # pynetdicom numbers every C-MOVE 1 unless told otherwise: a C-CANCEL that crossed the
    # first move's final response must not hit the next move with the same Message ID.
    scp = pynetdicom_scp(archive.ports["DEST"], "DEST")
    model = StudyRootQueryRetrieveInformationModelMove
    ds = identifier("SERIES", SeriesInstanceUID=SERIES_A1)
    assoc = scu(archive, model)
    try:
        first = [_response(st, ident) for st, ident in assoc.send_c_move(ds, "DEST", model, msg_id=1)]
        assoc.send_c_cancel(1, query_model=model)
        second = [_response(st, ident) for st, ident in assoc.send_c_move(ds, "DEST", model, msg_id=1)]
    finally:
        assoc.release()
    assert (first[-1].status, first[-1].completed) == (0x0000, 3)
    assert (second[-1].status, second[-1].completed) == (0x0000, 3)
    assert len(scp.received) == 6


def test_two_moves_at_once_to_two_destinations(archive, pynetdicom_scp):
    first = pynetdicom_scp(archive.ports["SLOW"], "SLOW", delay=0.003)
    second = pynetdicom_scp(archive.ports["SLOW2"], "SLOW2", delay=0.003)
    results: dict[str, list[Response]] = {}

    def run(destination: str) -> None:
        results[destination] = pynetdicom_move(archive, destination,
                                                identifier("STUDY", StudyInstanceUID=STUDY_B))

    threads = [threading.Thread(target=run, args=(d,)) for d in ("SLOW", "SLOW2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for destination, scp in (("SLOW", first), ("SLOW2", second)):
        final = results[destination][-1]
        assert (final.status, final.completed, final.failed) == (0x0000, B_COUNT, 0)
        assert sorted(r.sop_instance_uid for r in scp.received) == sorted(archive.studies[STUDY_B])
    # They ran side by side: each destination got instances while the other was receiving.
    a = [r.at for r in first.received]
    b = [r.at for r in second.received]
    assert min(a) < max(b) and min(b) < max(a)


def test_two_movescu_at_once(archive, storescp):
    one = storescp(archive.ports["DEST"], "DEST")
    two = storescp(archive.ports["DEST2"], "DEST2")
    procs = [
        subprocess.Popen([dcmtk("movescu"), "-v", "-S", "-aec", "PACSD", "-aem", dest,
                          "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                          "127.0.0.1", str(archive.port)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for dest, study in (("DEST", STUDY_B), ("DEST2", STUDY_A))
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert [final_move_status(o) for o in outputs] == ["Success", "Success"]
    assert_same_bytes(archive, one.received(), archive.studies[STUDY_B])
    assert_same_bytes(archive, two.received(), archive.studies[STUDY_A])


# --- C-GET ----------------------------------------------------------------------------------


def getscu(archive: Archive, directory: Path, *keys: str, model: str = "-S") -> subprocess.CompletedProcess:
    directory.mkdir(parents=True, exist_ok=True)
    args = [dcmtk("getscu"), "-v", model, "+B", "-aec", "PACSD", "-od", str(directory)]
    for key in keys:
        args += ["-k", key]
    args += ["127.0.0.1", str(archive.port)]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def received_files(directory: Path) -> dict[str, tuple[str, bytes]]:
    out = {}
    for path in directory.iterdir():
        meta = pydicom.filereader.read_file_meta_info(path)
        out[str(meta.MediaStorageSOPInstanceUID)] = (str(meta.TransferSyntaxUID), dataset_bytes(path))
    return out


@pytest.mark.parametrize("level", ["SERIES", "STUDY"])
def test_getscu_receives_every_data_set_byte(archive, tmp_path, level):
    if level == "SERIES":
        keys = ["QueryRetrieveLevel=SERIES", f"SeriesInstanceUID={SERIES_A1}"]
        expected = archive.series[SERIES_A1]
    else:
        keys = ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={STUDY_D}"]
        expected = archive.studies[STUDY_D]
    result = getscu(archive, tmp_path / "get", *keys)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Received C-GET Response (Success)" in output or "Final status report" in output, output
    assert_same_bytes(archive, received_files(tmp_path / "get"), expected)
    [finished] = archive.daemon.wait_for_event("retrieve.finished", op="get", calling_ae="GETSCU")[-1:]
    assert (finished["status"], finished["completed"]) == ("0x0000 (success)", len(expected))


def test_getscu_patient_root(archive, tmp_path):
    # getscu proposes each storage class in the uncompressed syntaxes, pacsd picks explicit
    # VR LE: the two MR instances stored in implicit VR LE cannot go (no transcoding).
    # (getscu 3.6.7 does not read the final response's identifier, the failed list, so its
    # A-RELEASE meets that P-DATA and it aborts: "Association Release Failed"; exit 0.)
    result = getscu(archive, tmp_path / "get", "QueryRetrieveLevel=PATIENT", "PatientID=PAT-RET-1",
                    model="-P")
    output = result.stdout + result.stderr
    assert "Number of Completed Suboperations : 5" in output, output
    assert "Number of Failed Suboperations    : 2" in output, output
    explicit = [u for u in archive.studies[STUDY_A] + archive.studies[STUDY_D]
                if u not in archive.series[SERIES_A2]]
    assert_same_bytes(archive, received_files(tmp_path / "get"), explicit)


class GetSCU:
    """pynetdicom C-GET requestor acting as Storage SCP on the same association."""

    def __init__(self, archive: Archive, storage=((CTImageStorage, [EXPLICIT_LE]),), delay: float = 0.0,
                 model=StudyRootQueryRetrieveInformationModelGet):
        self.model = model
        self.delay = delay
        self.received: list[Received] = []
        ae = AE(ae_title="GETTER")
        ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = 60
        ae.add_requested_context(model)
        roles = []
        for sop_class, syntaxes in storage:
            ae.add_requested_context(sop_class, syntaxes)
            roles.append(build_role(sop_class, scp_role=True))
        self.assoc = ae.associate("127.0.0.1", archive.port, ae_title="PACSD", ext_neg=roles,
                                  evt_handlers=[(evt.EVT_C_STORE, self._store)])
        assert self.assoc.is_established

    def _store(self, event) -> int:
        if self.delay:
            time.sleep(self.delay)
        rq = event.request
        self.received.append(Received(str(rq.AffectedSOPInstanceUID), time.monotonic(), None, None,
                                      str(event.context.transfer_syntax), rq.DataSet.getvalue()))
        return 0x0000

    def get(self, ds: Dataset, cancel_after=None, msg_id: int = 9) -> list[Response]:
        responses = []
        sent = False
        try:
            for status, ident in self.assoc.send_c_get(ds, self.model, msg_id=msg_id):
                assert status is not None and "Status" in status, "no response"
                responses.append(_response(status, ident))
                if cancel_after and not sent and cancel_after(responses[-1]):
                    self.assoc.send_c_cancel(msg_id, query_model=self.model)
                    sent = True
        finally:
            self.assoc.release()
        return responses


def test_pynetdicom_get_fails_instances_without_a_scu_context(archive):
    getter = GetSCU(archive)  # CT in explicit VR LE only: the MR instances have no context
    responses = getter.get(identifier("STUDY", StudyInstanceUID=STUDY_A))
    check_pending_counts(responses, 5)
    final = responses[-1]
    assert (final.status, final.completed, final.failed) == (0xB000, 3, 2)
    assert sorted(final.failed_list) == sorted(archive.series[SERIES_A2])
    stored = archive.stored()
    assert {r.sop_instance_uid: r.data for r in getter.received} == \
        {u: stored[u][1] for u in archive.series[SERIES_A1]}


def test_pynetdicom_get_without_any_usable_context(archive):
    getter = GetSCU(archive, storage=((MRImageStorage, [EXPLICIT_LE]),))
    responses = getter.get(identifier("SERIES", SeriesInstanceUID=SERIES_A1))
    final = responses[-1]
    assert (final.status, final.completed, final.failed) == (0xA702, 0, 3)
    assert sorted(final.failed_list) == sorted(archive.series[SERIES_A1])


def test_cancel_during_a_get(archive):
    getter = GetSCU(archive, delay=0.02)
    responses = getter.get(identifier("STUDY", StudyInstanceUID=STUDY_B),
                           cancel_after=lambda r: r.status == 0xFF00 and r.completed >= 10)
    final = responses[-1]
    assert final.status == 0xFE00, responses[-3:]
    assert 10 <= final.completed < B_COUNT
    assert final.remaining == B_COUNT - final.completed - final.failed - final.warning
    check_pending_counts(responses, B_COUNT)
    assert len(getter.received) == final.completed


def test_get_with_patient_root_and_pending_counts(archive):
    getter = GetSCU(archive, delay=0.6, model=PatientRootQueryRetrieveInformationModelGet)
    started = time.monotonic()
    responses = getter.get(identifier("SERIES", PatientID="PAT-RET-1", StudyInstanceUID=STUDY_D,
                                      SeriesInstanceUID=SERIES_D1))
    check_pending_counts(responses, 2)
    assert responses[-1].status == 0x0000 and responses[-1].completed == 2
    times = [started] + [r.at for r in responses]
    assert max(b - a for a, b in zip(times, times[1:])) < 1.0
    assert sorted(r.sop_instance_uid for r in getter.received) == sorted(archive.series[SERIES_D1])


def test_get_with_an_invalid_identifier(archive):
    getter = GetSCU(archive)
    responses = getter.get(identifier("SERIES", StudyInstanceUID=STUDY_A))
    assert [r.status for r in responses] == [0xA900]
    assert "Series Instance UID is required" in responses[0].comment
