"""The index writer alone: CPU and wall time per group when records arrive one at a time.

    .venv/bin/python bench/writer.py [--instances N] [--corpus DIR]

One association sends one instance at a time, so its index writer commits groups of one.
This feeds the writer that way, without the network, the sender or the header parsing:
records are built from the small corpus first (its files copied into a blob store, their
level rows read), then submitted one after another, and the process's CPU time and the
wall time around the submissions are divided by their number. Both include the group's
blob and directory fsyncs and its SQLite commit.

Much steadier than the end-to-end rows (CPU time does not move with the sender), so it
shows a change to the writer's own work that the small-instance rows would hide in their
run-to-run spread. pacsd only: there is nothing to compare it with.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from pacsd.index.db import create_engine, ensure_schema  # noqa: E402
from pacsd.index.levels import IndexRecord, rows  # noqa: E402
from pacsd.index.writer import IndexWriter  # noqa: E402
from pacsd.ingest.dataset import read_header  # noqa: E402
from pacsd.net.storescu import read_part10  # noqa: E402
from pacsd.store.filetree import FileTreeBlobStore  # noqa: E402

DEFAULT_CORPUS = Path("/tmp/pacsd-bench-corpus")


def records(files: list[Path], store: FileTreeBlobStore, spool: Path) -> list[IndexRecord]:
    """The records the ingest would hand the writer for these files (read with its readers)."""
    out = []
    for path in files:
        part10 = read_part10(path)
        ds, _pixels = read_header(path, part10.dataset_offset, part10.transfer_syntax)
        data = path.read_bytes()
        copy = spool / f"{path.stem}.spool"
        copy.write_bytes(data)
        key = store.new_key()
        size = store.put_from_spool(copy, key)
        out.append(IndexRecord(
            rows=rows(ds), blob_key=key, size=size, sha256=hashlib.sha256(data).hexdigest(),
            dataset_offset=part10.dataset_offset, transfer_syntax_uid=part10.transfer_syntax,
            calling_ae="BENCH"))
    return out


async def measure(files: list[Path], work: Path) -> tuple[float, float]:
    url = f"sqlite+aiosqlite:///{work}/index.db"
    engine = create_engine(url)
    await ensure_schema(engine, url)
    store = FileTreeBlobStore(work / "blobs")
    spool = work / "spool"
    spool.mkdir()
    executor = ThreadPoolExecutor(2)
    writer = IndexWriter(engine, store, executor, "keep")
    writer.start()
    try:
        prepared = records(files, store, spool)
        await writer.submit(prepared[0])  # the patient, study and series rows
        cpu, wall = time.process_time(), time.perf_counter()
        for record in prepared[1:]:
            await writer.submit(record)
        n = len(prepared) - 1
        return (time.process_time() - cpu) / n * 1000, (time.perf_counter() - wall) / n * 1000
    finally:
        await writer.close()
        await engine.dispose()
        executor.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=1000, help="records to submit (default 1000)")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS,
                        help=f"corpus directory from bench/corpus.py (default {DEFAULT_CORPUS})")
    args = parser.parse_args()
    files = sorted((args.corpus / "small").glob("*.dcm"))[: args.instances]
    if len(files) < 2:
        sys.exit(f"no small corpus under {args.corpus}: run .venv/bin/python bench/corpus.py {args.corpus}")
    work = Path(tempfile.mkdtemp(prefix="pacsd-bench-writer-"))
    try:
        cpu, wall = asyncio.run(measure(files, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"index writer, {len(files) - 1} groups of one instance: "
          f"CPU {cpu:.3f} ms per group, wall {wall:.3f} ms per group")


if __name__ == "__main__":
    main()
