"""The DICOM listener: accepts connections, negotiates, runs associations, shuts down.

Every association is logged once when it is accepted or rejected and once when it ends,
with peer address, AE titles, contexts, duration and outcome.
"""

from __future__ import annotations

import asyncio

import structlog

from pacsd.config import Settings
from pacsd.dul import pdu
from pacsd.dul.negotiation import AcceptorPolicy, negotiate, reject_busy
from pacsd.net.association import Association
from pacsd.services.registry import ServiceRegistry

log = structlog.get_logger("pacsd.acceptor")

_CONTEXTS_AT_INFO = 16


class DicomServer:
    def __init__(self, settings: Settings, registry: ServiceRegistry) -> None:
        self.settings = settings
        self.registry = registry
        dicom = settings.dicom
        self.policy = AcceptorPolicy(
            ae_title=dicom.ae_title,
            check_called_ae=dicom.check_called_ae,
            require_known_callers=dicom.require_known_callers,
            known_callers=frozenset(p.ae_title for p in settings.peers),
            supported=registry.syntaxes,
            max_pdu_length=dicom.max_pdu_length,
            user_identity=dicom.user_identity,
            roles=registry.roles,
        )
        self.associations: set[Association] = set()
        self._server: asyncio.base_events.Server | None = None
        self.port: int | None = None

    async def start(self) -> None:
        dicom = self.settings.dicom
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                self._new_association, dicom.bind, dicom.port, reuse_address=True, backlog=128
            )
        except OSError as exc:
            raise OSError(exc.errno, f"DICOM listener on {dicom.bind}:{dicom.port}: {exc.strerror or exc}") from None
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("dicom.listening", ae_title=dicom.ae_title, bind=dicom.bind, port=self.port)

    def _new_association(self) -> asyncio.Protocol:
        dicom = self.settings.dicom
        assoc = Association(
            is_requestor=False,
            local_ae=dicom.ae_title,
            max_pdu_length=dicom.max_pdu_length,
            artim_timeout=dicom.artim_timeout,
            network_timeout=dicom.network_timeout,
            dimse_timeout=dicom.dimse_timeout,
            spool_dir=self.settings.storage.spool_dir,
        )
        assoc.on_associate = lambda rq: self._associate(assoc, rq)
        assoc.on_end = self._ended
        assoc.dispatch = self.registry.dispatch
        self.associations.add(assoc)
        return assoc.protocol

    def _associate(self, assoc: Association, rq) -> None:
        assoc.calling_ae = (rq.calling_ae_title or "").strip()
        assoc.called_ae = (rq.called_ae_title or "").strip()
        established = sum(1 for a in self.associations if a.assembler is not None)
        if established >= self.settings.dicom.max_associations:
            decision = reject_busy(f"{established} associations open, the configured maximum")
        else:
            decision = negotiate(rq, self.policy)
        peer = assoc.protocol.peer_str
        if not decision.accepted:
            assoc.outcome = "rejected"
            rj = decision.reject
            log.warning(
                "association.rejected",
                peer=peer,
                calling_ae=assoc.calling_ae,
                called_ae=assoc.called_ae,
                result=rj.result,
                source=rj.source,
                reason=rj.reason,
                why=decision.reason,
            )
            assoc.protocol.reject(decision.answer)
            return
        assoc.protocol.accept(decision.answer)
        assoc.start(decision.contexts, decision.peer_max_pdu)
        registry = self.registry
        assoc.set_spool_factory(lambda context_id, command: registry.spool_for(assoc, context_id, command))
        accepted = [f"{c.context_id}:{c.abstract_syntax}:{c.transfer_syntax}" for c in decision.contexts]
        rejected = [f"{cid}:{sop}:{why}" for cid, sop, why in decision.rejected_contexts]
        if len(accepted) + len(rejected) > _CONTEXTS_AT_INFO:
            # storescu-style requests propose 128 contexts: the full lists go to debug.
            log.debug("association.contexts", peer=peer, accepted=accepted, rejected=rejected)
            accepted = accepted[:_CONTEXTS_AT_INFO] + [f"... {len(decision.contexts)} accepted"]
            rejected = rejected[:_CONTEXTS_AT_INFO] + [f"... {len(rejected)} rejected"] if rejected else []
        log.info(
            "association.accepted",
            peer=peer,
            calling_ae=assoc.calling_ae,
            called_ae=assoc.called_ae,
            accepted=accepted,
            rejected=rejected,
            peer_max_pdu=decision.peer_max_pdu,
            peer_implementation=decision.peer_implementation,
            peer_version=decision.peer_version,
            user_identity=decision.user_identity or None,
        )

    def _ended(self, assoc: Association) -> None:
        self.associations.discard(assoc)
        if assoc.outcome == "rejected" or (assoc.outcome == "closed" and not assoc.calling_ae):
            # Rejections were logged when they happened; a connection that never sent an
            # A-ASSOCIATE-RQ gets one line here.
            if assoc.outcome == "closed":
                log.info("connection.closed", peer=assoc.protocol.peer_str,
                         bytes_received=assoc.protocol.bytes_received,
                         duration=round(assoc.duration, 3))
            return
        log.info(
            "association.ended",
            peer=assoc.protocol.peer_str,
            calling_ae=assoc.calling_ae,
            called_ae=assoc.called_ae,
            outcome=assoc.outcome,
            messages=assoc.messages_received,
            duration=round(assoc.duration, 3),
            **assoc.abort_detail,
        )

    async def close(self, grace: float) -> None:
        """Stop accepting; give open associations `grace` seconds, then abort them."""
        if self._server is not None:
            self._server.close()
        pending = [a.ended for a in self.associations]
        if pending:
            log.info("dicom.draining", associations=len(pending), grace_seconds=grace)
            done, not_done = await asyncio.wait(pending, timeout=grace)
            for assoc in list(self.associations):
                if not assoc.ended.done():
                    log.warning("association.aborted_at_shutdown", peer=assoc.protocol.peer_str,
                                calling_ae=assoc.calling_ae)
                    assoc.abort(pdu.ABORT_SOURCE_USER, 0)
                    if assoc.protocol.transport is not None:
                        assoc.protocol.transport.close()
            if not_done:
                await asyncio.wait([a.ended for a in self.associations] or not_done, timeout=2)
        if self._server is not None:
            await self._server.wait_closed()
        log.info("dicom.stopped")
