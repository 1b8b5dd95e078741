"""UID syntax (PS3.5 §9.1): what a received UID must look like before it reaches SQL or a path."""

from __future__ import annotations

import re

# Components of digits separated by single dots, at most 64 characters. Leading zeros in a
# component are illegal in the standard but common in the field; they are harmless here.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def is_valid_uid(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID.fullmatch(value) is not None


def uid_problem(name: str, value: object) -> str | None:
    """None if `value` is a well-formed UID, else a sentence saying what is wrong."""
    if value is None or value == "":
        return f"{name} is missing"
    if not isinstance(value, str):
        return f"{name} is not a single UID"
    if len(value) > 64:
        return f"{name} is {len(value)} characters long, more than 64"
    if not _UID.fullmatch(value):
        shown = value if len(value) <= 64 else value[:61] + "..."
        return f"{name} {shown!r} is not digits separated by dots"
    return None
