"""The stored instances a DICOMweb URL names: /studies/{s}[/series/{se}[/instances/{i}]].

One SELECT over the index (no blob is opened): what retrieval, metadata, frames, rendering
and WADO-URI need to find the bytes, label them (transfer syntax, frames) and validate
caches (ETag from the stored SHA-256, Last-Modified from the time of receipt).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from pacsd.index.schema import instances, patients, series, studies
from pacsd.uid import is_valid_uid
from pacsd.web.errors import WebError


@dataclass(frozen=True, slots=True)
class StoredInstance:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    number_of_frames: int | None
    blob_key: str
    dataset_offset: int  # where the data set starts in the blob
    size: int  # of the whole blob (Part 10 file)
    sha256: str
    received_at: datetime

    @property
    def etag(self) -> str:
        return f'"{self.sha256}"'

    @property
    def last_modified(self) -> datetime:
        # SQLite hands back naive datetimes; they were written in UTC.
        at = self.received_at
        return at if at.tzinfo else at.replace(tzinfo=timezone.utc)


_COLUMNS = (studies.c.study_instance_uid, series.c.series_instance_uid, instances.c.sop_instance_uid,
            instances.c.sop_class_uid, instances.c.transfer_syntax_uid, instances.c.number_of_frames,
            instances.c.blob_key, instances.c.dataset_offset, instances.c.size, instances.c.sha256,
            instances.c.received_at)
_JOINED = instances.join(series, instances.c.series_pk == series.c.pk).join(
    studies, series.c.study_pk == studies.c.pk)
_ORDER_BY = (series.c.series_number, series.c.pk, instances.c.instance_number, instances.c.pk)


def check_uid(kind: str, uid: str) -> str:
    if not is_valid_uid(uid):
        raise WebError(400, f"{kind} {uid!r} is not a valid UID")
    return uid


async def stored_instances(engine: AsyncEngine, study: str, series_uid: str | None = None,
                           instance: str | None = None) -> list[StoredInstance]:
    """The instances under the URL, in series and instance order; 404 when there are none."""
    return [row[0] for row in await _select(engine, study, series_uid, instance, ())]


@dataclass(frozen=True, slots=True)
class LevelAttrs:
    """The stored DICOM JSON (text) of an instance's four levels, with the row keys of the
    upper three so that a caller can parse each patient, study and series once."""

    patient_pk: int
    study_pk: int
    series_pk: int
    patient: str
    study: str
    series: str
    instance: str


_ATTRS = (patients.c.pk, studies.c.pk, series.c.pk, patients.c.attrs, studies.c.attrs,
          series.c.attrs, instances.c.attrs)


async def stored_instances_with_attrs(engine: AsyncEngine, study: str, series_uid: str | None = None,
                                      instance: str | None = None) -> list[tuple[StoredInstance, LevelAttrs]]:
    """As stored_instances, each with its levels' DICOM JSON (for WADO-RS metadata)."""
    return [(row[0], LevelAttrs(*row[1])) for row in
            await _select(engine, study, series_uid, instance, _ATTRS)]


async def _select(engine: AsyncEngine, study: str, series_uid: str | None, instance: str | None,
                  extra: tuple) -> list[tuple[StoredInstance, tuple]]:
    check_uid("StudyInstanceUID", study)
    conditions = [studies.c.study_instance_uid == study]
    if series_uid is not None:
        conditions.append(series.c.series_instance_uid == check_uid("SeriesInstanceUID", series_uid))
    if instance is not None:
        conditions.append(instances.c.sop_instance_uid == check_uid("SOPInstanceUID", instance))
    joined = _JOINED.join(patients, studies.c.patient_pk == patients.c.pk) if extra else _JOINED
    stmt = sa.select(*_COLUMNS, *extra).select_from(joined).where(*conditions).order_by(*_ORDER_BY)
    async with engine.connect() as conn:
        rows = (await conn.execute(stmt)).all()
    if not rows:
        if instance is not None:
            what = f"instance {instance} in series {series_uid} of study {study}"
        elif series_uid is not None:
            what = f"series {series_uid} in study {study}"
        else:
            what = f"study {study}"
        raise WebError(404, f"no {what} is stored here")
    width = len(_COLUMNS)
    return [(StoredInstance(*row[:width]), tuple(row[width:])) for row in rows]
