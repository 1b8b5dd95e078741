"""Test instances and a loaded daemon shared by the WADO-RS frames, rendered and WADO-URI tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from tests.conftest import Daemon, launch_daemon, store_files
from tests.dicomdata import image, uid, write_part10

MULTIFRAME_SC = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word Secondary Capture


def copy_of_testdata(name: str, study: str, series: str, out_dir) -> pydicom.Dataset:
    """A pydicom test file with new UIDs, written to out_dir as stored (same transfer syntax)."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = "PIXELS"
    ds.save_as(out_dir / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    return ds


def multiframe(study: str, series: str, frames: int, rows: int = 24, columns: int = 32) -> pydicom.Dataset:
    """A native 16-bit multi-frame instance whose frame k holds k*1000 + pixel index."""
    ds = image(uid("mf", study, frames), series, study, rows=rows, columns=columns, instance_number=9)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MULTIFRAME_SC
    ds.NumberOfFrames = frames
    values = np.arange(rows * columns, dtype=np.uint16)
    ds.PixelData = b"".join((values + k * 1000).astype("<u2").tobytes() for k in range(frames))
    return ds


def ramp(sop: str, series: str, study: str, rows: int = 48, columns: int = 64, step: int = 64,
         **attributes) -> pydicom.Dataset:
    """16-bit image whose column k holds k*step in every row."""
    ds = image(sop, series, study, rows=rows, columns=columns, **attributes)
    values = np.tile(np.arange(columns, dtype=np.uint16) * step, (rows, 1))
    ds.PixelData = values.astype("<u2").tobytes()
    return ds


def split_multipart(response) -> list[tuple[dict[str, str], bytes]]:
    """Parts of a multipart/related body, parsed the way cornerstone's loader does it: the
    body starts with the delimiter, part headers end at the first CRLFCRLF."""
    content_type = response.headers["content-type"]
    assert content_type.startswith("multipart/related"), content_type
    boundary = content_type.split("boundary=")[1].split(";")[0].strip('"')
    body = response.content
    assert body.startswith(b"--" + boundary.encode() + b"\r\n"), body[:80]
    assert body.endswith(b"\r\n--" + boundary.encode() + b"--\r\n")
    parts = []
    for chunk in body[len(boundary) + 4: -len(boundary) - 8].split(b"\r\n--" + boundary.encode() + b"\r\n"):
        head, _, content = chunk.partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode("ascii").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name] = value.strip()
        parts.append((headers, content))
    return parts


@contextmanager
def daemon_holding(base: Path, made: dict[str, pydicom.Dataset], testdata: tuple[str, ...] = (),
                   study: str = "", series: str = "") -> Iterator[tuple[Daemon, dict[str, pydicom.Dataset]]]:
    """`pacsd serve` in `base` holding `made` (each written as <name>.dcm) and copies of the
    pydicom test files named in `testdata` (new UIDs, in `study`/`series`), all sent over
    C-STORE; stopped on the way out. Yields the daemon and the copies by file name."""
    daemon = launch_daemon(base, "pacsd")  # first: it starts up while the files are written
    try:
        files = base / "in"
        files.mkdir()
        for name, ds in made.items():
            write_part10(files / f"{name}.dcm", ds)
        copies = {name: copy_of_testdata(name, study, series, files) for name in testdata}
        store_files(daemon, sorted(files.iterdir()))
        yield daemon, copies
    finally:
        daemon.stop()
