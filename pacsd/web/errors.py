"""Errors as JSON bodies that say what was wrong, with the HTTP status PS3.18 gives."""

from __future__ import annotations

from http import HTTPStatus

import structlog
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

log = structlog.get_logger("pacsd.web")


class WebError(Exception):
    """Raised by a handler: becomes a response with `status` and a JSON body."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def error_body(status: int, message: str) -> dict:
    return {"status": status, "error": HTTPStatus(status).phrase, "message": message}


def _respond(request: Request, status: int, message: str, headers: dict | None = None) -> JSONResponse:
    log.info("http.rejected", method=request.method, path=request.url.path, status=status, reason=message)
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


async def on_web_error(request: Request, exc: WebError) -> JSONResponse:
    return _respond(request, exc.status, exc.message, exc.headers)


async def on_http_exception(request: Request, exc: HTTPException) -> JSONResponse:
    # Starlette's own: unknown path (404), method not allowed (405).
    message = exc.detail if exc.detail and exc.detail != HTTPStatus(exc.status_code).phrase else {
        404: f"no resource at {request.url.path}",
        405: f"{request.method} is not allowed on {request.url.path}",
    }.get(exc.status_code, HTTPStatus(exc.status_code).phrase)
    return _respond(request, exc.status_code, message, dict(exc.headers or {}))


async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # A bug, not the client's fault: logged with its traceback, the daemon keeps running.
    log.exception("http.failed", method=request.method, path=request.url.path)
    return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}"), status_code=500)


HANDLERS = {WebError: on_web_error, HTTPException: on_http_exception, Exception: on_unexpected}
