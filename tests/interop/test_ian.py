"""Instance Availability Notification against pynetdicom, as the RIS (pacsd is SCU) and as an
archive upstream (pacsd is SCP).

The RIS is a pynetdicom AE in a thread of the test, listening on a free port that the daemon
knows as a [[peers]] entry with ian = true; it records every N-CREATE-RQ it gets. Instances go
into the daemon with pynetdicom C-STORE. The daemon's outbox is read straight from its SQLite
index.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, InstanceAvailabilityNotification, MRImageStorage

from pacsd.dimse.identifier import decode_identifier, encode_identifier
from pacsd.index.schema import ian_outbox, metadata
from pacsd.services.ian import OutboxRecorder, StudyContent, build_ian, pps_references, retry_delay
from tests.conftest import free_port
from tests.dicomdata import EXPLICIT_LE, IMPLICIT_LE, RawAssociation, image, query, uid

pytestmark = pytest.mark.interop

IAN = "1.2.840.10008.5.1.4.33"
MPPS = "1.2.840.10008.3.1.2.3.3"
CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"


# --- the RIS --------------------------------------------------------------------------------


@dataclass
class Notification:
    calling_ae: str
    sop_class_uid: str
    sop_instance_uid: str
    dataset: Dataset
    at: float

    def instances(self) -> dict[str, set[str]]:
        """Series UID -> SOP Instance UIDs the notification lists."""
        return {str(s.SeriesInstanceUID): {str(r.ReferencedSOPInstanceUID) for r in s.ReferencedSOPSequence}
                for s in self.dataset.ReferencedSeriesSequence}


@dataclass
class RIS:
    """A pynetdicom IAN SCP; answers each N-CREATE with the next of `statuses` (then 0000)."""

    port: int
    ae_title: str = "RIS"
    statuses: list[int] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)  # seconds before answering, per N-CREATE
    received: list[Notification] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(InstanceAvailabilityNotification, [EXPLICIT_LE, IMPLICIT_LE])
        ae.dimse_timeout = ae.network_timeout = 30
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_N_CREATE, self._n_create)])

    def _n_create(self, event):
        rq = event.request
        with self._lock:
            self.received.append(Notification(
                event.assoc.requestor.ae_title, str(rq.AffectedSOPClassUID),
                str(rq.AffectedSOPInstanceUID), event.attribute_list, time.monotonic()))
            status = self.statuses.pop(0) if self.statuses else 0x0000
            delay = self.delays.pop(0) if self.delays else 0.0
        time.sleep(delay)
        return status, None

    def wait(self, count: int, timeout: float = 20.0) -> list[Notification]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.received)

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def ris():
    started: list[RIS] = []

    def start(port: int, ae_title: str = "RIS", **kwargs) -> RIS:
        scp = RIS(port, ae_title, **kwargs)
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


def peers(*entries: tuple[str, int, bool]) -> str:
    return json.dumps([{"ae_title": ae, "host": "127.0.0.1", "port": port, "ian": ian}
                       for ae, port, ian in entries])


# --- instances ------------------------------------------------------------------------------


def study_instances(name: str, counts: dict[str, int], start: int = 0, **attrs) -> list[Dataset]:
    """Instances of study `name`: `counts` maps a modality to the size of one series of it."""
    study = uid("ian", name, "study")
    out = []
    for number, (modality, count) in enumerate(counts.items(), 1):
        series = uid("ian", name, "series", modality)
        for n in range(start, start + count):
            out.append(image(uid("ian", name, modality, n), series, study, modality=modality,
                             patient_id=f"IAN-{name}", series_number=number, instance_number=n + 1,
                             rows=8, columns=8, **attrs))
    return out


def store(port: int, datasets: list[Dataset]) -> list[int]:
    """C-STORE each data set to pacsd on one association; the statuses."""
    ae = AE(ae_title="MODALITY")
    ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = 60
    for sop_class in (CTImageStorage, MRImageStorage):
        ae.add_requested_context(sop_class, [EXPLICIT_LE])
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSD")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def by_series(datasets: list[Dataset]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for ds in datasets:
        out.setdefault(str(ds.SeriesInstanceUID), set()).add(str(ds.SOPInstanceUID))
    return out


def outbox(daemon) -> list[dict]:
    return query(daemon.data_dir / "index.db", "SELECT * FROM ian_outbox ORDER BY pk")


def check_notification(note: Notification, datasets: list[Dataset]) -> None:
    """The N-CREATE lists exactly these instances, ONLINE at PACSD, with their SOP classes."""
    assert note.calling_ae == "PACSD"
    assert note.sop_class_uid == IAN
    assert note.sop_instance_uid.startswith("2.25.")
    ds = note.dataset
    assert ds.StudyInstanceUID == datasets[0].StudyInstanceUID
    assert note.instances() == by_series(datasets)
    classes = {str(d.SOPInstanceUID): str(d.SOPClassUID) for d in datasets}
    for series_item in ds.ReferencedSeriesSequence:
        for ref in series_item.ReferencedSOPSequence:
            assert ref.InstanceAvailability == "ONLINE"
            assert ref.RetrieveAETitle == "PACSD"
            assert ref.ReferencedSOPClassUID == classes[ref.ReferencedSOPInstanceUID]


# --- pacsd as SCU ---------------------------------------------------------------------------


def test_one_ian_after_the_quiet_period_lists_the_study(start_daemon, ris):
    port = free_port()
    scp = ris(port)
    daemon = start_daemon(PEERS=peers(("RIS", port, True)), IAN__STUDY_QUIET_SECONDS="1")
    pps = Dataset()
    pps.ReferencedSOPClassUID = MPPS
    pps.ReferencedSOPInstanceUID = uid("ian", "one", "mpps")
    datasets = study_instances("one", {"CT": 3, "MR": 2}, ReferencedPerformedProcedureStepSequence=[pps])
    assert store(daemon.port, datasets) == [0] * 5
    stored_at = time.monotonic()
    # Owed as soon as the instances are committed: the row is part of that transaction.
    rows = outbox(daemon)
    assert [(r["study_instance_uid"], r["peer_ae"]) for r in rows] == [(datasets[0].StudyInstanceUID, "RIS")]
    assert rows[0]["state"] in ("pending", "delivered")

    received = scp.wait(1)
    assert len(received) == 1
    note = received[0]
    assert note.at - stored_at >= 0.8, "sent before the study was quiet for 1 s"
    check_notification(note, datasets)
    [item] = note.dataset.ReferencedPerformedProcedureStepSequence
    assert item.ReferencedSOPClassUID == MPPS
    assert item.ReferencedSOPInstanceUID == pps.ReferencedSOPInstanceUID
    assert item.PerformedWorkitemCodeSequence == []

    time.sleep(2.5)  # nothing more arrives for a study that stays quiet
    assert len(scp.received) == 1
    [row] = outbox(daemon)
    assert row["state"] == "delivered" and row["attempts"] == 1
    [event] = daemon.wait_for_event("ian.delivered")
    assert event["study_instance_uid"] == datasets[0].StudyInstanceUID
    assert event["instances"] == 5 and event["series"] == 2


def test_a_later_instance_sends_an_updated_ian(start_daemon, ris):
    port = free_port()
    scp = ris(port)
    daemon = start_daemon(PEERS=peers(("RIS", port, True)), IAN__STUDY_QUIET_SECONDS="1")
    first = study_instances("later", {"CT": 2})
    assert store(daemon.port, first) == [0, 0]
    [note] = scp.wait(1)
    check_notification(note, first)
    assert note.dataset.ReferencedPerformedProcedureStepSequence == []  # none known

    more = study_instances("later", {"CT": 1}, start=2) + study_instances("later", {"MR": 1})
    assert store(daemon.port, more) == [0, 0]
    received = scp.wait(2)
    assert len(received) == 2
    check_notification(received[1], first + more)
    assert received[1].sop_instance_uid != received[0].sop_instance_uid
    time.sleep(2)
    assert len(scp.received) == 2
    [row] = outbox(daemon)
    assert row["state"] == "delivered"


def test_an_instance_arriving_while_an_ian_is_on_the_wire_gets_its_own(start_daemon, ris):
    port = free_port()
    scp = ris(port, delays=[2.0])  # holds the first N-CREATE-RSP back for 2 s
    daemon = start_daemon(PEERS=peers(("RIS", port, True)), IAN__STUDY_QUIET_SECONDS="0.5")
    first = study_instances("crossing", {"CT": 2})
    assert store(daemon.port, first) == [0, 0]
    assert len(scp.wait(1)) == 1  # its response is still held back
    more = study_instances("crossing", {"CT": 1}, start=2)
    assert store(daemon.port, more) == [0]
    received = scp.wait(2)
    assert len(received) == 2
    check_notification(received[0], first)
    check_notification(received[1], first + more)
    [superseded, latest] = daemon.wait_for_event("ian.delivered", count=2)
    assert superseded["superseded"] is True and latest.get("superseded") is None
    time.sleep(1.5)
    assert len(scp.received) == 2
    [row] = outbox(daemon)
    assert row["state"] == "delivered" and row["attempts"] == 1


@pytest.mark.parametrize("down", ["nothing listening", "silent listener"])
def test_an_unreachable_peer_does_not_slow_ingest_and_gets_the_ian_later(start_daemon, ris, down):
    # Without an IAN peer, for comparison.
    plain = start_daemon()
    started = time.monotonic()
    assert store(plain.port, study_instances("baseline", {"CT": 50})) == [0] * 50
    baseline = time.monotonic() - started

    port = free_port()
    silent = None
    if down == "silent listener":
        # Accepts the TCP connection (backlog) and never answers the A-ASSOCIATE-RQ.
        silent = socket.socket()
        silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        silent.bind(("127.0.0.1", port))
        silent.listen(64)
    # Quiet period 0: the sender tries the peer while the instances are still coming in.
    daemon = start_daemon(PEERS=peers(("RIS", port, True)), IAN__STUDY_QUIET_SECONDS="0",
                          IAN__RETRY_SECONDS="0.5", IAN__MAX_RETRY_SECONDS="1",
                          DICOM__ARTIM_TIMEOUT="2")
    datasets = study_instances(f"down-{down}", {"CT": 50})
    started = time.monotonic()
    assert store(daemon.port, datasets) == [0] * 50
    elapsed = time.monotonic() - started
    assert len(query(daemon.data_dir / "index.db", "SELECT pk FROM instances")) == 50
    assert elapsed < max(10 * baseline, baseline + 10), (elapsed, baseline)

    failed = daemon.wait_for_event("ian.delivery_failed", timeout=15)
    assert failed, "the sender never tried the unreachable peer"
    assert failed[0]["study_instance_uid"] == datasets[0].StudyInstanceUID
    [row] = outbox(daemon)
    assert row["state"] == "pending" and row["attempts"] >= 1 and row["last_error"]

    if silent is not None:
        silent.close()
    scp = ris(port)
    received = scp.wait(1, timeout=30)
    assert len(received) == 1
    check_notification(received[0], datasets)
    time.sleep(1.5)
    assert len(scp.received) == 1
    [row] = outbox(daemon)
    assert row["state"] == "delivered" and row["attempts"] >= 2


def test_a_failure_status_is_retried_with_backoff(start_daemon, ris):
    port = free_port()
    scp = ris(port, statuses=[0x0110, 0x0110])
    daemon = start_daemon(PEERS=peers(("RIS", port, True)), IAN__STUDY_QUIET_SECONDS="0.5",
                          IAN__RETRY_SECONDS="0.5", IAN__MAX_RETRY_SECONDS="5")
    datasets = study_instances("refused", {"CT": 2})
    assert store(daemon.port, datasets) == [0, 0]
    received = scp.wait(3)
    assert len(received) == 3
    for note in received:
        check_notification(note, datasets)
    # Waits of retry_seconds, then twice that.
    gaps = [b.at - a.at for a, b in zip(received, received[1:])]
    assert 0.4 <= gaps[0] < 2.5 and 0.9 <= gaps[1] < 4, gaps
    failures = daemon.wait_for_event("ian.delivery_failed", count=2)
    assert [f["attempts"] for f in failures] == [1, 2]
    assert "0x0110" in failures[0]["error"]
    assert [f["retry_in"] for f in failures] == [0.5, 1.0]
    # The RIS has the third request; the row is marked delivered once its response is in.
    [delivered] = daemon.wait_for_event("ian.delivered")
    assert delivered["attempts"] == 3
    [row] = outbox(daemon)
    assert row["state"] == "delivered" and row["attempts"] == 3


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_an_ian_owed_before_a_restart_is_delivered_after_it(start_daemon, ris, sig):
    port = free_port()
    scp = ris(port)
    settings = dict(PEERS=peers(("RIS", port, True)), IAN__STUDY_QUIET_SECONDS="3")
    first = start_daemon(**settings)
    datasets = study_instances(f"restart-{sig.name}", {"CT": 2, "MR": 1})
    assert store(first.port, datasets) == [0, 0, 0]
    first.stop(sig)  # well inside the quiet period
    assert scp.received == []
    [row] = outbox(first)
    assert row["state"] == "pending" and row["attempts"] == 0

    db = first.data_dir / "index.db"
    second = start_daemon(**settings, STORAGE__DATA_DIR=str(first.data_dir),
                          DATABASE__URL=f"sqlite+aiosqlite:///{db}")
    received = scp.wait(1)
    assert len(received) == 1
    check_notification(received[0], datasets)
    time.sleep(1.5)
    assert len(scp.received) == 1
    assert second.events("ian.sender_started")
    [row] = outbox(first)  # the same index
    assert row["state"] == "delivered"


def test_a_peer_without_ian_gets_nothing(start_daemon, ris):
    ris_port, other_port = free_port(), free_port()
    scp = ris(ris_port)
    other = ris(other_port, "OTHER")
    daemon = start_daemon(PEERS=peers(("RIS", ris_port, True), ("OTHER", other_port, False)),
                          IAN__STUDY_QUIET_SECONDS="0.5")
    datasets = study_instances("only-ris", {"CT": 2})
    assert store(daemon.port, datasets) == [0, 0]
    assert len(scp.wait(1)) == 1
    time.sleep(2)
    assert other.received == []
    assert [r["peer_ae"] for r in outbox(daemon)] == ["RIS"]


def test_no_outbox_rows_without_ian_peers(start_daemon, ris):
    port = free_port()
    other = ris(port, "OTHER")
    daemon = start_daemon(PEERS=peers(("OTHER", port, False)), IAN__STUDY_QUIET_SECONDS="0")
    assert store(daemon.port, study_instances("no-peers", {"CT": 1})) == [0]
    time.sleep(1)
    assert outbox(daemon) == [] and other.received == []
    assert daemon.events("ian.sender_started") == []


# --- pacsd as SCP ---------------------------------------------------------------------------


def ian_dataset(study_uid: str | None, availability: list[list[str]]) -> Dataset:
    ds = Dataset()
    ds.ReferencedPerformedProcedureStepSequence = []
    series_items = []
    for s, values in enumerate(availability):
        item = Dataset()
        item.SeriesInstanceUID = uid("ian-scp", study_uid, s)
        refs = []
        for n, value in enumerate(values):
            ref = Dataset()
            ref.ReferencedSOPClassUID = CT
            ref.ReferencedSOPInstanceUID = uid("ian-scp", study_uid, s, n)
            ref.InstanceAvailability = value
            ref.RetrieveAETitle = "UPSTREAM"
            refs.append(ref)
        item.ReferencedSOPSequence = refs
        series_items.append(item)
    ds.ReferencedSeriesSequence = series_items
    if study_uid is not None:
        ds.StudyInstanceUID = study_uid
    return ds


def send_ian(port: int, ds: Dataset, instance_uid: str | None) -> tuple[Dataset, Dataset]:
    """N-CREATE an IAN at pacsd; the status and the N-CREATE-RSP's whole command set."""
    responses: list[Dataset] = []

    def received(event) -> None:
        if type(event.message).__name__ == "N_CREATE_RSP":
            responses.append(event.message.command_set)

    ae = AE(ae_title="UPSTREAM")
    ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = 30
    ae.add_requested_context(InstanceAvailabilityNotification, [EXPLICIT_LE])
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSD",
                         evt_handlers=[(evt.EVT_DIMSE_RECV, received)])
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_create(ds, InstanceAvailabilityNotification, instance_uid)
    finally:
        assoc.release()
    [command] = responses
    return status, command


def test_pacsd_accepts_and_logs_an_ian(daemon):
    study = uid("ian-scp", "study")
    instance_uid = uid("ian-scp", "notification")
    status, command = send_ian(daemon.port, ian_dataset(study, [["ONLINE", "ONLINE"], ["NEARLINE"]]),
                               instance_uid)
    assert status.Status == 0x0000
    assert command.AffectedSOPInstanceUID == instance_uid
    assert command.AffectedSOPClassUID == IAN
    [event] = daemon.wait_for_event("ian.received")
    assert event["study_instance_uid"] == study
    assert event["calling_ae"] == "UPSTREAM"
    assert event["sop_instance_uid"] == instance_uid
    assert event["series"] == 2 and event["instances"] == 3
    assert event["availability"] == {"NEARLINE": 1, "ONLINE": 2}


def test_pacsd_refuses_an_ian_without_a_study(daemon):
    status, _ = send_ian(daemon.port, ian_dataset(None, [["ONLINE"]]), uid("ian-scp", "no-study"))
    assert status.Status == 0x0120
    assert "Study Instance UID" in status.ErrorComment
    [event] = daemon.wait_for_event("ian.refused")
    assert daemon.events("ian.received") == []


def test_pacsd_refuses_a_malformed_attribute_list(daemon):
    truncated = b"\x20\x00\x0d\x00UI\x40\x001.2.3."  # (0020,000D) says 64 bytes, 6 follow
    with RawAssociation(daemon.port, [(IAN, [EXPLICIT_LE])]) as raw:
        raw.send(raw.context_for(IAN), {
            "CommandField": 0x0140, "MessageID": 7, "AffectedSOPClassUID": IAN,
            "AffectedSOPInstanceUID": uid("ian-scp", "malformed"), "CommandDataSetType": 0x0000,
        }, truncated)
        response = raw.receive_command()
        raw.release()
    assert response["CommandField"] == 0x8140 and response["MessageIDBeingRespondedTo"] == 7
    assert response["Status"] == 0x0110
    assert "cannot be decoded" in response["ErrorComment"]
    assert daemon.events("ian.received") == []


def test_pacsd_gives_an_ian_without_an_instance_uid_one(daemon):
    study = uid("ian-scp", "study-2")
    status, command = send_ian(daemon.port, ian_dataset(study, [["ONLINE"]]), None)
    assert status.Status == 0x0000
    assert command.AffectedSOPInstanceUID.startswith("2.25.")
    [event] = daemon.wait_for_event("ian.received")
    assert event["study_instance_uid"] == study
    assert event["sop_instance_uid"] == command.AffectedSOPInstanceUID


# --- the pieces -----------------------------------------------------------------------------


def test_retry_delay_doubles_up_to_the_maximum():
    assert [retry_delay(n, 10, 600) for n in range(1, 10)] == [10, 20, 40, 80, 160, 320, 600, 600, 600]
    assert retry_delay(10_000, 0.5, 60) == 60


def test_ian_data_set_round_trip():
    content = StudyContent("1.2.3", {"1.2.3.1": [(CT, "1.2.3.1.1"), (CT, "1.2.3.1.2")],
                                     "1.2.3.2": [(MR, "1.2.3.2.1")]}, [(MPPS, "1.2.3.9")])
    for ts in (EXPLICIT_LE, IMPLICIT_LE):
        ds = decode_identifier(encode_identifier(build_ian(content, "PACSD"), ts), ts)
        assert ds.StudyInstanceUID == "1.2.3"
        assert [s.SeriesInstanceUID for s in ds.ReferencedSeriesSequence] == ["1.2.3.1", "1.2.3.2"]
        refs = ds.ReferencedSeriesSequence[0].ReferencedSOPSequence
        assert [(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID, r.InstanceAvailability,
                 r.RetrieveAETitle) for r in refs] == [(CT, "1.2.3.1.1", "ONLINE", "PACSD"),
                                                       (CT, "1.2.3.1.2", "ONLINE", "PACSD")]
        [pps] = ds.ReferencedPerformedProcedureStepSequence
        assert (pps.ReferencedSOPClassUID, pps.ReferencedSOPInstanceUID) == (MPPS, "1.2.3.9")


def test_pps_references_from_series_json():
    attrs = json.dumps({"00081111": {"vr": "SQ", "Value": [
        {"00081150": {"vr": "UI", "Value": [MPPS]}, "00081155": {"vr": "UI", "Value": ["1.2.3"]}},
        {"00081150": {"vr": "UI", "Value": [MPPS]}},  # no instance UID: skipped
        {"00081150": {"vr": "UI", "Value": [MPPS]}, "00081155": {"vr": "UI", "Value": ["x.y"]}},
    ]}})
    assert pps_references(attrs) == [(MPPS, "1.2.3")]
    assert pps_references("{}") == [] and pps_references("not json") == []


def test_outbox_upsert_keeps_a_pending_rows_back_off():
    engine = sa.create_engine("sqlite://")
    metadata.create_all(engine)
    record = OutboxRecorder(["RIS", "ARCH"], quiet=30)
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def rows():
        with engine.connect() as conn:
            return {(r.study_instance_uid, r.peer_ae): r for r in conn.execute(sa.select(ian_outbox))}

    with engine.begin() as conn:
        record(conn, {"1.1", "1.2"}, t0)
    assert {k: (r.state, r.attempts) for k, r in rows().items()} == {
        ("1.1", "RIS"): ("pending", 0), ("1.1", "ARCH"): ("pending", 0),
        ("1.2", "RIS"): ("pending", 0), ("1.2", "ARCH"): ("pending", 0)}
    assert rows()[("1.1", "RIS")].due_at == (t0 + timedelta(seconds=30)).replace(tzinfo=None)
    # 1.1 at RIS failed three times and waits an hour; 1.1 at ARCH was delivered.
    later = t0 + timedelta(hours=1)
    with engine.begin() as conn:
        conn.execute(ian_outbox.update().where(ian_outbox.c.study_instance_uid == "1.1",
                                               ian_outbox.c.peer_ae == "RIS")
                     .values(attempts=3, next_attempt_at=later, last_error="refused"))
        conn.execute(ian_outbox.update().where(ian_outbox.c.study_instance_uid == "1.1",
                                               ian_outbox.c.peer_ae == "ARCH")
                     .values(state="delivered", attempts=2, last_error="old"))
    t1 = t0 + timedelta(minutes=5)
    with engine.begin() as conn:
        record(conn, {"1.1"}, t1)
    now = rows()
    due = (t1 + timedelta(seconds=30)).replace(tzinfo=None)
    ris_row, arch_row = now[("1.1", "RIS")], now[("1.1", "ARCH")]
    assert (ris_row.state, ris_row.due_at, ris_row.attempts, ris_row.next_attempt_at, ris_row.last_error) == (
        "pending", due, 3, later.replace(tzinfo=None), "refused")
    assert (arch_row.state, arch_row.due_at, arch_row.attempts, arch_row.next_attempt_at, arch_row.last_error) == (
        "pending", due, 0, due, "")
    assert now[("1.2", "RIS")].due_at == (t0 + timedelta(seconds=30)).replace(tzinfo=None)
    assert len(now) == 4
