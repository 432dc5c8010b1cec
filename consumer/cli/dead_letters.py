"""`dlq list|replay`: the dead-letter topic as rows, and its records sent to their source again."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import TYPE_CHECKING, Annotated

import typer

from consumer.cli.app import app, settings_or_exit, utc
from consumer.commands.tables import ReportFormat, print_rows, print_table
from consumer.failures import ExitCode, fatal_line

if TYPE_CHECKING:
    from consumer.commands.dead_letters import DeadLetterView, Selection

dlq_app = typer.Typer(help="Inspect and replay the dead-letter topic.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")

JSON_COLUMNS = (
    "partition",
    "offset",
    "reason",
    "detail",
    "source",
    "origin",
    "group",
    "failed_at",
    "bytes",
)
Since = Annotated[
    datetime | None,
    typer.Option(
        help="only dead letters written at or after this time (their Kafka timestamp; ISO 8601,"
        " UTC if no zone)"
    ),
]
Reason = Annotated[str | None, typer.Option(help="only this reason")]


def print_dead_letters(views: list[DeadLetterView], output: str = ReportFormat.table) -> None:
    if output != ReportFormat.table:
        rows = [
            {**{c: getattr(v, c) for c in JSON_COLUMNS if c != "bytes"}, "bytes": v.size}
            for v in views
        ]
        print_rows(JSON_COLUMNS, rows, output, title="dead letters", numeric={"bytes"})
        return
    print_table(
        ("dlq offset", "reason", "source", "failed at", "bytes", "detail"),
        [
            (f"{v.partition}:{v.offset}", v.reason, v.source, v.failed_at, v.size, v.detail)
            for v in views
        ],
        numeric={"bytes"},
        row_lines=True,  # details wrap over several lines in a narrow terminal
    )


def _selection(
    command: str, reason: str | None, since: datetime | None, until: datetime | None = None
) -> Selection:
    from consumer.commands.dead_letters import Selection

    chosen = Selection(reason, utc(since), utc(until))
    if chosen.since is not None and chosen.until is not None and chosen.since >= chosen.until:
        fatal_line(
            f"dlq {command}: --since {chosen.since.isoformat()} is not before --until"
            f" {chosen.until.isoformat()}",
            ExitCode.CONFIGURATION,
        )
        raise typer.Exit(ExitCode.CONFIGURATION)
    return chosen


@dlq_app.command("list")
def dlq_list(
    reason: Reason = None,
    since: Since = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="at most this many (the first, in topic order)")
    ] = None,
    output: Annotated[
        ReportFormat,
        typer.Option(
            "--format",
            help="table for people; csv (header + rows) or json (one object per line) for jobs",
        ),
    ] = ReportFormat.table,
) -> None:
    """List dead letters with their reason and source position."""
    chosen = _selection("list", reason, since)
    settings = settings_or_exit()
    from consumer.commands.dead_letters import list_dead_letters

    listed = asyncio.run(list_dead_letters(settings, chosen, limit=limit))
    print_dead_letters(listed.views, output.value)
    # On stderr: piped, stdout holds the rows only.
    shown = len(listed.views)
    typer.echo(
        f"{shown} dead letter(s)"
        if shown == listed.matched
        else f"{shown} of {listed.matched} dead letter(s) (--limit {limit})",
        err=True,
    )


@dlq_app.command("replay")
def dlq_replay(
    reason: Reason = None,
    since: Since = None,
    until: Annotated[
        datetime | None,
        typer.Option(help="only dead letters written before this time (exclusive; as --since)"),
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="show what would be replayed")] = False,
) -> None:
    """Publish dead letters' original records to their source topic again, once per source
    record (the latest dead letter of each; its copies are skipped)."""
    chosen = _selection("replay", reason, since, until)
    settings = settings_or_exit()
    from consumer.commands.dead_letters import replay_dead_letters

    done = asyncio.run(replay_dead_letters(settings, chosen, dry_run=dry_run))
    print_dead_letters(done.replayed)
    copies = (
        f" (skipped {done.copies} older dead letter(s) of the same source records)"
        if done.copies
        else ""
    )
    typer.echo(
        f"{'would replay' if dry_run else 'replayed'} {len(done.replayed)} record(s){copies}"
    )
    if done.skipped:
        typer.echo(
            f"skipped {len(done.skipped)} record(s) whose headers name no source position",
            err=True,
        )
