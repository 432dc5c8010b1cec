"""`serve` and `api-key create|list|revoke`: the usage API and its keys
(docs/operations.md#the-usage-api)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Annotated

import typer

from consumer.cli.app import app, settings_or_exit
from consumer.commands.tables import ScreenFormat, print_rows
from consumer.failures import ExitCode, fatal_line, report
from consumer.logs import configure_logging

keys_app = typer.Typer(help="Create, list and revoke keys of the usage API.", no_args_is_help=True)
app.add_typer(keys_app, name="api-key")

KEY_COLUMNS = ("id", "prefix", "scope", "created_at", "revoked_at")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="port to listen on")] = 8080,
) -> None:
    """Serve the read-only usage API (GET /v1/usage, /openapi.json, /healthz, /metrics) with
    the role of LEDGER_API_DATABASE_URL; exit 0 on SIGTERM/SIGINT."""
    settings = settings_or_exit()
    configure_logging(settings.log_format, settings.log_level)
    from consumer.api.serve import named_for_the_api
    from consumer.api.serve import serve as run_api

    try:
        asyncio.run(run_api(settings, host, port))
    except Exception as error:  # noqa: BLE001 - reported as run_cli would, naming the API's database
        raise typer.Exit(report(error, named_for_the_api(settings))) from None


@keys_app.command("create")
def create_key(
    space: Annotated[
        int | None, typer.Option(min=1, help="a key of this search space only")
    ] = None,
    user: Annotated[
        uuid.UUID | None, typer.Option(help="with --space: of this user of it only")
    ] = None,
    admin: Annotated[bool, typer.Option("--admin", help="a key that sees every space")] = False,
) -> None:
    """Make a key; it is printed once, alone on the last line (only its digest is stored)."""
    if admin == (space is not None) or (user is not None and space is None):
        fatal_line(
            "api-key create: give --space N (and perhaps --user U), or --admin",
            ExitCode.CONFIGURATION,
        )
        raise typer.Exit(ExitCode.CONFIGURATION)
    settings = settings_or_exit()
    from consumer.api.admin import create

    key_id, key = asyncio.run(create(settings, admin=admin, space_id=space, user_id=user))
    scope = "admin" if admin else f"space {space}" + (f", user {user}" if user else "")
    typer.echo(f"API key {key_id} ({scope}); it is not shown again, store it now:")
    typer.echo(key)


@keys_app.command("list")
def list_keys(
    output: Annotated[
        ScreenFormat,
        typer.Option("--format", help="table for people; json (one object per line) for jobs"),
    ] = ScreenFormat.table,
) -> None:
    """Every key: id, prefix, scope, when created and revoked (never the key itself)."""
    settings = settings_or_exit()
    from consumer.api.admin import listing

    rows = [
        {
            "id": key.id,
            "prefix": key.prefix,
            "scope": key.scope,
            "created_at": key.created_at.isoformat(),
            "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
        }
        for key in asyncio.run(listing(settings))
    ]
    print_rows(KEY_COLUMNS, rows, output.value, title="API keys", numeric={"id"})


@keys_app.command("revoke")
def revoke_key(key_id: Annotated[int, typer.Argument(min=1, help="the key's id")]) -> None:
    """Revoke a key: the API answers 401 to it from the next request on."""
    settings = settings_or_exit()
    from consumer.api.admin import revoke

    revoked = asyncio.run(revoke(settings, key_id))
    if revoked is None:
        fatal_line(f"api-key revoke: no key {key_id} (see api-key list)", ExitCode.CONFIGURATION)
        raise typer.Exit(ExitCode.CONFIGURATION)
    typer.echo(f"API key {key_id} {'revoked' if revoked else 'was already revoked'}")
