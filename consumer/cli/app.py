"""The `token-ledger` application: its root options and the helpers every command shares.

Commands live beside it by what they do (running.py, inspecting.py, dead_letters.py); no logic
lives in any of them. A bad setting exits 2 with one line naming the variable; every other
expected failure is one line and an exit code from the table in consumer/failures.py.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer

from consumer.failures import ExitCode, fatal_line
from consumer.settings import Settings, SettingsError, load_settings

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


def settings_or_exit() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        fatal_line(f"configuration error: {exc}", ExitCode.CONFIGURATION)
        raise typer.Exit(ExitCode.CONFIGURATION) from None


def utc(moment: datetime | None) -> datetime | None:
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment
