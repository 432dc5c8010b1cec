"""`verify`'s budget check: every budget's stored state against the state the budget rules
(consumer/billing/budget_rules.py) compute from the ledger rows (docs/operations.md#budgets).

Judged: every period that has stored states (against the limits stored with them: a period
keeps the limits it was first judged under), and every budget's current period (against the
budget's limits, when it has no stored state yet). Run inside verify's snapshot, so the usage
and the states are the ones one set of committed batches left.
"""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from consumer.billing.budget_rules import StateKey, judge
from consumer.commands.budgets import read_budgets
from consumer.ledger.rebuild import Difference

_SPENDS = """
WITH periods AS (
  SELECT DISTINCT budget_id, period_start FROM budget_states
  UNION
  SELECT id, budget_period_start(period, now()) FROM budgets
)
SELECT p.budget_id, p.period_start, s.cost_micros, s.total_tokens
FROM periods AS p JOIN budgets AS b ON b.id = p.budget_id
CROSS JOIN LATERAL (
  SELECT coalesce(sum(u.cost_micros), 0) AS cost_micros,
         coalesce(sum(u.total_tokens), 0) AS total_tokens
  FROM token_usage AS u
  WHERE u.search_space_id = b.search_space_id
    AND u.source_at >= p.period_start
    AND u.source_at < budget_period_end(b.period, p.period_start)
    AND (b.user_id IS NULL OR u.user_id = b.user_id)
) AS s
"""
_STATES = (
    "SELECT budget_id, period_start, measure, threshold, limit_value, crossed, sequence"
    " FROM budget_states"
)


def _key(budget_id: int, start: datetime, measure: str, threshold: int) -> str:
    return f"budget {budget_id} period {start.astimezone(UTC).date()} {measure} {threshold} %"


async def check_budgets(conn: asyncpg.Connection) -> list[Difference]:
    """Every stored budget state that differs from the ledger's, described."""
    budgets = {budget.id: budget for budget in await read_budgets(conn)}
    stored: dict[tuple[int, datetime], dict[StateKey, asyncpg.Record]] = {}
    for row in await conn.fetch(_STATES):
        period = (row["budget_id"], row["period_start"])
        stored.setdefault(period, {})[row["measure"], row["threshold"]] = row
    found = []
    for row in await conn.fetch(_SPENDS):
        budget_id, start = row["budget_id"], row["period_start"]
        states = stored.get((budget_id, start), {})
        limits = (
            {key: state["limit_value"] for key, state in states.items()}
            if states
            else budgets[budget_id].limits()
        )
        expected = judge(
            {"cost_micros": int(row["cost_micros"]), "total_tokens": int(row["total_tokens"])},
            limits,
        )
        for (measure, threshold), want in sorted(expected.items()):
            state = states.get((measure, threshold))
            have = state is not None and state["crossed"]
            where = _key(budget_id, start, measure, threshold)
            if have != want:
                spend = row[measure]
                found.append(
                    Difference(
                        "budget_states",
                        where,
                        f"stored {'crossed' if have else 'not crossed'}, the ledger's spend"
                        f" {spend} of limit {limits[measure, threshold]} is"
                        f" {'crossed' if want else 'not crossed'}",
                    )
                )
            elif state is not None and state["crossed"] != (state["sequence"] % 2 == 1):
                found.append(Difference("budget_states", where, "sequence and state disagree"))
    return found
