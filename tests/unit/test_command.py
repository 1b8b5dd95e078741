"""DIMSE command set codec (PS3.7 §9.3, §10.3, Annex E) against hand-built bytes and pydicom."""

from __future__ import annotations

import struct

import pytest
from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from pacsd.dimse import command as cmd
from pacsd.dimse.command import CommandError, CommandField, decode, encode

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def _element(elem: int, value: bytes, group: int = 0x0000) -> bytes:
    return struct.pack("<HHI", group, elem, len(value)) + value


def _elements(data: bytes) -> list[tuple[int, int, bytes]]:
    """(group, element, value) in order, walked by hand."""
    out, pos = [], 0
    while pos < len(data):
        group, elem, length = struct.unpack_from("<HHI", data, pos)
        out.append((group, elem, data[pos + 8 : pos + 8 + length]))
        pos += 8 + length
    assert pos == len(data)
    return out


def _pydicom_bytes(command: dict, group_length: int) -> bytes:
    ds = Dataset()
    ds.CommandGroupLength = group_length
    for keyword, value in command.items():
        setattr(ds, keyword, value)
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = True
    write_dataset(fp, ds)
    return fp.getvalue()


def _pydicom_read(data: bytes) -> Dataset:
    return read_dataset(DicomBytesIO(data), is_implicit_VR=True, is_little_endian=True)


ECHO_RQ = {
    "CommandField": CommandField.C_ECHO_RQ,
    "MessageID": 1,
    "AffectedSOPClassUID": VERIFICATION,
    "CommandDataSetType": cmd.NO_DATASET,
}

STORE_RQ = {
    "CommandField": CommandField.C_STORE_RQ,
    "MessageID": 0x1234,
    "AffectedSOPClassUID": CT_IMAGE,  # 25 characters: odd
    "AffectedSOPInstanceUID": "1.2.826.0.1.3680043.2.1125.1",  # 28: even
    "Priority": cmd.Priority.MEDIUM,
    "CommandDataSetType": cmd.DATASET_PRESENT,
    "MoveOriginatorApplicationEntityTitle": "MOVESCU",
    "MoveOriginatorMessageID": 9,
}

MOVE_RQ = {
    "CommandField": CommandField.C_MOVE_RQ,
    "MessageID": 65535,
    "AffectedSOPClassUID": STUDY_ROOT_MOVE,
    "Priority": cmd.Priority.HIGH,
    "CommandDataSetType": cmd.DATASET_PRESENT,
    "MoveDestination": "DEST1",  # odd
}

FIND_RSP = {
    "CommandField": CommandField.C_FIND_RSP,
    "MessageIDBeingRespondedTo": 3,
    "AffectedSOPClassUID": STUDY_ROOT_FIND,
    "CommandDataSetType": cmd.DATASET_PRESENT,
    "Status": 0xFF00,
    "ErrorComment": "Matching continues",  # 18: even
}


@pytest.mark.parametrize("command", [ECHO_RQ, STORE_RQ, MOVE_RQ, FIND_RSP], ids=["echo", "store", "move", "find-rsp"])
def test_round_trip(command):
    encoded = encode(command)
    decoded = decode(encoded)
    group_length = len(encoded) - 12
    assert decoded == {**command, "CommandGroupLength": group_length}
    # group length first, then elements in ascending tag order, all group 0000, even lengths
    elements = _elements(encoded)
    assert elements[0] == (0, 0, struct.pack("<I", group_length))
    tags = [e for _, e, _ in elements]
    assert tags == sorted(tags)
    assert all(g == 0 and len(v) % 2 == 0 for g, _, v in elements)
    # decode takes bytes, bytearray and memoryview alike
    assert decode(bytearray(encoded)) == decode(memoryview(encoded)) == decoded


def test_echo_rq_bytes():
    encoded = encode(ECHO_RQ)
    uid = VERIFICATION.encode() + b"\x00"  # 17 chars, NUL padded
    body = (
        _element(0x0002, uid)
        + _element(0x0100, b"\x30\x00")
        + _element(0x0110, b"\x01\x00")
        + _element(0x0800, b"\x01\x01")
    )
    assert encoded == _element(0x0000, struct.pack("<I", len(body))) + body
    assert len(body) == 8 + 18 + 10 + 10 + 10


def test_store_rq_odd_uid_padded_with_nul():
    encoded = encode(STORE_RQ)
    values = {e: v for _, e, v in _elements(encoded)}
    assert values[0x0002] == CT_IMAGE.encode() + b"\x00"
    assert values[0x1000] == STORE_RQ["AffectedSOPInstanceUID"].encode()
    assert values[0x1030] == b"MOVESCU "
    odd = dict(STORE_RQ, AffectedSOPInstanceUID="1.2.3.4.5")
    assert {e: v for _, e, v in _elements(encode(odd))}[0x1000] == b"1.2.3.4.5\x00"
    assert decode(encode(odd))["AffectedSOPInstanceUID"] == "1.2.3.4.5"


def test_move_destination_padded_with_space():
    encoded = encode(MOVE_RQ)
    values = {e: v for _, e, v in _elements(encoded)}
    assert values[0x0600] == b"DEST1 "
    assert values[0x0110] == b"\xff\xff"
    assert decode(encoded)["MoveDestination"] == "DEST1"
    even = encode(dict(MOVE_RQ, MoveDestination="DEST"))
    assert {e: v for _, e, v in _elements(even)}[0x0600] == b"DEST"


def test_find_rsp_pending_with_error_comment():
    encoded = encode(dict(FIND_RSP, ErrorComment="odd"))
    values = {e: v for _, e, v in _elements(encoded)}
    assert values[0x0900] == b"\x00\xff"
    assert values[0x0902] == b"odd "
    decoded = decode(encoded)
    assert decoded["Status"] == 0xFF00 and decoded["ErrorComment"] == "odd"


def test_error_comment_is_cut_to_64_characters():
    encoded = encode(dict(FIND_RSP, ErrorComment="x" * 100))
    assert {e: v for _, e, v in _elements(encoded)}[0x0902] == b"x" * 64


def test_group_length_counts_the_bytes_after_it():
    for command in (ECHO_RQ, STORE_RQ, MOVE_RQ, FIND_RSP):
        encoded = encode(command)
        group, elem, length = struct.unpack_from("<HHI", encoded)
        assert (group, elem, length) == (0, 0, 4)
        assert struct.unpack_from("<I", encoded, 8)[0] == len(encoded) - 12


def test_none_values_are_left_out():
    assert encode(dict(ECHO_RQ, ErrorComment=None)) == encode(ECHO_RQ)


def test_unknown_keyword_is_refused():
    with pytest.raises(CommandError):
        encode(dict(ECHO_RQ, PatientName="DOE^JOHN"))


@pytest.mark.parametrize(
    "command",
    [
        STORE_RQ,
        MOVE_RQ,
        FIND_RSP,
        {
            "CommandField": CommandField.C_STORE_RSP,
            "MessageIDBeingRespondedTo": 7,
            "AffectedSOPClassUID": CT_IMAGE,
            "AffectedSOPInstanceUID": "1.2.3",
            "CommandDataSetType": cmd.NO_DATASET,
            "Status": 0xA900,
            "OffendingElement": [0x00100010, 0x00100020],
            "ErrorComment": "Patient module",
            "ErrorID": 0x2A,
        },
        {
            "CommandField": CommandField.C_MOVE_RSP,
            "MessageIDBeingRespondedTo": 2,
            "CommandDataSetType": cmd.NO_DATASET,
            "Status": 0xFF00,
            "NumberOfRemainingSuboperations": 4,
            "NumberOfCompletedSuboperations": 1,
            "NumberOfFailedSuboperations": 0,
            "NumberOfWarningSuboperations": 0,
        },
    ],
    ids=["store-rq", "move-rq", "find-rsp", "store-rsp-offending", "move-rsp"],
)
def test_encoding_equals_pydicom(command):
    encoded = encode(command)
    assert encoded == _pydicom_bytes(command, len(encoded) - 12)
    # and pydicom reads our bytes back as the same values
    ds = _pydicom_read(encoded)
    assert ds.CommandGroupLength == len(encoded) - 12
    for keyword, value in command.items():
        got = ds[keyword].value
        if isinstance(value, list):
            got = [int(t) for t in got]
        assert got == value, keyword


def test_decode_of_pydicom_written_command():
    ds = Dataset()
    ds.CommandGroupLength = 0  # pydicom does not compute it; decode does not rely on it
    ds.AffectedSOPClassUID = CT_IMAGE
    ds.CommandField = 0x8001
    ds.MessageIDBeingRespondedTo = 5
    ds.CommandDataSetType = 0x0101
    ds.Status = 0x0000
    ds.OffendingElement = 0x00080018
    ds.AffectedSOPInstanceUID = "1.2.3.4.5.6.7"
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = True
    write_dataset(fp, ds)
    assert decode(fp.getvalue()) == {
        "CommandGroupLength": 0,
        "AffectedSOPClassUID": CT_IMAGE,
        "CommandField": 0x8001,
        "MessageIDBeingRespondedTo": 5,
        "CommandDataSetType": 0x0101,
        "Status": 0,
        "OffendingElement": 0x00080018,
        "AffectedSOPInstanceUID": "1.2.3.4.5.6.7",
    }


# --- decode errors ------------------------------------------------------------------


def test_decode_rejects_an_element_outside_group_0000():
    encoded = encode(ECHO_RQ)
    with pytest.raises(CommandError):
        decode(encoded + _element(0x0016, CT_IMAGE.encode() + b"\x00", group=0x0008))
    with pytest.raises(CommandError):
        decode(_element(0x0010, b"DOE^JOHN", group=0x0010) + encoded)


def test_decode_rejects_a_length_running_past_the_end():
    encoded = bytearray(encode(ECHO_RQ))
    # last element is CommandDataSetType with length 2 at the end
    last = len(encoded) - 10
    assert struct.unpack_from("<HHI", encoded, last) == (0, 0x0800, 2)
    struct.pack_into("<I", encoded, last + 4, 3)
    with pytest.raises(CommandError):
        decode(bytes(encoded))
    struct.pack_into("<I", encoded, last + 4, 0xFFFFFFFF)  # undefined length
    with pytest.raises(CommandError):
        decode(bytes(encoded))
    with pytest.raises(CommandError):
        decode(encode(ECHO_RQ)[:-1])


@pytest.mark.parametrize("tail", [b"\x00", b"\x00\x00\x00\x09", b"\x00\x00\x00\x09\x02\x00\x00"])
def test_decode_rejects_a_truncated_header(tail):
    with pytest.raises(CommandError):
        decode(encode(ECHO_RQ) + tail)


def test_decode_rejects_wrong_fixed_sizes():
    base = encode({"CommandField": 0x0030})
    with pytest.raises(CommandError):
        decode(base + _element(0x0110, b"\x01\x00\x00"))  # US of 3 bytes
    with pytest.raises(CommandError):
        decode(base + _element(0x0110, b""))  # US of 0 bytes
    with pytest.raises(CommandError):
        decode(_element(0x0000, b"\x04\x00") + base[12:])  # UL of 2 bytes
    with pytest.raises(CommandError):
        decode(base + _element(0x0901, b"\x10\x00\x10\x00\x20\x00"))  # AT of 6 bytes
    with pytest.raises(CommandError):
        decode(_element(0x0100, b"\x01\x00\x00"))


def test_decode_rejects_a_set_without_command_field():
    without = {k: v for k, v in ECHO_RQ.items() if k != "CommandField"}
    with pytest.raises(CommandError):
        decode(encode(without))
    with pytest.raises(CommandError):
        decode(b"")


def test_decode_skips_unknown_group_0000_elements():
    encoded = encode(ECHO_RQ)
    retired = (
        _element(0x0001, struct.pack("<I", 1234))  # Length to End (retired)
        + _element(0x4000, b"comment ")  # Comments (retired)
        + _element(0x5010, b"MSG ID")  # Message Set ID (retired)
    )
    assert decode(encoded[:12] + retired + encoded[12:]) == decode(encoded)
    assert decode(encoded + _element(0x7777, b"")) == decode(encoded)


# --- helpers ------------------------------------------------------------------------


def test_has_dataset():
    assert not cmd.has_dataset({"CommandField": 0x30})
    assert not cmd.has_dataset({"CommandField": 0x30, "CommandDataSetType": 0x0101})
    assert cmd.has_dataset({"CommandField": 1, "CommandDataSetType": 0x0000})
    assert cmd.has_dataset({"CommandField": 1, "CommandDataSetType": 0x0102})
    assert cmd.has_dataset({"CommandField": 1, "CommandDataSetType": 0xFEFE})


def test_missing_elements():
    assert cmd.missing_elements(STORE_RQ) == []
    partial = {k: v for k, v in STORE_RQ.items() if k not in ("Priority", "AffectedSOPInstanceUID")}
    assert cmd.missing_elements(partial) == ["AffectedSOPInstanceUID", "Priority"]
    assert cmd.missing_elements({"CommandField": CommandField.C_MOVE_RQ, "MessageID": 1}) == [
        "AffectedSOPClassUID", "Priority", "MoveDestination",
    ]
    # responses have no requirement list
    assert cmd.missing_elements({"CommandField": CommandField.C_STORE_RSP}) == []


def test_response_to_store_rq():
    rsp = cmd.response(STORE_RQ)
    assert rsp == {
        "CommandField": 0x8001,
        "MessageIDBeingRespondedTo": 0x1234,
        "CommandDataSetType": 0x0101,
        "Status": 0x0000,
        "AffectedSOPClassUID": CT_IMAGE,
        "AffectedSOPInstanceUID": STORE_RQ["AffectedSOPInstanceUID"],
    }
    again = decode(encode(rsp))
    assert again["MessageIDBeingRespondedTo"] == 0x1234
    assert again["AffectedSOPInstanceUID"] == STORE_RQ["AffectedSOPInstanceUID"]


def test_response_status_and_extras():
    rsp = cmd.response(STORE_RQ, 0xA700, ErrorComment="disk full")
    assert rsp["Status"] == 0xA700 and type(rsp["Status"]) is int
    assert rsp["ErrorComment"] == "disk full"


def test_response_to_echo_and_find_has_no_instance_uid():
    echo = cmd.response(ECHO_RQ)
    assert echo["CommandField"] == 0x8030
    assert echo["AffectedSOPClassUID"] == VERIFICATION
    assert "AffectedSOPInstanceUID" not in echo
    find_rq = {
        "CommandField": CommandField.C_FIND_RQ,
        "MessageID": 4,
        "AffectedSOPClassUID": STUDY_ROOT_FIND,
        "AffectedSOPInstanceUID": "1.2.3",  # not a C-FIND element; must not be echoed
        "Priority": 0,
    }
    rsp = cmd.response(find_rq, 0xFF00)
    assert rsp["CommandField"] == 0x8020 and rsp["Status"] == 0xFF00
    assert "AffectedSOPInstanceUID" not in rsp


def test_response_to_n_action_uses_affected_uids():
    rq = {
        "CommandField": CommandField.N_ACTION_RQ,
        "MessageID": 8,
        "RequestedSOPClassUID": "1.2.840.10008.1.20.1",
        "RequestedSOPInstanceUID": "1.2.840.10008.1.20.1.1",
        "ActionTypeID": 1,
    }
    rsp = cmd.response(rq)
    assert rsp["CommandField"] == 0x8130
    assert rsp["AffectedSOPClassUID"] == "1.2.840.10008.1.20.1"
    assert rsp["AffectedSOPInstanceUID"] == "1.2.840.10008.1.20.1.1"


def test_request_and_response_fields():
    assert cmd.is_request(0x0001) and not cmd.is_request(0x8001)
    assert cmd.response_field(CommandField.C_GET_RQ) == CommandField.C_GET_RSP
    for field in CommandField:
        if field is not CommandField.C_CANCEL_RQ and cmd.is_request(field):
            assert CommandField(cmd.response_field(field)).name == field.name[:-3] + "_RSP"


@pytest.mark.parametrize(
    "field",
    [CommandField.N_GET_RQ, CommandField.N_SET_RQ, CommandField.N_DELETE_RQ, 0x0042],
    ids=["n-get", "n-set", "n-delete", "unknown-0x0042"],
)
def test_every_request_needs_a_message_id(field):
    assert "MessageID" in cmd.missing_elements({"CommandField": field})


def test_requests_in_the_table_need_a_message_id():
    for field in cmd.REQUIRED:
        if field != CommandField.C_CANCEL_RQ:
            assert "MessageID" in cmd.missing_elements({"CommandField": field}), hex(field)
