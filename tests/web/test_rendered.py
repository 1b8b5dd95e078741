"""WADO-RS rendered and thumbnail resources against a live daemon: windows, rescale,
MONOCHROME1, viewports, quality, multi-frame, compressed instances, representative images."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image

from tests.dicomdata import image, uid
from tests.web.webdata import daemon_holding, multiframe, ramp, split_multipart

PNG = {"Accept": "image/png"}


def flat(sop: str, series: str, study: str, value: int, number: int) -> pydicom.Dataset:
    ds = image(sop, series, study, rows=16, columns=16, instance_number=number)
    ds.PixelData = np.full((16, 16), value, dtype="<u2").tobytes()
    return ds


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    study, series = uid("r-study"), uid("r-series")
    made = {
        "ramp": ramp(uid("ramp"), series, study, WindowCenter=2048, WindowWidth=4096, instance_number=1),
        "no_window": ramp(uid("nowin"), series, study, instance_number=2),
        "rescaled": ramp(uid("rescaled"), series, study, RescaleSlope=1, RescaleIntercept=-1000,
                         instance_number=3),
        "mono1": ramp(uid("mono1"), series, study, PhotometricInterpretation="MONOCHROME1", instance_number=4),
        "large": ramp(uid("large"), series, study, rows=192, columns=256, step=16, instance_number=5),
        "multi": multiframe(study, series, 4),
    }
    # a study of one series whose middle instance is bright, the others dark
    rep_study, rep_series = uid("rep-study"), uid("rep-series")
    representative = {f"flat{number}": flat(uid("flat", number), rep_series, rep_study, value, number)
                      for number, value in ((1, 100), (2, 3000), (3, 100))}
    with daemon_holding(tmp_path_factory.mktemp("rendered"), {**made, **representative}, (
            "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle_2frame.dcm", "MR_small_jpeg_ls_lossless.dcm", "reportsi.dcm"),
            study, series) as (daemon, copies):
        yield daemon, study, series, made, copies, (rep_study, rep_series)


def url(archive, sop: str, tail: str = "rendered") -> str:
    daemon, study, series = archive[:3]
    return f"{daemon.dicomweb_url}/studies/{study}/series/{series}/instances/{sop}/{tail}"


def fetch(archive, name: str, tail: str = "rendered", headers=None, **params) -> httpx.Response:
    sop = archive[3][name].SOPInstanceUID if name in archive[3] else archive[4][name].SOPInstanceUID
    return httpx.get(url(archive, sop, tail), headers=headers or {}, params=params, timeout=60)


def pixels(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)))


def test_default_is_jpeg_of_the_image_size(archive):
    response = fetch(archive, "ramp")
    assert response.headers["content-type"] == "image/jpeg"
    picture = Image.open(io.BytesIO(response.content))
    assert picture.format == "JPEG" and picture.size == (64, 48) and picture.mode == "L"
    assert response.headers["etag"].startswith('W/"') and response.headers["last-modified"]


def test_png_with_the_instance_window(archive):
    row = pixels(fetch(archive, "ramp", headers=PNG))[0].astype(int)
    # center 2048, width 4096, linear: column k (value 64k) shows ((64k - 2047.5)/4095 + 0.5) * 255
    expected = np.rint(np.clip((np.arange(64) * 64 - 2047.5) / 4095 + 0.5, 0, 1) * 255)
    assert np.array_equal(row, expected)


def test_narrow_window_from_the_request_is_black_and_white(archive):
    picture = pixels(fetch(archive, "ramp", headers=PNG, window="1000,10,linear"))
    # values 0..960 (columns 0-15) are below the window, 1024 and up above it
    assert (picture[:, :16] == 0).all() and (picture[:, 16:] == 255).all()
    # rescale intercept -1000 moves the same step to stored value 2000 (column 32)
    picture = pixels(fetch(archive, "rescaled", headers=PNG, window="1000,10"))
    assert (picture[:, :32] == 0).all() and (picture[:, 32:] == 255).all()


def test_window_functions(archive):
    exact = pixels(fetch(archive, "ramp", headers=PNG, window="2016,4032,linear-exact"))[0].astype(int)
    assert exact[0] == 0 and exact[-1] == 255
    sigmoid = pixels(fetch(archive, "ramp", headers=PNG, window="2016,400,sigmoid"))[0].astype(int)
    assert sigmoid[0] < 5 and sigmoid[-1] > 250 and 100 < sigmoid[31] < 155


def test_no_window_uses_the_frame_range_and_monochrome1_is_inverted(archive):
    row = pixels(fetch(archive, "no_window", headers=PNG))[0]
    assert row[0] == 0 and row[-1] == 255 and (np.diff(row.astype(int)) >= 0).all()
    row = pixels(fetch(archive, "mono1", headers=PNG))[0]
    assert row[0] == 255 and row[-1] == 0 and (np.diff(row.astype(int)) <= 0).all()


def test_viewport_scales_keeping_the_aspect_ratio(archive):
    assert pixels(fetch(archive, "ramp", headers=PNG, viewport="32,32")).shape == (24, 32)
    assert pixels(fetch(archive, "ramp", headers=PNG, viewport="128,128")).shape == (96, 128)
    assert pixels(fetch(archive, "large", headers=PNG, viewport="100,500")).shape == (75, 100)


def test_viewport_source_region_crops_and_flips(archive):
    # left quarter (columns 0-15): all below the narrow window
    picture = pixels(fetch(archive, "ramp", headers=PNG, viewport="16,48,0,0,16,48", window="1000,10"))
    assert picture.shape == (48, 16) and (picture == 0).all()
    # columns 0-31 with a negative width: mirrored, so the bright columns come first
    picture = pixels(fetch(archive, "ramp", headers=PNG, viewport="32,48,32,0,-32,48", window="1000,10"))
    assert picture.shape == (48, 32)
    assert (picture[:, :16] == 255).all() and (picture[:, 16:] == 0).all()


def test_quality_changes_the_jpeg(archive):
    low = fetch(archive, "large", quality="5")
    high = fetch(archive, "large", quality="95")
    assert low.status_code == high.status_code == 200
    assert len(low.content) < len(high.content)
    assert low.headers["etag"] != high.headers["etag"]


def test_thumbnails_are_small(archive):
    daemon, study, series = archive[:3]
    large = fetch(archive, "large", tail="thumbnail")
    assert large.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(large.content)).size == (128, 96)
    # a small image is not enlarged, unless a viewport asks for it
    assert pixels(fetch(archive, "ramp", tail="thumbnail", headers=PNG)).shape == (48, 64)
    assert pixels(fetch(archive, "large", tail="thumbnail", headers=PNG, viewport="64,64")).shape == (48, 64)
    for level in (f"/studies/{study}/thumbnail", f"/studies/{study}/series/{series}/thumbnail"):
        response = httpx.get(daemon.dicomweb_url + level, timeout=60)
        assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
        width, height = Image.open(io.BytesIO(response.content)).size
        assert width <= 128 and height <= 128


def test_series_and_study_show_their_middle_image(archive):
    daemon = archive[0]
    rep_study, rep_series = archive[5]
    for level in (f"/studies/{rep_study}", f"/studies/{rep_study}/series/{rep_series}"):
        for resource in ("thumbnail", "rendered"):
            response = httpx.get(f"{daemon.dicomweb_url}{level}/{resource}", params={"window": "1500,100"},
                                 headers=PNG, timeout=60)
            assert (pixels(response) == 255).all(), (level, resource)


def test_multiframe_frames_rendered(archive):
    # frame k holds k*1000 + pixel index (0..767); a window of width 1 at 1500 thresholds there
    assert (pixels(fetch(archive, "multi", headers=PNG, window="1500,1")) == 0).all()
    assert (pixels(fetch(archive, "multi", "frames/1/rendered", headers=PNG, window="1500,1")) == 0).all()
    assert (pixels(fetch(archive, "multi", "frames/3/rendered", headers=PNG, window="1500,1")) == 255).all()
    response = fetch(archive, "multi", "frames/3,1/rendered", window="1500,1",
                     headers={"Accept": 'multipart/related; type="image/png"'})
    parts = split_multipart(response)
    assert [h["Content-Type"] for h, _ in parts] == ["image/png", "image/png"]
    images = [np.asarray(Image.open(io.BytesIO(content))) for _, content in parts]
    assert (images[0] == 255).all() and (images[1] == 0).all()
    response = fetch(archive, "multi", "frames/1,2/rendered", headers={"Accept": "*/*"})
    assert [h["Content-Type"] for h, _ in split_multipart(response)] == ["image/jpeg", "image/jpeg"]
    # one image type alone cannot carry two frames (PS3.18 10.4.4)
    response = fetch(archive, "multi", "frames/1,2/rendered", headers=PNG)
    assert response.status_code == 406 and "multipart/related" in response.json()["message"]
    response = fetch(archive, "multi", "frames/5/rendered")
    assert response.status_code == 404 and "4 frames" in response.json()["message"]


def test_compressed_instances_render_like_pydicom_decodes_them(archive):
    jpeg = archive[4]["SC_rgb_jpeg_dcmtk.dcm"]
    picture = pixels(fetch(archive, "SC_rgb_jpeg_dcmtk.dcm", headers=PNG))
    assert picture.shape == (100, 100, 3)
    assert np.array_equal(picture, jpeg.pixel_array)
    rle = archive[4]["SC_rgb_rle_2frame.dcm"]
    picture = pixels(fetch(archive, "SC_rgb_rle_2frame.dcm", "frames/2/rendered", headers=PNG))
    assert np.array_equal(picture, rle.pixel_array[1])


def test_what_cannot_be_rendered_is_406_with_a_reason(archive):
    response = fetch(archive, "MR_small_jpeg_ls_lossless.dcm")
    assert response.status_code == 406
    assert "pacsd cannot render" in response.json()["message"] and "1.2.840.10008.1.2.4.80" in response.json()["message"]
    response = fetch(archive, "reportsi.dcm")
    assert response.status_code == 406 and "no pixel data" in response.json()["message"]
    response = fetch(archive, "ramp", headers={"Accept": "image/gif"})
    assert response.status_code == 406 and "image/jpeg or image/png" in response.json()["message"]


@pytest.mark.parametrize("params", [
    {"window": "abc"}, {"window": "100,0"}, {"window": "100,20,cubic"}, {"window": "1,2,3,4"},
    {"viewport": "0,10"}, {"viewport": "10"}, {"viewport": "99999,10"}, {"viewport": "10,10,0,0,0,5"},
    {"quality": "0"}, {"quality": "101"}, {"quality": "high"},
])
def test_bad_parameters_are_400(archive, params):
    response = fetch(archive, "ramp", **params)
    assert response.status_code == 400
    assert response.json()["message"]


def test_accept_variants_viewers_send(archive):
    # OHIF's thumbnail request through its bulk data call
    response = fetch(archive, "ramp", "thumbnail",
                     headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    # OHIF's thumbnailDirect: <img src=".../thumbnail?accept=image/jpeg">; the query wins
    response = fetch(archive, "ramp", "thumbnail", headers=PNG, accept="image/jpeg")
    assert response.headers["content-type"] == "image/jpeg"
    response = fetch(archive, "ramp", headers={"Accept": "image/*"})
    assert response.headers["content-type"] == "image/jpeg"


def test_conditional_get(archive):
    png = fetch(archive, "ramp", headers=PNG)
    jpeg = fetch(archive, "ramp")
    assert png.headers["etag"] != jpeg.headers["etag"]
    again = fetch(archive, "ramp", headers={**PNG, "If-None-Match": png.headers["etag"]})
    assert again.status_code == 304
    # a different window is a different representation
    assert fetch(archive, "ramp", headers={**PNG, "If-None-Match": png.headers["etag"]},
                 window="10,20").status_code == 200


def test_with_dicomweb_client(archive):
    daemon, study, series, made = archive[:4]
    dw = DICOMwebClient(url=daemon.dicomweb_url)
    ramp_uid, multi_uid = made["ramp"].SOPInstanceUID, made["multi"].SOPInstanceUID
    content = dw.retrieve_instance_rendered(study, series, ramp_uid, media_types=("image/png",),
                                            params={"viewport": "32,32"})
    assert Image.open(io.BytesIO(content)).size == (32, 24)
    content = dw.retrieve_instance_frames_rendered(study, series, multi_uid, [3], media_types=("image/png",),
                                                   params={"window": "1500,1"})
    assert (np.asarray(Image.open(io.BytesIO(content))) == 255).all()
    content = dw.retrieve_series_rendered(study, series, media_types=("image/jpeg",))
    assert Image.open(io.BytesIO(content)).format == "JPEG"
