"""The ASGI application and the uvicorn server that runs it inside the daemon's event loop.

uvicorn.Server.serve() would install its own SIGINT/SIGTERM handlers and exit the process
when the port is taken; the daemon owns both, so it binds the socket itself and drives the
server's startup, tick loop and shutdown directly.
"""

from __future__ import annotations

import asyncio
import socket
import time

import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from pacsd.config import Settings
from pacsd.web import qido, rendered, stow, wado, wado_uri
from pacsd.web.errors import HANDLERS

log = structlog.get_logger("pacsd.web")

# Headers a browser viewer must be able to read from a cross-origin response.
_EXPOSED = ["ETag", "Last-Modified", "Warning", "Content-Location", "Content-Length", "Content-Type"]


class _AccessLog:
    """One structured log line per request (debug), and `Cross-Origin-Resource-Policy` so that
    viewers may embed rendered images and thumbnails from another origin."""

    def __init__(self, app, cross_origin: bool) -> None:
        self.app = app
        self.cross_origin = cross_origin

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def send_wrapper(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if self.cross_origin:
                    message.setdefault("headers", [])
                    message["headers"] = list(message["headers"]) + [
                        (b"cross-origin-resource-policy", b"cross-origin")]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            log.debug("http.request", method=scope["method"], path=scope["path"],
                      query=scope.get("query_string", b"").decode("latin-1"), status=status,
                      ms=round((time.perf_counter() - started) * 1000, 2))


async def _root(request: Request) -> Response:
    return Response(status_code=204)


def build_app(archive, settings: Settings) -> Starlette:
    http = settings.http
    base = http.base_path
    routes = [
        *qido.routes(base),
        *wado.routes(base),
        *rendered.routes(base),
        *stow.routes(base),
        *wado_uri.routes(),
    ]
    middleware = [Middleware(_AccessLog, cross_origin=bool(http.cors_origins))]
    if http.cors_origins:
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=http.cors_origins, allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Accept", "Content-Type", "If-None-Match",
                           "If-Modified-Since", "Range"],
            expose_headers=_EXPOSED, max_age=600))
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=HANDLERS)
    app.state.archive = archive
    app.state.settings = settings
    return app


class WebServer:
    """uvicorn on [http] bind:port, started and stopped with the daemon."""

    def __init__(self, app: Starlette, settings: Settings) -> None:
        http = settings.http
        self.bind, self.port = http.bind, http.port
        self.config = uvicorn.Config(
            app, host=http.bind, port=http.port, lifespan="off", log_config=None, access_log=False,
            server_header=False, proxy_headers=False, ws="none",
            timeout_graceful_shutdown=settings.dicom.shutdown_grace)
        self.server = uvicorn.Server(self.config)
        self._sock: socket.socket | None = None
        self._ticker: asyncio.Task | None = None

    async def start(self) -> None:
        """Listen; OSError (port taken, address not local) propagates to the caller."""
        family = socket.AF_INET6 if ":" in self.bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.bind, self.port))
            sock.listen(self.config.backlog)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"HTTP listener on {self.bind}:{self.port}: {exc.strerror or exc}") from None
        self._sock = sock
        self.config.load()
        self.server.lifespan = self.config.lifespan_class(self.config)
        await self.server.startup(sockets=[sock])
        self._ticker = asyncio.create_task(self.server.main_loop(), name="http-ticker")
        log.info("http.listening", bind=self.bind, port=sock.getsockname()[1],
                 base_path=self.config.app.state.settings.http.base_path or "/")

    async def close(self) -> None:
        if self._ticker is None:
            return
        self.server.should_exit = True
        await self._ticker
        await self.server.shutdown(sockets=[self._sock] if self._sock else None)
        self._ticker = None
