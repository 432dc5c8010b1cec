"""Against the real database: for any delivery order, duplication and batching of generated
traffic with budgets, the budget states `budget_evaluate` (migrations/versions/0012) keeps
equal the budget rules (consumer/billing/budget_rules.py) applied to the ledger's rows after
every batch, each batch's alerts are exactly the changes of that state, and each period's
stored spend is its rows' sum.

So the last alert per (budget, period, measure, threshold) is the state of the final ledger,
its sequence numbers run 1, 2, 3, … and no two consecutive alerts of one are the same kind."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import datetime

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.billing.budget_rules import Budget, Kind, alerts, judge, spends_by_period
from consumer.ledger.batch import apply_events
from consumer.ledger.database import asyncpg_dsn
from producer.events import AnyEvent
from tests.factories import ledger_events
from tests.strategies import across_periods, batch_splits, delivered

TABLES = (
    "budget_alert_outbox, budget_periods, budget_states, budgets, billing_outbox, token_usage, chat_messages,"
    " chat_threads"
)
# Spaces 1 and 2 are threads 1 and 2 (tests/strategies.py); user 1 is one of the drawn users.
# Small limits, so that a few calls of 0..99 micros and 0..18 tokens cross and fall back.
BUDGETS = (
    Budget(1, 1, None, "day", 40, 10, (50, 80, 100)),
    Budget(2, 1, uuid.UUID(int=1), "month", 30, None, (30, 100)),
    Budget(3, 2, None, "total", 80, 20, (50, 100)),
)
State = dict[tuple[int, datetime, str, int], bool]


class BudgetDriver:
    """One event loop and connection for all examples (hypothesis tests are synchronous)."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.conn: asyncpg.Connection = self.loop.run_until_complete(
            asyncpg.connect(asyncpg_dsn(url))
        )

    def run(self, batches: list[list[AnyEvent]]) -> None:
        self.loop.run_until_complete(self._run(batches))

    async def _run(self, batches: list[list[AnyEvent]]) -> None:
        await self.conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY")
        for budget in BUDGETS:
            await self.conn.execute(
                "INSERT INTO budgets (id, search_space_id, user_id, period, cost_micros_limit,"
                " total_tokens_limit, thresholds) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                budget.id,
                budget.search_space_id,
                budget.user_id,
                budget.period,
                budget.cost_micros_limit,
                budget.total_tokens_limit,
                list(budget.thresholds),
            )
        before: State = {}
        for batch in batches:
            seen = await self.conn.fetchval("SELECT coalesce(max(id), 0) FROM budget_alert_outbox")
            async with self.conn.transaction():
                await apply_events(self.conn, ledger_events(batch))
            after = await self.computed()
            assert await self.stored() == after
            assert await self.stored_spends() == await self.summed_spends()
            assert await self.alerts_since(seen) == alerts(before, after)
            before = after
        await self._check_sequences(before)
        # A replay of everything in one batch changes no state and writes no alert.
        count = await self.conn.fetchval("SELECT count(*) FROM budget_alert_outbox")
        async with self.conn.transaction():
            await apply_events(
                self.conn, ledger_events(event for batch in batches for event in batch)
            )
        assert await self.conn.fetchval("SELECT count(*) FROM budget_alert_outbox") == count

    async def usage(self) -> list[tuple[int, uuid.UUID | None, datetime, int, int]]:
        usage = await self.conn.fetch(
            "SELECT search_space_id, user_id, source_at, cost_micros, total_tokens FROM token_usage"
        )
        return [
            (
                r["search_space_id"],
                r["user_id"],
                r["source_at"],
                r["cost_micros"],
                r["total_tokens"],
            )
            for r in usage
        ]

    async def summed_spends(self) -> dict[tuple[int, datetime], dict[str, int]]:
        """Each budget period's spend summed from the ledger's rows, here, not in SQL (but
        not the periods whose rows sum to 0: budget_periods need not hold them)."""
        rows = await self.usage()
        return {
            (budget.id, start): spends
            for budget in BUDGETS
            for start, spends in spends_by_period(budget, rows).items()
            if any(spends.values())
        }

    async def stored_spends(self) -> dict[tuple[int, datetime], dict[str, int]]:
        """budget_periods, without its periods of 0 (say, whose rows moved away)."""
        rows = await self.conn.fetch(
            "SELECT budget_id, period_start, cost_micros, total_tokens FROM budget_periods"
            " WHERE cost_micros <> 0 OR total_tokens <> 0"
        )
        return {
            (r["budget_id"], r["period_start"]): {
                "cost_micros": int(r["cost_micros"]),
                "total_tokens": int(r["total_tokens"]),
            }
            for r in rows
        }

    async def computed(self) -> State:
        """The rules applied to the ledger's rows (every period of usage the budgets cover)."""
        rows = await self.usage()
        state: State = {}
        for budget in BUDGETS:
            for start, spends in spends_by_period(budget, rows).items():
                for (measure, threshold), now in judge(spends, budget.limits()).items():
                    state[budget.id, start, measure, threshold] = now
        return {key: crossed for key, crossed in state.items() if crossed}

    async def stored(self) -> State:
        rows = await self.conn.fetch(
            "SELECT budget_id, period_start, measure, threshold FROM budget_states WHERE crossed"
        )
        return {
            (r["budget_id"], r["period_start"], r["measure"], r["threshold"]): True for r in rows
        }

    async def alerts_since(self, seen: int) -> dict[tuple[int, datetime, str, int], Kind]:
        rows = await self.conn.fetch(
            "SELECT budget_id, period_start, measure, threshold, crossed FROM budget_alert_outbox"
            " WHERE id > $1",
            seen,
        )
        keys: list[tuple[int, datetime, str, int]] = [
            (r["budget_id"], r["period_start"], r["measure"], r["threshold"]) for r in rows
        ]
        assert len(set(keys)) == len(keys), "two alerts of one state in one batch"
        return {
            key: "crossed" if row["crossed"] else "withdrawn"
            for key, row in zip(keys, rows, strict=True)
        }

    async def _check_sequences(self, final: State) -> None:
        rows = await self.conn.fetch(
            "SELECT budget_id, period_start, measure, threshold, sequence, crossed"
            " FROM budget_alert_outbox ORDER BY id"
        )
        last: dict[tuple[object, ...], tuple[int, bool]] = {}
        for row in rows:
            key = (row["budget_id"], row["period_start"], row["measure"], row["threshold"])
            sequence, crossed = last.get(key, (0, False))
            assert row["sequence"] == sequence + 1 and row["crossed"] != crossed, dict(row)
            assert row["crossed"] == (row["sequence"] % 2 == 1)
            last[key] = (row["sequence"], row["crossed"])
        assert {key for key, (_, crossed) in last.items() if crossed} == set(final)

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()


@pytest.fixture
def driver(ledger_url: str) -> Iterator[BudgetDriver]:
    driver = BudgetDriver(ledger_url)
    yield driver
    driver.close()


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_budget_states_and_alerts_follow_the_ledger_whatever_the_delivery(
    driver: BudgetDriver, data: st.DataObject
) -> None:
    events = data.draw(delivered(instants=across_periods))
    driver.run(data.draw(batch_splits(events)))
