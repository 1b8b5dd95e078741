"""STOW-RS parts in memory or in spool files, in process (the app on an Archive, no sockets).

A part of up to 1 MiB stays in memory and is written once, straight to its blob, as a small
C-STORE is; a bigger part, or any part once all requests together hold STOW_MEMORY_BYTES,
goes through a spool file. Either way every instance is stored byte for byte, and whatever
happens to the request the budget is given back: a failed request must not leave later
ones spooling forever.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from pacsd.app import Archive
from pacsd.config import Settings, StorageSettings
from pacsd.web import stow
from pacsd.web.app import build_app
from tests.dicomdata import dataset_offset, instance_rows, stored_dataset
from tests.web.test_stow import STOW_TYPE, instance, multipart, part10


@pytest.fixture
async def web(tmp_path: Path):
    settings = Settings(storage=StorageSettings(data_dir=tmp_path / "var"))
    archive = Archive(settings)
    await archive.open()
    try:
        transport = httpx.ASGITransport(app=build_app(archive, settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://pacsd/dicom-web") as client:
            yield client, settings.storage.data_dir
    finally:
        await archive.close()


@pytest.fixture
def spooled(monkeypatch) -> list[Path]:
    """The spool files STOW-RS creates (the real ones are still created)."""
    created: list[Path] = []
    real = stow._create

    def create(path: Path):
        created.append(path)
        return real(path)

    monkeypatch.setattr(stow, "_create", create)
    return created


@pytest.fixture
def budget(monkeypatch):
    def use(limit: int) -> stow.MemoryBudget:
        fresh = stow.MemoryBudget(limit)
        monkeypatch.setattr(stow, "_MEMORY", fresh)
        return fresh
    return use


async def post(client: httpx.AsyncClient, body: bytes) -> httpx.Response:
    return await client.post("/studies", content=body, headers={"Content-Type": STOW_TYPE + "stow-boundary-1"})


def assert_stored(data_dir: Path, sent: list[bytes]) -> None:
    rows = instance_rows(data_dir / "index.db")
    assert sorted(stored_dataset(data_dir, row) for row in rows) == sorted(s[dataset_offset(s):] for s in sent)
    assert list((data_dir / "spool").glob("*.spool")) == []


async def test_small_parts_are_stored_without_a_spool_file(web, spooled, budget):
    client, data_dir = web
    memory = budget(stow.STOW_MEMORY_BYTES)
    sent = [part10(instance(f"mem{i}", number=i)) for i in range(5)]
    response = await post(client, multipart(sent))
    assert response.status_code == 200, response.text
    assert spooled == []
    assert_stored(data_dir, sent)
    assert memory.used == 0


async def test_parts_beyond_the_memory_budget_go_to_spool_files(web, spooled, budget):
    client, data_dir = web
    sent = [part10(instance(f"over{i}", number=i, rows=64, columns=64)) for i in range(6)]
    # Room for about two parts: the rest of the request waits in spool files.
    memory = budget(int(2.5 * len(sent[0])))
    response = await post(client, multipart(sent))
    assert response.status_code == 200, response.text
    assert 1 <= len(spooled) <= 4, spooled
    assert_stored(data_dir, sent)
    assert memory.used == 0


async def test_a_part_over_one_mebibyte_goes_to_a_spool_file(web, spooled, budget):
    client, data_dir = web
    memory = budget(stow.STOW_MEMORY_BYTES)
    big = part10(instance("big", rows=1024, columns=1024))  # 2 MiB of pixels
    small = part10(instance("small", number=2))
    response = await post(client, multipart([big, small]))
    assert response.status_code == 200, response.text
    assert len(spooled) == 1
    assert_stored(data_dir, [big, small])
    assert memory.used == 0


async def test_a_request_that_fails_gives_the_budget_back(web, spooled, budget):
    client, data_dir = web
    memory = budget(stow.STOW_MEMORY_BYTES)
    good = multipart([part10(instance(f"cut{i}", number=i)) for i in range(3)])
    cut = good[: -len(b"--stow-boundary-1--\r\n") - 100]  # the last part never ends
    response = await post(client, cut)
    assert response.status_code == 400, response.text
    assert memory.used == 0
    assert instance_rows(data_dir / "index.db") == []
    # Refused parts (not DICOM) give back what they held as well.
    response = await post(client, multipart([b"\x00" * 5000, part10(instance("fine"))]))
    assert response.status_code == 202, response.text
    assert memory.used == 0
    assert len(instance_rows(data_dir / "index.db")) == 1
