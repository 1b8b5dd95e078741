"""Offline tools behind the CLI: bulk import (importer.py) and the index/blob check (verify.py).

Also the progress display the file-based commands (store, import, verify) share: a bar that
stays on the last line of a terminal while result lines scroll above it, and nothing at all
when the output is not a terminal (a log file or a pipe gets only the plain lines).
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

__all__ = ["Progress", "megabytes"]


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


class Progress:
    """A one-line progress bar: items done of total, bytes, throughput.

    `line()` prints a line above the bar (clearing and redrawing it), so per-item output and
    the bar can be mixed. Redraws are limited to ten a second.
    """

    def __init__(self, total: int, label: str = "", *, enabled: bool | None = None,
                 file: TextIO | None = None, total_bytes: int | None = None) -> None:
        self.file = file or sys.stdout
        self.enabled = self.file.isatty() if enabled is None else enabled
        self.total = total
        self.total_bytes = total_bytes
        self.label = label
        self.done = 0
        self.bytes = 0
        self.started = time.monotonic()
        self._drawn_at = 0.0
        self._shown = False

    def __enter__(self) -> Progress:
        self._draw(force=True)
        return self

    def __exit__(self, *exc_info) -> None:
        self.finish()

    def advance(self, items: int = 1, nbytes: int = 0) -> None:
        self.done += items
        self.bytes += nbytes
        self._draw()

    def line(self, text: str) -> None:
        """Print `text` on its own line (above the bar on a terminal)."""
        if self.enabled and self._shown:
            self.file.write("\r\x1b[K")
            self._shown = False
        self.file.write(text + "\n")
        self._draw(force=True)

    def finish(self) -> None:
        if self.enabled and self._shown:
            self.file.write("\r\x1b[K")
            self.file.flush()
            self._shown = False
        self.enabled = False

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            self.file.flush()
            return
        now = time.monotonic()
        if not force and now - self._drawn_at < 0.1 and self.done < self.total:
            return
        self._drawn_at = now
        elapsed = max(now - self.started, 1e-6)
        fraction = self.done / self.total if self.total else 1.0
        if self.total_bytes:
            fraction = min(self.bytes / self.total_bytes, 1.0)
        stats = f" {self.done}/{self.total}"
        if self.bytes:
            stats += f"  {megabytes(self.bytes)}  {self.bytes / 1e6 / elapsed:.1f} MB/s"
        width = shutil.get_terminal_size((80, 24)).columns
        label = f"{self.label} " if self.label else ""
        room = width - len(label) - len(stats) - 3
        if room >= 10:
            filled = int(room * fraction)
            bar = f"[{'#' * filled}{'-' * (room - filled)}]"
        else:
            bar = ""
        self.file.write(("\r" + label + bar + stats)[: width + 1] + "\x1b[K")
        self.file.flush()
        self._shown = True
