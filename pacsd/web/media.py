"""Media types: liberal Accept and Content-Type parsing (PS3.18 8.7).

Viewers differ in how they spell the same request: quoted and unquoted parameter values are
equivalent (8.7), a parameter may be repeated (OHIF sends transfer-syntax twice), unknown
parameters are ignored (8.7.7). The `accept` query parameter replaces the Accept header
(8.3.3.1).
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request


def split_outside_quotes(text: str, sep: str) -> list[str]:
    parts, current, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1].replace('\\"', '"')
    return value


@dataclass(frozen=True)
class MediaRange:
    """One media type or range, e.g. multipart/related; type="application/dicom"."""

    type: str  # lower case, "*/*" and "image/*" allowed
    params: tuple[tuple[str, str], ...] = ()  # names lower case, values unquoted, repeats kept
    q: float = 1.0

    def param(self, name: str) -> str | None:
        for key, value in self.params:
            if key == name:
                return value
        return None

    def params_named(self, name: str) -> list[str]:
        return [value for key, value in self.params if key == name]

    def covers(self, media_type: str) -> bool:
        """Whether this range admits the concrete `media_type`."""
        media_type = media_type.lower()
        if self.type in ("*/*", media_type):
            return True
        major, _, minor = self.type.partition("/")
        return minor == "*" and media_type.startswith(major + "/")

    def __str__(self) -> str:
        return self.type + "".join(f'; {k}="{v}"' for k, v in self.params)


def parse_media_type(text: str) -> MediaRange:
    """One media type with its parameters; q is taken out of the parameters."""
    head, *rest = split_outside_quotes(text, ";") or [""]
    params, q = [], 1.0
    for item in rest:
        name, eq, value = item.partition("=")
        name = name.strip().lower()
        if not eq or not name:
            continue
        value = _unquote(value)
        if name == "q":
            try:
                q = max(0.0, min(1.0, float(value)))
            except ValueError:
                q = 0.0
            continue
        params.append((name, value))
    return MediaRange(head.strip().lower(), tuple(params), q)


def parse_accept(header: str | None) -> list[MediaRange]:
    """The ranges of an Accept header, best first (by q, then as written); none → */*."""
    ranges = [parse_media_type(item) for item in split_outside_quotes(header or "", ",")]
    ranges = [r for r in ranges if "/" in r.type and r.q > 0]
    if not ranges:
        return [MediaRange("*/*")]
    return sorted(ranges, key=lambda r: -r.q)


def accepted(request: Request) -> list[MediaRange]:
    """What the client accepts: the `accept` query parameter(s) if given, else the header."""
    values = request.query_params.getlist("accept")
    if values:
        return parse_accept(",".join(values))
    return parse_accept(request.headers.get("accept"))
