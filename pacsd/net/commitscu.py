"""Storage Commitment Push Model as SCU (PS3.4 J.3): ask for commitment, receive the report.

Used by `pacsd commit`. The request is an N-ACTION-RQ (Action Type 1) naming the instances;
the outcome comes later as an N-EVENT-REPORT-RQ, either on the same association (handled by
`ReportInbox.handle` as the association's dispatch) or on an association the SCP opens to
us, proposing itself as SCP through role selection (`listen`).

The SOP class constants and the report's shape live here; the SCP (pacsd/services/
commitment.py) builds on them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from pydicom import Dataset

from pacsd.dimse.assembler import Message
from pacsd.dimse.command import CommandField
from pacsd.dimse.identifier import IdentifierError, decode_identifier, encode_identifier
from pacsd.uid import is_valid_uid

log = structlog.get_logger("pacsd.commitscu")

SOP_CLASS = "1.2.840.10008.1.20.1"  # Storage Commitment Push Model SOP Class
SOP_INSTANCE = "1.2.840.10008.1.20.1.1"  # its well-known SOP Instance (PS3.4 J.3.5)
ACTION_REQUEST = 1  # Action Type ID: Request Storage Commitment (PS3.4 Table J.3-1)
EVENT_SUCCESS = 1  # Event Type ID: storage commitment request successful
EVENT_FAILURES = 2  # Event Type ID: storage commitment request complete - failure exists

# Failure Reason (0008,1197) values, PS3.3 C.14.1.1.
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0119: "class/instance conflict",
    0x0122: "referenced SOP class not supported",
    0x0131: "duplicate transaction UID",
    0x0213: "resource limitation",
}

# N-EVENT-REPORT-RSP statuses (PS3.7 C.5) this SCU answers with.
_SUCCESS = 0x0000
_PROCESSING_FAILURE = 0x0110
_NO_SUCH_SOP_INSTANCE = 0x0112
_NO_SUCH_EVENT_TYPE = 0x0113
_INVALID_ARGUMENT_VALUE = 0x0115


def describe_reason(reason: int) -> str:
    return f"0x{reason:04X} ({FAILURE_REASONS.get(reason, 'unknown reason')})"


@dataclass
class Report:
    """A Storage Commitment Result (PS3.4 Table J.3-2)."""

    transaction_uid: str
    event_type: int
    committed: list[tuple[str, str]] = field(default_factory=list)  # (class, instance)
    failed: list[tuple[str, str, int]] = field(default_factory=list)  # (class, instance, reason)
    via: str = ""  # where it arrived: "requesting association" or "association from AE@host"


def reference(sop_class: str, sop_instance: str, **extra) -> Dataset:
    """One item of a Referenced/Failed SOP Sequence."""
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    for keyword, value in extra.items():
        setattr(item, keyword, value)
    return item


def build_action(transaction_uid: str | None, refs: list[tuple[str, str]]) -> Dataset:
    """The Action Information of a Storage Commitment Request (PS3.4 Table J.3-1).

    A None transaction UID leaves it out (only tests build such a request)."""
    ds = Dataset()
    if transaction_uid is not None:
        ds.TransactionUID = transaction_uid
    ds.ReferencedSOPSequence = [reference(c, i) for c, i in refs]
    return ds


class ReportError(ValueError):
    pass


def parse_report(ds: Dataset, event_type: int) -> Report:
    transaction = str(ds.get("TransactionUID") or "")
    if not is_valid_uid(transaction):
        raise ReportError("Transaction UID (0008,1195) missing or malformed")
    report = Report(transaction, event_type)
    for item in ds.get("ReferencedSOPSequence") or []:
        report.committed.append((str(item.get("ReferencedSOPClassUID", "")),
                                 str(item.get("ReferencedSOPInstanceUID", ""))))
    for item in ds.get("FailedSOPSequence") or []:
        reason = item.get("FailureReason")
        report.failed.append((str(item.get("ReferencedSOPClassUID", "")),
                              str(item.get("ReferencedSOPInstanceUID", "")),
                              int(reason) if reason is not None else -1))
    if event_type == EVENT_SUCCESS and report.failed:
        raise ReportError("Event Type 1 (all committed) with a Failed SOP Sequence")
    return report


async def request_commitment(assoc, transaction_uid: str, refs: list[tuple[str, str]]) -> tuple[int, str]:
    """Send the N-ACTION-RQ; returns the N-ACTION-RSP status and its Error Comment."""
    context = assoc.context_for(SOP_CLASS)
    if context is None:
        raise LookupError("the peer did not accept the Storage Commitment Push Model SOP Class")
    command = {
        "CommandField": CommandField.N_ACTION_RQ,
        "RequestedSOPClassUID": SOP_CLASS,
        "RequestedSOPInstanceUID": SOP_INSTANCE,
        "ActionTypeID": ACTION_REQUEST,
    }
    data = encode_identifier(build_action(transaction_uid, refs), context.transfer_syntax)
    response = await assoc.request_one(context.context_id, command, data)
    response.discard()
    return response.command.get("Status", -1), str(response.command.get("ErrorComment", "") or "")


class ReportInbox:
    """Takes N-EVENT-REPORT-RQs of the Push Model (as an association's dispatch) and hands
    each report to whoever waits for its Transaction UID; answers the sender."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[Report]] = {}
        self.others: list[Report] = []  # reports nobody waited for

    def expect(self, transaction_uid: str) -> asyncio.Future[Report]:
        future = asyncio.get_running_loop().create_future()
        self._waiting[transaction_uid] = future
        return future

    async def handle(self, assoc, message: Message) -> None:
        command = message.command
        if command["CommandField"] != CommandField.N_EVENT_REPORT_RQ:
            await assoc.respond(message, 0x0211)  # unrecognized operation
            return
        if command.get("AffectedSOPInstanceUID") != SOP_INSTANCE:
            await assoc.respond(message, _NO_SUCH_SOP_INSTANCE,
                                ErrorComment=f"not the Storage Commitment instance {SOP_INSTANCE}")
            return
        event_type = command.get("EventTypeID")
        if event_type not in (EVENT_SUCCESS, EVENT_FAILURES):
            await assoc.respond(message, _NO_SUCH_EVENT_TYPE, ErrorComment=f"Event Type ID {event_type}")
            return
        if message.dataset is None or message.dataset.error is not None:
            await assoc.respond(message, _PROCESSING_FAILURE, ErrorComment="no Event Information")
            return
        try:
            ts = assoc.contexts[message.context_id].transfer_syntax
            report = parse_report(decode_identifier(message.dataset.read(), ts), event_type)
        except (IdentifierError, ReportError) as exc:
            comment = exc.comment if isinstance(exc, IdentifierError) else str(exc)
            await assoc.respond(message, _INVALID_ARGUMENT_VALUE, ErrorComment=comment[:64])
            return
        report.via = ("requesting association" if assoc.is_requestor
                      else f"association from {assoc.calling_ae}@{assoc.protocol.peer_str}")
        await assoc.respond(message, _SUCCESS, EventTypeID=event_type)
        future = self._waiting.pop(report.transaction_uid, None)
        if future is not None and not future.done():
            future.set_result(report)
        else:
            self.others.append(report)
            log.warning("commitment.unexpected_report", transaction_uid=report.transaction_uid)


async def listen(inbox: ReportInbox, ae_title: str, port: int, work_dir: Path,
                 bind: str = "0.0.0.0", transfer_syntaxes: list[str] | None = None):
    """An acceptor that takes reports on associations the SCP opens; large data sets
    spool under `work_dir`. Returns the started DicomServer (`await server.close(0)`)."""
    from pacsd.config import DEFAULT_TRANSFER_SYNTAXES, DicomSettings, Settings, StorageSettings
    from pacsd.net.acceptor import DicomServer
    from pacsd.services.registry import ServiceRegistry

    registry = ServiceRegistry()
    registry.add(SOP_CLASS, list(transfer_syntaxes or DEFAULT_TRANSFER_SYNTAXES),
                 CommandField.N_EVENT_REPORT_RQ, inbox.handle)
    # The SCP proposes to be the SCP of the class (PS3.4 J.3.3.1.3): agree to that role.
    registry.roles[SOP_CLASS] = (False, True)
    # model_construct: these settings come from the arguments only, not PACSD_* variables.
    settings = Settings.model_construct(
        dicom=DicomSettings(ae_title=ae_title, port=port, bind=bind, check_called_ae=False),
        storage=StorageSettings(data_dir=Path(work_dir)),
        peers=[],
    )
    server = DicomServer(settings, registry)
    await server.start()
    return server
