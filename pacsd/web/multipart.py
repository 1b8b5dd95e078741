"""Writing multipart/related responses (RFC 2387, PS3.18 8.7.3.2) part by part.

Each part's header is written as `Content-Type: <type>[; transfer-syntax=<uid>]` with that
exact capitalisation: cornerstone's frame loader finds it by the bytes `Content-Type:` and
reads the transfer syntax from the part header only. No preamble; the body starts with the
first delimiter, as every DICOMweb client's parser expects.
"""

from __future__ import annotations

import uuid


def new_boundary() -> str:
    return uuid.uuid4().hex


def content_type(part_type: str, boundary: str, transfer_syntax: str | None = None) -> str:
    """The response's Content-Type header for parts of `part_type`."""
    value = f'multipart/related; type="{part_type}"; boundary={boundary}'
    if transfer_syntax:
        value += f"; transfer-syntax={transfer_syntax}"
    return value


def part_head(boundary: str, part_type: str, *, first: bool, transfer_syntax: str | None = None,
              location: str | None = None) -> bytes:
    """Everything before a part's body: the delimiter (after the previous body's CRLF) and
    the part's header fields."""
    head = "" if first else "\r\n"
    head += f"--{boundary}\r\nContent-Type: {part_type}"
    if transfer_syntax:
        head += f"; transfer-syntax={transfer_syntax}"
    head += "\r\n"
    if location:
        head += f"Content-Location: {location}\r\n"
    return (head + "\r\n").encode("ascii")


def closing(boundary: str) -> bytes:
    """The close delimiter after the last part's body."""
    return f"\r\n--{boundary}--\r\n".encode("ascii")
