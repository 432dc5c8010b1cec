"""`token-ledger budget set|list|delete` (docs/operations.md#budgets): budgets as rows, and the
evaluation of the current period when one changes.

The evaluation is `budget_evaluate` (migrations/versions/0012_budget_periods.py): the
judgement every batch transaction makes at its COMMIT, with the budget's limits. `set` sums the
budget's spend from the rows again, then judges its periods, in the transaction that stores it,
so the alerts a change causes are written (and later relayed) exactly like those a batch
causes.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import asyncpg

from consumer.billing.budget_rules import Budget
from consumer.ledger.schema import connect_checked
from consumer.settings import Settings


class BudgetRefusedError(ValueError):
    """A budget the command will not store; str() is the one line to print."""


_KNOWN_SPACE = """
SELECT EXISTS (SELECT FROM token_usage WHERE search_space_id = $1)
    OR EXISTS (SELECT FROM chat_threads WHERE search_space_id = $1)
"""
# The conflict targets repeat the partial unique indexes' predicates.
_UPSERT = """
INSERT INTO budgets AS b (search_space_id, user_id, period, cost_micros_limit,
                          total_tokens_limit, thresholds)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT {target} DO UPDATE SET
  cost_micros_limit = EXCLUDED.cost_micros_limit,
  total_tokens_limit = EXCLUDED.total_tokens_limit,
  thresholds = EXCLUDED.thresholds,
  updated_at = now()
RETURNING id
"""
_SPACE_TARGET = "(search_space_id, period) WHERE user_id IS NULL"
_USER_TARGET = "(search_space_id, user_id, period) WHERE user_id IS NOT NULL"
# The space's lock, exclusive: batches take it shared for the spaces whose usage they write
# (consumer/ledger/store.py), so a batch in flight commits before the budget is judged, and one
# that starts after sees the budget.
_LOCK_SPACE = "SELECT pg_advisory_xact_lock(-$1::bigint)"
# The periods a change judges: the current one, and any later one with usage (it may run up to
# LEDGER_MAX_FUTURE_SKEW ahead of the clock), with the new limits (`reconfigure`); every earlier
# one judged before, with the limits it keeps, on the spend `_SUM_AGAIN` found (the repair of a
# spend verify found different). In SQL, not through the client: `total`'s year-1 start does not
# survive a round trip through Python's datetime.
_EVALUATE = """
SELECT budget_evaluate(array_agg($1::bigint), array_agg(p.start), array_agg(NULL::bigint),
                       array_agg(NULL::integer), array_agg(NULL::numeric),
                       array_agg(NULL::numeric), $3)
FROM (
  SELECT budget_period_start($2, now()) AS start WHERE $3
  UNION
  SELECT period_start FROM budget_periods
  WHERE budget_id = $1 AND CASE WHEN $3 THEN period_start > budget_period_start($2, now())
                                ELSE period_start < budget_period_start($2, now())
                                     AND thresholds IS NOT NULL END
) AS p
HAVING count(*) > 0
"""
# The budget's spend of every period summed from its scope's rows again (the triggers keep it
# from then on: migrations/versions/0012): a new budget's history, and the repair for a spend
# that `verify` found different from the rows. The limits a period is judged under stay. Under
# the space's lock, so no usage of the space is written meanwhile.
_SUM_AGAIN = """
WITH summed AS (
  SELECT budget_period_start($2, u.source_at) AS start, sum(u.cost_micros) AS cost_micros,
         sum(u.total_tokens) AS total_tokens
  FROM token_usage AS u
  WHERE u.search_space_id = $3 AND {user_filter}
  GROUP BY 1
), emptied AS (
  UPDATE budget_periods AS s SET cost_micros = 0, total_tokens = 0
  WHERE s.budget_id = $1 AND NOT EXISTS (SELECT FROM summed WHERE summed.start = s.period_start)
)
INSERT INTO budget_periods AS s (budget_id, period_start, cost_micros, total_tokens)
SELECT $1, start, cost_micros, total_tokens FROM summed ORDER BY start
ON CONFLICT (budget_id, period_start) DO UPDATE SET
  cost_micros = EXCLUDED.cost_micros, total_tokens = EXCLUDED.total_tokens
"""
# What the listing reads of the budget tables, by name (never `b.*`): the usage API runs the
# same query under a role granted these columns alone (migration 0011, serve's check_role).
BUDGET_COLUMNS = {
    "budgets": (
        "id",
        "search_space_id",
        "user_id",
        "period",
        "cost_micros_limit",
        "total_tokens_limit",
        "thresholds",
    ),
    "budget_states": ("budget_id", "period_start", "measure", "threshold", "crossed"),
}
# Each budget with its current period's spend (the same sum budget_evaluate makes) and the
# thresholds crossed in it: a period not judged yet has no states, so none crossed. The
# filters are the usage API's too (a space; a user's key: its own user's budgets; one
# id; keyset paging by id), so `budget list` and the API answer from one statement.
_LIST = """
SELECT b.id, b.search_space_id, b.user_id, b.period, b.cost_micros_limit, b.total_tokens_limit,
  b.thresholds, p.start AS period_start, s.cost_micros, s.total_tokens,
  (SELECT coalesce(array_agg(st.measure || ':' || st.threshold ORDER BY st.measure, st.threshold),
                   '{}')
   FROM budget_states AS st
   WHERE st.budget_id = b.id AND st.period_start = p.start AND st.crossed) AS crossed
FROM budgets AS b
CROSS JOIN LATERAL (SELECT budget_period_start(b.period, now()) AS start) AS p
CROSS JOIN LATERAL (
  SELECT coalesce(sum(u.cost_micros), 0) AS cost_micros,
         coalesce(sum(u.total_tokens), 0) AS total_tokens
  FROM token_usage AS u
  WHERE u.search_space_id = b.search_space_id
    AND u.source_at >= p.start AND u.source_at < budget_period_end(b.period, p.start)
    AND (b.user_id IS NULL OR u.user_id = b.user_id)
) AS s
WHERE ($1::bigint IS NULL OR b.search_space_id = $1)
  AND ($2::uuid IS NULL OR b.user_id = $2)
  AND ($3::bigint IS NULL OR b.id = $3)
  AND ($4::bigint IS NULL OR b.id > $4)
ORDER BY b.id
LIMIT $5
"""


@dataclass(frozen=True)
class BudgetChange:
    search_space_id: int
    user_id: uuid.UUID | None
    period: str
    cost_micros: int | None
    tokens: int | None
    thresholds: tuple[int, ...]


async def set_budget(conn: asyncpg.Connection, change: BudgetChange) -> int:
    """Create or update the budget of the change's scope and period and judge its current
    period (and any later one already judged) at once; its id. Run inside the caller's
    transaction."""
    if not await conn.fetchval(_KNOWN_SPACE, change.search_space_id):
        raise BudgetRefusedError(
            f"budget set: search space {change.search_space_id} is unknown: the ledger holds"
            " no thread of it (check --space)"
        )
    await conn.execute(_LOCK_SPACE, change.search_space_id)
    target = _SPACE_TARGET if change.user_id is None else _USER_TARGET
    budget_id: int = await conn.fetchval(
        _UPSERT.format(target=target),
        change.search_space_id,
        change.user_id,
        change.period,
        change.cost_micros,
        change.tokens,
        list(change.thresholds),
    )
    user_filter, user = (
        ("TRUE", ()) if change.user_id is None else ("u.user_id = $4", (change.user_id,))
    )
    await conn.execute(
        _SUM_AGAIN.format(user_filter=user_filter),
        budget_id,
        change.period,
        change.search_space_id,
        *user,
    )
    await conn.execute(_EVALUATE, budget_id, change.period, False)
    await conn.execute(_EVALUATE, budget_id, change.period, True)
    return budget_id


async def list_budgets(
    conn: asyncpg.Connection,
    space: int | None,
    *,
    visible_to: uuid.UUID | None = None,
    budget_id: int | None = None,
    after: int | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Every budget (of one space), its limits, its current period's spend and crossings, in
    id order. `visible_to`: only that user's budgets (a space-wide one's spend is every user's); `budget_id`: that one;
    `after`, `limit`: a page of ids above `after`."""
    return [
        {
            "id": row["id"],
            "search_space_id": row["search_space_id"],
            "user_id": None if row["user_id"] is None else str(row["user_id"]),
            "period": row["period"],
            "period_start": row["period_start"].astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "cost_micros_limit": row["cost_micros_limit"],
            "total_tokens_limit": row["total_tokens_limit"],
            "thresholds": list(row["thresholds"]),
            # Exact: a period's sum is numeric (it may pass 2^63 - 1).
            "cost_micros": int(row["cost_micros"]),
            "total_tokens": int(row["total_tokens"]),
            "crossed": list(row["crossed"]),
        }
        for row in await conn.fetch(_LIST, space, visible_to, budget_id, after, limit)
    ]


async def read_budgets(conn: asyncpg.Connection) -> list[Budget]:
    rows = await conn.fetch("SELECT * FROM budgets ORDER BY id")
    return [budget_of(row) for row in rows]


def budget_of(row: Any) -> Budget:
    return Budget(
        id=row["id"],
        search_space_id=row["search_space_id"],
        user_id=row["user_id"],
        period=row["period"],
        cost_micros_limit=row["cost_micros_limit"],
        total_tokens_limit=row["total_tokens_limit"],
        thresholds=tuple(row["thresholds"]),
    )


async def run_set(settings: Settings, change: BudgetChange) -> int:
    conn = await connect_checked(settings)
    try:
        async with conn.transaction():
            return await set_budget(conn, change)
    finally:
        await conn.close()


async def run_list(settings: Settings, space: int | None) -> list[dict[str, Any]]:
    conn = await connect_checked(settings)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            return await list_budgets(conn, space)
    finally:
        await conn.close()


async def run_delete(settings: Settings, budget_id: int) -> bool:
    """Whether the budget existed. Its alerts already written are still relayed."""
    conn = await connect_checked(settings)
    try:
        status: str = await conn.execute("DELETE FROM budgets WHERE id = $1", budget_id)
    finally:
        await conn.close()
    return status.endswith(" 1")
