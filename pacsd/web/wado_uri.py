"""WADO-URI (PS3.18 chapter 9): GET /wado?requestType=WADO&studyUID=..&seriesUID=..&objectUID=..

Served at /wado, outside the DICOMweb base path, as viewers configure it (`wadoUriRoot`).

- contentType=application/dicom: the stored Part 10 file, streamed from the blob, in its
  stored transfer syntax (`transferSyntax` absent, `*`, or the stored UID; pacsd does not
  transcode, so any other syntax is 406).
- contentType=image/jpeg or image/png: one frame rendered (render.py) with `frameNumber`,
  `rows`/`columns` (fit, keeping the aspect ratio), `region` (xmin,ymin,xmax,ymax as fractions
  of the image), `windowCenter`/`windowWidth`, `imageQuality`. `annotation` and `charset`
  are ignored; `anonymize=yes` is refused (pacsd does not de-identify).
- contentType absent: image/jpeg for a single-frame image or when frameNumber is given,
  else application/dicom (PS3.18 2013 7.1.2, 7.2.2; SR as text/html is not offered).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from pacsd.uid import is_valid_uid
from pacsd.web import streaming
from pacsd.web.errors import WebError
from pacsd.web.lookup import stored_instances
from pacsd.web.media import parse_accept
from pacsd.web.render import DEFAULT_QUALITY, MAX_VIEWPORT, RENDERED_TYPES, RenderParams, Viewport, Window
from pacsd.web.rendered import (check_viewport_size, instance_pixels, not_modified, parse_quality,
                                render_frame, representation, validators)

_DICOM = "application/dicom"


def _required(request: Request, name: str) -> str:
    value = request.query_params.get(name)
    if not value:
        raise WebError(400, f"WADO-URI request without {name}: requestType=WADO, studyUID, "
                            f"seriesUID and objectUID are required")
    return value.strip()


def _positive(request: Request, name: str) -> int | None:
    text = request.query_params.get(name)
    if text is None or text == "":
        return None
    try:
        value = int(text)
    except ValueError:
        raise WebError(400, f"{name} {text!r} is not a whole number") from None
    if value < 1:
        raise WebError(400, f"{name} {value} must be at least 1")
    return value


def _float(request: Request, name: str) -> float | None:
    text = request.query_params.get(name)
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        raise WebError(400, f"{name} {text!r} is not a number") from None


def _region(text: str) -> tuple[float, float, float, float]:
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise WebError(400, f"region {text!r} must be xmin,ymin,xmax,ymax") from None
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise WebError(400, f"region {text!r}: each value lies in 0.0..1.0 and each min below its max")
    return x0, y0, x1 - x0, y1 - y0


def _image_params(request: Request, media_type: str) -> RenderParams:
    query = request.query_params
    center, width = _float(request, "windowCenter"), _float(request, "windowWidth")
    window = None
    if (center is None) != (width is None):
        raise WebError(400, "windowCenter and windowWidth go together")
    if center is not None:
        if width < 1:
            raise WebError(400, f"windowWidth {width:g} must be at least 1")
        window = Window(center, width)
    rows, columns = _positive(request, "rows"), _positive(request, "columns")
    region = _region(query["region"]) if query.get("region") else None
    viewport = None
    if rows or columns:
        width_px, height_px = check_viewport_size(columns or MAX_VIEWPORT, rows or MAX_VIEWPORT, "rows/columns")
        viewport = Viewport(width_px, height_px, region, True)
    elif region:
        viewport = Viewport(MAX_VIEWPORT, MAX_VIEWPORT, region, True, enlarge=False)
    quality = parse_quality(query["imageQuality"]) if query.get("imageQuality") else DEFAULT_QUALITY
    return RenderParams(media_type=media_type, window=window, viewport=viewport, quality=quality)


async def _part10(request: Request, inst) -> Response:
    wanted = (request.query_params.get("transferSyntax") or "*").strip()
    if wanted != "*" and not is_valid_uid(wanted):
        raise WebError(400, f"transferSyntax {wanted!r} is not a UID")
    if wanted not in ("*", inst.transfer_syntax_uid):
        raise WebError(406, f"instance {inst.sop_instance_uid} is stored in transfer syntax "
                            f"{inst.transfer_syntax_uid}; pacsd does not transcode, so {wanted} cannot be "
                            f"sent (ask for transferSyntax=* or {inst.transfer_syntax_uid})")
    etag, headers = validators(inst)
    cached = not_modified(request, etag, inst, headers)
    if cached:
        return cached
    archive = request.app.state.archive
    path = archive.store.path(inst.blob_key)
    if not path.is_file():
        raise WebError(500, f"the stored file of instance {inst.sop_instance_uid} is missing "
                            f"(`pacsd verify` reports such instances)")
    headers["Content-Length"] = str(inst.size)
    chunks = streaming.file_chunks(path, 0, inst.size)
    return StreamingResponse(streaming.in_thread(archive.executor, chunks), media_type=_DICOM, headers=headers)


async def wado(request: Request) -> Response:
    query = request.query_params
    request_type = query.get("requestType")
    if request_type != "WADO":
        raise WebError(400, "WADO-URI requests need requestType=WADO" if request_type is None
                       else f"requestType {request_type!r} is not supported; it must be WADO")
    study, series, instance = (_required(request, n) for n in ("studyUID", "seriesUID", "objectUID"))
    if (query.get("anonymize") or "").strip().lower() == "yes":
        raise WebError(400, "anonymize=yes is not supported: pacsd does not de-identify objects")
    frame_number = _positive(request, "frameNumber")
    inst = (await stored_instances(request.app.state.archive.engine, study, series, instance))[0]

    content_type = query.get("contentType")
    ranges = parse_accept(content_type) if content_type else []
    pixels = None
    wants_image = not ranges or any(r.type != _DICOM for r in ranges)
    if wants_image:
        try:
            pixels = await instance_pixels(request, inst)
        except WebError:
            if not ranges:
                pixels = None  # the default falls back to the stored object
            else:
                raise
    has_image = pixels is not None and pixels.frame_map is not None
    single = has_image and (pixels.frame_map.number_of_frames == 1 or frame_number is not None)
    default = "image/jpeg" if single else _DICOM

    chosen = None
    for r in ranges or [None]:
        if r is None or r.type == "*/*":
            chosen = default
        elif r.type == _DICOM:
            chosen = _DICOM
        else:
            chosen = next((m for m in RENDERED_TYPES if r.covers(m)), None)
            if chosen and not has_image:
                raise WebError(406, f"pacsd cannot render instance {inst.sop_instance_uid} as {chosen}: "
                                    f"it has no pixel data (SOP class {inst.sop_class_uid}); ask for "
                                    f"contentType=application/dicom")
        if chosen:
            break
    if chosen is None:
        raise WebError(406, f"contentType {content_type!r} is not offered: pacsd serves "
                            f"application/dicom, image/jpeg and image/png")
    if chosen == _DICOM:
        return await _part10(request, inst)

    frames = pixels.frame_map.number_of_frames
    number = frame_number or 1
    if number > frames:
        raise WebError(400, f"frameNumber {number} is out of range: instance {inst.sop_instance_uid} "
                            f"has {frames} frame{'s' if frames != 1 else ''}")
    params = _image_params(request, chosen)
    etag, headers = validators(inst, representation("wado", chosen, [
        (k, v) for k, v in query.multi_items() if k not in ("requestType", "studyUID", "seriesUID", "objectUID")]))
    cached = not_modified(request, etag, inst, headers)
    if cached:
        return cached
    image = await render_frame(request, inst, pixels, number, params)
    return Response(image, media_type=chosen, headers=headers)


def routes() -> list:
    return [Route("/wado", wado, methods=["GET"])]
