"""Review (branch review-budgets3): attacks on the deferred budget judgement of
migrations/versions/0012. Each test states what should hold; a failing one is a defect."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg

from consumer.commands.budget_check import check_budgets
from consumer.commands.budgets import BudgetChange, set_budget
from consumer.ledger.batch import apply_events
from consumer.ledger.database import asyncpg_dsn
from producer.events import AnyEvent
from tests.factories import SPACE, T0, call, finalized, ledger_events, started
from tests.integration.harness import wait_for

_CLOCK = datetime.now(UTC)
_MIDNIGHT = _CLOCK.replace(hour=0, minute=0, second=0, microsecond=0)
NOW = _MIDNIGHT + (_CLOCK - _MIDNIGHT) / 2
OTHER_SPACE = SPACE + 1


def seconds_to(moment: datetime) -> float:
    return (moment - T0).total_seconds()


def today(thread_id: int, cost: int) -> AnyEvent:
    return finalized(
        thread_id=thread_id,
        turn_id=f"{thread_id}:1",
        calls=[call(cost=cost)],
        seconds=seconds_to(NOW),
    )


async def apply(conn: asyncpg.Connection, *events: AnyEvent) -> None:
    async with conn.transaction():
        await apply_events(conn, ledger_events(list(events)))


async def budget(conn: asyncpg.Connection, change: BudgetChange) -> int:
    async with conn.transaction():
        return await set_budget(conn, change)


async def outbox(conn: asyncpg.Connection) -> list[tuple[str, int, int, bool, int]]:
    rows = await conn.fetch(
        "SELECT measure, threshold, sequence, crossed, spend FROM budget_alert_outbox ORDER BY id"
    )
    return [
        (r["measure"], r["threshold"], r["sequence"], r["crossed"], int(r["spend"])) for r in rows
    ]


async def test_set_constraints_all_immediate_loses_the_crossing_of_the_transaction(
    ledger: asyncpg.Connection,
) -> None:
    # 400 of 1000, then one transaction (SET CONSTRAINTS ALL IMMEDIATE first, as an operator
    # session or a tool checking its constraints early may do) adds 700: 1100 crosses 100 %.
    # Immediate, budget_periods_judged fires at the end of budget_add's INSERT, before the
    # trigger appends its pairs to token_ledger.budgets_pending: it finds nothing to judge, and
    # nothing is left to fire at COMMIT. No state, no alert, and verify reports the state.
    await apply(ledger, today(1, 400))
    await budget(ledger, BudgetChange(SPACE, None, "day", 1000, None, (100,)))
    assert await outbox(ledger) == []
    async with ledger.transaction():
        await ledger.execute("SET CONSTRAINTS ALL IMMEDIATE")
        await apply_events(ledger, ledger_events([today(2, 700)]))
    assert await ledger.fetchval("SELECT sum(cost_micros) FROM token_usage") == 1100
    assert await outbox(ledger) == [("cost_micros", 100, 1, True, 1100)]
    assert await check_budgets(ledger) == []


async def test_a_usage_row_moved_to_another_space_while_budget_set_creates_the_old_spaces_budget(
    ledger: asyncpg.Connection, ledger_url: str
) -> None:
    # A manual UPDATE that moves a usage row to another search space (0005 gives it two
    # revisions: an attribution move). budgets_usage_revised locks only new_rows' spaces
    # (OTHER_SPACE), not the space the row leaves (SPACE), while it takes the row's amounts
    # out of SPACE's budgets. So `budget set` creating SPACE's budget (exclusive lock on
    # SPACE) does not wait for it: it sums the row still in SPACE (uncommitted move), the
    # trigger did not see the uncommitted budget. The budget keeps 600 the rows no longer hold
    # (test_budget_transactions' test 4, for an UPDATE instead of a DELETE).
    await apply(ledger, started(seconds=seconds_to(NOW)))
    await apply(ledger, today(1, 600))
    operator = await asyncpg.connect(asyncpg_dsn(ledger_url))
    try:
        moving = operator.transaction()
        await moving.start()
        await operator.execute(
            "UPDATE token_usage SET search_space_id = $1 WHERE thread_id = 1", OTHER_SPACE
        )
        setting = asyncio.create_task(
            budget(ledger, BudgetChange(SPACE, None, "day", 1000, None, (50,)))
        )

        async def set_waits_or_done() -> bool:
            if setting.done():
                return True
            return bool(
                await operator.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND pid = $1",
                    ledger.get_server_pid(),
                )
            )

        await wait_for(set_waits_or_done, within=30, what="budget set waiting or done")
        await moving.commit()
        await setting
    finally:
        await operator.close()
    assert (
        await ledger.fetchval(
            "SELECT coalesce(sum(cost_micros), 0) FROM token_usage WHERE search_space_id = $1",
            SPACE,
        )
        == 0
    )
    assert await check_budgets(ledger) == []  # stored 600, SPACE's rows sum to 0
    assert await outbox(ledger) == []  # 50 % crossed on phantom spend


async def test_budget_set_in_the_transaction_of_a_usage_write_judges_the_committed_limits(
    ledger: asyncpg.Connection,
) -> None:
    # Held: usage that crosses 50 % of 1000, then (same transaction) the limit raised to 2000.
    await apply(ledger, today(1, 400))
    await budget(ledger, BudgetChange(SPACE, None, "day", 1000, None, (50,)))
    async with ledger.transaction():
        await apply_events(ledger, ledger_events([today(2, 200)]))
        await set_budget(ledger, BudgetChange(SPACE, None, "day", 2000, None, (50,)))
    assert await outbox(ledger) == []
    assert await check_budgets(ledger) == []
