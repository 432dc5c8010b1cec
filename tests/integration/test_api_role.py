"""The usage API's database role reads only the columns of token_usage its queries name
(migration 0008): never `call_details`, the raw details a producer sent; of the budget tables,
only those the budget routes answer from (0011). Every route still answers under it, and `serve` refuses to start, naming the column, on a role missing one of
them (docs/operations.md#the-usage-api)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from consumer.api.serve import COLUMN_READS
from consumer.commands.budgets import BUDGET_COLUMNS
from consumer.commands.queries import REPORT_COLUMNS
from consumer.ledger.database import asyncpg_dsn
from tests.integration.api_harness import ALICE, SPACE_A, cli, serving
from tests.integration.test_api_isolation import Tenants, tenants  # noqa: F401

TABLES = ", ".join(COLUMN_READS)


async def _as(url: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return list(await conn.fetch(query))
    finally:
        await conn.close()


async def test_the_api_role_cannot_read_call_details(tenants: Tenants) -> None:  # noqa: F811
    for query in (
        "SELECT call_details FROM token_usage",
        "SELECT * FROM token_usage",
        "SELECT id FROM token_usage WHERE call_details IS NOT NULL",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            await _as(tenants.api_url, query)
    # What the report reads, it reads.
    rows = await _as(tenants.api_url, f"SELECT {', '.join(REPORT_COLUMNS)} FROM token_usage")
    assert rows


async def test_the_api_role_reads_the_budget_columns_it_serves_and_writes_none(
    tenants: Tenants,  # noqa: F811
) -> None:
    for table, columns in BUDGET_COLUMNS.items():
        assert await _as(tenants.api_url, f"SELECT {', '.join(columns)} FROM {table}")
    for query in (
        "SELECT created_at FROM budgets",
        "SELECT spend FROM budget_states",
        "SELECT sequence FROM budget_states",
        "SELECT * FROM budgets",
        "SELECT id FROM budget_alert_outbox",
        "UPDATE budgets SET cost_micros_limit = 1",
        "DELETE FROM budget_states",
        "INSERT INTO budgets (search_space_id, period, total_tokens_limit) VALUES (1, 'day', 1)",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            await _as(tenants.api_url, query)


# Every grouping alone and all at once, every filter, and each kind of key: between them they
# run every statement the API sends (the report by row and by model, the key's scope check).
GROUPINGS = ["", "space", "user", "model", "day", "month", "space,user,model,day,month"]
FILTERS: list[dict[str, Any]] = [
    {},
    {"space_id": SPACE_A},
    {"user_id": str(ALICE)},
    {"model": "gpt-4o"},
    {"from": "2026-11-27T00:00:00Z", "to": "2026-12-01T00:00:00Z"},
]


async def test_every_route_answers_under_the_column_grant(
    tenants: Tenants,  # noqa: F811
) -> None:
    role = tenants.api_url.split("://")[1].split(":")[0]
    (grant,) = await _as(
        tenants.ledger_url,
        f"SELECT has_table_privilege('{role}', 'token_usage', 'SELECT') AS whole,"
        f" has_column_privilege('{role}', 'token_usage', 'call_details', 'SELECT') AS details",
    )
    assert (grant["whole"], grant["details"]) == (False, False)  # serve runs as this role
    await asyncio.to_thread(_every_route, tenants)


def _every_route(tenants: Tenants) -> None:  # noqa: F811
    for key in (tenants.admin, tenants.space_a, tenants.alice):
        for group_by in GROUPINGS:
            for params in FILTERS:
                answer = tenants.get(key, **params, **({"group_by": group_by} if group_by else {}))
                assert answer.status_code == 200, (group_by, params, answer.text)
    paged = tenants.get(tenants.admin, group_by="model", limit=1).json()
    assert tenants.get(tenants.admin, group_by="model", cursor=paged["next_cursor"]).is_success
    for key in (tenants.admin, tenants.space_a, tenants.alice):
        listed = tenants.get(key, "/v1/budgets", space_id=SPACE_A, limit=1)
        assert listed.status_code == 200, listed.text
        cursor = listed.json()["next_cursor"]
        assert tenants.get(key, "/v1/budgets", cursor=cursor).status_code == 200
        budget_id = listed.json()["rows"][0]["id"]
        assert tenants.get(key, f"/v1/budgets/{budget_id}").status_code == 200
    for path in ("/healthz", "/metrics", "/openapi.json"):
        assert httpx.get(f"{tenants.server.url}{path}").status_code == 200, path


@asynccontextmanager
async def _granted_all_but(ledger_url: str, missing: str) -> AsyncIterator[str]:
    """A login role outside token_ledger_api granted what serve reads but `missing`."""
    name, password = f"api_{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    admin = await asyncpg.connect(asyncpg_dsn(ledger_url))
    try:
        await admin.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
        await admin.execute(f"GRANT SELECT ON api_keys, alembic_version TO {name}")
        for table, columns in COLUMN_READS.items():
            granted = ", ".join(c for c in columns if f"{table}.{c}" != missing)
            await admin.execute(f"GRANT SELECT ({granted}) ON {table} TO {name}")
        scheme, _, rest = ledger_url.partition("://")
        yield f"{scheme}://{name}:{password}@{rest.partition('@')[2]}"
    finally:
        await admin.execute(f"REVOKE ALL ON api_keys, alembic_version, {TABLES} FROM {name}")
        await admin.execute(f"DROP ROLE IF EXISTS {name}")
        await admin.close()


# A column of the report, and one of each budget table (GET /v1/budgets, migration 0011).
@pytest.mark.parametrize(
    "missing", ["token_usage.cost_micros", "budgets.cost_micros_limit", "budget_states.crossed"]
)
async def test_serve_refuses_a_role_missing_a_column_and_names_it(
    tenants: Tenants,  # noqa: F811
    missing: str,
) -> None:
    async with _granted_all_but(tenants.ledger_url, missing) as narrow_role:
        done = await asyncio.to_thread(
            cli,
            tenants.ledger_url,
            "serve",
            "--port",
            "0",
            LEDGER_API_DATABASE_URL=narrow_role,
        )
    assert done.returncode == 7, done.stderr
    assert f"may not read {missing}:" in done.stderr
    assert "GRANT token_ledger_api TO the role of LEDGER_API_DATABASE_URL" in done.stderr


@pytest.fixture
async def whole_table_role(tenants: Tenants) -> AsyncIterator[str]:  # noqa: F811
    """A login role granted the whole of token_usage, as 0007's instructions once said."""
    name, password = f"api_{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    admin = await asyncpg.connect(asyncpg_dsn(tenants.ledger_url))
    try:
        await admin.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
        await admin.execute(f"GRANT SELECT ON api_keys, alembic_version, token_usage TO {name}")
        for table, columns in BUDGET_COLUMNS.items():
            await admin.execute(f"GRANT SELECT ({', '.join(columns)}) ON {table} TO {name}")
        scheme, _, rest = tenants.ledger_url.partition("://")
        yield f"{scheme}://{name}:{password}@{rest.partition('@')[2]}"
    finally:
        await admin.execute(f"REVOKE ALL ON api_keys, alembic_version, {TABLES} FROM {name}")
        await admin.execute(f"DROP ROLE IF EXISTS {name}")
        await admin.close()


def test_serve_warns_of_a_role_that_can_read_call_details(
    tenants: Tenants,  # noqa: F811
    whole_table_role: str,
    tmp_path: Path,
) -> None:
    env = {"LEDGER_DATABASE_URL": tenants.ledger_url, "LEDGER_API_DATABASE_URL": whole_table_role}
    with serving(env, tmp_path / "serve.log") as server:
        warnings = [line for line in server.logs().splitlines() if "call_details" in line]
    assert len(warnings) == 1, server.logs()[-3000:]
    assert "never serves" in warnings[0]
