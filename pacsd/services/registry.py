"""Which SOP classes pacsd serves and which handler answers each DIMSE request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import structlog

from pacsd.dimse.assembler import Message
from pacsd.dimse.spool import Spool
from pacsd.dimse.status import Status

log = structlog.get_logger("pacsd.services")

# (association, request) -> None; the Association is pacsd.net.association.Association.
Handler = Callable[[Any, Message], Awaitable[None]]


@dataclass
class ServiceRegistry:
    # abstract syntax -> transfer syntaxes in preference order
    syntaxes: dict[str, list[str]] = field(default_factory=dict)
    # (abstract syntax, command field) -> handler
    handlers: dict[tuple[str, int], Handler] = field(default_factory=dict)
    # (abstract syntax, command field) -> factory(assoc, context_id, command) -> Spool, for
    # services that want a request's data set spooled their own way (storage: Part 10).
    spool_factories: dict[tuple[str, int], Callable] = field(default_factory=dict)
    # SOP classes for which pacsd accepts SCP/SCU role selection: abstract syntax ->
    # (scu_role, scp_role) it agrees to for the requestor (C-GET needs scp_role=True on the
    # storage classes, so that pacsd can send the C-STORE sub-operations back).
    roles: dict[str, tuple[bool, bool]] = field(default_factory=dict)

    def add(self, sop_class: str, transfer_syntaxes: list[str], command_field: int, handler: Handler) -> None:
        self.syntaxes.setdefault(sop_class, list(transfer_syntaxes))
        self.handlers[(sop_class, command_field)] = handler

    def spool_for(self, assoc, context_id: int, command: dict) -> Spool:
        abstract = assoc.contexts[context_id].abstract_syntax
        factory = self.spool_factories.get((abstract, command["CommandField"]))
        if factory is None:
            return Spool(assoc.spool_dir)
        return factory(assoc, context_id, command)

    async def dispatch(self, assoc, message: Message) -> None:
        abstract = assoc.contexts[message.context_id].abstract_syntax
        handler = self.handlers.get((abstract, message.command_field))
        if handler is None:
            log.warning("dimse.unrecognized_operation", peer=assoc.protocol.peer_str,
                        command=hex(message.command_field), sop_class=abstract)
            await assoc.respond(message, Status.UNRECOGNIZED_OPERATION,
                                ErrorComment=f"command 0x{message.command_field:04X} is not "
                                             f"supported for {abstract}")
            return
        await handler(assoc, message)
