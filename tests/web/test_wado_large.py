"""A 1 GiB instance retrieved over WADO-RS: the daemon streams it with flat memory.

The instance (2,048 frames of 512x512 16-bit, Explicit VR LE) is written to disk by pydicom
(the header) followed by the pixel bytes in 512 KiB pieces, stored with `pacsd store`, then
retrieved with httpx in streaming mode, counting the bytes without keeping them. The daemon's
peak resident set size during the retrieve (VmHWM, reset just before through
/proc/<pid>/clear_refs) must stay under 200 MiB: a response that held the instance, or a
tenth of it, would not.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import httpx
import pytest

from tests.conftest import store_files
from tests.dicomdata import image, uid

FRAME = 512 * 512 * 2
FRAMES = 2048  # 1 GiB of pixel data
LIMIT = 200 * 1024 * 1024

STUDY, SERIES, SOP = uid("wado-large", "study"), uid("wado-large", "series"), uid("wado-large", "sop")


def write_huge(path: Path) -> int:
    ds = image(SOP, SERIES, STUDY, rows=512, columns=512)
    del ds.PixelData
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT
    ds.NumberOfFrames = FRAMES
    ds.save_as(path, enforce_file_format=True)
    frame = bytes(range(256)) * (FRAME // 256)
    with open(path, "ab") as f:
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, FRAMES * FRAME))
        for _ in range(FRAMES):
            f.write(frame)
    return path.stat().st_size


def status_kib(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def test_a_1_gib_instance_streams_with_flat_memory(start_daemon, tmp_path):
    daemon = start_daemon()
    path = tmp_path / "huge.dcm"
    size = write_huge(path)
    assert size > 1 << 30
    store_files(daemon, [path])
    path.unlink()  # the daemon's copy is what is sent

    pid = daemon.proc.pid
    url = daemon.dicomweb_url + f"/studies/{STUDY}/series/{SERIES}/instances/{SOP}"
    # Metadata needs only the header: the pixel data is a BulkDataURI, its length untouched.
    metadata = httpx.get(url + "/metadata", timeout=60).json()
    assert metadata[0]["00280008"]["Value"] == [FRAMES]
    assert metadata[0]["7FE00010"]["BulkDataURI"].endswith("/bulkdata/7FE00010")

    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = status_kib(pid, "VmRSS")
    received = 0
    with httpx.stream("GET", url, timeout=120) as response:
        assert response.status_code == 200
        declared = int(response.headers["content-length"])
        for chunk in response.iter_raw(1 << 20):
            received += len(chunk)
    peak = status_kib(pid, "VmHWM") * 1024
    assert received == declared
    # one part: the whole file plus the delimiter lines and the part header
    assert size < received < size + 1024
    assert peak < LIMIT, f"daemon peak RSS {peak >> 20} MiB (was {before >> 10} MiB before the retrieve)"
    assert daemon.alive


@pytest.fixture(autouse=True)
def _needs_clear_refs():
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/<pid>/clear_refs to reset the peak RSS")
