"""DICOMweb tests: a live daemon (HTTP on its own free port) with instances sent over DICOM."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import store_files  # noqa: F401  (the web tests' way to load data)


@pytest.fixture
def http(daemon):
    """A plain HTTP client on the daemon's DICOMweb base URL."""
    with httpx.Client(base_url=daemon.dicomweb_url, timeout=60) as client:
        yield client
