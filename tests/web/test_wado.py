"""WADO-RS against a live daemon: Retrieve Study/Series/Instance, Metadata and Bulkdata
(PS3.18 10.4), with dicomweb-client (the maintained Python DICOMweb client) and plain httpx.

One study of two series is stored over DICOM: three Explicit VR LE CTs (one carrying a large
private OB value and an Icon Image Sequence, so that BulkDataURIs also name values that are
not the top-level Pixel Data), an Implicit VR LE MR and a JPEG Baseline secondary capture
(pydicom's test file with new UIDs).
"""

from __future__ import annotations

import email.utils
import gzip
import json
import random
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from tests.conftest import dcmtk, free_port, launch_daemon, store_files, wait_for_port
from tests.dicomdata import (
    EXPLICIT_LE,
    IMPLICIT_LE,
    blob_path,
    dataset_bytes,
    dataset_offset,
    image,
    query,
    uid,
    write_part10,
)

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
STUDY = uid("wado", "study")
SERIES_1 = uid("wado", "series", 1)
SERIES_2 = uid("wado", "series", 2)
OTHER_STUDY = uid("wado", "other-study")
PRIVATE_OB = random.Random(1).randbytes(20_000)  # above the index's inline limit
ICON_PIXELS = random.Random(2).randbytes(64 * 64 * 2)


@dataclass
class Archive:
    daemon: object
    dest_port: int
    files: Path
    datasets: dict[str, Dataset] = field(default_factory=dict)  # SOP Instance UID -> as sent
    series: dict[str, list[str]] = field(default_factory=dict)
    jpeg: str = ""
    implicit: str = ""
    rich: str = ""  # the CT with the private OB and the icon

    @property
    def url(self) -> str:
        return self.daemon.dicomweb_url

    def row(self, sop: str) -> dict:
        (row,) = query(self.daemon.data_dir / "index.db",
                       "SELECT * FROM instances WHERE sop_instance_uid = ?", sop)
        return row

    def blob(self, sop: str) -> bytes:
        return blob_path(self.daemon.data_dir, self.row(sop)["blob_key"]).read_bytes()

    def all(self) -> list[str]:
        return [sop for sops in self.series.values() for sop in sops]


def _study_files(directory: Path) -> Archive:
    archive = Archive(None, 0, directory)

    def add(series: str, ds: Dataset) -> None:
        write_part10(directory / f"{len(archive.datasets):03d}.dcm", ds)
        archive.datasets[ds.SOPInstanceUID] = ds
        archive.series.setdefault(series, []).append(ds.SOPInstanceUID)

    for n in range(3):
        sop = uid("wado", "ct", n)
        ds = image(sop, SERIES_1, STUDY, patient_id="PAT-WADO", instance_number=n + 1,
                   PixelSpacing=[0.5, 0.5], WindowCenter=40, WindowWidth=400, RescaleIntercept=-1024,
                   RescaleSlope=1)
        if n == 1:
            block = ds.private_block(0x0009, "PACSD TEST", create=True)
            block.add_new(0x10, "OB", PRIVATE_OB)
            icon = Dataset()
            icon.Rows = icon.Columns = 64
            icon.SamplesPerPixel = 1
            icon.PhotometricInterpretation = "MONOCHROME2"
            icon.BitsAllocated, icon.BitsStored, icon.HighBit, icon.PixelRepresentation = 16, 16, 15, 0
            icon.PixelData = ICON_PIXELS
            ds.IconImageSequence = [icon]
            archive.rich = sop
        add(SERIES_1, ds)
    sop = uid("wado", "mr")
    add(SERIES_2, image(sop, SERIES_2, STUDY, modality="MR", patient_id="PAT-WADO", series_number=2,
                        instance_number=1, transfer_syntax=IMPLICIT_LE))
    archive.implicit = sop
    jpeg = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    assert jpeg.file_meta.TransferSyntaxUID == JPEG_BASELINE
    archive.jpeg = jpeg.SOPInstanceUID = jpeg.file_meta.MediaStorageSOPInstanceUID = uid("wado", "jpeg")
    jpeg.StudyInstanceUID, jpeg.SeriesInstanceUID = STUDY, SERIES_2
    jpeg.PatientID, jpeg.InstanceNumber, jpeg.SeriesNumber = "PAT-WADO", 2, 2
    add(SERIES_2, jpeg)
    return archive


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Archive:
    base = tmp_path_factory.mktemp("wado")
    dest_port = free_port()
    peers = [{"ae_title": "WADODEST", "host": "127.0.0.1", "port": dest_port}]
    daemon = launch_daemon(base, "pacsd", PEERS=json.dumps(peers))
    try:
        files = base / "files"
        files.mkdir()
        archive = _study_files(files)
        archive.daemon, archive.dest_port = daemon, dest_port
        store_files(daemon, sorted(files.iterdir()))
        yield archive
    finally:
        daemon.stop()


@pytest.fixture
def client(archive) -> DICOMwebClient:
    return DICOMwebClient(url=archive.url)


@pytest.fixture
def http(archive):
    with httpx.Client(base_url=archive.url, timeout=60) as c:
        yield c


# --- a multipart/related reader written for these tests (RFC 2046 5.1.1) ----------------------


@dataclass
class Part:
    headers: dict[str, str]
    body: bytes


def parts_of(response: httpx.Response) -> list[Part]:
    content_type = response.headers["content-type"]
    assert content_type.startswith("multipart/related"), content_type
    boundary = re.search(r'boundary="?([^";]+)"?', content_type).group(1).encode()
    body = response.content
    assert body.startswith(b"--" + boundary + b"\r\n"), body[:100]
    assert body.rstrip(b"\r\n").endswith(b"\r\n--" + boundary + b"--")
    out = []
    for chunk in body.split(b"\r\n--" + boundary)[:-1]:
        if chunk.startswith(b"--" + boundary):
            chunk = chunk[len(boundary) + 2:]
        head, _, content = chunk[2:].partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode("ascii").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        out.append(Part(headers, content))
    return out


def ts_of(part: Part) -> str:
    return re.search(r"transfer-syntax=([0-9.]+)", part.headers["content-type"]).group(1)


def sop_of(part10: bytes) -> str:
    return str(pydicom.dcmread(pydicom.filebase.DicomBytesIO(part10)).SOPInstanceUID)


def instance_path(st: str, se: str, sop: str) -> str:
    return f"/studies/{st}/series/{se}/instances/{sop}"


# --- Retrieve Study / Series / Instance ---------------------------------------------------------


def test_study_parts_are_the_stored_files_with_their_transfer_syntax(archive, http):
    response = http.get(f"/studies/{STUDY}")
    assert response.status_code == 200
    assert 'type="application/dicom"' in response.headers["content-type"]
    assert int(response.headers["content-length"]) == len(response.content)
    parts = parts_of(response)
    assert len(parts) == len(archive.all())
    for part in parts:
        sop = sop_of(part.body)
        assert part.body == archive.blob(sop)
        assert part.headers["content-type"].startswith("application/dicom;")
        assert ts_of(part) == archive.row(sop)["transfer_syntax_uid"]
    syntaxes = {ts_of(p) for p in parts}
    assert syntaxes == {EXPLICIT_LE, IMPLICIT_LE, JPEG_BASELINE}


@pytest.mark.parametrize("accept", [
    None, "*/*", "multipart/related", 'multipart/related; type="application/dicom"',
    "multipart/related; type=application/dicom; transfer-syntax=*",
    'multipart/related; type="application/dicom"; transfer-syntax="*"',
])
def test_accept_forms_that_mean_the_stored_syntax(archive, http, accept):
    headers = {"accept": accept} if accept else {}
    if accept is None:
        # httpx sends */* unless told otherwise: a request without the header at all
        response = httpx.get(archive.url + f"/studies/{STUDY}/series/{SERIES_2}",
                             headers=httpx.Headers({"accept": ""}))
    else:
        response = http.get(f"/studies/{STUDY}/series/{SERIES_2}", headers=headers)
    assert response.status_code == 200, response.text
    assert sorted(sop_of(p.body) for p in parts_of(response)) == sorted(archive.series[SERIES_2])


def test_naming_the_stored_syntax_is_satisfiable(archive, http):
    accept = f'multipart/related; type="application/dicom"; transfer-syntax={IMPLICIT_LE}'
    path = instance_path(STUDY, SERIES_2, archive.implicit)
    response = http.get(path, headers={"accept": accept})
    assert response.status_code == 200
    (part,) = parts_of(response)
    assert part.body == archive.blob(archive.implicit)


def test_dicomweb_client_retrieves_study_series_and_instance(archive, client):
    study = client.retrieve_study(STUDY)
    assert sorted(ds.SOPInstanceUID for ds in study) == sorted(archive.all())
    series = client.retrieve_series(STUDY, SERIES_1)
    assert [ds.SOPInstanceUID for ds in series] == archive.series[SERIES_1]  # instance order
    for ds in study:
        sent = archive.datasets[ds.SOPInstanceUID]
        assert ds.PixelData == sent.PixelData
        assert ds.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
    one = client.retrieve_instance(STUDY, SERIES_2, archive.jpeg)
    assert one.PixelData == archive.datasets[archive.jpeg].PixelData
    assert one.file_meta.TransferSyntaxUID == JPEG_BASELINE


def test_single_part_instance(archive, http):
    response = http.get(instance_path(STUDY, SERIES_1, archive.rich), headers={"accept": "application/dicom"})
    assert response.status_code == 200
    assert response.headers["content-type"] == f"application/dicom; transfer-syntax={EXPLICIT_LE}"
    assert response.content == archive.blob(archive.rich)


def test_instance_as_octet_stream_is_its_pixel_data(archive, http):
    sop = archive.series[SERIES_1][0]
    response = http.get(instance_path(STUDY, SERIES_1, sop),
                        headers={"accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'})
    assert response.status_code == 200
    (part,) = parts_of(response)
    assert part.body == archive.datasets[sop].PixelData
    assert part.headers["content-type"] == f"application/octet-stream; transfer-syntax={EXPLICIT_LE}"


@pytest.mark.parametrize("path, accept, words", [
    (f"/studies/{STUDY}", f'multipart/related; type="application/dicom"; transfer-syntax={EXPLICIT_LE}',
     [IMPLICIT_LE, JPEG_BASELINE, EXPLICIT_LE]),
    (f"/studies/{STUDY}/series/{SERIES_2}",
     'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.90',
     ["1.2.840.10008.1.2.4.90", IMPLICIT_LE, JPEG_BASELINE]),
    (f"/studies/{STUDY}", "image/png", ["image/png"]),
    (f"/studies/{STUDY}", "application/dicom+json", ["application/dicom+json"]),
    (f"/studies/{STUDY}", "application/dicom", ["application/dicom"]),  # single part: not for a study
    (f"/studies/{STUDY}", 'multipart/related; type="application/octet-stream"', ["octet-stream"]),
    (f"/studies/{STUDY}/metadata", "application/dicom", ["application/dicom+json"]),
])
def test_not_acceptable(archive, http, path, accept, words):
    response = http.get(path, headers={"accept": accept})
    assert response.status_code == 406, response.text
    message = response.json()["message"]
    for word in words:
        assert word in message


def test_jpeg_instance_with_an_uncompressed_syntax_asked_is_406(archive, http):
    response = http.get(instance_path(STUDY, SERIES_2, archive.jpeg),
                        headers={"accept": f'multipart/related; type="application/dicom"; transfer-syntax={EXPLICIT_LE}'})
    assert response.status_code == 406
    assert JPEG_BASELINE in response.json()["message"] and EXPLICIT_LE in response.json()["message"]


@pytest.mark.parametrize("path, status, says", [
    *((path, 404, "no ") for path in (
        f"/studies/{OTHER_STUDY}",
        f"/studies/{STUDY}/series/{uid('wado', 'no-such-series')}",
        f"/studies/{STUDY}/series/{SERIES_1}/instances/1.2.3.4",
        f"/studies/{STUDY}/series/{SERIES_2}/instances/{uid('wado', 'ct', 0)}",  # in the other series
        f"/studies/{OTHER_STUDY}/metadata",
        f"/studies/{STUDY}/series/{SERIES_1}/instances/1.2.3.4/metadata",
        f"/studies/{STUDY}/series/{SERIES_1}/instances/1.2.3.4/bulkdata/7FE00010",
    )),
    *((path, 400, "not a valid UID") for path in (
        "/studies/1.2.abc",
        f"/studies/{STUDY}/series/1.2.x",
        f"/studies/{STUDY}/series/{SERIES_1}/instances/{'1' * 65}",
        "/studies/1..2/metadata",
    )),
])
def test_unknown_resources_are_404_and_malformed_uids_400(archive, http, path, status, says):
    response = http.get(path)
    assert response.status_code == status
    assert says in response.json()["message"]


# --- Metadata ---------------------------------------------------------------------------------


def by_sop(metadata: list[dict]) -> dict[str, dict]:
    return {m["00080018"]["Value"][0]: m for m in metadata}


def test_study_metadata_has_every_instance_with_image_attributes(archive, client):
    metadata = by_sop(client.retrieve_study_metadata(STUDY))
    assert set(metadata) == set(archive.all())
    for sop, m in metadata.items():
        sent = archive.datasets[sop]
        assert m["00020010"] == {"vr": "UI", "Value": [str(sent.file_meta.TransferSyntaxUID)]}
        assert m["0020000D"]["Value"] == [STUDY]
        assert m["00100020"]["Value"] == ["PAT-WADO"]
        assert m["00280010"]["Value"] == [sent.Rows] and m["00280011"]["Value"] == [sent.Columns]
        assert m["00280100"]["Value"] == [sent.BitsAllocated]
        assert "BulkDataURI" in m["7FE00010"] and "Value" not in m["7FE00010"]
        assert list(m) == sorted(m)
    ct = metadata[archive.series[SERIES_1][0]]
    assert ct["00280030"]["Value"] == [0.5, 0.5]
    assert ct["00281050"]["Value"] == [40] and ct["00281053"]["Value"] == [1]
    assert ct["7FE00010"]["vr"] == "OW"
    assert metadata[archive.jpeg]["7FE00010"]["vr"] == "OB"
    assert metadata[archive.jpeg]["00280002"]["Value"] == [3]


def test_series_and_instance_metadata(archive, client):
    series = client.retrieve_series_metadata(STUDY, SERIES_2)
    assert sorted(m["00080018"]["Value"][0] for m in series) == sorted(archive.series[SERIES_2])
    one = client.retrieve_instance_metadata(STUDY, SERIES_2, archive.implicit)
    assert one["00080060"]["Value"] == ["MR"]
    assert one["00020010"]["Value"] == [IMPLICIT_LE]


def test_bulk_data_uris_resolve_to_the_values(archive, client):
    m = client.retrieve_instance_metadata(STUDY, SERIES_1, archive.rich)
    private = m["00091010"]
    assert private["vr"] == "OB" and "InlineBinary" not in private
    assert private["BulkDataURI"].startswith(archive.url + "/studies/")
    assert client.retrieve_bulkdata(private["BulkDataURI"]) == [PRIVATE_OB]
    icon = m["00880200"]["Value"][0]
    assert icon["00280010"]["Value"] == [64]
    assert icon["7FE00010"]["BulkDataURI"].endswith("/bulkdata/00880200/0/7FE00010")
    assert client.retrieve_bulkdata(icon["7FE00010"]["BulkDataURI"]) == [ICON_PIXELS]
    assert client.retrieve_bulkdata(m["7FE00010"]["BulkDataURI"]) == [archive.datasets[archive.rich].PixelData]
    implicit = client.retrieve_instance_metadata(STUDY, SERIES_2, archive.implicit)
    assert client.retrieve_bulkdata(implicit["7FE00010"]["BulkDataURI"]) == \
        [archive.datasets[archive.implicit].PixelData]


def test_encapsulated_pixel_data_comes_as_its_fragments(archive, client, http):
    m = client.retrieve_instance_metadata(STUDY, SERIES_2, archive.jpeg)
    uri = m["7FE00010"]["BulkDataURI"]
    fragments = list(generate_fragments(archive.datasets[archive.jpeg].PixelData))
    assert client.retrieve_bulkdata(uri) == [b"".join(fragments[1:])]
    response = http.get(uri, headers={"accept": 'multipart/related; type="application/octet-stream"'})
    (part,) = parts_of(response)
    assert part.headers["content-type"] == f"application/octet-stream; transfer-syntax={JPEG_BASELINE}"
    assert part.body.startswith(b"\xff\xd8")  # a JPEG bitstream
    response = http.get(uri, headers={"accept": "image/jpeg"})
    assert response.headers["content-type"] == f"image/jpeg; transfer-syntax={JPEG_BASELINE}"
    assert response.content == part.body
    response = http.get(uri, headers={"accept": f'multipart/related; type="application/octet-stream"; '
                                                f'transfer-syntax={EXPLICIT_LE}'})
    assert response.status_code == 406
    assert JPEG_BASELINE in response.json()["message"]


def test_bulkdata_paths(archive, http):
    base = instance_path(STUDY, SERIES_1, archive.rich) + "/bulkdata/"
    assert http.get(base + "00091011").status_code == 404  # no such element
    assert http.get(base + "00880200/1/7FE00010").status_code == 404  # no such item
    for bad in ("7FE0001", "7FE00010/0", "00880200/x/7FE00010", "GGGG0010"):
        response = http.get(base + bad)
        assert response.status_code == 400, bad
        assert "bulk data path" in response.json()["message"]
    # a small element is bulk data too when asked for by its path
    response = http.get(base + "00280010", headers={"accept": "application/octet-stream"})
    assert response.status_code == 200 and response.content == (64).to_bytes(2, "little")


def test_metadata_is_gzipped_when_the_client_accepts_it(archive, http):
    plain = http.get(f"/studies/{STUDY}/metadata", headers={"accept-encoding": "identity"})
    assert "content-encoding" not in plain.headers
    raw = httpx.get(archive.url + f"/studies/{STUDY}/metadata", headers={"accept-encoding": "gzip"})
    with httpx.stream("GET", archive.url + f"/studies/{STUDY}/metadata",
                      headers={"accept-encoding": "gzip"}) as response:
        assert response.headers["content-encoding"] == "gzip"
        compressed = b"".join(response.iter_raw())
    assert len(compressed) < len(plain.content)
    assert json.loads(gzip.decompress(compressed)) == plain.json() == raw.json()
    assert plain.headers["content-type"] == "application/dicom+json"


def test_metadata_bulk_uris_follow_public_url(tmp_path):
    daemon = launch_daemon(tmp_path, "public", HTTP__PUBLIC_URL="https://pacs.example.org/")
    try:
        sop = uid("wado", "public")
        path = tmp_path / "one.dcm"
        write_part10(path, image(sop, SERIES_1, STUDY))
        store_files(daemon, [path])
        (m,) = httpx.get(daemon.dicomweb_url + f"/studies/{STUDY}/metadata").json()
        assert m["7FE00010"]["BulkDataURI"] == (
            f"https://pacs.example.org/dicom-web/studies/{STUDY}/series/{SERIES_1}/instances/{sop}"
            f"/bulkdata/7FE00010")
    finally:
        daemon.stop()


# --- validators -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["study", "series", "instance", "metadata", "bulkdata"])
def test_etag_last_modified_and_304(archive, http, path):
    sop = archive.series[SERIES_1][0]
    url = {"study": f"/studies/{STUDY}", "series": f"/studies/{STUDY}/series/{SERIES_1}",
           "instance": instance_path(STUDY, SERIES_1, sop),
           "metadata": f"/studies/{STUDY}/series/{SERIES_1}/metadata",
           "bulkdata": instance_path(STUDY, SERIES_1, sop) + "/bulkdata/7FE00010"}[path]
    first = http.get(url)
    assert first.status_code == 200
    etag, last_modified = first.headers["etag"], first.headers["last-modified"]
    assert email.utils.parsedate_to_datetime(last_modified).year >= 2024
    again = http.get(url, headers={"if-none-match": etag})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == etag
    assert http.get(url, headers={"if-none-match": '"something-else"'}).status_code == 200
    assert http.get(url, headers={"if-modified-since": last_modified}).status_code == 304
    assert http.get(url, headers={"if-modified-since": "Mon, 01 Jan 2001 00:00:00 GMT"}).status_code == 200
    if path == "instance":
        assert etag == f'"{archive.row(sop)["sha256"]}"'


def test_study_etag_changes_when_an_instance_arrives(tmp_path):
    daemon = launch_daemon(tmp_path, "grow")
    try:
        study, series = STUDY, SERIES_1
        first = tmp_path / "a.dcm"
        write_part10(first, image(uid("wado", "grow", 1), series, study))
        store_files(daemon, [first])
        url = daemon.dicomweb_url + f"/studies/{study}"
        before = httpx.get(url).headers["etag"]
        assert httpx.get(url, headers={"if-none-match": before}).status_code == 304
        second = tmp_path / "b.dcm"
        write_part10(second, image(uid("wado", "grow", 2), series, study, instance_number=2))
        store_files(daemon, [second])
        response = httpx.get(url, headers={"if-none-match": before})
        assert response.status_code == 200
        assert response.headers["etag"] != before
        assert len(parts_of(response)) == 2
    finally:
        daemon.stop()


# --- one study through DIMSE and DICOMweb ---------------------------------------------------------


def test_c_find_c_move_qido_and_wado_see_the_same_study(archive, client, http, tmp_path):
    # C-FIND: the study is there with all its instances
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", archive.daemon.port, ae_title="PACSD")
    assert assoc.is_established
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = STUDY
    ident.NumberOfStudyRelatedInstances = ""
    found = [ds for status, ds in assoc.send_c_find(ident, StudyRootQueryRetrieveInformationModelFind)
             if status and status.Status in (0xFF00, 0xFF01)]
    assoc.release()
    assert [(ds.StudyInstanceUID, int(ds.NumberOfStudyRelatedInstances)) for ds in found] == \
        [(STUDY, len(archive.all()))]
    # QIDO-RS: the same study, the same count
    (qido,) = client.search_for_studies(search_filters={"StudyInstanceUID": STUDY})
    assert qido["00201208"]["Value"] == [len(archive.all())]

    # C-MOVE to DCMTK storescp (bit-preserving, every syntax) vs. WADO-RS parts
    received = tmp_path / "storescp"
    received.mkdir()
    scp = subprocess.Popen([dcmtk("storescp"), "-aet", "WADODEST", "+B", "+xa", "-od", str(received),
                            str(archive.dest_port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_port(archive.dest_port, scp)
        result = subprocess.run([dcmtk("movescu"), "-S", "-aet", "MOVESCU", "-aec", "PACSD", "-aem", "WADODEST",
                                 "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={STUDY}",
                                 "127.0.0.1", str(archive.daemon.port)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        scp.terminate()
        scp.wait(10)
    by_move = {}
    for path in received.iterdir():
        meta = pydicom.filereader.read_file_meta_info(path)
        by_move[str(meta.MediaStorageSOPInstanceUID)] = (str(meta.TransferSyntaxUID), dataset_bytes(path))
    by_wado = {}
    for part in parts_of(http.get(f"/studies/{STUDY}")):
        by_wado[sop_of(part.body)] = (ts_of(part), part.body[dataset_offset(part.body):])
    assert set(by_move) == set(archive.all())
    assert by_move == by_wado
