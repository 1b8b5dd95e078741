"""Composition root: builds the services from the settings and runs the listeners."""

from __future__ import annotations

import asyncio
import signal

import structlog

from pacsd import __version__
from pacsd.config import Settings
from pacsd.dimse.spool import sweep
from pacsd.net.acceptor import DicomServer
from pacsd.services import verification
from pacsd.services.registry import ServiceRegistry

log = structlog.get_logger("pacsd")


def build_registry(settings: Settings) -> ServiceRegistry:
    registry = ServiceRegistry()
    verification.register(registry, settings.dicom.transfer_syntaxes)
    return registry


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or `stop` is set), then shut down cleanly."""
    data_dir = settings.storage.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    removed = sweep(settings.storage.spool_dir)
    if removed:
        log.info("spool.swept", removed=removed)
    server = DicomServer(settings, build_registry(settings))
    await server.start()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, _on_signal, stop, sig)
        except (NotImplementedError, RuntimeError):
            pass
    log.info("pacsd.started", version=__version__, data_dir=str(data_dir.resolve()),
             loop=type(loop).__module__.split(".")[0])
    await stop.wait()
    await server.close(settings.dicom.shutdown_grace)
    log.info("pacsd.stopped")


def _on_signal(stop: asyncio.Event, sig: signal.Signals) -> None:
    log.info("pacsd.stopping", signal=sig.name)
    stop.set()


def run(coro) -> None:
    """Run on uvloop where it is installed, plain asyncio otherwise."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)
