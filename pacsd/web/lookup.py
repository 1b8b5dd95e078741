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

from pacsd.index.schema import instances, series, studies
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
    check_uid("StudyInstanceUID", study)
    conditions = [studies.c.study_instance_uid == study]
    if series_uid is not None:
        conditions.append(series.c.series_instance_uid == check_uid("SeriesInstanceUID", series_uid))
    if instance is not None:
        conditions.append(instances.c.sop_instance_uid == check_uid("SOPInstanceUID", instance))
    stmt = sa.select(*_COLUMNS).select_from(_JOINED).where(*conditions).order_by(*_ORDER_BY)
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
    return [StoredInstance(*row) for row in rows]
