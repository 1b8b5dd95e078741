"""C-FIND responses leave in few writes: pacsd and its own SCU in one process, on a real socket.

Each write is a system call and a TCP segment (on loopback the receiving side of the stack
runs inside the sender's call too), and a search that found three studies used to cost
seven: the command and the identifier of each pending response, then the final response.
Now the responses of a search go out together, RESPONSES_PER_WRITE at a time. What the SCU
receives is unchanged: every match, in order, then the final status.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import Dataset

from pacsd.app import Archive, build_registry
from pacsd.config import Settings
from pacsd.dimse.status import Status
from pacsd.dul.machine import Event
from pacsd.dul.negotiation import ProposedContext
from pacsd.dul.protocol import UpperLayerProtocol
from pacsd.net.acceptor import DicomServer
from pacsd.net.qrscu import find
from pacsd.net.requestor import associate
from pacsd.services.qr_find import RESPONSES_PER_WRITE, STUDY_ROOT_FIND
from pacsd.ingest.pipeline import Incoming
from tests.unit.test_index import make_dataset, part10

EXPLICIT_LE = "1.2.840.10008.1.2.1"


@pytest.fixture
async def pacsd(tmp_path: Path):
    settings = Settings(dicom={"port": 0, "bind": "127.0.0.1"}, storage={"data_dir": tmp_path / "var"},
                        http={"enabled": False})
    archive = Archive(settings)
    await archive.open()
    server = DicomServer(settings, build_registry(settings, archive))
    await server.start()
    try:
        yield archive, server
    finally:
        await server.close(1)
        await archive.close()


async def store_studies(archive: Archive, n: int) -> None:
    for i in range(n):
        ds = make_dataset(patient=i, study=i, series_no=i, instance=i)
        data, offset = part10(ds)
        outcome = await archive.ingest.ingest(Incoming(
            path=None, dataset_offset=offset, transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
            calling_ae="MODALITY", sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID),
            buffer=bytearray(data)))
        assert outcome.status == Status.SUCCESS


@pytest.fixture
def acceptor_writes(monkeypatch) -> list[int]:
    """The size of each P-DATA write the acceptor (pacsd) makes."""
    writes: list[int] = []
    real = UpperLayerProtocol._event

    def event(self, evt, payload=None):
        if evt is Event.EVT9 and not self.machine.is_requestor:
            writes.append(len(payload.data))
        return real(self, evt, payload)

    monkeypatch.setattr(UpperLayerProtocol, "_event", event)
    return writes


async def search(server: DicomServer) -> list[tuple[int, str | None]]:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    identifier.PatientID = ""
    contexts = [ProposedContext(STUDY_ROOT_FIND, [EXPLICIT_LE])]
    async with associate("127.0.0.1", server.port, calling_ae="FINDSCU", called_ae="PACSD",
                         contexts=contexts) as assoc:
        return [(status, found.PatientID if found is not None else None)
                async for status, found, _ in find(assoc, STUDY_ROOT_FIND, identifier)]


@pytest.mark.parametrize("studies", [3, RESPONSES_PER_WRITE + 5])
async def test_the_responses_of_a_search_leave_together(pacsd, acceptor_writes, studies):
    archive, server = pacsd
    await store_studies(archive, studies)
    acceptor_writes.clear()
    responses = await search(server)
    assert [status for status, _ in responses] == [Status.PENDING] * studies + [Status.SUCCESS]
    assert sorted(pid for _, pid in responses[:-1]) == sorted(f"PID{i}" for i in range(studies))
    # One write for every RESPONSES_PER_WRITE matches, the last one with the final response
    # (the association's own PDUs, A-ASSOCIATE-AC and A-RELEASE-RP, are not P-DATA).
    assert len(acceptor_writes) == studies // RESPONSES_PER_WRITE + 1, acceptor_writes
