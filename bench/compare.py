"""Two runs of bench/run.py side by side: pacsd's values and its pacsd/peer ratios.

    .venv/bin/python bench/compare.py bench/results/bench-A.json bench/results/bench-B.json

Ratios taken in one run on one machine are what carry over between runs; the absolute
values move with the machine and whatever else it was doing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import LABELS, PEERS, ROWS, fmt, markdown, ratios, value  # noqa: E402


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    a, b = (json.loads(Path(p).read_text()) for p in sys.argv[1:])
    ra, rb = ratios(a), ratios(b)
    rows = {row["key"]: row for row in b["rows"]} | {row["key"]: row for row in a["rows"]}
    order = [key for key, *_ in ROWS]
    rows = dict(sorted(rows.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    header = ["workload", "metric", "pacsd A", "pacsd B"]
    for peer in PEERS:
        header += [f"A pacsd/{LABELS[peer]}", f"B pacsd/{LABELS[peer]}"]
    lines = []
    for key, row in rows.items():
        for n, (metric, label) in enumerate(row["metrics"]):
            digits = 0 if metric in ("per_second", "peak_rss_mib") or metric.endswith("_us") else 1
            cells = [row["title"] if n == 0 else "", label,
                     fmt(value(a, key, "pacsd", metric), digits), fmt(value(b, key, "pacsd", metric), digits)]
            for peer in PEERS:
                cells += [fmt(ra.get((key, label, peer)), 2), fmt(rb.get((key, label, peer)), 2)]
            lines.append(cells)
    for name, path, doc in (("A", sys.argv[1], a), ("B", sys.argv[2], b)):
        machine = doc["machine"]
        print(f"{name}: {path} ({doc['when']}, pacsd {doc['versions'].get('pacsd', '?')}, "
              f"{machine['cores']} cores, fdatasync {machine.get('fdatasync_ms', float('nan')):.2f} ms, "
              f"file creation {machine.get('create_file_us', float('nan')):.0f} µs, "
              f"{machine.get('cpu_stolen_percent', float('nan')):.0f}% CPU stolen, "
              f"load average {machine.get('load_average_before', float('nan')):.1f})")
    print()
    print(markdown(header, lines))


if __name__ == "__main__":
    main()
