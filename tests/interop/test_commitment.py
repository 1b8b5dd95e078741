"""Storage Commitment Push Model SCP (PS3.4 J.3) and `pacsd commit`, with pynetdicom as the
modality (DCMTK has no storage commitment tool).

One pacsd serves most tests. Its archive holds a few small CT and MR instances; the peer
MODALITY2 is a port reserved when it starts, where the test that needs it starts a pynetdicom
SCP to take the report on a new association. Requesters use AE titles of their own, so a
report meant for one test never reaches another's peer. The restart and expiry tests run
their own daemon.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification

from pacsd.net.commitscu import build_action
from tests.conftest import free_port, launch_daemon, store_files
from tests.dicomdata import (
    CT_IMAGE_STORAGE,
    EXPLICIT_LE,
    MR_IMAGE_STORAGE,
    RawAssociation,
    blob_path,
    encode,
    image,
    query,
    uid,
    write_part10,
)

pytestmark = pytest.mark.interop

SOP_INSTANCE = "1.2.840.10008.1.20.1.1"
STUDY = uid("commit", "study")
SERIES_CT = uid("commit", "series", "ct")
SERIES_MR = uid("commit", "series", "mr")
# Instances stored in the module's archive, by group: the tests below each use their own.
GROUPS = {"ok": 3, "mixed": 2, "corrupt": 3, "cli": 2, "dup": 1, "late": 2}


@dataclass
class Archive:
    daemon: object
    files: dict[str, list[Path]]  # group -> Part 10 files
    refs: dict[str, list[tuple[str, str]]]  # group -> (SOP class, SOP instance)
    report_port: int  # MODALITY2's port

    @property
    def port(self) -> int:
        return self.daemon.port

    def transaction(self, transaction_uid: str) -> dict:
        rows = query(self.daemon.data_dir / "index.db",
                     "SELECT * FROM commitment_transactions WHERE transaction_uid = ?", transaction_uid)
        return rows[0] if rows else {}


def _write(directory: Path, tag: str) -> tuple[dict, dict]:
    files: dict[str, list[Path]] = {}
    refs: dict[str, list[tuple[str, str]]] = {}
    number = 0
    for group, count in GROUPS.items():
        for n in range(count):
            number += 1
            modality = "MR" if group == "mixed" and n == 1 else "CT"
            series = SERIES_MR if modality == "MR" else SERIES_CT
            sop = uid("commit", tag, group, n)
            ds = image(sop, series, uid("commit", tag, "study"), modality=modality,
                       instance_number=number, series_number=2 if modality == "MR" else 1,
                       rows=16, columns=16)
            path = directory / f"{group}-{n}.dcm"
            write_part10(path, ds)
            files.setdefault(group, []).append(path)
            refs.setdefault(group, []).append((ds.SOPClassUID, sop))
    return files, refs


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Archive:
    base = tmp_path_factory.mktemp("commitment")
    report_port = free_port()
    peers = [{"ae_title": "MODALITY2", "host": "127.0.0.1", "port": report_port}]
    daemon = launch_daemon(base, "pacsd", PEERS=json.dumps(peers),
                           COMMITMENT__RETRY_SECONDS="0.5", COMMITMENT__MAX_RETRY_SECONDS="2")
    try:
        directory = base / "files"
        directory.mkdir()
        files, refs = _write(directory, "module")
        store_files(daemon, [p for paths in files.values() for p in paths])
        yield Archive(daemon, files, refs, report_port)
    finally:
        daemon.stop()


# --- pynetdicom as the modality ------------------------------------------------------------


@dataclass
class Received:
    event_type: int
    info: Dataset
    calling_ae: str = ""
    pacsd_is_scp: bool | None = None  # the role pacsd got on the report's association


def action_information(transaction_uid: str | None, refs) -> Dataset:
    return build_action(transaction_uid, refs)


@dataclass
class Outcome:
    status: int
    comment: str
    reports: list[Received] = field(default_factory=list)  # on the requesting association
    row_at_response: dict = field(default_factory=dict)


def request(port: int, info: Dataset, *, aet: str, release_at_once: bool = False,
            answer: int | None = None, action_type: int = 1, instance: str = SOP_INSTANCE,
            wait: float = 15.0, row_of=None) -> Outcome:
    """One N-ACTION from a pynetdicom modality; unless `release_at_once`, wait on the same
    association for a report (answered with `answer`, 0000 by default).

    A requester that releases at once refuses (0110) a report that still makes it onto the
    requesting association before its A-RELEASE-RQ does, so that the report always ends up
    on a new association, whichever side wins that race."""
    if answer is None:
        answer = 0x0110 if release_at_once else 0x0000
    reports: list[Received] = []
    got = threading.Event()

    def on_report(event):
        reports.append(Received(event.event_type, event.event_information))
        got.set()
        return answer, None

    ae = AE(ae_title=aet)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSD",
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    assert assoc.is_established
    try:
        status, _reply = assoc.send_n_action(info, action_type, StorageCommitmentPushModel, instance)
        if release_at_once:
            assoc.release()
        outcome = Outcome(status.Status, str(status.get("ErrorComment", "")))
        if row_of is not None:
            outcome.row_at_response = row_of(str(info.get("TransactionUID", "")))
        if not release_at_once and outcome.status == 0x0000:
            got.wait(wait)
        outcome.reports = reports
    finally:
        if assoc.is_established:
            assoc.release()
    return outcome


class ReportSCP:
    """The modality's side for reports on a new association: a pynetdicom AE that accepts
    pacsd as SCP of the Storage Commitment Push Model (SCP/SCU role selection)."""

    def __init__(self, port: int, ae_title: str, answer: int = 0x0000) -> None:
        self.reports: list[Received] = []
        self.answer = answer
        self._got = threading.Condition()
        ae = AE(ae_title=ae_title)
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
        self.server = ae.start_server(("127.0.0.1", port), block=False,
                                      evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_report)])

    def _on_report(self, event):
        (context,) = [cx for cx in event.assoc.accepted_contexts
                      if cx.context_id == event.context.context_id]
        received = Received(event.event_type, event.event_information,
                            event.assoc.requestor.ae_title.strip(),
                            # pynetdicom's roles are its own: it is SCU when pacsd is SCP
                            bool(context.as_scu) and not context.as_scp)
        with self._got:
            self.reports.append(received)
            self._got.notify_all()
        return self.answer, None

    def wait(self, transaction_uid: str, timeout: float = 15.0) -> Received | None:
        deadline = time.monotonic() + timeout
        with self._got:
            while True:
                for r in self.reports:
                    if r.info.TransactionUID == transaction_uid:
                        return r
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._got.wait(left)

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def report_scp():
    started: list[ReportSCP] = []

    def start(port: int, ae_title: str, answer: int = 0x0000) -> ReportSCP:
        scp = ReportSCP(port, ae_title, answer)
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.close()


def refs_in(ds: Dataset, keyword: str) -> list[tuple[str, str]]:
    return [(item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID) for item in ds.get(keyword) or []]


def reasons(ds: Dataset) -> dict[str, int]:
    return {item.ReferencedSOPInstanceUID: item.FailureReason for item in ds.get("FailedSOPSequence") or []}


# --- the SCP ------------------------------------------------------------------------------


def test_stored_instances_are_committed_on_the_same_association(archive):
    refs = archive.refs["ok"]
    transaction = str(generate_uid())
    outcome = request(archive.port, action_information(transaction, refs), aet="MODALITY1",
                      row_of=archive.transaction)
    assert outcome.status == 0x0000, outcome.comment
    # Persisted before the N-ACTION-RSP: the row is there the moment the response is.
    assert outcome.row_at_response["transaction_uid"] == transaction
    assert json.loads(outcome.row_at_response["requested"]) == [list(r) for r in refs]
    assert len(outcome.reports) == 1
    report = outcome.reports[0]
    assert report.event_type == 1
    assert report.info.TransactionUID == transaction
    assert refs_in(report.info, "ReferencedSOPSequence") == refs
    assert "FailedSOPSequence" not in report.info
    assert {item.RetrieveAETitle for item in report.info.ReferencedSOPSequence} == {"PACSD"}
    sent = archive.daemon.wait_for_event("commitment.report_sent", transaction_uid=transaction)
    assert sent and sent[0]["via"] == "requesting association"
    row = archive.transaction(transaction)
    assert row["state"] == "delivered" and row["attempts"] == 1 and row["calling_ae"] == "MODALITY1"
    assert json.loads(row["result"]) == {"success": [list(r) for r in refs], "failed": []}


def test_report_goes_on_a_new_association_after_release(archive, report_scp):
    scp = report_scp(archive.report_port, "MODALITY2")
    refs = archive.refs["late"]
    transaction = str(generate_uid())
    outcome = request(archive.port, action_information(transaction, refs), aet="MODALITY2",
                      release_at_once=True)
    assert outcome.status == 0x0000, outcome.comment
    report = scp.wait(transaction)
    assert report is not None, archive.daemon.events("commitment.report_failed")
    assert report.event_type == 1
    assert refs_in(report.info, "ReferencedSOPSequence") == refs
    assert report.calling_ae == "PACSD"
    assert report.pacsd_is_scp, "pacsd should have proposed, and got, the SCP role"
    sent = archive.daemon.wait_for_event("commitment.report_sent", transaction_uid=transaction)
    assert sent and sent[0]["via"].startswith("new association to MODALITY2")
    assert archive.transaction(transaction)["state"] == "delivered"


def test_report_unanswered_on_the_requesting_association_goes_to_a_new_one(archive, report_scp):
    """The requester gets the report on its association but releases without answering it:
    pacsd counts it as not delivered and sends it on a new association at once."""
    scp = report_scp(archive.report_port, "MODALITY2")
    refs = archive.refs["late"]
    transaction = str(generate_uid())
    with RawAssociation(archive.port, [(StorageCommitmentPushModel, [EXPLICIT_LE])],
                        calling_ae="MODALITY2") as raw:
        raw.send(raw.context_for(StorageCommitmentPushModel), {
            "CommandField": 0x0130, "MessageID": 7, "RequestedSOPClassUID": StorageCommitmentPushModel,
            "RequestedSOPInstanceUID": SOP_INSTANCE, "ActionTypeID": 1, "CommandDataSetType": 0x0000,
        }, encode(action_information(transaction, refs)))
        response = raw.receive_command()
        assert (response["CommandField"], response["Status"]) == (0x8130, 0x0000)
        assert response["ActionTypeID"] == 1 and response["AffectedSOPInstanceUID"] == SOP_INSTANCE
        report = raw.receive_command()
        assert report["CommandField"] == 0x0100 and report["EventTypeID"] == 1
        assert report["AffectedSOPClassUID"] == StorageCommitmentPushModel
        raw.sock.sendall(bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]))  # A-RELEASE-RQ, no answer
        while raw.recv_pdu()[0] != 0x06:  # the report's data set, then A-RELEASE-RP
            pass
    received = scp.wait(transaction)
    assert received is not None, archive.daemon.events("commitment.report_failed")
    assert refs_in(received.info, "ReferencedSOPSequence") == refs
    sent = archive.daemon.wait_for_event("commitment.report_sent", transaction_uid=transaction)
    assert sent[0]["attempt"] == 1 and sent[0]["via"].startswith("new association")


def test_unknown_instance_and_wrong_sop_class_fail_with_their_reasons(archive):
    (ct_class, ct_uid), (mr_class, mr_uid) = archive.refs["mixed"]
    assert (ct_class, mr_class) == (CT_IMAGE_STORAGE, MR_IMAGE_STORAGE)
    never_stored = uid("commit", "never", "stored")
    unsupported = (uid("commit", "private", "class"), uid("commit", "private", "instance"))
    refs = [(ct_class, ct_uid), (CT_IMAGE_STORAGE, mr_uid), (CT_IMAGE_STORAGE, never_stored), unsupported]
    transaction = str(generate_uid())
    outcome = request(archive.port, action_information(transaction, refs), aet="MODALITY1")
    assert outcome.status == 0x0000, outcome.comment
    (report,) = outcome.reports
    assert report.event_type == 2
    assert refs_in(report.info, "ReferencedSOPSequence") == [(ct_class, ct_uid)]
    assert refs_in(report.info, "FailedSOPSequence") == refs[1:]
    assert reasons(report.info) == {mr_uid: 0x0119, never_stored: 0x0112, unsupported[1]: 0x0122}


def test_corrupted_or_missing_blob_is_not_committed(archive):
    refs = archive.refs["corrupt"]
    rows = {r["sop_instance_uid"]: r for r in query(archive.daemon.data_dir / "index.db",
                                                     "SELECT * FROM instances")}
    flipped = blob_path(archive.daemon.data_dir, rows[refs[0][1]]["blob_key"])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit off
    flipped.write_bytes(bytes(data))
    blob_path(archive.daemon.data_dir, rows[refs[1][1]]["blob_key"]).unlink()
    transaction = str(generate_uid())
    outcome = request(archive.port, action_information(transaction, refs), aet="MODALITY1")
    assert outcome.status == 0x0000, outcome.comment
    (report,) = outcome.reports
    assert report.event_type == 2
    assert refs_in(report.info, "ReferencedSOPSequence") == [refs[2]]
    assert reasons(report.info) == {refs[0][1]: 0x0110, refs[1][1]: 0x0110}
    details = {e["sop_instance_uid"]: e["detail"] for e in archive.daemon.wait_for_event(
        "commitment.instance_failed", count=2, transaction_uid=transaction)}
    assert "SHA-256" in details[refs[0][1]] and details[refs[1][1]] == "blob missing"


def test_a_transaction_uid_already_pending_is_refused(archive):
    refs = archive.refs["dup"]
    transaction = str(generate_uid())
    # The requester answers the report with a failure: the transaction stays pending
    # (MODALITY1 has no [[peers]] entry to retry on).
    first = request(archive.port, action_information(transaction, refs), aet="MODALITY1", answer=0x0110)
    assert first.status == 0x0000 and first.reports
    archive.daemon.wait_for_event("commitment.report_failed", transaction_uid=transaction)
    assert archive.transaction(transaction)["state"] == "pending"
    second = request(archive.port, action_information(transaction, refs), aet="MODALITY1")
    assert second.status == 0x0110
    assert second.comment == "transaction UID already pending"
    assert not second.reports
    refused = archive.daemon.wait_for_event("commitment.refused", transaction_uid=transaction)
    assert refused and refused[0]["status"] == "0x0110"


def test_a_finished_transaction_uid_may_be_used_again(archive):
    refs = archive.refs["dup"]
    transaction = str(generate_uid())
    first = request(archive.port, action_information(transaction, refs), aet="MODALITY1")
    assert first.status == 0x0000 and first.reports[0].event_type == 1
    again = request(archive.port, action_information(transaction, refs), aet="MODALITY1")
    assert again.status == 0x0000 and again.reports[0].event_type == 1
    assert archive.daemon.wait_for_event("commitment.transaction_reused", transaction_uid=transaction)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("case, expected, words", [
    ("action type 2", 0x0123, "Action Type ID 2"),
    ("other instance", 0x0112, "Requested SOP Instance UID"),
    ("no transaction", 0x0115, "Transaction UID (0008,1195) is missing"),
    ("bad transaction", 0x0115, "'1.2.abc' is not digits separated"),
    ("empty sequence", 0x0115, "Referenced SOP Sequence (0008,1199) missing or empty"),
    ("item without class", 0x0115, "item 1: Referenced SOP Class UID is missing"),
])
def test_malformed_requests_are_refused(archive, case, expected, words):
    refs = archive.refs["ok"][:1]
    transaction = str(generate_uid())
    kwargs = {}
    info = action_information(transaction, refs)
    if case == "action type 2":
        kwargs["action_type"] = 2
    elif case == "other instance":
        kwargs["instance"] = "1.2.840.10008.1.20.1.2"
    elif case == "no transaction":
        info = action_information(None, refs)
    elif case == "bad transaction":
        info.TransactionUID = "1.2.abc"
    elif case == "empty sequence":
        info.ReferencedSOPSequence = []
    elif case == "item without class":
        del info.ReferencedSOPSequence[0].ReferencedSOPClassUID
    outcome = request(archive.port, info, aet="MODALITY1", **kwargs)
    assert outcome.status == expected
    assert words in outcome.comment
    assert not outcome.reports
    assert not archive.transaction(transaction)


# --- restarts and expiry ----------------------------------------------------------------------


def _has_pending(data_dir: Path, uids: list[str]) -> set[str]:
    from pacsd.index.db import create_engine
    from pacsd.index.commitments import has_pending_commitment

    async def run() -> set[str]:
        engine = create_engine(f"sqlite+aiosqlite:///{data_dir}/index.db")
        try:
            return await has_pending_commitment(engine, uids)
        finally:
            await engine.dispose()

    return asyncio.run(run())


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_report_is_delivered_after_a_restart(tmp_path, report_scp, sig):
    report_port = free_port()  # nothing listens there until pacsd is down
    peers = json.dumps([{"ae_title": "MODALITY5", "host": "127.0.0.1", "port": report_port}])
    settings = dict(PEERS=peers, COMMITMENT__RETRY_SECONDS="0.2", COMMITMENT__MAX_RETRY_SECONDS="0.4")
    daemon = launch_daemon(tmp_path, "pacsd", **settings)
    try:
        directory = tmp_path / "files"
        directory.mkdir()
        _files, refs = _write(directory, "restart")
        store_files(daemon, [p for paths in _files.values() for p in paths[:1]])
        wanted = [paths[0] for paths in refs.values()]
        transaction = str(generate_uid())
        outcome = request(daemon.port, action_information(transaction, wanted), aet="MODALITY5",
                          release_at_once=True)
        assert outcome.status == 0x0000, outcome.comment
        failed = daemon.wait_for_event("commitment.report_failed", count=2, transaction_uid=transaction)
        assert len(failed) >= 2, daemon.events("commitment.report_failed")
        assert "MODALITY5 at 127.0.0.1" in failed[0]["error"]
        assert failed[1]["retry_in"] > failed[0]["retry_in"]  # backing off
    finally:
        assert daemon.stop(sig) is not None
    uids = [u for _, u in wanted]
    assert _has_pending(daemon.data_dir, uids + ["1.2.3"]) == set(uids)
    daemon.log_path.rename(tmp_path / "pacsd-before-restart.log")
    scp = report_scp(report_port, "MODALITY5")
    restarted = launch_daemon(tmp_path, "pacsd", **settings)
    try:
        report = scp.wait(transaction)
        assert report is not None, restarted.events("commitment.report_failed")
        assert report.event_type == 1
        assert refs_in(report.info, "ReferencedSOPSequence") == wanted
        assert restarted.wait_for_event("commitment.resuming")
        assert restarted.wait_for_event("commitment.report_sent", transaction_uid=transaction)
        rows = query(restarted.data_dir / "index.db", "SELECT * FROM commitment_transactions")
        assert [(r["transaction_uid"], r["state"]) for r in rows] == [(transaction, "delivered")]
        assert rows[0]["attempts"] >= 3
    finally:
        restarted.stop()
    assert _has_pending(restarted.data_dir, uids) == set()
    assert len(scp.reports) == 1


def test_undelivered_report_expires(tmp_path):
    daemon = launch_daemon(tmp_path, "pacsd", COMMITMENT__RETRY_SECONDS="0.2",
                           COMMITMENT__EXPIRE_SECONDS="1.5")
    try:
        directory = tmp_path / "files"
        directory.mkdir()
        files, refs = _write(directory, "expiry")
        store_files(daemon, files["ok"][:1])
        transaction = str(generate_uid())
        outcome = request(daemon.port, action_information(transaction, refs["ok"][:1]),
                          aet="NOWHERE", release_at_once=True)
        assert outcome.status == 0x0000
        expired = daemon.wait_for_event("commitment.expired", transaction_uid=transaction, timeout=15)
        assert expired, daemon.events("commitment.report_failed")
        failed = daemon.events("commitment.report_failed")
        assert failed and "no [[peers]] entry for AE title 'NOWHERE'" in failed[0]["error"]
        row = query(daemon.data_dir / "index.db", "SELECT * FROM commitment_transactions")[0]
        assert row["state"] == "expired"
        assert _has_pending(daemon.data_dir, [refs["ok"][0][1]]) == set()
    finally:
        daemon.stop()


# --- pacsd commit -----------------------------------------------------------------------------


def run_commit(archive, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in archive.daemon.env.items() if not k.startswith("PACSD_")}
    return subprocess.run([sys.executable, "-m", "pacsd", "commit", "127.0.0.1", str(archive.port),
                           *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_commit_cli_all_committed(archive):
    paths = archive.files["cli"]
    result = run_commit(archive, *map(str, paths), "--aet", "COMMITSCU", "--timeout", "20")
    assert result.returncode == 0, result.stdout + result.stderr
    for (_cls, sop), path in zip(archive.refs["cli"], paths):
        assert f"committed  {sop}  {path}" in result.stdout
    assert "2 committed, 0 failed (event type 1, report on the requesting association)" in result.stdout


def test_commit_cli_reports_a_never_stored_file(archive, tmp_path):
    stray = uid("commit", "cli", "stray")
    path = tmp_path / "stray.dcm"
    write_part10(path, image(stray, SERIES_CT, STUDY, rows=16, columns=16))
    result = run_commit(archive, str(archive.files["cli"][0]), str(path), "--timeout", "20")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"committed  {archive.refs['cli'][0][1]}" in result.stdout
    assert f"FAILED     {stray}  {path}  0x0112 (no such object instance)" in result.stdout
    assert "1 committed, 1 failed (event type 2" in result.stdout


def test_commit_cli_without_a_node_to_talk_to(archive):
    result = subprocess.run([sys.executable, "-m", "pacsd", "commit", "127.0.0.1", str(free_port()),
                             str(archive.files["cli"][0]), "--timeout", "5"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "failed" in result.stderr


def test_commit_cli_takes_the_report_on_its_listener(tmp_path):
    """An SCP (pynetdicom here) that answers the N-ACTION, then reports on an association
    of its own to the port given with --listen, proposing to be the SCP."""
    listen_port = free_port()
    scp_port = free_port()
    sent: list[int] = []

    def on_action(event):
        info = event.action_information
        transaction = info.TransactionUID
        refs = [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in info.ReferencedSOPSequence]

        def report():
            time.sleep(0.3)
            ae = AE(ae_title="FAKEPACS")
            ae.add_requested_context(StorageCommitmentPushModel)
            assoc = ae.associate("127.0.0.1", listen_port, ae_title="LISTENER",
                                 ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)])
            assert assoc.is_established
            ds = Dataset()
            ds.TransactionUID = transaction
            ok, bad = refs[:1], refs[1:]
            ds.ReferencedSOPSequence = [_item(c, i) for c, i in ok]
            failed = [_item(c, i) for c, i in bad]
            for item in failed:
                item.FailureReason = 0x0119
            ds.FailedSOPSequence = failed
            status, _ = assoc.send_n_event_report(ds, 2, StorageCommitmentPushModel, SOP_INSTANCE)
            sent.append(status.Status)
            assoc.release()

        threading.Thread(target=report, daemon=True).start()
        return 0x0000, None

    ae = AE(ae_title="FAKEPACS")
    ae.add_supported_context(StorageCommitmentPushModel)
    server = ae.start_server(("127.0.0.1", scp_port), block=False,
                             evt_handlers=[(evt.EVT_N_ACTION, on_action)])
    try:
        paths = []
        for n in range(2):
            path = tmp_path / f"{n}.dcm"
            write_part10(path, image(uid("commit", "listen", n), SERIES_CT, STUDY, rows=16, columns=16))
            paths.append(path)
        result = subprocess.run([sys.executable, "-m", "pacsd", "commit", "127.0.0.1", str(scp_port),
                                 *map(str, paths), "--aec", "FAKEPACS", "--aet", "LISTENER",
                                 "--listen", str(listen_port), "--timeout", "20"],
                                capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
    assert result.returncode == 1, result.stdout + result.stderr
    assert sent == [0x0000]
    assert f"committed  {uid('commit', 'listen', 0)}" in result.stdout
    assert f"FAILED     {uid('commit', 'listen', 1)}" in result.stdout
    assert "0x0119 (class/instance conflict)" in result.stdout
    assert "report on the association from FAKEPACS@127.0.0.1" in result.stdout


def _item(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


@pytest.mark.parametrize("scu_role, scp_role, accepted", [
    (True, True, True),  # many modalities offer both: pacsd keeps the SCP role
    (True, False, True),
    (False, True, False),  # a requester that wants to be the SCP: pacsd takes no reports
])
def test_role_selection_on_the_requesting_association(archive, scu_role, scp_role, accepted):
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(StorageCommitmentPushModel)
    ae.add_requested_context(Verification)  # keeps the association up when the other is refused
    assoc = ae.associate("127.0.0.1", archive.port, ae_title="PACSD",
                         ext_neg=[build_role(StorageCommitmentPushModel, scu_role=scu_role,
                                             scp_role=scp_role)])
    try:
        assert assoc.is_established
        contexts = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == StorageCommitmentPushModel]
        assert bool(contexts) == accepted
        if accepted:
            assert contexts[0].as_scu and not contexts[0].as_scp
    finally:
        assoc.release()
