"""Against the real database: any delivery order, duplication and split into batches (each its
own transaction) yields identical tables, equal to the plainly written reference, and the
usage counters the batches report add up to the ledger's sums per model and measure."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator, Mapping

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.billing.records import OUTBOX_COLUMNS, billing_event
from consumer.commands.queries import read_ledger, usage_report
from consumer.ledger.batch import apply_events
from consumer.ledger.database import asyncpg_dsn
from consumer.ledger.rebuild import LedgerRows
from producer.events import USAGE_MEASURES, AnyEvent
from tests.factories import ledger_events
from tests.reference import reference_rows
from tests.strategies import across_periods, batch_splits, delivered

TABLES = "billing_outbox, token_usage, chat_messages, chat_threads, consumer_offsets"


class LedgerDriver:
    """One event loop and connection for all examples (hypothesis tests are synchronous)."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.conn: asyncpg.Connection = self.loop.run_until_complete(
            asyncpg.connect(asyncpg_dsn(url))
        )

    def run(self, batches: list[list[AnyEvent]]) -> LedgerRows:
        return self.loop.run_until_complete(self._run(batches))

    async def _run(self, batches: list[list[AnyEvent]]) -> LedgerRows:
        await self.conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY")
        # What the consumer's counters would show: total - reversed, per model and measure.
        counted: Counter[tuple[str, str]] = Counter()
        for batch in batches:
            async with self.conn.transaction():
                plan = await apply_events(self.conn, ledger_events(batch))
            for change in plan.usage_changes:
                for name in USAGE_MEASURES:
                    counted[change.model, name] += getattr(change, name)
        await self._check_counters(counted)
        ledger = await read_ledger(self.conn)
        await self._check_revisions()
        # A replay of everything (one batch) changes nothing, and writes no revision.
        revisions = await self.conn.fetchval("SELECT count(*) FROM billing_outbox")
        async with self.conn.transaction():
            await apply_events(
                self.conn, ledger_events(event for batch in batches for event in batch)
            )
        assert await self.conn.fetchval("SELECT count(*) FROM billing_outbox") == revisions
        return ledger

    async def billed_by_attribution(self) -> dict[tuple[str, str, str], tuple[int, ...]]:
        """Σ delta of the billing stream's records (built from the outbox as the relay builds
        them), grouped by (subject, user_id, UTC day of `time`)."""
        rows = await self.conn.fetch(
            f"SELECT {OUTBOX_COLUMNS} FROM billing_outbox AS o"
            " LEFT JOIN chat_messages AS m ON m.id = o.message_id ORDER BY o.id"
        )
        billed: dict[tuple[str, str, str], Counter[str]] = {}
        for row in rows:
            event = billing_event(row)
            key = (event["subject"], event["data"]["user_id"] or "(none)", event["time"][:10])
            billed.setdefault(key, Counter()).update(event["data"]["delta"])
        return {
            key: tuple(sums[m] for m in USAGE_MEASURES)
            for key, sums in billed.items()
            if any(sums.values())
        }

    async def ledger_by_attribution(self) -> dict[tuple[str, str, str], tuple[int, ...]]:
        """`token-ledger usage --by space --by user --by day`, in the same terms."""
        rows = await usage_report(self.conn, ["space", "user", "day"])
        return {
            (row["space"], row["user"], row["day"]): tuple(row[m] for m in USAGE_MEASURES)
            for row in rows
            if any(row[m] for m in USAGE_MEASURES)
        }

    async def _check_revisions(self) -> None:
        """The billing outbox: revisions 1..n per usage row (n its current revision), and the
        deltas of each row's revisions add up to its current values."""
        measures = ("prompt_tokens", "completion_tokens", "total_tokens", "cost_micros")
        rows = await self.conn.fetch(
            "SELECT u.id, u.revision, array_agg(o.revision ORDER BY o.revision) AS revisions, "
            + ", ".join(f"u.{m} AS {m}, sum(o.delta_{m}) AS delta_{m}" for m in measures)
            + " FROM token_usage AS u LEFT JOIN billing_outbox AS o ON o.usage_id = u.id"
            " GROUP BY u.id"
        )
        for row in rows:
            assert row["revisions"] == list(range(1, row["revision"] + 1)), dict(row)
            for m in measures:
                assert row[f"delta_{m}"] == row[m], dict(row)
        orphans = await self.conn.fetchval(
            "SELECT count(*) FROM billing_outbox WHERE usage_id NOT IN (SELECT id FROM token_usage)"
        )
        assert orphans == 0

    async def _check_counters(self, counted: Counter[tuple[str, str]]) -> None:
        by_model = await usage_report(self.conn, ["model"])
        ledger = {(row["model"], name): row[name] for row in by_model for name in USAGE_MEASURES}
        # A breakdown larger than its totals leaves a negative (unattributed) share.
        assert _nonzero(counted) == _nonzero(ledger), (counted, ledger)
        sums = await self.conn.fetchrow(
            f"SELECT {', '.join(f'coalesce(sum({n}), 0) AS {n}' for n in USAGE_MEASURES)}"
            " FROM token_usage"
        )
        for name in USAGE_MEASURES:
            assert sum(v for (_, n), v in counted.items() if n == name) == sums[name]

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()


def _nonzero(values: Mapping[tuple[str, str], int]) -> dict[tuple[str, str], int]:
    return {key: value for key, value in values.items() if value}


@pytest.fixture
def driver(ledger_url: str) -> Iterator[LedgerDriver]:
    driver = LedgerDriver(ledger_url)
    yield driver
    driver.close()


@settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_delivery_and_batching_gives_the_reference_ledger(
    driver: LedgerDriver, data: st.DataObject
) -> None:
    events = data.draw(delivered())
    batches = data.draw(batch_splits(events))
    assert driver.run(batches) == reference_rows(events)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_conflicting_spaces_any_batching_follows_arrival_order(
    driver: LedgerDriver, data: st.DataObject
) -> None:
    events = data.draw(delivered(consistent_spaces=False))
    batches = data.draw(batch_splits(events))
    assert driver.run(batches) == reference_rows(events)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_billing_grouped_by_user_and_day_is_the_ledger_grouped_the_same_way(
    driver: LedgerDriver, data: st.DataObject
) -> None:
    """Supersessions that move usage to another user, day or month, in any delivery order and
    batching: Σ delta per (tenant, user, day) equals `usage --by space --by user --by day`
    (docs/contract.md#billing-attribution)."""
    events = data.draw(delivered(instants=across_periods))
    batches = data.draw(batch_splits(events))
    driver.run(batches)
    billed = driver.loop.run_until_complete(driver.billed_by_attribution())
    assert billed == driver.loop.run_until_complete(driver.ledger_by_attribution())
