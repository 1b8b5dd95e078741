"""pacsd side by side with Orthanc and DCMTK storescp: one run, one table (issue #5).

    .venv/bin/python bench/run.py [--only ROW,...] [--servers NAME,...] [--corpus DIR]

Rows (keys for --only): small, ct512, small4, nagle, assoc, find, find10k, qido, qido10k, move,
get, stow, wado, huge. Servers: pacsd, orthanc, storescp. Each server starts fresh for each
row, on loopback with TCP_NODELAY=1; the clients are DCMTK storescu / movescu / getscu, for
C-FIND pacsd's own SCU over one association, for QIDO-RS and STOW-RS one keep-alive httpx
client and for WADO-RS curl (the same client for every server). The table gives each value and the ratio pacsd / peer;
the run is also written to bench/results/bench-<time>.json, which bench/compare.py compares
with another run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import corpus as corpus_mod  # noqa: E402
from servers import (GETSCU, ORTHANC, STORESCP, STORESCU, MOVESCU, Orthanc, Pacsd, Server,  # noqa: E402
                     StoreSCP, create_us, discard, fdatasync_ms, getscu, machine_cpu, movescu, storescu,
                     storescu_costed)

SERVERS: dict[str, type[Server]] = {"pacsd": Pacsd, "orthanc": Orthanc, "storescp": StoreSCP}
PEERS = ["orthanc", "storescp"]
LABELS = {"pacsd": "pacsd", "orthanc": "Orthanc", "storescp": "storescp"}


@dataclass
class Result:
    row: str
    server: str
    metrics: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: float | None = None
    failures: int = 0
    error: str = ""
    runs: list[dict] = field(default_factory=list)  # each repetition's metrics and peak RSS


@dataclass
class Context:
    corpus: Path
    work: Path
    servers: list[str]
    queries: int
    studies: int
    per_study: int
    repeat: int
    retrieves: int = 5
    # Rows whose stored data a later row reads (ct512 for wado, find for qido, find10k for
    # qido10k), and where each server's data directory from such a row's last good
    # repetition was put aside.
    reuse: set[str] = field(default_factory=set)
    kept: dict[tuple[str, str], Path] = field(default_factory=dict)
    filled: tuple[Path, float] | None = None  # the find10k index and the seconds filling it took
    results: list[Result] = field(default_factory=list)

    def keep(self, row: str, name: str) -> Path:
        """Put the server `name`'s data directory aside for later rows; returns where."""
        target = self.work / "kept" / row / name
        discard(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        (self.work / name).rename(target)
        self.kept[(row, name)] = target
        return target

    def each(self, row: str, names: list[str], measure: Callable[[type[Server], Result], None],
             reusable: tuple[str, ...] = ()) -> None:
        """Run `measure` for each selected server, `repeat` times in turn, each time on a fresh
        server; keep the median of each metric and the highest peak RSS. An exception becomes
        that server's error and does not stop the others. The data directory of a server in
        `reusable` after a good repetition is put aside (see `keep`) when a later row reuses it."""
        runs: dict[str, list[Result]] = {name: [] for name in names if name in self.servers}
        for repetition in range(self.repeat):
            for name, results in runs.items():
                result = Result(row, name)
                started = time.perf_counter()
                try:
                    measure(SERVERS[name], result)
                except Exception as exc:
                    result.error = f"{type(exc).__name__}: {exc}"
                    traceback.print_exc()
                results.append(result)
                shown = ", ".join(f"{k} {v:,.1f}" for k, v in result.metrics.items())
                print(f"  {row:<8} {name:<9} {repetition + 1}/{self.repeat} {shown}  "
                      f"peak RSS {result.peak_rss_mib or 0:,.0f} MiB"
                      f"{f'  FAILURES {result.failures}' if result.failures else ''}"
                      f"{f'  ERROR {result.error}' if result.error else ''}"
                      f"  ({time.perf_counter() - started:.0f} s)", flush=True)
                if name in reusable and row in self.reuse and not result.error and not result.failures:
                    self.keep(row, name)
                discard(self.work / name)
        for name, results in runs.items():
            good = [r for r in results if not r.error]
            self.results.append(Result(
                row, name,
                metrics={k: statistics.median(r.metrics[k] for r in good) for k in (good[0].metrics if good else {})},
                peak_rss_mib=max((r.peak_rss_mib for r in good if r.peak_rss_mib), default=None),
                failures=sum(r.failures for r in results),
                error="; ".join(dict.fromkeys(r.error for r in results if r.error)) if not good else "",
                runs=[{"metrics": r.metrics, "peak_rss_mib": r.peak_rss_mib, "error": r.error} for r in results]))


def megabytes(files: list[Path]) -> float:
    return sum(f.stat().st_size for f in files) / 1e6


# --- rows -----------------------------------------------------------------------------------

def ingest(ctx: Context, row: str, chunks: list[list[Path]], nodelay: bool = True,
           reusable: tuple[str, ...] = ()) -> None:
    """storescu, one process per chunk, all at once; every server on the same files."""
    count = sum(len(c) for c in chunks)
    mb = megabytes([f for c in chunks for f in c])

    def measure(cls: type[Server], result: Result) -> None:
        with cls(ctx.work) as server:
            seconds, result.failures, cost = storescu_costed(server, chunks, nodelay)
            result.peak_rss_mib = server.peak_rss_mib()
        result.metrics = {"per_second": count / seconds, "mb_per_second": mb / seconds, "seconds": seconds,
                          "server_cpu_us": (cost.user + cost.system) / count * 1e6,
                          "machine_cpu_us": cost.machine_busy / count * 1e6}

    ctx.each(row, list(SERVERS), measure, reusable)


def row_small(ctx: Context) -> None:
    ingest(ctx, "small", [corpus_mod.write_small(ctx.corpus)])


def row_ct512(ctx: Context) -> None:
    ingest(ctx, "ct512", [corpus_mod.write_ct512(ctx.corpus)], reusable=("pacsd", "orthanc"))


def row_small4(ctx: Context) -> None:
    files = corpus_mod.write_small(ctx.corpus)
    quarter = len(files) // 4
    ingest(ctx, "small4", [files[i * quarter:(i + 1) * quarter] for i in range(4)])


def row_nagle(ctx: Context) -> None:
    ingest(ctx, "nagle", [corpus_mod.write_small(ctx.corpus)[:200]], nodelay=False)


def row_assoc(ctx: Context) -> None:
    """One association per instance, as some modalities send: 100 storescu runs of one file
    each, one after another, with storescu's default proposal (~128 presentation contexts).
    Besides the rate, the server's CPU time per association."""
    files = corpus_mod.write_small(ctx.corpus)[:100]
    mb = megabytes(files)

    def measure(cls: type[Server], result: Result) -> None:
        with cls(ctx.work) as server:
            cpu = server.cpu_seconds()
            seconds = 0.0
            for f in files:
                took, failed = storescu(server, [[f]])
                seconds += took
                result.failures += failed
            cpu = server.cpu_seconds() - cpu
            result.peak_rss_mib = server.peak_rss_mib()
        result.metrics = {"per_second": len(files) / seconds, "mb_per_second": mb / seconds,
                          "seconds": seconds, "server_cpu_ms": cpu * 1000 / len(files)}

    ctx.each("assoc", list(SERVERS), measure)


def row_huge(ctx: Context) -> None:
    ingest(ctx, "huge", [[corpus_mod.write_huge(ctx.corpus / "huge")]])


def row_find(ctx: Context) -> None:
    """1,000 studies stored with storescu, then the same queries to pacsd and Orthanc."""
    files = corpus_mod.write_find(ctx.corpus)

    def measure(cls: type[Server], result: Result) -> None:
        with cls(ctx.work) as server:
            seconds, result.failures = storescu(server, [files])
            latencies, counts = asyncio.run(find_latencies(server.port, ctx.queries, server.ae))
            result.peak_rss_mib = server.peak_rss_mib()
        result.metrics = find_metrics(latencies, counts) | {"store_per_second": len(files) / seconds}

    ctx.each("find", ["pacsd", "orthanc"], measure, reusable=("pacsd", "orthanc"))


def row_find10k(ctx: Context) -> None:
    """pacsd only: an index of 10,000 studies / 1,000,000 instances filled through its tables
    (once a run; each repetition starts on a copy)."""
    filled, fill = filled_index(ctx)

    def measure(cls: type[Server], result: Result) -> None:
        server = on_filled_index(cls(ctx.work), filled)
        with server:
            latencies, counts = asyncio.run(find_latencies(server.port, ctx.queries, server.ae))
            result.peak_rss_mib = server.peak_rss_mib()
        result.metrics = find_metrics(latencies, counts) | {"fill_seconds": fill}

    ctx.each("find10k", ["pacsd"], measure)
    if "find10k" not in ctx.reuse:
        discard(filled.parent)
        ctx.filled = None


def filled_index(ctx: Context) -> tuple[Path, float]:
    """The find10k index, filled on first use and shared by the rows of this run."""
    if ctx.filled is None:
        filled = ctx.work / "find10k" / "index.db"
        filled.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        fill_index(f"sqlite+aiosqlite:///{filled}", ctx.studies, ctx.per_study)
        ctx.filled = filled, time.perf_counter() - started
    return ctx.filled


def on_filled_index(server: Server, filled: Path) -> Server:
    for suffix in ("", "-wal"):
        if Path(f"{filled}{suffix}").exists():
            shutil.copy(f"{filled}{suffix}", server.data / f"index.db{suffix}")
    return server


@contextmanager
def holding(ctx: Context, row: str, cls: type[Server], files: list[Path]) -> Iterator[Server]:
    """A server started on a data directory that holds `files`: the one the row `row` left
    behind in this run, or else one filled now with storescu by a server that is then
    stopped. Either way the server measured has only started and served the reads, so its
    peak RSS is theirs. The directory is put aside again afterwards for the next repetition."""
    kept = ctx.kept.get((row, cls.name))
    if kept is None:
        with cls(ctx.work) as server:
            _, failures = storescu(server, [files])
        if failures:
            raise RuntimeError(f"{failures} of {len(files)} instances were not stored")
        kept = ctx.keep(row, cls.name)
    server = cls(ctx.work)
    server.data.rmdir()
    kept.rename(server.data)
    try:
        with server:
            yield server
    finally:
        server.data.rename(kept)


def row_move(ctx: Context) -> None:
    """The 200 x 512x512 study, stored with storescu, then C-MOVEd to a storescp by movescu."""
    files = corpus_mod.write_ct512(ctx.corpus)
    study = corpus_mod.uid("ct512", "study", 0)
    mb = megabytes(files)

    def measure(cls: type[Server], result: Result) -> None:
        destination = StoreSCP(ctx.work / "move-destination")
        destination.ae = "DEST"
        with destination, cls(ctx.work, peers={"DEST": destination.port}) as server:
            _, result.failures = storescu(server, [files])
            seconds, code = movescu(server, "DEST", study)
            result.peak_rss_mib = server.peak_rss_mib()
            received = destination.received()
        result.failures += len(files) - received
        if code:
            result.error = f"movescu exited {code}"
        result.metrics = {"per_second": received / seconds, "mb_per_second": mb * received / len(files) / seconds,
                          "seconds": seconds}
        discard(ctx.work / "move-destination")

    ctx.each("move", ["pacsd", "orthanc"], measure)


def row_get(ctx: Context) -> None:
    """The 200 x 512x512 study that ct512 stored, retrieved by getscu with C-GET (the
    instances come back on the requesting association)."""
    files = corpus_mod.write_ct512(ctx.corpus)
    study = corpus_mod.uid("ct512", "study", 0)
    mb = megabytes(files)

    def measure(cls: type[Server], result: Result) -> None:
        received = ctx.work / "get-destination"
        discard(received)
        try:
            with holding(ctx, "ct512", cls, files) as server:
                seconds, code = getscu(server, study, received)
                result.peak_rss_mib = server.peak_rss_mib()
            count = sum(1 for _ in received.iterdir())
        finally:
            discard(received)
        result.failures = len(files) - count
        if code:
            result.error = f"getscu exited {code}"
        result.metrics = {"per_second": count / seconds, "mb_per_second": mb * count / len(files) / seconds,
                          "seconds": seconds}

    ctx.each("get", ["pacsd", "orthanc"], measure)


# --- DICOMweb -------------------------------------------------------------------------------

# What a viewer or a Python client asks for when it wants the stored bytes, whatever their
# transfer syntax; Orthanc's plugin (1.7) accepts it as it is.
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
CURL = "/usr/bin/curl"


def row_wado(ctx: Context) -> None:
    """WADO-RS retrieve of the 200 x 512x512 study, read to the end `ctx.retrieves` times."""
    files = corpus_mod.write_ct512(ctx.corpus)
    study = corpus_mod.uid("ct512", "study", 0)

    def measure(cls: type[Server], result: Result) -> None:
        with holding(ctx, "ct512", cls, files) as server:
            url = f"{server.dicomweb}/studies/{study}"
            # One untimed retrieve that counts the parts: each instance must come back.
            result.failures = len(files) - count_parts(url)
            timings = [timed_get(url) for _ in range(ctx.retrieves)]
            result.peak_rss_mib = server.peak_rss_mib()
        result.metrics = {"mb_per_second": statistics.median(size / total / 1e6 for size, _, total in timings),
                          "first_byte_ms": statistics.median(first * 1000 for _, first, _ in timings),
                          "mb": timings[0][0] / 1e6}

    ctx.each("wado", ["pacsd", "orthanc"], measure)


def count_parts(url: str) -> int:
    """Reads the multipart/related answer to a WADO-RS retrieve as a stream; its parts."""
    import httpx

    with httpx.Client(timeout=120) as client, client.stream("GET", url, headers={"Accept": WADO_ACCEPT}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"GET {url}: HTTP {r.status_code} {r.read()[:200]!r}")
        found = re.search(r'boundary="?([^";]+)', r.headers.get("content-type", ""))
        if not found:
            raise RuntimeError(f"GET {url}: no boundary in {r.headers.get('content-type')!r}")
        delimiter = b"--" + found.group(1).encode()
        seen, tail = 0, b""
        for chunk in r.iter_raw():
            data = tail + chunk
            seen += data.count(delimiter)
            tail = data[-(len(delimiter) - 1):]
    return seen - 1  # the last delimiter closes the body


def timed_get(url: str) -> tuple[int, float, float]:
    """(body bytes, seconds to the first byte, seconds in all) of one WADO-RS retrieve, by
    curl, which reads ~1.4 GB/s on loopback where httpx manages ~0.5: a Python client would
    be what the row measures."""
    if not Path(CURL).exists():
        import httpx
        started = time.perf_counter()
        first, size = None, 0
        with httpx.stream("GET", url, headers={"Accept": WADO_ACCEPT}, timeout=120) as r:
            if r.status_code != 200:
                raise RuntimeError(f"GET {url}: HTTP {r.status_code}")
            for chunk in r.iter_raw():
                first = first or time.perf_counter() - started
                size += len(chunk)
        return size, first or 0.0, time.perf_counter() - started
    out = subprocess.run([CURL, "-sS", "-o", os.devnull, "-H", f"Accept: {WADO_ACCEPT}",
                          "-w", "%{http_code} %{size_download} %{time_starttransfer} %{time_total}", url],
                         capture_output=True, text=True, timeout=300)
    code, size, first, total = out.stdout.split() if out.returncode == 0 else ("", 0, 0, 0)
    if code != "200":
        raise RuntimeError(f"curl GET {url}: {code or out.stderr.strip()}")
    return int(size), float(first), float(total)


# A STOW-RS request of this many instances: an uploader sends a series in a few requests.
STOW_BATCH = 50
STOW_BOUNDARY = "pacsd-bench-stow-boundary"


def row_stow(ctx: Context) -> None:
    """STOW-RS of the 2,000 CT 64x64, 50 instances per request, one request after another
    over one keep-alive connection (httpx; the bodies are built before the clock starts)."""
    import httpx

    files = corpus_mod.write_small(ctx.corpus)
    bodies = [stow_body(files[i:i + STOW_BATCH]) for i in range(0, len(files), STOW_BATCH)]
    mb = megabytes(files)
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={STOW_BOUNDARY}',
               "Accept": "application/dicom+json"}

    def measure(cls: type[Server], result: Result) -> None:
        with cls(ctx.work) as server, httpx.Client(timeout=300) as client:
            url = f"{server.dicomweb}/studies"
            started = time.perf_counter()
            stored = 0
            for body in bodies:
                r = client.post(url, content=body, headers=headers)
                if r.status_code not in (200, 202):
                    raise RuntimeError(f"POST {url}: HTTP {r.status_code} {r.text[:200]}")
                stored += len(r.json().get("00081199", {}).get("Value", []))
            seconds = time.perf_counter() - started
            result.peak_rss_mib = server.peak_rss_mib()
        result.failures = len(files) - stored
        result.metrics = {"per_second": len(files) / seconds, "mb_per_second": mb / seconds, "seconds": seconds}

    ctx.each("stow", ["pacsd", "orthanc"], measure)


def stow_body(files: list[Path]) -> bytes:
    """A multipart/related body with each file as one application/dicom part."""
    parts = [b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (STOW_BOUNDARY.encode(), f.read_bytes())
             for f in files]
    return b"".join(parts) + b"--%s--\r\n" % STOW_BOUNDARY.encode()


def row_qido(ctx: Context) -> None:
    """QIDO-RS study queries on the 1,000 studies of the find row."""
    files = corpus_mod.write_find(ctx.corpus)

    def measure(cls: type[Server], result: Result) -> None:
        with holding(ctx, "find", cls, files) as server:
            result.metrics, result.failures = qido_latencies(server.dicomweb, ctx.queries, len(files) // 5)
            result.peak_rss_mib = server.peak_rss_mib()

    ctx.each("qido", ["pacsd", "orthanc"], measure)


def row_qido10k(ctx: Context) -> None:
    """pacsd only: the same QIDO-RS queries on the find10k index."""
    filled, _ = filled_index(ctx)

    def measure(cls: type[Server], result: Result) -> None:
        with on_filled_index(cls(ctx.work), filled) as server:
            result.metrics, result.failures = qido_latencies(server.dicomweb, ctx.queries, ctx.studies // 5)
            result.peak_rss_mib = server.peak_rss_mib()

    ctx.each("qido10k", ["pacsd"], measure)


# The study attributes a worklist shows beyond the required ones (as OHIF asks for them).
INCLUDE = ["00081030", "00080061", "00201206", "00201208"]  # description, modalities, series, instances


def qido_latencies(base: str, queries: int, patients: int) -> tuple[dict[str, float], int]:
    """Two kinds of STUDY query, `queries` of each, over one keep-alive connection: one
    patient's studies by PatientID (5 matches) with INCLUDE, and the C-FIND rows' PatientName
    wildcard + half-year StudyDate range. p50/p99 ms of each, matches, and failed requests."""
    import httpx

    rng = random.Random(2)
    kinds: dict[str, list[float]] = {"patient": [], "range": []}
    matches, failures = 0, 0
    with httpx.Client(base_url=base, timeout=60, headers={"Accept": "application/dicom+json"}) as client:
        for n in range(2 * queries):
            if n % 2 == 0:
                kind = "patient"
                params = [("PatientID", f"P{rng.randrange(patients):06d}")] + [("includefield", t) for t in INCLUDE]
            else:
                kind = "range"
                year = 2010 + rng.randrange(16)
                params = [("PatientName", f"{rng.choice(corpus_mod.NAMES)}^*"),
                          ("StudyDate", f"{year}0101-{year}0630")]
            # Written out rather than percent-encoded: Orthanc 1.10.1 does not decode %5E / %2A
            # in query values (PatientName=ADAMS%5E* matches nothing there), and ^ and * may
            # stand in a query as they are.
            query = "&".join(f"{key}={value}" for key, value in params)
            started = time.perf_counter()
            r = client.get(f"/studies?{query}")
            body = r.content
            kinds[kind].append((time.perf_counter() - started) * 1000)
            if r.status_code == 200:
                matches += len(json.loads(body))
            elif r.status_code != 204:  # 204: no study matched
                failures += 1
                if failures == 1:
                    print(f"    GET /studies?{query}: HTTP {r.status_code} {body[:200]!r}")
    if failures == 2 * queries:
        raise RuntimeError(f"every QIDO-RS request failed ({base})")
    metrics = {}
    for kind, latencies in kinds.items():
        metrics |= {f"{kind}_p50_ms": percentile(latencies, 50), f"{kind}_p99_ms": percentile(latencies, 99)}
    return metrics | {"total_matches": matches}, failures


INGEST = [("per_second", "inst/s (MB/s)")]
# CPU per instance: the server's own, and the whole machine's (clients and the kernel's
# threads included), which is what bounds a row once the cores are busy.
CPU = [("server_cpu_us", "server CPU µs/inst"), ("machine_cpu_us", "machine CPU µs/inst")]
FIND = [("p50_ms", "p50 ms"), ("p99_ms", "p99 ms")]
QIDO = [("patient_p50_ms", "PatientID p50 ms"), ("patient_p99_ms", "PatientID p99 ms"),
        ("range_p50_ms", "name+dates p50 ms"), ("range_p99_ms", "name+dates p99 ms")]
# key, title, (metric, label) lines of the table, function
ROWS: list[tuple[str, str, list[tuple[str, str]], Callable[[Context], None]]] = [
    ("small", "C-STORE 2,000 CT 64x64, 1 association", INGEST + CPU, row_small),
    ("ct512", "C-STORE 200 CT 512x512, 1 association", INGEST + CPU, row_ct512),
    ("small4", "C-STORE 2,000 CT 64x64, 4 associations", INGEST + CPU, row_small4),
    ("nagle", "C-STORE 200 CT 64x64, storescu default (Nagle on)", INGEST, row_nagle),
    ("assoc", "C-STORE 100 CT 64x64, one association each", INGEST + [("server_cpu_ms", "server CPU ms")],
     row_assoc),
    ("find", "C-FIND STUDY, 1,000 studies stored by C-STORE", FIND + [
        ("store_per_second", "C-STORE inst/s, one study each")], row_find),
    ("find10k", "C-FIND STUDY, 10,000 studies / 1M instances (pacsd only)", FIND, row_find10k),
    ("qido", "QIDO-RS studies, 1,000 studies stored by C-STORE", QIDO, row_qido),
    ("qido10k", "QIDO-RS studies, 10,000 studies / 1M instances (pacsd only)", QIDO, row_qido10k),
    ("move", "C-MOVE 200 CT 512x512 to storescp", INGEST, row_move),
    ("get", "C-GET 200 CT 512x512 by getscu", INGEST, row_get),
    ("stow", "STOW-RS 2,000 CT 64x64, 50 per request", INGEST, row_stow),
    ("wado", "WADO-RS retrieve of the 200 CT 512x512 study", [("mb_per_second", "MB/s"),
                                                               ("first_byte_ms", "first byte ms"),
                                                               ("peak_rss_mib", "peak RSS MiB")], row_wado),
    ("huge", "C-STORE one 1 GiB multi-frame instance", [("mb_per_second", "MB/s"),
                                                        ("peak_rss_mib", "peak RSS MiB")], row_huge),
]


# --- C-FIND ---------------------------------------------------------------------------------

def fill_index(url: str, studies: int, per_study: int) -> None:
    """Synthetic patients/studies/series/instances straight into pacsd's tables, in bulk;
    patients and dates as in the find corpus (corpus.study_identity)."""
    import sqlalchemy as sa

    from pacsd.index.db import upgrade
    from pacsd.index.schema import instances, patients, series, studies as studies_t

    upgrade(url)
    engine = sa.create_engine(url.replace("+aiosqlite", ""))
    now = datetime.now(timezone.utc)
    per_series = max(1, per_study // 4)
    identities = [corpus_mod.study_identity(s) for s in range(studies)]
    with engine.begin() as conn:
        patient_rows = []
        for p in range(studies // 5):
            name, patient_id = identities[p * 5]["PatientName"], identities[p * 5]["PatientID"]
            patient_rows.append(dict(pk=p + 1, patient_id=patient_id, issuer_of_patient_id="",
                                     patient_name=name, patient_birth_date="19700101",
                                     patient_birth_time="", patient_sex="O", num_studies=5,
                                     num_series=20, num_instances=5 * per_study,
                                     attrs=json.dumps({"00100010": {"vr": "PN", "Value": [{"Alphabetic": name}]}}),
                                     created_at=now, updated_at=now))
        conn.execute(patients.insert(), patient_rows)
        study_rows, series_rows = [], []
        for s, identity in enumerate(identities):
            date = identity["StudyDate"]
            study_rows.append(dict(pk=s + 1, patient_pk=s // 5 + 1, study_instance_uid=f"{corpus_mod.PREFIX}7.{s}",
                                   study_date=date, study_time="120000", accession_number=f"A{s:08d}",
                                   study_id=str(s), referring_physician_name="", study_description="BENCH",
                                   modalities_in_study="CT", sop_classes_in_study="1.2.840.10008.5.1.4.1.1.2",
                                   num_series=4, num_instances=per_study,
                                   attrs=json.dumps({"00080020": {"vr": "DA", "Value": [date]}}),
                                   created_at=now, updated_at=now))
            for k in range(4):
                series_rows.append(dict(pk=s * 4 + k + 1, study_pk=s + 1,
                                        series_instance_uid=f"{corpus_mod.PREFIX}8.{s}.{k}",
                                        modality="CT", series_number=k + 1, num_instances=per_series,
                                        attrs="{}", created_at=now, updated_at=now))
        conn.execute(studies_t.insert(), study_rows)
        conn.execute(series.insert(), series_rows)
        batch, pk = [], 0
        for srs in series_rows:
            for i in range(per_series):
                pk += 1
                batch.append(dict(pk=pk, series_pk=srs["pk"], sop_instance_uid=f"{srs['series_instance_uid']}.{i}",
                                  sop_class_uid="1.2.840.10008.5.1.4.1.1.2", instance_number=i + 1,
                                  transfer_syntax_uid="1.2.840.10008.1.2.1", size=0, sha256="0" * 64,
                                  blob_key=f"bench/{pk}", dataset_offset=0, received_at=now,
                                  calling_ae="BENCH", attrs="{}"))
                if len(batch) == 20000:
                    conn.execute(instances.insert(), batch)
                    batch = []
        if batch:
            conn.execute(instances.insert(), batch)
    engine.dispose()


async def find_latencies(port: int, queries: int, called_ae: str) -> tuple[list[float], list[int]]:
    """STUDY-level queries (PatientName wildcard + half-year StudyDate range) over one
    association opened by pacsd's own SCU; milliseconds per query and matches per query."""
    from pydicom import Dataset

    from pacsd.dul.negotiation import ProposedContext
    from pacsd.net.qrscu import MODELS, UNCOMPRESSED, find
    from pacsd.net.requestor import associate

    sop_class = MODELS["study"][0]
    rng = random.Random(2)
    latencies, counts = [], []
    async with associate("127.0.0.1", port, calling_ae="BENCH", called_ae=called_ae,
                         contexts=[ProposedContext(sop_class, UNCOMPRESSED)]) as assoc:
        for _ in range(queries):
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.PatientName = f"{rng.choice(corpus_mod.NAMES)}^*"
            year = 2010 + rng.randrange(16)
            ds.StudyDate = f"{year}0101-{year}0630"
            ds.StudyInstanceUID = ""
            ds.NumberOfStudyRelatedInstances = ""
            started = time.perf_counter()
            n = 0
            async for _status, found, _ in find(assoc, sop_class, ds):
                n += found is not None
            latencies.append((time.perf_counter() - started) * 1000)
            counts.append(n)
    return latencies, counts


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def find_metrics(latencies: list[float], counts: list[int]) -> dict[str, float]:
    return {"p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "mean_matches": statistics.mean(counts), "total_matches": sum(counts)}


# --- table ----------------------------------------------------------------------------------

def value(doc: dict, row: str, server: str, metric: str) -> float | None:
    for r in doc["results"]:
        if r["row"] == row and r["server"] == server and not r["error"]:
            return r["peak_rss_mib"] if metric == "peak_rss_mib" else r["metrics"].get(metric)
    return None


def ratios(doc: dict) -> dict[tuple[str, str, str], float]:
    """pacsd / peer for every (row, metric label, peer) the run has both sides of."""
    out = {}
    for row in doc["rows"]:
        for metric, label in row["metrics"]:
            mine = value(doc, row["key"], "pacsd", metric)
            for peer in PEERS:
                theirs = value(doc, row["key"], peer, metric)
                if mine is not None and theirs:
                    out[(row["key"], label, peer)] = mine / theirs
    return out


def pair_ratios(doc: dict) -> dict[tuple[str, str, str], list[float]]:
    """pacsd / peer for each repetition, pairing pacsd's run i with the peer's run i: the two
    ran minutes apart at most, so the pairs show how much of a ratio is the machine drifting
    (its disk above all) rather than the servers."""
    runs = {(r["row"], r["server"]): r["runs"] for r in doc["results"]}
    out: dict[tuple[str, str, str], list[float]] = {}
    for row in doc["rows"]:
        for metric, label in row["metrics"]:
            mine = runs.get((row["key"], "pacsd"), [])
            for peer in PEERS:
                pairs = []
                for a, b in zip(mine, runs.get((row["key"], peer), [])):
                    x, y = (run["peak_rss_mib"] if metric == "peak_rss_mib" else run["metrics"].get(metric)
                            for run in (a, b))
                    if not a["error"] and not b["error"] and x is not None and y:
                        pairs.append(x / y)
                if pairs:
                    out[(row["key"], label, peer)] = pairs
    return out


def fmt_ratio(ratio: float | None, pairs: list[float]) -> str:
    """The ratio of the medians, and the range of the per-repetition ratios when there are
    several."""
    if ratio is None:
        return "—"
    if len(pairs) < 2:
        return f"{ratio:.2f}"
    return f"{ratio:.2f} ({min(pairs):.2f}–{max(pairs):.2f})"


def fmt(x: float | None, digits: int = 0) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def markdown(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    rule = ["-" * w for w in widths]
    return "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
                     for cells in [header, rule, *lines])


def table(doc: dict) -> str:
    ratio, pairs = ratios(doc), pair_ratios(doc)
    header = ["workload", "metric", *(LABELS[s] for s in SERVERS), *(f"pacsd/{LABELS[p]}" for p in PEERS),
              *(f"peak RSS MiB {LABELS[s]}" for s in SERVERS)]
    lines = []
    for row in doc["rows"]:
        for n, (metric, label) in enumerate(row["metrics"]):
            cells = [row["title"] if n == 0 else "", label]
            for server in SERVERS:
                v = value(doc, row["key"], server, metric)
                cell = fmt(v, 1 if metric.endswith("_ms") or metric == "mb_per_second" else 0)
                if metric == "per_second" and v is not None:
                    cell += f" ({fmt(value(doc, row['key'], server, 'mb_per_second'), 1)})"
                cells.append(cell)
            cells += [fmt_ratio(ratio.get((row["key"], label, p)), pairs.get((row["key"], label, p), []))
                      for p in PEERS]
            cells += [fmt(value(doc, row["key"], s, "peak_rss_mib")) if n == 0 else "" for s in SERVERS]
            lines.append(cells)
    notes = [f"{r['row']} / {r['server']}: {r['failures']} failed instances over {len(r['runs'])} runs" for r in doc["results"] if r["failures"]]
    notes += [f"{r['row']} / {r['server']}, run {n + 1}: {run['error']}"
              for r in doc["results"] for n, run in enumerate(r["runs"]) if run["error"]]
    for row in doc["rows"]:  # the same queries must find the same studies everywhere
        found = {s: value(doc, row["key"], s, "total_matches") for s in SERVERS}
        if len({v for v in found.values() if v is not None}) > 1:
            notes.append(f"{row['key']}: the servers matched different numbers of studies: {found}")
    return markdown(header, lines) + "".join(f"\n\nNOTE {n}" for n in notes)


# What pacsd aims for (the benchmark's issue): (row, metric, against, the bound, "min" or
# "max"). Against a peer the bound is on pacsd/peer; against None, on pacsd's own value.
TARGETS: list[tuple[str, str, str | None, float, str]] = [
    ("small", "per_second", "orthanc", 2.0, "min"),
    ("small", "per_second", "storescp", 0.9, "min"),
    ("ct512", "per_second", "orthanc", 1.5, "min"),
    ("ct512", "per_second", "storescp", 0.8, "min"),
    ("small4", "per_second", "orthanc", 1.5, "min"),
    ("small4", "per_second", "storescp", 0.7, "min"),
    ("nagle", "per_second", "orthanc", 10.0, "min"),
    ("move", "per_second", "orthanc", 1.0, "min"),
    ("find10k", "p99_ms", None, 50.0, "max"),
    ("huge", "peak_rss_mib", None, 200.0, "max"),
]


def targets(doc: dict) -> str:
    """The targets this run measured, each with what the run gave (medians) and whether it
    holds; a target whose row or peer the run left out is not listed."""
    titles = {row["key"]: row["title"] for row in doc["rows"]}
    labels = {row["key"]: dict(row["metrics"]) for row in doc["rows"]}
    lines = []
    for key, metric, peer, bound, kind in TARGETS:
        if key not in titles:
            continue
        mine = value(doc, key, "pacsd", metric)
        theirs = value(doc, key, peer, metric) if peer else None
        if mine is None or (peer and not theirs):
            continue
        measured = mine / theirs if peer else mine
        label = labels[key].get(metric, "peak RSS MiB" if metric == "peak_rss_mib" else metric)
        what = f"pacsd/{LABELS[peer]}" if peer else f"pacsd {label}"
        sign = ">=" if kind == "min" else "<"
        held = measured >= bound if kind == "min" else measured < bound
        lines.append([titles[key], f"{what} {sign} {bound:g}", f"{measured:,.2f}", "yes" if held else "no"])
    if not lines:
        return ""
    return markdown(["workload", "target", "this run", "met"], lines)


# --- run ------------------------------------------------------------------------------------

def versions() -> dict[str, str]:
    def run(*args: str) -> str:
        try:
            return subprocess.run(args, capture_output=True, text=True, timeout=30).stdout.strip()
        except OSError:
            return ""
    return {"orthanc": run("dpkg-query", "-W", "-f=${Version}", "orthanc"),
            "orthanc-dicomweb": run("dpkg-query", "-W", "-f=${Version}", "orthanc-dicomweb"),
            "dcmtk": run("dpkg-query", "-W", "-f=${Version}", "dcmtk"),
            "pacsd": run("git", "-C", str(HERE.parent), "describe", "--always", "--dirty")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(key for key, *_ in ROWS), help="rows to run, comma-separated")
    parser.add_argument("--servers", default=",".join(SERVERS), help="servers to run, comma-separated")
    parser.add_argument("--corpus", type=Path, default=Path(tempfile.gettempdir()) / "pacsd-bench-corpus",
                        help="where the generated corpus lives (kept and reused between runs)")
    parser.add_argument("--work", type=Path, help="scratch directory for the servers (kept if given)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each row and server (median kept)")
    parser.add_argument("--queries", type=int, default=200,
                        help="C-FIND queries per server; QIDO-RS: this many of each kind")
    parser.add_argument("--retrieves", type=int, default=5, help="timed WADO-RS retrieves per run (median kept)")
    parser.add_argument("--studies", type=int, default=10_000, help="studies in the find10k index")
    parser.add_argument("--instances-per-study", type=int, default=100, help="instances a study in find10k")
    args = parser.parse_args()
    only, servers = args.only.split(","), args.servers.split(",")
    unknown = set(only) - {key for key, *_ in ROWS} | set(servers) - set(SERVERS)
    if unknown:
        parser.error(f"unknown rows or servers: {', '.join(sorted(unknown))}")
    tools = [STORESCU, MOVESCU, GETSCU] + [{"orthanc": ORTHANC, "storescp": STORESCP}.get(s, "") for s in servers]
    missing = [t for t in tools if t and not Path(t).exists()]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: `make bench` installs them (Debian packages orthanc, "
                 "orthanc-dicomweb, dcmtk)")

    work = args.work or Path(tempfile.mkdtemp(prefix="pacsd-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    reused = {row for row, later in (("ct512", "wado"), ("ct512", "get"), ("find", "qido"), ("find10k", "qido10k"))
              if later in only}
    ctx = Context(args.corpus, work, servers, args.queries, args.studies, args.instances_per_study, args.repeat,
                  args.retrieves, reuse=reused)
    load = os.getloadavg()
    fsync = fdatasync_ms(work)
    print(f"fdatasync of a 4 KiB append in {work}: {fsync:.2f} ms (median)", flush=True)
    create = create_us(work)
    print(f"creating a file there: {create:.0f} µs (median)", flush=True)
    started = time.time()
    machine_before = machine_cpu()
    print(f"corpus in {args.corpus} (generated once, then reused), servers in {work}", flush=True)
    corpus_mod.write_small(args.corpus), corpus_mod.write_ct512(args.corpus), corpus_mod.write_find(args.corpus)
    if "huge" in only:
        corpus_mod.write_huge(args.corpus / "huge")
    print(f"corpus ready after {time.time() - started:.0f} s", flush=True)
    rows = [(key, title, metrics, fn) for key, title, metrics, fn in ROWS if key in only]
    for key, title, _, fn in rows:
        print(f"{title}", flush=True)
        fn(ctx)

    machine = machine_cpu() - machine_before
    stolen = machine.stolen_percent
    doc = {"when": datetime.now().astimezone().isoformat(timespec="seconds"),
           "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
           "seconds": time.time() - started,
           "machine": {"cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                       "fdatasync_ms": fsync, "create_file_us": create, "cpu_stolen_percent": stolen,
                       "load_average_before": load[0], "load_average_after": os.getloadavg()[0]},
           "versions": versions(),
           "rows": [{"key": key, "title": title, "metrics": metrics} for key, title, metrics, _ in rows],
           "results": [asdict(r) for r in ctx.results]}
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    path = out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(doc, indent=2))
    print()
    print(table(doc))
    if goals := targets(doc):
        print(f"\nTargets (medians):\n\n{goals}")
    print(f"\n{doc['when']}, {doc['seconds']:.0f} s, fdatasync {fsync:.2f} ms, file creation {create:.0f} µs, "
          f"{stolen:.0f}% of the CPU stolen by the hypervisor, load average {load[0]:.1f} before and "
          f"{doc['machine']['load_average_after']:.1f} after; median of {args.repeat} runs, peak RSS the highest; "
          f"ratios are pacsd / peer (for ms and MiB lower is better); written to {os.path.relpath(path)}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    else:  # the data kept for later rows and the filled index are this run's alone
        for leftover in ["kept", "find10k", *(p.name for p in work.glob(".discarded-*"))]:
            shutil.rmtree(work / leftover, ignore_errors=True)


if __name__ == "__main__":
    main()
