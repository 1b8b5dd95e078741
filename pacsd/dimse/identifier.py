"""Identifiers (the data sets of C-FIND/C-MOVE/C-GET requests and responses, N-* attribute
lists) to and from bytes in a presentation context's transfer syntax.

Received identifiers are walked to their last byte before pydicom reads them, and every value
is converted at once, so that a broken identifier fails here with a status the peer gets
(C000) and not halfway through a query.
"""

from __future__ import annotations

import io
import warnings
import zlib

from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from pacsd.dimse.status import Status
from pacsd.ingest.dataset import DataSetError, check_structure

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"

# An identifier is a handful of keys; anything near this is not a query.
MAX_IDENTIFIER_BYTES = 16 << 20


class IdentifierError(Exception):
    """An identifier pacsd cannot act on; `status` and `comment` go to the peer."""

    def __init__(self, status: int, comment: str, tag: int | None = None) -> None:
        super().__init__(comment)
        self.status, self.comment, self.tag = status, comment, tag


def decode_identifier(data: bytes, transfer_syntax: str) -> Dataset:
    if len(data) > MAX_IDENTIFIER_BYTES:
        raise IdentifierError(Status.OUT_OF_RESOURCES,
                              f"identifier larger than {MAX_IDENTIFIER_BYTES >> 20} MiB")
    try:
        check_structure(io.BytesIO(data), 0, len(data), transfer_syntax,
                        max_inflated=MAX_IDENTIFIER_BYTES)
    except DataSetError as exc:
        raise IdentifierError(Status.CANNOT_UNDERSTAND, f"identifier cannot be decoded: {exc}") from None
    try:
        if transfer_syntax == DEFLATED:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            data = inflater.decompress(data, MAX_IDENTIFIER_BYTES)
        with warnings.catch_warnings():
            # pydicom warns about values invalid for their VR and keeps them; the services
            # refuse those with a reason the peer gets to see.
            warnings.simplefilter("ignore")
            ds = read_dataset(io.BytesIO(data), transfer_syntax == IMPLICIT_LE,
                              transfer_syntax != EXPLICIT_BE)
            for _ in ds.iterall():  # convert every raw element now
                pass
    except Exception as exc:
        raise IdentifierError(Status.CANNOT_UNDERSTAND, f"identifier cannot be decoded: {exc}") from None
    return ds


def encode_identifier(ds: Dataset, transfer_syntax: str) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = transfer_syntax != EXPLICIT_BE
    fp.is_implicit_VR = transfer_syntax == IMPLICIT_LE
    write_dataset(fp, ds)
    data = fp.getvalue()
    if transfer_syntax == DEFLATED:
        deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = deflater.compress(data) + deflater.flush()
    return data
