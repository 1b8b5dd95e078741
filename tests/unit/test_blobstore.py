"""The file-tree blob store: keys, placement, durability order, ranges, listing, failures."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from pacsd.store import BlobStore, FileTreeBlobStore, RangeReader, disk_free
from pacsd.store import filetree

HEX = "3f2a9c0d4b5e6f708192a3b4c5d6e7f8"
GOOD_KEY = f"20261130/1042/{HEX}"


# -- helpers -------------------------------------------------------------------------------


def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def tree(path: Path) -> set[str]:
    """Every file and directory under `path`, relative to it."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            found.add(os.path.relpath(os.path.join(dirpath, name), path))
    return found


def files_under(path: Path) -> list[str]:
    return [
        os.path.join(dirpath, name)
        for dirpath, _dirnames, filenames in os.walk(path)
        for name in filenames
    ]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    (d / "spool").mkdir(parents=True)
    return d


@pytest.fixture
def store(data_dir: Path) -> FileTreeBlobStore:
    return FileTreeBlobStore(data_dir / "blobs")


@pytest.fixture
def spool(data_dir: Path):
    counter = iter(range(1_000_000))

    def make(data: bytes) -> Path:
        path = data_dir / "spool" / f"{next(counter):06d}.spool"
        path.write_bytes(data)
        return path

    return make


@pytest.fixture
def clock(monkeypatch):
    """Freeze filetree's notion of now; assign `clock.now` to move it."""

    class Clock:
        now = datetime(2026, 11, 30, 10, 42, 7, tzinfo=timezone.utc)

    monkeypatch.setattr(filetree, "_now", lambda: Clock.now)
    return Clock


@pytest.fixture
def fsyncs(monkeypatch):
    """Record the path of every descriptor passed to os.fsync (the real fsync still runs)."""
    seen: list[str] = []
    real = os.fsync

    def recording(fd):
        seen.append(fd_path(fd))
        return real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return seen


# -- round trip ----------------------------------------------------------------------------


def test_is_a_blob_store(store):
    assert isinstance(store, BlobStore)


def test_round_trip(store, spool, data_dir):
    data = payload(3 * (1 << 20) + 12345)  # more than one sha256 chunk
    spool_path = spool(data)
    outside_before = tree(data_dir) - {p for p in tree(data_dir) if p.startswith("blobs")}
    key = store.new_key()

    assert store.put_from_spool(spool_path, key) == len(data)
    store.sync([key])

    assert not spool_path.exists()
    assert store.exists(key)
    assert store.size(key) == len(data)
    with store.open(key) as f:
        assert f.read() == data
    assert store.sha256(key) == hashlib.sha256(data).hexdigest()
    day, minute, name = key.split("/")
    assert (data_dir / "blobs" / day / minute / f"{name}.dcm").read_bytes() == data
    assert store.path(key) == data_dir / "blobs" / day / minute / f"{name}.dcm"
    # Nothing appeared outside the blob root (the spool file left it).
    outside_after = tree(data_dir) - {p for p in tree(data_dir) if p.startswith("blobs")}
    assert outside_after == outside_before - {os.path.relpath(spool_path, data_dir)}

    assert store.delete(key) is True
    assert not store.exists(key)
    assert store.delete(key) is False
    with pytest.raises(FileNotFoundError):
        store.size(key)
    with pytest.raises(FileNotFoundError):
        store.open(key)
    assert files_under(data_dir / "blobs") == []


def test_empty_blob(store, spool):
    key = store.new_key()
    assert store.put_from_spool(spool(b""), key) == 0
    assert store.size(key) == 0
    assert store.sha256(key) == hashlib.sha256(b"").hexdigest()
    with store.open(key, 0, 10) as f:
        assert f.read() == b""


def test_delete_fsyncs_parent_directory(store, spool, fsyncs):
    key = store.new_key()
    store.put_from_spool(spool(b"x" * 100), key)
    fsyncs.clear()
    assert store.delete(key)
    assert fsyncs == [os.path.dirname(str(store.path(key)))]
    fsyncs.clear()
    assert not store.delete(key)
    assert fsyncs == []


def test_root_is_created(tmp_path):
    root = tmp_path / "a" / "b" / "blobs"
    FileTreeBlobStore(root)
    assert root.is_dir()


# -- keys ----------------------------------------------------------------------------------


def test_key_format(store):
    key = store.new_key()
    assert re.fullmatch(r"[0-9]{8}/[0-9]{4}/[0-9a-f]{32}", key)
    assert not key.endswith(".dcm")


def test_key_time_is_utc(store):
    # Local time 14 hours ahead of UTC: a key built from local time would be far off.
    old = os.environ.get("TZ")
    os.environ["TZ"] = "XYZ-14"
    time.tzset()
    try:
        before = datetime.now(timezone.utc).replace(second=0, microsecond=0)
        key = store.new_key()
        after = datetime.now(timezone.utc)
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()
    stamp = datetime.strptime(key[:13], "%Y%m%d/%H%M").replace(tzinfo=timezone.utc)
    assert before <= stamp <= after


def test_keys_unique(store):
    keys = {store.new_key() for _ in range(10_000)}
    assert len(keys) == 10_000


def test_keys_in_the_same_minute_share_a_directory(store, spool, clock):
    clock.now = datetime(2026, 11, 30, 10, 42, 7, tzinfo=timezone.utc)
    a = store.new_key()
    clock.now = datetime(2026, 11, 30, 10, 42, 59, 999999, tzinfo=timezone.utc)
    b = store.new_key()
    clock.now = datetime(2026, 11, 30, 10, 43, 0, tzinfo=timezone.utc)
    c = store.new_key()

    assert a.startswith("20261130/1042/") and b.startswith("20261130/1042/")
    assert c.startswith("20261130/1043/")
    for key in (a, b, c):
        store.put_from_spool(spool(key.encode()), key)
    assert store.path(a).parent == store.path(b).parent == store.root / "20261130" / "1042"
    assert store.path(c).parent != store.path(a).parent


BAD_KEYS = [
    "",
    "..",
    "../../etc/passwd",
    f"20261130/1042/../{HEX[:29]}",  # right length, escapes the minute directory
    f"20261130/../{HEX}",
    f"../../../../{HEX}",
    "/etc/passwd",
    f"/20261130/1042/{HEX}",
    f"/{HEX}",
    f"20261130/1042/{HEX}/",
    f"20261130/1042//{HEX}",
    f"20261130/1042/{HEX.upper()}",
    f"20261130/1042/{HEX[:-1]}A",
    f"20261130/1042/{HEX[:-1]}",
    f"20261130/1042/{HEX}0",
    f"2026113/1042/{HEX}",
    f"202611300/1042/{HEX}",
    f"20261130/104/{HEX}",
    f"20261130/10420/{HEX}",
    f"20261130/1042/{HEX}.dcm",
    f"{GOOD_KEY}\n",
    f" {GOOD_KEY}",
    f"20261130\\1042\\{HEX}",
    f"\u0662\u0660\u0662\u0666\u0661\u0661\u0663\u0660/1042/{HEX}",  # Arabic-Indic digits
    f"20261130/1042/{HEX[:-1]}\u0663",
    f"20261130/1042/{HEX[:-2]}\x00a",
    HEX,
    None,
    GOOD_KEY.encode(),
    Path(GOOD_KEY),
    42,
]

KEY_METHODS = {
    "put_from_spool": lambda s, k, spool_path: s.put_from_spool(spool_path, k),
    "put_bytes": lambda s, k, spool_path: s.put_bytes(k, b"not for storing"),
    "sync": lambda s, k, spool_path: s.sync([k]),
    "sync-after-good": lambda s, k, spool_path: s.sync([GOOD_KEY, k]),
    "open": lambda s, k, spool_path: s.open(k),
    "open-range": lambda s, k, spool_path: s.open(k, 1, 5),
    "delete": lambda s, k, spool_path: s.delete(k),
    "exists": lambda s, k, spool_path: s.exists(k),
    "size": lambda s, k, spool_path: s.size(k),
    "sha256": lambda s, k, spool_path: s.sha256(k),
    "path": lambda s, k, spool_path: s.path(k),
}


@pytest.mark.parametrize("method", list(KEY_METHODS))
@pytest.mark.parametrize("key", BAD_KEYS, ids=[repr(k)[:40] for k in BAD_KEYS])
def test_bad_keys_are_rejected(store, spool, tmp_path, fsyncs, method, key):
    spool_path = spool(b"not for storing")
    before = tree(tmp_path)
    fsyncs.clear()
    with pytest.raises(ValueError):
        KEY_METHODS[method](store, key, spool_path)
    assert tree(tmp_path) == before  # nothing created (or removed) anywhere
    assert spool_path.read_bytes() == b"not for storing"
    assert fsyncs == []  # sync validates every key before touching the disk


def test_good_key_shape_is_accepted(store):
    assert store.exists(GOOD_KEY) is False  # valid but absent: no ValueError


# -- no overwrite ----------------------------------------------------------------------------


def _no_hardlinks(monkeypatch):
    def link(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", link)


def _cross_device(monkeypatch):
    real_link = os.link

    def link(src, dst, *args, **kwargs):
        if str(src).endswith(".spool"):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "link", link)


PLACEMENT = {
    "link": lambda monkeypatch: None,
    "no-hardlinks": _no_hardlinks,
    "cross-device": _cross_device,
}


@pytest.mark.parametrize("placement", list(PLACEMENT))
def test_put_onto_existing_key_is_refused(store, spool, monkeypatch, placement):
    first = payload(5000, seed=1)
    key = store.new_key()
    store.put_from_spool(spool(first), key)

    PLACEMENT[placement](monkeypatch)
    second = spool(payload(7000, seed=2))
    with pytest.raises(FileExistsError):
        store.put_from_spool(second, key)
    assert store.path(key).read_bytes() == first
    assert second.exists()  # left for the caller to discard
    assert list(store.iter_keys()) == [key]
    assert files_under(store.root) == [str(store.path(key))]


@pytest.mark.parametrize("placement", list(PLACEMENT))
def test_every_placement_path_stores_the_bytes(store, spool, monkeypatch, placement):
    PLACEMENT[placement](monkeypatch)
    data = payload(2 * (1 << 20) + 7, seed=3)  # more than one copy chunk
    spool_path = spool(data)
    key = store.new_key()
    assert store.put_from_spool(spool_path, key) == len(data)
    store.sync([key])
    assert not spool_path.exists()
    assert store.path(key).read_bytes() == data
    assert files_under(store.root) == [str(store.path(key))]  # no temporary left


# -- durability order ------------------------------------------------------------------------


@pytest.fixture
def events(monkeypatch):
    """Record fsync (as a path), link and rename calls in order; the real calls still run."""
    seen: list[tuple] = []
    real_fsync, real_link, real_rename = os.fsync, os.link, os.rename

    def fsync(fd):
        seen.append(("fsync", fd_path(fd)))
        return real_fsync(fd)

    def link(src, dst, *args, **kwargs):
        seen.append(("link", str(src), str(dst)))
        return real_link(src, dst, *args, **kwargs)

    def rename(src, dst, *args, **kwargs):
        seen.append(("rename", str(src), str(dst)))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "rename", rename)
    return seen


def _fsynced(events) -> list[str]:
    return [e[1] for e in events if e[0] == "fsync"]


def test_put_places_and_sync_makes_the_blob_durable(store, spool, events):
    spool_path = spool(b"payload" * 1000)
    key = store.new_key()
    store.put_from_spool(spool_path, key)
    final = str(store.path(key))
    assert ("link", str(spool_path), final) in events
    # Placing fsyncs nothing: sync() does it, while the index writer runs its statements.
    assert _fsynced(events) == []
    store.sync([key])
    assert _fsynced(events)[0] == final
    assert set(_fsynced(events)) == {final, os.path.dirname(final), os.path.dirname(os.path.dirname(final)),
                                     str(store.root)}
    # Once durable, a later sync of the same key fsyncs only its directory.
    events.clear()
    store.sync([key])
    assert _fsynced(events) == [os.path.dirname(final)]


def test_put_bytes_writes_the_blob_in_place_and_sync_makes_it_durable(store, data_dir, events):
    data = payload(9000, seed=5)
    key = store.new_key()
    assert store.put_bytes(key, bytearray(data)) == len(data)
    final = str(store.path(key))
    assert Path(final).read_bytes() == data
    assert _fsynced(events) == []
    assert list((data_dir / "spool").iterdir()) == []  # no spool file on the way
    store.sync([key])
    assert _fsynced(events)[0] == final
    assert store.sha256(key) == hashlib.sha256(data).hexdigest()


def test_put_bytes_onto_existing_key_is_refused(store, spool):
    key = store.new_key()
    store.put_from_spool(spool(b"first"), key)
    with pytest.raises(FileExistsError):
        store.put_bytes(key, b"second")
    assert store.path(key).read_bytes() == b"first"


def test_put_bytes_failing_midway_leaves_nothing(store, monkeypatch):
    real_write = os.write
    calls = []

    def write(fd, data):
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, bytes(data)[:100])  # a short write: the loop must go on

    monkeypatch.setattr(os, "write", write)
    key = store.new_key()
    with pytest.raises(OSError) as info:
        store.put_bytes(key, payload(5000))
    assert info.value.errno == errno.ENOSPC
    assert not store.exists(key)
    assert files_under(store.root) == []
    monkeypatch.setattr(os, "write", real_write)
    store.sync([key])  # nothing pending for it: only directories


def test_deleted_blob_is_not_fsynced_later(store, spool, events):
    key = store.new_key()
    store.put_bytes(key, b"gone")
    assert store.delete(key)
    events.clear()
    store.sync([key])
    assert str(store.path(key)) not in _fsynced(events)


def test_put_without_hardlinks_renames_and_sync_fsyncs_the_blob(store, spool, events, monkeypatch):
    def link(src, dst, *args, **kwargs):
        events.append(("link-refused", str(src), str(dst)))
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "link", link)
    spool_path = spool(b"payload" * 1000)
    key = store.new_key()
    store.put_from_spool(spool_path, key)
    final = str(store.path(key))
    assert ("rename", str(spool_path), final) in events
    assert Path(final).read_bytes() == b"payload" * 1000
    assert not spool_path.exists()
    store.sync([key])
    assert final in _fsynced(events)


def test_put_across_devices_places_a_copy_and_sync_fsyncs_it(store, spool, events, monkeypatch):
    recording_link = os.link

    def link(src, dst, *args, **kwargs):
        if str(src).endswith(".spool"):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return recording_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "link", link)
    spool_path = spool(b"payload" * 1000)
    key = store.new_key()
    store.put_from_spool(spool_path, key)
    final = str(store.path(key))
    links = [e for e in events if e[0] == "link"]
    assert len(links) == 1 and links[0][2] == final
    tmp = links[0][1]
    assert os.path.dirname(tmp) == os.path.dirname(final)
    assert not os.path.exists(tmp)
    assert not spool_path.exists()
    store.sync([key])
    assert final in _fsynced(events)


# -- sync ------------------------------------------------------------------------------------


def test_sync_fsyncs_each_directory_once(store, spool, clock, fsyncs):
    root = str(store.root)
    day = os.path.join(root, "20261130")
    m42, m43, m44 = (os.path.join(day, m) for m in ("1042", "1043", "1044"))

    keys = []
    for second, minute in [(1, 42), (2, 42), (3, 42), (4, 43), (5, 43)]:
        clock.now = datetime(2026, 11, 30, 10, minute, second, tzinfo=timezone.utc)
        key = store.new_key()
        store.put_from_spool(spool(key.encode()), key)
        keys.append(key)

    # New day and minute directories: their parents' entries must become durable too; and
    # every blob's data, once.
    fsyncs.clear()
    store.sync(keys + keys[:2])  # duplicates change nothing
    blobs = {str(store.path(k)): 1 for k in keys}
    assert Counter(fsyncs) == Counter({m42: 1, m43: 1, day: 1, root: 1, **blobs})

    # Second time round the directories are known: only the blobs' own directories.
    fsyncs.clear()
    store.sync(keys)
    assert Counter(fsyncs) == Counter({m42: 1, m43: 1})

    clock.now = datetime(2026, 11, 30, 10, 42, 30, tzinfo=timezone.utc)
    more = store.new_key()
    store.put_from_spool(spool(b"more"), more)
    fsyncs.clear()
    store.sync([more])
    assert fsyncs == [str(store.path(more)), m42]

    # A new minute in an existing day: the minute and the day, not the root.
    clock.now = datetime(2026, 11, 30, 10, 44, 0, tzinfo=timezone.utc)
    late = store.new_key()
    store.put_from_spool(spool(b"late"), late)
    fsyncs.clear()
    store.sync([late])
    assert Counter(fsyncs) == Counter({str(store.path(late)): 1, m44: 1, day: 1})

    fsyncs.clear()
    store.sync([])
    store.sync(iter([]))
    assert fsyncs == []


def test_dirs_pending_until_a_sync_made_their_entries_durable(store, spool, clock, fsyncs):
    clock.now = datetime(2026, 11, 30, 10, 42, 1, tzinfo=timezone.utc)
    first = store.new_key()
    assert not store.dirs_pending(first)  # not created yet
    store.put_from_spool(spool(b"first"), first)
    second = store.new_key()
    assert store.dirs_pending(first) and store.dirs_pending(second)  # the same new minute

    store.sync([first])
    assert not store.dirs_pending(first) and not store.dirs_pending(second)

    # A new minute of the same day: only the minute is pending, and that is enough.
    clock.now = datetime(2026, 11, 30, 10, 43, 0, tzinfo=timezone.utc)
    later = store.new_key()
    store.put_from_spool(spool(b"later"), later)
    assert store.dirs_pending(later) and not store.dirs_pending(first)
    with pytest.raises(ValueError):
        store.dirs_pending("../../etc/passwd")


def test_sync_accepts_any_iterable(store, spool, fsyncs):
    keys = [store.new_key() for _ in range(3)]
    for key in keys:
        store.put_from_spool(spool(b"x"), key)
    fsyncs.clear()
    store.sync(k for k in keys)
    assert set(fsyncs) >= {os.path.dirname(str(store.path(k))) for k in keys}


def test_concurrent_puts(store, spool):
    paths = [[spool(f"{t}-{i}".encode()) for i in range(50)] for t in range(8)]
    stored: list[list[str]] = [[] for _ in range(8)]
    errors = []

    def worker(t):
        try:
            for i, path in enumerate(paths[t]):
                key = store.new_key()
                store.put_from_spool(path, key)
                stored[t].append(key)
            store.sync(stored[t])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    all_keys = {k for keys in stored for k in keys}
    assert len(all_keys) == 400
    assert set(store.iter_keys()) == all_keys
    for t in range(8):
        for i, key in enumerate(stored[t]):
            assert store.path(key).read_bytes() == f"{t}-{i}".encode()


# -- ranges ----------------------------------------------------------------------------------

SIZE = 1000
DATA = payload(SIZE, seed=4)

RANGES = [
    (0, None, DATA),
    (0, 10, DATA[0:10]),
    (100, None, DATA[100:]),
    (SIZE - 1, SIZE, DATA[-1:]),
    (5, 5, b""),
    (0, SIZE, DATA),
    (SIZE, None, b""),
    (SIZE - 10, SIZE + 100, DATA[-10:]),
    (SIZE + 5, SIZE + 10, b""),
    (SIZE + 5, None, b""),
]


@pytest.fixture
def ranged(store, spool):
    key = store.new_key()
    store.put_from_spool(spool(DATA), key)
    return key


@pytest.mark.parametrize("start,end,expected", RANGES)
def test_open_range(store, ranged, start, end, expected):
    with store.open(ranged, start, end) as f:
        assert f.read() == expected
        assert f.read() == b""
        if isinstance(f, RangeReader):
            assert f.length == len(expected)


@pytest.mark.parametrize("start,end,expected", RANGES)
def test_small_reads_equal_one_big_read(store, ranged, start, end, expected):
    with store.open(ranged, start, end) as f:
        pieces = []
        while chunk := f.read(7):
            assert len(chunk) <= 7
            pieces.append(chunk)
        assert b"".join(pieces) == expected
        assert f.tell() == len(expected)

    with store.open(ranged, start, end) as f:
        buffer = bytearray(13)
        got = bytearray()
        while n := f.readinto(buffer):
            got += buffer[:n]
        assert bytes(got) == expected


def test_range_seek_and_tell_are_relative(store, ranged):
    with store.open(ranged, 100, 200) as f:
        assert isinstance(f, RangeReader)
        assert f.tell() == 0
        assert f.read(10) == DATA[100:110]
        assert f.tell() == 10
        assert f.seek(0) == 0
        assert f.read(5) == DATA[100:105]
        assert f.seek(-5, os.SEEK_END) == 95
        assert f.read() == DATA[195:200]
        assert f.seek(-20, os.SEEK_CUR) == 80
        assert f.read(3) == DATA[180:183]
        assert f.seek(500) == 500
        assert f.read() == b""
        assert f.readinto(bytearray(4)) == 0
        with pytest.raises(ValueError):
            f.seek(-1)
        assert f.readable() and f.seekable() and not f.writable()


def test_range_reader_closes_its_file(store, ranged):
    f = store.open(ranged, 1, 3)
    with f:
        fd = f.fileno()
        os.fstat(fd)
    assert f.closed
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(ValueError):
        f.read()


@pytest.mark.parametrize("start,end", [(-1, None), (-5, 3), (10, 9), (0, -1)])
def test_bad_ranges(store, ranged, start, end):
    with pytest.raises(ValueError):
        store.open(ranged, start, end)


def test_range_reader_on_its_own(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(DATA)
    with RangeReader(open(path, "rb"), 10, 20) as r:
        assert r.read() == DATA[10:20]
    with pytest.raises(ValueError):
        RangeReader(open(path, "rb"), 5, 4)


# -- listing ---------------------------------------------------------------------------------


def test_iter_keys(store, spool):
    keys = []
    for i in range(50):
        key = store.new_key()
        store.put_from_spool(spool(i.to_bytes(2, "big")), key)
        keys.append(key)
    for key in keys[::10]:
        assert store.delete(key)
    expected = set(keys) - set(keys[::10])

    # Strays that are not blobs.
    minute = store.root / "20261130" / "1042"
    minute.mkdir(parents=True, exist_ok=True)
    (minute / "abc.tmp").write_bytes(b"x")
    (minute / f".{HEX}.tmp").write_bytes(b"x")
    (minute / f"{HEX.upper()}.dcm").write_bytes(b"x")
    (minute / HEX).write_bytes(b"x")
    (minute / f"{HEX}.dcm.tmp").write_bytes(b"x")
    (minute / f"{HEX[:-1]}.dcm").write_bytes(b"x")
    (minute / f"{'0' * 32}.dcm").mkdir()  # a directory, not a file
    os.symlink(store.path(keys[1]), minute / f"{'1' * 32}.dcm")  # a symlink
    (store.root / "README").write_text("x")
    (store.root / "lost+found").mkdir()
    (store.root / "notadate" / "1042").mkdir(parents=True)
    (store.root / "notadate" / "1042" / f"{HEX}.dcm").write_bytes(b"x")
    (store.root / "20261130" / "10xx").mkdir()
    (store.root / "20261130" / "10xx" / f"{HEX}.dcm").write_bytes(b"x")
    (store.root / "20261130" / "stray.dcm").write_bytes(b"x")

    listed = store.iter_keys()
    assert iter(listed) is listed  # an iterator, not a list
    listed = list(listed)
    assert len(listed) == 45
    assert set(listed) == expected


def test_iter_keys_of_an_empty_store(store):
    assert list(store.iter_keys()) == []


def test_iter_keys_when_root_vanished(store):
    store.root.rmdir()
    assert list(store.iter_keys()) == []


# -- failures --------------------------------------------------------------------------------


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _link_enospc(monkeypatch):
    monkeypatch.setattr(os, "link", _enospc)


def _rename_enospc(monkeypatch):
    _no_hardlinks(monkeypatch)
    monkeypatch.setattr(os, "rename", _enospc)


def _copy_enospc(monkeypatch):
    _cross_device(monkeypatch)

    def copy(src_fd, dst_fd):
        os.write(dst_fd, b"partial" * 100)
        _enospc()

    monkeypatch.setattr(filetree, "_copy_file", copy)


def _copy_link_enospc(monkeypatch):
    def link(src, dst, *args, **kwargs):
        if str(src).endswith(".spool"):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        _enospc()

    monkeypatch.setattr(os, "link", link)


def _mkdir_enospc(monkeypatch):
    monkeypatch.setattr(os, "mkdir", _enospc)


FAILURES = {
    "link": _link_enospc,
    "rename": _rename_enospc,
    "copy": _copy_enospc,
    "link-after-copy": _copy_link_enospc,
    "mkdir": _mkdir_enospc,
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_enospc_propagates_and_leaves_no_partial_file(store, spool, monkeypatch, failure):
    data = payload(4096, seed=5)
    spool_path = spool(data)
    key = store.new_key()
    FAILURES[failure](monkeypatch)
    with pytest.raises(OSError) as info:
        store.put_from_spool(spool_path, key)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()

    assert files_under(store.root) == []
    assert not store.exists(key)
    assert list(store.iter_keys()) == []
    assert spool_path.read_bytes() == data  # still the caller's to discard

    # The store still works afterwards.
    assert store.put_from_spool(spool_path, key) == len(data)
    store.sync([key])
    assert store.path(key).read_bytes() == data


def test_missing_spool_file(store, data_dir):
    with pytest.raises(FileNotFoundError):
        store.put_from_spool(data_dir / "spool" / "gone.spool", store.new_key())
    assert files_under(store.root) == []


def test_disk_free(tmp_path):
    free = disk_free(tmp_path)
    assert isinstance(free, int)
    assert free > 0
    st = os.statvfs(tmp_path)
    assert free <= st.f_blocks * st.f_frsize
    assert disk_free(str(tmp_path)) > 0


def test_key_time_window_is_near_now(store):
    # Without a frozen clock the key's minute is the current UTC minute (give or take one).
    key = store.new_key()
    stamp = datetime.strptime(key[:13], "%Y%m%d/%H%M").replace(tzinfo=timezone.utc)
    assert abs(datetime.now(timezone.utc) - stamp) < timedelta(minutes=2)
