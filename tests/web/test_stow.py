"""STOW-RS against a live daemon: dicomweb-client and hand-made multipart bodies, what gets
stored (index rows, blob bytes), the Store Instances Response Module, and the refusals."""

from __future__ import annotations

import io
import random
import socket
import warnings
from pathlib import Path

import httpx
import pydicom
from dicomweb_client.api import DICOMwebClient

from tests.dicomdata import dataset_offset, image, instance_rows, stored_dataset, uid

PART10 = "application/dicom"
STOW_TYPE = f'multipart/related; type="{PART10}"; boundary='
RETRIEVE_URL, FAILED, REFERENCED = "00081190", "00081198", "00081199"
SOP_CLASS, SOP_INSTANCE, FAILURE_REASON = "00081150", "00081155", "00081197"


def instance(name: str, study: str = "study-1", series: str = "series-1", number: int = 1, **kw):
    return image(uid("stow", name), uid("stow", series), uid("stow", study), instance_number=number, **kw)


def part10(ds) -> bytes:
    """`ds` as a Part 10 file with preamble and DICM, as written to disk."""
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def multipart(parts: list[bytes], boundary: str = "stow-boundary-1", headers: str | None = None) -> bytes:
    head = f"Content-Type: {PART10}\r\n" if headers is None else headers
    body = b"".join(f"--{boundary}\r\n{head}\r\n".encode() + p + b"\r\n" for p in parts)
    return body + f"--{boundary}--\r\n".encode()


def post(http: httpx.Client, body, path: str = "/studies", boundary: str = "stow-boundary-1",
         content_type: str | None = None, **kw) -> httpx.Response:
    return http.post(path, content=body, headers={
        "Content-Type": content_type or STOW_TYPE + boundary, **kw.pop("headers", {})}, **kw)


def uids_of(items: list[dict], key: str) -> list:
    return [item[key].get("Value", [None])[0] for item in items]


def spool_files(daemon) -> list[Path]:
    spool = Path(daemon.data_dir) / "spool"
    return sorted(spool.iterdir()) if spool.is_dir() else []


def assert_json_error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()["message"]
    for word in words:
        assert word in message, message


# --- storing --------------------------------------------------------------------------------


def test_store_three_instances_with_dicomweb_client(daemon):
    datasets = [instance(f"a{i}", number=i) for i in range(1, 4)]
    client = DICOMwebClient(url=daemon.dicomweb_url)
    result = client.store_instances(datasets=datasets)

    study = datasets[0].StudyInstanceUID
    assert result.RetrieveURL == f"{daemon.dicomweb_url}/studies/{study}"
    assert "FailedSOPSequence" not in result
    referenced = {item.ReferencedSOPInstanceUID: item for item in result.ReferencedSOPSequence}
    assert set(referenced) == {ds.SOPInstanceUID for ds in datasets}
    for ds in datasets:
        item = referenced[ds.SOPInstanceUID]
        assert item.ReferencedSOPClassUID == ds.SOPClassUID
        assert item.RetrieveURL == (f"{daemon.dicomweb_url}/studies/{study}/series/"
                                    f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}")

    rows = {row["sop_instance_uid"]: row for row in instance_rows(daemon.data_dir / "index.db")}
    assert set(rows) == set(referenced)
    for ds in datasets:
        sent = part10(ds)
        assert stored_dataset(daemon.data_dir, rows[ds.SOPInstanceUID]) == sent[dataset_offset(sent):]
    assert spool_files(daemon) == []


def test_blob_is_a_part10_file_with_pacsds_file_meta(daemon, http):
    # dicomweb-client writes a data set without preamble and "DICM" (pydicom does for one
    # that has none); the blob is a proper Part 10 file all the same, and a preamble a
    # client sent is not kept.
    ds = instance("meta")
    sent = bytearray(part10(ds))
    sent[:128] = b"MZ" + b"\xff" * 126  # something executable-looking in the preamble
    response = post(http, multipart([bytes(sent)]))
    assert response.status_code == 200, response.text
    [row] = instance_rows(daemon.data_dir / "index.db")
    blob = (Path(daemon.data_dir) / "blobs" / f"{row['blob_key']}.dcm").read_bytes()
    assert blob[:132] == b"\0" * 128 + b"DICM"
    stored = pydicom.dcmread(io.BytesIO(blob))
    assert stored.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert stored.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert stored.file_meta.ImplementationVersionName.startswith("PACSD")
    assert stored.PixelData == ds.PixelData
    assert row["calling_ae"] == "STOW-RS"


def test_chunked_request_with_quoted_boundary_and_extra_parameters(daemon, http):
    datasets = [instance(f"c{i}", number=i) for i in range(1, 3)]
    boundary = "quoted boundary=with?specials"
    # the JavaScript client's shape: a leading CRLF, no CRLF after the close delimiter
    body = b"\r\n" + multipart([part10(ds) for ds in datasets], boundary)[:-2]

    def chunks():
        for start in range(0, len(body), 1000):
            yield body[start:start + 1000]

    response = http.post("/studies", content=chunks(), headers={
        "Content-Type": f'multipart/related; type="{PART10}"; boundary="{boundary}"; '
                        f"transfer-syntax=1.2.840.10008.1.2.1"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom+json"
    assert sorted(uids_of(response.json()[REFERENCED]["Value"], SOP_INSTANCE)) == sorted(
        ds.SOPInstanceUID for ds in datasets)
    assert len(instance_rows(daemon.data_dir / "index.db")) == 2


def test_large_instance_streams_through(daemon, http):
    # 1024 x 1024 x 16 bits x 4 frames: 8 MiB, many chunks and several spool writes
    ds = instance("big", rows=1024, columns=1024, NumberOfFrames=4)
    ds.PixelData = bytes(range(256)) * (1024 * 1024 * 2 * 4 // 256)
    sent = part10(ds)
    response = post(http, multipart([sent]))
    assert response.status_code == 200, response.text
    [row] = instance_rows(daemon.data_dir / "index.db")
    assert stored_dataset(daemon.data_dir, row) == sent[dataset_offset(sent):]


# --- partial and complete failure -----------------------------------------------------------


def test_some_parts_invalid_gives_202_with_failed_sop_sequence(daemon, http):
    good = [instance("g1", number=1), instance("g2", number=2)]
    bad_uid = instance("bad-uid", number=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the UID this test wants
        bad_uid.StudyInstanceUID = "1.2.3.abc"
    parts = [part10(good[0]), b"this is not DICOM at all" * 10, part10(bad_uid), part10(good[1])]
    response = post(http, multipart(parts))
    assert response.status_code == 202, response.text
    body = response.json()
    assert uids_of(body[REFERENCED]["Value"], SOP_INSTANCE) == [ds.SOPInstanceUID for ds in good]
    failed = body[FAILED]["Value"]
    assert uids_of(failed, SOP_INSTANCE) == [None, bad_uid.SOPInstanceUID]
    assert uids_of(failed, SOP_CLASS) == [None, bad_uid.SOPClassUID]
    assert uids_of(failed, FAILURE_REASON) == [0xC000, 0xC000]
    assert body[RETRIEVE_URL]["Value"] == [f"{daemon.dicomweb_url}/studies/{good[0].StudyInstanceUID}"]
    fields = response.headers.get_list("warning")
    assert len(fields) == 2 and "part 2" in fields[0] and "part 3" in fields[1]
    rows = instance_rows(daemon.data_dir / "index.db")
    assert sorted(r["sop_instance_uid"] for r in rows) == sorted(ds.SOPInstanceUID for ds in good)
    assert spool_files(daemon) == []


def test_dataset_that_does_not_match_its_file_meta_fails_a900(daemon, http):
    ds = instance("mismatch")
    data = bytearray(part10(ds))
    ds2 = instance("mismatch-other")
    other = part10(ds2)
    # file meta of the first, data set of the second
    mixed = bytes(data[:dataset_offset(bytes(data))]) + other[dataset_offset(other):]
    response = post(http, multipart([mixed]))
    assert response.status_code == 409, response.text
    [item] = response.json()[FAILED]["Value"]
    assert item[SOP_INSTANCE]["Value"] == [ds.SOPInstanceUID]
    assert item[FAILURE_REASON]["Value"] == [0xA900]


def test_all_parts_invalid_gives_409_and_stores_nothing(daemon, http):
    truncated = part10(instance("t1"))[:-100]
    response = post(http, multipart([b"garbage", truncated, b""]))
    assert response.status_code == 409, response.text
    body = response.json()
    assert REFERENCED not in body
    assert body[RETRIEVE_URL] == {"vr": "UR"}  # type 2: present, empty
    assert uids_of(body[FAILED]["Value"], FAILURE_REASON) == [0xC000] * 3
    assert uids_of(body[FAILED]["Value"], SOP_INSTANCE)[1] == uid("stow", "t1")
    assert instance_rows(daemon.data_dir / "index.db") == []
    assert spool_files(daemon) == []


def test_part_of_another_media_type_fails(daemon, http):
    ds = instance("typed")
    body = (multipart([part10(ds)], "b1")[: -len("--b1--\r\n")]
            + b'--b1\r\nContent-Type: application/dicom+json\r\n\r\n[{"00080018": {}}]\r\n--b1--')
    response = post(http, body, boundary="b1")
    assert response.status_code == 202, response.text
    assert uids_of(response.json()[FAILED]["Value"], FAILURE_REASON) == [0xC000]
    assert "only application/dicom parts" in response.headers["warning"]


def test_instance_of_another_study_fails_on_the_study_resource(daemon, http):
    mine = instance("s1", study="study-A")
    theirs = instance("s2", study="study-B", series="series-B")
    study = mine.StudyInstanceUID
    response = post(http, multipart([part10(mine), part10(theirs)]), path=f"/studies/{study}")
    assert response.status_code == 202, response.text
    body = response.json()
    assert body[RETRIEVE_URL]["Value"] == [f"{daemon.dicomweb_url}/studies/{study}"]
    assert uids_of(body[REFERENCED]["Value"], SOP_INSTANCE) == [mine.SOPInstanceUID]
    [failed] = body[FAILED]["Value"]
    assert failed[SOP_INSTANCE]["Value"] == [theirs.SOPInstanceUID]
    assert failed[FAILURE_REASON]["Value"] == [0x0110]
    assert [r["sop_instance_uid"] for r in instance_rows(daemon.data_dir / "index.db")] == [mine.SOPInstanceUID]

    only_theirs = post(http, multipart([part10(theirs)]), path=f"/studies/{study}")
    assert only_theirs.status_code == 409


def test_study_resource_with_a_malformed_uid_is_400(daemon, http):
    response = post(http, multipart([part10(instance("x"))]), path="/studies/1.2.x")
    assert_json_error(response, 400, "StudyInstanceUID")


def test_duplicates_follow_the_storage_policy(start_daemon):
    daemon = start_daemon(STORAGE__DUPLICATES="reject")
    ds = instance("dup")
    with httpx.Client(base_url=daemon.dicomweb_url, timeout=60) as http:
        assert post(http, multipart([part10(ds)])).status_code == 200
        again = post(http, multipart([part10(ds)]))
    assert again.status_code == 409
    assert uids_of(again.json()[FAILED]["Value"], FAILURE_REASON) == [0x0111]
    assert len(instance_rows(daemon.data_dir / "index.db")) == 1


# --- requests refused as a whole ------------------------------------------------------------


def test_malformed_requests_get_json_errors_and_store_nothing(daemon, http):
    good = multipart([part10(instance("m1"))])
    assert_json_error(post(http, good[:-20]), 400, "truncated")
    assert_json_error(post(http, good, content_type=f'multipart/related; type="{PART10}"'), 400, "boundary")
    assert_json_error(post(http, b""), 400)
    assert_json_error(post(http, b"--stow-boundary-1--\r\n"), 400, "no parts")
    assert_json_error(post(http, good, boundary="not-the-one"), 400)
    assert_json_error(post(http, part10(instance("m1")), content_type=PART10), 415, "multipart/related")
    assert_json_error(post(http, good, content_type="multipart/related; type=\"application/dicom+json\"; "
                                                   "boundary=stow-boundary-1"),
                      415, "only application/dicom parts")
    assert_json_error(http.post("/studies", content=good), 415)
    assert_json_error(post(http, good, headers={"Accept": "application/dicom+xml"}), 406, "application/dicom+json")
    assert instance_rows(daemon.data_dir / "index.db") == []
    assert spool_files(daemon) == []
    # the same body, well formed, is stored afterwards
    assert post(http, good).status_code == 200


def test_request_over_the_size_limit_is_413_and_stores_nothing(start_daemon):
    daemon = start_daemon(HTTP__STOW_MAX_BYTES="100000")
    datasets = [instance(f"l{i}", number=i, rows=128, columns=128) for i in range(1, 6)]  # ~33 KiB each
    body = multipart([part10(ds) for ds in datasets])
    assert len(body) > 100_000
    with httpx.Client(base_url=daemon.dicomweb_url, timeout=60) as http:
        assert_json_error(post(http, body), 413, "stow_max_bytes")

        def chunks():
            for start in range(0, len(body), 8192):
                yield body[start:start + 8192]

        assert_json_error(post(http, chunks()), 413, "stow_max_bytes")
        assert instance_rows(daemon.data_dir / "index.db") == []
        assert spool_files(daemon) == []
        small = post(http, multipart([part10(ds) for ds in datasets[:2]]))
        assert small.status_code == 200, small.text
    assert len(instance_rows(daemon.data_dir / "index.db")) == 2


def test_daemon_survives_garbage_and_a_client_that_goes_away(daemon, http):
    noise = random.Random(7).randbytes(200_000)
    assert post(http, noise).status_code == 400
    assert post(http, b"--stow-boundary-1\r\n" + noise + b"\r\n--stow-boundary-1--").status_code == 400
    assert post(http, b"--stow-boundary-1\r\n\r\n" + noise + b"\r\n--stow-boundary-1--").status_code == 409
    # a client that announces a body and leaves half-way
    with socket.create_connection(("127.0.0.1", daemon.http_port)) as sock:
        head = (f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Type: {STOW_TYPE}b\r\n"
                f"Content-Length: 1000000\r\n\r\n").encode()
        sock.sendall(head + b"--b\r\n\r\n" + part10(instance("gone"))[:5000])
    ok = post(http, multipart([part10(instance("after"))]))
    assert ok.status_code == 200, ok.text
    assert daemon.alive
    assert [r["sop_instance_uid"] for r in instance_rows(daemon.data_dir / "index.db")] == [uid("stow", "after")]
    daemon.wait_for_event("stow.disconnected")
    assert spool_files(daemon) == []
