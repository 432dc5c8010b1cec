"""`verify`, `status`, `replay` and `usage`: the commands that read (or rewind) what the ledger
holds."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime
from typing import Annotated

import typer

from consumer.cli.app import app, settings_or_exit, utc
from consumer.commands.tables import ReportFormat, ScreenFormat, print_rows
from consumer.failures import ExitCode, fatal_line


@app.command()
def verify(
    output: Annotated[
        ScreenFormat,
        typer.Option("--format", help="table for people; json (one object) for jobs"),
    ] = ScreenFormat.table,
) -> None:
    """Re-read the topic, rebuild the expected ledger, report differences (exit 1 on any) and
    how far it compared: up to the applied offsets, with the records not applied yet."""
    settings = settings_or_exit()
    from consumer.commands.verify import verify as run_verify

    report = asyncio.run(run_verify(settings))
    if report.no_offsets:
        others = ", ".join(map(repr, report.other_groups))
        fatal_line(
            f"verify: group {settings.group_id!r} has no stored offsets for topic"
            f" {settings.topic!r}, so nothing was compared: check LEDGER_GROUP_ID"
            f"{f' (groups with offsets for the topic: {others})' if others else ''}"
            " and LEDGER_TOPIC",
            ExitCode.CONFIGURATION,
            settings,
        )
        raise typer.Exit(ExitCode.CONFIGURATION)
    if output is ScreenFormat.json:
        from consumer.cli.screens import verify_json

        print(verify_json(report))
    else:
        from consumer.cli.screens import print_verify

        print_verify(report)
    if not report.ok:
        raise typer.Exit(ExitCode.CHECK_FAILED)


@app.command()
def replay(
    from_time: Annotated[
        datetime | None,
        typer.Option(
            help="rewind to the first record whose Kafka timestamp (when it was published, not"
            " the event's occurred_at) is at or after this time (ISO 8601, UTC if no zone)"
        ),
    ] = None,
    to_offset: Annotated[int | None, typer.Option(min=0, help="rewind to this offset")] = None,
    partition: Annotated[int | None, typer.Option(min=0, help="only this partition")] = None,
    dry_run: Annotated[
        bool, typer.Option(help="say where each partition would go; change nothing")
    ] = False,
) -> None:
    """Rewind the stored offsets; the consumers apply the range again (the ledger must not change)."""
    if (from_time is None) == (to_offset is None):
        fatal_line("replay: give exactly one of --from-time or --to-offset", ExitCode.CONFIGURATION)
        raise typer.Exit(ExitCode.CONFIGURATION)
    settings = settings_or_exit()
    from consumer.commands.replay import replay as run_replay

    done = asyncio.run(
        run_replay(
            settings,
            from_time=utc(from_time),
            to_offset=to_offset,
            partition=partition,
            dry_run=dry_run,
        )
    )
    if not done.moves:
        fatal_line(
            f"replay: group {settings.group_id!r} has no stored offsets for topic"
            f" {settings.topic!r}{'' if partition is None else f' partition {partition}'}:"
            " check LEDGER_GROUP_ID and LEDGER_TOPIC",
            ExitCode.CONFIGURATION,
            settings,
        )
        raise typer.Exit(ExitCode.CONFIGURATION)
    for part, (old, new) in sorted(done.moves.items()):
        again = f" ({old - new} records applied again)" if new < old else " (unchanged)"
        typer.echo(f"partition {part}: {old} -> {new}{again}")
    if dry_run:
        typer.echo("dry run: nothing was changed")
    elif done.not_mirrored is not None:
        # Not a failure: PostgreSQL holds the offsets; Kafka's copy is for lag tooling.
        typer.echo(
            f"token-ledger: the group's offsets in Kafka were not moved: {done.not_mirrored}",
            err=True,
        )


@app.command()
def usage(
    by: Annotated[
        list[str] | None,
        typer.Option(
            metavar="[user|space|model|day|month]",
            help="group by (repeat to combine); default: --by space --by model",
        ),
    ] = None,
    since: Annotated[
        datetime | None, typer.Option(help="from this time, inclusive (UTC if no zone)")
    ] = None,
    until: Annotated[
        datetime | None, typer.Option(help="up to this time, exclusive (UTC if no zone)")
    ] = None,
    output: Annotated[
        ReportFormat,
        typer.Option(
            "--format",
            help="table for people; csv (header + rows) or json (one object per line) for jobs",
        ),
    ] = ReportFormat.table,
    as_json: Annotated[bool, typer.Option("--json", help="the same as --format json")] = False,
    space: Annotated[int | None, typer.Option(min=1, help="only this search space")] = None,
    user: Annotated[uuid.UUID | None, typer.Option(help="only this user")] = None,
    model: Annotated[str | None, typer.Option(help="only this model")] = None,
) -> None:
    """Billing report: tokens and cost by user, search space, model, day and/or month (a usage
    row's day is its winning event's occurred_at, in UTC), then the total (table, json)."""
    settings = settings_or_exit()
    from consumer.commands.queries import REPORTED, USAGE_DIMENSIONS, UsageFilter
    from consumer.commands.usage import usage_with_total

    group_by = by or ["space", "model"]
    if bad := [d for d in group_by if d not in USAGE_DIMENSIONS]:
        fatal_line(
            f"usage: --by {bad[0]!r} is not one of {', '.join(USAGE_DIMENSIONS)}",
            ExitCode.CONFIGURATION,
        )
        raise typer.Exit(ExitCode.CONFIGURATION)
    only = UsageFilter(utc(since), utc(until), space, user, model)
    if only.since is not None and only.until is not None and only.since >= only.until:
        fatal_line(
            f"usage: --since {only.since.isoformat()} is not before --until"
            f" {only.until.isoformat()}",
            ExitCode.CONFIGURATION,
        )
        raise typer.Exit(ExitCode.CONFIGURATION)
    fmt = "json" if as_json else output.value
    rows = asyncio.run(usage_with_total(settings, group_by, only, total=fmt != "csv"))
    columns = [*group_by, *REPORTED, "usage_rows"]
    print_rows(columns, rows, fmt, title="token usage", numeric={*REPORTED, "usage_rows"})


@app.command()
def status(
    output: Annotated[
        ScreenFormat,
        typer.Option("--format", help="table for people; json (one object) for jobs"),
    ] = ScreenFormat.table,
) -> None:
    """Where each partition of the group stands: stored offset, log end, lag, stopped and why;
    the group's members (exit 1 when a partition is stopped or the group has no offsets)."""
    settings = settings_or_exit()
    from consumer.cli.screens import print_status, status_json
    from consumer.commands.group_status import group_status

    found = asyncio.run(group_status(settings))
    if found.no_offsets:  # a mistyped group: one line, not a screen of empty rows
        fatal_line(
            f"status: group {settings.group_id!r} has no stored offsets for topic"
            f" {settings.topic!r}: check LEDGER_GROUP_ID and LEDGER_TOPIC (or no consumer"
            " has applied a record yet)",
            ExitCode.CHECK_FAILED,
            settings,
        )
        raise typer.Exit(ExitCode.CHECK_FAILED)
    if output is ScreenFormat.json:
        print(status_json(found))
    else:
        print_status(found)
    if not found.ok:
        raise typer.Exit(ExitCode.CHECK_FAILED)
