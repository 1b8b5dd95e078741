"""WADO-RS pixel resources: frames as stored (PS3.18 10.4.1.1.4 Retrieve Frames) and images
for people, rendered and thumbnail (10.4.1.1.3, 8.3.5, thumbnails from Supplement 203).

Frames are cut from the blob (frames.py) and streamed a frame at a time, read in the
archive's thread pool; nothing is transcoded: compressed frames go out in their stored
transfer syntax when the client accepts it (`transfer-syntax=*`, the stored UID, or a media
type whose default syntax is the stored one), otherwise 406.

A rendered instance is its first frame (several frames: .../frames/{list}/rendered).
Rendered study and series resources, and every thumbnail, are ONE image: that of the
representative instance (the middle image of the series; for a study, of its first series
that has images), at its Representative Frame Number (0028,6010), else frame 1. Viewers
load these into an <img> element (OHIF's thumbnail modes, `thumbnailDirect`), which needs
a single image; a multipart body of every instance of a study would be useless to them,
and PS3.18 lets the origin server pick what it renders for a study or series.

OHIF asks for thumbnails and rendered resources through its bulk data call, whose Accept is
`multipart/related; type="application/octet-stream"`; pacsd answers that with image/jpeg
rather than 406 (a deliberate leniency: OHIF accepts a single-part answer).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from pacsd.ingest.sources import EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN
from pacsd.web import caching, multipart, streaming
from pacsd.web.errors import WebError
from pacsd.web.frames import FrameError, FrameMap, iter_frame, locate, read_frame
from pacsd.web.lookup import StoredInstance, stored_instances
from pacsd.web.media import MediaRange, accepted, parse_media_type
from pacsd.web.render import (DEFAULT_QUALITY, MAX_VIEWPORT, RENDERED_TYPES, THUMBNAIL, Presentation,
                              RenderError, RenderParams, Viewport, Window, decode, presentation, render)

__all__ = ["routes", "Pixels", "instance_pixels", "render_frame", "not_modified", "validators",
           "representation"]


# -- stored pixel data ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Pixels:
    path: Path
    frame_map: FrameMap | None  # None: the instance has no pixel data
    presentation: Presentation | None
    representative_frame: int  # 1-based


_CACHE_SIZE = 256  # frame maps of recently used instances (OHIF asks one frame per request)


async def _in_thread(request: Request, fn, *args):
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(request.app.state.archive.executor, fn, *args)


def _load_pixels(path: Path, inst: StoredInstance) -> Pixels:
    ds, frame_map = locate(path, inst.dataset_offset, inst.transfer_syntax_uid)
    if frame_map is None:
        return Pixels(path, None, None, 1)
    try:
        representative = int(ds.get("RepresentativeFrameNumber") or 1)
    except (TypeError, ValueError):
        representative = 1
    if not 1 <= representative <= frame_map.number_of_frames:
        representative = 1
    return Pixels(path, frame_map, presentation(ds, frame_map.number_of_frames), representative)


async def instance_pixels(request: Request, inst: StoredInstance) -> Pixels:
    """The instance's frame map and presentation values, from a small cache or its blob."""
    state = request.app.state
    cache: OrderedDict | None = getattr(state, "pixels_cache", None)
    if cache is None:
        cache = state.pixels_cache = OrderedDict()
    key = (inst.blob_key, inst.sha256)
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    path = state.archive.store.path(inst.blob_key)
    try:
        pixels = await _in_thread(request, _load_pixels, path, inst)
    except FrameError as exc:
        raise WebError(exc.status, f"instance {inst.sop_instance_uid}: {exc.message}") from None
    except FileNotFoundError:
        raise WebError(500, f"the stored file of instance {inst.sop_instance_uid} is missing "
                            f"(`pacsd verify` reports such instances)") from None
    cache[key] = pixels
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return pixels


def _render_work(pixels: Pixels, index: int, params: RenderParams) -> bytes:
    frame = read_frame(pixels.path, pixels.frame_map, index)
    arr = decode(frame, pixels.frame_map)
    return render(arr, pixels.presentation, index, pixels.frame_map.pixel.bits_stored, params)


async def render_frame(request: Request, inst: StoredInstance, pixels: Pixels, number: int,
                       params: RenderParams) -> bytes:
    """Frame `number` (1-based, already checked) rendered in a worker thread."""
    try:
        return await _in_thread(request, _render_work, pixels, number - 1, params)
    except (RenderError, FrameError) as exc:
        raise WebError(exc.status, f"instance {inst.sop_instance_uid}: {exc.message}") from None


def _needs_pixels(inst: StoredInstance, pixels: Pixels, what: str) -> FrameMap:
    if pixels.frame_map is None:
        raise WebError(404, f"instance {inst.sop_instance_uid} (SOP class {inst.sop_class_uid}) has "
                            f"no pixel data, so it has no {what}")
    return pixels.frame_map


# -- caching validators -----------------------------------------------------------------------

def validators(inst: StoredInstance, kind: str | None = None) -> tuple[str, dict[str, str]]:
    """The ETag and headers of a representation of `inst`: the stored one (frames, the Part 10
    file), or a rendered `kind` (media type and parameters) derived from it."""
    etag = inst.etag if kind is None else caching.combined_etag(kind, [inst.etag], weak=True)
    return etag, caching.validators(etag, inst.last_modified)


def not_modified(request: Request, etag: str, inst: StoredInstance, headers: dict[str, str]) -> Response | None:
    """304 with the validators when the client's copy is current."""
    if caching.not_modified(request, etag, inst.last_modified):
        return Response(status_code=304, headers=headers)
    return None


# -- frames -----------------------------------------------------------------------------------

# Media types of compressed frames (PS3.18 Table 8.7.3-5), and the transfer syntax each type
# means when the request names no transfer-syntax.
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx", "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.110": "image/jxl", "1.2.840.10008.1.2.4.111": "image/jxl",
    "1.2.840.10008.1.2.4.112": "image/jxl",
    "1.2.840.10008.1.2.4.201": "image/jphc", "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
}
_DEFAULT_SYNTAX = {
    "image/jpeg": "1.2.840.10008.1.2.4.50", "image/jls": "1.2.840.10008.1.2.4.80",
    "image/jp2": "1.2.840.10008.1.2.4.90", "image/jpx": "1.2.840.10008.1.2.4.92",
    "image/dicom-rle": "1.2.840.10008.1.2.5", "image/jxl": "1.2.840.10008.1.2.4.110",
    "image/jphc": "1.2.840.10008.1.2.4.201",
}
_ALIASES = {"image/x-dicom-rle": "image/dicom-rle", "image/x-jls": "image/jls"}
_FRAME_LIST = re.compile(r"[0-9]+(,[0-9]+)*")
MAX_FRAMES_PER_REQUEST = 10000


def parse_frame_list(text: str) -> list[int]:
    text = text.replace("%2C", ",").replace("%2c", ",").strip()
    if not _FRAME_LIST.fullmatch(text):
        raise WebError(400, f"frame list {text!r} is not a comma-separated list of frame numbers")
    numbers = [int(n) for n in text.split(",")]
    if any(n < 1 for n in numbers):
        raise WebError(400, f"frame numbers start at 1; {text!r} has 0")
    if len(numbers) > MAX_FRAMES_PER_REQUEST:
        raise WebError(400, f"at most {MAX_FRAMES_PER_REQUEST} frames per request")
    return numbers


def _check_range(inst: StoredInstance, frame_map: FrameMap, numbers: list[int]) -> None:
    bad = [n for n in numbers if n > frame_map.number_of_frames]
    if bad:
        raise WebError(404, f"frame {bad[0]} does not exist: instance {inst.sop_instance_uid} has "
                            f"{frame_map.number_of_frames} frame{'s' if frame_map.number_of_frames != 1 else ''}")


def _frame_media(ranges: list[MediaRange], frame_map: FrameMap, count: int) -> tuple[str, str, bool]:
    """(part media type, transfer syntax to label it with, multipart?) or 406."""
    stored = frame_map.transfer_syntax
    native = not frame_map.encapsulated
    media = "application/octet-stream" if native else FRAME_MEDIA_TYPES.get(stored)
    if media is None:
        raise WebError(406, f"frames in transfer syntax {stored} have no DICOMweb media type pacsd knows")
    label = EXPLICIT_VR_LITTLE_ENDIAN if native else stored
    reasons = []
    for r in ranges:
        if r.type == "multipart/related":
            part = parse_media_type(r.param("type") or "*/*")
            is_multipart = True
        else:
            part, is_multipart = r, "*" in r.type or count > 1
            if count > 1 and "*" not in r.type:
                reasons.append(f"{r.type} is a single-part type and {count} frames were asked for")
                continue
        part_type = _ALIASES.get(part.type, part.type)
        syntaxes = r.params_named("transfer-syntax") + part.params_named("transfer-syntax")
        # OHIF asks `type=application/octet-stream; transfer-syntax=*` for every frame and
        # expects compressed frames as stored, labelled in the part header (PS3.18 8.7.3.3).
        as_stored = part_type == "application/octet-stream" and ("*" in syntaxes or stored in syntaxes)
        if not MediaRange(part_type).covers(media) and not as_stored:
            reasons.append(f"{part_type} does not cover the stored frames' type {media}")
            continue
        if syntaxes:
            if not ("*" in syntaxes or stored in syntaxes or (native and (
                    EXPLICIT_VR_LITTLE_ENDIAN in syntaxes or IMPLICIT_VR_LITTLE_ENDIAN in syntaxes))):
                reasons.append(f"transfer syntax {', '.join(syntaxes)} was asked for")
                continue
        elif not native and part_type == media and _DEFAULT_SYNTAX.get(media) != stored:
            reasons.append(f"{media} without transfer-syntax means {_DEFAULT_SYNTAX.get(media)}")
            continue
        return media, label, is_multipart
    stored_as = "uncompressed (application/octet-stream)" if native else f"{media} in transfer syntax {stored}"
    hint = "" if native else (" pacsd does not decompress or transcode frames yet; accept "
                              f"multipart/related; type=\"{media}\"; transfer-syntax=* (or {stored}) "
                              "to receive them as stored.")
    raise WebError(406, f"the frames are stored {stored_as}; none of the accepted media types fits "
                        f"({'; '.join(reasons) or 'nothing accepted'}).{hint}")


async def _instance(request: Request) -> StoredInstance:
    p = request.path_params
    insts = await stored_instances(request.app.state.archive.engine, p["study"], p["series"], p["instance"])
    return insts[0]


async def retrieve_frames(request: Request) -> Response:
    numbers = parse_frame_list(request.path_params["frames"])
    inst = await _instance(request)
    pixels = await instance_pixels(request, inst)
    frame_map = _needs_pixels(inst, pixels, "frames")
    _check_range(inst, frame_map, numbers)
    etag, headers = validators(inst)
    cached = not_modified(request, etag, inst, headers)
    if cached:
        return cached
    part_type, label, is_multipart = _frame_media(accepted(request), frame_map, len(numbers))
    boundary = multipart.new_boundary() if is_multipart else None
    if boundary:
        content_type = multipart.content_type(part_type, boundary)
        heads = [multipart.part_head(boundary, part_type, first=i == 0, transfer_syntax=label)
                 for i in range(len(numbers))]
        length = sum(map(len, heads)) + len(multipart.closing(boundary))
    else:
        content_type, heads, length = f"{part_type}; transfer-syntax={label}", [], 0
    length += sum(frame_map.frame_length(n - 1) for n in numbers)
    headers["Content-Length"] = str(length)
    headers["Vary"] = "Accept"

    def body():  # blocking: driven one step at a time in the thread pool
        with open(pixels.path, "rb") as f:
            for i, number in enumerate(numbers):
                if heads:
                    yield heads[i]
                yield from iter_frame(f, frame_map, number - 1)
            if boundary:
                yield multipart.closing(boundary)

    return StreamingResponse(streaming.in_thread(request.app.state.archive.executor, body()),
                             media_type=content_type, headers=headers)


# -- rendered and thumbnail -------------------------------------------------------------------

def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise WebError(400, f"{what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise WebError(400, f"{what} {text!r} is not a finite number")
    return value


def parse_window(text: str) -> Window:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (2, 3):
        raise WebError(400, f"window {text!r} must be center,width[,function]")
    center, width = _number(parts[0], "window center"), _number(parts[1], "window width")
    function = (parts[2] if len(parts) == 3 and parts[2] else "linear").upper().replace("-", "_")
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        raise WebError(400, f"window function {parts[2]!r} is not linear, linear-exact or sigmoid")
    if width <= 0 or (function == "LINEAR" and width < 1):
        raise WebError(400, f"window width {parts[1]} is too small (at least 1 for linear, above 0 otherwise)")
    return Window(center, width, function)


def check_viewport_size(width: float, height: float, what: str = "viewport") -> tuple[int, int]:
    if width != int(width) or height != int(height) or not (1 <= width <= MAX_VIEWPORT and 1 <= height <= MAX_VIEWPORT):
        raise WebError(400, f"{what} {width:g} x {height:g} must be whole numbers of pixels from 1 to {MAX_VIEWPORT}")
    return int(width), int(height)


def parse_viewport(text: str, enlarge: bool = True) -> Viewport:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (2, 6):
        raise WebError(400, f"viewport {text!r} must be vw,vh or vw,vh,sx,sy,sw,sh")
    width, height = check_viewport_size(_number(parts[0], "viewport width"),
                                        _number(parts[1], "viewport height"))
    region = None
    if len(parts) == 6 and any(parts[2:]):
        names = ("sx", "sy", "sw", "sh")
        values = [_number(p, f"viewport {n}") if p else None for p, n in zip(parts[2:], names)]
        if values[2] == 0 or values[3] == 0:
            raise WebError(400, f"viewport {text!r}: the source region is empty")
        region = tuple(values)
    return _viewport(width, height, region, enlarge)


def _viewport(width: int, height: int, region, enlarge: bool) -> Viewport:
    if region is None:
        return Viewport(width, height, None, False, enlarge)
    sx, sy, sw, sh = region
    # Missing sx/sy start at the image's corner; missing sw/sh run to its edge (huge, clipped).
    return Viewport(width, height, (sx or 0.0, sy or 0.0, sw if sw is not None else 1e9,
                                    sh if sh is not None else 1e9), False, enlarge)


def parse_quality(text: str) -> int:
    try:
        quality = int(text)
    except ValueError:
        raise WebError(400, f"quality {text!r} is not a whole number") from None
    if not 1 <= quality <= 100:
        raise WebError(400, f"quality {quality} is outside 1..100")
    return quality


def _rendered_media(ranges: list[MediaRange], several: bool) -> tuple[str, bool]:
    """(image media type, multipart?) for a rendered resource, or 406."""
    for r in ranges:
        if r.type == "multipart/related":
            part = parse_media_type(r.param("type") or "*/*")
            if part.type == "application/octet-stream" and not several:
                return "image/jpeg", False  # OHIF's bulk data Accept (module docstring)
            for media in RENDERED_TYPES:
                if part.covers(media):
                    return media, True
        elif several and "*" not in r.type:
            continue  # single-part types do not apply to several frames (PS3.18 10.4.4)
        else:
            for media in RENDERED_TYPES:
                if r.covers(media):
                    return media, several
    accepted_types = ", ".join(str(r) for r in ranges)
    what = ("several rendered frames come as multipart/related; type=\"image/jpeg\" or \"image/png\""
            if several else "rendered images are image/jpeg or image/png")
    raise WebError(406, f"pacsd cannot render to any of {accepted_types}: {what}")


def rendered_params(request: Request, thumbnail: bool = False) -> RenderParams:
    query = request.query_params
    window = parse_window(query["window"]) if query.get("window") else None
    viewport = parse_viewport(query["viewport"]) if query.get("viewport") else None
    if viewport is None and thumbnail:
        viewport = Viewport(*THUMBNAIL, enlarge=False)
    quality = parse_quality(query["quality"]) if query.get("quality") else DEFAULT_QUALITY
    return RenderParams(window=window, viewport=viewport, quality=quality)


def representation(kind: str, media_type: str, items: list[tuple[str, str]]) -> str:
    """The kind of a rendered representation (for its ETag): it depends on the media type
    and on the rendering parameters given."""
    query = "&".join(f"{k}={v}" for k, v in sorted(items))
    digest = hashlib.sha256(query.encode()).hexdigest()[:16] if query else "0"
    return f"{kind}-{media_type.rsplit('/', 1)[-1]}-{digest}"


def _suffix(media_type: str, request: Request, thumbnail: bool) -> str:
    items = [(k, v) for k, v in request.query_params.multi_items() if k in ("window", "viewport", "quality")]
    return representation("thumbnail" if thumbnail else "rendered", media_type, items)


async def _respond_images(request: Request, inst: StoredInstance, pixels: Pixels, numbers: list[int],
                          thumbnail: bool) -> Response:
    params = rendered_params(request, thumbnail)
    media_type, is_multipart = _rendered_media(accepted(request), len(numbers) > 1)
    etag, headers = validators(inst, _suffix(media_type, request, thumbnail))
    headers["Vary"] = "Accept"
    cached = not_modified(request, etag, inst, headers)
    if cached:
        return cached
    params = RenderParams(media_type=media_type, window=params.window, viewport=params.viewport,
                          quality=params.quality)
    if not is_multipart:
        image = await render_frame(request, inst, pixels, numbers[0], params)
        return Response(image, media_type=media_type, headers=headers)
    # Rendered frames are small next to the stored ones; each is made before any is sent so
    # that a frame that cannot be rendered is still a clean error status.
    boundary = multipart.new_boundary()
    parts = []
    for i, number in enumerate(numbers):
        parts.append(multipart.part_head(boundary, media_type, first=i == 0))
        parts.append(await render_frame(request, inst, pixels, number, params))
    parts.append(multipart.closing(boundary))
    return Response(b"".join(parts), media_type=multipart.content_type(media_type, boundary), headers=headers)


async def rendered_instance(request: Request, thumbnail: bool = False) -> Response:
    inst = await _instance(request)
    pixels = await instance_pixels(request, inst)
    _needs_rendering(inst, pixels)
    number = pixels.representative_frame if thumbnail else 1
    return await _respond_images(request, inst, pixels, [number], thumbnail)


async def rendered_frames(request: Request, thumbnail: bool = False) -> Response:
    numbers = parse_frame_list(request.path_params["frames"])
    inst = await _instance(request)
    pixels = await instance_pixels(request, inst)
    frame_map = _needs_rendering(inst, pixels)
    _check_range(inst, frame_map, numbers)
    if thumbnail and len(numbers) > 1:
        raise WebError(400, "a thumbnail is of one frame; the frame list has several")
    return await _respond_images(request, inst, pixels, numbers, thumbnail)


def _needs_rendering(inst: StoredInstance, pixels: Pixels) -> FrameMap:
    if pixels.frame_map is None:
        raise WebError(406, f"pacsd cannot render instance {inst.sop_instance_uid}: it has no pixel "
                            f"data (SOP class {inst.sop_class_uid})")
    return pixels.frame_map


# SOP classes that never hold pixel data: skipped when looking for a representative image.
_NON_IMAGE_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",   # structured reports, key object selection
    "1.2.840.10008.5.1.4.1.1.11.",   # presentation states
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated documents
    "1.2.840.10008.5.1.4.1.1.9.",    # waveforms
    "1.2.840.10008.5.1.4.1.1.66",    # raw data, spatial registration, fiducials
    "1.2.840.10008.5.1.4.1.1.481.",  # RT (dose has pixel data, but is rarely what one wants)
)
_MAX_CANDIDATES = 32


async def _representative(request: Request, insts: list[StoredInstance]) -> tuple[StoredInstance, Pixels]:
    """The middle image instance of the first series (in series order) that has images."""
    by_series: dict[str, list[StoredInstance]] = {}
    for inst in insts:
        by_series.setdefault(inst.series_instance_uid, []).append(inst)
    tried = 0
    for series_insts in by_series.values():
        images = [i for i in series_insts if not i.sop_class_uid.startswith(_NON_IMAGE_PREFIXES)]
        middle = (len(images) - 1) // 2
        # middle first, then outwards: the nearest image to the middle when some have no pixels
        order = sorted(range(len(images)), key=lambda k: (abs(k - middle), k))
        for k in order:
            if tried >= _MAX_CANDIDATES:
                break
            tried += 1
            try:
                pixels = await instance_pixels(request, images[k])
            except WebError:
                continue
            if pixels.frame_map is not None:
                return images[k], pixels
    level = f"series {insts[0].series_instance_uid}" if len(by_series) == 1 else f"study {insts[0].study_instance_uid}"
    raise WebError(406, f"pacsd cannot render {level}: none of the {tried} instances it looked at "
                        f"has pixel data it can render")


async def rendered_series(request: Request, thumbnail: bool = False) -> Response:
    p = request.path_params
    insts = await stored_instances(request.app.state.archive.engine, p["study"], p.get("series"))
    inst, pixels = await _representative(request, insts)
    return await _respond_images(request, inst, pixels, [pixels.representative_frame], thumbnail)


def _thumbnail(handler):
    async def endpoint(request: Request) -> Response:
        return await handler(request, thumbnail=True)
    return endpoint


def routes(base: str) -> list:
    study = f"{base}/studies/{{study}}"
    series = f"{study}/series/{{series}}"
    instance = f"{series}/instances/{{instance}}"
    return [
        Route(f"{instance}/frames/{{frames}}", retrieve_frames, methods=["GET"]),
        Route(f"{instance}/frames/{{frames}}/rendered", rendered_frames, methods=["GET"]),
        Route(f"{instance}/frames/{{frames}}/thumbnail", _thumbnail(rendered_frames), methods=["GET"]),
        Route(f"{instance}/rendered", rendered_instance, methods=["GET"]),
        Route(f"{instance}/thumbnail", _thumbnail(rendered_instance), methods=["GET"]),
        Route(f"{series}/rendered", rendered_series, methods=["GET"]),
        Route(f"{series}/thumbnail", _thumbnail(rendered_series), methods=["GET"]),
        Route(f"{study}/rendered", rendered_series, methods=["GET"]),
        Route(f"{study}/thumbnail", _thumbnail(rendered_series), methods=["GET"]),
    ]
