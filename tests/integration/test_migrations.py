"""Migrations are the only source of schema: they round-trip, and the models agree with them."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from consumer.commands.budgets import BUDGET_COLUMNS
from consumer.commands.queries import REPORT_COLUMNS
from consumer.ledger.database import asyncpg_dsn
from consumer.ledger.migrate import downgrade, upgrade
from consumer.ledger.models import metadata

LEDGER_TABLES = {
    "chat_threads",
    "chat_messages",
    "token_usage",
    "consumer_offsets",
    "billing_outbox",
    "dead_lettered",
    "partition_halts",
    "api_keys",
    "budgets",
    "budget_states",
    "budget_periods",
    "budget_alert_outbox",
    "applied_records",
}


async def _tables(url: str) -> set[str]:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        rows = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            " AND tablename <> 'alembic_version'"
        )
        return {r["tablename"] for r in rows}
    finally:
        await conn.close()


async def test_upgrade_downgrade_upgrade(database_url: str) -> None:
    await asyncio.to_thread(upgrade, database_url)
    assert await _tables(database_url) == LEDGER_TABLES
    await asyncio.to_thread(downgrade, database_url)
    assert await _tables(database_url) == set()
    await asyncio.to_thread(upgrade, database_url)
    assert await _tables(database_url) == LEDGER_TABLES


def _diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


async def test_models_and_migrations_agree(ledger_url: str) -> None:
    engine = create_async_engine(ledger_url)
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
    finally:
        await engine.dispose()


async def test_partial_unique_indexes_have_the_specified_names_and_predicates(
    ledger: asyncpg.Connection,
) -> None:
    rows = await ledger.fetch(
        "SELECT indexname, indexdef FROM pg_indexes WHERE indexname LIKE 'uq_%'"
    )
    definitions = {r["indexname"]: r["indexdef"] for r in rows}
    assert definitions["uq_chat_messages_thread_turn_role"].endswith(
        "(thread_id, turn_id, role) WHERE (turn_id IS NOT NULL)"
    )
    assert definitions["uq_token_usage_message_id"].endswith(
        "(message_id) WHERE (message_id IS NOT NULL)"
    )
    assert definitions["uq_chat_messages_content_event_id"].endswith(
        "(content_event_id) WHERE (turn_id IS NULL)"
    )


async def _api_columns(conn: asyncpg.Connection, table: str = "token_usage") -> set[str]:
    """The columns of `table` the API's group role may read."""
    rows = await conn.fetch(
        "SELECT attname FROM pg_attribute"
        " WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped"
        "   AND has_column_privilege('token_ledger_api', attrelid, attnum, 'SELECT')",
        table,
    )
    return {r["attname"] for r in rows}


async def test_the_api_role_may_read_what_serve_reads_and_nothing_else(ledger_url: str) -> None:
    """Migration 0007's group role (docs/operations.md#the-usage-api): created once per
    cluster, granted in every ledger database (this one is a copy of the session's template);
    of token_usage, only the columns the report reads (migration 0008); of the budget tables,
    only those the budget routes read (0011), and nothing of the alert outbox."""
    conn = await asyncpg.connect(asyncpg_dsn(ledger_url))
    try:
        columns = await _api_columns(conn)
        budget_columns = {
            table: await _api_columns(conn, table)
            for table in ("budgets", "budget_states", "budget_alert_outbox")
        }
        rows = await conn.fetch(
            "SELECT c.relname, p.privilege FROM pg_class AS c"
            " CROSS JOIN unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE',"
            "   'REFERENCES', 'TRIGGER']) AS p(privilege)"
            " WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'S')"
            "   AND has_table_privilege('token_ledger_api', c.oid, p.privilege)"
        )
        login = await conn.fetchval(
            "SELECT rolcanlogin FROM pg_roles WHERE rolname = 'token_ledger_api'"
        )
    finally:
        await conn.close()
    assert login is False
    assert {(r["relname"], r["privilege"]) for r in rows} == {
        ("api_keys", "SELECT"),
        ("alembic_version", "SELECT"),
    }
    assert columns == set(REPORT_COLUMNS)
    assert "call_details" not in columns
    assert budget_columns == {
        "budgets": set(BUDGET_COLUMNS["budgets"]),
        "budget_states": set(BUDGET_COLUMNS["budget_states"]),
        "budget_alert_outbox": set(),
    }


async def test_0008_narrows_the_api_grant_and_its_downgrade_restores_it(
    database_url: str,
) -> None:
    async def grant() -> tuple[bool, set[str]]:
        conn = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            whole = await conn.fetchval(
                "SELECT has_table_privilege('token_ledger_api', 'token_usage', 'SELECT')"
            )
            return whole, await _api_columns(conn)
        finally:
            await conn.close()

    await asyncio.to_thread(upgrade, database_url)
    assert await grant() == (False, set(REPORT_COLUMNS))
    await asyncio.to_thread(downgrade, database_url, "0007")
    whole, columns = await grant()
    assert whole and "call_details" in columns  # 0007's grant: the whole table
    await asyncio.to_thread(upgrade, database_url)
    assert await grant() == (False, set(REPORT_COLUMNS))


async def test_0011_grants_the_budget_columns_and_its_downgrade_revokes_them(
    database_url: str,
) -> None:
    async def grant() -> dict[str, set[str]]:
        conn = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            return {table: await _api_columns(conn, table) for table in BUDGET_COLUMNS}
        finally:
            await conn.close()

    granted = {table: set(columns) for table, columns in BUDGET_COLUMNS.items()}
    await asyncio.to_thread(upgrade, database_url)
    assert await grant() == granted
    await asyncio.to_thread(downgrade, database_url, "0010")
    assert await grant() == {table: set() for table in BUDGET_COLUMNS}
    await asyncio.to_thread(upgrade, database_url)
    assert await grant() == granted
