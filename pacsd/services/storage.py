"""Storage Service Class as SCP (PS3.4 Annex B): C-STORE into the ingest pipeline.

The data set of a C-STORE-RQ is spooled straight behind its Part 10 header (built from the
command and the presentation context before the first fragment arrives), so the spool file
becomes the blob by a rename, without a copy.
"""

from __future__ import annotations

import time

import structlog
from pynetdicom.sop_class import _STORAGE_CLASSES

from pacsd import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from pacsd.dimse.assembler import Message
from pacsd.dimse.command import CommandField
from pacsd.dimse.spool import Spool
from pacsd.dimse.status import Status, describe
from pacsd.ingest.filemeta import build_file_meta
from pacsd.ingest.pipeline import IN_MEMORY_LIMIT, Incoming, Ingest
from pacsd.services.registry import ServiceRegistry
from pacsd.store.filetree import disk_free
from pacsd.uid import uid_problem

log = structlog.get_logger("pacsd.storage")

# Every compressed transfer syntax PS3.5 defines for images, stored as received.
COMPRESSED_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, First-Order Prediction (Process 14 SV1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Lossy (Near-Lossless)
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 (Lossless Only)
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.92",  # JPEG 2000 Part 2 Multi-component (Lossless Only)
    "1.2.840.10008.1.2.4.93",  # JPEG 2000 Part 2 Multi-component
    "1.2.840.10008.1.2.4.201",  # High-Throughput JPEG 2000 (Lossless Only)
    "1.2.840.10008.1.2.4.202",  # High-Throughput JPEG 2000 with RPCL (Lossless Only)
    "1.2.840.10008.1.2.4.203",  # High-Throughput JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
]
DEFLATED = "1.2.840.10008.1.2.1.99"

# How long a measurement of the free disk space stands. A statvfs before every data set was
# ~3% of the event loop's time with four associations sending; in 0.1 s an archive takes in
# a few tens of MB, far less than any sensible storage.min_free_bytes, and a disk that fills
# up anyway answers A700 by way of ENOSPC.
FREE_SPACE_INTERVAL = 0.1


def storage_sop_classes(extra: list[str] | None = None) -> list[str]:
    classes = sorted(set(_STORAGE_CLASSES.values()))
    for uid in extra or []:
        if uid not in classes:
            classes.append(uid)
    return classes


class StorageSCP:
    def __init__(self, ingest: Ingest, spool_dir, data_dir, min_free_bytes: int) -> None:
        self.ingest = ingest
        self.spool_dir = spool_dir
        self.data_dir = data_dir
        self.min_free_bytes = min_free_bytes
        self.received = 0
        self._free_at = -FREE_SPACE_INTERVAL
        self._free = 0

    def _disk_free(self) -> int:
        """Free bytes on the archive's disk, measured at most every FREE_SPACE_INTERVAL."""
        now = time.monotonic()
        if now - self._free_at >= FREE_SPACE_INTERVAL:
            self._free, self._free_at = disk_free(self.data_dir), now
        return self._free

    def spool_for(self, assoc, context_id: int, command: dict) -> Spool:
        """Where the data set of this C-STORE-RQ goes: behind its Part 10 header, in memory
        while small (the pipeline writes it out off the event loop), in a file when large."""
        if problem := _command_uid_problem(command):
            # A malformed UID goes neither into the file meta nor anywhere near a path: the
            # data set is received and dropped, and handle_c_store answers C000.
            spool = Spool(self.spool_dir)
            spool.refuse(Status.CANNOT_UNDERSTAND, problem)
            return spool
        # The calling AE goes into the file meta as Source AE Title; one that is not plain
        # ASCII (never valid) is left out rather than refused.
        calling = assoc.calling_ae
        source_ae = calling if calling.isascii() and len(calling) <= 16 and "\\" not in calling else ""
        meta = build_file_meta(command["AffectedSOPClassUID"], command["AffectedSOPInstanceUID"],
                               assoc.contexts[context_id].transfer_syntax, source_ae,
                               IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME)
        spool = Spool(self.spool_dir, prefix=meta, threshold=IN_MEMORY_LIMIT)
        if self.min_free_bytes and self._disk_free() < self.min_free_bytes:
            # Receive and drop: the sender gets A700 instead of filling the disk.
            spool.refuse(Status.OUT_OF_RESOURCES,
                         "out of resources: free disk space below storage.min_free_bytes")
        return spool

    async def handle_c_store(self, assoc, message: Message) -> None:
        started = time.perf_counter()
        command = message.command
        spool = message.dataset
        context = assoc.contexts[message.context_id]
        sop_instance = command.get("AffectedSOPInstanceUID")
        if spool is None or spool.error is not None:
            if spool is None:
                status, comment = Status.CANNOT_UNDERSTAND, "C-STORE-RQ without a data set"
            elif spool.refusal is not None:
                status, comment = spool.refusal
            else:
                status, comment = Status.OUT_OF_RESOURCES, f"out of resources: {spool.error.strerror or spool.error}"
            log.warning("storage.failed", peer=assoc.protocol.peer_str, calling_ae=assoc.calling_ae,
                        message_id=command.get("MessageID"), sop_instance_uid=sop_instance,
                        status=describe(status), error=comment)
            await assoc.respond(message, status, ErrorComment=comment[:64])
            return
        message.dataset = None  # the pipeline owns the spooled bytes from here
        outcome = await self.ingest.ingest(Incoming(
            path=spool.path,
            buffer=spool.take_buffer() if spool.in_memory else None,
            dataset_offset=spool.prefix_length,
            transfer_syntax=context.transfer_syntax,
            calling_ae=assoc.calling_ae,
            sop_class_uid=command.get("AffectedSOPClassUID"),
            sop_instance_uid=sop_instance,
            sha256=spool.sha256,
        ))
        self.received += 1
        extra = {"ErrorComment": outcome.comment[:64]} if outcome.comment else {}
        await assoc.respond(message, outcome.status, **extra)
        if outcome.status != Status.SUCCESS:
            log.warning("storage.failed", peer=assoc.protocol.peer_str, calling_ae=assoc.calling_ae,
                        message_id=command.get("MessageID"), sop_instance_uid=sop_instance,
                        status=describe(outcome.status), error=outcome.comment)
        else:
            log.debug("storage.stored", calling_ae=assoc.calling_ae, sop_instance_uid=sop_instance,
                      bytes=spool.size, duplicate=outcome.duplicate,
                      ms=round((time.perf_counter() - started) * 1000, 2))


def _command_uid_problem(command: dict) -> str | None:
    return (uid_problem("Affected SOP Class UID", command.get("AffectedSOPClassUID"))
            or uid_problem("Affected SOP Instance UID", command.get("AffectedSOPInstanceUID")))


def register(registry: ServiceRegistry, scp: StorageSCP, transfer_syntaxes: list[str],
             extra_sop_classes: list[str] | None = None) -> None:
    syntaxes = list(transfer_syntaxes)
    for ts in [DEFLATED, *COMPRESSED_TRANSFER_SYNTAXES]:
        if ts not in syntaxes:
            syntaxes.append(ts)
    for sop_class in storage_sop_classes(extra_sop_classes):
        registry.add(sop_class, syntaxes, CommandField.C_STORE_RQ, scp.handle_c_store)
        registry.spool_factories[(sop_class, CommandField.C_STORE_RQ)] = scp.spool_for
