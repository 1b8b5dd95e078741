"""PS3.8 §9.3 PDUs: framing off a byte stream, the fast P-DATA-TF path, small fixed PDUs.

A-ASSOCIATE-RQ/AC/RJ bodies are decoded and encoded by pynetdicom's PDU codecs, but only
after `check_associate_items` has walked every item length against its container, so
pynetdicom never sees a length that runs past the bytes we hold.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Iterator

A_ASSOCIATE_RQ_TYPE = 0x01
A_ASSOCIATE_AC_TYPE = 0x02
A_ASSOCIATE_RJ_TYPE = 0x03
P_DATA_TF_TYPE = 0x04
A_RELEASE_RQ_TYPE = 0x05
A_RELEASE_RP_TYPE = 0x06
A_ABORT_TYPE = 0x07
PDU_TYPES = frozenset(range(0x01, 0x08))

# A-ABORT source (PS3.8 Table 9-26)
ABORT_SOURCE_USER = 0
ABORT_SOURCE_PROVIDER = 2
# A-ABORT reason/diag when the source is the service provider
ABORT_REASON_NOT_SPECIFIED = 0
ABORT_REASON_UNRECOGNIZED_PDU = 1
ABORT_REASON_UNEXPECTED_PDU = 2
ABORT_REASON_UNRECOGNIZED_PARAMETER = 4
ABORT_REASON_UNEXPECTED_PARAMETER = 5
ABORT_REASON_INVALID_PARAMETER = 6

# A-ASSOCIATE-RJ result/source/reason (PS3.8 Table 9-21)
RJ_PERMANENT = 1
RJ_TRANSIENT = 2
RJ_SOURCE_USER = 1
RJ_SOURCE_ACSE = 2
RJ_SOURCE_PRESENTATION = 3
RJ_USER_NO_REASON = 1
RJ_USER_APPLICATION_CONTEXT = 2
RJ_USER_CALLING_AE = 3
RJ_USER_CALLED_AE = 7
RJ_ACSE_PROTOCOL_VERSION = 2
RJ_PRESENTATION_CONGESTION = 1
RJ_PRESENTATION_LOCAL_LIMIT = 2

# Association PDUs carry at most a few hundred presentation contexts; anything bigger is
# not a DICOM peer we want to buffer for.
MAX_ASSOCIATE_PDU_LENGTH = 1 << 20

_HEADER = struct.Struct(">BxI")
_PDATA_HEADER = struct.Struct(">BxIIBB")  # PDU header + first PDV item header
_PDV_HEADER = struct.Struct(">IBB")
_FIXED4 = struct.Struct(">BxIxBBB")

A_RELEASE_RQ = _HEADER.pack(A_RELEASE_RQ_TYPE, 4) + b"\x00" * 4
A_RELEASE_RP = _HEADER.pack(A_RELEASE_RP_TYPE, 4) + b"\x00" * 4

# PDV message control header bits (PS3.8 Annex E.2)
MCH_COMMAND = 0x01
MCH_LAST = 0x02


class PDUError(Exception):
    """The peer sent something that is not a valid PDU; `reason` is the A-ABORT reason."""

    def __init__(self, message: str, reason: int = ABORT_REASON_INVALID_PARAMETER):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Abort:
    source: int
    reason: int


@dataclass(frozen=True)
class Reject:
    result: int
    source: int
    reason: int


def encode_abort(source: int, reason: int) -> bytes:
    return _FIXED4.pack(A_ABORT_TYPE, 4, 0, source, reason)


def encode_reject(result: int, source: int, reason: int) -> bytes:
    return _FIXED4.pack(A_ASSOCIATE_RJ_TYPE, 4, result, source, reason)


def decode_fixed4(body: memoryview | bytes) -> tuple[int, int, int]:
    """The last three bytes of an A-ABORT or A-ASSOCIATE-RJ body."""
    if len(body) != 4:
        raise PDUError(f"fixed-length PDU has length {len(body)}, expected 4")
    return body[1], body[2], body[3]


def pdata_header(context_id: int, control: int, length: int) -> bytes:
    """Header of a P-DATA-TF PDU holding one PDV of `length` bytes."""
    return _PDATA_HEADER.pack(P_DATA_TF_TYPE, length + 6, length + 2, context_id, control)


def encode_pdata(context_id: int, control: int, data: bytes | memoryview) -> bytes:
    return pdata_header(context_id, control, len(data)) + data


class Framer:
    """Cuts a byte stream into PDUs and checks each header the moment it is complete.

    `max_pdata_length` is the Maximum Length we advertised: a P-DATA-TF PDU longer than
    that is a protocol error. Zero means pacsd advertised no limit, which it never does.
    """

    def __init__(self, max_pdata_length: int) -> None:
        self.buffer = bytearray()
        self.max_pdata_length = max_pdata_length

    def check_header(self, pdu_type: int, length: int) -> None:
        if pdu_type not in PDU_TYPES:
            raise PDUError(f"unknown PDU type 0x{pdu_type:02x}", ABORT_REASON_UNRECOGNIZED_PDU)
        if pdu_type == P_DATA_TF_TYPE:
            if length > self.max_pdata_length:
                raise PDUError(
                    f"P-DATA-TF of {length} bytes exceeds the negotiated maximum "
                    f"of {self.max_pdata_length}"
                )
        elif pdu_type in (A_ASSOCIATE_RQ_TYPE, A_ASSOCIATE_AC_TYPE):
            if length > MAX_ASSOCIATE_PDU_LENGTH or length < 68:
                raise PDUError(f"A-ASSOCIATE PDU length {length} out of range")
        elif length != 4:
            raise PDUError(f"PDU type 0x{pdu_type:02x} has length {length}, expected 4")

    def feed(self, data: bytes, handle: Callable[[int, memoryview], None]) -> None:
        """Append `data`; call `handle(type, body)` for each complete PDU.

        `body` is only valid during the call: it views our buffer.
        """
        buf = self.buffer
        buf += data
        offset = 0
        size = len(buf)
        while size - offset >= 6:
            pdu_type, length = _HEADER.unpack_from(buf, offset)
            self.check_header(pdu_type, length)
            end = offset + 6 + length
            if end > size:
                break
            view = memoryview(buf)
            body = view[offset + 6 : end]
            try:
                handle(pdu_type, body)
            finally:
                body.release()
                view.release()
            offset = end
            if self.buffer is not buf:  # handle() reset us (abort): stop reading
                return
        if offset:
            del buf[:offset]

    def reset(self) -> None:
        self.buffer = bytearray()


def iter_pdvs(body: memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """Yield (presentation context ID, message control header, fragment) per PDV item."""
    size = len(body)
    if size == 0:
        raise PDUError("P-DATA-TF without a PDV item")
    pos = 0
    while pos < size:
        if size - pos < 6:
            raise PDUError("truncated PDV item header")
        item_length, context_id, control = _PDV_HEADER.unpack_from(body, pos)
        end = pos + 4 + item_length
        if item_length < 2 or end > size:
            raise PDUError(f"PDV item length {item_length} inconsistent with its PDU")
        if control & 0xFC:
            raise PDUError(f"reserved bits set in message control header 0x{control:02x}")
        yield context_id, control, body[pos + 6 : end]
        pos = end


# --- A-ASSOCIATE item structure ------------------------------------------------------

_APPLICATION_CONTEXT = 0x10
_PRESENTATION_CONTEXT_RQ = 0x20
_PRESENTATION_CONTEXT_AC = 0x21
_USER_INFORMATION = 0x50
_ABSTRACT_SYNTAX = 0x30
_TRANSFER_SYNTAX = 0x40


def _items(data: memoryview | bytes, where: str) -> Iterator[tuple[int, memoryview | bytes]]:
    pos, size = 0, len(data)
    while pos < size:
        if size - pos < 4:
            raise PDUError(f"truncated item header in {where}")
        item_type = data[pos]
        length = (data[pos + 2] << 8) | data[pos + 3]
        end = pos + 4 + length
        if end > size:
            raise PDUError(f"item 0x{item_type:02x} of {length} bytes runs past the end of {where}")
        yield item_type, data[pos + 4 : end]
        pos = end


def check_associate_items(body: memoryview | bytes, pdu_type: int) -> None:
    """Walk every item and sub-item of an A-ASSOCIATE-RQ/AC body (after the PDU header).

    Raises PDUError for lengths that do not fit their container and for items out of the
    order of PS3.8 §9.3.2/§9.3.3: one Application Context, then Presentation Contexts,
    then one User Information item.
    """
    if len(body) < 68:
        raise PDUError("A-ASSOCIATE PDU shorter than its fixed fields")
    pc_type = _PRESENTATION_CONTEXT_RQ if pdu_type == A_ASSOCIATE_RQ_TYPE else _PRESENTATION_CONTEXT_AC
    order = {_APPLICATION_CONTEXT: 0, pc_type: 1, _USER_INFORMATION: 2}
    seen_rank = -1
    counts = {_APPLICATION_CONTEXT: 0, pc_type: 0, _USER_INFORMATION: 0}
    for item_type, value in _items(body[68:], "the A-ASSOCIATE PDU"):
        rank = order.get(item_type)
        if rank is None:
            raise PDUError(
                f"unexpected item type 0x{item_type:02x} in A-ASSOCIATE PDU",
                ABORT_REASON_UNRECOGNIZED_PARAMETER,
            )
        if rank < seen_rank:
            raise PDUError(
                f"item 0x{item_type:02x} out of order in A-ASSOCIATE PDU",
                ABORT_REASON_UNEXPECTED_PARAMETER,
            )
        seen_rank = rank
        counts[item_type] += 1
        if item_type == pc_type:
            if len(value) < 4:
                raise PDUError("presentation context item shorter than 4 bytes")
            subs = list(_items(value[4:], "a presentation context item"))
            if pdu_type == A_ASSOCIATE_RQ_TYPE:
                kinds = [t for t, _ in subs]
                if kinds.count(_ABSTRACT_SYNTAX) != 1 or kinds[0] != _ABSTRACT_SYNTAX:
                    raise PDUError("presentation context needs exactly one abstract syntax first")
                if _TRANSFER_SYNTAX not in kinds:
                    raise PDUError("presentation context proposes no transfer syntax")
        elif item_type == _USER_INFORMATION:
            for _sub_type, _sub in _items(value, "the user information item"):
                pass
        elif item_type == _APPLICATION_CONTEXT and len(value) == 0:
            raise PDUError("empty application context name")
    if counts[_APPLICATION_CONTEXT] != 1:
        raise PDUError("A-ASSOCIATE PDU needs exactly one application context item")
    if counts[_USER_INFORMATION] > 1:
        raise PDUError("more than one user information item", ABORT_REASON_UNEXPECTED_PARAMETER)
    if pdu_type == A_ASSOCIATE_RQ_TYPE and counts[pc_type] == 0:
        raise PDUError("A-ASSOCIATE-RQ proposes no presentation context")
