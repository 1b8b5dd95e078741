"""`pacsd commit`: ask a node for Storage Commitment of files and wait for its report."""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

import click

from pacsd import logs
from pacsd.cli import _ae, _run, main, node_and_files, part10_files


@main.command()
@node_and_files
@click.option("--aet", default="PACSD-SCU", show_default=True, callback=_ae,
              help="Calling AE title: how this client introduces itself (the remote node "
                   "finds where to send a late report by this title).")
@click.option("--recursive", "-r", is_flag=True,
              help="Also take the files in subdirectories of the directories named.")
@click.option("--timeout", default=60.0, show_default=True, type=float,
              help="Seconds to wait for the association, the N-ACTION response, and then "
                   "for the report.")
@click.option("--listen", "listen_port", type=click.IntRange(0, 65535), default=None, metavar="PORT",
              help="Also accept the report on an association the remote node opens to this "
                   "port (as AE title --aet), as it does once the requesting association is gone.")
def commit(host, port, paths, aec, aet, recursive, timeout, listen_port) -> None:
    """Ask a DICOM node to commit to storing these files (Storage Commitment Push Model).

    Reads each file's SOP Class and SOP Instance UID from its Part 10 header, sends one
    N-ACTION-RQ with a new Transaction UID, then waits for the N-EVENT-REPORT: on the same
    association (kept open until the report comes or --timeout passes) and, with --listen,
    also on associations the node opens to PORT. Prints what was committed and what failed,
    with the Failure Reason.

    Exits 0 when every file was committed, 1 otherwise (failures, no report, skipped files).
    """
    logs.configure("warning", "console")
    files, skipped = part10_files(paths, recursive, "ask about")
    code = _run(_commit(host, port, files, aec, aet, timeout, listen_port))
    sys.exit(1 if skipped else code)


async def _commit(host, port, files, aec, aet, timeout, listen_port) -> int:
    from pydicom.uid import generate_uid

    from pacsd.net.commitscu import ReportInbox, listen

    refs = [(f.sop_class_uid, f.sop_instance_uid) for f in files]
    paths = {f.sop_instance_uid: f.path for f in files}
    transaction_uid = str(generate_uid())
    inbox = ReportInbox()
    with tempfile.TemporaryDirectory(prefix="pacsd-commit-") as work_dir:
        server = None
        if listen_port is not None:
            try:
                server = await listen(inbox, aet, listen_port, Path(work_dir))
            except OSError as exc:
                click.echo(f"cannot listen on port {listen_port}: {exc.strerror or exc}", err=True)
                return 1
        try:
            report = await _request(host, port, aec, aet, timeout, refs, transaction_uid, inbox,
                                    listening=server is not None)
        finally:
            if server is not None:
                await server.close(0)
    if report is None:
        return 1
    return _print_report(report, refs, paths)


async def _request(host, port, aec, aet, timeout, refs, transaction_uid, inbox, listening: bool):
    """Send the request and wait for its report; None (after saying why) if none came."""
    import time

    from pacsd.config import DicomSettings
    from pacsd.dimse.status import describe
    from pacsd.dul.negotiation import ProposedContext
    from pacsd.net.association import AssociationError
    from pacsd.net.commitscu import SOP_CLASS, request_commitment
    from pacsd.net.requestor import UNCOMPRESSED, associate

    settings = DicomSettings(artim_timeout=timeout, dimse_timeout=timeout)
    arrived = inbox.expect(transaction_uid)
    deadline = None
    try:
        async with associate(host, port, calling_ae=aet, called_ae=aec, settings=settings,
                             contexts=[ProposedContext(SOP_CLASS, UNCOMPRESSED)],
                             connect_timeout=timeout) as assoc:
            assoc.dispatch = inbox.handle  # a report on this association
            status, comment = await request_commitment(assoc, transaction_uid, refs)
            if status != 0x0000:
                click.echo(f"{aec}@{host}:{port} refused the request: N-ACTION-RSP "
                           f"{describe(status)}{': ' + comment if comment else ''}", err=True)
                return None
            deadline = time.monotonic() + timeout
            click.echo(f"transaction {transaction_uid}: {len(refs)} instances, request accepted; "
                       "waiting for the report")
            # Without a listener the report can only come here: stop if the association ends.
            waiters = {arrived} if listening else {arrived, assoc.ended}
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    except (AssociationError, LookupError) as exc:
        if not arrived.done() and not (listening and deadline is not None):
            click.echo(f"storage commitment at {aec}@{host}:{port} failed: {exc}", err=True)
            return None
    if listening and deadline is not None and not arrived.done():
        try:  # the association is gone: the report may still come to the listener
            await asyncio.wait_for(asyncio.shield(arrived), max(deadline - time.monotonic(), 0))
        except asyncio.TimeoutError:
            pass
    if arrived.done():
        return arrived.result()
    arrived.cancel()
    if deadline is not None and time.monotonic() < deadline:
        click.echo(f"the association ended before the report for transaction {transaction_uid} "
                   "came (use --listen PORT to accept it on a new association)", err=True)
    else:
        click.echo(f"no report for transaction {transaction_uid} within {timeout:g} s"
                   + ("" if listening else " on the requesting association (use --listen PORT "
                      "to accept it on a new one)"), err=True)
    return None


def _print_report(report, refs, paths) -> int:
    from pacsd.net.commitscu import EVENT_SUCCESS, describe_reason
    from pacsd.net.storescu import uid_name

    committed = {uid for _, uid in report.committed}
    for sop_class, uid in report.committed:
        click.echo(f"committed  {uid}  {paths.get(uid, '')}")
    for sop_class, uid, reason in report.failed:
        click.echo(f"FAILED     {uid}  {paths.get(uid, '')}  {describe_reason(reason)}"
                   f"  [{uid_name(sop_class)}]")
    reported = committed | {uid for _, uid, _ in report.failed}
    missing = [uid for _, uid in refs if uid not in reported]
    for uid in missing:
        click.echo(f"MISSING    {uid}  {paths.get(uid, '')}  not in the report")
    click.echo(f"transaction {report.transaction_uid}: {len(report.committed)} committed, "
               f"{len(report.failed)} failed (event type {report.event_type}, report on the "
               f"{report.via})")
    ok = report.event_type == EVENT_SUCCESS and not report.failed and not missing
    return 0 if ok else 1
