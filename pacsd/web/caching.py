"""Validators for retrieved resources (RFC 9110 8.8, 13.1): ETag and Last-Modified, and the
304 answer to a matching If-None-Match or If-Modified-Since.

Stored instances never change in place (a blob is written once; an overwrite is a new blob
with a new SHA-256), so an instance's ETag is its SHA-256 and a study's or series' is a hash
of its members' ETags: a new, replaced or removed instance changes it.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from email.utils import format_datetime, parsedate_to_datetime
from typing import Iterable

from starlette.requests import Request
from starlette.responses import Response


def combined_etag(kind: str, members: Iterable[str], *, weak: bool = False) -> str:
    """One entity tag for a representation (`kind`) built from the members' ETags."""
    digest = hashlib.sha256(kind.encode())
    for member in members:
        digest.update(b"\0" + member.encode())
    tag = f'"{digest.hexdigest()}"'
    return "W/" + tag if weak else tag


def http_date(at: datetime) -> str:
    return format_datetime(at.astimezone(timezone.utc).replace(microsecond=0), usegmt=True)


def validators(etag: str, last_modified: datetime) -> dict[str, str]:
    return {"ETag": etag, "Last-Modified": http_date(last_modified)}


def _opaque(tag: str) -> str:
    tag = tag.strip()
    return tag[2:] if tag.startswith("W/") else tag


def not_modified(request: Request, etag: str, last_modified: datetime) -> bool:
    """Whether a GET with these validators gets 304: If-None-Match (weak comparison) when
    present, otherwise If-Modified-Since at one-second resolution."""
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None:
        tags = [t for t in if_none_match.split(",") if t.strip()]
        return any(t.strip() == "*" or _opaque(t) == _opaque(etag) for t in tags)
    since = request.headers.get("if-modified-since")
    if since:
        try:
            when = parsedate_to_datetime(since)
        except (TypeError, ValueError, IndexError):
            return False  # an invalid date is ignored (RFC 9110 13.1.3)
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return last_modified.replace(microsecond=0) <= when
    return False


def not_modified_response(etag: str, last_modified: datetime, extra: dict[str, str] | None = None) -> Response:
    return Response(status_code=304, headers={**validators(etag, last_modified), **(extra or {})})
