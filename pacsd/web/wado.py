"""WADO-RS (PS3.18 10.4): Retrieve Study, Series and Instance, their Metadata, and Bulkdata.

Instances go out as multipart/related; type="application/dicom", one Part 10 file per part,
streamed from the blob exactly as stored (the blob is the Part 10 file: preamble, file meta,
the data set as received). Each part says its syntax: `Content-Type: application/dicom;
transfer-syntax=<stored UID>`.

Transfer syntax: PS3.18 makes Explicit VR Little Endian the default for application/dicom
when the request names none. pacsd does not transcode yet, and a viewer that asks for the
study with no transfer-syntax parameter (dicomweb-client's default, OHIF's) wants the images
more than a 406, so such a request gets the stored syntax, as Orthanc does. A request that
names syntaxes pacsd cannot produce from the stored one gets 406 naming both; `*` or the
stored UID itself is always satisfiable.

An instance asked for as multipart/related; type="application/octet-stream" gets the bulk
data of its pixel data (10.4.4); frames, rendered and thumbnail resources are rendered.py's.
"""

from __future__ import annotations

import asyncio
import hashlib
import os

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from pacsd.web import caching, multipart
from pacsd.web.bulkdata import OCTET_STREAM, pixel_data_response, retrieve_bulkdata
from pacsd.web.errors import WebError
from pacsd.web.lookup import StoredInstance, stored_instances
from pacsd.web.media import MediaRange, accepted
from pacsd.web.metadata import retrieve_metadata
from pacsd.web.streaming import file_chunks, in_thread, multipart_files

DICOM = "application/dicom"

_MULTIPART, _SINGLE, _BULK = "multipart", "single", "bulk"


def _classify(media: MediaRange, single_instance: bool) -> tuple[str | None, list[str]]:
    """What a range asks of a retrieve resource, and the transfer syntaxes it names."""
    syntaxes = media.params_named("transfer-syntax")
    if media.type in ("*/*", "multipart/*"):
        return _MULTIPART, []
    if media.type == "multipart/related":
        part = (media.param("type") or DICOM).lower()
        if part == OCTET_STREAM:
            return (_BULK if single_instance else None), syntaxes
        if MediaRange(part).covers(DICOM):
            return _MULTIPART, syntaxes
        return None, syntaxes
    if media.type == DICOM and single_instance:
        # a single-part type is only for a resource of one item (10.4.4)
        return _SINGLE, syntaxes
    return None, syntaxes


def negotiate(request: Request, stored: set[str], single_instance: bool) -> str:
    """_MULTIPART, _SINGLE or _BULK; 406 when no acceptable range can be served.

    Every range of the chosen kind contributes the syntaxes it accepts (8.7.8 selects per
    part): each stored syntax must be accepted by one of them."""
    kind, admitted, asked = None, set(), []
    for media in accepted(request):
        found, syntaxes = _classify(media, single_instance)
        if found is None or (kind is not None and found != kind):
            continue
        kind = found
        if kind == _BULK:
            return kind
        if not syntaxes or "*" in syntaxes:
            admitted = set(stored)
        else:
            asked += syntaxes
            admitted |= stored & set(syntaxes)
    if kind is None:
        offered = 'multipart/related; type="application/dicom"'
        if single_instance:
            offered += f', {DICOM} or multipart/related; type="{OCTET_STREAM}" (its pixel data)'
        raise WebError(406, f"this resource is available as {offered}; the request accepts only "
                            f"{', '.join(str(m) for m in accepted(request))}")
    missing = stored - admitted
    if missing:
        raise WebError(406, f"stored in transfer syntax {', '.join(sorted(missing))}; pacsd does not "
                            f"transcode and cannot send {', '.join(dict.fromkeys(asked))}")
    return kind


def _sizes(request: Request, found: list[StoredInstance]) -> list[int]:
    """Each blob's size, checked before the first byte goes out: a missing blob is a 500 with
    its name rather than a response cut off in the middle."""
    store = request.app.state.archive.store
    sizes = []
    for inst in found:
        try:
            sizes.append(os.stat(store.path(inst.blob_key)).st_size)
        except OSError as exc:
            raise WebError(500, f"the stored file of instance {inst.sop_instance_uid} cannot be read "
                                f"({exc.strerror}); `pacsd verify` reports such instances") from exc
    return sizes


async def retrieve(request: Request) -> Response:
    p = request.path_params
    archive = request.app.state.archive
    found = await stored_instances(archive.engine, p["study"], p.get("series"), p.get("instance"))
    single = "instance" in p
    kind = negotiate(request, {inst.transfer_syntax_uid for inst in found}, single)
    if kind == _BULK:
        return await pixel_data_response(request, found[0])

    etag = found[0].etag if single else caching.combined_etag("dicom", (i.etag for i in found))
    last_modified = max(inst.last_modified for inst in found)
    headers = {**caching.validators(etag, last_modified), "Vary": "Accept"}
    if caching.not_modified(request, etag, last_modified):
        return caching.not_modified_response(etag, last_modified, {"Vary": "Accept"})
    sizes = await asyncio.get_running_loop().run_in_executor(archive.executor, _sizes, request, found)
    paths = [archive.store.path(inst.blob_key) for inst in found]

    if kind == _SINGLE:
        headers["Content-Length"] = str(sizes[0])
        return StreamingResponse(in_thread(archive.executor, file_chunks(paths[0], 0, sizes[0])),
                                 headers=headers,
                                 media_type=f"{DICOM}; transfer-syntax={found[0].transfer_syntax_uid}")

    # Derived from the ETag, so that the same content is the same bytes (a strong ETag), and
    # no blob can contain it: that would need a file containing a hash of itself.
    boundary = hashlib.sha256(b"boundary " + etag.encode()).hexdigest()[:40]
    heads = [multipart.part_head(boundary, DICOM, first=n == 0, transfer_syntax=inst.transfer_syntax_uid)
             for n, inst in enumerate(found)]
    tail = multipart.closing(boundary)
    headers["Content-Length"] = str(sum(map(len, heads)) + sum(sizes) + len(tail))

    body = multipart_files(zip(heads, paths, sizes), tail)
    return StreamingResponse(in_thread(archive.executor, body), headers=headers,
                             media_type=multipart.content_type(DICOM, boundary))


def routes(base: str) -> list:
    study = base + "/studies/{study}"
    series = study + "/series/{series}"
    instance = series + "/instances/{instance}"
    return [
        Route(study, retrieve, methods=["GET"]),
        Route(series, retrieve, methods=["GET"]),
        Route(instance, retrieve, methods=["GET"]),
        Route(study + "/metadata", retrieve_metadata, methods=["GET"]),
        Route(series + "/metadata", retrieve_metadata, methods=["GET"]),
        Route(instance + "/metadata", retrieve_metadata, methods=["GET"]),
        Route(instance + "/bulkdata/{path:path}", retrieve_bulkdata, methods=["GET"]),
    ]
