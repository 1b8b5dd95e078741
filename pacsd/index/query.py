"""The matching engine: query keys (PS3.4 C.2.2.2) against the index, matches streamed.

One engine for C-FIND now, Modality Worklist and QIDO-RS later. In: a level and a list of
`Key`s (tag, VR, value as received). Out: `find()`, an async iterator of the matching rows
read through a server-side cursor in batches (memory stays flat whatever the number of
matches), and `Query.response()`, the data set of one match with exactly the requested keys.

Where each key is matched:
- keys that are index columns (schema.py: the C-FIND unique/required keys, the counters,
  ModalitiesInStudy, SOPClassesInStudy) in SQL, where the column indexes serve them;
- keys that live only in a level's DICOM JSON (`attrs`) in Python, on the rows SQL let
  through (every column key has been applied by then);
- two column cases are narrowed in SQL and confirmed in Python: a case-insensitive PN value
  with non-ASCII letters (SQLite's LIKE folds ASCII only, so each such letter becomes % in
  SQL) and a wildcard on a multi-valued column (a % could span two values).

Matching (PS3.4 C.2.2.2): single value (.1); list of UIDs (.2); universal (.3; also a value
of only '*', as C.2.2.2.4 notes, except in UIDs); wild card * and ? (.4; not for UI, DA, TM,
DT or numbers); range for DA, TM, DT (.5: "A-B", "A-", "-B", and a DA and a TM key of one
pair that are both ranges form one date-time range); sequence matching (.6) on the JSON, in
Python: the key's one item is matched against the stored items; an empty key (or an item of
empty keys) returns the stored sequence, otherwise the matching items, with the requested
item keys only. Extensions: several values (backslash) match when any of them matches, as
for ModalitiesInStudy; a PN value also matches the leading component groups of a name
("Yamada^Tarou" its alphabetic group); a partial TM or DT ("1015") covers its precision;
DT offsets are ignored. PN keys are matched case-insensitively when asked
(`pn_case_insensitive`: C.2.2.2.1 allows it for PN), everything else case-sensitively
(SQLite: GLOB, since its LIKE ignores ASCII case).
"""

from __future__ import annotations

import json
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterable, Sequence

import sqlalchemy as sa
from pydicom import Dataset
from pydicom.charset import python_encoding
from pydicom.dataelem import DataElement
from sqlalchemy.ext.asyncio import AsyncEngine

from pacsd.index.levels import level_of
from pacsd.index.reader import reader_for
from pacsd.index.matching import (QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET, ItemChecks, Key, Number,
                                  QueryError, date_time_ranges, json_tag, keys_from_dataset, keyword_of, matcher,
                                  parse_range, universal)
from pacsd.index.schema import instances, patients, series, studies

__all__ = ["INDEX_LEVELS", "QUERY_RETRIEVE_LEVEL", "SPECIFIC_CHARACTER_SET", "Column", "Key", "Level", "Match",
           "Query", "QueryError", "find", "home_level", "keys_from_dataset", "parse_range", "set_character_set"]

RETRIEVE_AE_TITLE = 0x00080054
INSTANCE_AVAILABILITY = 0x00080056
_CHARSET_VRS = {"SH", "LO", "ST", "LT", "UT", "UC", "PN"}

BATCH = 256  # rows per round trip to the database


# --- the index's levels -------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    name: str
    kind: str = "text"  # text | int | set (backslash-joined values) | count
    computed: bool = False  # the value exists only in the column, not in attrs


@dataclass(frozen=True, eq=False)
class Level:
    name: str  # PATIENT, STUDY, SERIES, IMAGE
    table: sa.Table
    attrs_level: str  # levels.level_of() name of the attributes kept at this level
    parent: str | None
    parent_fk: str | None
    columns: dict[int, Column]


INDEX_LEVELS: dict[str, Level] = {
    "PATIENT": Level("PATIENT", patients, "patient", None, None, {
        0x00100020: Column("patient_id"), 0x00100021: Column("issuer_of_patient_id"),
        0x00100010: Column("patient_name"), 0x00100030: Column("patient_birth_date"),
        0x00100032: Column("patient_birth_time"), 0x00100040: Column("patient_sex"),
        # PS3.4 C.6.1.1.2: Number of Patient Related Studies/Series/Instances
        0x00201200: Column("num_studies", "count", True),
        0x00201202: Column("num_series", "count", True),
        0x00201204: Column("num_instances", "count", True),
    }),
    "STUDY": Level("STUDY", studies, "study", "PATIENT", "patient_pk", {
        0x0020000D: Column("study_instance_uid"), 0x00080020: Column("study_date"),
        0x00080030: Column("study_time"), 0x00080050: Column("accession_number"),
        0x00200010: Column("study_id"), 0x00080090: Column("referring_physician_name"),
        0x00081030: Column("study_description"),
        # PS3.4 C.6.1.1.3: Modalities/SOP Classes in Study, Number of Study Related Series/Instances
        0x00080061: Column("modalities_in_study", "set", True),
        0x00080062: Column("sop_classes_in_study", "set", True),
        0x00201206: Column("num_series", "count", True),
        0x00201208: Column("num_instances", "count", True),
    }),
    "SERIES": Level("SERIES", series, "series", "STUDY", "study_pk", {
        0x0020000E: Column("series_instance_uid"), 0x00080060: Column("modality"),
        0x00200011: Column("series_number", "int"), 0x0008103E: Column("series_description"),
        0x00080021: Column("series_date"), 0x00080031: Column("series_time"),
        0x00180015: Column("body_part_examined"),
        0x00400244: Column("performed_procedure_step_start_date"),
        0x00400245: Column("performed_procedure_step_start_time"),
        # PS3.4 C.6.1.1.4: Number of Series Related Instances
        0x00201209: Column("num_instances", "count", True),
    }),
    "IMAGE": Level("IMAGE", instances, "instance", "SERIES", "series_pk", {
        0x00080018: Column("sop_instance_uid"), 0x00080016: Column("sop_class_uid"),
        0x00200013: Column("instance_number", "int"), 0x00080023: Column("content_date"),
        0x00080033: Column("content_time"), 0x00280008: Column("number_of_frames", "int"),
    }),
}


# --- the query -----------------------------------------------------------------------------


class Match:
    """One matching row; a level's attrs JSON is parsed once, when first needed."""

    __slots__ = ("row", "_attrs")

    def __init__(self, row) -> None:
        self.row = row
        self._attrs: dict[str, dict] = {}

    def attrs(self, level: str) -> dict:
        parsed = self._attrs.get(level)
        if parsed is None:
            parsed = self._attrs[level] = json.loads(self.row._mapping[f"attrs_{level}"])
        return parsed

    def column(self, level: Level, name: str) -> Any:
        return self.row._mapping[f"{level.attrs_level}__{name}"]


class Query:
    """A compiled query at one level: SQL for the column keys, Python tests for the rest,
    and the list of keys each response carries.

    `keys` may hold keys of the query level and of the levels above it (the caller decides
    what its service allows); keys of lower levels cannot be answered at this level: they
    are returned empty and listed in `unsupported` (C-FIND: status FF01). `always_return`
    adds keys every response has (C-FIND: the unique keys of the level and above).
    `include_attrs` names attrs levels ("patient", "study", ...) of the chain whose whole
    stored JSON every match carries (`Match.attrs`), for callers that return more than keys.
    """

    def __init__(self, level: str, keys: Iterable[Key], *, levels: dict[str, Level] = INDEX_LEVELS,
                 pn_case_insensitive: bool = False, retrieve_ae_title: str | None = None,
                 always_return: Iterable[int] = (), include_attrs: Iterable[str] = ()) -> None:
        if level not in levels:
            raise QueryError("identifier", f"unknown query level {level!r}", QUERY_RETRIEVE_LEVEL)
        self.level = levels[level]
        self.chain: list[Level] = []
        node: Level | None = self.level
        while node is not None:
            self.chain.append(node)
            node = levels[node.parent] if node.parent else None
        self.fold = pn_case_insensitive
        self.retrieve_ae_title = retrieve_ae_title
        self.unsupported: list[int] = []
        self.python_matched: set[int] = set()  # keys tested on the rows in Python
        self._conditions: list[Callable[[str], Any]] = []  # dialect -> SQL condition
        self._checks: list[Callable[[Match], bool]] = []
        self._columns: set[tuple[Level, str]] = set()
        self._attrs: set[str] = set()
        self._returns: list[tuple[int, str, Callable[[Match], DataElement]]] = []
        keys = list(keys)
        seen = {k.tag for k in keys}
        keys += [Key.of(tag) for tag in always_return if tag not in seen]
        self._compile(keys)
        wanted = set(include_attrs)
        self._attrs |= {lvl.attrs_level for lvl in self.chain if lvl.attrs_level in wanted}

    # where a key lives: ("column", level, column) | ("json", level) | ("const", value) | ("below",)
    def _place(self, tag: int) -> tuple:
        if tag == RETRIEVE_AE_TITLE:
            return ("const", self.retrieve_ae_title or "")
        if tag == INSTANCE_AVAILABILITY and self.level.name != "PATIENT":
            return ("const", "ONLINE")  # everything indexed is on line
        for lvl in self.chain:
            if tag in lvl.columns:
                return ("column", lvl, lvl.columns[tag])
        home = level_of(tag)
        for lvl in self.chain:
            if lvl.attrs_level == home:
                return ("json", lvl)
        return ("below",)

    def _compile(self, keys: list[Key]) -> None:
        places = {k.tag: self._place(k.tag) for k in keys}
        json_keys: dict[str, list[Key]] = {}
        paired: set[int] = set()

        def same_table(d: int, t: int) -> bool:
            return places[d][0] == places[t][0] == "column" and places[d][1] is places[t][1]

        # A date and a time range of one pair, both columns of one table: one SQL condition.
        for date_tag, time_tag, combined in date_time_ranges(keys, same_table):
            lvl = places[date_tag][1]
            dc, tc = lvl.table.c[places[date_tag][2].name], lvl.table.c[places[time_tag][2].name]
            self._conditions.append(lambda dialect, c=combined, dc=dc, tc=tc: c.sql(dc, tc))
            paired |= {date_tag, time_tag}
        for key in keys:
            place = places[key.tag]
            self._returns.append((key.tag, key.vr, self._returner(key, place)))
            if place[0] == "below" or not key.matchable:
                self.unsupported.append(key.tag)  # cannot be returned, or cannot be matched
                continue
            if key.tag in paired or universal(key):
                continue
            if place[0] == "const":
                m = matcher(key, self.fold)
                if not m.test([place[1]]):
                    self._conditions.append(lambda dialect: sa.false())
            elif place[0] == "json" or key.vr == "SQ":
                json_keys.setdefault(place[1].attrs_level, []).append(key)
                self.python_matched.add(key.tag)
            else:
                self._column_key(key, place[1], place[2])
        for attrs_level, level_keys in json_keys.items():
            checks = ItemChecks(level_keys, self.fold)  # also validates the values now
            self._attrs.add(attrs_level)
            self._checks.append(lambda m, a=attrs_level, c=checks: c.test(m.attrs(a)))

    def _column_key(self, key: Key, level: Level, column: Column) -> None:
        m = matcher(key, self.fold)
        if column.kind in ("int", "count") and not isinstance(m, Number):
            raise QueryError("value", f"{keyword_of(key.tag)}: {key.value[:24]!r} is not a number", key.tag)
        col = level.table.c[column.name]
        self._conditions.append(lambda dialect, m=m, col=col, kind=column.kind: m.sql(col, kind, dialect))
        if not m.exact_in_sql(column.kind):
            # Narrowed in SQL, confirmed here on the column's own value.
            self._columns.add((level, column.name))
            self.python_matched.add(key.tag)
            split = column.kind == "set"
            self._checks.append(lambda row, m=m, lvl=level, name=column.name, split=split: m.test(
                (row.column(lvl, name) or "").split("\\") if split else [row.column(lvl, name)]))

    def _returner(self, key: Key, place: tuple) -> Callable[[Match], DataElement]:
        tag, vr = key.tag, key.vr
        if place[0] == "const":
            value = place[1]
            return lambda m: DataElement(tag, vr, value or None)
        if place[0] == "below":
            return lambda m: DataElement(tag, vr, [] if vr == "SQ" else None)
        level = place[1]
        if place[0] == "column" and place[2].computed:
            column = place[2]
            self._columns.add((level, column.name))
            if column.kind == "set":
                return lambda m: DataElement(tag, vr, _split(m.column(level, column.name)))
            return lambda m: DataElement(tag, "IS", m.column(level, column.name))
        attrs_level = level.attrs_level
        self._attrs.add(attrs_level)
        jt = json_tag(tag)
        if vr == "SQ" and key.items and key.items[0]:
            item_keys = key.items[0]
            checks = ItemChecks(item_keys, self.fold)
            wanted = [(json_tag(k.tag), k) for k in item_keys]

            def sequence(m: Match) -> DataElement:
                stored = (m.attrs(attrs_level).get(jt) or {}).get("Value") or []
                items = [{t: item.get(t) or {"vr": k.vr} for t, k in wanted} for item in stored if checks.test(item)]
                return _element(jt, {"vr": "SQ", "Value": items}, tag, vr)
            return sequence
        return lambda m: _element(jt, m.attrs(attrs_level).get(jt), tag, vr)

    def statement(self, dialect: str) -> sa.Select:
        """The SELECT for `dialect` ("sqlite", "postgresql"): the level's table joined to the
        levels above (one row per entity: joins only go up the hierarchy)."""
        selected = [lvl.table.c[name].label(f"{lvl.attrs_level}__{name}") for lvl, name in sorted(
            self._columns, key=lambda c: (c[0].name, c[1]))]
        selected += [lvl.table.c.attrs.label(f"attrs_{lvl.attrs_level}") for lvl in self.chain
                     if lvl.attrs_level in self._attrs]
        source = self.chain[0].table
        for child, parent in zip(self.chain, self.chain[1:]):
            source = source.join(parent.table, parent.table.c.pk == child.table.c[child.parent_fk])
        stmt = sa.select(*(selected or [self.level.table.c.pk])).select_from(source)
        conditions = [make(dialect) for make in self._conditions]
        return stmt.where(*conditions) if conditions else stmt

    def accepts(self, match: Match) -> bool:
        return all(check(match) for check in self._checks)

    def response(self, match: Match) -> Dataset:
        """The response data set: Query/Retrieve Level and every requested key, with the
        stored value, or empty where there is none (no Specific Character Set: see
        `set_character_set`)."""
        ds = Dataset()
        ds.add(DataElement(QUERY_RETRIEVE_LEVEL, "CS", self.level.name))
        for tag, _vr, make in self._returns:
            if tag not in ds:
                ds.add(make(match))
        return ds


def _split(joined: str | None) -> list[str] | None:
    return [v for v in (joined or "").split("\\") if v] or None


def _element(json_tag: str, element: dict | None, tag: int, vr: str) -> DataElement:
    """A stored element from its DICOM JSON; empty (with the requested VR) when absent."""
    if not element:
        return DataElement(tag, vr, [] if vr == "SQ" else None)
    stored_vr = element.get("vr", vr)
    for value_key in ("Value", "InlineBinary"):
        if value_key in element:
            return DataElement.from_json(Dataset, json_tag, stored_vr, element[value_key], value_key)
    return DataElement(tag, stored_vr, [] if stored_vr == "SQ" else None)


def home_level(level: str, tag: int, levels: dict[str, Level] = INDEX_LEVELS) -> Level | None:
    """The level of `level`'s chain (itself or one above) whose rows answer `tag`; None for
    an attribute of a level below, which a query at `level` cannot match or return."""
    chain = [levels[level]]
    while chain[-1].parent:
        chain.append(levels[chain[-1].parent])
    if tag in (RETRIEVE_AE_TITLE, INSTANCE_AVAILABILITY):
        return chain[0]
    # the same order as Query._place: index columns first, then the attrs JSON
    home = level_of(tag)
    return next((lvl for lvl in chain if tag in lvl.columns), None) or next(
        (lvl for lvl in chain if lvl.attrs_level == home), None)


async def find(engine: AsyncEngine, query: Query, batch: int = BATCH, *, ordered: bool = False,
               offset: int = 0, limit: int | None = None) -> AsyncIterator[Match]:
    """The matches of `query`, streamed: a server-side cursor read `batch` rows at a time,
    each row tested against the Python-matched keys before it is yielded. Close the
    iterator (contextlib.aclosing) to stop early; the cursor and connection go with it.

    `ordered` (implied by `offset`/`limit`) returns the matches in the order their entities
    were indexed, so that repeated searches page through the same list, new entities at its
    end. `offset` matches are skipped and at most `limit` yielded: in SQL when every key is
    matched there, else counted here on the rows that passed the Python tests."""
    if offset < 0 or (limit is not None and limit < 0):
        raise ValueError("offset and limit are non-negative")
    if limit == 0:
        return
    paged = offset > 0 or limit is not None
    in_sql = paged and not query._checks
    stmt = query.statement(engine.dialect.name)
    if ordered or paged:
        stmt = stmt.order_by(query.level.table.c.pk)
    if in_sql:
        stmt = stmt.offset(offset or None).limit(limit)
        offset, limit = 0, None
    async with aclosing(_batches(engine, stmt, batch)) as batches:
        async for rows in batches:
            for row in rows:
                match = Match(row)
                if not query.accepts(match):
                    continue
                if offset:
                    offset -= 1
                    continue
                yield match
                if limit is not None:
                    limit -= 1
                    if limit == 0:
                        return


async def _batches(engine: AsyncEngine, stmt, batch: int) -> AsyncIterator[Sequence[sa.Row]]:
    """The statement's rows, `batch` at a time: SQLite's in pacsd's reader threads (one
    hop per batch), PostgreSQL's through a server-side cursor of the async engine."""
    reader = reader_for(engine)
    if reader is not None:
        async with aclosing(reader.batches(stmt, batch)) as rows:
            async for part in rows:
                yield part
        return
    async with engine.connect() as conn:
        result = await conn.stream(stmt.execution_options(yield_per=batch))
        try:
            async for part in result.partitions(batch):
                yield part
        finally:
            await result.close()


# --- character set of a response --------------------------------------------------------------


def _texts(ds: Dataset) -> Iterable[str]:
    for element in ds:
        if element.VR == "SQ":
            for item in element.value or []:
                yield from _texts(item)
        elif element.VR in _CHARSET_VRS and element.value is not None:
            values = element.value if type(element.value).__name__ == "MultiValue" else [element.value]
            yield from (str(v) for v in values)


def set_character_set(ds: Dataset, requested: str | list[str] | None) -> Dataset:
    """Give the response its Specific Character Set (0008,0005). The index holds decoded
    text, so any set can be answered: plain ASCII goes in the request's set (or none); text
    beyond ASCII in the request's set when that is a single set (not ISO 2022 code
    extensions) that encodes all of it, in UTF-8 ("ISO_IR 192") otherwise."""
    if isinstance(requested, str):
        requested = [requested]
    requested = [r for r in (requested or []) if r] or None
    texts = list(_texts(ds))
    chosen: list[str] | None = requested
    if not all(t.isascii() for t in texts):
        chosen = ["ISO_IR 192"]
        if requested and len(requested) == 1 and not requested[0].startswith("ISO 2022"):
            codec = python_encoding.get(requested[0])
            try:
                if codec:
                    for t in texts:
                        t.encode(codec)
                    chosen = requested
            except UnicodeEncodeError:
                pass
    if chosen:
        ds.SpecificCharacterSet = chosen[0] if len(chosen) == 1 else chosen
    return ds
