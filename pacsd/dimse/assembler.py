"""Reassembly of DIMSE messages from P-DATA fragments (PS3.7 Annex E, PS3.8 Annex E).

Command fragments collect in a small bounded buffer; data set fragments go straight into
a Spool, so no data set is ever held whole in memory unless it is small.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pacsd.dimse import command as cmd
from pacsd.dimse.spool import Spool
from pacsd.dul.pdu import MCH_COMMAND, MCH_LAST, PDUError, ABORT_REASON_UNEXPECTED_PARAMETER


@dataclass
class Message:
    context_id: int
    command: dict[str, Any]
    dataset: Spool | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def command_field(self) -> int:
        return self.command["CommandField"]

    def discard(self) -> None:
        if self.dataset is not None:
            self.dataset.discard()


# Called when a command set says a data set follows: returns the spool it should go to.
SpoolFactory = Callable[[int, dict[str, Any]], Spool]


class Assembler:
    """Feeds on PDVs; hands complete Messages to `deliver`.

    Protocol errors (fragments out of order, a data set on another context, an oversize
    command) raise PDUError so the upper layer aborts the association.
    """

    def __init__(
        self,
        deliver: Callable[[Message], None],
        spool_dir: Path,
        accepted_contexts: set[int],
        spool_factory: SpoolFactory | None = None,
    ) -> None:
        self.deliver = deliver
        self.spool_dir = spool_dir
        self.accepted_contexts = accepted_contexts
        self.spool_factory = spool_factory or (lambda ctx, command: Spool(spool_dir))
        self._command = bytearray()
        self._command_context: int | None = None
        self._pending: Message | None = None  # command done, data set arriving

    def pdv(self, context_id: int, control: int, fragment: memoryview) -> None:
        if context_id not in self.accepted_contexts:
            raise PDUError(
                f"PDV on presentation context {context_id}, which was not accepted",
                ABORT_REASON_UNEXPECTED_PARAMETER,
            )
        if control & MCH_COMMAND:
            self._command_fragment(context_id, control, fragment)
        else:
            self._dataset_fragment(context_id, control, fragment)

    def _command_fragment(self, context_id: int, control: int, fragment: memoryview) -> None:
        if self._pending is not None:
            raise PDUError("command fragment while a data set was still arriving")
        if self._command_context is not None and self._command_context != context_id:
            raise PDUError("command fragments on two presentation contexts")
        self._command_context = context_id
        if len(self._command) + len(fragment) > cmd.MAX_COMMAND_LENGTH:
            raise PDUError(f"command set longer than {cmd.MAX_COMMAND_LENGTH} bytes")
        self._command += fragment
        if not control & MCH_LAST:
            return
        raw = self._command
        self._command = bytearray()
        self._command_context = None
        try:
            command = cmd.decode(raw)
        except cmd.CommandError as exc:
            raise PDUError(f"undecodable command set: {exc}") from exc
        if cmd.has_dataset(command):
            spool = self.spool_factory(context_id, command)
            self._pending = Message(context_id, command, spool,
                                    meta={"to_file": spool.threshold == 0})
        else:
            self.deliver(Message(context_id, command))

    def _dataset_fragment(self, context_id: int, control: int, fragment: memoryview) -> None:
        pending = self._pending
        if pending is None:
            raise PDUError("data set fragment without a command announcing it")
        if pending.context_id != context_id:
            raise PDUError("data set fragment on another presentation context than its command")
        pending.dataset.write(fragment)
        if control & MCH_LAST:
            self._pending = None
            pending.dataset.finish(to_file=pending.meta.get("to_file", False))
            self.deliver(pending)

    def discard(self) -> None:
        """The association ended mid-message: drop what was half received."""
        self._command = bytearray()
        if self._pending is not None:
            self._pending.discard()
            self._pending = None

    @property
    def busy(self) -> bool:
        return self._pending is not None or bool(self._command)
