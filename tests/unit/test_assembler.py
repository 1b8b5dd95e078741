"""DIMSE message reassembly from PDVs (PS3.7 Annex E, PS3.8 Annex E) and the data set spool."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest

from pacsd.dimse import command as cmd
from pacsd.dimse.assembler import Assembler, Message
from pacsd.dimse.spool import Spool, sweep
from pacsd.dul import pdu
from pacsd.dul.pdu import PDUError

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"

COMMAND_LAST = pdu.MCH_COMMAND | pdu.MCH_LAST  # 0x03
COMMAND_MORE = pdu.MCH_COMMAND  # 0x01
DATA_LAST = pdu.MCH_LAST  # 0x02
DATA_MORE = 0x00

ECHO_RQ = {
    "CommandField": cmd.CommandField.C_ECHO_RQ,
    "MessageID": 1,
    "AffectedSOPClassUID": "1.2.840.10008.1.1",
    "CommandDataSetType": cmd.NO_DATASET,
}
STORE_RQ = {
    "CommandField": cmd.CommandField.C_STORE_RQ,
    "MessageID": 2,
    "AffectedSOPClassUID": CT_IMAGE,
    "AffectedSOPInstanceUID": "1.2.3.4.5",
    "Priority": 0,
    "CommandDataSetType": cmd.DATASET_PRESENT,
}


def _decoded(command: dict) -> dict:
    return cmd.decode(cmd.encode(command))


def _split(data: bytes, parts: int) -> list[bytes]:
    step = -(-len(data) // parts)
    chunks = [data[i : i + step] for i in range(0, len(data), step)]
    assert len(chunks) == parts and b"".join(chunks) == data
    return chunks


class Harness:
    def __init__(self, tmp_path: Path, contexts=frozenset({1, 3}), **kwargs) -> None:
        self.messages: list[Message] = []
        self.assembler = Assembler(self.messages.append, tmp_path, set(contexts), **kwargs)

    def pdv(self, context_id: int, control: int, data: bytes) -> None:
        self.assembler.pdv(context_id, control, memoryview(data))

    def command(self, command: dict, context_id: int = 1, parts: int = 1) -> None:
        chunks = _split(cmd.encode(command), parts)
        for chunk in chunks[:-1]:
            self.pdv(context_id, COMMAND_MORE, chunk)
        self.pdv(context_id, COMMAND_LAST, chunks[-1])


def test_command_without_data_set(tmp_path):
    h = Harness(tmp_path)
    h.command(ECHO_RQ)
    assert len(h.messages) == 1
    message = h.messages[0]
    assert message.context_id == 1
    assert message.command == _decoded(ECHO_RQ)
    assert message.command_field == 0x0030
    assert message.dataset is None
    assert not h.assembler.busy
    assert list(tmp_path.iterdir()) == []


def test_command_in_three_fragments_data_set_in_five(tmp_path):
    h = Harness(tmp_path)
    dataset = bytes(range(256)) * 4 + b"tail"
    encoded = cmd.encode(STORE_RQ)
    for i, chunk in enumerate(_split(encoded, 3)):
        h.pdv(3, COMMAND_LAST if i == 2 else COMMAND_MORE, chunk)
        assert h.messages == []
        assert h.assembler.busy
    chunks = _split(dataset, 5)
    for i, chunk in enumerate(chunks):
        assert h.messages == []
        h.pdv(3, DATA_LAST if i == 4 else DATA_MORE, chunk)
    assert len(h.messages) == 1
    message = h.messages[0]
    assert message.context_id == 3
    assert message.command == _decoded(STORE_RQ)
    assert message.dataset is not None
    assert message.dataset.read() == dataset
    assert message.dataset.size == len(dataset)
    assert message.dataset.in_memory
    assert not h.assembler.busy
    assert list(tmp_path.iterdir()) == []


def test_fragments_are_copied_not_kept(tmp_path):
    """The PDVs view the framer's buffer, which is reused: the assembler must copy."""
    h = Harness(tmp_path)
    buffer = bytearray(cmd.encode(STORE_RQ))
    h.assembler.pdv(1, COMMAND_LAST, memoryview(buffer))
    buffer[:] = b"\xee" * len(buffer)
    data = bytearray(b"abcdef")
    h.assembler.pdv(1, DATA_LAST, memoryview(data))
    data[:] = b"zzzzzz"
    assert h.messages[0].command == _decoded(STORE_RQ)
    assert h.messages[0].dataset.read() == b"abcdef"


def test_messages_follow_each_other(tmp_path):
    h = Harness(tmp_path)
    h.command(STORE_RQ, parts=2)
    h.pdv(1, DATA_LAST, b"first")
    h.command(ECHO_RQ, context_id=3)
    h.command(dict(STORE_RQ, MessageID=3), context_id=3)
    h.pdv(3, DATA_MORE, b"sec")
    h.pdv(3, DATA_LAST, b"ond")
    assert [(m.context_id, m.command["MessageID"]) for m in h.messages] == [(1, 2), (3, 1), (3, 3)]
    assert h.messages[0].dataset.read() == b"first"
    assert h.messages[1].dataset is None
    assert h.messages[2].dataset.read() == b"second"


def test_spool_factory_gets_context_and_command(tmp_path):
    calls = []

    def factory(context_id, command):
        calls.append((context_id, command))
        return Spool(tmp_path, prefix=b"PREFIX")

    h = Harness(tmp_path, spool_factory=factory)
    h.command(STORE_RQ, context_id=3)
    assert calls == [(3, _decoded(STORE_RQ))]
    h.pdv(3, DATA_LAST, b"payload")
    spool = h.messages[0].dataset
    assert spool.read() == b"payload" and spool.size == 7 and spool.prefix_length == 6


def test_large_data_set_goes_to_a_file(tmp_path):
    h = Harness(tmp_path, spool_factory=lambda ctx, command: Spool(tmp_path, threshold=16))
    h.command(STORE_RQ)
    chunks = [b"0123456789", b"abcdefghij", b"KLMNOPQRST", b"!"]
    h.pdv(1, DATA_MORE, chunks[0])
    assert list(tmp_path.iterdir()) == []  # 10 bytes: still in memory
    for chunk in chunks[1:-1]:
        h.pdv(1, DATA_MORE, chunk)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".spool"
    h.pdv(1, DATA_LAST, chunks[-1])
    spool = h.messages[0].dataset
    assert not spool.in_memory
    assert spool.path == files[0]
    assert spool.path.read_bytes() == b"".join(chunks)
    assert spool.read() == b"".join(chunks)
    assert spool.size == 31
    spool.discard()
    assert list(tmp_path.iterdir()) == []


def test_discard_mid_data_set_removes_the_spool_file(tmp_path):
    h = Harness(tmp_path, spool_factory=lambda ctx, command: Spool(tmp_path, threshold=16))
    h.command(STORE_RQ)
    h.pdv(1, DATA_MORE, b"x" * 10)
    h.pdv(1, DATA_MORE, b"y" * 10)
    (spool_file,) = list(tmp_path.iterdir())
    assert spool_file.suffix == ".spool"
    h.assembler.discard()
    assert list(tmp_path.iterdir()) == []
    assert not h.assembler.busy
    assert h.messages == []
    # the rest of the aborted data set is not taken for a new message
    with pytest.raises(PDUError):
        h.pdv(1, DATA_LAST, b"z")
    # discard is idempotent and the assembler is usable again
    h.assembler.discard()
    h.command(ECHO_RQ)
    assert len(h.messages) == 1


def test_discard_mid_command(tmp_path):
    h = Harness(tmp_path)
    encoded = cmd.encode(ECHO_RQ)
    h.pdv(1, COMMAND_MORE, encoded[:10])
    assert h.assembler.busy
    h.assembler.discard()
    assert not h.assembler.busy
    h.command(ECHO_RQ)
    assert [m.command for m in h.messages] == [_decoded(ECHO_RQ)]


# --- protocol errors ----------------------------------------------------------------


def test_data_set_fragment_without_command(tmp_path):
    h = Harness(tmp_path)
    with pytest.raises(PDUError):
        h.pdv(1, DATA_LAST, b"data")
    with pytest.raises(PDUError):
        h.pdv(1, DATA_MORE, b"data")
    # after a command that says no data set follows
    h.command(ECHO_RQ)
    with pytest.raises(PDUError):
        h.pdv(1, DATA_LAST, b"data")
    # in the middle of a command
    h.pdv(1, COMMAND_MORE, cmd.encode(STORE_RQ)[:20])
    with pytest.raises(PDUError):
        h.pdv(1, DATA_LAST, b"data")
    assert len(h.messages) == 1


def test_command_fragment_while_data_set_arrives(tmp_path):
    h = Harness(tmp_path)
    h.command(STORE_RQ)
    h.pdv(1, DATA_MORE, b"part")
    with pytest.raises(PDUError):
        h.command(ECHO_RQ)
    with pytest.raises(PDUError):
        h.pdv(1, COMMAND_MORE, b"\x00\x00")
    assert h.messages == []


def test_command_announcing_data_set_then_another_command(tmp_path):
    h = Harness(tmp_path)
    h.command(STORE_RQ)
    with pytest.raises(PDUError):
        h.command(ECHO_RQ)


def test_fragment_on_a_context_not_accepted(tmp_path):
    h = Harness(tmp_path)
    for context_id in (0, 2, 5, 255):
        with pytest.raises(PDUError) as info:
            h.command(ECHO_RQ, context_id=context_id)
        assert info.value.reason == pdu.ABORT_REASON_UNEXPECTED_PARAMETER
    h.command(STORE_RQ, context_id=1)
    with pytest.raises(PDUError):
        h.pdv(7, DATA_LAST, b"data")
    assert h.messages == []


def test_data_set_on_another_context_than_its_command(tmp_path):
    h = Harness(tmp_path)
    h.command(STORE_RQ, context_id=1)
    h.pdv(1, DATA_MORE, b"abc")
    with pytest.raises(PDUError):
        h.pdv(3, DATA_LAST, b"def")
    assert h.messages == []


def test_command_fragments_on_two_contexts(tmp_path):
    h = Harness(tmp_path)
    encoded = cmd.encode(ECHO_RQ)
    h.pdv(1, COMMAND_MORE, encoded[:10])
    with pytest.raises(PDUError):
        h.pdv(3, COMMAND_LAST, encoded[10:])
    assert h.messages == []


def test_command_longer_than_the_maximum(tmp_path):
    h = Harness(tmp_path)
    chunk = b"\x00" * 4096
    for _ in range(cmd.MAX_COMMAND_LENGTH // len(chunk)):
        h.pdv(1, COMMAND_MORE, chunk)  # exactly the maximum is still accepted
    with pytest.raises(PDUError):
        h.pdv(1, COMMAND_MORE, b"\x00")


def test_single_oversize_command_fragment(tmp_path):
    h = Harness(tmp_path)
    with pytest.raises(PDUError):
        h.pdv(1, COMMAND_LAST, b"\x00" * (cmd.MAX_COMMAND_LENGTH + 1))


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00\x00\x00\x00\x04\x00",  # truncated element header
        struct.pack("<HHI", 0x0008, 0x0016, 2) + b"1\x00",  # outside group 0000
        cmd.encode({"MessageID": 1}),  # no Command Field
        struct.pack("<HHI", 0, 0x0100, 3) + b"\x01\x00\x00",  # US of 3 bytes
    ],
    ids=["empty", "truncated", "group-0008", "no-command-field", "us-3"],
)
def test_undecodable_command(tmp_path, raw):
    h = Harness(tmp_path)
    with pytest.raises(PDUError) as info:
        h.pdv(1, COMMAND_LAST, raw)
    assert isinstance(info.value.__cause__, cmd.CommandError)
    assert h.messages == []
    assert not h.assembler.busy


# --- end to end from bytes on the wire ----------------------------------------------


def test_from_wire_bytes_fed_byte_by_byte(tmp_path):
    """Framer -> iter_pdvs -> Assembler, with a tiny spool threshold: the stored file holds
    exactly the data set however the stream was cut."""
    h = Harness(tmp_path, spool_factory=lambda ctx, command: Spool(tmp_path, threshold=16))
    dataset = bytes(range(200))
    encoded = cmd.encode(STORE_RQ)
    # a PDU with two PDV items, built by hand
    items = (
        struct.pack(">IBB", 52, 1, DATA_MORE) + dataset[:50]
        + struct.pack(">IBB", 102, 1, DATA_MORE) + dataset[50:150]
    )
    stream = (
        pdu.encode_pdata(1, COMMAND_MORE, encoded[:30])
        + pdu.encode_pdata(1, COMMAND_LAST, encoded[30:])
        + struct.pack(">BxI", 0x04, len(items)) + items
        + pdu.encode_pdata(1, DATA_LAST, dataset[150:])
        + pdu.encode_pdata(3, COMMAND_LAST, cmd.encode(ECHO_RQ))
    )

    def handle(pdu_type, body):
        assert pdu_type == pdu.P_DATA_TF_TYPE
        for context_id, control, fragment in pdu.iter_pdvs(body):
            h.assembler.pdv(context_id, control, fragment)

    framer = pdu.Framer(16384)
    for i in range(len(stream)):
        framer.feed(stream[i : i + 1], handle)
    assert [m.command_field for m in h.messages] == [0x0001, 0x0030]
    spool = h.messages[0].dataset
    assert not spool.in_memory and spool.path.parent == tmp_path
    assert spool.path.read_bytes() == dataset
    assert h.messages[1].context_id == 3


# --- Spool on its own ---------------------------------------------------------------


def test_spool_prefix_stays_out_of_the_data_set(tmp_path):
    spool = Spool(tmp_path, prefix=b"P" * 10, threshold=16)
    spool.write(b"abc")
    assert spool.in_memory and spool.read() == b"abc"
    spool.write(memoryview(b"defghij"))  # 10 + 10 = 20 > 16: spills
    assert not spool.in_memory
    spool.finish()
    assert spool.path.read_bytes() == b"P" * 10 + b"abcdefghij"
    assert spool.read() == b"abcdefghij" and spool.size == 10


class ShortWrites:
    """A file that takes at most 7 bytes a write, as an unbuffered file may."""

    def __init__(self, f) -> None:
        self.f = f

    def write(self, data) -> int:
        return self.f.write(bytes(data)[:7])

    def close(self) -> None:
        self.f.close()


@pytest.mark.parametrize("threshold", [1 << 20, 16], ids=["memory", "file"])
def test_spool_sha256_is_that_of_what_it_holds(tmp_path, threshold):
    # The pipeline stores this digest as the blob's checksum without reading the bytes again.
    spool = Spool(tmp_path, prefix=b"META", threshold=threshold)
    spool.write(b"0123456789abc")  # 4 + 13 > 16: to the file, if there is one
    if threshold == 16:
        assert not spool.in_memory
        spool._file = ShortWrites(spool._file)
    for fragment in (b"", b"abc", memoryview(b"defghij" * 1000), bytearray(b"k")):
        spool.write(fragment)
    spool.finish()
    held = spool.take_buffer() if spool.in_memory else spool.path.read_bytes()
    assert held == b"META0123456789abcabc" + b"defghij" * 1000 + b"k"
    assert spool.sha256 == hashlib.sha256(held).hexdigest()


def test_spool_threshold_is_inclusive(tmp_path):
    spool = Spool(tmp_path, threshold=16)
    spool.write(b"x" * 16)
    assert spool.in_memory
    spool.write(b"y")
    assert not spool.in_memory


def test_sweep_removes_only_spool_files(tmp_path):
    (tmp_path / "a.spool").write_bytes(b"1")
    (tmp_path / "b.spool").write_bytes(b"2")
    (tmp_path / "keep.dcm").write_bytes(b"3")
    assert sweep(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["keep.dcm"]
    assert sweep(tmp_path / "missing") == 0
