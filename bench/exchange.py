"""Where one C-STORE exchange over one association goes, step by step (pacsd only).

    .venv/bin/python bench/exchange.py [--row small|ct512] [--base REV] [--runs 2]

One storescu association sends an instance and waits for its response, so the rate of
the one-association rows is the length of one exchange. This starts pacsd as the rows do,
but with a clock (time.perf_counter_ns) at the entry or exit of the functions each
exchange passes through, put in by wrapping them before `serve` starts; the rates on a
shared machine move by up to 2x within minutes, the length of each step much less. It
prints the median of each step over the middle 80% of the instances. With --base, REV
(from a temporary git worktree) and this tree run by turns, --runs times each.

Steps, and the clocks that bound them:
  receive        StorageSCP.spool_for (the C-STORE-RQ command) → handle_c_store (data set complete)
  to parse       → pipeline.prepare begins (a thread hop)
  parse          → prepare returns (parse, check, rows, blob written)
  to writer      → IndexWriter._commit_in_thread begins (hops, through the event loop or not)
  statements     → _commit_sync returns
  fsync wait     → the blob and directory fsyncs done, beyond the statements (0 if earlier)
  commit         → _commit_in_thread returns (WAL written and fdatasynced)
  back           → Ingest.ingest returns on the event loop
  respond        → Association.respond returns (C-STORE-RSP written)
  storescu       → the next command arrives (the client's own part)
"""

from __future__ import annotations

import argparse
import atexit
import functools
import inspect
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

STEPS = [("receive", "cmd", "data"), ("to parse", "data", "parse<"), ("parse", "parse<", "parse>"),
         ("to writer", "parse>", "commit<"), ("statements", "commit<", "rows>"), ("fsync wait", None, None),
         ("commit", None, "commit>"), ("back", "commit>", "ingest>"), ("respond", "ingest>", "rsp>")]


def serve(timeline: str) -> None:
    """In the server's process: wrap the functions, then run `pacsd serve`."""
    from pacsd.cli import main as pacsd_main
    from pacsd.index.writer import IndexWriter
    from pacsd.ingest import pipeline
    from pacsd.net.association import Association
    from pacsd.services.storage import StorageSCP
    from pacsd.store.syncer import BlobSyncer

    marks: list[tuple[str, int]] = []
    clock = time.perf_counter_ns

    def wrap(owner, name: str, enter: str | None = None, leave: str | None = None) -> None:
        original = getattr(owner, name, None)
        if original is None:
            print(f"exchange.py: {getattr(owner, '__name__', owner)}.{name} not found, step left out",
                  file=sys.stderr)
            return
        if inspect.iscoroutinefunction(original):
            @functools.wraps(original)
            async def wrapper(*args, **kwargs):
                if enter:
                    marks.append((enter, clock()))
                try:
                    return await original(*args, **kwargs)
                finally:
                    if leave:
                        marks.append((leave, clock()))
        else:
            @functools.wraps(original)
            def wrapper(*args, **kwargs):
                if enter:
                    marks.append((enter, clock()))
                try:
                    return original(*args, **kwargs)
                finally:
                    if leave:
                        marks.append((leave, clock()))
        setattr(owner, name, wrapper)

    wrap(StorageSCP, "spool_for", enter="cmd")
    wrap(StorageSCP, "handle_c_store", enter="data")
    wrap(pipeline, "prepare", enter="parse<", leave="parse>")
    wrap(IndexWriter, "_commit_in_thread", enter="commit<", leave="commit>")
    wrap(IndexWriter, "_commit_sync", leave="rows>")
    start_sync = BlobSyncer.start

    def start(self, keys):
        synced = start_sync(self, keys)
        # A Future, or (up to 2026-12-01) a wrapper around one.
        getattr(synced, "_future", synced).add_done_callback(lambda _: marks.append(("synced>", clock())))
        return synced

    BlobSyncer.start = start
    wrap(pipeline.Ingest, "ingest", leave="ingest>")
    wrap(Association, "respond", leave="rsp>")

    def dump() -> None:
        with open(timeline, "w") as f:
            f.writelines(f"{tag} {t}\n" for tag, t in marks)

    atexit.register(dump)
    sys.argv = ["pacsd", "serve"]
    pacsd_main()


def steps(timeline: Path) -> dict[str, float]:
    """Median µs of each step, from the marks of one run."""
    exchanges: list[dict[str, int]] = []
    for line in timeline.read_text().splitlines():
        tag, t = line.split()
        if tag == "cmd":
            exchanges.append({})
        if exchanges:
            exchanges[-1].setdefault(tag, int(t))
    needed = {"cmd", "data", "parse<", "parse>", "commit<", "rows>", "synced>", "commit>", "ingest>", "rsp>"}
    whole = [e for e in exchanges if needed <= e.keys()]
    cut = len(whole) // 10
    middle = whole[cut:len(whole) - cut] if cut else whole
    if len(middle) < 2:
        raise SystemExit(f"only {len(middle)} complete exchanges in {timeline}")
    out: dict[str, float] = {}
    for name, start, end in STEPS:
        if name == "fsync wait":
            values = [max(e["synced>"] - e["rows>"], 0) for e in middle]
        elif name == "commit":
            values = [e["commit>"] - max(e["synced>"], e["rows>"]) for e in middle]
        else:
            values = [e[end] - e[start] for e in middle]
        out[name] = statistics.median(values) / 1000
    out["storescu"] = statistics.median(b["cmd"] - a["rsp>"] for a, b in zip(middle, middle[1:])) / 1000
    out["whole exchange"] = statistics.median(b["cmd"] - a["cmd"] for a, b in zip(middle, middle[1:])) / 1000
    return out


def run(files: list[Path], work: Path, tree: Path | None) -> tuple[dict[str, float], float]:
    from servers import Pacsd, pacsd_from, storescu

    timeline = work / "timeline.txt"

    class TimedPacsd(Pacsd):
        def command(self):
            args, env = super().command()
            return [sys.executable, str(Path(__file__).resolve()), "--serve", str(timeline)], env

    with pacsd_from(tree), TimedPacsd(work) as server:
        seconds, failures = storescu(server, [files])
    if failures:
        raise SystemExit(f"{failures} instances failed; see {work}")
    return steps(timeline), len(files) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--row", choices=["small", "ct512"], default="small")
    parser.add_argument("--base", help="an earlier commit to run first, from a temporary git worktree")
    parser.add_argument("--runs", type=int, default=2, help="runs of each side")
    parser.add_argument("--corpus", type=Path, default=Path(tempfile.gettempdir()) / "pacsd-bench-corpus")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # the server's side of this script
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    import corpus as corpus_mod

    from servers import machine_now, worktree

    files = (corpus_mod.write_small if args.row == "small" else corpus_mod.write_ct512)(args.corpus)
    with tempfile.TemporaryDirectory(prefix="pacsd-exchange-") as scratch, ExitStack() as stack:
        print(machine_now(Path(scratch)), flush=True)
        sides: list[tuple[str, Path | None]] = []
        if args.base:
            sides.append((args.base, stack.enter_context(worktree(args.base, Path(scratch) / "base"))))
        sides.append(("this tree", None))
        # Alternating, so that both sides see the same phases of the machine.
        runs: dict[str, list[tuple[dict[str, float], float]]] = {label: [] for label, _ in sides}
        for n in range(1, args.runs + 1):
            for label, tree in sides:
                result, rate = run(files, Path(scratch) / "work", tree)
                runs[label].append((result, rate))
                print(f"  {label} run {n}: {rate:.0f} instances/s", flush=True)
        columns = [(f"{label} #{n}", result, rate) for label, _ in sides
                   for n, (result, rate) in enumerate(runs[label], 1)]
    print(f"\nmedian µs per exchange, {len(files)} instances over one association ({args.row})\n")
    print("| step | " + " | ".join(label for label, _, _ in columns) + " |")
    print("| --- |" + " --- |" * len(columns))
    for name in [step for step, _, _ in STEPS] + ["storescu", "whole exchange"]:
        print(f"| {name} | " + " | ".join(f"{result[name]:,.0f}" for _, result, _ in columns) + " |")
    print("| instances/s | " + " | ".join(f"{rate:,.0f}" for _, _, rate in columns) + " |")


if __name__ == "__main__":
    main()
