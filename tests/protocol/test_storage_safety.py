"""Storage must not lose, corrupt or misplace data (DESIGN §4), against a live daemon.

Malformed UIDs and data sets cut off mid-element are refused with a status that says why,
and leave nothing behind; a full disk gets A700 and costs nothing already stored; a SIGKILL
in the middle of a stream of C-STOREs loses nothing that was answered with success.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from tests.conftest import Daemon
from tests.dicomdata import (
    CT_IMAGE_STORAGE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    VERIFICATION,
    RawAssociation,
    blob_files,
    blob_path,
    encode,
    image,
    instance_rows,
    launch_daemon,
    query,
    sha256_of,
    stored_dataset,
    uid,
    write_part10,
)

DEFLATED = "1.2.840.10008.1.2.1.99"
CANNOT_UNDERSTAND = 0xC000
OUT_OF_RESOURCES = 0xA700
REPO = Path(__file__).resolve().parents[2]

CONTEXTS = [
    (CT_IMAGE_STORAGE, [EXPLICIT_LE]),
    (CT_IMAGE_STORAGE, [DEFLATED]),
    (VERIFICATION, [IMPLICIT_LE]),
]


@pytest.fixture(autouse=True)
def _quiet_pydicom():
    # Building data sets with malformed UIDs on purpose: pydicom's warnings are expected.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def pacs(tmp_path_factory) -> Daemon:
    """One daemon for the refusals: none of them may leave anything in its data_dir."""
    base = tmp_path_factory.mktemp("storage-safety")
    daemon = launch_daemon(base, "data")
    yield daemon
    daemon.stop()


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def assert_nothing_stored(daemon: Daemon) -> None:
    db = daemon.data_dir / "index.db"
    for table in ("instances", "series", "studies", "patients"):
        assert query(db, f"SELECT count(*) AS n FROM {table}") == [{"n": 0}], table
    assert blob_files(daemon.data_dir) == []
    spool = daemon.data_dir / "spool"
    assert not spool.exists() or list(spool.iterdir()) == []


def assert_only_archive_files_appeared(daemon: Daemon, before: set[Path], after: set[Path]) -> None:
    """Whatever appeared under the test's root is the archive's own: spool, blobs, index."""
    data = daemon.data_dir
    for path in after - before:
        if path == daemon.log_path:
            continue
        inside = path.is_relative_to(data / "spool") or path.is_relative_to(data / "blobs")
        index = path.parent == data and path.name.startswith("index.db")
        assert inside or index, f"a refused C-STORE wrote {path}"


# --- 5. malformed UIDs --------------------------------------------------------------------


BAD_UIDS = {
    "path": "../../etc/passwd",
    "65-chars": "1." + "2" * 63,
    "letters": "1.2.826.0.1.3680043.8.498.12ab",
}
# Where the bad UID goes. "command" puts it in the C-STORE-RQ's Affected SOP Instance UID
# and in the data set's SOP Instance UID (a consistent but malformed sender); the others
# keep a valid command and put it in one data set attribute.
PLACES = {
    "command": ("Affected SOP Instance UID", "SOPInstanceUID"),
    "command-only": ("Affected SOP Instance UID", None),
    "dataset-sop-instance": ("SOPInstanceUID", "SOPInstanceUID"),
    "dataset-study": ("StudyInstanceUID", "StudyInstanceUID"),
    "dataset-series": ("SeriesInstanceUID", "SeriesInstanceUID"),
}


@pytest.mark.parametrize("value_name", list(BAD_UIDS))
@pytest.mark.parametrize("place", list(PLACES))
def test_malformed_uid_refused_with_c000_and_nothing_written(pacs, place, value_name):
    bad = BAD_UIDS[value_name]
    named, attribute = PLACES[place]
    good = uid("bad-uid", place, value_name)
    ds = image(good, uid("bad-uid", "series"), uid("bad-uid", "study"))
    if attribute is not None:
        setattr(ds, attribute, bad)
    command_uid = bad if place.startswith("command") else good
    root = pacs.data_dir.parent
    before = files_under(root)
    with RawAssociation(pacs.port, CONTEXTS) as assoc:
        peer = assoc.peer
        response = assoc.c_store(encode(ds), CT_IMAGE_STORAGE, command_uid)
        assert response["Status"] == CANNOT_UNDERSTAND, response
        comment = response.get("ErrorComment", "")
        # It names the attribute and what is wrong with it (within LO's 64 characters).
        assert named.replace(" ", "").lower() in comment.replace(" ", "").lower(), comment
        assert bad[:16] in comment or "65 characters" in comment, comment
        # The association goes on.
        assert assoc.c_echo() == 0x0000
        assoc.release()
    assert_only_archive_files_appeared(pacs, before, files_under(root))
    assert_nothing_stored(pacs)
    assert not (root / "etc").exists()
    [failed] = pacs.wait_for_event("storage.failed", peer=peer)
    assert failed["status"].startswith("0xC000")
    assert failed["error"].startswith(comment)


# --- 6. data sets cut off mid-element -----------------------------------------------------


def _cut_cases() -> tuple[dict[str, tuple[str, bytes]], str]:
    """({name: (transfer syntax, a data set cut off where no element ends)}, its SOP Instance UID)."""
    sop = uid("cut", "instance")
    ds = image(sop, uid("cut", "series"), uid("cut", "study"), rows=512, columns=512,
               StudyDescription="A DESCRIPTION OF SOME LENGTH")
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "CTHEAD", "99TEST", "CT of the head"
    ds.ProcedureCodeSequence = [code]
    data = encode(ds)
    name_at = data.index(b"\x10\x00\x10\x00PN")  # (0010,0010) Patient's Name, explicit VR
    study_at = data.index(b"\x20\x00\x0d\x00UI")  # (0020,000D) Study Instance UID
    meaning_at = data.index(b"CT of the head")
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = deflater.compress(data) + deflater.flush()
    return {
        "inside-pixel-data": (EXPLICIT_LE, data[:-1000]),
        "inside-a-short-value": (EXPLICIT_LE, data[: name_at + 8 + 3]),
        "inside-an-element-header": (EXPLICIT_LE, data[: study_at + 5]),
        "inside-a-sequence-item": (EXPLICIT_LE, data[: meaning_at + 4]),
        "deflate-stream-cut": (DEFLATED, deflated[: len(deflated) // 2]),
    }, sop


CUT_CASES, CUT_SOP = _cut_cases()


@pytest.mark.parametrize("case", list(CUT_CASES))
def test_truncated_data_set_refused_with_c000_and_nothing_kept(pacs, case):
    syntax, data = CUT_CASES[case]
    with RawAssociation(pacs.port, CONTEXTS) as assoc:
        context = assoc.context_for(CT_IMAGE_STORAGE, syntax)
        response = assoc.c_store(data, CT_IMAGE_STORAGE, CUT_SOP, context_id=context)
        assert response["Status"] == CANNOT_UNDERSTAND, response
        assert response.get("ErrorComment", "").startswith("data set cannot be parsed"), response
        assert assoc.c_echo() == 0x0000
        assoc.release()
    assert_nothing_stored(pacs)


def test_unreadable_attribute_values_do_not_cost_the_instance(start_daemon):
    # A DS with a decimal comma and an IS with a letter, as some modalities send them: the
    # index cannot read them, but the image must be stored, its bytes as received.
    daemon = start_daemon()
    ds = image(uid("unreadable"), uid("unreadable", "series"), uid("unreadable", "study"))
    ds[0x00180050] = RawDataElement(Tag(0x00180050), "DS", 4, b"1,5 ", 0, False, True)
    ds[0x00200011] = RawDataElement(Tag(0x00200011), "IS", 2, b"1A", 0, False, True)
    data = encode(ds)
    assert b"1,5 " in data and b"1A" in data
    with RawAssociation(daemon.port, CONTEXTS) as assoc:
        response = assoc.c_store(data, CT_IMAGE_STORAGE, ds.SOPInstanceUID)
        assoc.release()
    assert response["Status"] == 0x0000, response
    [row] = instance_rows(daemon.data_dir / "index.db")
    assert row["sop_instance_uid"] == ds.SOPInstanceUID
    assert stored_dataset(daemon.data_dir, row) == data
    db = daemon.data_dir / "index.db"
    assert query(db, "SELECT series_number FROM series") == [{"series_number": None}]
    [event] = daemon.wait_for_event("index.unreadable_values_left_out")
    assert sorted(event["tags"]) == ["(0018,0050)", "(0020,0011)"]


# --- 7. a full disk -----------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """A 4 MiB tmpfs of the test's own (needs root, or CAP_SYS_ADMIN)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount(8) here to make a small filesystem for the disk-full test")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        message = result.stderr.strip()
        if os.geteuid() != 0 or "permission" in message.lower() or "not permitted" in message.lower():
            pytest.skip(f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {message}")
        pytest.fail(f"mount -t tmpfs failed: {message}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _big_instance(n: int):
    """About 1 MiB of pixel data (512 x 1024 x 16 bit)."""
    ds = image(uid("full", n), uid("full", "series"), uid("full", "study"), rows=512, columns=1024,
               instance_number=n + 1)
    return ds, encode(ds)


def test_disk_full_answers_a700_and_keeps_what_was_stored(tmpfs, start_daemon, tmp_path):
    daemon = start_daemon(STORAGE__DATA_DIR=str(tmpfs), STORAGE__MIN_FREE_BYTES="0",
                          DATABASE__URL=f"sqlite+aiosqlite:///{tmp_path}/index.db")
    db = tmp_path / "index.db"
    sent: dict[str, bytes] = {}
    with RawAssociation(daemon.port, CONTEXTS) as assoc:
        for n in range(8):
            ds, data = _big_instance(n)
            response = assoc.c_store(data, CT_IMAGE_STORAGE, ds.SOPInstanceUID)
            if response["Status"] != 0x0000:
                break
            sent[ds.SOPInstanceUID] = data
        else:
            pytest.fail("8 MiB went onto a 4 MiB filesystem")
        assert response["Status"] == OUT_OF_RESOURCES, response
        assert response.get("ErrorComment"), response
        failed_uid = ds.SOPInstanceUID
        assert len(sent) >= 1
        assert assoc.c_echo() == 0x0000
        # What the failed one held is freed: a small instance still fits.
        small = image(uid("full", "small"), uid("full", "series"), uid("full", "study"))
        assert assoc.c_store(encode(small), CT_IMAGE_STORAGE, small.SOPInstanceUID)["Status"] == 0
        sent[small.SOPInstanceUID] = encode(small)
        assoc.release()

    rows = {r["sop_instance_uid"]: r for r in instance_rows(db)}
    assert failed_uid not in rows
    assert set(rows) == set(sent)
    for sop, row in rows.items():
        path = blob_path(tmpfs, row["blob_key"])
        assert sha256_of(path) == row["sha256"]
        assert path.stat().st_size == row["size"]
        assert stored_dataset(tmpfs, row) == sent[sop]
    assert sorted(blob_files(tmpfs)) == sorted(blob_path(tmpfs, r["blob_key"]) for r in rows.values())
    assert list((tmpfs / "spool").iterdir()) == []
    [event] = daemon.wait_for_event("storage.failed", sop_instance_uid=failed_uid)
    assert event["status"].startswith("0xA700")
    with RawAssociation(daemon.port, CONTEXTS) as assoc:
        assert assoc.c_echo() == 0x0000
        assoc.release()
    assert daemon.alive
    daemon.stop()


def test_min_free_bytes_refuses_up_front(tmpfs, start_daemon, tmp_path):
    free = os.statvfs(tmpfs).f_bavail * os.statvfs(tmpfs).f_frsize
    daemon = start_daemon(STORAGE__DATA_DIR=str(tmpfs), STORAGE__MIN_FREE_BYTES=str(free + (1 << 20)),
                          DATABASE__URL=f"sqlite+aiosqlite:///{tmp_path}/index.db")
    ds = image(uid("min-free", 1), uid("min-free", "series"), uid("min-free", "study"))
    with RawAssociation(daemon.port, CONTEXTS) as assoc:
        response = assoc.c_store(encode(ds), CT_IMAGE_STORAGE, ds.SOPInstanceUID)
        assert response["Status"] == OUT_OF_RESOURCES, response
        assert "free" in response.get("ErrorComment", "").lower(), response
        assert assoc.c_echo() == 0x0000
        assoc.release()
    assert instance_rows(tmp_path / "index.db") == []
    assert blob_files(tmpfs) == []
    spool = tmpfs / "spool"
    assert not spool.exists() or list(spool.iterdir()) == []
    daemon.stop()


# --- 8. SIGKILL in the middle of a stream -------------------------------------------------


CRASH_CLIENT = """
import sys
from pathlib import Path
from pynetdicom import AE, _config
from tests.dicomdata import CT_IMAGE_STORAGE, EXPLICIT_LE
_config.STORE_SEND_CHUNKED_DATASET = True  # the file's data set bytes, as they are
port, folder = int(sys.argv[1]), Path(sys.argv[2])
ae = AE(ae_title="CRASHSCU")
# pacsd answers in milliseconds; after the SIGKILL pynetdicom may notice only by a timeout.
ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = 3
ae.add_requested_context(CT_IMAGE_STORAGE, EXPLICIT_LE)
assoc = ae.associate("127.0.0.1", port, ae_title="PACSD")
if not assoc.is_established:
    sys.exit("association not established")
assoc._serve_request = lambda msg, context_id: assoc.dimse.msg_queue.put((context_id, msg))
for path in sorted(folder.iterdir()):
    if not assoc.is_established:
        break
    try:
        rsp = assoc.send_c_store(path)
    except Exception as exc:
        print(path.stem, "exception", type(exc).__name__, flush=True)
        break
    status = rsp.get("Status") if rsp else None
    print(path.stem, "none" if status is None else f"{status:04x}", flush=True)
if assoc.is_established:
    assoc.release()
"""

CRASH_TOTAL = 500
BIG = range(300, 310)  # these ten are 4 MiB each: a kill can land while one is spooled


def _send_until_killed(daemon: Daemon, folder: Path, kill_when) -> tuple[dict[str, str], int | None]:
    """Send every file in `folder` with CRASH_CLIENT; SIGKILL the daemon once kill_when(answered).

    Returns ({file stem: status as the client printed it}, answers seen at the kill). The
    condition is checked on every answer and every millisecond in between.
    """
    client = subprocess.Popen([sys.executable, "-c", CRASH_CLIENT, str(daemon.port), str(folder)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in client.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    answered: dict[str, str] = {}
    killed_after = None
    deadline = time.monotonic() + 60
    while True:
        try:
            line = lines.get(timeout=0.001)
        except queue.Empty:
            line = ""
        if line is None:
            break
        if line:
            stem, status = line.split()[:2]
            answered[stem] = status
        if killed_after is None and kill_when(answered):
            daemon.proc.kill()  # SIGKILL: no shutdown, no flush, no cleanup
            killed_after = len(answered)
        assert time.monotonic() < deadline, f"client too slow: {len(answered)} answers in 60 s"
    client.wait(30)
    daemon.proc.wait(10)
    assert killed_after is not None, f"only {len(answered)} answers: {client.stderr.read()[-2000:]}"
    return answered, killed_after


def _spooling(spool: Path) -> bool:
    """A big data set is arriving: a spool file past 64 KiB (the small ones are 8 KiB)."""
    for path in spool.glob("*.spool"):
        try:
            if path.stat().st_size > 64 * 1024:
                return True
        except FileNotFoundError:
            pass  # renamed into the blob store meanwhile
    return False


def _check_after_crash(data_dir: Path, successes: set[str], sent: dict[str, bytes],
                       stem_of: dict[str, str]) -> tuple[set[str], int]:
    """What DESIGN §4 promises after a crash; returns (stems in the index, orphan blobs)."""
    spool = data_dir / "spool"
    assert not spool.exists() or list(spool.iterdir()) == [], "the startup sweep left spool files"
    rows = instance_rows(data_dir / "index.db")
    stored = [r["sop_instance_uid"] for r in rows]
    assert len(stored) == len(set(stored))
    stored_stems = {stem_of[u] for u in stored}
    missing = sorted(successes - stored_stems)
    assert not missing, f"answered 0000 but not in the index after the crash: {missing}"
    # Every row, answered or not, is whole: its blob, its checksum, the bytes as sent.
    for row in rows:
        path = blob_path(data_dir, row["blob_key"])
        assert path.is_file(), f"row without blob: {row['sop_instance_uid']}"
        assert sha256_of(path) == row["sha256"]
        assert stored_dataset(data_dir, row) == sent[stem_of[row["sop_instance_uid"]]]
    referenced = {blob_path(data_dir, r["blob_key"]) for r in rows}
    orphans = [p for p in blob_files(data_dir) if p not in referenced]
    return stored_stems, len(orphans)


def test_sigkill_mid_stream_loses_nothing_that_was_answered(start_daemon, tmp_path):
    outgoing = tmp_path / "outgoing"
    outgoing.mkdir()
    sent: dict[str, bytes] = {}  # file stem -> data set bytes
    stem_of: dict[str, str] = {}  # SOP Instance UID -> file stem
    series, study = uid("crash", "series"), uid("crash", "study")
    for n in range(CRASH_TOTAL):
        size = (1024, 2048) if n in BIG else (64, 64)
        ds = image(uid("crash", n), series, study, instance_number=n + 1, rows=size[0], columns=size[1])
        stem = f"{n:04d}"
        sent[stem] = write_part10(outgoing / f"{stem}.dcm", ds)
        stem_of[ds.SOPInstanceUID] = stem

    def resend(stems: set[str], name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for stem in sorted(stems):
            shutil.copyfile(outgoing / f"{stem}.dcm", folder / f"{stem}.dcm")
        return folder

    # 1. Killed the moment the 150th success is read: anything answered before the commit
    #    (rather than after it) would be missing now.
    daemon = start_daemon()
    data_dir = daemon.data_dir
    answered, at = _send_until_killed(daemon, outgoing, lambda a: len(a) >= 150)
    successes = {stem for stem, status in answered.items() if status == "0000"}
    assert len(successes) >= 150 and len(answered) < CRASH_TOTAL
    again = start_daemon(STORAGE__DATA_DIR=str(data_dir), DATABASE__URL=daemon.env["PACSD_DATABASE__URL"])
    stored, orphans = _check_after_crash(data_dir, successes, sent, stem_of)
    print(f"kill 1 after {at} answers: {len(successes)} successes, {len(stored)} rows, "
          f"{orphans} orphan blob(s)")
    # One association, one request at a time: at most the one in flight is left over.
    assert orphans <= 1

    # 2. The sender carries on with what it got no success for; killed while a 4 MiB data
    #    set is arriving in the spool: the restart sweeps the partial file away.
    spool = data_dir / "spool"
    folder = resend(set(sent) - successes, "second")
    answered, at = _send_until_killed(
        again, folder,
        lambda a: _spooling(spool))
    left_in_spool = list(spool.glob("*.spool"))
    assert left_in_spool, "the kill was meant to land while a data set was spooled"
    successes |= {stem for stem, status in answered.items() if status == "0000"}
    restarted = start_daemon(STORAGE__DATA_DIR=str(data_dir), DATABASE__URL=daemon.env["PACSD_DATABASE__URL"])
    [swept] = restarted.wait_for_event("spool.swept")
    assert swept["removed"] == len(left_in_spool)
    stored, orphans2 = _check_after_crash(data_dir, successes, sent, stem_of)
    print(f"kill 2 after {at} answers with {len(left_in_spool)} spool file(s): {len(successes)} "
          f"successes, {len(stored)} rows, {orphans2} orphan blob(s)")
    assert orphans2 <= orphans + 1

    # 3. It retries everything still unanswered: now all of it is stored, exactly once.
    folder = resend(set(sent) - successes, "third")
    result = subprocess.run([sys.executable, "-c", CRASH_CLIENT, str(restarted.port), str(folder)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    retried = dict(line.split()[:2] for line in result.stdout.splitlines())
    assert retried == {stem: "0000" for stem in sorted(set(sent) - successes)}
    rows = instance_rows(data_dir / "index.db")
    assert sorted(stem_of[r["sop_instance_uid"]] for r in rows) == sorted(sent)
    for row in rows:
        assert stored_dataset(data_dir, row) == sent[stem_of[row["sop_instance_uid"]]]
    db = data_dir / "index.db"
    assert query(db, "SELECT num_instances FROM series") == [{"num_instances": CRASH_TOTAL}]
    restarted.stop()

    # pacsd verify: the crashes' leftovers are repairable, and after the repair all is clean.
    verify = [sys.executable, "-m", "pacsd", "verify"]
    repair = subprocess.run(verify + ["--repair"], env=restarted.env, capture_output=True, text=True,
                            timeout=120)
    assert repair.returncode == 0, repair.stdout + repair.stderr
    check = subprocess.run(verify, env=restarted.env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert len(blob_files(data_dir)) == CRASH_TOTAL
