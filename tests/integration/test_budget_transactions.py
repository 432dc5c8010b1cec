"""Budgets judged once per transaction, on what it commits, against the real PostgreSQL
(migrations/versions/0012, docs/design.md#budgets):

1. A batch split around a poison record (apply_isolating, savepoints) writes its usage in
   several statements: no crossing on a spend between them.
2. A MERGE that deletes and inserts usage (a manual fix) is judged once.
3. Migration 0012 does not deadlock with a 0010 batch that holds its budget rows and waits
   behind it.
4. A manual DELETE of usage racing `budget set` of a new budget waits for it, then takes its
   amounts away: no phantom spend.
"""

from __future__ import annotations

import asyncio

import asyncpg
from aiokafka.structs import ConsumerRecord

from consumer.commands.budget_check import check_budgets
from consumer.commands.budgets import BudgetChange, set_budget
from consumer.ledger.batch import Applied, apply_events, apply_isolating
from consumer.ledger.database import asyncpg_dsn
from consumer.ledger.migrate import upgrade
from tests.chaos.poison import REFUSED_MARKER, REFUSING_CONSTRAINT
from tests.factories import SPACE, USER, appended, call, finalized, ledger_events, started
from tests.integration.budget_harness import (
    NOW,
    apply,
    budget,
    outbox,
    seconds_to,
    waits_for_a_lock,
)
from tests.integration.harness import wait_for

OTHER_SPACE = SPACE + 1


def _record(offset: int) -> ConsumerRecord:
    return ConsumerRecord("chat.turn-events", 0, offset, 0, 0, b"1", b"{}", None, 1, 2, [])


# 1 -------------------------------------------------------------------------------------------


async def test_a_batch_split_around_a_poison_record_writes_no_crossing_it_never_committed(
    ledger: asyncpg.Connection,
) -> None:
    # 700 of 1000: 100 % not crossed. One batch (one transaction, commit_batch's step 2b) adds
    # a new turn of 300 and corrects the legacy 700 to 400: the day ends at 700, never at
    # 1000, so the rules give no alert. The batch also holds a record the database refuses
    # (SQLSTATE 23514, as the chaos corpus makes one): apply_isolating splits it, and the new
    # turn and the correction are written by two usage statements in one transaction. Judged
    # per statement, the period would cross 100 % at 1000, then withdraw at 700.
    await ledger.execute(REFUSING_CONSTRAINT)
    await apply(
        ledger, started(seconds=seconds_to(NOW)), appended(cost=700, seconds=seconds_to(NOW))
    )
    await budget(ledger, BudgetChange(SPACE, None, "day", 1000, None, (100,)))
    assert await outbox(ledger) == []

    events = ledger_events(
        [
            finalized(turn_id="4242:2", calls=[call(cost=300)], seconds=seconds_to(NOW) + 1),
            started(
                thread_id=99, turn_id="99:1", query=REFUSED_MARKER, seconds=seconds_to(NOW) + 2
            ),
            finalized(calls=[call(cost=400)], seconds=seconds_to(NOW) + 3),
        ]
    )
    applied = Applied()
    async with ledger.transaction():
        await apply_isolating(
            ledger, [(event, _record(i)) for i, event in enumerate(events)], applied
        )
    assert len(applied.letters) == 1  # the refused record, alone

    assert await ledger.fetchval("SELECT sum(cost_micros) FROM token_usage") == 700
    assert await check_budgets(ledger) == []  # the final state is right ...
    assert await outbox(ledger) == []  # ... but 100 % crossed at 1000, withdrawn at 700


# 2 -------------------------------------------------------------------------------------------


async def test_a_merge_that_deletes_and_inserts_usage_is_judged_once(
    ledger: asyncpg.Connection,
) -> None:
    # 500 + 350 = 850 of 1000 crosses 80 %. One MERGE (a manual fix: replace thread 2's usage
    # row by thread 3's of 300) leaves 800: still crossed, no change of state. PostgreSQL fires
    # its AFTER DELETE statement trigger before its AFTER INSERT one: judged in between, it
    # would write a withdrawal at 500 and a second crossing at 800.
    await apply(
        ledger,
        finalized(thread_id=1, turn_id="1:1", calls=[call(cost=500)], seconds=seconds_to(NOW)),
        finalized(thread_id=2, turn_id="2:1", calls=[call(cost=350)], seconds=seconds_to(NOW)),
        started(thread_id=3, turn_id="3:1", seconds=seconds_to(NOW)),
    )
    await budget(ledger, BudgetChange(SPACE, None, "day", 1000, None, (80,)))
    assert await outbox(ledger) == [("cost_micros", 80, 1, True, 850)]
    await ledger.execute(
        """
        MERGE INTO token_usage AS u
        USING (SELECT t.id AS thread_id, m.id AS message_id
               FROM chat_threads AS t JOIN chat_messages AS m ON m.thread_id = t.id
               WHERE (t.id = 2 AND m.role = 'assistant') OR (t.id = 3 AND m.role = 'user')) AS s
        ON u.thread_id = s.thread_id
        WHEN MATCHED THEN DELETE
        WHEN NOT MATCHED THEN INSERT (thread_id, message_id, prompt_tokens, completion_tokens,
          total_tokens, cost_micros, model_breakdown, call_details, search_space_id, user_id,
          source, source_rank, source_at, source_event_id, created_at, updated_at)
        VALUES (s.thread_id, s.message_id, 0, 0, 0, 300, '{}', '[]', $1, $2,
          'turn.finalized', 2, $3, gen_random_uuid(), now(), now())
        """,
        SPACE,
        USER,
        NOW,
    )
    assert await ledger.fetchval("SELECT sum(cost_micros) FROM token_usage") == 800
    assert await check_budgets(ledger) == []
    assert await outbox(ledger) == [("cost_micros", 80, 1, True, 850)]


# 3 -------------------------------------------------------------------------------------------


async def test_0012_does_not_deadlock_with_a_0010_batch_queued_behind_it(
    database_url: str,
) -> None:
    # docs/operations.md: old consumers "write on (their batches wait while 0012 sums the usage
    # rows)". Batch A is in flight, so 0012 waits for it. Batch B of another member starts
    # meanwhile, in another space, and locks its budget row (store.py _LOCK_BUDGETS, FOR
    # UPDATE) before its usage upsert. Had 0012 locked token_usage first, B would queue behind
    # it while 0012's BACKFILL (its foreign-key check on budget_periods) waited for B's budget
    # row: a deadlock, which PostgreSQL breaks by aborting the migration (B checked its wait
    # once, deadlock_timeout after it began, while A still held: no cycle then).
    await asyncio.to_thread(upgrade, database_url, "0011")
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    member_a = await asyncpg.connect(asyncpg_dsn(database_url))
    member_b = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await conn.execute(
            "INSERT INTO budgets (search_space_id, period, cost_micros_limit, thresholds)"
            " VALUES ($1, 'day', 1000, '{100}'), ($2, 'day', 1000, '{100}')",
            SPACE,
            OTHER_SPACE,
        )
        await apply(
            conn,
            finalized(thread_id=1, turn_id="1:1", calls=[call(cost=300)], seconds=0),
            finalized(
                thread_id=3, turn_id="3:1", calls=[call(cost=300)], seconds=0, space=OTHER_SPACE
            ),
        )
        batch_a = member_a.transaction()
        await batch_a.start()
        await apply_events(
            member_a,
            ledger_events(
                [finalized(thread_id=2, turn_id="2:1", calls=[call(cost=400)], seconds=0)]
            ),
        )
        migrating = asyncio.create_task(asyncio.to_thread(upgrade, database_url))

        async def waiting(query_like: str) -> bool:
            return bool(
                await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE $1",
                    query_like,
                )
            )

        await wait_for(lambda: waiting("LOCK TABLE%"), within=30, what="0012 queued behind A")

        async def batch_b() -> None:
            async with member_b.transaction():
                await apply_events(
                    member_b,
                    ledger_events(
                        [
                            finalized(
                                thread_id=3,
                                turn_id="3:2",
                                calls=[call(cost=300)],
                                seconds=0,
                                space=OTHER_SPACE,
                            )
                        ]
                    ),
                )

        b = asyncio.create_task(batch_b())

        async def b_queued() -> bool:
            # Behind 0012's lock: its usage upsert before the fix, its budget rows with it.
            return await waits_for_a_lock(conn, member_b.get_server_pid())

        await wait_for(b_queued, within=30, what="B queued behind 0012")
        await asyncio.sleep(1.5)  # A's batch runs on past B's deadlock check (1 s)
        await batch_a.commit()
        outcomes = await asyncio.gather(migrating, b, return_exceptions=True)
        # A batch aborted by a deadlock is retried; the migration must go through.
        assert not isinstance(outcomes[0], BaseException), outcomes[0]
    finally:
        await member_a.close()
        await member_b.close()
        await conn.close()


# 4 -------------------------------------------------------------------------------------------


async def test_a_usage_delete_while_budget_set_creates_the_budget_leaves_no_phantom_spend(
    ledger: asyncpg.Connection, ledger_url: str
) -> None:
    # A manual DELETE of usage while `budget set` creates a budget: `budget set` sums the
    # rows the DELETE has not committed yet. Unless the DELETE's trigger waits for the
    # space's lock (as a batch does: store.py _LOCK_SPACES), it does not see the uncommitted
    # budget and takes nothing from its sums: the new budget keeps 600 the rows no longer hold.
    await apply(ledger, started(seconds=seconds_to(NOW)))
    await apply(
        ledger,
        finalized(thread_id=1, turn_id="1:1", calls=[call(cost=600)], seconds=seconds_to(NOW)),
    )
    operator = await asyncpg.connect(asyncpg_dsn(ledger_url))
    try:
        setting = ledger.transaction()
        await setting.start()
        await set_budget(ledger, BudgetChange(SPACE, None, "day", 1000, None, (50,)))
        deleting = asyncio.create_task(operator.execute("DELETE FROM chat_threads WHERE id = 1"))

        async def delete_waits() -> bool:
            # Without the lock in its trigger it never waits: it commits before `budget set`.
            return deleting.done() or await waits_for_a_lock(ledger, operator.get_server_pid())

        await wait_for(delete_waits, within=30, what="the DELETE waiting or done")
        await setting.commit()
        await deleting
    finally:
        await operator.close()
    assert await ledger.fetchval("SELECT coalesce(sum(cost_micros), 0) FROM token_usage") == 0
    assert await check_budgets(ledger) == []  # stored 600, the rows sum to 0
    # `budget set` committed first, on 600 of committed usage; the delete, which waited for
    # it, took the 600 away.
    assert await outbox(ledger) == [
        ("cost_micros", 50, 1, True, 600),
        ("cost_micros", 50, 2, False, 0),
    ]
