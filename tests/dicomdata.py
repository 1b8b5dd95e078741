"""Test instances, Part 10 helpers, a raw DICOM requestor and index look-ups for storage tests.

Everything here is deterministic: the same arguments give the same UIDs and the same bytes on
every run and in every process, so a client subprocess can rebuild what the test expects
from a number alone.
"""

from __future__ import annotations

import hashlib
import random
import socket
import sqlite3
import struct
from pathlib import Path
from typing import Any, Iterable

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, generate_uid
from pynetdicom.dsutils import encode as _pynetdicom_encode
from pynetdicom.pdu import A_ASSOCIATE_AC

from pacsd.dimse import command as dimse_command
from pacsd.dul.negotiation import ProposedContext, build_request
from pacsd.dul.pdu import encode_pdata

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
PET_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
SOP_CLASS_OF_MODALITY = {"CT": CT_IMAGE_STORAGE, "MR": MR_IMAGE_STORAGE, "PT": PET_IMAGE_STORAGE}

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"

C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
NO_DATASET = 0x0101
DATASET_PRESENT = 0x0000


# --- UIDs and data sets -------------------------------------------------------------------


def uid(*parts: object) -> str:
    """A UID under pydicom's root that is the same for the same parts on every run."""
    return str(generate_uid(entropy_srcs=["pacsd-tests", *(str(p) for p in parts)]))


def image(
    sop_instance_uid: str,
    series_instance_uid: str,
    study_instance_uid: str,
    *,
    modality: str = "CT",
    patient_id: str = "PAT-1",
    patient_name: str = "Test^Patient",
    instance_number: int = 1,
    series_number: int = 1,
    rows: int = 64,
    columns: int = 64,
    transfer_syntax: str = EXPLICIT_LE,
    **attributes: Any,
) -> Dataset:
    """A small 16-bit monochrome image of `modality` (CT, MR or PT) with file meta.

    Pixel values come from a generator seeded with the SOP Instance UID, so two instances
    never share pixel data and the same UID always gets the same pixels.
    """
    sop_class = SOP_CLASS_OF_MODALITY[modality]
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyDate = "20240611"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC" + study_instance_uid[-8:]
    ds.Modality = modality
    ds.ReferringPhysicianName = ""
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = series_instance_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = random.Random(sop_instance_uid).randbytes(rows * columns * 2)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def encode(ds: Dataset, transfer_syntax: str = EXPLICIT_LE) -> bytes:
    """The data set bytes pynetdicom would send for `ds` in `transfer_syntax`."""
    ts = UID(transfer_syntax)
    data = _pynetdicom_encode(ds, ts.is_implicit_VR, ts.is_little_endian)
    assert data is not None, "pynetdicom could not encode the data set"
    return data


def write_part10(path: Path, ds: Dataset) -> bytes:
    """Write `ds` as a Part 10 file in its file meta's transfer syntax; return the data set bytes."""
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    data = Path(path).read_bytes()
    return data[dataset_offset(data):]


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def dataset_offset(data: bytes) -> int:
    """Where the data set starts in a Part 10 file: after preamble, "DICM" and group 0002."""
    if data[128:132] != b"DICM":
        raise ValueError("not a Part 10 file (no DICM prefix)")
    pos = 132
    while pos + 8 <= len(data):
        group, _element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            return pos
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            pos += 12 + struct.unpack_from("<L", data, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", data, pos + 6)[0]
    return pos


def dataset_bytes(path: Path) -> bytes:
    data = Path(path).read_bytes()
    return data[dataset_offset(data):]


# --- a raw requestor ------------------------------------------------------------------------


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, have = [], 0
    while have < n:
        chunk = sock.recv(min(n - have, 1 << 20))
        if not chunk:
            raise ConnectionError(f"connection closed after {have} of {n} bytes")
        chunks.append(chunk)
        have += len(chunk)
    return b"".join(chunks)


class RawAssociation:
    """A DICOM requestor on a plain socket: it sends exactly the bytes it is given.

    pynetdicom re-encodes data sets and validates UIDs before sending; this one lets a test
    put a truncated data set or a malformed UID on the wire.
    """

    def __init__(self, port: int, contexts: Iterable[tuple[str, list[str]]], *,
                 calling_ae: str = "RAWSCU", called_ae: str = "PACSD", max_pdu: int = 65536,
                 timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        proposed = [ProposedContext(abstract, list(syntaxes)) for abstract, syntaxes in contexts]
        rq, _ = build_request(calling_ae, called_ae, proposed, max_pdu)
        self.sock.sendall(rq)
        pdu_type, body = self.recv_pdu()
        if pdu_type != 0x02:
            raise AssertionError(f"association not accepted: PDU type {pdu_type:#04x} {body.hex()}")
        ac = A_ASSOCIATE_AC()
        ac.decode(bytes([0x02, 0x00]) + len(body).to_bytes(4, "big") + body)
        # context ID -> (abstract syntax, accepted transfer syntax)
        self.accepted: dict[int, tuple[str, str]] = {}
        for item in ac.presentation_context:
            if item.result == 0:
                abstract = proposed[(item.context_id - 1) // 2].abstract_syntax
                self.accepted[item.context_id] = (abstract, str(item.transfer_syntax))
        self.peer_max = ac.user_information.maximum_length or 0
        self.message_id = 0

    @property
    def peer(self) -> str:
        """This end's address as the daemon logs it ("peer": "127.0.0.1:port")."""
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port}"

    def recv_pdu(self) -> tuple[int, bytes]:
        header = _recv_exactly(self.sock, 6)
        return header[0], _recv_exactly(self.sock, int.from_bytes(header[2:6], "big"))

    def context_for(self, abstract_syntax: str, transfer_syntax: str | None = None) -> int:
        for context_id, (abstract, ts) in self.accepted.items():
            if abstract == abstract_syntax and transfer_syntax in (None, ts):
                return context_id
        raise AssertionError(f"no accepted context for {abstract_syntax} {transfer_syntax or ''}")

    def send(self, context_id: int, command: dict[str, Any], dataset: bytes | None = None) -> None:
        self.sock.sendall(encode_pdata(context_id, 0x03, dimse_command.encode(command)))
        if dataset is None:
            return
        step = (self.peer_max or 16384) - 6
        view = memoryview(dataset)
        for start in range(0, max(len(view), 1), step):
            chunk = view[start : start + step]
            last = start + step >= len(view)
            self.sock.sendall(encode_pdata(context_id, 0x02 if last else 0x00, chunk))

    def receive_command(self) -> dict[str, Any]:
        """The next command set the peer sends (data sets are not expected here)."""
        raw = b""
        while True:
            pdu_type, body = self.recv_pdu()
            if pdu_type != 0x04:
                raise AssertionError(f"expected P-DATA, got PDU type {pdu_type:#04x} {body[:16].hex()}")
            pos = 0
            while pos < len(body):
                length = int.from_bytes(body[pos : pos + 4], "big")
                control = body[pos + 5]
                raw += body[pos + 6 : pos + 4 + length]
                pos += 4 + length
                if control & 0x01 and control & 0x02:
                    return dimse_command.decode(raw)

    def c_store(self, dataset: bytes, sop_class_uid: str, sop_instance_uid: str, *,
                context_id: int | None = None) -> dict[str, Any]:
        """Send one C-STORE-RQ with exactly these data set bytes; return the response command."""
        if context_id is None:
            context_id = self.context_for(sop_class_uid)
        self.message_id += 1
        self.send(context_id, {
            "CommandField": C_STORE_RQ,
            "MessageID": self.message_id,
            "AffectedSOPClassUID": sop_class_uid,
            "Priority": 0,
            "CommandDataSetType": DATASET_PRESENT,
            "AffectedSOPInstanceUID": sop_instance_uid,
        }, dataset)
        response = self.receive_command()
        assert response["MessageIDBeingRespondedTo"] == self.message_id
        return response

    def c_echo(self) -> int:
        self.message_id += 1
        self.send(self.context_for(VERIFICATION), {
            "CommandField": C_ECHO_RQ,
            "MessageID": self.message_id,
            "AffectedSOPClassUID": VERIFICATION,
            "CommandDataSetType": NO_DATASET,
        })
        return self.receive_command()["Status"]

    def release(self) -> None:
        self.sock.sendall(bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
        pdu_type, _ = self.recv_pdu()
        assert pdu_type == 0x06, f"expected A-RELEASE-RP, got PDU type {pdu_type:#04x}"
        self.sock.close()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawAssociation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- a daemon of a test module's own ------------------------------------------------------


from tests.conftest import launch_daemon  # noqa: E402,F401  (module-scoped daemons)


# --- the index and the blob store ---------------------------------------------------------


def query(db_path: Path, sql: str, *params: Any) -> list[dict[str, Any]]:
    """Rows of an SQL query on the index, as dicts (a fresh connection each time)."""
    conn = sqlite3.connect(db_path, timeout=10)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute(sql, params)]
    finally:
        conn.close()


def instance_rows(db_path: Path) -> list[dict[str, Any]]:
    return query(db_path, "SELECT * FROM instances ORDER BY pk")


def blob_path(data_dir: Path, blob_key: str) -> Path:
    return Path(data_dir) / "blobs" / f"{blob_key}.dcm"


def blob_files(data_dir: Path) -> list[Path]:
    root = Path(data_dir) / "blobs"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


def stored_dataset(data_dir: Path, row: dict[str, Any]) -> bytes:
    """The data set bytes of an indexed instance, as its blob holds them."""
    return blob_path(data_dir, row["blob_key"]).read_bytes()[row["dataset_offset"]:]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- a deterministic load: 4 studies x 5 series x 100 instances ---------------------------

LOAD_STUDIES = 4
LOAD_SERIES_PER_STUDY = 5
LOAD_INSTANCES_PER_SERIES = 100
LOAD_TOTAL = LOAD_STUDIES * LOAD_SERIES_PER_STUDY * LOAD_INSTANCES_PER_SERIES
# The modality of each series, per study: one study of a single modality, three mixed.
LOAD_MODALITIES = (
    ("CT", "CT", "CT", "CT", "CT"),
    ("CT", "CT", "MR", "MR", "MR"),
    ("MR", "MR", "PT", "PT", "PT"),
    ("CT", "MR", "PT", "CT", "MR"),
)


def load_plan(i: int) -> dict[str, Any]:
    """Where instance `i` (0 <= i < LOAD_TOTAL) of the load belongs; two studies per patient."""
    series_index, number = divmod(i, LOAD_INSTANCES_PER_SERIES)
    study, series = divmod(series_index, LOAD_SERIES_PER_STUDY)
    modality = LOAD_MODALITIES[study][series]
    return {
        "sop_instance_uid": uid("load", "instance", i),
        "series_instance_uid": uid("load", "series", study, series),
        "study_instance_uid": uid("load", "study", study),
        "patient_id": f"LOAD-{study // 2}",
        "modality": modality,
        "sop_class_uid": SOP_CLASS_OF_MODALITY[modality],
        "series_number": series + 1,
        "instance_number": number + 1,
    }


def load_instance(i: int) -> Dataset:
    plan = load_plan(i)
    return image(
        plan["sop_instance_uid"], plan["series_instance_uid"], plan["study_instance_uid"],
        modality=plan["modality"], patient_id=plan["patient_id"],
        patient_name=f"Load^Patient{plan['patient_id'][-1]}",
        series_number=plan["series_number"], instance_number=plan["instance_number"],
    )
