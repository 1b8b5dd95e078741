"""`pacsd find`, `pacsd move`, `pacsd get`: Query/Retrieve SCU commands."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from pacsd import logs
from pacsd.cli import _ae, _run, main

_LEVELS = click.Choice(["PATIENT", "STUDY", "SERIES", "IMAGE"], case_sensitive=False)


def _common(f):
    f = click.option("--timeout", default=60.0, show_default=True, type=float,
                     help="Seconds to wait for the association and each response.")(f)
    f = click.option("--key", "-k", "keys", multiple=True, metavar="KEY[=VALUE]",
                     help="A matching or return key: a keyword (PatientName=DOE*) or a tag "
                          "((0010,0010)=DOE*). Without a value it is a return key. Repeatable.")(f)
    f = click.option("--model", type=click.Choice(["study", "patient"]), default="study", show_default=True,
                     help="Query/Retrieve information model: Study Root or Patient Root.")(f)
    f = click.option("--level", "-L", type=_LEVELS, default="STUDY", show_default=True,
                     help="Query/Retrieve level.")(f)
    f = click.option("--aet", default="PACSD-SCU", show_default=True, callback=_ae,
                     help="Calling AE title: how this client introduces itself.")(f)
    f = click.option("--aec", default="PACSD", show_default=True, callback=_ae,
                     help="Called AE title: the AE title of the remote node.")(f)
    f = click.argument("port", type=click.IntRange(1, 65535))(f)
    f = click.argument("host")(f)
    return f


def _identifier(level: str, keys: tuple[str, ...], defaults: bool):
    """The identifier, and the keywords of its keys in the order given (for the table)."""
    from pacsd.net.qrscu import KeySpecError, build_identifier, parse_keys

    try:
        return build_identifier(level.upper(), parse_keys(list(keys)), defaults)
    except KeySpecError as exc:
        raise click.BadParameter(str(exc), param_hint="--key") from None


def _value(ds, keyword: str) -> str:
    element = ds.data_element(keyword) if ds is not None and keyword in ds else None
    if element is None or element.value is None:
        return ""
    if element.VR == "SQ":
        return f"<{len(element.value)} items>"
    value = element.value
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


@main.command()
@_common
@click.option("--json", "as_json", is_flag=True, help="Print the matches as a DICOM JSON array.")
def find(host, port, aec, aet, level, model, keys, timeout, as_json) -> None:
    """Search a DICOM node with C-FIND and print the matches as a table (or JSON).

    Example: pacsd find 127.0.0.1 11112 -L STUDY -k PatientName='DOE*' -k StudyDate=20260101-

    With no return keys given, a useful set for the level is asked for. Exits 0 when the
    query completed (whatever the number of matches), 1 on a failure status or error.
    """
    logs.configure("warning", "console")
    identifier, columns = _identifier(level, keys, defaults=True)
    sys.exit(_run(_find(host, port, aec, aet, model, identifier, columns, timeout, as_json)))


async def _find(host, port, aec, aet, model, identifier, columns, timeout, as_json) -> int:
    from pacsd.config import DicomSettings
    from pacsd.dimse.status import describe
    from pacsd.net.association import AssociationError
    from pacsd.net.qrscu import MODELS, UNCOMPRESSED, find
    from pacsd.dul.negotiation import ProposedContext
    from pacsd.net.requestor import associate

    sop_class = MODELS[model][0]
    settings = DicomSettings(artim_timeout=timeout, dimse_timeout=timeout)
    matches = []
    final = None
    try:
        async with associate(host, port, calling_ae=aet, called_ae=aec, settings=settings,
                             contexts=[ProposedContext(sop_class, UNCOMPRESSED)],
                             connect_timeout=timeout) as assoc:
            async for status, found, command in find(assoc, sop_class, identifier):
                if found is not None and status in (0xFF00, 0xFF01):
                    matches.append(found)
                    if not as_json:
                        if len(matches) == 1:
                            click.echo("  ".join(columns))
                        click.echo("  ".join(_value(found, c) for c in columns))
                else:
                    final = (status, command.get("ErrorComment", ""))
    except (AssociationError, LookupError) as exc:
        click.echo(f"C-FIND to {aec}@{host}:{port} failed: {exc}", err=True)
        return 1
    if as_json:
        click.echo(json.dumps([m.to_json_dict() for m in matches], indent=1, ensure_ascii=False))
    status, comment = final if final else (-1, "no final response")
    message = f"{len(matches)} matches; final status {describe(status)}"
    click.echo(message + (f": {comment}" if comment else ""), err=True)
    return 0 if status == 0 else 1


def _progress(counts) -> str:
    remaining = "?" if counts.remaining is None else counts.remaining
    return (f"remaining {remaining}, completed {counts.completed}, failed {counts.failed}, "
            f"warning {counts.warning}")


@main.command()
@_common
@click.option("--dest", required=True, callback=_ae,
              help="Move destination: the AE title the remote node sends the instances to "
                   "(it must know it as a peer).")
def move(host, port, aec, aet, level, model, keys, timeout, dest) -> None:
    """Ask a DICOM node to send instances to an AE with C-MOVE; print the progress.

    Example: pacsd move 127.0.0.1 11112 --dest VIEWER -k StudyInstanceUID=1.2.3

    Exits 0 when every sub-operation completed, 1 otherwise.
    """
    logs.configure("warning", "console")
    identifier, _ = _identifier(level, keys, defaults=False)
    sys.exit(_run(_retrieve(host, port, aec, aet, model, identifier, timeout, dest=dest)))


@main.command()
@_common
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("."), show_default=True, help="Directory for the received files.")
def get(host, port, aec, aet, level, model, keys, timeout, out_dir) -> None:
    """Retrieve instances with C-GET into a directory (one Part 10 file per instance).

    Example: pacsd get 127.0.0.1 11112 -k StudyInstanceUID=1.2.3 -o ./study

    pacsd offers to receive the common storage SOP classes, uncompressed. Exits 0 when
    every sub-operation completed, 1 otherwise.
    """
    logs.configure("warning", "console")
    identifier, _ = _identifier(level, keys, defaults=False)
    sys.exit(_run(_retrieve(host, port, aec, aet, model, identifier, timeout, out_dir=out_dir)))


async def _retrieve(host, port, aec, aet, model, identifier, timeout, dest=None, out_dir=None) -> int:
    from pacsd.config import DicomSettings
    from pacsd.dimse.status import describe
    from pacsd.dul.negotiation import ProposedContext
    from pacsd.net.association import AssociationError
    from pacsd.net.qrscu import MODELS, UNCOMPRESSED, get_contexts, retrieve, store_receiver
    from pacsd.net.requestor import associate

    sop_class = MODELS[model][1 if dest else 2]
    settings = DicomSettings(artim_timeout=timeout, dimse_timeout=timeout)
    contexts = [ProposedContext(sop_class, UNCOMPRESSED)] if dest else get_contexts(sop_class)
    received: list[Path] = []
    started = time.monotonic()
    final = None
    try:
        async with associate(host, port, calling_ae=aet, called_ae=aec, settings=settings,
                             contexts=contexts, connect_timeout=timeout) as assoc:
            if out_dir is not None:
                assoc.dispatch = store_receiver(out_dir, lambda path, uid: received.append(path))
            async for status, counts, ds, command in retrieve(assoc, sop_class, identifier, dest):
                if status in (0xFF00, 0xFF01):
                    click.echo(f"pending: {_progress(counts)}")
                else:
                    failed = _value(ds, "FailedSOPInstanceUIDList") if ds is not None else ""
                    final = (status, counts, command.get("ErrorComment", ""), failed)
    except (AssociationError, LookupError) as exc:
        click.echo(f"{'C-MOVE' if dest else 'C-GET'} from {aec}@{host}:{port} failed: {exc}", err=True)
        return 1
    if final is None:
        click.echo("no final response", err=True)
        return 1
    status, counts, comment, failed = final
    seconds = time.monotonic() - started
    click.echo(f"final status {describe(status)}{': ' + comment if comment else ''}; "
               f"{_progress(counts)}; {seconds:.1f} s")
    if out_dir is not None:
        click.echo(f"{len(received)} files written to {out_dir}")
    if failed:
        click.echo(f"failed SOP instances: {failed}", err=True)
    return 0 if status == 0 else 1
