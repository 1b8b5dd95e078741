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
    """pacsd: a mini-PACS daemon speaking DICOM (and soon DICOMweb).

    Start the archive with `pacsd serve`; the other commands talk to a running pacsd or
    any other DICOM node.
    """


@main.command()
@click.option(
    "--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
    help="TOML config file (see config/pacsd.toml). Without it pacsd runs on embedded "
         "defaults: AE PACSD, DICOM port 11112, data in ./var.",
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


if __name__ == "__main__":  # pragma: no cover
    main()
