"""`token-ledger`: parse arguments, load settings, configure logging, call one coroutine.

No logic lives here. A bad setting exits 2 with one line naming the variable; every other
expected failure is one line and an exit code from the table in consumer/failures.py.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from consumer.commands.tables import ReportFormat, print_rows, print_table
from consumer.failures import ExitCode, fatal_line
from consumer.logs import configure_logging
from consumer.settings import Settings, SettingsError, load_settings
from consumer.simulate.config import TrafficConfig
from consumer.simulate.traffic import plan_traffic

if TYPE_CHECKING:
    from consumer.commands.dead_letters import DeadLetterView

app = typer.Typer(
    name="token-ledger",
    help="Kafka -> PostgreSQL ledger of chat messages and LLM token usage.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _print_version(wanted: bool) -> None:
    """The release and the newest migration it knows: what a rolling deploy needs to know
    (docs/operations.md#schema-revisions-and-rolling-deploys)."""
    if not wanted:
        return
    from importlib.metadata import PackageNotFoundError, version

    from consumer.ledger.schema import code_revisions

    try:
        release = version("token-ledger")
    except PackageNotFoundError:  # a checkout on sys.path that was never installed
        release = "unknown"
    typer.echo(f"token-ledger {release} (newest migration {code_revisions().head})")
    raise typer.Exit


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            is_eager=True,
            callback=_print_version,
            help="print the release and the newest migration it knows, then exit",
        ),
    ] = False,
) -> None:
    """Kafka -> PostgreSQL ledger of chat messages and LLM token usage."""


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        fatal_line(f"configuration error: {exc}", ExitCode.CONFIGURATION)
        raise typer.Exit(ExitCode.CONFIGURATION) from None


@app.command()
def consume(
    until_idle: Annotated[
        bool, typer.Option(help="exit once every assigned partition is caught up")
    ] = False,
) -> None:
    """Run the consumer: topic -> ledger, with /metrics, /healthz and /readyz."""
    settings = _settings()
    configure_logging(settings.log_format, settings.log_level)
    from consumer.service import consume as run_consumer

    unfinished = asyncio.run(run_consumer(settings, until_idle=until_idle))
    if not until_idle or not unfinished:
        return
    # It could not finish these (each logged as ERROR when it happened).
    if halted := unfinished.partitions:
        stopped = "; ".join(f"partition {p}: {why}" for p, why in sorted(halted.items()))
        fatal_line(f"partitions stopped: {stopped}", ExitCode.CHECK_FAILED, settings)
    if refused := unfinished.billing:
        listed = "; ".join(f"{rev}: {why}" for rev, why in sorted(refused.items()))
        fatal_line(f"billing revisions held back: {listed}", ExitCode.CHECK_FAILED, settings)
    raise typer.Exit(1)


@app.command()
def migrate(
    revision: Annotated[str, typer.Argument(help="target revision")] = "head",
) -> None:
    """Create or upgrade the ledger schema (alembic migrations)."""
    settings = _settings()
    from consumer.ledger.schema import migrate as run_migrate

    typer.echo(run_migrate(settings, revision))


@app.command()
def simulate(
    threads: Annotated[int, typer.Option(min=1, help="chat threads")] = 100,
    turns: Annotated[int, typer.Option(min=1, help="turns per thread")] = 5,
    seed: Annotated[int, typer.Option(help="same seed, same traffic")] = 1,
    duplicate_rate: Annotated[
        float, typer.Option(min=0, max=1, help="records re-sent right after, as exact copies")
    ] = 0.1,
    legacy_rate: Annotated[
        float, typer.Option(min=0, max=1, help="turns with legacy message.appended beside them")
    ] = 0.1,
    second_finalize_rate: Annotated[
        float, typer.Option(min=0, max=1, help="turns finalized twice (the first cost wins)")
    ] = 0.05,
    shuffle_rate: Annotated[
        float, typer.Option(min=0, max=1, help="threads whose records are published shuffled")
    ] = 0.2,
    poison_rate: Annotated[
        float, typer.Option(min=0, max=1, help="per turn, a poison record in its thread")
    ] = 0.01,
    legacy_partial_rate: Annotated[
        float, typer.Option(min=0, max=1, help="legacy breakdowns partial per model")
    ] = TrafficConfig.legacy_partial_rate,
    legacy_empty_rate: Annotated[
        float, typer.Option(min=0, max=1, help="legacy breakdowns sent as {}")
    ] = TrafficConfig.legacy_empty_rate,
    legacy_null_rate: Annotated[
        float, typer.Option(min=0, max=1, help="legacy breakdowns sent as null")
    ] = TrafficConfig.legacy_null_rate,
    v0_resend_rate: Annotated[
        float, typer.Option(min=0, max=1, help="v0 bodies re-sent after everything else")
    ] = TrafficConfig.v0_resend_rate,
    retry_rate: Annotated[
        float, typer.Option(min=0, max=1, help="records re-sent later by a producer retry")
    ] = TrafficConfig.retry_rate,
    unknown_field_rate: Annotated[
        float, typer.Option(min=0, max=1, help="calls, parts, envelopes with unknown fields")
    ] = TrafficConfig.unknown_field_rate,
    partitions: Annotated[int, typer.Option(min=1, help="if the topic must be created")] = 3,
    expect: Annotated[
        Path | None, typer.Option(help="write the expected ledger summary (JSON) here")
    ] = None,
) -> None:
    """Produce realistic traffic (duplicates, retries, legacy appends with loose breakdowns,
    v0 re-sends, unknown fields, shuffles, poison) to the topic."""
    settings = _settings()
    try:
        config = TrafficConfig(
            threads=threads,
            turns_per_thread=turns,
            seed=seed,
            duplicate_rate=duplicate_rate,
            legacy_rate=legacy_rate,
            second_finalize_rate=second_finalize_rate,
            shuffle_rate=shuffle_rate,
            poison_rate=poison_rate,
            legacy_partial_rate=legacy_partial_rate,
            legacy_empty_rate=legacy_empty_rate,
            legacy_null_rate=legacy_null_rate,
            v0_resend_rate=v0_resend_rate,
            retry_rate=retry_rate,
            unknown_field_rate=unknown_field_rate,
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    records, expectation = plan_traffic(config)
    from consumer.simulate.publishing import publish_with_progress

    asyncio.run(publish_with_progress(settings, records, partitions))
    summary = expectation.to_json()
    if expect is not None:
        expect.write_text(json.dumps(summary, indent=2) + "\n")
    typer.echo(
        f"published {summary['records']} records ({summary['duplicates']} duplicates, "
        f"{summary['dead_letters']} poison) to {settings.topic}; expect "
        f"{summary['messages']} messages, {summary['usage_rows']} usage rows, "
        f"cost {summary['total_cost_micros']} micros"
    )


@app.command()
def verify() -> None:
    """Re-read the topic, rebuild the expected ledger, report differences (exit 1 on any)."""
    settings = _settings()
    from consumer.commands.verify import verify as run_verify

    report = asyncio.run(run_verify(settings))
    console = Console()
    table = Table("", "expected", "in the ledger", title="verify")
    for name in report.expected:
        style = "" if report.expected[name] == report.actual.get(name) else "red"
        table.add_row(name, str(report.expected[name]), str(report.actual.get(name)), style=style)
    console.print(table)
    console.print(f"records read: {report.records_read} (skipped, never applied: {report.skipped})")
    for difference in report.differences[:50]:
        console.print(f"  {difference.table}: {difference.key}: {difference.problem}")
    if report.difference_count > 50:
        console.print(f"  ... and {report.difference_count - 50} more")
    if report.unreadable:
        console.print(
            f"[red]stopped comparing: the ledger holds a value PostgreSQL cannot print"
            f" ({report.unreadable})[/red]"
        )
    if not report.ok:
        console.print(f"[red]{report.difference_count} difference(s)[/red]")
        raise typer.Exit(1)
    console.print("[green]ledger matches the topic[/green]")


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
    settings = _settings()
    from consumer.commands.replay import replay as run_replay

    moves = asyncio.run(
        run_replay(
            settings,
            from_time=_utc(from_time),
            to_offset=to_offset,
            partition=partition,
            dry_run=dry_run,
        )
    )
    if not moves:
        fatal_line(
            f"replay: group {settings.group_id!r} has no stored offsets for topic"
            f" {settings.topic!r}{'' if partition is None else f' partition {partition}'}:"
            " check LEDGER_GROUP_ID and LEDGER_TOPIC",
            ExitCode.CONFIGURATION,
            settings,
        )
        raise typer.Exit(ExitCode.CONFIGURATION)
    for part, (old, new) in sorted(moves.items()):
        again = f" ({old - new} records applied again)" if new < old else " (unchanged)"
        typer.echo(f"partition {part}: {old} -> {new}{again}")
    if dry_run:
        typer.echo("dry run: nothing was changed")


dlq_app = typer.Typer(help="Inspect and replay the dead-letter topic.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")


def _print_dead_letters(views: list[DeadLetterView]) -> None:
    print_table(
        ("dlq offset", "reason", "source", "failed at", "bytes", "detail"),
        [
            (f"{v.partition}:{v.offset}", v.reason, v.source, v.failed_at, v.size, v.detail)
            for v in views
        ],
        numeric={"bytes"},
        row_lines=True,  # details wrap over several lines in a narrow terminal
    )


@dlq_app.command("list")
def dlq_list(
    reason: Annotated[str | None, typer.Option(help="only this reason")] = None,
) -> None:
    """List dead letters with their reason and source position."""
    settings = _settings()
    from consumer.commands.dead_letters import list_dead_letters

    views = asyncio.run(list_dead_letters(settings, reason))
    _print_dead_letters(views)
    # On stderr: piped, stdout holds the rows only.
    typer.echo(f"{len(views)} dead letter(s)", err=True)


@dlq_app.command("replay")
def dlq_replay(
    reason: Annotated[str | None, typer.Option(help="only this reason")] = None,
    dry_run: Annotated[bool, typer.Option(help="show what would be replayed")] = False,
) -> None:
    """Publish dead letters' original records to their source topic again."""
    settings = _settings()
    from consumer.commands.dead_letters import replay_dead_letters

    done = asyncio.run(replay_dead_letters(settings, reason, dry_run=dry_run))
    _print_dead_letters(done.replayed)
    typer.echo(f"{'would replay' if dry_run else 'replayed'} {len(done.replayed)} record(s)")
    if done.skipped:
        typer.echo(
            f"skipped {len(done.skipped)} record(s) whose headers name no source position",
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
    settings = _settings()
    from consumer.commands.queries import REPORTED, USAGE_DIMENSIONS, UsageFilter
    from consumer.commands.usage import usage_with_total

    group_by = by or ["space", "model"]
    if bad := [d for d in group_by if d not in USAGE_DIMENSIONS]:
        fatal_line(
            f"usage: --by {bad[0]!r} is not one of {', '.join(USAGE_DIMENSIONS)}",
            ExitCode.CONFIGURATION,
        )
        raise typer.Exit(ExitCode.CONFIGURATION)
    only = UsageFilter(_utc(since), _utc(until), space, user, model)
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
def relay() -> None:
    """Publish pending usage revisions to the billing topic, alone (consume relays them too,
    unless LEDGER_RELAY=false)."""
    settings = _settings()
    configure_logging(settings.log_format, settings.log_level)
    from consumer.service import relay as run_relay

    asyncio.run(run_relay(settings))


def _utc(moment: datetime | None) -> datetime | None:
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


def main() -> None:
    from consumer.failures import run_cli

    sys.exit(run_cli(app))  # the one place failures become a line and an exit code
