"""`pacsd import`: bulk ingest of Part 10 files from disk through the C-STORE pipeline.

Each file becomes a spool file exactly like one a C-STORE leaves behind: pacsd's own file
meta (the file's SOP class, instance and transfer syntax; Source AE = the file's own, else
IMPORT) followed by the file's data set bytes, copied unchanged. That spool file then goes
through `Ingest.ingest` as any received instance does: structural check, validation, hash,
fsync and rename into the blob store, group commit through the index writer. Several files
are in flight at once so the writer can commit them in groups.

Meant to run with the daemon stopped. Unlike `pacsd serve`, it does not sweep the spool
directory on start, so it leaves a running daemon's transfers alone; but two processes
writing one SQLite index contend for its lock and keep separate caches, so instances may
fail with "index write failed" (re-import them) and study-level sets may need a
`pacsd verify --repair` afterwards.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from pacsd import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from pacsd.config import Settings, check_ae_title
from pacsd.dimse.status import Status, describe
from pacsd.ingest.filemeta import build_file_meta
from pacsd.ingest.pipeline import Incoming, Outcome
from pacsd.net.storescu import NotPart10, Part10File, read_part10

DEFAULT_SOURCE_AE = "IMPORT"
DEFAULT_JOBS = 8


@dataclass
class FileResult:
    path: Path
    kind: str  # "stored", "replaced", "duplicate", "failed", "skipped"
    reason: str = ""
    sop_instance_uid: str = ""
    nbytes: int = 0
    group: str = ""  # failed: the reason without its particulars, to group failures by


@dataclass
class ImportSummary:
    counts: Counter = field(default_factory=Counter)
    failures: dict[str, list[FileResult]] = field(default_factory=dict)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    nbytes: int = 0

    def add(self, result: FileResult) -> None:
        self.counts[result.kind] += 1
        self.nbytes += result.nbytes
        if result.kind == "failed":
            self.failures.setdefault(result.group or result.reason, []).append(result)
        elif result.kind == "skipped":
            self.skipped.append((result.path, result.reason))

    @property
    def failed(self) -> int:
        return self.counts["failed"]


def source_ae_of(info: Part10File) -> str:
    """The file's Source AE title when it is a valid AE title, else IMPORT."""
    if info.source_ae:
        try:
            return check_ae_title(info.source_ae)
        except ValueError:
            pass
    return DEFAULT_SOURCE_AE


def write_spool(path: Path, spool_dir: Path) -> tuple[Part10File, Path, int, str]:
    """Copy one file into a spool file behind pacsd's own file meta (blocking).

    Returns (what the file meta said, spool path, data set offset in the spool file, source AE).
    Raises NotPart10 (skip it), ValueError (file meta values pacsd cannot write) or OSError.
    """
    info = read_part10(path)
    source_ae = source_ae_of(info)
    meta = build_file_meta(info.sop_class_uid, info.sop_instance_uid, info.transfer_syntax,
                           source_ae, IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME)
    spool = spool_dir / f"{uuid.uuid4().hex}.spool"
    try:
        with open(path, "rb") as src, open(spool, "xb") as out:
            out.write(meta)
            src.seek(info.dataset_offset)
            shutil.copyfileobj(src, out, 1 << 20)
            copied = out.tell() - len(meta)
        if copied != info.dataset_size:
            raise OSError(f"{path} changed while it was copied ({copied} of {info.dataset_size} bytes)")
    except BaseException:
        spool.unlink(missing_ok=True)
        raise
    return info, spool, len(meta), source_ae


def classify(path: Path, info: Part10File, outcome: Outcome) -> FileResult:
    uid = info.sop_instance_uid
    if outcome.duplicate and not outcome.stored:
        return FileResult(path, "duplicate", sop_instance_uid=uid)
    if outcome.status != Status.SUCCESS:
        status = describe(outcome.status)
        if not outcome.comment:
            return FileResult(path, "failed", status, uid, group=status)
        head = outcome.comment.split(":", 1)[0]
        return FileResult(path, "failed", f"{status}: {outcome.comment}", uid, group=f"{status}: {head}")
    if outcome.duplicate:
        return FileResult(path, "replaced", sop_instance_uid=uid, nbytes=info.dataset_size)
    return FileResult(path, "stored", sop_instance_uid=uid, nbytes=info.dataset_size)


async def open_archive(settings: Settings):
    """The archive `serve` uses, opened without the startup spool sweep (see module doc)."""
    from pacsd.app import Archive
    from pacsd.index.db import ensure_schema

    archive = Archive(settings)
    try:
        settings.storage.data_dir.mkdir(parents=True, exist_ok=True)
        settings.storage.spool_dir.mkdir(parents=True, exist_ok=True)
        await ensure_schema(archive.engine, settings.database.url)
    except BaseException:
        await archive.engine.dispose()
        archive.executor.shutdown(wait=False)
        raise
    archive.writer.start()
    return archive


async def import_files(
    settings: Settings,
    paths: Iterable[Path],
    *,
    jobs: int = DEFAULT_JOBS,
    on_result: Callable[[FileResult], None] = lambda result: None,
) -> ImportSummary:
    """Ingest every file; `on_result` hears about each one as it finishes."""
    summary = ImportSummary()
    archive = await open_archive(settings)
    loop = asyncio.get_running_loop()
    spool_dir = settings.storage.spool_dir
    queue = iter(paths)

    async def one(path: Path) -> FileResult:
        try:
            info, spool, offset, source_ae = await loop.run_in_executor(
                archive.executor, write_spool, path, spool_dir)
        except NotPart10 as exc:
            return FileResult(path, "skipped", str(exc))
        except ValueError as exc:
            return FileResult(path, "failed", f"file meta: {exc}", group="file meta values pacsd cannot write")
        except OSError as exc:
            return FileResult(path, "failed", f"cannot read or spool the file: {exc.strerror or exc}",
                              group="cannot read or spool the file")
        outcome = await archive.ingest.ingest(Incoming(
            path=spool,
            dataset_offset=offset,
            transfer_syntax=info.transfer_syntax,
            calling_ae=source_ae,
            sop_class_uid=info.sop_class_uid,
            sop_instance_uid=info.sop_instance_uid,
        ))
        if spool.exists():  # the pipeline removes it on every path; be sure
            os.unlink(spool)
        return classify(path, info, outcome)

    async def worker() -> None:
        for path in queue:  # one shared iterator: each path goes to exactly one worker
            try:
                result = await one(path)
            except Exception as exc:  # a bug must not stop the other files
                result = FileResult(path, "failed", f"internal error: {exc!r}", group="internal error")
            summary.add(result)
            on_result(result)

    try:
        await asyncio.gather(*(worker() for _ in range(max(1, jobs))))
    finally:
        await archive.close()
    return summary
