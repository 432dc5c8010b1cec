"""Budgets at their edges, against the real PostgreSQL through the consumer's own write path
(`apply_events`) and the command's own functions: a period whose spend passes 2^63 - 1, a
budget set while a batch writes its space, a change that reaches a later period judged early,
thresholds stored twice, and values out of range on the command line
(docs/contract.md#budgets-and-spend-alerts)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from consumer.commands.budget_check import check_budgets
from consumer.commands.budgets import BudgetChange, list_budgets, set_budget
from consumer.ledger.database import asyncpg_dsn
from producer.events import MAX_INT64
from tests.factories import SPACE, call, finalized, started
from tests.integration.budget_harness import apply, seconds_to
from tests.integration.harness import wait_for

REPO = Path(__file__).parents[2]


def waiting_on_a_space_lock(conn: asyncpg.Connection) -> Callable[[], Awaitable[bool]]:
    async def waiting() -> bool:
        return bool(
            await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            )
        )

    return waiting


async def test_a_period_whose_spend_passes_int64_neither_rejects_usage_nor_stops_the_commands(
    ledger: asyncpg.Connection,
) -> None:
    # Each row is within 2^63 - 1; their sum is not. A budget must not make the second row a
    # database rejection (a dead letter: usage lost to billing), nor stop list and verify.
    now = datetime.now(UTC) - timedelta(minutes=1)
    await ledger.execute(
        "INSERT INTO budgets (search_space_id, period, total_tokens_limit) VALUES ($1, 'day', 10)",
        SPACE,
    )
    await apply(
        ledger,
        finalized(
            thread_id=1, turn_id="1:1", calls=[call(cost=MAX_INT64)], seconds=seconds_to(now)
        ),
    )
    await apply(
        ledger, finalized(thread_id=2, turn_id="2:1", calls=[call(cost=5)], seconds=seconds_to(now))
    )
    assert await ledger.fetchval("SELECT count(*) FROM token_usage") == 2
    (listed,) = await list_budgets(ledger, None)
    assert listed["cost_micros"] == MAX_INT64 + 5
    assert await check_budgets(ledger) == []


async def test_a_budget_set_while_a_batch_writes_its_space_judges_that_batchs_usage(
    ledger_url: str, ledger: asyncpg.Connection
) -> None:
    now = datetime.now(UTC) - timedelta(minutes=1)
    await apply(ledger, started(seconds=seconds_to(now)))  # the space is known
    command = await asyncpg.connect(asyncpg_dsn(ledger_url))
    batch = await asyncpg.connect(asyncpg_dsn(ledger_url))
    try:
        setting = command.transaction()
        await setting.start()
        budget_id = await set_budget(command, BudgetChange(SPACE, None, "day", 100, None, (100,)))
        # A batch of 500 micros today, while the budget is not committed: it waits for it.
        writing = asyncio.create_task(
            apply(batch, finalized(calls=[call(cost=500)], seconds=seconds_to(now)))
        )
        await wait_for(waiting_on_a_space_lock(ledger), within=30, what="the batch waiting")
        assert not writing.done()
        await setting.commit()
        await writing
    finally:
        await command.close()
        await batch.close()
    states = await ledger.fetch(
        "SELECT crossed, spend FROM budget_states WHERE budget_id = $1", budget_id
    )
    assert [tuple(state) for state in states] == [(True, 500)]
    assert await ledger.fetchval("SELECT count(*) FROM budget_alert_outbox") == 1
    assert await check_budgets(ledger) == []


async def test_a_changed_limit_reaches_a_later_period_already_judged(
    ledger: asyncpg.Connection,
) -> None:
    # Usage up to LEDGER_MAX_FUTURE_SKEW ahead judges tomorrow early, under today's limit.
    now = datetime.now(UTC) - timedelta(minutes=1)
    tomorrow = (now + timedelta(days=1)).replace(hour=0, minute=10, second=0, microsecond=0)
    await apply(ledger, started(seconds=seconds_to(now)))
    budget_id = await set_budget(ledger, BudgetChange(SPACE, None, "day", 1000, None, (100,)))
    await apply(
        ledger,
        finalized(thread_id=1, turn_id="1:1", calls=[call(cost=600)], seconds=seconds_to(tomorrow)),
    )
    async with ledger.transaction():
        await set_budget(ledger, BudgetChange(SPACE, None, "day", 500, None, (100,)))
    rows = await ledger.fetch(
        "SELECT limit_value, crossed FROM budget_states WHERE budget_id = $1 AND period_start > now()",
        budget_id,
    )
    assert [tuple(row) for row in rows] == [(500, True)]


async def test_a_threshold_stored_twice_is_one_threshold(ledger: asyncpg.Connection) -> None:
    await ledger.execute(
        "INSERT INTO budgets (search_space_id, period, cost_micros_limit, thresholds)"
        " VALUES ($1, 'total', 1000, '{50,50}')",
        SPACE,
    )
    await apply(ledger, finalized(calls=[call(cost=600)]))
    assert await ledger.fetchval("SELECT count(*) FROM budget_alert_outbox") == 1


def run(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env["LEDGER_DATABASE_URL"] = url
    return subprocess.run(
        [sys.executable, "-m", "consumer", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


TOO_BIG = str(2**63)


@pytest.mark.parametrize(
    "args",
    [
        ("budget", "set", "--space", str(SPACE), "--period", "day", "--cost-micros", TOO_BIG),
        ("budget", "set", "--space", str(SPACE), "--period", "day", "--tokens", TOO_BIG),
        ("budget", "set", "--space", TOO_BIG, "--period", "day", "--tokens", "5"),
        ("budget", "delete", TOO_BIG),
        ("budget", "list", "--space", TOO_BIG),
    ],
    ids=["cost", "tokens", "space", "delete", "list"],
)
async def test_a_number_past_int64_is_exit_2_and_one_line(
    ledger: asyncpg.Connection, ledger_url: str, args: tuple[str, ...]
) -> None:
    await apply(ledger, started())
    done = await asyncio.to_thread(run, ledger_url, *args)
    lines = done.stderr.strip().splitlines()
    assert (done.returncode, len(lines)) == (2, 1), done.stderr[-1500:]
    assert TOO_BIG in lines[0]
