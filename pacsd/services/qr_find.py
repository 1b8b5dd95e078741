"""Query/Retrieve C-FIND SCP (PS3.4 C.4.1) for the Patient Root and Study Root models.

The identifier is decoded with the presentation context's transfer syntax (pydicom decodes
the text with the identifier's Specific Character Set), checked against the information
model's hierarchy, and handed to the matching engine (pacsd/index/query.py). Each match goes
back as a Pending response as soon as its row comes from the database; a C-CANCEL-RQ stops
the query at the next row and the final response is Cancel (FE00).

Decisions (the conformance statement repeats them):
- Hierarchical search only (C.4.1.3.1.1): pacsd does not answer SOP Class Extended
  Negotiation, so relational queries are never agreed. Below the top level the identifier
  must hold one single value for the unique key of each level above (C.4.1.2.1), else A900.
- Other keys of the levels above are matched too and returned (the levels above are one
  entity each, so this only narrows); keys of levels below the query level cannot be
  answered: they are returned empty and the pending status is FF01 (C.4.1.1.4).
- PN keys are matched case-insensitively (C.2.2.2.1 allows it for PN; users of other
  archives expect "doe*" to find "DOE^JOHN"); every other key case-sensitively.
- Text goes back in the request's character set when it can hold it, else in UTF-8
  (ISO_IR 192); plain ASCII answers carry the request's set or none (C.4.1.1.3.2).
- Failure statuses (C.4.1.1.4): A900 "Identifier does not match SOP Class" when the
  identifier breaks the model (level missing, unknown or not in the model, unique keys above
  the level missing or not single, a UID key that is not a UID or has wild cards);
  C000 "Unable to process" when it cannot be decoded or a value is not valid for its VR
  (StudyDate "yesterday", a malformed range); C001 when the index itself fails.
"""

from __future__ import annotations

import time
from contextlib import aclosing

import structlog
from pydicom import Dataset

from pacsd.dimse.assembler import Message
from pacsd.dimse.identifier import (  # noqa: F401 (encode_identifier: for callers of this module)
    MAX_IDENTIFIER_BYTES, IdentifierError, decode_identifier, encode_identifier)
from pacsd.dimse.command import CommandField
from pacsd.dimse.status import Status, describe
from pacsd.index.query import QUERY_RETRIEVE_LEVEL, Key, Query, QueryError, find, keys_from_dataset, set_character_set
from pacsd.net.association import AssociationError
from pacsd.services.registry import ServiceRegistry

log = structlog.get_logger("pacsd.find")

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"

# The levels of each model, top first (C.3.1, C.3.2): Study Root has no PATIENT level, its
# patient attributes are study-level keys.
MODELS = {
    PATIENT_ROOT_FIND: ("Patient Root", ("PATIENT", "STUDY", "SERIES", "IMAGE")),
    STUDY_ROOT_FIND: ("Study Root", ("STUDY", "SERIES", "IMAGE")),
}
UNIQUE_KEYS = {"PATIENT": (0x00100020, "PatientID"), "STUDY": (0x0020000D, "StudyInstanceUID"),
               "SERIES": (0x0020000E, "SeriesInstanceUID"), "IMAGE": (0x00080018, "SOPInstanceUID")}

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
INDEX_FAILURE = 0xC001  # Cxxx "Unable to process": the index failed, not the identifier


def parse_request(ds: Dataset, sop_class: str) -> tuple[str, list[Key]]:
    """The query level and the keys of a decoded identifier, checked against the model's
    hierarchy (raises QueryError)."""
    model, levels = MODELS[sop_class]
    element = ds.get(QUERY_RETRIEVE_LEVEL)
    if element is None or element.value in (None, ""):
        raise QueryError("identifier", "QueryRetrieveLevel (0008,0052) is missing", QUERY_RETRIEVE_LEVEL)
    level = str(element.value).strip()
    if level not in UNIQUE_KEYS:
        raise QueryError("identifier", f"QueryRetrieveLevel {level[:8]!r} is not PATIENT/STUDY/SERIES/IMAGE",
                         QUERY_RETRIEVE_LEVEL)
    if level not in levels:
        raise QueryError("identifier", f"level {level} is not in the {model} model", QUERY_RETRIEVE_LEVEL)
    keys = keys_from_dataset(ds)
    by_tag = {k.tag: k for k in keys}
    # C.4.1.2.1 / C.4.1.3.1.1: in a hierarchical search each level above the query level is
    # named by one single value of its unique key.
    for upper in levels[: levels.index(level)]:
        tag, keyword = UNIQUE_KEYS[upper]
        key = by_tag.get(tag)
        if key is None or key.value == "":
            raise QueryError("identifier", f"{level} level needs one {keyword} (hierarchical search)", tag)
        if "\\" in key.value or "*" in key.value or "?" in key.value:
            raise QueryError("identifier", f"{keyword} must be a single value for a {level} query", tag)
    return level, keys


def unique_keys(sop_class: str, level: str) -> list[int]:
    """The unique keys every response carries: the query level's and those above it."""
    levels = MODELS[sop_class][1]
    return [UNIQUE_KEYS[name][0] for name in levels[: levels.index(level) + 1]]


# Pending responses held back and written at once (a few tens of KiB at most).
RESPONSES_PER_WRITE = 32


class FindSCP:
    def __init__(self, engine, ae_title: str, pn_case_insensitive: bool = True) -> None:
        self.engine = engine
        self.ae_title = ae_title
        self.pn_case_insensitive = pn_case_insensitive

    async def handle_c_find(self, assoc, message: Message) -> None:
        started = time.perf_counter()
        command = message.command
        message_id = command["MessageID"]
        context = assoc.contexts[message.context_id]
        sop_class = context.abstract_syntax
        ts = context.transfer_syntax
        where = {"peer": assoc.protocol.peer_str, "calling_ae": assoc.calling_ae, "message_id": message_id,
                 "model": MODELS[sop_class][0]}
        try:
            query, requested_charset = self._prepare(message, sop_class, ts)
        except IdentifierError as exc:
            await self._fail(assoc, message, where, exc.status, exc.comment, exc.tag)
            return
        # The responses go out a few writes at a time rather than one write each: a search
        # that finds a handful of studies is one write, its final response included.
        assoc.protocol.cork()
        try:
            await self._answer(assoc, message, query, requested_charset, where, started)
        finally:
            assoc.protocol.uncork()

    async def _answer(self, assoc, message: Message, query: Query, requested_charset: list[str] | None,
                      where: dict, started: float) -> None:
        """The pending responses, one per match, then the final one."""
        message_id = message.command["MessageID"]
        ts = assoc.contexts[message.context_id].transfer_syntax
        pending = Status.PENDING_OPTIONAL_KEYS if query.unsupported else Status.PENDING
        matches = 0
        cancelled = False
        try:
            async with aclosing(find(self.engine, query)) as rows:
                async for match in rows:
                    if message_id in assoc.cancelled:
                        cancelled = True
                        break
                    ds = set_character_set(query.response(match), requested_charset)
                    await assoc.respond(message, pending, dataset=encode_identifier(ds, ts))
                    matches += 1
                    if matches % RESPONSES_PER_WRITE == 0:
                        assoc.protocol.flush()
        except AssociationError as exc:
            log.info("find.aborted", **where, matches=matches, error=str(exc))
            return
        except Exception as exc:
            log.exception("find.index_failed", **where, matches=matches)
            await self._fail(assoc, message, where, INDEX_FAILURE, f"unable to process: {type(exc).__name__}")
            return
        cancelled = cancelled or message_id in assoc.cancelled
        await assoc.respond(message, Status.CANCEL if cancelled else Status.SUCCESS)
        log.info("find.cancelled" if cancelled else "find.completed", **where, query_level=query.level.name,
                 matches=matches, unsupported=[f"{t:08X}" for t in query.unsupported],
                 ms=round((time.perf_counter() - started) * 1000, 1))

    def _prepare(self, message: Message, sop_class: str, ts: str) -> tuple[Query, list[str] | None]:
        spool = message.dataset
        if spool is None:
            raise IdentifierError(Status.CANNOT_UNDERSTAND, "C-FIND-RQ without an identifier")
        if spool.error is not None or spool.size > MAX_IDENTIFIER_BYTES:
            raise IdentifierError(Status.CANNOT_UNDERSTAND, "identifier too large or not received")
        identifier = decode_identifier(spool.read(), ts)
        charset = identifier.get("SpecificCharacterSet")
        requested = None if charset in (None, "") else ([charset] if isinstance(charset, str) else list(charset))
        try:
            level, keys = parse_request(identifier, sop_class)
            query = Query(level, keys, pn_case_insensitive=self.pn_case_insensitive,
                          retrieve_ae_title=self.ae_title, always_return=unique_keys(sop_class, level))
        except QueryError as exc:
            status = Status.DATASET_DOES_NOT_MATCH_SOP_CLASS if exc.kind == "identifier" else Status.CANNOT_UNDERSTAND
            raise IdentifierError(status, exc.comment, exc.tag) from exc
        return query, requested

    async def _fail(self, assoc, message: Message, where: dict, status: int, comment: str,
                    tag: int | None = None) -> None:
        log.warning("find.failed", **where, status=describe(status), error=comment,
                    offending_element=f"{tag:08X}" if tag is not None else None)
        extra = {"ErrorComment": comment[:64]}
        if tag is not None:
            extra["OffendingElement"] = tag
        try:
            await assoc.respond(message, status, **extra)
        except AssociationError:
            pass


def register(registry: ServiceRegistry, archive, settings) -> FindSCP:
    scp = FindSCP(archive.engine, settings.dicom.ae_title)
    for sop_class in MODELS:
        registry.add(sop_class, settings.dicom.transfer_syntaxes, CommandField.C_FIND_RQ, scp.handle_c_find)
    return scp
