"""WADO-RS Retrieve Bulkdata (PS3.18 10.4.1.1.3): one value of a stored instance, streamed
from its blob.

The value is named by the tag path that metadata.py puts in BulkDataURIs
(.../bulkdata/7FE00010, or 00540016/0/00181072-style for nested values, item indices 0-based).
Native values are sent as stored. Encapsulated pixel data is sent as its fragments after the
Basic Offset Table, concatenated: a single-fragment frame (JPEG, a video stream) arrives as
its bitstream, labelled with the stored transfer syntax. pacsd has no decoder yet, so it has
only the compressed form; PS3.18 8.7.3.3 allows that form when the client gives no transfer
syntax, and a client that names another one gets 406.
"""

from __future__ import annotations

import asyncio
import hashlib

from starlette.requests import Request
from starlette.responses import StreamingResponse

from pacsd.ingest.sources import EXPLICIT_VR_BIG_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN
from pacsd.web import caching, multipart
from pacsd.web.elements import (
    PIXEL_TAGS, Element, ElementError, find, parse_path, path_text, pixel_data, read_ranges,
)
from pacsd.web.errors import WebError
from pacsd.web.lookup import StoredInstance, stored_instances
from pacsd.web.media import MediaRange, accepted
from pacsd.web.streaming import in_thread

OCTET_STREAM = "application/octet-stream"

# PS3.18 Table 8.7.3-5 (media types of compressed pixel data), the syntaxes pacsd may hold.
COMPRESSED_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.100": "video/mpeg",
    "1.2.840.10008.1.2.4.101": "video/mpeg",
    "1.2.840.10008.1.2.4.102": "video/mp4",
    "1.2.840.10008.1.2.4.103": "video/mp4",
    "1.2.840.10008.1.2.4.104": "video/mp4",
    "1.2.840.10008.1.2.4.105": "video/mp4",
    "1.2.840.10008.1.2.4.106": "video/mp4",
    "1.2.840.10008.1.2.4.107": "video/H265",
    "1.2.840.10008.1.2.4.108": "video/H265",
}


def _labels(inst: StoredInstance, element: Element) -> tuple[list[str], str | None]:
    """(media types this value can be sent as, best first; its transfer syntax label)."""
    stored = inst.transfer_syntax_uid
    if element.fragments is not None:
        specific = COMPRESSED_MEDIA_TYPES.get(stored)
        return ([specific] if specific else []) + [OCTET_STREAM], stored
    if not (len(element.path) == 1 and element.tag in PIXEL_TAGS):
        return [OCTET_STREAM], None  # not pixel data: bytes without a transfer syntax
    if stored == EXPLICIT_VR_BIG_ENDIAN:
        return [OCTET_STREAM], stored
    # Little endian native values are the same bytes in implicit and explicit VR, and the
    # walk inflates deflated ones: Explicit VR Little Endian, the web's default (8.7.3.3).
    return [OCTET_STREAM], EXPLICIT_VR_LITTLE_ENDIAN


def negotiate(request: Request, offered: list[str], transfer_syntax: str | None) -> tuple[bool, str]:
    """(multipart?, media type) for the first acceptable range; 406 when none is."""
    refused = []
    for media in accepted(request):
        if media.type in ("*/*", "multipart/*"):
            return True, offered[0]
        if media.type == "multipart/related":
            wanted = MediaRange((media.param("type") or OCTET_STREAM).lower())
            parts = True
        else:
            wanted, parts = media, False
        match = next((m for m in offered if wanted.covers(m)), None)
        if match is None:
            continue
        syntaxes = media.params_named("transfer-syntax")
        if syntaxes and "*" not in syntaxes and transfer_syntax not in syntaxes:
            refused += syntaxes
            continue
        return parts, match
    if refused:
        raise WebError(406, f"the value is stored in transfer syntax {transfer_syntax}; pacsd does not "
                            f"transcode and cannot send it as {', '.join(refused)}")
    raise WebError(406, f"this bulk data is available as multipart/related; type=\"{offered[0]}\" "
                        f"or {offered[0]}, not as {', '.join(str(m) for m in accepted(request))}")


async def bulk_response(request: Request, inst: StoredInstance, element: Element) -> StreamingResponse:
    archive = request.app.state.archive
    offered, ts = _labels(inst, element)
    parts, media_type = negotiate(request, offered, ts)
    ranges = element.ranges()
    length = sum(n for _, n in ranges)
    etag = caching.combined_etag(f"bulk {path_text(element.path)} {media_type} {parts}", [inst.etag])
    headers = {**caching.validators(etag, inst.last_modified), "Vary": "Accept"}
    if caching.not_modified(request, etag, inst.last_modified):
        return caching.not_modified_response(etag, inst.last_modified, {"Vary": "Accept"})
    path = archive.store.path(inst.blob_key)
    value = read_ranges(path, inst.dataset_offset, inst.transfer_syntax_uid, ranges)
    if not parts:
        content_type = media_type + (f"; transfer-syntax={ts}" if ts else "")
        headers["Content-Length"] = str(length)
        return StreamingResponse(in_thread(archive.executor, value), headers=headers,
                                 media_type=content_type)
    boundary = hashlib.sha256(etag.encode()).hexdigest()[:32]
    head = multipart.part_head(boundary, media_type, first=True, transfer_syntax=ts)
    tail = multipart.closing(boundary)
    headers["Content-Length"] = str(len(head) + length + len(tail))

    def body():
        yield head
        yield from value
        yield tail

    return StreamingResponse(in_thread(archive.executor, body()), headers=headers,
                             media_type=multipart.content_type(media_type, boundary))


async def _in_pool(request: Request, fn, *args):
    try:
        return await asyncio.get_running_loop().run_in_executor(request.app.state.archive.executor, fn, *args)
    except (ElementError, OSError) as exc:
        raise WebError(500, f"cannot read the stored instance: {exc}") from exc


async def retrieve_bulkdata(request: Request) -> StreamingResponse:
    p = request.path_params
    archive = request.app.state.archive
    (inst,) = await stored_instances(archive.engine, p["study"], p["series"], p["instance"])
    wanted = parse_path(p["path"])
    if wanted is None:
        raise WebError(400, f"{p['path']!r} is not a bulk data path: 8-hex tags and item numbers "
                            f"separated by '/', e.g. 7FE00010 or 00540016/0/00181072")
    element = await _in_pool(request, find, archive.store.path(inst.blob_key), inst.dataset_offset,
                             inst.transfer_syntax_uid, wanted)
    if element is None:
        raise WebError(404, f"instance {inst.sop_instance_uid} has no value at {path_text(wanted)}")
    return await bulk_response(request, inst, element)


async def pixel_data_response(request: Request, inst: StoredInstance) -> StreamingResponse:
    """An instance asked for as application/octet-stream: its pixel data's bulk data
    (PS3.18 10.4.4: equivalent to requesting that Bulkdata resource)."""
    archive = request.app.state.archive
    element = await _in_pool(request, pixel_data, archive.store.path(inst.blob_key), inst.dataset_offset,
                             inst.transfer_syntax_uid)
    if element is None:
        raise WebError(406, f"instance {inst.sop_instance_uid} has no pixel data to send as bulk data")
    return await bulk_response(request, inst, element)

