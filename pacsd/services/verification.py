"""Verification Service Class (PS3.4 Annex A): C-ECHO as SCP and SCU."""

from __future__ import annotations

from pacsd.dimse.assembler import Message
from pacsd.dimse.command import CommandField
from pacsd.dimse.status import Status
from pacsd.services.registry import ServiceRegistry

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"


async def handle_c_echo(assoc, message: Message) -> None:
    await assoc.respond(message, Status.SUCCESS)


def register(registry: ServiceRegistry, transfer_syntaxes: list[str]) -> None:
    registry.add(VERIFICATION_SOP_CLASS, transfer_syntaxes, CommandField.C_ECHO_RQ, handle_c_echo)


async def c_echo(assoc) -> int:
    """Send C-ECHO-RQ on an established association; return the response status."""
    context = assoc.context_for(VERIFICATION_SOP_CLASS)
    if context is None:
        raise LookupError("the peer did not accept the Verification SOP Class")
    response = await assoc.request_one(
        context.context_id,
        {"CommandField": CommandField.C_ECHO_RQ, "AffectedSOPClassUID": VERIFICATION_SOP_CLASS},
    )
    return response.command.get("Status", -1)
