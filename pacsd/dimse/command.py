"""DIMSE command sets (PS3.7 §9.3, §10.3, Annex E): encode and decode group 0000.

Command sets are always Implicit VR Little Endian and hold only a handful of elements, so
a table of the command elements and their VRs does the work pydicom would do, without
building a Dataset per message on the hot path.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Any

from pacsd.dimse.status import Status


class CommandField(IntEnum):
    C_STORE_RQ = 0x0001
    C_STORE_RSP = 0x8001
    C_GET_RQ = 0x0010
    C_GET_RSP = 0x8010
    C_FIND_RQ = 0x0020
    C_FIND_RSP = 0x8020
    C_MOVE_RQ = 0x0021
    C_MOVE_RSP = 0x8021
    C_ECHO_RQ = 0x0030
    C_ECHO_RSP = 0x8030
    N_EVENT_REPORT_RQ = 0x0100
    N_EVENT_REPORT_RSP = 0x8100
    N_GET_RQ = 0x0110
    N_GET_RSP = 0x8110
    N_SET_RQ = 0x0120
    N_SET_RSP = 0x8120
    N_ACTION_RQ = 0x0130
    N_ACTION_RSP = 0x8130
    N_CREATE_RQ = 0x0140
    N_CREATE_RSP = 0x8140
    N_DELETE_RQ = 0x0150
    N_DELETE_RSP = 0x8150
    C_CANCEL_RQ = 0x0FFF


class Priority(IntEnum):
    MEDIUM = 0x0000
    HIGH = 0x0001
    LOW = 0x0002


# CommandDataSetType: any value other than 0x0101 means a data set follows (PS3.7 E.1-1).
NO_DATASET = 0x0101
DATASET_PRESENT = 0x0000

# element number -> (keyword, VR). Group is always 0000.
ELEMENTS: dict[int, tuple[str, str]] = {
    0x0000: ("CommandGroupLength", "UL"),
    0x0002: ("AffectedSOPClassUID", "UI"),
    0x0003: ("RequestedSOPClassUID", "UI"),
    0x0100: ("CommandField", "US"),
    0x0110: ("MessageID", "US"),
    0x0120: ("MessageIDBeingRespondedTo", "US"),
    0x0600: ("MoveDestination", "AE"),
    0x0700: ("Priority", "US"),
    0x0800: ("CommandDataSetType", "US"),
    0x0900: ("Status", "US"),
    0x0901: ("OffendingElement", "AT"),
    0x0902: ("ErrorComment", "LO"),
    0x0903: ("ErrorID", "US"),
    0x1000: ("AffectedSOPInstanceUID", "UI"),
    0x1001: ("RequestedSOPInstanceUID", "UI"),
    0x1002: ("EventTypeID", "US"),
    0x1005: ("AttributeIdentifierList", "AT"),
    0x1008: ("ActionTypeID", "US"),
    0x1020: ("NumberOfRemainingSuboperations", "US"),
    0x1021: ("NumberOfCompletedSuboperations", "US"),
    0x1022: ("NumberOfFailedSuboperations", "US"),
    0x1023: ("NumberOfWarningSuboperations", "US"),
    0x1030: ("MoveOriginatorApplicationEntityTitle", "AE"),
    0x1031: ("MoveOriginatorMessageID", "US"),
}
KEYWORDS: dict[str, tuple[int, str]] = {kw: (elem, vr) for elem, (kw, vr) in ELEMENTS.items()}

# Largest command set pacsd reassembles: real ones are under 300 bytes; an Error Comment
# or an Attribute Identifier List cannot make one larger than this.
MAX_COMMAND_LENGTH = 64 * 1024

_ELEMENT_HEADER = struct.Struct("<HHI")
_US = struct.Struct("<H")
_UL = struct.Struct("<I")


class CommandError(Exception):
    """A command set that cannot be decoded or lacks what its message needs."""


def _encode_value(vr: str, value: Any) -> bytes:
    if vr == "US":
        return _US.pack(value)
    if vr == "UL":
        return _UL.pack(value)
    if vr == "UI":
        raw = str(value).encode("ascii")
        return raw + b"\x00" if len(raw) % 2 else raw
    if vr in ("AE", "LO"):
        raw = str(value).encode("ascii", "replace")
        if vr == "LO":
            raw = raw[:64]
        return raw + b" " if len(raw) % 2 else raw
    if vr == "AT":
        tags = value if isinstance(value, (list, tuple)) else [value]
        return b"".join(struct.pack("<HH", t >> 16, t & 0xFFFF) for t in tags)
    raise CommandError(f"cannot encode VR {vr}")


def encode(command: dict[str, Any]) -> bytes:
    """Encode a command set; CommandGroupLength is computed, elements sorted by tag."""
    body = bytearray()
    for elem, (keyword, vr) in sorted(ELEMENTS.items()):
        if elem == 0x0000 or keyword not in command or command[keyword] is None:
            continue
        value = _encode_value(vr, command[keyword])
        body += _ELEMENT_HEADER.pack(0x0000, elem, len(value))
        body += value
    unknown = set(command) - KEYWORDS.keys()
    if unknown:
        raise CommandError(f"not command elements: {sorted(unknown)}")
    head = _ELEMENT_HEADER.pack(0x0000, 0x0000, 4) + _UL.pack(len(body))
    return head + bytes(body)


def _decode_value(vr: str, raw: bytes) -> Any:
    if vr == "US":
        if len(raw) != 2:
            raise CommandError(f"US value of {len(raw)} bytes")
        return _US.unpack(raw)[0]
    if vr == "UL":
        if len(raw) != 4:
            raise CommandError(f"UL value of {len(raw)} bytes")
        return _UL.unpack(raw)[0]
    if vr == "AT":
        if len(raw) % 4:
            raise CommandError(f"AT value of {len(raw)} bytes")
        tags = [(g << 16) | e for g, e in struct.iter_unpack("<HH", raw)]
        return tags if len(tags) != 1 else tags[0]
    text = raw.decode("ascii", "replace")
    if vr == "UI":
        return text.rstrip("\x00 ")
    return text.strip(" \x00")


def decode(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Decode an Implicit VR LE command set into {keyword: value}.

    Elements outside group 0000 or running past the end are errors; unknown group 0000
    elements (retired ones some peers still send) are skipped.
    """
    data = bytes(data)
    pos, size = 0, len(data)
    command: dict[str, Any] = {}
    while pos < size:
        if size - pos < 8:
            raise CommandError("truncated element header in command set")
        group, elem, length = _ELEMENT_HEADER.unpack_from(data, pos)
        pos += 8
        if group != 0x0000:
            raise CommandError(f"element ({group:04X},{elem:04X}) outside the command group")
        if length > size - pos:
            raise CommandError(f"element (0000,{elem:04X}) length {length} runs past the end")
        raw = data[pos : pos + length]
        pos += length
        known = ELEMENTS.get(elem)
        if known is None:
            continue
        keyword, vr = known
        command[keyword] = _decode_value(vr, raw)
    if "CommandField" not in command:
        raise CommandError("command set has no Command Field")
    return command


def has_dataset(command: dict[str, Any]) -> bool:
    return command.get("CommandDataSetType", NO_DATASET) != NO_DATASET


# Elements a request must carry for pacsd to act on it (PS3.7 §9.3 and §10.3 tables).
REQUIRED: dict[int, tuple[str, ...]] = {
    CommandField.C_ECHO_RQ: ("AffectedSOPClassUID", "MessageID"),
    CommandField.C_STORE_RQ: ("AffectedSOPClassUID", "MessageID", "AffectedSOPInstanceUID", "Priority"),
    CommandField.C_FIND_RQ: ("AffectedSOPClassUID", "MessageID", "Priority"),
    CommandField.C_GET_RQ: ("AffectedSOPClassUID", "MessageID", "Priority"),
    CommandField.C_MOVE_RQ: ("AffectedSOPClassUID", "MessageID", "Priority", "MoveDestination"),
    CommandField.C_CANCEL_RQ: ("MessageIDBeingRespondedTo",),
    CommandField.N_EVENT_REPORT_RQ: ("AffectedSOPClassUID", "MessageID", "AffectedSOPInstanceUID", "EventTypeID"),
    CommandField.N_ACTION_RQ: ("RequestedSOPClassUID", "MessageID", "RequestedSOPInstanceUID", "ActionTypeID"),
    CommandField.N_CREATE_RQ: ("AffectedSOPClassUID", "MessageID"),
    CommandField.N_GET_RQ: ("RequestedSOPClassUID", "MessageID", "RequestedSOPInstanceUID"),
    CommandField.N_SET_RQ: ("RequestedSOPClassUID", "MessageID", "RequestedSOPInstanceUID"),
    CommandField.N_DELETE_RQ: ("RequestedSOPClassUID", "MessageID", "RequestedSOPInstanceUID"),
}  # fmt: skip


def missing_elements(command: dict[str, Any]) -> list[str]:
    """Required elements the command lacks; any request but C-CANCEL needs a Message ID,
    even one of a kind pacsd does not know, so that it can be answered."""
    field = command["CommandField"]
    required = REQUIRED.get(field, ("MessageID",) if is_request(field) else ())
    return [kw for kw in required if kw not in command]


def is_request(command_field: int) -> bool:
    return not command_field & 0x8000


def response_field(request_field: int) -> int:
    return request_field | 0x8000


# Requests whose response echoes the Affected SOP Instance UID: C-STORE and the N- services.
# A set built once: iterating the enum per response cost ~15 µs, on every C-STORE-RSP.
_ECHO_INSTANCE = frozenset({CommandField.C_STORE_RQ} | {f for f in CommandField if f.name.startswith("N_")})


def response(request: dict[str, Any], status: int = Status.SUCCESS, **extra: Any) -> dict[str, Any]:
    """The response command for `request` (PS3.7 §9.3): echoes IDs and the SOP class."""
    field = request["CommandField"]
    rsp: dict[str, Any] = {
        "CommandField": response_field(field),
        "MessageIDBeingRespondedTo": request["MessageID"],
        "CommandDataSetType": NO_DATASET,
        "Status": int(status),
    }
    sop_class = request.get("AffectedSOPClassUID") or request.get("RequestedSOPClassUID")
    if sop_class:
        rsp["AffectedSOPClassUID"] = sop_class
    instance = request.get("AffectedSOPInstanceUID") or request.get("RequestedSOPInstanceUID")
    if instance and field in _ECHO_INSTANCE:
        rsp["AffectedSOPInstanceUID"] = instance
    rsp.update(extra)
    return rsp
