"""The `pacsd` command line."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import click

from pacsd import __version__, logs
from pacsd.config import check_ae_title, load_settings


def _ae(ctx, param, value: str) -> str:
    try:
        return check_ae_title(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pacsd")
def main() -> None:
    """pacsd: a mini-PACS daemon speaking DICOM and DICOMweb.

    Start the archive with `pacsd serve` (DICOM on port 11112, DICOMweb on
    http://127.0.0.1:8042/dicom-web by default). `echo` and `store` talk to a running pacsd or any
    other DICOM node; `import` and `verify` work on the archive's own data directory.
    """


@main.command()
@click.option(
    "--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
    help="TOML config file (see config/pacsd.toml). Without it pacsd runs on embedded "
         "defaults: AE PACSD, DICOM port 11112, DICOMweb on 127.0.0.1:8042, data in ./var.",
)
def serve(config_file: Path | None) -> None:
    """Run the archive until SIGTERM or Ctrl-C.

    Every key can also be set in the environment as PACSD_<SECTION>__<KEY>, e.g.
    PACSD_DICOM__PORT=11113; the environment wins over the file. An empty database gets
    its schema on first start.
    """
    from pacsd import app
    from pacsd.index.db import SchemaOutOfDate

    settings = _settings(config_file)
    logs.configure(settings.logging.level, settings.logging.format)
    try:
        app.run(app.serve(settings))
    except (OSError, SchemaOutOfDate) as exc:
        raise click.ClickException(f"cannot start: {exc}") from None


def _settings(config_file: Path | None):
    try:
        return load_settings(config_file)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


_config_option = click.option(
    "--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
    help="TOML config file (see config/pacsd.toml); PACSD_<SECTION>__<KEY> env vars override it.",
)


@main.group()
def db() -> None:
    """Manage the index database (database.url)."""


@db.command("upgrade")
@_config_option
@click.option("--revision", default="head", show_default=True, help="Alembic revision to upgrade to.")
def db_upgrade(config_file: Path | None, revision: str) -> None:
    """Create the index schema or bring it up to this pacsd's version.

    `pacsd serve` creates the schema of an empty database by itself; an existing index of
    an older pacsd needs this command (run it with the daemon stopped).
    """
    from sqlalchemy.engine import make_url

    from pacsd.index.db import upgrade

    settings = _settings(config_file)
    logs.configure("warning", "console")
    url = settings.database.url
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database:
            Path(database).parent.mkdir(parents=True, exist_ok=True)
    try:
        upgrade(url, revision)
    except Exception as exc:
        raise click.ClickException(f"upgrade failed: {exc}") from None
    if revision == "head":
        from pacsd.index.db import head_revision

        revision = head_revision()
    click.echo(f"index at {make_url(url).render_as_string(hide_password=True)} is at revision {revision}")


@main.command()
@click.argument("host")
@click.argument("port", type=click.IntRange(1, 65535))
@click.option("--aec", default="PACSD", show_default=True, callback=_ae,
              help="Called AE title: the AE title of the remote node.")
@click.option("--aet", default="PACSD-SCU", show_default=True, callback=_ae,
              help="Calling AE title: how this client introduces itself.")
@click.option("--count", "-c", default=1, show_default=True, type=click.IntRange(1),
              help="Number of C-ECHO requests to send on the association.")
@click.option("--timeout", default=30.0, show_default=True, type=float,
              help="Seconds to wait for the association and each response.")
def echo(host: str, port: int, aec: str, aet: str, count: int, timeout: float) -> None:
    """Verify a DICOM node with C-ECHO; print the status and round-trip time.

    Exits 0 when every echo succeeded, 1 otherwise.
    """
    logs.configure("warning", "console")
    ok = asyncio.run(_echo(host, port, aec, aet, count, timeout))
    sys.exit(0 if ok else 1)


async def _echo(host: str, port: int, aec: str, aet: str, count: int, timeout: float) -> bool:
    from pacsd.config import DicomSettings
    from pacsd.dimse.status import describe
    from pacsd.dul.negotiation import ProposedContext
    from pacsd.net.association import AssociationError
    from pacsd.net.requestor import UNCOMPRESSED, associate
    from pacsd.services.verification import VERIFICATION_SOP_CLASS, c_echo

    settings = DicomSettings(artim_timeout=timeout, dimse_timeout=timeout)
    contexts = [ProposedContext(VERIFICATION_SOP_CLASS, UNCOMPRESSED)]
    started = time.perf_counter()
    all_ok = True
    try:
        async with associate(host, port, calling_ae=aet, called_ae=aec, contexts=contexts,
                             settings=settings, connect_timeout=timeout) as assoc:
            assoc_ms = (time.perf_counter() - started) * 1000
            click.echo(f"Association with {aec}@{host}:{port} accepted in {assoc_ms:.1f} ms")
            for n in range(1, count + 1):
                t0 = time.perf_counter()
                status = await c_echo(assoc)
                rtt = (time.perf_counter() - t0) * 1000
                click.echo(f"C-ECHO {n}: status {describe(status)}, round trip {rtt:.2f} ms")
                all_ok &= status == 0
    except (AssociationError, LookupError) as exc:
        click.echo(f"C-ECHO to {aec}@{host}:{port} failed: {exc}", err=True)
        return False
    return all_ok


def part10_files(paths, recursive: bool, purpose: str):
    """The Part 10 files among `paths` (directories read, recursively with `recursive`),
    and how many were skipped; each skipped file gets a line saying why. Exits 1 if none."""
    from pacsd.net.storescu import NotPart10, collect_files, read_part10

    files = []
    skipped = 0
    for path in collect_files(paths, recursive):
        try:
            files.append(read_part10(path))
        except NotPart10 as exc:
            click.echo(f"skipped  {path}: {exc}")
            skipped += 1
        except OSError as exc:
            click.echo(f"skipped  {path}: cannot read it: {exc.strerror or exc}")
            skipped += 1
    if not files:
        click.echo(f"no DICOM Part 10 files to {purpose} ({skipped} skipped)", err=True)
        sys.exit(1)
    return files, skipped


def _run(coro):
    """Run a coroutine to its result, on uvloop where it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def node_and_files(command):
    """HOST PORT PATH... and --aec: the remote node and the Part 10 files for it (store, commit)."""
    command = click.option("--aec", default="PACSD", show_default=True, callback=_ae,
                           help="Called AE title: the AE title of the remote node.")(command)
    command = click.argument("paths", metavar="PATH...", nargs=-1, required=True,
                             type=click.Path(exists=True, path_type=Path))(command)
    command = click.argument("port", type=click.IntRange(1, 65535))(command)
    return click.argument("host")(command)


@main.command()
@node_and_files
@click.option("--aet", default="PACSD-SCU", show_default=True, callback=_ae,
              help="Calling AE title: how this client introduces itself.")
@click.option("--recursive", "-r", is_flag=True,
              help="Also send the files in the subdirectories of the directories named "
                   "(without it, only the files directly inside them).")
@click.option("--timeout", default=30.0, show_default=True, type=float,
              help="Seconds to wait for the connection, the association and each response.")
def store(host: str, port: int, paths: tuple[Path, ...], aec: str, aet: str, recursive: bool,
          timeout: float) -> None:
    """Send DICOM Part 10 files to a node with C-STORE.

    Each file's data set goes out byte for byte as stored, in the file's own transfer
    syntax (no transcoding): one presentation context is proposed per SOP class and transfer
    syntax, up to 128 per association, more associations when needed. Files that are not
    DICOM Part 10 are reported as skipped.

    Prints one line per file (its status and any Error Comment from the peer), a progress bar
    when the output is a terminal, and a summary. Exits 0 when every file was stored
    (warning statuses count as stored), 1 when any failed or was not sent.
    """
    from pacsd.config import DicomSettings
    from pacsd.net.storescu import store_files
    from pacsd.tools import Progress, megabytes

    logs.configure("warning", "console")
    files, skipped = part10_files(paths, recursive, "send")

    counts = {"success": 0, "warning": 0, "failure": 0}
    sent = sent_bytes = 0
    progress = Progress(len(files), "C-STORE", total_bytes=sum(f.dataset_size for f in files))

    def on_result(result) -> None:
        nonlocal sent, sent_bytes
        counts[result.category] += 1
        if result.status is not None:
            sent += 1
            sent_bytes += result.file.dataset_size
        word = {"success": "ok", "warning": "warning", "failure": "FAILED"}[result.category]
        progress.advance(1, result.file.dataset_size)
        progress.line(f"{word:8} {result.file.path}  {result.file.sop_instance_uid}  {result.describe()}")

    settings = DicomSettings(artim_timeout=timeout, dimse_timeout=timeout)
    started = time.perf_counter()
    with progress:
        _run(store_files(host, port, files, calling_ae=aet, called_ae=aec, settings=settings,
                        connect_timeout=timeout, on_result=on_result))
    elapsed = time.perf_counter() - started
    rate = sent_bytes / 1e6 / elapsed if elapsed > 0 else 0.0
    click.echo(
        f"sent {sent} files to {aec}@{host}:{port} ({megabytes(sent_bytes)} in {elapsed:.2f} s, "
        f"{rate:.1f} MB/s): {counts['success']} succeeded, {counts['warning']} warnings, "
        f"{counts['failure']} failed, {skipped} skipped"
    )
    sys.exit(0 if counts["failure"] == 0 else 1)


@main.command("import")
@click.argument("paths", metavar="DIR...", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
@_config_option
@click.option("--jobs", "-j", default=8, show_default=True, type=click.IntRange(1, 64),
              help="Files in flight at once (the index writer commits them in groups).")
@click.option("--verbose", "-v", is_flag=True,
              help="A line for every file, not only for the failed and skipped ones.")
def import_(paths: tuple[Path, ...], config_file: Path | None, jobs: int, verbose: bool) -> None:
    """Ingest DICOM Part 10 files from disk into the archive.

    Directories are searched recursively. Every file goes through the same pipeline as a
    C-STORE: checked, indexed and stored with its data set byte for byte as in the file.
    Files that are not DICOM Part 10 are skipped; instances already in the archive follow
    the storage.duplicates policy and count as duplicates.

    Meant to run with the daemon stopped (it runs beside one without harm to stored data,
    but the two contend for the index). Exits 1 when any file failed, 0 otherwise.
    """
    from pacsd.index.db import SchemaOutOfDate
    from pacsd.net.storescu import collect_files
    from pacsd.tools import Progress, megabytes
    from pacsd.tools.importer import import_files

    settings = _settings(config_file)
    logs.configure("error", "console")
    files = list(collect_files(paths, recursive=True))
    progress = Progress(len(files), "import")

    def on_result(result) -> None:
        if verbose or result.kind in ("failed", "skipped"):
            detail = f": {result.reason}" if result.reason else ""
            uid = f"  {result.sop_instance_uid}" if result.sop_instance_uid else ""
            progress.advance(1, result.nbytes)
            progress.line(f"{result.kind:9} {result.path}{uid}{detail}")
        else:
            progress.advance(1, result.nbytes)

    started = time.perf_counter()
    try:
        with progress:
            summary = _run(import_files(settings, files, jobs=jobs, on_result=on_result))
    except (OSError, SchemaOutOfDate) as exc:
        raise click.ClickException(f"cannot import: {exc}") from None
    elapsed = time.perf_counter() - started
    c = summary.counts
    replaced = f", {c['replaced']} replaced" if c["replaced"] else ""
    click.echo(
        f"imported {len(files)} files into {settings.storage.data_dir} in {elapsed:.2f} s "
        f"({megabytes(summary.nbytes)} stored): {c['stored']} stored{replaced}, "
        f"{c['duplicate']} duplicates, {c['failed']} failed, {c['skipped']} skipped (not DICOM Part 10)"
    )
    if summary.failures:
        click.echo("failures by reason:")
        for reason, failed in sorted(summary.failures.items(), key=lambda kv: -len(kv[1])):
            click.echo(f"  {len(failed)} x {reason}")
            for result in failed[:5]:
                click.echo(f"      {result.path}: {result.reason}")
            if len(failed) > 5:
                click.echo(f"      ... and {len(failed) - 5} more")
    sys.exit(1 if summary.failed else 0)


@main.command("verify")
@_config_option
@click.option("--repair", is_flag=True,
              help="Fix what is safe: delete index rows whose blob is missing (then recount), "
                   "move orphan blobs to <data_dir>/orphans/, remove leftover spool files. "
                   "Run it with the daemon stopped.")
@click.option("--quick", is_flag=True,
              help="Compare blob sizes only; skip reading every blob for its SHA-256.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(0),
              help="How many items of each kind of problem to list.")
def verify_(config_file: Path | None, repair: bool, quick: bool, limit: int) -> None:
    """Check the index against the blob store.

    Reports index rows whose blob is missing, blobs no row points at (orphans), blobs whose
    size or SHA-256 differs from the index, and spool files left behind. Exits 0 when all is
    clean (or, with --repair, when everything found was repaired), 1 when problems remain.
    Checksum mismatches cannot be repaired: restore the blobs or have the instances re-sent.
    """
    from pacsd.tools import Progress
    from pacsd.tools.verify import VerifyError, format_report, verify

    settings = _settings(config_file)
    logs.configure("error", "console")

    def progress(total: int, total_bytes: int):
        return Progress(total, "size check" if quick else "checksums", total_bytes=total_bytes or None)

    try:
        report = _run(verify(settings, quick=quick, repair=repair, progress=progress))
    except VerifyError as exc:
        raise click.ClickException(str(exc)) from None
    for line in format_report(report, limit):
        click.echo(line)
    sys.exit(1 if report.remaining else 0)


# The Query/Retrieve commands live in their own module; importing it adds them to `main`.
from pacsd import cli_qr  # noqa: E402,F401
# `pacsd commit` (Storage Commitment SCU) likewise.
from pacsd import cli_commit  # noqa: E402,F401

if __name__ == "__main__":  # pragma: no cover
    main()
