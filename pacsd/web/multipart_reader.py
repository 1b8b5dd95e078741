"""Reading a multipart/related body (RFC 2387 over RFC 2046 5.1) as it arrives.

A push parser without I/O: `feed` takes the next chunk of the body, however it was cut, and
returns what it completed: the header fields of a part (`PartStart`), pieces of its body
(`PartData`), its end (`PartEnd`). A part's body is handed on as it comes, never gathered,
so a multi-gigabyte part costs no more memory than the chunks do. `close` says whether the
body ended properly, with the close delimiter.

Delimiters are CRLF "--" boundary. The CRLF belongs to the delimiter, not to the body before
it; the body's very first delimiter may come without it (the parser acts as if the body began
with a CRLF), and a preamble before it and an epilogue after the close delimiter are ignored.
A delimiter line may end in transport padding (spaces, tabs) before its CRLF.
"""

from __future__ import annotations

from dataclasses import dataclass

# Header fields of one part; more is not a DICOM part but an attack or a broken client.
MAX_HEADER_BYTES = 16 * 1024
# Spaces and tabs allowed between a boundary and the end of its line.
MAX_PADDING = 256


class MultipartError(ValueError):
    """The body is not a well-formed multipart body (the message says where it went wrong)."""


@dataclass(frozen=True)
class PartStart:
    headers: dict[str, str]  # field names in lower case; a repeated field keeps its last value


@dataclass(frozen=True)
class PartData:
    data: bytes | bytearray  # a copy, the caller's to keep


@dataclass(frozen=True)
class PartEnd:
    pass


_PREAMBLE, _AFTER_BOUNDARY, _HEADERS, _BODY, _EPILOGUE = range(5)


class MultipartReader:
    def __init__(self, boundary: str) -> None:
        if not 1 <= len(boundary) <= 70:
            raise MultipartError(f"boundary must be 1 to 70 characters long, not {len(boundary)}")
        try:
            raw = boundary.encode("ascii")
        except UnicodeEncodeError:
            raise MultipartError("boundary must be ASCII") from None
        self._delimiter = b"\r\n--" + raw
        # As if the body began with a CRLF: a first delimiter at its very start matches too.
        self._buffer = bytearray(b"\r\n")
        self._state = _PREAMBLE
        self.parts = 0  # parts started so far

    @property
    def complete(self) -> bool:
        """Whether the close delimiter has been read."""
        return self._state == _EPILOGUE

    def feed(self, chunk: bytes) -> list[PartStart | PartData | PartEnd]:
        if self._state == _EPILOGUE:
            return []  # the epilogue is ignored
        self._buffer += chunk
        events: list[PartStart | PartData | PartEnd] = []
        pos = 0
        while True:
            step = self._step(pos, events)
            if step is None:
                break
            pos = step
        if self._state == _EPILOGUE:
            self._buffer = bytearray()
        else:
            del self._buffer[:pos]
        return events

    def close(self) -> None:
        """The body has ended: raise MultipartError unless it ended with the close delimiter."""
        if self._state != _EPILOGUE:
            where = {
                _PREAMBLE: "before the first boundary",
                _AFTER_BOUNDARY: "in a boundary line",
                _HEADERS: f"in the header fields of part {self.parts}",
                _BODY: f"in the body of part {self.parts}",
            }[self._state]
            raise MultipartError(f"body ends {where} without the closing boundary "
                                 f"(--boundary--): truncated")

    def _step(self, pos: int, events: list) -> int | None:
        """Consume what the current state can from buffer[pos:]; the new position, or None
        when it needs more bytes (or, in the epilogue, has nothing more to do)."""
        buf, delimiter = self._buffer, self._delimiter
        if self._state == _PREAMBLE:
            found = buf.find(delimiter, pos)
            if found < 0:
                # Keep what could be the start of a delimiter cut by the chunk's end.
                return None if len(buf) - pos < len(delimiter) else len(buf) - len(delimiter) + 1
            self._state = _AFTER_BOUNDARY
            return found + len(delimiter)

        if self._state == _AFTER_BOUNDARY:
            if len(buf) - pos < 2:
                return None
            if buf[pos:pos + 2] == b"--":
                self._state = _EPILOGUE
                return None
            end = pos
            while end < len(buf) and buf[end] in b" \t":
                end += 1
            if end - pos > MAX_PADDING:
                raise MultipartError(f"boundary line has more than {MAX_PADDING} characters of padding")
            if len(buf) - end < 2:
                return None
            if buf[end:end + 2] != b"\r\n":
                raise MultipartError("boundary is followed by other characters on its line "
                                     "(the boundary occurs inside a part, or the line is broken)")
            self._state = _HEADERS
            self.parts += 1
            return end + 2

        if self._state == _HEADERS:
            if buf[pos:pos + 2] == b"\r\n":  # no header fields at all
                head_end, body_at = pos, pos + 2
            elif len(buf) - pos < 2:
                return None
            else:
                head_end = buf.find(b"\r\n\r\n", pos, pos + MAX_HEADER_BYTES + 4)
                if head_end < 0:
                    if len(buf) - pos > MAX_HEADER_BYTES:
                        raise MultipartError(f"header fields of part {self.parts} are longer "
                                             f"than {MAX_HEADER_BYTES} bytes")
                    return None
                body_at = head_end + 4
            events.append(PartStart(_parse_headers(bytes(buf[pos:head_end]), self.parts)))
            self._state = _BODY
            return body_at

        if self._state == _BODY:
            found = buf.find(delimiter, pos)
            if found < 0:
                keep = len(delimiter) - 1
                if len(buf) - pos > keep:
                    events.append(PartData(buf[pos:len(buf) - keep]))
                    return len(buf) - keep
                return None
            if found > pos:
                events.append(PartData(buf[pos:found]))
            events.append(PartEnd())
            self._state = _AFTER_BOUNDARY
            return found + len(delimiter)

        return None


def _parse_headers(raw: bytes, part: int) -> dict[str, str]:
    headers: dict[str, str] = {}
    name = None
    for line in raw.decode("latin-1").split("\r\n"):
        if not line:
            continue
        if line[0] in " \t" and name is not None:  # obsolete line folding
            headers[name] += " " + line.strip()
            continue
        field, colon, value = line.partition(":")
        name = field.strip().lower()
        if not colon or not name or " " in name or "\t" in name:
            raise MultipartError(f"part {part} has a malformed header line: {line[:80]!r}")
        headers[name] = value.strip()
    return headers
