"""The one index writer: every association's instances are committed in small groups.

Durability costs one directory fsync pass and one database commit per group rather than per
instance. Each submitter gets its own outcome once the group that holds its row committed,
and only then may a success status go back to the sender (DESIGN §4).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, namedtuple
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from pacsd.index.db import sync_engine_for
from pacsd.index.levels import IndexNotWritten, IndexRecord, LevelRows
from pacsd.index.schema import instances, patients, series, studies
from pacsd.store.blobstore import BlobStore
from pacsd.store.syncer import BlobSyncer

log = structlog.get_logger("pacsd.index")

MAX_GROUP = 64
_CACHE_SIZE = 20_000


@dataclass
class WriteOutcome:
    stored: bool  # a new row was committed for this record
    duplicate: bool = False  # the SOP Instance UID was already indexed
    replaced_key: str | None = None  # overwrite: the blob that was replaced


@dataclass
class _Study:
    pk: int
    patient_pk: int
    modalities: set[str]
    sop_classes: set[str]


class _LRU(OrderedDict):
    def get_(self, key):
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        if len(self) > _CACHE_SIZE:
            self.popitem(last=False)


class _Prepared:
    """A statement compiled once per dialect (and set of columns) and run on the driver's
    cursor with positional parameters. Connection.execute costs several times what SQLite
    takes to run one of these small statements (cache key, parameter processing, result
    set-up), and the common path runs five per group, a group per instance when instances
    arrive one at a time over an association; a new study adds six more (look up and insert
    its patient, study and series).

    `per_dialect` builds the statement for a dialect, for those that differ between them."""

    def __init__(self, stmt=None, *, per_dialect: Callable[[sa.Dialect], Any] | None = None) -> None:
        self.stmt = stmt
        self._per_dialect = per_dialect
        self._compiled: dict[tuple, tuple[str, tuple[str, ...], list]] = {}

    def _for(self, dialect, keys: tuple[str, ...]) -> tuple[str, tuple[str, ...], list]:
        entry = self._compiled.get((dialect.name, keys))
        if entry is None:
            stmt = self.stmt if self._per_dialect is None else self._per_dialect(dialect)
            compiled = stmt.compile(dialect=dialect, column_keys=list(keys))
            names = tuple(compiled.positiontup)
            # The bind processors Connection.execute would apply (SQLite stores datetimes as text).
            processors = [compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)
                          for name in names]
            entry = (str(compiled), names, processors)
            self._compiled[(dialect.name, keys)] = entry
        return entry

    def __call__(self, conn: sa.Connection, rows: list[dict[str, Any]]) -> list[tuple]:
        """Run once per row; with one row, what it returns (a SELECT's or RETURNING's rows)."""
        sql, names, processors = self._for(conn.dialect, tuple(sorted(rows[0])))
        params = [tuple(value if process is None else process(value)
                        for value, process in zip((row[name] for name in names), processors))
                  for row in rows]
        if len(params) > 1:
            return _driver_execute(conn, sql, params, many=True)
        return _driver_execute(conn, sql, params[0])

    def first(self, conn: sa.Connection, **params: Any) -> tuple | None:
        """The first row the statement returns for these parameters, or None."""
        found = self(conn, [params])
        return found[0] if found else None

    def one(self, conn: sa.Connection, **params: Any) -> tuple:
        """The first row, which must exist."""
        found = self.first(conn, **params)
        if found is None:
            raise sa.exc.NoResultFound("no row where one was required")
        return found


def _driver_execute(conn: sa.Connection, sql: str, params: tuple | list[tuple],
                    many: bool = False) -> list[tuple]:
    """Run `sql` (already compiled for conn's dialect) on the DBAPI cursor, inside conn's
    transaction; the rows it returns, if any. Even exec_driver_sql sets up an execution
    context, a result and event dispatch per call, several times what SQLite takes for
    these statements; asyncpg's adapted cursor works the same way under run_sync."""
    dbapi = conn.dialect.loaded_dbapi
    cursor = conn.connection.dbapi_connection.cursor()
    try:
        if many:
            cursor.executemany(sql, params)
            return []
        cursor.execute(sql, params)
        return cursor.fetchall() if cursor.description is not None else []
    except dbapi.Error as exc:
        # The same exception classes Connection.execute raises (IntegrityError, ...).
        raise sa.exc.DBAPIError.instance(sql, params, exc, dbapi.Error) from exc
    finally:
        cursor.close()


# The statements of the common path, built once: building a Core statement and its cache key
# costs several times what SQLite takes to run it.
class _Existing:
    """The duplicate check of a group: the instances already indexed under its SOP Instance
    UIDs, by UID. Compiled once per dialect and number of UIDs (at most MAX_GROUP forms)."""

    Row = namedtuple("Row", "pk sop_instance_uid blob_key series_pk")

    def __init__(self) -> None:
        self._compiled: dict[tuple[str, int], str] = {}

    def __call__(self, conn: sa.Connection, uids: list[str]) -> dict[str, "_Existing.Row"]:
        key = (conn.dialect.name, len(uids))
        sql = self._compiled.get(key)
        if sql is None:
            stmt = sa.select(instances.c.pk, instances.c.sop_instance_uid, instances.c.blob_key,
                             instances.c.series_pk).where(
                instances.c.sop_instance_uid.in_([sa.bindparam(f"u{i}") for i in range(len(uids))]))
            sql = self._compiled[key] = str(stmt.compile(dialect=conn.dialect))
        return {row[1]: self.Row(*row) for row in _driver_execute(conn, sql, tuple(uids))}


_EXISTING = _Existing()
_INSERT_INSTANCES = _Prepared(instances.insert())
_COUNT_SERIES = _Prepared(series.update().where(series.c.pk == sa.bindparam("b_pk")).values(
    num_instances=series.c.num_instances + sa.bindparam("b_n"), updated_at=sa.bindparam("b_now")))
_COUNT_STUDIES = _Prepared(studies.update().where(studies.c.pk == sa.bindparam("b_pk")).values(
    num_instances=studies.c.num_instances + sa.bindparam("b_n"),
    num_series=studies.c.num_series + sa.bindparam("b_series"), updated_at=sa.bindparam("b_now")))
_COUNT_PATIENTS = _Prepared(patients.update().where(patients.c.pk == sa.bindparam("b_pk")).values(
    num_instances=patients.c.num_instances + sa.bindparam("b_n"),
    num_series=patients.c.num_series + sa.bindparam("b_series"),
    num_studies=patients.c.num_studies + sa.bindparam("b_studies"), updated_at=sa.bindparam("b_now")))
_STUDY_SETS = _Prepared(sa.select(studies.c.modalities_in_study, studies.c.sop_classes_in_study).where(
    studies.c.pk == sa.bindparam("b_pk")))
_SET_STUDY_SETS = _Prepared(studies.update().where(studies.c.pk == sa.bindparam("b_pk")).values(
    modalities_in_study=sa.bindparam("b_modalities"), sop_classes_in_study=sa.bindparam("b_classes")))
_PATIENT = _Prepared(sa.select(patients.c.pk).where(
    patients.c.patient_id == sa.bindparam("b_id"), patients.c.issuer_of_patient_id == sa.bindparam("b_issuer")))
_STUDY = _Prepared(sa.select(
    studies.c.pk, studies.c.patient_pk, studies.c.modalities_in_study, studies.c.sop_classes_in_study,
).where(studies.c.study_instance_uid == sa.bindparam("b_uid")))
_SERIES = _Prepared(sa.select(series.c.pk).where(series.c.series_instance_uid == sa.bindparam("b_uid")))


def _split(text: str) -> set[str]:
    return {v for v in text.split("\\") if v}


def _join(values: set[str]) -> str:
    return "\\".join(sorted(values))


def _insert_new(table: sa.Table, *unique: str) -> _Prepared:
    """INSERT of a new patient/study/series that does nothing if the row exists after all;
    it returns the new row's pk.

    The writer looks a row up before inserting it, but another writer on the same database
    (a second pacsd process on PostgreSQL) may commit the same entity in between; on
    PostgreSQL this INSERT then waits for that transaction and inserts nothing, and the
    caller reads the other writer's row instead of failing its whole group on the unique key.
    """
    def build(dialect: sa.Dialect):
        if dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        elif dialect.name == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            return table.insert().returning(table.c.pk)
        return (insert(table).on_conflict_do_nothing(index_elements=[table.c[name] for name in unique])
                .returning(table.c.pk))
    return _Prepared(per_dialect=build)


_INSERT_PATIENT = _insert_new(patients, "patient_id", "issuer_of_patient_id")
_INSERT_STUDY = _insert_new(studies, "study_instance_uid")
_INSERT_SERIES = _insert_new(series, "series_instance_uid")


class IndexWriter:
    def __init__(self, engine: AsyncEngine, store: BlobStore, executor: Executor, duplicates: str) -> None:
        self.engine = engine
        self.store = store
        self.executor = executor
        self.duplicates = duplicates
        self._queue: asyncio.Queue[IndexRecord | None] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._patients = _LRU()
        self._studies = _LRU()
        self._series = _LRU()
        self.groups = 0
        self.committed = 0
        # Groups handed to the database thread whose outcome the loop has not had yet.
        self._busy = 0
        self._sync_engine = sync_engine_for(engine)
        self._db_thread: ThreadPoolExecutor | None = None
        self._conn: sa.Connection | None = None  # the SQLite writer's, used in _db_thread only
        self._syncer: BlobSyncer | None = None
        # Optional hooks (the IAN outbox uses both). in_transaction(conn, study_uids, now) runs
        # inside each group's transaction, in the database thread, with the studies that got
        # instances; an exception there fails the group. on_committed(study_uids) runs on the
        # event loop after the commit.
        self.in_transaction: Callable[[sa.Connection, set[str], datetime], None] | None = None
        self.on_committed: Callable[[set[str]], None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="index-writer")

    async def close(self) -> None:
        if self._task is not None:
            await self._queue.put(None)
            await self._task
            self._task = None
        if self._db_thread is not None:
            self._db_thread.submit(self._close_connection).result()
            self._db_thread.submit(self._sync_engine.dispose).result()
            self._db_thread.shutdown(wait=True)
            self._db_thread = None
        if self._syncer is not None:
            self._syncer.close()
            self._syncer = None

    async def submit(self, record: IndexRecord) -> WriteOutcome:
        record.future = asyncio.get_running_loop().create_future()
        # Its fsyncs begin now if `prepare` did not start them, while earlier groups commit;
        # its group's commit waits for them.
        if record.synced is None:
            record.synced = self.start_sync([record.blob_key])
        await self._queue.put(record)
        return await record.future

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                return
            group = [first]
            while len(group) < MAX_GROUP and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    stopping = True
                    break
                group.append(item)
            self._busy += 1
            try:
                # The renames into blobs/ must be durable before the rows that point at them.
                outcomes = await self._commit(group)
            except Exception as exc:
                self._failed(group, exc)
                for record in group:
                    if not record.future.done():
                        record.future.set_exception(exc)
                continue
            finally:
                self._busy -= 1
            self._committed(group, outcomes)
            for record, outcome in zip(group, outcomes):
                if not record.future.done():
                    record.future.set_result(outcome)

    def _failed(self, group: list[IndexRecord], exc: Exception) -> None:
        log.error("index.commit_failed", instances=len(group), error=repr(exc))
        self._patients.clear()
        self._studies.clear()
        self._series.clear()

    def _committed(self, group: list[IndexRecord], outcomes: list[WriteOutcome]) -> None:
        self.groups += 1
        self.committed += sum(outcome.stored for outcome in outcomes)
        if self.on_committed is not None:
            touched = {r.rows.study["study_instance_uid"] for r, o in zip(group, outcomes) if o.stored}
            if touched:
                try:
                    self.on_committed(touched)
                except Exception as exc:
                    log.error("index.on_committed_failed", error=repr(exc))

    # -- one instance alone: prepared and committed in one job --------------------------------

    def idle(self) -> bool:
        """Whether `prepare_and_commit` may be used: SQLite, and no group queued or being
        committed."""
        return self._sync_engine is not None and not self._busy and self._queue.empty()

    async def prepare_and_commit(self, prepare: Callable[[], IndexRecord]) -> tuple[IndexRecord, WriteOutcome]:
        """`prepare()` (parse, validate, place the blob) and the commit of its record as a
        group of one, in one job of the database thread.

        For an instance that arrives alone while the writer is idle: the parse would
        otherwise run in a worker thread, come back to the event loop and go on to the
        database thread, two more thread hops (~0.15 ms together here) on the sender's
        every exchange. An exception from `prepare` comes out as it is (nothing was
        committed); a failed commit as IndexNotWritten, with the record whose blob the
        caller must remove.
        """
        self._busy += 1
        try:
            record, outcomes, remember = await asyncio.get_running_loop().run_in_executor(
                self._database_thread(), self._prepare_and_commit_in_thread, prepare)
        except IndexNotWritten as exc:
            self._failed([exc.record], exc.cause)
            raise
        finally:
            self._busy -= 1
        remember()
        self._committed([record], outcomes)
        return record, outcomes[0]

    def _prepare_and_commit_in_thread(self, prepare: Callable[[], IndexRecord]):
        record = prepare()
        if record.synced is None:
            record.synced = self.start_sync([record.blob_key])
        try:
            outcomes, remember = self._commit_in_thread([record])
        except Exception as exc:
            raise IndexNotWritten(record, exc) from exc
        return record, outcomes, remember

    def _database_thread(self) -> ThreadPoolExecutor:
        # SQLite: a group is one job in this thread, instead of one thread hop per
        # statement through aiosqlite.
        if self._db_thread is None:
            self._db_thread = ThreadPoolExecutor(1, thread_name_prefix="pacsd-index")
        return self._db_thread

    async def _commit(self, group: list[IndexRecord]) -> list[WriteOutcome]:
        if self._sync_engine is not None:
            outcomes, remember = await asyncio.get_running_loop().run_in_executor(
                self._database_thread(), self._commit_in_thread, group)
        else:
            try:
                async with self.engine.begin() as conn:
                    outcomes, remember = await conn.run_sync(self._commit_sync, group)
                    # The blobs must be durable before the rows that point at them: an
                    # fsync error here rolls the group back.
                    for record in group:
                        await asyncio.wrap_future(record.synced)
            finally:
                await asyncio.wait([asyncio.wrap_future(record.synced) for record in group])
        remember()
        return outcomes

    def _commit_in_thread(self, group: list[IndexRecord]):
        # The blobs must be durable before the rows that point at them are: their fsyncs
        # (BlobSyncer) run while this thread runs the group's statements, and the
        # transaction commits only once they are done.
        try:
            if self._conn is None:
                # Kept open across groups: a pool checkout and check-in (with its reset)
                # per group cost more than the group's statements.
                self._conn = self._sync_engine.connect()
            with self._conn.begin():
                result = self._commit_sync(self._conn, group)
                for record in group:
                    record.synced.result()  # raises (and so rolls back) if an fsync failed
                return result
        except Exception:
            self._close_connection()  # whatever the failure left behind, the next group starts afresh
            raise
        finally:
            for record in group:
                record.synced.exception()  # settled, whatever the outcome

    def start_sync(self, keys: list[str]) -> Future:
        """Begin the fsyncs of blobs placed already (from any thread); their record's
        commit waits for them. The index writer's, so that a blob's fsyncs can start before
        its record is ready, as soon as it is placed (ingest/pipeline.py prepare)."""
        return self._blob_syncer().start(keys)

    def _blob_syncer(self) -> BlobSyncer:
        if self._syncer is None:
            self._syncer = BlobSyncer(self.store)
        return self._syncer

    def _close_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def _commit_sync(self, conn: sa.Connection, group: list[IndexRecord]):
        """The statements of one group, inside the caller's transaction (sync code: it runs
        in the database thread for SQLite, through run_sync for asyncpg). Returns the
        outcomes and what to remember once the transaction committed."""
        now = datetime.now(timezone.utc)
        outcomes: list[WriteOutcome] = []
        new_rows: list[dict[str, Any]] = []
        touched_series: dict[int, int] = {}
        touched_studies: dict[str, int] = {}
        new_series_per_study: dict[str, int] = {}
        new_studies_per_patient: dict[int, int] = {}
        patient_instances: dict[int, int] = {}
        patient_series: dict[int, int] = {}
        changed_sets: set[str] = set()
        # Cache entries made in this transaction only become real when it commits.
        pending_patients: dict[tuple[str, str], int] = {}
        pending_studies: dict[str, _Study] = {}
        pending_series: dict[str, tuple[int, str]] = {}
        study_objs: dict[str, _Study] = {}
        uids = [r.rows.instance["sop_instance_uid"] for r in group]
        existing = _EXISTING(conn, uids)
        in_group: set[str] = set()
        for record in group:
            uid = record.rows.instance["sop_instance_uid"]
            old = existing.get(uid)
            if uid in in_group or old is not None:
                if self.duplicates != "overwrite" or uid in in_group:
                    outcomes.append(WriteOutcome(stored=False, duplicate=True))
                    continue
                self._remove_instance(conn, old)
                outcomes.append(WriteOutcome(stored=True, duplicate=True, replaced_key=old.blob_key))
                changed_sets.add("*")
            else:
                outcomes.append(WriteOutcome(stored=True))
            in_group.add(uid)
            patient_pk = self._patient(conn, record.rows, now, pending_patients)
            study, study_is_new = self._study(conn, record.rows, patient_pk, now, pending_studies)
            study_uid = record.rows.study["study_instance_uid"]
            study_objs[study_uid] = study
            series_pk, series_is_new = self._series_pk(
                conn, record.rows, study.pk, study_uid, now, pending_series)
            if study_is_new:
                new_studies_per_patient[study.patient_pk] = new_studies_per_patient.get(study.patient_pk, 0) + 1
            if series_is_new:
                new_series_per_study[study_uid] = new_series_per_study.get(study_uid, 0) + 1
                patient_series[study.patient_pk] = patient_series.get(study.patient_pk, 0) + 1
            modality = record.rows.series["modality"]
            sop_class = record.rows.instance["sop_class_uid"]
            if modality and modality not in study.modalities:
                study.modalities.add(modality)
                changed_sets.add(study_uid)
            if sop_class not in study.sop_classes:
                study.sop_classes.add(sop_class)
                changed_sets.add(study_uid)
            touched_series[series_pk] = touched_series.get(series_pk, 0) + 1
            touched_studies[study_uid] = touched_studies.get(study_uid, 0) + 1
            patient_instances[study.patient_pk] = patient_instances.get(study.patient_pk, 0) + 1
            new_rows.append({
                **record.rows.instance,
                "series_pk": series_pk,
                "transfer_syntax_uid": record.transfer_syntax_uid,
                "size": record.size,
                "sha256": record.sha256,
                "blob_key": record.blob_key,
                "dataset_offset": record.dataset_offset,
                "received_at": now,
                "calling_ae": record.calling_ae[:16],
            })
        if new_rows:
            _INSERT_INSTANCES(conn, new_rows)
        if touched_series:
            # Rows are updated in primary-key order in every group, so that two writers on one
            # PostgreSQL database never wait for each other's locks in a cycle.
            _COUNT_SERIES(conn, [{"b_pk": pk, "b_n": n, "b_now": now} for pk, n in sorted(touched_series.items())])
        if touched_studies:
            _COUNT_STUDIES(conn, [
                {"b_pk": study_objs[u].pk, "b_n": n, "b_series": new_series_per_study.get(u, 0), "b_now": now}
                for u, n in sorted(touched_studies.items(), key=lambda item: study_objs[item[0]].pk)])
            for uid in sorted(changed_sets - {"*"}, key=lambda u: study_objs[u].pk):
                study = study_objs[uid]
                # Merge with the row, not only the cache: another writer on the same
                # database may have added a modality since this writer read the study.
                # (The counter UPDATE above already holds the row's lock.)
                modalities, classes = _STUDY_SETS.one(conn, b_pk=study.pk)
                study.modalities |= _split(modalities)
                study.sop_classes |= _split(classes)
                _SET_STUDY_SETS(conn, [{"b_pk": study.pk, "b_modalities": _join(study.modalities),
                                        "b_classes": _join(study.sop_classes)}])
        if patient_instances:
            _COUNT_PATIENTS(conn, [
                {"b_pk": pk, "b_n": n, "b_series": patient_series.get(pk, 0),
                 "b_studies": new_studies_per_patient.get(pk, 0), "b_now": now}
                for pk, n in sorted(patient_instances.items())])
        if "*" in changed_sets:
            self._recount(conn)
        if self.in_transaction is not None and touched_studies:
            self.in_transaction(conn, set(touched_studies), now)
        return outcomes, lambda: self._remember(changed_sets, pending_patients, pending_studies, pending_series)

    def _remember(self, changed_sets, pending_patients, pending_studies, pending_series) -> None:
        """After the commit: the entities this group created become cache entries."""
        if "*" in changed_sets:
            # The recount deleted the series, studies and patients it left empty, and
            # rewrote the study sets: no cached pk or set can be trusted any more.
            self._patients.clear()
            self._studies.clear()
            self._series.clear()
            return
        for key, pk in pending_patients.items():
            self._patients.put(key, pk)
        for uid, study in pending_studies.items():
            self._studies.put(uid, study)
        for uid, value in pending_series.items():
            self._series.put(uid, value)

    def _patient(self, conn: sa.Connection, rows: LevelRows, now, pending) -> int:
        row = rows.patient
        key = (row["patient_id"], row["issuer_of_patient_id"])
        pk = pending.get(key) or self._patients.get_(key)
        if pk is not None:
            return pk
        found = _PATIENT.first(conn, b_id=key[0], b_issuer=key[1])
        if found is None:
            found = _INSERT_PATIENT.first(conn, **row, attrs=rows.attrs("patient"), created_at=now, updated_at=now)
            if found is None:  # another writer committed this patient since the lookup
                found = _PATIENT.one(conn, b_id=key[0], b_issuer=key[1])
        pk = found[0]
        pending[key] = pk
        return pk

    def _study(self, conn: sa.Connection, rows: LevelRows, patient_pk: int, now, pending) -> tuple[_Study, bool]:
        row = rows.study
        uid = row["study_instance_uid"]
        study = pending.get(uid) or self._studies.get_(uid)
        if study is not None:
            return study, False
        found = _STUDY.first(conn, b_uid=uid)
        if found is None:
            inserted = _INSERT_STUDY.first(conn, **row, attrs=rows.attrs("study"), patient_pk=patient_pk,
                                           created_at=now, updated_at=now)
            if inserted is not None:
                study = _Study(inserted[0], patient_pk, set(), set())
                pending[uid] = study
                return study, True
            found = _STUDY.one(conn, b_uid=uid)  # another writer committed it first
        pk, found_patient_pk, modalities, classes = found
        study = _Study(pk, found_patient_pk, _split(modalities), _split(classes))
        if found_patient_pk != patient_pk:
            log.warning("index.study_patient_conflict", study_instance_uid=uid,
                        note="instance names another patient than its study; kept the study's")
        pending[uid] = study
        return study, False

    def _series_pk(self, conn: sa.Connection, rows: LevelRows, study_pk: int, study_uid: str, now,
                   pending) -> tuple[int, bool]:
        row = rows.series
        uid = row["series_instance_uid"]
        cached = pending.get(uid) or self._series.get_(uid)
        if cached is not None:
            return cached[0], False
        found = _SERIES.first(conn, b_uid=uid)
        is_new = False
        if found is None:
            found = _INSERT_SERIES.first(conn, **row, attrs=rows.attrs("series"), study_pk=study_pk,
                                         created_at=now, updated_at=now)
            is_new = found is not None
            if found is None:  # another writer committed this series since the lookup
                found = _SERIES.one(conn, b_uid=uid)
        pk = found[0]
        pending[uid] = (pk, study_uid)
        return pk, is_new

    def _remove_instance(self, conn: sa.Connection, old) -> None:
        conn.execute(instances.delete().where(instances.c.pk == old.pk))

    def _recount(self, conn: sa.Connection) -> None:
        """After an overwrite moved or replaced rows: recompute every counter from the rows.

        Overwrites are rare and an administrator's choice, so exact counters are worth a
        full recount here; the common path above only adds.
        """
        recount_sync(conn)


async def recount(conn: AsyncConnection) -> None:
    """Recompute counters and study sets from the instance rows (also used by verify)."""
    await conn.run_sync(recount_sync)


def recount_sync(conn: sa.Connection) -> None:
    """Recompute counters and study sets from the instance rows (also used by verify)."""
    inst_per_series = sa.select(sa.func.count()).where(instances.c.series_pk == series.c.pk).scalar_subquery()
    conn.execute(series.update().values(num_instances=inst_per_series))
    conn.execute(series.delete().where(series.c.num_instances == 0))
    conn.execute(studies.update().values(
        num_series=sa.select(sa.func.count()).where(series.c.study_pk == studies.c.pk).scalar_subquery(),
        num_instances=sa.select(sa.func.coalesce(sa.func.sum(series.c.num_instances), 0))
        .where(series.c.study_pk == studies.c.pk).scalar_subquery(),
    ))
    conn.execute(studies.delete().where(studies.c.num_series == 0))
    for study_pk, in (conn.execute(sa.select(studies.c.pk))).all():
        modalities = {m for m, in (conn.execute(
            sa.select(series.c.modality).distinct().where(series.c.study_pk == study_pk))).all() if m}
        classes = {c for c, in (conn.execute(
            sa.select(instances.c.sop_class_uid).distinct().join(series, instances.c.series_pk == series.c.pk)
            .where(series.c.study_pk == study_pk))).all()}
        conn.execute(studies.update().where(studies.c.pk == study_pk).values(
            modalities_in_study=_join(modalities), sop_classes_in_study=_join(classes)))
    conn.execute(patients.update().values(
        num_studies=sa.select(sa.func.count()).where(studies.c.patient_pk == patients.c.pk).scalar_subquery(),
        num_series=sa.select(sa.func.coalesce(sa.func.sum(studies.c.num_series), 0))
        .where(studies.c.patient_pk == patients.c.pk).scalar_subquery(),
        num_instances=sa.select(sa.func.coalesce(sa.func.sum(studies.c.num_instances), 0))
        .where(studies.c.patient_pk == patients.c.pk).scalar_subquery(),
    ))
    conn.execute(patients.delete().where(patients.c.num_studies == 0))
