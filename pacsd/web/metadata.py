"""WADO-RS Retrieve Metadata (PS3.18 10.4.1.1.2, 10.4.3.3.2): application/dicom+json.

Each instance's object is the DICOM JSON the index already holds (its patient, study, series
and instance levels, index/levels.py) plus what the index leaves out, taken from a walk of the
blob's element headers (elements.py), which reads no values:

- (0002,0010) Transfer Syntax UID, which viewers need to pick a decoder (the index drops
  group 0002; the stored syntax is a column);
- Pixel Data, and every value the index dropped for its size (binary values above levels.py's
  INLINE_LIMIT, any value above read_header's 64 KiB), as a BulkDataURI pointing at
  .../instances/{sop}/bulkdata/{tag path}. A value becomes a BulkDataURI exactly when the
  index has no value for it (no entry, or inside a sequence an entry with an empty
  BulkDataURI), so the two never disagree about an element.

The threshold is therefore the index's (8 KiB of base64, 6 KiB of binary): below it values
are inline (LUTs of 256 entries, small ICC profiles), above it the client fetches them only
if it needs them. Elements after a top-level Pixel Data (trailing padding, signatures) are not
walked. Where a patient, study or series attribute differs between instances, the value of
the first instance the index saw is given for all of them.

The response streams: instances are converted in batches in a worker thread, and compressed
there with gzip when the client accepts it (OHIF issue #824: metadata is large and repetitive).
"""

from __future__ import annotations

import asyncio
import copy
import json
import zlib
from typing import Iterator

from starlette.requests import Request
from starlette.responses import StreamingResponse

from pacsd.web import caching
from pacsd.web.elements import ElementError, path_text, walk
from pacsd.web.errors import WebError
from pacsd.web.lookup import LevelAttrs, StoredInstance, stored_instances_with_attrs
from pacsd.web.media import accepted
from pacsd.web.streaming import in_thread
from pacsd.web.urls import instance_url, service_url

DICOM_JSON = "application/dicom+json"
# VRs whose value may be replaced by a BulkDataURI (PS3.18 F.2.2 / 10.4.3.3.2).
_BULK_VRS = frozenset("DS FL FD IS LT OB OD OF OL OV OW SL SS ST SV UC UL UN US UT UV".split())
_BATCH = 32  # instances converted per step in the worker thread


def _negotiate(request: Request) -> None:
    for media in accepted(request):
        # PS3.18 8.7.7: an Accept list may carry other types (older OHIF adds the frames'
        # multipart type); the first range JSON satisfies is enough.
        if media.covers(DICOM_JSON) or media.covers("application/json"):
            return
    raise WebError(406, f"metadata is served as {DICOM_JSON}; the request accepts only "
                        f"{', '.join(str(m) for m in accepted(request))}")


def _accepts_gzip(request: Request) -> bool:
    for item in request.headers.get("accept-encoding", "").split(","):
        name, _, params = item.partition(";")
        if name.strip().lower() in ("gzip", "*"):
            q = params.strip().lower()
            return not (q.startswith("q=") and q[2:].strip() in ("0", "0.0", "0.00", "0.000"))
    return False


class _Builder:
    """Instance objects from index JSON + header walk; upper levels parsed once each."""

    def __init__(self, archive, service: str) -> None:
        self.store = archive.store
        self.service = service
        self.parsed: dict[tuple[str, int], dict] = {}

    def _level(self, kind: str, pk: int, text: str) -> dict:
        key = (kind, pk)
        if key not in self.parsed:
            self.parsed[key] = json.loads(text)
        return self.parsed[key]

    def instance(self, inst: StoredInstance, attrs: LevelAttrs) -> dict:
        merged: dict = {}
        for kind, pk, text in (("patient", attrs.patient_pk, attrs.patient),
                               ("study", attrs.study_pk, attrs.study),
                               ("series", attrs.series_pk, attrs.series)):
            merged.update(self._level(kind, pk, text))
        own = json.loads(attrs.instance)
        merged.update(own)
        merged["00020010"] = {"vr": "UI", "Value": [inst.transfer_syntax_uid]}
        url = instance_url(self.service, inst.study_instance_uid, inst.series_instance_uid,
                           inst.sop_instance_uid)
        path = self.store.path(inst.blob_key)
        try:
            for element in walk(path, inst.dataset_offset, inst.transfer_syntax_uid,
                                stop_at_pixel_data=True):
                tag = element.tag
                if element.vr not in _BULK_VRS or tag & 0xFFFF == 0 or tag >> 16 == 0x0002:
                    continue
                container = self._container(merged, own, element.path[:-1])
                key = f"{tag:08X}"
                # nested values the index found too large are stored with an empty BulkDataURI
                if container is not None and (key not in container or "BulkDataURI" in container[key]):
                    container[key] = {"vr": element.vr,
                                      "BulkDataURI": f"{url}/bulkdata/{path_text(element.path)}"}
        except (ElementError, OSError) as exc:
            raise WebError(500, f"cannot read the stored instance {inst.sop_instance_uid}: {exc}") from exc
        return merged

    @staticmethod
    def _container(merged: dict, own: dict, path: tuple[int, ...]) -> dict | None:
        """The object the element at `path` + (tag,) belongs in; None if the index lacks it."""
        obj = merged
        for i in range(0, len(path), 2):
            key = f"{path[i]:08X}"
            if obj is merged and key not in own and key in merged:
                # an upper level's object is shared by every instance: copy before writing
                merged[key] = copy.deepcopy(merged[key])
            items = (obj.get(key) or {}).get("Value")
            index = path[i + 1]
            if not isinstance(items, list) or index >= len(items) or not isinstance(items[index], dict):
                return None
            obj = items[index]
        return obj

    def chunks(self, rows: list[tuple[StoredInstance, LevelAttrs]], gzip: bool) -> Iterator[bytes]:
        z = zlib.compressobj(6, zlib.DEFLATED, 31) if gzip else None
        for start in range(0, len(rows), _BATCH):
            parts = [b"[" if start == 0 else b""]
            for n, (inst, attrs) in enumerate(rows[start:start + _BATCH]):
                if start + n:
                    parts.append(b",")
                parts.append(json.dumps(self.instance(inst, attrs), sort_keys=True, ensure_ascii=False,
                                        separators=(",", ":")).encode("utf-8"))
            if start + _BATCH >= len(rows):
                parts.append(b"]")
            data = b"".join(parts)
            if z is not None:
                data = z.compress(data)
                if start + _BATCH >= len(rows):
                    data += z.flush()
            if data:
                yield data


async def retrieve_metadata(request: Request) -> StreamingResponse:
    p = request.path_params
    archive = request.app.state.archive
    rows = await stored_instances_with_attrs(archive.engine, p["study"], p.get("series"), p.get("instance"))
    _negotiate(request)
    service = service_url(request)
    etag = caching.combined_etag("metadata " + service, (inst.etag for inst, _ in rows), weak=True)
    last_modified = max(inst.last_modified for inst, _ in rows)
    headers = {**caching.validators(etag, last_modified), "Vary": "Accept, Accept-Encoding"}
    if caching.not_modified(request, etag, last_modified):
        return caching.not_modified_response(etag, last_modified, {"Vary": headers["Vary"]})
    gzip = _accepts_gzip(request)
    if gzip:
        headers["Content-Encoding"] = "gzip"
    builder = _Builder(archive, service)
    # The first instance is built before answering, so that an unreadable blob is a clean
    # 500 rather than a cut-off 200 in the common single-instance and small cases.
    body = builder.chunks(rows, gzip)
    first = await asyncio.get_running_loop().run_in_executor(archive.executor, next, body, b"")

    async def stream():
        yield first
        async for chunk in in_thread(archive.executor, body):
            yield chunk

    return StreamingResponse(stream(), media_type=DICOM_JSON, headers=headers)
