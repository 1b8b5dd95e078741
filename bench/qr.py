"""Query/Retrieve: C-FIND latency on a large index and C-MOVE throughput.

    .venv/bin/python bench/qr.py [--studies 10000] [--instances-per-study 100] [--queries 200]

C-FIND: the index is filled directly through the index tables (the ingest path is measured
by bench/ingest.py), then a running pacsd answers STUDY-level queries with a PatientName
wildcard and a StudyDate range, sent by pacsd's own SCU over one association, so the
latency is the server's and not a client's start-up; p50 and p99 are printed.
C-MOVE: 200 CT 512x512 instances are stored with storescu, then moved to DCMTK storescp
(TCP_NODELAY=1) with DCMTK movescu; instances/s is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import corpus as corpus_mod  # noqa: E402
from ingest import Pacsd, StoreSCP, free_port, peak_rss_mib, wait_for_port  # noqa: E402

NAMES = ["ADAMS", "BAKER", "CLARK", "DAVIS", "EVANS", "FRANK", "GREEN", "HARRIS", "IRWIN", "JONES"]


def fill_index(url: str, studies: int, per_study: int, seed: int = 1) -> None:
    """Synthetic patients/studies/series/instances straight into the tables, in bulk."""
    import sqlalchemy as sa

    from pacsd.index.db import upgrade
    from pacsd.index.schema import instances, patients, series, studies as studies_t

    upgrade(url)
    engine = sa.create_engine(url.replace("+aiosqlite", ""))
    rng = random.Random(seed)
    now = datetime.now(timezone.utc)
    per_series = max(1, per_study // 4)
    with engine.begin() as conn:
        patient_rows = []
        for p in range(studies // 5):
            name = f"{NAMES[p % 10]}^{chr(65 + p % 26)}{p:05d}"
            patient_rows.append(dict(pk=p + 1, patient_id=f"P{p:06d}", issuer_of_patient_id="",
                                     patient_name=name, patient_birth_date="19700101",
                                     patient_birth_time="", patient_sex="O", num_studies=5,
                                     num_series=20, num_instances=5 * per_study,
                                     attrs=json.dumps({"00100010": {"vr": "PN", "Value": [{"Alphabetic": name}]}}),
                                     created_at=now, updated_at=now))
        conn.execute(patients.insert(), patient_rows)
        study_rows, series_rows = [], []
        for s in range(studies):
            date = f"20{10 + s % 16:02d}{1 + rng.randrange(12):02d}{1 + rng.randrange(28):02d}"
            study_rows.append(dict(pk=s + 1, patient_pk=s // 5 + 1, study_instance_uid=f"1.2.826.0.1.3680043.10.1428.7.{s}",
                                   study_date=date, study_time="120000", accession_number=f"A{s:08d}",
                                   study_id=str(s), referring_physician_name="", study_description="BENCH",
                                   modalities_in_study="CT", sop_classes_in_study="1.2.840.10008.5.1.4.1.1.2",
                                   num_series=4, num_instances=per_study,
                                   attrs=json.dumps({"00080020": {"vr": "DA", "Value": [date]}}),
                                   created_at=now, updated_at=now))
            for k in range(4):
                series_rows.append(dict(pk=s * 4 + k + 1, study_pk=s + 1,
                                        series_instance_uid=f"1.2.826.0.1.3680043.10.1428.8.{s}.{k}",
                                        modality="CT", series_number=k + 1, num_instances=per_series,
                                        attrs="{}", created_at=now, updated_at=now))
        conn.execute(studies_t.insert(), study_rows)
        conn.execute(series.insert(), series_rows)
        batch = []
        pk = 0
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


async def find_latencies(port: int, queries: int) -> tuple[list[float], list[int]]:
    from pydicom import Dataset

    from pacsd.dul.negotiation import ProposedContext
    from pacsd.net.qrscu import MODELS, UNCOMPRESSED, find
    from pacsd.net.requestor import associate

    sop_class = MODELS["study"][0]
    rng = random.Random(2)
    latencies, counts = [], []
    async with associate("127.0.0.1", port, calling_ae="BENCH", called_ae="PACSD",
                         contexts=[ProposedContext(sop_class, UNCOMPRESSED)]) as assoc:
        for _ in range(queries):
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.PatientName = f"{rng.choice(NAMES)}^*"
            year = 2010 + rng.randrange(16)
            ds.StudyDate = f"{year}0101-{year}0630"
            ds.StudyInstanceUID = ""
            ds.NumberOfStudyRelatedInstances = ""
            started = time.perf_counter()
            n = 0
            async for status, found, _ in find(assoc, sop_class, ds):
                n += found is not None
            latencies.append((time.perf_counter() - started) * 1000)
            counts.append(n)
    return latencies, counts


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--instances-per-study", type=int, default=100)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--corpus", type=Path, default=Path(tempfile.gettempdir()) / "pacsd-bench-corpus")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="pacsd-bench-qr-"))
    results: dict = {"when": time.strftime("%Y%m%d-%H%M%S")}

    # C-FIND on a large index
    server = Pacsd(workdir)
    data = workdir / "pacsd"
    data.mkdir(parents=True)
    started = time.perf_counter()
    fill_index(f"sqlite+aiosqlite:///{data}/index.db", args.studies, args.instances_per_study)
    print(f"index filled: {args.studies} studies, {args.studies * args.instances_per_study} instances "
          f"in {time.perf_counter() - started:.1f} s", flush=True)
    server.start = _start_keeping_data(server)
    server.start()
    try:
        latencies, counts = asyncio.run(find_latencies(server.port, args.queries))
        rss = peak_rss_mib(server.proc.pid)
    finally:
        server.stop()
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    print(f"C-FIND STUDY, PatientName wildcard + StudyDate range: p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
          f"mean matches {statistics.mean(counts):.0f}, pacsd peak RSS {rss:.0f} MiB")
    results["find"] = {"p50_ms": p50, "p99_ms": p99, "mean_matches": statistics.mean(counts),
                       "studies": args.studies, "instances": args.studies * args.instances_per_study}

    # C-MOVE of 200 CT 512x512 to storescp
    large = corpus_mod.write_ct(args.corpus / "ct512", "ct512", 200, 512, 1)
    dest = StoreSCP(workdir)
    dest.ae = "DEST"
    dest.start()
    server = Pacsd(workdir)
    os.environ["PACSD_PEERS"] = json.dumps([{"ae_title": "DEST", "host": "127.0.0.1", "port": dest.port}])
    server.start()
    try:
        subprocess.run(["/usr/bin/storescu", "-aec", "PACSD", "127.0.0.1", str(server.port)]
                       + [str(f) for f in large], env=dict(os.environ, TCP_NODELAY="1"),
                       check=True, capture_output=True)
        study = corpus_mod.uid("ct512", "study", 0)
        n = len(large)
        started = time.perf_counter()
        moved = subprocess.run(["/usr/bin/movescu", "-S", "-aec", "PACSD", "-aem", "DEST",
                                "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                                "127.0.0.1", str(server.port)], capture_output=True, text=True)
        seconds = time.perf_counter() - started
        rss = peak_rss_mib(server.proc.pid)
    finally:
        server.stop()
        dest.stop()
        os.environ.pop("PACSD_PEERS", None)
    print(f"C-MOVE of {n} CT 512x512 to storescp: {n / seconds:.1f} instances/s "
          f"(movescu exit {moved.returncode}), pacsd peak RSS {rss:.0f} MiB")
    results["move"] = {"instances": n, "per_second": n / seconds, "exit": moved.returncode}
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"qr-{results['when']}.json").write_text(json.dumps(results, indent=2))
    shutil.rmtree(workdir, ignore_errors=True)


def _start_keeping_data(server: Pacsd):
    """Pacsd.start wipes its data dir; here the index was filled beforehand."""
    def start() -> None:
        env = dict(os.environ, PACSD_DICOM__PORT=str(server.port), PACSD_DICOM__BIND="127.0.0.1",
                   PACSD_STORAGE__DATA_DIR=str(server.workdir / "pacsd"), PACSD_LOGGING__LEVEL="warning")
        server.log = open(server.workdir / "pacsd.log", "w")
        server.proc = subprocess.Popen([sys.executable, "-m", "pacsd", "serve"], env=env,
                                       stdout=server.log, stderr=subprocess.STDOUT)
        wait_for_port(server.port, server.proc)
    return start


if __name__ == "__main__":
    main()
