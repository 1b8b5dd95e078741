"""pacsd against pacsd: an earlier commit and this tree, run by run, on one ingest row.

    .venv/bin/python bench/ab.py --base REV [--row small|small4|ct512] [--pairs 5]

On a shared virtual machine the speed of the same code moves by up to 2x within minutes,
so two `run.py` tables taken apart cannot show a change of 10%. Here each pair starts a
fresh server of each side one right after the other, on the same corpus and with the same
storescu clients as run.py's row: A is REV, checked out into a temporary git worktree and
put first on the server's PYTHONPATH; B is this tree. A change shows as the number of
pairs in which B is faster, and as the medians. Each line also gives the server's CPU time
per instance (all its processes: the daemon and any ingest process).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import corpus as corpus_mod  # noqa: E402
from servers import REPOSITORY, Pacsd, machine_now, pacsd_from, storescu_costed, worktree  # noqa: E402

ROWS = {
    "small": ("2,000 CT 64x64, 1 association", corpus_mod.write_small, 1),
    "small4": ("2,000 CT 64x64, 4 associations", corpus_mod.write_small, 4),
    "ct512": ("200 CT 512x512, 1 association", corpus_mod.write_ct512, 1),
}


def run_once(work: Path, files: list[Path], associations: int, tree: Path | None) -> tuple[float, float, float]:
    """(instances/s, server CPU ms per instance, % of the CPU stolen meanwhile) of one fresh
    server."""
    with pacsd_from(tree), Pacsd(work) as server:
        chunks = [files[i::associations] for i in range(associations)]
        seconds, failures, cost = storescu_costed(server, chunks)
    if failures:
        raise SystemExit(f"{failures} instances failed; see {work}")
    return len(files) / seconds, (cost.user + cost.system) / len(files) * 1000, cost.stolen_percent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the commit to compare this tree with (A)")
    parser.add_argument("--row", choices=list(ROWS), default="small")
    parser.add_argument("--pairs", type=int, default=5, help="alternating runs of A and B")
    parser.add_argument("--corpus", type=Path, default=Path(tempfile.gettempdir()) / "pacsd-bench-corpus",
                        help="where the generated corpus lives (kept and reused between runs)")
    args = parser.parse_args()
    title, write, associations = ROWS[args.row]
    files = write(args.corpus)
    with tempfile.TemporaryDirectory(prefix="pacsd-ab-") as scratch, \
            worktree(args.base, Path(scratch) / "base") as base:
        print(machine_now(Path(scratch)), flush=True)
        print(f"{title}: A = {args.base}, B = this tree ({REPOSITORY}); instances/s, server CPU ms per "
              f"instance, CPU stolen by the hypervisor")
        rates: dict[str, list[float]] = {"A": [], "B": []}
        faster = 0
        for pair in range(1, args.pairs + 1):
            a = run_once(Path(scratch) / "work", files, associations, base)
            b = run_once(Path(scratch) / "work", files, associations, None)
            rates["A"].append(a[0])
            rates["B"].append(b[0])
            faster += b[0] > a[0]
            print(f"  pair {pair}: A {a[0]:7.1f}/s {a[1]:5.2f} ms {a[2]:3.0f}%   "
                  f"B {b[0]:7.1f}/s {b[1]:5.2f} ms {b[2]:3.0f}%", flush=True)
        print(f"B faster in {faster} of {args.pairs} pairs; median A {statistics.median(rates['A']):.1f}/s, "
              f"B {statistics.median(rates['B']):.1f}/s")


if __name__ == "__main__":
    main()
