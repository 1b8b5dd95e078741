"""WADO-RS Retrieve Frames against a live daemon: native single- and multi-frame, big endian,
JPEG baseline, RLE and JPEG-LS instances stored over C-STORE, read back frame by frame."""

from __future__ import annotations

import struct

import httpx
import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.encaps import generate_frames

from tests.dicomdata import image, uid
from tests.web.webdata import daemon_holding, multiframe, split_multipart

OHIF_ACCEPT = "multipart/related; type=application/octet-stream; transfer-syntax=*"
EXPLICIT_LE_UID = "1.2.840.10008.1.2.1"


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """One daemon for the module, holding every test instance."""
    study, series = uid("frames-study"), uid("frames-series")
    single = image(uid("single"), series, study, rows=40, columns=56)
    multi = multiframe(study, series, 6)
    with daemon_holding(tmp_path_factory.mktemp("frames"), {"single": single, "multi": multi}, (
            "SC_rgb_jpeg_dcmtk.dcm", "examples_ybr_color.dcm", "SC_rgb_rle_2frame.dcm",
            "MR_small_bigendian.dcm", "MR_small_jpeg_ls_lossless.dcm", "reportsi.dcm"),
            study, series) as (daemon, copies):
        yield daemon, study, series, single, multi, copies


def frames_url(archive, sop: str, frames: str) -> str:
    daemon, study, series = archive[:3]
    return f"{daemon.dicomweb_url}/studies/{study}/series/{series}/instances/{sop}/frames/{frames}"


def get(archive, sop, frames, accept=OHIF_ACCEPT, **kw):
    headers = {"Accept": accept} if accept is not None else {}
    headers.update(kw.pop("headers", {}))
    return httpx.get(frames_url(archive, sop, frames), headers=headers, timeout=60, **kw)


def client(archive) -> DICOMwebClient:
    return DICOMwebClient(url=archive[0].dicomweb_url)


def test_native_single_frame_is_the_pixel_data_ohif_style(archive):
    single = archive[3]
    response = get(archive, single.SOPInstanceUID, "1")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith('multipart/related; type="application/octet-stream"')
    [(headers, content)] = split_multipart(response)
    # the exact part header cornerstone parses
    assert headers == {"Content-Type": f"application/octet-stream; transfer-syntax={EXPLICIT_LE_UID}"}
    assert content == single.PixelData
    assert int(response.headers["content-length"]) == len(response.content)
    assert response.headers["etag"] and response.headers["last-modified"]


def test_native_frames_with_dicomweb_client(archive):
    single, multi = archive[3], archive[4]
    study, series = archive[1], archive[2]
    dw = client(archive)
    # default Accept: multipart/related; type="*/*"
    [frame] = dw.retrieve_instance_frames(study, series, single.SOPInstanceUID, [1])
    assert frame == single.PixelData
    frame_bytes = 24 * 32 * 2
    expected = [multi.PixelData[k * frame_bytes:(k + 1) * frame_bytes] for k in range(6)]
    got = dw.retrieve_instance_frames(study, series, multi.SOPInstanceUID, [2, 6, 1, 2],
                                      media_types=(("application/octet-stream", "*"),))
    assert got == [expected[1], expected[5], expected[0], expected[1]]
    got = dw.retrieve_instance_frames(study, series, multi.SOPInstanceUID, [3],
                                      media_types=(("application/octet-stream", EXPLICIT_LE_UID),))
    assert got == [expected[2]]
    # frame k really is frame k: its first pixel is k*1000
    assert struct.unpack("<H", got[0][:2])[0] == 2000


def test_plain_octet_stream_without_transfer_syntax_is_explicit_le_for_native_data(archive):
    multi = archive[4]
    response = get(archive, multi.SOPInstanceUID, "4,5", accept='multipart/related; type="application/octet-stream"')
    assert response.status_code == 200
    parts = split_multipart(response)
    assert [h["Content-Type"] for h, _ in parts] == [f"application/octet-stream; transfer-syntax={EXPLICIT_LE_UID}"] * 2
    assert [np.frombuffer(c, "<u2")[0] for _, c in parts] == [3000, 4000]


def test_single_part_octet_stream_for_one_frame(archive):
    multi = archive[4]
    response = get(archive, multi.SOPInstanceUID, "2", accept="application/octet-stream")
    assert response.status_code == 200
    assert response.headers["content-type"] == f"application/octet-stream; transfer-syntax={EXPLICIT_LE_UID}"
    assert np.frombuffer(response.content, "<u2")[0] == 1000
    # a single-part type cannot carry several frames
    response = get(archive, multi.SOPInstanceUID, "1,2", accept="application/octet-stream")
    assert response.status_code == 406
    assert "single-part" in response.json()["message"]


def test_big_endian_frames_come_out_little_endian(archive):
    ds = archive[5]["MR_small_bigendian.dcm"]
    response = get(archive, ds.SOPInstanceUID, "1")
    [(headers, content)] = split_multipart(response)
    assert headers["Content-Type"].endswith(f"transfer-syntax={EXPLICIT_LE_UID}")
    assert content == ds.pixel_array.astype(ds.pixel_array.dtype.newbyteorder("<")).tobytes()


def test_jpeg_baseline_frames_as_stored(archive):
    ds = archive[5]["SC_rgb_jpeg_dcmtk.dcm"]
    [stored] = list(generate_frames(ds.PixelData, number_of_frames=1))
    response = get(archive, ds.SOPInstanceUID, "1")
    assert response.status_code == 200
    [(headers, content)] = split_multipart(response)
    assert headers["Content-Type"] == "image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.50"
    # fragments may be padded to even length: the frame is the fragment's bytes
    assert content == stored
    # image/jpeg without a transfer-syntax means baseline, which is what is stored
    study, series = archive[1], archive[2]
    frames = client(archive).retrieve_instance_frames(
        study, series, ds.SOPInstanceUID, [1], media_types=(("image/jpeg", "1.2.840.10008.1.2.4.50"),))
    assert frames == [stored]
    response = get(archive, ds.SOPInstanceUID, "1", accept='multipart/related; type="image/jpeg"')
    assert response.status_code == 200 and split_multipart(response)[0][1] == stored


def test_multiframe_jpeg_frames_by_number(archive):
    ds = archive[5]["examples_ybr_color.dcm"]
    count = int(ds.NumberOfFrames)
    stored = list(generate_frames(ds.PixelData, number_of_frames=count))
    response = get(archive, ds.SOPInstanceUID, f"{count},1,7")
    parts = split_multipart(response)
    assert [c for _, c in parts] == [stored[count - 1], stored[0], stored[6]]
    assert {h["Content-Type"] for h, _ in parts} == {"image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.50"}


def test_rle_and_jpeg_ls_frames_as_stored(archive):
    rle = archive[5]["SC_rgb_rle_2frame.dcm"]
    stored = list(generate_frames(rle.PixelData, number_of_frames=2))
    # the Python client's wildcard type
    response = get(archive, rle.SOPInstanceUID, "2,1", accept='multipart/related; type="*/*"')
    parts = split_multipart(response)
    assert [c for _, c in parts] == [stored[1], stored[0]]
    assert parts[0][0]["Content-Type"] == "image/dicom-rle; transfer-syntax=1.2.840.10008.1.2.5"
    jls = archive[5]["MR_small_jpeg_ls_lossless.dcm"]
    response = get(archive, jls.SOPInstanceUID, "1",
                   accept='multipart/related; type="image/jls"; transfer-syntax=1.2.840.10008.1.2.4.80')
    [(headers, content)] = split_multipart(response)
    assert headers["Content-Type"] == "image/jls; transfer-syntax=1.2.840.10008.1.2.4.80"
    assert content == list(generate_frames(jls.PixelData, number_of_frames=1))[0]


def test_duplicated_transfer_syntax_parameter_like_ohif(archive):
    ds = archive[5]["SC_rgb_jpeg_dcmtk.dcm"]
    accept = ('multipart/related; type="image/jpeg"; transfer-syntax="1.2.840.10008.1.2.4.50"; '
              'transfer-syntax="*"')
    response = get(archive, ds.SOPInstanceUID, "1", accept=accept)
    assert response.status_code == 200
    assert split_multipart(response)[0][0]["Content-Type"].endswith("transfer-syntax=1.2.840.10008.1.2.4.50")


def test_compressed_frames_refused_when_only_uncompressed_is_accepted(archive):
    ds = archive[5]["SC_rgb_jpeg_dcmtk.dcm"]
    for accept in ('multipart/related; type="application/octet-stream"',
                   f"multipart/related; type=application/octet-stream; transfer-syntax={EXPLICIT_LE_UID}",
                   'multipart/related; type="image/jpeg"; transfer-syntax=1.2.840.10008.1.2.4.70',
                   'multipart/related; type="image/jp2"'):
        response = get(archive, ds.SOPInstanceUID, "1", accept=accept)
        assert response.status_code == 406, accept
        body = response.json()
        assert body["status"] == 406
        assert "1.2.840.10008.1.2.4.50" in body["message"] and "transfer-syntax=*" in body["message"]


def test_frame_numbers_out_of_range_or_malformed(archive):
    multi = archive[4]
    response = get(archive, multi.SOPInstanceUID, "1,7")
    assert response.status_code == 404
    assert "frame 7" in response.json()["message"] and "6 frames" in response.json()["message"]
    for bad in ("0", "1,,2", "x", "1;2", "-1", "1.5"):
        response = get(archive, multi.SOPInstanceUID, bad)
        assert response.status_code == 400, bad
        assert response.json()["message"]


def test_unknown_instance_and_non_image(archive):
    response = get(archive, uid("nothing-here"), "1")
    assert response.status_code == 404
    assert "is stored here" in response.json()["message"]
    response = get(archive, "1.2.abc", "1")
    assert response.status_code == 400
    sr = archive[5]["reportsi.dcm"]
    response = get(archive, sr.SOPInstanceUID, "1")
    assert response.status_code == 404
    assert "no pixel data" in response.json()["message"]


def test_conditional_get_with_the_etag(archive):
    single = archive[3]
    first = get(archive, single.SOPInstanceUID, "1")
    etag = first.headers["etag"]
    again = get(archive, single.SOPInstanceUID, "1", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    other = get(archive, single.SOPInstanceUID, "1", headers={"If-None-Match": '"something-else"'})
    assert other.status_code == 200
    since = get(archive, single.SOPInstanceUID, "1", headers={"If-Modified-Since": first.headers["last-modified"]})
    assert since.status_code == 304


def test_no_preamble_and_trailing_close_delimiter_for_cornerstone(archive):
    # cornerstone takes the boundary from the first line that starts with "--" and the frame
    # from after the first CRLFCRLF up to 2 bytes before the next boundary.
    single = archive[3]
    body = get(archive, single.SOPInstanceUID, "1").content
    first_line = body.split(b"\r\n", 1)[0]
    assert first_line.startswith(b"--")
    start = body.index(b"\r\n\r\n") + 4
    end = body.index(first_line, start) - 2
    assert body[start:end] == single.PixelData
