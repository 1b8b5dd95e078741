"""Storage Service Class as SCU (PS3.4 Annex B): send Part 10 files with C-STORE.

Each file's data set goes out exactly as it is stored, in the file's own transfer syntax, read
straight from disk behind its file meta: nothing is decoded, re-encoded or held in memory.
So every distinct (SOP class, transfer syntax) pair needs a presentation context of its own,
with that one transfer syntax. An association proposes at most 128 contexts (PS3.8 §9.3.2.2:
context IDs are the odd numbers 1-255), so a larger mix of files is sent over several
associations, one after the other.

`read_part10` is a light reader of the Part 10 header (preamble, "DICM", group 0002 in
explicit VR little endian) that stops where the data set begins; `pacsd import` uses it too.
"""

from __future__ import annotations

import os
import struct
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from pacsd.config import DicomSettings
from pacsd.dimse.command import CommandField, Priority
from pacsd.dimse.status import category, describe
from pacsd.dul import pdu
from pacsd.dul.negotiation import ProposedContext
from pacsd.ingest.sources import DEFLATED_TRANSFER_SYNTAXES
from pacsd.net.association import AssociationError, AssociationRejected, _Part
from pacsd.net.requestor import associate
from pacsd.uid import uid_problem

MAX_CONTEXTS = 128
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # a DICOMDIR: an index of files, not an instance

_PREAMBLE_LENGTH = 128
# Explicit VR elements with 2 reserved bytes and a 4-byte length (PS3.5 Table 7.1-1).
_LONG_VRS = frozenset(
    vr.encode() for vr in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV")
)
_SHORT_HEADER = struct.Struct("<HH2sH")
_LONG_LENGTH = struct.Struct("<2xL")
_MAX_META_ELEMENTS = 256
_MAX_KEPT_VALUE = 1024  # longest group 0002 value read into memory (UIDs and AE titles are short)
_WANTED = {
    0x0002: "MediaStorageSOPClassUID",
    0x0003: "MediaStorageSOPInstanceUID",
    0x0010: "TransferSyntaxUID",
    0x0016: "SourceApplicationEntityTitle",
}


class NotPart10(Exception):
    """The file is not a DICOM Part 10 file pacsd can send or import (the message says why)."""


@dataclass(frozen=True)
class Part10File:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    dataset_offset: int  # where the data set starts: after preamble, "DICM" and group 0002
    size: int  # of the whole file
    source_ae: str = ""  # (0002,0016) Source Application Entity Title, if the file has one

    @property
    def dataset_size(self) -> int:
        return self.size - self.dataset_offset

    @property
    def context(self) -> tuple[str, str]:
        return self.sop_class_uid, self.transfer_syntax


def read_part10(path: Path) -> Part10File:
    """Read the file meta of a Part 10 file; raise NotPart10 for anything else.

    Walks group 0002 element by element (explicit VR little endian, as PS3.10 §7.1 requires)
    up to the first element of another group: that is where the data set starts. Values
    other than the few UIDs and the source AE title are skipped, never read. OSError
    (unreadable file) passes through.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(_PREAMBLE_LENGTH + 4)
        if len(head) < _PREAMBLE_LENGTH + 4 or head[_PREAMBLE_LENGTH:] != b"DICM":
            raise NotPart10("not a DICOM Part 10 file (no DICM prefix after the 128-byte preamble)")
        pos = _PREAMBLE_LENGTH + 4
        found: dict[str, str] = {}
        for _ in range(_MAX_META_ELEMENTS):
            f.seek(pos)
            header = f.read(8)
            if len(header) < 8:
                if len(header) == 0 and pos > _PREAMBLE_LENGTH + 4:
                    break  # file meta and no data set at all
                raise NotPart10(f"file meta ends in the middle of an element header at byte {pos}")
            group, element, vr, length = _SHORT_HEADER.unpack(header)
            if group != 0x0002:
                break
            if not (vr.isalpha() and vr.isupper()):
                raise NotPart10(f"file meta element (0002,{element:04X}) at byte {pos} is not "
                                "explicit VR little endian")
            value_at = pos + 8
            if vr in _LONG_VRS:
                extra = f.read(4)
                if len(extra) < 4:
                    raise NotPart10(f"file meta ends in the middle of an element header at byte {pos}")
                (length,) = _LONG_LENGTH.unpack(b"\0\0" + extra)
                value_at = pos + 12
                if length == 0xFFFFFFFF:
                    raise NotPart10(f"file meta element (0002,{element:04X}) has undefined length")
            end = value_at + length
            if end > size:
                raise NotPart10(f"file meta element (0002,{element:04X}) at byte {pos} runs past "
                                f"the end of the file")
            keyword = _WANTED.get(element)
            if keyword is not None and length <= _MAX_KEPT_VALUE:
                f.seek(value_at)
                found[keyword] = f.read(length).decode("ascii", "replace").strip("\0 ")
            pos = end
        else:
            raise NotPart10(f"file meta has more than {_MAX_META_ELEMENTS} elements")
    for keyword, name in (("MediaStorageSOPClassUID", "Media Storage SOP Class UID"),
                          ("MediaStorageSOPInstanceUID", "Media Storage SOP Instance UID"),
                          ("TransferSyntaxUID", "Transfer Syntax UID")):
        if problem := uid_problem(name, found.get(keyword)):
            raise NotPart10(f"file meta: {problem}")
    if found["MediaStorageSOPClassUID"] == MEDIA_STORAGE_DIRECTORY:
        raise NotPart10("a DICOMDIR (media storage directory), not an instance")
    return Part10File(
        path=Path(path),
        sop_class_uid=found["MediaStorageSOPClassUID"],
        sop_instance_uid=found["MediaStorageSOPInstanceUID"],
        transfer_syntax=found["TransferSyntaxUID"],
        dataset_offset=pos,
        size=size,
        source_ae=found.get("SourceApplicationEntityTitle", ""),
    )


def collect_files(paths: Iterable[Path], recursive: bool = True) -> Iterator[Path]:
    """Files named, and files in directories named (their subdirectories too if `recursive`).

    Sorted within each directory, so runs are repeatable. Symbolic links to files are
    followed; links to directories are not descended into (no loops).
    """
    for path in paths:
        path = Path(path)
        if path.is_dir():
            yield from _walk(path, recursive)
        else:
            yield path


def _walk(directory: Path, recursive: bool) -> Iterator[Path]:
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError:
        return
    subdirs = []
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            subdirs.append(entry)
        elif entry.is_file():
            yield Path(entry.path)
    if recursive:
        for entry in subdirs:
            yield from _walk(Path(entry.path), recursive)


@dataclass
class StoreResult:
    file: Part10File
    status: int | None  # the C-STORE-RSP status; None when the file was not sent
    comment: str = ""  # the response's Error Comment, or why the file was not sent
    seconds: float = 0.0

    @property
    def category(self) -> str:
        """'success', 'warning' or 'failure' (not sent is a failure)."""
        if self.status is None:
            return "failure"
        kind = category(self.status)
        return kind if kind in ("success", "warning") else "failure"

    def describe(self) -> str:
        if self.status is None:
            return f"not sent: {self.comment}"
        text = describe(self.status)
        return f"{text}: {self.comment}" if self.comment else text


def plan(files: list[Part10File], max_contexts: int = MAX_CONTEXTS) -> list[tuple[list[tuple[str, str]], list[Part10File]]]:
    """Split the files into associations of at most `max_contexts` presentation contexts.

    Returns (contexts, files) per association, contexts in first-seen order, files in the
    order given.
    """
    contexts: dict[tuple[str, str], None] = {}
    for f in files:
        contexts.setdefault(f.context)
    keys = list(contexts)
    batches = []
    for start in range(0, len(keys), max_contexts):
        chunk = keys[start:start + max_contexts]
        wanted = set(chunk)
        batches.append((chunk, [f for f in files if f.context in wanted]))
    return batches


def uid_name(uid: str) -> str:
    """'CT Image Storage (1.2.840.10008.5.1.4.1.1.2)', or the bare UID when pydicom has no name."""
    from pydicom.uid import UID

    name = UID(uid).name
    return uid if name == uid else f"{name} ({uid})"


_REJECT_SOURCES = {
    pdu.RJ_SOURCE_USER: "service user",
    pdu.RJ_SOURCE_ACSE: "service provider (ACSE)",
    pdu.RJ_SOURCE_PRESENTATION: "service provider (presentation)",
}
_REJECT_REASONS = {
    (pdu.RJ_SOURCE_USER, pdu.RJ_USER_NO_REASON): "no reason given",
    (pdu.RJ_SOURCE_USER, pdu.RJ_USER_APPLICATION_CONTEXT): "application context name not supported",
    (pdu.RJ_SOURCE_USER, pdu.RJ_USER_CALLING_AE): "calling AE title not recognized",
    (pdu.RJ_SOURCE_USER, pdu.RJ_USER_CALLED_AE): "called AE title not recognized",
    (pdu.RJ_SOURCE_ACSE, 1): "no reason given",
    (pdu.RJ_SOURCE_ACSE, pdu.RJ_ACSE_PROTOCOL_VERSION): "protocol version not supported",
    (pdu.RJ_SOURCE_PRESENTATION, pdu.RJ_PRESENTATION_CONGESTION): "temporary congestion",
    (pdu.RJ_SOURCE_PRESENTATION, pdu.RJ_PRESENTATION_LOCAL_LIMIT): "local limit exceeded",
}


def describe_reject(reject: pdu.Reject) -> str:
    """PS3.8 Table 9-21 in words."""
    kind = {pdu.RJ_PERMANENT: "permanently", pdu.RJ_TRANSIENT: "transiently"}.get(reject.result, "")
    source = _REJECT_SOURCES.get(reject.source, f"source {reject.source}")
    reason = _REJECT_REASONS.get((reject.source, reject.reason), f"reason {reject.reason}")
    return f"association rejected {kind} by the {source}: {reason}".replace("  ", " ")


class _FileChanged(Exception):
    pass


class _OddLength(Exception):
    pass


# An odd-length deflated data set is sent from memory with its pad byte up to this size.
_PAD_IN_MEMORY = 64 * 1024 * 1024


def _dataset_source(f: Part10File):
    """What Association.send streams for this file: its data set, straight from disk.

    PDV lengths are even (PS3.8 §9.3.5.1), so is every encoded data set but a deflated one;
    PS3.5 §A.5 pads an odd deflated stream with one trailing NUL, which is added here. Any
    other odd-length data set is broken and is not sent.
    """
    if f.dataset_size % 2 == 0:
        return _Part(f.path, f.dataset_offset)
    if f.transfer_syntax not in DEFLATED_TRANSFER_SYNTAXES:
        raise _OddLength(f"the data set is {f.dataset_size} bytes long, an odd length, so it is "
                         "not a valid encoding in this transfer syntax")
    if f.dataset_size > _PAD_IN_MEMORY:
        raise _OddLength(f"odd-length deflated data set larger than {_PAD_IN_MEMORY >> 20} MiB")
    with open(f.path, "rb") as fh:
        fh.seek(f.dataset_offset)
        data = fh.read(f.dataset_size)
    if len(data) != f.dataset_size:
        raise _FileChanged()
    return data + b"\0"


async def store_files(
    host: str,
    port: int,
    files: list[Part10File],
    *,
    calling_ae: str,
    called_ae: str,
    settings: DicomSettings | None = None,
    connect_timeout: float = 10.0,
    on_result: Callable[[StoreResult], None] = lambda result: None,
) -> list[StoreResult]:
    """C-STORE every file; `on_result` hears about each one as soon as it is done.

    Each association carries at most 128 contexts. When an association cannot be opened
    (no connection, rejected), that file and every file not yet sent fail with the reason.
    When one ends early (aborted, DIMSE timeout), the file in flight and the rest of its
    association's files fail, and the next association is still tried. A file that cannot be
    read while it is being sent fails; the association it broke is aborted and the files
    after it go on a new one.
    """
    settings = settings or DicomSettings()
    results: list[StoreResult] = []

    def report(result: StoreResult) -> None:
        results.append(result)
        on_result(result)

    fatal: str | None = None
    for contexts, batch in plan(files):
        pending = deque(batch)
        if fatal is not None:
            for f in pending:
                report(StoreResult(f, None, fatal))
            continue
        proposed = [ProposedContext(sop_class, [ts]) for sop_class, ts in contexts]
        while pending:
            established = False
            waiting = len(pending)
            try:
                async with associate(host, port, calling_ae=calling_ae, called_ae=called_ae,
                                     contexts=proposed, settings=settings,
                                     connect_timeout=connect_timeout) as assoc:
                    established = True
                    while pending:
                        f = pending[0]
                        context = assoc.context_for(f.sop_class_uid, f.transfer_syntax)
                        if context is None:
                            pending.popleft()
                            report(StoreResult(f, None,
                                               f"{called_ae} did not accept the presentation context for "
                                               f"{uid_name(f.sop_class_uid)} in "
                                               f"{uid_name(f.transfer_syntax)}"))
                            continue
                        started = time.perf_counter()
                        try:
                            if os.stat(f.path).st_size != f.size:
                                raise _FileChanged()
                            dataset = _dataset_source(f)
                        except (OSError, _FileChanged):
                            pending.popleft()
                            report(StoreResult(f, None, "the file changed or vanished since it was read"))
                            continue
                        except _OddLength as exc:
                            pending.popleft()
                            report(StoreResult(f, None, str(exc)))
                            continue
                        command = {
                            "CommandField": CommandField.C_STORE_RQ,
                            "MessageID": assoc.next_message_id(),
                            "Priority": Priority.MEDIUM,
                            "AffectedSOPClassUID": f.sop_class_uid,
                            "AffectedSOPInstanceUID": f.sop_instance_uid,
                        }
                        try:
                            response = await assoc.request_one(context.context_id, command, dataset)
                        except OSError as exc:
                            # Part of the message is out: only an abort puts the link back in step.
                            pending.popleft()
                            report(StoreResult(f, None, f"cannot read the file: {exc.strerror or exc}",
                                               time.perf_counter() - started))
                            raise
                        except AssociationError as exc:
                            pending.popleft()
                            report(StoreResult(f, None, str(exc), time.perf_counter() - started))
                            raise
                        pending.popleft()
                        status = response.command.get("Status", -1)
                        comment = str(response.command.get("ErrorComment", "") or "").strip()
                        report(StoreResult(f, status, comment, time.perf_counter() - started))
            except OSError as exc:
                if len(pending) == waiting:  # not from reading a file: do not loop on it
                    fatal = f"cannot send: {exc}"
                # else the association was aborted after a file failed; the rest go on a new one
            except AssociationRejected as exc:
                fatal = describe_reject(exc.reject)
            except AssociationError as exc:
                if not established:
                    fatal = str(exc)
                else:
                    reason = f"association ended early: {exc}"
                    while pending:
                        report(StoreResult(pending.popleft(), None, reason))
            except TimeoutError:
                pass  # the release was not confirmed in time; every file has its result
            if fatal is not None:
                while pending:
                    report(StoreResult(pending.popleft(), None, fatal))
    return results
