"""`pacsd find`, `move` and `get` against DCMTK's dcmqrscp, an independent Q/R SCP."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.conftest import dcmtk, free_port, wait_for_port

pytestmark = pytest.mark.interop

CT_STUDY = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
CT_INSTANCE = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
MR_STUDY = "1.3.6.1.4.1.5962.1.2.4.20040826185059.5457"


@pytest.fixture
def qrscp(tmp_path):
    """dcmqrscp with CT_small and MR_small, and a storescp it may move to (AE RECV)."""
    db = tmp_path / "db"
    db.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(get_testdata_file(name), db / name)
    subprocess.run([dcmtk("dcmqridx"), str(db)] + [str(p) for p in sorted(db.glob("*.dcm"))], check=True)
    port, recv_port = free_port(), free_port()
    config = tmp_path / "dcmqrscp.cfg"
    config.write_text(f"""NetworkTCPPort = {port}
MaxPDUSize = 16384
MaxAssociations = 16
HostTable BEGIN
recv = (RECV, 127.0.0.1, {recv_port})
HostTable END
VendorTable BEGIN
VendorTable END
AETable BEGIN
QRSCP {db} RW (200, 1024mb) ANY
AETable END
""")
    proc = subprocess.Popen([dcmtk("dcmqrscp"), "-c", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        yield port, recv_port
    finally:
        proc.terminate()
        proc.wait(10)


def pacsd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pacsd", *args], capture_output=True, text=True, timeout=60)


def test_find_studies_as_table_and_json(qrscp):
    port, _ = qrscp
    result = pacsd("find", "127.0.0.1", str(port), "--aec", "QRSCP", "-L", "STUDY")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber",
                              "StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedInstances",
                              "StudyInstanceUID"]
    assert sorted(row.split()[-1] for row in rows) == sorted([CT_STUDY, MR_STUDY])
    assert "2 matches; final status 0x0000 (success)" in result.stderr

    result = pacsd("find", "127.0.0.1", str(port), "--aec", "QRSCP", "-L", "STUDY",
                   "-k", "PatientName=*CT1", "-k", "StudyDate", "-k", "StudyInstanceUID", "--json")
    assert result.returncode == 0, result.stderr
    matches = [pydicom.Dataset.from_json(m) for m in json.loads(result.stdout)]
    assert [(str(m.PatientName), m.StudyDate, m.StudyInstanceUID) for m in matches] == [
        ("CompressedSamples^CT1", "20040119", CT_STUDY)]


def test_find_with_an_unknown_key_is_a_usage_error(qrscp):
    port, _ = qrscp
    result = pacsd("find", "127.0.0.1", str(port), "--aec", "QRSCP", "-k", "PatientNam=X")
    assert result.returncode == 2
    assert "'PatientNam' is not a DICOM keyword" in result.stderr


def test_get_writes_the_instances(qrscp, tmp_path):
    port, _ = qrscp
    out = tmp_path / "got"
    result = pacsd("get", "127.0.0.1", str(port), "--aec", "QRSCP", "-k", f"StudyInstanceUID={CT_STUDY}",
                   "-o", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "final status 0x0000 (success)" in result.stdout
    [path] = out.iterdir()
    assert path.name == f"{CT_INSTANCE}.dcm"
    got = pydicom.dcmread(path)
    original = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert got.file_meta.MediaStorageSOPInstanceUID == CT_INSTANCE
    assert got.PixelData == original.PixelData
    assert got.PatientName == original.PatientName


def test_move_to_a_storescp(qrscp, tmp_path):
    port, recv_port = qrscp
    out = tmp_path / "moved"
    out.mkdir()
    scp = subprocess.Popen([dcmtk("storescp"), "-aet", "RECV", "--output-directory", str(out), str(recv_port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(recv_port, scp)
        result = pacsd("move", "127.0.0.1", str(port), "--aec", "QRSCP", "--dest", "RECV",
                       "-k", f"StudyInstanceUID={MR_STUDY}")
    finally:
        scp.terminate()
        scp.wait(10)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "final status 0x0000 (success)" in result.stdout
    assert "completed 1, failed 0" in result.stdout
    [received] = out.iterdir()
    assert pydicom.dcmread(received).StudyInstanceUID == MR_STUDY


def test_move_to_an_absent_destination_fails_with_the_list(qrscp):
    port, _ = qrscp  # nothing listens on RECV's port
    result = pacsd("move", "127.0.0.1", str(port), "--aec", "QRSCP", "--dest", "RECV",
                   "-k", f"StudyInstanceUID={CT_STUDY}")
    assert result.returncode == 1
    assert "0xA702" in result.stdout
    assert CT_INSTANCE in result.stderr
