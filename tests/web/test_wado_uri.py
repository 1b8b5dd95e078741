"""WADO-URI (/wado?requestType=WADO&...) against a live daemon: the stored Part 10 file,
rendered JPEG/PNG with the chapter 9 parameters, defaults per object type, and errors."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image

from tests.dicomdata import blob_path, instance_rows, uid
from tests.web.webdata import daemon_holding, multiframe, ramp


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    study, series = uid("wu-study"), uid("wu-series")
    made = {"ramp": ramp(uid("wu-ramp"), series, study, WindowCenter=2048, WindowWidth=4096),
            "multi": multiframe(study, series, 3)}
    with daemon_holding(tmp_path_factory.mktemp("wado-uri"), made, ("SC_rgb_jpeg_dcmtk.dcm", "reportsi.dcm"),
                        study, series) as (daemon, copies):
        yield daemon, study, series, {**made, **copies}


def wado(archive, name: str | None = None, **params) -> httpx.Response:
    daemon, study, series, made = archive
    query = {"requestType": "WADO", "studyUID": study, "seriesUID": series}
    if name:
        query["objectUID"] = made[name].SOPInstanceUID
    query.update(params)
    query = {k: v for k, v in query.items() if v is not None}
    return httpx.get(f"{daemon.http_url}/wado", params=query, timeout=60)


def picture(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)))


def stored_file(archive, name: str) -> bytes:
    daemon, made = archive[0], archive[3]
    [row] = [r for r in instance_rows(daemon.data_dir / "index.db")
             if r["sop_instance_uid"] == made[name].SOPInstanceUID]
    return blob_path(daemon.data_dir, row["blob_key"]).read_bytes()


def test_application_dicom_is_the_stored_file(archive):
    for name in ("ramp", "SC_rgb_jpeg_dcmtk.dcm"):
        response = wado(archive, name, contentType="application/dicom")
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/dicom"
        assert response.content == stored_file(archive, name)
        assert int(response.headers["content-length"]) == len(response.content)
        ds = pydicom.dcmread(io.BytesIO(response.content))
        assert ds.SOPInstanceUID == archive[3][name].SOPInstanceUID


def test_transfer_syntax_as_stored_or_406(archive):
    jpeg = archive[3]["SC_rgb_jpeg_dcmtk.dcm"]
    # what OHIF's wadouri loader sends
    response = wado(archive, "SC_rgb_jpeg_dcmtk.dcm", contentType="application/dicom", transferSyntax="*")
    assert response.status_code == 200
    response = wado(archive, "SC_rgb_jpeg_dcmtk.dcm", contentType="application/dicom",
                    transferSyntax=jpeg.file_meta.TransferSyntaxUID)
    assert response.status_code == 200
    response = wado(archive, "SC_rgb_jpeg_dcmtk.dcm", contentType="application/dicom",
                    transferSyntax="1.2.840.10008.1.2.1")
    assert response.status_code == 406
    assert "does not transcode" in response.json()["message"]
    response = wado(archive, "ramp", contentType="application/dicom", transferSyntax="not-a-uid")
    assert response.status_code == 400


def test_defaults_by_object_type(archive):
    # single-frame image: image/jpeg
    response = wado(archive, "ramp")
    assert response.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(response.content)).size == (64, 48)
    # multi-frame without frameNumber, and non-image objects: the DICOM object
    assert wado(archive, "multi").headers["content-type"] == "application/dicom"
    assert wado(archive, "reportsi.dcm").headers["content-type"] == "application/dicom"
    # a frame of a multi-frame object is a single-frame image again
    response = wado(archive, "multi", frameNumber="2")
    assert response.headers["content-type"] == "image/jpeg"


def test_rendered_parameters(archive):
    png = {"contentType": "image/png"}
    # narrow window: the step lies between columns 15 (960) and 16 (1024)
    shown = picture(wado(archive, "ramp", windowCenter="1000", windowWidth="10", **png))
    assert (shown[:, :16] == 0).all() and (shown[:, 16:] == 255).all()
    # rows/columns: fit, keeping the aspect ratio
    assert picture(wado(archive, "ramp", rows="24", **png)).shape == (24, 32)
    assert picture(wado(archive, "ramp", columns="128", **png)).shape == (96, 128)
    assert picture(wado(archive, "ramp", rows="30", columns="32", **png)).shape == (24, 32)
    # region: the left quarter, as fractions
    shown = picture(wado(archive, "ramp", region="0,0,0.25,1", windowCenter="1000", windowWidth="10", **png))
    assert shown.shape == (48, 16) and (shown == 0).all()
    # frames of a multi-frame: frame k holds k*1000 + index
    assert (picture(wado(archive, "multi", frameNumber="3", windowCenter="1500", windowWidth="1", **png)) == 255).all()
    assert (picture(wado(archive, "multi", frameNumber="1", windowCenter="1500", windowWidth="1", **png)) == 0).all()
    low = wado(archive, "ramp", imageQuality="5", contentType="image/jpeg")
    high = wado(archive, "ramp", imageQuality="95", contentType="image/jpeg")
    assert len(low.content) < len(high.content)
    # annotation and charset are accepted and ignored
    assert wado(archive, "ramp", annotation="patient", charset="UTF-8").status_code == 200


def test_compressed_image_rendered(archive):
    jpeg = archive[3]["SC_rgb_jpeg_dcmtk.dcm"]
    shown = picture(wado(archive, "SC_rgb_jpeg_dcmtk.dcm", contentType="image/png"))
    assert np.array_equal(shown, jpeg.pixel_array)


def test_content_type_lists(archive):
    response = wado(archive, "ramp", contentType="image/gif, image/png")
    assert response.headers["content-type"] == "image/png"
    response = wado(archive, "ramp", contentType="application/dicom;q=0.5, image/jpeg")
    assert response.headers["content-type"] == "image/jpeg"


@pytest.mark.parametrize("params, status, words", [
    ({"requestType": None}, 400, "requestType=WADO"),
    ({"requestType": "WADO-RS"}, 400, "must be WADO"),
    ({"seriesUID": None}, 400, "seriesUID"),
    ({"studyUID": "1.2.x"}, 400, "not a valid UID"),
    ({"contentType": "text/html"}, 406, "application/dicom, image/jpeg and image/png"),
    ({"anonymize": "yes"}, 400, "anonymize"),
    ({"frameNumber": "2"}, 400, "out of range"),
    ({"frameNumber": "zero"}, 400, "frameNumber"),
    ({"windowCenter": "100"}, 400, "windowCenter and windowWidth"),
    ({"region": "0.5,0,0.2,1"}, 400, "region"),
    ({"rows": "0"}, 400, "rows"),
    ({"imageQuality": "500"}, 400, "quality"),
])
def test_errors(archive, params, status, words):
    response = wado(archive, "ramp", **params)
    assert response.status_code == status
    body = response.json()
    assert body["status"] == status and words in body["message"]


def test_missing_object_uid_and_unknown_object(archive):
    response = wado(archive)
    assert response.status_code == 400 and "objectUID" in response.json()["message"]
    response = wado(archive, objectUID=uid("not-stored"))
    assert response.status_code == 404 and "is stored here" in response.json()["message"]


def test_non_image_cannot_be_rendered(archive):
    response = wado(archive, "reportsi.dcm", contentType="image/jpeg")
    assert response.status_code == 406 and "no pixel data" in response.json()["message"]


def test_conditional_get(archive):
    first = wado(archive, "ramp", contentType="application/dicom")
    assert first.headers["etag"].startswith('"')
    daemon, study, series, made = archive
    again = httpx.get(f"{daemon.http_url}/wado", params={
        "requestType": "WADO", "studyUID": study, "seriesUID": series,
        "objectUID": made["ramp"].SOPInstanceUID, "contentType": "application/dicom"},
        headers={"If-None-Match": first.headers["etag"]}, timeout=60)
    assert again.status_code == 304
