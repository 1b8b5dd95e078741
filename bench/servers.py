"""The servers the benchmark compares and the DCMTK clients that drive them.

Every server listens on a free loopback port with TCP_NODELAY=1 in its environment, starts
on an empty data directory of its own, and is stopped after the row it served, so its peak
RSS (VmHWM) is that row's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
MOVESCU = "/usr/bin/movescu"
GETSCU = "/usr/bin/getscu"
ORTHANC = "/usr/sbin/Orthanc"
# The Debian package starts Orthanc with /etc/orthanc, whose orthanc.json loads every plugin
# in this folder (with orthanc-dicomweb: DICOMweb, ServeFolders, ModalityWorklists).
ORTHANC_PLUGINS = "/usr/share/orthanc/plugins/"
CLIENT_AE = "BENCH"


def discard(path: Path) -> None:
    """Put a finished run's files out of the way without deleting them: renamed beside
    themselves as `.discarded-*`, removed with the whole scratch directory once every
    measurement is done.

    Deleting thousands of files makes the next file creations on the same filesystem up to
    ~30x slower for minutes on ext4 without a journal (this machine's): the inode allocator
    skips each recently deleted inode, reading its inode table block to know. Run after
    such a delete, a server's every instance paid ~0.2 ms more to create its file (6 µs
    otherwise), an artefact of the benchmark's own clean-up, not of the server.
    """
    if path.exists():
        path.rename(path.parent / f".discarded-{time.monotonic_ns()}-{path.name}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            todo += [int(c) for c in task.read_text().split()]
    return pids


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the process and its live children, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for p in _process_tree(pid):
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        user += int(fields[11])  # utime, stime: fields 14 and 15 of stat
        system += int(fields[12])
    return user / ticks, system / ticks


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of the process and its live children."""
    return sum(cpu_split(pid))


@dataclass
class MachineCpu:
    """CPU seconds of the whole machine since boot, every core, from /proc/stat."""

    busy: float  # user, system, interrupts: work done on this machine
    stolen: float  # time the hypervisor gave this machine's cores to others (steal)
    all: float  # busy, stolen or idle

    def __sub__(self, earlier: "MachineCpu") -> "MachineCpu":
        return MachineCpu(self.busy - earlier.busy, self.stolen - earlier.stolen, self.all - earlier.all)

    @property
    def stolen_percent(self) -> float:
        return self.stolen / self.all * 100 if self.all else 0.0


def machine_cpu() -> MachineCpu:
    with open("/proc/stat") as f:
        # user nice system idle iowait irq softirq steal; guest time is inside user already.
        user, nice, system, idle, iowait, irq, softirq, steal = (int(t) for t in f.readline().split()[1:9])
    hz = os.sysconf("SC_CLK_TCK")
    busy = user + nice + system + irq + softirq
    return MachineCpu(busy / hz, steal / hz, (busy + steal + idle + iowait) / hz)


def fdatasync_ms(directory: Path, n: int = 50) -> float:
    """Median time to make a 4 KiB append durable where the servers write: the cost every
    fsyncing server (pacsd, Orthanc) pays per commit, and what varies most between machines."""
    times = []
    path = directory / "fsync-probe"
    with open(path, "wb") as f:
        for _ in range(n):
            f.write(os.urandom(4096))
            started = time.perf_counter()
            os.fdatasync(f.fileno())
            times.append((time.perf_counter() - started) * 1000)
    path.unlink()
    return statistics.median(times)


def create_us(directory: Path, n: int = 200) -> float:
    """Median time to create an empty file where the servers write: every server creates
    one per instance. Tens of µs normally; much more right after thousands of deletes on
    ext4 without a journal (see `discard`). The files stay until the scratch directory goes."""
    probe = directory / "create-probe"
    probe.mkdir(parents=True, exist_ok=True)
    times = []
    for i in range(n):
        started = time.perf_counter()
        os.close(os.open(probe / f"{i:04d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        times.append((time.perf_counter() - started) * 1e6)
    discard(probe)
    return statistics.median(times)


def machine_now(directory: Path) -> str:
    """One line on the state of the disk where `directory` is, for the tools that compare
    runs taken minutes apart: the same code's rate moves with both of these. (The CPU stolen
    by the hypervisor shows only while the cores have work; the tools give it per run.)"""
    return (f"this machine now: fdatasync {fdatasync_ms(directory):.2f} ms, "
            f"file creation {create_us(directory):.0f} µs")


def peak_rss_mib(pid: int) -> float:
    """VmHWM (resident high-water mark) of the process, plus its live children's if it has any."""
    return sum(_status_kib(p, "VmHWM") for p in _process_tree(pid)) / 1024


class Server:
    """One server on a fresh data directory under `workdir`; a context manager."""

    name = ""
    ae = ""

    def __init__(self, workdir: Path, peers: dict[str, int] | None = None, fresh: bool = True) -> None:
        self.workdir = workdir
        self.data = workdir / self.name
        self.peers = peers or {}  # AE title -> loopback port, for C-MOVE destinations
        self.port = free_port()
        self.http_port: int | None = None  # DICOMweb, for the servers that have it
        self.proc: subprocess.Popen | None = None
        if fresh:
            discard(self.data)
        self.data.mkdir(parents=True, exist_ok=True)

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def start(self) -> "Server":
        args, env = self.command()
        log_path = self.workdir / f"{self.name}.log"
        with open(log_path, "ab") as log:
            start = log.tell()
            self.proc = subprocess.Popen(args, env=dict(os.environ, TCP_NODELAY="1", **env),
                                         stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port, self.proc)
            if self.http_port:
                wait_for_port(self.http_port, self.proc)
        except Exception as exc:
            self.stop()
            with open(log_path, "rb") as log:
                log.seek(start)
                tail = log.read().decode(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"{self.name} did not start ({exc}): {' / '.join(tail)}") from exc
        return self

    @property
    def dicomweb(self) -> str:
        """Base URL of the server's DICOMweb resources (…/studies, …)."""
        raise NotImplementedError(f"{self.name} does not serve DICOMweb")

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        return cpu_seconds(self.proc.pid)

    def peak_rss_mib(self) -> float:
        return peak_rss_mib(self.proc.pid)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class DicomWebServer(Server):
    """A server that also answers DICOMweb, on an HTTP port of its own."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.http_port = free_port()

    @property
    def dicomweb(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"


class Pacsd(DicomWebServer):
    name = "pacsd"
    ae = "PACSD"

    def command(self) -> tuple[list[str], dict[str, str]]:
        peers = [{"ae_title": ae, "host": "127.0.0.1", "port": port} for ae, port in self.peers.items()]
        return [sys.executable, "-m", "pacsd", "serve"], {
            "PACSD_DICOM__PORT": str(self.port), "PACSD_DICOM__BIND": "127.0.0.1",
            "PACSD_HTTP__PORT": str(self.http_port), "PACSD_HTTP__BIND": "127.0.0.1",
            "PACSD_STORAGE__DATA_DIR": str(self.data),
            "PACSD_DATABASE__URL": f"sqlite+aiosqlite:///{self.data}/index.db",
            "PACSD_LOGGING__LEVEL": "warning", "PACSD_PEERS": json.dumps(peers)}


class Orthanc(DicomWebServer):
    """Orthanc on its default SQLite index and file storage, configured by a JSON of our own."""

    name = "orthanc"
    ae = "ORTHANC"

    def command(self) -> tuple[list[str], dict[str, str]]:
        # Anything not named here keeps Orthanc's built-in default (fsync on, DICOM threads 4...).
        modalities = {CLIENT_AE: [CLIENT_AE, "127.0.0.1", 104]}
        modalities |= {ae: [ae, "127.0.0.1", port] for ae, port in self.peers.items()}
        config = {
            "Name": "pacsd-bench",
            "StorageDirectory": str(self.data / "storage"),
            "IndexDirectory": str(self.data / "index"),
            "StorageCompression": False,
            "DicomAet": self.ae,
            "DicomPort": self.port,
            "DicomCheckCalledAet": False,
            "DicomModalities": modalities,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            # The folder, as the Debian service does: DICOMweb (below) plus ServeFolders and
            # ModalityWorklists, which have nothing to do here.
            "Plugins": [ORTHANC_PLUGINS],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return [ORTHANC, str(path)], {}


class StoreSCP(Server):
    """DCMTK storescp: writes each instance as a file; no index, no fsync."""

    name = "storescp"
    ae = "STORESCP"

    def command(self) -> tuple[list[str], dict[str, str]]:
        return [STORESCP, "-aet", self.ae, "--output-directory", str(self.data), str(self.port)], {}

    def received(self) -> int:
        return sum(1 for _ in self.data.iterdir())


def storescu_start(server: Server, files: list[Path], nodelay: bool = True, log: Path | None = None
                   ) -> subprocess.Popen:
    """One storescu process sending `files` over one association."""
    env = dict(os.environ)
    env.pop("TCP_NODELAY", None)
    if nodelay:
        env["TCP_NODELAY"] = "1"
    args = [STORESCU, "-aet", CLIENT_AE, "-aec", server.ae, "--no-halt", "127.0.0.1", str(server.port)]
    out = open(log or os.devnull, "w")
    try:
        return subprocess.Popen(args + [str(f) for f in files], env=env, stdout=out, stderr=subprocess.STDOUT)
    finally:
        out.close()


def storescu(server: Server, chunks: list[list[Path]], nodelay: bool = True) -> tuple[float, int]:
    """Send each chunk from its own storescu at once; (wall seconds, failed instances)."""
    logs = [server.workdir / f"storescu-{server.name}-{i}.log" for i in range(len(chunks))]
    started = time.perf_counter()
    procs = [storescu_start(server, chunk, nodelay, log) for chunk, log in zip(chunks, logs)]
    codes = [p.wait() for p in procs]
    seconds = time.perf_counter() - started
    failures = 0
    for code, log, chunk in zip(codes, logs, chunks):
        text = log.read_text(errors="replace")
        errors = sum(line.startswith("E: Store") for line in text.splitlines())
        failures += min(len(chunk), errors or (len(chunk) if code else 0))
    return seconds, failures


@dataclass
class Cost:
    """CPU seconds spent while a client ran: the server's (all its processes) and the machine's."""

    user: float
    system: float
    machine_busy: float  # every process and kernel thread, every core
    machine_all: float  # busy, stolen or idle, every core
    machine_stolen: float = 0.0  # taken by the hypervisor: nobody's work on this machine

    @property
    def stolen_percent(self) -> float:
        return MachineCpu(self.machine_busy, self.machine_stolen, self.machine_all).stolen_percent

    @property
    def elsewhere(self) -> float:
        """What the rest of the machine used: clients, the kernel's own threads, interrupts."""
        return max(self.machine_busy - self.user - self.system, 0.0)


def storescu_costed(server: Server, chunks: list[list[Path]], nodelay: bool = True) -> tuple[float, int, Cost]:
    """`storescu`, and the CPU it cost the server and the machine."""
    assert server.proc is not None
    user0, system0 = cpu_split(server.proc.pid)
    machine0 = machine_cpu()
    seconds, failures = storescu(server, chunks, nodelay)
    machine = machine_cpu() - machine0
    user1, system1 = cpu_split(server.proc.pid)
    return seconds, failures, Cost(user1 - user0, system1 - system0, machine.busy, machine.all, machine.stolen)


def movescu(server: Server, destination: str, study_uid: str) -> tuple[float, int]:
    """Study-level C-MOVE of one study; (seconds, exit code)."""
    return _retrieve(server, MOVESCU, study_uid, ["-aem", destination])


def getscu(server: Server, study_uid: str, directory: Path) -> tuple[float, int]:
    """Study-level C-GET of one study into `directory`, the data sets written as received
    (+B); (seconds, exit code)."""
    directory.mkdir(parents=True, exist_ok=True)
    return _retrieve(server, GETSCU, study_uid, ["+B", "-od", str(directory)])


def _retrieve(server: Server, tool: str, study_uid: str, options: list[str]) -> tuple[float, int]:
    """A DCMTK retrieve tool's study-level request; (seconds, exit code), its output logged."""
    args = [tool, "-S", *options, "-aet", CLIENT_AE, "-aec", server.ae,
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
            "127.0.0.1", str(server.port)]
    started = time.perf_counter()
    result = subprocess.run(args, env=dict(os.environ, TCP_NODELAY="1"), capture_output=True)
    seconds = time.perf_counter() - started
    (server.workdir / f"{Path(tool).name}-{server.name}.log").write_bytes(result.stdout + result.stderr)
    return seconds, result.returncode


# --- an earlier commit of pacsd beside this tree (ab.py, exchange.py) -----------------------

REPOSITORY = Path(__file__).resolve().parent.parent


@contextmanager
def worktree(rev: str, where: Path) -> Iterator[Path]:
    """This repository at `rev`, checked out at `where` while the block runs."""
    subprocess.run(["git", "-C", str(REPOSITORY), "worktree", "add", "--detach", "--quiet", str(where), rev],
                   check=True)
    try:
        yield where
    finally:
        subprocess.run(["git", "-C", str(REPOSITORY), "worktree", "remove", "--force", str(where)], check=False)


@contextmanager
def pacsd_from(tree: Path | None) -> Iterator[None]:
    """Servers started in the block run the pacsd of `tree` (first on their PYTHONPATH), or
    with None the one installed in this virtualenv."""
    saved = os.environ.get("PYTHONPATH")
    if tree is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = str(tree)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
