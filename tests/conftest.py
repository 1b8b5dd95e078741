"""Shared fixtures: a real pacsd daemon in a subprocess, free ports, raw DICOM sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DCMTK = Path("/usr/bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port} after {timeout} s")


def dcmtk(tool: str) -> str:
    """Absolute path to a DCMTK tool: pynetdicom installs same-named scripts in the venv."""
    path = DCMTK / tool
    if not path.exists():
        pytest.fail(f"{path} missing: run `make test`, which installs DCMTK (Debian package dcmtk)")
    return str(path)


@dataclass
class Daemon:
    port: int
    data_dir: Path
    proc: subprocess.Popen
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    ae_title: str = "PACSD"
    http_port: int = 0

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return self.http_url + "/dicom-web"

    def events(self, name: str | None = None) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if name is None or event.get("event") == name:
                out.append(event)
        return out

    def wait_for_event(self, name: str, count: int = 1, timeout: float = 10.0, **match) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events(name) if all(e.get(k) == v for k, v in match.items())]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


def launch_daemon(base: Path, name: str, config_text: str | None = None, **settings: str) -> Daemon:
    """`pacsd serve` in a subprocess, data in base/name, log (JSON lines) in base/name.log.

    Settings are PACSD_* overrides without the prefix: DICOM__ARTIM_TIMEOUT="1" becomes
    PACSD_DICOM__ARTIM_TIMEOUT=1. `config_text` is written to base/name.toml and passed
    with --config.
    """
    base = Path(base)
    port = free_port()
    http_port = free_port()
    data_dir = base / name
    env = dict(os.environ)
    env.update({
        "PACSD_DICOM__PORT": str(port),
        "PACSD_HTTP__PORT": str(http_port),
        "PACSD_DICOM__BIND": "127.0.0.1",
        "PACSD_STORAGE__DATA_DIR": str(data_dir),
        "PACSD_DATABASE__URL": f"sqlite+aiosqlite:///{data_dir}/index.db",
        "PACSD_LOGGING__FORMAT": "json",
        "PACSD_LOGGING__LEVEL": "debug",
    })
    env.update({f"PACSD_{key.upper()}": str(value) for key, value in settings.items()})
    args = [sys.executable, "-m", "pacsd", "serve"]
    if config_text is not None:
        config = base / f"{name}.toml"
        config.write_text(config_text)
        args += ["--config", str(config)]
    log_path = base / f"{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    daemon = Daemon(port, data_dir, proc, log_path, env, http_port=http_port)
    try:
        wait_for_port(port, proc)
        if env.get("PACSD_HTTP__ENABLED", "true").lower() not in ("false", "0"):
            wait_for_port(http_port, proc)
    except BaseException:
        daemon.stop()
        raise
    return daemon


def store_files(daemon: Daemon, paths) -> None:
    """Send Part 10 files to the daemon with `pacsd store` (C-STORE over one association)."""
    env = {k: v for k, v in daemon.env.items() if not k.startswith("PACSD_")}
    result = subprocess.run([sys.executable, "-m", "pacsd", "store", "127.0.0.1", str(daemon.port),
                             *map(str, paths)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


@pytest.fixture
def start_daemon(tmp_path):
    """Start `pacsd serve` for this test; stopped (SIGTERM) when the test ends."""
    started: list[Daemon] = []

    def start(config_text: str | None = None, **settings: str) -> Daemon:
        daemon = launch_daemon(tmp_path, f"pacsd{len(started)}", config_text, **settings)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def daemon(start_daemon) -> Daemon:
    return start_daemon()


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def recv_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """One whole PDU from a raw socket: (type, body)."""
    header = recv_exactly(sock, 6)
    length = int.from_bytes(header[2:6], "big")
    return header[0], recv_exactly(sock, length)


def wait_closed(sock: socket.socket, timeout: float) -> float:
    """Seconds until the peer closed the connection (reading and dropping what comes)."""
    started = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except socket.timeout:
        raise AssertionError(f"connection still open after {timeout} s") from None
    except ConnectionResetError:
        pass
    return time.monotonic() - started


@pytest.fixture
def fsynced(monkeypatch) -> list[str]:
    """The path of every descriptor passed to os.fsync, or handed to the kernel's AIO to
    fsync (store/aio.py), from now on, in order (the real fsync still runs)."""
    from pacsd.store.aio import AioFsync

    paths: list[str] = []
    real = os.fsync
    real_aio = AioFsync.fsync

    def recording(fd):
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    def recording_aio(self, fds, **kwargs):
        paths.extend(os.readlink(f"/proc/self/fd/{fd}") for fd in fds)
        return real_aio(self, fds, **kwargs)

    monkeypatch.setattr(os, "fsync", recording)
    monkeypatch.setattr(AioFsync, "fsync", recording_aio)
    return paths
