"""`dlq list|replay`: the dead-letter topic as rows, and its records sent to their source again."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated

import typer

from consumer.cli.app import app, settings_or_exit
from consumer.commands.tables import print_table

if TYPE_CHECKING:
    from consumer.commands.dead_letters import DeadLetterView

dlq_app = typer.Typer(help="Inspect and replay the dead-letter topic.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")


def print_dead_letters(views: list[DeadLetterView]) -> None:
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
    settings = settings_or_exit()
    from consumer.commands.dead_letters import list_dead_letters

    views = asyncio.run(list_dead_letters(settings, reason))
    print_dead_letters(views)
    # On stderr: piped, stdout holds the rows only.
    typer.echo(f"{len(views)} dead letter(s)", err=True)


@dlq_app.command("replay")
def dlq_replay(
    reason: Annotated[str | None, typer.Option(help="only this reason")] = None,
    dry_run: Annotated[bool, typer.Option(help="show what would be replayed")] = False,
) -> None:
    """Publish dead letters' original records to their source topic again."""
    settings = settings_or_exit()
    from consumer.commands.dead_letters import replay_dead_letters

    done = asyncio.run(replay_dead_letters(settings, reason, dry_run=dry_run))
    print_dead_letters(done.replayed)
    typer.echo(f"{'would replay' if dry_run else 'replayed'} {len(done.replayed)} record(s)")
    if done.skipped:
        typer.echo(
            f"skipped {len(done.skipped)} record(s) whose headers name no source position",
            err=True,
        )
