"""The SQL index on SQLite and PostgreSQL: Alembic schema, the group-committing writer
(counters, study sets, level JSON, duplicates, failures, restart), character sets, recount.

Every test runs once per backend (tests/dbfixtures.py); the PostgreSQL variants need
PACSD_TEST_PG_URL and are skipped without it.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from pacsd.index import writer as writer_module
from pacsd.index.db import (SchemaOutOfDate, create_engine, current_revision, ensure_schema,
                            head_revision, upgrade)
from pacsd.index.levels import IndexRecord, rows
from pacsd.index.schema import instances, metadata, patients, series, studies
from pacsd.index.writer import MAX_GROUP, IndexWriter, WriteOutcome, recount
from pacsd.store.aio import AioFsync
from pacsd.store.filetree import FileTreeBlobStore
from tests.dbfixtures import FOREIGN_TABLE, engine, index_url  # noqa: F401  (pytest fixtures)

ROOT = "1.2.826.0.1.3680043.8.498.1042"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
REPO = Path(__file__).resolve().parents[2]

# Tags (as DICOM JSON keys) that belong to exactly one level.
LEVEL_TAGS = {
    "patient": "00100010",   # PatientName
    "study": "00080020",     # StudyDate
    "series": "00080060",    # Modality
    "instance": "00200013",  # InstanceNumber
}


def uid(*parts: int) -> str:
    return ".".join([ROOT, *(str(p) for p in parts)])


def make_dataset(*, patient: int = 0, study: int = 0, series_no: int = 0, instance: int = 0,
                 modality: str = "CT", sop_class: str = CT_IMAGE, **extra) -> Dataset:
    """A small image header; UIDs derive from the numbers, so equal numbers mean one entity."""
    ds = Dataset()
    ds.PatientName = f"Doe^Patient{patient}"
    ds.PatientID = f"PID{patient}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = uid(1, study)
    ds.StudyDate = "20261130"
    ds.StudyTime = "101500"
    ds.AccessionNumber = f"ACC{study}"
    ds.StudyID = f"S{study}"
    ds.StudyDescription = f"study {study}"
    ds.ReferringPhysicianName = "Ref^Doc"
    ds.SeriesInstanceUID = uid(2, series_no)
    ds.Modality = modality
    ds.SeriesNumber = series_no + 1
    ds.SeriesDescription = f"series {series_no}"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid(3, instance)
    ds.InstanceNumber = instance + 1
    ds.ContentDate = "20261130"
    ds.ContentTime = "101501"
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def part10(ds: Dataset) -> tuple[bytes, int]:
    """The data set as a Part 10 file, and where its data set starts."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    data = buffer.getvalue()
    return data, dataset_offset(data)


def dataset_offset(part10_bytes: bytes) -> int:
    """Where the data set starts: after the preamble, DICM and the file meta group."""
    assert part10_bytes[128:132] == b"DICM" and part10_bytes[132:138] == b"\x02\x00\x00\x00UL"
    # (0002,0000) UL, explicit VR: its 4-byte value sits at 140.
    return 144 + int.from_bytes(part10_bytes[140:144], "little")


class Archive:
    """A blob store in tmp_path and the writers of one test, on one engine."""

    def __init__(self, engine, root: Path) -> None:
        self.engine = engine
        self.store = FileTreeBlobStore(root / "blobs")
        self.spool = root / "spool"
        self.spool.mkdir(parents=True)
        self.executor = ThreadPoolExecutor(4, thread_name_prefix="test-index")
        self.writers: list[IndexWriter] = []
        self.engines = []

    def record(self, ds: Dataset, calling_ae: str = "MODALITY") -> IndexRecord:
        """Write the data set's Part 10 file into the store; the index rows come from the
        file read back, as a receiver sees it."""
        data, offset = part10(ds)
        spool = self.spool / uuid.uuid4().hex
        spool.write_bytes(data)
        return self.record_from_file(spool, offset, calling_ae)

    def record_from_file(self, spool: Path, offset: int, calling_ae: str = "MODALITY") -> IndexRecord:
        received = pydicom.dcmread(spool, stop_before_pixels=True)
        data = spool.read_bytes()
        key = self.store.new_key()
        size = self.store.put_from_spool(spool, key)
        assert not spool.exists() and self.store.exists(key)
        return IndexRecord(
            rows=rows(received), blob_key=key, size=size, sha256=hashlib.sha256(data).hexdigest(),
            dataset_offset=offset, transfer_syntax_uid=received.file_meta.TransferSyntaxUID,
            calling_ae=calling_ae,
        )

    def writer(self, duplicates: str = "keep", engine=None, start: bool = True) -> IndexWriter:
        writer = IndexWriter(engine or self.engine, self.store, self.executor, duplicates)
        if start:
            writer.start()
        self.writers.append(writer)
        return writer

    def second_engine(self, url: str):
        """Another engine on the same database, as another process would have."""
        other = create_engine(url)
        self.engines.append(other)
        return other

    async def close(self) -> None:
        for writer in self.writers:
            await writer.close()
        for other in self.engines:
            await other.dispose()
        self.executor.shutdown(wait=True)


@pytest.fixture
async def archive(engine, tmp_path):
    arc = Archive(engine, tmp_path / "data")
    try:
        yield arc
    finally:
        await arc.close()


async def submit_as_one_group(writer: IndexWriter, records: list[IndexRecord]) -> list:
    """Queue every record before the (not yet started) writer looks at its queue, so they
    are committed in one group; returns outcomes or exceptions in order."""
    assert writer._task is None and len(records) <= MAX_GROUP
    tasks = [asyncio.ensure_future(writer.submit(r)) for r in records]
    await asyncio.sleep(0)  # every submit has put its record on the queue
    groups = writer.groups
    writer.start()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    if not any(isinstance(r, BaseException) for r in results):
        assert writer.groups == groups + 1, "the records were not committed together"
    return results


# -- reading the index back ------------------------------------------------------------------


async def select_all(engine, table, *where) -> list:
    async with engine.connect() as conn:
        return (await conn.execute(sa.select(table).where(*where))).all()


async def count(engine, table) -> int:
    async with engine.connect() as conn:
        return (await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar_one()


async def index_state(engine) -> dict:
    """Counters and study sets of every row, keyed by DICOM identity (not by pk)."""
    async with engine.connect() as conn:
        patient_rows = (await conn.execute(sa.select(patients))).all()
        study_rows = (await conn.execute(sa.select(studies, patients.c.patient_id).join(patients))).all()
        series_rows = (await conn.execute(
            sa.select(series, studies.c.study_instance_uid).join(studies))).all()
        instance_rows = (await conn.execute(
            sa.select(instances.c.sop_instance_uid, series.c.series_instance_uid).join(series))).all()
    return {
        "patients": {r.patient_id: (r.num_studies, r.num_series, r.num_instances) for r in patient_rows},
        "studies": {r.study_instance_uid: (r.patient_id, r.num_series, r.num_instances,
                                           r.modalities_in_study, r.sop_classes_in_study)
                    for r in study_rows},
        "series": {r.series_instance_uid: (r.study_instance_uid, r.modality, r.num_instances)
                   for r in series_rows},
        "instances": {r.sop_instance_uid: r.series_instance_uid for r in instance_rows},
    }


def expected_state(datasets) -> dict:
    """What index_state must say when exactly these data sets are stored."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    series_of: dict[str, set] = defaultdict(set)
    study_of: dict[str, set] = defaultdict(set)
    patient_of: dict[str, set] = defaultdict(set)
    for ds in by_uid.values():
        series_of[ds.SeriesInstanceUID].add(ds.SOPInstanceUID)
        study_of[ds.StudyInstanceUID].add(ds.SeriesInstanceUID)
        patient_of[ds.PatientID].add(ds.StudyInstanceUID)
    one = {ds.SeriesInstanceUID: ds for ds in by_uid.values()}
    per_study = defaultdict(list)
    for ds in by_uid.values():
        per_study[ds.StudyInstanceUID].append(ds)

    def study_instances(study_uid):
        return sum(len(series_of[s]) for s in study_of[study_uid])

    return {
        "patients": {pid: (len(sts), sum(len(study_of[s]) for s in sts), sum(study_instances(s) for s in sts))
                     for pid, sts in patient_of.items()},
        "studies": {s: (per_study[s][0].PatientID, len(study_of[s]), study_instances(s),
                        "\\".join(sorted({d.Modality for d in per_study[s]})),
                        "\\".join(sorted({d.SOPClassUID for d in per_study[s]})))
                    for s in study_of},
        "series": {s: (one[s].StudyInstanceUID, one[s].Modality, len(uids)) for s, uids in series_of.items()},
        "instances": {u: ds.SeriesInstanceUID for u, ds in by_uid.items()},
    }


# -- 1. schema and Alembic -------------------------------------------------------------------


async def _in_thread(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def test_upgrade_creates_the_schema_of_schema_py(index_url):
    await _in_thread(upgrade, index_url)
    eng = create_engine(index_url)
    try:
        def inspect(conn):
            from alembic.autogenerate import compare_metadata
            from alembic.runtime.migration import MigrationContext

            insp = sa.inspect(conn)
            found = {}
            for table in insp.get_table_names():
                indexed = {tuple(ix["column_names"]): ix["unique"] for ix in insp.get_indexes(table)}
                uniques = {tuple(uq["column_names"]) for uq in insp.get_unique_constraints(table)}
                found[table] = ({c["name"] for c in insp.get_columns(table)}, indexed, uniques)
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
            return found, diff

        async with eng.connect() as conn:
            found, diff = await conn.run_sync(inspect)
        assert set(found) == {"patients", "studies", "series", "instances", "alembic_version",
                              "commitment_transactions", "ian_outbox"}
        for table in metadata.sorted_tables:
            columns, indexed, uniques = found[table.name]
            assert columns == {c.name for c in table.columns}, table.name
            for column in table.columns:
                if column.index:
                    assert (column.name,) in indexed, f"{table.name}.{column.name} has no index"
                if column.unique:
                    assert (column.name,) in uniques or indexed.get((column.name,)), \
                        f"{table.name}.{column.name} is not unique"
        assert ("patient_id", "issuer_of_patient_id") in found["patients"][2]
        # The query keys C-FIND and QIDO match on.
        assert {("patient_id",), ("patient_name",)} <= set(found["patients"][1])
        assert {("study_date",), ("accession_number",), ("patient_pk",)} <= set(found["studies"][1])
        assert {("modality",), ("study_pk",)} <= set(found["series"][1])
        assert {("series_pk",), ("sop_class_uid",), ("received_at",)} <= set(found["instances"][1])
        # The migration and schema.py describe the same tables.
        assert diff == []
        assert await current_revision(eng) == head_revision()
    finally:
        await eng.dispose()


async def test_ensure_schema_creates_then_finds_current(index_url):
    eng = create_engine(index_url)
    try:
        assert await current_revision(eng) is None
        assert await ensure_schema(eng, index_url) == "created"
        assert await current_revision(eng) == head_revision()
        assert await ensure_schema(eng, index_url) == "current"
        assert await count(eng, instances) == 0
    finally:
        await eng.dispose()


async def test_ensure_schema_refuses_a_database_with_other_tables(index_url):
    eng = create_engine(index_url)
    try:
        async with eng.begin() as conn:
            await conn.execute(sa.text(f"CREATE TABLE {FOREIGN_TABLE} (id INTEGER PRIMARY KEY)"))
        with pytest.raises(SchemaOutOfDate, match=FOREIGN_TABLE):
            await ensure_schema(eng, index_url)
        async with eng.connect() as conn:  # nothing was created beside it
            tables = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
        assert tables == [FOREIGN_TABLE]
    finally:
        await eng.dispose()


@pytest.mark.parametrize("revision", ["0000deadbeef", None], ids=["unknown-revision", "unstamped"])
async def test_ensure_schema_refuses_another_revision(index_url, revision):
    await _in_thread(upgrade, index_url)
    eng = create_engine(index_url)
    try:
        async with eng.begin() as conn:
            if revision is None:  # pacsd's tables, but the version row is gone (older than any)
                await conn.execute(sa.text("DELETE FROM alembic_version"))
            else:
                await conn.execute(sa.text("UPDATE alembic_version SET version_num = :v"), {"v": revision})
        assert await current_revision(eng) == revision
        with pytest.raises(SchemaOutOfDate):
            await ensure_schema(eng, index_url)
        assert await current_revision(eng) == revision  # left as it was
    finally:
        await eng.dispose()


def _cli_upgrade(url: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSD_")}
    env["PACSD_DATABASE__URL"] = url
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "pacsd", "db", "upgrade"], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


async def test_cli_db_upgrade_twice(index_url, tmp_path):
    for attempt in (1, 2):
        done = await _in_thread(_cli_upgrade, index_url, tmp_path)
        assert done.returncode == 0, (attempt, done.stdout, done.stderr)
        assert "revision" in done.stdout
    eng = create_engine(index_url)
    try:
        assert await current_revision(eng) == head_revision()
        assert await ensure_schema(eng, index_url) == "current"
    finally:
        await eng.dispose()


# -- 2. the writer: many concurrent submits ------------------------------------------------------


def _corpus() -> list[Dataset]:
    """200 instances: 3 patients, 5 studies, 12 series, 2 modalities, 2 SOP classes."""
    datasets = []
    for i in range(200):
        series_no = i % 12
        study = series_no % 5
        datasets.append(make_dataset(
            patient=study % 3, study=study, series_no=series_no, instance=i,
            modality="CT" if series_no % 2 == 0 else "MR",
            sop_class=CT_IMAGE if (i // 12) % 2 else SC_IMAGE,
        ))
    return datasets


async def test_concurrent_submits_are_grouped_with_exact_counters(archive):
    datasets = _corpus()
    records = [archive.record(ds) for ds in datasets]
    writer = archive.writer()
    outcomes = await asyncio.gather(*(writer.submit(r) for r in records))

    assert all(o == WriteOutcome(stored=True, duplicate=False, replaced_key=None) for o in outcomes)
    assert writer.committed == 200
    assert -(-200 // MAX_GROUP) <= writer.groups < 200
    assert await count(archive.engine, instances) == 200
    state = await index_state(archive.engine)
    want = expected_state(datasets)
    assert len(want["patients"]) == 3 and len(want["studies"]) == 5 and len(want["series"]) == 12
    assert state == want
    assert {s[3] for s in state["studies"].values()} == {"CT\\MR"}
    assert {s[4] for s in state["studies"].values()} == {"\\".join(sorted([CT_IMAGE, SC_IMAGE]))}

    # Each instance row points at its own blob, with what the record said about it.
    rows_by_uid = {r.sop_instance_uid: r for r in await select_all(archive.engine, instances)}
    for record in records:
        row = rows_by_uid[record.rows.instance["sop_instance_uid"]]
        assert (row.blob_key, row.size, row.sha256, row.dataset_offset, row.calling_ae) == (
            record.blob_key, record.size, record.sha256, record.dataset_offset, "MODALITY")
        assert row.transfer_syntax_uid == ExplicitVRLittleEndian
        assert archive.store.size(row.blob_key) == row.size
        with archive.store.open(row.blob_key) as f:
            assert hashlib.sha256(f.read()).hexdigest() == row.sha256


async def test_level_attrs_hold_their_own_level(archive):
    ds = make_dataset(patient=1, study=2, series_no=3, instance=4, modality="MR", sop_class=MR_IMAGE)
    writer = archive.writer()
    assert (await writer.submit(archive.record(ds))).stored
    level_rows = {
        "patient": (await select_all(archive.engine, patients))[0],
        "study": (await select_all(archive.engine, studies))[0],
        "series": (await select_all(archive.engine, series))[0],
        "instance": (await select_all(archive.engine, instances))[0],
    }
    for level, row in level_rows.items():
        attrs = json.loads(row.attrs)
        assert LEVEL_TAGS[level] in attrs, level
        for other, tag in LEVEL_TAGS.items():
            if other != level:
                assert tag not in attrs, f"{tag} ({other}) in the {level} JSON"
        assert not any(tag.startswith("0002") for tag in attrs), "file meta in the index JSON"
    from_json = {level: Dataset.from_json(row.attrs) for level, row in level_rows.items()}
    assert from_json["patient"].PatientName == "Doe^Patient1"
    assert from_json["patient"].PatientID == "PID1"
    assert from_json["study"].StudyDate == "20261130"
    assert from_json["study"].StudyInstanceUID == uid(1, 2)
    assert from_json["series"].Modality == "MR"
    assert from_json["series"].SeriesInstanceUID == uid(2, 3)
    assert from_json["instance"].InstanceNumber == 5
    assert from_json["instance"].SOPInstanceUID == uid(3, 4)
    # The indexed columns.
    assert level_rows["patient"].patient_name == "Doe^Patient1"
    assert level_rows["study"].accession_number == "ACC2"
    assert (level_rows["series"].modality, level_rows["series"].series_number) == ("MR", 4)
    assert (level_rows["instance"].sop_class_uid, level_rows["instance"].instance_number) == (MR_IMAGE, 5)


# -- 3. duplicates -----------------------------------------------------------------------------


async def test_duplicate_keep_answers_not_stored(archive):
    ds = make_dataset()
    first, second = archive.record(ds), archive.record(make_dataset())
    writer = archive.writer("keep")
    assert await writer.submit(first) == WriteOutcome(stored=True)
    assert await writer.submit(second) == WriteOutcome(stored=False, duplicate=True)
    [row] = await select_all(archive.engine, instances)
    assert row.blob_key == first.blob_key
    assert await index_state(archive.engine) == expected_state([ds])
    assert writer.committed == 1


async def test_duplicate_overwrite_replaces_the_row(archive):
    ds = make_dataset()
    first, second = archive.record(ds), archive.record(make_dataset())
    writer = archive.writer("overwrite")
    assert await writer.submit(first) == WriteOutcome(stored=True)
    before = await index_state(archive.engine)
    assert await writer.submit(second) == WriteOutcome(stored=True, duplicate=True,
                                                       replaced_key=first.blob_key)
    [row] = await select_all(archive.engine, instances)
    assert row.blob_key == second.blob_key
    assert await index_state(archive.engine) == before == expected_state([ds])
    # Later instances of the same entities still count right (caches after a recount).
    more = make_dataset(instance=1)
    assert (await writer.submit(archive.record(more))).stored
    assert await index_state(archive.engine) == expected_state([ds, more])


@pytest.mark.parametrize("policy", ["keep", "overwrite"])
async def test_same_uid_twice_in_one_group(archive, policy):
    ds = make_dataset()
    records = [archive.record(ds), archive.record(make_dataset()), archive.record(make_dataset(instance=1))]
    writer = archive.writer(policy, start=False)
    first, again, other = await submit_as_one_group(writer, records)
    assert first == WriteOutcome(stored=True)
    assert again == WriteOutcome(stored=False, duplicate=True)
    assert other == WriteOutcome(stored=True)
    rows_ = await select_all(archive.engine, instances)
    assert sorted(r.blob_key for r in rows_) == sorted([records[0].blob_key, records[2].blob_key])
    assert await index_state(archive.engine) == expected_state([ds, make_dataset(instance=1)])


async def test_overwrite_moving_an_instance_to_another_series(archive):
    a1 = make_dataset(series_no=1, instance=1)
    b1 = make_dataset(series_no=2, instance=2, modality="MR")
    writer = archive.writer("overwrite")
    for ds in (a1, b1):
        assert (await writer.submit(archive.record(ds))).stored
    # The same SOP Instance UID again, now claiming series 2: series 1 is left empty.
    moved = make_dataset(series_no=2, instance=1, modality="MR")
    outcome = await writer.submit(archive.record(moved))
    assert outcome.stored and outcome.duplicate
    state = await index_state(archive.engine)
    assert state == expected_state([b1, moved])
    assert uid(2, 1) not in state["series"], "the empty series row stayed"
    assert state["studies"][uid(1, 0)][3] == "MR"  # CT left the study with series 1
    # Series 1 comes back with a new instance: recreated, not a stale pk from the cache.
    a2 = make_dataset(series_no=1, instance=3)
    assert (await writer.submit(archive.record(a2))).stored
    assert await index_state(archive.engine) == expected_state([b1, moved, a2])


async def test_overwrite_moving_an_instance_to_another_patient(archive):
    old = make_dataset(patient=1, study=1, series_no=1, instance=1)
    writer = archive.writer("overwrite")
    assert (await writer.submit(archive.record(old))).stored
    moved = make_dataset(patient=2, study=2, series_no=2, instance=1)
    assert (await writer.submit(archive.record(moved))).replaced_key
    assert await index_state(archive.engine) == expected_state([moved])
    # Patient 1, its study and its series appear again: every level is recreated.
    back = make_dataset(patient=1, study=1, series_no=1, instance=5)
    assert (await writer.submit(archive.record(back))).stored
    assert await index_state(archive.engine) == expected_state([moved, back])


# -- 4. a group that fails ----------------------------------------------------------------------


async def test_failed_group_leaves_nothing_and_the_writer_goes_on(archive):
    known = make_dataset(study=1, series_no=1, instance=1)
    writer = archive.writer(start=False)
    # A first group caches patient 0, study 1 and series 1.
    assert (await submit_as_one_group(writer, [archive.record(known)]))[0].stored
    before = await index_state(archive.engine)

    fresh = make_dataset(patient=7, study=7, series_no=7, instance=70)
    # A new series in a cached study: the failed group adds MR to the study's cached sets.
    cached = make_dataset(study=1, series_no=2, instance=2, modality="MR", sop_class=MR_IMAGE)
    broken = archive.record(make_dataset(patient=7, study=7, series_no=7, instance=71))
    broken.rows.instance["sop_class_uid"] = None  # NOT NULL: the instance insert fails
    records = [archive.record(fresh), archive.record(cached), broken]
    await writer.close()
    results = await submit_as_one_group(writer, records)
    assert all(isinstance(r, sa.exc.IntegrityError) for r in results), results
    assert writer.groups == 1
    assert await index_state(archive.engine) == before  # not one row of that group

    # The study created in the failed group is created again, the cached one re-read.
    retry = [archive.record(fresh), archive.record(cached)]
    assert [o.stored for o in await asyncio.gather(*(writer.submit(r) for r in retry))] == [True, True]
    assert await index_state(archive.engine) == expected_state([known, fresh, cached])
    assert writer.committed == 3


async def test_failed_sync_fails_the_group_before_the_database(archive, monkeypatch):
    writer = archive.writer()
    first = make_dataset(instance=1)
    assert (await writer.submit(archive.record(first))).stored

    # A disk error in either way the blob store's fsyncs are made: in a thread, or handed
    # to the kernel (store/aio.py).
    def sync_fails(keys):
        raise OSError(5, "Input/output error")

    def aio_fails(self, fds, **kwargs):
        for fd in fds:
            os.close(fd)
        failed = Future()
        failed.set_exception(OSError(5, "Input/output error"))
        return failed

    monkeypatch.setattr(archive.store, "sync", sync_fails)
    monkeypatch.setattr(AioFsync, "fsync", aio_fails)
    with pytest.raises(OSError):
        await writer.submit(archive.record(make_dataset(study=3, series_no=3, instance=2)))
    assert await index_state(archive.engine) == expected_state([first])
    monkeypatch.undo()
    again = make_dataset(study=3, series_no=3, instance=2)
    assert (await writer.submit(archive.record(again))).stored
    assert await index_state(archive.engine) == expected_state([first, again])


async def test_a_blob_is_fsynced_while_the_writer_is_busy_with_the_group_before(archive, monkeypatch, request):
    """A blob's fsyncs begin when its record reaches the writer, not when its own group is
    taken up: while the group before it is held back, the next blob and its directory are
    made durable already, so that group's commit finds them done."""
    writer = archive.writer()
    assert (await writer.submit(archive.record(make_dataset(instance=0)))).stored
    fsynced = request.getfixturevalue("fsynced")  # from here on
    release = asyncio.Event()
    real_commit = writer._commit
    held: list[int] = []

    async def held_back(group):
        if not held:
            held.append(len(group))
            await release.wait()
        return await real_commit(group)

    monkeypatch.setattr(writer, "_commit", held_back)
    first = archive.record(make_dataset(instance=1))
    first_task = asyncio.ensure_future(writer.submit(first))
    while not held:
        await asyncio.sleep(0.001)
    await asyncio.wrap_future(first.synced)
    fsynced.clear()  # what follows is the next blob's own
    second = archive.record(make_dataset(instance=2))
    second_task = asyncio.ensure_future(writer.submit(second))
    blob = str(archive.store.path(second.blob_key))
    for _ in range(1000):
        if {blob, os.path.dirname(blob)} <= set(fsynced):
            break
        await asyncio.sleep(0.005)
    assert {blob, os.path.dirname(blob)} <= set(fsynced), fsynced
    assert not first_task.done() and not second_task.done()
    release.set()
    assert (await first_task).stored and (await second_task).stored
    assert await count(archive.engine, instances) == 3


async def test_failed_commit_after_the_statements(archive, monkeypatch):
    """The failure comes after every statement of the group ran (a commit that fails)."""
    writer = archive.writer()
    first = make_dataset(instance=1)
    assert (await writer.submit(archive.record(first))).stored
    real = writer_module.recount_sync

    def failing_recount(conn):
        real(conn)
        raise RuntimeError("commit failed")

    # Overwrite takes the recount path inside the transaction; make it fail there.
    writer.duplicates = "overwrite"
    monkeypatch.setattr(writer_module, "recount_sync", failing_recount)
    moved = make_dataset(study=4, series_no=4, instance=1)
    with pytest.raises(RuntimeError, match="commit failed"):
        await writer.submit(archive.record(moved))
    assert await index_state(archive.engine) == expected_state([first])
    monkeypatch.undo()
    second = make_dataset(instance=2)
    assert (await writer.submit(archive.record(second))).stored
    assert await index_state(archive.engine) == expected_state([first, second])


# -- 5. restart ---------------------------------------------------------------------------------


async def test_new_writer_continues_the_counters(archive, index_url):
    before = [make_dataset(series_no=1, instance=i) for i in range(3)]
    writer = archive.writer()
    for ds in before:
        assert (await writer.submit(archive.record(ds))).stored
    await writer.close()

    # As if pacsd restarted: another engine, another writer with empty caches.
    restarted = archive.writer(engine=archive.second_engine(index_url))
    after = [make_dataset(series_no=1, instance=i) for i in range(3, 5)]
    after.append(make_dataset(series_no=2, instance=5, modality="MR", sop_class=MR_IMAGE))
    outcomes = await asyncio.gather(*(restarted.submit(archive.record(ds)) for ds in after))
    assert all(o.stored for o in outcomes)
    state = await index_state(archive.engine)
    assert state == expected_state(before + after)
    assert state["studies"][uid(1, 0)][1:] == (2, 6, "CT\\MR", f"{CT_IMAGE}\\{MR_IMAGE}")
    assert state["patients"]["PID0"] == (1, 2, 6)


# -- two writers on one database (two pacsd processes) -------------------------------------------


async def test_two_writers_create_the_same_new_study(archive, index_url):
    """Both look the new patient/study up, find nothing and insert it: the second insert
    must take the first writer's row instead of failing its group on the unique key."""
    one = archive.writer()
    two = archive.writer(engine=archive.second_engine(index_url))
    first = [make_dataset(series_no=1, instance=i) for i in range(20)]
    second = [make_dataset(series_no=2, instance=100 + i, modality="MR", sop_class=MR_IMAGE)
              for i in range(20)]
    first_records = [archive.record(ds) for ds in first]
    second_records = [archive.record(ds) for ds in second]
    outcomes = await asyncio.gather(*(one.submit(r) for r in first_records),
                                    *(two.submit(r) for r in second_records))
    assert all(o == WriteOutcome(stored=True) for o in outcomes)
    assert await index_state(archive.engine) == expected_state(first + second)


async def test_two_writers_do_not_lose_each_others_modalities(archive, index_url):
    one = archive.writer()
    two = archive.writer(engine=archive.second_engine(index_url))
    ct = make_dataset(series_no=1, instance=1)
    mr = make_dataset(series_no=2, instance=2, modality="MR", sop_class=MR_IMAGE)
    us = make_dataset(series_no=3, instance=3, modality="US", sop_class=SC_IMAGE)
    assert (await one.submit(archive.record(ct))).stored  # `one` caches the study as {CT}
    assert (await two.submit(archive.record(mr))).stored
    assert (await one.submit(archive.record(us))).stored  # its cache has not seen MR
    state = await index_state(archive.engine)
    assert state["studies"][uid(1, 0)][3] == "CT\\MR\\US"
    assert state == expected_state([ct, mr, us])


# -- 6. character sets -------------------------------------------------------------------------


async def test_utf8_patient_name(archive):
    ds = make_dataset(SpecificCharacterSet="ISO_IR 192", PatientName="Müller^Jürgen",
                      StudyDescription="Schädel nativ")
    record = archive.record(ds)
    assert (await archive.writer().submit(record)).stored
    [patient] = await select_all(archive.engine, patients)
    assert patient.patient_name == "Müller^Jürgen"
    back = Dataset.from_json(patient.attrs)
    assert back.PatientName == "Müller^Jürgen"
    assert back.SpecificCharacterSet == "ISO_IR 192"
    [study] = await select_all(archive.engine, studies)
    assert Dataset.from_json(study.attrs).StudyDescription == "Schädel nativ"
    async with archive.engine.connect() as conn:  # matching on the decoded text works
        found = (await conn.execute(sa.select(patients.c.patient_id).where(
            patients.c.patient_name.like("Müller%")))).scalars().all()
    assert found == ["PID0"]


def _charset_file(name: str) -> Path:
    from pydicom.data import get_charset_files

    found = get_charset_files(name)
    if not found:
        pytest.skip(f"pydicom's test file {name} is not available")
    return Path(found[0])


@pytest.mark.parametrize("name", ["chrH31.dcm", "chrH32.dcm", "chrX1.dcm", "chrGerm.dcm"])
async def test_patient_name_from_a_charset_file(archive, name):
    """Files as a modality sends them (ISO 2022 with escape sequences, UTF-8, Latin-1)."""
    original = pydicom.dcmread(_charset_file(name))
    expected = str(original.PatientName)
    assert expected.isascii() is False
    spool = archive.spool / uuid.uuid4().hex
    shutil.copyfile(_charset_file(name), spool)
    record = archive.record_from_file(spool, dataset_offset(spool.read_bytes()))
    assert (await archive.writer().submit(record)).stored
    [patient] = await select_all(archive.engine, patients)
    assert patient.patient_name == expected
    back = Dataset.from_json(patient.attrs)
    assert str(back.PatientName) == expected
    assert back.PatientName == original.PatientName
    assert back.SpecificCharacterSet == original.SpecificCharacterSet


# -- 7. recount ---------------------------------------------------------------------------------


async def test_recount_repairs_corrupted_counters(archive):
    datasets = [make_dataset(patient=i % 5 % 3 % 2, study=i % 5 % 3, series_no=i % 5, instance=i,
                             modality=("CT", "MR")[i % 5 % 2], sop_class=(CT_IMAGE, SC_IMAGE)[i % 2])
                for i in range(30)]
    writer = archive.writer()
    await asyncio.gather(*(writer.submit(archive.record(ds)) for ds in datasets))
    good = await index_state(archive.engine)
    assert good == expected_state(datasets)
    async with archive.engine.begin() as conn:
        await conn.execute(series.update().values(num_instances=999))
        await conn.execute(studies.update().values(num_series=999, num_instances=999,
                                                   modalities_in_study="XX", sop_classes_in_study=""))
        await conn.execute(patients.update().values(num_studies=999, num_series=999, num_instances=999))
    assert await index_state(archive.engine) != good
    async with archive.engine.begin() as conn:
        await recount(conn)
    assert await index_state(archive.engine) == good


# -- 8. the cost of the common path (counts, not timings: they do not depend on the machine) -----


def count_statements(writer: IndexWriter, monkeypatch) -> list[str]:
    """Every SQL statement the writer sends from now on (BEGIN and COMMIT left out): those
    through SQLAlchemy's Connection, and those the hot path hands the driver's cursor
    (writer._driver_execute; one executemany is one statement)."""
    seen: list[str] = []
    engine = writer._sync_engine or writer.engine.sync_engine

    def record(statement: str) -> None:
        if not statement.lstrip().upper().startswith(("BEGIN", "COMMIT", "ROLLBACK")):
            seen.append(statement.split(None, 1)[0].upper())

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _count(conn, cursor, statement, parameters, context, executemany) -> None:
        record(statement)

    driver_execute = writer_module._driver_execute

    def counting(conn, sql, params, many=False):
        record(sql)
        return driver_execute(conn, sql, params, many)

    monkeypatch.setattr(writer_module, "_driver_execute", counting)
    return seen


async def test_a_new_study_runs_its_statements_on_the_driver(archive, monkeypatch):
    """A modality that sends one instance per study (CR, DX, mammography) makes every group
    create a patient, a study and a series. Each is looked up, inserted and its JSON
    written, and the study's modality and SOP class sets set: thirteen statements, every one
    straight on the driver's cursor, none through SQLAlchemy's Connection.execute (which
    costs several times what SQLite takes to run them)."""
    writer = archive.writer()
    seen = count_statements(writer, monkeypatch)
    through_sqlalchemy: list[str] = []
    sa.event.listen(writer._sync_engine or writer.engine.sync_engine, "before_cursor_execute",
                    lambda conn, cursor, statement, *rest: through_sqlalchemy.append(statement))
    for n in range(3):
        ds = make_dataset(patient=n, study=n, series_no=n, instance=n, modality="DX")
        assert (await writer.submit(archive.record(ds))).stored
    per_study = ["SELECT", "SELECT", "INSERT", "SELECT", "INSERT", "SELECT", "INSERT", "INSERT",
                 "UPDATE", "UPDATE", "SELECT", "UPDATE", "UPDATE"]
    assert seen == per_study * 3
    assert [s for s in through_sqlalchemy if not s.lstrip().upper().startswith(("BEGIN", "COMMIT"))] == []
    async with archive.engine.connect() as conn:
        rows = (await conn.execute(sa.select(studies.c.modalities_in_study, studies.c.num_instances,
                                             studies.c.attrs))).all()
    assert [(r.modalities_in_study, r.num_instances) for r in rows] == [("DX", 1)] * 3
    assert all('"0020000D"' in r.attrs for r in rows)
    await writer.close()


async def test_statements_per_group_do_not_grow_with_the_group(archive, monkeypatch):
    """Instances of a series the writer already knows cost five statements per group whether
    the group holds one instance (one association, one instance at a time) or 64: the
    duplicate check, the instance rows, and the series, study and patient counters."""
    writer = archive.writer()
    assert (await writer.submit(archive.record(make_dataset(instance=0)))).stored
    seen = count_statements(writer, monkeypatch)
    for i in range(1, 4):
        assert (await writer.submit(archive.record(make_dataset(instance=i)))).stored
    assert seen == ["SELECT", "INSERT", "UPDATE", "UPDATE", "UPDATE"] * 3
    seen.clear()
    await writer.close()

    grouped = archive.writer(start=False)
    seen = count_statements(grouped, monkeypatch)
    records = [archive.record(make_dataset(instance=i)) for i in range(100, 100 + MAX_GROUP)]
    results = await submit_as_one_group(grouped, records)
    assert all(r.stored for r in results)
    # A new writer has no cache yet: one lookup each for the patient, the study and the series.
    assert sorted(seen) == sorted(["SELECT"] * 4 + ["INSERT"] + ["UPDATE"] * 3)
    assert await count(archive.engine, instances) == 4 + MAX_GROUP
