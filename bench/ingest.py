"""C-STORE ingest, pacsd beside DCMTK's storescp, driven by the same storescu.

    .venv/bin/python bench/ingest.py [--corpus DIR] [--huge] [--runs N]

Both servers run on loopback with TCP_NODELAY=1, as does storescu. Each row is one storescu
run over one association; the table gives instances/s, MB/s and each server's peak RSS,
and the ratio pacsd / storescp. storescp writes files but neither indexes nor fsyncs, so
the ratio is the price of pacsd's durability and index. Results also go to
bench/results/ingest-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import corpus as corpus_mod  # noqa: E402

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
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


def peak_rss_mib(pid: int) -> float:
    """VmHWM: the high-water mark of the resident set since the process started."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Row:
    workload: str
    server: str
    instances: int
    seconds: float
    megabytes: float
    peak_rss_mib: float
    failures: int

    @property
    def per_second(self) -> float:
        return self.instances / self.seconds

    @property
    def mb_per_second(self) -> float:
        return self.megabytes / self.seconds


class Server:
    name = ""
    ae = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Pacsd(Server):
    name = "pacsd"
    ae = "PACSD"

    def start(self) -> None:
        data = self.workdir / "pacsd"
        shutil.rmtree(data, ignore_errors=True)
        env = dict(os.environ, PACSD_DICOM__PORT=str(self.port), PACSD_DICOM__BIND="127.0.0.1",
                   PACSD_STORAGE__DATA_DIR=str(data), PACSD_LOGGING__LEVEL="warning")
        self.log = open(self.workdir / "pacsd.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "pacsd", "serve"], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.proc)


class StoreSCP(Server):
    name = "storescp"
    ae = "STORESCP"

    def start(self) -> None:
        out = self.workdir / "storescp"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        env = dict(os.environ, TCP_NODELAY="1")
        self.proc = subprocess.Popen([STORESCP, "-aet", self.ae, "--output-directory", str(out),
                                      str(self.port)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, self.proc)


def storescu(server: Server, files: list[Path], nodelay: bool = True) -> tuple[float, int]:
    """One association sending `files`; returns (seconds, failures)."""
    env = dict(os.environ)
    if nodelay:
        env["TCP_NODELAY"] = "1"
    listing = server.workdir / f"storescu-{server.name}.log"
    args = [STORESCU, "-aec", server.ae, "-aet", "BENCH", "--no-halt"]
    started = time.perf_counter()
    result = subprocess.run(args + ["127.0.0.1", str(server.port)] + [str(f) for f in files],
                            env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    listing.write_text(result.stderr)
    failures = result.stderr.count("Store Response (Error") + result.stderr.count("E: ")
    return seconds, failures


def run_workload(name: str, files: list[Path], servers: list[type[Server]], workdir: Path) -> list[Row]:
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    rows = []
    for server_cls in servers:
        server = server_cls(workdir)
        server.start()
        try:
            seconds, failures = storescu(server, files)
            rss = peak_rss_mib(server.proc.pid)
        finally:
            server.stop()
        rows.append(Row(name, server.name, len(files), seconds, megabytes, rss, failures))
        print(f"  {name:<22} {server.name:<9} {len(files) / seconds:9.1f}/s "
              f"{megabytes / seconds:8.1f} MB/s  peak RSS {rss:7.1f} MiB  failures {failures}",
              flush=True)
    return rows


def table(rows: list[Row]) -> str:
    out = [f"{'workload':<22} {'pacsd /s':>9} {'storescp /s':>12} {'ratio':>6} "
           f"{'pacsd MB/s':>10} {'pacsd RSS':>10} {'storescp RSS':>12}"]
    by = {(r.workload, r.server): r for r in rows}
    for workload in dict.fromkeys(r.workload for r in rows):
        p, s = by.get((workload, "pacsd")), by.get((workload, "storescp"))
        if p is None or s is None:
            continue
        out.append(f"{workload:<22} {p.per_second:9.1f} {s.per_second:12.1f} "
                   f"{p.per_second / s.per_second:6.2f} {p.mb_per_second:10.1f} "
                   f"{p.peak_rss_mib:8.1f}Mi {s.peak_rss_mib:10.1f}Mi")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path(tempfile.gettempdir()) / "pacsd-bench-corpus",
                        help="where the generated corpus lives (reused between runs)")
    parser.add_argument("--huge", action="store_true", help="also send the 1 GiB multi-frame instance")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory for the servers")
    args = parser.parse_args()
    for tool in (STORESCU, STORESCP):
        if not Path(tool).exists():
            sys.exit(f"{tool} is missing: apt-get install dcmtk")
    small = corpus_mod.write_ct(args.corpus / "small", "small", 2000, 64, 20)
    large = corpus_mod.write_ct(args.corpus / "ct512", "ct512", 200, 512, 1)
    workdir = args.work or Path(tempfile.mkdtemp(prefix="pacsd-bench-"))
    rows: list[Row] = []
    print(f"corpus in {args.corpus}, servers in {workdir}")
    rows += run_workload("small 64x64, 1 assoc", small, [Pacsd, StoreSCP], workdir)
    rows += run_workload("CT 512x512, 1 assoc", large, [Pacsd, StoreSCP], workdir)
    if args.huge:
        huge = corpus_mod.write_huge(args.corpus / "huge")
        rows += run_workload("1 GiB multi-frame", [huge], [Pacsd, StoreSCP], workdir)
    print()
    print(table(rows))
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (results / f"ingest-{stamp}.json").write_text(json.dumps(
        {"when": stamp, "rows": [asdict(r) | {"per_second": r.per_second} for r in rows]}, indent=2))
    if args.work is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
