"""DICOMweb tests: a live daemon (HTTP on its own free port) with instances sent over DICOM."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest


def store_files(daemon, paths: list[Path]) -> None:
    """Send Part 10 files to the daemon with `pacsd store` (C-STORE over one association)."""
    env = {k: v for k, v in daemon.env.items() if not k.startswith("PACSD_")}
    result = subprocess.run([sys.executable, "-m", "pacsd", "store", "127.0.0.1", str(daemon.port),
                             *map(str, paths)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


@pytest.fixture
def http(daemon):
    """A plain HTTP client on the daemon's DICOMweb base URL."""
    with httpx.Client(base_url=daemon.dicomweb_url, timeout=60) as client:
        yield client
