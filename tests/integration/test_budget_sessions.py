"""Budgets under what an operator's session may do, against the real PostgreSQL
(migrations/versions/0012, docs/design.md#budgets): check its constraints at once (SET
CONSTRAINTS … IMMEDIATE), move a usage row to another space while `budget set` creates the
budget of the space it leaves, change a budget in the transaction that writes usage."""

from __future__ import annotations

import asyncio

import asyncpg

from consumer.commands.budget_check import check_budgets
from consumer.commands.budgets import BudgetChange, set_budget
from consumer.ledger.batch import apply_events
from consumer.ledger.database import asyncpg_dsn
from tests.factories import SPACE, ledger_events, started
from tests.integration.budget_harness import (
    NOW,
    apply,
    budget,
    outbox,
    seconds_to,
    today,
    waits_for_a_lock,
)
from tests.integration.harness import wait_for

OTHER_SPACE = SPACE + 1


async def test_set_constraints_all_immediate_loses_the_crossing_of_the_transaction(
    ledger: asyncpg.Connection,
) -> None:
    # 400 of 1000, then one transaction (SET CONSTRAINTS ALL IMMEDIATE first, as an operator
    # session or a tool checking its constraints early may do) adds 700: 1100 crosses 100 %.
    # Immediate, budget_periods_judged fires at the end of budget_add's statement: the
    # trigger's periods must be listed by then, or nothing judges them, now or at COMMIT.
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
    # revisions: an attribution move) takes its amounts out of the budgets of the space it
    # leaves. Its trigger must lock that space too, so that `budget set` creating that space's
    # budget waits for the move: else it sums the row still there (the move is uncommitted),
    # the trigger never saw the budget, and the budget keeps 600 the rows no longer hold.
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
            return setting.done() or await waits_for_a_lock(operator, ledger.get_server_pid())

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
    assert await check_budgets(ledger) == []  # not 600 stored where SPACE's rows sum to 0
    assert await outbox(ledger) == []  # no 50 % crossing on spend the rows do not hold


async def test_budget_set_in_the_transaction_of_a_usage_write_judges_the_committed_limits(
    ledger: asyncpg.Connection,
) -> None:
    # Usage that crosses 50 % of 1000, then (same transaction) the limit raised to 2000: judged
    # at COMMIT, on the limits it commits.
    await apply(ledger, today(1, 400))
    await budget(ledger, BudgetChange(SPACE, None, "day", 1000, None, (50,)))
    async with ledger.transaction():
        await apply_events(ledger, ledger_events([today(2, 200)]))
        await set_budget(ledger, BudgetChange(SPACE, None, "day", 2000, None, (50,)))
    assert await outbox(ledger) == []
    assert await check_budgets(ledger) == []
