"""`token-ledger serve`: check the database and its role, bind the port, run uvicorn.

Started with LEDGER_API_DATABASE_URL, a login role in the group role `token_ledger_api` that
migration 0007 creates (SELECT on what the API reads, nothing else: of token_usage only the
columns its queries name, since migration 0008; of budgets and budget_states, those of the
budget routes, since 0011); without it, with LEDGER_DATABASE_URL and a WARNING. Before
serving it asks PostgreSQL what the role may do: reading its tables and columns is required
(exit 7 otherwise, naming them); being able to write any ledger table is logged as a WARNING
and the API goes on (the fallback role can write, and every connection is
read-only anyway: `default_transaction_read_only`, read-only transactions), so an operator
sees the wider grant without an outage (docs/operations.md#the-usage-api).
"""

from __future__ import annotations

import asyncio
import logging
import socket

import asyncpg
import uvicorn

from consumer.api.app import build_app
from consumer.commands.budgets import BUDGET_COLUMNS
from consumer.commands.queries import REPORT_COLUMNS
from consumer.failures import ConfigurationError, PermissionDeniedError, database_name
from consumer.ledger.database import asyncpg_dsn
from consumer.ledger.models import metadata
from consumer.ledger.schema import check_revision
from consumer.settings import PREFIX, Settings

log = logging.getLogger(__name__)
READS = ("api_keys",)  # whole tables
# Columns, where the role may read only some of a table: token_usage's call_details (whatever
# a producer sent) is not among them, nor what of the budget tables the routes never answer.
COLUMN_READS = {"token_usage": REPORT_COLUMNS, **BUDGET_COLUMNS}
MAX_CONNECTIONS = 8  # to PostgreSQL; requests beyond them wait (bounded) for one
MAX_REQUESTS = 64  # in progress at once; uvicorn answers 503 beyond
POOL_CLOSE_SECONDS = 3.0

# has_table_privilege() with a list is true if ANY is held: one call per privilege.
_WRITABLE = """
SELECT relname FROM pg_class
WHERE relnamespace = current_schema()::regnamespace AND relkind = 'r'
  AND relname = ANY($1::text[])
  AND (has_table_privilege(oid, 'INSERT') OR has_table_privilege(oid, 'UPDATE')
       OR has_table_privilege(oid, 'DELETE') OR has_table_privilege(oid, 'TRUNCATE'))
ORDER BY 1
"""
_UNREADABLE = """
SELECT relname FROM pg_class
WHERE relnamespace = current_schema()::regnamespace AND relkind = 'r'
  AND relname = ANY($1::text[]) AND NOT has_table_privilege(oid, 'SELECT')
ORDER BY 1
"""
# A column that is missing counts as unreadable too: the answer is the same, a query fails.
_UNREADABLE_COLUMNS = """
SELECT r.relname || '.' || r.attname AS name
FROM unnest($1::text[], $2::text[]) AS r(relname, attname)
WHERE NOT EXISTS (
  SELECT FROM pg_class AS c JOIN pg_attribute AS a ON a.attrelid = c.oid
  WHERE c.relnamespace = current_schema()::regnamespace AND c.relname = r.relname
    AND a.attname = r.attname AND NOT a.attisdropped
    AND has_column_privilege(c.oid, a.attnum, 'SELECT')
)
ORDER BY 1
"""
# What the role may read of token_usage beyond the report's columns (call_details): a grant of
# the whole table, made by hand or by following an older migration's instructions.
_READABLE_BEYOND = """
SELECT a.attname FROM pg_class AS c JOIN pg_attribute AS a ON a.attrelid = c.oid
WHERE c.relnamespace = current_schema()::regnamespace AND c.relname = 'token_usage'
  AND a.attnum > 0 AND NOT a.attisdropped AND NOT (a.attname = ANY($1::text[]))
  AND has_column_privilege(c.oid, a.attnum, 'SELECT')
ORDER BY 1
"""


def api_database_url(settings: Settings) -> str:
    if settings.api_database_url is not None:
        return settings.api_database_url.get_secret_value()
    log.warning(
        "LEDGER_API_DATABASE_URL is not set: the usage API uses LEDGER_DATABASE_URL, a role that"
        " can write the ledger; give it a read-only role (docs/operations.md#the-usage-api)"
    )
    return settings.database_url.get_secret_value()


def named_for_the_api(settings: Settings) -> Settings:
    """The settings as the API's messages should name its database: LEDGER_API_DATABASE_URL's
    (a deployment may give serve no LEDGER_DATABASE_URL at all)."""
    if settings.api_database_url is None:
        return settings
    return settings.naming_database(settings.api_database_url, f"{PREFIX}API_DATABASE_URL")


async def check_role(conn: asyncpg.Connection, settings: Settings) -> list[str]:
    """Raise unless the role reads what the API serves; the ledger tables it could write (a
    WARNING names them, and the columns of token_usage it could read beyond the report's)."""
    unreadable = [r["relname"] for r in await conn.fetch(_UNREADABLE, list(READS))]
    pairs = [(table, column) for table, columns in COLUMN_READS.items() for column in columns]
    unreadable += [
        r["name"]
        for r in await conn.fetch(_UNREADABLE_COLUMNS, [t for t, _ in pairs], [c for _, c in pairs])
    ]
    if unreadable:
        raise PermissionDeniedError(
            f"database {database_name(settings)}: the usage API's role may not read"
            f" {', '.join(unreadable)}: GRANT token_ledger_api TO the role of"
            f" {settings.database_variable}"
        )
    writable = [r["relname"] for r in await conn.fetch(_WRITABLE, sorted(metadata.tables))]
    if writable:
        log.warning(
            f"the usage API's database role can write {', '.join(writable)}: give"
            " LEDGER_API_DATABASE_URL a role that is only a member of token_ledger_api"
        )
    beyond = [r["attname"] for r in await conn.fetch(_READABLE_BEYOND, list(REPORT_COLUMNS))]
    if beyond and not writable:  # a role that can write reads everything: warned above
        columns = ", ".join(beyond)
        log.warning(
            f"the usage API's database role can read token_usage's {columns}, which it never"
            " serves: revoke token_ledger_api's SELECT on token_usage and grant it the report's"
            " columns (docs/operations.md#the-usage-api)"
        )
    return writable


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, or a ConfigurationError (exit 2) naming the address."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = info[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as error:
        raise ConfigurationError(
            f"serve: cannot listen on {host}:{port} ({error.strerror or error}): choose another"
            " --host or --port"
        ) from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def serve(settings: Settings, host: str, port: int) -> None:
    url = api_database_url(settings)
    timeout_ms = round(settings.api_statement_timeout * 1000)
    sock = bind(host, port)
    pool: asyncpg.Pool = await asyncpg.create_pool(
        asyncpg_dsn(url),
        min_size=0,
        max_size=MAX_CONNECTIONS,
        timeout=5,
        # Client side, beyond the server's statement timeout: a frozen database is an error.
        command_timeout=timeout_ms / 1000 + 2,
        server_settings={
            "application_name": "token-ledger-api",
            # Even a role that could write gets read-only transactions from this process.
            "default_transaction_read_only": "on",
            # Every statement bounded, key look-ups included; usage queries set their own.
            "statement_timeout": str(timeout_ms),
        },
    )
    try:
        async with pool.acquire() as conn:
            named = named_for_the_api(settings)
            await check_revision(conn, named)
            await check_role(conn, named)
        config = uvicorn.Config(
            build_app(pool, timeout_ms=timeout_ms),
            log_config=None,  # ours (consumer/logs.py)
            access_log=False,  # paths and queries are the clients': metrics count requests
            server_header=False,
            limit_concurrency=MAX_REQUESTS,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=5,  # SIGTERM: requests in flight get this long
            lifespan="off",
        )
        bound = sock.getsockname()
        log.info(f"usage API listening on http://{bound[0]}:{bound[1]}")
        await uvicorn.Server(config).serve(sockets=[sock])
    finally:
        sock.close()
        try:
            await asyncio.wait_for(pool.close(), POOL_CLOSE_SECONDS)
        except TimeoutError:  # a connection stuck on a database that does not answer
            pool.terminate()
