"""Composition root: builds the archive (index, blob store, ingest) and runs the listeners."""

from __future__ import annotations

import asyncio
import signal
from concurrent.futures import ThreadPoolExecutor

import structlog

from pacsd import __version__
from pacsd.config import Settings
from pacsd.dimse.spool import sweep
from pacsd.index.db import create_engine, ensure_schema
from pacsd.index.reader import close_reader
from pacsd.index.writer import IndexWriter
from pacsd.ingest.pipeline import Ingest
from pacsd.ingest.processes import IngestProcesses
from pacsd.net.acceptor import DicomServer
from pacsd.services import qr_find, qr_retrieve, storage, verification
from pacsd.services import ian
from pacsd.services import commitment
from pacsd.services.registry import ServiceRegistry
from pacsd.store.filetree import FileTreeBlobStore

log = structlog.get_logger("pacsd")


class Archive:
    """What serve, import and verify share: the index, the blob store and the pipeline."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        data_dir = settings.storage.data_dir
        self.engine = create_engine(settings.database.url)
        self.store = FileTreeBlobStore(data_dir / "blobs")
        self.executor = ThreadPoolExecutor(settings.storage.workers, thread_name_prefix="pacsd-io")
        self.writer = IndexWriter(self.engine, self.store, self.executor, settings.storage.duplicates)
        self.processes = None
        if settings.storage.ingest_process_count:
            self.processes = IngestProcesses(self.store, self.executor, settings.storage.ingest_process_count,
                                             settings.logging.level, settings.logging.format)
        self.ingest = Ingest(self.store, self.writer, self.executor, settings.storage.duplicates,
                             settings.storage.spool_dir, self.processes)

    async def open(self) -> None:
        self.settings.storage.data_dir.mkdir(parents=True, exist_ok=True)
        removed = sweep(self.settings.storage.spool_dir)
        if removed:
            log.info("spool.swept", removed=removed)
        schema = await ensure_schema(self.engine, self.settings.database.url)
        if schema == "created":
            log.info("index.created", url=_safe_url(self.settings.database.url))
        self.writer.start()

    async def close(self) -> None:
        if self.processes is not None:
            await self.processes.close()
        await self.writer.close()
        await asyncio.get_running_loop().run_in_executor(None, close_reader, self.engine)
        await self.engine.dispose()
        self.executor.shutdown(wait=True)


def build_registry(settings: Settings, archive: Archive | None = None) -> ServiceRegistry:
    registry = ServiceRegistry()
    verification.register(registry, settings.dicom.transfer_syntaxes)
    if archive is not None:
        scp = storage.StorageSCP(archive.ingest, settings.storage.spool_dir, settings.storage.data_dir,
                                 settings.storage.min_free_bytes)
        storage.register(registry, scp, settings.dicom.transfer_syntaxes, settings.storage.extra_sop_classes)
        qr_find.register(registry, archive, settings)
        qr_retrieve.register(registry, archive, settings)
        ian.register(registry, settings, archive.executor)
        commitment.register(registry, archive, settings)  # sets archive.commitment
    return registry


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or `stop` is set), then shut down cleanly."""
    # Handlers first: a signal that comes while the listeners start up (a supervisor's stop,
    # Ctrl-C) is then a clean shutdown once they are up, not a KeyboardInterrupt.
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, _on_signal, stop, sig)
        except (NotImplementedError, RuntimeError):
            pass
    archive = Archive(settings)
    # IAN: the writer records owed notifications in its transactions (before it starts).
    ian_sender = ian.attach(archive, settings)
    await archive.open()
    server = DicomServer(settings, build_registry(settings, archive))
    web = None
    try:
        await server.start()
        if settings.http.enabled:
            from pacsd.web.app import WebServer, build_app

            web = WebServer(build_app(archive, settings), settings)
            await web.start()
    except OSError:
        await server.close(0)
        await archive.close()
        raise
    if ian_sender is not None:
        ian_sender.start()
    await archive.commitment.start()  # storage commitment reports, retried across restarts
    log.info("pacsd.started", version=__version__,
             data_dir=str(settings.storage.data_dir.resolve()),
             index=_safe_url(settings.database.url),
             loop=type(loop).__module__.split(".")[0])
    await stop.wait()
    if web is not None:
        await web.close()
    await server.close(settings.dicom.shutdown_grace)
    if ian_sender is not None:
        await ian_sender.close()
    await archive.commitment.close()
    await archive.close()
    log.info("pacsd.stopped")


def _on_signal(stop: asyncio.Event, sig: signal.Signals) -> None:
    log.info("pacsd.stopping", signal=sig.name)
    stop.set()


def _safe_url(url: str) -> str:
    """The database URL without its password, for logs."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def run(coro) -> None:
    """Run on uvloop where it is installed, plain asyncio otherwise."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)
