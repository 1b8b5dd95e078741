"""`pacsd verify`: check the index against the blob store, and optionally repair what is safe.

Four kinds of problem:

- missing: an index row whose blob file does not exist. Repair deletes the row, then
  recomputes every counter and study-level set (`recount`) in the same transaction.
- orphan: a blob file no index row points at. Repair moves it to
  <data_dir>/orphans/<key path>; image data the index does not know is never deleted.
- mismatch: a blob whose size or SHA-256 differs from the index (bit rot, a truncated or
  edited file). Not repairable: the report names them, and the exit code stays 1.
  --quick checks sizes only, without reading the files.
- spool: *.spool files left in the spool directory (an interrupted receive or import).
  Repair removes them.

The index is read before the blob tree is listed, so an instance a running daemon stores
during the check can only ever look like an orphan, never like a missing blob; repair
checks each orphan against the index again before moving it. Still, run --repair with the
daemon stopped: it may be receiving into the spool directory, and its caches do not know
about rows that repair deletes.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import sqlalchemy as sa

from pacsd.config import Settings
from pacsd.index.schema import instances
from pacsd.index.writer import recount
from pacsd.store.filetree import SUFFIX, FileTreeBlobStore, fsync_dir, validate_key


class VerifyError(Exception):
    """The check could not run (no index, unreadable database)."""


@dataclass(frozen=True)
class Indexed:
    pk: int
    key: str
    size: int
    sha256: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Mismatch:
    entry: Indexed
    what: str  # "size 1234, index says 1235" / "sha256 ab12..., index says cd34..." / "unreadable: ..."


@dataclass
class Report:
    index: str
    blob_root: Path
    quick: bool
    indexed: int = 0
    indexed_bytes: int = 0
    stored: int = 0
    missing: list[Indexed] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)
    spool: list[Path] = field(default_factory=list)
    checked: int = 0
    checked_bytes: int = 0
    seconds: float = 0.0
    # what --repair did
    repaired: bool = False
    rows_removed: int = 0
    moved: list[tuple[str, Path]] = field(default_factory=list)
    spool_removed: int = 0
    repair_errors: list[str] = field(default_factory=list)

    @property
    def problems(self) -> int:
        return len(self.missing) + len(self.orphans) + len(self.mismatches) + len(self.spool)

    @property
    def remaining(self) -> int:
        """Problems left after this run (all of them when nothing was repaired)."""
        if not self.repaired:
            return self.problems
        return len(self.mismatches) + len(self.repair_errors)


class _Quiet:
    """Progress stand-in when the caller wants none."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    def advance(self, items: int = 1, nbytes: int = 0) -> None:
        pass


def _orphan_path(orphans: Path, key: str) -> Path:
    """<data_dir>/orphans/<key path>, with .1, .2, ... before the suffix if that is taken."""
    base = orphans / key[:8] / key[9:13] / key[14:]
    candidate = base.with_name(base.name + SUFFIX)
    n = 0
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}.{n}{SUFFIX}")
    return candidate


def _move(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)  # never replaces an existing file
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        shutil.copy2(src, dest)
        with open(dest, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(dest.parent)
    os.unlink(src)
    fsync_dir(src.parent)


async def verify(
    settings: Settings,
    *,
    quick: bool = False,
    repair: bool = False,
    progress: Callable[[int, int], object] | None = None,
) -> Report:
    """Check (and with `repair`, fix) the archive in settings.storage.data_dir.

    `progress(total_files, total_bytes)` makes a context manager with `advance(items, nbytes)`
    for the checksum pass (pacsd.tools.Progress fits).
    """
    from pacsd.index.db import create_engine

    url = settings.database.url
    data_dir = settings.storage.data_dir
    safe_url = sa.engine.make_url(url).render_as_string(hide_password=True)
    if url.startswith("sqlite"):
        database = sa.engine.make_url(url).database
        if not database or database == ":memory:" or not Path(database).is_file():
            raise VerifyError(f"no index database at {safe_url}")
    blob_root = data_dir / "blobs"
    report = Report(index=safe_url, blob_root=blob_root, quick=quick)
    started = time.monotonic()
    engine = create_engine(url)
    pool = ThreadPoolExecutor(settings.storage.workers, thread_name_prefix="pacsd-verify")
    try:
        indexed = await _read_index(engine, safe_url)
        report.indexed = len(indexed)
        report.indexed_bytes = sum(e.size for e in indexed.values())
        loop = asyncio.get_running_loop()
        store = FileTreeBlobStore(blob_root) if blob_root.is_dir() else None
        stored: set[str] = set()
        if store is not None:
            stored = await loop.run_in_executor(pool, lambda: set(store.iter_keys()))
        report.stored = len(stored)

        present: list[Indexed] = []
        for key, entry in indexed.items():
            if key in stored:
                present.append(entry)
            elif not _exists(store, key):
                report.missing.append(entry)
        report.orphans = sorted(stored.difference(indexed))

        present.sort(key=lambda e: e.key)  # directory order: kinder to the disk
        found_missing = await _check_blobs(store, present, quick, pool, settings.storage.workers,
                                            report, progress)
        report.missing.extend(found_missing)
        report.missing.sort(key=lambda e: e.key)

        spool_dir = settings.storage.spool_dir
        if spool_dir.is_dir():
            report.spool = sorted(p for p in spool_dir.glob("*.spool") if p.is_file())

        if repair:
            await _repair(engine, store, data_dir, report)
    except sa.exc.SQLAlchemyError as exc:
        raise VerifyError(f"cannot read the index at {safe_url}: {exc}") from None
    finally:
        await engine.dispose()
        pool.shutdown(wait=True)
    report.seconds = time.monotonic() - started
    return report


def _exists(store: FileTreeBlobStore | None, key: str) -> bool:
    if store is None:
        return False
    try:
        return store.exists(key)
    except ValueError:  # not a key the store could have made: its blob cannot be found
        return False


async def _read_index(engine, safe_url: str) -> dict[str, Indexed]:
    async with engine.connect() as conn:
        tables = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
        if "instances" not in tables:
            raise VerifyError(f"{safe_url} holds no pacsd index (no instances table)")
        result = await conn.stream(sa.select(
            instances.c.pk, instances.c.blob_key, instances.c.size, instances.c.sha256,
            instances.c.sop_instance_uid))
        indexed: dict[str, Indexed] = {}
        async for row in result:
            indexed[row.blob_key] = Indexed(row.pk, row.blob_key, row.size, row.sha256, row.sop_instance_uid)
    return indexed


async def _check_blobs(store, present: list[Indexed], quick: bool, pool, workers: int,
                       report: Report, progress) -> list[Indexed]:
    """Size (and unless quick, SHA-256) of every blob the index knows; returns vanished ones."""
    if not present:
        return []
    loop = asyncio.get_running_loop()
    vanished: list[Indexed] = []
    queue = iter(present)

    def check(entry: Indexed) -> Mismatch | str | None:
        try:
            size = store.size(entry.key)
            if size != entry.size:
                return Mismatch(entry, f"size {size}, index says {entry.size}")
            if quick:
                return None
            digest = store.sha256(entry.key)
        except FileNotFoundError:
            return "vanished"
        except OSError as exc:
            return Mismatch(entry, f"unreadable: {exc.strerror or exc}")
        if digest != entry.sha256:
            return Mismatch(entry, f"sha256 {digest[:16]}..., index says {entry.sha256[:16]}...")
        return None

    total_bytes = 0 if quick else sum(e.size for e in present)
    bar = progress(len(present), total_bytes) if progress is not None else _Quiet()

    async def worker() -> None:
        for entry in queue:
            outcome = await loop.run_in_executor(pool, check, entry)
            if outcome == "vanished":
                vanished.append(entry)
            elif outcome is not None:
                report.mismatches.append(outcome)
            report.checked += 1
            nbytes = 0 if quick else entry.size
            report.checked_bytes += nbytes
            bar.advance(1, nbytes)

    with bar:
        await asyncio.gather(*(worker() for _ in range(workers)))
    report.mismatches.sort(key=lambda m: m.entry.key)
    return vanished


async def _repair(engine, store, data_dir: Path, report: Report) -> None:
    report.repaired = True
    loop = asyncio.get_running_loop()

    if report.missing:
        async with engine.begin() as conn:
            for entry in report.missing:
                if _exists(store, entry.key):
                    continue  # it is back (or was being written): not ours to delete
                result = await conn.execute(instances.delete().where(
                    instances.c.pk == entry.pk, instances.c.blob_key == entry.key))
                report.rows_removed += result.rowcount or 0
            if report.rows_removed:
                await recount(conn)

    if report.orphans:
        orphans = data_dir / "orphans"
        async with engine.connect() as conn:
            for key in report.orphans:
                known = await conn.scalar(
                    sa.select(sa.func.count()).select_from(instances).where(instances.c.blob_key == key))
                if known:
                    continue  # indexed since the listing (a live daemon): not an orphan
                try:
                    validate_key(key)
                    dest = _orphan_path(orphans, key)
                    await loop.run_in_executor(None, _move, store.path(key), dest)
                except (OSError, ValueError) as exc:
                    report.repair_errors.append(f"cannot move orphan {key}: {exc}")
                    continue
                report.moved.append((key, dest))

    for path in report.spool:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            report.repair_errors.append(f"cannot remove {path}: {exc.strerror or exc}")
            continue
        report.spool_removed += 1


def format_report(report: Report, limit: int = 20) -> list[str]:
    """The report as text lines: counts, then the first `limit` items of each kind."""
    mb = report.indexed_bytes / 1e6
    lines = [
        f"index: {report.indexed} instances ({mb:.1f} MB) in {report.index}",
        f"blob store: {report.stored} blobs under {report.blob_root}",
    ]
    if report.quick:
        lines.append(f"checked: {report.checked} blob sizes (--quick: no checksums)")
    else:
        lines.append(f"checked: {report.checked} blobs, {report.checked_bytes / 1e6:.1f} MB hashed (SHA-256)")

    def section(title: str, items: list[str]) -> None:
        lines.append(f"{title}: {len(items)}")
        for item in items[:limit]:
            lines.append(f"  {item}")
        if len(items) > limit:
            lines.append(f"  ... and {len(items) - limit} more")

    section("missing blobs (index rows without a file)",
            [f"{e.key}  SOP Instance {e.sop_instance_uid}" for e in report.missing])
    section("orphan blobs (files without an index row)",
            [str(report.blob_root / (k + SUFFIX)) for k in report.orphans])
    section("size/checksum mismatches" if not report.quick else "size mismatches",
            [f"{m.entry.key}  SOP Instance {m.entry.sop_instance_uid}: {m.what}" for m in report.mismatches])
    section("leftover spool files", [str(p) for p in report.spool])

    if report.repaired:
        lines.append("repair:")
        if report.missing:
            lines.append(f"  removed {report.rows_removed} index rows of missing blobs; "
                         "counters and study sets recomputed")
        if report.moved:
            where = report.moved[0][1].parents[2]
            lines.append(f"  moved {len(report.moved)} orphan blobs to {where} (kept, not deleted)")
            for key, dest in report.moved[:limit]:
                lines.append(f"    {key} -> {dest}")
        if report.spool:
            lines.append(f"  removed {report.spool_removed} leftover spool files")
        if report.mismatches:
            lines.append(f"  {len(report.mismatches)} mismatched blobs cannot be repaired here: "
                         "restore them from a backup or have the instances sent again")
        for error in report.repair_errors:
            lines.append(f"  {error}")
        if not report.problems:
            lines.append("  nothing to repair")
    if report.problems == 0:
        lines.append(f"clean ({report.seconds:.1f} s)")
    elif report.remaining:
        lines.append(f"{report.problems} problems found, {report.remaining} remain ({report.seconds:.1f} s)")
    else:
        lines.append(f"{report.problems} problems found, all repaired ({report.seconds:.1f} s)")
    return lines
