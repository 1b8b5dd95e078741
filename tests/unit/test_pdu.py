"""PS3.8 §9.3 framing and structure checks: Framer, iter_pdvs, check_associate_items."""

from __future__ import annotations

import struct

import pytest

from pacsd.dul import pdu
from pacsd.dul.negotiation import ProposedContext, build_request, negotiate, AcceptorPolicy
from pacsd.dul.pdu import Framer, PDUError, check_associate_items, iter_pdvs

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


def _header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BxI", pdu_type, length)


def _associate_rq() -> bytes:
    raw, _ = build_request(
        "STORESCU",
        "PACSD",
        [
            ProposedContext(VERIFICATION, [IMPLICIT, EXPLICIT]),
            ProposedContext(CT_IMAGE, [EXPLICIT], roles=(False, True)),
        ],
        16384,
    )
    return raw


class Collector:
    def __init__(self) -> None:
        self.pdus: list[tuple[int, bytes]] = []

    def __call__(self, pdu_type: int, body: memoryview) -> None:
        assert isinstance(body, memoryview)
        self.pdus.append((pdu_type, bytes(body)))


def _stream() -> tuple[bytes, list[tuple[int, bytes]]]:
    """Five PDUs of every size class back to back, and what the framer must hand out."""
    rq = _associate_rq()
    pdata1 = pdu.encode_pdata(1, pdu.MCH_COMMAND | pdu.MCH_LAST, b"\x00\x01\x02\x03command!")
    pdata2 = pdu.encode_pdata(3, pdu.MCH_LAST, bytes(range(256)) * 3)
    abort = pdu.encode_abort(pdu.ABORT_SOURCE_PROVIDER, pdu.ABORT_REASON_UNEXPECTED_PDU)
    stream = rq + pdata1 + pdu.A_RELEASE_RQ + pdata2 + pdu.A_RELEASE_RP + abort
    expected = [
        (0x01, rq[6:]),
        (0x04, pdata1[6:]),
        (0x05, b"\x00\x00\x00\x00"),
        (0x04, pdata2[6:]),
        (0x06, b"\x00\x00\x00\x00"),
        (0x07, b"\x00\x00\x02\x02"),
    ]
    return stream, expected


# --- small encoders -----------------------------------------------------------------


def test_fixed_pdus_have_the_standard_layout():
    assert pdu.A_RELEASE_RQ == b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
    assert pdu.A_RELEASE_RP == b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
    assert pdu.encode_abort(2, 6) == b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06"
    assert pdu.encode_reject(1, 1, 7) == b"\x03\x00\x00\x00\x00\x04\x00\x01\x01\x07"
    assert pdu.decode_fixed4(b"\x00\x01\x02\x03") == (1, 2, 3)
    with pytest.raises(PDUError):
        pdu.decode_fixed4(b"\x00\x01\x02")


def test_pdata_encoding():
    data = b"ABCDE"
    encoded = pdu.encode_pdata(5, 0x02, data)
    # PDU type 4, length = 4 (item length) + 2 (ctx, mch) + 5; item length = 2 + 5
    assert encoded == b"\x04\x00\x00\x00\x00\x0b\x00\x00\x00\x07\x05\x02ABCDE"
    assert pdu.pdata_header(5, 0x02, 5) == encoded[:12]
    assert list((c, m, bytes(f)) for c, m, f in iter_pdvs(memoryview(encoded[6:]))) == [
        (5, 2, b"ABCDE")
    ]


# --- Framer -------------------------------------------------------------------------


def test_framer_whole_stream_in_one_feed():
    stream, expected = _stream()
    got = Collector()
    framer = Framer(16384)
    framer.feed(stream, got)
    assert got.pdus == expected
    assert len(framer.buffer) == 0


def test_framer_byte_by_byte():
    stream, expected = _stream()
    got = Collector()
    framer = Framer(16384)
    for i in range(len(stream)):
        framer.feed(stream[i : i + 1], got)
        # Nothing is handed out before its last byte arrived.
        complete = sum(6 + len(body) for _, body in got.pdus)
        assert complete <= i + 1
    assert got.pdus == expected
    assert len(framer.buffer) == 0


def test_framer_every_two_way_split():
    stream, expected = _stream()
    for cut in range(len(stream) + 1):
        got = Collector()
        framer = Framer(16384)
        framer.feed(stream[:cut], got)
        framer.feed(stream[cut:], got)
        assert got.pdus == expected, f"split at {cut}"


def test_framer_irregular_chunks_keep_only_the_incomplete_tail():
    stream, expected = _stream()
    got = Collector()
    framer = Framer(16384)
    pos, step = 0, 1
    while pos < len(stream):
        framer.feed(stream[pos : pos + step], got)
        pos += step
        step = step * 3 % 37 + 1
        consumed = sum(6 + len(body) for _, body in got.pdus)
        assert len(framer.buffer) == min(pos, len(stream)) - consumed
    assert got.pdus == expected


def test_framer_body_is_released_after_the_call():
    kept: list[memoryview] = []
    framer = Framer(16384)
    framer.feed(pdu.A_RELEASE_RQ + pdu.A_RELEASE_RP, lambda t, body: kept.append(body))
    assert len(kept) == 2
    with pytest.raises(ValueError):
        bytes(kept[0])
    # and the framer's buffer can still grow/shrink (no export left behind)
    got = Collector()
    framer.feed(pdu.A_RELEASE_RQ, got)
    assert got.pdus == [(0x05, b"\x00" * 4)]


def test_framer_stops_when_handle_resets_it():
    framer = Framer(16384)
    seen = []

    def handle(pdu_type, body):
        seen.append(pdu_type)
        framer.reset()

    framer.feed(pdu.A_RELEASE_RQ + pdu.A_RELEASE_RP + pdu.A_RELEASE_RQ, handle)
    assert seen == [0x05]
    assert len(framer.buffer) == 0


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: pacs\r\n\r\n",
        bytes.fromhex("160301020001000200fc03030000"),  # TLS 1.x ClientHello record
        b"\x00\x00\x00\x00\x00\x04\x00\x00\x00\x00",  # type 0
        b"\x08\x00\x00\x00\x00\x04\x00\x00\x00\x00",  # type 8, first past A-ABORT
        b"\xff\x00\x00\x00\x00\x04\x00\x00\x00\x00",
    ],
    ids=["http", "tls", "type0", "type8", "type255"],
)
def test_framer_unknown_type_raises_once_header_is_complete(garbage):
    got = Collector()
    framer = Framer(16384)
    framer.feed(garbage[:5], got)  # five bytes: not a header yet, no verdict
    assert got.pdus == []
    with pytest.raises(PDUError) as info:
        framer.feed(garbage[5:6], got)
    assert info.value.reason == pdu.ABORT_REASON_UNRECOGNIZED_PDU == 1
    assert got.pdus == []


def test_framer_garbage_after_a_valid_pdu():
    got = Collector()
    framer = Framer(16384)
    with pytest.raises(PDUError) as info:
        framer.feed(pdu.A_RELEASE_RQ + b"GET / HTTP/1.1\r\n", got)
    assert info.value.reason == 1
    assert got.pdus == [(0x05, b"\x00" * 4)]


def test_framer_pdata_too_long_raises_on_the_header_alone():
    framer = Framer(16384)
    got = Collector()
    with pytest.raises(PDUError) as info:
        framer.feed(_header(0x04, 16385), got)
    assert info.value.reason == pdu.ABORT_REASON_INVALID_PARAMETER
    assert got.pdus == []

    framer = Framer(16384)
    with pytest.raises(PDUError):
        framer.feed(_header(0x04, 0xFFFFFFFF), got)

    # Exactly the maximum is fine: the framer waits for the body.
    framer = Framer(16384)
    body = struct.pack(">IBB", 16380, 1, 0) + b"\xaa" * 16378
    assert len(body) == 16384
    framer.feed(_header(0x04, 16384), got)
    assert got.pdus == []
    framer.feed(body, got)
    assert got.pdus == [(0x04, body)]


@pytest.mark.parametrize("length", [0, 3, 5, 6, 0x10000])
@pytest.mark.parametrize("pdu_type", [0x03, 0x05, 0x06, 0x07])
def test_framer_fixed_pdus_need_length_4(pdu_type, length):
    got = Collector()
    with pytest.raises(PDUError):
        Framer(16384).feed(_header(pdu_type, length), got)
    assert got.pdus == []


def test_framer_release_rq_with_length_5_raises():
    got = Collector()
    with pytest.raises(PDUError):
        Framer(16384).feed(b"\x05\x00\x00\x00\x00\x05\x00\x00\x00\x00\x00", got)
    assert got.pdus == []


@pytest.mark.parametrize("pdu_type", [0x01, 0x02])
def test_framer_associate_length_bounds(pdu_type):
    got = Collector()
    for bad in (0, 67, pdu.MAX_ASSOCIATE_PDU_LENGTH + 1, 0xFFFFFFFF):
        with pytest.raises(PDUError):
            Framer(16384).feed(_header(pdu_type, bad), got)
    for ok in (68, pdu.MAX_ASSOCIATE_PDU_LENGTH):
        Framer(16384).feed(_header(pdu_type, ok), got)  # waits for the body
    assert got.pdus == []


def test_framer_error_in_second_chunk_after_partial_pdu():
    """A PDU split over feeds, then a bad header: only the complete PDU was handed out."""
    got = Collector()
    framer = Framer(16384)
    framer.feed(pdu.A_RELEASE_RP[:7], got)
    with pytest.raises(PDUError):
        framer.feed(pdu.A_RELEASE_RP[7:] + b"\x16\x03\x01\x00\xc8\x01", got)
    assert got.pdus == [(0x06, b"\x00" * 4)]


# --- iter_pdvs ----------------------------------------------------------------------


def _pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">IBB", len(data) + 2, context_id, control) + data


def _pdvs(body: bytes) -> list[tuple[int, int, bytes]]:
    return [(c, m, bytes(f)) for c, m, f in iter_pdvs(memoryview(body))]


def test_iter_pdvs_several_items():
    body = _pdv(1, 0x01, b"cmd1") + _pdv(1, 0x03, b"cmd-2") + _pdv(1, 0x00, b"d" * 7) + _pdv(1, 0x02, b"x")
    assert _pdvs(body) == [
        (1, 1, b"cmd1"),
        (1, 3, b"cmd-2"),
        (1, 0, b"ddddddd"),
        (1, 2, b"x"),
    ]


def test_iter_pdvs_fragments_are_views_of_the_body():
    body = bytearray(_pdv(7, 0x02, b"hello"))
    (_, _, fragment), = list(iter_pdvs(memoryview(body)))
    assert isinstance(fragment, memoryview)
    body[6] = ord("j")
    assert bytes(fragment) == b"jello"


@pytest.mark.parametrize("item_length", [0, 1])
def test_iter_pdvs_item_length_too_small(item_length):
    body = struct.pack(">IBB", item_length, 1, 3) + b"abcd"
    with pytest.raises(PDUError):
        _pdvs(body)


@pytest.mark.parametrize(
    "body",
    [
        # length 0: the next "item" would start inside this one's header
        b"\x00\x00\x00\x00" + b"\x00\x00\x00\x03\x01\x03x",
        # length 1: the control byte would double as the next item's first length byte
        b"\x00\x00\x00\x01\x01" + b"\x00\x00\x00\x03\x01\x03x",
    ],
    ids=["length-0", "length-1"],
)
def test_iter_pdvs_short_item_is_not_resynchronised(body):
    """Lengths 0 and 1 are errors in themselves, not only when the rest fails to parse."""
    with pytest.raises(PDUError):
        _pdvs(body)


def test_iter_pdvs_item_running_past_the_pdu():
    good = _pdv(1, 0x03, b"abcd")
    bad = struct.pack(">IBB", 7, 1, 0x02) + b"abcd"  # claims 5 bytes of data, has 4
    with pytest.raises(PDUError):
        _pdvs(bad)
    with pytest.raises(PDUError):
        _pdvs(good + bad)
    with pytest.raises(PDUError):
        _pdvs(struct.pack(">IBB", 0xFFFFFFFF, 1, 0x02) + b"abcd")


def test_iter_pdvs_truncated_item_header():
    good = _pdv(1, 0x03, b"abcd")
    for extra in (b"\x00", b"\x00\x00\x00\x02\x01"):
        with pytest.raises(PDUError):
            _pdvs(good + extra)


@pytest.mark.parametrize("control", [0x04, 0x08, 0x80, 0xFC, 0x07])
def test_iter_pdvs_reserved_control_bits(control):
    with pytest.raises(PDUError):
        _pdvs(_pdv(1, control, b"data"))


def test_iter_pdvs_empty_body():
    with pytest.raises(PDUError):
        list(iter_pdvs(memoryview(b"")))


# --- check_associate_items ----------------------------------------------------------


def _items(body: bytes) -> list[tuple[int, int, int]]:
    """(offset, type, length) of each top-level item after the fixed fields."""
    out, pos = [], 68
    while pos < len(body):
        item_type, length = body[pos], struct.unpack_from(">H", body, pos + 2)[0]
        out.append((pos, item_type, length))
        pos += 4 + length
    assert pos == len(body)
    return out


def _item_bytes(body: bytes) -> list[bytes]:
    return [body[off : off + 4 + length] for off, _, length in _items(body)]


def test_real_associate_rq_passes():
    raw = _associate_rq()
    body = raw[6:]
    assert raw[0] == 0x01 and struct.unpack(">I", raw[2:6])[0] == len(body)
    assert [t for _, t, _ in _items(body)] == [0x10, 0x20, 0x20, 0x50]
    check_associate_items(body, pdu.A_ASSOCIATE_RQ_TYPE)
    check_associate_items(memoryview(body), pdu.A_ASSOCIATE_RQ_TYPE)


def test_real_associate_ac_passes():
    from pynetdicom.pdu import A_ASSOCIATE_RQ

    rq = A_ASSOCIATE_RQ()
    rq.decode(_associate_rq())
    policy = AcceptorPolicy(
        ae_title="PACSD", check_called_ae=True, require_known_callers=False,
        known_callers=frozenset(), supported={VERIFICATION: [EXPLICIT, IMPLICIT]},
        max_pdu_length=16384,
    )
    answer = negotiate(rq.to_primitive(), policy).answer
    assert answer[0] == 0x02
    body = answer[6:]
    assert [t for _, t, _ in _items(body)] == [0x10, 0x21, 0x21, 0x50]
    check_associate_items(body, pdu.A_ASSOCIATE_AC_TYPE)
    # An AC body is not an RQ body: its 0x21 items are unexpected in an RQ.
    with pytest.raises(PDUError):
        check_associate_items(body, pdu.A_ASSOCIATE_RQ_TYPE)


def test_truncated_associate_rq_raises():
    body = _associate_rq()[6:]
    items = _items(body)
    # Cutting right after a presentation context item leaves a structurally whole PDU
    # (without its User Information item); every other cut lands inside something.
    after_a_pc = {off + 4 + length for off, item_type, length in items if item_type == 0x20}
    assert len(after_a_pc) == 2
    for n in range(len(body)):
        if n in after_a_pc:
            continue
        with pytest.raises(PDUError):
            check_associate_items(body[:n], pdu.A_ASSOCIATE_RQ_TYPE)


def test_presentation_context_running_past_the_pdu():
    body = bytearray(_associate_rq()[6:])
    off, item_type, length = _items(bytes(body))[2]  # the last presentation context
    assert item_type == 0x20
    struct.pack_into(">H", body, off + 2, length + 200)
    with pytest.raises(PDUError):
        check_associate_items(bytes(body), pdu.A_ASSOCIATE_RQ_TYPE)
    # also when the outer length is correct but an item claims the maximum
    struct.pack_into(">H", body, off + 2, 0xFFFF)
    with pytest.raises(PDUError):
        check_associate_items(bytes(body), pdu.A_ASSOCIATE_RQ_TYPE)


def test_user_information_before_presentation_contexts():
    body = _associate_rq()[6:]
    app, pc1, pc2, user = _item_bytes(body)
    reordered = body[:68] + app + user + pc1 + pc2
    with pytest.raises(PDUError) as info:
        check_associate_items(reordered, pdu.A_ASSOCIATE_RQ_TYPE)
    assert info.value.reason == pdu.ABORT_REASON_UNEXPECTED_PARAMETER == 5


def test_application_context_after_presentation_context():
    body = _associate_rq()[6:]
    app, pc1, pc2, user = _item_bytes(body)
    with pytest.raises(PDUError) as info:
        check_associate_items(body[:68] + pc1 + app + pc2 + user, pdu.A_ASSOCIATE_RQ_TYPE)
    assert info.value.reason == 5


def test_two_application_context_items():
    body = _associate_rq()[6:]
    app, pc1, pc2, user = _item_bytes(body)
    with pytest.raises(PDUError):
        check_associate_items(body[:68] + app + app + pc1 + pc2 + user, pdu.A_ASSOCIATE_RQ_TYPE)


def test_no_application_context_item():
    body = _associate_rq()[6:]
    app, pc1, pc2, user = _item_bytes(body)
    with pytest.raises(PDUError):
        check_associate_items(body[:68] + pc1 + pc2 + user, pdu.A_ASSOCIATE_RQ_TYPE)


def test_empty_application_context_name():
    body = _associate_rq()[6:]
    app, pc1, pc2, user = _item_bytes(body)
    with pytest.raises(PDUError):
        check_associate_items(body[:68] + b"\x10\x00\x00\x00" + pc1 + pc2 + user, 0x01)


def test_two_user_information_items():
    body = _associate_rq()[6:]
    app, pc1, pc2, user = _item_bytes(body)
    with pytest.raises(PDUError) as info:
        check_associate_items(body[:68] + app + pc1 + pc2 + user + user, pdu.A_ASSOCIATE_RQ_TYPE)
    assert info.value.reason == 5


def test_no_presentation_context():
    body = _associate_rq()[6:]
    app, pc1, pc2, user = _item_bytes(body)
    with pytest.raises(PDUError):
        check_associate_items(body[:68] + app + user, pdu.A_ASSOCIATE_RQ_TYPE)


def test_unknown_item_type():
    body = _associate_rq()[6:]
    app, pc1, pc2, user = _item_bytes(body)
    with pytest.raises(PDUError) as info:
        check_associate_items(body[:68] + app + pc1 + b"\x99\x00\x00\x02ab" + pc2 + user, 0x01)
    assert info.value.reason == pdu.ABORT_REASON_UNRECOGNIZED_PARAMETER == 4


def test_sub_item_running_past_its_presentation_context():
    body = _associate_rq()[6:]
    app, pc1, pc2, user = _item_bytes(body)
    # pc1: header(4) + ctx id/reserved(4) + abstract syntax + 2 transfer syntaxes.
    # Lengthen the last transfer syntax sub-item by one: it now claims the first byte of
    # the next item, but the presentation context item length is unchanged.
    subs, pos = [], 8
    while pos < len(pc1):
        subs.append(pos)
        pos += 4 + struct.unpack_from(">H", pc1, pos + 2)[0]
    assert pos == len(pc1) and pc1[subs[-1]] == 0x40
    broken = bytearray(pc1)
    last_len = struct.unpack_from(">H", pc1, subs[-1] + 2)[0]
    struct.pack_into(">H", broken, subs[-1] + 2, last_len + 1)
    with pytest.raises(PDUError):
        check_associate_items(body[:68] + app + bytes(broken) + pc2 + user, 0x01)
    # a sub-item header cut short inside the item
    short = bytearray(pc1 + b"\x40\x00")
    struct.pack_into(">H", short, 2, len(short) - 4)
    with pytest.raises(PDUError):
        check_associate_items(body[:68] + app + bytes(short) + pc2 + user, 0x01)


def _pc(context_id: int, subs: list[tuple[int, bytes]]) -> bytes:
    value = bytes([context_id, 0, 0, 0]) + b"".join(
        struct.pack(">BxH", t, len(v)) + v for t, v in subs
    )
    return struct.pack(">BxH", 0x20, len(value)) + value


@pytest.mark.parametrize(
    "subs",
    [
        [(0x40, IMPLICIT.encode())],  # no abstract syntax
        [(0x40, IMPLICIT.encode()), (0x30, VERIFICATION.encode())],  # abstract not first
        [(0x30, VERIFICATION.encode()), (0x30, CT_IMAGE.encode()), (0x40, IMPLICIT.encode())],
        [(0x30, VERIFICATION.encode())],  # no transfer syntax
        [],
    ],
    ids=["no-abstract", "abstract-second", "two-abstract", "no-transfer", "empty"],
)
def test_malformed_presentation_context_rq(subs):
    body = _associate_rq()[6:]
    app, pc1, pc2, user = _item_bytes(body)
    with pytest.raises(PDUError):
        check_associate_items(body[:68] + app + _pc(1, subs) + user, 0x01)
    # the helper builds valid items when given valid sub-items
    good = _pc(1, [(0x30, VERIFICATION.encode()), (0x40, IMPLICIT.encode())])
    check_associate_items(body[:68] + app + good + user, 0x01)


def test_presentation_context_shorter_than_4_bytes():
    body = _associate_rq()[6:]
    app, pc1, pc2, user = _item_bytes(body)
    with pytest.raises(PDUError):
        check_associate_items(body[:68] + app + b"\x20\x00\x00\x02\x01\x00" + user, 0x01)


def test_user_information_sub_item_running_past():
    body = _associate_rq()[6:]
    app, pc1, pc2, user = _item_bytes(body)
    broken = bytearray(user)
    # first sub-item: Maximum Length (0x51) of 4 bytes; claim 5
    assert broken[4] == 0x51 and struct.unpack_from(">H", broken, 6)[0] == 4
    last = 4
    while last + 4 + struct.unpack_from(">H", broken, last + 2)[0] < len(broken):
        last += 4 + struct.unpack_from(">H", broken, last + 2)[0]
    struct.pack_into(">H", broken, last + 2, struct.unpack_from(">H", broken, last + 2)[0] + 1)
    with pytest.raises(PDUError):
        check_associate_items(body[:68] + app + pc1 + pc2 + bytes(broken), 0x01)
