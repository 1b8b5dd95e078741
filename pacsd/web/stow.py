"""STOW-RS (PS3.18 10.5): POST {base}/studies[/{study}] with Part 10 instances, one per part
of a multipart/related; type="application/dicom" body.

    request.stream() ──► MultipartReader ──► each part: pacsd's own file meta, then the part's
                         data set bytes as received, in memory while the part is small and the
                         STOW memory budget allows, else in a spool file [written off the loop]
    body complete and within [http] stow_max_bytes
      ──► Ingest.ingest for each part (the pipeline of C-STORE and import: structure, UIDs,
          hash, fsync, rename, index commit)
      ──► Store Instances Response Module (PS3.18 Annex I) as application/dicom+json

Nothing is ingested before the whole body has arrived: a request that turns out too large,
malformed or cut off stores nothing, and its spool files are removed. A part of up to 1 MiB
stays in memory (as a C-STORE does) and goes straight to its blob, with no spool file to create,
link and remove; all requests together hold at most STOW_MEMORY_BYTES that way, so memory
stays flat whatever clients send, and the parts beyond it go to spool files. The response is sent
only after every stored instance's blob is fsynced and its index row committed.

Each part's file meta is read as the part streams in and replaced by one pacsd writes (as
for C-STORE and import): the blob never carries a client's preamble, and a part written
without preamble and "DICM" (pydicom does that for a data set that has none) is stored as a
proper Part 10 file all the same.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from pacsd import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from pacsd.config import check_ae_title
from pacsd.dimse.status import Status, describe
from pacsd.ingest.filemeta import build_file_meta
from pacsd.ingest.pipeline import IN_MEMORY_LIMIT, Incoming, Outcome
from pacsd.store.filetree import disk_free
from pacsd.uid import uid_problem
from pacsd.web.errors import WebError
from pacsd.web.lookup import check_uid
from pacsd.web.media import accepted, parse_media_type
from pacsd.web.multipart_reader import MultipartError, MultipartReader, PartData, PartStart
from pacsd.web.urls import instance_url, service_url

log = structlog.get_logger("pacsd.web.stow")

PART_TYPE = "application/dicom"
RESPONSE_TYPE = "application/dicom+json"  # exactly: dicomweb-client compares the string
# Written to the index as the sender when a part's file meta names no Source AE Title.
STOW_SOURCE = "STOW-RS"

_FLUSH_BYTES = 1 << 20  # body bytes gathered before one write to the spool file
_MAX_FILE_META = 64 * 1024  # preamble + group 0002; real ones are a few hundred bytes
_MAX_META_ELEMENTS = 256
_CONCURRENT_INGESTS = 8  # in flight at once, so the index writer can commit them in groups
# Parts held in memory by all STOW-RS requests at once, until their ingest is done.
STOW_MEMORY_BYTES = 64 * 1024 * 1024


class MemoryBudget:
    """Bytes that parts may hold in memory (used on the event loop only: no lock)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


_MEMORY = MemoryBudget(STOW_MEMORY_BYTES)
_MAX_WARNINGS = 10  # Warning header fields naming failed parts
# Parts in one request: each costs memory until the response is sent, whatever its size.
MAX_PARTS = 20_000


def routes(base: str) -> list:
    return [
        Route(f"{base}/studies", store_instances, methods=["POST"]),
        Route(f"{base}/studies/{{study}}", store_instances, methods=["POST"]),
    ]


# --- the file meta at the head of a part ----------------------------------------------------


class PartRefused(Exception):
    """This part cannot be stored: a Failure Reason and what was wrong."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


@dataclass(frozen=True)
class FileMeta:
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    source_ae: str  # "" unless the part named a valid one
    dataset_offset: int  # in the part


_SHORT = struct.Struct("<HH2sH")
_LONG_LENGTH = struct.Struct("<L")
_LONG_VRS = frozenset(
    vr.encode() for vr in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"))
_WANTED = {0x0002: "sop_class_uid", 0x0003: "sop_instance_uid", 0x0010: "transfer_syntax", 0x0016: "source_ae"}


def _not_part10(reason: str) -> PartRefused:
    return PartRefused(Status.CANNOT_UNDERSTAND, f"not a DICOM Part 10 instance: {reason}")


def read_file_meta(head: bytes | bytearray, final: bool) -> FileMeta | None:
    """The file meta (PS3.10 7.1, explicit VR little endian) at the start of `head`.

    None while `head` may still be too short to tell (`final`: no more bytes will come);
    PartRefused when it is no Part 10 file. Accepts the group without preamble and "DICM".
    """
    if len(head) >= 132 and head[128:132] == b"DICM":
        pos = 132
    elif len(head) >= 6 and head[:2] == b"\x02\x00" and head[4:6].isalpha():
        pos = 0  # group 0002 straight away: a file written without its preamble
    elif len(head) < 132 and not final:
        return None
    else:
        raise _not_part10('no "DICM" prefix after a 128-byte preamble and no file meta group')
    found: dict[str, str] = {}
    for _ in range(_MAX_META_ELEMENTS):
        if pos + 8 > len(head):
            if final and pos == len(head):
                break  # a file meta and no data set: the pipeline says what is missing
            if final:
                raise _not_part10("it ends inside its file meta")
            return None
        group, element, vr, length = _SHORT.unpack_from(head, pos)
        if group != 0x0002:
            break
        if not (vr.isalpha() and vr.isupper()):
            raise _not_part10(f"file meta element (0002,{element:04X}) is not explicit VR little endian")
        value_at = pos + 8
        if vr in _LONG_VRS:
            if pos + 12 > len(head):
                if final:
                    raise _not_part10("it ends inside its file meta")
                return None
            (length,) = _LONG_LENGTH.unpack_from(head, pos + 8)
            value_at = pos + 12
        end = value_at + length
        if end > _MAX_FILE_META:
            raise _not_part10(f"its file meta is longer than {_MAX_FILE_META} bytes")
        if end > len(head):
            if final:
                raise _not_part10("it ends inside its file meta")
            return None
        if (name := _WANTED.get(element)) is not None:
            found[name] = bytes(head[value_at:end]).decode("ascii", "replace").strip("\0 ")
        pos = end
    else:
        raise _not_part10(f"its file meta has more than {_MAX_META_ELEMENTS} elements")
    for key, name in (("sop_class_uid", "Media Storage SOP Class UID"),
                      ("sop_instance_uid", "Media Storage SOP Instance UID"),
                      ("transfer_syntax", "Transfer Syntax UID")):
        if problem := uid_problem(name, found.get(key)):
            raise PartRefused(Status.CANNOT_UNDERSTAND, f"file meta: {problem}")
    try:
        source_ae = check_ae_title(found.get("source_ae", ""))
    except ValueError:
        source_ae = ""
    return FileMeta(found["sop_class_uid"], found["sop_instance_uid"], found["transfer_syntax"],
                    source_ae, pos)


# --- one part on its way to memory or a spool file ------------------------------------------


@dataclass
class ReceivedPart:
    number: int  # 1-based, in request order
    spool_dir: Path
    # Where a small part may stay in memory; None: every part goes to a spool file.
    budget: MemoryBudget | None = None
    meta: FileMeta | None = None
    path: Path | None = None
    # A finished part kept in memory: pacsd's file meta, then the data set as received.
    buffer: bytearray | None = None
    dataset_offset: int = 0  # in the spool file or buffer: the length of pacsd's file meta
    refused: PartRefused | None = None
    _head: bytearray = field(default_factory=bytearray)
    _pending: bytearray = field(default_factory=bytearray)
    _file: object = None
    _held: int = 0  # bytes taken from the budget

    def check_headers(self, headers: dict[str, str]) -> None:
        value = headers.get("content-type")
        if value is not None and parse_media_type(value).type != PART_TYPE:
            self.refused = PartRefused(
                Status.CANNOT_UNDERSTAND,
                f"part has Content-Type {value[:80]!r}: only {PART_TYPE} parts (Part 10 instances) "
                f"are accepted")

    async def write(self, data: bytes | bytearray, run) -> None:
        if self.refused is not None:
            return  # the rest of a refused part is read and dropped
        try:
            if self.meta is None:
                self._head += data
                meta = read_file_meta(self._head, final=False)
                if meta is None:
                    return
                await self._begin(meta, run)
                return
            self._pending += data
            await self._grew(len(data), run)
        except PartRefused as exc:
            await self._refuse(exc, run)
        except OSError as exc:
            await self._refuse(PartRefused(Status.OUT_OF_RESOURCES, _resource_comment(exc)), run)

    async def finish(self, run) -> None:
        """The part's last byte has arrived: its spool file is complete and closed."""
        if self.refused is not None:
            return
        try:
            if self.meta is None:
                meta = read_file_meta(self._head, final=True)
                await self._begin(meta, run)
            if self._file is None:
                self.buffer, self._pending = self._pending, bytearray()
                return
            await self._flush(run)
            await run(self._file.close)
            self._file = None
        except PartRefused as exc:
            await self._refuse(exc, run)
        except OSError as exc:
            await self._refuse(PartRefused(Status.OUT_OF_RESOURCES, _resource_comment(exc)), run)

    async def _begin(self, meta: FileMeta, run) -> None:
        try:
            header = build_file_meta(meta.sop_class_uid, meta.sop_instance_uid, meta.transfer_syntax,
                                     meta.source_ae, IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME)
        except ValueError as exc:
            raise PartRefused(Status.CANNOT_UNDERSTAND, f"file meta: {exc}") from None
        self.meta = meta
        self.dataset_offset = len(header)
        self._pending = bytearray(header) + self._head[meta.dataset_offset:]
        self._head = bytearray()
        await self._grew(len(self._pending), run)

    async def _grew(self, n: int, run) -> None:
        """`n` more bytes are pending: keep them in memory while the part may stay there,
        else (from then on) in the spool file."""
        if self._file is None:
            if (self.budget is not None and len(self._pending) <= IN_MEMORY_LIMIT
                    and self.budget.take(n)):
                self._held += n
                return
            self.release()
            self.path = self.spool_dir / f"{uuid.uuid4().hex}.spool"
            self._file = await run(_create, self.path)
        if len(self._pending) >= _FLUSH_BYTES:
            await self._flush(run)

    def release(self) -> None:
        """Give back what the part took from the memory budget (on the event loop)."""
        if self._held:
            self.budget.give(self._held)
            self._held = 0

    async def _flush(self, run) -> None:
        if self._pending:
            pending, self._pending = self._pending, bytearray()
            await run(self._file.write, pending)

    async def _refuse(self, exc: PartRefused, run) -> None:
        self.refused = exc
        self._head = bytearray()
        self._pending = bytearray()
        self.buffer = None
        self.release()
        await run(self.discard)

    @property
    def holds_file(self) -> bool:
        return self.path is not None or self._file is not None

    def discard(self) -> None:
        """Close and remove the spool file (blocking; also used on the way out of a failure).
        The memory budget is given back separately, by `release` on the event loop."""
        if self._file is not None:
            try:
                self._file.close()
            except (OSError, ValueError):  # ValueError: a write still running (cancellation)
                pass
            self._file = None
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.path = None


def _create(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "xb")


def _resource_comment(exc: OSError) -> str:
    return f"out of resources while spooling the part: {exc.strerror or exc}"


# --- the request ----------------------------------------------------------------------------


def _boundary_of(request: Request) -> str:
    """Check the request's Content-Type; its boundary (415 or 400 when it will not do)."""
    value = request.headers.get("content-type")
    if not value:
        raise WebError(415, f'a STOW-RS request needs Content-Type: multipart/related; '
                            f'type="{PART_TYPE}"; boundary=...')
    media = parse_media_type(value)
    if media.type != "multipart/related":
        raise WebError(415, f"Content-Type {media.type} is not supported: STOW-RS takes "
                            f'multipart/related; type="{PART_TYPE}"')
    part_type = media.param("type")
    if part_type is not None and parse_media_type(part_type).type != PART_TYPE:
        raise WebError(415, f"multipart/related parts of type {part_type} are not supported: only "
                            f"{PART_TYPE} parts (Part 10 instances) are accepted, not metadata "
                            f"and bulk data")
    boundary = media.param("boundary")
    if not boundary:
        raise WebError(400, "Content-Type multipart/related has no boundary parameter")
    return boundary


def _check_accept(request: Request) -> None:
    if not any(r.covers(RESPONSE_TYPE) or r.covers("application/json") for r in accepted(request)):
        raise WebError(406, f"the response of STOW-RS is {RESPONSE_TYPE}; the request's Accept "
                            f"does not allow it")


def _check_length(request: Request, limit: int) -> None:
    value = request.headers.get("content-length")
    if value is None:
        return  # chunked: counted while it streams
    if not value.isdigit():
        raise WebError(400, f"Content-Length {value[:40]!r} is not a number")
    if int(value) > limit:
        raise WebError(413, f"request body of {int(value)} bytes is larger than the {limit} bytes "
                            f"STOW-RS accepts ([http] stow_max_bytes)")


async def _receive(request: Request, boundary: str, limit: int, spool_dir: Path, run,
                   parts: list[ReceivedPart]) -> int:
    """Read the whole body, each part into memory or a spool file (appended to `parts`);
    bytes read."""
    try:
        reader = MultipartReader(boundary)
    except MultipartError as exc:
        raise WebError(400, f"Content-Type boundary parameter: {exc}") from None
    received = 0
    current: ReceivedPart | None = None
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise WebError(413, f"request body is larger than the {limit} bytes STOW-RS "
                                    f"accepts ([http] stow_max_bytes)")
            for event in reader.feed(chunk):
                if isinstance(event, PartStart):
                    if len(parts) == MAX_PARTS:
                        raise WebError(413, f"request has more than {MAX_PARTS} parts: send the "
                                            f"instances in several requests")
                    current = ReceivedPart(len(parts) + 1, spool_dir, _MEMORY)
                    parts.append(current)
                    current.check_headers(event.headers)
                elif isinstance(event, PartData):
                    await current.write(event.data, run)
                else:
                    await current.finish(run)
                    current = None
        reader.close()
    except MultipartError as exc:
        raise WebError(400, f"malformed multipart/related body: {exc}") from None
    if not parts:
        raise WebError(400, "multipart/related body has no parts")
    return received


async def _ingest(request: Request, part: ReceivedPart, study: str | None) -> Outcome:
    archive = request.app.state.archive
    meta = part.meta
    path, part.path = part.path, None  # the pipeline owns the spool file from here
    buffer, part.buffer = part.buffer, None
    return await archive.ingest.ingest(Incoming(
        path=path,
        buffer=buffer,
        dataset_offset=part.dataset_offset,
        transfer_syntax=meta.transfer_syntax,
        calling_ae=meta.source_ae or STOW_SOURCE,
        sop_class_uid=meta.sop_class_uid,
        sop_instance_uid=meta.sop_instance_uid,
        study_instance_uid=study,
    ))


async def store_instances(request: Request) -> Response:
    started = time.perf_counter()
    study = request.path_params.get("study")
    if study is not None:
        check_uid("StudyInstanceUID", study)
    boundary = _boundary_of(request)
    _check_accept(request)
    settings = request.app.state.settings
    limit = settings.http.stow_max_bytes
    _check_length(request, limit)
    archive = request.app.state.archive
    loop = asyncio.get_running_loop()

    def run(fn, *args):
        return loop.run_in_executor(archive.executor, fn, *args)

    parts: list[ReceivedPart] = []
    try:
        try:
            received = await _receive(request, boundary, limit, settings.storage.spool_dir, run, parts)
        except ClientDisconnect:
            log.info("stow.disconnected", client=_client(request), parts=len(parts), note="nothing stored")
            return Response(status_code=400)  # nobody is listening any more
        gate = asyncio.Semaphore(_CONCURRENT_INGESTS)
        storage = settings.storage
        # Once for the request, not per part: each check is a trip to a worker thread.
        full = bool(storage.min_free_bytes) and await run(disk_free, storage.data_dir) < storage.min_free_bytes

        async def one(part: ReceivedPart) -> Outcome:
            if part.refused is not None:
                return Outcome(part.refused.status, part.refused.comment)
            if full:
                return Outcome(Status.OUT_OF_RESOURCES, "out of resources: free disk space below "
                                                        "storage.min_free_bytes")
            async with gate:
                try:
                    return await _ingest(request, part, study)
                finally:
                    part.release()

        outcomes = await asyncio.gather(*(one(part) for part in parts))
    except asyncio.CancelledError:
        for part in parts:
            part.discard()
        raise
    finally:
        for part in parts:
            part.buffer = None
            part.release()
        if any(part.holds_file for part in parts):
            await asyncio.shield(run(_discard_all, parts))

    for part, outcome in zip(parts, outcomes):
        if outcome.status != Status.SUCCESS:
            log.warning("stow.failed", client=_client(request), part=part.number,
                        sop_instance_uid=part.meta and part.meta.sop_instance_uid,
                        status=describe(outcome.status), error=outcome.comment)
    body, status, warnings = _response(request, study, parts, outcomes)
    stored = sum(1 for o in outcomes if o.status == Status.SUCCESS)
    log.info("stow.received", client=_client(request), parts=len(parts), stored=stored,
             failed=len(parts) - stored, bytes=received, status=status, ms=round((time.perf_counter() - started) * 1000, 2))
    response = Response(json.dumps(body).encode(), status_code=status, media_type=RESPONSE_TYPE)
    for text in warnings:
        response.headers.append("Warning", text)
    return response


def _client(request: Request) -> str | None:
    return f"{request.client.host}:{request.client.port}" if request.client else None


def _discard_all(parts: list[ReceivedPart]) -> None:
    for part in parts:
        part.discard()


# --- the response (PS3.18 Annex I) ----------------------------------------------------------


def _uid(value: str | None) -> dict:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def _url(value: str | None) -> dict:
    return {"vr": "UR", "Value": [value]} if value else {"vr": "UR"}


def _warning(text: str) -> str:
    # A Warning field (RFC 7234 5.5): code, agent, quoted text of printable ASCII.
    clean = "".join(ch if " " <= ch <= "~" and ch not in '"\\' else "?" for ch in text)
    return f'299 pacsd "{clean[:300]}"'


def _response(request: Request, study: str | None, parts: list[ReceivedPart],
              outcomes: list[Outcome]) -> tuple[dict, int, list[str]]:
    base = service_url(request)
    referenced, failed, warnings = [], [], []
    studies_stored = set()
    for part, outcome in zip(parts, outcomes):
        meta = part.meta
        item = {"00081150": _uid(meta and meta.sop_class_uid),
                "00081155": _uid(meta and meta.sop_instance_uid)}
        if outcome.status == Status.SUCCESS:
            studies_stored.add(outcome.study_instance_uid)
            item["00081190"] = _url(instance_url(base, outcome.study_instance_uid,
                                                 outcome.series_instance_uid, meta.sop_instance_uid))
            referenced.append(item)
            continue
        item["00081197"] = {"vr": "US", "Value": [int(outcome.status)]}
        failed.append(item)
        if len(warnings) < _MAX_WARNINGS:
            # The Failure Reason says what kind of failure; the comment says what was wrong.
            uid = meta.sop_instance_uid if meta else "SOP Instance UID unknown"
            warnings.append(_warning(f"part {part.number} ({uid}): {describe(outcome.status)}: "
                                     f"{outcome.comment}"))
    if study is None and len(studies_stored) == 1:
        study = next(iter(studies_stored))
    body = {"00081190": _url(study and f"{base}/studies/{study}")}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    status = 200 if not failed else 409 if not referenced else 202
    return body, status, warnings
