"""QIDO-RS: Search Transaction (PS3.18 10.6) over the same matching engine as C-FIND.

Six resources: all studies; a study's series, all series; a series' instances, a study's
instances, all instances. The query parameters (8.3.4) become the engine's keys
(pacsd/index/query.py): attributes named by keyword or by tag (`00100020`, as OHIF sends
PatientID), dotted paths into sequences, values percent-decoded by Starlette, UID lists
separated by "," (the standard) or "\\" (OHIF), any value repeated as a list. Matches are
read from the index only (no blob is opened) and streamed as one JSON array (Annex F).

Decisions (the conformance statement repeats them):
- Person names match case-insensitively whatever `fuzzymatching` says: PS3.4 C.2.2.2.1
  allows it as literal matching, C-FIND here does the same, and viewers send what the user
  typed ("*doe*"). `fuzzymatching=true` adds prefix matching: "doe" finds "Doe^John".
- Keys of the resource's level and of the levels above it; a matching key of a level below
  is a 400 naming it, the same key in `includefield` is left out as 10.6.3.3 says.
- Results come in the order the entities were indexed, so repeated searches page through
  the same list (8.3.4.4.1) and new arrivals land at its end. There is no maximum per
  response (the body is streamed); `limit` cuts it, with the Warning of 8.3.4.4 when more
  matches remain.
- No match: 204 No Content, as 8.3.4.4.1 requires; dicomweb-client (an empty body gives
  []) and the JavaScript client OHIF uses (204 gives []) both read it as an empty list.
- A parameter that is neither a QIDO-RS parameter nor a known attribute is a 400: ignored,
  a misspelt key would silently widen the search. Private attributes are not searchable.
- The JSON is UTF-8 text; Specific Character Set says "ISO_IR 192" when a response holds
  text beyond ASCII and is left out otherwise (the default repertoire).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import structlog
from pydicom.datadict import dictionary_has_tag, dictionary_VR, keyword_for_tag, tag_for_keyword
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from pacsd.index.matching import QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET, Key, QueryError, json_tag
from pacsd.index.query import Query, find, home_level
from pacsd.web.errors import WebError
from pacsd.web.lookup import check_uid
from pacsd.web.media import accepted
from pacsd.web.urls import service_url

log = structlog.get_logger("pacsd.web")

DICOM_JSON = "application/dicom+json"
PLAIN_JSON = "application/json"

RETRIEVE_URL = 0x00081190
STUDY_INSTANCE_UID = 0x0020000D
SERIES_INSTANCE_UID = 0x0020000E
SOP_INSTANCE_UID = 0x00080018
_COMPUTED = {SPECIFIC_CHARACTER_SET, RETRIEVE_URL}  # made here for each response
_NOT_KEYS = {QUERY_RETRIEVE_LEVEL, 0x00080053} | _COMPUTED  # Query/Retrieve Level and View
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
_LIST_VRS = {"UI", "CS"}  # a comma separates values (8.3.4.1 uid-list-match; OHIF's modality lists)
_UINT_MAX = 2**63 - 1  # what SQL OFFSET/LIMIT take

# Default return attributes, (tag, conditional): PS3.18 Table 10.6.3-3 (study), -4 (series),
# -5 (instance). A conditional one ("if known") is left out when nothing is stored for it
# and the request did not name it; Timezone Offset From UTC is stored with the instances, so
# study and series searches cannot know it. Specific Character Set and Retrieve URL are
# made per response. Study Description is not in the table, but every study list shows it.
STUDY_ATTRIBUTES = (
    (0x00080020, False), (0x00080030, False), (0x00080050, False), (0x00080056, True),
    (0x00080061, False), (0x00080090, False), (0x00080201, True), (0x00081030, True),
    (0x00100010, False), (0x00100020, False), (0x00100030, False), (0x00100040, False),
    (STUDY_INSTANCE_UID, False), (0x00200010, False), (0x00201206, False), (0x00201208, False),
)
SERIES_ATTRIBUTES = (
    (0x00080060, False), (0x00080201, True), (0x0008103E, False), (SERIES_INSTANCE_UID, False),
    (0x00200011, False), (0x00201209, False), (0x00400244, False), (0x00400245, False),
    (0x00400275, True),
)
INSTANCE_ATTRIBUTES = (
    (0x00080016, False), (SOP_INSTANCE_UID, False), (0x00080056, True), (0x00080201, True),
    (0x00200013, False), (0x00280010, True), (0x00280011, True), (0x00280100, True),
    (0x00280008, True),
)
_ATTRIBUTES = {"STUDY": STUDY_ATTRIBUTES, "SERIES": SERIES_ATTRIBUTES, "IMAGE": INSTANCE_ATTRIBUTES}
_UNIQUE = {"STUDY": STUDY_INSTANCE_UID, "SERIES": SERIES_INSTANCE_UID, "IMAGE": SOP_INSTANCE_UID}
_ORDER = ("STUDY", "SERIES", "IMAGE")
# includefield=all: every stored attribute of these levels (patient attributes are study keys)
_ALL = {"STUDY": ("patient", "study"), "SERIES": ("series",), "IMAGE": ("instance",)}
_RESOURCE = {"STUDY": "studies", "SERIES": "series", "IMAGE": "instances"}
_MATCHABLE = {"STUDY": "patient and study", "SERIES": "patient, study and series",
              "IMAGE": "patient, study, series and instance"}


# --- where responses point to --------------------------------------------------------------

def _warning(base: str, text: str) -> str:
    return f'299 {urlsplit(base).netloc}: "{text}"'


MORE_RESULTS = ("The number of results exceeded the maximum supported by the server. "
                "Additional results can be requested.")


# --- query parameters ------------------------------------------------------------------------


def _attribute(name: str) -> int:
    """A tag from an attribute-id (8.3.4.1): a keyword or eight hex digits."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        tag = int(name, 16)
        if (tag >> 16) % 2:
            raise WebError(400, f"private attribute {name} is not supported as a query parameter")
        if not dictionary_has_tag(tag):
            raise WebError(400, f"unknown attribute {name}")
        return tag
    tag = tag_for_keyword(name)
    if tag is None:
        raise WebError(400, f"unknown query parameter {name!r}: not a DICOM keyword, tag or QIDO-RS parameter")
    return tag


def _vr(tag: int) -> str:
    return dictionary_VR(tag).split(" or ")[0]


def _boolean(name: str, values: list[str]) -> bool:
    if len(values) > 1 or values[0].lower() not in ("true", "false"):
        raise WebError(400, f"{name} must be true or false, not {','.join(values)[:40]!r}")
    return values[0].lower() == "true"


def _uint(name: str, values: list[str]) -> int:
    if len(values) > 1:
        raise WebError(400, f"{name} given {len(values)} times")
    value = values[0].strip()
    if not value.isascii() or not value.isdigit():
        raise WebError(400, f"{name} must be a non-negative integer, not {value[:40]!r}")
    if int(value) > _UINT_MAX:
        raise WebError(400, f"{name} {value[:40]} is larger than the largest supported, {_UINT_MAX}")
    return int(value)


@dataclass
class Parameters:
    matches: list[tuple[list[int], str]] = field(default_factory=list)  # (tag path, value)
    includes: list[list[int]] = field(default_factory=list)
    include_all: bool = False
    fuzzy: bool = False
    limit: int | None = None
    offset: int = 0
    warnings: list[str] = field(default_factory=list)


def parse_parameters(request: Request) -> Parameters:
    grouped: dict[str, list[str]] = {}
    for name, value in request.query_params.multi_items():
        grouped.setdefault(name, []).append(value)
    p = Parameters()
    for name, values in grouped.items():
        lower = name.lower()
        if lower in ("accept", "charset"):  # 8.3.3: media type and charset (media.py)
            continue
        if lower == "fuzzymatching":
            p.fuzzy = _boolean(name, values)
        elif lower in ("emptyvaluematching", "multiplevaluematching"):
            if _boolean(name, values):  # 8.3.4.6: say it was not done
                p.warnings.append(f"The {lower} parameter is not supported. Only literal matching has been performed.")
        elif lower == "limit":
            p.limit = _uint(name, values)
        elif lower == "offset":
            p.offset = _uint(name, values)
        elif lower == "includefield":
            for item in (f.strip() for v in values for f in v.split(",")):
                if item.lower() == "all":
                    p.include_all = True
                elif item:
                    p.includes.append([_attribute(part) for part in item.split(".")])
        else:
            p.matches.append(([_attribute(part) for part in name.split(".")], "\\".join(values)))
    return p


# --- the search ------------------------------------------------------------------------------


def _keyword(tag: int) -> str:
    return keyword_for_tag(tag) or f"{tag:08X}"


def _place(keys: list[Key], path: list[int], value: str | None) -> None:
    """Put one parameter into the key tree: sequences along the path get one item holding
    the next key (sequence matching, PS3.4 C.2.2.2.6); `value` None is an includefield."""
    for depth, tag in enumerate(path):
        vr = _vr(tag)
        key = next((k for k in keys if k.tag == tag), None)
        last = depth == len(path) - 1
        if not last and vr != "SQ":
            raise WebError(400, f"{_keyword(tag)} is not a sequence: {'.'.join(map(_keyword, path))}")
        if key is None:
            key = Key.of(tag, vr=vr)
            keys.append(key)
        if not last:
            if not key.items:
                key.items = [[]]
            keys = key.items[0]
            continue
        if value is None or value == "":
            return
        if vr == "SQ":
            raise WebError(400, f"{_keyword(tag)} is a sequence: match on its items ({_keyword(tag)}.<attribute>)")
        if vr in _BINARY_VRS:
            raise WebError(400, f"{_keyword(tag)} ({vr}) cannot be matched")
        key.value = f"{key.value}\\{value}" if key.value else value


class Search:
    """One QIDO-RS request compiled: the engine's Query plus what its responses carry."""

    def __init__(self, level: str, scope: dict[int, str], params: Parameters, base: str) -> None:
        self.level = level
        self.base = base
        self.params = params
        keys: list[Key] = []
        named: set[int] = set()  # asked for by the request: never left out when empty
        for path, value in params.matches:
            top = path[0]
            if top in _NOT_KEYS:
                raise WebError(400, f"{_keyword(top)} is not a matching key")
            if home_level(level, top) is None:
                raise WebError(400, f"{_keyword(top)} is an attribute of a level below {_RESOURCE[level]}: a search "
                                    f"for {_RESOURCE[level]} matches {_MATCHABLE[level]} attributes only")
            value = self._normalise(path[-1], value)
            _place(keys, path, value)
            named.add(top)
        for path in params.includes:
            top = path[0]
            if top in _NOT_KEYS or home_level(level, top) is None:
                continue  # returned anyway, or of a lower level (10.6.3.3: not returned)
            _place(keys, path, None)
            named.add(top)
        for tag, uid in scope.items():  # the path's UIDs
            keys.append(Key.of(tag, uid))
        # Defaults: the level's table, and the tables of the levels above that the path
        # does not fix (10.6.3.3.2: a search for all series also returns study attributes).
        top = _ORDER.index(level)
        while top > 0 and _UNIQUE[_ORDER[top - 1]] not in scope:
            top -= 1
        defaults = [a for lvl in _ORDER[top:_ORDER.index(level) + 1] for a in _ATTRIBUTES[lvl]]
        self.conditional = {json_tag(tag) for tag, conditional in defaults if conditional and tag not in named}
        present = {k.tag for k in keys}
        uniques = [_UNIQUE[lvl] for lvl in _ORDER[:_ORDER.index(level) + 1]]
        always = [t for t in uniques + [tag for tag, _ in defaults]
                  if t not in present and home_level(level, t) is not None]
        try:
            self.query = Query(level, keys, pn_case_insensitive=True, always_return=always,
                               include_attrs=_ALL[level] if params.include_all else ())
        except QueryError as exc:
            raise WebError(400, str(exc)) from None
        self.all_levels = _ALL[level] if params.include_all else ()

    def _normalise(self, tag: int, value: str) -> str:
        vr = _vr(tag)
        if vr in _LIST_VRS:
            value = value.replace(",", "\\")
        if vr == "PN" and self.params.fuzzy:
            value = "\\".join(v if not v or v.endswith("*") else v + "*" for v in value.split("\\"))
        return value

    def retrieve_url(self, js: dict) -> str | None:
        url = self.base
        for lvl in _ORDER[:_ORDER.index(self.level) + 1]:
            uid = ((js.get(json_tag(_UNIQUE[lvl])) or {}).get("Value") or [None])[0]
            if not uid:
                return None
            url += f"/{_RESOURCE[lvl]}/{uid}"
        return url

    def encode(self, match) -> bytes:
        """One match as a DICOM JSON object (F.2), attributes in tag order."""
        ds = self.query.response(match)
        del ds[QUERY_RETRIEVE_LEVEL]
        js = ds.to_json_dict()
        for jt, element in list(js.items()):
            if element.get("Value") == []:  # an empty sequence: no Value either (F.2.5)
                del element["Value"]
            if jt in self.conditional and "Value" not in element and "InlineBinary" not in element:
                del js[jt]
        for attrs_level in self.all_levels:
            for jt, element in match.attrs(attrs_level).items():
                js.setdefault(jt, element)
        js.pop(json_tag(SPECIFIC_CHARACTER_SET), None)
        url = self.retrieve_url(js)
        if url:
            js[json_tag(RETRIEVE_URL)] = {"vr": "UR", "Value": [url]}
        text = json.dumps(dict(sorted(js.items())), ensure_ascii=False, separators=(",", ":"))
        if not text.isascii():
            # JSON text is Unicode: say so when it goes beyond the default repertoire.
            js[json_tag(SPECIFIC_CHARACTER_SET)] = {"vr": "CS", "Value": ["ISO_IR 192"]}
            text = json.dumps(dict(sorted(js.items())), ensure_ascii=False, separators=(",", ":"))
        return text.encode("utf-8")


def _media_type(request: Request) -> str:
    """application/dicom+json, or application/json for a client that asked only for that;
    any other range in a mixed list (OHIF adds multipart ones) is passed over."""
    for media in accepted(request):
        if media.covers(DICOM_JSON):
            return DICOM_JSON
        if media.covers(PLAIN_JSON):
            return PLAIN_JSON
    raise WebError(406, "search results are available as application/dicom+json (or application/json) "
                        f"only; the request accepts {request.headers.get('accept', '')[:200]!r}")


class _Results(StreamingResponse):
    """The JSON array, written as the rows come; the index cursor is closed however the
    response ends (client gone, error)."""

    def __init__(self, search: Search, first, rows, media_type: str, headers: dict[str, str]) -> None:
        self.search, self.first, self.rows = search, first, rows
        self.count = 0
        super().__init__(self._body(), media_type=media_type, headers=headers)

    async def _body(self):
        buffer = bytearray(b"[")
        buffer += self.search.encode(self.first)
        self.count = 1
        async for match in self.rows:
            buffer += b","
            buffer += self.search.encode(match)
            self.count += 1
            if len(buffer) >= 64 * 1024:
                yield bytes(buffer)
                buffer.clear()
                await asyncio.sleep(0)  # encoding is CPU work on the loop: let DIMSE peers in
        buffer += b"]"
        yield bytes(buffer)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.rows.aclose()
            log.debug("qido.sent", level=self.search.level, results=self.count)


def _endpoint(level: str, path_levels: tuple[str, ...]):
    names = {"STUDY": "study", "SERIES": "series"}
    kinds = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID"}

    async def search(request: Request) -> Response:
        started = time.perf_counter()
        media_type = _media_type(request)
        params = parse_parameters(request)
        scope = {_UNIQUE[lvl]: check_uid(kinds[lvl], request.path_params[names[lvl]]) for lvl in path_levels}
        base = service_url(request)
        s = Search(level, scope, params, base)
        engine = request.app.state.archive.engine
        warnings = [_warning(base, w) for w in params.warnings]
        if params.limit is not None:
            # One match past the page tells whether more remain: the Warning goes in the
            # headers, before the first row is written.
            async with aclosing(find(engine, s.query, offset=params.offset + params.limit, limit=1)) as probe:
                if await anext(probe, None) is not None:
                    warnings.append(_warning(base, MORE_RESULTS))
        headers = {"Warning": ", ".join(warnings)} if warnings else {}
        rows = find(engine, s.query, ordered=True, offset=params.offset, limit=params.limit)
        try:
            first = await anext(rows, None)
        except BaseException:
            await rows.aclose()
            raise
        log.debug("qido.search", level=level, path=request.url.path, matched=first is not None,
                  first_ms=round((time.perf_counter() - started) * 1000, 2))
        if first is None:
            await rows.aclose()
            return Response(status_code=204, headers=headers)
        return _Results(s, first, rows, media_type, headers)

    return search


def routes(base: str) -> list:
    return [
        Route(f"{base}/studies", _endpoint("STUDY", ()), methods=["GET"]),
        Route(f"{base}/studies/{{study}}/series", _endpoint("SERIES", ("STUDY",)), methods=["GET"]),
        Route(f"{base}/series", _endpoint("SERIES", ()), methods=["GET"]),
        Route(f"{base}/studies/{{study}}/series/{{series}}/instances", _endpoint("IMAGE", ("STUDY", "SERIES")),
              methods=["GET"]),
        Route(f"{base}/studies/{{study}}/instances", _endpoint("IMAGE", ("STUDY",)), methods=["GET"]),
        Route(f"{base}/instances", _endpoint("IMAGE", ()), methods=["GET"]),
    ]
