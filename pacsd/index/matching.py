"""Matching of one key value (PS3.4 C.2.2.2): the part of the engine that knows VRs.

`Key` is a key as received; `matcher()` turns a non-universal key into a matcher with
`sql(column, kind, dialect)` (a condition on an index column) and `test(values)` (on the
values stored in the DICOM JSON); `ItemChecks` tests a whole list of keys on one JSON data
set (a level's attrs or a sequence item). pacsd/index/query.py puts them together.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Callable

import sqlalchemy as sa
from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

QUERY_RETRIEVE_LEVEL = 0x00080052
SPECIFIC_CHARACTER_SET = 0x00080005


class QueryError(ValueError):
    """A key the engine cannot take. kind "identifier": the keys break the information
    model's rules (C-FIND answers A900); kind "value": a value is not valid for its VR
    (C000). `comment` fits an Error Comment (64 chars); `tag` is the offending element."""

    def __init__(self, kind: str, comment: str, tag: int | None = None) -> None:
        super().__init__(comment)
        self.kind, self.comment, self.tag = kind, comment[:64], tag


# Date and time keys that form one date-time range when both are ranges (C.2.2.2.5).
DATE_TIME_PAIRS = {
    0x00080020: 0x00080030,  # Study Date / Time
    0x00080021: 0x00080031,  # Series
    0x00080022: 0x00080032,  # Acquisition
    0x00080023: 0x00080033,  # Content
    0x00100030: 0x00100032,  # Patient's Birth
    0x00400244: 0x00400245,  # Performed Procedure Step Start
    0x00400002: 0x00400003,  # Scheduled Procedure Step Start (worklist)
}


# --- keys -----------------------------------------------------------------------------------

_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
_NUMBER_VRS = {"IS", "DS", "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"}
_UNSPLIT_VRS = {"LT", "ST", "UT", "UR"}  # one value, a backslash is text
# Identifier attributes that are not keys: the level, the character set, Query/Retrieve
# View and Timezone Offset From UTC (pacsd compares dates as stored, without offsets).
_NOT_KEYS = {QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET, 0x00080053, 0x00080201}


@dataclass
class Key:
    """One matching or return key: `value` as received (several values joined by a
    backslash, "" for universal matching); for SQ keys `items` holds the key's items."""

    tag: int
    vr: str
    value: str = ""
    items: list[list["Key"]] | None = None
    matchable: bool = True  # False: a value of a kind pacsd does not match on (binary)

    @classmethod
    def of(cls, tag: int | str, value: str = "", vr: str | None = None) -> "Key":
        number = tag_for_keyword(tag) if isinstance(tag, str) else tag
        if number is None:
            raise ValueError(f"unknown keyword {tag!r}")
        vr = vr or _vr_of(number)
        return cls(number, vr, value, [] if vr == "SQ" else None)


def _vr_of(tag: int) -> str:
    try:
        return dictionary_VR(tag).split(" or ")[0]
    except KeyError:
        return "UN"


def keys_from_dataset(ds: Dataset) -> list[Key]:
    """The keys of a decoded identifier, without Query/Retrieve Level, Specific Character
    Set and group lengths. Raises whatever pydicom raises for an undecodable element."""
    keys = []
    for element in ds:
        tag = int(element.tag)
        if tag & 0xFFFF == 0 or tag >> 16 in (0x0000, 0x0002) or tag in _NOT_KEYS:
            continue
        vr = element.VR.split(" or ")[0]
        if vr == "SQ":
            keys.append(Key(tag, vr, "", [keys_from_dataset(item) for item in element.value or []]))
            continue
        value = element.value
        if value is None or value == "" or value == b"":
            keys.append(Key(tag, vr))
        elif vr in _BINARY_VRS or isinstance(value, (bytes, bytearray)):
            keys.append(Key(tag, vr, matchable=False))
        else:
            values = value if type(value).__name__ == "MultiValue" or isinstance(value, list) else [value]
            text = "\\".join(f"{int(v):08X}" if vr == "AT" else str(v) for v in values)
            keys.append(Key(tag, vr, text))
    return keys


def keyword_of(tag: int) -> str:
    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def universal(key: Key) -> bool:
    if key.vr == "SQ":
        if key.items and len(key.items) > 1:
            raise QueryError("identifier", f"{keyword_of(key.tag)}: a sequence key has one item (C.2.2.2.6)", key.tag)
        return not key.items or all(universal(k) for k in key.items[0])
    if key.vr == "UI":  # no wild cards in UIDs, not even a lone '*' (C.2.2.2.4)
        return key.value == ""
    return not key.matchable or key.value == "" or set(key.value) == {"*"}


# --- value matchers: one per key, SQL on a column and/or a test on stored values ------------

_LIKE_ESCAPE = "!"


def _like(pattern: str, fold: bool) -> str:
    """A DICOM wildcard value as a LIKE pattern with ESCAPE '!'; LIKE's own metacharacters
    in the value are escaped. With `fold`, non-ASCII letters become % (confirmed later)."""
    out = []
    for ch in pattern:
        if ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        elif ch in "%_!":
            out.append(_LIKE_ESCAPE + ch)
        elif fold and not ch.isascii():
            out.append("%")
        else:
            out.append(ch)
    return "".join(out)


def _glob(pattern: str) -> str:
    """A DICOM wildcard value as an SQLite GLOB pattern (case-sensitive; * and ? are GLOB's
    own, and a [ in the value must not open a character class)."""
    return pattern.replace("[", "[[]")


def _regex(pattern: str, fold: bool) -> re.Pattern:
    if fold:
        pattern = pattern.casefold()
    parts = [".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern]
    return re.compile("".join(parts), re.DOTALL)


class _Text:
    """Single value and wild card matching (C.2.2.2.1, C.2.2.2.4) of text VRs."""

    def __init__(self, values: list[str], fold: bool, pn: bool) -> None:
        self.fold = fold
        self.patterns: list[tuple[str, list[str], re.Pattern]] = []
        for value in values:
            # A PN value also matches the leading component groups of a name ("Yamada^Tarou"
            # the alphabetic group of "Yamada^Tarou=山田^太郎=やまだ^たろう").
            variants = [value, value + "=*"] if pn and not value.endswith("*") else [value]
            self.patterns.append((value, variants, _regex(value, fold)))
        self.pn = pn

    def exact_in_sql(self, kind: str) -> bool:
        wild = any("*" in v or "?" in v for v, _, _ in self.patterns)
        non_ascii = self.fold and any(not v.isascii() for v, _, _ in self.patterns)
        return not non_ascii and not (kind == "set" and wild)

    def sql(self, col, kind: str, dialect: str):
        conds = []
        for value, variants, _ in self.patterns:
            if kind == "set":  # one of the backslash-joined values
                variants = [value, value + "\\*", "*\\" + value, "*\\" + value + "\\*"]
            conds += [_text_condition(col, v, self.fold, dialect) for v in variants]
        return sa.or_(*conds)

    def test(self, stored: list) -> bool:
        for s in stored:
            s = str(s).casefold() if self.fold else str(s)
            # PN: the name, and the name up to each of its '=' (what "value=*" matches in SQL)
            prefixes = [s[:i] for i, ch in enumerate(s) if ch == "="] if self.pn else []
            for value, _, regex in self.patterns:
                if regex.fullmatch(s) or any(regex.fullmatch(p) for p in prefixes):
                    return True
        return False


def _text_condition(col, pattern: str, fold: bool, dialect: str):
    wild = "*" in pattern or "?" in pattern
    if not wild and not fold:
        return col == pattern
    if not fold:
        if dialect == "sqlite":
            return col.op("GLOB")(_glob(pattern))
        return col.like(_like(pattern, False), escape=_LIKE_ESCAPE)
    if dialect == "postgresql":
        return col.ilike(_like(pattern, True), escape=_LIKE_ESCAPE)
    return col.like(_like(pattern, True), escape=_LIKE_ESCAPE)  # SQLite: folds ASCII case


class _Uids:
    """Single value and list of UID matching (C.2.2.2.1, C.2.2.2.2)."""

    def __init__(self, values: list[str]) -> None:
        self.values = values

    def exact_in_sql(self, kind: str) -> bool:
        return True

    def sql(self, col, kind: str, dialect: str):
        if kind == "set":
            return sa.or_(*(_text_condition(col, p, False, dialect) for v in self.values
                            for p in (v, v + "\\*", "*\\" + v, "*\\" + v + "\\*")))
        return col == self.values[0] if len(self.values) == 1 else col.in_(self.values)

    def test(self, stored: list) -> bool:
        return any(str(s) in self.values for s in stored)


class Number:
    """Single value matching of numbers (and of the counters)."""

    def __init__(self, values: list[Decimal]) -> None:
        self.values = values

    def exact_in_sql(self, kind: str) -> bool:
        return True

    def sql(self, col, kind: str, dialect: str):
        integers = [int(v) for v in self.values if v == v.to_integral_value() and abs(v) < 2**63]
        return col.in_(integers) if integers else sa.false()

    def test(self, stored: list) -> bool:
        for s in stored:
            try:
                if Decimal(str(s)) in self.values:
                    return True
            except InvalidOperation:
                continue
        return False


_DA = r"\d{8}"
_TM = r"\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?"
_DT = r"\d{4}(?:\d{2}(?:\d{2}(?:\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?)?)?(?:[+-]\d{4})?"
_FORMS = {"DA": re.compile(_DA), "TM": re.compile(_TM), "DT": re.compile(_DT)}
_OFFSET = re.compile(r"[+-]\d{4}$")
_HIGH = "~"  # sorts after every digit and '.': "1015" + "~" covers 1015xx.xxxxxx


def _normal(vr: str, value: str) -> str:
    if vr == "TM":
        return value.replace(":", "")
    if vr == "DT":
        return _OFFSET.sub("", value)
    return value


def _valid(vr: str, value: str) -> bool:
    if not _FORMS[vr].fullmatch(value):
        return False
    if vr in ("DA", "DT") and len(value) >= 6 and not 1 <= int(value[4:6]) <= 12:
        return False
    if vr in ("DA", "DT") and len(value) >= 8 and not 1 <= int(value[6:8]) <= 31:
        return False
    if vr == "TM" and (int(value[:2]) > 23 or (len(value) >= 4 and int(value[2:4]) > 59)):
        return False
    offset = _OFFSET.search(value) if vr == "DT" else None
    if offset and (int(offset.group()[1:3]) > 14 or int(offset.group()[3:]) > 59):
        return False  # "2024-2025" is a range, not 2024 at UTC-20:25
    return True


def parse_range(vr: str, value: str, tag: int) -> tuple[str | None, str | None, bool]:
    """(lower, upper, is_range) of a DA/TM/DT value (C.2.2.2.5); a single value is the range
    of its own precision. Raises QueryError("value") for anything else."""
    text = value.replace(":", "") if vr == "TM" else value
    if "-" in text and not (vr == "DT" and _valid(vr, text)):
        for pos in [i for i, ch in enumerate(text) if ch == "-"]:
            lo, hi = text[:pos], text[pos + 1:]
            if (lo or hi) and (not lo or _valid(vr, lo)) and (not hi or _valid(vr, hi)):
                return (_normal(vr, lo) or None, _normal(vr, hi) or None, True)
    elif _valid(vr, text):
        return _normal(vr, text), _normal(vr, text), False
    raise QueryError("value", f"{keyword_of(tag)}: {value[:24]!r} is not a {vr} value or range", tag)


class _Range:
    """Range matching (C.2.2.2.5) of DA, TM and DT values, compared as strings."""

    def __init__(self, vr: str, lo: str | None, hi: str | None) -> None:
        self.vr, self.lo, self.hi = vr, lo, hi

    def exact_in_sql(self, kind: str) -> bool:
        return True

    def sql(self, col, kind: str, dialect: str):
        conds = [col != ""]
        if self.lo is not None:
            conds.append(col >= self.lo)
        if self.hi is not None:
            conds.append(col <= self.hi + _HIGH)
        return sa.and_(*conds)

    def test(self, stored: list) -> bool:
        for s in stored:
            s = _normal(self.vr, str(s))
            if s and (self.lo is None or s >= self.lo) and (self.hi is None or s <= self.hi + _HIGH):
                return True
        return False


class _DateTime:
    """A date range and a time range as one range from (date1, time1) to (date2, time2)
    (C.2.2.2.5: StudyDate 20060705-20060707 with StudyTime 1000-1800 starts on the 5th at
    10:00 and ends on the 7th at 18:00, it is not 10:00-18:00 on each day)."""

    def __init__(self, date: _Range, time: _Range) -> None:
        self.date, self.time = date, time

    def sql(self, date_col, time_col):
        d, t = self.date, self.time
        conds = [date_col != ""]
        if d.lo is not None:
            conds.append(date_col >= d.lo)  # lets the date index narrow the scan
            if t.lo is not None:
                conds.append(sa.or_(date_col > d.lo, time_col >= t.lo))
        if d.hi is not None:
            conds.append(date_col <= d.hi)
            if t.hi is not None:
                conds.append(sa.or_(date_col < d.hi, time_col <= t.hi + _HIGH))
        return sa.and_(*conds)

    def test(self, date: str, time: str) -> bool:
        d, t = self.date, self.time
        time = _normal("TM", time)
        if not date or (d.lo is not None and date < d.lo) or (d.hi is not None and date > d.hi):
            return False
        if d.lo is not None and t.lo is not None and date == d.lo and time < t.lo:
            return False
        if d.hi is not None and t.hi is not None and date == d.hi and time > t.hi + _HIGH:
            return False
        return True


def date_time_ranges(keys: list[Key], together: Callable[[int, int], bool] = lambda d, t: True):
    """(date tag, time tag, _DateTime) for each DATE_TIME_PAIRS pair whose keys are both
    ranges (and `together`: stored where one condition can test both)."""
    by_tag = {k.tag: k for k in keys}
    for date_tag, time_tag in DATE_TIME_PAIRS.items():
        d, t = by_tag.get(date_tag), by_tag.get(time_tag)
        if d and t and not universal(d) and not universal(t) and together(date_tag, time_tag):
            dr, tr = parse_range("DA", d.value, date_tag), parse_range("TM", t.value, time_tag)
            if dr[2] and tr[2]:
                yield date_tag, time_tag, _DateTime(_Range("DA", *dr[:2]), _Range("TM", *tr[:2]))


def matcher(key: Key, pn_fold: bool):
    """The matcher of one non-universal, non-sequence key (raises QueryError)."""
    vr, value, tag = key.vr, key.value, key.tag
    values = [value] if vr in _UNSPLIT_VRS else value.split("\\")
    if vr == "UI":
        for v in values:
            if "*" in v or "?" in v:
                raise QueryError("identifier", f"{keyword_of(tag)}: no wildcards in UID keys (C.2.2.2.4)", tag)
            if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", v) or len(v) > 64:
                raise QueryError("identifier", f"{keyword_of(tag)}: {v[:30]!r} is not a UID", tag)
        return _Uids(values)
    if vr in _FORMS:
        if len(values) > 1:
            raise QueryError("value", f"{keyword_of(tag)}: one {vr} value or range expected", tag)
        lo, hi, _ = parse_range(vr, value, tag)
        return _Range(vr, lo, hi)
    if vr in _NUMBER_VRS:
        numbers = []
        for v in values:
            v = v.strip()
            try:
                if vr in ("IS", "US", "SS", "UL", "SL", "UV", "SV") and not re.fullmatch(r"[+-]?\d+", v):
                    raise InvalidOperation
                numbers.append(Decimal(v))
            except InvalidOperation:
                raise QueryError("value", f"{keyword_of(tag)}: {v[:24]!r} is not a valid {vr}", tag) from None
        return Number(numbers)
    return _Text(values, pn_fold and vr == "PN", vr == "PN")


# --- stored values in the DICOM JSON --------------------------------------------------------


def _json_values(element: dict | None) -> list:
    if not element:
        return []
    values = element.get("Value") or []
    if element.get("vr") == "PN":
        return ["=".join([v.get("Alphabetic", ""), v.get("Ideographic", ""), v.get("Phonetic", "")]).rstrip("=")
                for v in values if isinstance(v, dict)]
    return [v for v in values if v is not None]


def json_tag(tag: int) -> str:
    return f"{tag:08X}"


class ItemChecks:
    """Every non-universal key of one data set (a level's attrs, or a sequence item) as
    tests on its DICOM JSON (sequence matching: C.2.2.2.6)."""

    def __init__(self, keys: list[Key], pn_fold: bool) -> None:
        self.tests: list[Callable[[dict], bool]] = []
        paired: set[int] = set()
        for date_tag, time_tag, combined in date_time_ranges(keys):
            dk, tk = json_tag(date_tag), json_tag(time_tag)
            self.tests.append(lambda js, c=combined, dk=dk, tk=tk: c.test(
                str((_json_values(js.get(dk)) or [""])[0]), str((_json_values(js.get(tk)) or [""])[0])))
            paired |= {date_tag, time_tag}
        for key in keys:
            if key.tag in paired or universal(key):
                continue
            jt = json_tag(key.tag)
            if key.vr == "SQ":
                item = ItemChecks(key.items[0], pn_fold)
                self.tests.append(lambda js, jt=jt, item=item: any(
                    item.test(i) for i in ((js.get(jt) or {}).get("Value") or [])))
            else:
                m = matcher(key, pn_fold)
                self.tests.append(lambda js, jt=jt, m=m: m.test(_json_values(js.get(jt))))

    def test(self, js: dict) -> bool:
        return all(t(js) for t in self.tests)
