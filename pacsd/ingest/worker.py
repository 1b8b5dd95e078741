"""An ingest process: runs `prepare` (parse, validate, index rows, write the blob) for the
daemon, which sends it jobs over a socket (see ingest/processes.py).

Started as ``python -m pacsd.ingest.worker FD BLOB_ROOT LOG_LEVEL LOG_FORMAT``, where FD is
its end of a connected Unix socket. Each message either way is a 4-byte little-endian length
and a pickle; a job is ``(job_id, Incoming, key)``, a reply ``(job_id, kind, payload,
created_dirs)``, the first one READY once the imports are done. It exits when the daemon
closes its end; SIGINT and SIGTERM are the daemon's to handle (a Ctrl-C or a systemd stop
reaches every process of the group, and the daemon still needs this one while it finishes
what it has in hand).
"""

from __future__ import annotations

import pickle
import signal
import socket
import struct
import sys
from pathlib import Path

import structlog

LENGTH = struct.Struct("<I")

# Reply kinds.
READY = "ready"        # sent once, after the imports: the process takes jobs from now on
OK = "ok"
REJECTED = "rejected"  # payload (status, comment)
OS_ERROR = "oserror"   # payload (errno, message)
FAILED = "failed"      # payload: a description of an unexpected exception

log = structlog.get_logger("pacsd.ingest")


def frame(message: object) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return LENGTH.pack(len(payload)) + payload


def serve(sock: socket.socket, blob_root: Path) -> None:
    # Imported here: the parent imports this module for its constants only.
    from pacsd.ingest.pipeline import Rejected, prepare
    from pacsd.store.filetree import FileTreeBlobStore
    from pacsd.store.syncer import BlobSyncer

    store = FileTreeBlobStore(blob_root)
    # The blob's fsyncs run here, beside the parse, and end before the reply: the daemon's
    # index writer then commits the record without waiting for them, and the daemon's
    # event loop never has to start them.
    syncer = BlobSyncer(store)
    sock.sendall(frame((0, READY, None, [])))
    incoming_file = sock.makefile("rb")
    try:
        while True:
            head = incoming_file.read(LENGTH.size)
            if len(head) < LENGTH.size:
                return  # the daemon closed its end
            body = incoming_file.read(LENGTH.unpack(head)[0])
            job_id, incoming, key = pickle.loads(body)
            try:
                record = prepare(incoming, store, key, start_sync=syncer.start)
                record.rows.serialise_parts()
                try:
                    record.synced.result()
                except BaseException:
                    store.delete(key)  # not durable: no success for it, no blob left behind
                    raise
                record.synced = None  # done; a Future does not travel
                kind, payload = OK, record
            except Rejected as exc:
                kind, payload = REJECTED, (exc.status, exc.comment)
            except OSError as exc:
                kind, payload = OS_ERROR, (exc.errno, exc.strerror or str(exc))
            except Exception as exc:
                log.exception("ingest.process_failed", sop_instance_uid=incoming.sop_instance_uid)
                kind, payload = FAILED, f"{type(exc).__name__}: {exc}"
            sock.sendall(frame((job_id, kind, payload, store.hand_over())))
    finally:
        incoming_file.close()
        syncer.close()


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    fd, blob_root, level, fmt = int(argv[0]), Path(argv[1]), argv[2], argv[3]
    from pacsd import logs

    logs.configure(level, fmt)
    with socket.socket(fileno=fd) as sock:
        try:
            serve(sock, blob_root)
        except (ConnectionError, EOFError):
            pass  # the daemon went away mid-message: nothing left to answer
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
