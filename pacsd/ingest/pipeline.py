"""The one ingest pipeline (C-STORE now; import, and later STOW-RS, reuse it).

    spool file or memory (Part 10 header + data set as received)
      → a small instance in memory: written to its blob, writeback and fsyncs started
      → check the data set's structure to its last byte, read the header up to Pixel Data
      → validate (UIDs well-formed, equal to what the command said, hierarchy present)
      → a spooled instance: SHA-256, linked into the blob store, fsyncs started
                                                                  [executor thread]
      → index writer: waits for the blob's fsyncs, group commit   [one writer]
      → the status for the sender

A failure at any step removes what that step left behind: no half-written blob, no row
without its blob.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import os
import time
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import structlog

from pacsd.dimse.status import Status
from pacsd.index.levels import IndexNotWritten, IndexRecord, LevelRows, rows
from pacsd.ingest.dataset import DataSetError, read_header
from pacsd.store.blobstore import BlobStore, sha256_of
from pacsd.uid import uid_problem

if TYPE_CHECKING:  # an ingest process imports this module: no SQLAlchemy there
    from pacsd.index.writer import IndexWriter
    from pacsd.ingest.processes import IngestProcesses

log = structlog.get_logger("pacsd.ingest")

# Instances up to this size stay in memory as they arrive (C-STORE, STOW-RS) until the
# pipeline writes them straight to their blob in a worker thread: no spool file to create,
# link and remove, and the event loop never opens a file for a typical instance.
IN_MEMORY_LIMIT = 1 << 20

# How long instances must have come one at a time before one is parsed in the index
# writer's thread (Ingest._one_at_a_time), and up to what size: the two thread hops this
# saves are ~10% of a small instance's exchange, and lost in the noise of a 512x512 CT's.
ALONE_FOR = 1.0
ALONE_LIMIT = 64 * 1024

DUPLICATE_REJECTED = 0x0111  # PS3.7 C.4.? "Duplicate SOP Instance"


@dataclass
class Incoming:
    # Spool file: Part 10 header then the data set bytes as received. With `buffer` set the
    # same bytes are still in memory and the pipeline writes them straight to their blob.
    path: Path | None
    dataset_offset: int
    transfer_syntax: str
    calling_ae: str
    # What the C-STORE-RQ said; None when the only source is the file itself (import).
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    buffer: bytearray | None = None
    # STOW-RS to /studies/{study}: the study every instance of the request must belong to.
    study_instance_uid: str | None = None
    # Hex SHA-256 of those bytes, when the receiver took it as they arrived.
    sha256: str | None = None


@dataclass
class Outcome:
    status: int
    comment: str = ""
    stored: bool = False
    duplicate: bool = False
    blob_key: str | None = None
    # Where a stored instance sits (STOW-RS answers with its URL).
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None


class Rejected(Exception):
    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


class Ingest:
    def __init__(self, store: BlobStore, writer: IndexWriter, executor: Executor, duplicates: str,
                 spool_dir: Path, processes: IngestProcesses | None = None) -> None:
        self.spool_dir = spool_dir
        # Where `prepare` runs: the executor's threads, or ingest processes when instances
        # arrive side by side.
        self.processes = processes
        # Instances between arrival and outcome, and when there were last two at once.
        self.in_flight = 0
        self._side_by_side_at = -ALONE_FOR
        self.store = store
        self.writer = writer
        self.executor = executor
        self.duplicates = duplicates

    async def ingest(self, incoming: Incoming) -> Outcome:
        self.in_flight += 1
        if self.in_flight > 1:
            self._side_by_side_at = time.monotonic()
        try:
            return await self._ingest(incoming)
        finally:
            self.in_flight -= 1

    async def _ingest(self, incoming: Incoming) -> Outcome:
        loop = asyncio.get_running_loop()
        written = None
        try:
            # An ingest process only while another instance is on its way too: alone, an
            # instance is parsed faster in a thread (the event loop is idle meanwhile, and a
            # process round trip costs more than a thread's), and a site with one modality
            # at a time never starts a process at all.
            if self.processes is not None and self.in_flight > 1 and self.processes.takes(incoming):
                record = await self.processes.prepare(incoming)
            elif (self._one_at_a_time() and incoming.buffer is not None
                  and len(incoming.buffer) <= ALONE_LIMIT and self.writer.idle()):
                # Alone, small, and nothing to commit before it: parsed and committed in one
                # job of the index writer's thread. (A spooled instance may take seconds to
                # check, and other associations' instances must not wait behind it.)
                record, written = await self.writer.prepare_and_commit(
                    partial(prepare, incoming, self.store, start_sync=self.writer.start_sync))
            else:
                record = await loop.run_in_executor(self.executor, partial(
                    prepare, incoming, self.store, start_sync=self.writer.start_sync))
        except IndexNotWritten as exc:
            return await self._not_written(exc.record, exc.cause)
        except Rejected as exc:
            _unlink(incoming.path)
            return Outcome(exc.status, exc.comment)
        except OSError as exc:
            _unlink(incoming.path)
            return Outcome(*_resource_status(exc))
        finally:
            incoming.buffer = None
        if written is None:
            try:
                written = await self.writer.submit(record)
            except Exception as exc:
                return await self._not_written(record, exc)
        uid = record.rows.instance["sop_instance_uid"]
        where = {"study_instance_uid": record.rows.study["study_instance_uid"],
                 "series_instance_uid": record.rows.series["series_instance_uid"]}
        if written.replaced_key:
            await loop.run_in_executor(self.executor, self.store.delete, written.replaced_key)
            log.info("ingest.duplicate_overwritten", sop_instance_uid=uid, calling_ae=incoming.calling_ae)
        if not written.stored:
            await loop.run_in_executor(self.executor, self.store.delete, record.blob_key)
            if self.duplicates == "reject":
                log.warning("ingest.duplicate_rejected", sop_instance_uid=uid, calling_ae=incoming.calling_ae)
                # The meaning first: Error Comment is an LO (64 characters), a UID up to 64.
                return Outcome(DUPLICATE_REJECTED, "duplicate: this SOP Instance UID is already stored",
                               duplicate=True)
            log.warning("ingest.duplicate_kept", sop_instance_uid=uid, calling_ae=incoming.calling_ae,
                        note="kept the copy stored first")
            return Outcome(Status.SUCCESS, duplicate=True, **where)
        return Outcome(Status.SUCCESS, stored=True, duplicate=written.duplicate, blob_key=record.blob_key,
                       **where)

    def _one_at_a_time(self) -> bool:
        """This instance is alone, and instances have come one at a time for ALONE_FOR
        seconds: while several associations send, an instance alone for a moment is about
        to have company, whose commits would wait behind its parse in the writer's thread."""
        return self.in_flight == 1 and time.monotonic() - self._side_by_side_at >= ALONE_FOR

    async def _not_written(self, record: IndexRecord, exc: Exception) -> Outcome:
        """The row did not commit: the blob must not stay behind without it."""
        if record.synced is not None:
            # An fsync still running would fail on the file removed next.
            await asyncio.wait([asyncio.wrap_future(record.synced)])
        await asyncio.get_running_loop().run_in_executor(self.executor, self.store.delete, record.blob_key)
        if isinstance(exc, OSError):
            return Outcome(*_resource_status(exc))
        return Outcome(Status.OUT_OF_RESOURCES, f"index write failed: {type(exc).__name__}")


def prepare(incoming: Incoming, store: BlobStore, key: str | None = None,
            start_sync: Callable[[list[str]], Future] | None = None) -> IndexRecord:
    """Everything before the index: in an executor thread, or in an ingest process
    (ingest/processes.py), which is given the blob's key.

    With `start_sync` (the index writer's, in the daemon), a blob placed before the parse
    has its fsyncs started there and then, so they run while this thread parses; the
    record carries them to the commit, which waits for them."""
    synced = None
    offset, ts, buffer = incoming.dataset_offset, incoming.transfer_syntax, incoming.buffer
    if key is None:
        key = store.new_key()
    if buffer is not None:
        # A small instance still in memory goes straight to its place in the store (no
        # spool file to write, link and remove), and before the parse: the store starts
        # writing its data to disk as it places it, so that writing runs while this thread
        # parses and the fsync before the index commit finds it done.
        digest = incoming.sha256 or hashlib.sha256(buffer).hexdigest()
        stored_size = store.put_bytes(key, buffer)
        if start_sync is not None:
            synced = start_sync([key])
        try:
            level_rows = _checked_rows(io.BytesIO(buffer), incoming)
        except BaseException:
            if synced is not None:
                synced.exception()  # no fsync may be left running on the file removed next
            store.delete(key)  # refused: no blob without its row
            raise
    else:
        level_rows = _checked_rows(incoming.path, incoming)
        if (digest := incoming.sha256) is None:
            with open(incoming.path, "rb", buffering=0) as f:
                digest = sha256_of(f)
        stored_size = store.put_from_spool(incoming.path, key)
        if start_sync is not None:
            synced = start_sync([key])
    return IndexRecord(
        rows=level_rows,
        blob_key=key,
        size=stored_size,
        sha256=digest,
        dataset_offset=offset,
        transfer_syntax_uid=ts,
        calling_ae=incoming.calling_ae,
        synced=synced,
    )


def _checked_rows(source, incoming: Incoming) -> LevelRows:
    """The index rows of a data set checked to its last byte and validated, or Rejected."""
    try:
        # One walk: the header for the index, and the whole data set checked to its end.
        ds, _pixel_offset = read_header(source, incoming.dataset_offset, incoming.transfer_syntax, whole=True)
    except DataSetError as exc:
        raise Rejected(Status.CANNOT_UNDERSTAND, f"data set cannot be parsed: {exc}") from None
    except OSError:
        raise
    except Exception as exc:  # pydicom raises many kinds on bad values
        raise Rejected(Status.CANNOT_UNDERSTAND, f"data set cannot be parsed: {exc}") from None
    _validate(ds, incoming)
    try:
        return rows(ds)
    except Exception as exc:
        raise Rejected(Status.CANNOT_UNDERSTAND, f"attribute values cannot be decoded: {exc}") from None


def _validate(ds, incoming: Incoming) -> None:
    for name, value in (("Affected SOP Class UID", incoming.sop_class_uid),
                        ("Affected SOP Instance UID", incoming.sop_instance_uid)):
        if value is not None and (problem := uid_problem(name, value)):
            raise Rejected(Status.CANNOT_UNDERSTAND, problem)
    found = {}
    for keyword, tag in _IDENTITY_UIDS:
        value = _uid_as_received(ds, tag)
        if problem := uid_problem(keyword, value):
            status = Status.DATASET_DOES_NOT_MATCH_SOP_CLASS if value in (None, "") else Status.CANNOT_UNDERSTAND
            raise Rejected(status, f"data set: {problem}")
        found[keyword] = value
    if incoming.sop_class_uid is not None and found["SOPClassUID"] != incoming.sop_class_uid:
        raise Rejected(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                       f"SOP Class UID {found['SOPClassUID']} in the data set differs from "
                       f"the Affected SOP Class UID {incoming.sop_class_uid}")
    if incoming.study_instance_uid is not None and found["StudyInstanceUID"] != incoming.study_instance_uid:
        # No Storage status means "wrong study"; PS3.18 10.5.3 counts it a conflict, and
        # 0110 (processing failure) is the Failure Reason of Table I.2-2 that fits.
        raise Rejected(Status.PROCESSING_FAILURE,
                       f"Study Instance UID {found['StudyInstanceUID']} differs from the study "
                       f"{incoming.study_instance_uid} the request was sent to")
    if incoming.sop_instance_uid is not None and found["SOPInstanceUID"] != incoming.sop_instance_uid:
        raise Rejected(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                       f"SOP Instance UID {found['SOPInstanceUID']} in the data set differs "
                       f"from the Affected SOP Instance UID {incoming.sop_instance_uid}")


_IDENTITY_UIDS = (("SOPClassUID", 0x00080016), ("SOPInstanceUID", 0x00080018),
                  ("StudyInstanceUID", 0x0020000D), ("SeriesInstanceUID", 0x0020000E))


def _uid_as_received(ds, tag: int) -> str | None:
    """A UI value without letting pydicom convert the element: its conversion validates the
    UID with regular expressions (the check here is pacsd's own) and leaves a converted
    element that the index's fast DICOM JSON path no longer takes."""
    element = ds.get_item(tag)
    if element is None:
        return None
    value = element.value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("ascii", "replace").rstrip("\x00 ")
    return None if value is None else str(value)


def _resource_status(exc: OSError) -> tuple[int, str]:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return Status.OUT_OF_RESOURCES, "out of resources: no space left on the archive's disk"
    return Status.OUT_OF_RESOURCES, f"out of resources: {exc.strerror or exc}"


def _unlink(path: Path | None) -> None:
    if path is None:
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
