"""Where the machine's CPU goes per stored instance: pacsd beside Orthanc (and storescp).

    .venv/bin/python bench/cpu.py [--row small|small4|ct512] [--servers pacsd,orthanc] [--runs 3]

When an ingest row is CPU-bound (four associations on two cores), its rate is the machine's
CPU divided by what one instance costs it, and that cost has three parts: the server's own
user and system time (all its processes), and everything else the machine did meanwhile:
the storescu clients, and the kernel's own threads, which run a server's fsyncs handed to
them (store/aio.py), its file system's journal commits and the disk's interrupts. This
starts each server fresh on the row's corpus and clients, as run.py does, the servers by
turns, and prints those three parts in µs per instance with the rate and how busy the
machine was (100% is every core), and the share of the cores' time the hypervisor gave to
other machines (steal: it counts in no column, and a run with much of it is a slow run).
The medians over the runs are in the last lines.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ab import ROWS  # noqa: E402
from run import SERVERS  # noqa: E402
from servers import machine_now, storescu_costed  # noqa: E402

COLUMNS = ("instances/s", "server user µs", "server system µs", "everything else µs", "machine busy %",
           "stolen %")


def measure(cls, work: Path, files: list[Path], associations: int) -> dict[str, float]:
    """One fresh server storing `files`: the COLUMNS."""
    with cls(work) as server:
        seconds, failures, cost = storescu_costed(server, [files[i::associations] for i in range(associations)])
    if failures:
        raise SystemExit(f"{cls.name}: {failures} instances failed; see {work}")
    n = len(files)
    return {"instances/s": n / seconds, "server user µs": cost.user / n * 1e6,
            "server system µs": cost.system / n * 1e6, "everything else µs": cost.elsewhere / n * 1e6,
            "machine busy %": cost.machine_busy / cost.machine_all * 100,
            "stolen %": cost.stolen_percent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--row", choices=list(ROWS), default="small4")
    parser.add_argument("--servers", default="pacsd,orthanc", help="comma-separated: " + ",".join(SERVERS))
    parser.add_argument("--runs", type=int, default=3, help="runs of each server, by turns")
    parser.add_argument("--corpus", type=Path, default=Path(tempfile.gettempdir()) / "pacsd-bench-corpus",
                        help="where the generated corpus lives (kept and reused between runs)")
    args = parser.parse_args()
    names = [name.strip() for name in args.servers.split(",") if name.strip()]
    if unknown := set(names) - set(SERVERS):
        parser.error(f"unknown servers: {', '.join(sorted(unknown))}")
    title, write, associations = ROWS[args.row]
    files = write(args.corpus)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="pacsd-cpu-") as scratch:
        print(machine_now(Path(scratch)))
        print(f"{title}: per instance, each server fresh, by turns")
        print("| run | server | " + " | ".join(COLUMNS) + " |")
        print("| --- | --- |" + " ---: |" * len(COLUMNS), flush=True)
        for run in range(1, args.runs + 1):
            for name in names:
                result = measure(SERVERS[name], Path(scratch) / f"{name}-{run}", files, associations)
                results[name].append(result)
                print(f"| {run} | {name} | " + " | ".join(f"{result[c]:,.0f}" for c in COLUMNS) + " |",
                      flush=True)
    for name in names:
        print(f"| median | {name} | "
              + " | ".join(f"{statistics.median(r[c] for r in results[name]):,.0f}" for c in COLUMNS) + " |")


if __name__ == "__main__":
    main()
