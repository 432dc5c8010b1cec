"""The usage API's database role: `serve` refuses to start, naming the column, on a role
missing one of those its queries read (docs/operations.md#the-usage-api)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from consumer.commands.queries import REPORT_COLUMNS
from consumer.ledger.database import asyncpg_dsn
from tests.integration.api_harness import cli
from tests.integration.test_api_isolation import Tenants, tenants  # noqa: F401


@pytest.fixture
async def narrow_role(tenants: Tenants) -> AsyncIterator[str]:  # noqa: F811
    """A login role outside token_ledger_api granted what serve reads but cost_micros."""
    name, password = f"api_{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    columns = ", ".join(c for c in REPORT_COLUMNS if c != "cost_micros")
    admin = await asyncpg.connect(asyncpg_dsn(tenants.ledger_url))
    try:
        await admin.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
        await admin.execute(f"GRANT SELECT ON api_keys, alembic_version TO {name}")
        await admin.execute(f"GRANT SELECT ({columns}) ON token_usage TO {name}")
        scheme, _, rest = tenants.ledger_url.partition("://")
        yield f"{scheme}://{name}:{password}@{rest.partition('@')[2]}"
    finally:
        await admin.execute(f"REVOKE ALL ON api_keys, alembic_version, token_usage FROM {name}")
        await admin.execute(f"DROP ROLE IF EXISTS {name}")
        await admin.close()


def test_serve_refuses_a_role_missing_a_column_and_names_it(
    tenants: Tenants,  # noqa: F811
    narrow_role: str,
) -> None:
    done = cli(tenants.ledger_url, "serve", "--port", "0", LEDGER_API_DATABASE_URL=narrow_role)
    assert done.returncode == 7, done.stderr
    assert "may not read token_usage.cost_micros:" in done.stderr
    assert "GRANT token_ledger_api" in done.stderr
