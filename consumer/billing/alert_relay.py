"""The budget alerts' share of a relay pass (consumer/billing/relay.py): pending rows of
`budget_alert_outbox` to the budget topic, under the same lock and rules as usage revisions.

In the pass's transaction, after the revisions: read up to `batch` pending alerts in id order
and keep each (budget, period, measure, threshold)'s oldest (its sequence n+1 is written only
after the transaction of n committed: the budget row's lock orders them), send them (key =
search_space_id: one tenant, one partition, in order) and wait for every acknowledgement, then
mark them published. A relay killed before the mark publishes the same rows again, as the same
bytes. An alert the topic refuses for good is held back with every later alert of its budget.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg

from consumer.billing.alerts import ALERT_COLUMNS, alert_key, budget_alert_event
from consumer.billing.records import encode
from consumer.kafka.dead_letters import REFUSALS
from consumer.logs import fields

log = logging.getLogger(__name__)

_PENDING = (
    f"SELECT {ALERT_COLUMNS} FROM budget_alert_outbox"  # noqa: S608 - constant columns
    " WHERE published_at IS NULL AND budget_id <> ALL($2::bigint[]) ORDER BY id LIMIT $1"
)
_COUNT_PENDING = (
    "SELECT count(*) AS pending,"
    " count(*) FILTER (WHERE budget_id <> ALL($1::bigint[])) AS publishable"
    " FROM budget_alert_outbox WHERE published_at IS NULL"
)
Publish = Callable[[list[tuple[bytes, bytes]]], Awaitable[list[BaseException | None]]]


@dataclass
class AlertPass:
    """What one pass published (kind, measure, threshold each, for the metric)."""

    published: list[tuple[str, str, int]] = field(default_factory=list)


@dataclass
class AlertRelay:
    publish: Publish
    batch: int
    # The budget topic ensured, once, when there is a first alert to send: a ledger without
    # budgets never needs the topic, and one that cannot have it yet holds back its alerts
    # only (the pass fails after the revisions' own transaction committed).
    prepare: Callable[[], Awaitable[None]] | None = None
    # budget id -> (alert id, why): refused for good; that budget's alerts wait for a restart.
    refused: dict[int, tuple[str, str]] = field(default_factory=dict)
    _prepared: bool = False

    async def publish_pending(self, conn: asyncpg.Connection) -> AlertPass:
        """One pass inside the caller's transaction (which holds the relay lock)."""
        done = AlertPass()
        rows = _oldest_each(await conn.fetch(_PENDING, self.batch, sorted(self.refused)))
        if not rows:
            return done
        if not self._prepared and self.prepare is not None:
            await self.prepare()
        self._prepared = True
        events = [budget_alert_event(row) for row in rows]
        results = await self.publish(
            [(alert_key(row), encode(event)) for row, event in zip(rows, events, strict=True)]
        )
        acked = []
        for row, event, error in zip(rows, events, results, strict=True):
            if error is None:
                acked.append(row["id"])
                kind = "crossed" if row["crossed"] else "withdrawn"
                done.published.append((kind, row["measure"], row["threshold"]))
            elif isinstance(error, REFUSALS):
                self.refused[row["budget_id"]] = (event["id"], f"refused: {type(error).__name__}")
                log.error(
                    "budget alert held back: it and its budget's later alerts wait",
                    extra=fields(id=event["id"], error=type(error).__name__),
                )
            else:  # retriable: the whole pass again (what was acked is sent again)
                raise error
        await conn.execute(
            "UPDATE budget_alert_outbox SET published_at = now() WHERE id = ANY($1::bigint[])",
            acked,
        )
        return done

    async def pending(self, conn: asyncpg.Connection) -> tuple[int, int]:
        row = await conn.fetchrow(_COUNT_PENDING, sorted(self.refused))
        return row["pending"], row["publishable"]


async def prune(conn: asyncpg.Connection, retention: object) -> int:
    status: str = await conn.execute(
        "DELETE FROM budget_alert_outbox WHERE published_at < now() - $1::interval", retention
    )
    return int(status.rpartition(" ")[2])


def _oldest_each(rows: list[asyncpg.Record]) -> list[asyncpg.Record]:
    """Of pending rows in id order, each state's first."""
    seen: set[tuple[object, ...]] = set()
    oldest = []
    for row in rows:
        key = (row["budget_id"], row["period_start"], row["measure"], row["threshold"])
        if key not in seen:
            seen.add(key)
            oldest.append(row)
    return oldest
