"""Each budget period's stored spend (budget_periods, migrations/versions/0012) against the real
PostgreSQL: the migration sums the existing rows into it and its downgrade gives back 0010's
evaluation; verify finds a stored spend that differs from the rows, and `budget set` sums it
again (docs/operations.md#budgets)."""

from __future__ import annotations

import asyncio

import asyncpg

from consumer.commands.budget_check import check_budgets
from consumer.commands.budgets import BudgetChange, set_budget
from consumer.ledger.database import asyncpg_dsn
from consumer.ledger.migrate import downgrade, upgrade
from tests.factories import SPACE, USER
from tests.integration.budget_harness import apply, today


async def spends(conn: asyncpg.Connection) -> dict[int, int]:
    """Each budget's stored cost spend of its current period."""
    rows = await conn.fetch(
        "SELECT s.budget_id, s.cost_micros FROM budget_periods AS s JOIN budgets AS b"
        " ON b.id = s.budget_id WHERE s.period_start = budget_period_start(b.period, now())"
    )
    return {row["budget_id"]: int(row["cost_micros"]) for row in rows}


async def test_0012_sums_the_existing_rows_into_budget_periods_and_its_downgrade_gives_back_0010(
    database_url: str,
) -> None:
    await asyncio.to_thread(upgrade, database_url, "0011")
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        space_budget, user_budget = [
            await conn.fetchval(
                "INSERT INTO budgets (search_space_id, user_id, period, cost_micros_limit,"
                " thresholds) VALUES ($1, $2, $3, 1000, '{100}') RETURNING id",
                SPACE,
                user,
                period,
            )
            for user, period in ((None, "day"), (USER, "month"))
        ]
        # 0010's triggers judge these two; their sum is not stored anywhere yet.
        await apply(conn, today(1, 300), today(2, 400))
        await asyncio.to_thread(upgrade, database_url)
        assert await spends(conn) == {space_budget: 700, user_budget: 700}
        assert await check_budgets(conn) == []
        await apply(conn, today(3, 100))
        assert await spends(conn) == {space_budget: 800, user_budget: 800}

        await asyncio.to_thread(downgrade, database_url, "0011")
        assert not await conn.fetchval("SELECT to_regclass('budget_periods') IS NOT NULL")
        await apply(conn, today(4, 200))  # 1000 of 1000: 0010's evaluation, summing the rows
        crossed = await conn.fetch(
            "SELECT budget_id, spend FROM budget_states WHERE crossed ORDER BY budget_id"
        )
        assert [tuple(row) for row in crossed] == [(space_budget, 1000), (user_budget, 1000)]
        await asyncio.to_thread(upgrade, database_url)
        assert await spends(conn) == {space_budget: 1000, user_budget: 1000}
    finally:
        await conn.close()


async def test_verify_finds_a_spend_the_rows_do_not_sum_to_and_budget_set_sums_it_again(
    ledger: asyncpg.Connection,
) -> None:
    await apply(ledger, today(1, 300))
    change = BudgetChange(SPACE, None, "day", 1000, None, (50,))
    async with ledger.transaction():
        budget_id = await set_budget(ledger, change)
    await apply(ledger, today(2, 100))
    assert await spends(ledger) == {budget_id: 400}
    # Judged, not crossed: the period's limits are stored with its spend, and no state yet.
    assert await ledger.fetchval("SELECT count(*) FROM budget_states") == 0
    assert await ledger.fetchval("SELECT thresholds FROM budget_periods") == [50]
    # What no statement of the ledger does: a spend moved without its rows. The next batch
    # judges on it: 650 of 1000 crosses 50 %, though the rows sum to 450.
    await ledger.execute("UPDATE budget_periods SET cost_micros = cost_micros + 200")
    await apply(ledger, today(3, 50))

    spend, state = await check_budgets(ledger)
    assert (spend.table, state.table) == ("budget_periods", "budget_states")
    assert "stored 650 cost_micros" in spend.problem and "sum to 450" in spend.problem
    assert "stored crossed" in state.problem

    async with ledger.transaction():
        assert await set_budget(ledger, change) == budget_id
    assert await spends(ledger) == {budget_id: 450}
    assert await check_budgets(ledger) == []
    kinds = await ledger.fetch("SELECT crossed FROM budget_alert_outbox ORDER BY id")
    assert [row["crossed"] for row in kinds] == [True, False]  # the false crossing, withdrawn
