"""The streaming multipart/related reader: bodies cut at every position, the shapes real
clients send (leading CRLF, no trailing CRLF, preamble, epilogue, padding), and the
malformed bodies it must refuse."""

from __future__ import annotations

import pytest

from pacsd.web.multipart_reader import (
    MAX_HEADER_BYTES,
    MultipartError,
    MultipartReader,
    PartData,
    PartEnd,
    PartStart,
)

BOUNDARY = "b0undary-42"


def collect(reader: MultipartReader, chunks) -> list[tuple[dict, bytes]]:
    """Parts as (headers, body), checking the event order on the way."""
    parts: list[tuple[dict, bytearray]] = []
    open_part = False
    for chunk in chunks:
        for event in reader.feed(chunk):
            if isinstance(event, PartStart):
                assert not open_part, "a part started before the previous one ended"
                parts.append((event.headers, bytearray()))
                open_part = True
            elif isinstance(event, PartData):
                assert open_part and event.data, "body bytes outside a part, or an empty piece"
                parts[-1][1].extend(event.data)
            else:
                assert isinstance(event, PartEnd) and open_part
                open_part = False
    reader.close()
    assert not open_part
    return [(headers, bytes(body)) for headers, body in parts]


def body_of(parts: list[tuple[str, bytes]], boundary: str = BOUNDARY, *, leading: bytes = b"",
            closing: bytes = b"\r\n") -> bytes:
    out = bytearray(leading)
    for i, (head, data) in enumerate(parts):
        out += (b"" if i == 0 else b"\r\n") + f"--{boundary}\r\n{head}\r\n".encode() + data
    out += f"\r\n--{boundary}--".encode() + closing
    return bytes(out)


# Bodies that contain what a naive reader trips on: CRLFs, dashes, the boundary without its
# leading CRLF and dashes, a near-miss of the delimiter, and bytes of every value.
PAYLOADS = [
    b"\r\n--" + BOUNDARY[:-1].encode() + b"X\r\n",
    b"--" + BOUNDARY.encode() + b" not at a line start \r\n\r\n",
    bytes(range(256)) * 3,
    b"",
    b"\r\n",
]


def test_every_cut_position_gives_the_same_parts():
    parts = [(f"Content-Type: application/dicom\r\nX-Part: {i}\r\n", data) for i, data in enumerate(PAYLOADS)]
    body = body_of(parts)
    expected = [({"content-type": "application/dicom", "x-part": str(i)}, data)
                for i, data in enumerate(PAYLOADS)]
    assert collect(MultipartReader(BOUNDARY), [body]) == expected
    for cut in range(len(body) + 1):
        assert collect(MultipartReader(BOUNDARY), [body[:cut], body[cut:]]) == expected, cut
    # and in two places at once: a cut inside a delimiter and another one anywhere
    for first in range(0, len(body), 7):
        for second in range(first, len(body), 13):
            chunks = [body[:first], body[first:second], body[second:]]
            assert collect(MultipartReader(BOUNDARY), chunks) == expected, (first, second)


def test_one_byte_at_a_time():
    parts = [("Content-Type: application/dicom\r\n", data) for data in PAYLOADS]
    body = body_of(parts, leading=b"\r\n", closing=b"")
    chunks = [body[i:i + 1] for i in range(len(body))]
    assert [data for _, data in collect(MultipartReader(BOUNDARY), chunks)] == PAYLOADS


def test_body_is_handed_on_before_the_part_ends():
    reader = MultipartReader(BOUNDARY)
    events = reader.feed(f"--{BOUNDARY}\r\n\r\n".encode() + b"x" * 100_000)
    assert isinstance(events[0], PartStart)
    handed = sum(len(e.data) for e in events if isinstance(e, PartData))
    # all but what could still be the start of a delimiter
    assert handed >= 100_000 - len(BOUNDARY) - 4
    assert not any(isinstance(e, PartEnd) for e in events)


def test_leading_crlf_and_no_final_crlf_as_the_javascript_client_sends():
    body = body_of([("Content-Type: application/dicom\r\n", b"DICM")], leading=b"\r\n", closing=b"")
    assert collect(MultipartReader(BOUNDARY), [body]) == [({"content-type": "application/dicom"}, b"DICM")]


def test_preamble_and_epilogue_are_ignored():
    body = (b"This is a preamble.\r\nIt has --dashes-- and \r\n\r\n blank lines.\r\n"
            + body_of([("", b"one"), ("", b"two")])
            + b"and an epilogue with --" + BOUNDARY.encode() + b" in it\r\n")
    assert collect(MultipartReader(BOUNDARY), [body]) == [({}, b"one"), ({}, b"two")]


def test_part_without_header_fields():
    body = f"--{BOUNDARY}\r\n\r\nplain\r\n--{BOUNDARY}--".encode()
    assert collect(MultipartReader(BOUNDARY), [body]) == [({}, b"plain")]


def test_transport_padding_after_a_boundary():
    body = f"--{BOUNDARY}  \t\r\nContent-Type: a/b\r\n\r\nx\r\n--{BOUNDARY}--  \r\n".encode()
    assert collect(MultipartReader(BOUNDARY), [body]) == [({"content-type": "a/b"}, b"x")]


def test_header_fields_case_folding_and_continuation_lines():
    body = (f"--{BOUNDARY}\r\nCONTENT-type:application/dicom;\r\n transfer-syntax=1.2.840.10008.1.2.1\r\n"
            f"Content-Location: /x\r\n\r\ndata\r\n--{BOUNDARY}--").encode()
    [(headers, data)] = collect(MultipartReader(BOUNDARY), [body])
    assert headers == {"content-type": "application/dicom; transfer-syntax=1.2.840.10008.1.2.1",
                       "content-location": "/x"}
    assert data == b"data"


def test_boundary_that_was_quoted_in_content_type_is_used_unquoted():
    # The caller unquotes; characters a quoted boundary may hold (space, '=', '?') work.
    boundary = "a b=c?d"
    body = body_of([("", b"x")], boundary)
    assert collect(MultipartReader(boundary), [body]) == [({}, b"x")]


@pytest.mark.parametrize("cut_from_end", [0, 1, 2, 5, len(BOUNDARY) + 3, 40])
def test_missing_close_delimiter_is_an_error(cut_from_end):
    body = body_of([("Content-Type: application/dicom\r\n", b"x" * 30)], closing=b"")
    body = body[: len(body) - 2 - cut_from_end]  # at least the final "--" is gone
    reader = MultipartReader(BOUNDARY)
    reader.feed(body)
    with pytest.raises(MultipartError, match="truncated"):
        reader.close()


def test_empty_body_and_body_without_any_boundary_are_errors():
    for body in (b"", b"just some text\r\n"):
        reader = MultipartReader(BOUNDARY)
        assert reader.feed(body) == []
        with pytest.raises(MultipartError, match="before the first boundary"):
            reader.close()


def test_boundary_followed_by_other_characters_is_an_error():
    body = f"--{BOUNDARY}\r\n\r\nx\r\n--{BOUNDARY}X\r\n\r\ny\r\n--{BOUNDARY}--".encode()
    with pytest.raises(MultipartError, match="followed by other characters"):
        collect(MultipartReader(BOUNDARY), [body])


def test_oversized_header_block_is_an_error():
    body = f"--{BOUNDARY}\r\nX-Long: ".encode() + b"a" * (MAX_HEADER_BYTES + 10)
    with pytest.raises(MultipartError, match="longer than"):
        MultipartReader(BOUNDARY).feed(body)


def test_malformed_header_line_is_an_error():
    body = f"--{BOUNDARY}\r\nno colon here\r\n\r\nx\r\n--{BOUNDARY}--".encode()
    with pytest.raises(MultipartError, match="malformed header line"):
        MultipartReader(BOUNDARY).feed(body)


@pytest.mark.parametrize("boundary", ["", "x" * 71, "grüße"])
def test_invalid_boundaries_are_refused(boundary):
    with pytest.raises(MultipartError):
        MultipartReader(boundary)


def test_memory_stays_bounded_while_a_large_part_streams():
    reader = MultipartReader(BOUNDARY)
    reader.feed(f"--{BOUNDARY}\r\n\r\n".encode())
    chunk = b"\r\n-" * 20_000  # near-misses everywhere
    for _ in range(50):
        reader.feed(chunk)
        assert len(reader._buffer) < len(BOUNDARY) + 4
    reader.feed(f"\r\n--{BOUNDARY}--".encode())
    reader.close()
