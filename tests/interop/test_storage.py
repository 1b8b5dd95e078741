"""Storage SCP against real peers: DCMTK storescu and storescp, dicom3tools' dciodvfy, pynetdicom.

What a sender put on the wire is captured independently of pacsd: the same files go with the
same storescu options to DCMTK's storescp in bit-preserving mode (+B), which writes each data
set exactly as received. pacsd's blob must hold those very bytes after its own file meta.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pynetdicom import AE

from tests.conftest import Daemon, dcmtk, free_port, wait_for_port
from tests.dicomdata import (
    CT_IMAGE_STORAGE,
    EXPLICIT_LE,
    LOAD_INSTANCES_PER_SERIES,
    LOAD_MODALITIES,
    LOAD_SERIES_PER_STUDY,
    LOAD_STUDIES,
    LOAD_TOTAL,
    blob_files,
    blob_path,
    dataset_bytes,
    image,
    instance_rows,
    launch_daemon,
    load_plan,
    query,
    sha256_of,
    stored_dataset,
    uid,
)

pytestmark = pytest.mark.interop

CALLING_AE = "DCMTKSCU"
REPO = Path(__file__).resolve().parents[2]
TEST_FILES = Path(get_testdata_file("CT_small.dcm")).parent

# One storescu option per transfer syntax, so that each file travels in its own syntax:
# with -R storescu proposes, per SOP class, the option's syntax in a context of its own
# (plus a context of the uncompressed fallbacks), and it sends a file on the context whose
# syntax is the file's. -x= would offer explicit LE first and decompress or convert the rest.
STORESCU_SYNTAX_OPTION = {
    "1.2.840.10008.1.2": "-xi",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1": "-xe",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.2": "-xb",  # Explicit VR Big Endian
    "1.2.840.10008.1.2.1.99": "-xd",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG Extended
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "-xu",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
    "1.2.840.10008.1.2.5": "-xr",  # RLE Lossless
}

# The corpus is every file pydicom ships (get_testdata_files() without network access) that
# pydicom reads without force=True, whose file meta has a Transfer Syntax UID and whose data
# set has SOP Class, SOP Instance, Study and Series Instance UIDs. Left out by that rule
# (pydicom 3.0): files pydicom cannot read as DICOM (README*, *.json, *.dump, crayons.icc,
# zipMR.gz, no_meta.dcm and ExplVR_{Lit,Big}EndNoMeta.dcm without a preamble, rtstruct.dcm)
# and the directories among the results; meta_missing_tsyntax.dcm (no Transfer Syntax UID);
# the DICOMDIRs, priv_SQ.dcm, nested_priv_SQ.dcm, no_meta_group_length.dcm,
# empty_charset_LEI.dcm and UN_sequence.dcm (no SOP/Study/Series UIDs: not storable
# instances); and the four JPEG-LS near-lossless files (JPEGLSNearLossless_{08,16}.dcm,
# SC_rgb_jls_lossy_{line,sample}.dcm), which lack Study and Series Instance UIDs, so no
# archive can file them.
#
# Readable files that cannot take part, and why:
NOT_SENT = {
    "MR_truncated.dcm": "pixel data cut short: storescu cannot read the file and skips it",
    "rtplan_truncated.dcm": "cut short inside a sequence: storescu cannot read it and skips it",
    "rtdose_rle.dcm": "implicit VR data set under the explicit VR RLE syntax: DCMTK reads its "
                      "SOP UIDs as UN and storescu skips the file",
    "rtdose_rle_1frame.dcm": "as rtdose_rle.dcm",
    "SC_rgb_jpeg.dcm": "implicit VR data set under the explicit VR JPEG syntax: DCMTK cannot "
                       "parse it and storescu skips it",
}
# (badVR.dcm, whose Number of Frames is "1A", is sent: pacsd must store it as received.)


@dataclass
class CorpusFile:
    path: Path
    name: str  # relative to pydicom's test_files
    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str


def corpus() -> list[CorpusFile]:
    files = []
    for path in sorted(Path(p) for p in get_testdata_files()):
        if not path.is_file() or path.name in NOT_SENT:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        ts = ds.file_meta.get("TransferSyntaxUID")
        keys = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        if ts is None or any(not ds.get(k) for k in keys):
            continue
        name = str(path.relative_to(TEST_FILES)) if path.is_relative_to(TEST_FILES) else path.name
        files.append(CorpusFile(path, name, str(ts), str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    return files


def rounds(files: list[CorpusFile]) -> list[list[CorpusFile]]:
    """Rounds in which no SOP Instance UID repeats: round k holds the k-th file of each UID.

    pydicom ships one image in many encodings under one UID (MR_small.dcm in nine). Sent in
    one go, all but one would be duplicates; round by round, each is stored and checked.
    """
    by_uid: dict[str, list[CorpusFile]] = collections.defaultdict(list)
    for f in files:
        by_uid[f.sop_instance_uid].append(f)
    depth = max(len(group) for group in by_uid.values())
    return [[group[k] for group in by_uid.values() if len(group) > k] for k in range(depth)]


# --- running storescu ---------------------------------------------------------------------


_SENDING = re.compile(r"^I: Sending file: (.+)$")
_RESPONSE = re.compile(r"^I: Received Store Response \((.+)\)$")


def storescu(port: int, called_ae: str, transfer_syntax: str, paths: list[Path]) -> subprocess.Popen:
    return subprocess.Popen(
        [dcmtk("storescu"), "-v", "-R", "-nh", STORESCU_SYNTAX_OPTION[transfer_syntax],
         "-aet", CALLING_AE, "-aec", called_ae, "-to", "10", "-ta", "10", "-td", "60",
         "127.0.0.1", str(port), *map(str, paths)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def statuses(output: str) -> dict[str, str]:
    """File path -> the status storescu reported for it ("Success", "Error: ...")."""
    out: dict[str, str] = {}
    current = None
    for line in output.splitlines():
        if m := _SENDING.match(line):
            current = m.group(1)
            out[current] = "no response"
        elif (m := _RESPONSE.match(line)) and current is not None:
            out[current] = m.group(1)
    return out


def problems_in(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(("E:", "F:"))]


# --- the corpus run ---------------------------------------------------------------------


@dataclass
class Sent:
    file: CorpusFile
    pacsd_status: str = "not sent"
    storescp_status: str = "not sent"
    row: dict | None = None
    stored_copy: Path | None = None  # the blob as it was right after the file's round
    stored_dataset: bytes | None = None
    storescp_dataset: bytes | None = None
    storescp_syntax: str | None = None


@dataclass
class CorpusRun:
    daemon: Daemon
    sent: list[Sent]
    outputs: list[str] = field(default_factory=list)  # every storescu run's output


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory) -> CorpusRun:
    """Every corpus file sent by storescu to pacsd and to storescp +B, round by round.

    pacsd runs with duplicates = "overwrite", so that each round's files replace the
    previous round's files of the same UID; each file's blob is copied away and compared
    before the next round replaces it.
    """
    base = tmp_path_factory.mktemp("storage-interop")
    scp_dir = base / "storescp"
    scp_dir.mkdir()
    copies = base / "stored"
    copies.mkdir()
    scp_port = free_port()
    scp = subprocess.Popen(
        [dcmtk("storescp"), "+B", "+xa", "-pm", "-aet", "STORESCP", "-od", str(scp_dir), str(scp_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    daemon = launch_daemon(base, "data", STORAGE__DUPLICATES="overwrite")
    run = CorpusRun(daemon, [])
    try:
        wait_for_port(scp_port, scp)
        for number, files in enumerate(rounds(corpus())):
            for stale in scp_dir.iterdir():
                stale.unlink()
            by_syntax: dict[str, list[Sent]] = collections.defaultdict(list)
            for f in files:
                sent = Sent(f)
                run.sent.append(sent)
                by_syntax[f.transfer_syntax].append(sent)
            for ts, group in by_syntax.items():
                if ts not in STORESCU_SYNTAX_OPTION:
                    pytest.fail(f"no storescu option for transfer syntax {ts} ({group[0].file.name})")
                paths = [s.file.path for s in group]
                to_pacsd = storescu(daemon.port, "PACSD", ts, paths)
                to_scp = storescu(scp_port, "STORESCP", ts, paths)
                pacsd_out = to_pacsd.communicate(timeout=120)[0]
                scp_out = to_scp.communicate(timeout=120)[0]
                run.outputs += [pacsd_out, scp_out]
                pacsd_statuses, scp_statuses = statuses(pacsd_out), statuses(scp_out)
                for s in group:
                    s.pacsd_status = pacsd_statuses.get(str(s.file.path), "not sent")
                    s.storescp_status = scp_statuses.get(str(s.file.path), "not sent")
            received = {}
            for path in scp_dir.iterdir():
                meta = pydicom.filereader.read_file_meta_info(path)
                received[str(meta.MediaStorageSOPInstanceUID)] = (path, str(meta.TransferSyntaxUID))
            rows = {r["sop_instance_uid"]: r for r in instance_rows(daemon.data_dir / "index.db")}
            for s in run.sent[len(run.sent) - len(files):]:
                uid_ = s.file.sop_instance_uid
                if uid_ in received:
                    path, s.storescp_syntax = received[uid_]
                    s.storescp_dataset = dataset_bytes(path)
                s.row = rows.get(uid_)
                if s.row is not None:
                    s.stored_copy = copies / f"{number}-{len(os.listdir(copies))}.dcm"
                    shutil.copyfile(blob_path(daemon.data_dir, s.row["blob_key"]), s.stored_copy)
                    s.stored_dataset = stored_dataset(daemon.data_dir, s.row)
        yield run
    finally:
        scp.terminate()
        scp.wait(10)
        daemon.stop()


def test_storescu_corpus_is_stored_byte_for_byte_in_every_transfer_syntax(corpus_run):
    sent = corpus_run.sent
    syntaxes = {s.file.transfer_syntax for s in sent}
    # Every syntax the corpus must exercise; if a pydicom release drops one, say so.
    assert syntaxes >= {
        "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.5",
    }, syntaxes
    assert len(sent) > 100
    failures = []
    for s in sent:
        name = s.file.name
        if s.storescp_status != "Success" or s.storescp_dataset is None:
            failures.append(f"{name}: the reference storescp got {s.storescp_status}")
            continue
        if s.storescp_syntax != s.file.transfer_syntax:
            failures.append(f"{name}: storescu sent it to the reference storescp as {s.storescp_syntax}")
            continue
        if s.pacsd_status != "Success":
            failures.append(f"{name}: pacsd answered {s.pacsd_status}")
            continue
        if s.row is None:
            failures.append(f"{name}: success, but no index row for {s.file.sop_instance_uid}")
            continue
        if s.row["transfer_syntax_uid"] != s.file.transfer_syntax:
            failures.append(f"{name}: stored as {s.row['transfer_syntax_uid']}, "
                            f"sent as {s.file.transfer_syntax}")
        if s.stored_dataset != s.storescp_dataset:
            a, b = s.stored_dataset, s.storescp_dataset
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            failures.append(f"{name}: stored data set differs from what was sent at byte {at} "
                            f"(stored {len(a)} bytes, sent {len(b)})")
    assert not failures, "\n".join(failures)
    for output in corpus_run.outputs:
        assert not problems_in(output), output
    # Exactly one row per distinct SOP Instance UID, and nothing else.
    db = corpus_run.daemon.data_dir / "index.db"
    rows = instance_rows(db)
    assert sorted(r["sop_instance_uid"] for r in rows) == sorted({s.file.sop_instance_uid for s in sent})
    # Overwrites moved instances between series and studies; the counters still add up.
    assert query(db, """SELECT s.series_instance_uid FROM series s
                        WHERE s.num_instances != (SELECT count(*) FROM instances i WHERE i.series_pk = s.pk)
                           OR s.num_instances = 0""") == []
    assert query(db, """SELECT st.study_instance_uid FROM studies st
                        WHERE st.num_series != (SELECT count(*) FROM series s WHERE s.study_pk = st.pk)
                           OR st.num_instances != (SELECT count(*) FROM instances i
                                                   JOIN series s ON i.series_pk = s.pk
                                                   WHERE s.study_pk = st.pk)""") == []
    # Every overwritten blob is gone: one blob file per row.
    assert len(blob_files(corpus_run.daemon.data_dir)) == len(rows)


# --- dciodvfy -----------------------------------------------------------------------------


DCIODVFY_FILES = [
    "CT_small.dcm",  # explicit VR LE
    "MR_small.dcm",  # explicit VR LE
    "MR_small_implicit.dcm",  # implicit VR LE
    "MR_small_bigendian.dcm",  # explicit VR BE
    "image_dfl.dcm",  # deflated
    "SC_rgb_dcmtk_+eb+cy+np.dcm",  # JPEG Baseline
    "JPEG-lossy.dcm",  # JPEG Extended
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG Lossless SV1
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS Lossless
    "MR_small_jp2klossless.dcm",  # JPEG 2000 Lossless
    "JPEG2000.dcm",  # JPEG 2000
    "MR_small_RLE.dcm",  # RLE
    "SC_rgb_rle.dcm",  # RLE, colour
    "SC_rgb_rle_2frame.dcm",  # RLE, multi-frame
    "rtplan.dcm",  # nested sequences, no pixel data
]


def dciodvfy_errors(path: Path) -> set[str]:
    result = subprocess.run(["/usr/bin/dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    return {line.replace(str(path), "<file>") for line in lines if line.startswith("Error")}


@pytest.mark.parametrize("name", DCIODVFY_FILES)
def test_stored_file_is_as_valid_as_the_original(corpus_run, name):
    if not Path("/usr/bin/dciodvfy").exists():
        pytest.fail("/usr/bin/dciodvfy missing: install dicom3tools")
    [sent] = [s for s in corpus_run.sent if s.file.name == name]
    assert sent.pacsd_status == "Success" and sent.stored_copy is not None, sent.pacsd_status
    original = dciodvfy_errors(sent.file.path)
    stored = dciodvfy_errors(sent.stored_copy)
    assert stored <= original, f"errors only in the stored file: {sorted(stored - original)}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(sent.stored_copy)
        original = pydicom.dcmread(sent.file.path)
    # Read back, it is the instance that was sent: every element, every value. (storescu
    # drops Data Set Trailing Padding, and sends encapsulated Pixel Data that a file labels
    # OW as OB, so the padding is left out and top-level VRs are not compared.)
    def values(d):
        return {e.tag: e.value for e in d if e.tag != 0xFFFCFFFC}

    assert values(ds) == values(original)
    meta = ds.file_meta
    assert meta.SourceApplicationEntityTitle.strip() == CALLING_AE
    assert meta.MediaStorageSOPInstanceUID == sent.file.sop_instance_uid
    assert meta.MediaStorageSOPClassUID == sent.file.sop_class_uid
    assert meta.TransferSyntaxUID == sent.file.transfer_syntax
    assert ds.SOPInstanceUID == sent.file.sop_instance_uid


# --- concurrency: 8 associations x 250 instances -------------------------------------------


LOAD_CLIENT = """
import json, sys
from pynetdicom import AE
from tests.dicomdata import EXPLICIT_LE, LOAD_TOTAL, SOP_CLASS_OF_MODALITY, load_instance
port, client, clients = map(int, sys.argv[1:4])
datasets = [load_instance(i) for i in range(client, LOAD_TOTAL, clients)]
ae = AE(ae_title=f"LOAD{client}")
ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = 60
for sop_class in sorted(set(SOP_CLASS_OF_MODALITY.values())):
    ae.add_requested_context(sop_class, EXPLICIT_LE)
assoc = ae.associate("127.0.0.1", port, ae_title="PACSD")
if not assoc.is_established:
    sys.exit("association not established")
# pynetdicom's reactor thread can take a response off the queue before send_c_store()
# reads it (a fast peer makes it likely): this client serves no requests, so hand anything
# the reactor takes straight back to the queue.
assoc._serve_request = lambda msg, context_id: assoc.dimse.msg_queue.put((context_id, msg))
statuses = {}
for ds in datasets:
    rsp = assoc.send_c_store(ds)
    statuses[str(ds.SOPInstanceUID)] = rsp.get("Status", -1) if rsp else -1
assoc.release()
print(json.dumps(statuses))
"""


def test_eight_concurrent_associations_store_2000_instances_with_exact_counters(daemon):
    clients = 8
    procs = [
        subprocess.Popen([sys.executable, "-c", LOAD_CLIENT, str(daemon.port), str(n), str(clients)],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in range(clients)
    ]
    outputs = [p.communicate(timeout=180) for p in procs]
    statuses: dict[str, int] = {}
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
        statuses.update(json.loads(out))
    plan = [load_plan(i) for i in range(LOAD_TOTAL)]
    assert len(statuses) == LOAD_TOTAL
    assert {s for s in statuses.values()} == {0x0000}, collections.Counter(statuses.values())

    db = daemon.data_dir / "index.db"
    rows = query(db, """SELECT i.sop_instance_uid, i.sop_class_uid, s.series_instance_uid,
                               st.study_instance_uid, p.patient_id
                        FROM instances i JOIN series s ON i.series_pk = s.pk
                        JOIN studies st ON s.study_pk = st.pk JOIN patients p ON st.patient_pk = p.pk""")
    assert len(rows) == LOAD_TOTAL
    assert {r["sop_instance_uid"]: (r["series_instance_uid"], r["study_instance_uid"], r["patient_id"],
                                    r["sop_class_uid"]) for r in rows} == {
        p["sop_instance_uid"]: (p["series_instance_uid"], p["study_instance_uid"], p["patient_id"],
                                p["sop_class_uid"]) for p in plan}

    series = {r["series_instance_uid"]: r for r in query(db, "SELECT * FROM series")}
    assert len(series) == LOAD_STUDIES * LOAD_SERIES_PER_STUDY
    for p in plan[::LOAD_INSTANCES_PER_SERIES]:
        row = series[p["series_instance_uid"]]
        assert (row["num_instances"], row["modality"]) == (LOAD_INSTANCES_PER_SERIES, p["modality"])

    studies = {r["study_instance_uid"]: r for r in query(db, "SELECT * FROM studies")}
    assert len(studies) == LOAD_STUDIES
    per_study = LOAD_SERIES_PER_STUDY * LOAD_INSTANCES_PER_SERIES
    for k in range(LOAD_STUDIES):
        row = studies[plan[k * per_study]["study_instance_uid"]]
        in_study = plan[k * per_study:(k + 1) * per_study]
        assert row["num_series"] == LOAD_SERIES_PER_STUDY
        assert row["num_instances"] == per_study
        assert row["modalities_in_study"] == "\\".join(sorted(set(LOAD_MODALITIES[k])))
        assert row["sop_classes_in_study"] == "\\".join(sorted({p["sop_class_uid"] for p in in_study}))

    patients = query(db, "SELECT patient_id, num_studies, num_series, num_instances FROM patients "
                         "ORDER BY patient_id")
    assert patients == [
        {"patient_id": f"LOAD-{n}", "num_studies": 2, "num_series": 2 * LOAD_SERIES_PER_STUDY,
         "num_instances": 2 * per_study}
        for n in range(LOAD_STUDIES // 2)
    ]
    assert len(blob_files(daemon.data_dir)) == LOAD_TOTAL
    assert not list((daemon.data_dir / "spool").glob("*"))


# --- duplicates ---------------------------------------------------------------------------


def _store_twice(daemon: Daemon) -> tuple[list, str, list[dict], list[dict]]:
    """Store one instance, then another with the same SOP Instance UID and other content.

    Returns (the two response status data sets, the UID, the rows after the first store,
    the rows after the second).
    """
    sop, series, study = uid("dup", "instance"), uid("dup", "series"), uid("dup", "study")
    first = image(sop, series, study, PatientComments="FIRST COPY")
    second = image(sop, series, study, PatientComments="SECOND COPY")
    ae = AE(ae_title="DUPSCU")
    ae.add_requested_context(CT_IMAGE_STORAGE, EXPLICIT_LE)
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="PACSD")
    assert assoc.is_established
    assoc._serve_request = lambda msg, context_id: assoc.dimse.msg_queue.put((context_id, msg))
    db = daemon.data_dir / "index.db"
    try:
        responses = [assoc.send_c_store(first)]
        rows_first = instance_rows(db)
        responses.append(assoc.send_c_store(second))
    finally:
        assoc.release()
    return responses, sop, rows_first, instance_rows(db)


def _comments(daemon: Daemon, row: dict) -> str:
    return str(pydicom.dcmread(blob_path(daemon.data_dir, row["blob_key"])).PatientComments)


def _counters(daemon: Daemon) -> list:
    db = daemon.data_dir / "index.db"
    return [
        query(db, "SELECT num_instances FROM series"),
        query(db, "SELECT num_series, num_instances FROM studies"),
        query(db, "SELECT num_studies, num_series, num_instances FROM patients"),
    ]


ONE_OF_EACH = [[{"num_instances": 1}], [{"num_series": 1, "num_instances": 1}],
               [{"num_studies": 1, "num_series": 1, "num_instances": 1}]]


def test_duplicate_keep_is_the_default(daemon):
    responses, sop, before, after = _store_twice(daemon)
    assert [r.Status for r in responses] == [0x0000, 0x0000]
    assert len(after) == 1 and after == before
    assert _comments(daemon, after[0]) == "FIRST COPY"
    assert _counters(daemon) == ONE_OF_EACH
    assert blob_files(daemon.data_dir) == [blob_path(daemon.data_dir, after[0]["blob_key"])]
    [event] = daemon.wait_for_event("ingest.duplicate_kept", sop_instance_uid=sop)
    assert event["calling_ae"] == "DUPSCU"


def test_duplicate_overwrite_replaces_blob_and_row(start_daemon):
    daemon = start_daemon(STORAGE__DUPLICATES="overwrite")
    responses, sop, before, after = _store_twice(daemon)
    assert [r.Status for r in responses] == [0x0000, 0x0000]
    assert len(before) == 1 and len(after) == 1
    assert after[0]["sop_instance_uid"] == sop
    assert after[0]["blob_key"] != before[0]["blob_key"]
    assert _comments(daemon, after[0]) == "SECOND COPY"
    assert after[0]["sha256"] == sha256_of(blob_path(daemon.data_dir, after[0]["blob_key"]))
    assert not blob_path(daemon.data_dir, before[0]["blob_key"]).exists()
    assert blob_files(daemon.data_dir) == [blob_path(daemon.data_dir, after[0]["blob_key"])]
    assert _counters(daemon) == ONE_OF_EACH
    assert daemon.wait_for_event("ingest.duplicate_overwritten", sop_instance_uid=sop)


def test_duplicate_reject_answers_0111_and_keeps_first(start_daemon):
    daemon = start_daemon(STORAGE__DUPLICATES="reject")
    responses, sop, before, after = _store_twice(daemon)
    assert responses[0].Status == 0x0000
    assert responses[1].Status == 0x0111
    assert "already stored" in str(responses[1].get("ErrorComment", "")), responses[1]
    assert after == before and len(after) == 1
    assert _comments(daemon, after[0]) == "FIRST COPY"
    assert blob_files(daemon.data_dir) == [blob_path(daemon.data_dir, after[0]["blob_key"])]
    assert _counters(daemon) == ONE_OF_EACH
    [event] = daemon.wait_for_event("ingest.duplicate_rejected", sop_instance_uid=sop)
    assert event["calling_ae"] == "DUPSCU"
