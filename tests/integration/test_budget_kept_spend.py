"""Where a kept spend (budget_periods, migrations/versions/0012) could part from the rows it
sums, against the real PostgreSQL (docs/design.md#budgets):

1. One usage upsert fires AFTER UPDATE, then AFTER INSERT: its periods are judged once, on what
   the whole statement left, not between the two (a withdrawal and a second crossing where the
   state holds).
2. A batch of a consumer still on 0010 that commits while 0012 migrates is in the sums.
3. `budget set`, the repair verify names, judges the past periods whose spend it sums again.
4. A usage row deleted (by hand, or with its thread) or truncated takes its amounts away.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg

from consumer.commands.budget_check import check_budgets
from consumer.commands.budgets import BudgetChange
from consumer.ledger.batch import apply_events
from consumer.ledger.database import asyncpg_dsn
from consumer.ledger.migrate import upgrade
from tests.factories import SPACE, appended, call, finalized, ledger_events, started
from tests.integration.budget_harness import NOW, apply, budget, outbox, seconds_to, today
from tests.integration.harness import wait_for

# 1 -------------------------------------------------------------------------------------------


async def test_a_batch_that_corrects_one_usage_and_adds_another_writes_no_alert_if_the_state_holds(
    ledger: asyncpg.Connection,
) -> None:
    # 850 of 1000 crosses 80 %. One batch (one usage upsert) then supersedes the legacy 850 by
    # the finalize's 500 (an UPDATE) and adds a new turn of 400 (an INSERT): the day ends at
    # 900, still crossed, so no record. Judged after the upsert's AFTER UPDATE trigger, it
    # would write a withdrawal at 500, then a second crossing at 900.
    await apply(
        ledger, started(seconds=seconds_to(NOW)), appended(cost=850, seconds=seconds_to(NOW))
    )
    await budget(ledger, BudgetChange(SPACE, None, "day", 1000, None, (80,)))
    assert await outbox(ledger) == [("cost_micros", 80, 1, True, 850)]

    await apply(
        ledger,
        finalized(calls=[call(cost=500)], seconds=seconds_to(NOW) + 1),
        finalized(turn_id="4242:2", calls=[call(cost=400)], seconds=seconds_to(NOW) + 2),
    )
    assert await ledger.fetchval("SELECT sum(cost_micros) FROM token_usage") == 900
    assert await check_budgets(ledger) == []  # the final state is right ...
    assert await outbox(ledger) == [("cost_micros", 80, 1, True, 850)]  # ... the records are not


async def test_a_crossing_records_the_committed_spend_not_the_spend_between_two_triggers(
    ledger: asyncpg.Connection,
) -> None:
    # 700 of 1000; one batch corrects the 700 to 850 (UPDATE) and adds 100 (INSERT). The
    # committed spend is 950, and the record must say so (contract: `spend` is the period's
    # committed spend), not the 850 between the upsert's two triggers.
    await apply(
        ledger, started(seconds=seconds_to(NOW)), appended(cost=700, seconds=seconds_to(NOW))
    )
    await budget(ledger, BudgetChange(SPACE, None, "day", 1000, None, (80,)))
    await apply(
        ledger,
        finalized(calls=[call(cost=850)], seconds=seconds_to(NOW) + 1),
        finalized(turn_id="4242:2", calls=[call(cost=100)], seconds=seconds_to(NOW) + 2),
    )
    assert await outbox(ledger) == [("cost_micros", 80, 1, True, 950)]


# 2 -------------------------------------------------------------------------------------------


async def test_a_batch_an_old_consumer_commits_while_0012_migrates_is_counted_in_budget_periods(
    database_url: str,
) -> None:
    # docs/operations.md: the migrate Job runs "while the old consumers keep running". A
    # batch of a 0010 consumer in flight when 0012 sums the rows runs 0010's triggers: unless
    # the migration waits for it, its usage is in no sum (the spend is kept from deltas from
    # then on).
    await asyncio.to_thread(upgrade, database_url, "0011")
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    old_member = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await conn.execute(
            "INSERT INTO budgets (search_space_id, period, cost_micros_limit, thresholds)"
            " VALUES ($1, 'day', 1000, '{100}')",
            SPACE,
        )
        await apply(conn, today(1, 300))
        batch = old_member.transaction()  # the old member's batch, in flight
        await batch.start()
        await apply_events(old_member, ledger_events([today(2, 400)]))
        migrating = asyncio.create_task(asyncio.to_thread(upgrade, database_url))

        async def migration_waits() -> bool:
            # Before the fix, BACKFILL's foreign-key check; with it, the migration's LOCK TABLE.
            return bool(
                await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND (query LIKE '%INSERT INTO budget_periods%' OR query LIKE 'LOCK TABLE%')"
                )
            )

        await wait_for(migration_waits, within=30, what="the migration waiting for the batch")
        await batch.commit()
        await migrating

        assert await conn.fetchval("SELECT sum(cost_micros) FROM token_usage") == 700
        assert await check_budgets(conn) == []  # stored 300, the rows sum to 700
        # Money: 300 more bring the rows to 1000 of 1000; the 100 % crossing is never written.
        await apply(conn, today(3, 300))
        assert await outbox(conn) == [("cost_micros", 100, 1, True, 1000)]
    finally:
        await old_member.close()
        await conn.close()


# 3 -------------------------------------------------------------------------------------------


async def test_budget_set_as_the_repair_judges_the_past_periods_whose_spend_it_sums_again(
    ledger: asyncpg.Connection,
) -> None:
    # verify's remedy for a stored spend that differs from the rows is `budget set` with the
    # budget's own values (budget_check.py). It must judge the past periods it sums again,
    # not only the current one: else a past period keeps states judged on the wrong spend.
    yesterday = NOW - timedelta(days=1)
    await apply(ledger, started(seconds=seconds_to(NOW)))
    change = BudgetChange(SPACE, None, "day", 1000, None, (50,))
    await budget(ledger, change)
    await apply(
        ledger,
        finalized(
            thread_id=1, turn_id="1:1", calls=[call(cost=300)], seconds=seconds_to(yesterday)
        ),
    )  # yesterday judged: 300 of 1000
    # A batch whose usage never reached budget_periods (a write that bypassed the triggers):
    # the rows say 600, the kept spend 300, the state not crossed.
    await ledger.execute("ALTER TABLE token_usage DISABLE TRIGGER budgets_usage_created")
    await apply(
        ledger,
        finalized(
            thread_id=2, turn_id="2:1", calls=[call(cost=300)], seconds=seconds_to(yesterday)
        ),
    )
    await ledger.execute("ALTER TABLE token_usage ENABLE TRIGGER budgets_usage_created")
    assert {d.table for d in await check_budgets(ledger)} == {"budget_periods", "budget_states"}

    await budget(ledger, change)  # the documented repair
    assert await check_budgets(ledger) == []  # budget_states: stored not crossed, 600 of 1000
    assert await outbox(ledger) == [("cost_micros", 50, 1, True, 600)]


# 4 -------------------------------------------------------------------------------------------


async def test_a_usage_row_deleted_by_hand_leaves_no_phantom_spend_for_the_next_batch(
    ledger: asyncpg.Connection,
) -> None:
    # docs/design.md counts "a manual fix" among the statements that change usage: a deleted
    # row (by hand, or by a chat_threads or chat_messages delete cascading) must leave the
    # period's kept spend.
    await apply(ledger, started(seconds=seconds_to(NOW)))
    await budget(ledger, BudgetChange(SPACE, None, "day", 1000, None, (100,)))
    await apply(ledger, today(1, 600))
    await ledger.execute("DELETE FROM token_usage WHERE thread_id = 1")  # the manual fix
    await apply(ledger, today(2, 500))  # the rows: 500 of 1000

    assert await outbox(ledger) == []  # 0012: a crossing at 1100, a spend no rows add up to
    assert await check_budgets(ledger) == []


async def test_a_truncated_usage_table_leaves_every_period_at_0_and_withdraws_its_crossings(
    ledger: asyncpg.Connection,
) -> None:
    await apply(ledger, started(seconds=seconds_to(NOW)))
    await budget(ledger, BudgetChange(SPACE, None, "day", 1000, None, (50,)))
    await apply(ledger, today(1, 600))
    await ledger.execute("TRUNCATE token_usage CASCADE")
    assert await ledger.fetchval("SELECT sum(cost_micros) FROM budget_periods") == 0
    assert await outbox(ledger) == [
        ("cost_micros", 50, 1, True, 600),
        ("cost_micros", 50, 2, False, 0),
    ]
    assert await check_budgets(ledger) == []
