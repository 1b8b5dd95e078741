"""Query/Retrieve as SCU on pacsd's own requestor: C-FIND, C-MOVE, C-GET (PS3.4 Annex C).

Used by `pacsd find`, `pacsd move` and `pacsd get`.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from pacsd import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from pacsd.dimse.assembler import Message
from pacsd.dimse.command import CommandField, Priority
from pacsd.dimse.identifier import decode_identifier, encode_identifier
from pacsd.dimse.status import Status
from pacsd.dul.negotiation import ProposedContext
from pacsd.ingest.filemeta import build_file_meta
from pacsd.uid import is_valid_uid

UNCOMPRESSED = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]

MODELS = {
    # model: (FIND, MOVE, GET)
    "patient": ("1.2.840.10008.5.1.4.1.2.1.1", "1.2.840.10008.5.1.4.1.2.1.2", "1.2.840.10008.5.1.4.1.2.1.3"),
    "study": ("1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.1.2.2.2", "1.2.840.10008.5.1.4.1.2.2.3"),
}

# Return keys asked for when the user names none, per level.
DEFAULT_KEYS = {
    "PATIENT": ["PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                "NumberOfPatientRelatedStudies"],
    "STUDY": ["PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber",
              "StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedInstances",
              "StudyInstanceUID"],
    "SERIES": ["Modality", "SeriesNumber", "SeriesDescription", "NumberOfSeriesRelatedInstances",
               "SeriesInstanceUID"],
    "IMAGE": ["InstanceNumber", "SOPClassUID", "SOPInstanceUID"],
}

# Storage SOP classes `pacsd get` offers to receive (the common modalities); one context
# each, uncompressed, since the association has room for 127 beside the GET context.
GET_STORAGE_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.1.2.1", "1.2.840.10008.5.1.4.1.1.1.3",
    "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2",
    "1.2.840.10008.5.1.4.1.1.3.1", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1",
    "1.2.840.10008.5.1.4.1.1.4.2", "1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.6.2",
    "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.1", "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3", "1.2.840.10008.5.1.4.1.1.7.4", "1.2.840.10008.5.1.4.1.1.12.1",
    "1.2.840.10008.5.1.4.1.1.12.1.1", "1.2.840.10008.5.1.4.1.1.12.2", "1.2.840.10008.5.1.4.1.1.12.2.1",
    "1.2.840.10008.5.1.4.1.1.13.1.1", "1.2.840.10008.5.1.4.1.1.13.1.2", "1.2.840.10008.5.1.4.1.1.13.1.3",
    "1.2.840.10008.5.1.4.1.1.20", "1.2.840.10008.5.1.4.1.1.66", "1.2.840.10008.5.1.4.1.1.66.4",
    "1.2.840.10008.5.1.4.1.1.77.1.4", "1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.88.22",
    "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.59", "1.2.840.10008.5.1.4.1.1.104.1",
    "1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.130", "1.2.840.10008.5.1.4.1.1.481.1",
    "1.2.840.10008.5.1.4.1.1.481.2", "1.2.840.10008.5.1.4.1.1.481.3", "1.2.840.10008.5.1.4.1.1.481.5",
]


class KeySpecError(ValueError):
    pass


def parse_keys(specs: list[str]) -> list[tuple[int, str]]:
    """`-k KEY[=VALUE]` arguments (keyword or gggg,eeee) into (tag, value)."""
    out = []
    for spec in specs:
        name, _, value = spec.partition("=")
        name = name.strip()
        match = re.fullmatch(r"\(?([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)?", name)
        if match:
            tag = int(match.group(1) + match.group(2), 16)
        else:
            tag = tag_for_keyword(name)
            if tag is None:
                raise KeySpecError(f"{name!r} is not a DICOM keyword or a (gggg,eeee) tag")
        try:
            dictionary_VR(tag)
        except KeyError:
            raise KeySpecError(f"{name} is not in the DICOM dictionary") from None
        out.append((tag, value))
    return out


def build_identifier(level: str, keys: list[tuple[int, str]], defaults: bool) -> tuple[Dataset, list[str]]:
    """The identifier and its keys' keywords in the order given (a table's columns).

    With `defaults`, a level with no return keys of its own asks for DEFAULT_KEYS too."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    if defaults and not any(value == "" for tag, value in keys if tag != 0x00080052):
        named = {tag for tag, _ in keys}
        keys = keys + [(tag_for_keyword(k), "") for k in DEFAULT_KEYS[level]
                       if tag_for_keyword(k) not in named]
    for tag, value in keys:
        if tag == 0x00080052:
            continue
        vr = dictionary_VR(tag)
        if vr == "SQ":
            ds.add_new(tag, vr, [])  # universal sequence matching: return the sequence
        else:
            ds.add_new(tag, vr, value or None)
    columns = [keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
               for tag, _ in keys if tag != 0x00080052]
    return ds, columns


@dataclass
class SubOperations:
    remaining: int | None
    completed: int
    failed: int
    warning: int

    @classmethod
    def of(cls, command: dict) -> "SubOperations":
        return cls(command.get("NumberOfRemainingSuboperations"),
                   command.get("NumberOfCompletedSuboperations", 0),
                   command.get("NumberOfFailedSuboperations", 0),
                   command.get("NumberOfWarningSuboperations", 0))


async def find(assoc, sop_class: str, identifier: Dataset) -> AsyncIterator[tuple[int, Dataset | None, dict]]:
    """C-FIND: yield (status, matched identifier or None, response command) per response."""
    context = assoc.context_for(sop_class)
    if context is None:
        raise LookupError(f"the peer did not accept {sop_class} (C-FIND)")
    command = {"CommandField": CommandField.C_FIND_RQ, "AffectedSOPClassUID": sop_class,
               "Priority": Priority.MEDIUM}
    data = encode_identifier(identifier, context.transfer_syntax)
    async for response in assoc.request(context.context_id, command, data):
        status = response.command.get("Status", -1)
        found = None
        if response.dataset is not None:
            found = decode_identifier(response.dataset.read(), context.transfer_syntax)
        yield status, found, response.command


async def retrieve(assoc, sop_class: str, identifier: Dataset, move_destination: str | None = None,
                   ) -> AsyncIterator[tuple[int, SubOperations, Dataset | None, dict]]:
    """C-MOVE (with a destination) or C-GET: yield (status, counts, data set, command)."""
    context = assoc.context_for(sop_class)
    if context is None:
        raise LookupError(f"the peer did not accept {sop_class}")
    command = {"CommandField": CommandField.C_MOVE_RQ if move_destination else CommandField.C_GET_RQ,
               "AffectedSOPClassUID": sop_class, "Priority": Priority.MEDIUM}
    if move_destination:
        command["MoveDestination"] = move_destination
    data = encode_identifier(identifier, context.transfer_syntax)
    async for response in assoc.request(context.context_id, command, data):
        status = response.command.get("Status", -1)
        ds = None
        if response.dataset is not None:
            ds = decode_identifier(response.dataset.read(), context.transfer_syntax)
        yield status, SubOperations.of(response.command), ds, response.command


def get_contexts(sop_class: str) -> list[ProposedContext]:
    """The GET context, then the storage classes pacsd offers to receive as SCP."""
    return [ProposedContext(sop_class, UNCOMPRESSED)] + [
        ProposedContext(uid, UNCOMPRESSED, roles=(False, True)) for uid in GET_STORAGE_CLASSES
    ]


def store_receiver(directory: Path, on_file: Callable[[Path, str], None]):
    """A handler for the C-STORE sub-operations of a C-GET: each instance becomes a Part 10
    file in `directory`, named by its SOP Instance UID."""
    directory.mkdir(parents=True, exist_ok=True)
    counter = iter(range(1, 1 << 62))

    async def handle(assoc, message: Message) -> None:
        command = message.command
        if command["CommandField"] != CommandField.C_STORE_RQ or message.dataset is None:
            await assoc.respond(message, Status.UNRECOGNIZED_OPERATION)
            return
        sop_class = command.get("AffectedSOPClassUID", "")
        sop_instance = command.get("AffectedSOPInstanceUID", "")
        if not (is_valid_uid(sop_class) and is_valid_uid(sop_instance)):
            await assoc.respond(message, Status.CANNOT_UNDERSTAND, ErrorComment="malformed UID")
            return
        context = assoc.contexts[message.context_id]
        name = sop_instance if is_valid_uid(sop_instance) else f"instance{next(counter)}"
        path = directory / f"{name}.dcm"
        meta = build_file_meta(sop_class, sop_instance, context.transfer_syntax, assoc.calling_ae,
                               IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME)
        spool = message.dataset
        try:
            with open(path, "wb") as out:
                out.write(meta)
                if spool.in_memory:
                    out.write(spool.read())
                else:
                    with open(spool.path, "rb") as src:
                        src.seek(spool.prefix_length)
                        shutil.copyfileobj(src, out, 1 << 20)
        except OSError as exc:
            await assoc.respond(message, Status.OUT_OF_RESOURCES, ErrorComment=str(exc)[:64])
            return
        on_file(path, sop_instance)
        await assoc.respond(message, Status.SUCCESS)

    return handle

