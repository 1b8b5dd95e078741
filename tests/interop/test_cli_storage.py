"""`pacsd store`, `pacsd import` and `pacsd verify` end to end, run as the user runs them.

store sends to DCMTK's storescp in bit-preserving mode (so what arrives is exactly what was
sent) and to a live pacsd; import and verify work on a data directory of their own.
"""

from __future__ import annotations

import functools
import os
import pty
import re
import select
import shutil
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from pacsd.net.storescu import MAX_CONTEXTS, NotPart10, Part10File, plan, read_part10
from tests.conftest import dcmtk, free_port, wait_for_port

pytestmark = pytest.mark.interop

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
BIG_ENDIAN = "1.2.840.10008.1.2.2"


def sample(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        pytest.fail(f"pydicom test file {name} is missing")
    return Path(path)


@functools.lru_cache(maxsize=None)
def rle_file() -> Path:
    # emri_small_RLE.dcm is in pydicom's downloadable data (absent offline); MR_small_RLE.dcm
    # ships with pydicom itself.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            path = get_testdata_file("emri_small_RLE.dcm")
        except Exception:
            path = None
    return Path(path) if path else sample("MR_small_RLE.dcm")


def sample_files() -> list[Path]:
    """Explicit VR LE (CT, MR), JPEG baseline, RLE, explicit VR big endian."""
    return [sample("CT_small.dcm"), sample("MR_small.dcm"), sample("SC_rgb_jpeg_dcmtk.dcm"),
            rle_file(), sample("MR_small_bigendian.dcm")]


def dataset_of(path: Path) -> tuple[pydicom.Dataset, bytes]:
    """File meta (read by pydicom) and the data set bytes after it, for comparisons."""
    meta = pydicom.filereader.read_file_meta_info(path)
    raw = path.read_bytes()
    offset = 128 + 4 + 12 + meta.FileMetaInformationGroupLength
    return meta, raw[offset:]


def pacsd(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PACSD_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "pacsd", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def summary_counts(stdout: str, kinds: tuple[str, ...]) -> dict[str, int]:
    last = next(line for line in stdout.splitlines() if line.startswith("imported "))
    found = {}
    for kind in kinds:
        m = re.search(rf"(\d+) {kind}", last)
        assert m, f"no '{kind}' count in {last!r}"
        found[kind] = int(m.group(1))
    return found


def store_summary(stdout: str) -> dict[str, int]:
    line = next(l for l in stdout.splitlines() if l.startswith("sent "))
    m = re.match(r"sent (\d+) files .*: (\d+) succeeded, (\d+) warnings, (\d+) failed, (\d+) skipped", line)
    assert m, line
    return dict(zip(("sent", "succeeded", "warnings", "failed", "skipped"), map(int, m.groups())))


class StoreSCP:
    def __init__(self, directory: Path, *extra: str, aet: str = "STORESCP") -> None:
        self.directory = directory
        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "-aet", aet, "+B", "+uf", "-od", str(directory), *extra, str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, self.proc)

    def received(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir() if p.is_file())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def storescp(tmp_path):
    started: list[StoreSCP] = []

    def start(*extra: str, aet: str = "STORESCP") -> StoreSCP:
        scp = StoreSCP(tmp_path / f"scp{len(started)}", *extra, aet=aet)
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


def variant(source: Path, target: Path, *, sop_class: str | None = None) -> str:
    """A copy of `source` under a new SOP Instance UID (and SOP class); returns the UID."""
    ds = pydicom.dcmread(source)
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    if sop_class:
        ds.SOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.save_as(target, enforce_file_format=True)
    return uid


def with_other_meta_instance(source: Path, target: Path) -> str:
    """A copy whose file meta names another SOP Instance UID than its data set; returns it."""
    raw = source.read_bytes()
    uid = read_part10(source).sop_instance_uid
    other = uid[:-1] + ("1" if uid[-1] != "1" else "2")
    at = raw.index(uid.encode(), 132)
    assert at < read_part10(source).dataset_offset  # the occurrence in the file meta
    target.write_bytes(raw[:at] + other.encode() + raw[at + len(uid):])
    return other


# --- pacsd store ----------------------------------------------------------------------------


def test_store_to_dcmtk_storescp_preserves_every_data_set_byte(storescp):
    scp = storescp("+xa")  # accept every transfer syntax DCMTK knows
    files = sample_files()
    result = pacsd("store", "127.0.0.1", str(scp.port), *map(str, files), "--aec", "STORESCP")
    assert result.returncode == 0, result.stdout + result.stderr
    counts = store_summary(result.stdout)
    assert counts == {"sent": 5, "succeeded": 5, "warnings": 0, "failed": 0, "skipped": 0}
    for f in files:
        assert any(line.startswith("ok") and str(f) in line and "0x0000 (success)" in line
                   for line in result.stdout.splitlines()), (f, result.stdout)

    originals = {}
    for f in files:
        meta, data = dataset_of(f)
        originals[(meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID)] = data
    received = scp.received()
    assert len(received) == 5
    seen = set()
    for path in received:
        meta, data = dataset_of(path)
        key = (meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID)
        assert key in originals, f"{path.name} arrived as {key}, which was not sent"
        assert data == originals[key], f"{path.name}: data set bytes differ from the original"
        seen.add(key)
    # Each file kept its own transfer syntax: no transcoding on the way.
    assert seen == set(originals)
    assert {ts for _, ts in seen} >= {JPEG_BASELINE, RLE_LOSSLESS, BIG_ENDIAN}


def test_store_rejected_presentation_context_fails_only_those_files(storescp):
    scp = storescp()  # DCMTK's default: uncompressed transfer syntaxes only
    ct, jpeg = sample("CT_small.dcm"), sample("SC_rgb_jpeg_dcmtk.dcm")
    result = pacsd("store", "127.0.0.1", str(scp.port), str(ct), str(jpeg), "--aec", "STORESCP")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    [failed] = [l for l in lines if l.startswith("FAILED")]
    assert str(jpeg) in failed
    assert "did not accept the presentation context" in failed
    assert "JPEG Baseline" in failed and JPEG_BASELINE in failed
    assert any(l.startswith("ok") and str(ct) in l for l in lines)
    assert store_summary(result.stdout) == {"sent": 1, "succeeded": 1, "warnings": 0, "failed": 1,
                                            "skipped": 0}
    assert len(scp.received()) == 1


def test_store_to_pacsd_indexes_and_skips_non_dicom(daemon, tmp_path):
    source = tmp_path / "source"
    (source / "sub").mkdir(parents=True)
    shutil.copy(sample("CT_small.dcm"), source / "ct.dcm")
    shutil.copy(sample("SC_rgb_jpeg_dcmtk.dcm"), source / "sub" / "jpeg.dcm")
    shutil.copy(rle_file(), source / "sub" / "rle.dcm")
    (source / "notes.txt").write_text("not DICOM at all\n")
    (source / "sub" / "short").write_bytes(b"\0" * 50)

    result = pacsd("store", "127.0.0.1", str(daemon.port), str(source), "-r", "--aet", "MODALITY")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    skipped = [l for l in lines if l.startswith("skipped")]
    assert len(skipped) == 2
    assert any("notes.txt" in l and "not a DICOM Part 10 file" in l for l in skipped)
    assert store_summary(result.stdout) == {"sent": 3, "succeeded": 3, "warnings": 0, "failed": 0,
                                            "skipped": 2}

    with sqlite3.connect(daemon.data_dir / "index.db") as db:
        rows = db.execute("SELECT sop_instance_uid, transfer_syntax_uid, calling_ae FROM instances").fetchall()
    expected = {}
    for name in ("ct.dcm", "sub/jpeg.dcm", "sub/rle.dcm"):
        meta, _ = dataset_of(source / name)
        expected[meta.MediaStorageSOPInstanceUID] = meta.TransferSyntaxUID
    assert {uid: ts for uid, ts, _ in rows} == expected
    assert {ae for _, _, ae in rows} == {"MODALITY"}

    # Without -r only the files directly in the directory go.
    result = pacsd("store", "127.0.0.1", str(daemon.port), str(source))
    assert result.returncode == 0, result.stdout + result.stderr
    assert store_summary(result.stdout)["sent"] == 1


def test_store_prints_the_peers_failure_status_and_error_comment(daemon, tmp_path):
    bad = tmp_path / "mismatch.dcm"
    other = with_other_meta_instance(sample("CT_small.dcm"), bad)
    good = sample("MR_small.dcm")
    result = pacsd("store", "127.0.0.1", str(daemon.port), str(bad), str(good))
    assert result.returncode == 1, result.stdout + result.stderr
    [failed] = [l for l in result.stdout.splitlines() if l.startswith("FAILED")]
    assert other in failed and "0xA900" in failed
    assert "0xA900 (dataset does not match sop class): SOP Instance UID" in failed  # + Error Comment
    assert store_summary(result.stdout)["succeeded"] == 1


def test_store_to_an_ae_that_rejects_the_association(daemon):
    result = pacsd("store", "127.0.0.1", str(daemon.port), str(sample("CT_small.dcm")),
                   str(sample("MR_small.dcm")), "--aec", "NOT-PACSD")
    assert result.returncode == 1
    failed = [l for l in result.stdout.splitlines() if l.startswith("FAILED")]
    assert len(failed) == 2
    assert all("association rejected" in l and "called AE title not recognized" in l for l in failed)
    assert store_summary(result.stdout)["sent"] == 0


def test_store_nothing_to_send_exits_1(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("hello")
    result = pacsd("store", "127.0.0.1", str(free_port()), str(text))
    assert result.returncode == 1
    assert "skipped" in result.stdout
    assert "no DICOM Part 10 files to send" in result.stderr


def test_store_over_more_than_128_contexts_uses_several_associations(daemon, tmp_path):
    from pacsd.services.storage import storage_sop_classes

    classes = storage_sop_classes()[: MAX_CONTEXTS + 2]
    source = tmp_path / "many"
    source.mkdir()
    uids = set()
    for n, sop_class in enumerate(classes):
        uids.add(variant(sample("CT_small.dcm"), source / f"{n:03d}.dcm", sop_class=sop_class))
    result = pacsd("store", "127.0.0.1", str(daemon.port), str(source), "--aet", "MANY")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert store_summary(result.stdout)["succeeded"] == len(classes)
    accepted = daemon.wait_for_event("association.accepted", count=2, calling_ae="MANY")
    assert len(accepted) == 2

    def contexts(event: dict) -> int:
        # Long lists are cut short at info level, with an "... N accepted" marker last.
        m = re.fullmatch(r"\.\.\. (\d+) accepted", event["accepted"][-1])
        return int(m.group(1)) if m else len(event["accepted"])

    assert sorted(contexts(e) for e in accepted) == [2, MAX_CONTEXTS]
    with sqlite3.connect(daemon.data_dir / "index.db") as db:
        stored = {uid for uid, in db.execute("SELECT sop_instance_uid FROM instances")}
    assert stored == uids


def test_plan_splits_contexts_at_128_and_keeps_file_order():
    files = [Part10File(Path(f"{n}.dcm"), f"1.2.3.{n % 300}", f"1.2.9.{n}", "1.2.840.10008.1.2.1", 132, 200)
             for n in range(600)]
    batches = plan(files)
    assert [len(contexts) for contexts, _ in batches] == [128, 128, 44]
    assert sum(len(batch) for _, batch in batches) == 600
    for contexts, batch in batches:
        assert {f.context for f in batch} == set(contexts)
        assert batch == sorted(batch, key=lambda f: int(f.path.stem))


def test_read_part10_reports_data_set_offset_and_refuses_other_files(tmp_path):
    ct = sample("CT_small.dcm")
    info = read_part10(ct)
    meta, data = dataset_of(ct)
    assert info.dataset_offset == ct.stat().st_size - len(data)
    assert info.transfer_syntax == meta.TransferSyntaxUID
    assert info.source_ae == meta.SourceApplicationEntityTitle.strip()
    for name, content in (("text", b"hello"), ("short", b"\0" * 131),
                          ("nometa", b"\0" * 128 + b"DICM" + b"\x08\x00\x05\x00CS\x00\x00")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(NotPart10):
            read_part10(tmp_path / name)
    with pytest.raises(NotPart10):
        read_part10(sample("ExplVR_LitEndNoMeta.dcm"))


def test_store_shows_a_progress_bar_on_a_terminal(storescp):
    scp = storescp("+xa")
    output = run_on_terminal([sys.executable, "-m", "pacsd", "store", "127.0.0.1", str(scp.port),
                              *map(str, sample_files()), "--aec", "STORESCP"])
    assert "C-STORE [" in output and "5/5" in output
    assert "5 succeeded" in output


# --- pacsd import ---------------------------------------------------------------------------


def import_corpus(root: Path) -> dict[str, list[Path]]:
    """Test files with one text file and one duplicate pair; SOP Instance UID -> files."""
    (root / "a" / "b").mkdir(parents=True)
    names = {
        "ct.dcm": sample("CT_small.dcm"),
        "a/mr.dcm": sample("MR_small.dcm"),
        "a/jpeg.dcm": sample("SC_rgb_jpeg_dcmtk.dcm"),
        "a/b/lossy.dcm": sample("JPEG-lossy.dcm"),
        "a/b/deflated.dcm": sample("image_dfl.dcm"),
        "a/b/mr_big_endian.dcm": sample("MR_small_bigendian.dcm"),  # same instance as a/mr.dcm
    }
    by_uid: dict[str, list[Path]] = {}
    for name, source in names.items():
        shutil.copy(source, root / name)
        by_uid.setdefault(read_part10(root / name).sop_instance_uid, []).append(root / name)
    (root / "a" / "README.txt").write_text("a text file among the images\n")
    return by_uid


def data_env(data_dir: Path) -> dict[str, str]:
    return {"PACSD_STORAGE__DATA_DIR": str(data_dir)}


def index_rows(data_dir: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(data_dir / "index.db") as db:
        return db.execute(sql).fetchall()


def blob_path(data_dir: Path, key: str) -> Path:
    return data_dir / "blobs" / (key + ".dcm")


def test_import_indexes_byte_identical_data_sets_and_counts_duplicates(tmp_path):
    source = tmp_path / "source"
    by_uid = import_corpus(source)
    data_dir = tmp_path / "archive"
    result = pacsd("import", str(source), env=data_env(data_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert summary_counts(result.stdout, ("stored", "duplicates", "failed", "skipped")) == {
        "stored": 5, "duplicates": 1, "failed": 0, "skipped": 1}
    assert "README.txt" in result.stdout  # the skipped file is named

    rows = index_rows(data_dir, "SELECT sop_instance_uid, transfer_syntax_uid, blob_key, dataset_offset, "
                                "calling_ae FROM instances")
    assert {uid for uid, *_ in rows} == set(by_uid)
    for uid, ts, key, offset, calling_ae in rows:
        blob = blob_path(data_dir, key).read_bytes()
        originals = [p for p in by_uid[uid] if read_part10(p).transfer_syntax == ts]
        assert originals, f"{uid} stored in {ts}, which no source file has"
        _, data = dataset_of(originals[0])
        assert blob[offset:] == data
        meta = pydicom.filereader.read_file_meta_info(blob_path(data_dir, key))
        assert meta.MediaStorageSOPInstanceUID == uid
        source_ae = read_part10(originals[0]).source_ae
        assert calling_ae == (source_ae or "IMPORT")
    assert not list((data_dir / "spool").glob("*.spool"))

    again = pacsd("import", str(source), env=data_env(data_dir))
    assert again.returncode == 0, again.stdout + again.stderr
    assert summary_counts(again.stdout, ("stored", "duplicates", "failed", "skipped")) == {
        "stored": 0, "duplicates": 6, "failed": 0, "skipped": 1}
    assert len(index_rows(data_dir, "SELECT pk FROM instances")) == 5
    assert len(list((data_dir / "blobs").glob("*/*/*.dcm"))) == 5


def test_import_failures_are_grouped_and_exit_1(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(sample("CT_small.dcm"), source / "good.dcm")
    raw = sample("MR_small.dcm").read_bytes()
    (source / "cut1.dcm").write_bytes(raw[: len(raw) - 1000])
    (source / "cut2.dcm").write_bytes(raw[: len(raw) - 2000])
    result = pacsd("import", str(source), env=data_env(tmp_path / "archive"))
    assert result.returncode == 1
    assert summary_counts(result.stdout, ("stored", "duplicates", "failed", "skipped")) == {
        "stored": 1, "duplicates": 0, "failed": 2, "skipped": 0}
    assert "2 x 0xC000 (cannot understand): data set cannot be parsed" in result.stdout
    assert len(index_rows(tmp_path / "archive", "SELECT pk FROM instances")) == 1


def test_import_shows_a_progress_bar_on_a_terminal(tmp_path):
    source = tmp_path / "source"
    import_corpus(source)
    output = run_on_terminal([sys.executable, "-m", "pacsd", "import", str(source)],
                             env=data_env(tmp_path / "archive"))
    assert "import [" in output and "7/7" in output
    assert "5 stored" in output


# --- pacsd verify ---------------------------------------------------------------------------


@pytest.fixture
def archive(tmp_path) -> Path:
    source = tmp_path / "source"
    import_corpus(source)
    data_dir = tmp_path / "archive"
    result = pacsd("import", str(source), env=data_env(data_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    return data_dir


def verify(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return pacsd("verify", *args, env=data_env(data_dir))


def problem_count(stdout: str, title: str) -> int:
    m = re.search(rf"^{re.escape(title)}[^:]*: (\d+)$", stdout, re.M)
    assert m, f"no '{title}' line in:\n{stdout}"
    return int(m.group(1))


def test_verify_clean_store(archive):
    result = verify(archive)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "index: 5 instances" in result.stdout
    assert "checked: 5 blobs" in result.stdout
    for title in ("missing blobs", "orphan blobs", "size/checksum mismatches", "leftover spool files"):
        assert problem_count(result.stdout, title) == 0
    assert result.stdout.rstrip().splitlines()[-1].startswith("clean")


def test_verify_missing_blob_then_repair(archive):
    [(key, uid, study_pk)] = index_rows(
        archive, "SELECT i.blob_key, i.sop_instance_uid, s.study_pk FROM instances i "
                 "JOIN series s ON s.pk = i.series_pk WHERE i.sop_instance_uid LIKE '%.12322'")
    [(before,)] = index_rows(archive, f"SELECT num_instances FROM studies WHERE pk = {study_pk}")
    blob_path(archive, key).unlink()

    result = verify(archive)
    assert result.returncode == 1
    assert problem_count(result.stdout, "missing blobs") == 1
    assert key in result.stdout and uid in result.stdout

    repaired = verify(archive, "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "removed 1 index rows of missing blobs" in repaired.stdout
    assert index_rows(archive, f"SELECT pk FROM instances WHERE blob_key = '{key}'") == []
    remaining = index_rows(archive, f"SELECT num_instances FROM studies WHERE pk = {study_pk}")
    assert remaining in ([], [(before - 1,)])  # the study goes when it was its last instance
    total = index_rows(archive, "SELECT COALESCE(SUM(num_instances), 0) FROM studies")[0][0]
    assert total == len(index_rows(archive, "SELECT pk FROM instances")) == 4
    patients_total = index_rows(archive, "SELECT SUM(num_instances) FROM patients")[0][0]
    assert patients_total == 4

    assert verify(archive).returncode == 0


def test_verify_orphan_blob_is_moved_not_deleted(archive):
    [(key,)] = index_rows(archive, "SELECT blob_key FROM instances LIMIT 1")
    stray_key = "20260101/0000/0123456789abcdef0123456789abcdef"
    stray = blob_path(archive, stray_key)
    stray.parent.mkdir(parents=True)
    shutil.copy(blob_path(archive, key), stray)
    content = stray.read_bytes()

    result = verify(archive)
    assert result.returncode == 1
    assert problem_count(result.stdout, "orphan blobs") == 1
    assert str(stray) in result.stdout

    repaired = verify(archive, "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    moved = archive / "orphans" / "20260101" / "0000" / "0123456789abcdef0123456789abcdef.dcm"
    assert moved.read_bytes() == content
    assert not stray.exists()
    assert str(moved) in repaired.stdout
    assert len(index_rows(archive, "SELECT pk FROM instances")) == 5
    assert verify(archive).returncode == 0


def test_verify_checksum_mismatch_is_reported_not_repaired(archive):
    [(key, uid)] = index_rows(archive, "SELECT blob_key, sop_instance_uid FROM instances LIMIT 1")
    path = blob_path(archive, key)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x5A
    path.write_bytes(bytes(data))

    result = verify(archive)
    assert result.returncode == 1
    assert problem_count(result.stdout, "size/checksum mismatches") == 1
    assert key in result.stdout and "sha256" in result.stdout

    repaired = verify(archive, "--repair")
    assert repaired.returncode == 1
    assert "cannot be repaired" in repaired.stdout
    assert path.read_bytes() == bytes(data)  # left alone
    assert len(index_rows(archive, "SELECT pk FROM instances")) == 5

    quick = verify(archive, "--quick")
    assert quick.returncode == 0, quick.stdout
    assert "no checksums" in quick.stdout

    # --quick still sees a size change.
    path.write_bytes(bytes(data[:-2]))
    quick = verify(archive, "--quick")
    assert quick.returncode == 1
    assert problem_count(quick.stdout, "size mismatches") == 1


def test_verify_leftover_spool_files_are_removed_by_repair(archive):
    leftover = archive / "spool" / "0123456789abcdef.spool"
    leftover.write_bytes(b"half a transfer")
    result = verify(archive)
    assert result.returncode == 1
    assert problem_count(result.stdout, "leftover spool files") == 1
    repaired = verify(archive, "--repair")
    assert repaired.returncode == 0, repaired.stdout
    assert not leftover.exists()


def test_verify_without_an_index_is_an_error(tmp_path):
    result = verify(tmp_path / "nothing-here")
    assert result.returncode == 1
    assert "no index database" in result.stderr
    assert not (tmp_path / "nothing-here").exists()


# --- helpers --------------------------------------------------------------------------------


def run_on_terminal(args: list[str], env: dict | None = None, timeout: float = 60) -> str:
    """Run a command with stdout on a pseudo-terminal; return everything it wrote."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PACSD_")}
    full_env.update(env or {})
    full_env["COLUMNS"] = "100"
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdout=slave, stderr=subprocess.STDOUT, env=full_env)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the other side closed
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        proc.wait(10)
    return b"".join(chunks).decode("utf-8", "replace")
