"""What the budget tests share: usage at the middle of today (UTC), a batch applied through the
consumer's own write path, `budget set` in its own transaction, and the alerts written."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from consumer.commands.budgets import BudgetChange, set_budget
from consumer.ledger.batch import apply_events
from producer.events import AnyEvent
from tests.factories import T0, call, finalized, ledger_events

# Well inside today (UTC), whenever the tests run: the budgets' current day.
_CLOCK = datetime.now(UTC)
_MIDNIGHT = _CLOCK.replace(hour=0, minute=0, second=0, microsecond=0)
NOW = _MIDNIGHT + (_CLOCK - _MIDNIGHT) / 2


def seconds_to(moment: datetime) -> float:
    """The factories' `seconds` (after T0) of a moment."""
    return (moment - T0).total_seconds()


def today(thread_id: int, cost: int) -> AnyEvent:
    """A turn of its own thread, finalized at NOW with one call of `cost` micros."""
    return finalized(
        thread_id=thread_id,
        turn_id=f"{thread_id}:1",
        calls=[call(cost=cost)],
        seconds=seconds_to(NOW),
    )


async def apply(conn: asyncpg.Connection, *events: AnyEvent) -> None:
    """One batch, in one transaction, through the consumer's write path."""
    async with conn.transaction():
        await apply_events(conn, ledger_events(list(events)))


async def budget(conn: asyncpg.Connection, change: BudgetChange) -> int:
    async with conn.transaction():
        return await set_budget(conn, change)


async def outbox(conn: asyncpg.Connection) -> list[tuple[str, int, int, bool, int]]:
    """(measure, threshold, sequence, crossed, spend) of every alert written, in order."""
    rows = await conn.fetch(
        "SELECT measure, threshold, sequence, crossed, spend FROM budget_alert_outbox ORDER BY id"
    )
    return [
        (r["measure"], r["threshold"], r["sequence"], r["crossed"], int(r["spend"])) for r in rows
    ]


async def waits_for_a_lock(observer: asyncpg.Connection, pid: int) -> bool:
    """Whether the backend `pid` waits for a lock now (seen from another connection)."""
    return bool(
        await observer.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted AND pid = $1", pid)
    )
