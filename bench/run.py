"""pacsd side by side with Orthanc and DCMTK storescp: one run, one table (issue #5).

    .venv/bin/python bench/run.py [--only ROW,...] [--servers NAME,...] [--corpus DIR]

Rows (keys for --only): small, ct512, small4, nagle, find, find10k, move, huge.
Servers: pacsd, orthanc, storescp. Each server starts fresh for each row, on loopback with
TCP_NODELAY=1; the clients are DCMTK storescu / movescu and, for C-FIND, pacsd's own SCU
over one association (the same client for every server). The table gives each value and
the ratio pacsd / peer; the run is also written to bench/results/bench-<time>.json, which
bench/compare.py compares with another run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import corpus as corpus_mod  # noqa: E402
from servers import (ORTHANC, STORESCP, STORESCU, MOVESCU, Orthanc, Pacsd, Server,  # noqa: E402
                     StoreSCP, movescu, storescu)

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
    results: list[Result] = field(default_factory=list)

    def each(self, row: str, names: list[str], measure: Callable[[type[Server], Result], None]) -> None:
        """Run `measure` for each selected server, `repeat` times in turn, each time on a fresh
        server; keep the median of each metric and the highest peak RSS. An exception becomes
        that server's error and does not stop the others."""
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
                shutil.rmtree(self.work / name, ignore_errors=True)
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

def ingest(ctx: Context, row: str, chunks: list[list[Path]], nodelay: bool = True) -> None:
    """storescu, one process per chunk, all at once; every server on the same files."""
    count = sum(len(c) for c in chunks)
    mb = megabytes([f for c in chunks for f in c])

    def measure(cls: type[Server], result: Result) -> None:
        with cls(ctx.work) as server:
            seconds, result.failures = storescu(server, chunks, nodelay)
            result.peak_rss_mib = server.peak_rss_mib()
        result.metrics = {"per_second": count / seconds, "mb_per_second": mb / seconds, "seconds": seconds}

    ctx.each(row, list(SERVERS), measure)


def row_small(ctx: Context) -> None:
    ingest(ctx, "small", [corpus_mod.write_small(ctx.corpus)])


def row_ct512(ctx: Context) -> None:
    ingest(ctx, "ct512", [corpus_mod.write_ct512(ctx.corpus)])


def row_small4(ctx: Context) -> None:
    files = corpus_mod.write_small(ctx.corpus)
    quarter = len(files) // 4
    ingest(ctx, "small4", [files[i * quarter:(i + 1) * quarter] for i in range(4)])


def row_nagle(ctx: Context) -> None:
    ingest(ctx, "nagle", [corpus_mod.write_small(ctx.corpus)[:200]], nodelay=False)


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

    ctx.each("find", ["pacsd", "orthanc"], measure)


def row_find10k(ctx: Context) -> None:
    """pacsd only: an index of 10,000 studies / 1,000,000 instances filled through its tables
    (once; each repetition starts on a copy)."""
    filled = ctx.work / "find10k" / "index.db"
    filled.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    fill_index(f"sqlite+aiosqlite:///{filled}", ctx.studies, ctx.per_study)
    fill = time.perf_counter() - started

    def measure(cls: type[Server], result: Result) -> None:
        server = cls(ctx.work)
        for suffix in ("", "-wal"):
            if Path(f"{filled}{suffix}").exists():
                shutil.copy(f"{filled}{suffix}", server.data / f"index.db{suffix}")
        with server:
            latencies, counts = asyncio.run(find_latencies(server.port, ctx.queries, server.ae))
            result.peak_rss_mib = server.peak_rss_mib()
        result.metrics = find_metrics(latencies, counts) | {"fill_seconds": fill}

    ctx.each("find10k", ["pacsd"], measure)
    shutil.rmtree(filled.parent, ignore_errors=True)


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
        shutil.rmtree(ctx.work / "move-destination", ignore_errors=True)

    ctx.each("move", ["pacsd", "orthanc"], measure)


INGEST = [("per_second", "inst/s (MB/s)")]
FIND = [("p50_ms", "p50 ms"), ("p99_ms", "p99 ms")]
# key, title, (metric, label) lines of the table, function
ROWS: list[tuple[str, str, list[tuple[str, str]], Callable[[Context], None]]] = [
    ("small", "C-STORE 2,000 CT 64x64, 1 association", INGEST, row_small),
    ("ct512", "C-STORE 200 CT 512x512, 1 association", INGEST, row_ct512),
    ("small4", "C-STORE 2,000 CT 64x64, 4 associations", INGEST, row_small4),
    ("nagle", "C-STORE 200 CT 64x64, storescu default (Nagle on)", INGEST, row_nagle),
    ("find", "C-FIND STUDY, 1,000 studies stored by C-STORE", FIND, row_find),
    ("find10k", "C-FIND STUDY, 10,000 studies / 1M instances (pacsd only)", FIND, row_find10k),
    ("move", "C-MOVE 200 CT 512x512 to storescp", INGEST, row_move),
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


def fmt(x: float | None, digits: int = 0) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def markdown(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    rule = ["-" * w for w in widths]
    return "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
                     for cells in [header, rule, *lines])


def table(doc: dict) -> str:
    ratio = ratios(doc)
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
            cells += [fmt(ratio.get((row["key"], label, p)), 2) for p in PEERS]
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


# --- run ------------------------------------------------------------------------------------

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
    parser.add_argument("--queries", type=int, default=200, help="C-FIND queries per server")
    parser.add_argument("--studies", type=int, default=10_000, help="studies in the find10k index")
    parser.add_argument("--instances-per-study", type=int, default=100, help="instances a study in find10k")
    args = parser.parse_args()
    only, servers = args.only.split(","), args.servers.split(",")
    unknown = set(only) - {key for key, *_ in ROWS} | set(servers) - set(SERVERS)
    if unknown:
        parser.error(f"unknown rows or servers: {', '.join(sorted(unknown))}")
    tools = [STORESCU, MOVESCU] + [{"orthanc": ORTHANC, "storescp": STORESCP}.get(s, "") for s in servers]
    missing = [t for t in tools if t and not Path(t).exists()]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: `make bench` installs them (Debian packages orthanc, "
                 "orthanc-dicomweb, dcmtk)")

    work = args.work or Path(tempfile.mkdtemp(prefix="pacsd-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(args.corpus, work, servers, args.queries, args.studies, args.instances_per_study, args.repeat)
    load = os.getloadavg()
    fsync = fdatasync_ms(work)
    print(f"fdatasync of a 4 KiB append in {work}: {fsync:.2f} ms (median)", flush=True)
    started = time.time()
    print(f"corpus in {args.corpus} (generated once, then reused), servers in {work}", flush=True)
    corpus_mod.write_small(args.corpus), corpus_mod.write_ct512(args.corpus), corpus_mod.write_find(args.corpus)
    if "huge" in only:
        corpus_mod.write_huge(args.corpus / "huge")
    print(f"corpus ready after {time.time() - started:.0f} s", flush=True)
    rows = [(key, title, metrics, fn) for key, title, metrics, fn in ROWS if key in only]
    for key, title, _, fn in rows:
        print(f"{title}", flush=True)
        fn(ctx)

    doc = {"when": datetime.now().astimezone().isoformat(timespec="seconds"),
           "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
           "seconds": time.time() - started,
           "machine": {"cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                       "fdatasync_ms": fsync,
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
    print(f"\n{doc['when']}, {doc['seconds']:.0f} s, fdatasync {fsync:.2f} ms, load average {load[0]:.1f} before and "
          f"{doc['machine']['load_average_after']:.1f} after; median of {args.repeat} runs, peak RSS the highest; "
          f"ratios are pacsd / peer (for ms and MiB lower is better); written to {os.path.relpath(path)}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
