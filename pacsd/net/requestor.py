"""pacsd as association requestor: connect, negotiate, hand back an Association.

Used by the CLI (echo now; store/find/move/get later) and by services that call out
(C-MOVE sub-operations, storage commitment reports, IAN).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

from pacsd.config import DicomSettings
from pacsd.dul.negotiation import ProposedContext, accepted_as_requestor, build_request
from pacsd.net.association import Association, AssociationError

UNCOMPRESSED = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]


@asynccontextmanager
async def associate(
    host: str,
    port: int,
    *,
    calling_ae: str,
    called_ae: str,
    contexts: list[ProposedContext],
    settings: DicomSettings | None = None,
    spool_dir: Path | None = None,
    connect_timeout: float = 10.0,
) -> AsyncIterator[Association]:
    """Open an association; release it when the block ends (abort it on error)."""
    settings = settings or DicomSettings()
    rq_pdu, proposed = build_request(calling_ae, called_ae, contexts, settings.max_pdu_length)
    assoc = Association(
        is_requestor=True,
        local_ae=calling_ae,
        max_pdu_length=settings.max_pdu_length,
        artim_timeout=settings.artim_timeout,
        network_timeout=settings.network_timeout,
        dimse_timeout=settings.dimse_timeout,
        spool_dir=spool_dir or Path("./var/spool"),
    )
    assoc.calling_ae, assoc.called_ae = calling_ae, called_ae

    def confirmed(ac) -> None:
        accepted, peer_max = accepted_as_requestor(proposed, ac)
        assoc.start(accepted, peer_max)

    assoc.on_associate = confirmed
    assoc.protocol.request_association(rq_pdu)  # Evt1 -> AE-1: open the transport
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(
            loop.create_connection(lambda: assoc.protocol, host, port), connect_timeout
        )
    except (OSError, asyncio.TimeoutError) as exc:
        raise AssociationError(f"cannot connect to {host}:{port}: {exc or 'timed out'}") from exc
    try:
        await asyncio.wait_for(asyncio.shield(assoc.established), settings.artim_timeout)
    except asyncio.TimeoutError:
        assoc.abort()
        raise AssociationError(f"no A-ASSOCIATE answer from {host}:{port} within "
                               f"{settings.artim_timeout} s") from None
    try:
        yield assoc
    except BaseException:
        assoc.abort()
        raise
    else:
        if assoc.outcome == "open":
            await assoc.release()
