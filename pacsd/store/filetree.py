"""The file-tree blob store: one Part 10 file per instance under <data_dir>/blobs.

Keys are time-ordered, ``YYYYMMDD/HHMM/<32 hex>`` in UTC, and map to the path
``root/YYYYMMDD/HHMM/<32 hex>.dcm``. Instances received close together land in the same
directory, so one directory fsync makes a whole group-commit's renames durable.

Placing a file without overwriting: ``os.link(spool, final)`` then ``os.unlink(spool)``.
link() fails atomically with EEXIST when the name is taken, so a blob can never be replaced,
even by a racing writer, where a check-then-rename would leave a window between the check and
the rename. A crash between link and unlink leaves a second name for the blob in the spool
directory, which the startup spool sweep removes. Two fallbacks:

- EXDEV (spool on another filesystem): copy into a hidden temporary file next to the final
  name, fsync it, then place that file the same way and remove the spool file.
- a filesystem without hard links (EPERM, ENOTSUP, ENOSYS): check that the name is free, then
  os.rename. The check and the rename are not atomic together; keys are random 128-bit
  values generated here, so two writers never race for one name in practice.

Data: a blob is placed first and made durable later. `put_from_spool` and `put_bytes` only
write and place; `sync(keys)` fsyncs each blob placed since (and the directories below), so
the index writer can run its statements while those fsyncs run, and commit after both. A
crash before `sync` can leave a placed blob with incomplete data, but never one the index
points at: rows commit only after `sync` returned.

`put_bytes` asks Linux to start writing the blob's data out as soon as it is written
(sync_file_range, which does not wait): the pipeline places a small instance before parsing
it, so by the time `sync` fsyncs the blob, its data is mostly on disk and the fsync is left
with the journal commit.

Directories: the day and minute directories are created on demand. A directory that did not
exist before needs its own entry made durable too, so the store remembers which directories it
created and `sync` fsyncs their parents along with the blobs' directories. Empty directories
are not removed on delete: a concurrent put may be about to link into them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import sys
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from pacsd.store.blobstore import BlobStore, RangeReader, write_all

SUFFIX = ".dcm"

# ASCII only: Python's \d would also accept other scripts' digits, and $ a trailing newline.
KEY_PATTERN = re.compile(r"[0-9]{8}/[0-9]{4}/[0-9a-f]{32}", re.ASCII)
_DAY_PATTERN = re.compile(r"[0-9]{8}", re.ASCII)
_MINUTE_PATTERN = re.compile(r"[0-9]{4}", re.ASCII)
_DIRECTORY_PATTERN = re.compile(r"[0-9]{8}(/[0-9]{4})?", re.ASCII)
_FILE_PATTERN = re.compile(r"[0-9a-f]{32}\.dcm", re.ASCII)

# errno values from link() that mean "this filesystem has no hard links": use rename instead.
_NO_HARDLINKS = {errno.EPERM, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}

_COPY_CHUNK = 1 << 20


def _now() -> datetime:
    """The current time in UTC (a seam for tests)."""
    return datetime.now(timezone.utc)


def _load_sync_file_range():
    """libc's sync_file_range on Linux (the os module has none), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the dirty pages; wait for nothing


def _start_writeback(fd: int) -> None:
    """Start writing a new blob's data to disk without waiting (a hint: the fsync in `sync`
    is what makes it durable, so a failure here changes nothing)."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    write_all(lambda view: os.write(fd, view), data)


def _copy_file(src_fd: int, dst_fd: int) -> None:
    """Copy everything readable from src_fd to dst_fd (both positioned at 0)."""
    while chunk := os.read(src_fd, _COPY_CHUNK):
        _write_all(dst_fd, chunk)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (a new, renamed or removed name) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str | os.PathLike) -> None:
    """fsync a finished file through a read-only descriptor (Linux flushes the inode's data
    whichever descriptor asks)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def validate_key(key: object) -> str:
    """Return `key` if it has the exact shape new_key() produces, else raise ValueError."""
    if not isinstance(key, str) or KEY_PATTERN.fullmatch(key) is None:
        raise ValueError(f"invalid blob key {key!r}")
    return key


def disk_free(path: str | os.PathLike) -> int:
    """Bytes available to unprivileged users on the filesystem holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@dataclass
class SyncPlan:
    files: list[str]      # blobs whose data is not fsynced yet
    dirs: list[str]       # directories to fsync once the files are
    created: set[str]     # directories whose entries those fsyncs make durable


class FileTreeBlobStore(BlobStore):
    def __init__(self, root: Path):
        self.root = Path(root)
        self._root = os.fspath(self.root)
        # Directories this store created whose entry (in their parent) is not yet known durable.
        self._new_dirs: set[str] = set()
        # Blobs placed whose data is not yet fsynced (sync() does it).
        self._unsynced: set[str] = set()
        self._lock = threading.Lock()
        # The minute directory make_dirs last made or found: the same minute needs no mkdir.
        # Directories are never removed (see the module docstring), so this cannot go stale
        # within the store's life.
        self._last_minute: str | None = None
        if not os.path.isdir(self._root):
            self.root.mkdir(parents=True, exist_ok=True)
            fsync_dir(os.path.dirname(os.path.abspath(self._root)))

    # -- keys and paths ------------------------------------------------------------------

    def new_key(self) -> str:
        return _now().strftime("%Y%m%d/%H%M/") + uuid.uuid4().hex

    def _path(self, key: str) -> str:
        validate_key(key)
        return os.path.join(self._root, key[:8], key[9:13], key[14:] + SUFFIX)

    def path(self, key: str) -> Path:
        """The file holding `key` (file-tree specific: for sendfile-style serving)."""
        return Path(self._path(key))

    def _dirs_of(self, key: str) -> tuple[str, str]:
        """(day directory, minute directory) of an already validated key."""
        day = os.path.join(self._root, key[:8])
        return day, os.path.join(day, key[9:13])

    def has_dirs(self, key: str) -> bool:
        """Whether this store made (or found) `key`'s directories last: most keys of a minute
        need no mkdir at all."""
        return self._dirs_of(key)[1] == self._last_minute

    def dirs_pending(self, key: str) -> bool:
        """Whether `key`'s day or minute directory was created and its entry is not yet
        known durable (`sync_plan` would fsync its parent)."""
        day, minute = self._dirs_of(validate_key(key))
        with self._lock:
            return minute in self._new_dirs or day in self._new_dirs

    def make_dirs(self, key: str) -> None:
        """Create `key`'s day and minute directories if missing (blocks: a thread's work)."""
        day, minute = self._dirs_of(key)
        if minute == self._last_minute:
            return
        # Under the lock, so that no other thread can link into a directory this thread has
        # just created before it is recorded as needing its parent fsynced.
        with self._lock:
            for directory in (day, minute):
                try:
                    os.mkdir(directory)
                except FileExistsError:
                    continue
                self._new_dirs.add(directory)
            self._last_minute = minute

    # -- blobs placed by another process (ingest/processes.py) ----------------------------

    def hand_over(self) -> list[str]:
        """Forget the blobs this store placed since the last call (another process's store
        syncs them, see `take_over`); the directories it had to create, which that store
        must then fsync with their parents."""
        with self._lock:
            created = sorted(self._new_dirs)
            self._new_dirs.clear()
            self._unsynced.clear()
        return created

    def take_over(self, key: str | None, created_dirs: Iterable[str] = ()) -> None:
        """Record a blob another process placed under `key` (None: no blob): `sync` then
        fsyncs it, and the directories that process created, with their parents."""
        path = None if key is None else self._path(key)
        with self._lock:
            for directory in created_dirs:
                if not _DIRECTORY_PATTERN.fullmatch(os.path.relpath(directory, self._root)):
                    raise ValueError(f"{directory!r} is not a day or minute directory of this store")
                self._new_dirs.add(directory)
            if path is not None:
                self._unsynced.add(path)

    # -- writing -------------------------------------------------------------------------

    def put_from_spool(self, spool_path: Path, key: str) -> int:
        final = self._path(key)
        size = os.stat(spool_path).st_size
        self.make_dirs(key)
        try:
            linked = self._place(spool_path, final)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            self._place_by_copy(spool_path, final)
            linked = True
        self._placed(final)
        if linked:
            os.unlink(spool_path)
        return size

    def put_bytes(self, key: str, data: bytes | bytearray | memoryview) -> int:
        final = self._path(key)
        self.make_dirs(key)
        # O_EXCL: a taken name fails here, as link() does for a spool file.
        fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, data)
        except BaseException:
            os.close(fd)
            os.unlink(final)
            raise
        _start_writeback(fd)
        os.close(fd)
        self._placed(final)
        return len(data)

    def _placed(self, final: str) -> None:
        with self._lock:
            self._unsynced.add(final)

    def _place(self, src: str | os.PathLike, final: str) -> bool:
        """Give the file `src` the name `final`, never replacing an existing file.

        Returns True if `src` was linked (its old name still exists and must be unlinked),
        False if it was renamed (the old name is gone).
        """
        try:
            os.link(src, final)
            return True
        except OSError as e:
            if e.errno not in _NO_HARDLINKS:
                raise
        # No hard links here: check, then rename (see the module docstring for the race).
        if os.path.lexists(final):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), final)
        os.rename(src, final)
        return False

    def _place_by_copy(self, spool_path: str | os.PathLike, final: str) -> None:
        """Spool on another filesystem: copy next to `final`, place, drop the copy."""
        if os.path.lexists(final):  # fail before copying gigabytes for nothing
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), final)
        directory = os.path.dirname(final)
        tmp = os.path.join(directory, f".{uuid.uuid4().hex}.tmp")
        try:
            src = os.open(spool_path, os.O_RDONLY)
            try:
                dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    _copy_file(src, dst)
                finally:
                    os.close(dst)
            finally:
                os.close(src)
            self._place(tmp, final)
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass  # renamed into place by the no-hard-link fallback, or never created

    def sync_plan(self, keys: Iterable[str]) -> SyncPlan:
        """What makes the blobs under `keys` durable: the files not fsynced yet, each blob's
        directory, and the parents of directories whose entry is not known durable."""
        minutes: set[str] = set()
        paths: list[str] = []
        for key in keys:
            paths.append(self._path(key))
            minutes.add(self._dirs_of(key)[1])
        with self._lock:
            pending = set(self._new_dirs)
            files = self._unsynced.intersection(paths)
        to_sync: set[str] = set(minutes)
        created: set[str] = set()
        for minute in minutes:
            day = os.path.dirname(minute)
            if minute in pending:
                created.add(minute)
                to_sync.add(day)
            if day in pending:
                created.add(day)
                to_sync.add(self._root)
        return SyncPlan(sorted(files), sorted(to_sync), created)

    def synced(self, plan: SyncPlan, files_only: bool = False) -> None:
        """Forget what `plan` made durable. Created directories only once their parents are
        fsynced: a concurrent sync that still sees them pending fsyncs the parent again,
        which is harmless."""
        with self._lock:
            self._unsynced.difference_update(plan.files)
            if not files_only:
                self._new_dirs -= plan.created

    def sync(self, keys: Iterable[str]) -> None:
        plan = self.sync_plan(keys)
        for path in plan.files:
            _fsync_file(path)
        if plan.files:
            self.synced(plan, files_only=True)
        for directory in plan.dirs:
            fsync_dir(directory)
        if plan.created:
            self.synced(plan)

    def delete(self, key: str) -> bool:
        path = self._path(key)
        with self._lock:
            self._unsynced.discard(path)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        fsync_dir(os.path.dirname(path))
        return True

    # -- reading -------------------------------------------------------------------------

    def open(self, key: str, start: int = 0, end: int | None = None) -> BinaryIO | RangeReader:
        path = self._path(key)
        if start < 0:
            raise ValueError(f"range start {start} is negative")
        if end is not None and end < start:
            raise ValueError(f"range end {end} is before start {start}")
        f = open(path, "rb")
        if start == 0 and end is None:
            return f  # the whole blob: a plain file, nothing to wrap
        try:
            return RangeReader(f, start, end)
        except BaseException:
            f.close()
            raise

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def size(self, key: str) -> int:
        return os.stat(self._path(key)).st_size

    def iter_keys(self) -> Iterator[str]:
        for day in _subdirs(self._root, _DAY_PATTERN):
            for minute in _subdirs(day.path, _MINUTE_PATTERN):
                try:
                    entries = os.scandir(minute.path)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                with entries:
                    for entry in entries:
                        if _FILE_PATTERN.fullmatch(entry.name) and entry.is_file(
                            follow_symlinks=False
                        ):
                            yield f"{day.name}/{minute.name}/{entry.name[: -len(SUFFIX)]}"


def _subdirs(path: str, pattern: re.Pattern) -> Iterator[os.DirEntry]:
    """Real (non-symlink) subdirectories of `path` whose name matches `pattern`."""
    try:
        entries = os.scandir(path)
    except (FileNotFoundError, NotADirectoryError):
        return
    with entries:
        for entry in entries:
            if pattern.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
                yield entry


__all__ = ["FileTreeBlobStore", "disk_free", "validate_key", "KEY_PATTERN", "SUFFIX"]
